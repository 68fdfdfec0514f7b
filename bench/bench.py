#!/usr/bin/python3
"""bench/bench.py: every measurement of the storyboard_worker benchmark.

Run by bench/run.sh once PostgreSQL (preloading storyboard_worker, fsync and
synchronous_commit on) and RabbitMQ are up; it needs PGHOST, PGPORT, PGUSER,
AMQP_URL and BENCH_OUT (a scratch directory) in the environment, and writes
$BENCH_RESULTS (JSON).  bench/report.py turns that into BENCHMARKS.md and
bench/throughput.png.

What is measured, for each worker_count W of $BENCH_WORKERS:
  amqp      the AMQP ceiling: N pre-published StoryBoard bodies consumed by W
            connections (basic.consume, prefetch 100, one basic.ack each) by
            bench/amqp_ceiling;
  pgbench   the database ceiling: pgbench -c W -j W running the SQL the
            plugin runs per event, one event per transaction, for each
            workload (noop: the plugin's INSERT; subscription: the plugin's
            statements, captured from the running plugin with auto_explain);
  ext       storyboard_worker end to end: N events pre-loaded into the queue,
            then storyboard_worker.enable_notifications turned on; the time
            from that pg_reload_conf() to the last event's commit, and the
            steady rate from the first event's commit to the last one's;
  baseline  bench/storyboard_baseline.py (StoryBoard's worker re-created)
            with W processes on the same pre-loaded messages.
Then, at the best W: publish-to-commit latency with messages published at
half the peak rate, and idle CPU and wake-ups of the consumers with an empty
queue; resident memory of every consumer is sampled during every run.
"""

import datetime
import json
import os
import re
import subprocess
import sys
import time

import psycopg2

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tools"))

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
PY = "/usr/bin/python3"
OUT = os.environ["BENCH_OUT"]
AMQP_URL = os.environ["AMQP_URL"]
AMQP_TOOL = os.environ.get("BENCH_AMQP_TOOL", os.path.join(OUT, "amqp_ceiling"))
EXCHANGE = "storyboard"
QUEUE = "storyboard_events"
DB = "storyboard"
PREFETCH = 100          # storyboard_worker.rabbit_prefetch's default


def env_int(name, default):
    return int(os.environ.get(name, default))


CFG = {
    "events": env_int("BENCH_EVENTS", 20000),
    "sub_events": env_int("BENCH_SUB_EVENTS", 0) or None,
    "workers": [int(w) for w in os.environ.get("BENCH_WORKERS", "1 2 4 8").split()],
    "pgbench_secs": env_int("BENCH_PGBENCH_SECS", 10),
    "latency_secs": env_int("BENCH_LATENCY_SECS", 15),
    "idle_secs": env_int("BENCH_IDLE_SECS", 10),
    "baseline_events": env_int("BENCH_BASELINE_EVENTS", 3000),
    "baseline_secs": env_int("BENCH_BASELINE_SECS", 15),
    "stories": env_int("BENCH_STORIES", 5000),
    "users": env_int("BENCH_USERS", 2000),
    "projects": env_int("BENCH_PROJECTS", 200),
    "groups": env_int("BENCH_GROUPS", 20),
    "workloads": os.environ.get("BENCH_WORKLOADS", "noop subscription").split(),
    "quiet_wait": env_int("BENCH_QUIET_WAIT", 8),
    "profile": os.environ.get("BENCH_PROFILE", "1") == "1",
    "quiet_cores": float(os.environ.get("BENCH_QUIET_CORES", "0.25")),
    "batch_size_extra": env_int("BENCH_BATCH_EXTRA", 20),
    # bench: bench/dataset.sql (about 10 subscribers per story, the benchmark's spec);
    # fixture: test/fixtures/storyboard_bench_data.sql at BENCH_SCALE (about 70 per story)
    "retry_cores": float(os.environ.get("BENCH_RETRY_CORES", "0.3")),
    "retries": env_int("BENCH_RETRIES", 8),
    "dataset": os.environ.get("BENCH_DATASET", "bench"),
    "scale": env_int("BENCH_SCALE", 1),
}
if CFG["sub_events"] is None:
    CFG["sub_events"] = max(1000, CFG["events"] // 2)
CFG["pool"] = max(CFG["events"], CFG["sub_events"], CFG["baseline_events"])

RESULTS = {"config": CFG, "runs": [], "notes": []}


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def save():
    with open(os.environ["BENCH_RESULTS"], "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


# ---------------------------------------------------------------- database helpers
def connect(dbname=DB):
    c = psycopg2.connect(dbname=dbname)
    c.autocommit = True
    return c


def q(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else None


def q1(conn, sql, args=None):
    rows = q(conn, sql, args)
    return rows[0] if rows else None


def psql(args, dbname=DB, **kw):
    return subprocess.run([os.path.join(PGBIN, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                           "-d", dbname] + args, check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def set_conf(conn, **settings):
    for k, v in settings.items():
        q(conn, "ALTER SYSTEM SET storyboard_worker.%s = %%s" % k, (str(v),))
    q(conn, "SELECT pg_reload_conf()")


def consumers(conn):
    return q(conn, "SELECT worker_id, pid, state, messages_processed, messages_dead_lettered,"
                   " last_error FROM storyboard_worker.stats ORDER BY worker_id")


def acked(conn):
    """Deliveries the consumers acknowledged (since they started)."""
    return q1(conn, "SELECT coalesce(sum(messages_acked), 0) FROM storyboard_worker.stats")[0]


def wait_consumers(conn, n, state, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = consumers(conn)
        if len(rows) == n and all(r[2] == state for r in rows):
            return rows
        time.sleep(0.05)
    raise RuntimeError("expected %d consumers %s, have %r" % (n, state, consumers(conn)))


def launcher_pid(conn):
    r = q1(conn, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'storyboard_worker launcher'")
    return r[0] if r else None


# ---------------------------------------------------------------- /proc
def proc_mem(pid):
    """RssAnon and VmRSS from status, Pss and Anonymous from smaps_rollup (kB)."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssShmem"):
                    out[k] = int(v.split()[0])
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Pss", "Anonymous"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def proc_cpu(pid):
    """(utime+stime ticks, voluntary+involuntary context switches)"""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    ctx = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                ctx += int(line.split()[1])
    return ticks, ctx


def _proc_table():
    """pid -> (ppid, utime+stime+cutime+cstime ticks) for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return out


def cpu_snapshot(pids=()):
    """CPU ticks so far: the machine's (user + nice + system, /proc/stat), our process trees'
    (the postmaster's, the broker's, this script's: pgbench, publisher, baseline), kernel
    threads', and each pid of `pids` on its own.  Times include reaped children."""
    procs = _proc_table()
    children = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)

    def tree(root):
        found, stack = set(), [root]
        while stack:
            pid = stack.pop()
            if pid in found or pid not in procs:
                continue
            found.add(pid)
            stack.extend(children.get(pid, []))
        return found
    groups = {"tools": tree(os.getpid()), "pg": set(), "broker": set()}
    if os.environ.get("PG_PID", "").isdigit():
        groups["pg"] = tree(int(os.environ["PG_PID"]))
    for var in ("RMQ_PID", "EPMD_PID"):
        if os.environ.get(var, "").isdigit():
            groups["broker"] |= tree(int(os.environ[var]))
    buckets = {k: sum(procs[p][1] for p in v) for k, v in groups.items()}
    kernel = tree(2)
    buckets["kernel"] = sum(procs[p][1] for p in kernel)
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    buckets["steal"] = v[7] if len(v) > 7 else 0            # time the hypervisor took
    for pid in pids:
        buckets["pid%d" % pid] = procs.get(pid, (0, 0))[1]
    busy = v[0] + v[1] + v[2]                                 # user, nice, system
    return time.time(), busy, buckets


def cpu_usage(snap0, snap1, events=None):
    """CPU used during the interval, in cores, by our trees, kernel threads and other
    processes; with `events`, also the CPU microseconds per event of each of ours."""
    hz = os.sysconf("SC_CLK_TCK")
    secs = max(snap1[0] - snap0[0], 1e-6)
    d = {k: max(snap1[2].get(k, 0) - snap0[2].get(k, 0), 0) / hz for k in snap1[2]}
    # everything user space and the kernel did (not interrupts), minus ours and kernel threads
    other = max((snap1[1] - snap0[1]) / hz - sum(d.get(k, 0) for k in ("pg", "broker", "tools", "kernel")), 0.0)
    ours = sum(v for k, v in d.items() if k in ("pg", "broker", "tools"))
    out = {"seconds": round(secs, 3), "bench_cores": round(ours / secs, 3),
           "kernel_cores": round(d.get("kernel", 0) / secs, 3),
           "steal_cores": round(d.get("steal", 0) / secs, 3),
           "other_cores": round(other / secs, 3),
           "cores": {k: round(v / secs, 3) for k, v in d.items()}}
    if events:
        out["us_per_event"] = {k: round(1e6 * v / events, 1) for k, v in d.items()}
        consumers = [v for k, v in d.items() if k.startswith("pid")]
        if consumers:
            out["us_per_event"]["consumers"] = round(1e6 * sum(consumers) / events, 1)
    return out


def wait_quiet():
    """Wait (at most BENCH_QUIET_WAIT s) until other processes on the machine use less than
    BENCH_QUIET_CORES cores, sampled over 1 s.  Returns what was seen, for the record."""
    t0 = time.time()
    while True:
        s0 = cpu_snapshot()
        time.sleep(1)
        u = cpu_usage(s0, cpu_snapshot())
        if u["other_cores"] < CFG["quiet_cores"] or time.time() - t0 >= CFG["quiet_wait"]:
            u["waited_s"] = round(time.time() - t0, 1)
            if u["other_cores"] >= CFG["quiet_cores"]:
                log("  (machine busy: other processes use %.2f cores)" % u["other_cores"])
            return u


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


# ---------------------------------------------------------------- broker helpers
def amqp(*args, check=True):
    p = subprocess.run([AMQP_TOOL] + [str(a) for a in args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise RuntimeError("amqp_ceiling %s failed: %s" % (args[0], p.stderr.strip()))
    return json.loads(p.stdout)


def purge():
    amqp("declare", AMQP_URL, EXCHANGE, QUEUE)


def preload(n, path):
    """Empty the queue, then publish n messages with confirms; check they are all there."""
    purge()
    res = amqp("publish", AMQP_URL, EXCHANGE, path, n)
    ready = amqp("count", AMQP_URL, QUEUE)["messages"]
    if ready != n:
        raise RuntimeError("queue holds %d messages, expected %d" % (ready, n))
    return res


# ---------------------------------------------------------------- setup
def setup_database():
    pg = connect("postgres")
    q(pg, "DROP DATABASE IF EXISTS %s WITH (FORCE)" % DB)
    q(pg, "CREATE DATABASE %s" % DB)
    pg.close()
    schema = os.path.join(ROOT, "test", "fixtures", "storyboard_schema.sql")
    RESULTS["schema"] = "test/fixtures/storyboard_schema.sql"
    log("loading StoryBoard's schema from %s" % RESULTS["schema"])
    psql(["-f", schema])
    t0 = time.time()
    if CFG["dataset"] == "fixture":
        RESULTS["dataset_source"] = "test/fixtures/storyboard_bench_data.sql (scale %d)" % CFG["scale"]
        psql(["-v", "scale=%d" % CFG["scale"], "-f",
              os.path.join(ROOT, "test", "fixtures", "storyboard_bench_data.sql")])
        CFG["stories"], CFG["users"] = 5000 * CFG["scale"], 1000 * CFG["scale"]
    else:
        RESULTS["dataset_source"] = "bench/dataset.sql"
        psql(["-v", "stories=%d" % CFG["stories"], "-v", "users=%d" % CFG["users"],
              "-v", "projects=%d" % CFG["projects"], "-v", "groups=%d" % CFG["groups"],
              "-v", "events=%d" % CFG["pool"], "-f", os.path.join(HERE, "dataset.sql")])
    conn = connect()
    counts = {}
    for t in ("users", "projects", "project_groups", "stories", "tasks", "subscriptions",
              "events", "comments", "story_permissions"):
        counts[t] = q1(conn, "SELECT count(*) FROM %s" % t)[0]
    counts["subscribers_per_story"] = float(q1(conn, """
        SELECT avg(n) FROM (SELECT s.id, count(DISTINCT sub.user_id) n FROM stories s
          JOIN LATERAL (SELECT 'story'::text tt, s.id tid UNION ALL SELECT 'task', t.id FROM tasks t WHERE t.story_id = s.id
                UNION ALL SELECT 'project', t.project_id FROM tasks t WHERE t.story_id = s.id
                UNION ALL SELECT 'project_group', m.project_group_id FROM tasks t
                          JOIN project_group_mapping m ON m.project_id = t.project_id WHERE t.story_id = s.id) x ON true
          JOIN subscriptions sub ON sub.target_type::text = x.tt AND sub.target_id = x.tid
         GROUP BY s.id) y""")[0])
    RESULTS["dataset"] = counts
    log("dataset generated in %.1f s: %s" % (time.time() - t0, counts))
    q(conn, "CREATE EXTENSION storyboard_worker")
    psql(["-f", os.path.join(HERE, "bench_objects.sql")])
    return conn


def write_messages(conn):
    """One timeline_event message per events row of the pool, as StoryBoard publishes them."""
    try:
        from publish import timeline_event      # tools/publish.py
    except ImportError:
        timeline_event = None
    if CFG["dataset"] == "fixture":
        # the story events (story_created, task_status_changed, user_comment), shuffled
        rows = q(conn, "SELECT id, coalesce(created_at, now() AT TIME ZONE 'UTC'), story_id, comment_id,"
                       " author_id, event_type, event_info FROM events WHERE story_id IS NOT NULL"
                       " ORDER BY md5(id::text)")
    else:
        rows = q(conn, "SELECT id, created_at, story_id, comment_id, author_id, event_type, event_info"
                       " FROM events WHERE id <= %s ORDER BY id", (CFG["pool"],))
    path = os.path.join(OUT, "timeline_events.txt")
    sizes = []
    with open(path, "w") as f:
        for (eid, created, sid, cid, author, etype, info) in rows:
            if etype == "user_comment":
                api = "/v1/stories/%d/comments" % sid
            elif etype.startswith("task"):
                api = "/v1/tasks/%d" % (3 * (sid - 1) + 1)
            else:
                api = "/v1/stories/%d" % sid
            created = created.replace(tzinfo=datetime.timezone.utc).isoformat()
            if timeline_event is not None:
                body = timeline_event(eid, etype, path=api, author_id=author,
                                      status=201 if etype == "user_comment" else 200,
                                      story_id=sid, comment_id=cid, created_at=created)
            else:
                body = {"author_id": author, "method": "POST", "url": "https://storyboard.example.org/",
                        "path": api, "query_string": None, "status": 200, "resource": "timeline_event",
                        "resource_id": eid, "sub_resource": None, "sub_resource_id": None,
                        "resource_before": None,
                        "resource_after": {"id": eid, "created_at": created, "updated_at": None,
                                           "event_type": etype, "event_info": None, "story_id": sid,
                                           "worklist_id": None, "board_id": None,
                                           "author_id": author, "comment_id": cid}}
            body["resource_after"]["event_info"] = info
            # the publish time, written by amqp_ceiling just before basic.publish
            body["resource_after"]["bench_published_us"] = "0" * 16
            text = json.dumps(body, ensure_ascii=False)
            sizes.append(len(text.encode()))
            f.write("timeline_event\t" + text + "\n")
    RESULTS["message_bytes"] = {"min": min(sizes), "avg": sum(sizes) / len(sizes), "max": max(sizes)}
    return path


# ---------------------------------------------------------------- pgbench scripts
def plan_param_types(plan_var):
    """The parameter types a prepared statement of src/subscription.c declares."""
    names = {"INT8OID": "bigint", "INT4OID": "integer", "TEXTOID": "text", "BOOLOID": "boolean",
             "JSONBOID": "jsonb", "TIMESTAMPOID": "timestamp", "TIMESTAMPTZOID": "timestamptz"}
    src = open(os.path.join(ROOT, "src", "subscription.c")).read()
    m = re.search(r"static SbwSubPlan %s = \{[^{]*?(\d+),\s*\{([^}]*)\}" % plan_var, src, re.S)
    if not m:
        raise RuntimeError("cannot find %s in src/subscription.c" % plan_var)
    types = [names[t.strip()] for t in m.group(2).split(",") if t.strip()]
    assert len(types) == int(m.group(1))
    return types


def capture_statements(conn, path):
    """Run a user_comment and a task event through storyboard_worker.process_event() with
    auto_explain logging nested statements to this session, and keep the texts (and
    plans) of the subscription plugin's statements."""
    lines = open(path).read().splitlines()
    samples = {}
    for line in lines:
        body = json.loads(line.split("\t", 1)[1])
        et = body["resource_after"]["event_type"]
        kind = "comment" if et == "user_comment" else "task"
        samples.setdefault(kind, line.split("\t", 1)[1])
        if len(samples) == 2:
            break
    c = psycopg2.connect(dbname=DB)
    c.autocommit = True
    c.notices = []
    captured = {}
    with c.cursor() as cur:
        cur.execute("LOAD 'auto_explain'")
        cur.execute("SET auto_explain.log_min_duration = 0")
        cur.execute("SET auto_explain.log_nested_statements = on")
        cur.execute("SET auto_explain.log_analyze = on")
        cur.execute("SET auto_explain.log_buffers = on")
        cur.execute("SET auto_explain.log_format = 'json'")
        cur.execute("SET client_min_messages = log")
        for kind, body in samples.items():
            # twice: the second run shows the cached plan
            for attempt in range(2):
                del c.notices[:]
                cur.execute("BEGIN")
                cur.execute("SELECT plugin, succeeded, error FROM storyboard_worker.process_event(%s, 'timeline_event')",
                            (body,))
                res = cur.fetchall()
                cur.execute("ROLLBACK")
                if not all(r[1] for r in res):
                    raise RuntimeError("process_event failed: %r" % res)
            for n in c.notices:
                j = n[n.find("{"):]
                try:
                    doc = json.loads(j)
                except ValueError:
                    continue
                text = doc.get("Query Text", "")
                if "INSERT INTO subscription_events" in text:
                    captured["timeline"] = {"sql": text, "plan": doc}
                elif re.search(r"\bcomments\b", text) and "storyboard_worker" not in text:
                    captured["comment"] = {"sql": text, "plan": doc}
                elif "to_jsonb(u)" in text:
                    captured["author"] = {"sql": text, "plan": doc}
    c.close()
    if "timeline" not in captured or "comment" not in captured:
        raise RuntimeError("could not capture the subscription plugin's statements (have %s)"
                           % sorted(captured))
    return captured


def to_pgbench(sql, types, exprs):
    """Replace $n by a pgbench variable expression of the declared type."""
    def rep(m):
        i = int(m.group(1))
        return exprs.get(i, "(:p%d)::%s" % (i, types[i - 1]))
    out = re.sub(r"\$(\d+)(?!\d)", rep, sql)
    return " ".join(out.split())


def write_pgbench_scripts(captured):
    S, E = CFG["stories"], CFG["pool"]
    blocks = E // 10
    scripts = {}
    # noop: the INSERT of bench.noop_plugin
    p = os.path.join(OUT, "noop.pgbench")
    with open(p, "w") as f:
        f.write("\\set p1 random(1, 1000000)\n"
                "\\set p2 random(1, 1000000000)\n"
                "INSERT INTO bench.noop_events (resource_id, published_us) VALUES (:p1, :p2);\n")
    scripts["noop"] = ["-f", p]

    tl_types = plan_param_types("sbw_timeline_plan")
    cm_types = plan_param_types("sbw_comment_plan")
    # worklist_id: NULL for story events; created_at as the plugin binds it
    tl_exprs = {3: "NULLIF((:p3)::bigint, 0)", 7: "(now() AT TIME ZONE 'UTC')"}
    timeline = to_pgbench(captured["timeline"]["sql"], tl_types, tl_exprs)
    if CFG["dataset"] == "fixture":
        # test/fixtures/storyboard_bench_data.sql: events 1..N story_created, N+1..2N
        # task_status_changed, 2N+1..3N user_comment of story i mod N with comment i mod N
        pick_task = ("\\set s random(1, %d)\n\\set p1 :s + %d * random(0, 1)\n" % (S, S))
        pick_comment = ("\\set s random(1, %d)\n\\set p1 2 * %d + :s\n" % (S, S))
        head = "\\set p2 :s\n\\set p6 random(1, %d)\n\\set p3 0\n" % CFG["users"]
        comment_id = "(:s)::bigint"
        weights = ("@2", "@1")
    else:
        # bench/dataset.sql: event i is about story ((i * 7919) % S) + 1, by author
        # 1 + (i * 13) % users; (i - 1) % 10 < 3 are user_comment events, with comment i
        pick_task = "\\set k random(0, %d)\n\\set p1 10 * :k + 4 + random(0, 6)\n" % (blocks - 1)
        pick_comment = "\\set k random(0, %d)\n\\set p1 10 * :k + 1 + random(0, 2)\n" % (blocks - 1)
        head = ("\\set p2 ((:p1 * 7919) %% %d) + 1\n" % S +
                "\\set p6 1 + (:p1 * 13) %% %d\n" % CFG["users"] +
                "\\set p3 0\n")
        comment_id = "(:p1)::bigint"
        weights = ("@7", "@3")
    p_t = os.path.join(OUT, "subscription_task.pgbench")
    with open(p_t, "w") as f:
        f.write(pick_task)
        f.write(head)
        f.write(timeline + ";\n")
    p_c = os.path.join(OUT, "subscription_comment.pgbench")
    with open(p_c, "w") as f:
        f.write(pick_comment)
        f.write(head)
        f.write("BEGIN;\n")
        f.write(to_pgbench(captured["comment"]["sql"], cm_types, {2: comment_id}) + ";\n")
        f.write(timeline.replace("(:p4)::text", "(:ctype)::text")
                        .replace("(:p5)::text", "(:cinfo)::text") + ";\n")
        f.write("END;\n")
    RESULTS["pgbench_scripts"] = {"noop": open(p).read(), "subscription_task": open(p_t).read(),
                                  "subscription_comment": open(p_c).read()}
    scripts["subscription"] = [
        "-f", p_t + weights[0], "-f", p_c + weights[1],
        "-D", "p4=task_status_changed", "-D", "ctype=user_comment",
        "-D", 'p5={"story_id": 1, "task_id": 1, "task_title": "Task 1 of story 1", "old_status": "todo", "new_status": "inprogress"}',
        "-D", 'cinfo={"comment_id": 1, "comment_content": "Comment 1: looks good to me, \\u201c\\u00fc\\u201d c4ca4238a0b923820dcc509a6f75849b", "story_id": 7920, "story_title": "Story 7920: 1f1b2b7ef3d7d95c5e5f2a2aa4b22d1d"}',
    ]
    return scripts


# ---------------------------------------------------------------- workloads
def use_plugins(conn, names, reads_author=False):
    """Register exactly these plugins, in this order.  None of them reads event.author, and
    each says so (register_plugin's reads_author), so the consumers skip the author lookup;
    reads_author=True registers them as plugins that do (the profile's author-lookup run)."""
    for (n,) in q(conn, "SELECT name FROM storyboard_worker.plugins"):
        q(conn, "SELECT storyboard_worker.unregister_plugin(%s)", (n,))
    for n in names:
        fn = {"subscription": "storyboard_worker.subscription_handler(storyboard_worker.event)",
              "noop": "bench.noop_plugin(storyboard_worker.event)",
              "probe": "bench.noop_plugin(storyboard_worker.event)"}[n]
        q(conn, "SELECT storyboard_worker.register_plugin(%s, %s, NULL, %s)", (n, fn, reads_author))


def reset_tables(conn):
    q(conn, "TRUNCATE bench.noop_events, subscription_events, storyboard_worker.dead_letters,"
            " storyboard_worker.ledger")
    q(conn, "CHECKPOINT")


def commit_span(conn, workload):
    """(first, last) commit time as epoch seconds and the row count of the workload's table."""
    if workload == "noop":
        r = q1(conn, "SELECT extract(epoch FROM min(committed_at)), extract(epoch FROM max(committed_at)),"
                     " count(*) FROM bench.noop_events")
    else:
        typ = q1(conn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                       " WHERE attrelid = 'subscription_events'::regclass AND attname = 'created_at'")[0]
        expr = "created_at" if typ.startswith("timestamp with") else "created_at AT TIME ZONE 'UTC'"
        r = q1(conn, "SELECT extract(epoch FROM min(%s)), extract(epoch FROM max(%s)), count(*)"
                     " FROM subscription_events" % (expr, expr))
    return (float(r[0]) if r[0] is not None else None,
            float(r[1]) if r[1] is not None else None, r[2])


def retried(fn, *args, **kw):
    """Run a measurement; if other processes took more than BENCH_RETRY_CORES cores meanwhile,
    run it again (at most BENCH_RETRIES times in the whole benchmark) and keep the quieter one."""
    run = fn(*args, **kw)
    while CFG["retries"] > 0 and run.get("cpu", {}).get("other_cores", 0) > CFG["retry_cores"]:
        CFG["retries"] -= 1
        log("  other processes used %.2f cores during that run: once more"
            % run["cpu"]["other_cores"])
        again = fn(*args, **kw)
        worse = (again if again.get("cpu", {}).get("other_cores", 99) >= run["cpu"]["other_cores"]
                 else run)
        RESULTS["runs"].remove(worse)
        RESULTS.setdefault("discarded", []).append(
            {k: worse.get(k) for k in ("kind", "workload", "workers", "rate", "p99_ms", "cpu")})
        run = again if worse is run else run
        if worse is again:
            break
    save()
    return run


def ext_run(conn, workload, w, n, path, plugins, batch=1, kind="ext"):
    """storyboard_worker end to end on n pre-loaded events with w consumers."""
    log("%s %s W=%d: %d events%s" % (kind, workload, w, n, ", batch_size %d" % batch if batch > 1 else ""))
    set_conf(conn, enable_notifications="off", worker_count=w, batch_size=batch)
    rows = wait_consumers(conn, w, "idle")
    use_plugins(conn, plugins)
    reset_tables(conn)
    pub = preload(n, path)
    pids = [r[1] for r in rows]
    quiet = wait_quiet()
    base = sum(r[3] for r in rows)
    base_acked = acked(conn)
    mem = {pid: [proc_mem(pid)] for pid in pids}
    load0 = loadavg()
    snap0 = cpu_snapshot(pids)
    t_enable = time.time()
    set_conf(conn, enable_notifications="on")
    deadline = t_enable + max(120, n / 20.0)
    t_next_mem = t_enable + 0.5
    done = 0
    while time.time() < deadline:
        rows = consumers(conn)
        done = sum(r[3] for r in rows) - base
        if done >= n:
            break
        if time.time() >= t_next_mem:
            for pid in pids:
                mem[pid].append(proc_mem(pid))
            t_next_mem += 0.5
        time.sleep(0.02)
    t_seen = time.time()
    # and until the last of them is acknowledged (its commit flushed)
    while time.time() < deadline and acked(conn) - base_acked < done:
        time.sleep(0.005)
    t_acked = time.time()
    cpu = cpu_usage(snap0, cpu_snapshot(pids), events=n)
    for pid in pids:
        mem[pid].append(proc_mem(pid))
    set_conf(conn, enable_notifications="off")
    rows_after = wait_consumers(conn, w, "idle")
    first, last, nrows = commit_span(conn, workload)
    dead = q1(conn, "SELECT count(*) FROM storyboard_worker.dead_letters")[0]
    if batch != 1:
        set_conf(conn, batch_size=1)
    run = {"kind": kind, "workload": workload, "workers": w, "events": n, "processed": done,
           "batch_size": batch,
           "t_enable": t_enable, "first_commit": first, "last_commit": last, "rows": nrows,
           "dead_letters": dead, "publish": pub, "loadavg_before": load0, "cpu": cpu, "quiet": quiet,
           "pids": pids, "pids_after": [r[1] for r in rows_after],
           "last_errors": [r[5] for r in rows_after if r[5]],
           "memory": {str(k): v for k, v in mem.items()}}
    if done < n:
        run["error"] = "only %d of %d events processed in %.0f s" % (done, n, t_seen - t_enable)
        purge()
    elif last is not None:
        run["seconds"] = last - t_enable
        run["rate"] = n / (last - t_enable)
        run["steady_rate"] = (n - 1) / (last - first) if last > first else None
        run["rate_acked"] = n / (t_acked - t_enable)
    if dead:
        run["dead_letter_errors"] = q(conn, "SELECT plugin, error, count(*) FROM storyboard_worker.dead_letters"
                                            " GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5")
    log("  -> %s" % ({k: run.get(k) for k in ("rate", "steady_rate", "dead_letters", "error")}))
    RESULTS["runs"].append(run)
    save()
    return run


def amqp_run(w, n, path):
    log("amqp ceiling W=%d: %d messages" % (w, n))
    pub = preload(n, path)
    quiet = wait_quiet()
    snap0 = cpu_snapshot()
    res = amqp("consume", AMQP_URL, QUEUE, n, w, PREFETCH)
    run = {"kind": "amqp", "workload": "any", "workers": w, "events": n, "publish": pub,
           "cpu": cpu_usage(snap0, cpu_snapshot(), events=n), "quiet": quiet,
           "rate": res["rate"], "rate_from_start": res["rate_from_start"], "detail": res}
    log("  -> %.0f msg/s (publish %.0f msg/s)" % (res["rate"], pub["rate"]))
    RESULTS["runs"].append(run)
    save()
    return run


def pgbench_run(conn, workload, w, script_args, async_commit=False):
    """pgbench running the plugin's SQL, one event per transaction; with async_commit,
    synchronous_commit = off: the ceiling for that SQL when nobody waits for the fsync."""
    kind = "pgbench_async" if async_commit else "pgbench"
    log("%s %s -c %d -j %d -T %d" % (kind, workload, w, w, CFG["pgbench_secs"]))
    reset_tables(conn)
    cmd = [os.path.join(PGBIN, "pgbench"), "-n", "-M", "prepared", "-c", str(w), "-j", str(w),
           "-T", str(CFG["pgbench_secs"])] + script_args + [DB]
    env = dict(os.environ)
    if async_commit:
        env["PGOPTIONS"] = (env.get("PGOPTIONS", "") + " -c synchronous_commit=off").strip()
    quiet = wait_quiet()
    snap0 = cpu_snapshot()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    snap1 = cpu_snapshot()
    tx = re.search(r"number of transactions actually processed: (\d+)", p.stdout)
    cpu = cpu_usage(snap0, snap1, events=int(tx.group(1)) if tx and int(tx.group(1)) else None)
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", p.stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", p.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", p.stdout)
    run = {"kind": kind, "workload": workload, "workers": w, "seconds": CFG["pgbench_secs"],
           "cpu": cpu, "quiet": quiet,
           "rate": float(m.group(1)) if m else None,
           "latency_ms": float(lat.group(1)) if lat else None,
           "failed": int(failed.group(1)) if failed else None}
    if workload == "subscription":
        run["rows_per_txn"] = None
        cnt = q1(conn, "SELECT count(*) FROM subscription_events")[0]
        tx = re.search(r"number of transactions actually processed: (\d+)", p.stdout)
        if tx and int(tx.group(1)):
            run["rows_per_txn"] = cnt / int(tx.group(1))
    if p.returncode != 0 or m is None:
        run["error"] = (p.stderr or p.stdout)[-2000:]
    log("  -> %s tps%s" % (run["rate"], " ERROR " + run["error"][-300:] if "error" in run else ""))
    RESULTS["runs"].append(run)
    save()
    return run


def baseline_run(conn, workload, w, path):
    n = CFG["baseline_events"]
    log("baseline %s W=%d: up to %d events / %d s" % (workload, w, n, CFG["baseline_secs"]))
    set_conf(conn, enable_notifications="off")
    reset_tables(conn)
    pub = preload(n, path)
    quiet = wait_quiet()
    snap0 = cpu_snapshot()
    p = subprocess.run([PY, os.path.join(HERE, "storyboard_baseline.py"), "run", "--url", AMQP_URL,
                        "--dsn", "dbname=%s" % DB, "--workload", workload, "--workers", str(w),
                        "--expect", str(n), "--max-seconds", str(CFG["baseline_secs"])],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snap1 = cpu_snapshot()
    purge()
    if p.returncode != 0:
        run = {"kind": "baseline", "workload": workload, "workers": w, "error": p.stderr[-2000:]}
    else:
        res = json.loads(p.stdout)
        cpu = cpu_usage(snap0, snap1, events=res["processed"] or None)
        run = {"kind": "baseline", "workload": workload, "workers": w, "events": n,
               "processed": res["processed"], "rate": res.get("rate"),
               "rate_from_start": res.get("rate_from_start"), "errors": res["errors"],
               "timed_out": res["timed_out"], "publish": pub, "detail": res, "cpu": cpu, "quiet": quiet}
        if workload == "noop":
            run["rows"] = q1(conn, "SELECT count(*) FROM bench.noop_events")[0]
        else:
            run["rows"] = q1(conn, "SELECT count(*) FROM subscription_events")[0]
        if p.stderr.strip():
            run["stderr"] = p.stderr[-1000:]
    log("  -> %s" % ({k: run.get(k) for k in ("rate", "processed", "errors", "error")}))
    RESULTS["runs"].append(run)
    save()
    return run


def fresh_consumers(conn, w, plugins):
    """w consumers connected to an empty queue, with these plugins and empty
    tables; returns their stats rows."""
    set_conf(conn, enable_notifications="off", worker_count=w)
    wait_consumers(conn, w, "idle")
    use_plugins(conn, plugins)
    reset_tables(conn)
    purge()
    set_conf(conn, enable_notifications="on")
    return wait_consumers(conn, w, "consuming")


def concurrent_run(conn, workload, w, n, path, plugins):
    """End to end with the publisher running: w consumers connected and idle, then n events
    published as fast as the broker confirms them; from the first publish to the last commit."""
    log("concurrent %s W=%d: %d events published while consuming" % (workload, w, n))
    rows = fresh_consumers(conn, w, plugins)
    base = sum(r[3] for r in rows)
    quiet = wait_quiet()
    snap0 = cpu_snapshot([r[1] for r in rows])
    pub = amqp("publish", AMQP_URL, EXCHANGE, path, n)
    deadline = time.time() + max(120, n / 20.0)
    done = 0
    while time.time() < deadline:
        done = sum(r[3] for r in consumers(conn)) - base
        if done >= n:
            break
        time.sleep(0.02)
    cpu = cpu_usage(snap0, cpu_snapshot([r[1] for r in rows]), events=n)
    first, last, nrows = commit_span(conn, workload)
    dead = q1(conn, "SELECT count(*) FROM storyboard_worker.dead_letters")[0]
    set_conf(conn, enable_notifications="off")
    wait_consumers(conn, w, "idle")
    run = {"kind": "ext_concurrent", "workload": workload, "workers": w, "events": n, "processed": done,
           "publish": pub, "first_commit": first, "last_commit": last, "dead_letters": dead,
           "cpu": cpu, "quiet": quiet}
    if done < n or last is None:
        run["error"] = "only %d of %d events processed" % (done, n)
        purge()
    else:
        run["seconds"] = last - pub["start"]
        run["rate"] = n / (last - pub["start"])
        run["steady_rate"] = (n - 1) / (last - first) if last > first else None
    log("  -> %s (publisher %.0f msg/s)" % ({k: run.get(k) for k in ("rate", "steady_rate", "dead_letters", "error")},
                                           pub["rate"]))
    RESULTS["runs"].append(run)
    save()
    return run


def latency_run(conn, workload, w, rate, path, plugins, basis="concurrent", secs=None):
    """Publish at `rate` msg/s for latency_secs (or secs) with w consumers already consuming;
    the no-op plugin (alone, or after subscription as a probe) records commit-side time."""
    secs = secs or CFG["latency_secs"]
    n = max(100, int(rate * secs))
    log("latency %s W=%d: %d events at %.0f msg/s" % (workload, w, n, rate))
    rows = fresh_consumers(conn, w, plugins)
    # warm-up, not measured: the consumers re-plan after the TRUNCATE above
    base = sum(r[3] for r in rows)
    warm = max(50, int(rate))
    amqp("publish", AMQP_URL, EXCHANGE, path, warm, "%.3f" % rate)
    deadline = time.time() + 60
    while time.time() < deadline and sum(r[3] for r in consumers(conn)) - base < warm:
        time.sleep(0.05)
    base = sum(r[3] for r in consumers(conn))
    quiet = wait_quiet()
    counters = """SELECT (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter),
                         (SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0) FROM pg_stat_all_tables),
                         (SELECT wal_sync FROM pg_stat_wal), (SELECT wal_sync_time FROM pg_stat_wal)"""
    pg0 = q1(conn, counters)
    t_measure = time.time()
    snap0 = cpu_snapshot()
    pub = amqp("publish", AMQP_URL, EXCHANGE, path, n, "%.3f" % rate)
    cpu = cpu_usage(snap0, cpu_snapshot())
    deadline = time.time() + 60
    while time.time() < deadline and sum(r[3] for r in consumers(conn)) - base < n:
        time.sleep(0.05)
    time.sleep(0.2)
    pg1 = q1(conn, counters)
    lat = "((extract(epoch FROM committed_at) * 1e6 - published_us) / 1000.0)::float8"
    since = int(t_measure * 1e6)
    r = q1(conn, """
        SELECT count(*),
               percentile_cont(ARRAY[0.5, 0.9, 0.99, 0.999]) WITHIN GROUP (ORDER BY l),
               max(l), avg(l)
          FROM (SELECT %s AS l FROM bench.noop_events WHERE published_us >= %%s) x""" % lat, (since,))
    # where the slow ones are: 100 ms windows (by publish time) whose slowest event took > 10 ms
    # and how many of the consumers had events that slow in that window
    stalls = q(conn, """
        SELECT round((floor(published_us / 100000.0) * 100000 - %%s) / 1e6, 1)::float8 AS at_s, max(%s),
               count(DISTINCT backend_pid) FILTER (WHERE %s > 10)
          FROM bench.noop_events WHERE published_us >= %%s GROUP BY 1 HAVING max(%s) > 10 ORDER BY 1"""
             % (lat, lat, lat), (since, since))
    # the rate the consumers kept up with: from the first publish to the last commit
    span = q1(conn, "SELECT extract(epoch FROM max(committed_at)) * 1e6 - min(published_us)"
                    " FROM bench.noop_events WHERE published_us >= %s", (since,))[0]
    # commit-to-ack waits of this run (the consumers were started for it), from the stats view
    ack = q1(conn, "SELECT max(ack_wait_p50_ms), max(ack_wait_p99_ms), coalesce(sum(messages_acked), 0)"
                   " FROM storyboard_worker.stats")
    set_conf(conn, enable_notifications="off")
    wait_consumers(conn, w, "idle")
    run = {"kind": "latency", "workload": workload, "workers": w, "target_rate": rate, "basis": basis,
           "ack_wait_p50_ms": ack[0], "ack_wait_p99_ms": ack[1], "acked": ack[2],
           "events": n, "publish": pub, "measured": r[0],
           "p50_ms": r[1][0], "p90_ms": r[1][1], "p99_ms": r[1][2], "p999_ms": r[1][3],
           "max_ms": r[2], "avg_ms": r[3], "cpu": cpu, "quiet": quiet,
           "kept_up_rate": (r[0] - 1) / (float(span) / 1e6) if span and r[0] > 1 else None,
           "slow_windows": [[a, round(b, 1), c] for a, b, c in stalls], "windows": int(secs * 10),
           "checkpoints": pg1[0] - pg0[0], "autovacuum_analyze": int(pg1[1] - pg0[1]),
           "wal_syncs": pg1[2] - pg0[2],
           "wal_sync_avg_ms": (pg1[3] - pg0[3]) / (pg1[2] - pg0[2]) if pg1[2] > pg0[2] else None}
    log("  -> p50 %.2f ms p99 %.2f ms max %.2f ms (%d events, published at %.0f msg/s)"
        % (run["p50_ms"], run["p99_ms"], run["max_ms"], r[0], pub["rate"]))
    RESULTS["runs"].append(run)
    save()
    return run


def broker_floor_run(conn, w, rate, path):
    """The latency the broker and the publisher add on their own: the same paced publishing as
    latency_run, consumed by w bare AMQP connections (bench/amqp_ceiling consume, acknowledging
    with multiple=true every 20 deliveries or when the queue runs dry), no database work."""
    n = max(100, int(rate * CFG["latency_secs"]))
    log("broker floor W=%d: %d events at %.0f msg/s, bare AMQP consumers" % (w, n, rate))
    set_conf(conn, enable_notifications="off")
    purge()
    quiet = wait_quiet()
    cons = subprocess.Popen([AMQP_TOOL, "consume", AMQP_URL, QUEUE, str(n), str(w), str(PREFETCH), "0", "20", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    snap0 = cpu_snapshot()
    pub = amqp("publish", AMQP_URL, EXCHANGE, path, n, "%.3f" % rate)
    cpu = cpu_usage(snap0, cpu_snapshot())
    out, err = cons.communicate(timeout=120)
    if cons.returncode != 0:
        raise RuntimeError("amqp_ceiling consume failed: %s" % err.strip())
    res = json.loads(out)
    lat = res.get("latency_ms") or {}
    run = {"kind": "broker_floor", "workers": w, "target_rate": rate, "events": n, "publish": pub,
           "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"), "p999_ms": lat.get("p999"),
           "max_ms": lat.get("max"), "cpu": cpu, "quiet": quiet}
    log("  -> p50 %s ms p99 %s ms max %s ms" % (lat.get("p50"), lat.get("p99"), lat.get("max")))
    RESULTS["runs"].append(run)
    save()
    return run


def idle_run(conn, w):
    log("idle CPU: %d consumers, empty queue, %d s" % (w, CFG["idle_secs"]))
    set_conf(conn, enable_notifications="off", worker_count=w)
    wait_consumers(conn, w, "idle")
    purge()
    set_conf(conn, enable_notifications="on")
    rows = wait_consumers(conn, w, "consuming")
    quiet = wait_quiet()
    pids = [r[1] for r in rows]
    lp = launcher_pid(conn)
    watch = pids + ([lp] if lp else [])
    c0 = {p: proc_cpu(p) for p in watch}
    t0 = time.time()
    time.sleep(CFG["idle_secs"])
    c1 = {p: proc_cpu(p) for p in watch}
    secs = time.time() - t0
    hz = os.sysconf("SC_CLK_TCK")
    run = {"kind": "idle", "workers": w, "seconds": secs, "quiet": quiet,
           "consumers": [{"pid": p, "cpu_seconds": (c1[p][0] - c0[p][0]) / hz,
                          "wakeups_per_s": (c1[p][1] - c0[p][1]) / secs} for p in pids],
           "launcher": {"pid": lp, "cpu_seconds": (c1[lp][0] - c0[lp][0]) / hz,
                        "wakeups_per_s": (c1[lp][1] - c0[lp][1]) / secs} if lp else None}
    run["cpu_percent_total"] = 100.0 * sum(c["cpu_seconds"] for c in run["consumers"]) / secs
    set_conf(conn, enable_notifications="off")
    wait_consumers(conn, w, "idle")
    # the StoryBoard-style baseline, for comparison
    p = subprocess.run([PY, os.path.join(HERE, "storyboard_baseline.py"), "idle", "--url", AMQP_URL,
                        "--dsn", "dbname=%s" % DB, "--workload", "noop", "--workers", str(w),
                        "--max-seconds", str(CFG["idle_secs"])],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode == 0:
        run["baseline"] = json.loads(p.stdout)
    log("  -> consumers %.3f %% CPU in total, %.2f wake-ups/s each"
        % (run["cpu_percent_total"], max(c["wakeups_per_s"] for c in run["consumers"])))
    RESULTS["runs"].append(run)
    save()
    return run


def ack_cost_runs(w, n, path):
    """The broker's CPU per message when every delivery is acknowledged on its own some time
    after it arrived (as a consumer that commits first does), against acknowledging with
    multiple=true every 20 deliveries (or when the queue runs dry)."""
    out = []
    for work_us, every in ((0, 1), (200, 1), (200, 20)):
        preload(n, path)
        quiet = wait_quiet()
        snap0 = cpu_snapshot()
        res = amqp("consume", AMQP_URL, QUEUE, n, w, PREFETCH, work_us, every)
        run = {"kind": "amqp_ack", "workers": w, "events": n, "work_us": work_us, "ack_every": every,
               "rate": res["rate"], "cpu": cpu_usage(snap0, cpu_snapshot(), events=n), "quiet": quiet}
        log("ack cost W=%d work %d us ack every %d: %.0f msg/s, broker %.1f us/msg"
            % (w, work_us, every, res["rate"], run["cpu"]["us_per_event"]["broker"]))
        RESULTS["runs"].append(run)
        out.append(run)
    save()
    return out


def profile_run(conn, workload, n, path, plugins, reads_author=False):
    """A separate, unscored run with one consumer under `perf record` (software cpu-clock
    sampling): where a consumer spends its time, by library and by function.  With
    reads_author, the plugins are registered as reading event.author: what the lookup costs."""
    label = workload + (" (author read)" if reads_author else "")
    out = os.path.join(OUT, "perf.%s%s.data" % (workload, ".author" if reads_author else ""))
    log("profile %s W=1: %d events under perf" % (label, n))
    set_conf(conn, enable_notifications="off", worker_count=1)
    rows = wait_consumers(conn, 1, "idle")
    use_plugins(conn, plugins, reads_author)
    reset_tables(conn)
    preload(n, path)
    pid = rows[0][1]
    base = rows[0][3]
    # the library as this consumer loaded it: another `make install` may have replaced the file
    # since, and perf then finds neither its symbols nor its unwind tables
    try:
        with open("/proc/%d/maps" % pid) as f:
            rng = next(l.split()[0] for l in f if "storyboard_worker.so" in l)
        copy = os.path.join(OUT, "storyboard_worker.so.loaded")
        with open("/proc/%d/map_files/%s" % (pid, rng), "rb") as src, open(copy, "wb") as dst:
            dst.write(src.read())
        subprocess.run(["perf", "buildid-cache", "--add", copy], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    except (OSError, StopIteration):
        pass
    perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "--call-graph", "dwarf,16384",
                             "-o", out, "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    snap0 = cpu_snapshot([pid])
    set_conf(conn, enable_notifications="on")
    deadline = time.time() + max(120, n / 20.0)
    while time.time() < deadline and consumers(conn)[0][3] - base < n:
        time.sleep(0.05)
    cpu = cpu_usage(snap0, cpu_snapshot([pid]), events=n)
    perf.send_signal(2)
    perf.wait()
    set_conf(conn, enable_notifications="off")
    wait_consumers(conn, 1, "idle")

    def report(*sort):
        p = subprocess.run(["perf", "report", "-i", out, "--no-children", "--stdio", "-g", "none",
                            "--percent-limit", "0.7", "--sort", ",".join(sort)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return [l.rstrip() for l in p.stdout.splitlines() if l.strip() and not l.startswith("#")][:30]
    # inclusive time of the steps of one event (with their callees)
    p = subprocess.run(["perf", "report", "-i", out, "--children", "--stdio", "-g", "none",
                        "--percent-limit", "0.3", "--sort", "sym"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    inclusive = {}
    for line in p.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[[.k]\]\s+(\S+)", line)
        if m and m.group(3) not in inclusive:
            inclusive[m.group(3)] = float(m.group(1))
    run = {"kind": "profile", "workload": workload, "label": label, "reads_author": reads_author,
           "workers": 1, "events": n, "cpu": cpu,
           "by_dso": report("dso"), "by_symbol": report("dso", "sym"), "inclusive": inclusive}
    RESULTS["runs"].append(run)
    save()
    return run


def machine_facts():
    def cmd(*a):
        try:
            return subprocess.run(a, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True).stdout.strip()
        except OSError:
            return None
    cpu = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    conn = connect()
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "cpu": cpu, "mem_mib": mem,
        "kernel": os.uname().release,
        "os": cmd("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"),
        "postgresql": q1(conn, "SELECT version()")[0],
        "rabbitmq": cmd("dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"),
        "erlang": cmd("dpkg-query", "-W", "-f", "${Version}", "erlang-base"),
        "librabbitmq": cmd("dpkg-query", "-W", "-f", "${Version}", "librabbitmq4"),
        "json_c": cmd("dpkg-query", "-W", "-f", "${Version}", "libjson-c5"),
        "pika": cmd("dpkg-query", "-W", "-f", "${Version}", "python3-pika"),
        "psycopg2": cmd("dpkg-query", "-W", "-f", "${Version}", "python3-psycopg2"),
        "extension": q1(conn, "SELECT extversion FROM pg_extension WHERE extname = 'storyboard_worker'")[0],
        "settings": dict(q(conn, "SELECT name, setting FROM pg_settings WHERE name IN ('fsync',"
                                 " 'synchronous_commit', 'full_page_writes', 'shared_buffers', 'wal_level',"
                                 " 'max_wal_size', 'storyboard_worker.batch_size',"
                                 " 'storyboard_worker.rabbit_prefetch', 'storyboard_worker.max_retries')")),
        "git": (cmd("git", "-C", ROOT, "rev-parse", "--short", "HEAD") or "no commit") +
               (" + uncommitted changes" if cmd("git", "-C", ROOT, "status", "--porcelain", "--", "src", "sql",
                                                "Makefile", "storyboard_worker.control") else ""),
    }
    conn.close()
    return facts


def main():
    t_start = time.time()
    conn = setup_database()
    RESULTS["machine"] = machine_facts()
    path = write_messages(conn)
    purge()
    use_plugins(conn, ["subscription"])
    captured = capture_statements(conn, path)
    RESULTS["captured"] = captured
    scripts = write_pgbench_scripts(captured)
    save()

    ws = CFG["workers"]
    for workload in CFG["workloads"]:
        n = CFG["events"] if workload == "noop" else CFG["sub_events"]
        plugins = ["noop"] if workload == "noop" else ["subscription"]
        for w in ws:
            if workload == "noop":
                retried(amqp_run, w, n, path)
            retried(pgbench_run, conn, workload, w, scripts[workload])
            retried(pgbench_run, conn, workload, w, scripts[workload], True)
            retried(ext_run, conn, workload, w, n, path, plugins)
            retried(baseline_run, conn, workload, w, path)

    # latency at half the peak rate, at the best worker_count; batch_size; idle CPU
    for workload in CFG["workloads"]:
        ext = [r for r in RESULTS["runs"] if r["kind"] == "ext" and r["workload"] == workload
               and r.get("steady_rate")]
        if not ext:
            continue
        # the worker_count an operator would pick: the fewest workers within 5 % of the best rate
        # (on 2 cores, 2 and 8 workers drain a backlog alike, but 8 compete for the CPU at half load)
        top = max(r["steady_rate"] for r in ext)
        best = min((r for r in ext if r["steady_rate"] >= 0.95 * top), key=lambda r: r["workers"])
        plugins = ["noop"] if workload == "noop" else ["subscription", "probe"]
        n = CFG["events"] if workload == "noop" else CFG["sub_events"]
        # the peak with the publisher running on the same machine, and half of it
        conc = retried(concurrent_run, conn, workload, best["workers"], n, path, plugins[:1])
        if conc.get("rate"):
            # The streamed peak is not what the machine sustains when messages come one by one
            # (as StoryBoard's API publishes them): the broker then spends about three times
            # the CPU per message.  Publish one by one at the streamed peak for a few seconds:
            # the rate kept up with is the paced peak, and half of it the half load.
            probe = retried(latency_run, conn, workload, best["workers"], conc["rate"], path, plugins,
                            basis="paced peak probe", secs=max(2, CFG["latency_secs"] // 3))
            paced = min(conc["rate"], probe.get("kept_up_rate") or conc["rate"],
                        probe["publish"].get("rate") or conc["rate"])
            retried(latency_run, conn, workload, best["workers"], paced / 2.0, path, plugins,
                    basis="concurrent")
            retried(broker_floor_run, conn, best["workers"], paced / 2.0, path)
            # half the streamed peak (the earlier definition of half load), when that is higher
            if conc["rate"] / 2.0 > paced / 2.0 * 1.05:
                retried(latency_run, conn, workload, best["workers"], conc["rate"] / 2.0, path, plugins,
                        basis="streamed peak")
            # the headline rate with the most workers measured, when that is not the pick above
            if max(ws) != best["workers"]:
                retried(latency_run, conn, workload, max(ws), paced / 2.0, path, plugins,
                        basis="concurrent, most workers")
        # and half of the pre-loaded peak, which leaves less than half of the machine idle
        retried(latency_run, conn, workload, best["workers"], best["steady_rate"] / 2.0, path, plugins,
                basis="preloaded")
        if CFG["batch_size_extra"] > 1:
            n = CFG["events"] if workload == "noop" else CFG["sub_events"]
            retried(ext_run, conn, workload, best["workers"], n, path, plugins[:1],
                    batch=CFG["batch_size_extra"], kind="ext_batch")
    idle_run(conn, max(ws))
    ack_cost_runs(max(ws), min(CFG["events"], 10000), path)
    if CFG["profile"] and subprocess.run(["perf", "stat", "-e", "cpu-clock", "true"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
        for workload in CFG["workloads"]:
            n = CFG["events"] if workload == "noop" else CFG["sub_events"]
            profile_run(conn, workload, n // 2, path, ["noop"] if workload == "noop" else ["subscription"])
            if workload == "noop":
                profile_run(conn, workload, n // 2, path, ["noop"], reads_author=True)
    RESULTS["duration_s"] = time.time() - t_start
    save()
    log("done in %.0f s" % RESULTS["duration_s"])


if __name__ == "__main__":
    main()
