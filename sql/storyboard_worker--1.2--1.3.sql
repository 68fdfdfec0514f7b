/* storyboard_worker--1.2--1.3.sql: 16-byte message keys; plugins say
   whether they read the author; acknowledgements in the stats view */

\echo Use "ALTER EXTENSION storyboard_worker UPDATE TO '1.3'" to load this file. \quit

-- Message keys become 16-byte values (a uuid): the first half of the
-- SHA-256 digest of routing key and body, or of 'm:' and the message_id.
-- Old keys convert to exactly what the library now computes, so that a
-- message redelivered across the update is still recognised.
CREATE FUNCTION storyboard_worker.key_1_2_to_1_3(old bytea) RETURNS uuid
	LANGUAGE sql IMMUTABLE STRICT
	SET search_path = pg_catalog, pg_temp
	AS $$
SELECT pg_catalog.encode(
	CASE WHEN pg_catalog.substring(old, 1, 2) OPERATOR(pg_catalog.=) 'd:'::pg_catalog.bytea
		 THEN pg_catalog.substring(old, 3, 16)
		 ELSE pg_catalog.substring(pg_catalog.sha256(old), 1, 16) END,
	'hex')::pg_catalog.uuid
$$;
ALTER TABLE storyboard_worker.ledger
	ALTER COLUMN message_key TYPE uuid USING storyboard_worker.key_1_2_to_1_3(message_key);
ALTER TABLE storyboard_worker.redeliveries
	ALTER COLUMN message_key TYPE uuid USING storyboard_worker.key_1_2_to_1_3(message_key);
DROP FUNCTION storyboard_worker.key_1_2_to_1_3(bytea);

-- The author lookup (the users row, as jsonb) is done only when a
-- registered plugin reads event.author; the built-in plugin reads
-- author_id only.
ALTER TABLE storyboard_worker.plugins ADD COLUMN reads_author boolean NOT NULL DEFAULT true;
DROP FUNCTION storyboard_worker.register_plugin(text, regprocedure, regprocedure);
CREATE FUNCTION storyboard_worker.register_plugin(name text,
												  handler regprocedure,
												  enabled regprocedure DEFAULT NULL,
												  reads_author boolean DEFAULT true)
	RETURNS void
	AS 'MODULE_PATHNAME', 'sbw_register_plugin'
	LANGUAGE C CALLED ON NULL INPUT VOLATILE;
COMMENT ON FUNCTION storyboard_worker.register_plugin(text, regprocedure, regprocedure, boolean) IS
	'Register (or re-register) an event worker plugin: handler(storyboard_worker.event) RETURNS void, enabled() RETURNS boolean; reads_author false if it never reads event.author';
REVOKE ALL ON FUNCTION storyboard_worker.register_plugin(text, regprocedure, regprocedure, boolean) FROM PUBLIC;
UPDATE storyboard_worker.plugins SET reads_author = false
 WHERE handler OPERATOR(pg_catalog.=)
	   'storyboard_worker.subscription_handler(storyboard_worker.event)'::pg_catalog.regprocedure;

-- The stats view gains the acknowledgements: how many, how many committed
-- deliveries still wait for theirs, and the commit-to-ack wait.
DROP VIEW storyboard_worker.stats;
DROP FUNCTION storyboard_worker.worker_stats();
CREATE FUNCTION storyboard_worker.worker_stats(
	OUT worker_id integer, OUT pid integer, OUT state text,
	OUT broker text, OUT connected_since timestamptz,
	OUT messages_received bigint, OUT messages_processed bigint,
	OUT messages_dead_lettered bigint, OUT messages_redelivered bigint,
	OUT last_error text, OUT last_error_at timestamptz,
	OUT messages_duplicates bigint, OUT messages_acked bigint,
	OUT acks_pending integer, OUT ack_wait_p50_ms double precision,
	OUT ack_wait_p99_ms double precision)
	RETURNS SETOF record
	AS 'MODULE_PATHNAME', 'sbw_worker_stats'
	LANGUAGE C STRICT VOLATILE;
CREATE VIEW storyboard_worker.stats AS
	SELECT * FROM storyboard_worker.worker_stats();
GRANT SELECT ON storyboard_worker.stats TO PUBLIC;
