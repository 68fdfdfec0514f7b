"""The built-in 'subscription' plugin end to end: StoryBoard's messages through
RabbitMQ into subscription_events, on StoryBoard's own test data
(test/fixtures/storyboard_schema.sql + storyboard_mock_data.sql) and the
subscriber sets StoryBoard's tests expect (tests/db/test_subscriptions.py)."""

import json
import os

import pytest

import sbw
from sbw import wait_for

FIXTURES = os.path.join(sbw.TEST_DIR, "fixtures")
SCHEMA = os.path.join(FIXTURES, "storyboard_schema.sql")
DATA = os.path.join(FIXTURES, "storyboard_mock_data.sql")


@pytest.fixture(scope="module")
def storyboard_tables(cluster):
    if not (os.path.exists(SCHEMA) and os.path.exists(DATA)):
        pytest.skip("test/fixtures/storyboard_schema.sql or storyboard_mock_data.sql not there yet")
    if not cluster.one("SELECT to_regclass('public.subscription_events') IS NOT NULL"):
        with open(SCHEMA) as f:
            cluster.execute(f.read())
        with open(DATA) as f:
            cluster.execute(f.read())
    return cluster


def _new_subscription_events(cluster, after_id):
    return cluster.q("SELECT subscriber_id, author_id, event_type, event_info FROM subscription_events "
                     "WHERE id > %s ORDER BY id", (after_id,))


def test_subscription_plugin_through_the_broker(storyboard_tables, publisher):
    cluster = storyboard_tables
    cluster.execute("SELECT storyboard_worker.register_plugin('subscription', "
                    "'storyboard_worker.subscription_handler(storyboard_worker.event)')")
    try:
        last = cluster.one("SELECT coalesce(max(id), 0) FROM subscription_events")
        # timeline event 1 of the mock data: story_created for story 1 -> subscribers {1, 3}
        info = cluster.one("SELECT event_info FROM events WHERE id = 1")
        te = sbw.publish.timeline_event(1, "story_created", path="/v1/stories", author_id=1,
                                        status=201, story_id=1, event_info=json.loads(info))
        te["resource_after"]["event_info"] = info     # exactly the stored string
        publisher.publish(te)
        # PUT /v1/project_groups/1/projects/3 -> subscribers of project group 1: {1}
        publisher.publish(sbw.publish.project_group_project_added(1, 3, author_id=2)[0])
        # hook messages for story/task create no subscription_events
        publisher.publish(sbw.publish.task_status_changed(1, 1, "inprogress", "merged", author_id=2)[0])

        rows = wait_for(lambda: len(r := _new_subscription_events(cluster, last)) >= 3 and r, 30,
                        "3 new subscription_events (have %r)" % (_new_subscription_events(cluster, last),))
        created = sorted(r for r in rows if r[2] == "story_created")
        assert [(r[0], r[1], r[3]) for r in created] == [(1, 1, info), (3, 1, info)], rows
        added = [r for r in rows if r[2] == "project added to project_group"]
        assert [(r[0], r[1]) for r in added] == [(1, 2)], rows
        assert json.loads(added[0][3]) == {"project_group_id": "1", "project_id": "3"}, added
        assert len(rows) == 3, rows
        assert cluster.one("SELECT count(*) FROM storyboard_worker.dead_letters WHERE plugin = 'subscription'") == 0
    finally:
        sbw.unregister(cluster, "subscription")


def test_subscription_workload_rate(storyboard_tables, services, metrics):
    """The issue's workload through the broker: one story with 3 tasks in 2
    projects of 1 project group, 10 subscribers (story, tasks, projects and
    group), N timeline events published as StoryBoard does.  Every event must
    give exactly one subscription_events row per subscriber; the rate (first
    to last commit) is reported."""
    import time
    import guarantee_helpers
    cluster = storyboard_tables
    n = int(os.environ.get("SBW_SUB_EVENTS", "2000"))
    base = 90000
    sbw.workload_data(cluster, base, n)
    cluster.execute("SELECT storyboard_worker.register_plugin('subscription', "
                    "'storyboard_worker.subscription_handler(storyboard_worker.event)')")
    try:
        last = cluster.one("SELECT coalesce(max(id), 0) FROM subscription_events")
        msgs = []
        for i in range(1, n + 1):
            info = '{"story_id": %d, "task_id": %d}' % (base + 1, base + 1)
            te = sbw.publish.timeline_event(base + i, "task_status_changed", path="/v1/tasks/%d" % (base + 1),
                                            author_id=base + 1, story_id=base + 1)
            te["resource_after"]["event_info"] = info
            msgs.append(("timeline_event", sbw.publish.encode(te), None))
        t0 = time.time()
        guarantee_helpers.publish_window(services.amqp_url, msgs)
        wait_for(lambda: cluster.one("SELECT count(*) FROM subscription_events WHERE id > %s", (last,)) >= 10 * n,
                 120, "%d subscription_events" % (10 * n))
        rows, subs, span = cluster.q(
            "SELECT count(*), count(DISTINCT subscriber_id),"
            " extract(epoch FROM max(created_at) - min(created_at)) FROM subscription_events WHERE id > %s",
            (last,))[0]
        assert rows == 10 * n and subs == 10, (rows, subs)
        per_event = cluster.q("SELECT count(*) FROM subscription_events WHERE id > %s"
                              " GROUP BY subscriber_id HAVING count(*) <> %s", (last, n))
        assert per_event == [], "some subscriber did not get exactly one row per event: %r" % (per_event,)
        assert cluster.one("SELECT count(*) FROM storyboard_worker.dead_letters WHERE plugin = 'subscription'") == 0
        rate = (n - 1) / float(span) if span else float("inf")
        metrics.add("subscription workload (1 story, 3 tasks, 2 projects, 1 group, 10 subscribers)",
                    "%d events through the broker, worker_count %d: %.0f events/s between the first and "
                    "the last event's transaction (%.0f events/s from the first publish to the last row "
                    "seen)" % (n, cluster.worker_count(), rate, n / (time.time() - t0)))
    finally:
        sbw.unregister(cluster, "subscription")
        cluster.execute("DELETE FROM subscription_events WHERE subscriber_id > %s" % base)
        cluster.execute("DELETE FROM events WHERE id > %s" % base)
