"""The workers as processes: visibility, enable_notifications, worker_count,
pg_terminate_backend, and not getting in the way of DROP DATABASE."""

import time

import psycopg2

import sbw
from sbw import wait_for


def test_workers_visible_in_pg_stat_activity(cluster):
    n = cluster.worker_count()
    rows = cluster.backends()
    types = [r[1] for r in rows]
    assert all(t.startswith("storyboard_worker") for t in types), rows
    assert types.count(sbw.CONSUMER) == n, "expected %d '%s' backends, got %r" % (n, sbw.CONSUMER, rows)
    assert types.count(sbw.LAUNCHER) == 1, "expected one '%s' backend, got %r" % (sbw.LAUNCHER, rows)
    assert set(types) <= {sbw.CONSUMER, sbw.LAUNCHER}, rows
    assert all(r[2] == sbw.DB for r in rows if r[1] == sbw.CONSUMER), \
        "consumers should be connected to database %r: %r" % (sbw.DB, rows)
    st = cluster.stats()
    assert sorted(s["pid"] for s in st) == cluster.consumer_pids(), st
    for s in st:
        assert s["state"] == "consuming", s
        assert s["broker"] == "127.0.0.1:%d" % cluster.svc.amqp_port, s
        assert s["connected_since"] is not None, s


def test_notifications_off_means_no_broker_connection(cluster, services):
    n = cluster.worker_count()
    cluster.set_gucs(enable_notifications="off")
    wait_for(lambda: (st := cluster.stats()) and all(s["state"] == "idle" for s in st),
             20, "every worker idle after enable_notifications = off (stats: %r)" % cluster.stats())
    wait_for(lambda: not services.connections(services.state["SBW_RMQ_USER"]),
             20, "no broker connection of user storyboard")
    time.sleep(2.5)   # several retry periods: still nothing
    assert services.connections(services.state["SBW_RMQ_USER"]) == []
    q = services.queue_counts()
    assert q is None or q[2] == 0, "queue consumers with notifications off: %r" % (q,)
    assert all(s["state"] == "idle" for s in cluster.stats()), cluster.stats()

    cluster.set_gucs(enable_notifications="on")
    cluster.wait_consuming(timeout=30)
    assert len(services.connections(services.state["SBW_RMQ_USER"])) == n
    q = services.queue_counts()
    assert q is not None and q[2] == n, "queue consumers after enable_notifications = on: %r" % (q,)


def test_worker_count_reload(cluster, services):
    for n in (2, 4, 1):
        cluster.set_gucs(worker_count=n)
        wait_for(lambda: len(cluster.consumer_pids()) == n, 30,
                 "%d consumer backends (have %r)" % (n, cluster.consumer_pids()))
        cluster.wait_consuming(n, timeout=30)
        q = wait_for(lambda: (c := services.queue_counts()) and c[2] == n and c, 20,
                     "%d consumers on the queue" % n)
        assert q[2] == n
        time.sleep(1)
        assert len(cluster.consumer_pids()) == n, "worker count changed again: %r" % cluster.consumer_pids()


def test_terminate_consumer_is_replaced_and_nothing_lost(cluster, services, publisher, metrics):
    prefix = sbw.unique("term")
    n = 400
    sbw.set_control(cluster, "slow_ms", 5)
    sbw.register(cluster, "slow")
    try:
        before = cluster.consumer_pids()
        publisher.publish_many(sbw.publish.bulk_events(n, prefix))
        wait_for(lambda: cluster.seen(prefix)[1] >= 40, 30, "the first 40 events")
        victim = before[0]
        assert cluster.one("SELECT pg_terminate_backend(%s)", (victim,), db="postgres") is True
        wait_for(lambda: victim not in (p := cluster.consumer_pids()) and len(p) == len(before), 30,
                 "a replacement consumer (before %r, now %r)" % (before, cluster.consumer_pids()))
        rows, distinct = cluster.wait_seen(prefix, n, timeout=90)
        wait_for(lambda: (q := services.queue_counts()) and q[0] == 0 and q[1] == 0, 30, "an empty queue")
        time.sleep(1)
        rows, distinct = cluster.seen(prefix)
        assert distinct == n, "lost events: %d of %d seen" % (distinct, n)
        metrics.add("pg_terminate_backend during %d events: duplicates" % n, rows - distinct)
        cluster.wait_consuming(timeout=30)
    finally:
        sbw.unregister(cluster, "slow")


def test_drop_database_not_blocked(cluster):
    other = sbw.unique("sbw_other_")
    cluster.execute('CREATE DATABASE "%s"' % other, db="postgres")
    c = cluster.connect(other)
    try:
        with c.cursor() as cur:
            cur.execute("CREATE EXTENSION storyboard_worker")
            cur.execute("SELECT count(*) FROM storyboard_worker.stats")
            cur.fetchall()
    finally:
        c.close()
    time.sleep(1)   # give a worker that would wrongly connect to it the time to do so
    t = time.monotonic()
    try:
        cluster.execute('DROP DATABASE "%s"' % other, db="postgres")
    except psycopg2.Error as e:
        holders = cluster.q("SELECT pid, backend_type FROM pg_stat_activity WHERE datname = %s",
                            (other,), db="postgres")
        cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % other, db="postgres")
        raise AssertionError("DROP DATABASE blocked: %s; connected: %r" % (e, holders))
    assert time.monotonic() - t < 4, "DROP DATABASE waited %.1fs" % (time.monotonic() - t)
    # and CREATE DATABASE (template1 must be free of workers)
    cluster.execute('CREATE DATABASE "%s"' % other, db="postgres")
    cluster.execute('DROP DATABASE "%s"' % other, db="postgres")
    cluster.wait_consuming(timeout=10)


def test_unrelated_reload_keeps_broker_connections(cluster):
    before = {s["pid"]: s["connected_since"] for s in cluster.stats()}
    cluster.execute("ALTER SYSTEM SET work_mem = '5MB'", db="postgres")   # nothing to do with the workers
    cluster.dirty = True
    cluster.reload()
    time.sleep(2)
    after = {s["pid"]: s["connected_since"] for s in cluster.stats()}
    assert after == before, "connections reopened by an unrelated reload: %r -> %r" % (before, after)
