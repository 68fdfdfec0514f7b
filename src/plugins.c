/*-------------------------------------------------------------------------
 *
 * plugins.c
 *		The plugin registry: storyboard_worker.plugins and its cache.
 *
 * A plugin is a SQL function handler(event storyboard_worker.event) RETURNS
 * void, with an optional enabled() RETURNS boolean; the analogue of a
 * StoryBoard WorkerTaskBase subclass found through its entry point.  The
 * consumers must not read the catalog for every event, so the registry is
 * cached per backend, with resolved FmgrInfos, and thrown away when:
 *	- the plugins table changes (a statement trigger sends a relcache
 *	  invalidation for it, delivered at commit to every backend);
 *	- any function or type changes (syscache callbacks on pg_proc/pg_type:
 *	  a handler replaced, renamed, dropped or given to another owner);
 *	- a role or the database changes (the plugin role may differ);
 *	- the extension is dropped (its table goes, which invalidates it too).
 *
 * A dispatch pins the set it runs with (plugins.h), so that invalidations
 * processed while its plugins run cannot free what it is iterating.
 *
 * Plugin functions must be owned by the plugin role, the extension owner
 * or a superuser: whoever owns a function can replace it, and its code then
 * runs as the plugin role.  register_plugin() checks it, and so does every
 * call (an ALTER FUNCTION ... OWNER TO after registration is caught).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_database.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/syscache.h"
#include "utils/typcache.h"

#include "compat.h"
#include "scope.h"
#include "storyboard_worker.h"
#include "guc.h"
#include "extension.h"
#include "plugins.h"

PG_FUNCTION_INFO_V1(sbw_register_plugin);
PG_FUNCTION_INFO_V1(sbw_unregister_plugin);
PG_FUNCTION_INFO_V1(sbw_plugins_changed);

/*
 * The cache: the current set (NULL until loaded), whether it is still
 * valid, and the catalog generation for name lookups elsewhere.
 */
static SbwPluginSet *current_set = NULL;
static bool cache_valid = false;
static bool callbacks_registered = false;
static Oid	cached_plugins_relid = InvalidOid;
static uint64 inval_count = 0;	/* bumped by every invalidation */
static uint64 catalog_generation = 1;	/* see sbw_catalog_generation() */

/* The role plugins run as, resolved from storyboard_worker.role. */
static Oid	plugin_role = InvalidOid;
static char *plugin_role_setting = NULL;
static bool superuser_warned = false;

/* Drop the whole cache; the next sbw_plugins_pin() reloads it. */
static void
sbw_plugins_invalidate(void)
{
	cache_valid = false;
	inval_count++;
}

/*
 * Relcache callback: our table changed (or everything was invalidated,
 * relid = InvalidOid, e.g. after a sinval overflow).
 */
static void
sbw_relcache_callback(Datum arg, Oid relid)
{
	catalog_generation++;
	if (!OidIsValid(relid) || relid == cached_plugins_relid)
		sbw_plugins_invalidate();
}

/* Syscache callback for pg_namespace: search_path resolution may change. */
static void
sbw_namespace_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	catalog_generation++;
}

/*
 * Syscache callback for pg_proc and pg_type (a handler, its owner or our
 * type changed), pg_authid and pg_database (the plugin role or the
 * database owner changed).
 */
static void
sbw_syscache_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	catalog_generation++;
	sbw_plugins_invalidate();
	if (cacheid == AUTHOID || cacheid == DATABASEOID)
		plugin_role = InvalidOid;
}

/* Hook our invalidation callbacks, once per backend. */
static void
sbw_register_callbacks(void)
{
	if (callbacks_registered)
		return;
	CacheRegisterRelcacheCallback(sbw_relcache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(PROCOID, sbw_syscache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(TYPEOID, sbw_syscache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(AUTHOID, sbw_syscache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(DATABASEOID, sbw_syscache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(NAMESPACEOID, sbw_namespace_callback, (Datum) 0);
	callbacks_registered = true;
}

/*
 * A number that changes whenever a relation, schema or function may have been
 * created, dropped or altered.  Lets callers cache name lookups (the users
 * table, the ledger) without a catalog lookup per event.
 */
uint64
sbw_catalog_generation(void)
{
	sbw_register_callbacks();
	return catalog_generation;
}

/*
 * The role plugins run as: storyboard_worker.role, or the database owner
 * when it is empty.  A role that does not exist is a configuration error:
 * it aborts the transaction, so the consumer requeues the message and backs
 * off instead of dead-lettering every event.
 */
Oid
sbw_plugin_role(void)
{
	const char *setting = sbw_role ? sbw_role : "";

	sbw_register_callbacks();
	if (OidIsValid(plugin_role) && plugin_role_setting &&
		strcmp(plugin_role_setting, setting) == 0)
		return plugin_role;

	if (setting[0] == '\0')
	{
		HeapTuple	tup = SearchSysCache1(DATABASEOID,
										  ObjectIdGetDatum(MyDatabaseId));

		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for database %u", MyDatabaseId);
		plugin_role = ((Form_pg_database) GETSTRUCT(tup))->datdba;
		ReleaseSysCache(tup);
	}
	else
	{
		plugin_role = get_role_oid(setting, true);
		if (!OidIsValid(plugin_role))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("role \"%s\" named in storyboard_worker.role does not exist",
							setting),
					 errhint("Create the role, or change storyboard_worker.role and reload.")));
	}

	if (plugin_role_setting)
		pfree(plugin_role_setting);
	plugin_role_setting = MemoryContextStrdup(TopMemoryContext, setting);

	if (SBW_IS_BGWORKER() && !superuser_warned && superuser_arg(plugin_role))
	{
		superuser_warned = true;
		ereport(WARNING,
				(errmsg("storyboard_worker plugins run as superuser \"%s\"",
						GetUserNameFromId(plugin_role, false)),
				 errhint("Set storyboard_worker.role to a role that can only read and write StoryBoard's tables.")));
	}
	return plugin_role;
}

/*
 * May code owned by 'owner' run as the plugin role?  Whoever owns a
 * function can CREATE OR REPLACE it; a function owned by any other role
 * would let that role run SQL as the plugin role.
 */
bool
sbw_owner_trusted(Oid owner, Oid role, Oid ext_owner)
{
	return owner == role || owner == ext_owner || superuser_arg(owner);
}

/* The owner of a function, or InvalidOid if it is gone. */
static Oid
sbw_func_owner(Oid fn)
{
	HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	Oid			owner;

	if (!HeapTupleIsValid(tup))
		return InvalidOid;
	owner = ((Form_pg_proc) GETSTRUCT(tup))->proowner;
	ReleaseSysCache(tup);
	return owner;
}

/* Forget a set: now if nobody runs with it, else when its last pin goes. */
static void
sbw_plugins_retire(SbwPluginSet *set)
{
	if (set == NULL)
		return;
	set->stale = true;
	if (set->pins == 0)
		MemoryContextDelete(set->cxt);
}

/*
 * Fill one plugin's entry from its registry row (SPI connected).  Its
 * functions are looked up (fmgr_info) only when first called, inside that
 * plugin's subtransaction: a C library that cannot be loaded is then that
 * plugin's failure, not a failure of every event.
 */
static void
sbw_plugin_from_row(SbwPlugin *p, HeapTuple tup, TupleDesc desc)
{
	bool		isnull;
	Datum		d;

	p->name = SPI_getvalue(tup, desc, 1);
	d = SPI_getbinval(tup, desc, 2, &isnull);
	p->handler = isnull ? InvalidOid : DatumGetObjectId(d);
	d = SPI_getbinval(tup, desc, 3, &isnull);
	p->enabled = isnull ? InvalidOid : DatumGetObjectId(d);
	d = SPI_getbinval(tup, desc, 4, &isnull);
	p->reads_author = isnull || DatumGetBool(d);

	p->handler_owner = OidIsValid(p->handler) ? sbw_func_owner(p->handler) : InvalidOid;
	if (!OidIsValid(p->handler_owner))
		p->handler = InvalidOid;
	if (OidIsValid(p->enabled))
	{
		p->enabled_owner = sbw_func_owner(p->enabled);
		if (!OidIsValid(p->enabled_owner))
			p->handler = InvalidOid;	/* report it as broken */
	}
}

/*
 * The FmgrInfos of a plugin's functions, looked up at its first call and
 * kept in its set's memory (with what the function caches in fn_extra).
 */
void
sbw_plugin_resolve(SbwPlugin *p, MemoryContext cxt)
{
	if (p->resolved)
		return;
	fmgr_info_cxt(p->handler, &p->handler_finfo, cxt);
	if (OidIsValid(p->enabled))
		fmgr_info_cxt(p->enabled, &p->enabled_finfo, cxt);
	p->resolved = true;
}

static SbwStmt load_stmt = SBW_STMT(
	"SELECT name, handler, enabled, reads_author"
	" FROM storyboard_worker.plugins ORDER BY position",
	0, InvalidOid);

/* SQL objects older than 1.3 have no reads_author: every plugin reads it */
static SbwStmt load_stmt_1_2 = SBW_STMT(
	"SELECT name, handler, enabled, true"
	" FROM storyboard_worker.plugins ORDER BY position",
	0, InvalidOid);

/*
 * Load the registry from storyboard_worker.plugins, in registration order,
 * into a new set.  Must run inside a transaction.  A handler that has been
 * dropped since it was registered is kept with handler = InvalidOid, so
 * that dispatch can report it as that plugin's failure instead of silently
 * skipping it.  Returns NULL when the extension is not installed.
 */
static SbwPluginSet *
sbw_plugins_load(void)
{
	Oid			nspid;
	Oid			extoid;
	Oid			event_type;
	SbwPluginSet *set;
	MemoryContext cxt;
	MemoryContext oldcxt;
	uint64		i;
	uint64		inval_at_start = inval_count;

	cached_plugins_relid = InvalidOid;
	extoid = get_extension_oid(SBW_EXTENSION_NAME, true);
	nspid = get_namespace_oid(SBW_SCHEMA_NAME, true);
	if (!OidIsValid(extoid) || !OidIsValid(nspid))
		return NULL;
	cached_plugins_relid = get_relname_relid("plugins", nspid);
	event_type = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
								 CStringGetDatum("event"),
								 ObjectIdGetDatum(nspid));
	if (!OidIsValid(cached_plugins_relid) || !OidIsValid(event_type))
		return NULL;

	/*
	 * The struct lives in its own context, so that one delete frees all.
	 * It hangs under the transaction until the load is complete: an error
	 * meanwhile frees it with the transaction.
	 */
	cxt = AllocSetContextCreate(TopTransactionContext,
								"storyboard_worker plugin set",
								ALLOCSET_SMALL_SIZES);
	set = MemoryContextAllocZero(cxt, sizeof(SbwPluginSet));
	set->cxt = cxt;
	set->event_type = event_type;
	set->ext_owner = sbw_extension_owner(extoid);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (get_attnum(cached_plugins_relid, "reads_author") != InvalidAttrNumber)
		(void) sbw_stmt_execute(&load_stmt, NULL, NULL, true, 0, SPI_OK_SELECT);
	else
		(void) sbw_stmt_execute(&load_stmt_1_2, NULL, NULL, true, 0, SPI_OK_SELECT);
	oldcxt = MemoryContextSwitchTo(set->cxt);
	for (i = 0; i < SPI_processed; i++)
	{
		SbwPlugin  *p = palloc0(sizeof(SbwPlugin));

		sbw_plugin_from_row(p, SPI_tuptable->vals[i], SPI_tuptable->tupdesc);
		set->plugins = lappend(set->plugins, p);
		set->reads_author |= p->reads_author;
	}
	MemoryContextSwitchTo(oldcxt);
	SPI_finish();
	MemoryContextSetParent(cxt, CacheMemoryContext);
	/* an invalidation that arrived while we read means: read again next time */
	cache_valid = (inval_count == inval_at_start);
	return set;
}

/*
 * The current plugin set, pinned: the caller must sbw_plugins_unpin() it
 * (also on error: use PG_FINALLY).  NULL when the extension is not
 * installed in this database.  Must run inside a transaction.
 */
SbwPluginSet *
sbw_plugins_pin(void)
{
	sbw_register_callbacks();
	if (!cache_valid || current_set == NULL)
	{
		sbw_plugins_retire(current_set);
		current_set = NULL;
		current_set = sbw_plugins_load();
		if (current_set == NULL)
			return NULL;
	}
	current_set->pins++;
	return current_set;
}

/* Release a pin; a set replaced meanwhile is freed with its last pin. */
void
sbw_plugins_unpin(SbwPluginSet *set)
{
	if (set == NULL)
		return;
	Assert(set->pins > 0);
	set->pins--;
	if (set->stale && set->pins == 0)
		MemoryContextDelete(set->cxt);
}

/*
 * Refuse callers other than the extension's owner (or a superuser), even
 * if someone granted them EXECUTE: plugin code runs for every event, and
 * dead letters may hold private story text.
 */
void
sbw_check_owner(const char *what)
{
	Oid			extoid = get_extension_oid(SBW_EXTENSION_NAME, false);

	if (!sbw_owns_extension(extoid, GetUserId()))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to %s", what),
				 errdetail("Only the owner of extension \"%s\" may do this.",
						   SBW_EXTENSION_NAME)));
}

/*
 * Check that 'fn' is a plain function (not a procedure, aggregate or
 * set-returning function) returning 'rettype' and taking no argument
 * (argtype InvalidOid) or exactly one of type 'argtype'.  'what', 'detail'
 * and 'decl' (with %s for the function's name) make the error say how to
 * declare it.
 */
static void
sbw_check_signature(Oid fn, Oid rettype, Oid argtype, const char *what,
					const char *detail, const char *decl)
{
	HeapTuple	tup;
	Form_pg_proc proc;
	bool		ok;

	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("function with OID %u does not exist", fn)));
	proc = (Form_pg_proc) GETSTRUCT(tup);
	ok = proc->prokind == PROKIND_FUNCTION &&
		!proc->proretset &&
		proc->prorettype == rettype &&
		(OidIsValid(argtype) ?
		 (proc->pronargs == 1 && proc->proargtypes.values[0] == argtype) :
		 proc->pronargs == 0);
	ReleaseSysCache(tup);
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
				 errmsg("function %s cannot be %s", format_procedure(fn), what),
				 errdetail_internal("%s", detail),
				 errhint(decl, get_func_name(fn))));
}

/*
 * Refuse a plugin function that a role other than the plugin role, the
 * extension owner or a superuser could replace (CREATE OR REPLACE needs
 * only ownership): that role could then run any SQL as the plugin role.
 */
static void
sbw_check_replaceable_by(Oid fn, Oid role, Oid ext_owner, const char *plugin)
{
	Oid			owner = sbw_func_owner(fn);

	if (!sbw_owner_trusted(owner, role, ext_owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("function %s of plugin \"%s\" is owned by role \"%s\", which is not trusted to run code as the plugin role",
						format_procedure(fn), plugin,
						GetUserNameFromId(owner, false)),
				 errdetail("Its owner can replace the function, and plugins run as role \"%s\".",
						   GetUserNameFromId(role, false)),
				 errhint("Make the plugin role, the extension owner or a superuser its owner: ALTER FUNCTION %s OWNER TO %s;",
						 format_procedure(fn),
						 quote_identifier(GetUserNameFromId(role, false)))));
}

static SbwStmt register_stmt = SBW_STMT(
	"INSERT INTO storyboard_worker.plugins (name, handler, enabled, reads_author)"
	" VALUES ($1, $2, $3, $4)"
	" ON CONFLICT (name) DO UPDATE"
	" SET handler = EXCLUDED.handler, enabled = EXCLUDED.enabled,"
	" reads_author = EXCLUDED.reads_author,"
	" registered_at = pg_catalog.now(), registered_by = CURRENT_USER",
	4, TEXTOID, REGPROCEDUREOID, REGPROCEDUREOID, BOOLOID);

/* register_plugin of the SQL objects before 1.3: three arguments */
static SbwStmt register_stmt_1_2 = SBW_STMT(
	"INSERT INTO storyboard_worker.plugins (name, handler, enabled)"
	" VALUES ($1, $2, $3)"
	" ON CONFLICT (name) DO UPDATE"
	" SET handler = EXCLUDED.handler, enabled = EXCLUDED.enabled,"
	" registered_at = pg_catalog.now(), registered_by = CURRENT_USER",
	3, TEXTOID, REGPROCEDUREOID, REGPROCEDUREOID);

/*
 * Check a registration: signatures, and who could replace the functions.
 * Raises with a hint on how to fix it.
 */
static void
sbw_check_registration(const char *name, Oid handler, Oid enabled)
{
	SbwPluginSet *set = sbw_plugins_pin();
	Oid			event_type;
	Oid			ext_owner;
	Oid			role;

	if (set == NULL)
		elog(ERROR, "type storyboard_worker.event does not exist");
	event_type = set->event_type;
	ext_owner = set->ext_owner;
	sbw_plugins_unpin(set);

	sbw_check_signature(handler, VOIDOID, event_type, "a plugin handler",
						"A handler takes one argument of type storyboard_worker.event and returns void.",
						"Declare it as CREATE FUNCTION %s(event storyboard_worker.event) RETURNS void.");
	if (OidIsValid(enabled))
		sbw_check_signature(enabled, BOOLOID, InvalidOid, "a plugin's enabled test",
							"An enabled test takes no arguments and returns boolean.",
							"Declare it as CREATE FUNCTION %s() RETURNS boolean.");
	role = sbw_plugin_role();
	sbw_check_replaceable_by(handler, role, ext_owner, name);
	if (OidIsValid(enabled))
		sbw_check_replaceable_by(enabled, role, ext_owner, name);
}

/*
 * SQL: register_plugin(name, handler, enabled DEFAULT NULL, reads_author
 * DEFAULT true).  Registering an existing name replaces its functions but
 * keeps its place in the running order.
 */
Datum
sbw_register_plugin(PG_FUNCTION_ARGS)
{
	Oid			handler;
	Oid			enabled = InvalidOid;
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	bool		with_author_flag = PG_NARGS() > 3;

	sbw_require_current_version();
	if (PG_ARGISNULL(0) || VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(0)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("plugin name must not be null or empty")));
	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("plugin handler must not be null")));
	sbw_check_owner("register storyboard_worker plugins");

	handler = PG_GETARG_OID(1);
	if (!PG_ARGISNULL(2))
		enabled = PG_GETARG_OID(2);
	sbw_check_registration(text_to_cstring(PG_GETARG_TEXT_PP(0)), handler, enabled);

	values[0] = PointerGetDatum(PG_GETARG_TEXT_PP(0));
	values[1] = ObjectIdGetDatum(handler);
	values[2] = ObjectIdGetDatum(enabled);
	if (!OidIsValid(enabled))
		nulls[2] = 'n';
	values[3] = BoolGetDatum(!with_author_flag || PG_ARGISNULL(3) || PG_GETARG_BOOL(3));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) sbw_stmt_execute(with_author_flag ? &register_stmt : &register_stmt_1_2,
							values, nulls, false, 0, SPI_OK_INSERT);
	SPI_finish();
	PG_RETURN_VOID();
}

static SbwStmt unregister_stmt = SBW_STMT(
	"DELETE FROM storyboard_worker.plugins WHERE name OPERATOR(pg_catalog.=) $1",
	1, TEXTOID);

/* SQL: unregister_plugin(name) -> whether it was registered. */
Datum
sbw_unregister_plugin(PG_FUNCTION_ARGS)
{
	Datum		values[1];
	bool		found;

	sbw_require_current_version();
	sbw_check_owner("unregister storyboard_worker plugins");
	values[0] = PointerGetDatum(PG_GETARG_TEXT_PP(0));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) sbw_stmt_execute(&unregister_stmt, values, NULL, false, 0, SPI_OK_DELETE);
	found = SPI_processed > 0;
	SPI_finish();
	if (!found)
		ereport(NOTICE,
				(errmsg("plugin \"%s\" is not registered",
						text_to_cstring(PG_GETARG_TEXT_PP(0)))));
	PG_RETURN_BOOL(found);
}

/*
 * Statement trigger on storyboard_worker.plugins: queue a relcache
 * invalidation of the table so that every backend's plugin cache is
 * dropped when (and only if) the change commits.
 */
Datum
sbw_plugins_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "sbw_plugins_changed: not called by trigger manager");
	CacheInvalidateRelcache(trigdata->tg_relation);
	return PointerGetDatum(NULL);
}
