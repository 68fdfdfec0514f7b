"""Safe to install next to ordinary roles: the extension in StoryBoard's
database, with the roles that really use it.

  sbw_t_app      StoryBoard's application role: owns StoryBoard's tables in
                 schema storyboard and does its own DDL and migrations
  sbw_t_plugin   storyboard_worker.role: every plugin runs as it
  sbw_t_hostile  owns schema hostile, which the database's search_path lists
                 *before* pg_catalog, full of look-alike functions and
                 operators that log who called them

What must hold: the application role's DDL keeps working (the sql_drop event
trigger no longer fails for it); nothing the workers run as the bootstrap
superuser, nor the subscription plugin, ever calls a planted object while
events, dead letters, replays, redeliveries and a ledger prune go through;
what a plugin SETs ends with its call.
"""

import json
import os
import time

import psycopg2
import pytest

import guarantee_helpers
import sbw
from sbw import wait_for

# the version this library is built for: storyboard_worker.control's default_version
with open(os.path.join(sbw.TEST_DIR, "..", "storyboard_worker.control")) as _f:
    LIB_VERSION = [l.split("'")[1] for l in _f if l.startswith("default_version")][0]

APP = "sbw_t_app"
PLUGIN = "sbw_t_plugin"
HOSTILE = "sbw_t_hostile"
FIXTURES = os.path.join(sbw.TEST_DIR, "fixtures")

# Look-alikes of what the extension's own statements use, each logging its
# caller and answering correctly (so that nothing else fails and hides it).
HOSTILE_SQL = r"""
-- every call is a WARNING in the server log: a log line is not rolled back
-- with the (sub)transaction that made the call, as a table row would be
CREATE FUNCTION hostile.log(fn text) RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
	RAISE WARNING 'HOSTILE-CALL %|%|%', fn, current_user,
		(SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
END $$;
CREATE FUNCTION hostile.seen(fn text) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log(fn); RETURN true; END $$;
CREATE FUNCTION hostile.now() RETURNS timestamptz LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('now()'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION hostile.make_interval(secs integer) RETURNS interval LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('make_interval(integer)'); RETURN pg_catalog.make_interval(secs => secs); END $$;
CREATE FUNCTION hostile.to_jsonb(anyelement) RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('to_jsonb(anyelement)'); RETURN pg_catalog.to_jsonb($1); END $$;
CREATE FUNCTION hostile.to_regclass(text) RETURNS regclass LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('to_regclass(text)'); RETURN pg_catalog.to_regclass($1); END $$;
"""
HOSTILE_OPERATORS = [   # (operator, left, right, underlying pg_catalog operator)
    ("=", "bigint", "bigint", "="), ("=", "integer", "bigint", "="), ("=", "integer", "integer", "="),
    ("=", "text", "text", "="), ("=", "bytea", "bytea", "="), ("=", "oid", "oid", "="),
    ("+", "integer", "integer", "+"), ("<", "timestamptz", "timestamptz", "<"),
    ("-", "timestamptz", "interval", "-"),
]


def _hostile_operators_sql():
    out = []
    for i, (op, left, right, base) in enumerate(HOSTILE_OPERATORS):
        ret = {"=": "boolean", "<": "boolean", "+": "integer", "-": "timestamptz"}[op]
        fn = "hostile.op_%d" % i
        out.append("CREATE FUNCTION %s(%s, %s) RETURNS %s LANGUAGE plpgsql SET search_path = pg_catalog AS "
                   "$$ BEGIN PERFORM hostile.log('%s(%s,%s)'); RETURN $1 OPERATOR(pg_catalog.%s) $2; END $$;"
                   % (fn, left, right, ret, op, left, right, base))
        out.append("CREATE OPERATOR hostile.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = %s);"
                   % (op, left, right, fn))
    return "\n".join(out)


def _drop_roles(cluster):
    for r in (APP, PLUGIN, HOSTILE):
        if cluster.one("SELECT 1 FROM pg_roles WHERE rolname = %s", (r,), db="postgres"):
            for db in (sbw.DB, "postgres"):
                cluster.execute('DROP OWNED BY "%s" CASCADE' % r, db=db)
            cluster.execute('DROP ROLE "%s"' % r, db="postgres")


def connect_as(cluster, role, dbname=sbw.DB):
    c = psycopg2.connect(host=cluster.svc.pg_host, port=cluster.svc.pg_port, user=role, dbname=dbname,
                         connect_timeout=10, application_name="sbw-pytest-" + role)
    c.autocommit = True
    return c


def run(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else []


def restart_consumers(cluster, n=None):
    """Terminate the consumers; the launcher starts new ones, which read the
    database's settings (its search_path) afresh."""
    old = set(cluster.consumer_pids())
    cluster.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = %s",
                    (sbw.CONSUMER,), db="postgres")
    wait_for(lambda: not (set(cluster.consumer_pids()) & old), 30, "old consumers gone")
    cluster.wait_consuming(n, timeout=60)


@pytest.fixture
def roles(cluster):
    """The three roles, StoryBoard's schema owned by the application role,
    and the hostile schema; the database's path lists hostile first."""
    _drop_roles(cluster)
    for r in (APP, PLUGIN, HOSTILE):
        cluster.execute('CREATE ROLE "%s" LOGIN' % r, db="postgres")
    cluster.execute('CREATE SCHEMA storyboard AUTHORIZATION "%s"' % APP)
    cluster.execute('CREATE SCHEMA hostile AUTHORIZATION "%s"' % HOSTILE)
    cluster.execute('GRANT USAGE ON SCHEMA hostile TO PUBLIC')
    app = connect_as(cluster, APP)
    run(app, "SET search_path = storyboard")
    for f in ("storyboard_schema.sql", "storyboard_mock_data.sql"):
        with open(os.path.join(FIXTURES, f)) as fh:
            run(app, fh.read())
    run(app, 'GRANT USAGE ON SCHEMA storyboard TO "{p}"; '
             'GRANT SELECT ON ALL TABLES IN SCHEMA storyboard TO "{p}"; '
             'GRANT INSERT ON storyboard.subscription_events TO "{p}"; '
             'GRANT DELETE ON storyboard.subscriptions TO "{p}"; '
             'GRANT USAGE ON ALL SEQUENCES IN SCHEMA storyboard TO "{p}"'.format(p=PLUGIN))
    cluster.execute('GRANT USAGE ON SCHEMA sbw_test TO "{p}"; GRANT INSERT, SELECT ON sbw_test.seen TO "{p}"; '
                    'GRANT SELECT ON sbw_test.control TO "{p}"; '
                    'GRANT USAGE ON SEQUENCE sbw_test.seen_id_seq TO "{p}"'.format(p=PLUGIN))
    # the author lookup reads whatever "users" the database's default path finds
    # (test_subscription.py leaves StoryBoard's tables in public)
    cluster.execute("DO $$ BEGIN IF to_regclass('users') IS NOT NULL THEN "
                    "EXECUTE 'GRANT SELECT ON users TO " + PLUGIN + "'; END IF; END $$")
    hostile = connect_as(cluster, HOSTILE)
    run(hostile, HOSTILE_SQL + _hostile_operators_sql())
    # a relation too: StoryBoard's users, through a view that logs each use
    run(app, 'GRANT USAGE ON SCHEMA storyboard TO "{h}"; GRANT SELECT ON storyboard.users TO "{h}"'.format(h=HOSTILE))
    run(hostile, "CREATE VIEW hostile.users AS SELECT * FROM storyboard.users WHERE hostile.seen('users view'); "
                 "GRANT SELECT ON hostile.users TO PUBLIC")
    cluster.set_gucs(role=PLUGIN)
    try:
        yield {"app": app, "hostile": hostile}
    finally:
        app.close()
        hostile.close()
        cluster.execute('ALTER DATABASE "%s" RESET search_path' % sbw.DB, db="postgres")
        cluster.execute("SELECT storyboard_worker.unregister_plugin(name) FROM storyboard_worker.plugins "
                        "WHERE name NOT IN ('record', 'email')")
        cluster.execute("DROP SCHEMA IF EXISTS storyboard, hostile, sbw_t CASCADE")
        cluster.restore_gucs()
        cluster.reset_connections()
        restart_consumers(cluster)
        _drop_roles(cluster)


def test_application_role_ddl_with_the_extension_installed(cluster, roles, metrics):
    """StoryBoard's role migrates its own schema: add and drop a column of a
    StoryBoard table it owns, create and drop tables and functions.  The
    sql_drop event trigger ran as that role and failed on the registry
    before; and a plugin function dropped by its owner is still unregistered."""
    app = roles["app"]
    done = []
    for sql in ("ALTER TABLE storyboard.stories ADD COLUMN legacy_flag boolean",
                "ALTER TABLE storyboard.stories DROP COLUMN legacy_flag",
                "CREATE TABLE storyboard.alembic_scratch (id int)",
                "DROP TABLE storyboard.alembic_scratch",
                "CREATE INDEX stories_title_idx ON storyboard.stories (title)",
                "DROP INDEX storyboard.stories_title_idx",
                "CREATE FUNCTION storyboard.helper() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                "DROP FUNCTION storyboard.helper()",
                "CREATE VIEW storyboard.v AS SELECT id FROM storyboard.stories",
                "DROP VIEW storyboard.v"):
        run(app, sql)
        done.append(sql.split(" (")[0])
    # a plugin function owned by the plugin role, dropped by that role
    cluster.execute('CREATE SCHEMA sbw_t AUTHORIZATION "%s"' % PLUGIN)
    plug = connect_as(cluster, PLUGIN)
    try:
        run(plug, "CREATE FUNCTION sbw_t.noop(e storyboard_worker.event) RETURNS void LANGUAGE sql AS ''")
        cluster.execute("SELECT storyboard_worker.register_plugin('noop', 'sbw_t.noop(storyboard_worker.event)')")
        run(plug, "DROP FUNCTION sbw_t.noop(storyboard_worker.event)")
    finally:
        plug.close()
    assert cluster.one("SELECT count(*) FROM storyboard_worker.plugins WHERE name = 'noop'") == 0
    metrics.add("application role DDL", "%d statements as %s (the last ones dropping objects), and a plugin "
                "function dropped by its owner %s: all succeeded, the plugin unregistered"
                % (len(done), APP, PLUGIN))


def _calls(pglog, mark):
    """(function, role, superuser) of every planted object called since mark."""
    out = []
    for line in pglog.grep(mark, r"HOSTILE-CALL "):
        fn, usr, su = line.split("HOSTILE-CALL ", 1)[1].strip().split("|")
        out.append((fn, usr, su == "t"))
    return out


def test_hostile_search_path_runs_nothing_elevated(cluster, services, roles, pglog, metrics):
    """The database's path lists the hostile schema before pg_catalog, and
    the consumers are restarted to run under it.  Events for the subscription
    plugin and the record plugin, an undecodable body, a plugin failure
    (dead letters), a replay, a message failing at COMMIT (redelivered,
    counted, given up on) and a ledger prune go through.  No planted object
    runs as a superuser; the only calls are the test plugin's own, as the
    plugin role."""
    cluster.execute("CREATE EXTENSION IF NOT EXISTS sbw_test_plugins")
    cluster.execute("SELECT storyboard_worker.register_plugin('subscription', "
                    "'storyboard_worker.subscription_handler(storyboard_worker.event)')")
    sbw.register(cluster, "fragile")
    sbw.set_control(cluster, "fragile_broken", "on")
    cluster.execute("SELECT storyboard_worker.register_plugin('commitfail', "
                    "'sbw_test_plugins.fail_at_commit(storyboard_worker.event)')")
    cluster.set_gucs(max_redeliveries=2)
    # an old ledger row and an old redelivery count, for the prune
    cluster.execute("INSERT INTO storyboard_worker.ledger VALUES ('0badbad0-0000-0000-0000-000000000000', now() - interval '30 days')")
    cluster.execute("INSERT INTO storyboard_worker.redeliveries (message_key, last_at) "
                    "VALUES ('0badbad1-0000-0000-0000-000000000000', now() - interval '30 days')")
    cluster.execute('ALTER DATABASE "%s" SET search_path = hostile, pg_catalog, storyboard' % sbw.DB,
                    db="postgres")
    restart_consumers(cluster)
    mark = pglog.mark()
    try:
        prefix = sbw.unique("hp")
        msgs, _ = guarantee_helpers.bulk_messages(5, prefix)
        # StoryBoard timeline events for the subscription plugin (mock data: events 1..3)
        before = cluster.one("SELECT coalesce(max(id), 0) FROM storyboard.subscription_events")
        for ev_id in (1, 2):
            row = cluster.q("SELECT id, story_id, event_type, event_info FROM storyboard.events WHERE id = %s",
                            (ev_id,), dicts=True)[0]
            info = row["event_info"]
            payload = sbw.publish.timeline_event(
                ev_id, row["event_type"], path="/v1/stories/%d" % row["story_id"],
                story_id=row["story_id"], event_info=json.loads(info) if info else None)
            payload["query_string"] = "key=%s-tl%d" % (prefix, ev_id)
            body = sbw.publish.encode(payload)
            msgs.append(("timeline_event", body, None))
        msgs.append(("task", b"not json at all", {"message_id": prefix + "-bad"}))
        poison = sbw.publish.bulk_events(1, prefix + "-cf")[0]
        poison["query_string"] = "key=%s-commit-fail" % prefix
        msgs.append(("task", sbw.publish.encode(poison), None))
        guarantee_helpers.publish_window(services.amqp_url, msgs)
        cluster.wait_seen(prefix, 5 + 2, timeout=60)
        wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.dead_letters "
                                     "WHERE sqlstate = 'SB002' AND position(convert_to(%s, 'UTF8') in body) > 0",
                                     ("commit-fail",)) == 1, 60, "the commit-fail message given up on")
        guarantee_helpers.queue_drained(services)
        notified = cluster.one("SELECT count(*) FROM storyboard.subscription_events WHERE id > %s", (before,))
        assert notified > 0, "the subscription plugin wrote nothing"
        dl = cluster.q("SELECT id, plugin, sqlstate FROM storyboard_worker.dead_letters "
                       "WHERE message_id = %s OR (plugin = 'fragile' AND position(convert_to(%s, 'UTF8') in body) > 0)",
                       (prefix + "-bad", '"key=%s-' % prefix))
        assert sorted((str(p), s) for _i, p, s in dl) == sorted([("None", "22P02")] + [("fragile", "22012")] * 7), dl
        # replay, as the superuser, on a connection that has the hostile path
        conn = cluster.connect()
        try:
            assert run(conn, "SHOW search_path")[0][0].startswith("hostile")
            replayed = [run(conn, "SELECT storyboard_worker.replay(%s)", (i,))[0][0] for i, _p, _s in dl]
        finally:
            conn.close()
        assert replayed == [False] * len(dl), replayed
        # the prune: consumer 0 prunes when it starts, then every minute
        restart_consumers(cluster)
        wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.ledger "
                                     "WHERE message_key = '0badbad0-0000-0000-0000-000000000000'") == 0, 30, "the old ledger row pruned")
        wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.redeliveries "
                                     "WHERE message_key = '0badbad1-0000-0000-0000-000000000000'") == 0, 30, "the old count pruned")
        calls = _calls(pglog, mark)
        elevated = [c for c in calls if c[2] or c[1] != PLUGIN]
        kinds = sorted({c[0] for c in calls})
        metrics.add("hostile search_path", "path 'hostile, pg_catalog, storyboard', %d planted look-alikes and a "
                    "'users' view; events, %d subscription rows, %d dead letters, replays, a COMMIT failure given "
                    "up on, a prune: %d calls as a superuser or another role; %d calls as the plugin role, of %s "
                    "(its own lookups: the author, and the test plugins' unqualified to_jsonb and =)"
                    % (len(HOSTILE_OPERATORS) + 4, notified, len(dl), len(elevated), len(calls), kinds))
        assert not elevated, "planted objects ran elevated: %r" % elevated[:10]
        # the test plugins' own unqualified calls ('record': to_jsonb; 'fragile': text = text)
        # and the plugin role's lookup of "users" may meet the hostile schema; nothing else
        assert set(kinds) <= {"to_jsonb(anyelement)", "=(text,text)", "users view"}, kinds
        assert "users view" in kinds, "the hostile relation was never reached: the test proves nothing"
    finally:
        cluster.execute('ALTER DATABASE "%s" RESET search_path' % sbw.DB, db="postgres")
        sbw.set_control(cluster, "fragile_broken", "on")
        for name in ("fragile", "commitfail", "subscription"):
            sbw.unregister(cluster, name)


SETTER_SQL = r"""
CREATE TABLE sbw_t.observed (key text, path text, sync_commit text, read_only text, work_mem text, app text);
CREATE FUNCTION sbw_t.setter(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	PERFORM set_config('search_path', 'nowhere', false);
	SET synchronous_commit = off;
	PERFORM set_config('work_mem', '1234kB', false);
	SET LOCAL application_name = 'set by a plugin';
	SET TRANSACTION READ ONLY;
END $$;
CREATE FUNCTION sbw_t.observer(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO sbw_t.observed VALUES (e.query_string, current_setting('search_path'),
		current_setting('synchronous_commit'), current_setting('transaction_read_only'),
		current_setting('work_mem'), current_setting('application_name'));
END $$;
"""


def test_plugin_settings_end_with_the_call(cluster, services, roles, metrics):
    """A plugin sets search_path, synchronous_commit, work_mem,
    application_name and makes the transaction read-only; the next plugin,
    the next event and the worker's own statements (ledger, dead letters)
    see none of it."""
    cluster.execute('CREATE SCHEMA sbw_t AUTHORIZATION "%s"' % PLUGIN)
    plug = connect_as(cluster, PLUGIN)
    try:
        run(plug, SETTER_SQL)
    finally:
        plug.close()
    cluster.execute("SELECT storyboard_worker.register_plugin('setter', 'sbw_t.setter(storyboard_worker.event)')")
    cluster.execute("SELECT storyboard_worker.register_plugin('observer', 'sbw_t.observer(storyboard_worker.event)')")
    try:
        prefix = sbw.unique("set")
        msgs, _ = guarantee_helpers.bulk_messages(20, prefix)
        guarantee_helpers.publish_window(services.amqp_url, msgs)
        wait_for(lambda: cluster.one("SELECT count(*) FROM sbw_t.observed WHERE key LIKE %s",
                                     ("key=%s-%%" % prefix,)) == 20, 60, "20 observations")
        guarantee_helpers.queue_drained(services)
        seen = cluster.q("SELECT DISTINCT path, sync_commit, read_only, work_mem, app FROM sbw_t.observed")
        path = cluster.one("SHOW search_path")
        metrics.add("plugin settings scope", "20 events after a plugin that sets search_path, "
                    "synchronous_commit, work_mem, application_name and READ ONLY: the next plugin saw %r; "
                    "ledger rows %d of 20; dead letters 0" % (seen, guarantee_helpers.ledger_rows(cluster, msgs)))
        assert len(seen) == 1, seen
        got_path, sync, ro, wm, app = seen[0]
        assert (sync, ro) == ("on", "off"), seen
        assert got_path == path and wm != "1234kB" and app != "set by a plugin", seen
        assert guarantee_helpers.ledger_rows(cluster, msgs) == 20
        assert guarantee_helpers.dead_letters_like(cluster, '"key=%s-' % prefix) == 0
    finally:
        sbw.unregister(cluster, "setter")
        sbw.unregister(cluster, "observer")


def test_consumers_refuse_an_extension_owner_who_is_not_a_superuser(cluster, services, pglog, metrics):
    """The workers write the extension's tables with superuser rights: an
    owner who is not a superuser could attach triggers to them.  The
    consumers stay idle, and say why, until the owner is one again."""
    db, owner = "sbw_t_ownerdb", "sbw_t_owner"
    cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % db, db="postgres")
    cluster.execute('DROP ROLE IF EXISTS "%s"' % owner, db="postgres")
    cluster.execute('CREATE ROLE "%s" LOGIN SUPERUSER' % owner, db="postgres")
    cluster.execute('CREATE DATABASE "%s" OWNER "%s"' % (db, owner), db="postgres")
    conn = connect_as(cluster, owner, db)
    try:
        run(conn, "CREATE EXTENSION storyboard_worker")
    finally:
        conn.close()
    cluster.execute('ALTER ROLE "%s" NOSUPERUSER' % owner, db="postgres")
    mark = pglog.mark()
    try:
        cluster.set_gucs(database=db)
        line = wait_for(lambda: pglog.grep(mark, "waiting for the owner of extension storyboard_worker to be a superuser"),
                        30, "the consumers refusing the owner")
        time.sleep(1)
        states = [s["state"] for s in cluster.stats(db=db)]
        assert states and all(st == "idle" for st in states), states
        cluster.execute('ALTER ROLE "%s" SUPERUSER' % owner, db="postgres")
        cluster.execute("SELECT storyboard_worker.wake_workers()", db=db)
        cluster.wait_consuming(db=db, timeout=30)
        metrics.add("extension owner not a superuser", "consumers idle (%s), then consuming once the owner is a "
                    "superuser again; log: %s" % (states, line[0].split(": ", 1)[-1][:120]))
    finally:
        cluster.restore_gucs()
        cluster.wait_consuming(timeout=60)
        cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % db, db="postgres")
        cluster.execute('DROP ROLE IF EXISTS "%s"' % owner, db="postgres")


def test_consumers_wait_for_the_sql_objects_to_be_updated(cluster, services, pglog, metrics):
    """The library updated, the SQL objects still 1.1 (no redelivery count):
    the consumers stay idle, naming the ALTER EXTENSION to run, instead of
    running without poison-message protection; the update wakes them."""
    db = "sbw_t_olddb"
    cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % db, db="postgres")
    cluster.execute('CREATE DATABASE "%s"' % db, db="postgres")
    cluster.execute("CREATE EXTENSION storyboard_worker VERSION '1.1'", db=db)
    mark = pglog.mark()
    try:
        cluster.set_gucs(database=db)
        line = wait_for(lambda: pglog.grep(mark, "waiting for ALTER EXTENSION storyboard_worker UPDATE"),
                        30, "the consumers waiting for the update")
        assert "its SQL objects are version 1.1, the library is " + LIB_VERSION in line[0], line
        time.sleep(1)
        # the library refuses the old objects' functions, the stats view among them
        # (Citus-style), naming the same statement; the shared-memory counters are
        # read through a database whose objects are current
        with pytest.raises(psycopg2.Error) as refused:
            cluster.q("SELECT * FROM storyboard_worker.stats", db=db)
        assert refused.value.pgcode == "55000", refused.value.pgerror
        assert ("library version %s does not match the installed extension version 1.1" % LIB_VERSION
                in refused.value.diag.message_primary), refused.value.pgerror
        assert "ALTER EXTENSION storyboard_worker UPDATE" in refused.value.diag.message_hint
        states = [s["state"] for s in cluster.q("SELECT * FROM storyboard_worker.stats WHERE pid <> 0",
                                                 dicts=True)]
        assert states and all(st == "idle" for st in states), states
        cluster.execute("ALTER EXTENSION storyboard_worker UPDATE", db=db)
        cluster.execute("SELECT storyboard_worker.wake_workers()", db=db)
        cluster.wait_consuming(db=db, timeout=30)
        metrics.add("SQL objects older than the library", "consumers idle (%s) until ALTER EXTENSION ... UPDATE, "
                    "then consuming; log: %s" % (states, line[0].split(": ", 1)[-1][:140]))
    finally:
        cluster.restore_gucs()
        cluster.wait_consuming(timeout=60)
        cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % db, db="postgres")
