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
 * a consumer whose queue has run dry, or whose prefetch window is filling
 * up, flushes itself up to its newest commit (one fsync for every commit
 * made since, as a group commit would).  This is how PostgreSQL's logical
 * replication apply worker reports progress upstream (worker.c,
 * store_flush_position / get_flush_position), with the broker, which keeps
 * every unacknowledged delivery, as the upstream.
 *
 * With synchronous replication (synchronous_standby_names set and
 * synchronous_commit above local), a commit is as durable as promised only
 * once a standby has it: a forced flush also waits for that
 * (SyncRepWaitForLSN, as COMMIT itself does), and only forced flushes
 * acknowledge.
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
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "acks.h"
#include "storyboard_worker.h"

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
 * (SyncRepWaitForLSN returns at once otherwise, but it is cheaper not to
 * ask.)
 */
static bool
sbw_sync_rep_wanted(void)
{
	return SyncRepRequested() &&
		SyncRepStandbyNames != NULL && SyncRepStandbyNames[0] != '\0';
}

/*
 * How far commits are durable now.  With 'flush', make everything
 * committed so far durable first: flush the WAL, then wait for the
 * synchronous standby if there is one.  InvalidXLogRecPtr: nothing may be
 * acknowledged now (a synchronous standby is not known to have anything
 * yet, or the wait for it was interrupted).
 */
static XLogRecPtr
sbw_durable_lsn(bool flush)
{
	if (!flush)
		return sbw_sync_rep_wanted() ? InvalidXLogRecPtr : GetFlushRecPtr(NULL);
	XLogFlush(newest_lsn);
	if (sbw_sync_rep_wanted())
	{
		SyncRepWaitForLSN(newest_lsn, true);
		/* a cancel or a shutdown ends the wait without the standby's word */
		if (ProcDiePending || QueryCancelPending)
			return InvalidXLogRecPtr;
	}
	return newest_lsn;
}

/* See acks.h. */
bool
sbw_acks_send(SbwAmqpLink *link, bool flush, char **errmsg)
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
	durable = sbw_durable_lsn(flush);
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
TimestampTz
sbw_acks_oldest(void)
{
	return pending_head < pending_end ? pending[pending_head].committed_at : 0;
}

/* See acks.h. */
void
sbw_acks_forget(void)
{
	pending_head = pending_end = 0;
	pending_deliveries = 0;
	sbw_slot_acks(0, NULL, 0);
}
