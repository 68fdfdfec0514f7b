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
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/typcache.h"
#include "utils/wait_event.h"

#include "event_decode.h"
#include "storyboard_worker.h"
#include "dispatch.h"

PG_FUNCTION_INFO_V1(sbw_process_event);
PG_FUNCTION_INFO_V1(sbw_replay);

/* Plans kept for the life of the backend (re-validated by the plancache). */
static SPIPlanPtr dead_letter_plan = NULL;
static SPIPlanPtr author_plan = NULL;
static Oid	author_relid = InvalidOid;	/* the relation author_plan reads */
static Oid	author_relid_now = InvalidOid;	/* what "users" resolves to */
static uint64 author_generation = 0;
static OverrideSearchPath *author_path = NULL;

/* The role plugins run as, resolved from storyboard_worker.role. */
static Oid	plugin_role = InvalidOid;
static char *plugin_role_setting = NULL;
static bool role_callback_registered = false;
static bool superuser_warned = false;

/* Forget the resolved role when any role changes (renamed, dropped). */
static void
sbw_role_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	plugin_role = InvalidOid;
}

/*
 * The role plugins run as: storyboard_worker.role, or the database owner
 * when it is empty.  A role that does not exist is a configuration error:
 * it aborts the transaction, so the consumer requeues the message and backs
 * off instead of dead-lettering every event.
 */
static Oid
sbw_get_plugin_role(void)
{
	const char *setting = sbw_role ? sbw_role : "";

	if (OidIsValid(plugin_role) && plugin_role_setting &&
		strcmp(plugin_role_setting, setting) == 0)
		return plugin_role;

	if (!role_callback_registered)
	{
		CacheRegisterSyscacheCallback(AUTHOID, sbw_role_callback, (Datum) 0);
		CacheRegisterSyscacheCallback(DATABASEOID, sbw_role_callback, (Datum) 0);
		role_callback_registered = true;
	}

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

	if (IsBackgroundWorker && !superuser_warned && superuser_arg(plugin_role))
	{
		superuser_warned = true;
		ereport(WARNING,
				(errmsg("storyboard_worker plugins run as superuser \"%s\"",
						GetUserNameFromId(plugin_role, false)),
				 errhint("Set storyboard_worker.role to a role that can only read and write StoryBoard's tables.")));
	}
	return plugin_role;
}

/* Build a bytea from a buffer that may hold NUL bytes. */
static bytea *
sbw_bytea(const char *data, size_t len)
{
	bytea	   *b = palloc(len + VARHDRSZ);

	SET_VARSIZE(b, len + VARHDRSZ);
	memcpy(VARDATA(b), data, len);
	return b;
}

/*
 * Store a dead letter and return its id.  Runs in the current
 * (sub)transaction with the worker's own rights: plugins cannot write or
 * read this table.
 */
static int64
sbw_dead_letter(const SbwMessage *msg, const char *plugin, const char *error,
				const char *sqlstate)
{
	Datum		values[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	bool		isnull;
	int			ret;
	int64		id;

	Oid			types[7] = {TEXTOID, BYTEAOID, TEXTOID, TEXTOID, TEXTOID,
	TEXTOID, BOOLOID};
	SPIPlanPtr	plan;

	plan = sbw_keep_plan(&dead_letter_plan,
						 "INSERT INTO storyboard_worker.dead_letters"
						 " (routing_key, body, plugin, error, sqlstate, message_id, redelivered)"
						 " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
						 7, types);

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

	ret = SPI_execute_plan(plan, values, nulls, false, 1);
	if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "could not store dead letter: %s", SPI_result_code_string(ret));
	id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									 SPI_tuptable->tupdesc, 1, &isnull));
	return id;
}

/*
 * The author's users row as jsonb, or NULL: what StoryBoard's
 * resolve_resource_by_name('user', author_id) gives plugins.  "users" is
 * found through the search_path, like every StoryBoard table; no users
 * table, no row or no id all give NULL, as in StoryBoard.  Runs as the
 * plugin role, so it needs nothing the plugins do not have.
 */
static Datum
sbw_lookup_author(const SbwEvent *ev, bool *isnull)
{
	Oid			relid;
	Datum		arg;
	int			ret;

	*isnull = true;
	if (!ev->has_author_id)
		return (Datum) 0;

	/* resolve "users" again only after DDL or a search_path change */
	if (author_generation != sbw_catalog_generation() ||
		author_path == NULL || !OverrideSearchPathMatchesCurrent(author_path))
	{
		author_relid_now = RangeVarGetRelid(makeRangeVar(NULL, "users", -1),
											NoLock, true);
		if (author_path)
			pfree(author_path);
		author_path = GetOverrideSearchPath(TopMemoryContext);
		author_generation = sbw_catalog_generation();
	}
	relid = author_relid_now;
	if (!OidIsValid(relid))
		return (Datum) 0;

	if (author_plan == NULL || relid != author_relid)
	{
		Oid			types[1] = {INT8OID};

		if (author_plan)
			SPI_freeplan(author_plan);
		author_plan = NULL;
		(void) sbw_keep_plan(&author_plan,
							 psprintf("SELECT pg_catalog.to_jsonb(u) FROM %s u WHERE u.id = $1",
									  quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
																 get_rel_name(relid))),
							 1, types);
		author_relid = relid;
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
 * already refused what jsonb cannot hold (NUL, invalid UTF-8), so an error
 * here is a bug; it is caught by the caller and dead-lettered all the same.
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
 * lookup runs as the plugin role (see above).
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
	Oid			save_userid;
	int			save_sec;
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
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(role, save_sec | SECURITY_LOCAL_USERID_CHANGE);
	values[3] = sbw_lookup_author(ev, &nulls[3]);
	SetUserIdAndSecContext(save_userid, save_sec);
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
			return IsBackgroundWorker;
		default:
			return false;
	}
}

/*
 * Sleep between retries without ignoring SIGTERM, reloads or barriers:
 * through the latch, never pg_usleep.
 */
static void
sbw_retry_sleep(int attempt)
{
	long		delay_ms = 100L << Min(attempt - 1, 6);	/* 100 ms, 200 ms, ... */

	delay_ms = Min(delay_ms, 5000);
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 delay_ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
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

/*
 * Run one plugin in its own subtransaction, as the plugin role.  Returns
 * true on success (or when its enabled() says no: *skipped); on failure
 * the subtransaction is rolled back and *edata describes the error.
 */
static bool
sbw_call_plugin(SbwPlugin *p, Datum event, Oid role, bool *skipped,
				ErrorData **edata)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = true;

	*skipped = false;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);

	PG_TRY();
	{
		Oid			save_userid;
		int			save_sec;

		if (!OidIsValid(p->handler))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_FUNCTION),
					 errmsg("a function of plugin \"%s\" no longer exists", p->name),
					 errhint("Register the plugin again, or unregister it.")));

		GetUserIdAndSecContext(&save_userid, &save_sec);
		SetUserIdAndSecContext(role, save_sec | SECURITY_LOCAL_USERID_CHANGE);
		if (OidIsValid(p->enabled))
		{
			bool		isnull;
			Datum		on = sbw_call(&p->enabled_finfo, 0, (Datum) 0, &isnull);

			/* NULL counts as "not enabled" */
			*skipped = isnull || !DatumGetBool(on);
		}
		if (!*skipped)
		{
			bool		isnull;

			(void) sbw_call(&p->handler_finfo, 1, event, &isnull);
		}
		SetUserIdAndSecContext(save_userid, save_sec);

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
		ok = false;
	}
	PG_END_TRY();
	return ok;
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

/* A message that cannot become an event: keep it, say so, go on. */
static void
sbw_undecodable(SbwDispatch *d, const SbwMessage *msg, const char *error,
				const char *sqlstate)
{
	int64		id = 0;

	/* unpack_sql_state() returns a static buffer the WARNING reuses */
	sqlstate = pstrdup(sqlstate);
	d->undecodable = true;
	if (d->keep_undecodable)
		id = sbw_dead_letter(msg, NULL, error, sqlstate);
	ereport(WARNING,
			(errmsg("storyboard_worker could not decode a message: %s", error),
			 id ? errdetail("Routing key \"%s\", %zu bytes, message id %s; kept as dead letter %lld.",
							msg->routing_key ? msg->routing_key : "",
							msg->body_len,
							msg->message_id ? msg->message_id : "(none)",
							(long long) id) : 0,
			 id ? errhint("Inspect it with SELECT * FROM storyboard_worker.dead_letters WHERE id = %lld.",
						  (long long) id) : 0));
	sbw_outcome(d, NULL, false, false, sqlstate, error, id);
}

/*
 * Build the event in a subtransaction, so that a value PostgreSQL refuses
 * (which the decoder should have caught) dead-letters this message instead
 * of aborting the consumer's transaction again and again.
 */
static bool
sbw_build_event_guarded(SbwDispatch *d, const SbwMessage *msg,
						const SbwEvent *ev, Oid event_type, Oid role,
						Datum *event)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = true;
	ErrorData  *volatile edata = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		*event = sbw_build_event(msg, ev, event_type, role);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		ok = false;
	}
	PG_END_TRY();

	if (!ok)
	{
		/* privileges and missing objects are configuration, not the message */
		if (ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION ||
			ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_INSUFFICIENT_RESOURCES ||
			ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_OPERATOR_INTERVENTION)
			ReThrowError(edata);
		sbw_undecodable(d, msg, edata->message, unpack_sql_state(edata->sqlerrcode));
	}
	return ok;
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
	SbwEvent	ev;
	char	   *errmsg_text = NULL;
	int			sqlerrcode = 0;
	List	   *plugins;
	ListCell   *lc;
	Oid			event_type;
	Oid			role;
	Datum		event;

	if (!sbw_plugins_get(&plugins))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"%s\" is not installed in database \"%s\"",
						SBW_EXTENSION_NAME, get_database_name(MyDatabaseId)),
				 errhint("Run CREATE EXTENSION %s there.", SBW_EXTENSION_NAME)));
	event_type = sbw_event_type_oid();

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	if (!sbw_decode_event(msg->body, msg->body_len, (size_t) sbw_max_message_bytes,
						  &ev, &errmsg_text, &sqlerrcode))
	{
		sbw_undecodable(d, msg, errmsg_text, unpack_sql_state(sqlerrcode));
		SPI_finish();
		return;
	}
	d->decoded = true;

	role = sbw_get_plugin_role();
	if (!sbw_build_event_guarded(d, msg, &ev, event_type, role, &event))
	{
		SPI_finish();
		return;
	}

	foreach(lc, plugins)
	{
		SbwPlugin  *p = (SbwPlugin *) lfirst(lc);
		ErrorData  *edata = NULL;
		bool		skipped = false;
		int			attempt = 0;
		int64		id = 0;

		if (d->only_plugin && strcmp(d->only_plugin, p->name) != 0)
			continue;

		for (;;)
		{
			if (sbw_call_plugin(p, event, role, &skipped, &edata))
				break;
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
			sbw_outcome(d, p->name, true, skipped, NULL, NULL, 0);
			continue;
		}

		if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED && !IsBackgroundWorker)
			ReThrowError(edata);

		if (d->keep_failures)
			id = sbw_dead_letter(msg, p->name, edata->message,
								 unpack_sql_state(edata->sqlerrcode));
		ereport(WARNING,
				(errmsg("storyboard_worker plugin \"%s\" failed: %s",
						p->name, edata->message),
				 errdetail("SQLSTATE %s; %s %s event%s%s.",
						   unpack_sql_state(edata->sqlerrcode),
						   ev.method ? ev.method : "(no method)",
						   ev.resource,
						   id ? ", kept as dead letter " : "",
						   id ? psprintf("%lld", (long long) id) : ""),
				 id ? errhint("Fix the plugin, then run SELECT storyboard_worker.replay(%lld).",
							  (long long) id) : 0));
		sbw_outcome(d, p->name, false, false, unpack_sql_state(edata->sqlerrcode),
					edata->message, id);
		FreeErrorData(edata);
	}

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

/*
 * SQL: replay(dead_letter_id) -> true if it now succeeded.  A plugin's
 * dead letter re-runs that plugin only; an undecodable one is decoded again
 * (max_message_bytes may have been raised) and dispatched to every plugin.
 * Success deletes the dead letter; failure updates its error and count.
 */
Datum
sbw_replay(PG_FUNCTION_ARGS)
{
	int64		id = PG_GETARG_INT64(0);
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1];
	int			ret;
	SbwMessage	msg;
	SbwDispatch d;
	char	   *plugin;
	bool		isnull;
	bytea	   *body;
	TupleDesc	desc;
	HeapTuple	tup;
	bool		succeeded;
	const char *error = NULL;
	const char *sqlstate = NULL;

	sbw_check_owner("replay storyboard_worker dead letters");

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	args[0] = Int64GetDatum(id);
	ret = SPI_execute_with_args("SELECT routing_key, body, plugin, message_id"
								" FROM storyboard_worker.dead_letters WHERE id = $1 FOR UPDATE",
								1, argtypes, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read dead letter: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("dead letter %lld does not exist", (long long) id)));

	tup = SPI_copytuple(SPI_tuptable->vals[0]);
	desc = SPI_tuptable->tupdesc;
	memset(&msg, 0, sizeof(msg));
	msg.routing_key = SPI_getvalue(tup, desc, 1);
	body = DatumGetByteaPP(SPI_getbinval(tup, desc, 2, &isnull));
	msg.body = VARDATA_ANY(body);
	msg.body_len = VARSIZE_ANY_EXHDR(body);
	plugin = SPI_getvalue(tup, desc, 3);
	msg.message_id = SPI_getvalue(tup, desc, 4);

	memset(&d, 0, sizeof(d));
	d.only_plugin = plugin;
	/* a whole-message replay keeps new plugin failures as new dead letters */
	d.keep_failures = (plugin == NULL);
	d.resultcxt = CurrentMemoryContext;

	if (plugin)
	{
		List	   *plugins;
		ListCell   *lc;
		bool		registered = false;

		if (sbw_plugins_get(&plugins))
			foreach(lc, plugins)
				if (strcmp(((SbwPlugin *) lfirst(lc))->name, plugin) == 0)
					registered = true;
		if (!registered)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("plugin \"%s\" of dead letter %lld is not registered",
							plugin, (long long) id),
					 errhint("Register it with storyboard_worker.register_plugin() first.")));
	}

	sbw_dispatch(&d, &msg);

	if (d.undecodable)
	{
		SbwOutcome *o = linitial(d.outcomes);

		succeeded = false;
		error = o->error;
		sqlstate = o->sqlstate;
	}
	else if (plugin)
	{
		SbwOutcome *o = linitial(d.outcomes);

		succeeded = o->succeeded && !o->skipped;
		error = o->skipped ? psprintf("plugin \"%s\" is disabled", plugin) : o->error;
		sqlstate = o->sqlstate;
	}
	else
		succeeded = true;		/* decoded and dispatched; failures are new rows */

	if (succeeded)
		ret = SPI_execute_with_args("DELETE FROM storyboard_worker.dead_letters WHERE id = $1",
									1, argtypes, args, NULL, false, 0);
	else
	{
		Oid			types[3] = {INT8OID, TEXTOID, TEXTOID};
		Datum		vals[3];
		char		nulls[3] = {' ', ' ', ' '};

		vals[0] = args[0];
		vals[1] = CStringGetTextDatum(error ? error : "unknown error");
		vals[2] = sqlstate ? CStringGetTextDatum(sqlstate) : (Datum) 0;
		nulls[2] = sqlstate ? ' ' : 'n';
		ret = SPI_execute_with_args("UPDATE storyboard_worker.dead_letters"
									" SET error = $2, sqlstate = $3,"
									" replay_count = replay_count + 1, last_replayed_at = now()"
									" WHERE id = $1",
									3, types, vals, nulls, false, 0);
	}
	if (ret < 0)
		elog(ERROR, "could not update dead letter: %s", SPI_result_code_string(ret));
	SPI_finish();
	PG_RETURN_BOOL(succeeded);
}
