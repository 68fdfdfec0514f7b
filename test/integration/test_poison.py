"""Poison messages end in dead_letters, never in a loop.

A plugin's deferred constraint is checked inside its own subtransaction: its
violation is that plugin's dead letter.  A message whose transaction cannot
commit, or that crashes the backend (and with it the whole cluster), comes
back redelivered; its attempts are counted in storyboard_worker.redeliveries
(committed and flushed before its plugins run) and after
storyboard_worker.max_redeliveries it is dead-lettered without running any
plugin (SQLSTATE SB002), then acknowledged.  Every other message is applied
exactly once, and in batch mode a batch that cannot commit runs again one
event at a time.

The misbehaving C plugins are test/plugins (extension sbw_test_plugins).
"""

import time

import pytest

import guarantee_helpers
import sbw
from sbw import wait_for

DEFERRED_SQL = r"""
CREATE SCHEMA IF NOT EXISTS sbw_p;
CREATE TABLE IF NOT EXISTS sbw_p.parent (id int PRIMARY KEY);
CREATE TABLE IF NOT EXISTS sbw_p.child (key text, parent_id int
	REFERENCES sbw_p.parent DEFERRABLE INITIALLY DEFERRED);
-- 'orphan': inserts the child before its parent, as deferred constraints
-- allow; for an event keyed '...-orphan' the parent never comes
CREATE OR REPLACE FUNCTION sbw_p.orphan(e storyboard_worker.event) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	pid int := nextval('sbw_p.ids');
BEGIN
	INSERT INTO sbw_p.child VALUES (e.query_string, pid);
	IF e.query_string NOT LIKE '%-orphan' THEN
		INSERT INTO sbw_p.parent VALUES (pid);
	END IF;
END $$;
CREATE SEQUENCE IF NOT EXISTS sbw_p.ids;
"""


def _register_c_plugin(cluster, name, function):
    """Register one of test/plugins' misbehaving C functions as plugin 'name'."""
    cluster.execute("CREATE EXTENSION IF NOT EXISTS sbw_test_plugins")
    cluster.execute("SELECT storyboard_worker.register_plugin(%s, %s::regprocedure)",
                    (name, "sbw_test_plugins.%s(storyboard_worker.event)" % function))


def _poison_dead_letters(cluster, needle):
    return cluster.q("SELECT plugin, sqlstate, error FROM storyboard_worker.dead_letters "
                     "WHERE position(convert_to(%s, 'UTF8') in body) > 0 AND sqlstate = 'SB002'", (needle,))


def _messages_with(prefix, n, poison_index, marker):
    msgs, payloads = guarantee_helpers.bulk_messages(n, prefix)
    p = payloads[poison_index]
    p["query_string"] = "key=%s-%s" % (prefix, marker)
    msgs[poison_index] = (p["resource"], sbw.publish.encode(p), None)
    return msgs


@pytest.mark.parametrize("batch_size", [1, 5])
def test_deferred_fk_broken_by_a_plugin_is_its_dead_letter(cluster, services, batch_size, metrics):
    """A deferred foreign key a plugin breaks: that plugin's dead letter
    (23503), the other plugin's work committed, the message acknowledged
    once, nothing requeued, the consumers alive."""
    cluster.execute(DEFERRED_SQL)
    cluster.execute("SELECT storyboard_worker.register_plugin('orphan', 'sbw_p.orphan(storyboard_worker.event)')")
    cluster.set_gucs(batch_size=batch_size)
    pids = cluster.consumer_pids()
    base = guarantee_helpers.CounterBase(cluster)
    try:
        prefix = sbw.unique("fk")
        msgs = _messages_with(prefix, 10, 4, "orphan")
        guarantee_helpers.publish_window(services.amqp_url, msgs)
        wait_for(lambda: cluster.seen(prefix) == (10, 10), 30, "10 events recorded")
        guarantee_helpers.queue_drained(services)
        dl = cluster.q("SELECT plugin, sqlstate, error FROM storyboard_worker.dead_letters "
                       "WHERE position(convert_to(%s, 'UTF8') in body) > 0", ('"key=%s-' % prefix,))
        children = cluster.one("SELECT count(*) FROM sbw_p.child WHERE key LIKE %s", ("key=%s-%%" % prefix,))
        d = base.delta()
        metrics.add("deferred FK broken by a plugin (batch_size %d)" % batch_size,
                    "dead letters %r; record applied %r; orphan's committed children %d of 9; redelivered %d"
                    % (dl, cluster.seen(prefix), children, d["messages_redelivered"]))
        assert len(dl) == 1 and dl[0][:2] == ("orphan", "23503"), dl
        assert "violates foreign key constraint" in dl[0][2], dl
        assert children == 9
        assert d["messages_redelivered"] == 0, d
        assert cluster.consumer_pids() == pids
    finally:
        sbw.unregister(cluster, "orphan")


def test_commit_failure_requeued_then_applied_once_fixed(cluster, services, pglog, metrics):
    """A transaction that fails at COMMIT (a C plugin's pre-commit callback)
    is never acknowledged: requeued, counted, retried; once the cause is
    fixed it is applied once and its count is gone."""
    cluster.execute("CREATE EXTENSION IF NOT EXISTS sbw_test_plugins")
    cluster.execute(DEFERRED_SQL)
    # the C plugin, while control.fail_commits is 'on' (the cause not fixed yet)
    cluster.execute("CREATE OR REPLACE FUNCTION sbw_p.commitfail_while_on(e storyboard_worker.event) "
                    "RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
                    "IF (SELECT value FROM sbw_test.control WHERE name = 'fail_commits') = 'on' THEN "
                    "PERFORM sbw_test_plugins.fail_at_commit(e); END IF; END $$")
    sbw.set_control(cluster, "fail_commits", "on")
    cluster.execute("SELECT storyboard_worker.register_plugin('commitfail', "
                    "'sbw_p.commitfail_while_on(storyboard_worker.event)')")
    cluster.set_gucs(max_redeliveries=100)
    mark = pglog.mark()
    try:
        prefix = sbw.unique("cf")
        msgs = _messages_with(prefix, 3, 1, "commit-fail")
        guarantee_helpers.publish_window(services.amqp_url, msgs)
        # (repeated failures are logged once a minute: count them in the table)
        counted = wait_for(lambda: (cluster.one("SELECT max(attempts) FROM storyboard_worker.redeliveries")
                                    or 0) >= 3 and cluster.one("SELECT max(attempts) FROM "
                                                               "storyboard_worker.redeliveries"),
                           60, "3 counted redeliveries")
        assert cluster.seen(prefix) == (2, 2)
        assert guarantee_helpers.dead_letters_like(cluster, '"key=%s-' % prefix) == 0
        sbw.set_control(cluster, "fail_commits", "off")
        wait_for(lambda: cluster.seen(prefix) == (3, 3), 60, "the event applied once fixed")
        guarantee_helpers.queue_drained(services)
        time.sleep(1)
        red = cluster.one("SELECT redelivered FROM sbw_test.seen WHERE key = %s", ("key=%s-commit-fail" % prefix,))
        left = cluster.one("SELECT count(*) FROM storyboard_worker.redeliveries")
        failures = len(pglog.grep(mark, "fails at COMMIT on purpose"))
        metrics.add("failed COMMIT", "failed commits requeued and counted (%s redeliveries counted, %d logged), "
                    "then applied once (redelivered %s); counts left %d" % (counted, failures, red, left))
        assert cluster.seen(prefix) == (3, 3)
        assert red is True and counted >= 2 and left == 0
    finally:
        sbw.set_control(cluster, "fail_commits", "off")
        sbw.unregister(cluster, "commitfail")


def test_commit_failure_in_a_batch_is_isolated_and_given_up_on(cluster, services, pglog, metrics):
    """batch_size 20: the batch holding the poison cannot commit, runs again
    one event at a time, every healthy event is applied once; the poison is
    dead-lettered unrun after max_redeliveries failures, and acknowledged."""
    _register_c_plugin(cluster, "commitfail", "fail_at_commit")
    cluster.set_gucs(batch_size=20, max_redeliveries=3)
    pids = cluster.consumer_pids()
    mark = pglog.mark()
    try:
        prefix = sbw.unique("cb")
        msgs = _messages_with(prefix, 60, 25, "commit-fail")
        t0 = time.monotonic()
        guarantee_helpers.publish_window(services.amqp_url, msgs)
        wait_for(lambda: cluster.seen(prefix) == (59, 59) and _poison_dead_letters(cluster, "commit-fail"),
                 90, "59 events applied and the poison given up on")
        guarantee_helpers.queue_drained(services)
        took = time.monotonic() - t0
        (plugin, state, error), = _poison_dead_letters(cluster, '"key=%s-commit-fail"' % prefix)
        failures = len(pglog.grep(mark, "fails at COMMIT on purpose"))
        one_at_a_time = pglog.grep(mark, "one at a time")
        poison_key = guarantee_helpers.ledger_key(msgs[25][0], msgs[25][1])
        acked = cluster.one("SELECT count(*) FROM storyboard_worker.ledger WHERE message_key = %s", (poison_key,))
        metrics.add("COMMIT failure in a batch", "60 events, batch_size 20: 59 applied once, the poison failed "
                    "at COMMIT %d times and was dead-lettered (%s: %s) in %.1fs; %d batch(es) rerun one at a time"
                    % (failures, state, error, took, len(one_at_a_time)))
        assert (plugin, state) == (None, "SB002")
        assert error.startswith("crashed or failed at commit 3 times"), error
        assert error.endswith("the last attempt failed: sbw_test_plugins: this transaction fails at COMMIT "
                              "on purpose"), error
        assert failures <= 3 + 1, "more failed commits than max_redeliveries allows: %d" % failures
        assert one_at_a_time, "the failed batch was not run again one event at a time"
        assert acked == 1, "the poison is not in the ledger (not acknowledged as processed)"
        assert cluster.one("SELECT count(*) FROM storyboard_worker.redeliveries") == 0
        assert cluster.consumer_pids() == pids
    finally:
        sbw.unregister(cluster, "commitfail")


@pytest.mark.crashes_expected
def test_crashing_plugin_poison_dead_lettered(cluster, services, pglog, metrics):
    """A C plugin that segfaults on one event among 300: PostgreSQL restarts
    the whole cluster each time; after max_redeliveries crashes the event is
    dead-lettered unrun, every other event is applied exactly once, and the
    queue drains."""
    _register_c_plugin(cluster, "crash", "crash")
    cluster.set_gucs(max_redeliveries=3)
    mark = pglog.mark()
    try:
        prefix = sbw.unique("sg")
        msgs = _messages_with(prefix, 300, 150, "crash-me")
        t0 = time.monotonic()
        guarantee_helpers.publish_window(services.amqp_url, msgs)
        wait_for(lambda: cluster.seen(prefix)[1] >= 299 and _poison_dead_letters(cluster, "crash-me"),
                 180, "299 events applied and the poison given up on")
        guarantee_helpers.queue_drained(services, timeout=60)
        took = time.monotonic() - t0
        time.sleep(1)
        rows, keys = cluster.seen(prefix)
        crashes = pglog.grep(mark, r"terminated by signal 11")
        (plugin, state, error), = _poison_dead_letters(cluster, '"key=%s-crash-me"' % prefix)
        metrics.add("crashing plugin", "300 events, one segfaults its backend: %d cluster restarts, then "
                    "dead-lettered (%s: %s); %d rows / %d distinct of the other 299; drained %.1fs after "
                    "publishing began" % (len(crashes), state, error, rows, keys, took))
        assert (plugin, state) == (None, "SB002")
        assert error.startswith("crashed or failed at commit 3 times"), error
        assert error.endswith("the last attempt ended its process (a crash?)"), error
        assert 1 <= len(crashes) <= 3, crashes
        assert (rows, keys) == (299, 299), "events lost or applied twice"
        assert cluster.one("SELECT count(*) FROM sbw_test.seen WHERE key = %s",
                           ("key=%s-crash-me" % prefix,)) == 0
    finally:
        sbw.unregister(cluster, "crash")
