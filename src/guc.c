/*-------------------------------------------------------------------------
 *
 * guc.c
 *		Every storyboard_worker.* setting, in one place.
 *
 * The names mirror StoryBoard's [notifications] options and its
 * enable_notifications switch, so an operator can carry storyboard.conf
 * values over one to one.  All settings the workers read in their loop are
 * PGC_SIGHUP or PGC_SUSET: a pg_reload_conf() reaches the workers at their
 * next wake-up.  The few that shape dispatch itself (role, retries, size
 * limit) are PGC_SUSET so that a superuser running process_event() or
 * replay() by hand can also set them for the session.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "utils/guc.h"

#include "broker.h"
#include "storyboard_worker.h"
#include "guc.h"

bool		sbw_enable_notifications = false;
char	   *sbw_database = NULL;
int			sbw_worker_count = 5;
int			sbw_rabbit_retry_delay = 10;
int			sbw_max_message_bytes = 8 * 1024 * 1024;
int			sbw_max_retries = 5;
int			sbw_max_redeliveries = 5;
int			sbw_batch_size = 1;
int			sbw_ledger_retention = 7 * 24 * 3600;
int			sbw_dead_letter_retention = 0;
int			sbw_failure_log_level = WARNING;
char	   *sbw_role = NULL;

bool		sbw_email_enable = false;
char	   *sbw_email_sender = NULL;
char	   *sbw_email_reply_to = NULL;
char	   *sbw_email_default_url = NULL;
char	   *sbw_email_smtp_host = NULL;
int			sbw_email_smtp_port = 25;
int			sbw_email_smtp_timeout = 10;
char	   *sbw_email_smtp_local_hostname = NULL;
char	   *sbw_email_smtp_user = NULL;
char	   *sbw_email_smtp_password = NULL;
char	   *sbw_email_smtp_ssl_certfile = NULL;
char	   *sbw_email_smtp_ssl_keyfile = NULL;
char	   *sbw_email_smtp_ca_file = NULL;
int			sbw_email_smtp_tls = SBW_SMTP_TLS_OFF;
int			sbw_email_max_attempts = 20;
int			sbw_outbox_retention = 7 * 24 * 3600;

/* The values of the enum settings (hidden: false, the field left out). */
static const struct config_enum_entry queue_type_options[] = {
	{"classic", SBW_QUEUE_CLASSIC},
	{"quorum", SBW_QUEUE_QUORUM},
	{NULL}
};

static const struct config_enum_entry log_level_options[] = {
	{"debug1", DEBUG1},
	{"log", LOG},
	{"notice", NOTICE},
	{"warning", WARNING},
	{NULL}
};

static const struct config_enum_entry smtp_tls_options[] = {
	{"off", SBW_SMTP_TLS_OFF},
	{"starttls", SBW_SMTP_TLS_STARTTLS},
	{"implicit", SBW_SMTP_TLS_IMPLICIT},
	{NULL}
};

/*
 * A mail header value taken from a setting (From, Reply-To) cannot hold a
 * line break: it would end the header and start another one.
 */
static bool
sbw_check_header_value(char **newval, void **extra, GucSource source)
{
	if (*newval && strpbrk(*newval, "\r\n") != NULL)
	{
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errdetail("A mail header value cannot contain a line break.");
		return false;
	}
	return true;
}

/*
 * The EHLO name and the host part of Message-IDs: a host name (letters,
 * digits, dots, hyphens), or empty for this host's own name.
 */
static bool
sbw_check_host_name(char **newval, void **extra, GucSource source)
{
	if (*newval && strspn(*newval, SBW_HOST_NAME_CHARS) != strlen(*newval))
	{
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errdetail("A host name holds only letters, digits, dots and hyphens.");
		return false;
	}
	return true;
}

/*
 * The settings, one table per type, each row what DefineCustom*Variable
 * takes (no assign or show hooks: none is needed).  The rabbit_* rows are
 * StoryBoard's [notifications] options, each a field of sbw_broker
 * (broker.h) but the reconnect back-off, which is not part of a
 * connection; the email_* rows its [plugin_email] options, plus what it
 * lacks (STARTTLS, a CA file, attempts, retention).  All reload.
 */
typedef struct SbwSettingText
{
	const char *name;
	const char *desc;
	const char *long_desc;		/* left out: none */
} SbwSettingText;

typedef struct SbwBoolSetting
{
	SbwSettingText t;
	bool	   *var;
	bool		boot;
	GucContext	context;
	int			flags;
} SbwBoolSetting;

typedef struct SbwIntSetting
{
	SbwSettingText t;
	int		   *var;
	int			boot;
	int			min;
	int			max;
	GucContext	context;
	int			flags;
} SbwIntSetting;

typedef struct SbwStringSetting
{
	SbwSettingText t;
	char	  **var;
	const char *boot;
	GucContext	context;
	int			flags;
	GucStringCheckHook check;	/* left out: none */
} SbwStringSetting;

typedef struct SbwEnumSetting
{
	SbwSettingText t;
	int		   *var;
	int			boot;
	const struct config_enum_entry *options;
	GucContext	context;
	int			flags;
} SbwEnumSetting;

static const SbwBoolSetting bool_settings[] = {
	{{"storyboard_worker.email_enable", "Queue and send email notifications (StoryBoard's [plugin_email] enable).", "Turns the email plugin and the mailer worker on."},
	 &sbw_email_enable, false, PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_use_ssl", "Connect to RabbitMQ over TLS."},
	 &sbw_broker.use_ssl, false, PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_ssl_verify_peer", "Verify the broker's certificate and host name."},
	 &sbw_broker.ssl_verify_peer, true, PGC_SIGHUP, 0},
	{{"storyboard_worker.enable_notifications", "Consume StoryBoard events from RabbitMQ.", "Mirrors StoryBoard's enable_notifications; when off the workers hold no broker connection."},
	 &sbw_enable_notifications, false, PGC_SIGHUP, 0},
};

static const SbwIntSetting int_settings[] = {
	{{"storyboard_worker.email_smtp_port", "SMTP server port."},
	 &sbw_email_smtp_port, 25, 1, 65535, PGC_SIGHUP, 0},
	{{"storyboard_worker.email_smtp_timeout", "Time allowed to connect to the SMTP server and for each of its replies."},
	 &sbw_email_smtp_timeout, 10, 1, 600, PGC_SIGHUP, GUC_UNIT_S},
	{{"storyboard_worker.email_max_attempts", "Attempts at a mail the SMTP server keeps refusing for now (4xx, no connection) before it is marked failed."},
	 &sbw_email_max_attempts, 20, 1, 1000, PGC_SIGHUP, 0},
	{{"storyboard_worker.outbox_retention", "How long sent mail is kept in storyboard_worker.outbox."},
	 &sbw_outbox_retention, 7 * 24 * 3600, 60, INT_MAX, PGC_SIGHUP, GUC_UNIT_S},
	{{"storyboard_worker.rabbit_port", "The RabbitMQ broker port."},
	 &sbw_broker.port, 5672, 1, 65535, PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_retry_delay", "Seconds between connection attempts (the cap of the reconnect back-off)."},
	 &sbw_rabbit_retry_delay, 10, 1, 3600, PGC_SIGHUP, GUC_UNIT_S},
	{{"storyboard_worker.rabbit_heartbeat", "AMQP heartbeat interval; a silent broker is dropped after two intervals.", "0 disables heartbeats."},
	 &sbw_broker.heartbeat, 30, 0, 3600, PGC_SIGHUP, GUC_UNIT_S},
	{{"storyboard_worker.rabbit_prefetch", "Unacknowledged deliveries the broker may send each consumer."},
	 &sbw_broker.prefetch, 100, 1, 65535, PGC_SIGHUP, 0},
	{{"storyboard_worker.worker_count", "Number of consumer workers (StoryBoard's --worker-count)."},
	 &sbw_worker_count, 5, 0, SBW_MAX_WORKERS, PGC_SIGHUP, 0},
	{{"storyboard_worker.max_message_bytes", "Largest message body decoded; larger ones are dead-lettered."},
	 &sbw_max_message_bytes, 8 * 1024 * 1024, 1024, INT_MAX, PGC_SUSET, GUC_UNIT_BYTE},
	{{"storyboard_worker.max_retries", "Retries of a plugin after a transient error before dead-lettering."},
	 &sbw_max_retries, 5, 0, 100, PGC_SUSET, 0},
	{{"storyboard_worker.max_redeliveries", "Times a message may crash its consumer or fail at commit before it is dead-lettered unrun.", "Counted for redelivered messages only; 0 turns the count off."},
	 &sbw_max_redeliveries, 5, 0, 1000, PGC_SIGHUP, 0},
	{{"storyboard_worker.batch_size", "Events committed together in one transaction (each in its own subtransaction)."},
	 &sbw_batch_size, 1, 1, 1000, PGC_SIGHUP, 0},
	{{"storyboard_worker.ledger_retention", "How long processed messages are remembered to recognise redeliveries."},
	 &sbw_ledger_retention, 7 * 24 * 3600, 60, INT_MAX, PGC_SIGHUP, GUC_UNIT_S},
	{{"storyboard_worker.dead_letter_retention", "How long dead letters are kept; 0 keeps them until deleted or replayed."},
	 &sbw_dead_letter_retention, 0, 0, INT_MAX, PGC_SIGHUP, GUC_UNIT_S},
};

static const SbwStringSetting string_settings[] = {
	{{"storyboard_worker.email_sender", "From header and envelope sender of notification mail."},
	 &sbw_email_sender, "StoryBoard (Do Not Reply) <do_not_reply@storyboard.openstack.org>", PGC_SIGHUP, 0, sbw_check_header_value},
	{{"storyboard_worker.email_reply_to", "Reply-To header of notification mail; empty for none."},
	 &sbw_email_reply_to, "", PGC_SIGHUP, 0, sbw_check_header_value},
	{{"storyboard_worker.email_default_url", "Base of the links in mail when an event carries no URL."},
	 &sbw_email_default_url, "", PGC_SIGHUP, 0},
	{{"storyboard_worker.email_smtp_host", "SMTP server."},
	 &sbw_email_smtp_host, "localhost", PGC_SIGHUP, 0},
	{{"storyboard_worker.email_smtp_local_hostname", "Name given in EHLO and in Message-IDs; empty for this host's name."},
	 &sbw_email_smtp_local_hostname, "", PGC_SIGHUP, 0, sbw_check_host_name},
	{{"storyboard_worker.email_smtp_user", "SMTP login; empty for none."},
	 &sbw_email_smtp_user, "", PGC_SIGHUP, 0},
	{{"storyboard_worker.email_smtp_password", "SMTP password."},
	 &sbw_email_smtp_password, "", PGC_SIGHUP, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL},
	{{"storyboard_worker.email_smtp_ssl_certfile", "Client certificate presented to the SMTP server."},
	 &sbw_email_smtp_ssl_certfile, "", PGC_SIGHUP, 0},
	{{"storyboard_worker.email_smtp_ssl_keyfile", "Private key of the client certificate."},
	 &sbw_email_smtp_ssl_keyfile, "", PGC_SIGHUP, GUC_SUPERUSER_ONLY},
	{{"storyboard_worker.email_smtp_ca_file", "Certificate authority file to verify the SMTP server with; empty for the system's."},
	 &sbw_email_smtp_ca_file, "", PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_host", "Host of the RabbitMQ server; a comma-separated list is tried in turn."},
	 &sbw_broker.host, "localhost", PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_userid", "The RabbitMQ userid."},
	 &sbw_broker.user, "storyboard", PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_password", "The RabbitMQ password."},
	 &sbw_broker.password, "storyboard", PGC_SIGHUP, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL},
	{{"storyboard_worker.rabbit_virtual_host", "The virtual host within which our queues and exchanges live."},
	 &sbw_broker.vhost, "/", PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_exchange_name", "The topic exchange StoryBoard publishes its events to."},
	 &sbw_broker.exchange, "storyboard", PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_event_queue_name", "The queue declared and consumed for API events."},
	 &sbw_broker.queue, "storyboard_events", PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_ssl_ca_file", "Certificate authority file to verify the broker with."},
	 &sbw_broker.ssl_ca_file, "", PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_ssl_cert_file", "Client certificate file presented to the broker."},
	 &sbw_broker.ssl_cert_file, "", PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_ssl_key_file", "Private key of the client certificate."},
	 &sbw_broker.ssl_key_file, "", PGC_SIGHUP, GUC_SUPERUSER_ONLY},
	{{"storyboard_worker.database", "Database holding StoryBoard's tables, where the consumers run."},
	 &sbw_database, "storyboard", PGC_SIGHUP, 0},
	{{"storyboard_worker.role", "Role the plugins run as.", "Empty means the owner of the database."},
	 &sbw_role, "", PGC_SUSET, 0},
};

static const SbwEnumSetting enum_settings[] = {
	{{"storyboard_worker.email_smtp_tls", "TLS to the SMTP server: off, starttls (required), or implicit (SMTPS)."},
	 &sbw_email_smtp_tls, SBW_SMTP_TLS_OFF, smtp_tls_options, PGC_SIGHUP, 0},
	{{"storyboard_worker.rabbit_queue_type", "Type of the event queue declared: classic (StoryBoard's) or quorum."},
	 &sbw_broker.queue_type, SBW_QUEUE_CLASSIC, queue_type_options, PGC_SIGHUP, 0},
	{{"storyboard_worker.plugin_failure_log_level", "Level of the log line for each plugin failure and each message kept undecoded.", "The dead letter is kept whatever the level."},
	 &sbw_failure_log_level, WARNING, log_level_options, PGC_SUSET, 0},
};

static emit_log_hook_type prev_emit_log_hook = NULL;

/*
 * Keep the passwords out of the server log.  On a reload the postmaster
 * logs every changed setting with its new value ("parameter ... changed to
 * ..."), superuser-only ones included; this log hook cuts the value off
 * that line for our password settings.
 */
static void
sbw_redact_passwords(ErrorData *edata)
{
	if (edata->message_id != NULL && edata->message != NULL &&
		strcmp(edata->message_id, "parameter \"%s\" changed to \"%s\"") == 0 &&
		(strstr(edata->message, "\"storyboard_worker.email_smtp_password\"") != NULL ||
		 strstr(edata->message, "\"storyboard_worker.rabbit_password\"") != NULL))
	{
		char	   *cut = strstr(edata->message, "\" ");

		if (cut != NULL)
			edata->message = psprintf("%.*s\" changed (value not shown)",
									  (int) (cut - edata->message), edata->message);
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/* Install the log hook above (from _PG_init, once per process). */
void
sbw_install_log_redaction(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = sbw_redact_passwords;
}

/*
 * Define the settings.  Called from _PG_init, in the postmaster when the
 * library is preloaded and in any backend that loads it later (so SHOW works
 * there too).
 */
void
sbw_define_gucs(void)
{
	int			i;

	for (i = 0; i < lengthof(bool_settings); i++)
	{
		const SbwBoolSetting *s = &bool_settings[i];

		DefineCustomBoolVariable(s->t.name, s->t.desc, s->t.long_desc, s->var, s->boot,
								 s->context, s->flags, NULL, NULL, NULL);
	}
	for (i = 0; i < lengthof(int_settings); i++)
	{
		const SbwIntSetting *s = &int_settings[i];

		DefineCustomIntVariable(s->t.name, s->t.desc, s->t.long_desc, s->var, s->boot,
								s->min, s->max, s->context, s->flags, NULL, NULL, NULL);
	}
	for (i = 0; i < lengthof(string_settings); i++)
	{
		const SbwStringSetting *s = &string_settings[i];

		DefineCustomStringVariable(s->t.name, s->t.desc, s->t.long_desc, s->var, s->boot,
								   s->context, s->flags, s->check, NULL, NULL);
	}
	for (i = 0; i < lengthof(enum_settings); i++)
	{
		const SbwEnumSetting *s = &enum_settings[i];

		DefineCustomEnumVariable(s->t.name, s->t.desc, s->t.long_desc, s->var, s->boot,
								 s->options, s->context, s->flags, NULL, NULL, NULL);
	}
	MarkGUCPrefixReserved("storyboard_worker");
}
