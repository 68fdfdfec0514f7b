"""Soak: many small events through one consumer; its memory must stay flat.

200,000 events, as the issue asks (about 40 s here: ~6,000 events/s);
SBW_SOAK_EVENTS=N runs another number (SBW_SOAK=0: 20,000).  One consumer
(worker_count = 1), one trivial plugin (sbw_g.count: one small row per
event) instead of the harness's 'record'.  The events are published from a
thread with a window of publisher confirms while the consumer drains them;
/proc/<pid>/status of the consumer is sampled every second.

The figure that must stay flat is RssAnon (the process's private memory:
palloc, librabbitmq, json-c).  VmRSS also counts the shared buffers the
process has touched (RssShmem), which grows towards shared_buffers as the
tables grow and is not a leak; it is reported, not asserted.
"""

import os
import threading
import time

import guarantee_helpers
import sbw
from sbw import wait_for

if os.environ.get("SBW_SOAK_EVENTS"):
    SOAK_N = int(os.environ["SBW_SOAK_EVENTS"])
elif os.environ.get("SBW_SOAK") == "0":
    SOAK_N = 20000
else:
    SOAK_N = 200000
MAX_ANON_GROWTH_KB = 5 * 1024


def _small_events(n, prefix):
    out = []
    for i in range(n):
        p = sbw.publish.event_body("story", author_id=1 + i % 3, method="POST", url=sbw.publish.WEBCLIENT_URL,
                                   path="/v1/stories", query_string="key=%s-%d" % (prefix, i), status=201,
                                   resource_id=i + 1, resource_after={"id": i + 1, "title": "soak %d" % i})
        out.append((p["resource"], sbw.publish.encode(p), None))
    return out


def test_soak_one_consumer_memory_flat(cluster, services, metrics):
    n = SOAK_N
    guarantee_helpers.setup_g(cluster)
    cluster.set_gucs(worker_count=1)
    wait_for(lambda: len(cluster.consumer_pids()) == 1, 30, "one consumer")
    cluster.wait_consuming(1, timeout=30)
    pid = cluster.consumer_pids()[0]
    guarantee_helpers.declare_queue(services.amqp_url)
    sbw.unregister(cluster, "record")
    guarantee_helpers.register_g(cluster, "count")
    prefix = sbw.unique("soak")
    msgs = _small_events(n, prefix)
    body_bytes = sum(len(m[1]) for m in msgs) / len(msgs)
    p0 = int(cluster.stats()[0]["messages_processed"])
    soak_start = cluster.one("SELECT clock_timestamp()")
    pub = {}

    def publish():
        try:
            pub["secs"] = guarantee_helpers.publish_window(services.amqp_url, msgs, window=1000, timeout=600)
        except Exception as e:     # reported by the main thread
            pub["error"] = e
    samples = []    # (seconds, processed, mem)
    t0 = time.monotonic()
    th = threading.Thread(target=publish, daemon=True)
    th.start()
    try:
        deadline = t0 + max(120, n / 200.0)
        while True:
            st = cluster.stats()
            assert st and st[0]["pid"] == pid, "the consumer changed: %r" % st
            done = int(st[0]["messages_processed"]) - p0
            samples.append((time.monotonic() - t0, done, guarantee_helpers.proc_mem(pid)))
            if done >= n:
                break
            assert "error" not in pub, "publishing failed: %r" % pub.get("error")
            assert time.monotonic() < deadline, "only %d of %d events processed after %.0fs" \
                % (done, n, time.monotonic() - t0)
            time.sleep(1.0)
        secs = time.monotonic() - t0
        th.join(60)
        guarantee_helpers.queue_drained(services, timeout=60)
        rows = cluster.q("SELECT count(*), count(DISTINCT key) FROM sbw_g.soak WHERE key LIKE %s",
                         ("key=%s-%%" % prefix,))[0]
        assert tuple(rows) == (n, n), "applied %r of %d" % (rows, n)
        assert cluster.consumer_pids() == [pid]

        base = next(s for s in samples if s[1] >= n // 10)
        end = samples[-1]
        growth = end[2]["RssAnon"] - base[2]["RssAnon"]
        vm_growth = end[2]["VmRSS"] - base[2]["VmRSS"]
        peak = max(s[2]["RssAnon"] for s in samples)
        figure = ("%d events (%.0f-byte bodies) through 1 consumer in %.1fs (%.0f/s; publishing %.1fs), "
                  "%d samples; RssAnon %d kB at 10%% -> %d kB at the end (growth %+d kB, peak %d kB); "
                  "VmRSS %d -> %d kB (%+d kB; RssShmem %d -> %d kB, shared buffers touched)"
                  % (n, body_bytes, secs, n / secs, pub.get("secs", -1), len(samples),
                     base[2]["RssAnon"], end[2]["RssAnon"], growth, peak,
                     base[2]["VmRSS"], end[2]["VmRSS"], vm_growth,
                     base[2]["RssShmem"], end[2]["RssShmem"]))
        metrics.add("soak", figure)
        curve = " ".join("%d:%d" % (s[1], s[2]["RssAnon"]) for s in samples[:: max(1, len(samples) // 12)])
        metrics.add("soak RssAnon curve (events:kB)", curve)
        assert growth < MAX_ANON_GROWTH_KB, "private memory grew by %d kB: %s" % (growth, figure)
    finally:
        th.join(1)
        sbw.unregister(cluster, "count")
        sbw.register(cluster, "record")
        cluster.execute("TRUNCATE sbw_g.soak")
        # this run's ledger rows (every event is acknowledged by now)
        cluster.execute("DELETE FROM storyboard_worker.ledger WHERE processed_at >= %s", (soak_start,))
