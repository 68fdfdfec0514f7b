/* storyboard_worker--1.0--1.1.sql: the ledger of processed messages */

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
