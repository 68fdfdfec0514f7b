/*-------------------------------------------------------------------------
 *
 * broker.h
 *		The broker settings (storyboard_worker.rabbit_*), described once.
 *
 * guc.c binds each rabbit_* setting to a field of sbw_broker; the consumer
 * copies it before a reload and compares the copy with it after (a change
 * means reconnecting); the link (amqp_link.c) connects with it.  A new setting
 * is a new field here and a row of one of guc.c's tables, nothing else.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_BROKER_H
#define SBW_BROKER_H

/* storyboard_worker.rabbit_queue_type */
typedef enum SbwQueueType
{
	SBW_QUEUE_CLASSIC,
	SBW_QUEUE_QUORUM
} SbwQueueType;

typedef struct SbwBrokerSettings
{
	char	   *host;			/* a host, or a comma-separated list of them */
	int			port;
	char	   *user;
	char	   *password;
	char	   *vhost;
	char	   *exchange;
	char	   *queue;
	int			queue_type;		/* SbwQueueType */
	int			heartbeat;		/* seconds, 0 = off */
	int			prefetch;		/* basic.qos prefetch_count */
	bool		use_ssl;
	char	   *ssl_ca_file;	/* "" = none */
	char	   *ssl_cert_file;
	char	   *ssl_key_file;
	bool		ssl_verify_peer;
} SbwBrokerSettings;

/* The current settings: guc.c's rabbit_* variables are its fields. */
extern SbwBrokerSettings sbw_broker;

/* A deep copy in the current memory context, and its comparison. */
extern SbwBrokerSettings *sbw_broker_copy(const SbwBrokerSettings *s);
extern bool sbw_broker_equal(const SbwBrokerSettings *a,
							 const SbwBrokerSettings *b);

#endif							/* SBW_BROKER_H */
