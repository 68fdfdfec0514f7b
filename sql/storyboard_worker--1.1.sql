/* storyboard_worker--1.1.sql */

\echo Use "CREATE EXTENSION storyboard_worker" to load this file. \quit

-- The event handed to every plugin: the 12 keys of StoryBoard's message
-- body, plus the routing key, the broker's redelivered flag and the author's
-- users row (what StoryBoard's WorkerTaskBase resolves before handle()).
CREATE TYPE storyboard_worker.event AS (
	routing_key		text,
	redelivered		boolean,
	author_id		bigint,
	author			jsonb,
	method			text,
	url				text,
	path			text,
	query_string	text,
	status			integer,
	resource		text,
	resource_id		bigint,
	sub_resource	text,
	sub_resource_id	bigint,
	resource_before	jsonb,
	resource_after	jsonb
);

-- Registered plugins, run in registration order (position).
CREATE TABLE storyboard_worker.plugins (
	name			text PRIMARY KEY,
	handler			regprocedure NOT NULL,
	enabled			regprocedure,
	position		bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
	registered_at	timestamptz NOT NULL DEFAULT now(),
	registered_by	name NOT NULL DEFAULT current_user
);

-- Messages that could not be decoded (plugin IS NULL) or that a plugin
-- failed on (plugin = its name).  Bodies may hold private story text.
CREATE TABLE storyboard_worker.dead_letters (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	received_at		timestamptz NOT NULL DEFAULT now(),
	routing_key		text,
	body			bytea NOT NULL,
	plugin			text,
	error			text NOT NULL,
	sqlstate		text,
	message_id		text,
	redelivered		boolean NOT NULL DEFAULT false,
	replay_count	integer NOT NULL DEFAULT 0,
	last_replayed_at timestamptz
);
CREATE INDEX dead_letters_plugin_idx ON storyboard_worker.dead_letters (plugin);

SELECT pg_catalog.pg_extension_config_dump('storyboard_worker.plugins',
	'WHERE name <> ''subscription''');
SELECT pg_catalog.pg_extension_config_dump('storyboard_worker.dead_letters', '');

-- Any change to the registry tells every worker to reload its plugin cache
-- (a relcache invalidation on the table, sent at commit).
CREATE FUNCTION storyboard_worker.plugins_changed()
	RETURNS trigger
	AS 'MODULE_PATHNAME', 'sbw_plugins_changed'
	LANGUAGE C;
CREATE TRIGGER plugins_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON storyboard_worker.plugins
	FOR EACH STATEMENT EXECUTE FUNCTION storyboard_worker.plugins_changed();

CREATE FUNCTION storyboard_worker.register_plugin(name text,
												  handler regprocedure,
												  enabled regprocedure DEFAULT NULL)
	RETURNS void
	AS 'MODULE_PATHNAME', 'sbw_register_plugin'
	LANGUAGE C CALLED ON NULL INPUT VOLATILE;
COMMENT ON FUNCTION storyboard_worker.register_plugin(text, regprocedure, regprocedure) IS
	'Register (or re-register) an event worker plugin: handler(storyboard_worker.event) RETURNS void, enabled() RETURNS boolean';

CREATE FUNCTION storyboard_worker.unregister_plugin(name text)
	RETURNS boolean
	AS 'MODULE_PATHNAME', 'sbw_unregister_plugin'
	LANGUAGE C STRICT VOLATILE;

CREATE FUNCTION storyboard_worker.process_event(body text,
												routing_key text DEFAULT NULL)
	RETURNS TABLE (plugin text, succeeded boolean, sqlstate text,
				   error text, dead_letter_id bigint)
	AS 'MODULE_PATHNAME', 'sbw_process_event'
	LANGUAGE C CALLED ON NULL INPUT VOLATILE;
COMMENT ON FUNCTION storyboard_worker.process_event(text, text) IS
	'Dispatch one StoryBoard message body to every enabled plugin, in the caller''s transaction';

CREATE FUNCTION storyboard_worker.replay(dead_letter_id bigint)
	RETURNS boolean
	AS 'MODULE_PATHNAME', 'sbw_replay'
	LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION storyboard_worker.replay(bigint) IS
	'Re-run a dead letter (its plugin, or every plugin for an undecodable body); deletes it on success';

CREATE FUNCTION storyboard_worker.worker_stats(
	OUT worker_id integer, OUT pid integer, OUT state text,
	OUT broker text, OUT connected_since timestamptz,
	OUT messages_received bigint, OUT messages_processed bigint,
	OUT messages_dead_lettered bigint, OUT messages_redelivered bigint,
	OUT last_error text, OUT last_error_at timestamptz)
	RETURNS SETOF record
	AS 'MODULE_PATHNAME', 'sbw_worker_stats'
	LANGUAGE C STRICT VOLATILE;

CREATE VIEW storyboard_worker.stats AS
	SELECT * FROM storyboard_worker.worker_stats();

-- Wake the workers: they notice the new extension at once instead of at
-- their next periodic check.
CREATE FUNCTION storyboard_worker.wake_workers()
	RETURNS integer
	AS 'MODULE_PATHNAME', 'sbw_wake_workers'
	LANGUAGE C STRICT VOLATILE;

-- The built-in plugin (StoryBoard's "subscription"), always enabled.
CREATE FUNCTION storyboard_worker.subscription_handler(event storyboard_worker.event)
	RETURNS void
	AS 'MODULE_PATHNAME', 'sbw_subscription_handler'
	LANGUAGE C STRICT VOLATILE;

-- Privileges: only the extension owner (a superuser at creation) manages
-- plugins, reads dead letters and runs dispatch by hand.
REVOKE ALL ON ALL TABLES IN SCHEMA storyboard_worker FROM PUBLIC;
REVOKE ALL ON FUNCTION storyboard_worker.register_plugin(text, regprocedure, regprocedure) FROM PUBLIC;
REVOKE ALL ON FUNCTION storyboard_worker.unregister_plugin(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION storyboard_worker.process_event(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION storyboard_worker.replay(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION storyboard_worker.wake_workers() FROM PUBLIC;
REVOKE ALL ON FUNCTION storyboard_worker.plugins_changed() FROM PUBLIC;
REVOKE ALL ON FUNCTION storyboard_worker.subscription_handler(storyboard_worker.event) FROM PUBLIC;
GRANT USAGE ON SCHEMA storyboard_worker TO PUBLIC;
GRANT SELECT ON storyboard_worker.stats TO PUBLIC;

-- Version 1.1 (also storyboard_worker--1.0--1.1.sql)

-- One row per processed message, written in the event's own transaction,
-- so a redelivery after a crash between COMMIT and ack is recognised and
-- not applied twice.  Pruned by age (storyboard_worker.ledger_retention).
CREATE TABLE storyboard_worker.ledger (
	message_key		bytea PRIMARY KEY,
	processed_at	timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_processed_at_idx ON storyboard_worker.ledger (processed_at);
REVOKE ALL ON storyboard_worker.ledger FROM PUBLIC;

-- The stats view gains messages_duplicates (redeliveries found in the ledger).
DROP VIEW storyboard_worker.stats;
DROP FUNCTION storyboard_worker.worker_stats();
CREATE FUNCTION storyboard_worker.worker_stats(
	OUT worker_id integer, OUT pid integer, OUT state text,
	OUT broker text, OUT connected_since timestamptz,
	OUT messages_received bigint, OUT messages_processed bigint,
	OUT messages_dead_lettered bigint, OUT messages_redelivered bigint,
	OUT last_error text, OUT last_error_at timestamptz,
	OUT messages_duplicates bigint)
	RETURNS SETOF record
	AS 'MODULE_PATHNAME', 'sbw_worker_stats'
	LANGUAGE C STRICT VOLATILE;
CREATE VIEW storyboard_worker.stats AS
	SELECT * FROM storyboard_worker.worker_stats();
GRANT SELECT ON storyboard_worker.stats TO PUBLIC;

-- Dropping a plugin's function (or the extension that owns it, e.g. DROP
-- EXTENSION my_worker_plugin) unregisters the plugin, instead of leaving a
-- registration that fails on every event.
CREATE FUNCTION storyboard_worker.forget_dropped_plugins()
	RETURNS event_trigger
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	gone text;
BEGIN
	IF to_regclass('storyboard_worker.plugins') IS NULL THEN
		RETURN;					-- the extension itself is being dropped
	END IF;
	FOR gone IN
		DELETE FROM storyboard_worker.plugins p
		 USING pg_event_trigger_dropped_objects() o
		 WHERE o.classid = 'pg_catalog.pg_proc'::regclass
		   AND o.objid IN (p.handler::oid, p.enabled::oid)
		RETURNING p.name
	LOOP
		RAISE NOTICE 'storyboard_worker plugin "%" unregistered: its function was dropped', gone;
	END LOOP;
END $$;
REVOKE ALL ON FUNCTION storyboard_worker.forget_dropped_plugins() FROM PUBLIC;
CREATE EVENT TRIGGER storyboard_worker_forget_dropped_plugins ON sql_drop
	EXECUTE FUNCTION storyboard_worker.forget_dropped_plugins();

SELECT storyboard_worker.register_plugin('subscription',
	'storyboard_worker.subscription_handler(storyboard_worker.event)');
SELECT storyboard_worker.wake_workers();
