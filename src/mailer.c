/*-------------------------------------------------------------------------
 *
 * mailer.c
 *		The mailer background worker: sends storyboard_worker.outbox.
 *
 * Started by the launcher while storyboard_worker.email_enable is on, in
 * the storyboard database.  Each mail is one transaction: claim the oldest
 * due pending row (FOR UPDATE SKIP LOCKED, so a second mailer or an
 * operator's UPDATE never sends it twice), send it (smtp.c), record the
 * outcome, commit.  Delivery is at least once: a crash between the
 * server's 250 and the commit sends that mail again, with the same
 * Message-ID.
 *
 *	sent		the server accepted the data (250);
 *	retry		4xx, no connection, TLS or login failure: attempts + 1,
 *				next_attempt_at 1 s, 2 s, 4 s ... 1 h later; after
 *				email_max_attempts, failed.  A failure that is the
 *				connection's (no reply at all) also pauses the mailer until
 *				then, instead of failing every other mail the same way;
 *	refused		5xx, or an address no server could take: failed, with the
 *				server's reply in last_error (retry_mail() queues it again).
 *
 * Every minute it also queues the digests that are due (send_digests())
 * and prunes sent mail older than outbox_retention.  It sleeps on its
 * latch until the next mail is due; the email plugin sets that latch when
 * a transaction that queued mail commits.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "mailer.h"
#include "plugins.h"
#include "scope.h"
#include "smtp.h"
#include "storyboard_worker.h"
#include "extension.h"
#include "guc.h"
#include "stats.h"


/* How often digests are queued and sent mail pruned, and the longest nap. */
#define SBW_MAILER_TICK_MS		60000
/* Back-off of one mail: 1 s doubling, at most an hour. */
#define SBW_MAILER_MAX_BACKOFF_S	3600

static SbwStmt claim_stmt = SBW_STMT(
	"SELECT o.id, o.recipient, o.subject, o.body_text, o.body_html,"
	"       o.message_id, o.in_reply_to, o.kind, o.attempts"
	"  FROM storyboard_worker.outbox o"
	" WHERE o.status OPERATOR(pg_catalog.=) 'pending'"
	"   AND o.next_attempt_at OPERATOR(pg_catalog.<=) $1"
	" ORDER BY o.next_attempt_at, o.id"
	" LIMIT 1 FOR UPDATE SKIP LOCKED",
	1, TIMESTAMPTZOID);

static SbwStmt sent_stmt = SBW_STMT(
	"UPDATE storyboard_worker.outbox"
	"   SET status = 'sent', sent_at = $2, attempts = attempts OPERATOR(pg_catalog.+) 1,"
	"       last_error = NULL"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	2, INT8OID, TIMESTAMPTZOID);

static SbwStmt unsent_stmt = SBW_STMT(
	"UPDATE storyboard_worker.outbox"
	"   SET status = $2, attempts = $3, next_attempt_at = $4, last_error = $5"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	5, INT8OID, TEXTOID, INT4OID, TIMESTAMPTZOID, TEXTOID);

static SbwStmt next_due_stmt = SBW_STMT(
	"SELECT pg_catalog.min(o.next_attempt_at) FROM storyboard_worker.outbox o"
	" WHERE o.status OPERATOR(pg_catalog.=) 'pending'",
	0, InvalidOid);

static SbwStmt digests_stmt = SBW_STMT(
	"SELECT storyboard_worker.send_digests(false)", 0, InvalidOid);

static SbwStmt prune_stmt = SBW_STMT(
	"DELETE FROM storyboard_worker.outbox o"
	" WHERE o.status OPERATOR(pg_catalog.=) 'sent'"
	"   AND o.sent_at OPERATOR(pg_catalog.<) $1",
	1, TIMESTAMPTZOID);

/* The outcome of one claimed mail, to record. */
typedef struct SbwMailOutcome
{
	SbwSmtpResult result;
	char		error[512];
	int			attempts;		/* after this one */
	TimestampTz next_attempt;
} SbwMailOutcome;

static TimestampTz pause_until = 0;
static TimestampTz next_tick = 0;

/* ---------------------------------------------------------------- status */

/* Say what the mailer does now (mailer_status(), pg_stat_activity). */
static void
sbw_mailer_report(const char *state)
{
	sbw_mailer_set_state(state);
	pgstat_report_activity(STATE_RUNNING, state);
}

/* Count one outcome (stats.c keeps the counts and the last error). */
static void
sbw_mailer_count(SbwMailOutcome *o)
{
	if (o->result == SBW_SMTP_SENT)
		sbw_mailer_note_sent();
	else
		sbw_mailer_note_unsent(o->result == SBW_SMTP_REFUSED ||
							   o->attempts >= sbw_email_max_attempts, o->error);
}

/* Close the SMTP connection at exit. */
static void
sbw_mailer_exit(int code, Datum arg)
{
	sbw_smtp_reset();
}

/* ---------------------------------------------------------------- work */

/*
 * May the mailer work?  What the consumers wait for, the mailer waits for
 * (sbw_extension_not_ready: installed, owned by a superuser, this library's
 * version).  Logs why not, once per change.
 */
static bool
sbw_mailer_ready(void)
{
	static char logged[160];
	const char *why;

	StartTransactionCommand();
	why = sbw_extension_not_ready(get_extension_oid(SBW_EXTENSION_NAME, true));
	if (why != NULL && strcmp(why, logged) != 0)
		ereport(LOG,
				(errmsg("storyboard_worker mailer is idle, waiting for %s", why)));
	strlcpy(logged, why ? why : "", sizeof(logged));
	CommitTransactionCommand();
	return why == NULL;
}

/* A text column of the claimed row, NULL if null. */
static char *
sbw_claimed_text(int col)
{
	return SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col);
}

/* What to do with a mail that was not sent; fills the outcome. */
static void
sbw_mailer_plan_retry(SbwMailOutcome *o, int attempts_before)
{
	int			shift = Min(attempts_before, 12);
	long		delay_s = Min(1L << shift, (long) SBW_MAILER_MAX_BACKOFF_S);

	o->attempts = attempts_before + 1;
	o->next_attempt = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay_s * 1000L);
}

/* Record the outcome of the claimed mail 'id'. */
static void
sbw_mailer_record(int64 id, SbwMailOutcome *o)
{
	Datum		v[5];
	bool		failed;

	v[0] = Int64GetDatum(id);
	if (o->result == SBW_SMTP_SENT)
	{
		v[1] = TimestampTzGetDatum(GetCurrentTimestamp());
		(void) sbw_stmt_execute(&sent_stmt, v, NULL, false, 0, SPI_OK_UPDATE);
		return;
	}
	failed = (o->result == SBW_SMTP_REFUSED || o->attempts >= sbw_email_max_attempts);
	v[1] = CStringGetTextDatum(failed ? "failed" : "pending");
	v[2] = Int32GetDatum(o->attempts);
	v[3] = TimestampTzGetDatum(o->next_attempt);
	v[4] = CStringGetTextDatum(o->error);
	(void) sbw_stmt_execute(&unsent_stmt, v, NULL, false, 0, SPI_OK_UPDATE);
	ereport(failed ? WARNING : LOG,
			(errmsg("storyboard_worker mailer: mail " INT64_FORMAT " %s: %s",
					id, failed ? "failed" : "not sent, will retry", o->error),
			 failed ? errhint("SELECT storyboard_worker.retry_mail(" INT64_FORMAT ") queues it again.", id) : 0));
}

/*
 * Claim, send and record one due mail, in a transaction of its own.
 * Returns false when none was due (or the connection failed: pause).
 */
static bool
sbw_mailer_send_one(void)
{
	Datum		now = TimestampTzGetDatum(GetCurrentTimestamp());
	SbwSmtpMail mail;
	SbwMailOutcome o;
	int64		id = 0;
	bool		isnull;
	bool		claimed;

	memset(&o, 0, sizeof(o));
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	(void) sbw_stmt_execute(&claim_stmt, &now, NULL, false, 1, SPI_OK_SELECT);
	claimed = (SPI_processed == 1);
	if (claimed)
	{
		id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		mail.recipient = sbw_claimed_text(2);
		mail.subject = sbw_claimed_text(3);
		mail.body_text = sbw_claimed_text(4);
		mail.body_html = sbw_claimed_text(5);
		mail.message_id = sbw_claimed_text(6);
		mail.in_reply_to = sbw_claimed_text(7);
		mail.kind = sbw_claimed_text(8);
		sbw_mailer_report("sending");
		/* no snapshot held while the server takes its time (the row lock stays) */
		PopActiveSnapshot();
		o.result = sbw_smtp_send(&mail, o.error, sizeof(o.error));
		PushActiveSnapshot(GetTransactionSnapshot());
		if (o.result != SBW_SMTP_SENT)
			sbw_mailer_plan_retry(&o, DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0],
																  SPI_tuptable->tupdesc, 9, &isnull)));
		sbw_mailer_record(id, &o);
	}
	PopActiveSnapshot();
	SPI_finish();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	if (!claimed)
		return false;
	sbw_mailer_count(&o);
	if (o.result == SBW_SMTP_SESSION_FAILED && o.attempts < sbw_email_max_attempts)
	{
		pause_until = o.next_attempt;
		return false;
	}
	return true;
}

/*
 * The periodic work: queue due digests, prune old sent mail.  Returns the
 * milliseconds until the next pending mail is due (at most a tick).
 */
static long
sbw_mailer_tick(void)
{
	TimestampTz now = GetCurrentTimestamp();
	long		ms = SBW_MAILER_TICK_MS;
	bool		isnull;
	Datum		d;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (now >= next_tick)
	{
		Datum		cutoff = TimestampTzGetDatum(now - (TimestampTz) sbw_outbox_retention * USECS_PER_SEC);

		sbw_mailer_report("digests");
		(void) sbw_stmt_execute(&digests_stmt, NULL, NULL, false, 0, SPI_OK_SELECT);
		(void) sbw_stmt_execute(&prune_stmt, &cutoff, NULL, false, 0, SPI_OK_DELETE);
		next_tick = TimestampTzPlusMilliseconds(now, SBW_MAILER_TICK_MS);
	}
	(void) sbw_stmt_execute(&next_due_stmt, NULL, NULL, true, 1, SPI_OK_SELECT);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull)
		ms = Max(TimestampDifferenceMilliseconds(now, DatumGetTimestampTz(d)), 0);
	PopActiveSnapshot();
	SPI_finish();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	ms = Min(ms, TimestampDifferenceMilliseconds(now, next_tick));
	if (pause_until > now)
		ms = Max(ms, TimestampDifferenceMilliseconds(now, pause_until));
	return ms;
}

/* A reload: new settings apply to the next mail (a new connection). */
static void
sbw_mailer_reload(void)
{
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	sbw_smtp_reset();
	pause_until = 0;
}

/* Entry point of the mailer. */
void
sbw_mailer_main(Datum main_arg)
{
	Oid			dboid;

	memcpy(&dboid, MyBgworkerEntry->bgw_extra, sizeof(Oid));
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	pgstat_report_appname("storyboard_worker mailer");

	sbw_mailer_attach();
	before_shmem_exit(sbw_mailer_exit, (Datum) 0);
	ereport(LOG, (errmsg("storyboard_worker mailer started")));

	for (;;)
	{
		long		sleep_ms = 10000;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
			sbw_mailer_reload();
		if (!sbw_email_enable)
			proc_exit(0);		/* the launcher starts us again when on */
		if (!RecoveryInProgress() && sbw_mailer_ready())
		{
			TimestampTz now = GetCurrentTimestamp();

			bool		drained = false;

			/* send what is due; the periodic work and a reload do not wait for the end */
			if (pause_until <= now)
				while (!(drained = !sbw_mailer_send_one()))
				{
					CHECK_FOR_INTERRUPTS();
					if (ConfigReloadPending || GetCurrentTimestamp() >= next_tick)
						break;
				}
			sleep_ms = sbw_mailer_tick();

			/*
			 * Due mail left after the queue was drained is locked by someone
			 * else (SKIP LOCKED passed it over): look again in a second, not
			 * at once.
			 */
			if (drained && sleep_ms == 0 && pause_until <= now)
				sleep_ms = 1000;
		}
		sbw_mailer_report("idle");
		pgstat_report_activity(STATE_IDLE, NULL);
		if (sleep_ms > 0)
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 sleep_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
