"""Acknowledge on WAL flush, and on the synchronous standby.

Each event commits without waiting for the WAL flush; its delivery is
acknowledged only once the WAL holding its commit record is flushed, and,
with synchronous replication, once the standby has it as synchronous_commit
promises.  Here a streaming standby is made synchronous, its WAL receiver is
stopped (SIGSTOP): events still commit on the primary, but none of them is
acknowledged, and none of them is on the standby; once it runs again every
one is acknowledged and on the standby.  A failover to the standby can
therefore never lose an acknowledged event.
"""

import os
import signal
import time

import guarantee_helpers
import sbw
from sbw import wait_for

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
APP = "sbw_sync"


def _set_sync_standby(cluster, names):
    if names is None:
        cluster.execute("ALTER SYSTEM RESET synchronous_standby_names", db="postgres")
    else:
        cluster.execute("ALTER SYSTEM SET synchronous_standby_names = %s", (names,), db="postgres")
    cluster.reload()


def _on_standby(sb, keys):
    return sb.one("SELECT count(*) FROM storyboard_worker.ledger WHERE message_key = ANY(%s::uuid[])", (keys,))


def test_acks_wait_for_the_synchronous_standby(cluster, services, metrics):
    standby = None
    walreceiver = None
    try:
        standby = guarantee_helpers.Standby(services, PGBIN, app_name=APP)
        sb = standby.cluster
        wait_for(lambda: cluster.one("SELECT state FROM pg_stat_replication WHERE application_name = %s",
                                     (APP,), db="postgres") == "streaming", 60, "the standby streaming")
        _set_sync_standby(cluster, APP)
        wait_for(lambda: cluster.one("SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                                     (APP,), db="postgres") == "sync", 30, "the standby synchronous")

        # running: acknowledged, and on the standby
        prefix = sbw.unique("sync")
        msgs, _ = guarantee_helpers.bulk_messages(50, prefix)
        keys = [guarantee_helpers.ledger_key(rk, body) for rk, body, _x in msgs]
        guarantee_helpers.publish_window(services.amqp_url, msgs)
        cluster.wait_seen(prefix, 50, timeout=30)
        guarantee_helpers.queue_drained(services)
        wait_for(lambda: _on_standby(sb, keys) == 50, 30, "50 ledger rows on the standby")

        # the standby's WAL receiver stopped: commits go on, acknowledgements wait
        walreceiver = sb.one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walreceiver'", db="postgres")
        os.kill(walreceiver, signal.SIGSTOP)
        p2 = sbw.unique("sync")
        msgs2, _ = guarantee_helpers.bulk_messages(30, p2)
        keys2 = [guarantee_helpers.ledger_key(rk, body) for rk, body, _x in msgs2]
        guarantee_helpers.publish_window(services.amqp_url, msgs2)
        committed = wait_for(lambda: cluster.seen(p2)[1], 30, "events committed on the primary")
        time.sleep(2)
        committed = cluster.seen(p2)[1]
        ready, unacked, _c = services.queue_counts()
        held = cluster.one("SELECT coalesce(sum(acks_pending), 0) FROM storyboard_worker.stats")
        on_standby_paused = _on_standby(sb, keys2)
        assert committed >= 1
        assert ready + unacked == 30, "acknowledged while the standby had nothing: ready %d unacked %d" \
            % (ready, unacked)
        assert on_standby_paused == 0

        # a cancelled wait for the standby acknowledges nothing it has not confirmed
        cluster.execute("SELECT pg_cancel_backend(pid) FROM storyboard_worker.stats WHERE pid IS NOT NULL")
        time.sleep(1.5)
        ready, unacked, _c = services.queue_counts()
        assert ready + unacked == 30, "acknowledged after pg_cancel_backend: ready %d unacked %d" % (ready, unacked)

        # consumers terminated while waiting exit at once, without acknowledging; their
        # successors find the redelivered messages in the ledger, and acknowledge those
        # duplicates only once the standby has the commits they found
        old_pids = [r[0] for r in cluster.q("SELECT pid FROM storyboard_worker.stats WHERE pid IS NOT NULL")]
        t0 = time.monotonic()
        cluster.execute("SELECT pg_terminate_backend(pid) FROM storyboard_worker.stats WHERE pid IS NOT NULL")
        wait_for(lambda: not any(os.path.exists("/proc/%d" % p) for p in old_pids), 10,
                 "terminated consumers gone while the standby is stopped")
        exit_s = time.monotonic() - t0
        wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.stats WHERE state = 'consuming'")
                 == len(old_pids), 30, "consumers back")
        try:
            wait_for(lambda: cluster.one("SELECT coalesce(sum(messages_duplicates), 0) FROM storyboard_worker.stats")
                     >= committed, 30, "the committed events redelivered and found in the ledger")
        except AssertionError as e:
            raise AssertionError("%s; consumers: %s; queue %s" % (e, cluster.q(
                "SELECT s.worker_id, s.state, s.messages_received, s.messages_processed, s.messages_redelivered,"
                " s.messages_duplicates, s.acks_pending, s.last_error, a.wait_event_type, a.wait_event, a.query"
                " FROM storyboard_worker.stats s LEFT JOIN pg_stat_activity a USING (pid)"), services.queue_counts()))
        time.sleep(1.5)
        ready, unacked, _c = services.queue_counts()
        assert ready + unacked == 30, "a duplicate acknowledged before the standby had the commit it found: " \
            "ready %d unacked %d" % (ready, unacked)

        os.kill(walreceiver, signal.SIGCONT)
        walreceiver = None
        cluster.wait_seen(p2, 30, timeout=30)
        guarantee_helpers.queue_drained(services)
        wait_for(lambda: _on_standby(sb, keys2) == 30, 30, "30 ledger rows on the standby")
        assert cluster.seen(p2) == (30, 30)
        metrics.add("synchronous standby", "50 events acknowledged and on the standby; WAL receiver stopped: "
                    "%d of 30 events committed on the primary, 0 on the standby, %d acknowledged (queue: %d ready, "
                    "%d unacked; %d committed deliveries held); pg_cancel_backend: none acknowledged; "
                    "pg_terminate_backend: consumers gone in %.2f s, their duplicates not acknowledged; "
                    "resumed: 30 acknowledged, 30 on the standby, each applied once"
                    % (committed, 30 - ready - unacked, ready, unacked, held, exit_s))
    finally:
        if walreceiver is not None:
            guarantee_helpers.sigcont_safe(walreceiver)
        _set_sync_standby(cluster, None)
        cluster.dirty = True
        if standby is not None:
            standby.stop()


def _acks(cluster):
    return cluster.q("SELECT coalesce(sum(messages_acked), 0)::bigint, coalesce(sum(acks_pending), 0)::bigint,"
                     " max(ack_wait_p99_ms) FROM storyboard_worker.stats")[0]


def test_dry_queue_flushes_without_waiting_for_the_wal_writer(cluster, services, publisher, metrics):
    """Events published one by one leave each consumer's queue dry after every event: the
    consumer then flushes the WAL up to its newest commit itself and acknowledges, rather
    than wait for the WAL writer.  With the WAL writer all but asleep (wal_writer_delay 10 s,
    wal_writer_flush_after 1 GB) and the database's own synchronous_commit off, every event
    is still acknowledged within a second of its commit (the WAL writer would flush them
    after 10 s: the test cluster runs with fsync off, but the flush position still moves only
    when someone asks for a flush)."""
    try:
        cluster.execute("ALTER SYSTEM SET wal_writer_delay = '10s'", db="postgres")
        cluster.execute("ALTER SYSTEM SET wal_writer_flush_after = '1GB'", db="postgres")
        cluster.execute("ALTER DATABASE %s SET synchronous_commit = off" % sbw.DB, db="postgres")
        cluster.reload()
        # consumers read the database's settings when they start
        old_pids = [r[0] for r in cluster.q("SELECT pid FROM storyboard_worker.stats WHERE pid IS NOT NULL")]
        cluster.execute("SELECT pg_terminate_backend(pid) FROM storyboard_worker.stats WHERE pid IS NOT NULL")
        wait_for(lambda: not any(os.path.exists("/proc/%d" % p) for p in old_pids), 10, "consumers gone")
        wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.stats WHERE state = 'consuming'"
                                     " AND pid <> ALL(%s)", (old_pids,))
                 == cluster.one("SELECT current_setting('storyboard_worker.worker_count')::int"),
                 30, "new consumers consuming")
        acked0, _p, _w = _acks(cluster)
        writes0 = cluster.one("SELECT wal_write FROM pg_stat_wal", db="postgres")
        prefix = sbw.unique("dry")
        for p in sbw.publish.bulk_events(20, prefix):
            publisher.publish(p)
            time.sleep(0.05)
        cluster.wait_seen(prefix, 20, timeout=30)
        t0 = time.monotonic()
        try:
            wait_for(lambda: (a := _acks(cluster)) and a[0] - acked0 >= 20 and a[1] == 0, 10,
                     "20 acknowledgements, none pending")
        except AssertionError as e:
            raise AssertionError("%s; acked before %s; consumers: %s; queue %s" % (e, acked0, cluster.q(
                "SELECT s.worker_id, s.pid, s.state, s.messages_received, s.messages_processed, s.messages_acked,"
                " s.acks_pending, s.last_error, a.wait_event_type, a.wait_event, a.query"
                " FROM storyboard_worker.stats s LEFT JOIN pg_stat_activity a USING (pid)"), services.queue_counts()))
        took = time.monotonic() - t0
        acked, pending, p99 = _acks(cluster)
        ready, unacked, _c = services.queue_counts()
        writes = cluster.one("SELECT wal_write FROM pg_stat_wal", db="postgres") - writes0
        assert (ready, unacked) == (0, 0)
        assert took < 2.0, "acknowledged %.1f s after the last commit: waited for the WAL writer" % took
        assert p99 is not None and p99 < 1000, "commit-to-ack p99 %s ms" % p99
        metrics.add("acks on a dry queue", "20 events one by one, WAL writer at 10 s, database synchronous_commit "
                    "off: all acknowledged %.2f s after the last one was seen, commit-to-ack p99 %.2f ms, %d WAL "
                    "writes" % (took, p99, writes))
    finally:
        cluster.execute("ALTER SYSTEM RESET wal_writer_delay", db="postgres")
        cluster.execute("ALTER SYSTEM RESET wal_writer_flush_after", db="postgres")
        cluster.execute("ALTER DATABASE %s RESET synchronous_commit" % sbw.DB, db="postgres")
        cluster.reload()
        cluster.dirty = True
