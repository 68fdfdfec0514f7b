#!/usr/bin/python3
"""bench/report.py RESULTS.json BENCHMARKS.md PLOT.png

Turns bench/bench.py's raw results into the report: tables of throughput
with their ratios to the ceilings and to the StoryBoard-style baseline, the
targets of the benchmark issue with pass/miss, latency, idle CPU, memory,
and a plot of throughput against worker_count.
"""

import json
import os
import sys

TARGETS = {
    "noop_ceiling": 0.8,
    "noop_sync_pgbench": 1.0,      # one transaction per event vs pgbench, synchronous commit
    "noop_async_pgbench": 0.6,     # ... vs pgbench with synchronous_commit = off
    "consumer_cpu": 1.3,           # consumer CPU per event / pgbench backend CPU per transaction
    "p99_ack_ms": 50.0,
    "sub_ceiling": 0.7,
    "baseline": 20.0,
    "p99_ms": 10.0,
    "idle_cpu_percent": 0.1,     # per consumer, "about zero"
    "rss_growth_kib": 256,       # per consumer, within a run once warm
}


def fmt(x, nd=0):
    if x is None:
        return "–"
    if isinstance(x, float):
        return "{:,.{}f}".format(x, nd)
    return "{:,}".format(x)


def ratio(a, b):
    if a is None or not b:
        return None
    return a / b


def r2(x):
    return "–" if x is None else "%.2f×" % x


def verdict(ok):
    return "**met**" if ok else "**missed**"


def index(runs):
    by = {}
    for r in runs:
        key = (r["kind"], r.get("workload"), r.get("workers"))
        by[key] = r
    return by


def ext_rate(r):
    return r.get("rate") if r else None


def profile_us(run, *syms, minus=()):
    """Inclusive µs per event of the first of syms found in a profile run (minus others)."""
    us = (run.get("cpu", {}).get("us_per_event") or {}).get("consumers")
    inc = run.get("inclusive") or {}
    v = next((inc[s] for s in syms if s in inc), None)
    if us is None or v is None:
        return None
    return us * (v - sum(inc.get(m, 0.0) for m in minus)) / 100.0


def before_after(A, res_path, profs):
    """What each change of 1.3 saved: the no-op profile of 1.2 (bench/results-1.2.json, made
    on this machine from the 1.2 sources) beside this run's."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results-1.2.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    o = next((r for r in old["runs"] if r["kind"] == "profile" and r["workload"] == "noop"), None)
    n = next((r for r in profs if r["workload"] == "noop" and not r.get("reads_author")), None)
    na = next((r for r in profs if r["workload"] == "noop" and r.get("reads_author")), None)
    if not (o and n):
        return
    rows = [
        ("COMMIT and its WAL flush: synchronous in 1.2; in 1.3 asynchronous, with one flush per turn "
         "for every commit since (`sbw_commit_async` + `sbw_acks_send`)",
         profile_us(o, "CommitTransactionCommand"),
         (profile_us(n, "sbw_commit_async") or 0) + (profile_us(n, "sbw_acks_send") or 0)),
        ("ledger key: SHA-256 as `bytea` with a text prefix → 16 bytes as `uuid` (`sbw_ledger_key`)",
         profile_us(o, "sbw_ledger_key"), profile_us(n, "sbw_ledger_key")),
        ("ledger claim, INSERT … ON CONFLICT DO NOTHING on that key (`sbw_ledger_claim`)",
         profile_us(o, "sbw_ledger_claim"), profile_us(n, "sbw_ledger_claim")),
        ("author lookup and its subtransaction: always in 1.2; in 1.3 only when a registered plugin reads "
         "`event.author` (`sbw_build_event_guarded` − `jsonb_in`; the *author read* run in brackets)",
         profile_us(o, "sbw_build_event_guarded", minus=("jsonb_in",)),
         profile_us(n, "sbw_build_event_guarded", minus=("jsonb_in",))),
        ("calling the plugin without the plugin itself: subtransaction, role switch, settings level, "
         "deferred constraints (`sbw_call_plugin` − `plpgsql_exec_function`)",
         profile_us(o, "sbw_call_plugin", minus=("plpgsql_exec_function",)),
         profile_us(n, "sbw_call_plugin", minus=("plpgsql_exec_function",))),
        ("decoding the body, unchanged code (`sbw_decode_event`)",
         profile_us(o, "sbw_decode_event"), profile_us(n, "sbw_decode_event")),
    ]
    A("What each change of 1.3 saves, no-op workload, µs of one consumer's CPU per event: the same "
      "profile run of 1.2 (`bench/results-1.2.json`: %s) beside this run's. The 1.2 figures include the cost "
      "of cache misses after every fdatasync (the unchanged decoder shows how much)." % old.get("note", "1.2"))
    A("")
    A("| step | 1.2 | 1.3 |")
    A("|---|---|---|")
    A("| consumer CPU per event (`/proc`, under perf) | %s µs | %s µs |"
      % (fmt((o["cpu"].get("us_per_event") or {}).get("consumers")),
         fmt((n["cpu"].get("us_per_event") or {}).get("consumers"))))
    for label, a, b in rows:
        extra = ""
        if na is not None and label.startswith("author"):
            extra = " (%.1f µs)" % (profile_us(na, "sbw_build_event_guarded", minus=("jsonb_in",)) or 0)
        A("| %s | %s | %s%s |" % (label, "–" if a is None else "%.1f µs" % a,
                                  "–" if b is None else "%.1f µs" % b, extra))
    A("")


def main():
    res_path, md_path, png_path = sys.argv[1:4]
    res = json.load(open(res_path))
    runs = res["runs"]
    by = index(runs)
    cfg = res["config"]
    ws = cfg["workers"]
    m = res.get("machine", {})
    workloads = cfg["workloads"]

    rows = {}   # (workload, W) -> dict of numbers
    for wl in workloads:
        for w in ws:
            ext = by.get(("ext", wl, w))
            amqp = by.get(("amqp", "any", w))
            pgb = by.get(("pgbench", wl, w))
            pga = by.get(("pgbench_async", wl, w))
            base = by.get(("baseline", wl, w))
            d = {"ext": ext_rate(ext), "steady": ext.get("steady_rate") if ext else None,
                 "acked": ext.get("rate_acked") if ext else None,
                 "amqp": amqp.get("rate_from_start") if amqp else None,
                 "pgbench": pgb.get("rate") if pgb else None,
                 "pgbench_async": pga.get("rate") if pga else None,
                 "baseline": base.get("rate") if base else None,
                 "dead": ext.get("dead_letters") if ext else None,
                 "other": max([x.get("cpu", {}).get("other_cores", 0) for x in (ext, amqp if wl == "noop" else None, pgb, base) if x] or [0]),
                 "error": (ext or {}).get("error")}
            if wl == "noop":
                ceil = [x for x in (d["amqp"], d["pgbench"]) if x]
                d["ceiling"] = min(ceil) if ceil else None
            else:
                d["ceiling"] = d["pgbench"]
            d["r_ceiling"] = ratio(d["ext"], d["ceiling"])
            d["r_sync"] = ratio(d["ext"], d["pgbench"])
            d["r_async"] = ratio(d["ext"], d["pgbench_async"])
            d["r_baseline"] = ratio(d["ext"], d["baseline"])
            rows[(wl, w)] = d

    def best(wl, key):
        cands = [(rows[(wl, w)][key], w) for w in ws if rows.get((wl, w), {}).get(key)]
        return max(cands) if cands else (None, None)

    targets = []
    if "noop" in workloads:
        rate, w = best("noop", "ext")
        d = rows.get(("noop", w), {})
        rr = d.get("r_ceiling")
        targets.append(("No-op plugin ≥ 0.8 × min(AMQP ceiling, pgbench ceiling) at the best worker_count",
                        "%s ev/s at W=%s vs min(%s, %s) = %s" % (fmt(rate), w, fmt(d.get("amqp")),
                                                               fmt(d.get("pgbench")), fmt(d.get("ceiling"))),
                        r2(rr), rr is not None and rr >= TARGETS["noop_ceiling"]))
        rr = d.get("r_sync")
        targets.append(("No-op plugin, batch_size 1 (one transaction per event) ≥ 1.0 × the pgbench ceiling "
                        "(same SQL, same clients, synchronous commit) at the best worker_count",
                        "%s ev/s at W=%s (every event acknowledged: %s ev/s) vs pgbench %s tps"
                        % (fmt(rate), w, fmt(d.get("acked")), fmt(d.get("pgbench"))),
                        r2(rr), rr is not None and rr >= TARGETS["noop_sync_pgbench"]))
        rr = d.get("r_async")
        amqp_r = ratio(d.get("amqp"), d.get("pgbench_async"))
        targets.append(("No-op plugin ≥ 0.6 × the pgbench ceiling with synchronous_commit = off",
                        "%s ev/s at W=%s vs pgbench (async) %s tps; the bare AMQP consume-and-ack loop alone "
                        "(no database work) reaches %s msg/s, %s of that ceiling, and storyboard_worker %s of it"
                        % (fmt(rate), w, fmt(d.get("pgbench_async")), fmt(d.get("amqp")), r2(amqp_r),
                           r2(ratio(rate, d.get("amqp")))),
                        r2(rr), rr is not None and rr >= TARGETS["noop_async_pgbench"]))
        ext = by.get(("ext", "noop", w))
        pgb = by.get(("pgbench", "noop", w))
        ue = (ext or {}).get("cpu", {}).get("us_per_event", {})
        up = (pgb or {}).get("cpu", {}).get("us_per_event", {})
        if ue.get("consumers") and up.get("pg"):
            rr = ue["consumers"] / up["pg"]
            targets.append(("Consumer CPU per event ≤ 1.3 × pgbench's backend CPU per transaction (no-op)",
                            "%s µs per event at W=%s vs %s µs per transaction" % (fmt(ue["consumers"]), w,
                                                                                 fmt(up["pg"])),
                            r2(rr), rr <= TARGETS["consumer_cpu"]))
    if "subscription" in workloads:
        rate, w = best("subscription", "ext")
        d = rows.get(("subscription", w), {})
        rr = d.get("r_ceiling")
        targets.append(("Subscription workload ≥ 0.7 × its pgbench ceiling",
                        "%s ev/s at W=%s vs pgbench %s tps" % (fmt(rate), w, fmt(d.get("pgbench"))),
                        r2(rr), rr is not None and rr >= TARGETS["sub_ceiling"]))
    for wl in workloads:
        rate, w = best(wl, "ext")
        brate, bw = best(wl, "baseline")
        rr = ratio(rate, brate)
        targets.append(("≥ 20 × the StoryBoard-style baseline (%s workload, best W of each)" % wl,
                        "%s ev/s (W=%s) vs baseline %s ev/s (W=%s)" % (fmt(rate), w, fmt(brate, 1), bw),
                        "%.1f×" % rr if rr else "–", rr is not None and rr >= TARGETS["baseline"]))
    lat = [r for r in runs if r["kind"] == "latency"]
    for wl in workloads:
        mine = [r for r in lat if r["workload"] == wl]
        if not mine:
            continue
        head = ([r for r in mine if r.get("basis", "concurrent") == "concurrent"] or mine)[0]
        others = [r for r in mine if r is not head and r.get("basis") != "paced peak probe"]
        probe = ([r for r in mine if r.get("basis") == "paced peak probe"] or [None])[0]
        conc = by.get(("ext_concurrent", wl, head["workers"]))
        labels = {"preloaded": "at half the pre-loaded peak (%s ev/s)",
                  "streamed peak": "at half the streamed peak (%s ev/s)",
                  "concurrent, most workers": "at the same %s ev/s with W=%%d"}

        def other(r):
            label = labels.get(r.get("basis"), r.get("basis", "?") + " %s ev/s") % fmt(r["target_rate"])
            if "%d" in label:
                label = label % r["workers"]
            return "; %s: p99 %.2f ms" % (label, r["p99_ms"])
        basis = ("half the paced peak: messages published one by one at the streamed peak (%s ev/s, publisher "
                 "running) were kept up with at %s ev/s" % (fmt(conc.get("rate")) if conc else "?",
                                                            fmt(2 * head["target_rate"]))) if probe else \
            "half the peak with the publisher running (%s ev/s)" % (fmt(conc.get("rate")) if conc else "?")
        floor = next((r for r in runs if r["kind"] == "broker_floor" and r.get("p99_ms") is not None
                      and abs(r["target_rate"] - head["target_rate"]) < 1), None)
        floor_txt = ("; bare AMQP consumers, no database, same publishing (the broker and the publisher "
                     "alone): p99 %.2f ms" % floor["p99_ms"]) if floor else ""
        targets.append(("p99 publish-to-commit latency at half load ≤ 10 ms (%s workload)" % wl,
                        "p99 %.2f ms (p50 %.2f ms) at %s ev/s = %s, W=%d%s%s"
                        % (head["p99_ms"], head["p50_ms"], fmt(head["target_rate"]), basis, head["workers"],
                           "".join(other(r) for r in others), floor_txt),
                        "%.2f ms" % head["p99_ms"], head["p99_ms"] <= TARGETS["p99_ms"]))
        if head.get("ack_wait_p99_ms") is not None:
            bound = head["p99_ms"] + head["ack_wait_p99_ms"]
            targets.append(("p99 publish-to-ack latency at half load ≤ 50 ms (%s workload)" % wl,
                            "%.2f ms, the sum of p99 publish-to-commit %.2f ms and p99 commit-to-ack %.2f ms "
                            "(p50 %.2f ms; the consumers' histograms, bucket bounds within 25 %%), same run"
                            % (bound, head["p99_ms"], head["ack_wait_p99_ms"], head["ack_wait_p50_ms"]),
                            "≤ %.2f ms" % bound, bound <= TARGETS["p99_ack_ms"]))
    idle = [r for r in runs if r["kind"] == "idle"]
    for r in idle:
        worst = max(100.0 * c["cpu_seconds"] / r["seconds"] for c in r["consumers"])
        targets.append(("Idle CPU of the workers ≈ 0 (empty queue)",
                        "%d consumers: %.3f %% of a core in total over %.0f s, %.2f wake-ups/s each"
                        % (r["workers"], r["cpu_percent_total"], r["seconds"],
                           max(c["wakeups_per_s"] for c in r["consumers"])),
                        "%.3f %%" % worst, worst <= TARGETS["idle_cpu_percent"]))

    # memory: per workload and consumer pid, RssAnon over the end-to-end runs it served
    mem_series = {}      # (workload, pid) -> [(W, first sample, last sample, peak)]
    for r in runs:
        if r["kind"] != "ext":
            continue
        for pid, samples in r.get("memory", {}).items():
            sm = [x for x in samples if x.get("RssAnon") is not None]
            if sm:
                mem_series.setdefault((r["workload"], pid), []).append(
                    (r["workers"], sm[0], sm[-1], max(x["RssAnon"] for x in sm)))
    # within a run: from the first sample taken a second after the start (caches warm) to the end
    within = []
    for r in runs:
        if r["kind"] not in ("ext", "ext_batch"):
            continue
        for pid, samples in r.get("memory", {}).items():
            sm = [x["RssAnon"] for x in samples if x.get("RssAnon") is not None]
            if len(sm) >= 4:
                within.append((sm[-1] - sm[2], r["workload"], r["workers"], pid, sm[2], sm[-1], len(sm)))
    across = []
    for (wl, pid), lst in mem_series.items():
        if len(lst) >= 2:
            across.append((lst[-1][2]["RssAnon"] - lst[0][2]["RssAnon"], wl, pid, len(lst),
                           lst[0][2]["RssAnon"], lst[-1][2]["RssAnon"]))
    if within:
        g = max(within)
        a = max(across) if across else None
        targets.append(("Resident memory per worker flat over the run",
                        "largest RssAnon growth of a consumer within a run, after its first second: %+d kB "
                        "(%s, W=%d, pid %s, %d → %d kB over %d samples)%s"
                        % (g[0], g[1], g[2], g[3], g[4], g[5], g[6],
                           "; across runs of the same workload (plans rebuilt after each run's TRUNCATE): "
                           "at most %+d kB (%s, pid %s, %d runs: %d → %d kB)" % a if a else ""),
                        "%+d kB" % g[0], g[0] <= TARGETS["rss_growth_kib"]))

    # ---------------------------------------------------------------- plot
    plot_ok = False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.8), squeeze=False)
        for ax, wl in zip(axes[0], workloads):
            series = [("storyboard_worker (end to end)", "ext", "o-", "C0"),
                      ("pgbench ceiling", "pgbench", "s--", "C2"),
                      ("StoryBoard-style baseline", "baseline", "v:", "C3")]
            if wl == "noop":
                series.insert(1, ("AMQP ceiling", "amqp", "^--", "C1"))
            for label, key, style, color in series:
                xs = [w for w in ws if rows[(wl, w)].get(key)]
                ys = [rows[(wl, w)][key] for w in xs]
                if xs:
                    ax.plot(xs, ys, style, color=color, label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ws)
            ax.set_xticklabels([str(w) for w in ws])
            ax.set_yscale("log")
            ax.set_xlabel("worker_count (consumers = pgbench clients = baseline processes)")
            ax.set_ylabel("events / s")
            ax.set_title("%s workload" % ("no-op plugin" if wl == "noop" else "subscription plugin"))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("storyboard_worker throughput, %s, %s CPUs, fsync + synchronous_commit on"
                     % (m.get("date", ""), m.get("nproc", "?")), fontsize=10)
        fig.tight_layout()
        fig.savefig(png_path, dpi=110)
        plot_ok = True
    except Exception as exc:     # the report is still worth writing
        print("report: no plot: %s" % exc, file=sys.stderr)

    # ---------------------------------------------------------------- markdown
    L = []
    A = L.append
    A("# storyboard_worker benchmarks")
    A("")
    A("Generated by `make bench` (`bench/run.sh`) on %s; raw numbers in `bench/out/results.json` (not kept in "
      "the repository), re-render with `/usr/bin/python3 bench/report.py bench/out/results.json BENCHMARKS.md bench/throughput.png`."
      % m.get("date", "?"))
    A("")
    A("## Machine")
    A("")
    A("| | |")
    A("|---|---|")
    A("| CPU | %s × %s |" % (m.get("nproc"), m.get("cpu")))
    A("| memory | %s MiB |" % fmt(m.get("mem_mib")))
    A("| OS, kernel | %s, %s |" % (m.get("os"), m.get("kernel")))
    A("| PostgreSQL | %s |" % m.get("postgresql"))
    A("| RabbitMQ, Erlang | %s, %s |" % (m.get("rabbitmq"), m.get("erlang")))
    A("| librabbitmq, json-c | %s, %s |" % (m.get("librabbitmq"), m.get("json_c")))
    A("| baseline: pika, psycopg2 | %s, %s |" % (m.get("pika"), m.get("psycopg2")))
    A("| storyboard_worker | %s (%s) |" % (m.get("extension"), m.get("git")))
    A("| settings | %s |" % ", ".join("%s=%s" % kv for kv in sorted(m.get("settings", {}).items())))
    A("")
    ds = res.get("dataset", {})
    A("Dataset (schema %s, data %s): %s users, %s projects in %s groups, %s stories, %s tasks, "
      "%s subscriptions (%.1f distinct subscribers per story on average), %s private stories, "
      "a pool of %s timeline events (%s with a comment). Messages: StoryBoard's timeline_event bodies, "
      "%d bytes on average." % (res.get("schema"), res.get("dataset_source", "bench/dataset.sql"), fmt(ds.get("users")), fmt(ds.get("projects")),
                                fmt(ds.get("project_groups")), fmt(ds.get("stories")), fmt(ds.get("tasks")),
                                fmt(ds.get("subscriptions")), ds.get("subscribers_per_story") or 0,
                                fmt(ds.get("story_permissions")), fmt(ds.get("events")),
                                fmt(ds.get("comments")), res.get("message_bytes", {}).get("avg", 0)))
    A("")
    A("## Targets")
    A("")
    A("| target | measured | ratio / value | verdict |")
    A("|---|---|---|---|")
    for name, meas, val, ok in targets:
        A("| %s | %s | %s | %s |" % (name, meas, val, verdict(ok)))
    A("")
    # a data-driven reading of the two ceiling targets
    notes = []
    for wl in workloads:
        rate, w = best(wl, "ext")
        ext = by.get(("ext", wl, w))
        pgb = by.get(("pgbench", wl, w))
        if not ext or not pgb:
            continue
        ue = ext.get("cpu", {}).get("us_per_event", {})
        up = pgb.get("cpu", {}).get("us_per_event", {})
        if not ue or not up:
            continue
        e_total = (ue.get("pg") or 0) + (ue.get("broker") or 0)
        p_total = (up.get("pg") or 0) + (up.get("tools") or 0)
        cores = m.get("nproc") or 1
        notes.append("%s workload at W=%d: storyboard_worker used %s µs of CPU per event (PostgreSQL %s, of which "
                     "the consumers %s; RabbitMQ %s) where pgbench used %s µs per transaction (PostgreSQL %s, "
                     "pgbench itself %s). On %d cores that alone caps them near %s and %s events/s."
                     % (wl, w, fmt(e_total), fmt(ue.get("pg")), fmt(ue.get("consumers")), fmt(ue.get("broker")),
                        fmt(p_total), fmt(up.get("pg")), fmt(up.get("tools")), cores,
                        fmt(cores * 1e6 / e_total) if e_total else "–",
                        fmt(cores * 1e6 / p_total) if p_total else "–"))
    if notes:
        A("CPU per event at the best worker_count (from `/proc`, see *Where the time goes*):")
        A("")
        for n in notes:
            A("* " + n)
        A("")
    A("## Throughput")
    A("")
    if plot_ok:
        A("![throughput against worker_count](bench/throughput.png)")
        A("")
    A("Events per second. *storyboard_worker* is end to end: %s events pre-loaded into the queue "
      "(%s for the subscription workload), then `enable_notifications = on` and `pg_reload_conf()`; "
      "the rate is events / (commit-side time of the last event − that reload). *steady* is "
      "(events − 1) / (last − first event's commit-side time). *AMQP ceiling*: the same messages, "
      "W connections, `basic.consume` prefetch %d, one `basic.ack` each, from connecting to the last ack. "
      "*pgbench ceiling*: `pgbench -M prepared -c W -j W -T %d` running the plugin's SQL, one event per "
      "transaction, synchronous commit; *pgbench async*: the same with `synchronous_commit = off`. "
      "*acked*: events / (time the last one was acknowledged, its commit flushed − that reload). "
      "*baseline*: `bench/storyboard_baseline.py` with W processes, first `basic_get` to last "
      "commit (up to %s events or %d s). Ratios: storyboard_worker ÷ ceiling (no-op: the smaller of the "
      "AMQP and synchronous pgbench ceilings), ÷ pgbench async, and ÷ baseline."
      % (fmt(cfg["events"]), fmt(cfg["sub_events"]), 100, cfg["pgbench_secs"],
         fmt(cfg["baseline_events"]), cfg["baseline_secs"]))
    A("")
    A("| workload | W | storyboard_worker | steady | acked | AMQP ceiling | pgbench ceiling | ratio to ceiling | pgbench async | ratio to async | baseline | ratio to baseline | dead letters | other load |")
    A("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for wl in workloads:
        for w in ws:
            d = rows[(wl, w)]
            A("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.2f |" % (
                wl, w, fmt(d["ext"]) if not d["error"] else "failed: " + d["error"],
                fmt(d["steady"]), fmt(d["acked"]), fmt(d["amqp"]) if wl == "noop" else "(%s)" % fmt(d["amqp"]),
                fmt(d["pgbench"]), r2(d["r_ceiling"]), fmt(d["pgbench_async"]), r2(d["r_async"]),
                fmt(d["baseline"], 1), r2(d["r_baseline"]), fmt(d["dead"]), d["other"]))
    A("")
    A("*other load*: CPU (in cores) used by processes outside the benchmark during the busiest of the "
      "row's four runs (machine busy time from /proc/stat minus the benchmark's process trees). Each run "
      "first waits up to %d s for it to fall below %.2f cores." % (cfg.get("quiet_wait", 0), cfg.get("quiet_cores", 0)))
    A("")
    xb = [r for r in runs if r["kind"] == "ext_batch"]
    if xb:
        A("With `storyboard_worker.batch_size` > 1 (not the default; one COMMIT and one multiple-ack per batch), "
          "at the best worker_count of each workload:")
        A("")
        A("| workload | W | batch_size | storyboard_worker | steady | ratio to the batch_size 1 ceiling | dead letters |")
        A("|---|---|---|---|---|---|---|")
        for r in xb:
            d = rows.get((r["workload"], r["workers"]), {})
            A("| %s | %d | %d | %s | %s | %s | %s |" % (r["workload"], r["workers"], r["batch_size"],
                                                     fmt(r.get("rate")) if not r.get("error") else "failed: " + r["error"],
                                                     fmt(r.get("steady_rate")), r2(ratio(r.get("rate"), d.get("ceiling"))),
                                                     fmt(r.get("dead_letters"))))
        A("")
    cc = [r for r in runs if r["kind"] == "ext_concurrent"]
    if cc:
        A("End to end with the publisher running (first publish to last commit): W consumers connected, then the "
          "events published as fast as the broker confirms them, on the same machine. This is the peak the latency "
          "runs take half of.")
        A("")
        A("| workload | W | storyboard_worker | steady | publisher alone | pre-loaded (above) | CPU per event: PostgreSQL / broker / publisher (µs) | dead letters |")
        A("|---|---|---|---|---|---|---|---|")
        for r in cc:
            u = r.get("cpu", {}).get("us_per_event", {})
            A("| %s | %d | %s | %s | %s | %s | %s / %s / %s | %s |" % (
                r["workload"], r["workers"], fmt(r.get("rate")) if not r.get("error") else "failed: " + r["error"],
                fmt(r.get("steady_rate")), fmt(r["publish"]["rate"]), fmt(rows.get((r["workload"], r["workers"]), {}).get("ext")),
                fmt(u.get("pg")), fmt(u.get("broker")), fmt(u.get("tools")), fmt(r.get("dead_letters"))))
        A("")
    pg_sub = [r for r in runs if r["kind"] == "pgbench" and r["workload"] == "subscription" and r.get("rows_per_txn")]
    if pg_sub:
        A("The subscription workload inserts %.1f subscription_events rows per event on average (pgbench runs)."
          % (sum(r["rows_per_txn"] for r in pg_sub) / len(pg_sub)))
        A("")
    A("## Latency at half the peak rate")
    A("")
    A("Messages published one by one at half the peak rate (evenly paced, streaming publisher confirms), W consumers "
      "already connected, at the best worker_count: the fewest workers whose pre-loaded steady rate is within 5 % of "
      "the best one (what an operator would pick). *basis*: the peak halved. The end-to-end peak with the publisher "
      "running (the table above) is measured with messages streamed; published one by one, evenly paced, as "
      "StoryBoard's API publishes them, every message costs the broker about three times the CPU, so the "
      "machine sustains less: *paced peak probe* publishes one by one at that streamed peak for a few seconds, "
      "and the rate the consumers kept up with (first publish to last commit) is the paced peak. "
      "*concurrent* = half the paced peak (the headline), *streamed peak* = half the streamed peak (when higher), "
      "*concurrent, most workers* = the headline rate with the largest worker_count measured, *preloaded* = half "
      "the steady rate from a pre-loaded "
      "queue, which needs no broker work for publishing, so half of it loads this machine well beyond half. Latency = `clock_timestamp()` taken by "
      "the no-op plugin inside the event's transaction (for the subscription workload: the no-op plugin "
      "registered after `subscription`, as a probe) − the publish time `bench/amqp_ceiling` writes into the "
      "body just before `basic.publish`. It does not include the wait for the WAL flush that follows; "
      "*commit to ack* does: the consumers' histogram of the time from each COMMIT to its acknowledgement "
      "(the `stats` view, for the whole run, its unmeasured first second included), and *publish to ack* adds "
      "the two p99s. Each run starts with an unmeasured second of events at the same rate, so "
      "that the re-planning after the harness's TRUNCATE is not counted; *slow 100 ms windows* lists when "
      "(seconds after the start of publishing) the slowest events were published, and how many of the consumers had events over 10 ms in that window.")
    A("")
    A("| workload | basis | W | rate (target / achieved) | events | p50 | p90 | p99 | p99.9 | max | commit to ack p50 / p99 | publish to ack p99 (sum of p99s) | slow 100 ms windows | checkpoints, autovacuum/analyze during the run | WAL fsyncs (average) | CPU in use (ours + others), hypervisor steal | other load |")
    A("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in lat:
        c = r.get("cpu", {})
        sw = r.get("slow_windows") or []
        aw50, aw99 = r.get("ack_wait_p50_ms"), r.get("ack_wait_p99_ms")
        A("| %s | %s | %d | %s / %s ev/s%s | %s | %.2f ms | %.2f ms | %.2f ms | %.2f ms | %.2f ms | %s | %s | %s | %s | %s | %.2f of %s cores, %.2f | %.2f |" % (
            r["workload"], r.get("basis", "–"), r["workers"], fmt(r["target_rate"]), fmt(r["publish"]["rate"]),
            " (kept up with: %s)" % fmt(r["kept_up_rate"]) if r.get("basis") == "paced peak probe" else "",
            fmt(r["measured"]),
            r["p50_ms"], r["p90_ms"], r["p99_ms"], r["p999_ms"], r["max_ms"],
            "%.2f / %.2f ms" % (aw50, aw99) if aw99 is not None else "–",
            "%.2f ms" % (r["p99_ms"] + aw99) if aw99 is not None else "–",
            "%d of %s%s" % (len(sw), r.get("windows", "?"),
                            (": " + ", ".join("%.0f ms at %.1f s%s" % (x[1], x[0], " (%d of %d consumers)" % (x[2], r["workers"]) if len(x) > 2 else "")
                                              for x in sorted(sw, key=lambda x: -x[1])[:3])) if sw else ""),
            "%s, %s" % (r.get("checkpoints", "–"), r.get("autovacuum_analyze", "–")),
            "%s (%s ms)" % (fmt(r.get("wal_syncs")), "%.2f" % r["wal_sync_avg_ms"] if r.get("wal_sync_avg_ms") is not None else "–"),
            c.get("bench_cores", 0) + c.get("kernel_cores", 0) + c.get("other_cores", 0), m.get("nproc", "?"),
            c.get("steal_cores", 0),
            c.get("other_cores", 0)))
    A("")
    floors = [r for r in runs if r["kind"] == "broker_floor" and r.get("p99_ms") is not None]
    if floors:
        A("What the broker and the publisher add on their own: the same publishing at the headline rate, "
          "consumed by W bare AMQP connections (`bench/amqp_ceiling consume`, prefetch %d, acknowledging with "
          "multiple=true every 20 deliveries or when the queue runs dry), no database; latency = delivery time − "
          "publish time." % 100)
        A("")
        A("| W | rate (target / achieved) | p50 | p99 | p99.9 | max | CPU in use (ours + others) |")
        A("|---|---|---|---|---|---|---|")
        for r in floors:
            c = r.get("cpu", {})
            A("| %d | %s / %s msg/s | %.2f ms | %.2f ms | %.2f ms | %.2f ms | %.2f of %s cores |" % (
                r["workers"], fmt(r["target_rate"]), fmt(r["publish"]["rate"]), r["p50_ms"], r["p99_ms"],
                r["p999_ms"], r["max_ms"], c.get("bench_cores", 0) + c.get("kernel_cores", 0) + c.get("other_cores", 0),
                res.get("machine", {}).get("nproc", "?")))
        A("")
    A("## Idle CPU")
    A("")
    for r in idle:
        A("Consumers connected and consuming, queue empty, sampled over %.1f s (`/proc/<pid>/stat` utime+stime, "
          "context switches from `/proc/<pid>/status`):" % r["seconds"])
        A("")
        A("| process | CPU seconds | CPU % of a core | wake-ups / s |")
        A("|---|---|---|---|")
        for c in r["consumers"]:
            A("| consumer pid %d | %.3f | %.3f %% | %.2f |" % (c["pid"], c["cpu_seconds"],
                                                         100 * c["cpu_seconds"] / r["seconds"], c["wakeups_per_s"]))
        if r.get("launcher"):
            c = r["launcher"]
            A("| launcher pid %d | %.3f | %.3f %% | %.2f |" % (c["pid"], c["cpu_seconds"],
                                                         100 * c["cpu_seconds"] / r["seconds"], c["wakeups_per_s"]))
        b = r.get("baseline")
        if b:
            A("| StoryBoard-style baseline, %d processes (`basic_get` + 5 s sleep) | %.3f in total | %.3f %% each at most | – |"
              % (b["workers"], sum(b["cpu_seconds"]), max(b["cpu_percent_per_worker"])))
        A("")
    A("## Memory")
    A("")
    A("Every consumer's `/proc/<pid>/status` RssAnon (private memory) and `smaps_rollup` Pss, sampled before "
      "each end-to-end run, every 0.5 s during it and at its end. Consumers live across runs (turning "
      "`enable_notifications` off and on only drops the broker connection), so one process serves several runs.")
    A("")
    A("| workload | consumer pid | runs (W) | RssAnon before its first run | after its first run | after its last run | peak | Pss after its last run |")
    A("|---|---|---|---|---|---|---|---|")
    for (wl, pid), lst in sorted(mem_series.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        A("| %s | %s | %d (%s) | %s kB | %s kB | %s kB | %s kB | %s kB |" % (
            wl, pid, len(lst), ",".join(str(x[0]) for x in lst), fmt(lst[0][1]["RssAnon"]),
            fmt(lst[0][2]["RssAnon"]), fmt(lst[-1][2]["RssAnon"]), fmt(max(x[3] for x in lst)),
            fmt(lst[-1][2].get("Pss"))))
    A("")
    A("A consumer's first run of a workload warms its caches (catalog, plans, the PL/pgSQL function). The target "
      "is judged within each run, from the sample one second after the start to the end (at most %d kB of "
      "growth); between runs the harness truncates the tables, which invalidates the consumers' plans, and the "
      "re-planning at the start of the next run may leave a little more memory in use (last column but two)."
      % TARGETS["rss_growth_kib"])
    A("")
    A("## Where the time goes")
    A("")
    A("CPU time per event (µs), from `/proc` before and after each run: *consumers* = the storyboard_worker "
      "consumer processes; *postgres* = the whole postmaster tree (consumers or pgbench backends, WAL writer, "
      "checkpointer...); *broker* = RabbitMQ; *tools* = pgbench / the publisher / the baseline's Python processes "
      "and this script's polling. Wall time per event per worker = W ÷ rate.")
    A("")
    A("| run | W | events/s | wall µs per event per worker | consumers | postgres (all) | broker | tools |")
    A("|---|---|---|---|---|---|---|---|")
    for r in runs:
        if r["kind"] not in ("ext", "pgbench", "amqp", "baseline") or not r.get("rate"):
            continue
        u = r.get("cpu", {}).get("us_per_event", {})
        if not u:
            continue
        name = {"ext": "storyboard_worker", "pgbench": "pgbench ceiling", "amqp": "AMQP ceiling",
                "baseline": "baseline"}[r["kind"]] + (" " + r["workload"] if r["kind"] != "amqp" else "")
        A("| %s | %d | %s | %s | %s | %s | %s | %s |" % (
            name, r["workers"], fmt(r["rate"]), fmt(1e6 * r["workers"] / r["rate"]),
            fmt(u.get("consumers")) if r["kind"] == "ext" else "–", fmt(u.get("pg")), fmt(u.get("broker")),
            fmt(u.get("tools"))))
    A("")
    ack = [r for r in runs if r["kind"] == "amqp_ack"]
    if ack:
        A("The broker's share: `bench/amqp_ceiling consume` with W=%d connections, acknowledging every delivery "
          "at once, or each after sleeping 200 µs (a stand-in for the transaction a consumer commits before "
          "it acknowledges), or after 200 µs but with one `basic.ack multiple=true` per 20 deliveries (or when "
          "the queue runs dry):" % ack[0]["workers"])
        A("")
        A("| per delivery | acknowledged | msg/s | broker CPU µs per message | client CPU µs per message |")
        A("|---|---|---|---|---|")
        for r in ack:
            A("| %s | %s | %s | %s | %s |" % ("%d µs sleep" % r["work_us"] if r["work_us"] else "nothing",
                                            "one by one" if r["ack_every"] == 1 else "every %d, multiple" % r["ack_every"],
                                            fmt(r["rate"]), fmt(r["cpu"]["us_per_event"].get("broker"), 1),
                                            fmt(r["cpu"]["us_per_event"].get("tools"), 1)))
        A("")
    steps = [
        ("sbw_process_batch", "one event: everything below, up to its COMMIT"),
        ("sbw_amqp_next", "  receive a delivery (librabbitmq)"),
        ("sbw_ledger_key", "  ledger key (uuid: 16 bytes of SHA-256 of routing key and body)"),
        ("sbw_ledger_claim", "  ledger INSERT ... ON CONFLICT DO NOTHING (claim)"),
        ("sbw_decode_event", "  decode the body (json-c)"),
        ("sbw_build_event_guarded", "  build storyboard_worker.event (author lookup, jsonb_in)"),
        ("sbw_lookup_author", "    of which the author SELECT to_jsonb(u)"),
        ("jsonb_in", "    of which jsonb_in for the snapshots"),
        ("sbw_call_plugin", "  run the plugin: subtransaction, role, settings, the plugin"),
        ("BeginInternalSubTransaction", "    start the subtransaction"),
        ("ReleaseCurrentSubTransaction", "    release the subtransaction"),
        ("sbw_plugin_scope_begin", "    switch to the plugin role, open a settings level"),
        ("sbw_plugin_scope_end", "    back: settings reset, deferred constraints fired"),
        ("plpgsql_exec_function", "    the no-op plugin's PL/pgSQL"),
        ("sbw_subscription_handler", "    the subscription plugin"),
        ("standard_ExecutorStart", "      executor start-up (all statements)"),
        ("standard_ExecutorRun", "      executor run (all statements)"),
        ("GetCachedPlan", "      plan cache look-ups and re-planning"),
        ("sbw_commit_async", "  COMMIT, synchronous_commit = off (no WAL flush)"),
        ("sbw_acks_send", "acknowledge once durable (acks.c)"),
        ("XLogFlush", "  of which the WAL flush when the queue runs dry"),
        ("sbw_amqp_ack", "  of which basic.ack (multiple=true)"),
        ("pgstat_report_activity", "pgstat_report_activity"),
    ]
    profs = [r for r in runs if r["kind"] == "profile" and r.get("inclusive")]
    if profs:
        A("Inclusive CPU time of one consumer per step, in µs per event (share of the consumer's CPU time × "
          "its CPU µs per event from `/proc`), from `perf record -e cpu-clock --call-graph dwarf` of separate, "
          "unscored runs with W=1. *author read*: the same no-op plugin registered with `reads_author => true`, "
          "so that the author lookup it otherwise skips shows. The WAL flush's fdatasync is on-CPU kernel time "
          "on this machine.")
        A("")
        A("| step | " + " | ".join("%s workload" % r.get("label", r["workload"]) for r in profs) + " |")
        A("|---|" + "---|" * len(profs))
        A("| consumer CPU per event (`/proc`) | " + " | ".join(
            "%s µs" % fmt((r.get("cpu", {}).get("us_per_event") or {}).get("consumers")) for r in profs) + " |")

        def cell(r, v):
            if v is None:
                return "–"
            us = (r.get("cpu", {}).get("us_per_event") or {}).get("consumers")
            return "%.1f µs (%.1f %%)" % (us * v / 100.0, v) if us else "%.1f %%" % v
        for sym, label in steps:
            vals = [r["inclusive"].get(sym) for r in profs]
            if all(v is None for v in vals):
                continue
            A("| %s (`%s`) | %s |" % (label.replace("  ", "&nbsp;&nbsp;"), sym,
                                     " | ".join(cell(r, v) for r, v in zip(profs, vals))))
        A("")
        before_after(A, res_path, profs)
    for r in runs:
        if r["kind"] != "profile":
            continue
        if r.get("reads_author"):
            continue
        A("Profile of one consumer (`perf record -e cpu-clock`, %s workload, %s events, W=1, not part of the "
          "scores), by library and by function (≥ 0.7 %%):" % (r["workload"], fmt(r["events"])))
        A("")
        A("```")
        A("\n".join(r["by_dso"][:12]))
        A("")
        A("\n".join(r["by_symbol"][:30]))
        A("```")
        A("")
    A("## Method")
    A("")
    A("* One command: `make bench` runs `bench/run.sh` as root: packages (apt-get), build and install, a "
      "throw-away RabbitMQ and PostgreSQL (`test/services.sh`, with `fsync`, `full_page_writes` and "
      "`synchronous_commit` on), then `bench/bench.py` and `bench/report.py`. `BENCH_QUICK=1` is a smoke test "
      "of under two minutes; the other knobs are listed at the top of `bench/run.sh`.")
    A("* Publishing (`bench/amqp_ceiling.c publish`): as StoryBoard does it — routing key = resource, "
      "`app_id=storyboard`, `content_type=application/json`, transient, on a confirm channel (streamed, at most "
      "1000 unconfirmed; every confirm awaited before a run starts).")
    A("* The no-op plugin (`bench/bench_objects.sql`) is one PL/pgSQL INSERT; its pgbench script runs the same "
      "INSERT. The subscription plugin's statements are captured from the running plugin "
      "(`storyboard_worker.process_event()` under `auto_explain.log_nested_statements`) and turned into two "
      "pgbench scripts (task and story events, and user_comment events with the comment statement first, "
      "weighted as in the published events), so the ceiling runs exactly the SQL `src/subscription.c` runs. Per event "
      "storyboard_worker additionally writes its ledger row and runs each plugin in a subtransaction as the "
      "plugin role; those are the extension's own costs and are not in the ceiling. The plugins are registered "
      "with `reads_author => false` (neither reads `event.author`), so no author lookup is done.")
    A("* Acknowledgement: each event commits in its own transaction with `synchronous_commit = off`; its "
      "delivery is acknowledged (`basic.ack multiple=true`) once the WAL holding its commit record is flushed: "
      "by the WAL writer, or by the consumer itself when its queue runs dry or half its prefetch window waits. "
      "The pgbench ceiling commits synchronously, like every event did before; *pgbench async* shows what the "
      "same SQL reaches when no one waits for a flush.")
    A("* Between runs: the tables written are truncated, the ledger and dead letters emptied, and a CHECKPOINT is "
      "taken, so each run starts alike. Each workload runs the W values in turn, interleaving AMQP, pgbench, "
      "extension and baseline runs for the same W.")
    A("* The baseline (`bench/storyboard_baseline.py`) re-creates StoryBoard's worker: W processes, "
      "`basic_get` polling with a 5 s sleep when empty, a transaction per plugin that resolves the author "
      "and runs the plugin, `basic_ack` always; its subscription plugin runs StoryBoard's per-subscriber "
      "queries (user, preferences, comment resolution, event visibility, one INSERT per subscriber).")
    if res.get("notes"):
        A("")
        for n in res["notes"]:
            A("* %s" % n)
    A("")
    A("Full run: %.0f s." % res.get("duration_s", 0))
    open(md_path, "w").write("\n".join(L) + "\n")
    print("report: wrote %s%s" % (md_path, " and " + png_path if plot_ok else ""))


if __name__ == "__main__":
    main()
