/*-------------------------------------------------------------------------
 *
 * amqp_link.c
 *		One consumer's connection to RabbitMQ, through librabbitmq-c.
 *
 * librabbitmq does no background work and restarts poll() on EINTR, so any
 * call that waits without a deadline makes the backend deaf to SIGTERM,
 * reloads and ProcSignalBarriers.  Everything here is therefore either
 * non-blocking (a zero timeout) or bounded: the TCP connect is ours, made
 * under WaitLatchOrSocket (interrupts are served while it waits) and handed
 * to librabbitmq; the TLS handshake is bounded by amqp_socket_open_noblock,
 * the AMQP handshake by amqp_set_handshake_timeout, every RPC (declare,
 * bind, qos, consume, close) by amqp_set_rpc_timeout, and the header and
 * body frames of a delivery by a per-frame timeout we pass ourselves,
 * because amqp_consume_message reads them with an infinite deadline.
 *
 * Nothing here throws, but for an interrupt during the TCP connect.
 * Failures come back as palloc'd messages naming the step that failed and,
 * when the broker said why, its reply text.
 *
 * librabbitmq allocates with malloc: every delivery is copied into palloc'd
 * memory of the caller's context at once, and the library's pools are
 * recycled (amqp_maybe_release_buffers) as soon as nothing points into them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#include "amqp_link.h"
#include "amqp_tls.h"
#include "storyboard_worker.h"

/* The only channel we use. */
#define SBW_CHANNEL			1
/* Largest frame we accept; RabbitMQ's default frame_max is the same. */
#define SBW_FRAME_MAX		131072
/* Longest wait for the broker's answer to a passive queue.declare. */
#define SBW_QUEUE_DEPTH_RPC_MS	1000

/* The routing keys StoryBoard publishes with (storyboard-events.md §4.3). */
static const char *const sbw_binding_keys[] = {
	"task", "story", "project", "project_group", "timeline_event"
};

struct SbwAmqpLink
{
	amqp_connection_state_t conn;	/* NULL once destroyed */
	bool		have_external_fd;	/* AcquireExternalFD succeeded */
	bool		conn_open;		/* connection.open-ok seen, no close yet */
	bool		channel_open;	/* channel 1 usable */
	bool		socket_dead;	/* closed, EOF or stalled: no polite close */
	char	   *broken;			/* first fatal error, NULL while healthy */
	char	   *peer;			/* "host:port" */
	char	   *consumer_tag;	/* from basic.consume-ok */
	char	   *queue;			/* the queue consumed */
	int			timeout_ms;
	int			heartbeat;		/* negotiated, seconds */
};

static const struct timeval sbw_zero_tv = {0, 0};

/*
 * Set *errmsg and return false: the shape of every failure here, so that a
 * failing step is one statement.
 */
static bool
pg_attribute_printf(2, 3)
sbw_fail(char **errmsg, const char *fmt,...)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (;;)
	{
		va_list		args;
		int			needed;

		va_start(args, fmt);
		needed = appendStringInfoVA(&buf, fmt, args);
		va_end(args);
		if (needed == 0)
			break;
		enlargeStringInfo(&buf, needed);
	}
	*errmsg = buf.data;
	return false;
}

/*
 * A struct timeval for a millisecond count: librabbitmq takes timeouts in
 * that form only.
 */
static struct timeval
sbw_ms_to_tv(int ms)
{
	struct timeval tv;

	if (ms < 0)
		ms = 0;
	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	return tv;
}

/*
 * strerror() text starting with a lower-case letter, so it reads as the tail
 * of our own sentence ("could not connect to ...: connection refused").
 */
static char *
sbw_errno_text(int err)
{
	char	   *s = pstrdup(strerror(err));

	if (s[0] >= 'A' && s[0] <= 'Z' && (s[1] == '\0' || (s[1] >= 'a' && s[1] <= 'z')))
		s[0] = s[0] - 'A' + 'a';
	return s;
}

/*
 * A printable copy of an amqp_bytes_t (reply texts, routing keys ...), which
 * are length-counted and not NUL-terminated.
 */
static char *
sbw_bytes_dup(amqp_bytes_t b)
{
	if (b.len == 0 || b.bytes == NULL)
		return pstrdup("");
	return pnstrdup((const char *) b.bytes, b.len);
}

/*
 * Why librabbitmq returned a status code, in words.  Timeouts name the limit
 * that was hit, because "request timed out" alone does not say which, and
 * for "a socket error occurred" the errno the failing call left (the caller
 * saves it right after that call) says what it was: reset, broken pipe...
 */
static char *
sbw_status_text(SbwAmqpLink *link, int status, int save_errno)
{
	char	   *detail;

	switch (status)
	{
		case AMQP_STATUS_TIMEOUT:
			return psprintf("no reply within %d ms", link->timeout_ms);
		case AMQP_STATUS_HEARTBEAT_TIMEOUT:
			return psprintf("heartbeat timeout: nothing received for %d s (2 heartbeat intervals)",
							2 * link->heartbeat);
		case AMQP_STATUS_SOCKET_ERROR:
			if (save_errno != 0 && save_errno != EAGAIN &&
				save_errno != EINPROGRESS && save_errno != EINTR)
				return sbw_errno_text(save_errno);
			break;
		case AMQP_STATUS_CONNECTION_CLOSED:
			return pstrdup("connection closed by the broker (end of file)");
		case AMQP_STATUS_SSL_ERROR:
			if ((detail = sbw_tls_last_error()) != NULL)
				return psprintf("%s: %s", amqp_error_string2(status), detail);
			break;
	}
	return pstrdup(amqp_error_string2(status));
}

/*
 * Remember that the connection can no longer be used, so that later calls
 * fail at once with the first reason instead of touching a dead socket.
 */
static void
sbw_mark_broken(SbwAmqpLink *link, const char *msg)
{
	if (link->broken == NULL)
		link->broken = MemoryContextStrdup(TopMemoryContext, msg);
	link->channel_open = false;
}

/*
 * Answer a server-initiated connection.close with close-ok, as the protocol
 * asks; it is a courtesy only, so a failure is ignored.  The send cannot
 * block for long: the socket has just been readable and close-ok is tiny.
 */
static void
sbw_send_connection_close_ok(SbwAmqpLink *link)
{
	amqp_connection_close_ok_t ok;

	if (link->socket_dead || amqp_get_sockfd(link->conn) < 0)
		return;
	memset(&ok, 0, sizeof(ok));
	(void) amqp_send_method(link->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
	link->conn_open = false;
	link->channel_open = false;
}

/*
 * Same for a server-initiated channel.close: after close-ok the connection
 * stays usable (for a polite connection.close).
 */
static void
sbw_send_channel_close_ok(SbwAmqpLink *link)
{
	amqp_channel_close_ok_t ok;

	link->channel_open = false;
	if (link->socket_dead || amqp_get_sockfd(link->conn) < 0)
		return;
	memset(&ok, 0, sizeof(ok));
	(void) amqp_send_method(link->conn, SBW_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
}

/*
 * The broker's reply text for connection.close / channel.close, e.g.
 * "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN";
 * RabbitMQ already starts it with the reply-code's name.
 */
static char *
sbw_close_text(const amqp_method_t *m)
{
	if (m->id == AMQP_CONNECTION_CLOSE_METHOD && m->decoded)
	{
		amqp_connection_close_t *c = (amqp_connection_close_t *) m->decoded;

		return c->reply_text.len > 0 ? sbw_bytes_dup(c->reply_text) :
			psprintf("connection closed by broker with code %d", c->reply_code);
	}
	if (m->id == AMQP_CHANNEL_CLOSE_METHOD && m->decoded)
	{
		amqp_channel_close_t *c = (amqp_channel_close_t *) m->decoded;

		return c->reply_text.len > 0 ? sbw_bytes_dup(c->reply_text) :
			psprintf("channel closed by broker with code %d", c->reply_code);
	}
	return psprintf("unexpected method %s", amqp_method_name(m->id));
}

/*
 * A failed RPC: bring the link's state in line with what happened, and
 * return why it failed.  A connection.close or channel.close from the
 * broker is answered with close-ok (frames are sent); a library failure
 * (timeout, EOF, socket error) means the socket is gone.
 */
static char *
sbw_settle_failed_rpc(SbwAmqpLink *link, amqp_rpc_reply_t r)
{
	char	   *msg;

	switch (r.reply_type)
	{
		case AMQP_RESPONSE_NORMAL:
			return pstrdup("success");
		case AMQP_RESPONSE_NONE:
			return pstrdup("no RPC reply (library misuse)");
		case AMQP_RESPONSE_LIBRARY_EXCEPTION:
			msg = sbw_status_text(link, r.library_error, errno);
			/* librabbitmq closes the socket itself on RPC timeouts */
			if (amqp_get_sockfd(link->conn) < 0 ||
				r.library_error == AMQP_STATUS_CONNECTION_CLOSED ||
				r.library_error == AMQP_STATUS_SOCKET_ERROR ||
				r.library_error == AMQP_STATUS_SSL_ERROR ||
				r.library_error == AMQP_STATUS_HEARTBEAT_TIMEOUT ||
				r.library_error == AMQP_STATUS_TIMEOUT)
			{
				link->socket_dead = true;
				link->conn_open = false;
				link->channel_open = false;
			}
			return msg;
		case AMQP_RESPONSE_SERVER_EXCEPTION:
			msg = sbw_close_text(&r.reply);
			if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD)
				sbw_send_connection_close_ok(link);
			else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD)
				sbw_send_channel_close_ok(link);
			return msg;
	}
	return pstrdup("unknown RPC reply type");
}

/*
 * After an RPC that returned 'ok' (NULL when it failed): true, or settle
 * the failure and say "<what> failed: <why>".
 */
static bool
sbw_rpc_succeeded(SbwAmqpLink *link, const void *ok, const char *what,
				  char **errmsg)
{
	if (ok != NULL)
		return true;
	return sbw_fail(errmsg, "%s failed: %s", what,
					sbw_settle_failed_rpc(link, amqp_get_rpc_reply(link->conn)));
}

/*
 * Milliseconds elapsed since *start, on the monotonic clock.
 */
static int
sbw_ms_since(const struct timespec *start)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int) ((now.tv_sec - start->tv_sec) * 1000 +
				  (now.tv_nsec - start->tv_nsec) / 1000000);
}

/*
 * Wait for a non-blocking connect() on fd to finish, at most until
 * timeout_ms after *start, on our latch too: interrupts (SIGTERM,
 * ProcSignalBarriers) are served here and may end the process, in which
 * case fd is closed first.  Returns the connect's errno (0 = connected,
 * ETIMEDOUT when the time is up).
 */
static int
sbw_wait_connected(int fd, const struct timespec *start, int timeout_ms)
{
	volatile int err = -1;

	PG_TRY();
	{
		while (err < 0)
		{
			int			left = timeout_ms - sbw_ms_since(start);
			int			rc;
			int			soerr = 0;
			socklen_t	len = sizeof(soerr);

			if (left <= 0)
			{
				err = ETIMEDOUT;
				break;
			}
			rc = WaitLatchOrSocket(MyLatch, WL_LATCH_SET | WL_SOCKET_WRITEABLE |
								   WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								   fd, left, PG_WAIT_EXTENSION);
			if (rc & WL_LATCH_SET)
			{
				/* the loop looks at what woke us (reload, wake-up) after */
				ResetLatch(MyLatch);
				CHECK_FOR_INTERRUPTS();
			}
			if (rc & WL_SOCKET_WRITEABLE)
				err = getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 ?
					soerr : errno;
		}
	}
	PG_CATCH();
	{
		close(fd);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return err;
}

/*
 * One TCP connection to one address, set up as librabbitmq sets up its own
 * (non-blocking, close-on-exec, no Nagle, keepalives).  Returns the fd, or
 * -1 with *err the errno of the failure.
 */
static int
sbw_connect_address(const struct addrinfo *ai, const struct timespec *start,
					int timeout_ms, int *err)
{
	int			one = 1;
	int			fd;

	fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
				ai->ai_protocol);
	if (fd < 0)
	{
		*err = errno;
		return -1;
	}
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0 ||
		setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) != 0)
		*err = errno;
	else if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
		*err = 0;
	else if (errno != EINPROGRESS)
		*err = errno;
	else
		*err = sbw_wait_connected(fd, start, timeout_ms);
	if (*err == 0)
		return fd;
	close(fd);
	return -1;
}

/*
 * Connect to host:port within timeout_ms, trying each address the name
 * resolves to, as librabbitmq would, but interruptibly and keeping the
 * errno that librabbitmq reports only as "a socket error occurred".
 * Returns the fd, or -1 and *errmsg.
 */
static int
sbw_tcp_connect(SbwAmqpLink *link, const char *host, int port, char **errmsg)
{
	struct addrinfo hint;
	struct addrinfo *addrs;
	struct addrinfo *ai;
	char		portstr[16];
	struct timespec start;
	int			fd = -1;
	int			err = ETIMEDOUT;

	clock_gettime(CLOCK_MONOTONIC, &start);
	memset(&hint, 0, sizeof(hint));
	hint.ai_family = AF_UNSPEC;
	hint.ai_socktype = SOCK_STREAM;
	hint.ai_protocol = IPPROTO_TCP;
	snprintf(portstr, sizeof(portstr), "%d", port);
	if (getaddrinfo(host, portstr, &hint, &addrs) != 0)
	{
		(void) sbw_fail(errmsg, "could not connect to %s: could not resolve host name \"%s\"",
						link->peer, host);
		return -1;
	}
	for (ai = addrs; ai != NULL && fd < 0; ai = ai->ai_next)
	{
		if (sbw_ms_since(&start) >= link->timeout_ms)
		{
			err = ETIMEDOUT;
			break;
		}
		fd = sbw_connect_address(ai, &start, link->timeout_ms, &err);
	}
	freeaddrinfo(addrs);
	if (fd >= 0)
		return fd;
	if (err == ETIMEDOUT)
		(void) sbw_fail(errmsg, "could not connect to %s: timed out after %d ms",
						link->peer, link->timeout_ms);
	else
		(void) sbw_fail(errmsg, "could not connect to %s: %s",
						link->peer, sbw_errno_text(err));
	return -1;
}

/*
 * The TCP connection, handed to librabbitmq as is.  librabbitmq's own
 * connect (amqp_socket_open_noblock) would wait in poll() deaf to
 * interrupts and drop the errno of a refused connection.
 */
static bool
sbw_open_tcp(SbwAmqpLink *link, const char *host, int port, char **errmsg)
{
	amqp_socket_t *sock = amqp_tcp_socket_new(link->conn);
	int			fd;

	if (sock == NULL)
		return sbw_fail(errmsg, "could not create a socket for %s: out of memory",
						link->peer);
	if ((fd = sbw_tcp_connect(link, host, port, errmsg)) < 0)
		return false;
	amqp_tcp_socket_set_sockfd(sock, fd);	/* closed with the connection */
	return true;
}

/*
 * The TLS connection.  librabbitmq's TLS socket cannot take a connected fd
 * (amqp_tcp_socket_set_sockfd has no TLS counterpart), so it connects on
 * its own.  We connect first anyway, and close again: waiting for a
 * broker that does not answer is then interruptible and a refusal reads
 * "connection refused"; librabbitmq's own connect, once the broker has
 * just accepted one, and the TLS handshake take what is left of the time.
 */
static bool
sbw_open_tls(SbwAmqpLink *link, const SbwBrokerSettings *s, const char *host,
			 char **errmsg)
{
	amqp_socket_t *sock;
	struct timespec start;
	struct timeval tv;
	int			fd;
	int			status;
	int			save_errno;

	if ((sock = sbw_tls_socket_new(link->conn, s, host, link->peer, errmsg)) == NULL)
		return false;
	clock_gettime(CLOCK_MONOTONIC, &start);
	if ((fd = sbw_tcp_connect(link, host, s->port, errmsg)) < 0)
		return false;
	close(fd);

	tv = sbw_ms_to_tv(Max(link->timeout_ms - sbw_ms_since(&start), 1));
	errno = 0;
	status = amqp_socket_open_noblock(sock, host, s->port, &tv);
	save_errno = errno;
	switch (status)
	{
		case AMQP_STATUS_OK:
			return true;
		case AMQP_STATUS_TIMEOUT:
			return sbw_fail(errmsg, "could not connect to %s: timed out after %d ms (TCP connect or TLS handshake)",
							link->peer, link->timeout_ms);
		case AMQP_STATUS_SSL_CONNECTION_FAILED:
		case AMQP_STATUS_SSL_ERROR:
		case AMQP_STATUS_SSL_PEER_VERIFY_FAILED:
		case AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED:
			*errmsg = sbw_tls_open_failure(status, link->peer, host);
			return false;
		default:
			return sbw_fail(errmsg, "could not connect to %s: %s", link->peer,
							sbw_status_text(link, status, save_errno));
	}
}

/*
 * AMQP handshake with PLAIN credentials.  We advertise
 * consumer_cancel_notify, without which RabbitMQ silently stops delivering
 * when the queue is deleted instead of sending basic.cancel, and a
 * connection_name so the management UI says who we are.
 */
static bool
sbw_login(SbwAmqpLink *link, const SbwBrokerSettings *s, char **errmsg)
{
	amqp_table_entry_t caps[1];
	amqp_table_entry_t props[2];
	amqp_table_t client_props = {lengthof(props), props};
	amqp_rpc_reply_t r;
	int			save_errno;
	const char *vhost = (s->vhost && s->vhost[0]) ? s->vhost : "/";
	const char *user = s->user ? s->user : "";

	caps[0].key = amqp_cstring_bytes("consumer_cancel_notify");
	caps[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
	caps[0].value.value.boolean = 1;
	props[0].key = amqp_cstring_bytes("capabilities");
	props[0].value.kind = AMQP_FIELD_KIND_TABLE;
	props[0].value.value.table.num_entries = lengthof(caps);
	props[0].value.value.table.entries = caps;
	props[1].key = amqp_cstring_bytes("connection_name");
	props[1].value.kind = AMQP_FIELD_KIND_UTF8;
	props[1].value.value.bytes = amqp_cstring_bytes("storyboard_worker");

	errno = 0;
	r = amqp_login_with_properties(link->conn, vhost, 0, SBW_FRAME_MAX,
								   s->heartbeat, &client_props,
								   AMQP_SASL_METHOD_PLAIN, user,
								   s->password ? s->password : "");
	save_errno = errno;
	if (r.reply_type == AMQP_RESPONSE_NORMAL)
	{
		link->conn_open = true;
		link->heartbeat = amqp_get_heartbeat(link->conn);
		return true;
	}

	if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
		r.reply.id == AMQP_CONNECTION_CLOSE_METHOD &&
		((amqp_connection_close_t *) r.reply.decoded)->reply_code == AMQP_NOT_ALLOWED)
		(void) sbw_fail(errmsg, "opening virtual host \"%s\" on %s as \"%s\" refused: %s",
						vhost, link->peer, user, sbw_settle_failed_rpc(link, r));
	else if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION)
		(void) sbw_fail(errmsg, "login to %s as \"%s\" refused: %s",
						link->peer, user, sbw_settle_failed_rpc(link, r));
	else if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
			 (r.library_error == AMQP_STATUS_CONNECTION_CLOSED ||
			  r.library_error == AMQP_STATUS_SOCKET_ERROR))
		(void) sbw_fail(errmsg, "login to %s as \"%s\" failed: %s during the AMQP handshake%s",
						link->peer, user,
						(r.library_error == AMQP_STATUS_SOCKET_ERROR && save_errno != 0) ?
						sbw_errno_text(save_errno) : "connection closed by the broker",
						s->use_ssl ? "" : " (does the port expect TLS?)");
	else
		(void) sbw_fail(errmsg, "login to %s as \"%s\" failed: %s",
						link->peer, user, sbw_settle_failed_rpc(link, r));
	link->socket_dead = true;	/* librabbitmq closed it on any login error */
	return false;
}

/*
 * Channel 1, the exchange, the queue, its bindings, qos and the consumer:
 * the same declarations StoryBoard's own subscriber makes, so that either
 * may run first.
 */
static bool
sbw_setup_channel(SbwAmqpLink *link, const SbwBrokerSettings *s, char **errmsg)
{
	amqp_connection_state_t conn = link->conn;
	amqp_table_entry_t qargs[1];
	amqp_table_t queue_args = amqp_empty_table;
	amqp_bytes_t queue = amqp_cstring_bytes(s->queue);
	amqp_bytes_t exchange = amqp_cstring_bytes(s->exchange);
	amqp_basic_consume_ok_t *cok;
	int			i;

	if (!sbw_rpc_succeeded(link, amqp_channel_open(conn, SBW_CHANNEL),
						   psprintf("opening channel %d on %s", SBW_CHANNEL, link->peer),
						   errmsg))
		return false;
	link->channel_open = true;

	if (!sbw_rpc_succeeded(link, amqp_exchange_declare(conn, SBW_CHANNEL, exchange,
													   amqp_cstring_bytes("topic"),
													   0, 1, 0, 0, amqp_empty_table),
						   psprintf("exchange.declare of \"%s\"", s->exchange), errmsg))
		return false;

	if (s->queue_type == SBW_QUEUE_QUORUM)
	{
		qargs[0].key = amqp_cstring_bytes("x-queue-type");
		qargs[0].value.kind = AMQP_FIELD_KIND_UTF8;
		qargs[0].value.value.bytes = amqp_cstring_bytes("quorum");
		queue_args.num_entries = 1;
		queue_args.entries = qargs;
	}
	if (!sbw_rpc_succeeded(link, amqp_queue_declare(conn, SBW_CHANNEL, queue, 0, 1, 0, 0,
													queue_args),
						   psprintf("queue.declare of \"%s\"", s->queue), errmsg))
		return false;

	for (i = 0; i < lengthof(sbw_binding_keys); i++)
		if (!sbw_rpc_succeeded(link, amqp_queue_bind(conn, SBW_CHANNEL, queue, exchange,
													 amqp_cstring_bytes(sbw_binding_keys[i]),
													 amqp_empty_table),
							   psprintf("queue.bind of \"%s\" to \"%s\" with routing key \"%s\"",
										s->queue, s->exchange, sbw_binding_keys[i]),
							   errmsg))
			return false;

	if (!sbw_rpc_succeeded(link, amqp_basic_qos(conn, SBW_CHANNEL, 0, (uint16_t) s->prefetch, 0),
						   psprintf("basic.qos(prefetch_count=%d)", s->prefetch), errmsg))
		return false;

	cok = amqp_basic_consume(conn, SBW_CHANNEL, queue, amqp_empty_bytes, 0, 0, 0,
							 amqp_empty_table);
	if (!sbw_rpc_succeeded(link, cok, psprintf("basic.consume on \"%s\"", s->queue), errmsg))
		return false;
	link->consumer_tag = MemoryContextStrdup(TopMemoryContext, sbw_bytes_dup(cok->consumer_tag));
	amqp_maybe_release_buffers(conn);
	return true;
}

/*
 * Check the settings before any I/O, so that a typo gives a message about
 * the setting rather than a confusing broker error.  The GUCs' own limits
 * cover the rest.
 */
static char *
sbw_check_settings(const SbwBrokerSettings *s, const char *host, int timeout_ms)
{
	if (host == NULL || host[0] == '\0')
		return pstrdup("no broker host name given");
	if (s->exchange == NULL || s->exchange[0] == '\0')
		return pstrdup("no exchange name given");
	if (s->queue == NULL || s->queue[0] == '\0')
		return pstrdup("no queue name given");
	if (timeout_ms <= 0)
		return psprintf("invalid timeout %d ms", timeout_ms);
	return NULL;
}

/*
 * Connect, log in, declare and start consuming; see amqp_link.h.  On any
 * failure everything acquired so far is released before returning NULL.
 */
SbwAmqpLink *
sbw_amqp_connect(const SbwBrokerSettings *s, const char *host, int timeout_ms,
				 char **errmsg)
{
	SbwAmqpLink *link;
	struct timeval tv = sbw_ms_to_tv(timeout_ms);

	if ((*errmsg = sbw_check_settings(s, host, timeout_ms)) != NULL)
		return NULL;

	/* the link outlives the caller's per-event contexts */
	link = MemoryContextAllocZero(TopMemoryContext, sizeof(SbwAmqpLink));
	link->timeout_ms = timeout_ms;
	link->queue = MemoryContextStrdup(TopMemoryContext, s->queue);
	link->peer = MemoryContextStrdup(TopMemoryContext,
									 psprintf(strchr(host, ':') ? "[%s]:%d" : "%s:%d",
											  host, s->port));

	if (!(link->have_external_fd = AcquireExternalFD()))
		(void) sbw_fail(errmsg, "could not connect to %s: no file descriptor available (AcquireExternalFD failed; raise max_files_per_process?)",
						link->peer);
	else if ((link->conn = amqp_new_connection()) == NULL)
		(void) sbw_fail(errmsg, "could not connect to %s: out of memory", link->peer);
	else if (amqp_set_handshake_timeout(link->conn, &tv) != AMQP_STATUS_OK ||
			 amqp_set_rpc_timeout(link->conn, &tv) != AMQP_STATUS_OK)
		(void) sbw_fail(errmsg, "could not set a %d ms timeout for %s",
						timeout_ms, link->peer);
	else if ((s->use_ssl ? sbw_open_tls(link, s, host, errmsg) :
			  sbw_open_tcp(link, host, s->port, errmsg)) &&
			 sbw_login(link, s, errmsg) &&
			 sbw_setup_channel(link, s, errmsg))
		return link;

	sbw_amqp_close(link, link->timeout_ms);
	return NULL;
}

/*
 * The fd to sleep on; -1 once librabbitmq has closed it (heartbeat timeout,
 * RPC timeout), in which case the caller must not wait on it.
 */
int
sbw_amqp_socket(SbwAmqpLink *link)
{
	if (link == NULL || link->conn == NULL)
		return -1;
	return amqp_get_sockfd(link->conn);
}

/*
 * "host:port", allocated with the link so it lives as long as the link.
 */
const char *
sbw_amqp_peer(SbwAmqpLink *link)
{
	return link ? link->peer : "";
}

/*
 * The heartbeat RabbitMQ and we agreed on: the broker may lower ours.  The
 * caller must call sbw_amqp_next at least twice per interval.
 */
int
sbw_amqp_heartbeat(SbwAmqpLink *link)
{
	return link ? link->heartbeat : 0;
}

/*
 * Next frame on our channel for the delivery being read, waiting at most
 * timeout_ms for it.  Frames on channel 0 other than connection.close
 * (connection.blocked/unblocked) are skipped.  Returns a librabbitmq status;
 * a connection.close is returned as a frame for the caller to handle.
 */
static int
sbw_wait_content_frame(SbwAmqpLink *link, amqp_frame_t *frame)
{
	struct timeval tv = sbw_ms_to_tv(link->timeout_ms);
	int			status;

	for (;;)
	{
		status = amqp_simple_wait_frame_noblock(link->conn, frame, &tv);
		if (status != AMQP_STATUS_OK)
			return status;
		if (frame->channel == SBW_CHANNEL)
			return AMQP_STATUS_OK;
		if (frame->frame_type == AMQP_FRAME_METHOD &&
			frame->payload.method.id == AMQP_CONNECTION_CLOSE_METHOD)
			return AMQP_STATUS_OK;
	}
}

/*
 * A method frame that ends the consumer: connection.close or channel.close
 * (answered with close-ok, as the protocol asks), or one that has no
 * business arriving in the middle of a message.  Says what happened.
 */
static char *
sbw_handle_close_frame(SbwAmqpLink *link, amqp_frame_t *frame)
{
	char	   *text = sbw_close_text(&frame->payload.method);

	switch (frame->payload.method.id)
	{
		case AMQP_CONNECTION_CLOSE_METHOD:
			sbw_send_connection_close_ok(link);
			return psprintf("connection closed by broker %s: %s", link->peer, text);
		case AMQP_CHANNEL_CLOSE_METHOD:
			sbw_send_channel_close_ok(link);
			return psprintf("channel closed by broker %s: %s", link->peer, text);
		default:
			return text;
	}
}

/*
 * sbw_status_text for the frames of a message, where a timeout means the
 * broker stopped sending in the middle of one, not a missing RPC reply.
 */
static char *
sbw_content_status_text(SbwAmqpLink *link, int status, int save_errno)
{
	if (status == AMQP_STATUS_TIMEOUT)
		return psprintf("no frame within %d ms", link->timeout_ms);
	return sbw_status_text(link, status, save_errno);
}

/*
 * Read the body frames of a delivery into d->body, keeping at most
 * d->body_len of the body_size bytes announced: the rest of an oversized
 * body is read off the socket and dropped, never held.  On failure returns
 * a message and the link is unusable.
 */
static char *
sbw_read_body(SbwAmqpLink *link, SbwDelivery *d, uint64 body_size)
{
	amqp_frame_t frame;
	uint64		received = 0;
	size_t		kept = 0;
	int			status;

	while (received < body_size)
	{
		size_t		len;

		errno = 0;
		status = sbw_wait_content_frame(link, &frame);
		if (status != AMQP_STATUS_OK)
		{
			link->socket_dead = true;
			return psprintf("reading the body of delivery %llu from %s failed after %llu of %llu bytes: %s",
							(unsigned long long) d->delivery_tag, link->peer,
							(unsigned long long) received, (unsigned long long) body_size,
							sbw_content_status_text(link, status, errno));
		}
		if (frame.frame_type == AMQP_FRAME_METHOD)
			return sbw_handle_close_frame(link, &frame);
		len = frame.payload.body_fragment.len;
		if (frame.frame_type != AMQP_FRAME_BODY || len > body_size - received)
			return psprintf("protocol error from %s in the body of delivery %llu",
							link->peer, (unsigned long long) d->delivery_tag);
		if (kept < d->body_len)
		{
			size_t		take = Min(len, d->body_len - kept);

			memcpy(d->body + kept, frame.payload.body_fragment.bytes, take);
			kept += take;
		}
		received += len;
		/* the fragment is copied: let librabbitmq reuse its pages */
		amqp_maybe_release_buffers_on_channel(link->conn, SBW_CHANNEL);
	}
	d->body[kept] = '\0';
	d->body_len = kept;
	return NULL;
}

/*
 * Read the content header and body frames that follow a basic.deliver, each
 * within timeout_ms.  The header announces the body's size: a body over
 * max_body bytes (0 = no limit) is not allocated, only its first max_body
 * bytes are kept, and d->body_declared_len says how long it was.  On
 * failure returns a message and the link is unusable (we are in the middle
 * of a message).
 */
static char *
sbw_read_content(SbwAmqpLink *link, SbwDelivery *d, size_t max_body)
{
	amqp_frame_t frame;
	amqp_basic_properties_t *props;
	uint64		body_size;
	size_t		keep;
	int			status;

	errno = 0;
	status = sbw_wait_content_frame(link, &frame);
	if (status != AMQP_STATUS_OK)
	{
		link->socket_dead = true;	/* mid-message: no polite close */
		return psprintf("reading the header of delivery %llu from %s failed: %s",
						(unsigned long long) d->delivery_tag, link->peer,
						sbw_content_status_text(link, status, errno));
	}
	if (frame.frame_type == AMQP_FRAME_METHOD)
		return sbw_handle_close_frame(link, &frame);
	if (frame.frame_type != AMQP_FRAME_HEADER)
		return psprintf("protocol error from %s: frame type %d instead of the header of delivery %llu",
						link->peer, frame.frame_type,
						(unsigned long long) d->delivery_tag);

	props = (amqp_basic_properties_t *) frame.payload.properties.decoded;
	if (props && (props->_flags & AMQP_BASIC_MESSAGE_ID_FLAG))
	{
		/* all its bytes, NULs included: sbw_storable_text decides later */
		d->message_id_len = props->message_id.len;
		d->message_id = palloc(d->message_id_len + 1);
		if (d->message_id_len > 0)
			memcpy(d->message_id, props->message_id.bytes, d->message_id_len);
		d->message_id[d->message_id_len] = '\0';
	}
	body_size = frame.payload.properties.body_size;
	d->body_declared_len = (size_t) Min(body_size, (uint64) SIZE_MAX);

	keep = (size_t) Min(body_size, (uint64) (MaxAllocHugeSize - 1));
	if (max_body > 0)
		keep = Min(keep, max_body);
	d->body = palloc_extended(keep + 1, MCXT_ALLOC_HUGE | MCXT_ALLOC_NO_OOM);
	if (d->body == NULL)
		return psprintf("out of memory for the %zu-byte body of delivery %llu",
						keep, (unsigned long long) d->delivery_tag);
	d->body_len = keep;
	return sbw_read_body(link, d, body_size);
}

/*
 * Report a lost connection: remember the reason for later calls (the link
 * is broken from now on), and hand the caller its own copy.
 */
static SbwAmqpResult
sbw_break_link(SbwAmqpLink *link, char **errmsg, char *msg)
{
	sbw_mark_broken(link, msg);
	*errmsg = msg;
	return SBW_AMQP_CLOSED;
}

/*
 * A basic.deliver has arrived: fill d with it, reading its header and body
 * frames (each within timeout_ms).  NULL, or why the link is now broken.
 */
static char *
sbw_take_delivery(SbwAmqpLink *link, const amqp_basic_deliver_t *del,
				  SbwDelivery *d, size_t max_body)
{
	char	   *msg;

	d->delivery_tag = del->delivery_tag;
	d->redelivered = del->redelivered != 0;
	d->routing_key = sbw_bytes_dup(del->routing_key);
	if ((msg = sbw_read_content(link, d, max_body)) == NULL)
	{
		amqp_maybe_release_buffers(link->conn);
		return NULL;
	}
	pfree(d->routing_key);
	if (d->message_id)
		pfree(d->message_id);
	if (d->body)
		pfree(d->body);
	memset(d, 0, sizeof(*d));
	return msg;
}

/*
 * Drain one delivery from what is buffered or readable now; see amqp_link.h.
 *
 * Only zero-timeout calls touch the socket, which also sends our heartbeat
 * when due and notices the broker's silence; with TLS they make SSL_read
 * hand over bytes OpenSSL has buffered, which poll() on the fd cannot see.
 * Frames an RPC (sbw_amqp_queue_depth) set aside come first.
 */
SbwAmqpResult
sbw_amqp_next(SbwAmqpLink *link, SbwDelivery *d, size_t max_body, char **errmsg)
{
	amqp_frame_t frame;
	int			status;
	char	   *msg;

	*errmsg = NULL;
	memset(d, 0, sizeof(*d));
	if (link == NULL || link->conn == NULL)
	{
		*errmsg = pstrdup("not connected");
		return SBW_AMQP_CLOSED;
	}
	if (link->broken)
	{
		*errmsg = psprintf("connection to %s is unusable: %s", link->peer, link->broken);
		return SBW_AMQP_CLOSED;
	}

	amqp_maybe_release_buffers(link->conn);
	for (;;)
	{
		errno = 0;
		status = amqp_simple_wait_frame_noblock(link->conn, &frame, &sbw_zero_tv);
		if (status == AMQP_STATUS_TIMEOUT)
			return SBW_AMQP_NONE;
		if (status != AMQP_STATUS_OK)
		{
			msg = psprintf("connection to %s lost: %s", link->peer,
						   sbw_status_text(link, status, errno));
			link->socket_dead = true;
			link->conn_open = false;
			return sbw_break_link(link, errmsg, msg);
		}
		/* heartbeats, strays of an older consumer, other channels */
		if (frame.frame_type != AMQP_FRAME_METHOD ||
			(frame.channel != SBW_CHANNEL && frame.channel != 0))
			continue;

		switch (frame.payload.method.id)
		{
			case AMQP_BASIC_DELIVER_METHOD:
				msg = sbw_take_delivery(link, frame.payload.method.decoded, d, max_body);
				return msg ? sbw_break_link(link, errmsg, msg) : SBW_AMQP_DELIVERY;
			case AMQP_CONNECTION_CLOSE_METHOD:
			case AMQP_CHANNEL_CLOSE_METHOD:
				return sbw_break_link(link, errmsg, sbw_handle_close_frame(link, &frame));
			case AMQP_BASIC_CANCEL_METHOD:
				return sbw_break_link(link, errmsg,
									  psprintf("broker %s cancelled consumer \"%s\" (queue deleted, or its node lost?)",
											   link->peer,
											   sbw_bytes_dup(((amqp_basic_cancel_t *) frame.payload.method.decoded)->consumer_tag)));
			default:
				/* connection.blocked/unblocked, stray basic.*-ok: not ours */
				continue;
		}
	}
}

/*
 * A passive queue.declare on our channel; see amqp_link.h.  amqp_simple_rpc
 * queues every frame that is not its reply (deliveries, their content,
 * heartbeats) for amqp_simple_wait_frame_noblock to return first, so no
 * delivery is lost.  It waits at most SBW_QUEUE_DEPTH_RPC_MS, during which
 * SIGTERM waits too, then closes the socket: a broker that slow to answer
 * is treated as lost, and the consumer reconnects.
 */
bool
sbw_amqp_queue_depth(SbwAmqpLink *link, int64 *messages, int32 *consumers,
					 char **errmsg)
{
	amqp_queue_declare_ok_t *ok;
	char	   *what;
	struct timeval tv;

	*errmsg = NULL;
	if (link == NULL || link->conn == NULL || link->broken || !link->channel_open)
		return sbw_fail(errmsg, "queue depth not measured: %s",
						link && link->broken ? link->broken : "not connected");
	what = psprintf("passive queue.declare on %s", link->peer);
	/* librabbitmq's wait serves no signal: keep a silent broker's hold short */
	tv = sbw_ms_to_tv(SBW_QUEUE_DEPTH_RPC_MS);
	(void) amqp_set_rpc_timeout(link->conn, &tv);
	ok = amqp_queue_declare(link->conn, SBW_CHANNEL,
							amqp_cstring_bytes(link->queue), 1, 0, 0, 0,
							amqp_empty_table);
	if (!sbw_rpc_succeeded(link, ok, what, errmsg))
	{
		sbw_mark_broken(link, *errmsg);
		return false;
	}
	*messages = ok->message_count;
	*consumers = ok->consumer_count;
	return true;
}

/*
 * Before the close handshake, make sure the socket takes a frame within
 * timeout_ms: librabbitmq's sends wait without a deadline when heartbeats
 * are off (with heartbeats they give up after two intervals).  Acks do not
 * need this: each one answers a delivery, the broker sends at most prefetch
 * of them unacked, and 21-byte acks cannot fill a socket buffer that the
 * deliveries themselves did not.
 */
static bool
sbw_can_send(SbwAmqpLink *link, int timeout_ms)
{
	struct pollfd pfd;
	int			rc;

	pfd.fd = amqp_get_sockfd(link->conn);
	if (pfd.fd < 0)
		return false;
	pfd.events = POLLOUT;
	pfd.revents = 0;
	do
		rc = poll(&pfd, 1, timeout_ms);
	while (rc < 0 && errno == EINTR);
	return rc > 0 && (pfd.revents & POLLOUT) && !(pfd.revents & (POLLERR | POLLHUP));
}

/*
 * Shared tail of ack and nack: say why the frame could not be sent, and
 * mark the link broken (the broker will redeliver what is unacked).
 */
static bool
sbw_send_result(SbwAmqpLink *link, int status, const char *what, uint64 tag,
				char **errmsg)
{
	int			save_errno = errno;
	char	   *msg;

	if (status == AMQP_STATUS_OK)
		return true;
	msg = psprintf("%s of delivery %llu to %s failed: %s", what,
				   (unsigned long long) tag, link->peer,
				   sbw_status_text(link, status, save_errno));
	link->socket_dead = true;
	sbw_mark_broken(link, msg);
	*errmsg = msg;
	return false;
}

/*
 * Acknowledge a delivery (after COMMIT).  Fails when the connection is gone;
 * then the broker will redeliver the message to the next consumer.
 */
bool
sbw_amqp_ack(SbwAmqpLink *link, uint64 tag, bool multiple, char **errmsg)
{
	*errmsg = NULL;
	if (link == NULL || link->conn == NULL || link->broken)
	{
		*errmsg = psprintf("basic.ack of delivery %llu not sent: %s",
						   (unsigned long long) tag,
						   link && link->broken ? link->broken : "not connected");
		return false;
	}
	return sbw_send_result(link,
						   amqp_basic_ack(link->conn, SBW_CHANNEL, tag, multiple ? 1 : 0),
						   "basic.ack", tag, errmsg);
}

/*
 * Reject a delivery, requeued or not (dropped or dead-lettered by the
 * broker's policy).
 */
bool
sbw_amqp_nack(SbwAmqpLink *link, uint64 tag, bool multiple, bool requeue,
			  char **errmsg)
{
	*errmsg = NULL;
	if (link == NULL || link->conn == NULL || link->broken)
	{
		*errmsg = psprintf("basic.nack of delivery %llu not sent: %s",
						   (unsigned long long) tag,
						   link && link->broken ? link->broken : "not connected");
		return false;
	}
	return sbw_send_result(link,
						   amqp_basic_nack(link->conn, SBW_CHANNEL, tag,
										   multiple ? 1 : 0, requeue ? 1 : 0),
						   "basic.nack", tag, errmsg);
}

/*
 * Close the connection politely when the socket still works, within
 * timeout_ms in all (an unresponsive broker cannot hold a shutdown), then
 * free everything.  connection.close closes the channel with it.  Unacked
 * deliveries go back to the queue either way.
 */
void
sbw_amqp_close(SbwAmqpLink *link, int timeout_ms)
{
	if (link == NULL)
		return;

	if (link->conn)
	{
		bool		usable = !link->socket_dead &&
			amqp_get_sockfd(link->conn) >= 0;
		struct timespec start;

		clock_gettime(CLOCK_MONOTONIC, &start);
		/* a writable check first: with heartbeats off a send could hang */
		if (usable)
			usable = sbw_can_send(link, timeout_ms);
		if (usable && link->conn_open && amqp_get_sockfd(link->conn) >= 0)
		{
			struct timeval tv = sbw_ms_to_tv(Max(timeout_ms - sbw_ms_since(&start), 1));

			(void) amqp_set_rpc_timeout(link->conn, &tv);
			(void) amqp_connection_close(link->conn, AMQP_REPLY_SUCCESS);
		}
		(void) amqp_destroy_connection(link->conn);
		link->conn = NULL;
	}
	if (link->have_external_fd)
		ReleaseExternalFD();

	if (link->broken)
		pfree(link->broken);
	if (link->consumer_tag)
		pfree(link->consumer_tag);
	if (link->queue)
		pfree(link->queue);
	if (link->peer)
		pfree(link->peer);
	pfree(link);
}
