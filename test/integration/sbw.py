"""Helpers for the storyboard_worker integration tests.

Services  - the throw-away PostgreSQL + RabbitMQ of test/services.sh, driven
            through `bash test/services.sh FUNC` and its state file.
Cluster   - SQL helpers, GUC changes (ALTER SYSTEM + pg_reload_conf), waits on
            pg_stat_activity and the storyboard_worker.stats view.
LogWatch  - the PostgreSQL log from a mark on.
"""

import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
import uuid

import psycopg2
import psycopg2.extras

TEST_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICES_SH = os.path.join(TEST_DIR, "services.sh")
sys.path.insert(0, os.path.join(os.path.dirname(TEST_DIR), "tools"))
import publish  # noqa: E402  (tools/publish.py)

CONSUMER = "storyboard_worker consumer"
LAUNCHER = "storyboard_worker launcher"
QUEUE = "storyboard_events"
DB = "storyboard"

# Lines in the PostgreSQL log that mean a process crashed.
CRASH_RE = re.compile(r"terminated by signal|TRAP: |PANIC: |was terminated by exception"
                      r"|exited with exit code ([2-9]|[1-9][0-9])|terminating any other active server processes")


def wait_for(pred, timeout=30.0, desc="condition", interval=0.2):
    """Poll pred() until it returns a truthy value; return it, or fail with the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
            last = "connection error: %s" % str(e).strip()
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.0fs waiting for %s; last value: %r"
                                 % (timeout, desc, last))
        time.sleep(interval)


def unique(prefix="t"):
    return "%s%s" % (prefix, uuid.uuid4().hex[:10])


class Metrics:
    """Numbers the suite measures; printed at the end of the pytest run and by run_tests.sh."""

    ALL = []   # every line of the session, for pytest_terminal_summary

    def __init__(self, path):
        self.path = path

    def add(self, name, value):
        line = "%s: %s" % (name, value)
        Metrics.ALL.append(line)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


class Services:
    def __init__(self, svc_dir):
        self.dir = svc_dir
        self.state = {}
        self.load()

    # ---- state file written by services.sh
    def load(self):
        st = {}
        with open(os.path.join(self.dir, "state.env")) as f:
            for line in f:
                line = line.rstrip("\n")
                if "=" not in line:
                    continue
                k, v = line.split("=", 1)
                parts = shlex.split(v) if v else []
                st[k] = parts[0] if parts else ""
        self.state = st
        return st

    def sh(self, fn, *args, check=True, timeout=180):
        env = dict(os.environ, SVC_DIR=self.dir)
        r = subprocess.run(["bash", SERVICES_SH, fn, *args], env=env, timeout=timeout,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.load()
        if check and r.returncode != 0:
            raise RuntimeError("services.sh %s %s failed (rc %d):\n%s%s"
                               % (fn, " ".join(args), r.returncode, r.stdout, r.stderr))
        return r

    @property
    def pg_host(self):
        return self.state["PGHOST"] or os.path.join(self.dir, "pg")

    @property
    def pg_port(self):
        return int(self.state["PG_PORT"])

    @property
    def amqp_port(self):
        return int(self.state["AMQP_PORT"])

    @property
    def amqp_url(self):
        return self.state["AMQP_URL"]

    @property
    def pg_log(self):
        return self.state["PG_LOG"]

    @staticmethod
    def _alive(pid):
        if not pid:
            return False
        try:
            with open("/proc/%s/status" % pid) as f:
                return not any(l.startswith("State:") and "Z" in l.split()[1] for l in f)
        except OSError:
            return False

    def pg_alive(self):
        return self._alive(self.load().get("PG_PID"))

    def rmq_alive(self):
        return self._alive(self.load().get("RMQ_PID"))

    def pg_pid(self):
        return int(self.load()["PG_PID"])

    # ---- lifecycle
    def pg_stop(self):
        self.sh("pg_stop")

    def pg_stop_immediate(self):
        self.sh("pg_stop_immediate")

    def pg_start(self):
        self.sh("pg_start_again")

    def pg_restart(self):
        self.sh("pg_restart")

    def rmq_stop(self):
        self.sh("rmq_stop_broker")

    def rmq_kill(self):
        self.sh("rmq_kill")

    def rmq_start(self):
        self.sh("rmq_start_again")

    def rmq_ctl(self, *args, timeout=60):
        r = self.sh("rmq_ctl", *args, check=False, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError("rabbitmqctl %s failed: %s%s" % (" ".join(args), r.stdout, r.stderr))
        return r.stdout

    def queue_counts(self, name=QUEUE):
        """(ready, unacked, consumers) of a queue, or None if it does not exist."""
        out = self.rmq_ctl("list_queues", "-q", "--no-table-headers",
                           "name", "messages_ready", "messages_unacknowledged", "consumers")
        for line in out.splitlines():
            f = line.split()
            if len(f) == 4 and f[0] == name:
                return int(f[1]), int(f[2]), int(f[3])
        return None

    def connections(self, user=None):
        """Open AMQP connections as (user, state) pairs, optionally for one user."""
        out = self.rmq_ctl("list_connections", "-q", "--no-table-headers", "user", "state")
        conns = [tuple(l.split()[:2]) for l in out.splitlines() if l.strip()]
        return [c for c in conns if user is None or c[0] == user]

    def publisher(self, mandatory=True):
        return publish.Publisher(self.amqp_url, mandatory=mandatory)


class LogWatch:
    def __init__(self, path):
        self.path = path

    def mark(self):
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def since(self, mark):
        try:
            with open(self.path, "rb") as f:
                f.seek(mark)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def grep(self, mark, pattern, flags=re.I):
        rx = re.compile(pattern, flags)
        return [l for l in self.since(mark).splitlines() if rx.search(l)]

    def crashes(self, mark):
        return [l for l in self.since(mark).splitlines() if CRASH_RE.search(l)]


class Cluster:
    """PostgreSQL side: connections, GUCs, workers."""

    def __init__(self, svc, baseline):
        self.svc = svc
        self.baseline = dict(baseline)   # storyboard_worker.* GUCs set with ALTER SYSTEM for the session
        self.dirty = False
        self._conns = {}

    # ---- connections
    def connect(self, dbname=DB, autocommit=True):
        c = psycopg2.connect(host=self.svc.pg_host, port=self.svc.pg_port, user="postgres",
                             dbname=dbname, connect_timeout=10,
                             application_name="sbw-pytest",
                             options="-c statement_timeout=60000")
        c.autocommit = autocommit
        return c

    def reset_connections(self):
        for c in self._conns.values():
            with contextlib.suppress(Exception):
                c.close()
        self._conns = {}

    def conn(self, dbname=DB):
        c = self._conns.get(dbname)
        if c is None or c.closed:
            c = self._conns[dbname] = self.connect(dbname)
        return c

    def q(self, sql, args=None, db=DB, dicts=False):
        for attempt in (1, 2):
            c = self.conn(db)
            try:
                factory = psycopg2.extras.RealDictCursor if dicts else None
                with c.cursor(cursor_factory=factory) as cur:
                    cur.execute(sql, args)
                    return cur.fetchall() if cur.description else []
            except psycopg2.Error as e:
                # a server restart (or a crash restart) killed the cached
                # connection ("server closed the connection unexpectedly"
                # comes as a bare DatabaseError): retry once on a new one
                lost = c.closed or type(e) in (psycopg2.DatabaseError, psycopg2.OperationalError,
                                               psycopg2.InterfaceError)
                if not lost:
                    raise
                self._conns.pop(db, None)
                with contextlib.suppress(Exception):
                    c.close()
                if attempt == 2:
                    raise psycopg2.OperationalError(str(e))

    def one(self, sql, args=None, db=DB):
        rows = self.q(sql, args, db)
        return rows[0][0] if rows else None

    def execute(self, sql, args=None, db=DB):
        self.q(sql, args, db)

    # ---- settings
    def set_gucs(self, reload=True, **kv):
        """ALTER SYSTEM SET storyboard_worker.<k> = <v> for each, then pg_reload_conf()."""
        self.dirty = True
        for k, v in kv.items():
            name = k if "." in k else "storyboard_worker." + k
            if v is None:
                self.execute("ALTER SYSTEM RESET %s" % name, db="postgres")
            else:
                self.execute("ALTER SYSTEM SET %s = %%s" % name, (str(v),), db="postgres")
        if reload:
            self.reload()

    def reload(self):
        self.execute("SELECT pg_reload_conf()", db="postgres")
        time.sleep(0.3)   # let the postmaster re-read and signal its children

    def restore_gucs(self, reload=True):
        """Back to the session's settings: ALTER SYSTEM RESET ALL + the baseline."""
        self.execute("ALTER SYSTEM RESET ALL", db="postgres")
        for k, v in self.baseline.items():
            self.execute("ALTER SYSTEM SET %s = %%s" % k, (str(v),), db="postgres")
        if reload:
            self.reload()
        self.dirty = False

    def setting(self, name, db="postgres"):
        name = name if "." in name else "storyboard_worker." + name
        return self.one("SELECT current_setting(%s)", (name,), db=db)

    def worker_count(self):
        return int(self.setting("worker_count"))

    # ---- workers
    def backends(self, btype_prefix="storyboard_worker"):
        return self.q("SELECT pid, backend_type, datname FROM pg_stat_activity "
                      "WHERE backend_type LIKE %s ORDER BY pid", (btype_prefix + "%",), db="postgres")

    def consumer_pids(self):
        return [r[0] for r in self.q("SELECT pid FROM pg_stat_activity WHERE backend_type = %s "
                                     "ORDER BY pid", (CONSUMER,), db="postgres")]

    def stats(self, db=DB):
        return self.q("SELECT * FROM storyboard_worker.stats WHERE pid IS NOT NULL AND pid <> 0 "
                      "ORDER BY worker_id", db=db, dicts=True)

    def all_consuming(self, n=None, db=DB):
        """The stats rows if exactly n (default worker_count) workers are consuming, else None."""
        n = self.worker_count() if n is None else n
        st = self.stats(db)
        pids = self.consumer_pids()
        if len(pids) == n and len([s for s in st if s["state"] == "consuming"]) == n \
                and sorted(s["pid"] for s in st if s["state"] == "consuming") == pids:
            return st
        return None

    def wait_consuming(self, n=None, timeout=45, db=DB):
        return wait_for(lambda: self.all_consuming(n, db), timeout,
                        "%s consumers in state 'consuming' (stats + pg_stat_activity)"
                        % ("worker_count" if n is None else n))

    def counters(self, db=DB):
        r = self.q("SELECT coalesce(sum(messages_received),0), coalesce(sum(messages_processed),0), "
                   "coalesce(sum(messages_dead_lettered),0), coalesce(sum(messages_redelivered),0) "
                   "FROM storyboard_worker.stats", db=db)
        return dict(zip(("received", "processed", "dead_lettered", "redelivered"), map(int, r[0])))

    # ---- the test plugins' tables
    def seen(self, prefix, plugin="record", db=DB):
        """(rows, distinct keys) recorded by a plugin for keys 'key=<prefix>-*'."""
        r = self.q("SELECT count(*), count(DISTINCT key) FROM sbw_test.seen "
                   "WHERE plugin = %s AND key LIKE %s", (plugin, "key=%s-%%" % prefix), db=db)
        return int(r[0][0]), int(r[0][1])

    def wait_seen(self, prefix, n, timeout=60, plugin="record", db=DB):
        wait_for(lambda: self.seen(prefix, plugin, db)[1] >= n, timeout,
                 "%d events with prefix %s seen by plugin %s (have %s)"
                 % (n, prefix, plugin, self.seen(prefix, plugin, db)))
        return self.seen(prefix, plugin, db)


# ---------------------------------------------------------------- the test schema
TEST_SCHEMA_SQL = r"""
CREATE SCHEMA IF NOT EXISTS sbw_test;
CREATE TABLE IF NOT EXISTS sbw_test.seen (
	id			bigserial PRIMARY KEY,
	plugin		text NOT NULL,
	key			text,
	redelivered	boolean,
	ev			jsonb,
	backend_pid	integer NOT NULL DEFAULT pg_backend_pid(),
	xid			xid8 NOT NULL DEFAULT pg_current_xact_id(),
	at			timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS seen_key_idx ON sbw_test.seen (key text_pattern_ops);
CREATE TABLE IF NOT EXISTS sbw_test.control (name text PRIMARY KEY, value text);

-- 'record': one row per event (key = query_string, which tools/publish.py makes unique)
CREATE OR REPLACE FUNCTION sbw_test.record(e storyboard_worker.event) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO sbw_test.seen (plugin, key, redelivered, ev)
	VALUES ('record', e.query_string, e.redelivered, to_jsonb(e));
END $$;

-- 'fragile': division by zero (SQLSTATE 22012) while control.fragile_broken = 'on'
CREATE OR REPLACE FUNCTION sbw_test.fragile(e storyboard_worker.event) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	IF coalesce((SELECT value FROM sbw_test.control WHERE name = 'fragile_broken'), 'on') = 'on' THEN
		PERFORM 1 / (length(coalesce(e.query_string, 'x')) * 0);
	END IF;
	INSERT INTO sbw_test.seen (plugin, key, redelivered, ev)
	VALUES ('fragile', e.query_string, e.redelivered, to_jsonb(e));
END $$;

-- 'slow': sleeps control.slow_ms (default 10) milliseconds, so events stay in flight
CREATE OR REPLACE FUNCTION sbw_test.slow(e storyboard_worker.event) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_sleep(coalesce((SELECT value::float8 FROM sbw_test.control WHERE name = 'slow_ms'), 10) / 1000.0);
END $$;
"""


def setup_test_db(cluster, dbname):
    """A database with the extension, without 'subscription', with the 'record' plugin."""
    exists = cluster.one("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,), db="postgres")
    if not exists:
        cluster.execute('CREATE DATABASE "%s"' % dbname, db="postgres")
    cluster.execute("CREATE EXTENSION IF NOT EXISTS storyboard_worker", db=dbname)
    cluster.execute("SELECT storyboard_worker.unregister_plugin('subscription')", db=dbname)
    cluster.execute(TEST_SCHEMA_SQL, db=dbname)
    cluster.execute("SELECT storyboard_worker.register_plugin('record', "
                    "'sbw_test.record(storyboard_worker.event)')", db=dbname)


def register(cluster, name, db=DB):
    cluster.execute("SELECT storyboard_worker.register_plugin(%s, %s::regprocedure)",
                    (name, "sbw_test.%s(storyboard_worker.event)" % name), db=db)


def unregister(cluster, name, db=DB):
    cluster.execute("SELECT storyboard_worker.unregister_plugin(%s)", (name,), db=db)


def set_control(cluster, name, value, db=DB):
    cluster.execute("INSERT INTO sbw_test.control VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, str(value)), db=db)


def workload_data(cluster, b, n_events, email=False):
    """The rate workload's StoryBoard rows, ids from b + 1: 10 users (with the email preference
    when email), one story with 3 tasks in 2 projects of 1 group, 10 subscribers (3 of the story,
    1 per task, 1 per project, 2 of the group) and n_events task_status_changed events rows."""
    cluster.execute("""
        INSERT INTO users (id, full_name, email, is_staff, is_active, is_superuser, enable_login)
        SELECT %(b)s + i, 'rate user ' || i, 'rate' || i || '.' || %(b)s || '@example.org', false, true, false, true
          FROM generate_series(1, 10) i;
        INSERT INTO user_preferences (user_id, key, value, type)
          SELECT %(b)s + i, 'plugin_email_enable', 'true', 'string' FROM generate_series(1, 10) i
           WHERE %(email)s;
        INSERT INTO projects (id, name, is_active) VALUES (%(b)s + 1, 'rate-p1-%(b)s', true), (%(b)s + 2, 'rate-p2-%(b)s', true);
        INSERT INTO project_groups (id, name, title) VALUES (%(b)s + 1, 'rate-g-%(b)s', 'Rate group');
        INSERT INTO project_group_mapping (project_id, project_group_id) VALUES (%(b)s + 1, %(b)s + 1), (%(b)s + 2, %(b)s + 1);
        INSERT INTO stories (id, title, private, creator_id) VALUES (%(b)s + 1, 'rate story', false, %(b)s + 1);
        INSERT INTO tasks (id, title, story_id, project_id, status, priority)
        VALUES (%(b)s + 1, 't1', %(b)s + 1, %(b)s + 1, 'todo', 'medium'),
               (%(b)s + 2, 't2', %(b)s + 1, %(b)s + 2, 'todo', 'medium'),
               (%(b)s + 3, 't3', %(b)s + 1, %(b)s + 2, 'todo', 'medium');
        INSERT INTO subscriptions (user_id, target_type, target_id) VALUES
          (%(b)s + 1, 'story', %(b)s + 1), (%(b)s + 2, 'story', %(b)s + 1), (%(b)s + 3, 'story', %(b)s + 1),
          (%(b)s + 4, 'task', %(b)s + 1), (%(b)s + 5, 'task', %(b)s + 2), (%(b)s + 6, 'task', %(b)s + 3),
          (%(b)s + 7, 'project', %(b)s + 1), (%(b)s + 8, 'project', %(b)s + 2),
          (%(b)s + 9, 'project_group', %(b)s + 1), (%(b)s + 10, 'project_group', %(b)s + 1);
        INSERT INTO events (id, story_id, author_id, event_type, event_info)
        SELECT %(b)s + i, %(b)s + 1, %(b)s + 1, 'task_status_changed',
               '{"story_id": ' || (%(b)s + 1) || ', "task_id": ' || (%(b)s + 1) || '}'
          FROM generate_series(1, %(n)s) i;
    """ % {"b": b, "n": n_events, "email": "true" if email else "false"})
