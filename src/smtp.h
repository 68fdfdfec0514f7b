/*-------------------------------------------------------------------------
 *
 * smtp.h
 *		Sending one mail with libcurl's SMTP (smtp.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_SMTP_H
#define SBW_SMTP_H

/* One mail of the outbox, as the mailer read it. */
typedef struct SbwSmtpMail
{
	const char *recipient;
	const char *subject;
	const char *body_text;
	const char *body_html;		/* NULL: text only */
	const char *message_id;
	const char *in_reply_to;	/* NULL: starts no thread */
	const char *kind;			/* X-StoryBoard-Subscription-Type */
} SbwSmtpMail;

typedef enum SbwSmtpResult
{
	SBW_SMTP_SENT,				/* the server answered 250 to the data */
	SBW_SMTP_RETRY,				/* 4xx to this mail (RCPT, DATA): later */
	SBW_SMTP_SESSION_FAILED,	/* no connection, or the session refused
								 * (greeting, EHLO, STARTTLS, AUTH, MAIL FROM,
								 * 421): later, and no other mail meanwhile */
	SBW_SMTP_REFUSED			/* 5xx to this mail, or a bad address: never */
} SbwSmtpResult;

/*
 * Send the mail with the current settings, waiting on the latch (a SIGTERM
 * ends the process at once; a reload waits for the next mail).  On
 * anything but SENT, 'error' says why (the server's reply when there is
 * one).
 */
extern SbwSmtpResult sbw_smtp_send(const SbwSmtpMail *mail, char *error, size_t errlen);

/* Let go of the connection kept between mails (settings changed, exit). */
extern void sbw_smtp_reset(void);

#endif							/* SBW_SMTP_H */
