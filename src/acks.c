/*-------------------------------------------------------------------------
 *
 * acks.c
 *		Acknowledge on WAL flush.
 *
 * A consumer commits every event (or batch) in a transaction of its own,
 * without waiting for the WAL flush (synchronous_commit = off for that
 * commit only, outside every plugin's settings scope).  What it may not do
 * is acknowledge a message before its effects are durable: so the delivery
 * tags wait here, with the end LSN of the commit that holds them, until
 * the WAL is flushed at least that far.  The WAL writer flushes on its own;
 * a consumer whose prefetch window is filling up flushes itself up to its
 * newest commit (one fsync for every commit made since, as a group commit
 * would), and so does one whose queue has run dry, unless another consumer
 * flushed less than SBW_ACK_FLUSH_INTERVAL_US ago: then it waits for the
 * next turn, by when that flush (or the WAL writer) has most likely made
 * its commits durable already.  At a moderate rate, with the queues running
 * dry after nearly every event, that keeps the consumers from paying an
 * fsync per event and from queueing on WALWriteLock.  This is how PostgreSQL's logical
 * replication apply worker reports progress upstream (worker.c,
 * store_flush_position / get_flush_position), with the broker, which keeps
 * every unacknowledged delivery, as the upstream.
 *
 * With synchronous replication (synchronous_standby_names set and
 * synchronous_commit above local), a commit is as durable as promised only
 * once the standbys have confirmed it as synchronous_commit asks: the
 * acknowledgements then follow what the walsenders publish as confirmed,
 * looked at every few milliseconds, rather than waiting inside
 * SyncRepWaitForLSN as a COMMIT does (that wait would stop heartbeats, and
 * a cancel ends it without the standby's word).
 *
 * Acknowledgements go out in delivery order with basic.ack multiple=true:
 * one frame for every prefix of durable commits.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "miscadmin.h"
#include "replication/syncrep.h"
#include "replication/walsender.h"
#include "replication/walsender_private.h"
#include "storage/lwlock.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "acks.h"

/* How often acknowledgements waiting for a synchronous standby look again. */
#define SBW_ACK_STANDBY_POLL_MS	5
#include "storyboard_worker.h"
#include "stats.h"

/* Committed deliveries waiting for their commit to be durable. */
typedef struct SbwPendingAck
{
	uint64		tag;			/* the last delivery of the transaction */
	int			n;				/* how many deliveries it held */
	XLogRecPtr	lsn;			/* end of its commit record (0: wrote none) */
	TimestampTz committed_at;
} SbwPendingAck;

static SbwPendingAck *pending = NULL;
static int	pending_cap = 0;
static int	pending_head = 0;	/* first not yet acknowledged */
static int	pending_end = 0;	/* one past the last */
static int	pending_deliveries = 0;
static XLogRecPtr newest_lsn = InvalidXLogRecPtr;

/* Make room for one more entry, reusing the acknowledged front. */
static void
sbw_acks_reserve(void)
{
	if (pending_head > 0 && pending_end == pending_cap)
	{
		memmove(pending, pending + pending_head,
				sizeof(SbwPendingAck) * (pending_end - pending_head));
		pending_end -= pending_head;
		pending_head = 0;
	}
	if (pending_end < pending_cap)
		return;
	pending_cap = Max(pending_cap * 2, 64);
	if (pending == NULL)
		pending = MemoryContextAlloc(TopMemoryContext,
									 sizeof(SbwPendingAck) * pending_cap);
	else
		pending = repalloc(pending, sizeof(SbwPendingAck) * pending_cap);
}

/* See acks.h. */
void
sbw_acks_committed(uint64 tag, int n, XLogRecPtr lsn)
{
	SbwPendingAck *p;

	sbw_acks_reserve();
	p = &pending[pending_end++];
	p->tag = tag;
	p->n = n;
	p->lsn = lsn;
	p->committed_at = GetCurrentTimestamp();
	pending_deliveries += n;
	if (lsn > newest_lsn)
		newest_lsn = lsn;
	sbw_slot_acks(0, NULL, pending_deliveries);
}

/*
 * Does a commit count as durable only once a synchronous standby has it?
 * As SyncRepWaitForLSN decides, from the consumer's own synchronous_commit
 * (a plugin's SET ends with its call).
 */
static bool
sbw_sync_rep_wanted(void)
{
	return SyncRepRequested() &&
		SyncRepStandbyNames != NULL && SyncRepStandbyNames[0] != '\0';
}

/*
 * Take the consumers' flush turn if it is free: true if no consumer
 * flushed for acknowledgements in the last SBW_ACK_FLUSH_INTERVAL_US (and
 * the turn is now ours).  A turn dated in the future (the clock was set
 * back) counts as free.
 */
static bool
sbw_take_flush_turn(void)
{
	uint64		last = pg_atomic_read_u64(sbw_ack_flush_clock());
	uint64		now = (uint64) GetCurrentTimestamp();

	if (now < last + SBW_ACK_FLUSH_INTERVAL_US && last <= now + SBW_ACK_FLUSH_INTERVAL_US)
		return false;
	return pg_atomic_compare_exchange_u64(sbw_ack_flush_clock(), &last, now);
}

/*
 * Whether the walsenders work with synchronous standbys (caller holds
 * SyncRepLock).  Recent minor releases (15.20 here) turned the flag into a
 * status with an "initialized" bit (SYNC_STANDBY_DEFINED tells them apart).
 */
static bool
sbw_sync_standbys_defined(void)
{
#ifdef SYNC_STANDBY_DEFINED
	return (WalSndCtl->sync_standbys_status & SYNC_STANDBY_DEFINED) != 0;
#else
	return WalSndCtl->sync_standbys_defined;
#endif
}

/*
 * How far the synchronous standbys have confirmed our WAL in the sense our
 * synchronous_commit asks for (written, flushed or applied there): what
 * the walsenders publish for SyncRepWaitForLSN to compare with (its wait
 * mode is private to syncrep.c, so it is derived here the same way).
 * Nothing while the standbys are not known to be defined yet.
 */
static XLogRecPtr
sbw_standby_confirmed_lsn(void)
{
	int			mode;
	XLogRecPtr	lsn;

	switch (synchronous_commit)
	{
		case SYNCHRONOUS_COMMIT_REMOTE_WRITE:
			mode = SYNC_REP_WAIT_WRITE;
			break;
		case SYNCHRONOUS_COMMIT_REMOTE_APPLY:
			mode = SYNC_REP_WAIT_APPLY;
			break;
		default:
			mode = SYNC_REP_WAIT_FLUSH;
			break;
	}
	LWLockAcquire(SyncRepLock, LW_SHARED);
	lsn = sbw_sync_standbys_defined() ? WalSndCtl->lsn[mode] : InvalidXLogRecPtr;
	LWLockRelease(SyncRepLock);
	return lsn;
}

/*
 * How far commits are durable now, flushing first as 'how' says.  Under
 * synchronous replication that is what the standbys confirmed: the
 * consumer flushes its WAL (so that the walsenders send it) but never
 * waits in SyncRepWaitForLSN; it polls (sbw_acks_wait_ms), and meanwhile
 * keeps consuming up to its prefetch window, sending heartbeats and
 * answering SIGTERM and cancels as usual.
 */
static XLogRecPtr
sbw_durable_lsn(SbwAckFlush how)
{
	bool		sync_rep = sbw_sync_rep_wanted();
	XLogRecPtr	durable = sync_rep ? sbw_standby_confirmed_lsn() : GetFlushRecPtr(NULL);

	if (durable >= newest_lsn || how == SBW_ACK_DURABLE)
		return durable;
	if (GetFlushRecPtr(NULL) < newest_lsn)
	{
		if (how == SBW_ACK_GROUP && !sbw_take_flush_turn())
			return durable;
		if (how == SBW_ACK_FLUSH)
			pg_atomic_write_u64(sbw_ack_flush_clock(), (uint64) GetCurrentTimestamp());
		XLogFlush(newest_lsn);
	}
	return sync_rep ? sbw_standby_confirmed_lsn() : newest_lsn;
}

/* See acks.h. */
bool
sbw_acks_send(SbwAmqpLink *link, SbwAckFlush how, char **errmsg)
{
	uint32		waits[SBW_ACK_WAIT_BUCKETS];
	TimestampTz now;
	XLogRecPtr	durable;
	int			last = -1;
	int			acked = 0;
	int			i;
	bool		ok;

	*errmsg = NULL;
	if (pending_head == pending_end)
		return true;
	durable = sbw_durable_lsn(how);
	if (XLogRecPtrIsInvalid(durable))
		return true;			/* nothing confirmed yet */
	for (i = pending_head; i < pending_end && pending[i].lsn <= durable; i++)
		last = i;
	if (last < 0)
		return true;

	ok = sbw_amqp_ack(link, pending[last].tag, true, errmsg);

	/* what the stats view shows: commit-to-ack waits */
	memset(waits, 0, sizeof(waits));
	now = GetCurrentTimestamp();
	for (i = pending_head; i <= last; i++)
	{
		waits[sbw_ack_wait_bucket(now - pending[i].committed_at)] += pending[i].n;
		acked += pending[i].n;
	}
	pending_head = last + 1;
	pending_deliveries -= acked;
	if (pending_head == pending_end)
		pending_head = pending_end = 0;
	sbw_slot_acks(ok ? acked : 0, ok ? waits : NULL, pending_deliveries);
	return ok;
}

/* See acks.h. */
int
sbw_acks_pending(void)
{
	return pending_deliveries;
}

/* See acks.h. */
long
sbw_acks_wait_ms(void)
{
	uint64		next;
	uint64		now;

	if (pending_deliveries == 0)
		return -1;
	if (sbw_sync_rep_wanted() && GetFlushRecPtr(NULL) >= newest_lsn)
		return SBW_ACK_STANDBY_POLL_MS; /* flushed: the standby's turn */
	next = pg_atomic_read_u64(sbw_ack_flush_clock()) + SBW_ACK_FLUSH_INTERVAL_US;
	now = (uint64) GetCurrentTimestamp();
	if (now >= next || next > now + 2 * SBW_ACK_FLUSH_INTERVAL_US)
		return 1;
	return Max((long) ((next - now + 999) / 1000), 1);
}

/* See acks.h. */
void
sbw_acks_forget(void)
{
	pending_head = pending_end = 0;
	pending_deliveries = 0;
	sbw_slot_acks(0, NULL, 0);
}
