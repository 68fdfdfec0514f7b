"""Delivery guarantees under real faults, and the consumers' lifecycle.

Each fault test publishes 5,000 events (SBW_FAULT_EVENTS), lets the
consumers get part of the way through them, injects one fault, recovers,
and then checks that every event's effect is present exactly once, count
and content: the harness's 'record' plugin inserts one sbw_test.seen row
per event (no unique constraint, so a second application would show) with
the whole event as jsonb, which is compared with what was published.

Faults: the broker SIGKILLed and restarted; PostgreSQL stopped with -m
immediate and restarted; a consumer terminated; the broker frozen (SIGSTOP:
a silent peer, as a cut network looks) for longer than two heartbeats.
Then: transient plugin errors retried, permanent ones dead-lettered and
replayed once; a COMMIT that fails is never acknowledged; a plugin slower
than two heartbeats; DROP/CREATE EXTENSION; a standby promoted; a list of
broker hosts; a quorum queue.
"""

import os
import signal
import subprocess
import tempfile
import time
import types

import psycopg2
import pytest

import guarantee_helpers
import sbw
from sbw import wait_for

N_FAULT = int(os.environ.get("SBW_FAULT_EVENTS", "5000"))
PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")


def _sb_user(services):
    return services.state["SBW_RMQ_USER"]


def _not_consuming(cluster):
    st = cluster.stats()
    return st and all(s["state"] in ("connecting", "backing off") for s in st) and st


# ---------------------------------------------------------------- the four faults
def _fault_run(cluster, services, pglog, metrics, name, inject, message_ids=False):
    """Publish N_FAULT persistent events, inject a fault once a fifth of them
    is applied, and check exactly-once effects afterwards."""
    n = N_FAULT
    prefix = sbw.unique(name)
    msgs, payloads = guarantee_helpers.bulk_messages(n, prefix, message_ids=message_ids)
    # StoryBoard publishes transient messages, and a broker that dies loses
    # the transient messages still in its queue: that is the publisher's
    # choice, not the consumer's.  To measure our side, these events are
    # persistent (delivery_mode 2) and confirmed before the fault, and the
    # durable queue is declared first (as the consumers declare it).
    guarantee_helpers.declare_queue(services.amqp_url)
    sbw.set_control(cluster, "slow_ms", 1)      # ~1 ms per event: the fault hits mid-stream
    sbw.register(cluster, "slow")
    base = guarantee_helpers.CounterBase(cluster)
    try:
        pub_secs = guarantee_helpers.publish_window(services.amqp_url, msgs, persistent=True)
        wait_for(lambda: cluster.seen(prefix)[1] >= n // 5, 120, "a fifth of the events applied")
        at_fault = cluster.seen(prefix)[1]
        # committed deliveries still waiting for their WAL flush to be acknowledged
        unacked = cluster.one("SELECT coalesce(sum(acks_pending), 0) FROM storyboard_worker.stats")
        t_fault = time.monotonic()
        note = inject() or ""
        cluster.wait_consuming(timeout=90)
        cluster.wait_seen(prefix, n, timeout=180)
        t_all = time.monotonic() - t_fault
        guarantee_helpers.queue_drained(services, timeout=60)
        time.sleep(2)   # a late redelivery would be applied now
        rows, distinct, bad, redelivered = guarantee_helpers.applied_check(cluster, prefix, payloads)
        d = base.delta()
        ledger = guarantee_helpers.ledger_rows(cluster, msgs)
        dead = guarantee_helpers.dead_letters_like(cluster, '"key=%s-' % prefix)
        metrics.add("fault %s" % name,
                    "published %d persistent (%.1fs), %d applied at the fault, %d of them committed but not yet "
                    "acknowledged (waiting for their WAL flush); after: %d rows, %d distinct, "
                    "%d content mismatches, %d applied from a redelivery, duplicates skipped (stats) %d, "
                    "redelivered (stats) %d, ledger rows %d, dead letters %d; all applied %.1fs after the fault%s"
                    % (n, pub_secs, at_fault, unacked, rows, distinct, len(bad), redelivered,
                       d["messages_duplicates"], d["messages_redelivered"], ledger, dead, t_all,
                       "; " + note if note else ""))
        assert at_fault < n, "the fault came after every event was applied: make the run slower"
        assert distinct == n, "lost events: %d of %d applied" % (distinct, n)
        assert rows == n, "%d events applied more than once (duplicates skipped per stats: %d)" \
            % (rows - distinct, d["messages_duplicates"])
        assert not bad, "content differs for %d events, e.g. %r" % (len(bad), bad[:2])
        assert ledger == n, "ledger rows for %d of %d events" % (ledger, n)
        assert dead == 0, "%d dead letters" % dead
        return d
    finally:
        sbw.unregister(cluster, "slow")


def test_fault_broker_sigkill(cluster, services, pglog, metrics):
    def inject():
        services.rmq_kill()
        wait_for(lambda: _not_consuming(cluster), 30, "consumers noticing the dead broker")
        errs = sorted({s["last_error"] for s in cluster.stats()})
        time.sleep(1)
        services.rmq_start()
        return "last_error while down: %s" % errs[0][:120]
    _fault_run(cluster, services, pglog, metrics, "kill", inject)


def test_fault_postgres_immediate_stop(cluster, services, pglog, metrics):
    def inject():
        cluster.reset_connections()
        services.pg_stop_immediate()
        # the broker takes back what the dead consumers had not acknowledged
        q = wait_for(lambda: (c := services.queue_counts()) and c[1] == 0 and c[2] == 0 and c, 30,
                     "no consumer and nothing unacked while PostgreSQL is down")
        services.pg_start()
        cluster.reset_connections()
        return "queue while PostgreSQL was down: ready %d" % q[0]
    d = _fault_run(cluster, services, pglog, metrics, "pgimmediate", inject)
    # every consumer is new: its counters are those since the restart
    assert d["messages_redelivered"] > 0, d


def test_fault_consumer_terminated(cluster, services, pglog, metrics):
    def inject():
        before = cluster.consumer_pids()
        victim = before[0]
        assert cluster.one("SELECT pg_terminate_backend(%s)", (victim,), db="postgres") is True
        wait_for(lambda: victim not in (p := cluster.consumer_pids()) and len(p) == len(before), 30,
                 "a replacement consumer")
        return "terminated pid %d" % victim
    # with AMQP message ids: the ledger keys on them ('m:' + id)
    _fault_run(cluster, services, pglog, metrics, "term", inject, message_ids=True)


def test_fault_network_silent_broker(cluster, services, pglog, metrics):
    """The broker frozen with SIGSTOP: TCP stays up, nothing comes back, as
    with a cut network.  With rabbit_heartbeat = 2 the consumers must give
    the connection up after two intervals (4 s) and reconnect later."""
    cluster.set_gucs(rabbit_heartbeat=2)
    cluster.wait_consuming(timeout=30)
    beam = int(services.state["RMQ_BEAM_PID"])
    info = {}

    def inject():
        mark = pglog.mark()
        os.kill(beam, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            st = wait_for(lambda: _not_consuming(cluster), 20,
                          "consumers noticing the silent broker (stats %r)" % cluster.stats())
            info["detect"] = time.monotonic() - t0
            info["errors"] = sorted({s["last_error"] or "" for s in st})
            info["states"] = sorted({s["state"] for s in st})
            time.sleep(max(0.0, 9.0 - (time.monotonic() - t0)))   # > 2 heartbeats, reconnects against a silent peer
            info["log"] = pglog.grep(mark, r"heartbeat")
        finally:
            os.kill(beam, signal.SIGCONT)
        return "detected after %.1fs, states %s, last_error %r" % (info["detect"], info["states"],
                                                                    info["errors"][0][:140])
    try:
        _fault_run(cluster, services, pglog, metrics, "silent", inject)
    finally:
        guarantee_helpers.sigcont_safe(beam)
    assert info["detect"] < 7.0, "a silent broker was noticed only after %.1fs (heartbeat 2 s)" % info["detect"]
    assert all("heartbeat" in e.lower() for e in info["errors"]), info["errors"]
    assert info["log"], "no log line about the heartbeat timeout"


# ---------------------------------------------------------------- plugin failures
def test_transient_errors_retried_then_permanent_dead_lettered_and_replayed(cluster, services, pglog, metrics):
    guarantee_helpers.setup_g(cluster)
    prefix = sbw.unique("flaky")
    max_retries = int(cluster.setting("max_retries"))
    # (SQLSTATE, failures before success); 1000 = always fails; 22012 is not transient
    plan = [("SB001", 3), ("40001", 2), ("40P01", 1), ("55P03", 1), ("57014", 1),
            ("SB001", max_retries), ("SB001", 1000), ("22012", 1)]
    always, perm = 6, 7
    for i, (code, times) in enumerate(plan):
        seq = "sbw_g.%s_%d" % (prefix, i)
        cluster.execute("CREATE SEQUENCE %s" % seq)
        cluster.execute("INSERT INTO sbw_g.flaky_plan VALUES (%s, %s, %s, %s)",
                        ("key=%s-%d" % (prefix, i), times, code, seq))
    guarantee_helpers.register_g(cluster, "flaky")
    mark = pglog.mark()
    try:
        msgs, _ = guarantee_helpers.bulk_messages(len(plan), prefix)
        guarantee_helpers.publish_window(services.amqp_url, msgs)

        def dl(i):
            return cluster.q("SELECT id, plugin, sqlstate, error FROM storyboard_worker.dead_letters "
                             "WHERE position(convert_to(%s, 'UTF8') in body) > 0",
                             ('"key=%s-%d"' % (prefix, i),))
        wait_for(lambda: guarantee_helpers.applied(cluster, "flaky", "key=%s-%%" % prefix)[1] >= 6
                 and dl(always) and dl(perm), 60, "6 events applied by 'flaky', 2 dead letters")
        guarantee_helpers.queue_drained(services)
        time.sleep(1)
        attempts = [cluster.one("SELECT last_value FROM sbw_g.%s_%d" % (prefix, i)) for i in range(len(plan))]
        per_key = dict(cluster.q("SELECT key, count(*) FROM sbw_g.applied WHERE plugin = 'flaky' AND key LIKE %s "
                                 "GROUP BY key", ("key=%s-%%" % prefix,)))
        # time the retries took for the event failing max_retries times (record runs first)
        spent = cluster.one("SELECT extract(epoch FROM a.at - s.at) FROM sbw_g.applied a "
                            "JOIN sbw_test.seen s ON s.key = a.key AND s.plugin = 'record' "
                            "WHERE a.key = %s", ("key=%s-5" % prefix,))
        retry_lines = pglog.grep(mark, r'plugin "flaky" will retry')
        metrics.add("transient plugin errors",
                    "attempts per event %s for plan %s (max_retries %d); %d 'will retry' log lines; "
                    "%d retries took %.2fs" % (attempts, [p for p in plan], max_retries, len(retry_lines),
                                               max_retries, float(spent)))
        for i, (code, times) in enumerate(plan):
            key = "key=%s-%d" % (prefix, i)
            if i in (always, perm):
                continue
            assert attempts[i] == times + 1, (code, times, attempts[i])
            assert per_key.get(key) == 1, (key, per_key.get(key))
            assert not dl(i), (key, dl(i))
        assert attempts[always] == max_retries + 1, attempts
        assert attempts[perm] == 1, "a non-transient error was retried: %r" % attempts
        assert cluster.seen(prefix) == (len(plan), len(plan)), "the other plugin ran once per event"
        assert len(retry_lines) == sum(min(t, max_retries) for c, t in plan if c != "22012"), retry_lines
        # backoff: 100 ms doubling, five retries: at least 100+200+400+800+1600 ms
        assert float(spent) >= 3.0, "retries of 5 failures took %.2fs: no backoff?" % float(spent)

        (a_id, a_plugin, a_state, a_err), = dl(always)
        assert (a_plugin, a_state) == ("flaky", "SB001"), dl(always)
        assert a_err == "flaky key=%s-%d: attempt %d fails" % (prefix, always, max_retries + 1), a_err
        (p_id, p_plugin, p_state, p_err), = dl(perm)
        assert (p_plugin, p_state, p_err) == ("flaky", "22012", "flaky key=%s-%d: attempt 1 fails" % (prefix, perm))

        # fixed: replay applies each once, and only 'flaky'
        cluster.execute("UPDATE sbw_g.flaky_plan SET fail_times = 0 WHERE key LIKE %s", ("key=%s-%%" % prefix,))
        for dl_id, i in ((a_id, always), (p_id, perm)):
            assert cluster.one("SELECT storyboard_worker.replay(%s)", (dl_id,)) is True
            assert guarantee_helpers.applied(cluster, "flaky", "key=%s-%d" % (prefix, i)) == (1, 1)
            assert not dl(i)
            with pytest.raises(psycopg2.Error, match="does not exist"):
                cluster.one("SELECT storyboard_worker.replay(%s)", (dl_id,))
            assert guarantee_helpers.applied(cluster, "flaky", "key=%s-%d" % (prefix, i)) == (1, 1)
        assert cluster.seen(prefix) == (len(plan), len(plan)), "replay must not re-run 'record'"

        # max_retries is honoured
        cluster.set_gucs(max_retries=2)
        cluster.wait_consuming(timeout=30)
        p2 = sbw.unique("flaky")
        cluster.execute("CREATE SEQUENCE sbw_g.%s_0" % p2)
        cluster.execute("INSERT INTO sbw_g.flaky_plan VALUES (%s, 1000, 'SB001', %s)",
                        ("key=%s-0" % p2, "sbw_g.%s_0" % p2))
        guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(1, p2)[0])
        wait_for(lambda: guarantee_helpers.dead_letters_like(cluster, '"key=%s-0"' % p2), 30, "the dead letter")
        assert cluster.one("SELECT last_value FROM sbw_g.%s_0" % p2) == 3
    finally:
        sbw.unregister(cluster, "flaky")


def test_deferred_constraint_trigger_is_the_plugins_failure(cluster, services, pglog, metrics):
    """A plugin whose row is checked by a deferred constraint trigger: the
    check runs when the plugin returns, inside its subtransaction, so a
    refusal is that plugin's dead letter (not a failed COMMIT of the whole
    event, requeued and redelivered); the other plugins' work commits and
    the message is acknowledged once.  replay() applies it once fixed.
    (A real COMMIT failure: test_poison.py.)"""
    guarantee_helpers.setup_g(cluster)
    guarantee_helpers.set_g_control(cluster, "commit_fail", "on")
    guarantee_helpers.register_g(cluster, "gated")
    prefix = sbw.unique("gate")
    pids = cluster.consumer_pids()
    base = guarantee_helpers.CounterBase(cluster)
    c0 = cluster.one("SELECT last_value + (CASE WHEN is_called THEN 0 ELSE -1 END) FROM sbw_g.commit_attempts")
    try:
        guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(1, prefix)[0])
        cluster.wait_seen(prefix, 1, timeout=30)
        dl = wait_for(lambda: cluster.q("SELECT id, plugin, sqlstate, error FROM storyboard_worker.dead_letters "
                                        "WHERE position(convert_to(%s, 'UTF8') in body) > 0",
                                        ('"key=%s-0"' % prefix,)), 30, "the gated dead letter")
        guarantee_helpers.queue_drained(services)
        time.sleep(1)
        checks = cluster.one("SELECT last_value FROM sbw_g.commit_attempts") - c0
        assert [(p, st) for _i, p, st, _e in dl] == [("gated", "23514")], dl
        assert dl[0][3] == "commit refused for key=%s-0" % prefix, dl
        assert checks == 1, "the deferred check ran %d times (requeued?)" % checks
        assert cluster.seen(prefix) == (1, 1)
        assert guarantee_helpers.applied(cluster, "gated", "key=%s-%%" % prefix) == (0, 0)
        assert base.delta()["messages_redelivered"] == 0
        guarantee_helpers.set_g_control(cluster, "commit_fail", "off")
        assert cluster.one("SELECT storyboard_worker.replay(%s)", (dl[0][0],)) is True
        assert guarantee_helpers.applied(cluster, "gated", "key=%s-%%" % prefix) == (1, 1)
        assert cluster.consumer_pids() == pids, "consumers restarted"
        metrics.add("deferred constraint trigger", "refused in the plugin's subtransaction: dead letter %s/%s, "
                    "checked %d time(s), other plugin applied once, replayed once fixed" % (dl[0][1], dl[0][2], checks))
    finally:
        guarantee_helpers.set_g_control(cluster, "commit_fail", "off")
        sbw.unregister(cluster, "gated")


def test_plugin_slower_than_two_heartbeats_applied_once(cluster, services, pglog, metrics):
    """A plugin that runs longer than two heartbeat intervals: the broker
    drops the connection and redelivers the message to another consumer
    while the first is still running it.  The effect must still be applied
    once (the first transaction or the second, not both)."""
    guarantee_helpers.setup_g(cluster)
    cluster.set_gucs(rabbit_heartbeat=2)
    cluster.wait_consuming(timeout=30)
    guarantee_helpers.set_g_control(cluster, "slow_first_ms", 10000)
    guarantee_helpers.register_g(cluster, "slow_first")
    prefix = sbw.unique("hb")
    base = guarantee_helpers.CounterBase(cluster)
    mark = pglog.mark()
    try:
        guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(1, prefix)[0])
        cluster.wait_seen(prefix, 1, timeout=30)
        # the slow first attempt ends 10 s after it started
        wait_for(lambda: not cluster.q("SELECT 1 FROM pg_stat_activity WHERE backend_type = %s "
                                       "AND wait_event = 'PgSleep'", (sbw.CONSUMER,), db="postgres"),
                 30, "the slow plugin call finished")
        cluster.wait_consuming(timeout=30)
        guarantee_helpers.queue_drained(services)
        time.sleep(1.5)
        rows = cluster.q("SELECT redelivered, backend_pid, at FROM sbw_test.seen WHERE key = %s ORDER BY at",
                         ("key=%s-0" % prefix,))
        d = base.delta()
        lines = pglog.grep(mark, r"storyboard_worker consumer \d+: (acknowledgement lost|connection)")
        metrics.add("plugin slower than 2 heartbeats",
                    "%d application(s) %r; stats delta %r; log: %s"
                    % (len(rows), [(r[0], r[1]) for r in rows], d, [l[-160:] for l in lines[:3]]))
        assert len(rows) == 1, ("applied %d times: first delivery and redelivery both committed "
                                "(the redelivery was checked in the ledger before the first attempt had "
                                "committed): %r; log: %s" % (len(rows), rows, "\n".join(lines[:5])))
    finally:
        sbw.unregister(cluster, "slow_first")


# ---------------------------------------------------------------- lifecycle
def _raw_states(cluster):
    return [r[0] for r in cluster.q("SELECT state FROM sbw_g.raw_stats() WHERE pid <> 0 ORDER BY worker_id")]


def test_drop_extension_idles_workers_and_create_wakes_them(cluster, services, pglog, metrics):
    guarantee_helpers.setup_g(cluster)     # sbw_g.raw_stats() survives DROP EXTENSION
    n = cluster.worker_count()
    pids = cluster.consumer_pids()
    user = _sb_user(services)
    guarantee_helpers.declare_queue(services.amqp_url)
    prefix = sbw.unique("drop")
    mark = pglog.mark()
    recreated = False
    try:
        cluster.execute("DROP EXTENSION storyboard_worker CASCADE")
        time.sleep(6)     # longer than the consumers' 5 s idle check
        states_without_events = _raw_states(cluster)
        # events published while the extension is gone are kept in the queue
        guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(20, prefix)[0])
        wait_for(lambda: (s := _raw_states(cluster)) and all(x == "idle" for x in s) and len(s) == n, 30,
                 "every consumer idle (raw stats %r)" % _raw_states(cluster))
        t_idle = time.monotonic()
        wait_for(lambda: services.connections(user) == [], 15, "no broker connection")
        q = services.queue_counts()
        assert q == (20, 0, 0), "the 20 events should wait in the queue: %r" % (q,)
        lines = pglog.grep(mark, r"storyboard_worker")
        time.sleep(max(0.0, 6.0 - (time.monotonic() - t_idle)))
        later = pglog.grep(mark, r"storyboard_worker")
        assert later == lines, "log lines keep coming while the extension is gone:\n" + "\n".join(later[len(lines):])
        assert len(lines) <= 2 * n, "more than 2 log lines per consumer:\n" + "\n".join(lines)
        assert cluster.consumer_pids() == pids, "consumers restarted"
        assert services.queue_counts() == (20, 0, 0)

        # CREATE EXTENSION, with the test plugins, in one transaction
        c = cluster.connect(autocommit=False)
        try:
            with c.cursor() as cur:
                cur.execute("CREATE EXTENSION storyboard_worker")
                cur.execute("SELECT storyboard_worker.unregister_plugin('subscription')")
                cur.execute(sbw.TEST_SCHEMA_SQL)
                cur.execute("SELECT storyboard_worker.register_plugin('record', "
                            "'sbw_test.record(storyboard_worker.event)')")
            c.commit()
        finally:
            c.close()
        recreated = True
        t0 = time.monotonic()
        cluster.wait_consuming(n, timeout=30)
        wake = time.monotonic() - t0
        assert cluster.wait_seen(prefix, 20, timeout=30) == (20, 20)
        # the dead-letter and ledger statements the consumers prepared before
        # the DROP work on the new tables
        guarantee_helpers.publish_window(services.amqp_url, [("task", b"{not json", {"message_id": prefix + "-poison"})])
        wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.dead_letters WHERE message_id = %s",
                                     (prefix + "-poison",)) == 1, 20, "the poison message dead-lettered")
        assert cluster.one("SELECT count(*) FROM storyboard_worker.ledger") >= 21
        metrics.add("DROP EXTENSION / CREATE EXTENSION",
                    "states 6 s after DROP without events %r; with events: %d log line(s), none in the next 6 s, "
                    "pids unchanged; consuming %.1fs after CREATE EXTENSION committed; first line: %s"
                    % (states_without_events, len(lines), wake, lines[0][-150:] if lines else "-"))
        assert wake < 2.5, ("consumers took %.1fs to consume after CREATE EXTENSION committed "
                            "(wake_workers() should make them check at once)" % wake)
    finally:
        if not recreated:
            sbw.setup_test_db(cluster, sbw.DB)
        cluster.execute("SELECT storyboard_worker.wake_workers()")
        cluster.wait_consuming(timeout=30)




def test_standby_idle_until_promoted(cluster, services, metrics):
    """pg_basebackup -R of the test cluster as a standby (its own exchange and
    queue, so it cannot take the primary's events): no storyboard_worker
    process while in recovery; consumers after pg_promote()."""
    guarantee_helpers.setup_g(cluster)
    exchange, queue = "sbw_g_standby_x", "sbw_g_standby_q"
    t_start = time.monotonic()
    standby = None
    try:
        standby = guarantee_helpers.Standby(services, PGBIN,
                                 "storyboard_worker.rabbit_exchange_name = '%s'\n"
                                 "storyboard_worker.rabbit_event_queue_name = '%s'" % (exchange, queue))
        sb = standby.cluster
        wait_for(lambda: sb.one("SELECT pg_is_in_recovery()", db="postgres") is True, 60, "the standby up")
        time.sleep(3)
        in_recovery = sb.backends()
        assert in_recovery == [], "storyboard_worker processes on a standby: %r" % in_recovery
        assert sb.stats() == [], sb.stats()
        assert services.queue_counts(queue) is None, "the standby declared its queue"

        t0 = time.monotonic()
        assert sb.one("SELECT pg_promote(true, 30)", db="postgres") is True
        st = sb.wait_consuming(timeout=30)
        promote_secs = time.monotonic() - t0
        prefix = sbw.unique("standby")
        msgs, _ = guarantee_helpers.bulk_messages(10, prefix)
        guarantee_helpers.publish_window(services.amqp_url, msgs, exchange=exchange)
        assert sb.wait_seen(prefix, 10, timeout=30) == (10, 10)
        assert cluster.seen(prefix) == (0, 0)
        metrics.add("standby", "no storyboard_worker process in recovery; %d consumers consuming %.1fs after "
                    "pg_promote(); test took %.1fs" % (len(st), promote_secs, time.monotonic() - t_start))
    finally:
        if standby is not None:
            standby.stop()
        for fn, arg in ((guarantee_helpers.delete_queue, queue), (guarantee_helpers.delete_exchange, exchange)):
            try:
                fn(services.amqp_url, arg)
            except Exception:
                pass


# ---------------------------------------------------------------- broker settings
def test_rabbit_host_list_tried_in_turn(cluster, services, pglog, metrics):
    port = services.amqp_port
    mark = pglog.mark()
    rounds = 0
    since = cluster.one("SELECT clock_timestamp()")
    cluster.set_gucs(rabbit_host="127.0.0.2, 127.0.0.1")   # nothing listens on 127.0.0.2
    while True:
        # connected again since the change (or since the broker closed the connections)
        st = wait_for(lambda: (s := cluster.all_consuming()) and all(x["connected_since"] > since for x in s) and s,
                      30, "consumers reconnected after %s" % since)
        assert all(s["broker"] == "127.0.0.1:%d" % port for s in st), st
        rounds += 1
        # each connection attempt takes the next host of the list: within
        # two reconnects every consumer has tried 127.0.0.2 once
        if len(pglog.grep(mark, r"could not connect to 127\.0\.0\.2:%d" % port)) >= 1 or rounds >= 3:
            break
        since = cluster.one("SELECT clock_timestamp()")
        services.rmq_ctl("close_all_connections", "test: next host")
    tried = pglog.grep(mark, r"127\.0\.0\.2:%d" % port)
    assert tried, "no attempt on the first host of the list in %d reconnects" % rounds
    prefix = sbw.unique("hosts")
    guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(20, prefix)[0])
    assert cluster.wait_seen(prefix, 20, timeout=30) == (20, 20)
    metrics.add("rabbit_host list", "'127.0.0.2, 127.0.0.1': %d reconnect round(s), refused host logged: %s"
                % (rounds, tried[0][-120:]))


def test_quorum_queue(cluster, services, metrics):
    queue = sbw.unique("sbw_g_quorum_")
    try:
        cluster.set_gucs(rabbit_event_queue_name=queue, rabbit_queue_type="quorum")
        cluster.wait_consuming(timeout=60)
        out = services.rmq_ctl("list_queues", "-q", "--no-table-headers", "name", "type", "consumers")
        row = [l.split() for l in out.splitlines() if l.split() and l.split()[0] == queue]
        assert row and row[0][1] == "quorum", out
        prefix = sbw.unique("quorum")
        guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(50, prefix)[0])
        assert cluster.wait_seen(prefix, 50, timeout=30) == (50, 50)
        guarantee_helpers.queue_drained(services, queue)
    finally:
        cluster.restore_gucs()
        cluster.wait_consuming(timeout=60)
        try:
            guarantee_helpers.delete_queue(services.amqp_url, queue)
        except Exception:
            pass
