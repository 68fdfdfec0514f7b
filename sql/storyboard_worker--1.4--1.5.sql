/* storyboard_worker--1.4--1.5.sql: the broker's queue depth in the stats
   view */

\echo Use "ALTER EXTENSION storyboard_worker UPDATE TO '1.5'" to load this file. \quit

-- The stats view gains the queue's depth as the broker last reported it (a
-- passive queue.declare by consumer 0, every few seconds): messages ready,
-- consumers, and when; NULL while unknown or stale.  Same privileges as
-- before: the view readable by everyone, the function not revoked.
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
	OUT ack_wait_p99_ms double precision,
	OUT queue_messages bigint, OUT queue_consumers integer,
	OUT queue_checked_at timestamptz)
	RETURNS SETOF record
	AS 'MODULE_PATHNAME', 'sbw_worker_stats'
	LANGUAGE C STRICT VOLATILE;
CREATE VIEW storyboard_worker.stats AS
	SELECT * FROM storyboard_worker.worker_stats();
GRANT SELECT ON storyboard_worker.stats TO PUBLIC;
