-- bench/bench_objects.sql: the benchmark's own objects in database storyboard.
--
-- bench.noop_plugin is the no-op workload's plugin: the least a plugin can
-- do per event, one INSERT.  It also keeps the publish time that
-- bench/amqp_ceiling writes into resource_after.bench_published_us, and the
-- row's default takes clock_timestamp() while the event's transaction runs,
-- so the table gives both the commit-side time of every event (end-to-end
-- throughput) and its publish-to-commit latency.  The pgbench ceiling of the
-- no-op workload runs the same INSERT.  For the subscription workload's
-- latency run it is registered after "subscription" as a probe.
\set ON_ERROR_STOP 1
CREATE SCHEMA bench;

CREATE TABLE bench.noop_events (
	resource_id		bigint,
	published_us	bigint,
	committed_at	timestamptz NOT NULL DEFAULT clock_timestamp(),
	backend_pid		integer NOT NULL DEFAULT pg_backend_pid()	-- which consumer
);

CREATE FUNCTION bench.noop_plugin(e storyboard_worker.event)
	RETURNS void
	LANGUAGE plpgsql
	AS $$
BEGIN
	INSERT INTO bench.noop_events (resource_id, published_us)
	VALUES (e.resource_id, (e.resource_after ->> 'bench_published_us')::bigint);
END
$$;
