-- Upgrade paths: an installed 1.0, 1.1, 1.2, 1.3 or 1.4 updated with ALTER EXTENSION
-- ... UPDATE keeps its registrations, dead letters and ledger and ends with
-- the same objects, privileges and function definitions as CREATE EXTENSION
-- of the default version (1.5).
SET client_min_messages = warning;
-- The extension's members, by name.  PostgreSQL 17 also lists each table's
-- row type and its array type: left out, so that every major shows the same.
CREATE TEMP VIEW ext_members AS
  SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS object
    FROM pg_depend d
   WHERE d.refclassid = 'pg_extension'::regclass
     AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'storyboard_worker')
     AND NOT (d.classid = 'pg_type'::regclass AND EXISTS (
           SELECT 1 FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid
            WHERE c.relkind <> 'c' AND (t.oid = d.objid OR t.typarray = d.objid)));
CREATE EXTENSION storyboard_worker VERSION '1.0';
SELECT extversion FROM pg_extension WHERE extname = 'storyboard_worker';
SELECT to_regclass('storyboard_worker.ledger') IS NULL AS no_ledger_in_1_0;
-- This library refuses to run against the 1.0 objects: every SQL-callable
-- function says to update (the workers wait, see test_operations.py).
CREATE FUNCTION upgrade_noop(e storyboard_worker.event) RETURNS void LANGUAGE sql AS '';
SELECT storyboard_worker.register_plugin('noop', 'upgrade_noop(storyboard_worker.event)');
SELECT count(*) FROM storyboard_worker.process_event('not json', 'story');
SELECT count(*) FROM storyboard_worker.stats;
SELECT storyboard_worker.wake_workers();
-- A registration and a dead letter made under 1.0 (by the 1.0 library) survive
-- the update; written directly here, as the 1.0 functions would have.
INSERT INTO storyboard_worker.plugins (name, handler)
  VALUES ('noop', 'upgrade_noop(storyboard_worker.event)');
INSERT INTO storyboard_worker.dead_letters (routing_key, body, error, sqlstate)
  VALUES ('story', 'not json', 'message body is not valid JSON', '22P02');
CREATE TEMP TABLE objects_10_upgraded AS
  SELECT object FROM ext_members;
ALTER EXTENSION storyboard_worker UPDATE TO '1.1';
SELECT extversion FROM pg_extension WHERE extname = 'storyboard_worker';
CREATE TEMP TABLE objects_11_upgraded AS
  SELECT object FROM ext_members;
ALTER EXTENSION storyboard_worker UPDATE TO '1.2';
CREATE TEMP TABLE objects_12_upgraded AS
  SELECT object FROM ext_members;
-- ledger keys of 1.2 (a message_id key and a digest key) convert to the
-- 16-byte keys the 1.3 library computes for the same messages
INSERT INTO storyboard_worker.ledger (message_key) VALUES
  ('m:' || convert_to('id-42', 'UTF8')),
  ('d:'::bytea || sha256(convert_to('task', 'UTF8') || '\x00'::bytea || convert_to('{"a": 1}', 'UTF8')));
ALTER EXTENSION storyboard_worker UPDATE TO '1.3';
CREATE TEMP TABLE objects_13_upgraded AS
  SELECT object FROM ext_members;
ALTER EXTENSION storyboard_worker UPDATE TO '1.4';
CREATE TEMP TABLE objects_14_upgraded AS
  SELECT object FROM ext_members;
ALTER EXTENSION storyboard_worker UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'storyboard_worker';
SELECT storyboard_worker.wake_workers() >= 0 AS callable_after_update;
SELECT message_key FROM storyboard_worker.ledger ORDER BY 1;
SELECT encode(substring(sha256(convert_to('m:id-42', 'UTF8')), 1, 16), 'hex')::uuid AS message_id_key,
       encode(substring(sha256(convert_to('task', 'UTF8') || '\x00'::bytea || convert_to('{"a": 1}', 'UTF8')), 1, 16), 'hex')::uuid AS digest_key;
SELECT name, reads_author FROM storyboard_worker.plugins ORDER BY position;
SELECT count(*) AS dead_letters_kept FROM storyboard_worker.dead_letters;
SELECT attname FROM pg_attribute WHERE attrelid = 'storyboard_worker.stats'::regclass AND attnum > 0
 ORDER BY attnum;
CREATE TEMP TABLE objects_upgraded AS
  SELECT object FROM ext_members;
CREATE TEMP TABLE acl_upgraded AS
  SELECT c.relname, c.relacl::text FROM pg_class c
   WHERE c.relnamespace = 'storyboard_worker'::regnamespace;
CREATE TEMP TABLE functions_upgraded AS
  SELECT p.oid::regprocedure::text AS fn, p.prosrc, p.prosecdef, p.proconfig::text, p.proacl::text
    FROM pg_proc p WHERE p.pronamespace = 'storyboard_worker'::regnamespace;
DROP EXTENSION storyboard_worker CASCADE;
CREATE EXTENSION storyboard_worker;
SELECT extversion FROM pg_extension WHERE extname = 'storyboard_worker';
CREATE TEMP TABLE objects_fresh AS
  SELECT object FROM ext_members;
-- differences between the upgraded and the fresh install (expect none)
(SELECT 'only upgraded' AS side, object FROM objects_upgraded EXCEPT SELECT 'only upgraded', object FROM objects_fresh)
UNION ALL
(SELECT 'only fresh', object FROM objects_fresh EXCEPT SELECT 'only fresh', object FROM objects_upgraded)
ORDER BY 1, 2;
-- what 1.1 added
SELECT object FROM objects_11_upgraded EXCEPT SELECT object FROM objects_10_upgraded ORDER BY 1;
-- what 1.2 added
SELECT object FROM objects_12_upgraded EXCEPT SELECT object FROM objects_11_upgraded ORDER BY 1;
-- what 1.3 added or replaced
(SELECT 'added' AS change, object FROM objects_13_upgraded EXCEPT SELECT 'added', object FROM objects_12_upgraded)
UNION ALL
(SELECT 'gone', object FROM objects_12_upgraded EXCEPT SELECT 'gone', object FROM objects_13_upgraded)
ORDER BY 1, 2;
-- what 1.4 added (email)
(SELECT 'added' AS change, object FROM objects_14_upgraded EXCEPT SELECT 'added', object FROM objects_13_upgraded)
UNION ALL
(SELECT 'gone', object FROM objects_13_upgraded EXCEPT SELECT 'gone', object FROM objects_14_upgraded)
ORDER BY 1, 2;
-- 1.5 adds no object, it replaces worker_stats() and the stats view (the
-- queue depth's columns, listed above)
(SELECT 'added' AS change, object FROM objects_fresh EXCEPT SELECT 'added', object FROM objects_14_upgraded)
UNION ALL
(SELECT 'gone', object FROM objects_14_upgraded EXCEPT SELECT 'gone', object FROM objects_fresh)
ORDER BY 1, 2;
-- an operator's templates are configuration: pg_dump keeps their rows, and
-- no update script touches them
SELECT extconfig::regclass[] FROM pg_extension WHERE extname = 'storyboard_worker';
-- same privileges
SELECT a.relname FROM acl_upgraded a JOIN pg_class c ON c.relname = a.relname
   AND c.relnamespace = 'storyboard_worker'::regnamespace
 WHERE a.relacl IS DISTINCT FROM c.relacl::text;
-- same function definitions, settings and privileges
SELECT f.fn FROM functions_upgraded f
  JOIN pg_proc p ON p.oid::regprocedure::text = f.fn
 WHERE (f.prosrc, f.prosecdef, f.proconfig, f.proacl)
       IS DISTINCT FROM (p.prosrc, p.prosecdef, p.proconfig::text, p.proacl::text);
-- the event trigger runs as the extension owner with a fixed search_path
SELECT prosecdef, proconfig FROM pg_proc
 WHERE oid = 'storyboard_worker.forget_dropped_plugins()'::regprocedure;
DROP EXTENSION storyboard_worker CASCADE;
-- 1.1, 1.2, 1.3 and 1.4 updated straight to the default version end as the
-- fresh install too: the same objects and privileges, the stats view
-- readable by everyone
CREATE FUNCTION pg_temp.update_from(v text, OUT updated_to text,
	OUT objects_differing bigint, OUT acls_differing bigint,
	OUT public_reads_stats boolean, OUT public_runs_worker_stats boolean)
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE format('CREATE EXTENSION storyboard_worker VERSION %L', v);
	ALTER EXTENSION storyboard_worker UPDATE;
	SELECT extversion INTO updated_to FROM pg_extension WHERE extname = 'storyboard_worker';
	SELECT count(*) INTO objects_differing FROM (
		(SELECT object FROM ext_members EXCEPT SELECT object FROM objects_fresh)
		UNION ALL
		(SELECT object FROM objects_fresh EXCEPT SELECT object FROM ext_members)) d;
	SELECT count(*) INTO acls_differing FROM acl_upgraded a
	  JOIN pg_class c ON c.relname = a.relname
	   AND c.relnamespace = 'storyboard_worker'::regnamespace
	 WHERE a.relacl IS DISTINCT FROM c.relacl::text;
	public_reads_stats := has_table_privilege('public', 'storyboard_worker.stats', 'SELECT');
	public_runs_worker_stats := has_function_privilege('public', 'storyboard_worker.worker_stats()', 'EXECUTE');
	DROP EXTENSION storyboard_worker CASCADE;
END $$;
SELECT v AS updated_from, u.*
  FROM unnest(ARRAY['1.1', '1.2', '1.3', '1.4']) v, pg_temp.update_from(v) u
 ORDER BY v;
DROP FUNCTION IF EXISTS upgrade_noop;
