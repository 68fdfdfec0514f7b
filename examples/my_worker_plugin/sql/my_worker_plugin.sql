-- The example plugin, as its own extension on top of storyboard_worker.
SET client_min_messages = error;
CREATE EXTENSION my_worker_plugin CASCADE;

-- CREATE EXTENSION registered it, after the built-in plugin.
SELECT name, handler, enabled FROM storyboard_worker.plugins ORDER BY position;
-- The built-in plugin writes subscription_events too: take it out to watch
-- this one alone.
SELECT storyboard_worker.unregister_plugin('subscription');

-- StoryBoard's tables and its test fixtures (from the repository).
\set ECHO none
\i ../../test/fixtures/storyboard_schema.sql
\i ../../test/fixtures/storyboard_mock_data.sql
\set ECHO all

-- A timeline_event message for events row event_id.  This plugin, like
-- StoryBoard's guide, reads the events row itself: only resource_id matters.
CREATE FUNCTION timeline_body(event_id int) RETURNS text LANGUAGE sql AS $$
SELECT json_build_object(
	'author_id', 1, 'method', 'POST', 'url', NULL, 'path', '/v1/stories/1',
	'query_string', NULL, 'status', 200, 'resource', 'timeline_event',
	'resource_id', event_id, 'sub_resource', NULL, 'sub_resource_id', NULL,
	'resource_before', NULL,
	'resource_after', json_build_object('id', event_id))::text
$$;

-- Events row 6 is on story 1, whose subscribers are users 1 (through
-- project 3 and project group 1) and 3 (the story itself).
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event(timeline_body(6), 'timeline_event');
SELECT subscriber_id, author_id, event_type, event_info
  FROM subscription_events ORDER BY id;

-- Events row 7 is on private story 6: only users granted it.
TRUNCATE subscription_events;
INSERT INTO subscriptions (user_id, target_type, target_id) VALUES (1, 'story', 6), (2, 'story', 6);
SELECT plugin, succeeded FROM storyboard_worker.process_event(timeline_body(7), 'timeline_event');
SELECT subscriber_id, event_type, event_info FROM subscription_events ORDER BY id;

-- An events row that is not committed yet: "retry later", then a dead letter.
SET storyboard_worker.max_retries = 0;
SELECT plugin, succeeded, sqlstate, error, dead_letter_id IS NOT NULL AS dead_lettered
  FROM storyboard_worker.process_event(timeline_body(42), 'timeline_event');
RESET storyboard_worker.max_retries;

-- Disabled through its setting: not called at all.
TRUNCATE subscription_events;
SET my_worker_plugin.enabled = off;
SELECT plugin, succeeded FROM storyboard_worker.process_event(timeline_body(6), 'timeline_event');
SELECT count(*) FROM subscription_events;
RESET my_worker_plugin.enabled;
SELECT plugin, succeeded FROM storyboard_worker.process_event(timeline_body(6), 'timeline_event');
SELECT count(*) FROM subscription_events;

-- Unregister before dropping the extension.
SELECT storyboard_worker.unregister_plugin('my_worker_plugin');
DROP EXTENSION my_worker_plugin;
DROP EXTENSION storyboard_worker;
DROP FUNCTION timeline_body(int);
\i ../../test/fixtures/storyboard_schema_drop.sql
