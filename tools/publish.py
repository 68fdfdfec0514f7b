#!/usr/bin/python3
"""Publish StoryBoard API events to RabbitMQ exactly as StoryBoard does.

StoryBoard's publisher (storyboard/notifications/publisher.py) uses a pika
BlockingConnection with PlainCredentials, turns publisher confirms on, declares
the exchange (topic, durable, not auto-delete) and publishes with routing key =
resource, properties app_id='storyboard' and content_type='application/json'
(no delivery_mode: transient messages) and the body
json.dumps(payload, ensure_ascii=False) of a 12-key dict.  This module does the
same; unlike StoryBoard it does not ignore the confirm, so a caller knows the
broker has the message once publish() returns.

Library:
    from publish import Publisher, task_status_changed
    with Publisher("amqp://guest:guest@127.0.0.1:5672/%2F") as pub:
        for body in task_status_changed(task_id=1, story_id=1, old="todo", new="merged"):
            pub.publish(body)

Command line (run with /usr/bin/python3, which sees Debian's python3-pika):
    tools/publish.py --url URL demo                 # the demo's sample events
    tools/publish.py --url URL story-created --story-id 7 --title "A story"
    tools/publish.py --url URL task-status --task-id 3 --story-id 7 --old todo --new merged
    tools/publish.py --url URL comment --story-id 7 --comment-id 12
    tools/publish.py --url URL project-group --group-id 1 --project-id 3
    tools/publish.py --url URL bulk --count 500 --prefix run1
    tools/publish.py --url URL raw --routing-key task --body '{"not": "storyboard"}'
    tools/publish.py ... --print                    # print the bodies instead of publishing
"""

import argparse
import datetime
import json
import os
import sys
import urllib.parse

# The 12 keys of StoryBoard's message body, in publish()'s order.
BODY_KEYS = ("author_id", "method", "url", "path", "query_string", "status",
             "resource", "resource_id", "sub_resource", "sub_resource_id",
             "resource_before", "resource_after")

WEBCLIENT_URL = "https://storyboard.example.org/"


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _iso(ts):
    """StoryBoard serialises datetimes as ISO 8601 with +00:00."""
    if ts is None or isinstance(ts, str):
        return ts
    return ts.isoformat()


def event_body(resource, *, author_id=None, method=None, url=None, path=None,
               query_string=None, status=None, resource_id=None,
               sub_resource=None, sub_resource_id=None, resource_before=None,
               resource_after=None):
    """The dict storyboard.notifications.publisher.publish() builds: 12 keys."""
    return {
        "author_id": author_id,
        "method": method,
        "url": url,
        "path": path,
        "query_string": query_string,
        "status": status,
        "resource": resource,
        "resource_id": resource_id,
        "sub_resource": sub_resource,
        "sub_resource_id": sub_resource_id,
        "resource_before": resource_before,
        "resource_after": resource_after,
    }


# ---------------------------------------------------------------- snapshots (section 2.6)
def story_json(story_id, title="A story", description="", *, creator_id=1,
               is_bug=True, story_type_id=1, private=False, created_at=None,
               updated_at=None):
    return {"id": story_id, "created_at": _iso(created_at) or _now(),
            "updated_at": _iso(updated_at), "title": title,
            "description": description, "is_bug": is_bug,
            "creator_id": creator_id, "story_type_id": story_type_id,
            "private": private}


def task_json(task_id, story_id, *, title="A task", status="todo",
              creator_id=1, link=None, project_id=1, assignee_id=None,
              priority="medium", branch_id=1, milestone_id=None,
              created_at=None, updated_at=None):
    return {"id": task_id, "created_at": _iso(created_at) or _now(),
            "updated_at": _iso(updated_at), "title": title, "status": status,
            "creator_id": creator_id, "story_id": story_id, "link": link,
            "project_id": project_id, "assignee_id": assignee_id,
            "priority": priority, "branch_id": branch_id,
            "milestone_id": milestone_id}


def project_group_json(group_id, name="group", title="A project group",
                       created_at=None, updated_at=None):
    return {"id": group_id, "created_at": _iso(created_at) or _now(),
            "updated_at": _iso(updated_at), "name": name, "title": title}


def timeline_event_json(event_id, event_type, *, story_id=None,
                        worklist_id=None, board_id=None, author_id=None,
                        comment_id=None, event_info=None, created_at=None):
    """event_info is a dict (JSON-encoded into a string, as StoryBoard stores it) or None."""
    return {"id": event_id, "created_at": _iso(created_at) or _now(),
            "updated_at": None, "event_type": event_type,
            "event_info": None if event_info is None else json.dumps(event_info),
            "story_id": story_id, "worklist_id": worklist_id,
            "board_id": board_id, "author_id": author_id,
            "comment_id": comment_id}


def timeline_event(event_id, event_type, *, path, author_id=1, status=200,
                   url=WEBCLIENT_URL, **kw):
    """The timeline_event message: always POST, resource_id is the event id (int)."""
    return event_body("timeline_event", author_id=author_id, method="POST",
                      url=url, path=path, query_string=None, status=status,
                      resource_id=event_id,
                      resource_after=timeline_event_json(
                          event_id, event_type, author_id=author_id, **kw))


# ---------------------------------------------------------------- API actions (section 2.7)
def story_created(story_id, title="A story", *, author_id=1, event_id=None,
                  description="", url=WEBCLIENT_URL):
    """POST /v1/stories: hook message (resource_id int from the response) + story_created."""
    after = story_json(story_id, title, description, creator_id=author_id)
    bodies = [event_body("story", author_id=author_id, method="POST", url=url,
                         path="/v1/stories", query_string="", status=201,
                         resource_id=story_id, resource_after=after)]
    if event_id is not None:
        bodies.append(timeline_event(
            event_id, "story_created", path="/v1/stories", author_id=author_id,
            status=201, url=url, story_id=story_id,
            event_info={"story_id": story_id, "story_title": title}))
    return bodies


def task_status_changed(task_id, story_id, old="todo", new="merged", *,
                        author_id=1, event_id=None, title="A task",
                        project_id=1, assignee_id=None, url=WEBCLIENT_URL,
                        query_string=""):
    """PUT /v1/tasks/<id>: hook message (resource_id a string, from the URL) + task_status_changed."""
    created = "2019-04-01T10:00:00+00:00"
    before = task_json(task_id, story_id, title=title, status=old,
                       project_id=project_id, assignee_id=assignee_id,
                       created_at=created)
    after = dict(before, status=new, updated_at=_now())
    path = "/v1/tasks/%d" % task_id
    bodies = [event_body("task", author_id=author_id, method="PUT", url=url,
                         path=path, query_string=query_string, status=200,
                         resource_id=str(task_id), resource_before=before,
                         resource_after=after)]
    if event_id is not None:
        bodies.append(timeline_event(
            event_id, "task_status_changed", path=path, author_id=author_id,
            url=url, story_id=story_id,
            event_info={"story_id": story_id, "task_id": task_id,
                        "task_title": title, "old_status": old,
                        "new_status": new}))
    return bodies


def comment_added(story_id, comment_id, *, author_id=1, event_id=None,
                  title="A story", url=WEBCLIENT_URL):
    """POST /v1/stories/<id>/comments: hook (sub_resource comment, int id) + user_comment."""
    snap = story_json(story_id, title, created_at="2019-04-01T10:00:00+00:00")
    path = "/v1/stories/%d/comments" % story_id
    bodies = [event_body("story", author_id=author_id, method="POST", url=url,
                         path=path, query_string="", status=201,
                         resource_id=str(story_id), sub_resource="comment",
                         sub_resource_id=comment_id, resource_before=snap,
                         resource_after=snap)]
    if event_id is not None:
        bodies.append(timeline_event(
            event_id, "user_comment", path=path, author_id=author_id,
            status=201, url=url, story_id=story_id, comment_id=comment_id,
            event_info=None))
    return bodies


def project_group_project_added(group_id, project_id, *, author_id=1,
                                url=WEBCLIENT_URL):
    """PUT /v1/project_groups/<g>/projects/<p>: ids are strings from the URL."""
    snap = project_group_json(group_id, created_at="2019-04-01T10:00:00+00:00")
    return [event_body("project_group", author_id=author_id, method="PUT",
                       url=url, path="/v1/project_groups/%d/projects/%d" % (group_id, project_id),
                       query_string="", status=200, resource_id=str(group_id),
                       sub_resource="project", sub_resource_id=str(project_id),
                       resource_before=snap, resource_after=snap)]


def demo_events():
    """The demo's sample: a story created, a task status change, a comment."""
    return (story_created(1, "Demo: the worker runs inside PostgreSQL", author_id=1, event_id=101)
            + task_status_changed(1, 1, "inprogress", "merged", author_id=2, event_id=102,
                                  title="Write the consumer")
            + comment_added(1, 1, author_id=2, event_id=103,
                            title="Demo: the worker runs inside PostgreSQL"))


def encode(payload):
    """json.dumps(payload, ensure_ascii=False), as UTF-8 bytes (what pika sends)."""
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- publisher
class Publisher:
    """One BlockingConnection + channel with confirms, like StoryBoard's Publisher.

    publish() returns once the broker confirmed the message.  With
    mandatory=True (not what StoryBoard does) an unroutable message raises
    pika.exceptions.UnroutableError instead of silently vanishing, so a test
    learns that no queue was bound yet.
    """

    def __init__(self, url=None, exchange="storyboard", mandatory=False,
                 host="127.0.0.1", port=5672, userid="guest",
                 password="guest", virtual_host="/"):
        import pika  # Debian's python3-pika: run with /usr/bin/python3
        self._pika = pika
        if url:
            params = pika.URLParameters(url)
        else:
            params = pika.ConnectionParameters(
                host, port, virtual_host,
                pika.PlainCredentials(userid, password))
        self.exchange = exchange
        self.mandatory = mandatory
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.channel.exchange_declare(exchange=exchange, exchange_type="topic",
                                      durable=True, auto_delete=False)
        self.properties = pika.BasicProperties(app_id="storyboard",
                                               content_type="application/json")
        self.published = 0

    def publish(self, payload):
        """Publish one 12-key body; the routing key is its resource."""
        if not payload.get("resource"):
            raise ValueError("StoryBoard sends nothing without a resource")
        self.publish_raw(payload["resource"],
                         json.dumps(payload, ensure_ascii=False))

    def publish_raw(self, routing_key, body, properties=None):
        """Any body (str is sent as UTF-8, bytes as they are): for poison messages."""
        self.channel.basic_publish(self.exchange, routing_key, body,
                                   properties or self.properties,
                                   mandatory=self.mandatory)
        self.published += 1

    def publish_many(self, payloads):
        for p in payloads:
            self.publish(p)

    def close(self):
        try:
            if self.connection.is_open:
                self.connection.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bulk_events(count, prefix, *, start_id=1):
    """count distinct task status changes; query_string carries a unique key."""
    out = []
    for i in range(count):
        out.extend(task_status_changed(
            start_id + i, 1 + i % 7, "todo", "inprogress",
            author_id=1 + i % 3, title="Bulk task %d ü" % i,
            query_string="key=%s-%d" % (prefix, i)))
    return out


def default_url():
    if os.environ.get("AMQP_URL"):
        return os.environ["AMQP_URL"]
    return "amqp://guest:guest@127.0.0.1:5672/%2F"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=default_url(),
                    help="amqp://user:password@host:port/vhost (default $AMQP_URL)")
    ap.add_argument("--exchange", default="storyboard")
    ap.add_argument("--mandatory", action="store_true",
                    help="fail if no queue is bound for the routing key")
    ap.add_argument("--print", dest="print_only", action="store_true",
                    help="print the bodies, publish nothing")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="a story created, a task status change, a comment")
    p = sub.add_parser("story-created")
    p.add_argument("--story-id", type=int, required=True)
    p.add_argument("--title", default="A story")
    p.add_argument("--author-id", type=int, default=1)
    p.add_argument("--event-id", type=int)
    p = sub.add_parser("task-status")
    p.add_argument("--task-id", type=int, required=True)
    p.add_argument("--story-id", type=int, required=True)
    p.add_argument("--old", default="todo")
    p.add_argument("--new", default="merged")
    p.add_argument("--title", default="A task")
    p.add_argument("--author-id", type=int, default=1)
    p.add_argument("--event-id", type=int)
    p = sub.add_parser("comment")
    p.add_argument("--story-id", type=int, required=True)
    p.add_argument("--comment-id", type=int, required=True)
    p.add_argument("--title", default="A story", help="the story's title")
    p.add_argument("--author-id", type=int, default=1)
    p.add_argument("--event-id", type=int)
    p = sub.add_parser("project-group")
    p.add_argument("--group-id", type=int, required=True)
    p.add_argument("--project-id", type=int, required=True)
    p.add_argument("--author-id", type=int, default=1)
    p = sub.add_parser("bulk", help="COUNT task events keyed PREFIX-i in query_string")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--prefix", default="bulk")
    p = sub.add_parser("raw", help="any body, any routing key")
    p.add_argument("--routing-key", required=True)
    p.add_argument("--body", required=True)
    a = ap.parse_args(argv)

    if a.cmd == "raw":
        if a.print_only:
            print(a.body)
            return 0
        with Publisher(a.url, a.exchange, a.mandatory) as pub:
            pub.publish_raw(a.routing_key, a.body)
        print("published 1 message (routing key %s)" % a.routing_key)
        return 0
    if a.cmd == "demo":
        bodies = demo_events()
    elif a.cmd == "story-created":
        bodies = story_created(a.story_id, a.title, author_id=a.author_id, event_id=a.event_id)
    elif a.cmd == "task-status":
        bodies = task_status_changed(a.task_id, a.story_id, a.old, a.new, title=a.title,
                                     author_id=a.author_id, event_id=a.event_id)
    elif a.cmd == "comment":
        bodies = comment_added(a.story_id, a.comment_id, author_id=a.author_id,
                               event_id=a.event_id, title=a.title)
    elif a.cmd == "project-group":
        bodies = project_group_project_added(a.group_id, a.project_id, author_id=a.author_id)
    else:
        bodies = bulk_events(a.count, a.prefix)
    if a.print_only:
        for b in bodies:
            print(json.dumps(b, ensure_ascii=False))
        return 0
    with Publisher(a.url, a.exchange, a.mandatory) as pub:
        for b in bodies:
            pub.publish(b)
            if a.cmd != "bulk":
                print("published %-14s %s %s" % (b["resource"], b["method"], b["path"]))
    print("%d message(s) confirmed by %s" % (len(bodies), urllib.parse.urlsplit(a.url).netloc.split("@")[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
