/*-------------------------------------------------------------------------
 *
 * acks.h
 *		Acknowledge on WAL flush (acks.c).
 *
 * The consumer commits each transaction without waiting for its WAL to be
 * flushed, and hands the commit's end LSN here with the deliveries it
 * holds.  They are acknowledged to the broker only once the WAL holding
 * that commit record is flushed (and, with synchronous replication, as
 * durable on the standby as synchronous_commit promises), in order, with
 * basic.ack multiple=true.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_ACKS_H
#define SBW_ACKS_H

#include "access/xlogdefs.h"
#include "datatype/timestamp.h"

#include "amqp_link.h"

/* Deliveries up to 'tag' committed in a transaction ending at 'lsn'. */
extern void sbw_acks_committed(uint64 tag, int n, XLogRecPtr lsn);

/* Whether sbw_acks_send flushes the WAL itself first. */
typedef enum SbwAckFlush
{
	SBW_ACK_DURABLE,			/* no: acknowledge what is durable already */
	SBW_ACK_GROUP,				/* if no consumer flushed in the last
								 * SBW_ACK_FLUSH_INTERVAL_US */
	SBW_ACK_FLUSH,				/* yes (prefetch window filling up,
								 * disconnecting, exiting) */
} SbwAckFlush;

/*
 * The shortest time between two flushes made for acknowledgements, among
 * all consumers (SBW_ACK_GROUP): every flush covers every commit made
 * before it, whoever made it, so consumers whose queues run dry one event
 * at a time share flushes instead of each paying an fsync per event.
 */
#define SBW_ACK_FLUSH_INTERVAL_US	2000

/*
 * Acknowledge every delivery whose commit is durable, after flushing the
 * WAL up to the newest commit (and waiting for a synchronous standby) as
 * 'how' says.  False, and *errmsg, when the connection is lost.
 */
extern bool sbw_acks_send(SbwAmqpLink *link, SbwAckFlush how, char **errmsg);

/* Committed deliveries not acknowledged yet. */
extern int	sbw_acks_pending(void);

/*
 * With deliveries pending, how long until a SBW_ACK_GROUP send may flush
 * (at least 1 ms); -1 when nothing is pending.
 */
extern long sbw_acks_wait_ms(void);

/* The connection is gone: the broker redelivers what was not acknowledged. */
extern void sbw_acks_forget(void);

#endif							/* SBW_ACKS_H */
