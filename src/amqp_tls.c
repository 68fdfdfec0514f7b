/*-------------------------------------------------------------------------
 *
 * amqp_tls.c
 *		librabbitmq's TLS socket, set up so that failures can be explained.
 *
 * librabbitmq's TLS socket cannot take a socket we connected ourselves
 * (there is amqp_tcp_socket_set_sockfd, but no TLS counterpart, up to
 * rabbitmq-c 0.16), so amqp_link.c lets it connect on its own; what is
 * here only prepares that socket and words its failures.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "amqp_tls.h"

#ifdef SBW_HAVE_OPENSSL
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

/*
 * The first X509 error of the current handshake, kept by OpenSSL's verify
 * callback: librabbitmq only says "SSL peer cert verification failed".
 * Backends are single-threaded.
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
 * Verify during the handshake, by OpenSSL: librabbitmq 0.11's own check
 * compares DNS names and the CN only, so a broker reached by IP address
 * fails even with a matching IP SAN.  Without a CA file, trust what the
 * system trusts.
 */
static bool
sbw_tls_verify_in_handshake(amqp_socket_t *sock, const SbwBrokerSettings *s,
							const char *host, char **errmsg)
{
	SSL_CTX    *ctx = (SSL_CTX *) amqp_ssl_socket_get_context(sock);
	X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);

	if (!s->ssl_ca_file || !s->ssl_ca_file[0])
		(void) SSL_CTX_set_default_verify_paths(ctx);
	if (X509_VERIFY_PARAM_set1_ip_asc(param, host) != 1 &&
		X509_VERIFY_PARAM_set1_host(param, host, 0) != 1)
	{
		*errmsg = psprintf("could not set up TLS host name verification for \"%s\"",
						   host);
		return false;
	}
	amqp_ssl_socket_set_verify_hostname(sock, 0);
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, sbw_verify_cb);
	return true;
}

/* OpenSSL's error queue, most recent first, emptied; NULL when empty. */
char *
sbw_tls_last_error(void)
{
	unsigned long e = ERR_peek_last_error();
	char		buf[256];

	if (e == 0)
		return NULL;
	ERR_error_string_n(e, buf, sizeof(buf));
	ERR_clear_error();
	return pstrdup(buf);
}
#else
char *
sbw_tls_last_error(void)
{
	return NULL;
}
#endif

/*
 * Create the TLS socket and load CA, client certificate and key; see
 * amqp_tls.h.
 */
amqp_socket_t *
sbw_tls_socket_new(amqp_connection_state_t conn, const SbwBrokerSettings *s,
				   const char *host, const char *peer, char **errmsg)
{
#ifdef SBW_HAVE_AMQP_SSL
	amqp_socket_t *sock;
	bool		have_ca = s->ssl_ca_file && s->ssl_ca_file[0];
	bool		have_cert = s->ssl_cert_file && s->ssl_cert_file[0];
	bool		have_key = s->ssl_key_file && s->ssl_key_file[0];

	*errmsg = NULL;

	if ((sock = amqp_ssl_socket_new(conn)) == NULL)
		*errmsg = psprintf("could not create a TLS socket for %s", peer);
	else if (have_ca && amqp_ssl_socket_set_cacert(sock, s->ssl_ca_file) != AMQP_STATUS_OK)
		*errmsg = psprintf("could not load CA file \"%s\" for %s",
						   s->ssl_ca_file, peer);
	else if (have_cert != have_key)
		*errmsg = psprintf("TLS client authentication needs both a certificate and a key file (got only the %s)",
						   have_cert ? "certificate" : "key");
	else if (have_cert &&
			 amqp_ssl_socket_set_key(sock, s->ssl_cert_file, s->ssl_key_file) != AMQP_STATUS_OK)
		*errmsg = psprintf("could not load client certificate \"%s\" or key \"%s\"",
						   s->ssl_cert_file, s->ssl_key_file);
	if (*errmsg)
		return NULL;

	/* both default to on in librabbitmq */
	amqp_ssl_socket_set_verify_peer(sock, s->ssl_verify_peer ? 1 : 0);
	amqp_ssl_socket_set_verify_hostname(sock, s->ssl_verify_peer ? 1 : 0);
#ifdef SBW_HAVE_OPENSSL
	if (s->ssl_verify_peer && !sbw_tls_verify_in_handshake(sock, s, host, errmsg))
		return NULL;
	sbw_x509_error = X509_V_OK;
	ERR_clear_error();
#endif
	return sock;
#else
	*errmsg = pstrdup("TLS was requested but librabbitmq was built without TLS support");
	return NULL;
#endif
}

/*
 * The most specific reason we have for a failed TLS connect: the X509
 * verification error if any, else OpenSSL's error queue.
 */
char *
sbw_tls_open_failure(int status, const char *peer, const char *host)
{
	char	   *detail = NULL;

	if (status == AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED)
		return psprintf("TLS connection to %s failed: the server certificate does not match host name \"%s\"",
						peer, host);
#ifdef SBW_HAVE_OPENSSL
	if (sbw_x509_error != X509_V_OK)
		detail = psprintf("certificate verify failed: %s (depth %d)",
						  X509_verify_cert_error_string(sbw_x509_error),
						  sbw_x509_depth);
	else
		detail = sbw_tls_last_error();
#endif
	if (detail)
		return psprintf("TLS connection to %s failed: %s: %s",
						peer, amqp_error_string2(status), detail);
	return psprintf("TLS connection to %s failed: %s",
					peer, amqp_error_string2(status));
}
