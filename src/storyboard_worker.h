/*-------------------------------------------------------------------------
 *
 * storyboard_worker.h
 *		Declarations shared by the files of storyboard_worker.
 *
 * Files, one concern each:
 *	storyboard_worker.c	_PG_init: GUCs, shared memory, launcher registration
 *	guc.c				every storyboard_worker.* setting
 *	launcher.c			keeps worker_count consumers (and the mailer) alive
 *	consumer.c			one consumer: wait, drain, dispatch, ack, back off
 *	amqp_link.c			librabbitmq: connect, declare, consume, ack
 *	event_decode.c		json-c: message body -> SbwEvent
 *	dispatch.c			one event, one transaction, plugins in savepoints
 *	plugins.c			the plugin registry and its cache
 *	stats.c				shared-memory counters, the stats view
 *	subscription.c		the built-in "subscription" plugin
 *	acks.c, ledger.c, scope.c, namecache.c, util.c, broker.c, amqp_tls.c,
 *	queue_depth.c	(see their headers)
 *	email.c, render.c	the built-in "email" plugin and its templates
 *	mailer.c, smtp.c	the mailer worker and one mail over SMTP
 *	compat.h			where PostgreSQL 15, 17 and 18 differ
 *
 *-------------------------------------------------------------------------
 */
#ifndef STORYBOARD_WORKER_H
#define STORYBOARD_WORKER_H

#include "fmgr.h"
#include "nodes/pg_list.h"
#include "port/atomics.h"
#include "storage/lwlock.h"
#include "storage/s_lock.h"
#include "utils/timestamp.h"

#include "queue_depth.h"

#define SBW_EXTENSION_NAME	"storyboard_worker"
#define SBW_SCHEMA_NAME		"storyboard_worker"
#define SBW_MAX_WORKERS		64

/*
 * The version of the SQL objects this library is built for: the consumers
 * stay idle until ALTER EXTENSION storyboard_worker UPDATE brings an older
 * install to it (they need its tables: the redelivery count, the ledger).
 */
#define SBW_EXTENSION_VERSION	"1.5"

/*
 * SQLSTATE a plugin raises to ask for a retry later ("not yet"), e.g. when
 * the API transaction that published the event has not committed yet.
 */
#define ERRCODE_SBW_RETRY_LATER	MAKE_SQLSTATE('S','B','0','0','1')

/*
 * SQLSTATE of a message given up on without running its plugins: it
 * crashed its consumer or failed at COMMIT max_redeliveries times.
 */
#define ERRCODE_SBW_POISON		MAKE_SQLSTATE('S','B','0','0','2')

/* ---- guc.c ---- */
extern bool sbw_enable_notifications;
extern char *sbw_database;
extern int	sbw_worker_count;
extern int	sbw_rabbit_retry_delay;
extern int	sbw_max_message_bytes;
extern int	sbw_max_retries;
extern int	sbw_max_redeliveries;
extern int	sbw_batch_size;
extern int	sbw_ledger_retention;
extern int	sbw_dead_letter_retention;
extern int	sbw_failure_log_level;
extern char *sbw_role;
extern bool sbw_email_enable;
extern char *sbw_email_sender;
extern char *sbw_email_reply_to;
extern char *sbw_email_default_url;
extern char *sbw_email_smtp_host;
extern int	sbw_email_smtp_port;
extern int	sbw_email_smtp_timeout;
extern char *sbw_email_smtp_local_hostname;
extern char *sbw_email_smtp_user;
extern char *sbw_email_smtp_password;
extern char *sbw_email_smtp_ssl_certfile;
extern char *sbw_email_smtp_ssl_keyfile;
extern char *sbw_email_smtp_ca_file;
extern int	sbw_email_smtp_tls;
extern int	sbw_email_max_attempts;
extern int	sbw_outbox_retention;

/* What a host name (EHLO, Message-IDs) may hold. */
#define SBW_HOST_NAME_CHARS \
	"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-"

typedef enum SbwSmtpTls
{
	SBW_SMTP_TLS_OFF,
	SBW_SMTP_TLS_STARTTLS,
	SBW_SMTP_TLS_IMPLICIT
} SbwSmtpTls;

typedef enum SbwQueueType
{
	SBW_QUEUE_CLASSIC,
	SBW_QUEUE_QUORUM
} SbwQueueType;

extern void sbw_define_gucs(void);
extern void sbw_install_log_redaction(void);

/* ---- stats.c: shared state, one slot per consumer ---- */
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

typedef struct SbwWorkerSlot
{
	slock_t		mutex;
	int			pid;			/* 0 = slot unused */
	SbwWorkerState state;
	char		broker[128];
	TimestampTz connected_since;
	uint64		received;
	uint64		processed;
	uint64		dead_lettered;
	uint64		redelivered;
	uint64		duplicates;		/* redelivered and found in the ledger */
	char		last_error[256];
	TimestampTz last_error_at;
	uint64		acked;			/* deliveries acknowledged */
	int			acks_pending;	/* committed, not acknowledged yet */
	uint64		ack_waits[SBW_ACK_WAIT_BUCKETS];
} SbwWorkerSlot;

/* The mailer's shared state (mailer.c), read by mailer_status(). */
typedef struct SbwMailerSlot
{
	slock_t		mutex;
	int			pid;			/* 0 = not running */
	struct Latch *latch;		/* set to wake it (mails queued) */
	char		state[16];
	uint64		sent;
	uint64		failed;
	uint64		retried;
	TimestampTz last_sent_at;
	char		last_error[256];
	TimestampTz last_error_at;
} SbwMailerSlot;

typedef struct SbwShared
{
	int			launcher_pid;
	SbwMailerSlot mailer;
	/* when a consumer last flushed the WAL for its acknowledgements (acks.c) */
	pg_atomic_uint64 last_ack_flush;
	SbwQueueDepth queue_depth;	/* queue_depth.c */
	SbwWorkerSlot slots[SBW_MAX_WORKERS];
} SbwShared;

extern SbwShared *sbw_shared;
extern Size sbw_shmem_size(void);
extern void sbw_shmem_init(void);
extern void sbw_slot_attach(int slot);

/*
 * Wake workers when the current transaction commits (not before: they
 * would not see what it wrote): all of them (the launcher, every consumer
 * and the mailer), or only the mailer (mail was queued).
 */
#define SBW_WAKE_ALL		0x01
#define SBW_WAKE_MAILER		0x02
extern void sbw_wake_at_commit(int what);
extern void sbw_slot_set_state(SbwWorkerState state, const char *broker);
extern void sbw_slot_count(uint64 received, uint64 processed,
						   uint64 dead_lettered, uint64 redelivered,
						   uint64 duplicates);
extern void sbw_slot_error(const char *msg);
extern void sbw_slot_acks(uint64 acked, const uint32 *waits, int pending);
extern int	sbw_ack_wait_bucket(int64 us);

/* ---- launcher.c / consumer.c ---- */
extern void sbw_register_launcher(void);
PGDLLEXPORT void sbw_launcher_main(Datum main_arg);
PGDLLEXPORT void sbw_consumer_main(Datum main_arg);

/* ---- dispatch.c ---- */
/*
 * A message: its body and the delivery's metadata.  routing_key and
 * message_id are text that PostgreSQL can store (sbw_storable_text);
 * message_id_raw holds the id's bytes as sent, for the ledger key.
 */
typedef struct SbwMessage
{
	const char *routing_key;
	const char *message_id;		/* NULL when the publisher set none */
	const char *message_id_raw;
	size_t		message_id_len;
	bool		redelivered;
	const char *body;
	size_t		body_len;		/* bytes held in body */
	size_t		body_declared_len;	/* bytes sent: more when cut short */
} SbwMessage;

#endif							/* STORYBOARD_WORKER_H */
