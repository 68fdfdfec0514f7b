/*-------------------------------------------------------------------------
 *
 * smtp.c
 *		Sending one mail with libcurl's SMTP.
 *
 * libcurl speaks the protocol (EHLO, STARTTLS, AUTH, MAIL FROM, RCPT TO,
 * DATA with dot-stuffing) and builds the MIME structure (curl_mime, with
 * quoted-printable parts); what is left here is the header block, the
 * settings, and waiting.  The transfer runs on a multi handle whose
 * sockets are waited on together with the process latch, so a SIGTERM
 * ends the process during a slow server's reply; the multi handle is kept
 * between mails, and with it the open connection (a reused SMTP session
 * saves the greeting, EHLO, TLS and AUTH round trips for every mail).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/select.h>
#include <time.h>
#include <curl/curl.h>

#include "common/base64.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "postmaster/interrupt.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#include "compat.h"
#include "email.h"
#include "smtp.h"
#include "storyboard_worker.h"
#include "guc.h"

/* Raw bytes per RFC 2047 encoded-word: 60 base64 characters. */
#define SBW_WORD_BYTES		45

static CURLM *multi = NULL;

/* What the server last refused, and the command we sent last (debug callback). */
static char last_reply[256];
static char last_command[16];

/* See smtp.h. */
void
sbw_smtp_reset(void)
{
	if (multi != NULL)
	{
		curl_multi_cleanup(multi);
		multi = NULL;
	}
}

/*
 * libcurl's debug callback: keep the command we sent last (for SMTP,
 * CURLINFO_HEADER_OUT: the message itself is DATA_OUT) and the server's
 * last 4xx or 5xx reply line (HEADER_IN), to tell a refusal of this mail
 * from one of the session, and to report it in the server's own words.
 */
static int
sbw_smtp_debug(CURL *easy, curl_infotype type, char *data, size_t size, void *arg)
{
	size_t		n = Min(size, sizeof(last_reply) - 1);

	if (type == CURLINFO_HEADER_OUT)
	{
		char		verb[sizeof(last_command)];
		size_t		i;

		for (i = 0; i < size && i < sizeof(verb) - 1 &&
			 data[i] != ' ' && data[i] != '\r' && data[i] != '\n'; i++)
			verb[i] = data[i];
		verb[i] = '\0';
		/* the QUIT or RSET that follows a refusal does not replace it */
		if (strcmp(verb, "QUIT") != 0 && strcmp(verb, "RSET") != 0)
			strlcpy(last_command, verb, sizeof(last_command));
		return 0;
	}

	/* a refusal, not the 221 to the QUIT that follows it */
	if (type != CURLINFO_HEADER_IN || n == 0 || (data[0] != '4' && data[0] != '5'))
		return 0;
	memcpy(last_reply, data, n);
	last_reply[n] = '\0';
	while (n > 0 && (last_reply[n - 1] == '\n' || last_reply[n - 1] == '\r'))
		last_reply[--n] = '\0';
	return 0;
}

/* Is s all 7-bit printable (a header value that needs no encoding)? */
static bool
sbw_is_ascii_line(const char *s)
{
	for (; *s; s++)
		if ((unsigned char) *s < 0x20 || (unsigned char) *s > 0x7e)
			return false;
	return true;
}

/*
 * A header value as RFC 2047 encoded-words (UTF-8, base64), cut at
 * character boundaries, when it is not plain ASCII; control characters
 * were already turned into spaces (sbw_email_subject_line).
 */
static char *
sbw_encode_words(const char *s)
{
	StringInfoData buf;
	int			len = strlen(s);
	int			pos = 0;

	if (sbw_is_ascii_line(s))
		return pstrdup(s);
	initStringInfo(&buf);
	while (pos < len)
	{
		int			chunk = pg_mbcliplen(s + pos, len - pos, SBW_WORD_BYTES);
		char		b64[SBW_WORD_BYTES * 2];
		int			n;

		if (chunk <= 0)
			chunk = Min(len - pos, SBW_WORD_BYTES);
		n = pg_b64_encode((const void *) (s + pos), chunk, b64, sizeof(b64));
		if (n < 0)
			elog(ERROR, "could not base64-encode a header");
		appendStringInfo(&buf, "%s=?UTF-8?B?%.*s?=", pos > 0 ? " " : "", n, b64);
		pos += chunk;
	}
	return buf.data;
}

/* Text with every line ending CRLF, as SMTP wants it. */
static char *
sbw_crlf(const char *s)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (; *s; s++)
	{
		if (*s == '\n' && (buf.len == 0 || buf.data[buf.len - 1] != '\r'))
			appendStringInfoChar(&buf, '\r');
		appendStringInfoChar(&buf, *s);
	}
	return buf.data;
}

/* The Date header for now (RFC 5322, UTC, English names in any locale). */
static char *
sbw_date_header(void)
{
	static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
	static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
	"Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
	time_t		now = time(NULL);
	struct tm	tm;

	gmtime_r(&now, &tm);
	return psprintf("Date: %s, %02d %s %04d %02d:%02d:%02d +0000",
					days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon],
					tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* Append "Name: value" if the value is one clean line; false if not. */
static bool
sbw_add_header(struct curl_slist **list, const char *name, const char *value)
{
	struct curl_slist *l;

	if (value == NULL || value[0] == '\0')
		return true;
	if (strpbrk(value, "\r\n") != NULL)
		return false;
	l = curl_slist_append(*list, psprintf("%s: %s", name, value));
	if (l == NULL)
		elog(ERROR, "out of memory building mail headers");
	*list = l;
	return true;
}

/* The header block (everything but the MIME headers curl writes). */
static struct curl_slist *
sbw_mail_headers(const SbwSmtpMail *mail)
{
	struct curl_slist *list = curl_slist_append(NULL, sbw_date_header());
	bool		ok = (list != NULL);

	ok = ok && sbw_add_header(&list, "From", sbw_email_sender);
	ok = ok && sbw_add_header(&list, "To", mail->recipient);
	ok = ok && sbw_add_header(&list, "Subject",
							  sbw_encode_words(sbw_email_subject_line(mail->subject)));
	ok = ok && sbw_add_header(&list, "Message-ID", mail->message_id);
	ok = ok && sbw_add_header(&list, "In-Reply-To", mail->in_reply_to);
	ok = ok && sbw_add_header(&list, "References", mail->in_reply_to);
	ok = ok && sbw_add_header(&list, "Reply-To", sbw_email_reply_to);
	ok = ok && sbw_add_header(&list, "Auto-Submitted", "auto-generated");
	ok = ok && sbw_add_header(&list, "X-StoryBoard-Subscription-Type", mail->kind);
	if (!ok)
	{
		curl_slist_free_all(list);
		return NULL;
	}
	return list;
}

/* One text part: UTF-8, quoted-printable. */
static void
sbw_add_text_part(curl_mime *mime, const char *type, const char *text)
{
	curl_mimepart *part = curl_mime_addpart(mime);

	curl_mime_data(part, sbw_crlf(text), CURL_ZERO_TERMINATED);
	curl_mime_type(part, type);
	curl_mime_encoder(part, "quoted-printable");
}

/*
 * The body: the text part, and with an HTML template the two as
 * multipart/alternative (text first, as StoryBoard's factory does).
 */
static curl_mime *
sbw_mail_body(CURL *easy, const SbwSmtpMail *mail)
{
	curl_mime  *mime = curl_mime_init(easy);

	if (mail->body_html == NULL)
		sbw_add_text_part(mime, "text/plain; charset=utf-8", mail->body_text);
	else
	{
		curl_mime  *alt = curl_mime_init(easy);
		curl_mimepart *part;

		sbw_add_text_part(alt, "text/plain; charset=utf-8", mail->body_text);
		sbw_add_text_part(alt, "text/html; charset=utf-8", mail->body_html);
		part = curl_mime_addpart(mime);
		curl_mime_subparts(part, alt);
		curl_mime_type(part, "multipart/alternative");
	}
	return mime;
}

/* The envelope sender: the address inside <...> of the From, or all of it. */
static char *
sbw_envelope_sender(void)
{
	const char *open = strrchr(sbw_email_sender, '<');
	const char *close = open ? strchr(open, '>') : NULL;

	if (open && close)
		return pnstrdup(open + 1, close - open - 1);
	return pstrdup(sbw_email_sender);
}

/*
 * A recipient address we can put in RCPT TO and To: non-empty, one line,
 * no spaces or angle brackets, an @ with something on both sides.
 */
static bool
sbw_address_ok(const char *a)
{
	const char *at = strchr(a, '@');

	return a[0] != '\0' && at != NULL && at != a && at[1] != '\0' &&
		strpbrk(a, " \t\r\n<>,;\"") == NULL && sbw_is_ascii_line(a);
}

/*
 * The server's URL: smtp:// or smtps:// (implicit TLS), the EHLO name as
 * its path.  StoryBoard switches to SMTP over TLS when both a client key
 * and certificate are set; so do we when email_smtp_tls is off.
 */
static char *
sbw_smtp_url(void)
{
	bool		implicit = (sbw_email_smtp_tls == SBW_SMTP_TLS_IMPLICIT) ||
		(sbw_email_smtp_tls == SBW_SMTP_TLS_OFF &&
		 sbw_email_smtp_ssl_certfile[0] && sbw_email_smtp_ssl_keyfile[0]);
	const char *host = sbw_email_smtp_host;
	bool		v6 = strchr(host, ':') != NULL;

	return psprintf("%s://%s%s%s:%d/%s", implicit ? "smtps" : "smtp",
					v6 ? "[" : "", host, v6 ? "]" : "", sbw_email_smtp_port,
					sbw_email_host());
}

/* Set an option; an option this libcurl refuses is a build problem. */
#define SBW_CURL_SET(easy, opt, val) \
	do { \
		CURLcode rc_ = curl_easy_setopt((easy), (opt), (val)); \
		if (rc_ != CURLE_OK) \
			elog(ERROR, "libcurl refused option %s: %s", #opt, curl_easy_strerror(rc_)); \
	} while (0)

/* Everything but the message itself, from the current settings. */
static void
sbw_smtp_configure(CURL *easy, struct curl_slist *rcpt, char *errbuf)
{
	long		timeout = sbw_email_smtp_timeout;

	SBW_CURL_SET(easy, CURLOPT_URL, sbw_smtp_url());
	SBW_CURL_SET(easy, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
	SBW_CURL_SET(easy, CURLOPT_NOSIGNAL, 1L);
	SBW_CURL_SET(easy, CURLOPT_ERRORBUFFER, errbuf);
	SBW_CURL_SET(easy, CURLOPT_VERBOSE, 1L);
	SBW_CURL_SET(easy, CURLOPT_DEBUGFUNCTION, sbw_smtp_debug);
	SBW_CURL_SET(easy, CURLOPT_CONNECTTIMEOUT, timeout);
	SBW_CURL_SET(easy, CURLOPT_SERVER_RESPONSE_TIMEOUT, timeout);
	SBW_CURL_SET(easy, CURLOPT_TIMEOUT, timeout * 6);
	SBW_CURL_SET(easy, CURLOPT_MAIL_FROM, sbw_envelope_sender());
	SBW_CURL_SET(easy, CURLOPT_MAIL_RCPT, rcpt);
	if (sbw_email_smtp_tls == SBW_SMTP_TLS_STARTTLS)
		SBW_CURL_SET(easy, CURLOPT_USE_SSL, (long) CURLUSESSL_ALL);
	if (sbw_email_smtp_ca_file[0])
		SBW_CURL_SET(easy, CURLOPT_CAINFO, sbw_email_smtp_ca_file);
	if (sbw_email_smtp_ssl_certfile[0])
		SBW_CURL_SET(easy, CURLOPT_SSLCERT, sbw_email_smtp_ssl_certfile);
	if (sbw_email_smtp_ssl_keyfile[0])
		SBW_CURL_SET(easy, CURLOPT_SSLKEY, sbw_email_smtp_ssl_keyfile);
	/* StoryBoard logs in only when both are set */
	if (sbw_email_smtp_user[0] && sbw_email_smtp_password[0])
	{
		SBW_CURL_SET(easy, CURLOPT_USERNAME, sbw_email_smtp_user);
		SBW_CURL_SET(easy, CURLOPT_PASSWORD, sbw_email_smtp_password);
	}
}

/* Wait for the transfer's sockets, the latch, or curl's next timeout. */
static void
sbw_smtp_wait_once(void)
{
	fd_set		rd,
				wr,
				ex;
	int			maxfd = -1;
	long		timeout_ms = -1;
	WaitEventSet *set;
	WaitEvent	ev;
	int			fd;

	FD_ZERO(&rd);
	FD_ZERO(&wr);
	FD_ZERO(&ex);
	curl_multi_fdset(multi, &rd, &wr, &ex, &maxfd);
	curl_multi_timeout(multi, &timeout_ms);
	if (timeout_ms < 0 || timeout_ms > 1000)
		timeout_ms = 1000;
	set = sbw_create_wait_event_set(CurrentMemoryContext, maxfd + 4);
	AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	for (fd = 0; fd <= maxfd; fd++)
	{
		uint32		events = (FD_ISSET(fd, &rd) ? WL_SOCKET_READABLE : 0) |
			(FD_ISSET(fd, &wr) ? WL_SOCKET_WRITEABLE : 0);

		if (events != 0)
			AddWaitEventToSet(set, events, fd, NULL, NULL);
	}
	if (timeout_ms > 0 &&
		WaitEventSetWait(set, timeout_ms, &ev, 1, PG_WAIT_EXTENSION) > 0 &&
		(ev.events & WL_LATCH_SET))
		ResetLatch(MyLatch);
	FreeWaitEventSet(set);
	CHECK_FOR_INTERRUPTS();
}

/* Run the transfer to its end; its result. */
static CURLcode
sbw_smtp_run(CURL *easy)
{
	int			running = 1;
	CURLMsg    *msg;
	int			left;
	CURLcode	result = CURLE_FAILED_INIT;	/* unless libcurl says it ended */

	if (multi == NULL && (multi = curl_multi_init()) == NULL)
		elog(ERROR, "could not create a libcurl multi handle");
	if (curl_multi_add_handle(multi, easy) != CURLM_OK)
		return CURLE_FAILED_INIT;
	while (running)
	{
		if (curl_multi_perform(multi, &running) != CURLM_OK)
			break;
		if (running)
			sbw_smtp_wait_once();
	}
	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
		if (msg->msg == CURLMSG_DONE && msg->easy_handle == easy)
			result = msg->data.result;
	curl_multi_remove_handle(multi, easy);
	return result;
}

/*
 * What a failed transfer means for the mail.  Only a reply to RCPT TO or
 * to the data is about this mail: a 5xx refuses it for good, a 4xx (but
 * 421, the server closing) asks for it later.  No reply at all, or a
 * refusal of the greeting, EHLO, STARTTLS, AUTH or MAIL FROM, is the
 * server's or the settings' (a server that wants STARTTLS, a wrong
 * password, a sender it does not take): every mail would fail the same
 * way, so this one waits and the mailer pauses.
 */
static SbwSmtpResult
sbw_smtp_classify(CURLcode rc, long code, const char *errbuf, char *error, size_t errlen)
{
	const char *why = errbuf[0] ? errbuf : curl_easy_strerror(rc);
	bool		this_mail = (strcmp(last_command, "RCPT") == 0 ||
							 strcmp(last_command, "DATA") == 0);

	if (last_reply[0] && code >= 400)
		snprintf(error, errlen, "%s (%s)", last_reply, why);
	else
		snprintf(error, errlen, "%s", why);
	if (!this_mail || code < 400 || code == 421)
		return SBW_SMTP_SESSION_FAILED;
	return code >= 500 ? SBW_SMTP_REFUSED : SBW_SMTP_RETRY;
}

/* See smtp.h. */
SbwSmtpResult
sbw_smtp_send(const SbwSmtpMail *mail, char *error, size_t errlen)
{
	static bool initialized = false;
	char		errbuf[CURL_ERROR_SIZE];
	struct curl_slist *volatile rcpt = NULL;
	struct curl_slist *volatile headers = NULL;
	CURL	   *easy;
	volatile CURLcode rc = CURLE_FAILED_INIT;
	curl_mime  *volatile mime = NULL;
	long		code = 0;

	if (!initialized && curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK)
		initialized = true;
	if (!sbw_address_ok(mail->recipient))
	{
		snprintf(error, errlen, "invalid recipient address \"%s\"", mail->recipient);
		return SBW_SMTP_REFUSED;
	}
	headers = sbw_mail_headers(mail);
	if (headers == NULL)
	{
		snprintf(error, errlen, "a header value holds a line break");
		return SBW_SMTP_REFUSED;
	}
	if ((easy = curl_easy_init()) == NULL)
		elog(ERROR, "could not create a libcurl handle");
	errbuf[0] = '\0';
	last_reply[0] = '\0';
	last_command[0] = '\0';
	rcpt = curl_slist_append(NULL, mail->recipient);
	PG_TRY();
	{
		sbw_smtp_configure(easy, rcpt, errbuf);
		SBW_CURL_SET(easy, CURLOPT_HTTPHEADER, headers);
		mime = sbw_mail_body(easy, mail);
		SBW_CURL_SET(easy, CURLOPT_MIMEPOST, mime);
		rc = sbw_smtp_run(easy);
		(void) curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &code);
	}
	PG_FINALLY();
	{
		/* an error during the wait: the handle goes, the multi stays */
		curl_easy_cleanup(easy);
		curl_mime_free(mime);
		curl_slist_free_all(headers);
		curl_slist_free_all(rcpt);
	}
	PG_END_TRY();
	if (rc == CURLE_OK)
		return SBW_SMTP_SENT;
	return sbw_smtp_classify(rc, code, errbuf, error, errlen);
}
