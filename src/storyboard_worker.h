/*-------------------------------------------------------------------------
 *
 * storyboard_worker.h
 *		What every file of storyboard_worker shares: names, the version of
 *		the SQL objects, our SQLSTATEs.  Each module declares the rest in
 *		its own header (guc.h, stats.h, consumer.h, dispatch.h, ...).
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
 *	stats.c				shared memory (layouts private to it), the stats view,
 *						mailer_status()
 *	subscription.c		the built-in "subscription" plugin
 *	acks.c, ledger.c, scope.c, namecache.c, util.c, extension.c, broker.c,
 *	amqp_tls.c, queue_depth.c	(see their headers)
 *	email.c, render.c	the built-in "email" plugin and its templates
 *	mailer.c, smtp.c	the mailer worker and one mail over SMTP
 *	compat.h			where PostgreSQL 15, 17 and 18 differ
 *
 *-------------------------------------------------------------------------
 */
#ifndef STORYBOARD_WORKER_H
#define STORYBOARD_WORKER_H

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

#endif							/* STORYBOARD_WORKER_H */
