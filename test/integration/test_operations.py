"""Operations settings: dead_letter_retention prunes old dead letters (consumer 0, at its
start and every minute), plugin_failure_log_level sets the level of the per-event line; the
broker's queue depth in the stats view."""

import guarantee_helpers
import sbw
from sbw import wait_for


def _restart_consumer0(cluster):
    old = [s["pid"] for s in cluster.stats() if s["worker_id"] == 0][0]
    cluster.execute("SELECT pg_terminate_backend(%s)", (old,), db="postgres")
    wait_for(lambda: any(s["worker_id"] == 0 and s["pid"] not in (None, old) and s["state"] == "consuming"
                         for s in cluster.stats()), 30, "consumer 0 back")


def test_dead_letter_retention(cluster):
    cluster.execute("INSERT INTO storyboard_worker.dead_letters (received_at, routing_key, body, error) VALUES "
                    "(now() - interval '2 hours', 'story', '\\x6f6c64', 'sbw-dlr old'), "
                    "(now(), 'story', '\\x6e6577', 'sbw-dlr new')")
    try:
        left = lambda: sorted(r[0] for r in cluster.q(   # noqa: E731
            "SELECT error FROM storyboard_worker.dead_letters WHERE error LIKE 'sbw-dlr %'"))
        # off by default: kept
        _restart_consumer0(cluster)
        assert left() == ["sbw-dlr new", "sbw-dlr old"]
        cluster.set_gucs(dead_letter_retention="1h")
        _restart_consumer0(cluster)
        wait_for(lambda: left() == ["sbw-dlr new"], 30, "the old dead letter pruned")
    finally:
        cluster.execute("DELETE FROM storyboard_worker.dead_letters WHERE error LIKE 'sbw-dlr %'")


def test_plugin_failure_log_level(cluster, publisher, pglog):
    sbw.set_control(cluster, "fragile_broken", "on")
    sbw.register(cluster, "fragile")
    try:
        for level, word in (("warning", "WARNING"), ("log", "LOG")):
            cluster.set_gucs(plugin_failure_log_level=level)
            mark = pglog.mark()
            prefix = sbw.unique("lvl")
            publisher.publish_many(sbw.publish.bulk_events(1, prefix))
            line = wait_for(lambda: pglog.grep(mark, r'plugin "fragile" failed'), 30, "the failure logged")
            assert ("%s:  storyboard_worker plugin" % word) in line[0], (level, line)
        # the dead letters are kept whatever the level
        assert cluster.one("SELECT count(*) FROM storyboard_worker.dead_letters WHERE plugin = 'fragile'") >= 2
    finally:
        sbw.unregister(cluster, "fragile")
        cluster.execute("DELETE FROM storyboard_worker.dead_letters WHERE plugin = 'fragile'")


def _depth(cluster):
    """(queue_messages, queue_consumers, queue_checked_at) of every row of stats."""
    return [(s["queue_messages"], s["queue_consumers"], s["queue_checked_at"]) for s in cluster.stats()]


def test_queue_depth_in_stats(cluster, services, metrics):
    """Consumer 0 asks the broker for the queue's depth (a passive queue.declare) every few
    seconds: NULL while no consumer is connected, the backlog while the consumer is slow,
    0 once it is drained, and no delivery lost to the measurements meanwhile."""
    n = 60
    prefix = sbw.unique("depth")
    cluster.set_gucs(enable_notifications="off")
    wait_for(lambda: (st := cluster.stats()) and all(s["state"] == "idle" for s in st), 30,
             "every consumer idle (stats: %r)" % cluster.stats())
    assert all(d == (None, None, None) for d in _depth(cluster)), _depth(cluster)
    guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(n, prefix)[0])
    ready = wait_for(lambda: (q := services.queue_counts()) and q[0] >= n and q, 30, "the backlog queued")[0]
    sbw.set_control(cluster, "slow_ms", 100)
    sbw.register(cluster, "slow")
    try:
        # one consumer taking one message at a time, 100 ms each: the backlog lasts seconds
        cluster.set_gucs(enable_notifications="on", worker_count=1, rabbit_prefetch=1)
        first = wait_for(lambda: (d := _depth(cluster)) and d[0][2] is not None and d[0], 30,
                         "a queue depth in stats (%r)" % _depth(cluster))
        assert ready // 2 <= first[0] <= ready, (first, ready)
        assert first[1] == 1, first
        assert all(d == first for d in _depth(cluster)), _depth(cluster)
        last = wait_for(lambda: (d := _depth(cluster)) and d[0][0] == 0 and d[0], 90,
                        "the queue depth down to 0 (%r)" % _depth(cluster))
        assert last[2] > first[2], (first, last)
        assert cluster.wait_seen(prefix, n, timeout=60) == (n, n)
        metrics.add("queue depth in stats", "%d ready at %s, 0 at %s" % (first[0], first[2], last[2]))
    finally:
        sbw.unregister(cluster, "slow")
        cluster.restore_gucs()
        cluster.wait_consuming(timeout=45)
