/*-------------------------------------------------------------------------
 *
 * extension.c
 *		The installed extension as the library sees it.
 *
 * A new storyboard_worker.so may be installed (a package upgrade) before
 * anybody runs ALTER EXTENSION storyboard_worker UPDATE, and a server
 * started after that runs the new library against the old SQL objects.
 * The workers then wait (sbw_extension_not_ready) and every SQL-callable
 * function refuses to run (sbw_require_current_version), as Citus does:
 * a function whose C code expects another version's tables, views or
 * result columns could write the wrong rows or build a tuple that does not
 * match its declared result.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"

#include "storyboard_worker.h"
#include "extension.h"
#include "plugins.h"

/*
 * The pg_extension row of the extension, copied (pg_extension has no
 * syscache on 15: an index scan, once per load of the registry or
 * precondition check); NULL if it is gone.
 */
static HeapTuple
sbw_extension_tuple(Oid extoid, TupleDesc *desc)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		tup = heap_copytuple(tup);
	*desc = RelationGetDescr(rel);
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return tup;
}

/* See extension.h. */
Oid
sbw_extension_owner(Oid extoid)
{
	TupleDesc	desc;
	HeapTuple	tup = sbw_extension_tuple(extoid, &desc);

	return HeapTupleIsValid(tup) ? ((Form_pg_extension) GETSTRUCT(tup))->extowner : InvalidOid;
}

/*
 * Why a worker (consumer or mailer) may not use the extension installed as
 * extoid, or NULL if it may: the workers write its tables as a superuser,
 * so an owner who is not one could attach triggers or defaults to them and
 * run code as the superuser; and the SQL objects must be the version this
 * library is built for.  The text says what to wait for (a static buffer).
 */
const char *
sbw_extension_not_ready(Oid extoid)
{
	static char waiting[160];
	char	   *version;

	if (!OidIsValid(extoid))
		return "CREATE EXTENSION storyboard_worker";
	if (!superuser_arg(sbw_extension_owner(extoid)))
		return "the owner of extension storyboard_worker to be a superuser "
			"(the workers write its tables with superuser rights)";
	version = sbw_extension_version(extoid);
	if (version != NULL && strcmp(version, SBW_EXTENSION_VERSION) == 0)
		return NULL;
	snprintf(waiting, sizeof(waiting),
			 "ALTER EXTENSION storyboard_worker UPDATE (its SQL objects are version %s, the library is %s)",
			 version ? version : "unknown", SBW_EXTENSION_VERSION);
	return waiting;
}

/*
 * The version of the extension's SQL objects (pg_extension.extversion),
 * palloc'd; NULL if it is gone.
 */
char *
sbw_extension_version(Oid extoid)
{
	TupleDesc	desc;
	HeapTuple	tup = sbw_extension_tuple(extoid, &desc);
	bool		isnull;
	Datum		d;

	if (!HeapTupleIsValid(tup))
		return NULL;
	d = heap_getattr(tup, Anum_pg_extension_extversion, desc, &isnull);
	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * Refuse to run against SQL objects of another version.  The answer is
 * kept until the next catalog invalidation (sbw_catalog_generation moves
 * on any relation, schema or function change, and every update script
 * changes some), so a call costs a comparison, not a catalog scan.
 * Inside CREATE or ALTER EXTENSION the check is skipped: the scripts of
 * older versions call our functions (register_plugin) on the way up.
 */
void
sbw_require_current_version(void)
{
	static uint64 checked_generation = 0;
	uint64		generation;
	Oid			extoid;
	char	   *version;

	if (creating_extension)
		return;
	generation = sbw_catalog_generation();
	if (generation == checked_generation)
		return;
	extoid = get_extension_oid(SBW_EXTENSION_NAME, true);
	version = OidIsValid(extoid) ? sbw_extension_version(extoid) : NULL;
	if (version != NULL && strcmp(version, SBW_EXTENSION_VERSION) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("storyboard_worker library version %s does not match the installed extension version %s",
						SBW_EXTENSION_VERSION, version),
				 errdetail("The shared library was upgraded but the extension's SQL objects in database \"%s\" were not.",
						   get_database_name(MyDatabaseId)),
				 errhint("Run ALTER EXTENSION storyboard_worker UPDATE, then try again.")));
	checked_generation = generation;
}
