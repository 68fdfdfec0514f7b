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

import g_util
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
        standby = g_util.Standby(services, PGBIN, app_name=APP)
        sb = standby.cluster
        wait_for(lambda: cluster.one("SELECT state FROM pg_stat_replication WHERE application_name = %s",
                                     (APP,), db="postgres") == "streaming", 60, "the standby streaming")
        _set_sync_standby(cluster, APP)
        wait_for(lambda: cluster.one("SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                                     (APP,), db="postgres") == "sync", 30, "the standby synchronous")

        # running: acknowledged, and on the standby
        prefix = sbw.unique("sync")
        msgs, _ = g_util.bulk_messages(50, prefix)
        keys = [g_util.ledger_key(rk, body) for rk, body, _x in msgs]
        g_util.publish_window(services.amqp_url, msgs)
        cluster.wait_seen(prefix, 50, timeout=30)
        g_util.queue_drained(services)
        wait_for(lambda: _on_standby(sb, keys) == 50, 30, "50 ledger rows on the standby")

        # the standby's WAL receiver stopped: commits go on, acknowledgements wait
        walreceiver = sb.one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walreceiver'", db="postgres")
        os.kill(walreceiver, signal.SIGSTOP)
        p2 = sbw.unique("sync")
        msgs2, _ = g_util.bulk_messages(30, p2)
        keys2 = [g_util.ledger_key(rk, body) for rk, body, _x in msgs2]
        g_util.publish_window(services.amqp_url, msgs2)
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

        os.kill(walreceiver, signal.SIGCONT)
        walreceiver = None
        cluster.wait_seen(p2, 30, timeout=30)
        g_util.queue_drained(services)
        wait_for(lambda: _on_standby(sb, keys2) == 30, 30, "30 ledger rows on the standby")
        metrics.add("synchronous standby", "50 events acknowledged and on the standby; WAL receiver stopped: "
                    "%d of 30 events committed on the primary, 0 on the standby, %d acknowledged (queue: %d ready, "
                    "%d unacked; %d committed deliveries held); resumed: 30 acknowledged, 30 on the standby"
                    % (committed, 30 - ready - unacked, ready, unacked, held))
    finally:
        if walreceiver is not None:
            g_util.sigcont_safe(walreceiver)
        _set_sync_standby(cluster, None)
        cluster.dirty = True
        if standby is not None:
            standby.stop()
