/*-------------------------------------------------------------------------
 *
 * guc.h
 *		Every storyboard_worker.* setting (guc.c).
 *
 * The variables PostgreSQL's GUC machinery writes; read them, never
 * assign them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_GUC_H
#define SBW_GUC_H

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

extern void sbw_define_gucs(void);
extern void sbw_install_log_redaction(void);

#endif							/* SBW_GUC_H */
