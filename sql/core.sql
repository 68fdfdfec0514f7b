-- storyboard_worker core: registry, signatures, dispatch through
-- process_event, dead letters, replay, retries.
CREATE EXTENSION storyboard_worker;
SET client_min_messages = warning;

-- The built-in plugin is registered by CREATE EXTENSION.
SELECT name, handler, enabled FROM storyboard_worker.plugins ORDER BY position;
-- Everything lives in schema storyboard_worker.
SELECT e.extname, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE e.extname = 'storyboard_worker';
SELECT count(*) AS objects_outside_schema
  FROM pg_depend d JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
 WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'storyboard_worker')
   AND c.relnamespace <> 'storyboard_worker'::regnamespace;

-- The core tests do not need StoryBoard's tables: take the built-in plugin out.
SELECT storyboard_worker.unregister_plugin('subscription');
SELECT storyboard_worker.unregister_plugin('subscription');

-- A recording plugin and a raising one, in PL/pgSQL.
CREATE TABLE seen (n serial, plugin text, ev storyboard_worker.event, who name);
CREATE FUNCTION record_a(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO seen (plugin, ev, who) VALUES ('a', e, current_user); END $$;
CREATE FUNCTION record_b(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO seen (plugin, ev, who) VALUES ('b', e, current_user); END $$;
CREATE FUNCTION raiser(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO seen (plugin, ev) VALUES ('raiser', e);   -- rolled back
  RAISE EXCEPTION 'raiser refuses % %', e.resource, e.resource_id
    USING ERRCODE = 'P0001';
END $$;

-- Wrong signatures are refused.
CREATE FUNCTION bad_ret(e storyboard_worker.event) RETURNS integer LANGUAGE sql AS 'SELECT 1';
CREATE FUNCTION bad_arg(e text) RETURNS void LANGUAGE sql AS '';
CREATE FUNCTION bad_two(e storyboard_worker.event, x int) RETURNS void LANGUAGE sql AS '';
CREATE FUNCTION bad_set(e storyboard_worker.event) RETURNS SETOF void LANGUAGE sql AS '';
CREATE PROCEDURE bad_proc(e storyboard_worker.event) LANGUAGE sql AS '';
CREATE FUNCTION bad_enabled(x int) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE FUNCTION text_enabled() RETURNS text LANGUAGE sql AS 'SELECT ''yes''';
\set VERBOSITY default
SELECT storyboard_worker.register_plugin('x', 'bad_ret(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('x', 'bad_arg(text)');
SELECT storyboard_worker.register_plugin('x', 'bad_two(storyboard_worker.event,int)');
SELECT storyboard_worker.register_plugin('x', 'bad_set(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('x', 'bad_proc(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('x', 'record_a(storyboard_worker.event)', 'bad_enabled(int)');
SELECT storyboard_worker.register_plugin('x', 'record_a(storyboard_worker.event)', 'text_enabled()');
SELECT storyboard_worker.register_plugin('x', 'no_such_function(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin(NULL, 'record_a(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('', 'record_a(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('x', NULL);
\set VERBOSITY terse
SELECT count(*) AS registered FROM storyboard_worker.plugins;

-- Registration order is running order; re-registering keeps the place.
SELECT storyboard_worker.register_plugin('b', 'record_b(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('raiser', 'raiser(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('a', 'record_a(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('b', 'record_b(storyboard_worker.event)');
SELECT name, handler, enabled FROM storyboard_worker.plugins ORDER BY position;

-- A StoryBoard hook message (PUT /v1/tasks/1): ids as URL strings.
SELECT * FROM storyboard_worker.process_event($${"author_id": 2, "method": "PUT",
 "url": "https://storyboard.example.org/", "path": "/v1/tasks/1", "query_string": "",
 "status": 200, "resource": "task", "resource_id": "1", "sub_resource": null,
 "sub_resource_id": null,
 "resource_before": {"id": 1, "title": "A Test Task 1 - foo", "status": "inprogress", "story_id": 1},
 "resource_after": {"id": 1, "title": "A Test Task 1 - foo", "status": "merged", "story_id": 1}}$$, 'task');
SELECT n, plugin, (ev).routing_key, (ev).redelivered, (ev).author_id, (ev).author,
       (ev).method, (ev).url, (ev).path, (ev).query_string, (ev).status,
       (ev).resource, (ev).resource_id, (ev).sub_resource, (ev).sub_resource_id
  FROM seen ORDER BY n;
SELECT (ev).resource_before, (ev).resource_after FROM seen WHERE plugin = 'b';
SELECT id, routing_key, plugin, error, sqlstate, convert_from(body, 'UTF8') LIKE '{"author_id": 2,%' AS body_kept
  FROM storyboard_worker.dead_letters ORDER BY id;

-- A timeline_event message: int ids, missing keys become NULL; no routing
-- key given: the resource is used.
TRUNCATE seen;
SELECT * FROM storyboard_worker.process_event(
 '{"resource": "timeline_event", "resource_id": 42, "method": "POST", "author_id": 2,
   "resource_after": {"id": 42, "event_type": "task_status_changed", "story_id": 1,
   "event_info": "{\"story_id\": 1}"}}')
 WHERE plugin <> 'raiser';
SELECT plugin, (ev).routing_key, (ev).author_id, (ev).method, (ev).path, (ev).status,
       (ev).resource_id, (ev).resource_after->>'event_type' AS event_type
  FROM seen ORDER BY n;

-- The author's users row, when there is a users table.
CREATE TABLE users (id integer PRIMARY KEY, full_name text, email text);
INSERT INTO users VALUES (2, 'Ada Lövelace', 'ada@example.org');
TRUNCATE seen;
SELECT count(*) FROM storyboard_worker.process_event('{"resource": "story", "resource_id": "7", "author_id": "2", "method": "POST"}');
SELECT plugin, (ev).author_id, (ev).author FROM seen ORDER BY n;
TRUNCATE seen;
SELECT count(*) FROM storyboard_worker.process_event('{"resource": "story", "resource_id": 7, "author_id": 99, "method": "POST"}');
SELECT plugin, (ev).author_id, (ev).author IS NULL AS no_author FROM seen ORDER BY n;

-- StoryBoard's "payload[key] or None": falsy values are NULL.
TRUNCATE seen;
SELECT count(*) FROM storyboard_worker.process_event('{"resource": "story", "resource_id": 0, "author_id": 0, "method": "DELETE", "path": "", "query_string": "", "status": 0, "resource_before": {}, "sub_resource": ""}');
SELECT (ev).resource_id, (ev).author_id, (ev).path, (ev).query_string, (ev).status,
       (ev).resource_before, (ev).sub_resource
  FROM seen WHERE plugin = 'a';

-- Bodies that cannot be decoded are kept with plugin NULL.
TRUNCATE seen;
DELETE FROM storyboard_worker.dead_letters;
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "resource_id": ', 'story');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('[1, 2, 3]', 'story');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "resource_id": "abc"}', 'story');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "resource_id": "99999999999999999999"}', 'story');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "resource_id": true}', 'story');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "method": 5}', 'story');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "widget"}', 'widget');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "method": "GET"}', 'story');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "resource_after": "not an object"}', 'story');
-- duplicate keys: the last one wins, as for StoryBoard (here, one not known)
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "resource": "widget"}', 'story');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "path": "a\u0000b"}', 'story');
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event(repeat('[', 100) || repeat(']', 100), 'story');
SET storyboard_worker.max_message_bytes = 1024;
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource": "story", "url": "' || repeat('x', 2000) || '"}', 'story');
RESET storyboard_worker.max_message_bytes;
SELECT count(*) AS dead_letters, count(*) FILTER (WHERE plugin IS NULL) AS undecodable,
       count(*) FILTER (WHERE length(body) > 0) AS with_body
  FROM storyboard_worker.dead_letters;
SELECT count(*) AS no_plugin_ran FROM seen;

-- Replay: an undecodable body that is now acceptable (limit raised).
SELECT id AS big_id FROM storyboard_worker.dead_letters WHERE error LIKE 'message body of % bytes exceeds%' \gset
SELECT storyboard_worker.replay(:big_id);
SELECT count(*) AS ran FROM seen;
SELECT count(*) AS big_left FROM storyboard_worker.dead_letters WHERE id = :big_id;
-- ... and one that still is not: the row stays, counted.
SELECT id AS bad_id FROM storyboard_worker.dead_letters WHERE error LIKE '%abc%' \gset
SELECT storyboard_worker.replay(:bad_id);
SELECT replay_count, last_replayed_at IS NOT NULL AS replayed FROM storyboard_worker.dead_letters WHERE id = :bad_id;
SELECT storyboard_worker.replay(-1);

-- A raising plugin: rolled back alone, kept for replay; fixed, replayed once.
TRUNCATE seen;
DELETE FROM storyboard_worker.dead_letters;
SELECT plugin, succeeded, sqlstate, error, dead_letter_id IS NOT NULL AS kept
  FROM storyboard_worker.process_event('{"resource": "story", "resource_id": 5, "method": "PUT"}');
SELECT plugin FROM seen ORDER BY n;
SELECT id AS raiser_id FROM storyboard_worker.dead_letters WHERE plugin = 'raiser' \gset
SELECT storyboard_worker.replay(:raiser_id);
SELECT replay_count FROM storyboard_worker.dead_letters WHERE id = :raiser_id;
CREATE OR REPLACE FUNCTION raiser(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO seen (plugin, ev) VALUES ('raiser', e); END $$;
SELECT storyboard_worker.replay(:raiser_id);
SELECT plugin, (ev).resource_id FROM seen ORDER BY n;
SELECT count(*) AS left_over FROM storyboard_worker.dead_letters;

-- Transient errors are retried (SB001: "not yet"), then succeed once.
CREATE SEQUENCE attempts;
CREATE FUNCTION flaky(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF nextval('attempts') < 3 THEN
    RAISE EXCEPTION 'not yet' USING ERRCODE = 'SB001';
  END IF;
  INSERT INTO seen (plugin, ev) VALUES ('flaky', e);
END $$;
SELECT storyboard_worker.unregister_plugin('raiser');
SELECT storyboard_worker.register_plugin('flaky', 'flaky(storyboard_worker.event)');
TRUNCATE seen;
SELECT plugin, succeeded FROM storyboard_worker.process_event('{"resource": "story", "resource_id": 6, "method": "PUT"}');
SELECT plugin, count(*) FROM seen GROUP BY plugin ORDER BY plugin;
-- ... and dead-lettered when retries run out.
SELECT setval('attempts', 1, false);
SET storyboard_worker.max_retries = 1;
TRUNCATE seen;
SELECT plugin, succeeded, sqlstate FROM storyboard_worker.process_event('{"resource": "story", "resource_id": 6, "method": "PUT"}');
RESET storyboard_worker.max_retries;
SELECT plugin, count(*) FROM seen GROUP BY plugin ORDER BY plugin;
SELECT plugin, sqlstate, error FROM storyboard_worker.dead_letters;

-- enabled(): a disabled plugin does not run (StoryBoard's enabled()).
CREATE FUNCTION b_enabled() RETURNS boolean LANGUAGE sql
  AS $$ SELECT coalesce(nullif(current_setting('regress.b_enabled', true), ''), 'on')::boolean $$;
SELECT storyboard_worker.register_plugin('b', 'record_b(storyboard_worker.event)', 'b_enabled()');
SET regress.b_enabled = off;
TRUNCATE seen;
SELECT plugin, succeeded FROM storyboard_worker.process_event('{"resource": "project", "resource_id": 1, "method": "PUT"}');
SELECT plugin FROM seen ORDER BY n;
RESET regress.b_enabled;

-- Dropping a plugin's function unregisters the plugin (sql_drop trigger).
CREATE FUNCTION doomed(e storyboard_worker.event) RETURNS void LANGUAGE sql AS '';
CREATE FUNCTION doomed_enabled() RETURNS boolean LANGUAGE sql AS 'SELECT true';
SELECT storyboard_worker.register_plugin('doomed', 'doomed(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('doomed2', 'record_a(storyboard_worker.event)', 'doomed_enabled()');
SET client_min_messages = notice;
DROP FUNCTION doomed(storyboard_worker.event);
DROP FUNCTION doomed_enabled();
SET client_min_messages = warning;
SELECT name FROM storyboard_worker.plugins ORDER BY position;

-- Plugins run as storyboard_worker.role.
CREATE ROLE regress_sbw_plugin_role;
GRANT INSERT, SELECT ON seen TO regress_sbw_plugin_role;
GRANT USAGE ON SEQUENCE seen_n_seq, attempts TO regress_sbw_plugin_role;
GRANT SELECT ON users TO regress_sbw_plugin_role;
SET storyboard_worker.role = 'regress_sbw_plugin_role';
TRUNCATE seen;
SELECT plugin, succeeded FROM storyboard_worker.process_event('{"resource": "project", "resource_id": 1, "method": "PUT", "author_id": 2}');
SELECT plugin, who, (ev).author->>'full_name' AS author FROM seen ORDER BY n;
SET storyboard_worker.role = 'regress_no_such_role';
SELECT * FROM storyboard_worker.process_event('{"resource": "project", "resource_id": 1}');
RESET storyboard_worker.role;

-- Privileges: ordinary users see the stats view, nothing else.
CREATE ROLE regress_sbw_user;
SET ROLE regress_sbw_user;
SELECT count(*) >= 0 AS stats_readable FROM storyboard_worker.stats;
SELECT * FROM storyboard_worker.dead_letters;
SELECT * FROM storyboard_worker.plugins;
SELECT storyboard_worker.register_plugin('evil', 'record_a(storyboard_worker.event)');
SELECT storyboard_worker.unregister_plugin('a');
SELECT * FROM storyboard_worker.process_event('{"resource": "story"}');
SELECT storyboard_worker.replay(1);
-- (the error's wording differs between majors: its SQLSTATE does not)
\set VERBOSITY sqlstate
SHOW storyboard_worker.rabbit_password;
\set VERBOSITY terse
SELECT count(*) AS password_rows FROM pg_settings WHERE name = 'storyboard_worker.rabbit_password';
RESET ROLE;
SELECT count(*) AS password_rows_superuser FROM pg_settings WHERE name = 'storyboard_worker.rabbit_password';
-- Even a granted EXECUTE does not let a non-owner manage plugins.
GRANT EXECUTE ON FUNCTION storyboard_worker.register_plugin(text, regprocedure, regprocedure, boolean) TO regress_sbw_user;
SET ROLE regress_sbw_user;
SELECT storyboard_worker.register_plugin('evil', 'record_a(storyboard_worker.event)');
RESET ROLE;

-- Clean up.
DROP EXTENSION storyboard_worker CASCADE;
DROP TABLE seen, users;
DROP SEQUENCE attempts;
-- (CASCADE took the functions whose argument is storyboard_worker.event)
DROP FUNCTION b_enabled, bad_arg, bad_enabled, text_enabled;
DROP ROLE regress_sbw_plugin_role, regress_sbw_user;
