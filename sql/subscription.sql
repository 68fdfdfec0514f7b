-- The built-in "subscription" plugin (src/subscription.c), driven through
-- storyboard_worker.process_event() against a PostgreSQL port of
-- StoryBoard's tables (test/fixtures/storyboard_schema.sql) loaded with
-- StoryBoard's own test fixtures (test/fixtures/storyboard_mock_data.sql).
CREATE EXTENSION storyboard_worker;
-- Plugin failures are reported in process_event's result rows; the
-- dispatcher's WARNINGs would only repeat them.
SET client_min_messages = error;
-- created_at must be UTC whatever the session's time zone.
SET TimeZone = 'America/New_York';

-- The plugin is registered by CREATE EXTENSION, always enabled.
SELECT name, handler, enabled FROM storyboard_worker.plugins ORDER BY position;

\set ECHO none
\i test/fixtures/storyboard_schema.sql
\i test/fixtures/storyboard_mock_data.sql
\set ECHO all

-- The message StoryBoard's event_create() publishes for an events row
-- (reference 2.3): resource_after is the row as the API serialised it.
CREATE FUNCTION timeline_body(event_id int, author int DEFAULT 1) RETURNS text
LANGUAGE sql AS $$
SELECT json_build_object(
	'author_id', author, 'method', 'POST', 'url', 'https://storyboard.example.org/',
	'path', '/v1/stories/1', 'query_string', NULL, 'status', 200,
	'resource', 'timeline_event', 'resource_id', e.id,
	'sub_resource', NULL, 'sub_resource_id', NULL, 'resource_before', NULL,
	'resource_after', json_build_object(
		'id', e.id, 'created_at', '2019-04-11T13:03:42.123456+00:00', 'updated_at', NULL,
		'event_type', e.event_type, 'event_info', e.event_info,
		'story_id', e.story_id, 'worklist_id', e.worklist_id, 'board_id', e.board_id,
		'author_id', e.author_id, 'comment_id', e.comment_id))::text
  FROM events e WHERE e.id = event_id
$$;

-- A NotificationHook message (reference 2.2): ids are the URL's strings.
CREATE FUNCTION hook_body(method text, path text, resource text, resource_id text,
						  sub_resource text DEFAULT NULL, sub_resource_id text DEFAULT NULL,
						  author int DEFAULT 1) RETURNS text
LANGUAGE sql AS $$
SELECT json_build_object(
	'author_id', author, 'method', method, 'url', NULL, 'path', path,
	'query_string', '', 'status', 200, 'resource', resource,
	'resource_id', resource_id, 'sub_resource', sub_resource,
	'sub_resource_id', sub_resource_id,
	'resource_before', NULL, 'resource_after', NULL)::text
$$;

-- Dispatch one message; report each plugin's outcome and the subscribers
-- it notified (subscription_events rows it added), in subscriber order.
CREATE FUNCTION deliver(body text, routing_key text, OUT outcome text, OUT notified text)
LANGUAGE plpgsql AS $$
DECLARE
	before int;
	r record;
BEGIN
	SELECT coalesce(max(id), 0) INTO before FROM subscription_events;
	outcome := '';
	FOR r IN SELECT * FROM storyboard_worker.process_event(body, routing_key) LOOP
		IF r.succeeded THEN
			outcome := outcome || r.plugin || ' ok';
		ELSE
			outcome := outcome || format('%s failed %s: %s', r.plugin, r.sqlstate, r.error)
				|| CASE WHEN r.dead_letter_id IS NOT NULL THEN ' (dead letter)' ELSE '' END;
		END IF;
	END LOOP;
	SELECT '{' || coalesce(string_agg(subscriber_id::text, ',' ORDER BY subscriber_id), '') || '}'
	  INTO notified FROM subscription_events WHERE id > before;
END
$$;

--
-- 1. StoryBoard's expected subscriber sets for its mock data
--    (storyboard/tests/db/test_subscriptions.py).  The plugin asks for
--    story subscribers on every story timeline event, and for project_group
--    subscribers on project_group events.
--
-- story 1 -> {1,3}; stories 2..5 -> {}; event 6 is on story 1 too; event 7
-- is on private story 6, whose only candidates (via task 5, project 2,
-- group 2) are none.
SELECT e.id AS event, e.story_id, e.event_type, d.*
  FROM events e, LATERAL deliver(timeline_body(e.id), 'timeline_event') d
 WHERE e.id BETWEEN 1 AND 7
 ORDER BY e.id;
-- project_group 1 -> {1}; 2 -> {}; 3 -> {}
SELECT g AS project_group, d.*
  FROM generate_series(1, 3) g,
	   LATERAL deliver(hook_body('PUT', '/v1/project_groups/' || g || '/projects/3',
								 'project_group', g::text, 'project', '3'), 'project_group') d
 ORDER BY g;
-- Rows carry the author, the event_type and the events row's event_info
-- exactly as stored (here with mock_data's own story_id slip).
TRUNCATE subscription_events;
SELECT * FROM deliver(timeline_body(6), 'timeline_event');
SELECT subscriber_id, author_id, event_type, event_info, updated_at
  FROM subscription_events ORDER BY subscriber_id;
-- Timestamps are StoryBoard's naive UTC (this session is in New York).
SELECT count(*) AS rows,
	   bool_and(abs(extract(epoch FROM (now() AT TIME ZONE 'UTC') - created_at)) < 60) AS created_at_is_utc_now
  FROM subscription_events;

--
-- 2. Subscriber expansion, path by path (reference 5.2): a story event
--    reaches subscribers of the story, of its tasks, of those tasks'
--    projects and of those projects' groups, each user once.
--
INSERT INTO users (id, email, full_name) VALUES
	(4, 'fourth@example.com', 'Fourth User'),
	(5, 'fifth@example.com', 'Fifth User');
INSERT INTO subscriptions (id, user_id, target_type, target_id) VALUES
	(10, 2, 'task', 2),				-- task 2 is in story 1
	(11, 4, 'project_group', 2),	-- group 2 = projects 2, 3: tasks 2, 3, 4, 5
	(12, 5, 'story', 2),
	(13, 3, 'task', 4);				-- story 2's task
-- user 1 comes through project 3 and project_group 1, user 3 through
-- story 1, user 2 through task 2, user 4 through project_group 2.
SELECT * FROM deliver(timeline_body(1), 'timeline_event');
-- story 2: task 4 (user 3), project 2 -> group 2 (user 4), story 2 (user 5)
SELECT * FROM deliver(timeline_body(2), 'timeline_event');
-- a subscription to another story's task does not count
SELECT * FROM deliver(timeline_body(3), 'timeline_event');

--
-- 3. Private stories: only users who may see the story, through a
--    permission granted to them or to one of their teams.
--
INSERT INTO subscriptions (id, user_id, target_type, target_id) VALUES
	(20, 1, 'story', 6),
	(21, 2, 'story', 6),
	(22, 3, 'task', 5);
-- candidates {1,2,3,4} (user 4 via group 2); only user 1 holds view_story_6
SELECT * FROM deliver(timeline_body(7), 'timeline_event');
-- Grant view_story_6 to team 2 (users 2, 3): its members are notified
-- too.  (StoryBoard: only the users of the story's first permission.)
INSERT INTO team_permissions (permission_id, team_id) VALUES (1, 2);
SELECT * FROM deliver(timeline_body(7), 'timeline_event');
-- A private story without any permission row has no subscribers.
-- (StoryBoard: IndexError on story.permissions[0], event lost.)
INSERT INTO stories (id, title, private) VALUES (7, 'Nobody may see this', true);
INSERT INTO subscriptions (id, user_id, target_type, target_id) VALUES (23, 1, 'story', 7);
INSERT INTO events (id, story_id, author_id, event_type, event_info)
	VALUES (10, 7, 1, 'story_created', '{"story_id": 7, "story_title": "Nobody may see this"}');
SELECT * FROM deliver(timeline_body(10), 'timeline_event');

--
-- 4. Comments: event_info is json.dumps() of the resolved comment, with
--    Python's key order, separators and ASCII escapes.
--
TRUNCATE subscription_events;
-- mock_data's comment 1 on story 1
SELECT * FROM deliver(timeline_body(8), 'timeline_event');
-- mock_data's comment 2 on private story 6 (users 1, and team 2's 2 and 3)
SELECT * FROM deliver(timeline_body(9), 'timeline_event');
SELECT subscriber_id, author_id, event_type, event_info
  FROM subscription_events ORDER BY id;
-- Non-ASCII and control characters.
INSERT INTO stories (id, title) VALUES (8, U&'\00DCberpr\00FCfung \00ABpriv\00E9e\00BB');
INSERT INTO comments (id, content) VALUES
	(3, U&'\00C7a marche \2014 na\00EFve \65E5\672C\8A9E \+01F600 "quoted" back\\slash'
		|| E'\nnew line\ttab\r\b\f \x01 \x1f \x7f end/');
INSERT INTO subscriptions (id, user_id, target_type, target_id) VALUES (30, 3, 'story', 8);
INSERT INTO events (id, story_id, comment_id, author_id, event_type) VALUES
	(11, 8, 3, 2, 'user_comment'),
	(12, 8, 99, 2, 'user_comment');	-- its comment does not exist
TRUNCATE subscription_events;
SELECT * FROM deliver(timeline_body(11, 2), 'timeline_event');
SELECT event_info FROM subscription_events;
-- What Python 3 prints for json.dumps({'comment_id': 3, 'comment_content':
-- ..., 'story_id': 8, 'story_title': ...}):
SELECT event_info = $py${"comment_id": 3, "comment_content": "\u00c7a marche \u2014 na\u00efve \u65e5\u672c\u8a9e \ud83d\ude00 \"quoted\" back\\slash\nnew line\ttab\r\b\f \u0001 \u001f \u007f end/", "story_id": 8, "story_title": "\u00dcberpr\u00fcfung \u00abpriv\u00e9e\u00bb"}$py$
	   AS same_as_python,
	   event_info::jsonb ->> 'comment_content' = (SELECT content FROM comments WHERE id = 3)
	   AS round_trips
  FROM subscription_events;
-- A comment that cannot be resolved gives json.dumps(None), i.e. null.
TRUNCATE subscription_events;
SELECT * FROM deliver(timeline_body(12, 2), 'timeline_event');
SELECT event_type, event_info FROM subscription_events;

--
-- 5. Worklists: subscribers of the worklist whose preference
--    receive_notifications_worklists casts to the string 'true', and who
--    may see the worklist (its board's permissions if it is a lane).
--
INSERT INTO user_preferences (id, user_id, key, value, type) VALUES
	(6, 1, 'receive_notifications_worklists', 'true', 'string'),	-- yes
	(7, 2, 'receive_notifications_worklists', 'True', 'bool'),		-- Python True: no
	(8, 4, 'receive_notifications_worklists', 'true', 'int'),		-- int('true') fails: 'true', yes
	(9, 5, 'receive_notifications_worklists', 'false', 'string'),
	(10, 5, 'receive_notifications_worklists', 'true', 'string');	-- duplicate key: newest wins, yes
-- user 3 has no such preference: no
INSERT INTO worklists (id, title, creator_id, private) VALUES
	(1, 'Public list', 1, false),
	(2, 'Private list', 1, true),
	(3, 'Lane of a private board', 1, false),
	(4, 'Private lane of a public board', 1, true);
INSERT INTO boards (id, title, creator_id, private) VALUES
	(1, 'Private board', 1, true),
	(2, 'Public board', 1, false);
INSERT INTO board_worklists (board_id, list_id, position) VALUES (1, 3, 0), (2, 4, 0);
INSERT INTO permissions (id, name, codename) VALUES
	(2, 'edit_worklist_2', 'edit_worklist'),
	(3, 'move_items_2', 'move_items'),
	(4, 'edit_board_1', 'edit_board'),
	(5, 'move_cards_1', 'move_cards');
INSERT INTO worklist_permissions (worklist_id, permission_id) VALUES (2, 2), (2, 3);
INSERT INTO board_permissions (board_id, permission_id) VALUES (1, 4), (1, 5);
INSERT INTO user_permissions (user_id, permission_id) VALUES (1, 2), (4, 4);
-- StoryBoard's worklist and board filters ignore teams: team 3 = {5}
-- holding move_cards_1 does not let user 5 see board 1.
INSERT INTO teams (id, name) VALUES (3, 'test_team_3');
INSERT INTO team_membership (team_id, user_id) VALUES (3, 5);
INSERT INTO team_permissions (permission_id, team_id) VALUES (5, 3);
INSERT INTO subscriptions (id, user_id, target_type, target_id) VALUES
	(40, 1, 'worklist', 1), (41, 2, 'worklist', 1), (42, 3, 'worklist', 1),
	(43, 4, 'worklist', 1), (44, 5, 'worklist', 1),
	(45, 1, 'worklist', 2), (46, 4, 'worklist', 2), (47, 5, 'worklist', 2),
	(48, 1, 'worklist', 3), (49, 4, 'worklist', 3), (50, 5, 'worklist', 3),
	(51, 1, 'worklist', 4), (52, 5, 'worklist', 4);
INSERT INTO events (id, worklist_id, board_id, author_id, event_type, event_info) VALUES
	(20, 1, NULL, 1, 'worklist_created', '{"worklist_id": 1, "author_id": 1, "worklist_title": "Public list"}'),
	(21, 2, NULL, 1, 'worklist_details_changed', '{"worklist_id": 2, "author_id": 1, "field": "title", "old_value": "Old", "new_value": "Private list"}'),
	(22, 3, NULL, 1, 'worklist_details_changed', '{"worklist_id": 3, "author_id": 1, "field": "title", "old_value": "Old", "new_value": "Lane"}'),
	(23, 4, NULL, 1, 'worklist_details_changed', '{"worklist_id": 4, "author_id": 1, "field": "title", "old_value": "Old", "new_value": "Lane"}'),
	(24, NULL, 1, 1, 'board_created', '{"board_id": 1, "author_id": 1, "board_title": "Private board", "board_description": null}');
-- public list: {1,4,5}; private list: its permission holder 1; lane of a
-- private board: its permission holder 4; private lane of a public board:
-- the board decides, {1,5}; board events: nothing.
SELECT e.id AS event, e.worklist_id, e.board_id, d.*
  FROM events e, LATERAL deliver(timeline_body(e.id), 'timeline_event') d
 WHERE e.id BETWEEN 20 AND 24
 ORDER BY e.id;
-- A board-only event needs no events row: StoryBoard does nothing for it.
SELECT * FROM deliver(replace(timeline_body(24), '"id" : 24', '"id" : 999'), 'timeline_event');
-- worklist_contents_changed: the story or task the change is about must
-- be visible too (events_api.is_visible): updated.old, else removed, else
-- added.  Story 6 is visible to users 1, 2, 3 only.
INSERT INTO events (id, worklist_id, author_id, event_type, event_info) VALUES
	(25, 1, 1, 'worklist_contents_changed', '{"worklist_id": 1, "author_id": 1, "added": {"worklist_id": 1, "item_id": 6, "item_title": "Test Private Story", "item_type": "story", "list_position": 0}, "removed": null, "updated": null}'),
	(26, 1, 1, 'worklist_contents_changed', '{"worklist_id": 1, "author_id": 1, "added": {"worklist_id": 1, "item_id": 5, "item_title": "Task in private story", "item_type": "task", "list_position": 1}, "removed": null, "updated": null}'),
	(27, 1, 1, 'worklist_contents_changed', '{"worklist_id": 1, "author_id": 1, "added": null, "removed": {"worklist_id": 1, "item_id": 4, "item_title": "D Test Task 4 - bar", "item_type": "task", "list_position": 2}, "updated": null}'),
	(28, 1, 1, 'worklist_contents_changed', '{"worklist_id": 1, "author_id": 1, "added": null, "removed": null, "updated": {"old": {"worklist_id": 1, "item_id": 1, "item_title": "E Test story 1 - foo", "item_type": "story", "list_position": 0, "due_date_id": null}, "new": {"worklist_id": 1, "item_id": 6, "item_title": "Test Private Story", "item_type": "story", "list_position": 3}}}'),
	(29, 1, 1, 'worklist_contents_changed', '{"worklist_id": 1, "author_id": 1, "added": {"worklist_id": 1, "item_id": 99, "item_title": "Gone", "item_type": "story", "list_position": 0}, "removed": null, "updated": null}'),
	(30, 1, 1, 'worklist_contents_changed', '{"worklist_id": 1, "author_id": 1, "added": null, "removed": null, "updated": null}');
SELECT e.id AS event, d.*
  FROM events e, LATERAL deliver(timeline_body(e.id), 'timeline_event') d
 WHERE e.id BETWEEN 25 AND 30
 ORDER BY e.id;
-- StoryBoard never writes a row with both a story and a worklist, but its
-- plugin would run both branches, each with the worklist preference:
-- story 1 gives {1,4} of {1,2,3,4}, worklist 1 gives {1,4,5}.
INSERT INTO events (id, story_id, worklist_id, author_id, event_type, event_info)
	VALUES (31, 1, 1, 1, 'worklist_details_changed', '{}');
SELECT * FROM deliver(timeline_body(31), 'timeline_event');

--
-- 6. Project groups: StoryBoard's event types, and event_info with the
--    ids as the URL strings it sends.
--
TRUNCATE subscription_events;
SELECT * FROM deliver(hook_body('PUT', '/v1/project_groups/1/projects/3', 'project_group', '1', 'project', '3'), 'project_group');
SELECT * FROM deliver(hook_body('DELETE', '/v1/project_groups/1/projects/3', 'project_group', '1', 'project', '3'), 'project_group');
-- group 2's subscriber is user 4
SELECT * FROM deliver(hook_body('DELETE', '/v1/project_groups/2', 'project_group', '2'), 'project_group');
SELECT subscriber_id, author_id, event_type, event_info
  FROM subscription_events ORDER BY id;
-- The deleted group's subscriptions are gone, the others stay.
SELECT id, user_id, target_type, target_id FROM subscriptions
 WHERE target_type = 'project_group' ORDER BY id;
-- Other project_group changes notify nobody.
SELECT * FROM deliver(hook_body('PUT', '/v1/project_groups/1', 'project_group', '1'), 'project_group');
SELECT * FROM deliver(replace(hook_body('POST', '/v1/project_groups', 'project_group', NULL),
							  '"resource_id" : null', '"resource_id" : 1'), 'project_group');

--
-- 7. The author: its users row, or NULL when unknown or absent.
--    (StoryBoard: AttributeError on author.id, event lost.)
--
TRUNCATE subscription_events;
SELECT * FROM deliver(timeline_body(2, 2), 'timeline_event');
SELECT * FROM deliver(timeline_body(2, 999), 'timeline_event');
SELECT * FROM deliver(replace(timeline_body(2), '"author_id" : 1, "method"', '"author_id" : null, "method"'),
					  'timeline_event');
SELECT subscriber_id, author_id FROM subscription_events ORDER BY id;

--
-- 8. Deletions of a top-level story, task or project group remove the
--    subscriptions to it; anything with a sub-resource does not.
--
INSERT INTO subscriptions (id, user_id, target_type, target_id) VALUES
	(60, 2, 'project_group', 3),
	(61, 1, 'story', 3);
SELECT id, user_id, target_type, target_id FROM subscriptions
 WHERE target_type <> 'worklist' ORDER BY id;
-- Removing a tag from story 1 keeps everyone subscribed (StoryBoard 708f6f2).
SELECT * FROM deliver(hook_body('DELETE', '/v1/stories/1/tags', 'story', '1', 'tag'), 'story');
-- Removing task 2 from story 1 through the story is not a deletion of the story.
SELECT * FROM deliver(hook_body('DELETE', '/v1/stories/1/tasks/2', 'story', '1', 'task', '2'), 'story');
SELECT count(*) AS story_1_subscriptions FROM subscriptions WHERE target_type = 'story' AND target_id = 1;
-- DELETE /v1/tasks/2 and /v1/stories/3
SELECT * FROM deliver(hook_body('DELETE', '/v1/tasks/2', 'task', '2'), 'task');
SELECT * FROM deliver(hook_body('DELETE', '/v1/stories/3', 'story', '3'), 'story');
-- StoryBoard has no project DELETE; were one sent, only project 3's
-- subscriptions go (StoryBoard's LIKE '%projec%' would take project_group
-- 3's too).
SELECT * FROM deliver(hook_body('DELETE', '/v1/projects/3', 'project', '3'), 'project');
-- Not a subscription target: nothing.
SELECT * FROM deliver(hook_body('DELETE', '/v1/users/2', 'user', '2'), 'user');
SELECT id, user_id, target_type, target_id FROM subscriptions
 WHERE target_type <> 'worklist' ORDER BY id;
-- Hook messages for stories, tasks and projects notify nobody.
SELECT * FROM deliver(hook_body('PUT', '/v1/tasks/1', 'task', '1'), 'task');

--
-- 9. An events row that is not visible yet (StoryBoard publishes before
--    the API commits) is retried, then kept as a dead letter; replayed once
--    the row exists.  (StoryBoard: silently skipped.)
--
SET storyboard_worker.max_retries = 1;
SELECT * FROM deliver(
	'{"author_id": 2, "method": "POST", "url": null, "path": "/v1/stories/1/comments",'
	' "query_string": null, "status": 200, "resource": "timeline_event", "resource_id": 500,'
	' "sub_resource": null, "sub_resource_id": null, "resource_before": null,'
	' "resource_after": {"id": 500, "created_at": "2019-04-11T13:03:42+00:00", "updated_at": null,'
	' "event_type": "user_comment", "event_info": null, "story_id": 1, "worklist_id": null,'
	' "board_id": null, "author_id": 2, "comment_id": 500}}', 'timeline_event');
SELECT * FROM deliver(
	'{"author_id": 2, "method": "POST", "url": null, "path": "/v1/tasks/1",'
	' "query_string": null, "status": 200, "resource": "timeline_event", "resource_id": 501,'
	' "sub_resource": null, "sub_resource_id": null, "resource_before": null,'
	' "resource_after": {"id": 501, "created_at": "2019-04-11T13:03:42+00:00", "updated_at": null,'
	' "event_type": "task_status_changed", "event_info": "{\"story_id\": 1, \"task_id\": 1, \"task_title\": \"A Test Task 1 - foo\", \"old_status\": \"inprogress\", \"new_status\": \"merged\"}",'
	' "story_id": 1, "worklist_id": null, "board_id": null, "author_id": 2, "comment_id": null}}',
	'timeline_event');
SELECT plugin, sqlstate, error, routing_key FROM storyboard_worker.dead_letters ORDER BY id;
-- The API transaction commits.
INSERT INTO comments (id, content) VALUES (500, 'Late comment');
INSERT INTO events (id, story_id, comment_id, author_id, event_type) VALUES (500, 1, 500, 2, 'user_comment');
INSERT INTO events (id, story_id, author_id, event_type, event_info)
	VALUES (501, 1, 2, 'task_status_changed', '{"story_id": 1, "task_id": 1, "task_title": "A Test Task 1 - foo", "old_status": "inprogress", "new_status": "merged"}');
TRUNCATE subscription_events;
SELECT storyboard_worker.replay(id) FROM storyboard_worker.dead_letters ORDER BY id;
SELECT subscriber_id, author_id, event_type, event_info FROM subscription_events ORDER BY id;
SELECT count(*) AS dead_letters_left FROM storyboard_worker.dead_letters;
RESET storyboard_worker.max_retries;

--
-- 10. Tables are found through search_path; a missing one is named, and
--     the event is kept as a dead letter until it is there.
--
ALTER TABLE subscriptions RENAME TO subscriptions_elsewhere;
SELECT plugin, succeeded, sqlstate, error, dead_letter_id IS NOT NULL AS dead_lettered
  FROM storyboard_worker.process_event(timeline_body(1), 'timeline_event');
ALTER TABLE subscriptions_elsewhere RENAME TO subscriptions;
TRUNCATE subscription_events;
SELECT storyboard_worker.replay(id) FROM storyboard_worker.dead_letters ORDER BY id;
SELECT count(*) AS notified, count(*) FILTER (WHERE event_type = 'story_created') AS story_created
  FROM subscription_events;
CREATE SCHEMA elsewhere;
ALTER TABLE subscription_events SET SCHEMA elsewhere;
SELECT plugin, succeeded, sqlstate, error, dead_letter_id IS NOT NULL AS dead_lettered
  FROM storyboard_worker.process_event(hook_body('DELETE', '/v1/project_groups/1', 'project_group', '1'), 'project_group');
SET search_path = public, elsewhere;
SELECT storyboard_worker.replay(id) FROM storyboard_worker.dead_letters ORDER BY id;
SELECT subscriber_id, event_type, event_info FROM elsewhere.subscription_events;
ALTER TABLE elsewhere.subscription_events SET SCHEMA public;
RESET search_path;
DROP SCHEMA elsewhere;

--
-- 11. A subscription_events.created_at of type timestamptz gets now();
--     the plan is prepared again for the new table.
--
DROP TABLE subscription_events;
CREATE TABLE subscription_events (
	id				integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
	created_at		timestamptz,
	updated_at		timestamptz,
	subscriber_id	integer NOT NULL,
	event_type		varchar(100) NOT NULL,
	event_info		text,
	author_id		integer
);
SELECT * FROM deliver(timeline_body(1), 'timeline_event');
SELECT count(*) AS rows, bool_and(abs(extract(epoch FROM now() - created_at)) < 60) AS created_at_is_now
  FROM subscription_events;
-- Of any other type, it gets the UTC wall-clock time as that type; without
-- a created_at column, the rows are written without it.
ALTER TABLE subscription_events ALTER COLUMN created_at TYPE text;
TRUNCATE subscription_events;
SET TIME ZONE 'America/New_York';
SELECT * FROM deliver(timeline_body(1), 'timeline_event');
SELECT count(*) AS rows,
	   bool_and(abs(extract(epoch FROM (now() AT TIME ZONE 'UTC') - created_at::timestamp)) < 60) AS created_at_is_utc_now
  FROM subscription_events;
RESET TIME ZONE;
ALTER TABLE subscription_events DROP COLUMN created_at;
SELECT * FROM deliver(timeline_body(1), 'timeline_event');
INSERT INTO subscriptions (user_id, target_type, target_id) VALUES (2, 'project_group', 1);
SELECT * FROM deliver(hook_body('PUT', '/v1/project_groups/1/projects/4', 'project_group', '1', 'project', '4'), 'project_group');
SELECT subscriber_id, event_type, event_info FROM subscription_events ORDER BY id;

--
-- 12. Malformed timeline_event messages are dead letters, not crashes.
--
SELECT plugin, succeeded, sqlstate, error, dead_letter_id IS NOT NULL AS dead_lettered
  FROM storyboard_worker.process_event(replace(timeline_body(1), '"resource_before" : null, "resource_after" : {',
											   '"resource_before" : null, "ignored" : {'),
									   'timeline_event');
SELECT plugin, succeeded, sqlstate, error, dead_letter_id IS NOT NULL AS dead_lettered
  FROM storyboard_worker.process_event(replace(timeline_body(1), '"story_id" : 1, "worklist_id"',
											   '"story_id" : "one", "worklist_id"'),
									   'timeline_event');

-- Clean up.
DROP EXTENSION storyboard_worker;
DROP FUNCTION deliver(text, text), hook_body(text, text, text, text, text, text, int),
	timeline_body(int, int);
\i test/fixtures/storyboard_schema_drop.sql
