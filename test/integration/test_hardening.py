"""Smaller findings of the safety review, each against the real services:

- max_message_bytes is enforced from the frame header: an oversized body is
  never held whole (the consumer's memory does not grow by its size);
- the ledger is pruned under a sustained backlog, not only when idle;
- worker ids are never duplicated when worker_count is lowered and raised
  while a consumer is slow to stop;
- message_id is stored only as valid UTF-8, never cut at a NUL;
- last_error is never cut inside a UTF-8 character;
- a fast shutdown with an unresponsive broker takes a second or two.
"""

import os
import signal
import time

import guarantee_helpers
import sbw
from sbw import wait_for


def _consumer_mem(cluster):
    return {pid: guarantee_helpers.proc_mem(pid) for pid in cluster.consumer_pids()}


def test_oversized_body_never_held_whole(cluster, services, metrics):
    limit = 65536
    cluster.set_gucs(max_message_bytes="64kB")
    wait_for(lambda: cluster.setting("max_message_bytes") == "64kB", 10, "max_message_bytes = 64kB")
    time.sleep(0.5)
    prefix = sbw.unique("big")
    payload = sbw.publish.bulk_events(1, prefix)[0]
    payload["resource_after"]["description"] = "x" * (32 * 1024 * 1024)
    body = sbw.publish.encode(payload)
    for pid in cluster.consumer_pids():      # peak RSS counts from now on
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
    before = _consumer_mem(cluster)
    guarantee_helpers.publish_window(services.amqp_url, [("task", body, {"message_id": prefix + "-big"})])
    row = wait_for(lambda: cluster.q("SELECT length(body), sqlstate, error FROM storyboard_worker.dead_letters "
                                     "WHERE message_id = %s", (prefix + "-big",)), 60, "the dead letter")[0]
    guarantee_helpers.queue_drained(services)
    after = _consumer_mem(cluster)
    growth = max(after[p]["VmHWM"] - before[p]["VmHWM"] for p in before if p in after)
    metrics.add("oversized body", "%d-byte body, max_message_bytes 64kB: dead letter of %d bytes (%s: %s); "
                "largest consumer peak-RSS growth %d kB"
                % (len(body), row[0], row[1], row[2], growth))
    assert row[0] == limit, row
    assert row[1] == "54000"
    assert row[2] == ("message body of %d bytes exceeds storyboard_worker.max_message_bytes (%d); "
                      "only its first %d bytes were read" % (len(body), limit, limit)), row
    assert growth < 16 * 1024, "a consumer's peak RSS grew by %d kB for a %d-byte body" % (growth, len(body))


def test_ledger_pruned_under_a_sustained_backlog(cluster, services, metrics):
    """Consumer 0 prunes when it starts and then every minute, from the same
    check after each drain, backlog or not; before, it pruned only once the
    queue ran dry.  A restarted consumer 0 facing a 1,500-event backlog must
    prune at once."""
    sbw.register(cluster, "slow")
    sbw.set_control(cluster, "slow_ms", 20)
    try:
        cluster.execute("INSERT INTO storyboard_worker.ledger VALUES ('0ddba110-0000-0000-0000-000000000000', "
                        "now() - interval '30 days')")
        prefix = sbw.unique("bl")
        guarantee_helpers.publish_window(services.amqp_url, guarantee_helpers.bulk_messages(1500, prefix)[0])
        # consumer 0 prunes when it starts and then every minute, busy or not
        c0 = [s["pid"] for s in cluster.stats() if s["worker_id"] == 0]
        cluster.execute("SELECT pg_terminate_backend(%s)", (c0[0],), db="postgres")
        gone = wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.ledger "
                                            "WHERE message_key = '0ddba110-0000-0000-0000-000000000000'") == 0
                        and services.queue_counts(), 30, "the old ledger row pruned")
        metrics.add("prune under backlog", "old ledger row pruned while the queue held %d ready, %d unacked"
                    % (gone[0], gone[1]))
        assert gone[0] > 0, "the queue was already drained: not a backlog"
    finally:
        sbw.set_control(cluster, "slow_ms", 0)
        guarantee_helpers.queue_drained(services, timeout=120)
        sbw.unregister(cluster, "slow")


def test_worker_ids_never_duplicated(cluster, services, pglog, metrics):
    """worker_count 1 -> 0 -> 1 while consumer 0 sits in a plugin that
    holds interrupts for 4 s: the new consumer 0 must wait for the old one."""
    cluster.execute("CREATE EXTENSION IF NOT EXISTS sbw_test_plugins")
    cluster.execute("SELECT storyboard_worker.register_plugin('deaf', "
                    "'sbw_test_plugins.deaf(storyboard_worker.event)')")
    cluster.set_gucs(worker_count=1)
    cluster.wait_consuming(1)
    try:
        prefix = sbw.unique("wid")
        p = sbw.publish.bulk_events(1, prefix)[0]
        p["query_string"] = "key=%s-deaf-4000" % prefix
        mark = pglog.mark()
        guarantee_helpers.publish_window(services.amqp_url, [("task", sbw.publish.encode(p), None)])
        wait_for(lambda: pglog.grep(mark, "sbw_test_plugins: deaf for 4000 ms"), 10, "consumer 0 in the plugin")
        old = cluster.consumer_pids()
        cluster.set_gucs(worker_count=0)
        wait_for(lambda: pglog.grep(mark, "asks consumer 0 to stop"), 10, "the launcher asking consumer 0 to stop")
        cluster.set_gucs(worker_count=1)
        most = 0
        t_end = time.monotonic() + 7
        while time.monotonic() < t_end:
            names = [r[0] for r in cluster.q("SELECT application_name FROM pg_stat_activity "
                                             "WHERE backend_type = %s", (sbw.CONSUMER,), db="postgres")]
            most = max(most, len(names))
            time.sleep(0.05)
        cluster.wait_consuming(1, timeout=30)
        cluster.wait_seen(prefix, 1, timeout=30)
        metrics.add("worker ids", "worker_count 1 -> 0 -> 1 with consumer 0 deaf for 4 s: at most %d consumer "
                    "process(es) at once" % most)
        assert most == 1, "two consumers with the same worker id ran at once"
        assert cluster.consumer_pids() != old, "the deaf consumer was never replaced"
        assert cluster.seen(prefix) == (1, 1)
    finally:
        sbw.unregister(cluster, "deaf")


def test_message_ids_kept_whole_and_valid(cluster, services, metrics):
    """AMQP short strings are bytes: a message_id with a NUL or invalid UTF-8
    is stored as \\x + hex (never cut, never invalid text), and two ids that
    differ only after a NUL are two messages."""
    prefix = sbw.unique("mid")
    msgs, _ = guarantee_helpers.bulk_messages(2, prefix)
    ids = [b"same\x00one", b"same\x00two", b"bad\xff\xfe-" + prefix.encode(), ("ünï-" + prefix).encode()]
    out = [(msgs[0][0], msgs[0][1], {"message_id": ids[0]}),
           (msgs[1][0], msgs[1][1], {"message_id": ids[1]}),
           ("task", b"not json " + prefix.encode(), {"message_id": ids[2]}),
           ("task", b"not json either " + prefix.encode(), {"message_id": ids[3]})]
    guarantee_helpers.publish_window(services.amqp_url, out)
    cluster.wait_seen(prefix, 2, timeout=30)
    dl = wait_for(lambda: len(r := cluster.q(
        "SELECT message_id FROM storyboard_worker.dead_letters WHERE position(convert_to(%s, 'UTF8') in body) > 0 "
        "ORDER BY id", (prefix,))) == 2 and r, 30, "2 dead letters")
    keys = cluster.q("SELECT count(*) FROM storyboard_worker.ledger WHERE message_key = ANY(%s::uuid[])",
                     ([guarantee_helpers.ledger_key(None, None, i) for i in ids[:2]],))[0][0]
    metrics.add("message ids", "NUL and invalid UTF-8 ids stored as %r; ids differing after a NUL: %d ledger rows"
                % ([r[0] for r in dl], keys))
    assert sorted(r[0] for r in dl) == sorted(["\\x" + ids[2].hex(), ids[3].decode()]), dl
    assert keys == 2
    assert cluster.seen(prefix) == (2, 2)


def test_last_error_cut_at_a_character_boundary(cluster, services, metrics):
    # the refusal text, 'login to 127.0.0.1:PORT as "üü...', is longer than the
    # 255 bytes of the slot; one ASCII byte of padding if needed puts the cut
    # in the middle of a 2-byte character
    prefix = 'login to 127.0.0.1:%d as "' % services.amqp_port
    pad = "a" if (255 - len(prefix)) % 2 == 0 else ""
    user = pad + "ü" * 150
    cluster.set_gucs(rabbit_userid=user)
    try:
        st = wait_for(lambda: (s := cluster.stats()) and all(x["last_error"] and user[:20] in x["last_error"]
                                                            for x in s) and s, 30, "refused logins")
        assert all(s["last_error"].startswith(prefix) for s in st), st
        errs = [s["last_error"] for s in st]     # psycopg2 decodes them: invalid UTF-8 would raise
        metrics.add("last_error", "%d-byte error texts stored in %s bytes, valid UTF-8"
                    % (len(("login as " + user).encode()), sorted({len(e.encode()) for e in errs})))
        assert all(len(e.encode()) <= 255 for e in errs), errs
    finally:
        cluster.restore_gucs()
        cluster.wait_consuming(timeout=60)


def test_fast_shutdown_with_a_silent_broker(cluster, services, metrics):
    """The broker stops answering (SIGSTOP): a fast shutdown still takes at
    most a couple of seconds (connection.close waits at most 1 s)."""
    beam = int(services.state.get("RMQ_BEAM_PID") or open(os.path.join(services.dir, "rmq", "beam.pid")).read())
    os.kill(beam, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        services.pg_stop()
        took = time.monotonic() - t0
    finally:
        guarantee_helpers.sigcont_safe(beam)
    services.pg_start()
    cluster.reset_connections()
    cluster.wait_consuming(timeout=60)
    metrics.add("shutdown, silent broker", "fast shutdown took %.2fs" % took)
    assert took < 3, "fast shutdown with a silent broker took %.1fs" % took


def test_unicode_escape_the_database_encoding_cannot_hold(cluster, metrics):
    """In a LATIN1 database PostgreSQL's JSON parser raises converting a \\u
    escape with no LATIN1 equivalent (StoryBoard escapes every non-ASCII
    character): the body is a dead letter with that error, not an error of
    process_event (which a consumer would requeue until max_redeliveries);
    an escape LATIN1 holds decodes."""
    db = "sbw_t_latin1"
    cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % db, db="postgres")
    cluster.execute("CREATE DATABASE \"%s\" ENCODING 'LATIN1' TEMPLATE template0 "
                    "LC_COLLATE 'C' LC_CTYPE 'C'" % db, db="postgres")
    try:
        cluster.execute("CREATE EXTENSION storyboard_worker", db=db)
        body = '{"resource":"task","method":"PUT","url":"/t/\\u4e2d"}'
        rows = cluster.q("SELECT plugin, succeeded, sqlstate, error "
                         "FROM storyboard_worker.process_event(%s, 'task')", (body,), db=db)
        assert len(rows) == 1 and rows[0][0] is None and rows[0][1] is False, rows
        assert rows[0][2] == "22P05", rows
        assert "cannot be decoded in this database's encoding" in rows[0][3], rows
        kept = cluster.q("SELECT sqlstate, convert_from(body, 'UTF8') FROM storyboard_worker.dead_letters",
                         db=db)
        assert kept == [("22P05", body)], kept
        ok = '{"resource":"task","method":"PUT","url":"/t/\\u00e9"}'
        rows = cluster.q("SELECT plugin, succeeded FROM storyboard_worker.process_event(%s, 'task')",
                         (ok,), db=db)
        assert all(r[1] is not False for r in rows), rows
        assert cluster.one("SELECT count(*) FROM storyboard_worker.dead_letters", db=db) == 1
        metrics.add("LATIN1 database", "a \\u escape LATIN1 cannot hold: dead letter 22P05; one it holds: decoded")
    finally:
        cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % db, db="postgres")
