"""Operations settings: dead_letter_retention prunes old dead letters (consumer 0, at its
start and every minute), plugin_failure_log_level sets the level of the per-event line."""

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
