/*-------------------------------------------------------------------------
 *
 * dispatch.c
 *		One event: decode, build the storyboard_worker.event, run every
 *		enabled plugin in its own subtransaction, keep failures as dead
 *		letters.
 *
 * The caller owns the transaction: the consumer commits it and only then
 * acknowledges the message; process_event() and replay() run in the SQL
 * caller's transaction.  Nothing here talks to the broker.
 *
 * Where StoryBoard runs each plugin in its own session and acks whatever
 * happened, here a plugin that raises is rolled back alone (its
 * subtransaction), the others' work commits with the event, and the
 * failure becomes a row in storyboard_worker.dead_letters, in the same
 * transaction, so it can be replayed.
 *
 * Each plugin call runs in a plugin scope (scope.h): as the plugin role, in
 * a settings scope of its own, its deferred constraints fired before it
 * returns.  The extension's own statements (dead letters, replay) are
 * internal statements, immune to the search_path.  The registry is pinned
 * for the whole dispatch (plugins.h): a plugin that changes the registry,
 * or calls process_event itself, cannot free what is being iterated.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/parsenodes.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"
#include "utils/wait_event.h"

#include "compat.h"
#include "event_decode.h"
#include "namecache.h"
#include "plugins.h"
#include "scope.h"
#include "storyboard_worker.h"
#include "guc.h"
#include "extension.h"
#include "dispatch.h"

PG_FUNCTION_INFO_V1(sbw_process_event);
PG_FUNCTION_INFO_V1(sbw_replay);

/* The author lookup: plan kept per "users" relation it reads. */
static SPIPlanPtr author_plan = NULL;
static Oid	author_relid = InvalidOid;	/* the relation author_plan reads */
static SbwNameCache author_names = {0};

/* Build a bytea from a buffer that may hold NUL bytes. */
static bytea *
sbw_bytea(const char *data, size_t len)
{
	bytea	   *b = palloc(len + VARHDRSZ);

	SET_VARSIZE(b, len + VARHDRSZ);
	memcpy(VARDATA(b), data, len);
	return b;
}

static SbwStmt dead_letter_stmt = SBW_STMT(
	"INSERT INTO storyboard_worker.dead_letters"
	" (routing_key, body, plugin, error, sqlstate, message_id, redelivered)"
	" VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
	7, TEXTOID, BYTEAOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, BOOLOID);

/*
 * Store a dead letter and return its id.  Runs in the current
 * (sub)transaction with the worker's own rights, as an internal statement:
 * plugins cannot write or read this table.
 */
static int64
sbw_dead_letter(const SbwMessage *msg, const char *plugin, const char *error,
				const char *sqlstate)
{
	Datum		values[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	bool		isnull;

	values[0] = msg->routing_key ? CStringGetTextDatum(msg->routing_key) : (Datum) 0;
	nulls[0] = msg->routing_key ? ' ' : 'n';
	values[1] = PointerGetDatum(sbw_bytea(msg->body, msg->body_len));
	values[2] = plugin ? CStringGetTextDatum(plugin) : (Datum) 0;
	nulls[2] = plugin ? ' ' : 'n';
	values[3] = CStringGetTextDatum(error ? error : "unknown error");
	values[4] = sqlstate ? CStringGetTextDatum(sqlstate) : (Datum) 0;
	nulls[4] = sqlstate ? ' ' : 'n';
	values[5] = msg->message_id ? CStringGetTextDatum(msg->message_id) : (Datum) 0;
	nulls[5] = msg->message_id ? ' ' : 'n';
	values[6] = BoolGetDatum(msg->redelivered);

	(void) sbw_stmt_execute(&dead_letter_stmt, values, nulls, false, 1,
							SPI_OK_INSERT_RETURNING);
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * The author's users row as jsonb, or NULL: what StoryBoard's
 * resolve_resource_by_name('user', author_id) gives plugins.  "users" is
 * found through the search_path, like every StoryBoard table; no users
 * table, no row or no id all give NULL, as in StoryBoard.  The caller runs
 * it in a plugin scope (as the plugin role), so it needs nothing the
 * plugins do not have, and it names pg_catalog's function and operator so
 * that nothing else on the path is called.
 */
static Datum
sbw_lookup_author(const SbwEvent *ev, bool *isnull)
{
	static Oid	users_relid = InvalidOid;	/* what "users" resolves to */
	Datum		arg;
	int			ret;

	*isnull = true;
	if (!ev->has_author_id)
		return (Datum) 0;

	if (sbw_name_cache_stale(&author_names))
	{
		sbw_name_cache_refresh(&author_names);
		users_relid = RangeVarGetRelid(makeRangeVar(NULL, "users", -1),
									   NoLock, true);
	}
	if (!OidIsValid(users_relid))
		return (Datum) 0;

	if (author_plan == NULL || users_relid != author_relid)
	{
		Oid			types[1] = {INT8OID};
		char	   *nspname = get_namespace_name(get_rel_namespace(users_relid));
		char	   *relname = get_rel_name(users_relid);

		if (nspname == NULL || relname == NULL)
			return (Datum) 0;	/* dropped meanwhile */
		if (author_plan)
			SPI_freeplan(author_plan);
		author_plan = NULL;
		(void) sbw_keep_plan(&author_plan,
							 psprintf("SELECT pg_catalog.to_jsonb(u) FROM %s u"
									  " WHERE u.id OPERATOR(pg_catalog.=) $1",
									  quote_qualified_identifier(nspname, relname)),
							 1, types);
		author_relid = users_relid;
	}

	arg = Int64GetDatum(ev->author_id);
	ret = SPI_execute_plan(author_plan, &arg, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "author lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return (Datum) 0;
	return SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, isnull);
}

/*
 * Convert the JSON object texts of the snapshots to jsonb.  The decoder has
 * already refused what jsonb cannot hold (NUL, invalid UTF-8), and
 * sbw_check_snapshots has tried those with numbers numeric may refuse, so
 * an error here is a bug; it is caught by the caller and dead-lettered all
 * the same.
 */
static Datum
sbw_jsonb(const char *text, bool *isnull)
{
	*isnull = (text == NULL);
	if (text == NULL)
		return (Datum) 0;
	return DirectFunctionCall1(jsonb_in, CStringGetDatum(text));
}

#define SBW_EVENT_NATTS 15

/*
 * Build the storyboard_worker.event value the plugins receive.  The author
 * lookup runs as the plugin role (see above), and only when some plugin
 * reads event.author (role valid); otherwise author is NULL.
 */
static Datum
sbw_build_event(const SbwMessage *msg, const SbwEvent *ev, Oid event_type,
				Oid role)
{
	TupleDesc	tupdesc = lookup_rowtype_tupdesc(event_type, -1);
	Datum		values[SBW_EVENT_NATTS];
	bool		nulls[SBW_EVENT_NATTS];
	HeapTuple	tuple;
	Datum		result;
	SbwPluginScope scope;
	const char *rk = msg->routing_key ? msg->routing_key : ev->resource;

	if (tupdesc->natts != SBW_EVENT_NATTS)
		elog(ERROR, "type storyboard_worker.event has %d attributes, expected %d",
			 tupdesc->natts, SBW_EVENT_NATTS);

	memset(nulls, 0, sizeof(nulls));
#define SBW_TEXT(i, s) \
	do { if (s) values[i] = CStringGetTextDatum(s); else nulls[i] = true; } while (0)

	SBW_TEXT(0, rk);
	values[1] = BoolGetDatum(msg->redelivered);
	values[2] = Int64GetDatum(ev->author_id);
	nulls[2] = !ev->has_author_id;
	nulls[3] = true;
	if (OidIsValid(role))
	{
		sbw_plugin_scope_begin(&scope, role);
		values[3] = sbw_lookup_author(ev, &nulls[3]);
		sbw_plugin_scope_end(&scope);
	}
	SBW_TEXT(4, ev->method);
	SBW_TEXT(5, ev->url);
	SBW_TEXT(6, ev->path);
	SBW_TEXT(7, ev->query_string);
	values[8] = Int32GetDatum(ev->status);
	nulls[8] = !ev->has_status;
	SBW_TEXT(9, ev->resource);
	values[10] = Int64GetDatum(ev->resource_id);
	nulls[10] = !ev->has_resource_id;
	SBW_TEXT(11, ev->sub_resource);
	values[12] = Int64GetDatum(ev->sub_resource_id);
	nulls[12] = !ev->has_sub_resource_id;
	values[13] = sbw_jsonb(ev->resource_before, &nulls[13]);
	values[14] = sbw_jsonb(ev->resource_after, &nulls[14]);
#undef SBW_TEXT

	tuple = heap_form_tuple(tupdesc, values, nulls);
	result = HeapTupleGetDatum(tuple);
	ReleaseTupleDesc(tupdesc);
	return result;
}

/*
 * Errors worth another try: the same call may well succeed a moment later.
 * SB001 is ours: a plugin's "not yet" (e.g. the API transaction that
 * published the event has not committed).  A query cancel in an
 * interactive session is the user's wish, not a transient failure.
 */
static bool
sbw_is_transient(int sqlerrcode)
{
	switch (sqlerrcode)
	{
		case ERRCODE_T_R_SERIALIZATION_FAILURE:
		case ERRCODE_T_R_DEADLOCK_DETECTED:
		case ERRCODE_LOCK_NOT_AVAILABLE:
		case ERRCODE_SBW_RETRY_LATER:
			return true;
		case ERRCODE_QUERY_CANCELED:
			return SBW_IS_BGWORKER();
		default:
			return false;
	}
}

/*
 * Sleep between retries without ignoring SIGTERM, reloads or barriers:
 * through the latch, never pg_usleep.  The latch is set for many reasons
 * (invalidation catch-up, barriers): sleep on until the delay is over.
 */
static void
sbw_retry_sleep(int attempt)
{
	long		delay_ms = Min(100L << Min(attempt - 1, 6), 5000);	/* 100 ms, 200 ms, ... */
	TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay_ms);

	for (;;)
	{
		long		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until);

		if (left <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 left, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * Call a plugin function with zero or one argument.  Unlike
 * FunctionCallNColl, a NULL result is not an error: a void SQL or PL/pgSQL
 * function returns one.  Returns the result, *isnull says whether it is.
 */
static Datum
sbw_call(FmgrInfo *finfo, int nargs, Datum arg, bool *isnull)
{
	LOCAL_FCINFO(fcinfo, 1);
	Datum		result;

	InitFunctionCallInfoData(*fcinfo, finfo, nargs, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = arg;
	fcinfo->args[0].isnull = false;
	result = FunctionCallInvoke(fcinfo);
	*isnull = fcinfo->isnull;
	return result;
}

/* One plugin call, as run inside its subtransaction. */
typedef struct SbwPluginCall
{
	SbwPlugin  *plugin;
	MemoryContext set_cxt;		/* where its FmgrInfos live */
	Datum		event;
	Oid			role;
	Oid			ext_owner;
	bool		skipped;		/* out: its enabled() said no */
} SbwPluginCall;

/*
 * Refuse to run a plugin function its registration would not accept now:
 * dropped, or given since to an owner who could replace it.
 */
static void
sbw_check_plugin_functions(SbwPluginCall *c)
{
	SbwPlugin  *p = c->plugin;

	if (!OidIsValid(p->handler))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("a function of plugin \"%s\" no longer exists", p->name),
				 errhint("Register the plugin again, or unregister it.")));
	if (!sbw_owner_trusted(p->handler_owner, c->role, c->ext_owner) ||
		(OidIsValid(p->enabled) &&
		 !sbw_owner_trusted(p->enabled_owner, c->role, c->ext_owner)))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("a function of plugin \"%s\" is owned by a role that may not run code as the plugin role",
						p->name),
				 errhint("Make the plugin role, the extension owner or a superuser the owner of %s%s%s.",
						 format_procedure(p->handler),
						 OidIsValid(p->enabled) ? " and " : "",
						 OidIsValid(p->enabled) ? format_procedure(p->enabled) : "")));
}

/*
 * The body of a plugin call (see sbw_call_plugin): its enabled() test,
 * then its handler, then its deferred constraints, all in the plugin scope.
 */
static void
sbw_plugin_call_body(void *arg)
{
	SbwPluginCall *c = (SbwPluginCall *) arg;
	SbwPlugin  *p = c->plugin;
	SbwPluginScope scope;
	bool		isnull;

	sbw_check_plugin_functions(c);
	sbw_plugin_resolve(p, c->set_cxt);
	sbw_plugin_scope_begin(&scope, c->role);
	if (OidIsValid(p->enabled))
	{
		Datum		on = sbw_call(&p->enabled_finfo, 0, (Datum) 0, &isnull);

		/* NULL counts as "not enabled" */
		c->skipped = isnull || !DatumGetBool(on);
	}
	if (!c->skipped)
	{
		(void) sbw_call(&p->handler_finfo, 1, c->event, &isnull);
	}
	sbw_plugin_scope_end(&scope);
}

/*
 * Run one plugin in its own subtransaction and settings scope, as the
 * plugin role.  Returns true on success (or when its enabled() says no:
 * *skipped); on failure everything it did is rolled back and *edata
 * describes the error.
 */
static bool
sbw_call_plugin(SbwPluginCall *c, ErrorData **edata)
{
	c->skipped = false;
	return sbw_subxact_run(sbw_plugin_call_body, c, edata);
}

/* Record an outcome for the caller, in its memory context. */
static void
sbw_outcome(SbwDispatch *d, const char *plugin, bool succeeded, bool skipped,
			const char *sqlstate, const char *error, int64 dead_letter_id)
{
	MemoryContext oldcxt = MemoryContextSwitchTo(d->resultcxt);
	SbwOutcome *o = palloc0(sizeof(SbwOutcome));

	o->plugin = plugin ? pstrdup(plugin) : NULL;
	o->succeeded = succeeded;
	o->skipped = skipped;
	o->sqlstate = sqlstate ? pstrdup(sqlstate) : NULL;
	o->error = error ? pstrdup(error) : NULL;
	o->dead_letter_id = dead_letter_id;
	d->outcomes = lappend(d->outcomes, o);
	if (dead_letter_id != 0)
		d->ndead_lettered++;
	MemoryContextSwitchTo(oldcxt);
}

/*
 * A message no plugin will see (undecodable, or given up on): keep it
 * whole as a dead letter with plugin NULL, say so, go on.  'why' starts
 * the WARNING.
 */
static void
sbw_keep_message(SbwDispatch *d, const SbwMessage *msg, const char *why,
				 const char *error, const char *sqlstate)
{
	int64		id = 0;

	/* unpack_sql_state() returns a static buffer the WARNING reuses */
	sqlstate = pstrdup(sqlstate);
	d->undecodable = true;
	if (d->keep_undecodable)
		id = sbw_dead_letter(msg, NULL, error, sqlstate);
	ereport(sbw_failure_log_level,
			(errmsg("storyboard_worker %s: %s", why, error),
			 id ? errdetail("Routing key \"%s\", %zu bytes, message id %s; kept as dead letter %lld.",
							msg->routing_key ? msg->routing_key : "",
							msg->body_len,
							msg->message_id ? msg->message_id : "(none)",
							(long long) id) : 0,
			 id ? errhint("Inspect it with SELECT * FROM storyboard_worker.dead_letters WHERE id = %lld.",
						  (long long) id) : 0));
	sbw_outcome(d, NULL, false, false, sqlstate, error, id);
}

/* The arguments of sbw_build_event, for sbw_subxact_run. */
typedef struct SbwBuildCall
{
	const SbwMessage *msg;
	const SbwEvent *ev;
	Oid			event_type;
	Oid			role;
	Datum		event;			/* out */
} SbwBuildCall;

static void
sbw_build_event_body(void *arg)
{
	SbwBuildCall *b = (SbwBuildCall *) arg;

	b->event = sbw_build_event(b->msg, b->ev, b->event_type, b->role);
}

/*
 * Throw on an error that is the server's, not the message's (out of memory
 * or disk, a shutdown, a cancel), caught around work done for a message:
 * the message is then retried, not dead-lettered.
 */
static void
sbw_rethrow_if_not_the_messages(ErrorData *edata)
{
	if (ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_INSUFFICIENT_RESOURCES ||
		ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_OPERATOR_INTERVENTION)
		ReThrowError(edata);
}

/*
 * Build the event.  With the author lookup (role valid), in a
 * subtransaction, so that its SQL failing, or a value PostgreSQL refuses
 * (which the decoder should have caught), dead-letters this message instead
 * of aborting the consumer's transaction; without it, only jsonb_in runs,
 * on texts the decoder has already checked, and the subtransaction is not
 * worth its cost (should it fail all the same, the transaction fails and
 * the message is counted as a poison one).
 */
static bool
sbw_build_event_guarded(SbwDispatch *d, const SbwMessage *msg,
						const SbwEvent *ev, Oid event_type, Oid role,
						Datum *event)
{
	SbwBuildCall b = {msg, ev, event_type, role, (Datum) 0};
	ErrorData  *edata;

	if (!OidIsValid(role))
	{
		*event = sbw_build_event(msg, ev, event_type, InvalidOid);
		return true;
	}
	if (sbw_subxact_run(sbw_build_event_body, &b, &edata))
	{
		*event = b.event;
		return true;
	}
	/* privileges and missing objects are configuration, not the message */
	if (ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION)
		ReThrowError(edata);
	sbw_rethrow_if_not_the_messages(edata);
	sbw_keep_message(d, msg, "could not decode a message", edata->message,
					 unpack_sql_state(edata->sqlerrcode));
	return false;
}

/*
 * Run one plugin for the event, with retries of transient errors, and keep
 * its failure as a dead letter.
 */
static void
sbw_run_plugin(SbwDispatch *d, const SbwMessage *msg, const SbwEvent *ev,
			   SbwPluginCall *c)
{
	SbwPlugin  *p = c->plugin;
	ErrorData  *edata = NULL;
	int			attempt = 0;
	int64		id = 0;

	while (!sbw_call_plugin(c, &edata))
	{
		if (!sbw_is_transient(edata->sqlerrcode) || attempt >= sbw_max_retries)
			break;
		attempt++;
		ereport(LOG,
				(errmsg("storyboard_worker plugin \"%s\" will retry (%d of %d): %s",
						p->name, attempt, sbw_max_retries, edata->message)));
		FreeErrorData(edata);
		edata = NULL;
		sbw_retry_sleep(attempt);
	}

	if (edata == NULL)
	{
		sbw_outcome(d, p->name, true, c->skipped, NULL, NULL, 0);
		return;
	}

	if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED && !SBW_IS_BGWORKER())
		ReThrowError(edata);
	/* SQL objects updated under this library (extension.c): requeue, wait */
	if (edata->sqlerrcode == ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE && SBW_IS_BGWORKER() &&
		sbw_extension_not_ready(get_extension_oid(SBW_EXTENSION_NAME, true)) != NULL)
		ReThrowError(edata);

	if (d->keep_failures)
		id = sbw_dead_letter(msg, p->name, edata->message,
							 unpack_sql_state(edata->sqlerrcode));
	ereport(sbw_failure_log_level,
			(errmsg("storyboard_worker plugin \"%s\" failed: %s",
					p->name, edata->message),
			 errdetail("SQLSTATE %s; %s %s event%s%s.",
					   unpack_sql_state(edata->sqlerrcode),
					   ev->method ? ev->method : "(no method)",
					   ev->resource,
					   id ? ", kept as dead letter " : "",
					   id ? psprintf("%lld", (long long) id) : ""),
			 id ? errhint("Fix the plugin, then run SELECT storyboard_worker.replay(%lld).",
						  (long long) id) : 0));
	sbw_outcome(d, p->name, false, false, unpack_sql_state(edata->sqlerrcode),
				edata->message, id);
	FreeErrorData(edata);
}

/* jsonb_in for sbw_subxact_run: the result is not kept. */
static void
sbw_jsonb_in_body(void *arg)
{
	(void) DirectFunctionCall1(jsonb_in, CStringGetDatum((char *) arg));
}

/*
 * The decoder leaves numeric's range to jsonb_in.  When a body has a number
 * with a fraction or an exponent (has_decimal_number), try the whole body
 * here in a subtransaction, so that one jsonb_in refuses is a dead letter,
 * as any other body that cannot be decoded; only then the snapshots, to
 * name the key when it is one of them.  Other bodies skip this: their
 * snapshots cannot fail jsonb_in, which sbw_build_event then runs without
 * a subtransaction.
 */
static bool
sbw_check_snapshots(SbwDispatch *d, const SbwMessage *msg, const SbwEvent *ev)
{
	const char *keys[] = {"key \"resource_before\"", "key \"resource_after\""};
	char	   *texts[] = {ev->resource_before, ev->resource_after};
	const char *where = "the message body";
	ErrorData  *edata;
	ErrorData  *snapshot_edata;
	int			i;

	if (sbw_subxact_run(sbw_jsonb_in_body, pnstrdup(msg->body, msg->body_len), &edata))
		return true;
	sbw_rethrow_if_not_the_messages(edata);
	for (i = 0; i < lengthof(texts); i++)
	{
		if (texts[i] == NULL || sbw_subxact_run(sbw_jsonb_in_body, texts[i], &snapshot_edata))
			continue;
		sbw_rethrow_if_not_the_messages(snapshot_edata);
		edata = snapshot_edata;
		where = keys[i];
		break;
	}
	sbw_keep_message(d, msg, "could not decode a message",
					 psprintf("%s cannot be stored as jsonb: %s", where, edata->message),
					 unpack_sql_state(edata->sqlerrcode));
	return false;
}

/* sbw_decode_event for sbw_subxact_run. */
typedef struct SbwDecodeCall
{
	const SbwMessage *msg;
	SbwEvent   *ev;
	char	   *errmsg;
	int			sqlerrcode;
	bool		ok;
} SbwDecodeCall;

static void
sbw_decode_call(void *arg)
{
	SbwDecodeCall *c = (SbwDecodeCall *) arg;

	c->ok = sbw_decode_event(c->msg->body, c->msg->body_len,
							 (size_t) sbw_max_message_bytes, c->ev,
							 &c->errmsg, &c->sqlerrcode);
}

/*
 * Decode.  In a database that is not UTF-8, PostgreSQL's JSON parser turns
 * \u escapes into the server encoding and raises for a character it cannot
 * hold: that error is the body's, so there the decoder runs in a
 * subtransaction and the error becomes the decoder's answer.
 */
static bool
sbw_decode_body(const SbwMessage *msg, SbwEvent *ev, char **errmsg, int *sqlerrcode)
{
	SbwDecodeCall c = {msg, ev, NULL, 0, false};
	ErrorData  *edata;

	if (GetDatabaseEncoding() == PG_UTF8)
		sbw_decode_call(&c);
	else if (!sbw_subxact_run(sbw_decode_call, &c, &edata))
	{
		sbw_rethrow_if_not_the_messages(edata);
		memset(ev, 0, sizeof(SbwEvent));
		c.errmsg = psprintf("message body cannot be decoded in this database's encoding: %s",
							edata->message);
		c.sqlerrcode = edata->sqlerrcode;
	}
	*errmsg = c.errmsg;
	*sqlerrcode = c.sqlerrcode;
	return c.ok;
}

/*
 * Decode the message; false (and a dead letter) if it cannot become an
 * event.  A body cut short at max_message_bytes by the consumer (its
 * frame header announced more) is refused without being decoded.
 */
static bool
sbw_decode_message(SbwDispatch *d, const SbwMessage *msg, SbwEvent *ev)
{
	char	   *errmsg_text = NULL;
	int			sqlerrcode = 0;

	if (msg->body_declared_len > msg->body_len)
	{
		sbw_keep_message(d, msg, "could not decode a message",
						 psprintf("message body of %zu bytes exceeds storyboard_worker.max_message_bytes (%d); only its first %zu bytes were read",
								  msg->body_declared_len, sbw_max_message_bytes,
								  msg->body_len),
						 unpack_sql_state(ERRCODE_PROGRAM_LIMIT_EXCEEDED));
		return false;
	}
	if (!sbw_decode_body(msg, ev, &errmsg_text, &sqlerrcode))
	{
		sbw_keep_message(d, msg, "could not decode a message", errmsg_text,
						 unpack_sql_state(sqlerrcode));
		return false;
	}
	if (ev->has_decimal_number && !sbw_check_snapshots(d, msg, ev))
		return false;
	d->decoded = true;
	return true;
}

/*
 * sbw_dispatch with the plugin set pinned.  Not inlined into sbw_dispatch,
 * whose PG_TRY would otherwise put these locals at the mercy of longjmp.
 */
pg_noinline static void
sbw_dispatch_with(SbwDispatch *d, const SbwMessage *msg, SbwPluginSet *set)
{
	SbwEvent	ev;
	ListCell   *lc;
	Oid			role;
	Datum		event;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	if (!sbw_decode_message(d, msg, &ev))
	{
		SPI_finish();
		return;
	}

	role = sbw_plugin_role();
	if (!sbw_build_event_guarded(d, msg, &ev, set->event_type,
								 set->reads_author ? role : InvalidOid, &event))
	{
		SPI_finish();
		return;
	}

	/*
	 * Deferred constraints the caller of process_event() or replay() queued
	 * fire now, as the caller: the first plugin's end must fire its own
	 * only.  A consumer's transaction has none (every plugin scope fires
	 * its own), and its first plugin keeps each constraint's default.
	 */
	if (!SBW_IS_BGWORKER())
		sbw_fire_deferred_constraints();

	foreach(lc, set->plugins)
	{
		SbwPluginCall c;

		memset(&c, 0, sizeof(c));
		c.plugin = (SbwPlugin *) lfirst(lc);
		if (d->only_plugin && strcmp(d->only_plugin, c.plugin->name) != 0)
			continue;
		c.event = event;
		c.role = role;
		c.ext_owner = set->ext_owner;
		c.set_cxt = set->cxt;
		sbw_run_plugin(d, msg, &ev, &c);
	}

	SPI_finish();
}

/* The plugin set, pinned; raises if the extension is not installed. */
static SbwPluginSet *
sbw_pin_or_raise(void)
{
	SbwPluginSet *set = sbw_plugins_pin();

	if (set == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"%s\" is not installed in database \"%s\"",
						SBW_EXTENSION_NAME, get_database_name(MyDatabaseId)),
				 errhint("Run CREATE EXTENSION %s there.", SBW_EXTENSION_NAME)));
	return set;
}

/*
 * Dispatch one message in the current transaction (see the file header).
 * d->only_plugin restricts it to one plugin (replay); d->keep_failures
 * says whether failures become new dead letters.  Errors that are not the
 * message's or a plugin's fault (no extension, missing role, SPI failure)
 * are thrown: the caller must not acknowledge the message then.
 */
void
sbw_dispatch(SbwDispatch *d, const SbwMessage *msg)
{
	SbwPluginSet *set = sbw_pin_or_raise();

	PG_TRY();
	{
		sbw_dispatch_with(d, msg, set);
	}
	PG_FINALLY();
	{
		sbw_plugins_unpin(set);
	}
	PG_END_TRY();
}

/*
 * Give up on a message without running any plugin: it crashed its consumer
 * or failed at COMMIT 'failures' times (storyboard_worker.max_redeliveries);
 * last_error is why the last attempt failed, NULL if it ended the process.
 * Kept whole as a dead letter with plugin NULL, so that replay() runs every
 * plugin on it once the cause is fixed.
 */
void
sbw_dispatch_give_up(SbwDispatch *d, const SbwMessage *msg, int failures,
					 const char *last_error)
{
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	sbw_keep_message(d, msg, "gave up on a message",
					 psprintf("crashed or failed at commit %d times; not run again (storyboard_worker.max_redeliveries = %d); %s%s",
							  failures, sbw_max_redeliveries,
							  last_error ? "the last attempt failed: " :
							  "the last attempt ended its process (a crash?)",
							  last_error ? last_error : ""),
					 unpack_sql_state(ERRCODE_SBW_POISON));
	SPI_finish();
}

/*
 * SQL: process_event(body, routing_key) -> one row per plugin (or one row
 * with plugin NULL for an undecodable body).  The same dispatch the
 * consumers run, synchronously, in the caller's transaction: for tests,
 * and for feeding events by hand.
 */
Datum
sbw_process_event(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	SbwDispatch d;
	SbwMessage	msg;
	text	   *body;
	ListCell   *lc;

	sbw_require_current_version();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("message body must not be null")));
	sbw_check_owner("run storyboard_worker.process_event");

	InitMaterializedSRF(fcinfo, 0);

	body = PG_GETARG_TEXT_PP(0);
	memset(&msg, 0, sizeof(msg));
	msg.body = VARDATA_ANY(body);
	msg.body_len = VARSIZE_ANY_EXHDR(body);
	msg.routing_key = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));

	memset(&d, 0, sizeof(d));
	d.keep_failures = true;
	d.keep_undecodable = true;
	d.resultcxt = CurrentMemoryContext;
	sbw_dispatch(&d, &msg);

	foreach(lc, d.outcomes)
	{
		SbwOutcome *o = (SbwOutcome *) lfirst(lc);
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, false};

		if (o->skipped)
			continue;			/* disabled: as if not installed */

		if (o->plugin)
			values[0] = CStringGetTextDatum(o->plugin);
		else
			nulls[0] = true;
		values[1] = BoolGetDatum(o->succeeded);
		if (o->sqlstate)
			values[2] = CStringGetTextDatum(o->sqlstate);
		else
			nulls[2] = true;
		if (o->error)
			values[3] = CStringGetTextDatum(o->error);
		else
			nulls[3] = true;
		if (o->dead_letter_id)
			values[4] = Int64GetDatum(o->dead_letter_id);
		else
			nulls[4] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_VOID();
}

static SbwStmt replay_read_stmt = SBW_STMT(
	"SELECT routing_key, body, plugin, message_id"
	" FROM storyboard_worker.dead_letters"
	" WHERE id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
	1, INT8OID);

static SbwStmt replay_done_stmt = SBW_STMT(
	"DELETE FROM storyboard_worker.dead_letters WHERE id OPERATOR(pg_catalog.=) $1",
	1, INT8OID);

static SbwStmt prune_dead_letters_stmt = SBW_STMT(
	"DELETE FROM storyboard_worker.dead_letters"
	" WHERE received_at OPERATOR(pg_catalog.<) $1",
	1, TIMESTAMPTZOID);

/*
 * Delete the dead letters received before the cutoff (dead_letter_retention,
 * computed by the caller in C); returns how many.  SPI connected.
 */
uint64
sbw_dead_letters_prune(TimestampTz cutoff)
{
	Datum		args[1] = {TimestampTzGetDatum(cutoff)};

	(void) sbw_stmt_execute(&prune_dead_letters_stmt, args, NULL, false, 0, SPI_OK_DELETE);
	return SPI_processed;
}

static SbwStmt replay_failed_stmt = SBW_STMT(
	"UPDATE storyboard_worker.dead_letters"
	" SET error = $2, sqlstate = $3,"
	"     replay_count = replay_count OPERATOR(pg_catalog.+) 1,"
	"     last_replayed_at = pg_catalog.now()"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	3, INT8OID, TEXTOID, TEXTOID);

/*
 * Read dead letter 'id' (locking it) into *msg; returns its plugin, NULL
 * for a whole message.  SPI connected.
 */
static char *
sbw_replay_read(int64 id, SbwMessage *msg)
{
	Datum		args[1] = {Int64GetDatum(id)};
	TupleDesc	desc;
	HeapTuple	tup;
	bytea	   *body;
	bool		isnull;

	(void) sbw_stmt_execute(&replay_read_stmt, args, NULL, false, 1, SPI_OK_SELECT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("dead letter %lld does not exist", (long long) id)));

	tup = SPI_copytuple(SPI_tuptable->vals[0]);
	desc = SPI_tuptable->tupdesc;
	memset(msg, 0, sizeof(*msg));
	msg->routing_key = SPI_getvalue(tup, desc, 1);
	body = DatumGetByteaPP(SPI_getbinval(tup, desc, 2, &isnull));
	msg->body = VARDATA_ANY(body);
	msg->body_len = VARSIZE_ANY_EXHDR(body);
	msg->body_declared_len = msg->body_len;
	msg->message_id = SPI_getvalue(tup, desc, 4);
	if (msg->message_id)
	{
		msg->message_id_raw = msg->message_id;
		msg->message_id_len = strlen(msg->message_id);
	}
	return SPI_getvalue(tup, desc, 3);
}

/* Refuse to replay a plugin's dead letter when that plugin is gone. */
static void
sbw_replay_check_plugin(int64 id, const char *plugin)
{
	SbwPluginSet *set = sbw_plugins_pin();
	ListCell   *lc;
	bool		registered = false;

	if (set)
	{
		foreach(lc, set->plugins)
			if (strcmp(((SbwPlugin *) lfirst(lc))->name, plugin) == 0)
				registered = true;
		sbw_plugins_unpin(set);
	}
	if (!registered)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("plugin \"%s\" of dead letter %lld is not registered",
						plugin, (long long) id),
				 errhint("Register it with storyboard_worker.register_plugin() first.")));
}

/*
 * SQL: replay(dead_letter_id) -> true if it now succeeded.  A plugin's
 * dead letter re-runs that plugin only; an undecodable one (or one given
 * up on) is decoded again and dispatched to every plugin (a body refused
 * by max_message_bytes in process_event can pass once the limit is raised;
 * one the consumer cut short at the frame header cannot: only its first
 * bytes were kept).  Success deletes the dead letter; failure updates its
 * error and count.
 */
Datum
sbw_replay(PG_FUNCTION_ARGS)
{
	int64		id = PG_GETARG_INT64(0);
	SbwMessage	msg;
	SbwDispatch d;
	char	   *plugin;
	bool		succeeded = true;
	const char *error = NULL;
	const char *sqlstate = NULL;

	sbw_require_current_version();
	sbw_check_owner("replay storyboard_worker dead letters");

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	plugin = sbw_replay_read(id, &msg);
	if (plugin)
		sbw_replay_check_plugin(id, plugin);

	memset(&d, 0, sizeof(d));
	d.only_plugin = plugin;
	/* a whole-message replay keeps new plugin failures as new dead letters */
	d.keep_failures = (plugin == NULL);
	d.resultcxt = CurrentMemoryContext;
	sbw_dispatch(&d, &msg);

	if (d.undecodable || plugin)
	{
		SbwOutcome *o = linitial(d.outcomes);

		succeeded = !d.undecodable && o->succeeded && !o->skipped;
		error = o->skipped ? psprintf("plugin \"%s\" is disabled", plugin) : o->error;
		sqlstate = o->sqlstate;
	}
	/* else: decoded and dispatched; plugin failures are new dead letters */

	if (succeeded)
	{
		Datum		args[1] = {Int64GetDatum(id)};

		(void) sbw_stmt_execute(&replay_done_stmt, args, NULL, false, 0, SPI_OK_DELETE);
	}
	else
	{
		Datum		vals[3];
		char		nulls[3] = {' ', ' ', ' '};

		vals[0] = Int64GetDatum(id);
		vals[1] = CStringGetTextDatum(error ? error : "unknown error");
		vals[2] = sqlstate ? CStringGetTextDatum(sqlstate) : (Datum) 0;
		nulls[2] = sqlstate ? ' ' : 'n';
		(void) sbw_stmt_execute(&replay_failed_stmt, vals, nulls, false, 0, SPI_OK_UPDATE);
	}
	SPI_finish();
	PG_RETURN_BOOL(succeeded);
}
