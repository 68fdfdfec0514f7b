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
 *	- any function or type changes (syscache callbacks on pg_proc/pg_type);
 *	- the extension is dropped (its table goes, which invalidates it too).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
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

#include "storyboard_worker.h"

PG_FUNCTION_INFO_V1(sbw_register_plugin);
PG_FUNCTION_INFO_V1(sbw_unregister_plugin);
PG_FUNCTION_INFO_V1(sbw_plugins_changed);

/* The cache.  cache_cxt holds everything below; reset to reload. */
static MemoryContext cache_cxt = NULL;
static bool cache_valid = false;
static bool callbacks_registered = false;
static Oid	cached_ext_oid = InvalidOid;
static Oid	cached_plugins_relid = InvalidOid;
static Oid	cached_event_type = InvalidOid;
static List *cached_plugins = NIL;
static uint64 inval_count = 0;	/* bumped by every invalidation */
static uint64 catalog_generation = 1;	/* see sbw_catalog_generation() */

/* Drop the whole cache; the next sbw_plugins_get() reloads it. */
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

static void sbw_syscache_callback(Datum arg, int cacheid, uint32 hashvalue);

/* Hook our invalidation callbacks, once per backend. */
static void
sbw_register_callbacks(void)
{
	if (callbacks_registered)
		return;
	CacheRegisterRelcacheCallback(sbw_relcache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(PROCOID, sbw_syscache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(TYPEOID, sbw_syscache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(NAMESPACEOID, sbw_namespace_callback, (Datum) 0);
	callbacks_registered = true;
}

/*
 * A number that changes whenever a relation or schema may have been
 * created, dropped or altered.  Lets callers cache name lookups (the users
 * table, the ledger) without a catalog lookup per event.
 */
uint64
sbw_catalog_generation(void)
{
	sbw_register_callbacks();
	return catalog_generation;
}

/* Syscache callback for pg_proc and pg_type: a handler or our type changed. */
static void
sbw_syscache_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	sbw_plugins_invalidate();
}

/*
 * The OID of the type storyboard_worker.event, or InvalidOid if the
 * extension is not installed.  Cached with the registry.
 */
Oid
sbw_event_type_oid(void)
{
	List	   *plugins;

	if (!sbw_plugins_get(&plugins))
		return InvalidOid;
	return cached_event_type;
}

/*
 * Load the registry from storyboard_worker.plugins, in registration order.
 * Must run inside a transaction.  A handler that has been dropped since it
 * was registered is kept with handler = InvalidOid, so that dispatch can
 * report it as that plugin's failure instead of silently skipping it.
 */
static void
sbw_plugins_load(void)
{
	Oid			nspid;
	MemoryContext oldcxt;
	int			ret;
	uint64		i;
	uint64		inval_at_start = inval_count;

	sbw_register_callbacks();

	if (cache_cxt == NULL)
		cache_cxt = AllocSetContextCreate(CacheMemoryContext,
										  "storyboard_worker plugin cache",
										  ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(cache_cxt);

	cached_plugins = NIL;
	cached_plugins_relid = InvalidOid;
	cached_event_type = InvalidOid;
	cache_valid = false;

	cached_ext_oid = get_extension_oid(SBW_EXTENSION_NAME, true);
	if (!OidIsValid(cached_ext_oid))
		return;
	nspid = get_namespace_oid(SBW_SCHEMA_NAME, true);
	if (!OidIsValid(nspid))
		return;
	cached_plugins_relid = get_relname_relid("plugins", nspid);
	cached_event_type = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
										CStringGetDatum("event"),
										ObjectIdGetDatum(nspid));
	if (!OidIsValid(cached_plugins_relid) || !OidIsValid(cached_event_type))
		return;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute("SELECT name, handler::oid, enabled::oid"
					  " FROM storyboard_worker.plugins ORDER BY position",
					  true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read storyboard_worker.plugins: %s",
			 SPI_result_code_string(ret));

	oldcxt = MemoryContextSwitchTo(cache_cxt);
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		SbwPlugin  *p = palloc0(sizeof(SbwPlugin));
		bool		isnull;
		Datum		d;

		p->name = SPI_getvalue(tup, desc, 1);
		d = SPI_getbinval(tup, desc, 2, &isnull);
		p->handler = isnull ? InvalidOid : DatumGetObjectId(d);
		d = SPI_getbinval(tup, desc, 3, &isnull);
		p->enabled = isnull ? InvalidOid : DatumGetObjectId(d);

		if (OidIsValid(p->handler) &&
			SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(p->handler)))
			fmgr_info_cxt(p->handler, &p->handler_finfo, cache_cxt);
		else
			p->handler = InvalidOid;
		if (OidIsValid(p->enabled))
		{
			if (SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(p->enabled)))
				fmgr_info_cxt(p->enabled, &p->enabled_finfo, cache_cxt);
			else
				p->handler = InvalidOid;	/* report it as broken */
		}
		cached_plugins = lappend(cached_plugins, p);
	}
	MemoryContextSwitchTo(oldcxt);
	SPI_finish();
	/* an invalidation that arrived while we read means: read again next time */
	cache_valid = (inval_count == inval_at_start);
}

/*
 * Set *plugins to the registered plugins (a List of SbwPlugin *, in
 * registration order) and return true; return false when the extension is
 * not installed in this database.  The list belongs to the cache: do not
 * modify it, and do not keep it across transactions.
 */
bool
sbw_plugins_get(List **plugins)
{
	if (!cache_valid)
		sbw_plugins_load();
	*plugins = cached_plugins;
	return OidIsValid(cached_plugins_relid) && OidIsValid(cached_event_type);
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

	if (!pg_extension_ownercheck(extoid, GetUserId()))
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
 * SQL: register_plugin(name, handler, enabled DEFAULT NULL).  Registering
 * an existing name replaces its functions but keeps its place in the
 * running order.
 */
Datum
sbw_register_plugin(PG_FUNCTION_ARGS)
{
	text	   *name;
	Oid			handler;
	Oid			enabled = InvalidOid;
	Oid			event_type;
	Oid			argtypes[3] = {TEXTOID, REGPROCEDUREOID, REGPROCEDUREOID};
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};
	int			ret;

	if (PG_ARGISNULL(0) || VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(0)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("plugin name must not be null or empty")));
	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("plugin handler must not be null")));
	sbw_check_owner("register storyboard_worker plugins");

	name = PG_GETARG_TEXT_PP(0);
	handler = PG_GETARG_OID(1);
	if (!PG_ARGISNULL(2))
		enabled = PG_GETARG_OID(2);

	event_type = sbw_event_type_oid();
	if (!OidIsValid(event_type))
		elog(ERROR, "type storyboard_worker.event does not exist");
	sbw_check_signature(handler, VOIDOID, event_type, "a plugin handler",
						"A handler takes one argument of type storyboard_worker.event and returns void.",
						"Declare it as CREATE FUNCTION %s(event storyboard_worker.event) RETURNS void.");
	if (OidIsValid(enabled))
		sbw_check_signature(enabled, BOOLOID, InvalidOid, "a plugin's enabled test",
							"An enabled test takes no arguments and returns boolean.",
							"Declare it as CREATE FUNCTION %s() RETURNS boolean.");

	values[0] = PointerGetDatum(name);
	values[1] = ObjectIdGetDatum(handler);
	values[2] = ObjectIdGetDatum(enabled);
	if (!OidIsValid(enabled))
		nulls[2] = 'n';

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("INSERT INTO storyboard_worker.plugins (name, handler, enabled)"
								" VALUES ($1, $2, $3)"
								" ON CONFLICT (name) DO UPDATE"
								" SET handler = EXCLUDED.handler, enabled = EXCLUDED.enabled,"
								" registered_at = now(), registered_by = current_user",
								3, argtypes, values, nulls, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not register plugin: %s", SPI_result_code_string(ret));
	SPI_finish();
	PG_RETURN_VOID();
}

/* SQL: unregister_plugin(name) -> whether it was registered. */
Datum
sbw_unregister_plugin(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	int			ret;
	bool		found;

	sbw_check_owner("unregister storyboard_worker plugins");
	values[0] = PointerGetDatum(PG_GETARG_TEXT_PP(0));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("DELETE FROM storyboard_worker.plugins WHERE name = $1",
								1, argtypes, values, NULL, false, 0);
	if (ret != SPI_OK_DELETE)
		elog(ERROR, "could not unregister plugin: %s", SPI_result_code_string(ret));
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
