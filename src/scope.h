/*-------------------------------------------------------------------------
 *
 * scope.h
 *		Trust boundaries: the extension's own statements, and plugin calls
 *		(scope.c).
 *
 * Two kinds of code run in a consumer's superuser session, and in the
 * extension owner's session for process_event() and replay():
 *
 *	internal	the extension's own SQL (ledger, dead letters, registry):
 *				run with a fixed search_path of pg_catalog, pg_temp, so
 *				that no name resolves through a schema another role can
 *				write (CVE-2018-1058), whatever the database's path;
 *	plugin		handlers and enabled() tests: run as storyboard_worker.role
 *				(no way back to the caller's role), under the session's own
 *				search_path (StoryBoard's tables), in a settings scope of
 *				their own: whatever they SET ends with the call; their
 *				deferred constraints fire before they end, as that role, and
 *				they may not leave a holdable cursor for the COMMIT to run.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_SCOPE_H
#define SBW_SCOPE_H

#include "executor/spi.h"

/* The search_path of every internal statement. */
#define SBW_SAFE_SEARCH_PATH	"pg_catalog, pg_temp"

/*
 * One internal statement: its text, its parameter types, and the plan
 * prepared (in the safe scope) on first use and kept for the backend's
 * life.  Declare them static, with SBW_STMT.
 */
#define SBW_STMT_MAX_ARGS	16
typedef struct SbwStmt
{
	const char *sql;
	int			nargs;
	Oid			argtypes[SBW_STMT_MAX_ARGS];
	SPIPlanPtr	plan;
} SbwStmt;

#define SBW_STMT(sql_, nargs_, ...) { (sql_), (nargs_), { __VA_ARGS__ }, NULL }

/*
 * Run an internal statement (SPI connected) in the safe scope; returns the
 * SPI result code, and raises if it is not 'expect'.
 */
extern int	sbw_stmt_execute(SbwStmt *stmt, Datum *values, const char *nulls,
							 bool read_only, long count, int expect);

/* Enter and leave the safe scope around other internal work. */
extern int	sbw_internal_begin(void);
extern void sbw_internal_end(int nestlevel);

/* Run with another search_path until the matching end. */
extern int	sbw_search_path_begin(const char *path);
extern void sbw_search_path_end(int nestlevel);

/*
 * The search_path for statements on these tables (a plugin's): pg_catalog,
 * the tables' schemas, pg_temp (TopMemoryContext).
 */
extern char *sbw_tables_search_path(const Oid *relids, int n);

/* A plugin call's identity and settings scope. */
typedef struct SbwPluginScope
{
	Oid			role;
	Oid			save_userid;
	int			save_sec;
	int			nestlevel;
} SbwPluginScope;

extern void sbw_plugin_scope_begin(SbwPluginScope *scope, Oid role);
extern void sbw_plugin_scope_end(SbwPluginScope *scope);

/*
 * A built-in plugin's own statements on the extension's tables (the email
 * plugin's outbox): run as the extension's owner, in the safe scope, from
 * inside the plugin call, until the matching end.  Only fixed statements
 * with bound values may run there.
 */
typedef struct SbwOwnerScope
{
	Oid			save_userid;
	int			save_sec;
	int			nestlevel;
} SbwOwnerScope;

extern void sbw_owner_scope_begin(SbwOwnerScope *scope);
extern void sbw_owner_scope_end(SbwOwnerScope *scope);

/* Fire the deferred constraints pending now, as the current user. */
extern void sbw_fire_deferred_constraints(void);

/* Install the utility hook that guards plugin calls (from _PG_init). */
extern void sbw_scope_init(void);

/*
 * Run fn(arg) in a subtransaction; false (and *edata) if it raised, with
 * everything it did rolled back.
 */
extern bool sbw_subxact_run(void (*fn) (void *arg), void *arg,
							ErrorData **edata);

/*
 * Prepare a statement once per backend and keep it (SPI_keepplan) in
 * *cache; the plancache re-validates it after DDL.  SPI must be connected.
 */
extern SPIPlanPtr sbw_keep_plan(SPIPlanPtr *cache, const char *sql,
								int nargs, Oid *types);

#endif							/* SBW_SCOPE_H */
