/* sbw_test_plugins--1.0.sql: plugins that misbehave on purpose (tests only) */

\echo Use "CREATE EXTENSION sbw_test_plugins" to load this file. \quit

-- Crashes the backend (SIGSEGV) on an event whose query_string contains
-- "crash-me"; does nothing otherwise.
CREATE FUNCTION sbw_test_plugins.crash(e storyboard_worker.event) RETURNS void
	AS 'MODULE_PATHNAME', 'sbw_test_crash' LANGUAGE C STRICT;

-- On an event whose query_string contains "commit-fail", makes the event's
-- transaction fail at COMMIT (an ERROR from a pre-commit callback), after
-- the plugin itself returned.
CREATE FUNCTION sbw_test_plugins.fail_at_commit(e storyboard_worker.event) RETURNS void
	AS 'MODULE_PATHNAME', 'sbw_test_fail_at_commit' LANGUAGE C STRICT;

-- On an event whose query_string contains "deaf-<ms>", sleeps that many
-- milliseconds with interrupts held: SIGTERM waits until it returns.
CREATE FUNCTION sbw_test_plugins.deaf(e storyboard_worker.event) RETURNS void
	AS 'MODULE_PATHNAME', 'sbw_test_deaf' LANGUAGE C STRICT;

REVOKE ALL ON FUNCTION sbw_test_plugins.crash(storyboard_worker.event),
	sbw_test_plugins.fail_at_commit(storyboard_worker.event),
	sbw_test_plugins.deaf(storyboard_worker.event) FROM PUBLIC;
