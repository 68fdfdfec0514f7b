/*-------------------------------------------------------------------------
 *
 * consumer.c
 *		One consumer: wait, drain, dispatch, commit, acknowledge, back off.
 *
 * The loop waits on its latch and the broker's socket together (one wait
 * event set per connection), so SIGTERM, reloads and ProcSignalBarriers
 * (DROP DATABASE elsewhere) are served at once, and never blocks inside
 * librabbitmq: every library call is non-blocking or bounded.
 *
 * States (shown in storyboard_worker.stats):
 *	 idle		 enable_notifications is off, the extension is not installed,
 *				 or the server is in recovery: no broker connection;
 *	 connecting	 connecting, logging in, declaring, consuming;
 *	 consuming	 connected; deliveries are processed as they come;
 *	 backing off after a failure, waiting before the next attempt
 *				 (1 s doubling up to rabbit_retry_delay; forever).
 *
 * The path of a first delivery: up to batch_size deliveries that are
 * already here are taken, each is dispatched (plugins in subtransactions)
 * in one transaction, the transaction commits without waiting for the WAL
 * flush, and they are acknowledged once the WAL holding the commit record
 * is flushed (acks.c): by the WAL writer, or by this consumer itself when
 * the queue runs dry or half its prefetch window waits for
 * acknowledgement.  A batch that cannot commit is run again
 * one event per transaction, so that one bad event holds back no other; a
 * single event that cannot commit is requeued (basic.nack), the connection
 * is dropped and the consumer backs off.
 *
 * A redelivered message may be a poison one: it crashed a consumer, or its
 * transaction could not commit.  It is processed alone, under a lock that
 * lets one redelivered message at a time run in the whole database (so
 * that a crash is charged to the message that caused it, not to the ones
 * that happened to be in flight next to it), after a count of its attempts
 * has been committed and flushed (ledger.c).  Once that count reaches
 * storyboard_worker.max_redeliveries the message is dead-lettered without
 * running any plugin, and acknowledged.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lock.h"
#include "utils/acl.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"
#include "utils/wait_event.h"

#include "compat.h"
#include "acks.h"
#include "amqp_link.h"
#include "broker.h"
#include "dispatch.h"
#include "ledger.h"
#include "plugins.h"
#include "queue_depth.h"
#include "storyboard_worker.h"
#include "guc.h"
#include "stats.h"
#include "consumer.h"
#include "extension.h"
#include "util.h"

/* How often an idle or waiting consumer re-checks its preconditions. */
#define SBW_IDLE_CHECK_MS	5000
#define SBW_MIN_BACKOFF_MS	1000
/* Deliveries handled before the loop checks interrupts again. */
#define SBW_DRAIN_LIMIT		500
/* How often consumer 0 prunes the ledger, backlog or not. */
#define SBW_PRUNE_EVERY_MS	60000
/*
 * Longest a close waits for the broker to answer connection.close: SIGTERM
 * is served only after it, so a silent broker must not hold a shutdown.
 */
#define SBW_CLOSE_MS		1000
/* How long a disabled consumer sleeps: a reload wakes it anyway. */
#define SBW_DISABLED_SLEEP_MS	60000
/* The same error again within this is logged at DEBUG1 only. */
#define SBW_REPEAT_QUIET_MS	60000
/* Limit of the TCP connect (with TLS handshake), the login and each RPC. */
#define SBW_CONNECT_MS		10000

typedef struct SbwConsumerState
{
	int			worker_id;
	SbwAmqpLink *link;
	int			host_index;		/* next host of the rabbit_host list */
	TimestampTz backoff_until;
	int			failures;		/* consecutive connection failures */
	int			txn_failures;	/* consecutive transactions that failed */
	bool		logged_waiting;
	const char *waiting_for;	/* why we are idle, for the log */
	MemoryContext loop_cxt;		/* reset after every wake-up */
	MemoryContext batch_cxt;	/* reset after every batch */
	TimestampTz next_check;		/* next look at the preconditions */
	TimestampTz next_prune;		/* consumer 0: next ledger prune */
	bool		ready;			/* preconditions met at the last look */
	LOCKTAG		redelivery_tag; /* the lock redelivered messages run under */
	bool		redelivery_locked;
	SbwLedgerTables tables;		/* as seen by our last transaction */
	XLogRecPtr	commit_lsn;		/* end of our last commit record */
	WaitEventSet *wait_set;		/* latch, postmaster death, broker socket */
	pgsocket	wait_socket;	/* the socket wait_set watches */
} SbwConsumerState;

static SbwConsumerState cs;

static void sbw_unlock_redeliveries(void);
static bool sbw_counting_redeliveries(void);

/*
 * Log a failure and show it in the stats view.  A broker that stays down
 * would otherwise fill the log: the same message again within a minute is
 * logged at DEBUG1 only.
 */
static void
sbw_note_error(int elevel, const char *msg)
{
	static char last_msg[256] = "";
	static TimestampTz last_at = 0;
	TimestampTz now = GetCurrentTimestamp();

	if (strncmp(last_msg, msg, sizeof(last_msg) - 1) == 0 &&
		!TimestampDifferenceExceeds(last_at, now, SBW_REPEAT_QUIET_MS))
		elevel = Min(elevel, DEBUG1);
	else
	{
		sbw_strlcpy_mb(last_msg, msg, sizeof(last_msg));
		last_at = now;
	}
	ereport(elevel, (errmsg("storyboard_worker consumer %d: %s", cs.worker_id, msg)));
	sbw_slot_error(msg);
}

/*
 * Acknowledge what is durable (acks.c), flushing the WAL up to the newest
 * commit first as 'how' says, so that everything committed goes.  A
 * connection lost with acknowledgements pending means those messages come
 * back redelivered, and the ledger recognises them.
 */
static bool
sbw_send_acks(SbwAckFlush how)
{
	char	   *err = NULL;

	if (cs.link == NULL || sbw_acks_pending() == 0)
		return true;
	if (sbw_acks_send(cs.link, how, &err))
		return true;
	sbw_note_error(LOG, psprintf("acknowledgement lost after commit: %s", err));
	return false;
}

/* Forget the wait set before the socket it watches closes. */
static void
sbw_wait_set_free(void)
{
	if (cs.wait_set)
		FreeWaitEventSet(cs.wait_set);
	cs.wait_set = NULL;
}

/*
 * The wait set of a connected consumer, built once per connection: each
 * WaitLatchOrSocket call builds an epoll set and closes it again, system
 * calls that a consumer woken for every message would pay every time.
 */
static WaitEventSet *
sbw_wait_set(pgsocket sock)
{
	if (cs.wait_set && cs.wait_socket != sock)
		sbw_wait_set_free();
	if (cs.wait_set == NULL)
	{
		cs.wait_set = sbw_create_wait_event_set(TopMemoryContext, 3);
		AddWaitEventToSet(cs.wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
		AddWaitEventToSet(cs.wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
		AddWaitEventToSet(cs.wait_set, WL_SOCKET_READABLE, sock, NULL, NULL);
		cs.wait_socket = sock;
	}
	return cs.wait_set;
}

/*
 * Close the broker connection (if any) after acknowledging what was
 * committed, within SBW_CLOSE_MS: a silent broker cannot hold up a
 * shutdown.  The queue depth it measured is no longer current.
 */
static void
sbw_close_link(void)
{
	sbw_wait_set_free();
	sbw_queue_depth_forget(cs.worker_id);
	if (cs.link)
	{
		(void) sbw_send_acks(SBW_ACK_FLUSH);
		sbw_amqp_close(cs.link, SBW_CLOSE_MS);
		cs.link = NULL;
	}
}

/* Drop the broker connection; what was not acknowledged is redelivered. */
static void
sbw_disconnect(void)
{
	sbw_close_link();
	sbw_acks_forget();
}

/* At exit: close the connection, and let go of the redelivery lock. */
static void
sbw_consumer_exit(int code, Datum arg)
{
	sbw_close_link();
	sbw_unlock_redeliveries();
}

/*
 * Schedule the next connection attempt: 1 s, 2 s, 4 s ... retry_delay,
 * growing with failed connections and with failed transactions in a row (a
 * reconnection that works does not end a database outage).
 */
static void
sbw_backoff(void)
{
	long		ms = (long) SBW_MIN_BACKOFF_MS << Min(Max(cs.failures, cs.txn_failures), 12);

	ms = Min(ms, (long) sbw_rabbit_retry_delay * 1000L);
	cs.failures++;
	cs.backoff_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);
	sbw_slot_set_state(SBW_STATE_BACKING_OFF, NULL);
}

/*
 * May we consume?  Not in recovery (a standby keeps its consumers idle
 * until promotion) and only where the extension is installed.  A short
 * read-only transaction; run on idle wake-ups, not per event (per event,
 * the plugin cache notices a dropped extension through invalidations).
 */
static bool
sbw_ready_to_consume(void)
{
	const char *why;
	bool		ready;

	if (RecoveryInProgress())
	{
		cs.waiting_for = "the end of recovery";
		return false;
	}
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	cs.tables = sbw_ledger_tables();
	why = sbw_extension_not_ready(cs.tables.extension);
	ready = (why == NULL);
	if (!ready)
		cs.waiting_for = why;
	CommitTransactionCommand();
	pgstat_report_stat(false);
	return ready;
}

/* Pick the next host of the comma-separated rabbit_host list. */
static char *
sbw_next_host(void)
{
	List	   *hosts = NIL;
	char	   *raw = pstrdup(sbw_broker.host);
	char	   *host;

	if (!SplitGUCList(raw, ',', &hosts) || hosts == NIL)
		return pstrdup(sbw_broker.host);
	host = pstrdup((char *) list_nth(hosts, cs.host_index % list_length(hosts)));
	cs.host_index++;
	return host;
}

/* Connect, with the current settings, to the next host. */
static void
sbw_connect(void)
{
	char	   *err = NULL;
	MemoryContext oldcxt = MemoryContextSwitchTo(cs.loop_cxt);

	sbw_slot_set_state(SBW_STATE_CONNECTING, NULL);
	pgstat_report_activity(STATE_RUNNING, "connecting to RabbitMQ");
	cs.link = sbw_amqp_connect(&sbw_broker, sbw_next_host(), SBW_CONNECT_MS, &err);
	pgstat_report_activity(STATE_IDLE, NULL);
	if (cs.link == NULL)
	{
		sbw_note_error(LOG, err);
		sbw_backoff();
	}
	else
	{
		ereport(LOG,
				(errmsg("storyboard_worker consumer %d connected to %s, consuming queue \"%s\"",
						cs.worker_id, sbw_amqp_peer(cs.link), sbw_broker.queue)));
		cs.failures = 0;
		sbw_slot_set_state(SBW_STATE_CONSUMING, sbw_amqp_peer(cs.link));
	}
	MemoryContextSwitchTo(oldcxt);
}

/*
 * Error recovery inside a PG_CATCH of the consumer's own transactions: keep
 * the process alive, roll the transaction back, and log "<what>: <error>"
 * (also shown in the stats view); returns the error's message.  'what'
 * must not live in ErrorContext: build it before the PG_TRY.
 */
static char *
sbw_recover(MemoryContext oldcxt, const char *what, int *sqlerrcode)
{
	ErrorData  *edata;
	char	   *message;

	MemoryContextSwitchTo(oldcxt);
	edata = CopyErrorData();
	FlushErrorState();
	AbortCurrentTransaction();
	MemoryContextSwitchTo(oldcxt);
	sbw_note_error(LOG, psprintf("%s: %s", what, edata->message));
	message = pstrdup(edata->message);
	if (sqlerrcode)
		*sqlerrcode = edata->sqlerrcode;
	FreeErrorData(edata);
	return message;
}

/*
 * Start one of the consumer's own transactions, with a snapshot and SPI.
 */
static void
sbw_begin(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

/*
 * Commit, and flush the WAL up to the commit record before going on: for
 * the redelivery count, which must survive the crash it is there to count,
 * and the notes kept with it.  synchronous_commit = local: whatever the
 * session says, flushed here (not off), and never waiting for a
 * synchronous standby, which this bookkeeping does not need (no delivery
 * is acknowledged on it) and which would hold the consumer inside COMMIT
 * while the standby is away.
 */
static void
sbw_commit_durably(void)
{
	SPI_finish();
	PopActiveSnapshot();
	(void) set_config_option("synchronous_commit", "local", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	CommitTransactionCommand();
	XLogFlush(XactLastCommitEnd);	/* a transaction without an xid */
}

/*
 * Commit an event's transaction without waiting for the WAL flush, and
 * return the end of its commit record: its deliveries are acknowledged only
 * once the WAL is flushed that far (acks.c), whatever synchronous_commit
 * the database, a role or a plugin set (a plugin's settings end with its
 * call; this SET LOCAL is outside all of them and ends with the commit).
 *
 * A transaction that wrote nothing (a redelivered message found in the
 * ledger) would write no commit record, and XactLastCommitEnd would still
 * be our previous commit's: but the effects it acknowledges are another
 * transaction's, committed before we saw them, perhaps by another consumer
 * and not yet flushed.  Taking a transaction id makes it write a commit
 * record, after theirs, so that durable up to ours means durable up to
 * theirs.
 */
static XLogRecPtr
sbw_commit_async(void)
{
	SPI_finish();
	PopActiveSnapshot();
	(void) GetTopTransactionId();
	(void) set_config_option("synchronous_commit", "off", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	CommitTransactionCommand();
	return XactLastCommitEnd;
}

/* After one of our transactions, committed or not. */
static void
sbw_after_transaction(MemoryContext oldcxt)
{
	MemoryContextSwitchTo(oldcxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* The message a delivery carries, with metadata made storable text. */
static void
sbw_message_of(const SbwDelivery *dv, SbwMessage *msg)
{
	memset(msg, 0, sizeof(*msg));
	msg->routing_key = sbw_storable_text(dv->routing_key, strlen(dv->routing_key));
	if (dv->message_id)
	{
		msg->message_id = sbw_storable_text(dv->message_id, dv->message_id_len);
		msg->message_id_raw = dv->message_id;
		msg->message_id_len = dv->message_id_len;
	}
	msg->redelivered = dv->redelivered;
	msg->body = dv->body;
	msg->body_len = dv->body_len;
	msg->body_declared_len = dv->body_declared_len;
}

/* What one transaction did, for the stats view. */
typedef struct SbwTally
{
	uint64		processed;
	uint64		dead;
	uint64		redelivered;
	uint64		duplicates;
} SbwTally;

/*
 * How to run a message: normally (NULL), or as a counted redelivery, which
 * loses its count when it is applied, or is given up on (give_up > 0:
 * dead-lettered unrun after that many failures, the last one last_error).
 */
typedef struct SbwVerdict
{
	bool		counted;
	int			give_up;
	const char *last_error;
} SbwVerdict;

/*
 * Apply one message inside the open transaction: claim it in the ledger,
 * then dispatch it to the plugins, or dead-letter it unrun (see
 * SbwVerdict).
 */
static void
sbw_apply(SbwDelivery *dv, SbwLedgerTables tables, const SbwVerdict *v,
		  SbwTally *t)
{
	SbwMessage	msg;
	SbwDispatch d;
	pg_uuid_t  *key = NULL;
	bool		counted = v && v->counted;

	sbw_message_of(dv, &msg);
	if (msg.redelivered)
		t->redelivered++;
	if (tables.ledger)
	{
		key = sbw_ledger_key(&msg);
		/* applied before the ack was lost?  then only acknowledge it */
		if (!sbw_ledger_claim(key) && msg.redelivered)
		{
			t->duplicates++;
			if (counted)
				sbw_ledger_forget_attempts(key);
			return;
		}
	}

	memset(&d, 0, sizeof(d));
	d.keep_failures = true;
	d.keep_undecodable = true;
	d.resultcxt = CurrentMemoryContext;
	if (v && v->give_up > 0)
		sbw_dispatch_give_up(&d, &msg, v->give_up, v->last_error);
	else
		sbw_dispatch(&d, &msg);
	if (counted && key)
		sbw_ledger_forget_attempts(key);
	t->processed++;
	t->dead += d.ndead_lettered;
}

/* Why a transaction failed: its error, and whose fault that was. */
typedef struct SbwFailure
{
	char	   *error;			/* NULL: it committed */
	int			sqlerrcode;
} SbwFailure;

/*
 * Was a failure the database's rather than the message's?  A privilege or
 * object that is missing, a read-only or recovering database, no disk, an
 * administrator's cancel or shutdown, a serialization failure: the same
 * message would succeed once that is over, and it must not be counted
 * towards max_redeliveries (an outage would otherwise dead-letter the whole
 * queue).  Anything else (an error at COMMIT from the plugins' work, out of
 * memory, an internal error) may be the message's.
 */
static bool
sbw_failure_is_environmental(int sqlerrcode)
{
	switch (ERRCODE_TO_CATEGORY(sqlerrcode))
	{
		case ERRCODE_CONNECTION_EXCEPTION:
		case ERRCODE_INVALID_TRANSACTION_STATE:
		case ERRCODE_INVALID_CATALOG_NAME:
		case ERRCODE_TRANSACTION_ROLLBACK:
		case ERRCODE_SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION:
		case ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE:
		case ERRCODE_OPERATOR_INTERVENTION:
		case ERRCODE_SYSTEM_ERROR:
			return true;
		case ERRCODE_INSUFFICIENT_RESOURCES:
			return sqlerrcode != ERRCODE_OUT_OF_MEMORY;
		default:
			return false;
	}
}

/*
 * While first deliveries run, hold the redelivery lock in share mode (for
 * the transaction): a redelivered message then runs with no other message
 * in flight anywhere, and a crash while it runs is its own.
 */
static void
sbw_share_redelivery_lock(SbwLedgerTables tables)
{
	LOCKTAG		tag;

	if (!OidIsValid(tables.extension) || !sbw_counting_redeliveries())
		return;
	SET_LOCKTAG_OBJECT(tag, MyDatabaseId, ExtensionRelationId, tables.extension, 1);
	(void) LockAcquire(&tag, ShareLock, false, false);
}

/*
 * Run deliveries in one transaction; cs.commit_lsn is where its commit
 * record ends.  Returns false if it could not commit (everything is rolled
 * back and logged; *failure, if given, says why).
 */
static bool
sbw_run_transaction(SbwDelivery *dvs, int n, const SbwVerdict *v, SbwFailure *failure)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	char	   *what = psprintf("transaction of %d message(s) failed", n);
	SbwFailure	f = {NULL, 0};
	SbwTally	t = {0, 0, 0, 0};

	PG_TRY();
	{
		SbwLedgerTables tables;
		int			i;

		sbw_begin("storyboard_worker: dispatching events");
		tables = cs.tables = sbw_ledger_tables();
		if (v == NULL)
			sbw_share_redelivery_lock(tables);
		for (i = 0; i < n; i++)
			sbw_apply(&dvs[i], tables, v, &t);
		cs.commit_lsn = sbw_commit_async();
	}
	PG_CATCH();
	{
		f.error = sbw_recover(oldcxt, what, &f.sqlerrcode);
	}
	PG_END_TRY();
	sbw_after_transaction(oldcxt);
	if (failure)
		*failure = f;
	if (f.error != NULL)
	{
		cs.txn_failures++;
		return false;
	}
	cs.txn_failures = 0;
	sbw_slot_count(0, t.processed, t.dead, t.redelivered, t.duplicates);
	return true;
}

/*
 * Remember, in its own short transaction, why a message's transaction
 * failed: the dead letter it may become says so.  A failure that was the
 * database's takes back the attempt it cost, if it was counted; for a first
 * delivery it is not noted at all.  A failure here is only logged.
 */
static void
sbw_note_failure(SbwDelivery *dv, const SbwFailure *f, bool counted)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile bool environmental;

	if (!sbw_counting_redeliveries() || f->error == NULL)
		return;
	environmental = sbw_failure_is_environmental(f->sqlerrcode);
	if (environmental && !counted)
		return;
	PG_TRY();
	{
		SbwMessage	msg;

		sbw_begin("storyboard_worker: noting a failure");
		sbw_message_of(dv, &msg);
		sbw_ledger_note_failure(sbw_ledger_key(&msg), f->error, environmental);
		sbw_commit_durably();
	}
	PG_CATCH();
	{
		(void) sbw_recover(oldcxt, "could not note why a message failed", NULL);
	}
	PG_END_TRY();
	sbw_after_transaction(oldcxt);
}

/*
 * Deliveries up to 'tag' just committed (cs.commit_lsn): acknowledge them
 * once durable (acks.c).  Whatever is durable already goes now; a prefetch
 * window half full of committed deliveries forces a flush, so that the
 * broker keeps sending.  Returns false if the connection is lost.
 */
static bool
sbw_committed(uint64 tag, int n)
{
	sbw_acks_committed(tag, n, cs.commit_lsn);
	return sbw_send_acks(sbw_acks_pending() >= Max(sbw_broker.prefetch / 2, 1) ?
						 SBW_ACK_FLUSH : SBW_ACK_DURABLE);
}

/*
 * Give a delivery that could not commit back to the broker, alone
 * (multiple=false: earlier deliveries wait for their own acknowledgement):
 * it comes back redelivered, and counted (sbw_process_redelivered).
 */
static void
sbw_requeue(uint64 tag)
{
	char	   *err = NULL;

	if (!sbw_amqp_nack(cs.link, tag, false, true, &err))
		sbw_note_error(LOG, err);
}

/*
 * Dispatch a batch of first deliveries in one transaction and acknowledge
 * them after COMMIT.  A batch that cannot commit runs again one event per
 * transaction: only the events that fail alone are requeued (to come back
 * redelivered, and counted).  Returns false if nothing could commit (the
 * caller drops the connection and backs off), or if the connection was
 * lost.
 */
static bool
sbw_process_batch(SbwDelivery *batch, int n)
{
	int			committed = 0;
	SbwFailure	f;
	int			i;

	if (sbw_run_transaction(batch, n, NULL, &f))
		return sbw_committed(batch[n - 1].delivery_tag, n);
	if (n == 1)
	{
		sbw_note_failure(&batch[0], &f, false);
		sbw_requeue(batch[0].delivery_tag);
		return false;
	}
	ereport(LOG,
			(errmsg("storyboard_worker consumer %d: running the %d events of a failed batch one at a time",
					cs.worker_id, n)));
	for (i = 0; i < n; i++)
	{
		if (sbw_run_transaction(&batch[i], 1, NULL, &f))
		{
			if (!sbw_committed(batch[i].delivery_tag, 1))
				return false;
			committed++;
			continue;
		}
		sbw_note_failure(&batch[i], &f, false);
		sbw_requeue(batch[i].delivery_tag);
	}
	/* nothing could commit: the database's fault, not a message's */
	return committed > 0;
}

/*
 * Take the lock under which redelivered messages run, one at a time in the
 * database: a session lock on our extension's pg_extension row (sub-object
 * 1, visible in pg_locks), held across the count and the event's
 * transaction.  Needs a transaction.
 */
static void
sbw_lock_redeliveries(void)
{
	Oid			extoid = get_extension_oid(SBW_EXTENSION_NAME, false);

	SET_LOCKTAG_OBJECT(cs.redelivery_tag, MyDatabaseId, ExtensionRelationId,
					   extoid, 1);
	(void) LockAcquire(&cs.redelivery_tag, ExclusiveLock, true, false);
	cs.redelivery_locked = true;
}

/*
 * Let go of that lock.  A transaction that aborted has already released it
 * (an abort releases session locks too).
 */
static void
sbw_unlock_redeliveries(void)
{
	if (cs.redelivery_locked && sbw_lock_held(&cs.redelivery_tag, ExclusiveLock))
		LockRelease(&cs.redelivery_tag, ExclusiveLock, true);
	cs.redelivery_locked = false;
}

/*
 * The first step of a redelivered message, in a transaction of its own
 * that is committed and flushed before any plugin runs: take the lock, and
 * unless the ledger shows it applied already (*duplicate), count this
 * attempt.  Returns the count (0: not counted), or -1 on failure;
 * *last_error is why the previous attempt failed, if it was recorded.
 */
static int
sbw_count_redelivery(SbwDelivery *dv, bool *duplicate, char **last_error)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	char	   *what = psprintf("counting redelivery %llu failed",
								(unsigned long long) dv->delivery_tag);
	volatile int attempts = 0;

	*duplicate = false;
	PG_TRY();
	{
		SbwMessage	msg;
		pg_uuid_t  *key;

		sbw_begin("storyboard_worker: counting a redelivery");
		sbw_lock_redeliveries();
		sbw_message_of(dv, &msg);
		key = sbw_ledger_key(&msg);
		if (sbw_ledger_contains(key))
			*duplicate = true;
		else
		{
			char	   *e;

			attempts = sbw_ledger_count_attempt(key, &e);
			if (e)
				*last_error = MemoryContextStrdup(oldcxt, e);
		}
		sbw_commit_durably();
	}
	PG_CATCH();
	{
		(void) sbw_recover(oldcxt, what, NULL);
		attempts = -1;
	}
	PG_END_TRY();
	sbw_after_transaction(oldcxt);
	return attempts;
}

/*
 * A redelivered message: count it, then apply it alone, or dead-letter it
 * unrun once it has failed max_redeliveries times.  The first delivery is
 * taken to have failed too (it was redelivered), so the count of failures
 * before this attempt is attempts - 1 + 1.  Returns false if the
 * connection must be dropped.
 */
static bool
sbw_process_redelivered(SbwDelivery *dv)
{
	bool		duplicate;
	char	   *last_error = NULL;
	SbwFailure	f;
	int			attempts;
	bool		ok;

	attempts = sbw_count_redelivery(dv, &duplicate, &last_error);
	if (attempts < 0)
	{
		sbw_unlock_redeliveries();
		sbw_requeue(dv->delivery_tag);
		return false;
	}
	if (duplicate)
		ok = sbw_run_transaction(dv, 1, NULL, NULL);	/* the ledger skips it */
	else
	{
		SbwVerdict	v = {true, attempts >= sbw_max_redeliveries ? attempts : 0, last_error};

		ok = sbw_run_transaction(dv, 1, &v, &f);
		if (!ok)
			sbw_note_failure(dv, &f, true);
	}
	sbw_unlock_redeliveries();
	if (!ok)
	{
		sbw_requeue(dv->delivery_tag);
		return false;
	}
	return sbw_committed(dv->delivery_tag, 1);
}

/*
 * Are redeliveries counted here?  max_redeliveries is on and the tables
 * exist (as our last transaction saw them: no catalog access per wake-up).
 */
static bool
sbw_counting_redeliveries(void)
{
	return sbw_max_redeliveries > 0 && cs.tables.ledger && cs.tables.redeliveries;
}

/*
 * Handle what one read step gathered: the first deliveries as a batch, or
 * one redelivered message alone.  Returns false if the connection must be
 * dropped.
 */
static bool
sbw_handle(SbwDelivery *batch, int n, bool redelivered_alone)
{
	if (n == 0)
		return true;
	sbw_slot_count(n, 0, 0, 0, 0);
	if (redelivered_alone)
		return sbw_process_redelivered(&batch[0]);
	return sbw_process_batch(batch, n);
}

/*
 * Read what is already here into batch: up to 'max' first deliveries, or
 * one redelivered message on its own (*alone; a redelivered one that comes
 * after first deliveries is kept for the next step in *held).  Returns the
 * number read; *closed when the connection is lost (*err says why).
 */
static int
sbw_read_step(SbwDelivery *batch, int max, bool counting, SbwDelivery *held,
			  bool *has_held, bool *alone, bool *closed, char **err)
{
	int			n = 0;

	*alone = false;
	*closed = false;
	if (*has_held)
	{
		batch[0] = *held;
		*has_held = false;
		*alone = true;
		return 1;
	}
	while (n < max)
	{
		SbwAmqpResult r = sbw_amqp_next(cs.link, &batch[n],
										(size_t) sbw_max_message_bytes, err);

		if (r != SBW_AMQP_DELIVERY)
		{
			*closed = (r == SBW_AMQP_CLOSED);
			break;
		}
		if (counting && batch[n].redelivered)
		{
			if (n == 0)
			{
				*alone = true;
				return 1;
			}
			*held = batch[n];
			*has_held = true;
			break;
		}
		n++;
	}
	return n;
}

/*
 * Take every delivery that is already here, without waiting: first
 * deliveries in batches, redelivered ones alone.  Returns the number
 * handled, or -1 if the connection must be dropped.
 */
static int
sbw_drain(void)
{
	SbwDelivery *batch;
	SbwDelivery held;
	bool		has_held = false;
	int			total = 0;
	int			batch_size = Max(sbw_batch_size, 1);
	bool		counting = sbw_counting_redeliveries();

	batch = MemoryContextAlloc(cs.loop_cxt, sizeof(SbwDelivery) * batch_size);
	while (total < SBW_DRAIN_LIMIT || has_held)
	{
		bool		closed;
		bool		alone;
		char	   *err = NULL;
		MemoryContext oldcxt = MemoryContextSwitchTo(cs.batch_cxt);
		int			n = sbw_read_step(batch, batch_size, counting, &held,
									  &has_held, &alone, &closed, &err);

		MemoryContextSwitchTo(oldcxt);
		if (!sbw_handle(batch, n, alone))
			closed = true;
		total += n;
		/* err lives in batch_cxt, like the deliveries: report it first */
		if (closed && err)
			sbw_note_error(LOG, err);
		if (!has_held)
			MemoryContextReset(cs.batch_cxt);
		if (closed)
			return -1;
		if (n < batch_size && !alone && !has_held)
		{
			/*
			 * The queue has run dry: rather than wait for the WAL writer,
			 * flush up to our newest commit (one flush for every commit
			 * since the last) and acknowledge everything, or, if another
			 * consumer has just flushed, wait for the next turn
			 * (sbw_connected_timeout).
			 */
			if (!sbw_send_acks(SBW_ACK_GROUP))
				return -1;
			break;
		}
		CHECK_FOR_INTERRUPTS();
	}
	return total;
}

/*
 * Forget ledger rows older than ledger_retention (and dead letters older
 * than dead_letter_retention, when set).  Done by consumer 0
 * only, once a minute whether the queue is dry or not, in its own short
 * transaction; a failure is logged and tried again later, never fatal.
 */
static void
sbw_prune_ledger(void)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	TimestampTz cutoff = GetCurrentTimestamp() -
		(TimestampTz) sbw_ledger_retention * USECS_PER_SEC;

	PG_TRY();
	{
		uint64		n;

		sbw_begin("storyboard_worker: pruning the ledger");
		n = sbw_ledger_prune(cutoff);
		if (sbw_dead_letter_retention > 0)
			(void) sbw_dead_letters_prune(GetCurrentTimestamp() -
										  (TimestampTz) sbw_dead_letter_retention * USECS_PER_SEC);
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
		if (n > 0)
			ereport(DEBUG1,
					(errmsg("storyboard_worker pruned %llu ledger rows",
							(unsigned long long) n)));
	}
	PG_CATCH();
	{
		(void) sbw_recover(oldcxt, "could not prune the ledger", NULL);
	}
	PG_END_TRY();
	sbw_after_transaction(oldcxt);
}

/* Consumer 0's periodic work, due or not: the ledger prune. */
static void
sbw_maintain(TimestampTz now)
{
	if (cs.worker_id != 0 || now < cs.next_prune)
		return;
	sbw_prune_ledger();
	cs.next_prune = TimestampTzPlusMilliseconds(now, SBW_PRUNE_EVERY_MS);
}

/*
 * Measure the queue's depth for the stats view when it is this consumer's
 * turn (queue_depth.c).  Returns false when the connection was lost
 * meanwhile; true otherwise, with *measured when it waited for the broker.
 */
static bool
sbw_measure_queue(TimestampTz now, bool *measured)
{
	char	   *err = NULL;

	*measured = sbw_queue_depth_due(cs.worker_id, now);
	if (!*measured || sbw_queue_depth_refresh(cs.link, &err))
		return true;
	sbw_note_error(LOG, err);
	return false;
}

/*
 * A reload: read the settings, and reconnect only if the broker settings
 * changed (a reconnection hands the prefetched, unacknowledged deliveries
 * back to the queue, to come again flagged redelivered).
 */
static void
sbw_reload(void)
{
	SbwBrokerSettings *before = sbw_broker_copy(&sbw_broker);

	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	if (!sbw_broker_equal(before, &sbw_broker))
	{
		if (cs.link)
		{
			ereport(LOG,
					(errmsg("storyboard_worker consumer %d: broker settings changed, reconnecting",
							cs.worker_id)));
			sbw_disconnect();
		}
		cs.failures = 0;
		cs.backoff_until = 0;
	}
	cs.next_check = 0;
}

/*
 * May we consume, as far as the database is concerned?  Looked at again
 * every SBW_IDLE_CHECK_MS (or at once after a wake-up or a failure); a
 * consumer that may not consume is disconnected and idle, and says why
 * once.
 */
static bool
sbw_check_ready(TimestampTz now)
{
	if (now < cs.next_check)
		return cs.ready;
	cs.ready = sbw_ready_to_consume();
	cs.next_check = TimestampTzPlusMilliseconds(now, SBW_IDLE_CHECK_MS);
	if (!cs.ready && !cs.logged_waiting)
	{
		ereport(LOG,
				(errmsg("storyboard_worker consumer %d is idle, waiting for %s",
						cs.worker_id, cs.waiting_for)));
		cs.logged_waiting = true;
	}
	else if (cs.ready)
		cs.logged_waiting = false;
	return cs.ready;
}

/* Not consuming: no connection, state idle. */
static void
sbw_go_idle(void)
{
	sbw_disconnect();
	sbw_slot_set_state(SBW_STATE_IDLE, NULL);
}

/*
 * How long the connected consumer may sleep: at most half a heartbeat
 * interval, so that our heartbeats go out and a silent broker is noticed
 * within two intervals, and only until the next flush turn when
 * acknowledgements still wait (acks.c).
 */
static long
sbw_connected_timeout(void)
{
	long		timeout_ms = sbw_amqp_heartbeat(cs.link) > 0 ?
		sbw_amqp_heartbeat(cs.link) * 1000L / 2 : SBW_IDLE_CHECK_MS;

	timeout_ms = Min(timeout_ms, SBW_IDLE_CHECK_MS);
	if (sbw_acks_pending() > 0)
		timeout_ms = Min(timeout_ms, sbw_acks_wait_ms());
	return timeout_ms;
}

/* A connection that failed: drop it, back off, look at the database first. */
static void
sbw_connection_lost(void)
{
	sbw_disconnect();
	sbw_backoff();
	cs.next_check = 0;			/* the extension may be gone */
}

/*
 * One step of the consumer: returns how long to sleep afterwards (0: go
 * round again at once).
 */
static long
sbw_step(void)
{
	TimestampTz now = GetCurrentTimestamp();
	int			n;
	bool		measured;

	if (!sbw_enable_notifications)
	{
		sbw_go_idle();
		return SBW_DISABLED_SLEEP_MS;
	}
	if (!sbw_check_ready(now))
	{
		sbw_go_idle();
		cs.next_check = 0;		/* woken (CREATE EXTENSION?) or due: look */
		return SBW_IDLE_CHECK_MS;
	}
	if (cs.link == NULL)
	{
		if (now < cs.backoff_until)
			return TimestampDifferenceMilliseconds(now, cs.backoff_until);
		sbw_connect();
		return 0;
	}

	n = sbw_drain();
	if (n < 0)
	{
		sbw_connection_lost();
		return 0;
	}
	sbw_maintain(GetCurrentTimestamp());
	if (sbw_amqp_socket(cs.link) < 0)
	{
		/* the library closed the socket itself (a timed-out RPC) */
		sbw_note_error(LOG, "the broker connection was closed by the AMQP library");
		sbw_connection_lost();
		return 0;
	}
	if (!sbw_measure_queue(GetCurrentTimestamp(), &measured))
	{
		sbw_connection_lost();
		return 0;
	}
	/* deliveries that came during the measurement wait in librabbitmq */
	if (n > 0 || measured)
		return 0;
	return sbw_connected_timeout();
}

/* Sleep on the latch, and on the broker's socket when connected. */
static void
sbw_sleep(long timeout_ms)
{
	WaitEvent	event;

	if (cs.link && sbw_amqp_socket(cs.link) >= 0)
		(void) WaitEventSetWait(sbw_wait_set(sbw_amqp_socket(cs.link)),
								Max(timeout_ms, 1), &event, 1, PG_WAIT_EXTENSION);
	else
	{
		sbw_wait_set_free();
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(timeout_ms, 1), PG_WAIT_EXTENSION);
	}
	ResetLatch(MyLatch);
}

/* Entry point of a consumer, started by the launcher. */
void
sbw_consumer_main(Datum main_arg)
{
	Oid			dboid;

	memset(&cs, 0, sizeof(cs));
	cs.worker_id = DatumGetInt32(main_arg);
	memcpy(&dboid, MyBgworkerEntry->bgw_extra, sizeof(Oid));

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	sbw_slot_attach(cs.worker_id);
	pgstat_report_appname(psprintf("storyboard_worker consumer %d", cs.worker_id));
	before_shmem_exit(sbw_consumer_exit, (Datum) 0);

	cs.loop_cxt = AllocSetContextCreate(TopMemoryContext,
										"storyboard_worker consumer loop",
										ALLOCSET_DEFAULT_SIZES);
	cs.batch_cxt = AllocSetContextCreate(TopMemoryContext,
										 "storyboard_worker batch",
										 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		long		timeout_ms;

		MemoryContextReset(cs.loop_cxt);
		MemoryContextSwitchTo(cs.loop_cxt);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
			sbw_reload();

		timeout_ms = sbw_step();
		if (timeout_ms > 0)
			sbw_sleep(timeout_ms);
	}
}
