"""Events through the broker into plugins: exactly once, the event's fields,
failing plugins and dead letters, replay, poison bodies."""

import json
import time

import sbw
from sbw import wait_for


def _queue_empty(services, timeout=30):
    return wait_for(lambda: (q := services.queue_counts()) and q[0] == 0 and q[1] == 0 and q,
                    timeout, "an empty queue (ready, unacked, consumers) = %r" % (services.queue_counts(),))


def test_500_events_processed_exactly_once(cluster, services, publisher, metrics):
    prefix = sbw.unique("bulk")
    n = 500
    bodies = sbw.publish.bulk_events(n, prefix)
    c0 = cluster.counters()
    t0 = cluster.one("SELECT clock_timestamp()")
    publisher.publish_many(bodies)
    t_pub = cluster.one("SELECT clock_timestamp()")
    cluster.wait_seen(prefix, n, timeout=120)
    _queue_empty(services)
    time.sleep(1.5)   # anything redelivered twice would show up now
    rows, distinct = cluster.seen(prefix)
    assert (rows, distinct) == (n, n), "expected %d rows, %d distinct keys; got %d rows, %d distinct" \
        % (n, n, rows, distinct)
    first, last = cluster.q("SELECT min(at), max(at) FROM sbw_test.seen WHERE plugin = 'record' "
                            "AND key LIKE %s", ("key=%s-%%" % prefix,))[0]
    total = (last - t0).total_seconds()
    metrics.add("%d events, first publish -> last commit" % n,
                "%.2fs = %.0f events/s (publishing took %.2fs, pika with a confirm per message; "
                "worker_count %d)" % (total, n / total, (t_pub - t0).total_seconds(), cluster.worker_count()))
    c1 = cluster.counters()
    assert c1["processed"] - c0["processed"] >= n, (c0, c1)
    assert c1["received"] - c0["received"] >= n, (c0, c1)
    # one transaction per event
    assert cluster.one("SELECT count(DISTINCT xid) FROM sbw_test.seen WHERE key LIKE %s",
                       ("key=%s-%%" % prefix,)) == n


def test_backlog_drain_rate(cluster, services, metrics):
    """Events queued while notifications are off, then drained: the consumers' own speed."""
    prefix = sbw.unique("drain")
    n = 2000
    cluster.set_gucs(enable_notifications="off")
    wait_for(lambda: (q := services.queue_counts()) and q[2] == 0, 20, "no consumers on the queue")
    with services.publisher() as pub:
        pub.publish_many(sbw.publish.bulk_events(n, prefix))
    assert services.queue_counts()[0] >= n
    cluster.set_gucs(enable_notifications="on")
    cluster.wait_seen(prefix, n, timeout=120)
    _queue_empty(services)
    rows, distinct = cluster.seen(prefix)
    assert (rows, distinct) == (n, n)
    first, last = cluster.q("SELECT min(at), max(at) FROM sbw_test.seen WHERE plugin = 'record' "
                            "AND key LIKE %s", ("key=%s-%%" % prefix,))[0]
    secs = (last - first).total_seconds()
    metrics.add("backlog of %d events drained (first -> last commit)" % n,
                "%.2fs = %.0f events/s (worker_count %d)" % (secs, (n - 1) / secs, cluster.worker_count()))


def test_event_fields(cluster, publisher):
    """Every StoryBoard message shape arrives as the storyboard_worker.event the plugin gets."""
    tag = sbw.unique("f")
    story = sbw.publish.story_created(7001, "Ünïcode story ✓", author_id=3, event_id=9001)
    task = sbw.publish.task_status_changed(7002, 7001, "inprogress", "merged", author_id=2,
                                           event_id=9002, query_string="key=%s-task" % tag)
    comment = sbw.publish.comment_added(7001, 55, author_id=2, event_id=9003)
    group = sbw.publish.project_group_project_added(4, 3)
    bodies = story + task + comment + group
    # make every body findable: the record plugin keys on query_string
    for i, b in enumerate(bodies):
        b["query_string"] = "key=%s-%d" % (tag, i)
    publisher.publish_many(bodies)
    cluster.wait_seen(tag, len(bodies), timeout=30)
    got = {r[0]: r[1] for r in cluster.q(
        "SELECT key, ev FROM sbw_test.seen WHERE plugin = 'record' AND key LIKE %s", ("key=%s-%%" % tag,))}
    assert len(got) == len(bodies)
    for i, b in enumerate(bodies):
        ev = got["key=%s-%d" % (tag, i)]
        where = "body %d (%s %s)" % (i, b["resource"], b["path"])
        assert ev["routing_key"] == b["resource"], where
        assert ev["resource"] == b["resource"], where
        assert ev["method"] == b["method"], where
        assert ev["path"] == b["path"], where
        assert ev["url"] == b["url"], where
        assert ev["status"] == b["status"], where
        assert ev["author_id"] == b["author_id"], where
        assert ev["redelivered"] is False, where
        assert ev["resource_id"] == int(b["resource_id"]), where          # "1" and 1 alike
        if b["sub_resource_id"] is None:
            assert ev["sub_resource_id"] is None, where
        else:
            assert ev["sub_resource_id"] == int(b["sub_resource_id"]), where
        assert ev["sub_resource"] == b["sub_resource"], where
        assert ev["resource_before"] == b["resource_before"], where
        assert ev["resource_after"] == b["resource_after"], where
    # non-ASCII text arrives intact (the publisher sends it unescaped)
    assert got["key=%s-0" % tag]["resource_after"]["title"] == "Ünïcode story ✓"
    # event_info stays a JSON-encoded string inside resource_after
    te = got["key=%s-3" % tag]["resource_after"]
    assert isinstance(te["event_info"], str) and json.loads(te["event_info"])["new_status"] == "merged"


def test_raising_plugin_dead_letters_then_replay(cluster, services, publisher):
    prefix = sbw.unique("frag")
    n = 5
    sbw.set_control(cluster, "fragile_broken", "on")
    sbw.register(cluster, "fragile")
    try:
        publisher.publish_many(sbw.publish.bulk_events(n, prefix))
        cluster.wait_seen(prefix, n, timeout=30)        # the healthy plugin committed

        def dead():
            rows = cluster.q("SELECT id, plugin, sqlstate, error, routing_key, body "
                             "FROM storyboard_worker.dead_letters "
                             "WHERE position(convert_to(%s, 'UTF8') in body) > 0 ORDER BY id",
                             ('"key=%s-' % prefix,))
            return [r[:5] + (json.loads(bytes(r[5]))["query_string"],) for r in rows]
        dl = wait_for(lambda: len(d := dead()) >= n and d, 30, "%d dead letters of plugin fragile" % n)
        assert len(dl) == n, dl
        for (_id, plugin, sqlstate, error, rk, key) in dl:
            assert plugin == "fragile", dl
            assert sqlstate == "22012", dl
            assert "division by zero" in error, dl
            assert rk == "task", dl
        assert sorted(r[5] for r in dl) == sorted("key=%s-%d" % (prefix, i) for i in range(n))
        assert cluster.seen(prefix, plugin="fragile") == (0, 0)
        assert cluster.seen(prefix) == (n, n), "the healthy plugin ran once per event"
        _queue_empty(services)

        # fix the plugin, replay every dead letter: applied once, only that plugin
        sbw.set_control(cluster, "fragile_broken", "off")
        for (dl_id, *_rest) in dl:
            assert cluster.one("SELECT storyboard_worker.replay(%s)", (dl_id,)) is True, dl_id
        assert cluster.seen(prefix, plugin="fragile") == (n, n)
        assert cluster.seen(prefix) == (n, n), "replay must not re-run the plugins that succeeded"
        assert dead() == [], "replayed dead letters should be deleted"
        # a second replay of the same id applies nothing
        try:
            cluster.one("SELECT storyboard_worker.replay(%s)", (dl[0][0],))
        except Exception:
            pass
        assert cluster.seen(prefix, plugin="fragile") == (n, n)
    finally:
        sbw.unregister(cluster, "fragile")


def _max_message_bytes(cluster):
    setting, unit = cluster.q("SELECT setting, unit FROM pg_settings WHERE name = "
                              "'storyboard_worker.max_message_bytes'", db="postgres")[0]
    mult = {None: 1, "B": 1, "kB": 1024, "MB": 1024 * 1024}[unit]
    return int(setting) * mult, unit


def test_poison_bodies_dead_lettered_and_acked(cluster, services, publisher, metrics):
    limit, unit = _max_message_bytes(cluster)
    if limit > 256 * 1024:
        cluster.set_gucs(max_message_bytes="64kB" if unit else 65536)
        time.sleep(1)
        limit, unit = _max_message_bytes(cluster)
        assert limit == 65536, limit
    pids = cluster.consumer_pids()
    tag = sbw.unique("p")

    def storyboard_body(marker, **over):
        b = {"marker": marker}   # first key, so a truncated stored body still shows it
        b.update(sbw.publish.task_status_changed(1, 1, query_string="key=%s" % marker)[0])
        b.update(over)
        return b

    poison = {
        "invalid_json": b'{"marker": "%s-invalid_json", "author_id": 1, "method": "PUT", "path": ' % tag.encode(),
        "array": json.dumps(["%s-array" % tag, 1, 2]).encode(),
        "string": json.dumps("%s-string" % tag).encode(),
        "non_numeric_id": json.dumps(storyboard_body("%s-non_numeric_id" % tag, resource_id="abc")).encode(),
        "invalid_utf8": json.dumps(storyboard_body("%s-invalid_utf8" % tag, path="/v1/tasks/PLACEHOLDER"))
            .encode().replace(b"PLACEHOLDER", b"\xff\xfe\xc3("),
        "huge": json.dumps(storyboard_body("%s-huge" % tag,
                                           resource_after={"description": "x" * (limit + 4096)})).encode(),
    }
    assert len(poison["huge"]) > limit
    for name, body in poison.items():
        publisher.publish_raw("task", body)
    # a good event after them still goes through
    publisher.publish(sbw.publish.task_status_changed(2, 1, query_string="key=%s-good-0" % tag)[0])
    cluster.wait_seen(tag + "-good", 1, timeout=30)

    def dead(name):
        return cluster.q("SELECT id, plugin, sqlstate, error, routing_key, length(body) "
                         "FROM storyboard_worker.dead_letters "
                         "WHERE position(convert_to(%s, 'UTF8') in substring(body from 1 for 200)) > 0",
                         ("%s-%s" % (tag, name),))
    found = wait_for(lambda: all(dead(k) for k in poison) and {k: dead(k) for k in poison}, 30,
                     "a dead letter for each poison body; missing: %r"
                     % [k for k in poison if not dead(k)])
    for name, rows in found.items():
        assert len(rows) == 1, (name, rows)
        _id, plugin, sqlstate, error, rk, blen = rows[0]
        assert plugin is None, (name, rows)
        assert sqlstate and len(sqlstate) == 5, (name, rows)
        assert error, (name, rows)
        assert rk == "task", (name, rows)
        metrics.add("poison %-15s" % name, "sqlstate %s: %s" % (sqlstate, error[:100]))
    # the plugins never saw them
    assert cluster.one("SELECT count(*) FROM sbw_test.seen WHERE key LIKE %s AND key NOT LIKE %s",
                       ("key=%s-%%" % tag, "key=%s-good%%" % tag)) == 0
    _queue_empty(services)
    assert cluster.consumer_pids() == pids, "consumers restarted: %r -> %r" % (pids, cluster.consumer_pids())
    cluster.wait_consuming(timeout=5)
