/*-------------------------------------------------------------------------
 *
 * email.h
 *		The built-in "email" plugin (email.c): queues StoryBoard's
 *		notification mails in storyboard_worker.outbox.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_EMAIL_H
#define SBW_EMAIL_H

/* The host name mails carry (Message-ID, threads, EHLO); palloc'd. */
extern char *sbw_email_host(void);

/* A subject made one header line of at most 78 characters; palloc'd. */
extern char *sbw_email_subject_line(const char *s);

#endif							/* SBW_EMAIL_H */
