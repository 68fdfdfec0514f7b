/* storyboard_worker--1.0--1.1.sql: the ledger of processed messages;
   plugins unregistered when their function is dropped */

\echo Use "ALTER EXTENSION storyboard_worker UPDATE TO '1.1'" to load this file. \quit

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
