"""The built-in 'email' plugin and the mailer, end to end: StoryBoard's messages
through RabbitMQ, rows in storyboard_worker.outbox, mail delivered by libcurl
to a real SMTP server (test/smtp_sink.py, aiosmtpd) on loopback: plain,
STARTTLS + AUTH, implicit TLS; 4xx and 5xx on demand; the server down."""

import email
import email.policy
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

import sbw
from sbw import wait_for

FIXTURES = os.path.join(sbw.TEST_DIR, "fixtures")
SCHEMA = os.path.join(FIXTURES, "storyboard_schema.sql")
DATA = os.path.join(FIXTURES, "storyboard_mock_data.sql")
SINK = os.path.join(sbw.TEST_DIR, "smtp_sink.py")
URL = "https://storyboard.example.org/"
SMTP_USER, SMTP_PASSWORD = "sbmailer", "s3cret-pw"

# ann: mail at once; bob: digest; cid: no preference; dee: email off; eve: in the
# team that may see the private story; fay: worklist mail too; gus: a bool 'True'
USERS = """
INSERT INTO users (id, email, full_name) VALUES
  (501, 'ann@example.com', 'Ann Immediate'), (502, 'bob@example.com', 'Bob Digest'),
  (503, 'cid@example.com', 'Cid Nopref'), (504, 'dee@example.com', 'Dee Disabled'),
  (505, 'eve@example.com', 'Eve Team'), (506, 'fay@example.com', 'Fay Worklists'),
  (507, 'gus@example.com', 'Gus Bool');
INSERT INTO user_preferences (user_id, key, value, type) VALUES
  (501, 'plugin_email_enable', 'true', 'string'),
  (502, 'plugin_email_enable', 'true', 'string'), (502, 'plugin_email_digest', 'true', 'string'),
  (502, 'plugin_email_digest_time', '0', 'int'),
  (504, 'plugin_email_enable', 'false', 'string'),
  (505, 'plugin_email_enable', 'true', 'string'),
  (506, 'plugin_email_enable', 'true', 'string'),
  (506, 'receive_notifications_worklists', 'true', 'string'),
  (507, 'plugin_email_enable', 'True', 'bool');
INSERT INTO projects (id, name, description) VALUES (501, 'mail/project', 'mail tests');
INSERT INTO stories (id, title, description, private, created_at) VALUES
  (501, 'Mail story', 'About mail', false, '2026-01-02 03:04:00'),
  (502, 'Secret story', 'Hidden', true, '2026-01-02 03:05:00');
INSERT INTO permissions (id, name, codename) VALUES (501, 'view_story_502', 'view_story');
INSERT INTO story_permissions (story_id, permission_id) VALUES (502, 501);
INSERT INTO user_permissions (user_id, permission_id) VALUES (501, 501);
INSERT INTO teams (id, name) VALUES (501, 'mail_team');
INSERT INTO team_membership (team_id, user_id) VALUES (501, 505);
INSERT INTO team_permissions (team_id, permission_id) VALUES (501, 501);
INSERT INTO tasks (id, creator_id, title, status, story_id, project_id, assignee_id, priority) VALUES
  (501, 501, 'Mail task', 'todo', 501, 501, 501, 'high'),
  (502, 501, 'Secret task', 'todo', 502, 501, 501, 'low');
INSERT INTO worklists (id, title, private, created_at) VALUES (501, 'Mail worklist', false, '2026-01-02 03:06:00');
INSERT INTO comments (id, content) VALUES (501, 'First!  A comment, with <b>markup</b>.');
INSERT INTO storytags (id, name) VALUES (501, 'urgent fix'), (502, 'later');
INSERT INTO story_storytags (story_id, storytag_id) VALUES (501, 502);
INSERT INTO subscriptions (user_id, target_type, target_id)
  SELECT u, t::target_type, i FROM generate_series(501, 507) u,
         (VALUES ('story', 501), ('story', 502), ('worklist', 501)) s(t, i);
"""


class Sink:
    """test/smtp_sink.py as a child process, stopped by its PID."""

    def __init__(self, services):
        self.dir = tempfile.mkdtemp(prefix="sbw-smtp.", dir="/tmp")
        os.chmod(self.dir, 0o755)    # the server (user postgres) reads the CA file
        self.maildir = os.path.join(self.dir, "mail")
        os.makedirs(self.maildir)
        self.cert, self.key = os.path.join(self.dir, "sink.pem"), os.path.join(self.dir, "sink.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key,
                        "-out", self.cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True)
        os.chmod(self.cert, 0o644)
        self.port, self.tls_port, self.implicit_port = _free_ports(3)
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", SINK, self.maildir, str(self.port), str(self.tls_port),
             str(self.implicit_port), self.cert, self.key, SMTP_USER, SMTP_PASSWORD],
            stdout=subprocess.PIPE, stderr=open(os.path.join(self.dir, "sink.log"), "a"), text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def control(self, **kv):
        path = os.path.join(self.maildir, "control.json")
        if not kv:
            if os.path.exists(path):
                os.unlink(path)
            return
        with open(path + ".tmp", "w") as f:
            json.dump(kv, f)
        os.rename(path + ".tmp", path)

    def messages(self):
        """Every mail received: (envelope dict, parsed message)."""
        out = []
        for eml in sorted(glob.glob(os.path.join(self.maildir, "*.eml"))):
            with open(eml, "rb") as f:
                raw = f.read()
            with open(eml[:-4] + ".json") as f:
                env = json.load(f)
            env["raw"] = raw
            out.append((env, email.message_from_bytes(raw, policy=email.policy.default)))
        return out

    def by_message_id(self, message_id):
        return [(env, m) for env, m in self.messages() if m["Message-ID"] == message_id]

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_ports(n):
    import socket
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def body_text(msg):
    part = msg.get_body(preferencelist=("plain",))
    if part is None:
        for p in msg.walk():
            if p.get_content_type() == "text/plain":
                part = p
                break
    return part.get_content()


@pytest.fixture(scope="module")
def sink(services):
    s = Sink(services)
    yield s
    s.close()


@pytest.fixture(scope="module")
def mail_tables(cluster):
    if not cluster.one("SELECT to_regclass('public.subscription_events') IS NOT NULL"):
        with open(SCHEMA) as f:
            cluster.execute(f.read())
        with open(DATA) as f:
            cluster.execute(f.read())
    cluster.execute(USERS)
    return cluster


@pytest.fixture
def mail(mail_tables, sink, publisher):
    """Email on, sent to the sink's plain port; the outbox mark before the test."""
    cluster = mail_tables
    sink.control()
    cluster.set_gucs(email_enable="on", email_smtp_host="127.0.0.1", email_smtp_port=sink.port,
                     email_reply_to="StoryBoard replies <replies@example.org>",
                     email_smtp_local_hostname="sb.example.org", email_smtp_timeout=5)
    wait_for(lambda: cluster.one("SELECT mailer_pid FROM storyboard_worker.outbox_stats"), 30,
             "the mailer running")
    mark = cluster.one("SELECT coalesce(max(id), 0) FROM storyboard_worker.outbox")
    return cluster, sink, publisher, mark


def rows(cluster, mark, where="true"):
    return cluster.q("SELECT id, subscriber_id, recipient, subject, body_text, status, message_id, "
                     "in_reply_to, kind, attempts, last_error FROM storyboard_worker.outbox "
                     "WHERE id > %%s AND %s ORDER BY id" % where.replace("%", "%%"), (mark,), dicts=True)


def wait_rows(cluster, mark, n, where="true", timeout=30):
    return wait_for(lambda: len(r := rows(cluster, mark, where)) >= n and r, timeout,
                    "%d outbox rows where %s (have %r)" % (n, where, rows(cluster, mark, where)))


def story_put(story_id, old, new, author_id=501, private=False):
    before = sbw.publish.story_json(story_id, old, "d", created_at="2026-01-02T03:04:00+00:00",
                                    private=private)
    after = dict(before, title=new, updated_at="2026-12-01T10:00:00+00:00")
    return sbw.publish.event_body("story", author_id=author_id, method="PUT", url=URL,
                                  path="/v1/stories/%d" % story_id, query_string="", status=200,
                                  resource_id=str(story_id), resource_before=before,
                                  resource_after=after)


def worklist_event(event_id, event_type, info, author_id=506):
    return sbw.publish.timeline_event(event_id, event_type, path="/v1/worklists/501",
                                      author_id=author_id, worklist_id=501, event_info=info)


# ---------------------------------------------------------------- recipients

def test_recipients_follow_storyboards_rules(mail):
    cluster, sink, publisher, mark = mail
    publisher.publish(story_put(501, "Mail story", "Mail story, renamed"))
    r = wait_rows(cluster, mark, 5, "subject LIKE '%renamed%'")
    got = {(x["recipient"], x["status"] == "digest") for x in r}
    # cid (no preference) and dee ('false') get nothing; bob waits for his digest;
    # gus's bool 'True' counts (StoryBoard compares with the string 'true')
    assert got == {("ann@example.com", False), ("bob@example.com", True),
                   ("eve@example.com", False), ("fay@example.com", False),
                   ("gus@example.com", False)}, got

    mark2 = cluster.one("SELECT max(id) FROM storyboard_worker.outbox")
    publisher.publish(story_put(502, "Secret story", "Secret story v2", private=True))
    r = wait_rows(cluster, mark2, 2, "subject LIKE '%Secret story v2%'")
    time.sleep(1)   # nobody else comes later
    got = {x["recipient"] for x in rows(cluster, mark2, "subject LIKE '%Secret story v2%'")}
    # a private story: ann by her own permission, eve through her team
    assert got == {"ann@example.com", "eve@example.com"}, got

    mark3 = cluster.one("SELECT max(id) FROM storyboard_worker.outbox")
    publisher.publish(worklist_event(9001, "worklist_details_changed",
                                     {"field": "title", "old_value": "a", "new_value": "b"}))
    r = wait_rows(cluster, mark3, 1, "kind = 'worklist'")
    time.sleep(1)
    got = {x["recipient"] for x in rows(cluster, mark3, "kind = 'worklist'")}
    assert got == {"fay@example.com"}, got     # only with receive_notifications_worklists

    # a card for the private story on the worklist: fay may not see that story
    mark4 = cluster.one("SELECT max(id) FROM storyboard_worker.outbox")
    publisher.publish(worklist_event(9002, "worklist_contents_changed",
                                     {"added": {"item_type": "story", "item_id": 502,
                                                "item_title": "Secret story", "list_position": 0}}))
    publisher.publish(worklist_event(9003, "worklist_contents_changed",
                                     {"added": {"item_type": "story", "item_id": 501,
                                                "item_title": "Mail story", "list_position": 1}}))
    r = wait_rows(cluster, mark4, 1, "kind = 'worklist'")
    time.sleep(1)
    r = rows(cluster, mark4, "kind = 'worklist'")
    assert len(r) == 1 and "Mail story" in r[0]["body_text"] and "Secret" not in r[0]["body_text"], r


def test_task_created_before_its_row_is_visible_is_mailed_once_it_is(mail):
    """StoryBoard publishes before it commits: a task POST whose row (and the subscribers'
    view of it) is not there yet is retried (SB001), not mailed to nobody."""
    cluster, sink, publisher, mark = mail
    cluster.set_gucs(max_retries=10)
    p = sbw.publish
    publisher.publish(p.event_body("task", author_id=501, method="POST", url=URL, path="/v1/tasks",
                                   query_string="", status=201, resource_id=560,
                                   resource_after=p.task_json(560, 501, title="Late task",
                                                              project_id=501, assignee_id=501)))
    time.sleep(0.5)
    cluster.execute("INSERT INTO tasks (id, creator_id, title, status, story_id, project_id, assignee_id) "
                    "VALUES (560, 501, 'Late task', 'todo', 501, 501, 501)")
    try:
        r = wait_rows(cluster, mark, 5, "subject = 'Task \"Late task\" was created.'")
        assert {x["recipient"] for x in r} == {"ann@example.com", "bob@example.com", "eve@example.com",
                                               "fay@example.com", "gus@example.com"}, r
        assert cluster.one("SELECT count(*) FROM storyboard_worker.dead_letters WHERE plugin = 'email'") == 0
    finally:
        cluster.execute("DELETE FROM tasks WHERE id = 560")


def test_a_story_made_private_is_mailed_as_private(mail, services):
    """The message's snapshot decides: a PUT that makes the story private, consumed before
    StoryBoard's commit shows it, is not mailed to those who may not see it."""
    cluster, sink, publisher, mark = mail
    ev = story_put(501, "Mail story", "Now private")
    ev["resource_after"]["private"] = True
    since = cluster.one("SELECT clock_timestamp()")
    publisher.publish(ev)
    wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.ledger WHERE processed_at > %s",
                                 (since,)) >= 1, 30, "the event processed")
    got = {x["recipient"] for x in rows(cluster, mark, "subject LIKE '%Now private%'")}
    assert got == set(), got   # story 501 has no permission rows: nobody may see it


# ---------------------------------------------------------------- templates

def _publish_all_kinds(publisher):
    p = sbw.publish
    publisher.publish(p.event_body("story", author_id=501, method="POST", url=URL, path="/v1/stories",
                                   query_string="", status=201, resource_id=501,
                                   resource_after=p.story_json(501, "Mail story", "About mail")))
    publisher.publish(p.comment_added(501, 501, author_id=505, title="Mail story")[0])
    publisher.publish(p.event_body("story", author_id=501, method="PUT", url=URL,
                                   path="/v1/stories/501/tags", query_string="tags=urgent%20fix",
                                   status=200, resource_id="501", sub_resource="tag",
                                   resource_after=p.story_json(501, "Mail story")))
    publisher.publish(p.event_body("story", author_id=501, method="DELETE", url=URL,
                                   path="/v1/stories/501/tags", query_string="tags=gone",
                                   status=200, resource_id="501", sub_resource="tag",
                                   resource_after=p.story_json(501, "Mail story")))
    publisher.publish(p.event_body("task", author_id=501, method="POST", url=URL, path="/v1/tasks",
                                   query_string="", status=201, resource_id=501,
                                   resource_after=p.task_json(501, 501, title="Mail task",
                                                              project_id=501, assignee_id=501,
                                                              priority="high")))
    publisher.publish(p.task_status_changed(501, 501, "todo", "merged", author_id=501,
                                            title="Mail task", project_id=501, assignee_id=501)[0])
    publisher.publish(p.event_body("task", author_id=501, method="DELETE", url=URL,
                                   path="/v1/tasks/501", query_string="", status=204,
                                   resource_id="501",
                                   resource_before=p.task_json(501, 501, title="Mail task")))
    publisher.publish(worklist_event(9101, "worklist_created", {"title": "Mail worklist"}))
    publisher.publish(worklist_event(9102, "worklist_details_changed",
                                     {"field": "automatic", "old_value": "False", "new_value": "True"}))
    publisher.publish(worklist_event(9103, "worklist_filters_changed",
                                     {"added": {"type": "Story", "filter_criteria": "Project"}}))
    publisher.publish(worklist_event(9104, "worklist_contents_changed",
                                     {"removed": {"item_type": "task", "item_id": 501,
                                                  "item_title": "Mail task"}}))
    publisher.publish(worklist_event(9105, "worklist_permission_created",
                                     {"codename": "edit_worklist", "users": [501, 506]}))
    publisher.publish(worklist_event(9106, "worklist_permissions_changed",
                                     {"codename": "move_items", "added": [503], "removed": [501]}))


EXPECTED = [   # (subject, words in the body) for ann (story/task) or fay (worklist)
    ('Story "Mail story" was created.', ["Ann Immediate", URL + "#!/story/501", "About mail"]),
    ('Eve Team commented on "Mail story"', ["First!  A comment, with <b>markup</b>.", "#!/story/501",
                                             "Posted at"]),
    ('Tag "urgent fix" was added to story "Mail story"', ["urgent fix", "later"]),
    ('Tag "gone" was deleted from story "Mail story"', ["by Ann Immediate"]),
    ('Task "Mail task" was created.', ["Story: Mail story", "Project: mail/project",
                                       "Assignee: Ann Immediate", "Status: todo", "Priority: high"]),
    ('Task "Mail task" was updated.', ["status: todo -> merged", "Project: mail/project"]),
    ('Task "Mail task" was deleted by Ann Immediate', ["#!/story/501"]),
    ('Worklist "Mail worklist" was created by Fay Worklists', [URL + "#!/worklist/501",
                                                               "worklist_created"]),
    ('Worklist "Mail worklist" was updated by Fay Worklists', ["Automatic changed", "from: False",
                                                               "to:   True"]),
    ('Worklist "Mail worklist" had its filters modified by Fay Worklists',
     ["Filter added", "filter_criteria: Project"]),
    ('Worklist "Mail worklist" had its content updated by Fay Worklists',
     ["Card archived", "item_title: Mail task"]),
    ('New permission created for worklist "Mail worklist" by Fay Worklists',
     ["Permission: edit_worklist", "Users: Ann Immediate, Fay Worklists"]),
    ('A permission for worklist "Mail worklist" was modified by Fay Worklists',
     ["Users", "People added: Cid Nopref", "People removed: Ann Immediate"]),
]


def test_every_template_subject_and_fields(mail):
    cluster, sink, publisher, mark = mail
    cluster.execute("INSERT INTO story_storytags (story_id, storytag_id) VALUES (501, 501)")
    try:
        _publish_all_kinds(publisher)
        want = len(EXPECTED)
        r = wait_for(lambda: len(x := rows(cluster, mark, "recipient IN ('ann@example.com', 'fay@example.com')"
                                           " AND (kind = 'worklist') = (recipient = 'fay@example.com')"))
                     >= want and x, 60, "one mail per template")
        by_subject = {x["subject"]: x for x in r}
        for subject, words in EXPECTED:
            assert subject in by_subject, (subject, sorted(by_subject))
            for w in words:
                assert w in by_subject[subject]["body_text"], (subject, w, by_subject[subject]["body_text"])
        # thread ids: the story's (created 2026-01-02 03:04) and the worklist's own id
        story_mail = by_subject['Story "Mail story" was created.']
        assert story_mail["in_reply_to"] == "<storyboard.story.202601020304.501@sb.example.org>"
        wl = by_subject['Worklist "Mail worklist" was created by Fay Worklists']
        assert wl["in_reply_to"] == "<storyboard.worklist.202601020306.501@sb.example.org>"
        assert {x["kind"] for x in r} == {"story", "task", "worklist"}
        assert len(r) == want, sorted(x["subject"] for x in r)
        # who got each: story, comment, tag and task mail the story's subscribers with the
        # preference (bob as a digest), worklist mail only fay (the worklist preference)
        everyone = rows(cluster, mark)
        for subject, _ in EXPECTED:
            got = {(x["recipient"], x["status"] == "digest") for x in everyone if x["subject"] == subject}
            if subject.startswith(("Worklist", "New permission", "A permission")):
                assert got == {("fay@example.com", False)}, (subject, got)
            else:
                assert got == {("ann@example.com", False), ("bob@example.com", True),
                               ("eve@example.com", False), ("fay@example.com", False),
                               ("gus@example.com", False)}, (subject, got)
    finally:
        cluster.execute("DELETE FROM story_storytags WHERE storytag_id = 501")


def test_operator_template_overrides_the_default(mail):
    cluster, sink, publisher, mark = mail
    cluster.execute("INSERT INTO storyboard_worker.email_templates (name, subject, body_text, body_html) "
                    "VALUES ('story/PUT', '[SB] {{title}} changed', 'Changed by {{ author }}:\n{{changes}}', "
                    "'<p>{{author}} changed <i>{{title}}</i></p>')")
    try:
        publisher.publish(story_put(501, "Mail story", "Mail <story> & co"))
        r = wait_rows(cluster, mark, 1, "recipient = 'ann@example.com'")
        assert r[0]["subject"] == "[SB] Mail <story> & co changed", r
        assert r[0]["body_text"].startswith("Changed by Ann Immediate:\ntitle: Mail story -> Mail <story> & co")
        html = cluster.one("SELECT body_html FROM storyboard_worker.outbox WHERE id = %s", (r[0]["id"],))
        assert html == "<p>Ann Immediate changed <i>Mail &lt;story&gt; &amp; co</i></p>", html
        msg = wait_for(lambda: sink.by_message_id(r[0]["message_id"]), 30, "the mail delivered")[0][1]
        assert msg.get_body(("html",)).get_content().strip() == html
        assert msg.get_body(("plain",)).get_content().startswith("Changed by Ann Immediate:")
    finally:
        cluster.execute("DELETE FROM storyboard_worker.email_templates")


# ---------------------------------------------------------------- delivery

def test_delivered_with_headers_threading_and_a_hostile_title(mail):
    cluster, sink, publisher, mark = mail
    title = "Déjà vu \u2014 \u65e5\u672c\r\nBcc: victim@example.net\r\nSubject: pwned and a long tail " + "x" * 40
    publisher.publish(story_put(501, "Mail story", title))
    r = wait_rows(cluster, mark, 1, "recipient = 'ann@example.com'")[0]
    assert "\r" not in r["subject"] and "\n" not in r["subject"]
    assert len(r["subject"]) == 78 and r["subject"].endswith("..."), r["subject"]
    got = wait_for(lambda: sink.by_message_id(r["message_id"]), 30, "ann's mail at the sink")
    assert len(got) == 1
    env, msg = got[0]
    assert env["rcpt_tos"] == ["ann@example.com"]
    assert env["mail_from"] == "do_not_reply@storyboard.openstack.org"
    assert msg["To"] == "ann@example.com"
    assert msg["From"].addresses[0].addr_spec == "do_not_reply@storyboard.openstack.org"
    assert b"\nFrom: StoryBoard (Do Not Reply) <do_not_reply@storyboard.openstack.org>\r\n" in env["raw"]
    # RFC 2047 decoded back (the parser folds the double space where \r\n was)
    assert " ".join(msg["Subject"].split()) == " ".join(r["subject"].split())
    assert r["subject"].startswith('Story "Déjà vu \u2014 \u65e5\u672c Bcc: victim@example.net Subject: ')
    head = env["raw"].split(b"\r\n\r\n")[0]
    assert b"\nSubject: =?UTF-8?B?" in head and b"\nBcc:" not in head, head
    assert msg["Bcc"] is None and msg.get_all("Subject") == [msg["Subject"]]
    assert msg["In-Reply-To"] == msg["References"] == "<storyboard.story.202601020304.501@sb.example.org>"
    assert msg["Message-ID"].startswith("<storyboard.") and msg["Message-ID"].endswith(".501@sb.example.org>")
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-StoryBoard-Subscription-Type"] == "story"
    assert msg["Reply-To"] == "StoryBoard replies <replies@example.org>"
    assert msg["Date"] is not None
    text = body_text(msg)
    assert "Bcc: victim@example.net" in text and URL + "#!/story/501" in text   # the body keeps it
    assert wait_for(lambda: cluster.one("SELECT status FROM storyboard_worker.outbox WHERE id = %s",
                                        (r["id"],)) == "sent", 10, "marked sent")


def test_smtp_down_then_back_every_mail_once(mail):
    cluster, sink, publisher, mark = mail
    sink.stop()
    try:
        for i in range(5):
            publisher.publish(story_put(501, "Mail story", "Outage %d" % i))
        wait_rows(cluster, mark, 5, "recipient = 'ann@example.com'")
        wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.outbox WHERE id > %s "
                                     "AND attempts > 0 AND status = 'pending'", (mark,)) >= 1, 30,
                 "a failed attempt")
        st = cluster.q("SELECT last_error, mails_retried FROM storyboard_worker.outbox_stats")[0]
        assert "connect" in st[0].lower() and st[1] >= 1, st
    finally:
        sink.start()
    ids = cluster.q("SELECT message_id FROM storyboard_worker.outbox WHERE id > %s AND status <> 'digest'",
                    (mark,))
    assert len(ids) == 20   # ann, eve, fay, gus x 5
    wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.outbox WHERE id > %s "
                                 "AND status = 'pending'", (mark,)) == 0, 60, "every mail sent")
    for (mid,) in ids:
        assert len(sink.by_message_id(mid)) == 1, mid


def test_4xx_is_retried_then_sent(mail):
    cluster, sink, publisher, mark = mail
    sink.control(data="451 4.3.0 Mailbox busy, try again", times=2)
    publisher.publish(story_put(501, "Mail story", "Busy server"))
    r = wait_rows(cluster, mark, 1, "recipient = 'ann@example.com'")[0]
    wait_for(lambda: cluster.one("SELECT status FROM storyboard_worker.outbox WHERE id = %s",
                                 (r["id"],)) == "sent", 60, "ann's mail sent after the 4xx")
    sent = rows(cluster, mark, "status = 'sent'")
    assert max(x["attempts"] for x in sent) >= 2, sent
    for x in sent:
        assert len(sink.by_message_id(x["message_id"])) == 1


def test_a_refused_session_pauses_instead_of_failing_the_queue(mail):
    """A 5xx to MAIL FROM (here: a server that wants STARTTLS first) is the settings', not the
    mail's: nothing is marked failed; the mailer pauses, then sends every mail once."""
    cluster, sink, publisher, mark = mail
    sink.control(mail="530 5.7.0 Must issue a STARTTLS command first", times=2)
    publisher.publish(story_put(501, "Mail story", "Session refused"))
    wait_rows(cluster, mark, 5)
    r = wait_for(lambda: rows(cluster, mark, "attempts > 0") or None, 30, "a refused attempt")
    assert r[0]["status"] == "pending" and r[0]["last_error"].startswith("530 5.7.0"), r
    wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.outbox WHERE id > %s "
                                 "AND status = 'pending'", (mark,)) == 0, 60, "every mail sent")
    sent = rows(cluster, mark, "status <> 'digest'")
    assert {x["status"] for x in sent} == {"sent"}, sent
    # two refusals in all (the mailer paused after each, not trying the other mails the same way)
    assert sum(x["attempts"] for x in sent) == len(sent) + 2, sent
    for x in sent:
        assert len(sink.by_message_id(x["message_id"])) == 1


def test_5xx_fails_visibly_and_retry_mail_sends_it(mail):
    cluster, sink, publisher, mark = mail
    sink.control(rcpt="550 5.1.1 <ann@example.com>: Recipient address rejected", times=1)
    cluster.execute("UPDATE users SET email = 'not an address' WHERE id = 507")
    try:
        publisher.publish(story_put(501, "Mail story", "Refused"))
        wait_rows(cluster, mark, 5)
        failed = wait_for(lambda: len(x := rows(cluster, mark, "status = 'failed'")) >= 2 and x, 30,
                          "two failed mails")
    finally:
        cluster.execute("UPDATE users SET email = 'gus@example.com' WHERE id = 507")
    errors = {x["recipient"]: x["last_error"] for x in failed}
    assert len(errors) == 2 and "not an address" in errors, errors
    assert "invalid recipient address" in errors["not an address"]
    refused = [e for k, e in errors.items() if k != "not an address"][0]
    assert refused.startswith("550 5.1.1"), errors
    st = cluster.q("SELECT failed, mails_failed, last_error FROM storyboard_worker.outbox_stats")[0]
    assert st[0] >= 2 and st[1] >= 2, st
    # queued again: the server takes it now
    x = [f for f in failed if f["recipient"] != "not an address"][0]
    assert cluster.one("SELECT storyboard_worker.retry_mail(%s)", (x["id"],)) is True
    wait_for(lambda: cluster.one("SELECT status FROM storyboard_worker.outbox WHERE id = %s",
                                 (x["id"],)) == "sent", 30, "the retried mail sent")
    assert len(sink.by_message_id(x["message_id"])) == 1
    assert cluster.one("SELECT storyboard_worker.retry_mail(%s)", (x["id"],)) is False   # not failed


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls_and_auth(mail, pglog, mode):
    cluster, sink, publisher, mark = mail
    logmark = pglog.mark()
    port = sink.tls_port if mode == "starttls" else sink.implicit_port
    cluster.set_gucs(email_smtp_tls=mode, email_smtp_port=port, email_smtp_ca_file=sink.cert,
                     email_smtp_user=SMTP_USER, email_smtp_password=SMTP_PASSWORD)
    publisher.publish(story_put(501, "Mail story", "Over TLS " + mode))
    r = wait_rows(cluster, mark, 1, "recipient = 'ann@example.com'")[0]
    env, msg = wait_for(lambda: sink.by_message_id(r["message_id"]), 30, "the mail over TLS")[0]
    assert env["port"] == port and env["tls"] is True and env["login"] == SMTP_USER, env
    # the password is never logged nor shown to a non-superuser
    cluster.execute("DROP ROLE IF EXISTS sbw_mail_peek; CREATE ROLE sbw_mail_peek")
    try:
        assert cluster.one("SELECT count(*) FROM pg_settings WHERE setting = %s", (SMTP_PASSWORD,)) == 0
        with pytest.raises(Exception, match="permission denied|must be superuser"):
            cluster.q("SET ROLE sbw_mail_peek; SHOW storyboard_worker.email_smtp_password")
    finally:
        cluster.reset_connections()
        cluster.execute("DROP ROLE sbw_mail_peek")
    # a wrong password: retried, not failed, and the server's reply is kept
    cluster.set_gucs(email_smtp_password="wrong")
    mark2 = cluster.one("SELECT max(id) FROM storyboard_worker.outbox")
    publisher.publish(story_put(501, "Mail story", "Wrong password " + mode))
    r2 = wait_rows(cluster, mark2, 1, "recipient = 'ann@example.com' AND attempts > 0")[0]
    assert r2["status"] == "pending" and "535" in r2["last_error"], r2
    log = pglog.since(logmark)
    assert "storyboard_worker.email_smtp_password\" changed (value not shown)" in log, log[-3000:]
    assert SMTP_PASSWORD not in log and '"wrong"' not in log


def test_starttls_refuses_an_unknown_certificate(mail):
    cluster, sink, publisher, mark = mail
    cluster.set_gucs(email_smtp_tls="starttls", email_smtp_port=sink.tls_port,
                     email_smtp_user=SMTP_USER, email_smtp_password=SMTP_PASSWORD)
    publisher.publish(story_put(501, "Mail story", "Unverified"))
    r = wait_rows(cluster, mark, 1, "recipient = 'ann@example.com' AND attempts > 0")[0]
    assert r["status"] == "pending" and "certificate" in r["last_error"].lower(), r
    assert not sink.by_message_id(r["message_id"])


# ---------------------------------------------------------------- digests

def test_digests(mail):
    cluster, sink, publisher, mark = mail
    cluster.execute("DELETE FROM storyboard_worker.outbox WHERE status = 'digest'")
    publisher.publish(story_put(501, "Mail story", "Digest one"))
    publisher.publish(sbw.publish.task_status_changed(501, 501, "todo", "review", author_id=501,
                                                      title="Mail task", project_id=501)[0])
    waiting = wait_rows(cluster, mark, 2, "recipient = 'bob@example.com' AND status = 'digest'")
    # bob's time of day is midnight UTC: mails from today are not due yet
    assert cluster.one("SELECT storyboard_worker.send_digests()") == 0
    # one from yesterday is
    one = [x for x in waiting if "Digest one" in x["subject"]][0]
    cluster.execute("UPDATE storyboard_worker.outbox SET created_at = created_at - interval '1 day' "
                    "WHERE id = %s", (one["id"],))
    assert cluster.one("SELECT storyboard_worker.send_digests()") == 1
    first = wait_rows(cluster, mark, 1, "kind = 'digest'")[0]
    assert "1 notifications" in first["subject"] and "Digest one" in first["body_text"], first
    assert "review" not in first["body_text"]
    # a time of day still to come today: the last one that passed was yesterday's
    cluster.execute("UPDATE user_preferences SET value = ((extract(epoch FROM now() AT TIME ZONE 'UTC')::bigint "
                    "+ 3600) % 86400)::text WHERE user_id = 502 AND key = 'plugin_email_digest_time'")
    try:
        rest = [x for x in waiting if x["id"] != one["id"]][0]
        cluster.execute("UPDATE storyboard_worker.outbox SET created_at = now() - interval '2 hours' "
                        "WHERE id = %s", (rest["id"],))
        assert cluster.one("SELECT storyboard_worker.send_digests()") == 0   # after that time
    finally:
        cluster.execute("UPDATE user_preferences SET value = '0' "
                        "WHERE user_id = 502 AND key = 'plugin_email_digest_time'")
    # force: everything waiting
    assert cluster.one("SELECT storyboard_worker.send_digests(true)") == 1
    assert cluster.one("SELECT storyboard_worker.send_digests(true)") == 0
    d = wait_rows(cluster, mark, 2, "kind = 'digest'")
    assert [x["recipient"] for x in d] == ["bob@example.com"] * 2
    env, msg = wait_for(lambda: sink.by_message_id(d[1]["message_id"]), 30, "the digest delivered")[0]
    text = body_text(msg)
    assert text.startswith("Hello Bob Digest,") and 'Story "Mail story":' in text, text
    assert 'Task "Mail task" was updated.' in text, text
    assert cluster.one("SELECT count(*) FROM storyboard_worker.outbox WHERE digest_id IS NOT NULL "
                       "AND id > %s AND status = 'sent'", (mark,)) == 2


# ---------------------------------------------------------------- operations

def test_mailer_follows_email_enable_and_comes_back(mail):
    cluster, sink, publisher, mark = mail
    pid = cluster.one("SELECT mailer_pid FROM storyboard_worker.outbox_stats")
    assert cluster.one("SELECT backend_type FROM pg_stat_activity WHERE pid = %s", (pid,)) == \
        "storyboard_worker mailer"
    os.kill(pid, signal.SIGTERM)
    pid2 = wait_for(lambda: (p := cluster.one("SELECT mailer_pid FROM storyboard_worker.outbox_stats"))
                    and p != pid and p, 30, "a new mailer")
    publisher.publish(story_put(501, "Mail story", "After a restart"))
    r = wait_rows(cluster, mark, 1, "recipient = 'ann@example.com'")[0]
    wait_for(lambda: sink.by_message_id(r["message_id"]), 30, "sent by the new mailer")
    cluster.set_gucs(email_enable="off")
    wait_for(lambda: cluster.one("SELECT mailer_pid FROM storyboard_worker.outbox_stats") is None, 30,
             "the mailer gone")
    assert not cluster.one("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid2,))
    # off: the plugin queues nothing
    mark2 = cluster.one("SELECT max(id) FROM storyboard_worker.outbox")
    publisher.publish(story_put(501, "Mail story", "While off"))
    time.sleep(2)
    assert rows(cluster, mark2) == []


def test_outbox_is_the_extensions_alone(mail):
    cluster, sink, publisher, mark = mail
    cluster.execute("DROP ROLE IF EXISTS sbw_mail_nobody; CREATE ROLE sbw_mail_nobody LOGIN")
    try:
        conn = cluster.connect(autocommit=True)
        try:
            cur = conn.cursor()
            cur.execute("SET ROLE sbw_mail_nobody")
            for sql in ("SELECT * FROM storyboard_worker.outbox",
                        "SELECT storyboard_worker.send_digests(true)",
                        "SELECT storyboard_worker.retry_mail(1)",
                        "INSERT INTO storyboard_worker.email_templates VALUES ('x', 'y', 'z')"):
                with pytest.raises(Exception) as e:
                    cur.execute(sql)
                assert "permission denied" in str(e.value), (sql, e.value)
            # outbox_stats too: last_error may name recipients
            with pytest.raises(Exception, match="permission denied"):
                cur.execute("SELECT pending FROM storyboard_worker.outbox_stats")
            cur.execute("RESET ROLE")
            cur.execute("GRANT SELECT ON storyboard_worker.outbox_stats TO sbw_mail_nobody")
            cur.execute("SET ROLE sbw_mail_nobody")
            cur.execute("SELECT pending >= 0 FROM storyboard_worker.outbox_stats")
            assert cur.fetchone()[0] is True
            cur.execute("RESET ROLE")
            cur.execute("REVOKE SELECT ON storyboard_worker.outbox_stats FROM sbw_mail_nobody")
        finally:
            conn.close()
    finally:
        cluster.execute("DROP ROLE sbw_mail_nobody")


def test_edited_templates_and_unsent_mail_survive_pg_dump(mail_tables, services):
    cluster = mail_tables
    pgbin = "/usr/lib/postgresql/15/bin"
    conn = ["-h", services.pg_host, "-p", str(services.pg_port), "-U", "postgres"]
    for db in ("sbw_dump_src", "sbw_dump_dst"):
        cluster.execute('DROP DATABASE IF EXISTS "%s"' % db, db="postgres")
        cluster.execute('CREATE DATABASE "%s"' % db, db="postgres")
    try:
        cluster.execute("CREATE EXTENSION storyboard_worker; "
                        "INSERT INTO storyboard_worker.email_templates (name, subject, body_text) "
                        "VALUES ('task/PUT', 'Edited {{title}}', 'Edited body'); "
                        "INSERT INTO storyboard_worker.outbox (recipient, subject, body_text, message_id, kind, status) "
                        "VALUES ('a@example.com', 's', 'b', '<1@x>', 'task', 'pending'), "
                        "       ('b@example.com', 's', 'b', '<2@x>', 'task', 'sent'), "
                        "       ('c@example.com', 's', 'b', '<3@x>', 'task', 'digest'); "
                        "INSERT INTO storyboard_worker.dead_letters (body, error) VALUES ('\\x00', 'a'), ('\\x00', 'b'); "
                        "CREATE FUNCTION public.mine(e storyboard_worker.event) RETURNS void LANGUAGE sql AS ''; "
                        "SELECT storyboard_worker.register_plugin('mine', 'public.mine(storyboard_worker.event)')",
                        db="sbw_dump_src")
        dump = subprocess.run([pgbin + "/pg_dump", *conn, "-d", "sbw_dump_src"], check=True,
                              capture_output=True, text=True).stdout
        r = subprocess.run([pgbin + "/psql", *conn, "-X", "-v", "ON_ERROR_STOP=1", "-d", "sbw_dump_dst"],
                           input=dump, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        q = lambda sql: cluster.q(sql, db="sbw_dump_dst")   # noqa: E731
        assert q("SELECT name, subject FROM storyboard_worker.email_templates") == [("task/PUT", "Edited {{title}}")]
        assert q("SELECT recipient, status FROM storyboard_worker.outbox ORDER BY id") == \
            [("a@example.com", "pending"), ("c@example.com", "digest")]
        assert q("SELECT name FROM storyboard_worker.plugins ORDER BY position") == \
            [("subscription",), ("email",), ("mine",)]
        # the registry's and the dead letters' identities go on after the restored rows
        assert q("INSERT INTO storyboard_worker.dead_letters (body, error) VALUES ('\\x00', 'c') RETURNING id")[0][0] > 2
        q("CREATE FUNCTION public.more(e storyboard_worker.event) RETURNS void LANGUAGE sql AS ''; "
          "SELECT storyboard_worker.register_plugin('more', 'public.more(storyboard_worker.event)')")
        assert q("SELECT name FROM storyboard_worker.plugins ORDER BY position")[-1] == ("more",)
        # the identity goes on after the restored rows
        assert q("INSERT INTO storyboard_worker.outbox (recipient, subject, body_text, message_id, kind) "
                 "VALUES ('d@example.com', 's', 'b', '<4@x>', 'task') RETURNING id")[0][0] > 3
    finally:
        cluster.reset_connections()
        for db in ("sbw_dump_src", "sbw_dump_dst"):
            cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % db, db="postgres")


def test_plugin_sql_ignores_a_hostile_schema_on_the_path(mail, pglog):
    """The plugin's SQL runs under pg_catalog + the schemas of StoryBoard's tables only: look-alike
    operators and functions in another schema of the caller's path (before pg_catalog) never run."""
    cluster, sink, publisher, mark = mail
    cluster.execute("""
        DROP SCHEMA IF EXISTS sbw_hostile CASCADE; CREATE SCHEMA sbw_hostile;
        CREATE FUNCTION sbw_hostile.ne(varchar, text) RETURNS boolean LANGUAGE plpgsql AS
          $$BEGIN RAISE WARNING 'planted <> called by %', current_user; RETURN $1::text OPERATOR(pg_catalog.<>) $2; END$$;
        CREATE OPERATOR sbw_hostile.<> (leftarg = varchar, rightarg = text, function = sbw_hostile.ne);
        CREATE FUNCTION sbw_hostile.eq(integer, bigint) RETURNS boolean LANGUAGE plpgsql AS
          $$BEGIN RAISE WARNING 'planted = called by %', current_user; RETURN $1 OPERATOR(pg_catalog.=) $2; END$$;
        CREATE OPERATOR sbw_hostile.= (leftarg = integer, rightarg = bigint, function = sbw_hostile.eq);
        CREATE FUNCTION sbw_hostile.lower(text) RETURNS text LANGUAGE plpgsql AS
          $$BEGIN RAISE WARNING 'planted lower called by %', current_user; RETURN 'true'; END$$;
        CREATE FUNCTION sbw_hostile.string_agg(text, text) RETURNS text LANGUAGE plpgsql AS
          $$BEGIN RAISE WARNING 'planted string_agg called by %', current_user; RETURN ''; END$$;
    """)
    body = json.dumps(story_put(501, "Mail story", "Hostile path"))
    try:
        logmark = pglog.mark()
        conn = cluster.connect(autocommit=True)
        try:
            cur = conn.cursor()
            cur.execute("SET search_path = sbw_hostile, public, pg_catalog")
            cur.execute("SELECT 'a'::varchar <> 'b'::text")      # the plant works on this path
            cur.execute("SELECT plugin, succeeded, error FROM storyboard_worker.process_event(%s, 'story')",
                        (body,))
            results = cur.fetchall()
        finally:
            conn.close()
        assert ("email", True, None) in results, results
        got = {x["recipient"] for x in rows(cluster, mark, "subject LIKE '%Hostile path%'")}
        assert got == {"ann@example.com", "bob@example.com", "eve@example.com", "fay@example.com",
                       "gus@example.com"}, got
        planted = pglog.grep(logmark, r"planted \S+ called")
        assert len(planted) == 1 and "planted <> called" in planted[0], planted   # the control only
    finally:
        cluster.execute("DROP SCHEMA sbw_hostile CASCADE")


def _sink_ceiling(sink, n):
    """The sink's own rate: n small mails from Python's smtplib over one connection."""
    import smtplib
    from email.message import EmailMessage
    t0 = time.time()
    with smtplib.SMTP("127.0.0.1", sink.port) as s:
        for i in range(n):
            m = EmailMessage()
            m["From"], m["To"], m["Subject"] = "a@example.org", "ceiling@example.org", "ceiling %d" % i
            m["Message-ID"] = "<ceiling.%d.%f@x>" % (i, t0)
            m.set_content("x" * 300)
            s.send_message(m)
    return n / (time.time() - t0)


def test_workload_rate_with_and_without_email(mail, services, metrics):
    """StoryBoard's traffic for one task status change: the hook message (task PUT: mail to the
    7 subscribers of the task, its story, project and group) and the timeline event (10
    subscription_events rows: the story's tasks and projects too), N times,
    through the broker; events/s with the email plugin off and on, and mails/s to the sink."""
    import guarantee_helpers
    cluster, sink, publisher, mark = mail
    n = int(os.environ.get("SBW_MAIL_EVENTS", "1000"))
    b = 95000
    sbw.workload_data(cluster, b, 2 * n, email=True)
    cluster.execute("SELECT storyboard_worker.register_plugin('subscription', "
                    "'storyboard_worker.subscription_handler(storyboard_worker.event)', NULL, false)")

    def run(first):
        msgs = []
        for i in range(first, first + n):
            hook, te = sbw.publish.task_status_changed(b + 1, b + 1, "todo", "review", author_id=b + 1,
                                                       title="t1", project_id=b + 1, event_id=b + i)
            msgs += [("task", sbw.publish.encode(hook), None),
                     ("timeline_event", sbw.publish.encode(te), None)]
        last_se = cluster.one("SELECT coalesce(max(id), 0) FROM subscription_events")
        last_ob = cluster.one("SELECT coalesce(max(id), 0) FROM storyboard_worker.outbox")
        since = cluster.one("SELECT clock_timestamp()")
        guarantee_helpers.publish_window(services.amqp_url, msgs)
        wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.ledger WHERE processed_at > %s",
                                     (since,)) >= 2 * n, 180, "%d messages processed" % (2 * n))
        assert cluster.one("SELECT count(*) FROM subscription_events WHERE id > %s", (last_se,)) == 10 * n
        span = cluster.one("SELECT extract(epoch FROM max(processed_at) - min(processed_at)) "
                           "FROM storyboard_worker.ledger WHERE processed_at > %s", (since,))
        return (2 * n - 1) / float(span), last_ob

    try:
        cluster.set_gucs(email_enable="off")
        rate_off, _ = run(1)
        # email on; the mailer finds no server meanwhile (it pauses), so that the rate is the
        # plugin's, not the plugin's beside the mailer and the sink (Python) sharing 2 cores
        cluster.set_gucs(email_enable="on", email_smtp_port=_free_ports(1)[0])
        wait_for(lambda: cluster.one("SELECT mailer_pid FROM storyboard_worker.outbox_stats"), 30, "the mailer")
        rate_on, last_ob = run(n + 1)
        assert cluster.one("SELECT count(*) FROM storyboard_worker.outbox WHERE id > %s", (last_ob,)) == 7 * n
        cluster.set_gucs(email_smtp_port=sink.port)
        wait_for(lambda: cluster.one("SELECT count(*) FROM storyboard_worker.outbox WHERE id > %s "
                                     "AND status <> 'sent'", (last_ob,)) == 0, 300, "every mail sent")
        sent, span = cluster.q("SELECT count(*), extract(epoch FROM max(sent_at) - min(sent_at)) "
                               "FROM storyboard_worker.outbox WHERE id > %s", (last_ob,))[0]
        assert sent == 7 * n
        mail_rate = (sent - 1) / float(span)
        ceiling = _sink_ceiling(sink, 2000)
        metrics.add("email workload (task PUT hook + timeline event per action, 10 subscribers, 7 of them mailed)",
                    "%d actions (%d messages) through the broker, worker_count %d: email off %.0f messages/s, "
                    "email on %.0f messages/s (%.2fx), %d mails queued (first to last commit)" % (
                        n, 2 * n, cluster.worker_count(), rate_off, rate_on, rate_on / rate_off, 7 * n))
        metrics.add("mailer throughput", "%d mails to the aiosmtpd sink in %.1f s: %.0f mails/s; the sink's own "
                    "ceiling (smtplib, one connection, same machine): %.0f mails/s (%.2fx)" % (
                        sent, span, mail_rate, ceiling, mail_rate / ceiling))
    finally:
        sbw.unregister(cluster, "subscription")
        cluster.execute("DELETE FROM subscription_events WHERE subscriber_id > %(b)s; "
                        "DELETE FROM events WHERE id > %(b)s; "
                        "DELETE FROM storyboard_worker.outbox WHERE subscriber_id > %(b)s" % {"b": b})


def test_as_a_plugin_role_that_is_not_a_superuser(mail):
    """storyboard_worker.role a plain role with only SELECT on StoryBoard's tables: the plugin's
    SQL runs as it, and the outbox (which it has no rights on) is written as the owner."""
    cluster, sink, publisher, mark = mail
    role = "sbw_mail_plugin_role"
    cluster.execute("DROP OWNED BY %s" % role if cluster.one(
        "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)) else "SELECT 1")
    cluster.execute("DROP ROLE IF EXISTS %s; CREATE ROLE %s NOLOGIN" % (role, role), db="postgres")
    cluster.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {r}; GRANT USAGE ON SCHEMA sbw_test TO {r}; "
                    "GRANT INSERT ON sbw_test.seen TO {r}; GRANT USAGE ON SEQUENCE sbw_test.seen_id_seq TO {r}"
                    .format(r=role))
    try:
        assert cluster.one("SELECT has_table_privilege(%s, 'storyboard_worker.outbox', 'INSERT')", (role,)) is False
        cluster.set_gucs(role=role)
        wait_for(lambda: cluster.setting("role") == role, 10, "the role setting")
        publisher.publish(story_put(501, "Mail story", "As the plugin role"))
        r = wait_rows(cluster, mark, 5, "subject LIKE '%As the plugin role%'")
        assert {x["recipient"] for x in r} == {"ann@example.com", "bob@example.com", "eve@example.com",
                                               "fay@example.com", "gus@example.com"}, r
        assert cluster.one("SELECT count(*) FROM storyboard_worker.dead_letters WHERE plugin = 'email'") == 0
    finally:
        cluster.set_gucs(role=None)
        cluster.execute("DROP OWNED BY %s" % role)
        cluster.execute("DROP ROLE %s" % role, db="postgres")
