/*-------------------------------------------------------------------------
 *
 * consumer.c
 *		One consumer: wait, drain, dispatch, commit, acknowledge, back off.
 *
 * The loop waits on its latch and the broker's socket together
 * (WaitLatchOrSocket), so SIGTERM, reloads and ProcSignalBarriers (DROP
 * DATABASE elsewhere) are served at once, and never blocks inside
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
 * The path of one delivery: up to batch_size deliveries that are already
 * here are taken, each is dispatched in its own subtransaction of one
 * transaction, the transaction commits, and only then are they
 * acknowledged: one basic.ack with multiple=true per prefetch/4 committed
 * deliveries, or once the queue has been dry for SBW_ACK_DELAY_MS.  If the transaction
 * cannot commit, nothing is acknowledged: the deliveries are requeued
 * (basic.nack), the connection is dropped and the consumer backs off.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "commands/extension.h"
#include "executor/spi.h"
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
#include "utils/varlena.h"
#include "utils/wait_event.h"

#include "amqp_link.h"
#include "storyboard_worker.h"
#include "dispatch.h"

/* How often an idle or waiting consumer re-checks its preconditions. */
#define SBW_IDLE_CHECK_MS	5000
#define SBW_MIN_BACKOFF_MS	1000
/* Longest an acknowledgement waits for company once the queue is dry. */
#define SBW_ACK_DELAY_MS	20
/* Deliveries handled before the loop checks interrupts again. */
#define SBW_DRAIN_LIMIT		500

typedef struct SbwConsumerState
{
	int			worker_id;
	SbwAmqpLink *link;
	int			host_index;		/* next host of the rabbit_host list */
	TimestampTz backoff_until;
	int			failures;		/* consecutive connection failures */
	bool		logged_waiting;
	const char *waiting_for;	/* why we are idle, for the log */
	uint64		ack_tag;		/* last committed, unacknowledged delivery */
	int			ack_pending;	/* committed deliveries not yet acked */
	TimestampTz ack_since;		/* when the oldest of them committed */
	MemoryContext loop_cxt;		/* reset after every wake-up */
	MemoryContext batch_cxt;	/* reset after every batch */
} SbwConsumerState;

static SbwConsumerState cs;

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
		!TimestampDifferenceExceeds(last_at, now, 60000))
		elevel = Min(elevel, DEBUG1);
	else
	{
		strlcpy(last_msg, msg, sizeof(last_msg));
		last_at = now;
	}
	ereport(elevel, (errmsg("storyboard_worker consumer %d: %s", cs.worker_id, msg)));
	sbw_slot_error(msg);
}

/*
 * Acknowledge, with one basic.ack multiple=true, every delivery committed
 * so far.  Acks are deferred (never before COMMIT, sometimes a little
 * after): one ack frame per ack_every deliveries, or whenever the queue
 * runs dry, halves the broker's work per message.  A connection lost with
 * acks pending means those messages come back redelivered, and the ledger
 * recognises them.
 */
static bool
sbw_flush_acks(void)
{
	char	   *err = NULL;
	bool		ok = true;

	if (cs.ack_pending == 0 || cs.link == NULL)
		return true;
	if (!sbw_amqp_ack(cs.link, cs.ack_tag, true, &err))
	{
		sbw_note_error(LOG, psprintf("acknowledgement lost after commit: %s", err));
		ok = false;
	}
	cs.ack_pending = 0;
	return ok;
}

/* Drop the broker connection (if any), acknowledging what was committed. */
static void
sbw_disconnect(void)
{
	if (cs.link)
	{
		(void) sbw_flush_acks();
		sbw_amqp_close(cs.link);
		cs.link = NULL;
	}
	cs.ack_pending = 0;
}

/* Schedule the next connection attempt: 1 s, 2 s, 4 s ... retry_delay. */
static void
sbw_backoff(void)
{
	long		ms = (long) SBW_MIN_BACKOFF_MS << Min(cs.failures, 12);

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
	bool		ready;

	if (RecoveryInProgress())
	{
		cs.waiting_for = "the end of recovery";
		return false;
	}
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	ready = OidIsValid(get_extension_oid(SBW_EXTENSION_NAME, true));
	CommitTransactionCommand();
	pgstat_report_stat(false);
	if (!ready)
		cs.waiting_for = "CREATE EXTENSION storyboard_worker";
	return ready;
}

/* Pick the next host of the comma-separated rabbit_host list. */
static char *
sbw_next_host(void)
{
	List	   *hosts = NIL;
	char	   *raw = pstrdup(sbw_rabbit_host);
	char	   *host;

	if (!SplitGUCList(raw, ',', &hosts) || hosts == NIL)
		return pstrdup(sbw_rabbit_host);
	host = pstrdup((char *) list_nth(hosts, cs.host_index % list_length(hosts)));
	cs.host_index++;
	return host;
}

/*
 * The settings a connection is made with, as one string (palloc'd), to
 * tell whether a reload changed any of them.
 */
static char *
sbw_broker_settings(void)
{
	return psprintf("%s|%d|%s|%s|%s|%s|%s|%d|%d|%d|%d|%s|%s|%s|%d",
					sbw_rabbit_host, sbw_rabbit_port, sbw_rabbit_userid,
					sbw_rabbit_password, sbw_rabbit_virtual_host,
					sbw_rabbit_exchange_name, sbw_rabbit_event_queue_name,
					sbw_rabbit_queue_type, sbw_rabbit_heartbeat,
					sbw_rabbit_prefetch, sbw_rabbit_use_ssl,
					sbw_rabbit_ssl_ca_file, sbw_rabbit_ssl_cert_file,
					sbw_rabbit_ssl_key_file, sbw_rabbit_ssl_verify_peer);
}

/* Connect, with the current settings, to the next host. */
static void
sbw_connect(void)
{
	SbwAmqpSettings s;
	char	   *err = NULL;
	MemoryContext oldcxt = MemoryContextSwitchTo(cs.loop_cxt);

	memset(&s, 0, sizeof(s));
	s.host = sbw_next_host();
	s.port = sbw_rabbit_port;
	s.user = sbw_rabbit_userid;
	s.password = sbw_rabbit_password;
	s.vhost = sbw_rabbit_virtual_host;
	s.exchange = sbw_rabbit_exchange_name;
	s.queue = sbw_rabbit_event_queue_name;
	s.queue_type = sbw_rabbit_queue_type == SBW_QUEUE_QUORUM ? "quorum" : "classic";
	s.heartbeat = sbw_rabbit_heartbeat;
	s.prefetch = sbw_rabbit_prefetch;
	s.timeout_ms = 10000;
	s.use_ssl = sbw_rabbit_use_ssl;
	s.ssl_ca_file = sbw_rabbit_ssl_ca_file;
	s.ssl_cert_file = sbw_rabbit_ssl_cert_file;
	s.ssl_key_file = sbw_rabbit_ssl_key_file;
	s.ssl_verify_peer = sbw_rabbit_ssl_verify_peer;

	sbw_slot_set_state(SBW_STATE_CONNECTING, NULL);
	pgstat_report_activity(STATE_RUNNING, "connecting to RabbitMQ");
	cs.link = sbw_amqp_connect(&s, &err);
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
						cs.worker_id, sbw_amqp_peer(cs.link), sbw_rabbit_event_queue_name)));
		cs.failures = 0;
		sbw_slot_set_state(SBW_STATE_CONSUMING, sbw_amqp_peer(cs.link));
	}
	MemoryContextSwitchTo(oldcxt);
}

/*
 * Error recovery inside a PG_CATCH of the consumer's own transactions: keep
 * the process alive, roll the transaction back, and log "<what>: <error>"
 * (also shown in the stats view).
 */
static void
sbw_recover(MemoryContext oldcxt, const char *what)
{
	ErrorData  *edata;

	MemoryContextSwitchTo(oldcxt);
	edata = CopyErrorData();
	FlushErrorState();
	AbortCurrentTransaction();
	MemoryContextSwitchTo(oldcxt);
	sbw_note_error(LOG, psprintf("%s: %s", what, edata->message));
	FreeErrorData(edata);
}

/*
 * Is there a ledger table?  Looked up again only after DDL (the extension
 * updated to 1.1, dropped, created), not for every batch.
 */
static bool
sbw_ledger_cached(void)
{
	static uint64 generation = 0;
	static bool available = false;

	if (generation != sbw_catalog_generation())
	{
		available = sbw_ledger_available();
		generation = sbw_catalog_generation();
	}
	return available;
}

/*
 * Dispatch a batch of deliveries in one transaction and acknowledge them
 * after COMMIT.  Returns false if the connection was lost or the
 * transaction failed (the caller then reconnects after a back-off).
 */
static bool
sbw_process_batch(SbwDelivery *batch, int n)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile uint64 processed = 0;
	volatile uint64 dead = 0;
	volatile uint64 redelivered = 0;
	volatile uint64 duplicates = 0;
	char	   *err = NULL;
	volatile bool ok = true;
	int			i;
	bool		ledger;

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "storyboard_worker: dispatching events");
		ledger = sbw_ledger_cached();
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");

		for (i = 0; i < n; i++)
		{
			SbwMessage	msg;
			SbwDispatch d;

			msg.routing_key = batch[i].routing_key;
			msg.message_id = batch[i].message_id;
			msg.redelivered = batch[i].redelivered;
			msg.body = batch[i].body;
			msg.body_len = batch[i].body_len;
			if (msg.redelivered)
				redelivered++;

			/* applied before the ack was lost?  then only acknowledge it */
			if (ledger && !sbw_ledger_claim(sbw_ledger_key(&msg)) &&
				msg.redelivered)
			{
				duplicates++;
				continue;
			}

			memset(&d, 0, sizeof(d));
			d.keep_failures = true;
			d.keep_undecodable = true;
			d.resultcxt = CurrentMemoryContext;
			sbw_dispatch(&d, &msg);
			processed++;
			dead += d.ndead_lettered;
		}

		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		sbw_recover(oldcxt, psprintf("transaction failed, %d message(s) requeued", n));
		ok = false;
	}
	PG_END_TRY();

	MemoryContextSwitchTo(oldcxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);

	if (!ok)
	{
		/*
		 * Never acknowledged: give them back to the broker.  What earlier
		 * batches committed is acknowledged first, so that the nack's
		 * "multiple" covers this batch only.
		 */
		if (!sbw_flush_acks())
			return false;
		if (!sbw_amqp_nack(cs.link, batch[n - 1].delivery_tag, true, true, &err))
			sbw_note_error(LOG, err);
		return false;
	}

	sbw_slot_count(0, processed, dead, redelivered, duplicates);
	cs.ack_tag = batch[n - 1].delivery_tag;
	if (cs.ack_pending == 0)
		cs.ack_since = GetCurrentTimestamp();
	cs.ack_pending += n;
	if (cs.ack_pending >= Max(sbw_rabbit_prefetch / 4, 1))
		return sbw_flush_acks();
	return true;
}

/*
 * Take every delivery that is already here, in batches, without waiting.
 * Returns the number handled, or -1 if the connection must be dropped.
 */
static int
sbw_drain(void)
{
	SbwDelivery *batch;
	int			total = 0;
	int			batch_size = Max(sbw_batch_size, 1);

	batch = MemoryContextAlloc(cs.loop_cxt, sizeof(SbwDelivery) * batch_size);
	while (total < SBW_DRAIN_LIMIT)
	{
		int			n = 0;
		bool		closed = false;
		char	   *err = NULL;
		MemoryContext oldcxt = MemoryContextSwitchTo(cs.batch_cxt);

		while (n < batch_size)
		{
			SbwAmqpResult r = sbw_amqp_next(cs.link, &batch[n], &err);

			if (r == SBW_AMQP_DELIVERY)
				n++;
			else
			{
				closed = (r == SBW_AMQP_CLOSED);
				break;
			}
		}
		MemoryContextSwitchTo(oldcxt);

		if (n > 0)
		{
			sbw_slot_count(n, 0, 0, 0, 0);
			if (!sbw_process_batch(batch, n))
				closed = true;
			total += n;
		}
		MemoryContextReset(cs.batch_cxt);
		if (closed)
		{
			if (err)
				sbw_note_error(LOG, err);
			return -1;
		}
		if (n < batch_size)
		{
			/*
			 * Nothing more right now.  Acknowledge before sleeping once the
			 * oldest pending ack is SBW_ACK_DELAY_MS old; until then the
			 * main loop wakes us that often, so that at moderate rates acks
			 * still go out several at a time.
			 */
			if (cs.ack_pending > 0 &&
				TimestampDifferenceExceeds(cs.ack_since, GetCurrentTimestamp(),
										   SBW_ACK_DELAY_MS) &&
				!sbw_flush_acks())
				return -1;
			break;
		}
		CHECK_FOR_INTERRUPTS();
	}
	return total;
}

/*
 * Forget ledger rows older than ledger_retention.  Done by consumer 0 only,
 * about once a minute, in its own short transaction; a failure is logged
 * and tried again later, never fatal.
 */
static void
sbw_prune_ledger(void)
{
	MemoryContext oldcxt = CurrentMemoryContext;

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "storyboard_worker: pruning the ledger");
		if (sbw_ledger_cached())
		{
			uint64		n;

			if (SPI_connect() != SPI_OK_CONNECT)
				elog(ERROR, "SPI_connect failed");
			n = sbw_ledger_prune(sbw_ledger_retention);
			SPI_finish();
			if (n > 0)
				ereport(DEBUG1,
						(errmsg("storyboard_worker pruned %llu ledger rows",
								(unsigned long long) n)));
		}
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		sbw_recover(oldcxt, "could not prune the ledger");
	}
	PG_END_TRY();
	MemoryContextSwitchTo(oldcxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* Sleep on the latch only (not connected). */
static void
sbw_wait(long timeout_ms)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 Max(timeout_ms, 1), PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

/* Entry point of a consumer, started by the launcher. */
void
sbw_consumer_main(Datum main_arg)
{
	Oid			dboid;
	TimestampTz next_check = 0;
	TimestampTz next_prune = 0;
	bool		ready = false;

	memset(&cs, 0, sizeof(cs));
	cs.worker_id = DatumGetInt32(main_arg);
	memcpy(&dboid, MyBgworkerEntry->bgw_extra, sizeof(Oid));

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	sbw_slot_attach(cs.worker_id);
	pgstat_report_appname(psprintf("storyboard_worker consumer %d", cs.worker_id));
	before_shmem_exit((pg_on_exit_callback) sbw_disconnect, (Datum) 0);

	cs.loop_cxt = AllocSetContextCreate(TopMemoryContext,
										"storyboard_worker consumer loop",
										ALLOCSET_DEFAULT_SIZES);
	cs.batch_cxt = AllocSetContextCreate(TopMemoryContext,
										 "storyboard_worker batch",
										 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		TimestampTz now;
		long		timeout_ms;

		MemoryContextSwitchTo(cs.loop_cxt);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			char	   *before = sbw_broker_settings();
			char	   *after;

			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			after = sbw_broker_settings();

			/*
			 * Reconnect only if the broker settings changed: a reconnection
			 * hands the prefetched, unacknowledged deliveries back to the
			 * queue, to come again flagged redelivered.
			 */
			if (strcmp(before, after) != 0)
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
			next_check = 0;
		}

		now = GetCurrentTimestamp();
		if (!sbw_enable_notifications)
		{
			sbw_disconnect();
			sbw_slot_set_state(SBW_STATE_IDLE, NULL);
			MemoryContextReset(cs.loop_cxt);
			sbw_wait(60000);
			continue;
		}

		if (cs.link == NULL && now >= next_check)
		{
			ready = sbw_ready_to_consume();
			next_check = TimestampTzPlusMilliseconds(now, SBW_IDLE_CHECK_MS);
			if (!ready && !cs.logged_waiting)
			{
				ereport(LOG,
						(errmsg("storyboard_worker consumer %d is idle, waiting for %s",
								cs.worker_id, cs.waiting_for)));
				cs.logged_waiting = true;
			}
			else if (ready)
				cs.logged_waiting = false;
		}
		if (!ready)
		{
			sbw_disconnect();
			sbw_slot_set_state(SBW_STATE_IDLE, NULL);
			MemoryContextReset(cs.loop_cxt);
			sbw_wait(SBW_IDLE_CHECK_MS);
			next_check = 0;		/* woken (CREATE EXTENSION?) or due: look */
			continue;
		}

		if (cs.link == NULL)
		{
			if (now < cs.backoff_until)
			{
				MemoryContextReset(cs.loop_cxt);
				sbw_wait(TimestampDifferenceMilliseconds(now, cs.backoff_until));
				continue;
			}
			sbw_connect();
			MemoryContextReset(cs.loop_cxt);
			continue;
		}

		/* connected: take what is here, then sleep on socket and latch */
		{
			int			n = sbw_drain();

			if (n < 0)
			{
				sbw_disconnect();
				sbw_backoff();
				/* the extension may be gone: check before reconnecting */
				next_check = 0;
				MemoryContextReset(cs.loop_cxt);
				continue;
			}
			if (n > 0)
			{
				MemoryContextReset(cs.loop_cxt);
				continue;
			}
		}

		/*
		 * Nothing to do: still allowed to consume?  A DROP EXTENSION is
		 * noticed here within SBW_IDLE_CHECK_MS even when no message
		 * arrives, and the consumer goes idle without an error.
		 */
		if (now >= next_check)
		{
			next_check = TimestampTzPlusMilliseconds(now, SBW_IDLE_CHECK_MS);
			if (!sbw_ready_to_consume())
			{
				ready = false;
				next_check = 0;	/* the idle branch logs why, once */
				sbw_disconnect();
				MemoryContextReset(cs.loop_cxt);
				continue;
			}
		}

		if (cs.worker_id == 0 && now >= next_prune)
		{
			sbw_prune_ledger();
			next_prune = TimestampTzPlusMilliseconds(now, 60000);
		}

		/*
		 * Wake at least twice per heartbeat interval, so that our heartbeats
		 * go out and a silent broker is noticed within two intervals.
		 */
		timeout_ms = sbw_amqp_heartbeat(cs.link) > 0 ?
			sbw_amqp_heartbeat(cs.link) * 1000L / 2 : SBW_IDLE_CHECK_MS;
		timeout_ms = Min(timeout_ms, SBW_IDLE_CHECK_MS);
		if (cs.ack_pending > 0)
			timeout_ms = Min(timeout_ms, SBW_ACK_DELAY_MS);
		if (sbw_amqp_socket(cs.link) < 0)
		{
			/* the library closed the socket itself (a timed-out RPC) */
			sbw_note_error(LOG, "the broker connection was closed by the AMQP library");
			sbw_disconnect();
			sbw_backoff();
			MemoryContextReset(cs.loop_cxt);
			continue;
		}
		(void) WaitLatchOrSocket(MyLatch,
								 WL_LATCH_SET | WL_SOCKET_READABLE | WL_TIMEOUT |
								 WL_EXIT_ON_PM_DEATH,
								 sbw_amqp_socket(cs.link), timeout_ms,
								 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		MemoryContextReset(cs.loop_cxt);
	}
}
