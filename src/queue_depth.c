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

#include "utils/timestamp.h"

#include "amqp_link.h"
#include "queue_depth.h"
#include "stats.h"
#include "storyboard_worker.h"

/* The consumer that measures. */
#define SBW_QUEUE_DEPTH_WORKER	0

/* When this consumer last measured (or tried to). */
static TimestampTz last_try = 0;

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
	if (worker_id != SBW_QUEUE_DEPTH_WORKER || !sbw_shmem_ready())
		return;
	sbw_queue_depth_store(0, 0, 0);
	last_try = 0;
}
