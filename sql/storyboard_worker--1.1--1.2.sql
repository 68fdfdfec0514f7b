/* storyboard_worker--1.1--1.2.sql: poison messages counted; the sql_drop
   event trigger works for every role */

\echo Use "ALTER EXTENSION storyboard_worker UPDATE TO '1.2'" to load this file. \quit

-- Redelivered messages whose processing started and has not finished: one
-- row per message, committed and flushed before its plugins run, deleted in
-- the transaction that applies it.  A message that crashes its consumer or
-- fails at COMMIT storyboard_worker.max_redeliveries times is dead-lettered
-- unrun (SQLSTATE SB002), with the last failure's error.  Rows of messages that never came back are pruned
-- with the ledger.
CREATE TABLE storyboard_worker.redeliveries (
	message_key		bytea PRIMARY KEY,
	attempts		integer NOT NULL DEFAULT 1,
	first_at		timestamptz NOT NULL DEFAULT now(),
	last_at			timestamptz NOT NULL DEFAULT now(),
	last_error		text			-- why the last attempt failed, if it did not crash
);
REVOKE ALL ON storyboard_worker.redeliveries FROM PUBLIC;

-- The sql_drop event trigger fires for whoever runs the DDL, also a role
-- that may not read the registry: it runs as the extension's owner, with a
-- fixed search_path, and touches nothing but the registry rows of the
-- functions being dropped.
CREATE OR REPLACE FUNCTION storyboard_worker.forget_dropped_plugins()
	RETURNS event_trigger
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	gone text;
BEGIN
	IF pg_catalog.to_regclass('storyboard_worker.plugins') IS NULL THEN
		RETURN;					-- the extension itself is being dropped
	END IF;
	FOR gone IN
		DELETE FROM storyboard_worker.plugins p
		 USING pg_catalog.pg_event_trigger_dropped_objects() o
		 WHERE o.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
		   AND (o.objid OPERATOR(pg_catalog.=) p.handler::pg_catalog.oid
				OR o.objid OPERATOR(pg_catalog.=) p.enabled::pg_catalog.oid)
		RETURNING p.name
	LOOP
		RAISE NOTICE 'storyboard_worker plugin "%" unregistered: its function was dropped', gone;
	END LOOP;
END $$;
REVOKE ALL ON FUNCTION storyboard_worker.forget_dropped_plugins() FROM PUBLIC;
