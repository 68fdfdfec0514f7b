/*-------------------------------------------------------------------------
 *
 * stats.c
 *		Shared-memory state of the consumers and the stats view.
 *
 * Each consumer owns one slot, indexed by its worker number, and is the
 * only writer of it; readers (the stats view) take the slot's spinlock to
 * get a consistent copy.  Counters are cumulative since the slot's worker
 * started.  The mailer has a slot of its own (mailer_status()).  The
 * layouts are private to this file: the other modules use stats.h.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "storyboard_worker.h"
#include "extension.h"
#include "guc.h"
#include "stats.h"
#include "util.h"

typedef struct SbwWorkerSlot
{
	slock_t		mutex;
	int			pid;			/* 0 = slot unused */
	SbwWorkerState state;
	char		broker[128];
	TimestampTz connected_since;
	uint64		received;
	uint64		processed;
	uint64		dead_lettered;
	uint64		redelivered;
	uint64		duplicates;		/* redelivered and found in the ledger */
	char		last_error[256];
	TimestampTz last_error_at;
	uint64		acked;			/* deliveries acknowledged */
	int			acks_pending;	/* committed, not acknowledged yet */
	uint64		ack_waits[SBW_ACK_WAIT_BUCKETS];
} SbwWorkerSlot;

/* The mailer's shared state (mailer.c), read by mailer_status(). */
typedef struct SbwMailerSlot
{
	slock_t		mutex;
	int			pid;			/* 0 = not running */
	struct Latch *latch;		/* set to wake it (mails queued) */
	char		state[16];
	uint64		sent;
	uint64		failed;
	uint64		retried;
	TimestampTz last_sent_at;
	char		last_error[256];
	TimestampTz last_error_at;
} SbwMailerSlot;

/* The broker's queue depth, as consumer 0 last measured it (queue_depth.c). */
typedef struct SbwQueueDepth
{
	slock_t		mutex;
	int64		messages;		/* ready, not yet delivered to a consumer */
	int32		consumers;
	TimestampTz checked_at;		/* 0 = unknown */
} SbwQueueDepth;

/* A measurement older than this is not shown (consumer 0 is not connected). */
#define SBW_QUEUE_DEPTH_STALE_MS	30000

typedef struct SbwShared
{
	int			launcher_pid;
	SbwMailerSlot mailer;
	/* when a consumer last flushed the WAL for its acknowledgements (acks.c) */
	pg_atomic_uint64 last_ack_flush;
	SbwQueueDepth queue_depth;	/* consumer 0's last passive queue.declare */
	SbwWorkerSlot slots[SBW_MAX_WORKERS];
} SbwShared;

static SbwShared *sbw_shared = NULL;

/* This process's slot, if it is a consumer. */
static SbwWorkerSlot *my_slot = NULL;

PG_FUNCTION_INFO_V1(sbw_worker_stats);
PG_FUNCTION_INFO_V1(sbw_wake_workers);
PG_FUNCTION_INFO_V1(sbw_mailer_status);

/* Size of the shared state, requested at startup. */
Size
sbw_shmem_size(void)
{
	return MAXALIGN(sizeof(SbwShared));
}

/*
 * Create the shared state (postmaster) or attach to it (EXEC_BACKEND
 * children).  Called with AddinShmemInitLock held by convention.
 */
void
sbw_shmem_init(void)
{
	bool		found;
	int			i;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	sbw_shared = ShmemInitStruct("storyboard_worker", sbw_shmem_size(), &found);
	if (!found)
	{
		memset(sbw_shared, 0, sizeof(SbwShared));
		pg_atomic_init_u64(&sbw_shared->last_ack_flush, 0);
		SpinLockInit(&sbw_shared->mailer.mutex);
		SpinLockInit(&sbw_shared->queue_depth.mutex);
		for (i = 0; i < SBW_MAX_WORKERS; i++)
			SpinLockInit(&sbw_shared->slots[i].mutex);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* See stats.h. */
bool
sbw_shmem_ready(void)
{
	return sbw_shared != NULL;
}

/* See stats.h: the clock lives here so that the layout stays private. */
pg_atomic_uint64 *
sbw_ack_flush_clock(void)
{
	return &sbw_shared->last_ack_flush;
}

/* See stats.h: consumer 0's measurement, or 0, 0, 0 to forget it. */
void
sbw_queue_depth_store(int64 messages, int32 consumers, TimestampTz at)
{
	SbwQueueDepth *qd = &sbw_shared->queue_depth;

	SpinLockAcquire(&qd->mutex);
	qd->messages = messages;
	qd->consumers = consumers;
	qd->checked_at = at;
	SpinLockRelease(&qd->mutex);
}

/* See stats.h. */
bool
sbw_queue_depth_read(int64 *messages, int32 *consumers, TimestampTz *checked_at)
{
	SbwQueueDepth *qd = &sbw_shared->queue_depth;

	SpinLockAcquire(&qd->mutex);
	*messages = qd->messages;
	*consumers = qd->consumers;
	*checked_at = qd->checked_at;
	SpinLockRelease(&qd->mutex);
	return *checked_at != 0 &&
		!TimestampDifferenceExceeds(*checked_at, GetCurrentTimestamp(),
									SBW_QUEUE_DEPTH_STALE_MS);
}

/* Forget the launcher's pid when it exits, however it exits. */
static void
sbw_launcher_detach(int code, Datum arg)
{
	if (sbw_shared && sbw_shared->launcher_pid == MyProcPid)
		sbw_shared->launcher_pid = 0;
}

/* See stats.h. */
void
sbw_launcher_attach(void)
{
	sbw_shared->launcher_pid = MyProcPid;
	before_shmem_exit(sbw_launcher_detach, (Datum) 0);
}

/* Leave the mailer's slot at exit: no pid, no latch to set, "stopped". */
static void
sbw_mailer_detach(int code, Datum arg)
{
	SbwMailerSlot *m = &sbw_shared->mailer;

	SpinLockAcquire(&m->mutex);
	if (m->pid == MyProcPid)
	{
		m->pid = 0;
		m->latch = NULL;
		strlcpy(m->state, "stopped", sizeof(m->state));
	}
	SpinLockRelease(&m->mutex);
}

/* See stats.h. */
void
sbw_mailer_attach(void)
{
	SbwMailerSlot *m = &sbw_shared->mailer;

	SpinLockAcquire(&m->mutex);
	m->pid = MyProcPid;
	m->latch = MyLatch;
	SpinLockRelease(&m->mutex);
	before_shmem_exit(sbw_mailer_detach, (Datum) 0);
}

/* See stats.h. */
void
sbw_mailer_set_state(const char *state)
{
	SbwMailerSlot *m = &sbw_shared->mailer;

	SpinLockAcquire(&m->mutex);
	strlcpy(m->state, state, sizeof(m->state));
	SpinLockRelease(&m->mutex);
}

/* See stats.h. */
void
sbw_mailer_note_sent(void)
{
	SbwMailerSlot *m = &sbw_shared->mailer;

	SpinLockAcquire(&m->mutex);
	m->sent++;
	m->last_sent_at = GetCurrentTimestamp();
	SpinLockRelease(&m->mutex);
}

/* See stats.h; the error is kept as the mailer's last one. */
void
sbw_mailer_note_unsent(bool failed, const char *error)
{
	SbwMailerSlot *m = &sbw_shared->mailer;

	SpinLockAcquire(&m->mutex);
	if (failed)
		m->failed++;
	else
		m->retried++;
	strlcpy(m->last_error, error, sizeof(m->last_error));
	m->last_error_at = GetCurrentTimestamp();
	SpinLockRelease(&m->mutex);
}

/* Forget our pid in the slot when the consumer exits, however it exits. */
static void
sbw_slot_detach(int code, Datum arg)
{
	if (my_slot == NULL)
		return;
	SpinLockAcquire(&my_slot->mutex);
	my_slot->pid = 0;
	my_slot->state = SBW_STATE_IDLE;
	my_slot->broker[0] = '\0';
	SpinLockRelease(&my_slot->mutex);
	my_slot = NULL;
}

/*
 * Take slot number 'slot' for this consumer and reset its counters: the
 * view reports the life of the current process.
 */
void
sbw_slot_attach(int slot)
{
	Assert(slot >= 0 && slot < SBW_MAX_WORKERS);
	my_slot = &sbw_shared->slots[slot];
	SpinLockAcquire(&my_slot->mutex);
	my_slot->pid = MyProcPid;
	my_slot->state = SBW_STATE_IDLE;
	my_slot->broker[0] = '\0';
	my_slot->connected_since = 0;
	my_slot->received = 0;
	my_slot->processed = 0;
	my_slot->dead_lettered = 0;
	my_slot->redelivered = 0;
	my_slot->duplicates = 0;
	my_slot->acked = 0;
	my_slot->acks_pending = 0;
	memset(my_slot->ack_waits, 0, sizeof(my_slot->ack_waits));
	SpinLockRelease(&my_slot->mutex);
	before_shmem_exit(sbw_slot_detach, (Datum) 0);
}

/* Publish the consumer's state; broker is "host:port" when connected. */
void
sbw_slot_set_state(SbwWorkerState state, const char *broker)
{
	if (my_slot == NULL)
		return;
	SpinLockAcquire(&my_slot->mutex);
	if (state == SBW_STATE_CONSUMING && my_slot->state != SBW_STATE_CONSUMING)
		my_slot->connected_since = GetCurrentTimestamp();
	else if (state != SBW_STATE_CONSUMING)
		my_slot->connected_since = 0;
	my_slot->state = state;
	strlcpy(my_slot->broker, broker ? broker : "", sizeof(my_slot->broker));
	SpinLockRelease(&my_slot->mutex);
}

/* Add to the counters. */
void
sbw_slot_count(uint64 received, uint64 processed, uint64 dead_lettered,
			   uint64 redelivered, uint64 duplicates)
{
	if (my_slot == NULL)
		return;
	SpinLockAcquire(&my_slot->mutex);
	my_slot->received += received;
	my_slot->processed += processed;
	my_slot->dead_lettered += dead_lettered;
	my_slot->redelivered += redelivered;
	my_slot->duplicates += duplicates;
	SpinLockRelease(&my_slot->mutex);
}

/* Remember the last error, for operators who look at the view first. */
void
sbw_slot_error(const char *msg)
{
	char		clipped[sizeof(my_slot->last_error)];

	if (my_slot == NULL)
		return;
	/* cut at a character boundary: readers decode it as text */
	sbw_strlcpy_mb(clipped, msg ? msg : "", sizeof(clipped));
	SpinLockAcquire(&my_slot->mutex);
	memcpy(my_slot->last_error, clipped, sizeof(clipped));
	my_slot->last_error_at = GetCurrentTimestamp();
	SpinLockRelease(&my_slot->mutex);
}

/*
 * The histogram bucket of a commit-to-ack wait of 'us' microseconds: four
 * linear buckets per power of two, so that the bucket's upper bound is
 * within 25 % of any value in it.
 */
int
sbw_ack_wait_bucket(int64 us)
{
	int			e = 0;
	int			b;

	if (us < 4)
		return (int) Max(us, 0);
	while ((us >> e) > 1)
		e++;
	b = 4 * (e - 1) + (int) ((us >> (e - 2)) & 3);
	return Min(b, SBW_ACK_WAIT_BUCKETS - 1);
}

/* The largest wait, in microseconds, bucket b holds. */
static double
sbw_ack_wait_upper(int b)
{
	int			e;

	if (b < 4)
		return (double) b + 1;
	e = b / 4 + 1;
	return (double) (((int64) (5 + b % 4)) << (e - 2));
}

/*
 * The p-quantile (0..1) of a consumer's commit-to-ack waits, in
 * milliseconds, from its histogram; -1 when nothing was acknowledged.
 */
static double
sbw_ack_wait_quantile(const uint64 *waits, double p)
{
	uint64		total = 0;
	uint64		seen = 0;
	int			b;

	for (b = 0; b < SBW_ACK_WAIT_BUCKETS; b++)
		total += waits[b];
	if (total == 0)
		return -1;
	for (b = 0; b < SBW_ACK_WAIT_BUCKETS; b++)
	{
		seen += waits[b];
		if ((double) seen >= p * (double) total)
			break;
	}
	return sbw_ack_wait_upper(Min(b, SBW_ACK_WAIT_BUCKETS - 1)) / 1000.0;
}

/*
 * Count acknowledged deliveries and their commit-to-ack waits (waits may be
 * NULL), and publish how many committed deliveries still wait.
 */
void
sbw_slot_acks(uint64 acked, const uint32 *waits, int pending)
{
	int			b;

	if (my_slot == NULL)
		return;
	SpinLockAcquire(&my_slot->mutex);
	my_slot->acked += acked;
	my_slot->acks_pending = pending;
	if (waits)
		for (b = 0; b < SBW_ACK_WAIT_BUCKETS; b++)
			my_slot->ack_waits[b] += waits[b];
	SpinLockRelease(&my_slot->mutex);
}

static const char *
sbw_state_name(SbwWorkerState state)
{
	switch (state)
	{
		case SBW_STATE_IDLE:
			return "idle";
		case SBW_STATE_CONNECTING:
			return "connecting";
		case SBW_STATE_CONSUMING:
			return "consuming";
		case SBW_STATE_BACKING_OFF:
			return "backing off";
	}
	return "unknown";
}

/*
 * SQL: storyboard_worker.worker_stats(), one row per running consumer.
 * Never shows the broker password: only host:port is kept in the slot.
 */
Datum
sbw_worker_stats(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;
	int64		qmessages;
	int32		qconsumers;
	TimestampTz qchecked;
	bool		qknown;

	sbw_require_current_version();
	InitMaterializedSRF(fcinfo, 0);
	if (sbw_shared == NULL)
		PG_RETURN_VOID();
	/* read once: every row shows the same measurement */
	qknown = sbw_queue_depth_read(&qmessages, &qconsumers, &qchecked);

	for (i = 0; i < SBW_MAX_WORKERS; i++)
	{
		SbwWorkerSlot *slot = &sbw_shared->slots[i];
		SbwWorkerSlot copy;
		Datum		values[19];
		bool		nulls[19];
		double		p50,
					p99;

		SpinLockAcquire(&slot->mutex);
		memcpy(&copy, slot, sizeof(copy));
		SpinLockRelease(&slot->mutex);
		if (copy.pid == 0)
			continue;

		memset(nulls, 0, sizeof(nulls));
		values[0] = Int32GetDatum(i);
		values[1] = Int32GetDatum(copy.pid);
		values[2] = CStringGetTextDatum(sbw_state_name(copy.state));
		if (copy.broker[0])
			values[3] = CStringGetTextDatum(copy.broker);
		else
			nulls[3] = true;
		if (copy.connected_since)
			values[4] = TimestampTzGetDatum(copy.connected_since);
		else
			nulls[4] = true;
		values[5] = Int64GetDatum((int64) copy.received);
		values[6] = Int64GetDatum((int64) copy.processed);
		values[7] = Int64GetDatum((int64) copy.dead_lettered);
		values[8] = Int64GetDatum((int64) copy.redelivered);
		if (copy.last_error[0])
		{
			values[9] = CStringGetTextDatum(copy.last_error);
			values[10] = TimestampTzGetDatum(copy.last_error_at);
		}
		else
			nulls[9] = nulls[10] = true;
		values[11] = Int64GetDatum((int64) copy.duplicates);
		values[12] = Int64GetDatum((int64) copy.acked);
		values[13] = Int32GetDatum(copy.acks_pending);
		p50 = sbw_ack_wait_quantile(copy.ack_waits, 0.50);
		p99 = sbw_ack_wait_quantile(copy.ack_waits, 0.99);
		values[14] = Float8GetDatum(p50);
		nulls[14] = p50 < 0;
		values[15] = Float8GetDatum(p99);
		nulls[15] = p99 < 0;
		nulls[16] = nulls[17] = nulls[18] = !qknown;
		values[16] = Int64GetDatum(qmessages);
		values[17] = Int32GetDatum(qconsumers);
		values[18] = TimestampTzGetDatum(qchecked);

		/*
		 * The SQL of 1.0 declares 11 columns, 1.1 and 1.2 add duplicates,
		 * 1.3 the acknowledgements, 1.5 the queue depth: fill what the
		 * declaration has.
		 */
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_VOID();
}

/* Set the latch of the launcher and of every consumer; how many. */
static int
sbw_set_latches(void)
{
	int			woken = 0;
	int			i;
	List	   *pids = NIL;
	ListCell   *lc;

	if (sbw_shared == NULL)
		return 0;

	if (sbw_shared->launcher_pid != 0)
		pids = lappend_int(pids, sbw_shared->launcher_pid);
	for (i = 0; i < SBW_MAX_WORKERS; i++)
	{
		int			pid;

		SpinLockAcquire(&sbw_shared->slots[i].mutex);
		pid = sbw_shared->slots[i].pid;
		SpinLockRelease(&sbw_shared->slots[i].mutex);
		if (pid != 0)
			pids = lappend_int(pids, pid);
	}
	SpinLockAcquire(&sbw_shared->mailer.mutex);
	if (sbw_shared->mailer.pid != 0)
		pids = lappend_int(pids, sbw_shared->mailer.pid);
	SpinLockRelease(&sbw_shared->mailer.mutex);

	foreach(lc, pids)
	{
		PGPROC	   *proc = BackendPidGetProc(lfirst_int(lc));

		if (proc != NULL)
		{
			SetLatch(&proc->procLatch);
			woken++;
		}
	}
	list_free(pids);
	return woken;
}

/* Set the mailer's latch (mail was queued). */
static void
sbw_set_mailer_latch(void)
{
	struct Latch *latch;

	SpinLockAcquire(&sbw_shared->mailer.mutex);
	latch = sbw_shared->mailer.latch;
	SpinLockRelease(&sbw_shared->mailer.mutex);
	if (latch != NULL)
		SetLatch(latch);
}

static int	wake_at_commit = 0;	/* SBW_WAKE_* bits */
static bool wake_callback_registered = false;

/* Transaction callback: wake whom was asked once our transaction commits. */
static void
sbw_wake_xact_callback(XactEvent event, void *arg)
{
	int			what = wake_at_commit;

	if (what == 0)
		return;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
	{
		wake_at_commit = 0;
		if (what & SBW_WAKE_ALL)
			(void) sbw_set_latches();
		else if (what & SBW_WAKE_MAILER)
			sbw_set_mailer_latch();
	}
	else if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		wake_at_commit = 0;
}

/* See storyboard_worker.h. */
void
sbw_wake_at_commit(int what)
{
	if (sbw_shared == NULL)
		return;
	if (!wake_callback_registered)
	{
		RegisterXactCallback(sbw_wake_xact_callback, NULL);
		wake_callback_registered = true;
	}
	wake_at_commit |= what;
}

/*
 * SQL: storyboard_worker.wake_workers().  Wakes the launcher and every
 * consumer when the calling transaction commits (not before: woken now,
 * they would not see the uncommitted CREATE EXTENSION that calls this), so
 * they notice at once instead of at their next periodic check.  Returns how
 * many processes will be woken.
 */
Datum
sbw_wake_workers(PG_FUNCTION_ARGS)
{
	int			n = 0;
	int			i;

	sbw_require_current_version();
	if (sbw_shared == NULL)
		PG_RETURN_INT32(0);
	sbw_wake_at_commit(SBW_WAKE_ALL);

	if (sbw_shared->launcher_pid != 0)
		n++;
	for (i = 0; i < SBW_MAX_WORKERS; i++)
	{
		SpinLockAcquire(&sbw_shared->slots[i].mutex);
		if (sbw_shared->slots[i].pid != 0)
			n++;
		SpinLockRelease(&sbw_shared->slots[i].mutex);
	}
	PG_RETURN_INT32(n);
}

/*
 * storyboard_worker.mailer_status(): the mailer's process, what it does,
 * and its counts since the server started.
 */
Datum
sbw_mailer_status(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[8];
	bool		nulls[8] = {false};
	SbwMailerSlot m;

	sbw_require_current_version();
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "mailer_status must return a record");
	if (sbw_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("storyboard_worker is not loaded through shared_preload_libraries")));
	SpinLockAcquire(&sbw_shared->mailer.mutex);
	memcpy(&m, &sbw_shared->mailer, sizeof(m));
	SpinLockRelease(&sbw_shared->mailer.mutex);

	values[0] = Int32GetDatum(m.pid);
	nulls[0] = (m.pid == 0);
	values[1] = CStringGetTextDatum(m.state[0] ? m.state : "stopped");
	values[2] = Int64GetDatum((int64) m.sent);
	values[3] = Int64GetDatum((int64) m.failed);
	values[4] = Int64GetDatum((int64) m.retried);
	values[5] = TimestampTzGetDatum(m.last_sent_at);
	nulls[5] = (m.last_sent_at == 0);
	values[6] = CStringGetTextDatum(m.last_error);
	nulls[6] = (m.last_error[0] == '\0');
	values[7] = TimestampTzGetDatum(m.last_error_at);
	nulls[7] = (m.last_error_at == 0);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
