/*-------------------------------------------------------------------------
 *
 * sbw_test_plugins.c
 *		storyboard_worker plugins that misbehave on purpose, for the
 *		integration tests: one crashes the backend, one makes the event's
 *		transaction fail at COMMIT, one ignores interrupts for a while.
 *		Each acts only on events whose query_string names it, so that a
 *		test picks the one poison event among many healthy ones.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(sbw_test_crash);
PG_FUNCTION_INFO_V1(sbw_test_fail_at_commit);
PG_FUNCTION_INFO_V1(sbw_test_deaf);

/* The event's query_string, or "" (tests put their markers there). */
static char *
event_query_string(FunctionCallInfo fcinfo)
{
	bool		isnull;
	Datum		d = GetAttributeByName(PG_GETARG_HEAPTUPLEHEADER(0),
									   "query_string", &isnull);

	return isnull ? pstrdup("") : TextDatumGetCString(d);
}

/* A real segfault, as a buggy C plugin would have. */
Datum
sbw_test_crash(PG_FUNCTION_ARGS)
{
	if (strstr(event_query_string(fcinfo), "crash-me") != NULL)
	{
		volatile int *nowhere = NULL;

		elog(LOG, "sbw_test_plugins: crashing on purpose");
		*nowhere = 1;
	}
	PG_RETURN_VOID();
}

static bool callback_registered = false;
static bool fail_this_commit = false;

/* Pre-commit: raise once for the transaction that asked for it. */
static void
fail_at_commit_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_PRE_COMMIT && fail_this_commit)
	{
		fail_this_commit = false;
		ereport(ERROR,
				(errcode(ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION),
				 errmsg("sbw_test_plugins: this transaction fails at COMMIT on purpose")));
	}
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_COMMIT)
		fail_this_commit = false;
}

/* Arrange for the current transaction to fail at COMMIT. */
Datum
sbw_test_fail_at_commit(PG_FUNCTION_ARGS)
{
	if (strstr(event_query_string(fcinfo), "commit-fail") == NULL)
		PG_RETURN_VOID();
	if (!callback_registered)
	{
		RegisterXactCallback(fail_at_commit_callback, NULL);
		callback_registered = true;
	}
	fail_this_commit = true;
	PG_RETURN_VOID();
}

/*
 * Sleep with interrupts held: SIGTERM is served only afterwards.  A signal
 * cuts pg_usleep short, so sleep on until the time is really up.
 */
Datum
sbw_test_deaf(PG_FUNCTION_ARGS)
{
	char	   *qs = event_query_string(fcinfo);
	char	   *p = strstr(qs, "deaf-");

	if (p != NULL)
	{
		long		ms = strtol(p + 5, NULL, 10);

		TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);

		elog(LOG, "sbw_test_plugins: deaf for %ld ms", ms);
		HOLD_INTERRUPTS();
		while (GetCurrentTimestamp() < until)
			pg_usleep(10000L);
		RESUME_INTERRUPTS();
	}
	PG_RETURN_VOID();
}
