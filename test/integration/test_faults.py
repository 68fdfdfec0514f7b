"""Faults: the broker going away (stopped or SIGKILLed), wrong credentials,
PostgreSQL shutting down with events in flight, the database missing at start,
a broker that never answers the TCP connect."""

import contextlib
import socket
import time

import sbw
from sbw import wait_for


def _sb_user(services):
    return services.state["SBW_RMQ_USER"]


def _not_consuming(cluster):
    st = cluster.stats()
    return st and all(s["state"] in ("connecting", "backing off") for s in st) and st


def _broker_outage(cluster, services, pglog, metrics, how):
    n = cluster.worker_count()
    pids = cluster.consumer_pids()
    mark = pglog.mark()
    (services.rmq_kill if how == "kill" else services.rmq_stop)()
    down_at = time.time()
    st = wait_for(lambda: _not_consuming(cluster), 30,
                  "every worker connecting/backing off while the broker is down (stats: %r)" % cluster.stats())
    wait_for(lambda: all(s["last_error"] for s in cluster.stats()), 15,
             "last_error set while the broker is down: %r" % cluster.stats())
    time.sleep(2)    # a few retry periods against a closed port
    assert cluster.consumer_pids(), "no consumers left while the broker is down"
    restart_at = cluster.one("SELECT clock_timestamp()")
    services.rmq_start()
    t = time.time()
    st = cluster.wait_consuming(n, timeout=60)
    metrics.add("broker %s: reconnected" % ("SIGKILL" if how == "kill" else "stop/start"),
                "%.1fs after the broker was ready (down %.1fs); consumer pids %s"
                % (time.time() - t, t - down_at, "unchanged" if cluster.consumer_pids() == pids else
                   "changed %r -> %r" % (pids, cluster.consumer_pids())))
    for s in st:
        assert s["connected_since"] >= restart_at, s
    assert len(services.connections(_sb_user(services))) == n
    q = services.queue_counts()
    assert q and q[2] == n, q
    assert pglog.grep(mark, r"storyboard_worker|rabbit|amqp|broker"), "nothing logged about the outage"
    # events published after the restart are processed
    prefix = sbw.unique("after_" + how)
    with services.publisher() as pub:
        pub.publish_many(sbw.publish.bulk_events(50, prefix))
    assert cluster.wait_seen(prefix, 50, timeout=60) == (50, 50)


def test_broker_stopped_and_restarted(cluster, services, pglog, metrics):
    _broker_outage(cluster, services, pglog, metrics, "stop")


def test_broker_killed_and_restarted(cluster, services, pglog, metrics):
    _broker_outage(cluster, services, pglog, metrics, "kill")


def test_wrong_password_then_fixed(cluster, services, pglog, metrics):
    n = cluster.worker_count()
    pids = cluster.consumer_pids()
    mark = pglog.mark()
    cluster.set_gucs(rabbit_password="not-the-password")
    try:
        wait_for(lambda: _not_consuming(cluster), 6, "workers reconnecting after a password change")
    except AssertionError:
        # The workers kept their authenticated connection; make the broker drop
        # it so they must log in again with the new (wrong) password.
        metrics.add("note", "a reload that changes rabbit_password does not make the workers reconnect")
        services.rmq_ctl("close_all_connections", "test: password rotated")
    st = wait_for(lambda: (s := cluster.stats()) and all(x["last_error"] and x["state"] != "consuming"
                                                         for x in s) and s,
                  30, "last_error for the refused login (stats: %r)" % cluster.stats())
    for s in st:
        assert any(w in s["last_error"].lower() for w in ("access_refused", "login", "password",
                                                          "authentication", "refused")), s
    metrics.add("wrong password: stats.last_error", st[0]["last_error"])
    time.sleep(4)   # several retry periods (rabbit_retry_delay = 1)
    assert cluster.consumer_pids() == pids, "consumers restarted (crash loop?): %r -> %r" \
        % (pids, cluster.consumer_pids())
    st = cluster.stats()
    assert all(s["state"] in ("connecting", "backing off") for s in st), st
    lines = pglog.grep(mark, r"access_refused|login|password|authenticat")
    assert lines, "no log line about the refused login"
    # PostgreSQL itself logs 'parameter "..." changed to "<value>"' on reload for
    # every setting, secrets included; the workers must not add their own.
    leaks = [l for l in pglog.since(mark).splitlines()
             if "not-the-password" in l and "changed to" not in l]
    assert not leaks, "the password appears in the workers' log lines:\n" + "\n".join(leaks[:5])
    assert services.connections(_sb_user(services)) == []

    cluster.set_gucs(rabbit_password=None)   # back to the right one
    cluster.wait_consuming(n, timeout=30)
    prefix = sbw.unique("pw")
    with services.publisher() as pub:
        pub.publish_many(sbw.publish.bulk_events(10, prefix))
    assert cluster.wait_seen(prefix, 10, timeout=30) == (10, 10)


def test_fast_shutdown_with_events_in_flight(cluster, services, pglog, metrics):
    prefix = sbw.unique("shut")
    n = 600
    sbw.set_control(cluster, "slow_ms", 10)
    sbw.register(cluster, "slow")
    try:
        with services.publisher() as pub:
            pub.publish_many(sbw.publish.bulk_events(n, prefix))
        wait_for(lambda: cluster.seen(prefix)[1] >= 30, 30, "the first 30 events")
        done_before = cluster.seen(prefix)[1]
        cluster.reset_connections()
        t = time.time()
        services.pg_stop()          # SIGINT to the postmaster = pg_ctl stop -m fast
        stop_secs = time.time() - t
        q = wait_for(lambda: (c := services.queue_counts()) and c[1] == 0 and c[2] == 0 and c, 15,
                     "no unacked messages and no consumers once PostgreSQL is down (queue: %r)"
                     % (services.queue_counts(),))
        metrics.add("fast shutdown with events in flight",
                    "%d of %d applied before the stop, shutdown took %.2fs, queue after: %r"
                    % (done_before, n, stop_secs, q))
        assert stop_secs < 10, "fast shutdown took %.1fs" % stop_secs
        services.pg_start()
        cluster.wait_consuming(timeout=60)
        cluster.wait_seen(prefix, n, timeout=120)
        wait_for(lambda: (q := services.queue_counts()) and q[0] == 0 and q[1] == 0, 30, "an empty queue")
        time.sleep(1)
        rows, distinct = cluster.seen(prefix)
        assert distinct == n, "lost events: %d of %d" % (distinct, n)
        assert rows == n, "%d events applied twice" % (rows - distinct)
    finally:
        sbw.unregister(cluster, "slow")


def test_database_missing_at_start(cluster, services, pglog, metrics):
    late = sbw.unique("sbw_late_")
    n = cluster.worker_count()
    try:
        cluster.set_gucs(reload=False, database=late)
        services.pg_stop()
        cluster.reset_connections()
        mark = pglog.mark()
        services.pg_start()
        time.sleep(6)
        assert services.pg_alive()
        lines = pglog.grep(mark, late)
        assert lines, "no log line about the missing database %s" % late
        exits = pglog.grep(mark, r"storyboard_worker.*exited with exit code|"
                                 r"FATAL:.*database \"%s\" does not exist" % late)
        assert len(exits) <= 2, "workers crash-looping on the missing database:\n" + "\n".join(exits[:10])
        metrics.add("database missing at start: log", "%d line(s) in 6 s (rabbit_retry_delay = %s), first: %s"
                    % (len(lines), cluster.setting("rabbit_retry_delay"), lines[0][:200]))
        assert not [p for p in cluster.consumer_pids()
                    if cluster.one("SELECT datname FROM pg_stat_activity WHERE pid = %s", (p,),
                                   db="postgres") == sbw.DB], "consumers still use the old database"

        t = time.time()
        sbw.setup_test_db(cluster, late)        # CREATE DATABASE + CREATE EXTENSION + plugin
        cluster.wait_consuming(n, timeout=60, db=late)
        metrics.add("database created + CREATE EXTENSION -> consuming", "%.1fs" % (time.time() - t))
        prefix = sbw.unique("late")
        with services.publisher() as pub:
            pub.publish_many(sbw.publish.bulk_events(20, prefix))
        assert cluster.wait_seen(prefix, 20, timeout=30, db=late) == (20, 20)
    finally:
        cluster.set_gucs(reload=False, database=None)
        services.pg_restart()
        cluster.reset_connections()
        cluster.dirty = True
        cluster.wait_consuming(timeout=60)
        cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % late, db="postgres")


@contextlib.contextmanager
def _silent_listener():
    """A port whose SYNs go unanswered: a listener that never accepts, its accept queue
    filled, so that Linux drops further SYNs and a connect() waits until it times out."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            c.connect_ex(srv.getsockname())
            fillers.append(c)
        time.sleep(0.3)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(srv.getsockname())
            raise AssertionError("the listener still accepts connections")
        except socket.timeout:
            pass
        finally:
            probe.close()
        yield srv.getsockname()[1]
    finally:
        for c in fillers:
            c.close()
        srv.close()


def test_connect_to_a_silent_broker_is_interruptible(cluster, services, pglog, metrics):
    """The TCP connect waits on the latch: SIGTERM ends a consumer stuck in it at once, not
    after the 10 s connect timeout; and the timeout bounds it, with a message saying so."""
    with _silent_listener() as port:
        mark = pglog.mark()
        since = cluster.one("SELECT clock_timestamp()")
        cluster.set_gucs(rabbit_port=port)
        st = wait_for(lambda: (s := cluster.stats()) and all(x["state"] == "connecting" for x in s) and s,
                      30, "every consumer connecting (stats: %r)" % cluster.stats())
        time.sleep(1)   # well inside the connect
        victim = st[0]["pid"]
        t = time.time()
        cluster.execute("SELECT pg_terminate_backend(%s)", (victim,), db="postgres")
        wait_for(lambda: victim not in cluster.consumer_pids(), 10, "consumer %d gone" % victim)
        gone_secs = time.time() - t
        assert gone_secs < 3, "a consumer in connect() took %.1fs to exit on SIGTERM" % gone_secs
        err = wait_for(lambda: (s := cluster.stats()) and [x["last_error"] for x in s
                                                              if x["last_error_at"] and x["last_error_at"] > since],
                       30, "a connect timeout in stats (%r)" % cluster.stats())
        assert all("could not connect to 127.0.0.1:%d: timed out after 10000 ms" % port in e for e in err), err
        assert not pglog.crashes(mark), pglog.crashes(mark)
        metrics.add("silent broker", "SIGTERM in connect: gone in %.2fs; then: %s" % (gone_secs, err[0]))
    cluster.restore_gucs()
    cluster.wait_consuming(timeout=60)
