"""Hostile input through the broker, and least privilege.

Hostile bodies: each one must end in storyboard_worker.dead_letters with
plugin NULL, the exact error text and SQLSTATE, be acknowledged (the queue
ends empty), never reach a plugin, and leave the consumers running (same
pids).

Privileges: plugins run as storyboard_worker.role (or the database owner)
and cannot climb back to the worker's superuser session; a role that is not
the extension's owner cannot manage plugins or read the registry, the dead
letters or the ledger even if granted EXECUTE; the broker password is never
shown to ordinary users nor written to the log.
"""

import json
import time

import psycopg2
import pytest

import guarantee_helpers
import sbw
from sbw import wait_for

INTRUDER = "sbw_g_intruder"
PLUGIN_ROLE = "sbw_g_plugins"
OWNER_ROLE = "sbw_g_dbowner"
SECRET = "Sekr3t-pw-xyz"
WRONG_SECRET = "Sekr3t-pw-WRONG"


# ---------------------------------------------------------------- hostile input
def _body(tag, case, **over):
    b = sbw.publish.task_status_changed(1, 1, query_string="key=%s-%s" % (tag, case))[0]
    b.update(over)
    return b


def _enc(b):
    return json.dumps(b, ensure_ascii=False).encode()


def _depth_offset(body, limit=64):
    """Byte offset of the first '{' or '[' that opens level limit + 1 (no braces inside our strings)."""
    depth = 0
    in_str = esc = False
    for i, c in enumerate(body):
        ch = chr(c)
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            if depth >= limit:
                return i
            depth += 1
        elif ch in "}]":
            depth -= 1
    raise AssertionError("not deeper than %d" % limit)


def hostile_cases(tag, limit):
    """name -> (body bytes, expected SQLSTATE, expected error text)."""
    c = {}

    def add(name, body, sqlstate, error):
        c[name] = (body, sqlstate, error)

    b = b'{"author_id": 1, "method": "PUT", "path": '
    add("invalid_json", b, "22P02",
        "message body is not valid JSON: unexpected end of input at byte offset %d" % len(b))
    b = _enc(_body(tag, "trailing_garbage")) + b" x"
    add("trailing_garbage", b, "22P02",
        'message body is not valid JSON: invalid token "x" at byte offset %d' % (len(b) - 1))
    add("json_array", b'[{"resource": "task"}, 2]', "42804", "message body is a JSON array, not an object")
    add("json_string", b'"task"', "42804", "message body is a JSON string, not an object")
    add("json_null", b"null", "42804", "message body is JSON null, not an object")
    add("empty", b"", "22P02", "message body is empty")
    add("whitespace", b" \n\t ", "22P02", "message body contains only whitespace")
    add("non_numeric_id", _enc(_body(tag, "non_numeric_id", resource_id="12abc")), "42804",
        'key "resource_id" must be an integer, a string of digits or null, not the string "12abc"')
    b = _enc(_body(tag, "huge_number")).replace(
        b'"resource_id": "1"', b'"resource_id": 123456789012345678901234567890')
    add("huge_number", b, "22003", "number 123456789012345678901234567890 at byte offset %d is out of range "
        "for a 64-bit integer" % b.index(b"123456789012345678901234567890"))
    add("huge_digit_string", _enc(_body(tag, "huge_digit_string", resource_id="99999999999999999999")), "22003",
        'key "resource_id" is out of range for a 64-bit integer: "99999999999999999999"')
    add("huge_float", _enc(_body(tag, "huge_float")).replace(
        b'"resource_after": {', b'"resource_after": {"big": 1e200000, '), "22003",
        'key "resource_after" cannot be stored as jsonb: value overflows numeric format')
    deep = {"leaf": 1}
    for _ in range(100):
        deep = {"a": deep}
    b = _enc(_body(tag, "deep_nesting", resource_after=deep))
    add("deep_nesting", b, "54000", "JSON nesting deeper than 64 levels at byte offset %d" % _depth_offset(b))
    b = _enc(_body(tag, "nul_escaped", path="/v1/tasks/1\u0000x")).replace(b"\x00", b"\\u0000")
    add("nul_escaped", b, "22P05", "message body has \\u0000 in the string at byte offset %d, which PostgreSQL "
        "text and jsonb cannot store" % b.index(b'"/v1/tasks/1\\u0000x"'))
    b = _enc(_body(tag, "nul_raw", path="/v1/tasks/1PLACEHOLDER")).replace(b"PLACEHOLDER", b"\x00")
    add("nul_raw", b, "22P02", 'message body is not valid JSON: control character not escaped inside a string: '
        '"\\u0000" at byte offset %d' % b.index(b"\x00"))
    b = _enc(_body(tag, "nul_in_snapshot")).replace(b'"title": "A task"', b'"title": "A \\u0000 task"', 1)
    add("nul_in_snapshot", b, "22P05", "message body has \\u0000 in the string at byte offset %d, which "
        "PostgreSQL text and jsonb cannot store" % b.index(b'"A \\u0000 task"'))
    b = _enc(_body(tag, "lone_surrogate")).replace(b'"path": "/v1/tasks/1"', b'"path": "/v1/tasks/\\ud800"')
    add("lone_surrogate", b, "22P02", "message body has a lone UTF-16 surrogate in the string at byte offset %d"
        % b.index(b'"/v1/tasks/\\ud800"'))
    # duplicate keys: the last one wins, as for StoryBoard's json.loads; here it is refused
    b = _enc(_body(tag, "duplicate_keys"))
    b = b[:-1] + b', "resource": "bogus"}'
    add("duplicate_keys", b, "22023", 'unknown resource "bogus"')
    b = _enc(_body(tag, "invalid_utf8", path="/v1/tasks/PLACEHOLDER")).replace(b"PLACEHOLDER", b"\xff\xfe(")
    add("invalid_utf8", b, "22021",
        "invalid UTF-8 byte sequence 0xff at byte offset %d of the message body" % b.index(b"\xff"))
    b = _enc(_body(tag, "overlong_utf8", path="/v1/tasks/PLACEHOLDER")).replace(b"PLACEHOLDER", b"\xc0\xaf")
    add("overlong_utf8", b, "22021",
        "invalid UTF-8 byte sequence 0xc0 0xaf at byte offset %d of the message body" % b.index(b"\xc0"))
    add("bad_method", _enc(_body(tag, "bad_method", method="GET")), "22023",
        'method "GET" is not one of POST, PUT, DELETE')
    add("unknown_resource", _enc(_body(tag, "unknown_resource", resource="bogus")), "22023",
        'unknown resource "bogus"')
    add("no_resource", _enc(_body(tag, "no_resource", resource=None)), "22023",
        'key "resource" is missing, null or empty')
    # a wrong (truthy) JSON type in each of the 12 keys
    wrong = [("author_id", {"id": 1}, "an integer, a string of digits or null", "an object"),
             ("method", 1, "a string or null", "the integer 1"),
             ("url", ["x"], "a string or null", "an array"),
             ("path", {"p": 1}, "a string or null", "an object"),
             ("query_string", 5, "a string or null", "the integer 5"),
             ("status", "ok", "an integer, a string of digits or null", 'the string "ok"'),
             ("resource", True, "a string or null", "a boolean"),
             ("resource_id", [1], "an integer, a string of digits or null", "an array"),
             ("sub_resource", 3, "a string or null", "the integer 3"),
             ("sub_resource_id", 1.5, "an integer, a string of digits or null", "the number 1.5"),
             ("resource_before", "snapshot", "an object or null", 'the string "snapshot"'),
             ("resource_after", [1, 2], "an object or null", "an array")]
    assert sorted(w[0] for w in wrong) == sorted(sbw.publish.BODY_KEYS)
    for key, value, expected, got in wrong:
        b = _body(tag, "wrong_" + key)
        b[key] = value
        add("wrong_" + key, _enc(b), "42804", 'key "%s" must be %s, not %s' % (key, expected, got))
    b = _enc(_body(tag, "over_max", resource_after={"description": "x" * (limit + 100)}))
    # refused from the frame header: only its first max_message_bytes are read and kept
    add("over_max", b, "54000",
        "message body of %d bytes exceeds storyboard_worker.max_message_bytes (%d); "
        "only its first %d bytes were read" % (len(b), limit, limit))
    return c


def test_hostile_bodies_dead_lettered_with_exact_errors(cluster, services, pglog, metrics):
    cluster.set_gucs(max_message_bytes="64kB")
    wait_for(lambda: cluster.setting("max_message_bytes") == "64kB", 10, "max_message_bytes = 64kB")
    time.sleep(0.5)     # the consumers read the reload at their next wake-up
    limit = 65536
    tag = sbw.unique("h")
    cases = hostile_cases(tag, limit)
    pids = cluster.consumer_pids()
    base = guarantee_helpers.CounterBase(cluster)
    mark = pglog.mark()
    msgs = [("task", body, {"message_id": "%s-%s" % (tag, name)}) for name, (body, _s, _e) in cases.items()]
    # then a good event: it still goes through
    good = _body(tag, "good-0")
    msgs.append(("task", _enc(good), None))
    guarantee_helpers.publish_window(services.amqp_url, msgs)
    cluster.wait_seen(tag + "-good", 1, timeout=30)

    def dead():
        return {r[0][len(tag) + 1:]: r[1:] for r in cluster.q(
            "SELECT message_id, plugin, sqlstate, error, routing_key, body, redelivered "
            "FROM storyboard_worker.dead_letters WHERE message_id LIKE %s", (tag + "-%",))}
    got = wait_for(lambda: len(d := dead()) >= len(cases) and d, 30,
                   "%d dead letters; missing %r" % (len(cases), sorted(set(cases) - set(dead()))))
    guarantee_helpers.queue_drained(services)
    wrong = []
    for name, (body, sqlstate, error) in cases.items():
        plugin, st, err, rk, stored, _red = got[name]
        if (plugin, st, err, rk, bytes(stored)) != (None, sqlstate, error, "task", body[:limit]):
            wrong.append("%s: got plugin=%r sqlstate=%r error=%r rk=%r body %s; want sqlstate %r error %r"
                         % (name, plugin, st, err, rk, "same" if bytes(stored) == body else "DIFFERENT",
                            sqlstate, error))
    states = {}
    for name, (body, sqlstate, error) in cases.items():
        states[sqlstate] = states.get(sqlstate, 0) + 1
    metrics.add("hostile bodies", "%d cases, %d dead-lettered with the expected error text and SQLSTATE "
                "(by SQLSTATE: %s), queue empty, consumer pids unchanged: %s"
                % (len(cases), len(cases) - len(wrong), ", ".join("%s x%d" % kv for kv in sorted(states.items())),
                   cluster.consumer_pids() == pids))
    assert not wrong, "\n".join(wrong)
    assert len(got) == len(cases), sorted(set(got) - set(cases))
    # no plugin saw them
    assert cluster.one("SELECT count(*) FROM sbw_test.seen WHERE key LIKE %s AND key <> %s",
                       ("key=%s-%%" % tag, "key=%s-good-0" % tag)) == 0
    assert cluster.seen(tag) == (1, 1)
    d = base.delta()
    assert d["messages_dead_lettered"] == len(cases), d
    assert len(pglog.grep(mark, r"could not decode a message")) == len(cases)
    assert cluster.consumer_pids() == pids, "consumers restarted: %r -> %r" % (pids, cluster.consumer_pids())
    cluster.wait_consuming(timeout=5)


# ---------------------------------------------------------------- roles
def _drop_role(cluster, role):
    for db in (sbw.DB, "postgres"):
        if cluster.one("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,), db=db):
            cluster.execute('DROP OWNED BY "%s"' % role, db=db)
    cluster.execute('DROP ROLE IF EXISTS "%s"' % role, db="postgres")


@pytest.fixture
def intruder(cluster):
    """A login role that is not the extension's owner, granted EXECUTE on
    every storyboard_worker function that checks the owner."""
    _drop_role(cluster, INTRUDER)
    cluster.execute('CREATE ROLE "%s" LOGIN' % INTRUDER, db="postgres")
    cluster.execute('CREATE SCHEMA sbw_g_intruder AUTHORIZATION "%s"' % INTRUDER)
    cluster.execute("GRANT EXECUTE ON FUNCTION storyboard_worker.register_plugin(text, regprocedure, regprocedure, boolean), "
                    "storyboard_worker.unregister_plugin(text), storyboard_worker.process_event(text, text), "
                    'storyboard_worker.replay(bigint) TO "%s"' % INTRUDER)
    conn = psycopg2.connect(host=cluster.svc.pg_host, port=cluster.svc.pg_port, user=INTRUDER, dbname=sbw.DB,
                            connect_timeout=10, application_name="sbw-pytest-intruder")
    conn.autocommit = True
    yield conn
    conn.close()
    cluster.execute("DROP SCHEMA IF EXISTS sbw_g_intruder CASCADE")
    _drop_role(cluster, INTRUDER)


def _as(conn, sql, args=None):
    """Run sql; return ('ok', rows) or ('error', sqlstate, message)."""
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return ("ok", cur.fetchall() if cur.description else [])
    except psycopg2.Error as e:
        return ("error", e.pgcode, (e.pgerror or "").strip())


def test_non_owner_cannot_manage_or_read(cluster, services, intruder, metrics):
    plugins_before = cluster.q("SELECT name, handler::text FROM storyboard_worker.plugins ORDER BY position")
    dl_id = cluster.one("SELECT min(id) FROM storyboard_worker.dead_letters") or 1
    _as(intruder, "CREATE FUNCTION sbw_g_intruder.evil(e storyboard_worker.event) RETURNS void "
                  "LANGUAGE sql AS 'SELECT NULL::void'")
    denied = {
        "register_plugin": "SELECT storyboard_worker.register_plugin('evil', "
                           "'sbw_g_intruder.evil(storyboard_worker.event)')",
        "register_plugin over 'record'": "SELECT storyboard_worker.register_plugin('record', "
                                         "'sbw_g_intruder.evil(storyboard_worker.event)')",
        "unregister_plugin": "SELECT storyboard_worker.unregister_plugin('record')",
        "process_event": "SELECT * FROM storyboard_worker.process_event('{\"resource\": \"task\"}', 'task')",
        "replay": "SELECT storyboard_worker.replay(%d)" % dl_id,
        "wake_workers": "SELECT storyboard_worker.wake_workers()",
        "read plugins": "SELECT * FROM storyboard_worker.plugins",
        "read dead_letters": "SELECT * FROM storyboard_worker.dead_letters",
        "read ledger": "SELECT * FROM storyboard_worker.ledger",
        "insert plugins": "INSERT INTO storyboard_worker.plugins (name, handler) "
                          "VALUES ('evil', 'sbw_g_intruder.evil(storyboard_worker.event)')",
        "delete dead_letters": "DELETE FROM storyboard_worker.dead_letters",
        "SHOW rabbit_password": "SHOW storyboard_worker.rabbit_password",
        "current_setting(rabbit_password)": "SELECT current_setting('storyboard_worker.rabbit_password')",
        "SHOW rabbit_ssl_key_file": "SHOW storyboard_worker.rabbit_ssl_key_file",
        "SET role": "SET storyboard_worker.role = 'postgres'",
        "SET max_retries": "SET storyboard_worker.max_retries = 0",
        "ALTER SYSTEM": "ALTER SYSTEM SET storyboard_worker.worker_count = 0",
    }
    results = {name: _as(intruder, sql) for name, sql in denied.items()}
    not_denied = {k: v for k, v in results.items() if v[0] != "error" or v[1] != "42501"}
    metrics.add("non-owner", "denied (42501): %s; register_plugin says: %s"
                % (", ".join(k for k in results if k not in not_denied), results["register_plugin"][2].splitlines()[0]))
    assert not not_denied, "not refused with 42501: %r" % not_denied
    assert "permission denied" in results["register_plugin"][2]
    # what everyone may see: the stats, without secrets
    cols = _as(intruder, "SELECT attname FROM pg_attribute WHERE attrelid = 'storyboard_worker.stats'::regclass "
                         "AND attnum > 0 ORDER BY attnum")
    assert [r[0] for r in cols[1]] == ["worker_id", "pid", "state", "broker", "connected_since",
                                       "messages_received", "messages_processed", "messages_dead_lettered",
                                       "messages_redelivered", "last_error", "last_error_at",
                                       "messages_duplicates", "messages_acked", "acks_pending",
                                       "ack_wait_p50_ms", "ack_wait_p99_ms",
                                       "queue_messages", "queue_consumers", "queue_checked_at"], cols
    st = _as(intruder, "SELECT broker, last_error FROM storyboard_worker.stats")
    assert st[0] == "ok" and st[1], st
    assert all(r[0] in (None, "127.0.0.1:%d" % services.amqp_port) for r in st[1]), st
    names = [r[0] for r in _as(intruder, "SELECT name FROM pg_settings WHERE name LIKE 'storyboard_worker.%'")[1]]
    assert "storyboard_worker.rabbit_host" in names
    assert "storyboard_worker.rabbit_password" not in names and "storyboard_worker.rabbit_ssl_key_file" not in names
    show_all = [r[0] for r in _as(intruder, "SHOW ALL")[1]]
    assert "storyboard_worker.rabbit_password" not in show_all
    assert cluster.q("SELECT name, handler::text FROM storyboard_worker.plugins ORDER BY position") == plugins_before


PLUGIN_ROLE_SQL = r"""
CREATE TABLE IF NOT EXISTS sbw_g.whoami (key text, cur name, sess name, is_super boolean, dead_letters text,
	ledger text, plugins text, register text, set_role text, set_session text, reset_role text, after name);
CREATE TABLE IF NOT EXISTS sbw_g.secret (x integer);
CREATE OR REPLACE FUNCTION sbw_g.whoami(e storyboard_worker.event) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	dl text := 'allowed'; lg text := 'allowed'; pl text := 'allowed'; rg text := 'allowed';
	sr text := 'allowed'; ss text := 'allowed'; rr text := 'allowed';
BEGIN
	IF e.query_string NOT LIKE 'key=who%' THEN
		RETURN;
	END IF;
	BEGIN PERFORM 1 FROM storyboard_worker.dead_letters LIMIT 1; EXCEPTION WHEN others THEN dl := SQLSTATE; END;
	BEGIN PERFORM 1 FROM storyboard_worker.ledger LIMIT 1; EXCEPTION WHEN others THEN lg := SQLSTATE; END;
	BEGIN PERFORM 1 FROM storyboard_worker.plugins LIMIT 1; EXCEPTION WHEN others THEN pl := SQLSTATE; END;
	BEGIN
		PERFORM storyboard_worker.register_plugin('evil', 'sbw_g.whoami(storyboard_worker.event)');
	EXCEPTION WHEN others THEN rg := SQLSTATE;
	END;
	-- the worker's session user is a superuser: the plugin must not get back to it
	BEGIN SET LOCAL ROLE postgres; EXCEPTION WHEN others THEN sr := SQLSTATE; END;
	BEGIN SET LOCAL SESSION AUTHORIZATION postgres; EXCEPTION WHEN others THEN ss := SQLSTATE; END;
	BEGIN RESET ROLE; EXCEPTION WHEN others THEN rr := SQLSTATE; END;
	INSERT INTO sbw_g.whoami VALUES (e.query_string, current_user, session_user,
		(SELECT rolsuper FROM pg_roles WHERE rolname = current_user), dl, lg, pl, rg, sr, ss, rr, current_user);
END $$;
-- 'nosy' writes a table its role was not granted
CREATE OR REPLACE FUNCTION sbw_g.nosy(e storyboard_worker.event) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	IF e.query_string LIKE 'key=who%' THEN
		INSERT INTO sbw_g.secret VALUES (1);
	END IF;
END $$;
"""


def _grant_plugin_role(cluster, role):
    cluster.execute('CREATE ROLE "%s" NOLOGIN' % role, db="postgres")
    cluster.execute('GRANT USAGE ON SCHEMA sbw_g, sbw_test TO "{r}"; '
                    'GRANT INSERT ON sbw_g.whoami, sbw_test.seen TO "{r}"; '
                    'GRANT USAGE ON SEQUENCE sbw_test.seen_id_seq TO "{r}"'.format(r=role))
    # the author lookup reads StoryBoard's users table, if there is one
    cluster.execute("DO $$ BEGIN IF to_regclass('users') IS NOT NULL THEN "
                    "EXECUTE 'GRANT SELECT ON users TO " + role + "'; END IF; END $$")


def test_plugins_run_as_the_configured_role(cluster, services, pglog, metrics):
    guarantee_helpers.setup_g(cluster)
    cluster.execute(PLUGIN_ROLE_SQL)
    for r in (PLUGIN_ROLE, OWNER_ROLE):
        _drop_role(cluster, r)
        _grant_plugin_role(cluster, r)
    guarantee_helpers.register_g(cluster, "whoami")
    guarantee_helpers.register_g(cluster, "nosy")
    try:
        cluster.set_gucs(role=PLUGIN_ROLE)
        wait_for(lambda: cluster.setting("role") == PLUGIN_ROLE, 10, "the role setting")
        time.sleep(0.5)
        prefix = sbw.unique("who")
        guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(3, prefix)[0])
        # 'record' inserting as the role proves its grants are enough
        assert cluster.wait_seen(prefix, 3, timeout=30) == (3, 3)
        rows = wait_for(lambda: len(r := cluster.q("SELECT cur, sess, is_super, dead_letters, ledger, plugins, "
                                                   "register, set_role, set_session, reset_role, after "
                                                   "FROM sbw_g.whoami WHERE key LIKE %s",
                                                   ("key=%s-%%" % prefix,))) == 3 and r, 30, "3 whoami rows")
        metrics.add("plugin role", "current_user, session_user, superuser, dead_letters, ledger, plugins, "
                    "register_plugin, SET ROLE, SET SESSION AUTHORIZATION, RESET ROLE, user after: %r" % (rows[0],))
        for r in rows:
            assert r[0] == PLUGIN_ROLE and r[2] is False, r
            assert r[3:7] == ("42501",) * 4, "the plugin role reached extension objects: %r" % (r,)
            assert r[7] != "allowed" and r[8] != "allowed", "a plugin changed its role: %r" % (r,)
            assert r[10] == PLUGIN_ROLE, "a plugin got back to its session user: %r" % (r,)
        nosy = cluster.q("SELECT plugin, sqlstate, error FROM storyboard_worker.dead_letters "
                         "WHERE plugin = 'nosy' AND position(convert_to(%s, 'UTF8') in body) > 0",
                         ('"key=%s-' % prefix,))
        assert sorted(nosy) == [("nosy", "42501", "permission denied for table secret")] * 3, nosy

        # empty role: the database owner
        cluster.set_gucs(role=None)
        cluster.execute('ALTER DATABASE "%s" OWNER TO "%s"' % (sbw.DB, OWNER_ROLE), db="postgres")
        wait_for(lambda: cluster.setting("role") == "", 10, "the role setting reset")
        time.sleep(0.5)
        p2 = sbw.unique("who")
        guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(2, p2)[0])
        assert cluster.wait_seen(p2, 2, timeout=30) == (2, 2)
        cur = wait_for(lambda: len(r := cluster.q("SELECT cur FROM sbw_g.whoami WHERE key LIKE %s",
                                                  ("key=%s-%%" % p2,))) == 2 and r, 30, "2 whoami rows")
        assert cur == [(OWNER_ROLE,)] * 2, cur
    finally:
        cluster.execute('ALTER DATABASE "%s" OWNER TO postgres' % sbw.DB, db="postgres")
        sbw.unregister(cluster, "whoami")
        sbw.unregister(cluster, "nosy")
        cluster.restore_gucs()
        time.sleep(0.5)
        for r in (PLUGIN_ROLE, OWNER_ROLE):
            _drop_role(cluster, r)


def test_broker_password_never_shown_or_logged(cluster, services, pglog, intruder, metrics):
    """A distinctive password, a successful login with it and a refused one
    with a wrong one: neither appears in the log, the stats view,
    pg_stat_activity or an ordinary user's view of the settings.  It is set
    with ALTER SYSTEM and a restart, not a reload: on a reload PostgreSQL
    itself logs 'parameter ... changed to "<value>"' for every setting."""
    user = "sbw_g_secret_user"
    n = cluster.worker_count()
    services.rmq_ctl("add_user", user, SECRET)
    services.rmq_ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    mark = pglog.mark()
    try:
        cluster.set_gucs(reload=False, rabbit_userid=user, rabbit_password=SECRET)
        services.pg_restart()
        cluster.reset_connections()
        st = cluster.wait_consuming(timeout=60)
        assert len(services.connections(user)) == n
        prefix = sbw.unique("pw")
        guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(5, prefix)[0])
        assert cluster.wait_seen(prefix, 5, timeout=30) == (5, 5)
        seen_ok = [dict(s) for s in st]

        cluster.set_gucs(reload=False, rabbit_password=WRONG_SECRET)
        services.pg_restart()
        cluster.reset_connections()
        st = wait_for(lambda: (s := cluster.stats()) and len(s) == n and all(
            x["last_error"] and x["state"] != "consuming" for x in s) and s, 30, "refused logins")
        time.sleep(3)     # a few more attempts (rabbit_retry_delay = 1)
        st = cluster.stats()
        assert all("refused" in (s["last_error"] or "").lower() for s in st), st
        # an ordinary user's view while the secret is in force
        conn2 = psycopg2.connect(host=cluster.svc.pg_host, port=cluster.svc.pg_port, user=INTRUDER,
                                 dbname=sbw.DB, connect_timeout=10)
        conn2.autocommit = True
        try:
            settings = _as(conn2, "SELECT name, setting, reset_val, boot_val FROM pg_settings")
            show_all = _as(conn2, "SHOW ALL")
            stats = _as(conn2, "SELECT * FROM storyboard_worker.stats")
            show = _as(conn2, "SHOW storyboard_worker.rabbit_password")
        finally:
            conn2.close()
        activity = cluster.q("SELECT application_name, query, backend_type FROM pg_stat_activity "
                             "WHERE backend_type LIKE 'storyboard_worker%'", db="postgres")
        log = pglog.since(mark)
        places = {"PostgreSQL log": log, "stats (superuser)": repr(st), "stats (ordinary user)": repr(stats),
                  "pg_settings (ordinary user)": repr(settings), "SHOW ALL (ordinary user)": repr(show_all),
                  "pg_stat_activity": repr(activity)}
        leaks = {k: v for k, v in places.items() if "Sekr3t" in v}
        metrics.add("broker password", "not in %s; refused login: %s; SHOW as ordinary user: %s"
                    % (", ".join(k for k in places if k not in leaks), st[0]["last_error"][:120], show[1:]))
        leaked_lines = [l for l in log.splitlines() if "Sekr3t" in l]
        assert not leaks, "the broker password appears in %s:\n%s" % (sorted(leaks), "\n".join(leaked_lines[:5]))
        assert show[:2] == ("error", "42501"), show
        assert all(s["broker"] == "127.0.0.1:%d" % services.amqp_port for s in seen_ok), seen_ok
    finally:
        cluster.set_gucs(reload=False, rabbit_userid=None, rabbit_password=None)
        services.pg_restart()
        cluster.reset_connections()
        cluster.dirty = True
        cluster.wait_consuming(timeout=60)
        try:
            services.rmq_ctl("delete_user", user)
        except RuntimeError:
            pass
