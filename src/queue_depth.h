/*-------------------------------------------------------------------------
 *
 * queue_depth.h
 *		The broker's queue depth, measured by consumer 0, shown in stats.
 *
 * Consumer 0 asks the broker (a passive queue.declare) at most every
 * SBW_QUEUE_DEPTH_EVERY_MS while it is connected and keeps the answer in
 * shared memory; the stats view shows it on every row, or NULL when it is
 * unknown or older than SBW_QUEUE_DEPTH_STALE_MS (consumer 0 not
 * connected).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_QUEUE_DEPTH_H
#define SBW_QUEUE_DEPTH_H

#include "datatype/timestamp.h"
#include "storage/s_lock.h"

#define SBW_QUEUE_DEPTH_EVERY_MS	5000
#define SBW_QUEUE_DEPTH_STALE_MS	30000

/* In shared memory (SbwShared.queue_depth). */
typedef struct SbwQueueDepth
{
	slock_t		mutex;
	int64		messages;		/* ready, not yet delivered to a consumer */
	int32		consumers;
	TimestampTz checked_at;		/* 0 = unknown */
} SbwQueueDepth;

struct SbwAmqpLink;

extern void sbw_queue_depth_init(void);

/* Consumer side: is a measurement due, take it, forget it (disconnected). */
extern bool sbw_queue_depth_due(int worker_id, TimestampTz now);
extern bool sbw_queue_depth_refresh(struct SbwAmqpLink *link, char **errmsg);
extern void sbw_queue_depth_forget(int worker_id);

/* Reader side: false when unknown or stale. */
extern bool sbw_queue_depth_read(int64 *messages, int32 *consumers,
								 TimestampTz *checked_at);

#endif							/* SBW_QUEUE_DEPTH_H */
