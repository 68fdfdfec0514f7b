/*-------------------------------------------------------------------------
 *
 * queue_depth.c
 *		The broker's queue depth in shared memory, for the stats view.
 *
 * librabbitmq's RPCs are synchronous: the passive queue.declare blocks the
 * consumer until the broker answers (at most the link's RPC timeout), so it
 * is asked by one consumer, not often, never per delivery.  Deliveries
 * that arrive meanwhile are kept by librabbitmq for the next drain.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "storage/spin.h"
#include "utils/timestamp.h"

#include "amqp_link.h"
#include "queue_depth.h"
#include "storyboard_worker.h"

/* The consumer that measures. */
#define SBW_QUEUE_DEPTH_WORKER	0

/* When this consumer last measured (or tried to). */
static TimestampTz last_try = 0;

/* Set up the shared record; postmaster, with the rest of SbwShared. */
void
sbw_queue_depth_init(void)
{
	SpinLockInit(&sbw_shared->queue_depth.mutex);
	sbw_shared->queue_depth.checked_at = 0;
}

static void
sbw_queue_depth_store(int64 messages, int32 consumers, TimestampTz at)
{
	SbwQueueDepth *qd = &sbw_shared->queue_depth;

	SpinLockAcquire(&qd->mutex);
	qd->messages = messages;
	qd->consumers = consumers;
	qd->checked_at = at;
	SpinLockRelease(&qd->mutex);
}

/* Whether worker_id should measure now: it is the one, and it is time. */
bool
sbw_queue_depth_due(int worker_id, TimestampTz now)
{
	return worker_id == SBW_QUEUE_DEPTH_WORKER &&
		TimestampDifferenceExceeds(last_try, now, SBW_QUEUE_DEPTH_EVERY_MS);
}

/*
 * Measure and publish.  A failure forgets the last value (the view shows
 * NULL) and leaves the link broken: the caller reconnects as for any other
 * lost connection.
 */
bool
sbw_queue_depth_refresh(struct SbwAmqpLink *link, char **errmsg)
{
	int64		messages;
	int32		consumers;

	last_try = GetCurrentTimestamp();
	if (!sbw_amqp_queue_depth(link, &messages, &consumers, errmsg))
	{
		sbw_queue_depth_store(0, 0, 0);
		return false;
	}
	sbw_queue_depth_store(messages, consumers, GetCurrentTimestamp());
	return true;
}

/*
 * The measuring consumer lost or dropped its connection: the last value
 * says nothing about the queue from now on.  Measure at once once it is
 * connected again.
 */
void
sbw_queue_depth_forget(int worker_id)
{
	if (worker_id != SBW_QUEUE_DEPTH_WORKER || sbw_shared == NULL)
		return;
	sbw_queue_depth_store(0, 0, 0);
	last_try = 0;
}

/* The last measurement, unless unknown or older than the stale limit. */
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
