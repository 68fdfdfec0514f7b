/*-------------------------------------------------------------------------
 *
 * queue_depth.h
 *		The broker's queue depth, measured by consumer 0, shown in stats.
 *
 * Consumer 0 asks the broker (a passive queue.declare) at most every
 * SBW_QUEUE_DEPTH_EVERY_MS while it is connected and keeps the answer in
 * shared memory (stats.c); the stats view shows it on every row, or NULL
 * when it is unknown or stale (consumer 0 not connected).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_QUEUE_DEPTH_H
#define SBW_QUEUE_DEPTH_H

#include "datatype/timestamp.h"

#define SBW_QUEUE_DEPTH_EVERY_MS	5000

struct SbwAmqpLink;

/* Consumer side: is a measurement due, take it, forget it (disconnected). */
extern bool sbw_queue_depth_due(int worker_id, TimestampTz now);
extern bool sbw_queue_depth_refresh(struct SbwAmqpLink *link, char **errmsg);
extern void sbw_queue_depth_forget(int worker_id);

#endif							/* SBW_QUEUE_DEPTH_H */
