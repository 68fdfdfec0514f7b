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

/*
 * Acknowledge every delivery whose commit is durable.  With 'flush', first
 * flush the WAL up to the newest commit (and wait for a synchronous
 * standby), so that everything committed can be acknowledged.  False, and
 * *errmsg, when the connection is lost.
 */
extern bool sbw_acks_send(SbwAmqpLink *link, bool flush, char **errmsg);

/* Committed deliveries not acknowledged yet, and when the oldest committed. */
extern int	sbw_acks_pending(void);
extern TimestampTz sbw_acks_oldest(void);

/* The connection is gone: the broker redelivers what was not acknowledged. */
extern void sbw_acks_forget(void);

#endif							/* SBW_ACKS_H */
