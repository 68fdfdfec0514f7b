/*-------------------------------------------------------------------------
 *
 * amqp_tls.h
 *		librabbitmq's headers, and its TLS socket with our work-arounds.
 *
 * librabbitmq 0.11 (Debian 12) checks the broker's certificate after the
 * handshake, by DNS name and CN only, and keeps the reason for a failure to
 * itself.  amqp_tls.c lets OpenSSL verify during the handshake instead
 * (IP SANs work) and keeps the X509 error, so a failure can be explained.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_AMQP_TLS_H
#define SBW_AMQP_TLS_H

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
#define SBW_HAVE_OPENSSL 1
#endif
#else							/* no __has_include: assume 0.11 layout */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <amqp_ssl_socket.h>
#define SBW_HAVE_AMQP_SSL 1
#endif

#include "broker.h"

/*
 * A TLS socket for connecting to 'host' with the CA, client certificate
 * and verification settings of s; NULL and *errmsg (naming peer) when a
 * file cannot be used or librabbitmq has no TLS.
 */
extern amqp_socket_t *sbw_tls_socket_new(amqp_connection_state_t conn,
										 const SbwBrokerSettings *s,
										 const char *host, const char *peer,
										 char **errmsg);

/* Why amqp_socket_open_noblock failed with a TLS status, in words. */
extern char *sbw_tls_open_failure(int status, const char *peer,
								  const char *host);

/* OpenSSL's last error for AMQP_STATUS_SSL_ERROR on a connection, or NULL. */
extern char *sbw_tls_last_error(void);

#endif							/* SBW_AMQP_TLS_H */
