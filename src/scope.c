/*-------------------------------------------------------------------------
 *
 * scope.c
 *		Trust boundaries: the extension's own statements, and plugin calls.
 *
 * See scope.h for the two kinds of code.  Both scopes use PostgreSQL's own
 * mechanism for functions declared with SET clauses: a GUC nest level
 * (NewGUCNestLevel) closed with AtEOXact_GUC.  An error inside a scope needs
 * no cleanup here: the (sub)transaction abort pops the nest level and
 * restores the user id, as it does for a SECURITY DEFINER function.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_class.h"
#include "catalog/namespace.h"
#include "catalog/pg_namespace.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/parsenodes.h"
#include "nodes/value.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

#include "plugins.h"
#include "scope.h"
#include "storyboard_worker.h"
#include "extension.h"

/*
 * Run with search_path set to 'path' (a settings level of our own) until
 * sbw_search_path_end: the mechanism of a function's SET search_path clause.
 */
int
sbw_search_path_begin(const char *path)
{
	int			nestlevel = NewGUCNestLevel();

	if (namespace_search_path == NULL || strcmp(namespace_search_path, path) != 0)
		(void) set_config_option("search_path", path,
								 PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	return nestlevel;
}

/* The caller's search_path (and any other setting changed since) is back. */
void
sbw_search_path_end(int nestlevel)
{
	AtEOXact_GUC(false, nestlevel);
}

/*
 * The search_path a plan runs under: pg_catalog first, then only the
 * schemas that hold its tables, in the order the database's path found
 * them, then pg_temp.  The tables resolve exactly as they did, and no
 * function or operator is looked up in a schema that holds none of them:
 * an object planted in another schema of the database's path (say, public
 * before pg_catalog) never runs as the plugin role.
 */
char *
sbw_tables_search_path(const Oid *relids, int n)
{
	StringInfoData buf;
	List	   *seen = NIL;
	int			i;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "pg_catalog");
	for (i = 0; i < n; i++)
	{
		Oid			nsp = get_rel_namespace(relids[i]);

		if (list_member_oid(seen, nsp) || nsp == PG_CATALOG_NAMESPACE)
			continue;
		seen = lappend_oid(seen, nsp);
		appendStringInfo(&buf, ", %s", quote_identifier(get_namespace_name(nsp)));
	}
	appendStringInfoString(&buf, ", pg_temp");
	list_free(seen);
	return MemoryContextStrdup(TopMemoryContext, buf.data);
}

/*
 * Enter the safe scope: search_path fixed to pg_catalog, pg_temp
 * (temporary schema last, so that no temporary relation or type shadows a
 * catalog one).  Internal statements name their own objects with the
 * schema, and pg_catalog's functions and operators are then the only
 * candidates for everything else.
 */
int
sbw_internal_begin(void)
{
	return sbw_search_path_begin(SBW_SAFE_SEARCH_PATH);
}

/* Leave the safe scope: the caller's settings come back. */
void
sbw_internal_end(int nestlevel)
{
	sbw_search_path_end(nestlevel);
}

/*
 * Prepare a statement once per backend and keep it; see scope.h.  The
 * plancache analyses it again after DDL, or when the search_path differs
 * from the one it was analysed under, with the search_path current at that
 * execution: a kept internal statement is safe only because every
 * execution goes through sbw_stmt_execute, which sets the safe path first.
 */
SPIPlanPtr
sbw_keep_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *types)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(sql, nargs, types);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s", sql,
				 SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		*cache = plan;
	}
	return *cache;
}

/*
 * Run one internal statement in the safe scope.  Every statement the
 * extension runs with its own (elevated) rights goes through here, so that
 * none of them resolves a name through the database's search_path.
 */
int
sbw_stmt_execute(SbwStmt *stmt, Datum *values, const char *nulls,
				 bool read_only, long count, int expect)
{
	int			nestlevel = sbw_internal_begin();
	int			ret;

	(void) sbw_keep_plan(&stmt->plan, stmt->sql, stmt->nargs, stmt->argtypes);
	ret = SPI_execute_plan(stmt->plan, values, nulls, read_only, count);
	sbw_internal_end(nestlevel);
	if (ret != expect)
		elog(ERROR, "storyboard_worker statement failed (%s): %s",
			 SPI_result_code_string(ret), stmt->sql);
	return ret;
}

/*
 * How many plugin calls are under way in this backend (nested ones: a
 * plugin calling process_event).  The utility hook below refuses, inside
 * any of them, what would run the plugin role's code as the caller later.
 */
static int	plugin_depth = 0;
static ProcessUtility_hook_type prev_ProcessUtility = NULL;

/* Is this a schema name of the temporary schema (pg_temp, pg_temp_N)? */
static bool
sbw_is_temp_schema_name(const char *schema)
{
	return schema != NULL && strncmp(schema, "pg_temp", 7) == 0;
}

/* Does a possibly qualified name (a List of String) live in pg_temp? */
static bool
sbw_is_temp_name(List *names)
{
	return list_length(names) > 1 &&
		sbw_is_temp_schema_name(strVal(linitial(names)));
}

/*
 * Would this utility statement create an object in the session's
 * temporary schema?  Tables, views, sequences (TEMP or pg_temp.x), CREATE
 * TABLE AS / SELECT INTO, and types and domains named pg_temp.x: the
 * temporary schema is searched first for relations and types, so any of
 * them could stand in for a name the session's later statements use.
 */
static bool
sbw_creates_temp_object(Node *stmt)
{
	RangeVar   *rv = NULL;

	switch (nodeTag(stmt))
	{
		case T_CreateStmt:
			rv = ((CreateStmt *) stmt)->relation;
			break;
		case T_ViewStmt:
			rv = ((ViewStmt *) stmt)->view;
			break;
		case T_CreateSeqStmt:
			rv = ((CreateSeqStmt *) stmt)->sequence;
			break;
		case T_CreateTableAsStmt:
			rv = ((CreateTableAsStmt *) stmt)->into->rel;
			break;
		case T_CompositeTypeStmt:
			rv = ((CompositeTypeStmt *) stmt)->typevar;
			break;
		case T_CreateDomainStmt:
			return sbw_is_temp_name(((CreateDomainStmt *) stmt)->domainname);
		case T_CreateEnumStmt:
			return sbw_is_temp_name(((CreateEnumStmt *) stmt)->typeName);
		case T_CreateRangeStmt:
			return sbw_is_temp_name(((CreateRangeStmt *) stmt)->typeName);
		case T_DefineStmt:
			return sbw_is_temp_name(((DefineStmt *) stmt)->defnames);
		case T_AlterObjectSchemaStmt:
			return sbw_is_temp_schema_name(((AlterObjectSchemaStmt *) stmt)->newschema);
		default:
			return false;
	}
	return rv != NULL && (rv->relpersistence == RELPERSISTENCE_TEMP ||
						  sbw_is_temp_schema_name(rv->schemaname));
}

/*
 * Inside a plugin call, refuse what would let the plugin role's code run
 * later with the caller's rights (the worker's superuser, or whoever called
 * process_event):
 *	- DECLARE ... WITH HOLD: a holdable cursor is run to completion at
 *	  COMMIT, as whoever commits;
 *	- temporary relations and types: the temporary schema is searched
 *	  first, so the caller's later statements could use them.
 * PostgreSQL refuses both inside a security-restricted operation; a plugin
 * call cannot be one (it would refuse every deferrable constraint).
 */
static void
sbw_process_utility(PlannedStmt *pstmt, const char *queryString,
					bool readOnlyTree, ProcessUtilityContext context,
					ParamListInfo params, QueryEnvironment *queryEnv,
					DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;

	if (plugin_depth > 0 && IsA(stmt, DeclareCursorStmt) &&
		(((DeclareCursorStmt *) stmt)->options & CURSOR_OPT_HOLD))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("cannot create a cursor WITH HOLD in a storyboard_worker plugin"),
				 errdetail("A holdable cursor would run at COMMIT with the rights of the worker, not of the plugin role.")));
	if (plugin_depth > 0 && sbw_creates_temp_object(stmt))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("cannot create temporary objects in a storyboard_worker plugin"),
				 errdetail("They would outlive the call in a session that runs with other rights."),
				 errhint("Use an ordinary table of the plugin's own, or a CTE.")));
	if (prev_ProcessUtility)
		prev_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
							queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

/* Install the utility hook (from _PG_init, in every backend). */
void
sbw_scope_init(void)
{
	prev_ProcessUtility = ProcessUtility_hook;
	ProcessUtility_hook = sbw_process_utility;
}

/*
 * Enter a plugin call: become the plugin role (as a SECURITY DEFINER
 * function would: no SET ROLE or SET SESSION AUTHORIZATION back to the
 * caller), in a settings level of its own.  Not a security-restricted
 * operation: PostgreSQL would then refuse every deferrable constraint the
 * plugin's tables have; what such an operation protects against is covered
 * instead: the deferred triggers the call queued fire before it ends (as
 * the plugin role), and holdable cursors and temporary objects are refused
 * (sbw_process_utility).
 */
void
sbw_plugin_scope_begin(SbwPluginScope *scope, Oid role)
{
	GetUserIdAndSecContext(&scope->save_userid, &scope->save_sec);
	scope->role = role;
	SetUserIdAndSecContext(role, scope->save_sec | SECURITY_LOCAL_USERID_CHANGE);
	scope->nestlevel = NewGUCNestLevel();
	plugin_depth++;
}

/* See scope.h. */
void
sbw_owner_scope_begin(SbwOwnerScope *scope)
{
	Oid			owner = sbw_extension_owner(get_extension_oid(SBW_EXTENSION_NAME, false));

	GetUserIdAndSecContext(&scope->save_userid, &scope->save_sec);
	SetUserIdAndSecContext(owner, scope->save_sec | SECURITY_LOCAL_USERID_CHANGE);
	scope->nestlevel = sbw_internal_begin();
}

/* See scope.h. */
void
sbw_owner_scope_end(SbwOwnerScope *scope)
{
	sbw_internal_end(scope->nestlevel);
	SetUserIdAndSecContext(scope->save_userid, scope->save_sec);
}

/*
 * Fire the deferred constraint checks and constraint triggers pending in
 * the transaction, now, as the current user and in the current scope.  For
 * a plugin, at its end: a violation is then its own failure (a dead letter
 * naming it), not a COMMIT failure of the whole event, and the triggers run
 * as the plugin role, never as whoever commits.
 *
 * SET CONSTRAINTS ALL IMMEDIATE fires them, and is safe inside a
 * subtransaction (the commit-time path is not).  PostgreSQL has no way to
 * go back to each constraint's own default afterwards: ALL DEFERRED keeps
 * the next plugin's INITIALLY DEFERRED constraints deferred until its own
 * end, at the price of deferring its INITIALLY IMMEDIATE deferrable ones
 * too (they are still checked before that plugin returns).
 */
void
sbw_fire_deferred_constraints(void)
{
	ConstraintsSetStmt *stmt = makeNode(ConstraintsSetStmt);

	stmt->constraints = NIL;
	stmt->deferred = false;
	AfterTriggerSetState(stmt);
	stmt->deferred = true;
	AfterTriggerSetState(stmt);
	pfree(stmt);
}

/*
 * Leave a plugin call that returned.  First the deferred triggers it queued
 * fire, still as the plugin role and in its settings (whatever it ran: a
 * handler, an enabled() test, the author lookup), so that none is left for
 * whoever commits.  Then every setting it changed, with SET, SET LOCAL or
 * set_config() (search_path, synchronous_commit, transaction_read_only...),
 * goes back to what it was before the call: AtEOXact_GUC with isCommit =
 * false restores them all, where a subtransaction commit would keep a plain
 * SET.
 */
void
sbw_plugin_scope_end(SbwPluginScope *scope)
{
	sbw_fire_deferred_constraints();
	AtEOXact_GUC(false, scope->nestlevel);
	SetUserIdAndSecContext(scope->save_userid, scope->save_sec);
	plugin_depth--;
}

/*
 * Run fn(arg) in a subtransaction of its own: the one way this extension
 * contains an error.  Returns true if fn returned (its subtransaction is
 * committed); false if it raised: its subtransaction is rolled back (with
 * every setting, user id and lock it took) and *edata, allocated in the
 * caller's memory context, describes the error.
 */
bool
sbw_subxact_run(void (*fn) (void *arg), void *arg, ErrorData **edata)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = true;

	int			depth = plugin_depth;

	*edata = NULL;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcxt);
		*edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		plugin_depth = depth;	/* plugin scopes left by the error */
		ok = false;
	}
	PG_END_TRY();
	return ok;
}
