/*-------------------------------------------------------------------------
 *
 * stats.h
 *		Shared-memory state (stats.c): one slot per consumer, the mailer's
 *		slot, the launcher's pid and the consumers' flush clock; the stats
 *		view and mailer_status() over them, and waking the workers.
 *
 * The layouts are private to stats.c: every other module goes through
 * these functions, which take the slot's spinlock where one is needed.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_STATS_H
#define SBW_STATS_H

#include "port/atomics.h"
#include "utils/timestamp.h"

typedef enum SbwWorkerState
{
	SBW_STATE_IDLE,
	SBW_STATE_CONNECTING,
	SBW_STATE_CONSUMING,
	SBW_STATE_BACKING_OFF
} SbwWorkerState;

/*
 * Commit-to-acknowledgement waits, per consumer: a histogram with four
 * buckets per power of two of microseconds (sbw_ack_wait_bucket), so that
 * a percentile read from it is within 25 %.
 */
#define SBW_ACK_WAIT_BUCKETS	120

/* Startup: the size to request, then create (or attach to) the state. */
extern Size sbw_shmem_size(void);
extern void sbw_shmem_init(void);

/* Is the shared state there (the library preloaded)? */
extern bool sbw_shmem_ready(void);

/* ---- a consumer's own slot ---- */
extern void sbw_slot_attach(int slot);
extern void sbw_slot_set_state(SbwWorkerState state, const char *broker);
extern void sbw_slot_count(uint64 received, uint64 processed,
						   uint64 dead_lettered, uint64 redelivered,
						   uint64 duplicates);
extern void sbw_slot_error(const char *msg);
extern void sbw_slot_acks(uint64 acked, const uint32 *waits, int pending);
extern int	sbw_ack_wait_bucket(int64 us);

/*
 * When a consumer last flushed the WAL for its acknowledgements (a
 * TimestampTz): the consumers take turns (acks.c).
 */
extern pg_atomic_uint64 *sbw_ack_flush_clock(void);

/*
 * The broker's queue depth (queue_depth.c measures it): store a
 * measurement (0, 0, 0 forgets it); read it, false when unknown or stale.
 */
extern void sbw_queue_depth_store(int64 messages, int32 consumers, TimestampTz at);
extern bool sbw_queue_depth_read(int64 *messages, int32 *consumers,
								 TimestampTz *checked_at);

/* ---- the launcher ---- */
/* Record this process as the launcher until it exits. */
extern void sbw_launcher_attach(void);

/* ---- the mailer ---- */
/* Record this process as the mailer (its latch is woken) until it exits. */
extern void sbw_mailer_attach(void);
/* What the mailer does now, for mailer_status(). */
extern void sbw_mailer_set_state(const char *state);
/* One mail sent; or not sent, failed for good or to be retried. */
extern void sbw_mailer_note_sent(void);
extern void sbw_mailer_note_unsent(bool failed, const char *error);

/*
 * Wake workers when the current transaction commits (not before: they
 * would not see what it wrote): all of them (the launcher, every consumer
 * and the mailer), or only the mailer (mail was queued).
 */
#define SBW_WAKE_ALL		0x01
#define SBW_WAKE_MAILER		0x02
extern void sbw_wake_at_commit(int what);

#endif							/* SBW_STATS_H */
