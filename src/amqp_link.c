/*-------------------------------------------------------------------------
 *
 * amqp_link.c
 *		One consumer's connection to RabbitMQ, through librabbitmq-c.
 *
 * librabbitmq does no background work and restarts poll() on EINTR, so any
 * call that waits without a deadline makes the backend deaf to SIGTERM,
 * reloads and ProcSignalBarriers.  Everything here is therefore either
 * non-blocking (a zero timeout) or bounded: the TCP connect and the TLS
 * handshake by amqp_socket_open_noblock, the AMQP handshake by
 * amqp_set_handshake_timeout, every RPC (declare, bind, qos, consume, close)
 * by amqp_set_rpc_timeout, and the header and body frames of a delivery by a
 * per-frame timeout we pass ourselves, because amqp_consume_message reads
 * them with an infinite deadline.
 *
 * Nothing here throws.  Failures come back as palloc'd messages naming the
 * step that failed and, when the broker said why, its reply text.
 *
 * librabbitmq allocates with malloc: every delivery is copied into palloc'd
 * memory of the caller's context at once, and the library's pools are
 * recycled (amqp_maybe_release_buffers) as soon as nothing points into them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/*
 * rabbitmq-c 0.12 moved its headers under rabbitmq-c/; Debian 12 ships 0.11,
 * which still has them at the top level.
 */
#if defined(__has_include)
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#if __has_include(<rabbitmq-c/ssl_socket.h>)
#include <rabbitmq-c/ssl_socket.h>
#define SBW_HAVE_AMQP_SSL 1
#endif
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#if __has_include(<amqp_ssl_socket.h>)
#include <amqp_ssl_socket.h>
#define SBW_HAVE_AMQP_SSL 1
#endif
#endif
/* OpenSSL, for default CA paths and readable certificate errors. */
#if defined(SBW_HAVE_AMQP_SSL) && __has_include(<openssl/ssl.h>)
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#define SBW_HAVE_OPENSSL 1
#endif
#else							/* no __has_include: assume 0.11 layout */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <amqp_ssl_socket.h>
#define SBW_HAVE_AMQP_SSL 1
#endif

#include "storage/fd.h"
#include "utils/memutils.h"

#include "amqp_link.h"

/* The only channel we use. */
#define SBW_CHANNEL			1
/* Largest frame we accept; RabbitMQ's default frame_max is the same. */
#define SBW_FRAME_MAX		131072

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
	int			timeout_ms;
	int			heartbeat;		/* negotiated, seconds */
};

static const struct timeval sbw_zero_tv = {0, 0};


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
			return pstrdup(amqp_error_string2(status));
		case AMQP_STATUS_CONNECTION_CLOSED:
			return pstrdup("connection closed by the broker (end of file)");
#ifdef SBW_HAVE_OPENSSL
		case AMQP_STATUS_SSL_ERROR:
			{
				unsigned long e = ERR_peek_last_error();
				char		buf[256];

				if (e == 0)
					return pstrdup(amqp_error_string2(status));
				ERR_error_string_n(e, buf, sizeof(buf));
				ERR_clear_error();
				return psprintf("%s: %s", amqp_error_string2(status), buf);
			}
#endif
		default:
			return pstrdup(amqp_error_string2(status));
	}
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
 * Turn an RPC reply into a message, and keep the link's state in line with
 * what the broker did: a connection.close or channel.close is answered with
 * close-ok, a library failure (timeout, EOF) means the socket is gone.
 */
static char *
sbw_reply_text(SbwAmqpLink *link, amqp_rpc_reply_t r)
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

#ifdef SBW_HAVE_OPENSSL
/*
 * librabbitmq 0.11 checks the peer certificate only after the handshake and
 * keeps the reason to itself ("SSL peer cert verification failed").  We ask
 * OpenSSL to verify during the handshake instead and keep the first X509
 * error here, so the message can say "self-signed certificate" or
 * "certificate has expired".  Backends are single-threaded.
 */
static int	sbw_x509_error = X509_V_OK;
static int	sbw_x509_depth = 0;

static int
sbw_verify_cb(int preverify_ok, X509_STORE_CTX *ctx)
{
	if (!preverify_ok && sbw_x509_error == X509_V_OK)
	{
		sbw_x509_error = X509_STORE_CTX_get_error(ctx);
		sbw_x509_depth = X509_STORE_CTX_get_error_depth(ctx);
	}
	return preverify_ok;
}

/*
 * The most specific reason we have for a failed TLS connect: the X509
 * verification error if any, else OpenSSL's error queue, else nothing.
 */
static char *
sbw_tls_detail(void)
{
	unsigned long e;
	char		buf[256];

	if (sbw_x509_error != X509_V_OK)
		return psprintf("certificate verify failed: %s (depth %d)",
						X509_verify_cert_error_string(sbw_x509_error),
						sbw_x509_depth);
	e = ERR_peek_last_error();
	if (e == 0)
		return NULL;
	ERR_error_string_n(e, buf, sizeof(buf));
	ERR_clear_error();
	return pstrdup(buf);
}
#endif

#ifdef SBW_HAVE_AMQP_SSL
/*
 * Create the TLS socket and load CA, client certificate and key; returns
 * NULL and *errmsg when a file cannot be used.
 */
static amqp_socket_t *
sbw_ssl_socket(SbwAmqpLink *link, const SbwAmqpSettings *s, char **errmsg)
{
	amqp_socket_t *sock;
	bool		have_ca = s->ssl_ca_file && s->ssl_ca_file[0];
	bool		have_cert = s->ssl_cert_file && s->ssl_cert_file[0];
	bool		have_key = s->ssl_key_file && s->ssl_key_file[0];

	sock = amqp_ssl_socket_new(link->conn);
	if (sock == NULL)
	{
		*errmsg = psprintf("could not create a TLS socket for %s", link->peer);
		return NULL;
	}

	if (have_ca && amqp_ssl_socket_set_cacert(sock, s->ssl_ca_file) != AMQP_STATUS_OK)
	{
		*errmsg = psprintf("could not load CA file \"%s\" for %s",
						   s->ssl_ca_file, link->peer);
		return NULL;
	}
	if (have_cert != have_key)
	{
		*errmsg = psprintf("TLS client authentication needs both a certificate and a key file (got only the %s)",
						   have_cert ? "certificate" : "key");
		return NULL;
	}
	if (have_cert &&
		amqp_ssl_socket_set_key(sock, s->ssl_cert_file, s->ssl_key_file) != AMQP_STATUS_OK)
	{
		*errmsg = psprintf("could not load client certificate \"%s\" or key \"%s\"",
						   s->ssl_cert_file, s->ssl_key_file);
		return NULL;
	}

	/* both default to on in librabbitmq */
	amqp_ssl_socket_set_verify_peer(sock, s->ssl_verify_peer ? 1 : 0);
	amqp_ssl_socket_set_verify_hostname(sock, s->ssl_verify_peer ? 1 : 0);

#ifdef SBW_HAVE_OPENSSL
	if (s->ssl_verify_peer)
	{
		SSL_CTX    *ctx = (SSL_CTX *) amqp_ssl_socket_get_context(sock);
		X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);

		/* without a CA file, trust what the system trusts */
		if (!have_ca)
			(void) SSL_CTX_set_default_verify_paths(ctx);

		/*
		 * Let OpenSSL check the name during the handshake: librabbitmq
		 * 0.11's own check compares DNS names and the CN only, so a broker
		 * reached by IP address fails even with a matching IP SAN.
		 */
		if (X509_VERIFY_PARAM_set1_ip_asc(param, s->host) != 1 &&
			X509_VERIFY_PARAM_set1_host(param, s->host, 0) != 1)
		{
			*errmsg = psprintf("could not set up TLS host name verification for \"%s\"",
							   s->host);
			return NULL;
		}
		amqp_ssl_socket_set_verify_hostname(sock, 0);
		SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, sbw_verify_cb);
	}
	sbw_x509_error = X509_V_OK;
	ERR_clear_error();
#endif

	return sock;
}
#endif

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
 * Why connecting to host:port fails, as an errno value (0 if unknown, or if
 * it now succeeds).  librabbitmq only says "a socket error occurred" when a
 * non-blocking connect() fails after poll(): it reads SO_ERROR and drops it.
 * So on that path we try once more ourselves, within the time left, and read
 * SO_ERROR.  The fd counts against the reservation the link already holds.
 */
static int
sbw_probe_connect_errno(const char *host, int port, int timeout_ms)
{
	struct addrinfo hint;
	struct addrinfo *addrs;
	struct addrinfo *ai;
	char		portstr[16];
	int			result = 0;
	struct timespec start;

	clock_gettime(CLOCK_MONOTONIC, &start);
	memset(&hint, 0, sizeof(hint));
	hint.ai_family = AF_UNSPEC;
	hint.ai_socktype = SOCK_STREAM;
	hint.ai_protocol = IPPROTO_TCP;
	snprintf(portstr, sizeof(portstr), "%d", port);
	if (getaddrinfo(host, portstr, &hint, &addrs) != 0)
		return 0;

	for (ai = addrs; ai != NULL; ai = ai->ai_next)
	{
		int			fd;
		int			left = timeout_ms - sbw_ms_since(&start);

		if (left <= 0)
			break;
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
					ai->ai_protocol);
		if (fd < 0)
			continue;
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
			result = 0;
		else if (errno != EINPROGRESS)
			result = errno;
		else
		{
			struct pollfd pfd;
			int			rc;
			int			soerr = 0;
			socklen_t	len = sizeof(soerr);

			pfd.fd = fd;
			pfd.events = POLLOUT;
			do
				rc = poll(&pfd, 1, left);
			while (rc < 0 && errno == EINTR);
			if (rc == 0)
				result = ETIMEDOUT;
			else if (rc > 0 &&
					 getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0)
				result = soerr;
		}
		close(fd);
		if (result == 0)
			break;
	}
	freeaddrinfo(addrs);
	return result;
}

/*
 * Open the TCP (or TLS) connection within timeout_ms, and describe a failure
 * the way an operator wants to read it.
 */
static bool
sbw_open_socket(SbwAmqpLink *link, const SbwAmqpSettings *s, char **errmsg)
{
	amqp_socket_t *sock;
	struct timeval tv = sbw_ms_to_tv(s->timeout_ms);
	int			status;
	int			save_errno;
	struct timespec start;

	if (s->use_ssl)
	{
#ifdef SBW_HAVE_AMQP_SSL
		sock = sbw_ssl_socket(link, s, errmsg);
		if (sock == NULL)
			return false;
#else
		*errmsg = pstrdup("TLS was requested but librabbitmq was built without TLS support");
		return false;
#endif
	}
	else
	{
		sock = amqp_tcp_socket_new(link->conn);
		if (sock == NULL)
		{
			*errmsg = psprintf("could not create a socket for %s: out of memory",
							   link->peer);
			return false;
		}
	}

	clock_gettime(CLOCK_MONOTONIC, &start);
	errno = 0;
	status = amqp_socket_open_noblock(sock, s->host, s->port, &tv);
	save_errno = errno;
	if (status == AMQP_STATUS_OK)
		return true;

	switch (status)
	{
		case AMQP_STATUS_TIMEOUT:
			*errmsg = psprintf("could not connect to %s: timed out after %d ms%s",
							   link->peer, s->timeout_ms,
							   s->use_ssl ? " (TCP connect or TLS handshake)" : "");
			break;
		case AMQP_STATUS_HOSTNAME_RESOLUTION_FAILED:
			*errmsg = psprintf("could not connect to %s: could not resolve host name \"%s\"",
							   link->peer, s->host);
			break;
		case AMQP_STATUS_SOCKET_ERROR:

			/*
			 * connect() failing at once leaves its errno; one failing after
			 * poll() leaves EINPROGRESS: then ask the network once more.
			 */
			if (save_errno == 0 || save_errno == EINPROGRESS ||
				save_errno == EAGAIN || save_errno == EINTR)
				save_errno = sbw_probe_connect_errno(s->host, s->port,
													 s->timeout_ms - sbw_ms_since(&start));
			if (save_errno == ETIMEDOUT)
				*errmsg = psprintf("could not connect to %s: timed out after %d ms",
								   link->peer, s->timeout_ms);
			else if (save_errno != 0)
				*errmsg = psprintf("could not connect to %s: %s",
								   link->peer, sbw_errno_text(save_errno));
			else
				*errmsg = psprintf("could not connect to %s: %s",
								   link->peer, amqp_error_string2(status));
			break;
		case AMQP_STATUS_SSL_CONNECTION_FAILED:
		case AMQP_STATUS_SSL_ERROR:
		case AMQP_STATUS_SSL_PEER_VERIFY_FAILED:
		case AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED:
			{
				char	   *detail = NULL;

#ifdef SBW_HAVE_OPENSSL
				detail = sbw_tls_detail();
#endif
				if (status == AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED)
					*errmsg = psprintf("TLS connection to %s failed: the server certificate does not match host name \"%s\"",
									   link->peer, s->host);
				else if (detail)
					*errmsg = psprintf("TLS connection to %s failed: %s: %s",
									   link->peer, amqp_error_string2(status), detail);
				else
					*errmsg = psprintf("TLS connection to %s failed: %s",
									   link->peer, amqp_error_string2(status));
				break;
			}
		default:
			*errmsg = psprintf("could not connect to %s: %s",
							   link->peer, amqp_error_string2(status));
			break;
	}
	return false;
}

/*
 * AMQP handshake with PLAIN credentials.  We advertise
 * consumer_cancel_notify, without which RabbitMQ silently stops delivering
 * when the queue is deleted instead of sending basic.cancel, and a
 * connection_name so the management UI says who we are.
 */
static bool
sbw_login(SbwAmqpLink *link, const SbwAmqpSettings *s, char **errmsg)
{
	amqp_table_entry_t caps[1];
	amqp_table_entry_t props[2];
	amqp_table_t client_props;
	amqp_rpc_reply_t r;
	int			save_errno;
	const char *vhost = (s->vhost && s->vhost[0]) ? s->vhost : "/";

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

	client_props.num_entries = lengthof(props);
	client_props.entries = props;

	errno = 0;
	r = amqp_login_with_properties(link->conn, vhost, 0, SBW_FRAME_MAX,
								   s->heartbeat, &client_props,
								   AMQP_SASL_METHOD_PLAIN,
								   s->user ? s->user : "",
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
		*errmsg = psprintf("opening virtual host \"%s\" on %s as \"%s\" refused: %s",
						   vhost, link->peer, s->user ? s->user : "",
						   sbw_reply_text(link, r));
	else if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION)
		*errmsg = psprintf("login to %s as \"%s\" refused: %s",
						   link->peer, s->user ? s->user : "",
						   sbw_reply_text(link, r));
	else if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
			 (r.library_error == AMQP_STATUS_CONNECTION_CLOSED ||
			  r.library_error == AMQP_STATUS_SOCKET_ERROR))
		*errmsg = psprintf("login to %s as \"%s\" failed: %s during the AMQP handshake%s",
						   link->peer, s->user ? s->user : "",
						   (r.library_error == AMQP_STATUS_SOCKET_ERROR && save_errno != 0) ?
						   sbw_errno_text(save_errno) : "connection closed by the broker",
						   s->use_ssl ? "" : " (does the port expect TLS?)");
	else
		*errmsg = psprintf("login to %s as \"%s\" failed: %s",
						   link->peer, s->user ? s->user : "",
						   sbw_reply_text(link, r));
	link->socket_dead = true;	/* librabbitmq closed it on any login error */
	return false;
}

/*
 * Channel 1, the exchange, the queue, its bindings, qos and the consumer:
 * the same declarations StoryBoard's own subscriber makes, so that either
 * may run first.
 */
static bool
sbw_setup_channel(SbwAmqpLink *link, const SbwAmqpSettings *s, char **errmsg)
{
	amqp_connection_state_t conn = link->conn;
	amqp_table_entry_t qargs[1];
	amqp_table_t queue_args = amqp_empty_table;
	bool		quorum = (strcmp(s->queue_type, "quorum") == 0);
	amqp_basic_consume_ok_t *cok;
	int			i;

	if (amqp_channel_open(conn, SBW_CHANNEL) == NULL)
	{
		*errmsg = psprintf("could not open channel %d on %s: %s",
						   SBW_CHANNEL, link->peer,
						   sbw_reply_text(link, amqp_get_rpc_reply(conn)));
		return false;
	}
	link->channel_open = true;

	if (amqp_exchange_declare(conn, SBW_CHANNEL,
							  amqp_cstring_bytes(s->exchange),
							  amqp_cstring_bytes("topic"),
							  0, 1, 0, 0, amqp_empty_table) == NULL)
	{
		*errmsg = psprintf("exchange.declare of \"%s\" failed: %s",
						   s->exchange,
						   sbw_reply_text(link, amqp_get_rpc_reply(conn)));
		return false;
	}

	if (quorum)
	{
		qargs[0].key = amqp_cstring_bytes("x-queue-type");
		qargs[0].value.kind = AMQP_FIELD_KIND_UTF8;
		qargs[0].value.value.bytes = amqp_cstring_bytes("quorum");
		queue_args.num_entries = 1;
		queue_args.entries = qargs;
	}
	if (amqp_queue_declare(conn, SBW_CHANNEL, amqp_cstring_bytes(s->queue),
						   0, 1, 0, 0, queue_args) == NULL)
	{
		*errmsg = psprintf("queue.declare of \"%s\" failed: %s",
						   s->queue,
						   sbw_reply_text(link, amqp_get_rpc_reply(conn)));
		return false;
	}

	for (i = 0; i < lengthof(sbw_binding_keys); i++)
	{
		if (amqp_queue_bind(conn, SBW_CHANNEL, amqp_cstring_bytes(s->queue),
							amqp_cstring_bytes(s->exchange),
							amqp_cstring_bytes(sbw_binding_keys[i]),
							amqp_empty_table) == NULL)
		{
			*errmsg = psprintf("queue.bind of \"%s\" to \"%s\" with routing key \"%s\" failed: %s",
							   s->queue, s->exchange, sbw_binding_keys[i],
							   sbw_reply_text(link, amqp_get_rpc_reply(conn)));
			return false;
		}
	}

	if (amqp_basic_qos(conn, SBW_CHANNEL, 0, (uint16_t) s->prefetch, 0) == NULL)
	{
		*errmsg = psprintf("basic.qos(prefetch_count=%d) failed: %s",
						   s->prefetch,
						   sbw_reply_text(link, amqp_get_rpc_reply(conn)));
		return false;
	}

	cok = amqp_basic_consume(conn, SBW_CHANNEL, amqp_cstring_bytes(s->queue),
							 amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
	if (cok == NULL)
	{
		*errmsg = psprintf("basic.consume on \"%s\" failed: %s",
						   s->queue,
						   sbw_reply_text(link, amqp_get_rpc_reply(conn)));
		return false;
	}
	link->consumer_tag = MemoryContextAlloc(TopMemoryContext,
											cok->consumer_tag.len + 1);
	memcpy(link->consumer_tag, cok->consumer_tag.bytes, cok->consumer_tag.len);
	link->consumer_tag[cok->consumer_tag.len] = '\0';
	amqp_maybe_release_buffers(conn);
	return true;
}

/*
 * Check the settings before any I/O, so that a typo gives a message about
 * the setting rather than a confusing broker error.
 */
static char *
sbw_check_settings(const SbwAmqpSettings *s)
{
	if (s->host == NULL || s->host[0] == '\0')
		return pstrdup("no broker host name given");
	if (s->port < 1 || s->port > 65535)
		return psprintf("invalid broker port %d", s->port);
	if (s->exchange == NULL || s->exchange[0] == '\0')
		return pstrdup("no exchange name given");
	if (s->queue == NULL || s->queue[0] == '\0')
		return pstrdup("no queue name given");
	if (s->queue_type == NULL ||
		(strcmp(s->queue_type, "classic") != 0 && strcmp(s->queue_type, "quorum") != 0))
		return psprintf("invalid queue type \"%s\" (expected \"classic\" or \"quorum\")",
						s->queue_type ? s->queue_type : "");
	if (s->heartbeat < 0 || s->heartbeat > 65535)
		return psprintf("invalid heartbeat %d (0 to 65535 seconds)", s->heartbeat);
	if (s->prefetch < 0 || s->prefetch > 65535)
		return psprintf("invalid prefetch %d (0 to 65535)", s->prefetch);
	if (s->timeout_ms <= 0)
		return psprintf("invalid timeout %d ms", s->timeout_ms);
	return NULL;
}

/*
 * Connect, log in, declare and start consuming; see amqp_link.h.  On any
 * failure everything acquired so far is released before returning NULL.
 */
SbwAmqpLink *
sbw_amqp_connect(const SbwAmqpSettings *s, char **errmsg)
{
	SbwAmqpLink *link;
	MemoryContext oldcxt;
	struct timeval tv;
	char	   *msg;

	*errmsg = NULL;
	msg = sbw_check_settings(s);
	if (msg)
	{
		*errmsg = msg;
		return NULL;
	}

	/* the link outlives the caller's per-event contexts */
	oldcxt = MemoryContextSwitchTo(TopMemoryContext);
	link = palloc0(sizeof(SbwAmqpLink));
	link->timeout_ms = s->timeout_ms;
	if (strchr(s->host, ':') != NULL)	/* IPv6 literal */
		link->peer = psprintf("[%s]:%d", s->host, s->port);
	else
		link->peer = psprintf("%s:%d", s->host, s->port);
	MemoryContextSwitchTo(oldcxt);

	if (!AcquireExternalFD())
	{
		*errmsg = psprintf("could not connect to %s: no file descriptor available (AcquireExternalFD failed; raise max_files_per_process?)",
						   link->peer);
		sbw_amqp_close(link, link->timeout_ms);
		return NULL;
	}
	link->have_external_fd = true;

	link->conn = amqp_new_connection();
	if (link->conn == NULL)
	{
		*errmsg = psprintf("could not connect to %s: out of memory", link->peer);
		sbw_amqp_close(link, link->timeout_ms);
		return NULL;
	}

	tv = sbw_ms_to_tv(s->timeout_ms);
	if (amqp_set_handshake_timeout(link->conn, &tv) != AMQP_STATUS_OK ||
		amqp_set_rpc_timeout(link->conn, &tv) != AMQP_STATUS_OK)
	{
		*errmsg = psprintf("could not set a %d ms timeout for %s",
						   s->timeout_ms, link->peer);
		sbw_amqp_close(link, link->timeout_ms);
		return NULL;
	}

	if (!sbw_open_socket(link, s, errmsg) ||
		!sbw_login(link, s, errmsg) ||
		!sbw_setup_channel(link, s, errmsg))
	{
		sbw_amqp_close(link, link->timeout_ms);
		return NULL;
	}

	return link;
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
 * Report a lost connection: keep the reason for later calls, and hand the
 * caller its own copy.
 */
static SbwAmqpResult
sbw_closed(SbwAmqpLink *link, char **errmsg, char *msg)
{
	sbw_mark_broken(link, msg);
	*errmsg = msg;
	return SBW_AMQP_CLOSED;
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
 * Drain one delivery from what is buffered or readable now; see amqp_link.h.
 *
 * Only zero-timeout calls touch the socket, which also sends our heartbeat
 * when due and notices the broker's silence; with TLS they make SSL_read
 * hand over bytes OpenSSL has buffered, which poll() on the fd cannot see.
 * Once a basic.deliver has arrived, its header and body frames are read with
 * a timeout of timeout_ms per frame.
 */
SbwAmqpResult
sbw_amqp_next(SbwAmqpLink *link, SbwDelivery *d, size_t max_body, char **errmsg)
{
	amqp_frame_t frame;
	int			status;

	*errmsg = NULL;
	memset(d, 0, sizeof(*d));

	if (link == NULL || link->conn == NULL)
	{
		*errmsg = pstrdup("not connected");
		return SBW_AMQP_CLOSED;
	}
	if (link->broken)
	{
		*errmsg = psprintf("connection to %s is unusable: %s",
						   link->peer, link->broken);
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
			int			save_errno = errno;

			link->socket_dead = true;
			link->conn_open = false;
			return sbw_closed(link, errmsg,
							  psprintf("connection to %s lost: %s", link->peer,
									   sbw_status_text(link, status, save_errno)));
		}

		if (frame.frame_type != AMQP_FRAME_METHOD)
			continue;			/* heartbeats, strays of an older consumer */

		switch (frame.payload.method.id)
		{
			case AMQP_BASIC_DELIVER_METHOD:
				{
					amqp_basic_deliver_t *del =
						(amqp_basic_deliver_t *) frame.payload.method.decoded;
					char	   *msg;

					if (frame.channel != SBW_CHANNEL)
						continue;
					d->delivery_tag = del->delivery_tag;
					d->redelivered = del->redelivered != 0;
					d->routing_key = sbw_bytes_dup(del->routing_key);
					msg = sbw_read_content(link, d, max_body);
					if (msg)
					{
						pfree(d->routing_key);
						if (d->message_id)
							pfree(d->message_id);
						if (d->body)
							pfree(d->body);
						memset(d, 0, sizeof(*d));
						return sbw_closed(link, errmsg, msg);
					}
					amqp_maybe_release_buffers(link->conn);
					return SBW_AMQP_DELIVERY;
				}

			case AMQP_CONNECTION_CLOSE_METHOD:
			case AMQP_CHANNEL_CLOSE_METHOD:
				if (frame.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD &&
					frame.channel != SBW_CHANNEL)
					continue;
				return sbw_closed(link, errmsg, sbw_handle_close_frame(link, &frame));

			case AMQP_BASIC_CANCEL_METHOD:
				{
					amqp_basic_cancel_t *c =
						(amqp_basic_cancel_t *) frame.payload.method.decoded;

					if (frame.channel != SBW_CHANNEL)
						continue;
					return sbw_closed(link, errmsg,
									  psprintf("broker %s cancelled consumer \"%s\" (queue deleted, or its node lost?)",
											   link->peer,
											   sbw_bytes_dup(c->consumer_tag)));
				}

			default:
				/* connection.blocked/unblocked, stray basic.*-ok: not ours */
				continue;
		}
	}
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
	if (link->peer)
		pfree(link->peer);
	pfree(link);
}
