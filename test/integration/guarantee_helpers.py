"""Helpers for the delivery-guarantee, TLS, security and soak tests
(test_guarantees.py, test_tls.py, test_security.py, test_soak.py).

They build on the harness (sbw.py, conftest.py) and add:

publish_window()  - a fast publisher: pika's asynchronous connection with a
                    window of outstanding publisher confirms; returns once
                    every message is confirmed (optionally persistent)
declare_queue()   - declare the exchange, the durable event queue and its
                    bindings exactly as the consumers do, so messages
                    published before any consumer connects are kept
ledger_key()      - the key storyboard_worker.ledger stores for a message
proc_mem()        - VmRSS / RssAnon / RssFile / RssShmem of a process
CounterBase       - per-pid stats counters before/after a fault
G_SCHEMA_SQL      - the plugins and tables these tests use (schema sbw_g)
"""

import collections
import hashlib
import os
import tempfile
import time
import uuid

import sbw
from sbw import wait_for

QUEUE = sbw.QUEUE
EXCHANGE = "storyboard"
BINDING_KEYS = ("task", "story", "project", "project_group", "timeline_event")


# ---------------------------------------------------------------- broker side
def declare_queue(url, queue=QUEUE, exchange=EXCHANGE, arguments=None):
    """The topology the consumers declare (durable topic exchange, durable
    queue, the five bindings), declared by the test before it publishes."""
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange=exchange, exchange_type="topic", durable=True, auto_delete=False)
        ch.queue_declare(queue=queue, durable=True, exclusive=False, auto_delete=False,
                         arguments=arguments)
        for k in BINDING_KEYS:
            ch.queue_bind(queue=queue, exchange=exchange, routing_key=k)
    finally:
        conn.close()


def delete_queue(url, queue):
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_delete(queue=queue)
    finally:
        conn.close()


def delete_exchange(url, exchange):
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().exchange_delete(exchange=exchange)
    finally:
        conn.close()


def publish_window(url, messages, exchange=EXCHANGE, persistent=False, window=500,
                   timeout=300.0, mandatory=True):
    """Publish messages [(routing_key, body bytes, extra BasicProperties kwargs or None)]
    with publisher confirms, keeping up to `window` unconfirmed.  Returns the
    seconds it took; raises if any message was nacked, returned (unroutable)
    or not confirmed in time.  Properties are StoryBoard's (app_id, content
    type), plus delivery_mode 2 if persistent."""
    import pika
    msgs = list(messages)
    total = len(msgs)
    st = {"next": 0, "done": 0, "nacked": 0, "returned": 0, "error": None, "ch": None}
    outstanding = collections.deque()   # delivery tags in publish order
    settled = set()                       # tags confirmed out of order
    base = dict(app_id="storyboard", content_type="application/json")
    if persistent:
        base["delivery_mode"] = 2
    plain_props = pika.BasicProperties(**base)
    t0 = time.monotonic()

    def settle(tag, multiple, ok):
        n = 0
        if multiple:
            while outstanding and outstanding[0] <= tag:
                t = outstanding.popleft()
                if t in settled:
                    settled.discard(t)
                else:
                    n += 1
        elif outstanding and outstanding[0] == tag:
            outstanding.popleft()
            n = 1
            while outstanding and outstanding[0] in settled:
                settled.discard(outstanding.popleft())
        else:
            settled.add(tag)
            n = 1
        st["done"] += n
        if not ok:
            st["nacked"] += n

    def pump():
        ch = st["ch"]
        while st["next"] < total and len(outstanding) - len(settled) < window:
            rk, body, extra = msgs[st["next"]]
            st["next"] += 1
            props = pika.BasicProperties(**dict(base, **extra)) if extra else plain_props
            ch.basic_publish(exchange, rk, body, properties=props, mandatory=mandatory)
            outstanding.append(st["next"])   # tags are 1, 2, 3 ... in publish order
        if st["done"] >= total:
            conn.close()

    def on_confirm(frame):
        m = frame.method
        settle(m.delivery_tag, m.multiple, isinstance(m, pika.spec.Basic.Ack))
        pump()

    def on_return(ch, method, props, body):
        st["returned"] += 1

    def on_channel(ch):
        st["ch"] = ch
        ch.add_on_return_callback(on_return)
        ch.exchange_declare(exchange, exchange_type="topic", durable=True,
                            callback=lambda _f: ch.confirm_delivery(on_confirm, callback=lambda _f: pump()))

    def on_open(c):
        c.channel(on_open_callback=on_channel)

    def on_open_error(c, err):
        st["error"] = "could not connect: %r" % (err,)
        c.ioloop.stop()

    def on_closed(c, reason):
        if st["done"] < total and st["error"] is None:
            st["error"] = "connection closed: %r" % (reason,)
        c.ioloop.stop()

    def on_timeout():
        st["error"] = "timed out after %.0fs: %d of %d confirmed" % (timeout, st["done"], total)
        try:
            conn.close()
        except Exception:
            conn.ioloop.stop()

    conn = pika.SelectConnection(pika.URLParameters(url), on_open_callback=on_open,
                                 on_open_error_callback=on_open_error, on_close_callback=on_closed)
    if total == 0:
        return 0.0
    conn.ioloop.call_later(timeout, on_timeout)
    conn.ioloop.start()
    if st["error"]:
        raise RuntimeError("publish_window: " + st["error"])
    if st["nacked"] or st["returned"]:
        raise RuntimeError("publish_window: %d nacked, %d returned (unroutable) of %d"
                           % (st["nacked"], st["returned"], total))
    return time.monotonic() - t0


def bulk_messages(count, prefix, message_ids=False):
    """tools/publish.py's bulk events (task status changes keyed 'key=<prefix>-<i>'
    in query_string) as (routing_key, body, properties) for publish_window,
    plus the payloads for checking the content."""
    payloads = sbw.publish.bulk_events(count, prefix)
    msgs = []
    for i, p in enumerate(payloads):
        extra = {"message_id": "%s-%d" % (prefix, i)} if message_ids else None
        msgs.append((p["resource"], sbw.publish.encode(p), extra))
    return msgs, payloads


def ledger_key(routing_key, body, message_id=None):
    """storyboard_worker.ledger.message_key (a uuid, as text): the first 16 bytes of
    sha256('m:' + message_id), else of sha256(rk NUL body)."""
    if message_id:
        raw = b"m:" + (message_id if isinstance(message_id, bytes) else message_id.encode())
    else:
        raw = routing_key.encode() + b"\0" + body
    return str(uuid.UUID(bytes=hashlib.sha256(raw).digest()[:16]))


def queue_drained(services, queue=QUEUE, timeout=60):
    return wait_for(lambda: (q := services.queue_counts(queue)) and q[0] == 0 and q[1] == 0 and q,
                    timeout, "queue %s empty (ready, unacked, consumers)" % queue)


# ---------------------------------------------------------------- PostgreSQL side
def proc_mem(pid):
    """{'VmRSS': kB, 'RssAnon': kB, 'RssFile': kB, 'RssShmem': kB} from /proc/<pid>/status."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


class CounterBase:
    """Stats counters per consumer pid, so that a delta survives consumers
    being replaced (a new pid's counters start at zero)."""

    FIELDS = ("messages_received", "messages_processed", "messages_dead_lettered",
              "messages_redelivered", "messages_duplicates")

    def __init__(self, cluster):
        self.cluster = cluster
        self.base = {s["pid"]: s for s in cluster.stats()}

    def delta(self):
        out = dict.fromkeys(self.FIELDS, 0)
        for s in self.cluster.stats():
            b = self.base.get(s["pid"])
            for k in self.FIELDS:
                out[k] += int(s[k] or 0) - (int(b[k] or 0) if b else 0)
        return out


def applied_check(cluster, prefix, payloads):
    """(rows, distinct keys, content mismatches, redelivered rows) of the 'record'
    plugin for bulk_messages(prefix); content = the fields the publisher sent."""
    rows = cluster.q("SELECT key, ev->'resource_before', ev->'resource_after', ev->>'resource_id', "
                     "ev->>'path', ev->>'method', (ev->>'author_id')::bigint, (ev->>'status')::int, "
                     "ev->>'routing_key', redelivered "
                     "FROM sbw_test.seen WHERE plugin = 'record' AND key LIKE %s", ("key=%s-%%" % prefix,))
    want = {p["query_string"]: p for p in payloads}
    bad = []
    for key, before, after, rid, path, method, author, status, rk, _red in rows:
        p = want.get(key)
        if p is None:
            bad.append((key, "unexpected key"))
            continue
        got = (before, after, int(rid), path, method, author, status, rk)
        exp = (p["resource_before"], p["resource_after"], int(p["resource_id"]), p["path"],
               p["method"], p["author_id"], p["status"], p["resource"])
        if got != exp:
            bad.append((key, got, exp))
    redelivered = sum(1 for r in rows if r[9])
    return len(rows), len({r[0] for r in rows}), bad, redelivered


def ledger_rows(cluster, messages):
    """How many of these messages (routing_key, body, props) have a ledger row."""
    keys = [ledger_key(rk, body, (extra or {}).get("message_id")) for rk, body, extra in messages]
    n = 0
    for i in range(0, len(keys), 1000):
        n += cluster.one("SELECT count(*) FROM storyboard_worker.ledger WHERE message_key = ANY(%s::uuid[])",
                         (keys[i:i + 1000],))
    return n


def dead_letters_like(cluster, needle):
    """Dead letters whose body contains needle (text)."""
    return cluster.one("SELECT count(*) FROM storyboard_worker.dead_letters "
                       "WHERE position(convert_to(%s, 'UTF8') in body) > 0", (needle,))


G_SCHEMA_SQL = r"""
CREATE SCHEMA IF NOT EXISTS sbw_g;
CREATE TABLE IF NOT EXISTS sbw_g.control (name text PRIMARY KEY, value text);
CREATE TABLE IF NOT EXISTS sbw_g.applied (
	plugin		text NOT NULL,
	key			text,
	redelivered	boolean,
	backend_pid	integer NOT NULL DEFAULT pg_backend_pid(),
	at			timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS applied_key_idx ON sbw_g.applied (key text_pattern_ops);

-- 'flaky': for an event whose query_string is in flaky_plan, fail with the
-- plan's SQLSTATE until the plan's sequence (non-transactional, so it counts
-- attempts across rolled-back subtransactions) passes fail_times.
CREATE TABLE IF NOT EXISTS sbw_g.flaky_plan (
	key			text PRIMARY KEY,
	fail_times	integer NOT NULL,
	sqlstate	text NOT NULL,
	seq			regclass NOT NULL
);
CREATE OR REPLACE FUNCTION sbw_g.flaky(e storyboard_worker.event) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	p sbw_g.flaky_plan;
	n bigint;
BEGIN
	SELECT * INTO p FROM sbw_g.flaky_plan WHERE key = e.query_string;
	IF NOT FOUND THEN
		RETURN;
	END IF;
	n := nextval(p.seq);
	IF n <= p.fail_times THEN
		RAISE EXCEPTION 'flaky %: attempt % fails', e.query_string, n USING ERRCODE = p.sqlstate;
	END IF;
	INSERT INTO sbw_g.applied (plugin, key, redelivered) VALUES ('flaky', e.query_string, e.redelivered);
END $$;

-- 'gated': its row is checked by a deferred constraint trigger: when the
-- plugin returns, in its subtransaction (the consumer fires its deferred
-- constraints there); while control.commit_fail = 'on' the check refuses.
CREATE SEQUENCE IF NOT EXISTS sbw_g.commit_attempts;
CREATE TABLE IF NOT EXISTS sbw_g.gate (key text);
CREATE OR REPLACE FUNCTION sbw_g.gate_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM nextval('sbw_g.commit_attempts');
	IF coalesce((SELECT value FROM sbw_g.control WHERE name = 'commit_fail'), 'off') = 'on' THEN
		RAISE EXCEPTION 'commit refused for %', NEW.key USING ERRCODE = 'check_violation';
	END IF;
	RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS gate_at_commit ON sbw_g.gate;
CREATE CONSTRAINT TRIGGER gate_at_commit AFTER INSERT ON sbw_g.gate
	DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sbw_g.gate_check();
CREATE OR REPLACE FUNCTION sbw_g.gated(e storyboard_worker.event) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	IF e.query_string LIKE 'key=gate%' THEN
		INSERT INTO sbw_g.gate (key) VALUES (e.query_string);
		INSERT INTO sbw_g.applied (plugin, key, redelivered) VALUES ('gated', e.query_string, e.redelivered);
	END IF;
END $$;

-- 'slow_first': sleeps control.slow_first_ms on a first delivery only
CREATE OR REPLACE FUNCTION sbw_g.slow_first(e storyboard_worker.event) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	IF NOT e.redelivered AND e.query_string LIKE 'key=hb%' THEN
		PERFORM pg_sleep(coalesce((SELECT value::float8 FROM sbw_g.control WHERE name = 'slow_first_ms'), 0) / 1000.0);
	END IF;
END $$;

-- 'count': the soak's trivial plugin: one small row per event
CREATE TABLE IF NOT EXISTS sbw_g.soak (key text);
CREATE OR REPLACE FUNCTION sbw_g.count(e storyboard_worker.event) RETURNS void
LANGUAGE sql AS $$ INSERT INTO sbw_g.soak (key) VALUES (e.query_string) $$;

-- the stats function under a name that survives DROP EXTENSION (it depends
-- on nothing of the extension's), to watch the consumers while it is gone
CREATE OR REPLACE FUNCTION sbw_g.raw_stats(
	OUT worker_id integer, OUT pid integer, OUT state text,
	OUT broker text, OUT connected_since timestamptz,
	OUT messages_received bigint, OUT messages_processed bigint,
	OUT messages_dead_lettered bigint, OUT messages_redelivered bigint,
	OUT last_error text, OUT last_error_at timestamptz,
	OUT messages_duplicates bigint)
	RETURNS SETOF record
	AS 'storyboard_worker', 'sbw_worker_stats'
	LANGUAGE C STRICT VOLATILE;
"""


def setup_g(cluster, db=sbw.DB):
    cluster.execute(G_SCHEMA_SQL, db=db)


def register_g(cluster, name, db=sbw.DB):
    cluster.execute("SELECT storyboard_worker.register_plugin(%s, %s::regprocedure)",
                    (name, "sbw_g.%s(storyboard_worker.event)" % name), db=db)


def set_g_control(cluster, name, value, db=sbw.DB):
    cluster.execute("INSERT INTO sbw_g.control VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, str(value)), db=db)


def applied(cluster, plugin, like):
    r = cluster.q("SELECT count(*), count(DISTINCT key) FROM sbw_g.applied WHERE plugin = %s AND key LIKE %s",
                  (plugin, like))
    return int(r[0][0]), int(r[0][1])


def sigcont_safe(pid):
    """SIGCONT that never raises (the finally of a SIGSTOP test)."""
    try:
        os.kill(int(pid), 18)
    except (OSError, ValueError, TypeError):
        pass


def free_port(avoid=()):
    """A TCP port free on 127.0.0.1 now, in 20000-32000, not in avoid."""
    import random
    import socket
    for _ in range(200):
        p = random.randint(20000, 32000)
        if p in avoid:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port")


class Standby:
    """A streaming standby of the test cluster (pg_basebackup -R), started as
    a child we hold the Popen of; stop() by that process.  extra_conf goes to
    its postgresql.auto.conf; app_name is its application_name upstream."""

    def __init__(self, services, pgbin, extra_conf="", app_name="sbw_standby"):
        import subprocess
        import types
        self.base = tempfile.mkdtemp(prefix="g_standby.", dir=services.dir)
        os.chmod(self.base, 0o755)
        self.data, self.sock = os.path.join(self.base, "data"), os.path.join(self.base, "sock")
        os.makedirs(self.sock)
        subprocess.run(["chown", "-R", "postgres:postgres", self.base], check=True)
        self.port = free_port()
        self.log = os.path.join(self.base, "postgres.log")
        self.proc = None
        r = subprocess.run(["runuser", "-u", "postgres", "--", pgbin + "/pg_basebackup", "-h", services.pg_host,
                            "-p", str(services.pg_port), "-U", "postgres", "-D", self.data, "-R", "-X", "stream",
                            "-c", "fast", "-d", "application_name=%s" % app_name],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError("pg_basebackup failed: " + r.stdout)
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            f.write("port = %d\nunix_socket_directories = '%s'\n%s\n" % (self.port, self.sock, extra_conf))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                                          pgbin + "/postgres", "-D", self.data], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.cluster = sbw.Cluster(types.SimpleNamespace(pg_host=self.sock, pg_port=self.port), {})

    def stop(self):
        import signal
        import subprocess
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
        self.cluster.reset_connections()
        subprocess.run(["rm", "-rf", self.base])
