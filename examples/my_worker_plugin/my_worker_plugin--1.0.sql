/* my_worker_plugin--1.0.sql */

\echo Use "CREATE EXTENSION my_worker_plugin CASCADE" to load this file. \quit

-- The handler: called once per StoryBoard event, inside the event's own
-- transaction (in a subtransaction of its own).  It must take exactly one
-- storyboard_worker.event and return void.
CREATE FUNCTION my_worker_plugin.handle(event storyboard_worker.event)
	RETURNS void
	AS 'MODULE_PATHNAME', 'my_worker_plugin_handle'
	LANGUAGE C STRICT VOLATILE;

-- StoryBoard's enabled(): here a setting, my_worker_plugin.enabled
-- (default on), read when each event is dispatched.  Turn it off with e.g.
--   ALTER SYSTEM SET my_worker_plugin.enabled = off; SELECT pg_reload_conf();
CREATE FUNCTION my_worker_plugin.enabled()
	RETURNS boolean
	LANGUAGE sql STABLE
	AS $$ SELECT coalesce(nullif(current_setting('my_worker_plugin.enabled', true), ''), 'on')::boolean $$;

-- Register it: storyboard_worker runs it after the plugins registered before
-- it.  Unregister it before DROP EXTENSION my_worker_plugin:
--   SELECT storyboard_worker.unregister_plugin('my_worker_plugin');
SELECT storyboard_worker.register_plugin('my_worker_plugin',
	'my_worker_plugin.handle(storyboard_worker.event)',
	'my_worker_plugin.enabled()');
