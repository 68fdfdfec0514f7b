/*-------------------------------------------------------------------------
 *
 * launcher.c
 *		Keeps storyboard_worker.worker_count consumers running.
 *
 * The launcher is the one static background worker; the consumers are
 * dynamic workers it registers, with itself as bgw_notify_pid, so the
 * postmaster wakes it whenever one starts or stops.  It is connected to no
 * database (it only reads the shared catalog pg_database), so it never
 * blocks DROP DATABASE and needs no extension installed.
 *
 * State machine, evaluated at every wake-up (latch, SIGHUP, worker exit,
 * or a timeout):
 *
 *	 NO_DATABASE -- database named by storyboard_worker.database missing:
 *		one LOG line per rabbit_retry_delay, no consumers.
 *	 RUNNING -- for each worker number below worker_count: a consumer is
 *		registered; one that stopped is started again after a back-off
 *		that doubles per quick failure (1 s .. rabbit_retry_delay), so a
 *		crashing consumer comes back without a crash loop.  Consumers
 *		numbered at or above worker_count are asked to stop.  The mailer
 *		(mailer.c) is one more such worker, wanted while
 *		storyboard_worker.email_enable is on.
 *
 * A change of storyboard_worker.database stops every consumer and starts
 * over.  Consumers themselves handle enable_notifications and missing
 * extensions by staying idle.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "storyboard_worker.h"
#include "guc.h"
#include "stats.h"
#include "consumer.h"
#include "launcher.h"

/* A consumer that lived this long is healthy: its back-off starts over. */
#define SBW_HEALTHY_MS		30000
#define SBW_MIN_BACKOFF_MS	1000
/* the longest the launcher sleeps: a missed wake-up costs at most this */
#define SBW_LAUNCHER_TICK_MS	10000

typedef struct SbwConsumer
{
	BackgroundWorkerHandle *handle;
	TimestampTz started_at;
	TimestampTz next_start;		/* not before this */
	int			failures;		/* quick exits in a row */
	bool		stopping;		/* asked to stop; handle kept until it has */
} SbwConsumer;

/* consumers[0 .. SBW_MAX_WORKERS - 1], then the mailer */
#define SBW_MAILER_SLOT		SBW_MAX_WORKERS
static SbwConsumer consumers[SBW_MAX_WORKERS + 1];

/* Should worker i run now (consumer i < worker_count; the mailer: email)? */
static bool
sbw_wanted(int i)
{
	return i == SBW_MAILER_SLOT ? sbw_email_enable : i < sbw_worker_count;
}

/*
 * Register the launcher with the postmaster (from _PG_init).  It starts
 * once recovery is finished: a standby runs no consumers until promoted.
 */
void
sbw_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	strlcpy(worker.bgw_library_name, "storyboard_worker", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "sbw_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "storyboard_worker launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "storyboard_worker launcher", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/*
 * Look the database up in the shared catalog; InvalidOid if missing.  Not
 * connected to any database, we cannot use the catalog's indexes (that
 * needs pg_class): a heap scan of pg_database, as the autovacuum launcher
 * does, is fine for a table this small.
 */
static Oid
sbw_lookup_database(const char *name)
{
	Oid			dboid = InvalidOid;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while (HeapTupleIsValid(tup = heap_getnext(scan, ForwardScanDirection)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (strcmp(NameStr(db->datname), name) == 0 && db->datallowconn)
		{
			dboid = db->oid;
			break;
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	pgstat_report_stat(false);
	return dboid;
}

/* Register consumer number i (or the mailer) in database dboid. */
static bool
sbw_start_consumer(int i, Oid dboid)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;	/* we restart it ourselves */
	strlcpy(worker.bgw_library_name, "storyboard_worker", BGW_MAXLEN);
	if (i == SBW_MAILER_SLOT)
	{
		strlcpy(worker.bgw_function_name, "sbw_mailer_main", BGW_MAXLEN);
		strlcpy(worker.bgw_name, "storyboard_worker mailer", BGW_MAXLEN);
		strlcpy(worker.bgw_type, "storyboard_worker mailer", BGW_MAXLEN);
	}
	else
	{
		strlcpy(worker.bgw_function_name, "sbw_consumer_main", BGW_MAXLEN);
		snprintf(worker.bgw_name, BGW_MAXLEN, "storyboard_worker consumer %d", i);
		strlcpy(worker.bgw_type, "storyboard_worker consumer", BGW_MAXLEN);
	}
	worker.bgw_main_arg = Int32GetDatum(i);
	memcpy(worker.bgw_extra, &dboid, sizeof(Oid));
	worker.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&worker, &consumers[i].handle))
	{
		consumers[i].handle = NULL;
		return false;
	}
	consumers[i].started_at = GetCurrentTimestamp();
	consumers[i].stopping = false;
	return true;
}

/*
 * Ask consumer i to stop.  Its handle is kept until it has stopped: a
 * consumer busy in a plugin may take a while, and no second process with
 * the same worker number (and stats slot) may start meanwhile.
 */
static void
sbw_stop_consumer(int i)
{
	SbwConsumer *c = &consumers[i];

	if (c->handle && !c->stopping)
	{
		ereport(LOG,
				(i == SBW_MAILER_SLOT ?
				 errmsg("storyboard_worker asks the mailer to stop") :
				 errmsg("storyboard_worker asks consumer %d to stop", i)));
		TerminateBackgroundWorker(c->handle);
		c->stopping = true;
	}
	c->failures = 0;
	c->next_start = 0;
}

/* Ask every consumer to stop (database changed). */
static void
sbw_stop_all_consumers(void)
{
	int			i;

	for (i = 0; i <= SBW_MAILER_SLOT; i++)
		sbw_stop_consumer(i);
}

/*
 * Forget consumer i if it has exited.  One that stopped on its own is
 * started again after a back-off that doubles per quick exit; one we asked
 * to stop may be started again at once.  Returns true if it is gone.
 */
static bool
sbw_reap_consumer(int i, TimestampTz now)
{
	SbwConsumer *c = &consumers[i];
	pid_t		pid;
	bool		quick;
	long		backoff;

	if (c->handle == NULL)
		return true;
	if (GetBackgroundWorkerPid(c->handle, &pid) != BGWH_STOPPED)
		return false;
	pfree(c->handle);
	c->handle = NULL;
	if (c->stopping)
	{
		c->stopping = false;
		return true;
	}
	quick = !TimestampDifferenceExceeds(c->started_at, now, SBW_HEALTHY_MS);
	c->failures = quick ? c->failures + 1 : 0;
	backoff = (long) SBW_MIN_BACKOFF_MS << Min(Max(c->failures - 1, 0), 12);
	backoff = Min(backoff, (long) sbw_rabbit_retry_delay * 1000L);
	c->next_start = TimestampTzPlusMilliseconds(now, backoff);
	if (sbw_wanted(i))
		ereport(LOG,
				(i == SBW_MAILER_SLOT ?
				 errmsg("storyboard_worker mailer exited; restarting it in %ld ms", backoff) :
				 errmsg("storyboard_worker consumer %d exited; restarting it in %ld ms",
						i, backoff)));
	return true;
}

/*
 * Bring the consumers in line with worker_count.  Returns the time of the
 * next scheduled (re)start, or 0 if none is pending.
 */
static TimestampTz
sbw_reconcile(Oid dboid, bool *registration_failed)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next = 0;
	int			i;

	*registration_failed = false;
	for (i = 0; i <= SBW_MAILER_SLOT; i++)
	{
		SbwConsumer *c = &consumers[i];

		if (!sbw_reap_consumer(i, now))
		{
			/* still running (or still stopping: wait for its exit) */
			if (!sbw_wanted(i))
				sbw_stop_consumer(i);
			continue;
		}
		if (!sbw_wanted(i))
		{
			c->failures = 0;
			c->next_start = 0;
			continue;
		}
		if (c->next_start > now)
		{
			if (next == 0 || c->next_start < next)
				next = c->next_start;
			continue;
		}
		if (!sbw_start_consumer(i, dboid))
		{
			*registration_failed = true;
			c->next_start = TimestampTzPlusMilliseconds(now, 5000);
			if (next == 0 || c->next_start < next)
				next = c->next_start;
		}
	}
	return next;
}

/* What the launcher knows between turns of its loop. */
typedef struct SbwLauncherState
{
	char	   *current_db;		/* storyboard_worker.database followed */
	Oid			dboid;			/* InvalidOid until it is found */
	TimestampTz next_db_check;	/* when to look it up again */
	bool		warned_slots;	/* said that consumers could not start */
} SbwLauncherState;

static SbwLauncherState ls;

/*
 * storyboard_worker.database changed (or is read for the first time):
 * stop the consumers of the old one and look the new one up.
 */
static void
sbw_follow_database_setting(void)
{
	if (ls.current_db != NULL && strcmp(ls.current_db, sbw_database) == 0)
		return;
	if (ls.current_db != NULL)
	{
		ereport(LOG,
				(errmsg("storyboard_worker.database changed from \"%s\" to \"%s\"; restarting consumers",
						ls.current_db, sbw_database)));
		pfree(ls.current_db);
	}
	sbw_stop_all_consumers();
	ls.current_db = MemoryContextStrdup(TopMemoryContext, sbw_database);
	ls.dboid = InvalidOid;
	ls.next_db_check = 0;
}

/*
 * Look the database up when it is not known and a check is due; a
 * missing one is waited for, said once per retry_delay.
 */
static void
sbw_find_database(TimestampTz now)
{
	if (OidIsValid(ls.dboid) || now < ls.next_db_check)
		return;
	ls.dboid = sbw_lookup_database(ls.current_db);
	if (OidIsValid(ls.dboid))
		return;
	ereport(LOG,
			(errmsg("storyboard_worker is waiting for database \"%s\" to exist",
					ls.current_db),
			 errhint("Create it, or set storyboard_worker.database and reload; checking again in %d s.",
					 sbw_rabbit_retry_delay)));
	ls.next_db_check = TimestampTzPlusMilliseconds(now, sbw_rabbit_retry_delay * 1000L);
}

/*
 * Keep worker_count consumers (and the mailer) running in the database;
 * returns when the next restart is due (0: none).  A registration refused
 * for want of worker slots is said once until it succeeds again.
 */
static TimestampTz
sbw_keep_consumers(void)
{
	bool		registration_failed;
	TimestampTz next = sbw_reconcile(ls.dboid, &registration_failed);

	if (registration_failed && !ls.warned_slots)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("storyboard_worker could not start all %d consumers",
						sbw_worker_count),
				 errhint("Raise max_worker_processes (needs a restart) or lower storyboard_worker.worker_count.")));
		ls.warned_slots = true;
	}
	else if (!registration_failed)
		ls.warned_slots = false;
	return next;
}

/*
 * A consumer that exits because its database vanished tells us to look
 * the database up again before restarting it.
 */
static void
sbw_recheck_database_after_exits(void)
{
	int			i;

	if (!OidIsValid(ls.dboid))
		return;
	for (i = 0; i < sbw_worker_count; i++)
		if (consumers[i].failures > 0 && consumers[i].handle == NULL)
		{
			ls.dboid = InvalidOid;
			ls.next_db_check = 0;
			return;
		}
}

/*
 * Sleep on the latch (consumer exits, reloads and wake_workers() set it)
 * until the next due time, at most SBW_LAUNCHER_TICK_MS, at least 10 ms.
 */
static void
sbw_launcher_sleep(TimestampTz next)
{
	long		timeout_ms = SBW_LAUNCHER_TICK_MS;

	if (next != 0)
		timeout_ms = Max(Min(TimestampDifferenceMilliseconds(GetCurrentTimestamp(), next),
							 timeout_ms), 10);
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 timeout_ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

/* Entry point of the launcher: one turn per wake-up, in named steps. */
void
sbw_launcher_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("storyboard_worker launcher");

	sbw_launcher_attach();
	memset(consumers, 0, sizeof(consumers));
	memset(&ls, 0, sizeof(ls));
	ereport(LOG, (errmsg("storyboard_worker launcher started")));

	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		sbw_follow_database_setting();
		sbw_find_database(GetCurrentTimestamp());
		sbw_launcher_sleep(OidIsValid(ls.dboid) ? sbw_keep_consumers() : ls.next_db_check);
		sbw_recheck_database_after_exits();
	}
}
