-- storyboard_worker security, as the roles that really run it:
--   regress_sbw_owner    created the extension (as a superuser), then lost
--                        superuser: registers plugins, runs process_event,
--                        replay
--   regress_sbw_plugin   storyboard_worker.role: the plugins run as it
--   regress_sbw_app      StoryBoard's application role: owns its tables in
--                        schema sb, does its own DDL and migrations
--   regress_sbw_hostile  owns schema hostile, which a database path lists
--                        before pg_catalog, full of look-alike functions
--                        and operators
--   regress_sbw_other    any other role
SET client_min_messages = warning;
CREATE ROLE regress_sbw_owner SUPERUSER;
CREATE ROLE regress_sbw_plugin;
CREATE ROLE regress_sbw_app;
CREATE ROLE regress_sbw_hostile;
CREATE ROLE regress_sbw_other;
SET SESSION AUTHORIZATION regress_sbw_owner;
CREATE EXTENSION storyboard_worker;
RESET SESSION AUTHORIZATION;
ALTER ROLE regress_sbw_owner NOSUPERUSER;
SELECT rolname, rolsuper FROM pg_roles r JOIN pg_extension e ON e.extowner = r.oid
 WHERE e.extname = 'storyboard_worker';
SET storyboard_worker.role = regress_sbw_plugin;

--
-- 1. StoryBoard's own DDL keeps working for its role: tables, columns,
--    functions dropped by a role that may not read the plugin registry.
--
CREATE SCHEMA sb AUTHORIZATION regress_sbw_app;
GRANT USAGE ON SCHEMA sb TO regress_sbw_plugin;
SET ROLE regress_sbw_app;
SET search_path = sb;
\set ECHO none
\i test/fixtures/storyboard_schema.sql
\set ECHO all
ALTER TABLE sb.stories ADD COLUMN legacy_flag boolean;
ALTER TABLE sb.stories DROP COLUMN legacy_flag;
CREATE TABLE sb.migration_scratch (id int);
DROP TABLE sb.migration_scratch;
CREATE FUNCTION sb.helper() RETURNS int LANGUAGE sql AS 'SELECT 1';
DROP FUNCTION sb.helper();
GRANT SELECT ON ALL TABLES IN SCHEMA sb TO regress_sbw_plugin;
RESET search_path;
RESET ROLE;
SELECT count(*) AS storyboard_tables FROM pg_tables WHERE schemaname = 'sb';
-- the built-in plugin is not under test here
SET SESSION AUTHORIZATION regress_sbw_owner;
SELECT storyboard_worker.unregister_plugin('subscription');
RESET SESSION AUTHORIZATION;

--
-- 2. Plugin functions must be owned by the plugin role, the extension owner
--    or a superuser: anyone else could CREATE OR REPLACE them.
--
CREATE SCHEMA plug AUTHORIZATION regress_sbw_plugin;
GRANT USAGE ON SCHEMA plug TO PUBLIC;
SET ROLE regress_sbw_plugin;
CREATE TABLE plug.seen (n serial, plugin text, who name, author text, path text,
	sync_commit text, work_mem text, read_only text, app text);
CREATE FUNCTION plug.record(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO plug.seen (plugin, who, author, path, sync_commit, work_mem, read_only, app)
	VALUES ('record', current_user, e.author ->> 'full_name', current_setting('search_path'),
			current_setting('synchronous_commit'), current_setting('work_mem'),
			current_setting('transaction_read_only'), current_setting('application_name'));
END $$;
RESET ROLE;
GRANT CREATE ON DATABASE contrib_regression TO regress_sbw_other;
SET ROLE regress_sbw_other;
CREATE SCHEMA other;
CREATE FUNCTION other.replaceable(e storyboard_worker.event) RETURNS void LANGUAGE sql AS '';
CREATE FUNCTION other.is_on() RETURNS boolean LANGUAGE sql AS 'SELECT true';
GRANT USAGE ON SCHEMA other TO PUBLIC;
RESET ROLE;
SET SESSION AUTHORIZATION regress_sbw_owner;
\set VERBOSITY default
SELECT storyboard_worker.register_plugin('evil', 'other.replaceable(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('evil', 'plug.record(storyboard_worker.event)', 'other.is_on()');
\set VERBOSITY terse
SELECT storyboard_worker.register_plugin('record', 'plug.record(storyboard_worker.event)');
SELECT name FROM storyboard_worker.plugins ORDER BY position;
RESET SESSION AUTHORIZATION;
-- given away after registration: refused at the next call
CREATE FUNCTION plug.given_away(e storyboard_worker.event) RETURNS void LANGUAGE sql AS '';
ALTER FUNCTION plug.given_away(storyboard_worker.event) OWNER TO regress_sbw_plugin;
SET SESSION AUTHORIZATION regress_sbw_owner;
SELECT storyboard_worker.register_plugin('given_away', 'plug.given_away(storyboard_worker.event)');
RESET SESSION AUTHORIZATION;
ALTER FUNCTION plug.given_away(storyboard_worker.event) OWNER TO regress_sbw_other;
SET SESSION AUTHORIZATION regress_sbw_owner;
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 1}', 'task');
SELECT storyboard_worker.unregister_plugin('given_away');
RESET SESSION AUTHORIZATION;
DROP FUNCTION plug.given_away(storyboard_worker.event);
TRUNCATE plug.seen;

--
-- 3. Each plugin call has its own settings scope: what a plugin sets with
--    SET, SET LOCAL or set_config() ends with its call, for the next plugin
--    and for the caller.
--
SET ROLE regress_sbw_plugin;
CREATE FUNCTION plug.setter(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	PERFORM set_config('search_path', 'nowhere', false);
	SET synchronous_commit = off;
	PERFORM set_config('work_mem', '1234kB', false);
	SET LOCAL application_name = 'set by a plugin';
	SET TRANSACTION READ ONLY;
END $$;
RESET ROLE;
SET SESSION AUTHORIZATION regress_sbw_owner;
SELECT storyboard_worker.unregister_plugin('record');
SELECT storyboard_worker.register_plugin('setter', 'plug.setter(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('record', 'plug.record(storyboard_worker.event)');
SET application_name = 'regress';
SET work_mem = '4MB';
SET search_path = public;
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 2}', 'task');
SELECT current_setting('search_path') AS path, current_setting('synchronous_commit') AS sync_commit,
	current_setting('work_mem') AS work_mem, current_setting('transaction_read_only') AS read_only,
	current_setting('application_name') AS app;
RESET application_name;
RESET work_mem;
RESET search_path;
SELECT storyboard_worker.unregister_plugin('setter');
RESET SESSION AUTHORIZATION;
-- the next plugin saw the caller's settings, not the setter's
SELECT plugin, who, path, sync_commit, work_mem, read_only, app FROM plug.seen ORDER BY n;
TRUNCATE plug.seen;

--
-- 4. No way back to the caller's rights: a plugin cannot SET ROLE, and may
--    not leave a holdable cursor (run at COMMIT, as whoever commits).  Its
--    deferred constraint triggers fire when it returns, as the plugin role.
--
SET ROLE regress_sbw_plugin;
CREATE TABLE plug.parent (id int PRIMARY KEY);
CREATE TABLE plug.child (parent_id int REFERENCES plug.parent DEFERRABLE INITIALLY DEFERRED);
CREATE TABLE plug.checked_by (who name);
CREATE FUNCTION plug.note_checker() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO plug.checked_by VALUES (current_user);
	RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER child_checked AFTER INSERT ON plug.child
	DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION plug.note_checker();
CREATE FUNCTION plug.climber(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	IF e.resource_id = 3 THEN
		EXECUTE 'DECLARE kept CURSOR WITH HOLD FOR SELECT 1';
	ELSIF e.resource_id = 4 THEN
		SET ROLE regress_sbw_owner;
	ELSIF e.resource_id = 7 THEN
		CREATE TEMP VIEW users AS SELECT 1 AS id;
	ELSIF e.resource_id = 8 THEN
		CREATE DOMAIN pg_temp.text AS pg_catalog.text;
	ELSE
		-- the child before its parent, as deferred constraints allow
		INSERT INTO plug.child VALUES (e.resource_id);
		IF e.resource_id = 5 THEN
			INSERT INTO plug.parent VALUES (e.resource_id);
		END IF;
	END IF;
END $$;
RESET ROLE;
SET SESSION AUTHORIZATION regress_sbw_owner;
SELECT storyboard_worker.register_plugin('climber', 'plug.climber(storyboard_worker.event)');
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 3}', 'task');
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 4}', 'task');
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 5}', 'task');
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 6}', 'task');
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 7}', 'task');
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 8}', 'task');
SELECT storyboard_worker.unregister_plugin('climber');
RESET SESSION AUTHORIZATION;
-- an enabled() test that queues a deferred trigger and says no: it fires
-- when the test returns, as the plugin role, not at the caller's COMMIT
SET ROLE regress_sbw_plugin;
CREATE FUNCTION plug.quiet() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO plug.parent VALUES (100);
	INSERT INTO plug.child VALUES (100);
	RETURN false;
END $$;
RESET ROLE;
SET SESSION AUTHORIZATION regress_sbw_owner;
SELECT storyboard_worker.register_plugin('quiet', 'plug.record(storyboard_worker.event)', 'plug.quiet()');
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 9}', 'task');
SELECT storyboard_worker.unregister_plugin('quiet');
RESET SESSION AUTHORIZATION;
SELECT count(*) AS cursors_left FROM pg_cursors;
SELECT count(*) AS temporary_objects FROM pg_class WHERE relnamespace = pg_my_temp_schema();
SELECT parent_id FROM plug.child;
SELECT who, count(*) FROM plug.checked_by GROUP BY who;

--
-- 5. A hostile role's look-alikes on a search_path that lists its schema
--    before pg_catalog: nothing the extension runs, as the superuser, the
--    extension owner or the plugin role, ever calls one of them.
--
CREATE SCHEMA hostile AUTHORIZATION regress_sbw_hostile;
GRANT USAGE ON SCHEMA hostile TO PUBLIC;
SET ROLE regress_sbw_hostile;
CREATE TABLE hostile.calls (fn text, usr name, is_super boolean);
GRANT INSERT ON hostile.calls TO PUBLIC;
-- a call is shown as a WARNING (it cannot be rolled back with the caller's
-- work) and kept in hostile.calls
CREATE FUNCTION hostile.log(fn text) RETURNS void LANGUAGE plpgsql
	SET search_path = pg_catalog AS $$
DECLARE
	su boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
BEGIN
	RAISE WARNING 'HOSTILE-CALL % by % (superuser: %)', fn, current_user, su;
	INSERT INTO hostile.calls VALUES (fn, current_user, su);
END $$;
CREATE FUNCTION hostile.now() RETURNS timestamptz LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('now()'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION hostile.make_interval(secs integer) RETURNS interval LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('make_interval(integer)'); RETURN pg_catalog.make_interval(secs => secs); END $$;
CREATE FUNCTION hostile.to_jsonb(anyelement) RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('to_jsonb(anyelement)'); RETURN pg_catalog.to_jsonb($1); END $$;
CREATE FUNCTION hostile.to_regclass(text) RETURNS regclass LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('to_regclass(text)'); RETURN pg_catalog.to_regclass($1); END $$;
CREATE FUNCTION hostile.eq_int8(bigint, bigint) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('=(bigint,bigint)'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION hostile.eq_int48(integer, bigint) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('=(integer,bigint)'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION hostile.eq_int4(integer, integer) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('=(integer,integer)'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION hostile.eq_text(text, text) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('=(text,text)'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION hostile.eq_bytea(bytea, bytea) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('=(bytea,bytea)'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION hostile.eq_oid(oid, oid) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('=(oid,oid)'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION hostile.plus_int4(integer, integer) RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('+(integer,integer)'); RETURN $1 OPERATOR(pg_catalog.+) $2; END $$;
CREATE FUNCTION hostile.lt_tstz(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log('<(timestamptz,timestamptz)'); RETURN $1 OPERATOR(pg_catalog.<) $2; END $$;
CREATE OPERATOR hostile.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = hostile.eq_int8);
CREATE OPERATOR hostile.= (LEFTARG = integer, RIGHTARG = bigint, FUNCTION = hostile.eq_int48);
CREATE OPERATOR hostile.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = hostile.eq_int4);
CREATE OPERATOR hostile.= (LEFTARG = text, RIGHTARG = text, FUNCTION = hostile.eq_text);
CREATE OPERATOR hostile.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = hostile.eq_bytea);
CREATE OPERATOR hostile.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = hostile.eq_oid);
CREATE OPERATOR hostile.+ (LEFTARG = integer, RIGHTARG = integer, FUNCTION = hostile.plus_int4);
CREATE OPERATOR hostile.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = hostile.lt_tstz);
-- and a relation: StoryBoard's users, seen through a view that logs
CREATE FUNCTION hostile.seen(fn text) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS
	$$ BEGIN PERFORM hostile.log(fn); RETURN true; END $$;
-- they do work, for whoever has this path
SET search_path = hostile, pg_catalog;
SELECT 1::bigint = 1::bigint AS planted_operator_works;
RESET search_path;
SELECT fn, usr, is_super FROM hostile.calls;
TRUNCATE hostile.calls;
RESET ROLE;

-- A plugin that reads StoryBoard's users (the author lookup does too) and
-- a failing one, to make dead letters.
SET ROLE regress_sbw_plugin;
CREATE FUNCTION plug.fails(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	IF e.resource_id OPERATOR(pg_catalog.<>) 7 THEN
		RAISE EXCEPTION 'plugin fails on % %', e.resource, e.resource_id USING ERRCODE = 'P0001';
	END IF;
END $$;
RESET ROLE;
INSERT INTO sb.users (id, full_name, email, is_superuser, enable_login)
VALUES (1, 'Ann Author', 'ann@example.org', false, true);
GRANT USAGE ON SCHEMA sb TO regress_sbw_hostile;
GRANT SELECT ON sb.users TO regress_sbw_hostile;
SET ROLE regress_sbw_hostile;
CREATE VIEW hostile.users AS SELECT * FROM sb.users u WHERE hostile.seen('users view');
GRANT SELECT ON hostile.users TO PUBLIC;
RESET ROLE;
DELETE FROM storyboard_worker.dead_letters;

-- the superuser, then the extension owner, with the hostile path first:
-- only the plugin role's own name lookups (the author, in 'users') may meet
-- the hostile schema, as for any function the plugin role runs
SET storyboard_worker.role = regress_sbw_plugin;
SET search_path = hostile, pg_catalog, sb;
SELECT storyboard_worker.register_plugin('fails', 'plug.fails(storyboard_worker.event)');
SELECT plugin, succeeded, sqlstate, error, dead_letter_id IS NOT NULL AS dead_lettered
  FROM storyboard_worker.process_event('{"author_id": 1, "method": "PUT", "resource": "task", "resource_id": 5}', 'task');
SELECT plugin, succeeded, sqlstate, dead_letter_id IS NOT NULL AS dead_lettered
  FROM storyboard_worker.process_event('not json', 'task');
SELECT storyboard_worker.replay(id) FROM storyboard_worker.dead_letters ORDER BY id;
SET SESSION AUTHORIZATION regress_sbw_owner;
SET search_path = hostile, pg_catalog, sb;
SELECT plugin, succeeded, sqlstate, error, dead_letter_id IS NOT NULL AS dead_lettered
  FROM storyboard_worker.process_event('{"author_id": 1, "method": "PUT", "resource": "task", "resource_id": 6}', 'task');
SELECT storyboard_worker.replay(id) FROM storyboard_worker.dead_letters ORDER BY id;
SELECT storyboard_worker.unregister_plugin('fails');
SELECT storyboard_worker.register_plugin('fails', 'plug.fails(storyboard_worker.event)');
RESET SESSION AUTHORIZATION;
-- the plugin role drops its function (the sql_drop event trigger)
SET ROLE regress_sbw_plugin;
SET search_path = hostile, pg_catalog, sb;
DROP FUNCTION plug.fails(storyboard_worker.event);
RESET ROLE;
RESET search_path;
SELECT fn, usr, is_super FROM hostile.calls;
-- what the plugins saw: the author, found by id, as the plugin role
SELECT who, author, count(*) FROM plug.seen GROUP BY who, author;
SELECT name FROM storyboard_worker.plugins ORDER BY position;
SELECT count(*) AS dead_letters FROM storyboard_worker.dead_letters;

--
-- 6. The registry in use cannot be freed under a dispatch: a plugin that
--    changes the registry and calls process_event itself, while the outer
--    dispatch still runs the plugins after it.
--
CREATE SCHEMA own AUTHORIZATION regress_sbw_owner;
SET storyboard_worker.role = regress_sbw_owner;
SET SESSION AUTHORIZATION regress_sbw_owner;
SET search_path = own;
CREATE TABLE reentry_log (depth int, plugin text);
CREATE FUNCTION reentrant(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO reentry_log VALUES (e.resource_id, 'reentrant');
	IF e.resource_id OPERATOR(pg_catalog.<) 3 THEN
		PERFORM storyboard_worker.register_plugin('late_' || e.resource_id, 'after(storyboard_worker.event)');
		CREATE OR REPLACE FUNCTION reentrant_marker() RETURNS int LANGUAGE sql AS 'SELECT 1';
		PERFORM storyboard_worker.process_event(
			pg_catalog.format('{"method": "POST", "resource": "task", "resource_id": %s}', e.resource_id OPERATOR(pg_catalog.+) 1),
			'task');
		PERFORM storyboard_worker.unregister_plugin('late_' || e.resource_id);
	END IF;
END $$;
CREATE FUNCTION after(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO reentry_log VALUES (e.resource_id, 'after');
END $$;
SELECT storyboard_worker.unregister_plugin('record');
SELECT storyboard_worker.register_plugin('reentrant', 'reentrant(storyboard_worker.event)');
SELECT storyboard_worker.register_plugin('after', 'after(storyboard_worker.event)');
SELECT plugin, succeeded, sqlstate, error
  FROM storyboard_worker.process_event('{"method": "POST", "resource": "task", "resource_id": 1}', 'task');
SELECT depth, plugin, count(*) FROM reentry_log GROUP BY depth, plugin ORDER BY depth, plugin;
SELECT name FROM storyboard_worker.plugins ORDER BY position;
RESET search_path;
RESET SESSION AUTHORIZATION;

--
-- 7. Only the extension owner (or a superuser) manages plugins, even with
--    EXECUTE granted; everyone else gets 42501.
--
GRANT EXECUTE ON FUNCTION storyboard_worker.register_plugin(text, regprocedure, regprocedure, boolean) TO regress_sbw_app;
SET ROLE regress_sbw_app;
SELECT storyboard_worker.register_plugin('app', 'plug.record(storyboard_worker.event)');
SELECT count(*) FROM storyboard_worker.dead_letters;
RESET ROLE;

-- clean up
RESET storyboard_worker.role;
DROP EXTENSION storyboard_worker CASCADE;
DROP SCHEMA sb, plug, other, own, hostile CASCADE;
REVOKE CREATE ON DATABASE contrib_regression FROM regress_sbw_other;
DROP OWNED BY regress_sbw_owner, regress_sbw_plugin, regress_sbw_app, regress_sbw_hostile, regress_sbw_other;
DROP ROLE regress_sbw_owner, regress_sbw_plugin, regress_sbw_app, regress_sbw_hostile, regress_sbw_other;
