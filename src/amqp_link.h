/*-------------------------------------------------------------------------
 *
 * amqp_link.h
 *		One consumer's connection to RabbitMQ, through librabbitmq-c.
 *
 * Everything here is non-blocking or bounded by a timeout, so that the
 * consumer loop can wait on the socket and its latch together
 * (WaitLatchOrSocket) and stay responsive to SIGTERM, reloads and
 * ProcSignalBarriers.  No function here throws (ereport ERROR): failures are
 * returned with a palloc'd message so the caller decides how to back off.
 * The one exception is an interrupt that arrives while sbw_amqp_connect
 * waits for the TCP connect: it is served there (CHECK_FOR_INTERRUPTS), so
 * a SIGTERM ends the process at once.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_AMQP_LINK_H
#define SBW_AMQP_LINK_H

#include "broker.h"

typedef struct SbwAmqpLink SbwAmqpLink;

/* One basic.deliver, copied into palloc'd memory of the current context. */
typedef struct SbwDelivery
{
	uint64		delivery_tag;
	bool		redelivered;
	char	   *routing_key;
	char	   *message_id;		/* bytes as sent, NUL-terminated copy; NULL
								 * when the publisher set none */
	size_t		message_id_len;
	char	   *body;			/* NUL-terminated copy, may contain NULs */
	size_t		body_len;		/* bytes held in body */
	size_t		body_declared_len;	/* bytes sent; more than body_len when
									 * the body was over max_body */
} SbwDelivery;

typedef enum SbwAmqpResult
{
	SBW_AMQP_DELIVERY,			/* *d is filled */
	SBW_AMQP_NONE,				/* nothing buffered or readable right now */
	SBW_AMQP_CLOSED				/* connection or channel lost; *errmsg set */
} SbwAmqpResult;

/*
 * Connect to 'host' (one name or address) with the settings s, within
 * timeout_ms for each of the TCP connect (plus TLS handshake), the AMQP
 * handshake and every RPC; log in, open channel 1, declare the durable
 * topic exchange, the durable queue (x-queue-type when quorum) and its five
 * bindings (task, story, project, project_group, timeline_event), basic.qos
 * and basic.consume with manual acks.  Returns NULL and *errmsg on failure
 * (broker down, wrong password, access refused, TLS failure...); the
 * message says which step failed and the broker's reply text if any.
 */
extern SbwAmqpLink *sbw_amqp_connect(const SbwBrokerSettings *s,
									 const char *host, int timeout_ms,
									 char **errmsg);

/* The socket to wait on with WaitLatchOrSocket. */
extern int	sbw_amqp_socket(SbwAmqpLink *link);

/* "host:port" of the connected broker. */
extern const char *sbw_amqp_peer(SbwAmqpLink *link);

/* The heartbeat interval actually negotiated, in seconds (0 = none). */
extern int	sbw_amqp_heartbeat(SbwAmqpLink *link);

/*
 * Return the next delivery if one is already buffered or readable without
 * waiting; services heartbeats (sends ours, detects the broker's silence).
 * Call it repeatedly until SBW_AMQP_NONE before sleeping on the socket.
 * A body over max_body bytes (0 = no limit) is never held whole: only its
 * first max_body bytes are kept (see SbwDelivery).
 */
extern SbwAmqpResult sbw_amqp_next(SbwAmqpLink *link, SbwDelivery *d,
								   size_t max_body, char **errmsg);

/* basic.ack / basic.nack; false and *errmsg when the connection is gone. */
extern bool sbw_amqp_ack(SbwAmqpLink *link, uint64 tag, bool multiple,
						 char **errmsg);
extern bool sbw_amqp_nack(SbwAmqpLink *link, uint64 tag, bool multiple,
						  bool requeue, char **errmsg);

/*
 * The queue's depth now: a passive queue.declare on channel 1, waiting at
 * most timeout_ms.  Deliveries arriving meanwhile are kept by librabbitmq
 * and come out of sbw_amqp_next next, so call that before sleeping on the
 * socket again.  False and *errmsg when it failed; the link is then broken
 * (a timeout closes the socket; a missing queue, the channel).
 */
extern bool sbw_amqp_queue_depth(SbwAmqpLink *link, int64 *messages,
								 int32 *consumers, char **errmsg);

/* Close politely within timeout_ms, and free everything.  NULL-safe. */
extern void sbw_amqp_close(SbwAmqpLink *link, int timeout_ms);

#endif							/* SBW_AMQP_LINK_H */
