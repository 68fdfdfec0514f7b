#!/usr/bin/python3
"""A StoryBoard-style event worker, for the benchmark's baseline.

A re-creation (not a copy) of StoryBoard's worker as the reference describes
it (storyboard-events.md sections 4.2-4.4 and 5.1-5.2), with pika and
psycopg2 instead of pika and SQLAlchemy/oslo.db:

* N processes (the DaemonManager's children), each with its own
  BlockingConnection (confirm_delivery, exchange and queue declared and bound
  as subscriber.py does) and its own pooled database connection (oslo.db's
  engine keeps one per process);
* each process polls with basic_get(no_ack=False) and sleeps 5 seconds when
  the queue is empty (no basic.consume, no prefetch);
* for each message, for each plugin: json.loads(body), every value
  `payload[key] or None`, one database transaction that resolves the author
  (SELECT the users row) and runs the plugin's handle(), then COMMIT
  (ROLLBACK on an exception, which is logged and swallowed);
* basic_ack, always, after all plugins.

Plugins (--workload):
  noop          the benchmark's no-op plugin: the same INSERT as
                bench.noop_plugin;
  subscription  StoryBoard's subscription plugin, done the way StoryBoard does
                it: subscription_get_all_subscriber_ids() with one query per
                step and per target type, then for every subscriber: load the
                user, load its preferences, (user_comment: resolve the
                comment, its first event and its story), event_get() with the
                private-story/worklist/board filters, and one INSERT into
                subscription_events.

Modes:
  run   process messages until --expect were handled (or --max-seconds),
        then print a JSON report (count, first message time, last commit
        time) and stop the processes;
  idle  run the processes against an empty queue for --max-seconds and print
        the CPU time they used.

Run with /usr/bin/python3 (Debian's python3-pika and python3-psycopg2).
"""

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import time

import pika
import psycopg2

EXCHANGE = "storyboard"
QUEUE = "storyboard_events"
BINDING_KEYS = ["task", "story", "project", "project_group", "timeline_event"]
BODY_KEYS = ("author_id", "method", "url", "path", "query_string", "status",
             "resource", "resource_id", "sub_resource", "sub_resource_id",
             "resource_before", "resource_after")


# ---------------------------------------------------------------- plugins
class NoopPlugin:
    name = "noop"

    def handle(self, cur, author, resource_id=None, resource_after=None, **kw):
        pub = (resource_after or {}).get("bench_published_us")
        cur.execute("INSERT INTO bench.noop_events (resource_id, published_us) VALUES (%s, %s)",
                    (resource_id, int(pub) if pub is not None else None))


STORY_VIEWER = """
 (EXISTS (SELECT 1 FROM story_permissions sp JOIN permissions p ON p.id = sp.permission_id
            JOIN user_permissions up ON up.permission_id = p.id
           WHERE sp.story_id = s.id AND up.user_id = %(uid)s)
  OR EXISTS (SELECT 1 FROM story_permissions sp JOIN permissions p ON p.id = sp.permission_id
            JOIN team_permissions tp ON tp.permission_id = p.id
            JOIN team_membership tm ON tm.team_id = tp.team_id
           WHERE sp.story_id = s.id AND tm.user_id = %(uid)s))"""

EVENT_GET = """
SELECT e.id, e.created_at, e.updated_at, e.story_id, e.comment_id, e.author_id,
       e.event_type, e.event_info, e.board_id, e.worklist_id
  FROM events e
  LEFT OUTER JOIN stories s ON s.id = e.story_id
  LEFT OUTER JOIN worklists w ON w.id = e.worklist_id
  LEFT OUTER JOIN boards b ON b.id = e.board_id
 WHERE e.id = %(eid)s
   AND (s.id IS NULL OR s.private = false OR """ + STORY_VIEWER + """)
   AND (w.id IS NULL OR w.private = false OR EXISTS (
        SELECT 1 FROM worklist_permissions wp JOIN user_permissions up ON up.permission_id = wp.permission_id
         WHERE wp.worklist_id = w.id AND up.user_id = %(uid)s))
   AND (b.id IS NULL OR b.private = false OR EXISTS (
        SELECT 1 FROM board_permissions bp JOIN user_permissions up ON up.permission_id = bp.permission_id
         WHERE bp.board_id = b.id AND up.user_id = %(uid)s))
 LIMIT 1"""

USER_COLUMNS = ("id, created_at, updated_at, full_name, email, openid, is_staff, is_active,"
                " is_superuser, last_login, enable_login")


class SubscriptionPlugin:
    """storyboard.plugin.subscription.base:Subscription, section 5.1."""
    name = "subscription"

    def handle(self, cur, author, method=None, resource=None, resource_id=None,
               sub_resource=None, sub_resource_id=None, resource_after=None, **kw):
        if resource == "timeline_event":
            story_id = resource_after.get("story_id")
            worklist_id = resource_after.get("worklist_id")
            if story_id is not None:
                subscribers = self.subscriber_ids(cur, "story", story_id)
                self.handle_timeline_events(cur, resource_after, author, subscribers)
            if worklist_id is not None:
                subscribers = self.subscriber_ids(cur, "worklist", worklist_id)
                self.handle_timeline_events(cur, resource_after, author, subscribers)
        elif resource == "project_group":
            subscribers = self.subscriber_ids(cur, "project_group", resource_id)
            self.handle_resources(cur, method, resource_id, sub_resource_id, author, subscribers)
        if method == "DELETE" and not (sub_resource_id or sub_resource):
            self.handle_deletions(cur, resource, resource_id)

    # section 5.2
    def subscriber_ids(self, cur, resource, resource_id):
        affected = {"project_group": set(), "project": set(), "story": set(),
                    "task": set(), "worklist": set()}
        if resource not in affected:
            return set()
        affected[resource].add(int(resource_id))
        users = None
        if resource == "story":
            cur.execute("SELECT id, created_at, updated_at, creator_id, title, description, is_bug,"
                        " story_type_id, private FROM stories WHERE id = %s LIMIT 1", (resource_id,))
            story = cur.fetchone()
            if story[8]:   # private: the users of story.permissions[0]
                cur.execute("SELECT p.id FROM permissions p JOIN story_permissions sp"
                            " ON sp.permission_id = p.id WHERE sp.story_id = %s", (resource_id,))
                perms = cur.fetchall()
                cur.execute("SELECT u.id FROM users u JOIN user_permissions up ON up.user_id = u.id"
                            " WHERE up.permission_id = %s", (perms[0][0],))
                users = [r[0] for r in cur.fetchall()]
            cur.execute("SELECT id FROM tasks WHERE story_id = ANY(%s)", (list(affected["story"]),))
            affected["task"] |= {r[0] for r in cur.fetchall()}
        elif resource == "task":
            cur.execute("SELECT story_id FROM tasks WHERE id = %s", (resource_id,))
            affected["story"].add(cur.fetchone()[0])
        if affected["task"]:
            cur.execute("SELECT DISTINCT project_id FROM tasks WHERE id = ANY(%s)", (list(affected["task"]),))
            affected["project"] |= {r[0] for r in cur.fetchall()}
        if affected["project"]:
            cur.execute("SELECT DISTINCT project_group_id FROM project_group_mapping"
                        " WHERE project_id = ANY(%s)", (list(affected["project"]),))
            affected["project_group"] |= {r[0] for r in cur.fetchall()}
        subscribers = set()
        for target_type, ids in affected.items():
            sql = ("SELECT DISTINCT user_id FROM subscriptions WHERE target_type = %s"
                   " AND target_id = ANY(%s::int[])")
            args = [target_type, list(ids)]
            if users is not None:
                sql += " AND user_id = ANY(%s::int[])"
                args.append(users)
            cur.execute(sql, args)
            subscribers |= {r[0] for r in cur.fetchall()}
        return subscribers

    def handle_timeline_events(self, cur, event, author, subscribers):
        for user_id in subscribers:
            cur.execute("SELECT " + USER_COLUMNS + " FROM users WHERE id = %s LIMIT 1", (user_id,))
            cur.fetchone()
            cur.execute("SELECT id, created_at, updated_at, user_id, key, type, value"
                        " FROM user_preferences WHERE user_id = %s", (user_id,))
            prefs = {r[4]: r for r in cur.fetchall()}
            pref = prefs.get("receive_notifications_worklists")
            send_notification = pref[6] if pref is not None and pref[5] == "string" else None
            if send_notification != "true" and event.get("worklist_id") is not None:
                continue
            if event["event_type"] == "user_comment":
                event_info = json.dumps(self.resolve_comments(cur, event))
            else:
                event_info = event["event_info"]
            cur.execute(EVENT_GET, {"eid": event["id"], "uid": user_id})
            if cur.fetchone() is None:     # is_visible()
                continue
            cur.execute("INSERT INTO subscription_events (created_at, subscriber_id, event_type,"
                        " event_info, author_id) VALUES (now() AT TIME ZONE 'UTC', %s, %s, %s, %s)"
                        " RETURNING id",
                        (user_id, event["event_type"], event_info, author[0] if author else None))

    def resolve_comments(self, cur, event):
        if "comment_id" not in event:
            return None
        cur.execute("SELECT id, created_at, updated_at, content, is_active, in_reply_to"
                    " FROM comments WHERE id = %s LIMIT 1", (event["comment_id"],))
        comment = cur.fetchone()
        if comment is None:
            return None
        cur.execute("SELECT id, story_id FROM events WHERE comment_id = %s LIMIT 1", (comment[0],))
        ev = cur.fetchone()
        if ev is None:
            return None
        cur.execute("SELECT id, title FROM stories WHERE id = %s LIMIT 1", (ev[1],))
        story = cur.fetchone()
        if story is None:
            return None
        return {"comment_id": comment[0], "comment_content": comment[3],
                "story_id": story[0], "story_title": story[1]}

    def handle_resources(self, cur, method, resource_id, sub_resource_id, author, subscribers):
        if sub_resource_id:
            event_type = ("project removed from project_group" if method == "DELETE"
                          else "project added to project_group")
            info = json.dumps({"project_group_id": resource_id, "project_id": sub_resource_id})
        elif method == "DELETE":
            event_type = "project_group deleted"
            info = json.dumps({"project_group_id": resource_id})
        else:
            return
        for user_id in subscribers:
            cur.execute("INSERT INTO subscription_events (created_at, subscriber_id, event_type,"
                        " event_info, author_id) VALUES (now() AT TIME ZONE 'UTC', %s, %s, %s, %s)"
                        " RETURNING id", (user_id, event_type, info, author[0] if author else None))

    def handle_deletions(self, cur, resource, resource_id):
        cur.execute("SELECT id FROM subscriptions WHERE target_type::text LIKE %s AND target_id = %s",
                    ("%" + resource[:-1] + "%", resource_id))
        for (sid,) in cur.fetchall():
            cur.execute("SELECT id FROM subscriptions WHERE id = %s", (sid,))
            cur.execute("DELETE FROM subscriptions WHERE id = %s", (sid,))


PLUGINS = {"noop": NoopPlugin, "subscription": SubscriptionPlugin}


# ---------------------------------------------------------------- one worker process
def subscribe(idx, args, counts, first_get, last_commit, errors):
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    plugins = [PLUGINS[args.workload]()]
    db = psycopg2.connect(args.dsn)
    params = pika.URLParameters(args.url)
    conn = pika.BlockingConnection(params)
    channel = conn.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange=EXCHANGE, exchange_type="topic", durable=True,
                             auto_delete=False)
    channel.queue_declare(queue=QUEUE, durable=True)
    for key in BINDING_KEYS:
        channel.queue_bind(exchange=EXCHANGE, queue=QUEUE, routing_key=key)

    while True:
        method, properties, body = channel.basic_get(queue=QUEUE, auto_ack=False)
        if not method or not properties:
            time.sleep(5)     # "No messages available, sleeping for 5 seconds."
            continue
        if first_get[idx] == 0.0:
            first_get[idx] = time.time()
        for plugin in plugins:
            try:
                payload = json.loads(body)
                kw = {k: payload[k] or None for k in BODY_KEYS}
                cur = db.cursor()
                # WorkerTaskBase.event(): session.begin() ... commit
                cur.execute("SELECT " + USER_COLUMNS + " FROM users WHERE id = %s LIMIT 1",
                            (kw["author_id"],))
                author = cur.fetchone()
                plugin.handle(cur, author, **kw)
                db.commit()
                last_commit[idx] = time.time()
            except Exception as exc:   # logged and swallowed, as StoryBoard does
                db.rollback()
                errors[idx] += 1
                if errors[idx] <= 3:
                    print("baseline worker %d: %s: %s" % (idx, plugin.name, exc), file=sys.stderr)
        channel.basic_ack(method.delivery_tag)
        counts[idx] += 1


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])     # utime + stime


def rss_kb(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["run", "idle"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--workload", choices=sorted(PLUGINS), required=True)
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--expect", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=60)
    args = ap.parse_args()

    n = args.workers
    counts = mp.Array("l", n, lock=False)
    first_get = mp.Array("d", n, lock=False)
    last_commit = mp.Array("d", n, lock=False)
    errors = mp.Array("l", n, lock=False)
    t_start = time.time()
    procs = [mp.Process(target=subscribe, args=(i, args, counts, first_get, last_commit, errors))
             for i in range(n)]
    for p in procs:
        p.start()
    result = {"workers": n, "workload": args.workload, "start": t_start}
    try:
        if args.mode == "run":
            deadline = t_start + args.max_seconds
            rss_start = None
            while time.time() < deadline and sum(counts) < args.expect:
                if rss_start is None and sum(counts) > 0:
                    rss_start = [rss_kb(p.pid) for p in procs]
                if any(not p.is_alive() for p in procs):
                    raise SystemExit("a baseline worker died")
                time.sleep(0.05)
            done = sum(counts)
            firsts = [t for t in first_get if t > 0]
            last = max(last_commit)
            result.update(processed=done, errors=sum(errors), first_get=min(firsts) if firsts else None,
                          last_commit=last, timed_out=done < args.expect,
                          rss_start_kb=rss_start, rss_end_kb=[rss_kb(p.pid) for p in procs])
            if firsts and done > 1:
                result["rate"] = (done - 1) / (last - min(firsts))
                result["rate_from_start"] = done / (last - t_start)
        else:
            time.sleep(2)       # connected and polling
            t0 = time.time()
            c0 = [cpu_ticks(p.pid) for p in procs]
            time.sleep(args.max_seconds)
            c1 = [cpu_ticks(p.pid) for p in procs]
            hz = os.sysconf("SC_CLK_TCK")
            secs = time.time() - t0
            result.update(seconds=secs, cpu_seconds=[(b - a) / hz for a, b in zip(c0, c1)])
            result["cpu_percent_per_worker"] = [100.0 * c / secs for c in result["cpu_seconds"]]
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
