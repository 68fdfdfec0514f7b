/*
 * bench/amqp_ceiling.c: the broker side of the storyboard_worker benchmark.
 *
 * One small librabbitmq-c (0.11) program with four commands:
 *
 *   declare URL EXCHANGE QUEUE
 *       Declare what StoryBoard's subscriber (and storyboard_worker) declare:
 *       a durable topic exchange, a durable classic queue without arguments,
 *       bound with the five routing keys.  Then purge the queue.
 *
 *   publish URL EXCHANGE FILE COUNT [RATE]
 *       Publish COUNT messages taken in turn from FILE (one message per line:
 *       "<routing key>\t<body>"), the way StoryBoard's publisher does:
 *       routing key = resource, properties app_id=storyboard and
 *       content_type=application/json, no delivery_mode (transient), on a
 *       channel in confirm mode.  Confirms are streamed (at most 1000
 *       unconfirmed) and all awaited before the program reports.  With RATE
 *       (messages per second) the messages are paced evenly, for latency
 *       runs.  A body may contain the 16 characters "0000000000000000" right
 *       after "bench_published_us": "; they are overwritten with the publish
 *       time in microseconds since the epoch (CLOCK_REALTIME), just before
 *       basic.publish.
 *
 *   consume URL QUEUE COUNT CONSUMERS PREFETCH [WORK_US [ACK_EVERY]]
 *       The AMQP ceiling: CONSUMERS threads, each with its own connection and
 *       channel, basic.qos(PREFETCH), basic.consume, basic.ack of every
 *       delivery one by one (as storyboard_worker does with batch_size 1),
 *       until COUNT deliveries were acknowledged in total.  No parsing.
 *       For experiments on the broker's cost per acknowledgement: WORK_US
 *       sleeps that long per delivery before acknowledging it (a stand-in
 *       for the transaction), and ACK_EVERY > 1 acknowledges every
 *       ACK_EVERY-th delivery with multiple=true (and the rest when the
 *       queue runs dry).
 *
 *   count URL QUEUE
 *       Print the number of ready messages (passive queue.declare).
 *
 * Every command prints one JSON object on stdout.  Times are CLOCK_REALTIME
 * seconds, so they can be compared with PostgreSQL's clock_timestamp().
 *
 * Build: gcc -O2 -pthread -o amqp_ceiling amqp_ceiling.c $(pkg-config --cflags --libs librabbitmq)
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#if defined(__has_include)
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif

#define CHANNEL 1
#define CONFIRM_WINDOW 1000
#define TS_MARK "\"bench_published_us\": \""
#define TS_DIGITS 16

static const char *const binding_keys[] = {
	"task", "story", "project", "project_group", "timeline_event"
};

static void die(const char *fmt,...) __attribute__((noreturn, format(printf, 1, 2)));

static void
die(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	fprintf(stderr, "amqp_ceiling: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
check_reply(amqp_rpc_reply_t r, const char *what)
{
	switch (r.reply_type)
	{
		case AMQP_RESPONSE_NORMAL:
			return;
		case AMQP_RESPONSE_NONE:
			die("%s: missing RPC reply", what);
			break;
		case AMQP_RESPONSE_LIBRARY_EXCEPTION:
			die("%s: %s", what, amqp_error_string2(r.library_error));
			break;
		case AMQP_RESPONSE_SERVER_EXCEPTION:
			if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD)
			{
				amqp_connection_close_t *m = r.reply.decoded;

				die("%s: connection closed by the broker: %d %.*s", what,
					m->reply_code, (int) m->reply_text.len, (char *) m->reply_text.bytes);
			}
			if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD)
			{
				amqp_channel_close_t *m = r.reply.decoded;

				die("%s: channel closed by the broker: %d %.*s", what,
					m->reply_code, (int) m->reply_text.len, (char *) m->reply_text.bytes);
			}
			die("%s: broker error, method 0x%08X", what, r.reply.id);
			break;
	}
}

/* Connect and open channel 1; url is amqp://user:password@host:port/vhost */
static amqp_connection_state_t
connect_url(const char *url)
{
	struct amqp_connection_info ci;
	char	   *copy = strdup(url);
	amqp_connection_state_t conn;
	amqp_socket_t *sock;
	int			rc;

	amqp_default_connection_info(&ci);
	if (amqp_parse_url(copy, &ci) != AMQP_STATUS_OK)
		die("cannot parse URL %s", url);
	conn = amqp_new_connection();
	sock = amqp_tcp_socket_new(conn);
	if (sock == NULL)
		die("cannot create a socket");
	rc = amqp_socket_open(sock, ci.host, ci.port);
	if (rc != AMQP_STATUS_OK)
		die("cannot connect to %s:%d: %s", ci.host, ci.port, amqp_error_string2(rc));
	check_reply(amqp_login(conn, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN,
						   ci.user, ci.password), "login");
	amqp_channel_open(conn, CHANNEL);
	check_reply(amqp_get_rpc_reply(conn), "channel.open");
	free(copy);
	return conn;
}

static void
disconnect(amqp_connection_state_t conn)
{
	amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS);
	amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
	amqp_destroy_connection(conn);
}

/* ------------------------------------------------------------ declare */
static int
cmd_declare(const char *url, const char *exchange, const char *queue)
{
	amqp_connection_state_t conn = connect_url(url);
	size_t		i;

	amqp_exchange_declare(conn, CHANNEL, amqp_cstring_bytes(exchange),
						  amqp_cstring_bytes("topic"), 0, 1, 0, 0, amqp_empty_table);
	check_reply(amqp_get_rpc_reply(conn), "exchange.declare");
	amqp_queue_declare(conn, CHANNEL, amqp_cstring_bytes(queue), 0, 1, 0, 0,
					   amqp_empty_table);
	check_reply(amqp_get_rpc_reply(conn), "queue.declare");
	for (i = 0; i < sizeof(binding_keys) / sizeof(binding_keys[0]); i++)
	{
		amqp_queue_bind(conn, CHANNEL, amqp_cstring_bytes(queue),
						amqp_cstring_bytes(exchange),
						amqp_cstring_bytes(binding_keys[i]), amqp_empty_table);
		check_reply(amqp_get_rpc_reply(conn), "queue.bind");
	}
	amqp_queue_purge(conn, CHANNEL, amqp_cstring_bytes(queue));
	check_reply(amqp_get_rpc_reply(conn), "queue.purge");
	disconnect(conn);
	printf("{\"declared\": \"%s\"}\n", queue);
	return 0;
}

/* ------------------------------------------------------------ count */
static int
cmd_count(const char *url, const char *queue)
{
	amqp_connection_state_t conn = connect_url(url);
	amqp_queue_declare_ok_t *ok;

	ok = amqp_queue_declare(conn, CHANNEL, amqp_cstring_bytes(queue), 1, 0, 0, 0,
							amqp_empty_table);
	check_reply(amqp_get_rpc_reply(conn), "queue.declare (passive)");
	printf("{\"messages\": %u, \"consumers\": %u}\n", ok->message_count, ok->consumer_count);
	disconnect(conn);
	return 0;
}

/* ------------------------------------------------------------ publish */
typedef struct Msg
{
	char	   *rk;
	char	   *body;
	size_t		len;
	char	   *ts;				/* the 16 digits to overwrite, or NULL */
} Msg;

static Msg *
load_messages(const char *path, int *nmsgs)
{
	FILE	   *f = fopen(path, "r");
	char	   *line = NULL;
	size_t		cap = 0;
	ssize_t		n;
	Msg		   *msgs = NULL;
	int			count = 0,
				alloc = 0;

	if (f == NULL)
		die("cannot open %s: %s", path, strerror(errno));
	while ((n = getline(&line, &cap, f)) > 0)
	{
		char	   *tab;
		char	   *mark;

		if (line[n - 1] == '\n')
			line[--n] = '\0';
		if (n == 0)
			continue;
		tab = strchr(line, '\t');
		if (tab == NULL)
			die("%s: line %d has no tab", path, count + 1);
		*tab = '\0';
		if (count == alloc)
		{
			alloc = alloc ? alloc * 2 : 1024;
			msgs = realloc(msgs, sizeof(Msg) * alloc);
		}
		msgs[count].rk = strdup(line);
		msgs[count].body = strdup(tab + 1);
		msgs[count].len = strlen(msgs[count].body);
		mark = strstr(msgs[count].body, TS_MARK);
		msgs[count].ts = mark ? mark + strlen(TS_MARK) : NULL;
		count++;
	}
	free(line);
	fclose(f);
	if (count == 0)
		die("%s holds no messages", path);
	*nmsgs = count;
	return msgs;
}

typedef struct Confirms
{
	uint64_t	published;
	uint64_t	confirmed;		/* highest tag acked or nacked, contiguous */
	uint64_t	nacked;
} Confirms;

/*
 * Read one frame if any arrives within timeout (NULL = wait); handle
 * basic.ack / basic.nack.  Returns 1 if a frame was handled, 0 on timeout.
 */
static int
read_confirm(amqp_connection_state_t conn, Confirms *c, struct timeval *timeout)
{
	amqp_frame_t frame;
	int			rc = amqp_simple_wait_frame_noblock(conn, &frame, timeout);

	if (rc == AMQP_STATUS_TIMEOUT)
		return 0;
	if (rc != AMQP_STATUS_OK)
		die("waiting for confirms: %s", amqp_error_string2(rc));
	if (frame.frame_type != AMQP_FRAME_METHOD)
		return 1;
	switch (frame.payload.method.id)
	{
		case AMQP_BASIC_ACK_METHOD:
			{
				amqp_basic_ack_t *a = frame.payload.method.decoded;

				if (a->delivery_tag > c->confirmed)
					c->confirmed = a->delivery_tag;
				break;
			}
		case AMQP_BASIC_NACK_METHOD:
			{
				amqp_basic_nack_t *a = frame.payload.method.decoded;
				uint64_t	first = a->multiple ? c->confirmed + 1 : a->delivery_tag;

				if (a->delivery_tag >= first)
					c->nacked += a->delivery_tag - first + 1;
				if (a->delivery_tag > c->confirmed)
					c->confirmed = a->delivery_tag;
				break;
			}
		case AMQP_BASIC_RETURN_METHOD:
			break;
		case AMQP_CHANNEL_CLOSE_METHOD:
			{
				amqp_channel_close_t *m = frame.payload.method.decoded;

				die("channel closed by the broker: %d %.*s", m->reply_code,
					(int) m->reply_text.len, (char *) m->reply_text.bytes);
			}
		case AMQP_CONNECTION_CLOSE_METHOD:
			die("connection closed by the broker");
		default:
			break;
	}
	amqp_maybe_release_buffers(conn);
	return 1;
}

static void
stamp(Msg *m)
{
	struct timespec ts;
	char		digits[TS_DIGITS + 1];
	long long	us;

	if (m->ts == NULL)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	us = (long long) ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
	snprintf(digits, sizeof(digits), "%016lld", us);
	memcpy(m->ts, digits, TS_DIGITS);
}

static int
cmd_publish(const char *url, const char *exchange, const char *path,
			long count, double rate)
{
	int			nmsgs;
	Msg		   *msgs = load_messages(path, &nmsgs);
	amqp_connection_state_t conn = connect_url(url);
	amqp_basic_properties_t props;
	Confirms	c = {0, 0, 0};
	struct timeval zero = {0, 0};
	double		t0,
				t_last_publish,
				t_end;
	long		i;
	struct timespec next;
	long long	late = 0;

	amqp_confirm_select(conn, CHANNEL);
	check_reply(amqp_get_rpc_reply(conn), "confirm.select");

	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_APP_ID_FLAG;
	props.content_type = amqp_cstring_bytes("application/json");
	props.app_id = amqp_cstring_bytes("storyboard");

	clock_gettime(CLOCK_MONOTONIC, &next);
	t0 = now_s();
	for (i = 0; i < count; i++)
	{
		Msg		   *m = &msgs[i % nmsgs];
		amqp_bytes_t body;
		int			rc;

		if (rate > 0)
		{
			/* the i-th message is due at t0 + i / rate */
			long long	ns = (long long) (i * (1e9 / rate));
			struct timespec due = next;
			struct timespec cur;

			due.tv_sec += ns / 1000000000LL;
			due.tv_nsec += ns % 1000000000LL;
			if (due.tv_nsec >= 1000000000L)
			{
				due.tv_sec++;
				due.tv_nsec -= 1000000000L;
			}
			clock_gettime(CLOCK_MONOTONIC, &cur);
			if (cur.tv_sec > due.tv_sec ||
				(cur.tv_sec == due.tv_sec && cur.tv_nsec > due.tv_nsec + 1000000L))
				late++;
			while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &due, NULL) == EINTR)
				;
		}
		while (c.published - c.confirmed >= CONFIRM_WINDOW)
			read_confirm(conn, &c, NULL);

		stamp(m);
		body.bytes = m->body;
		body.len = m->len;
		rc = amqp_basic_publish(conn, CHANNEL, amqp_cstring_bytes(exchange),
								amqp_cstring_bytes(m->rk), 0, 0, &props, body);
		if (rc != AMQP_STATUS_OK)
			die("basic.publish: %s", amqp_error_string2(rc));
		c.published++;

		/* take the confirms that are already here, without waiting */
		if (rate > 0 || (i & 63) == 0)
			while (read_confirm(conn, &c, &zero))
				;
	}
	t_last_publish = now_s();
	while (c.confirmed < c.published)
		read_confirm(conn, &c, NULL);
	t_end = now_s();
	disconnect(conn);

	printf("{\"published\": %lu, \"nacked\": %lu, \"start\": %.6f, \"last_publish\": %.6f,"
		   " \"confirmed\": %.6f, \"seconds\": %.6f, \"rate\": %.1f, \"target_rate\": %.1f,"
		   " \"late_publishes\": %lld}\n",
		   (unsigned long) c.published, (unsigned long) c.nacked, t0, t_last_publish,
		   t_end, t_end - t0, c.published / (t_end - t0), rate, late);
	return c.nacked ? 1 : 0;
}

/* ------------------------------------------------------------ consume */
typedef struct Shared
{
	pthread_mutex_t lock;
	long		target;
	long		acked;
	double		first_delivery;
	double		last_ack;
	const char *url;
	const char *queue;
	int			prefetch;
	int			work_us;
	int			ack_every;
	int			latency;		/* note publish-to-delivery latencies */
	pthread_barrier_t ready;
} Shared;

typedef struct ThreadResult
{
	long		acked;
	long		nlat;			/* publish-to-delivery latencies (µs) seen */
	long		caplat;
	double	   *lat;
} ThreadResult;

/*
 * Publish-to-delivery latency of a message from "publish" (its body holds the
 * publish time): what the broker and the publisher alone add, without any
 * database work.
 */
static void
note_latency(ThreadResult *res, const amqp_bytes_t *body, double t_recv)
{
	const char *mark;
	char		digits[TS_DIGITS + 1];
	char		text[4096];
	size_t		len = body->len < sizeof(text) - 1 ? body->len : sizeof(text) - 1;

	memcpy(text, body->bytes, len);
	text[len] = '\0';
	mark = strstr(text, TS_MARK);
	if (mark == NULL || strlen(mark) < strlen(TS_MARK) + TS_DIGITS)
		return;
	memcpy(digits, mark + strlen(TS_MARK), TS_DIGITS);
	digits[TS_DIGITS] = '\0';
	if (res->nlat == res->caplat)
	{
		res->caplat = res->caplat ? res->caplat * 2 : 4096;
		res->lat = realloc(res->lat, sizeof(double) * res->caplat);
	}
	res->lat[res->nlat++] = t_recv * 1e6 - atof(digits);
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return (x > y) - (x < y);
}

static void *
consumer_thread(void *arg)
{
	Shared	   *sh = arg;
	ThreadResult *res = calloc(1, sizeof(ThreadResult));
	amqp_connection_state_t conn = connect_url(sh->url);
	struct timeval tmo = {0, 100000};

	amqp_basic_qos(conn, CHANNEL, 0, (uint16_t) sh->prefetch, 0);
	check_reply(amqp_get_rpc_reply(conn), "basic.qos");
	/* all connections ready before any consumes, so that they share the queue */
	pthread_barrier_wait(&sh->ready);
	amqp_basic_consume(conn, CHANNEL, amqp_cstring_bytes(sh->queue), amqp_empty_bytes,
					   0, 0, 0, amqp_empty_table);
	check_reply(amqp_get_rpc_reply(conn), "basic.consume");

	uint64_t	unacked_tag = 0;
	long		unacked = 0;

	for (;;)
	{
		amqp_envelope_t env;
		amqp_rpc_reply_t r;
		double		t,
					t_recv;
		int			done;
		long		newly = 0;

		pthread_mutex_lock(&sh->lock);
		done = sh->acked >= sh->target;
		pthread_mutex_unlock(&sh->lock);
		if (done)
			break;

		amqp_maybe_release_buffers(conn);
		r = amqp_consume_message(conn, &env, unacked ? &(struct timeval) {0, 0} : &tmo, 0);
		if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
			r.library_error == AMQP_STATUS_TIMEOUT)
		{
			if (unacked)
			{
				/* nothing more right now: acknowledge what we have */
				if (amqp_basic_ack(conn, CHANNEL, unacked_tag, 1) != AMQP_STATUS_OK)
					die("basic.ack failed");
				newly = unacked;
				unacked = 0;
				t = now_s();
				pthread_mutex_lock(&sh->lock);
				if (t > sh->last_ack)
					sh->last_ack = t;
				sh->acked += newly;
				pthread_mutex_unlock(&sh->lock);
				res->acked += newly;
			}
			continue;
		}
		check_reply(r, "consume");
		t_recv = now_s();
		if (sh->latency)
			note_latency(res, &env.message.body, t_recv);
		if (sh->work_us > 0)
		{
			struct timespec ts = {0, sh->work_us * 1000L};

			nanosleep(&ts, NULL);
		}
		unacked_tag = env.delivery_tag;
		unacked++;
		amqp_destroy_envelope(&env);
		if (unacked >= sh->ack_every)
		{
			if (amqp_basic_ack(conn, CHANNEL, unacked_tag, sh->ack_every > 1) != AMQP_STATUS_OK)
				die("basic.ack failed");
			newly = unacked;
			unacked = 0;
		}
		res->acked += newly;
		t = now_s();
		pthread_mutex_lock(&sh->lock);
		if (sh->first_delivery == 0 || t_recv < sh->first_delivery)
			sh->first_delivery = t_recv;
		if (newly && t > sh->last_ack)
			sh->last_ack = t;
		sh->acked += newly;
		pthread_mutex_unlock(&sh->lock);
	}
	disconnect(conn);
	return res;
}

static int
cmd_consume(const char *url, const char *queue, long count, int consumers, int prefetch,
			int work_us, int ack_every, int latency)
{
	Shared		sh;
	pthread_t  *threads = calloc(consumers, sizeof(pthread_t));
	double		t0;
	int			i;

	memset(&sh, 0, sizeof(sh));
	pthread_mutex_init(&sh.lock, NULL);
	pthread_barrier_init(&sh.ready, NULL, consumers);
	sh.target = count;
	sh.url = url;
	sh.queue = queue;
	sh.prefetch = prefetch;
	sh.work_us = work_us;
	sh.ack_every = ack_every > 0 ? ack_every : 1;
	sh.latency = latency;
	t0 = now_s();
	for (i = 0; i < consumers; i++)
		pthread_create(&threads[i], NULL, consumer_thread, &sh);
	long	   *acked = calloc(consumers, sizeof(long));
	long		nlat = 0;
	double	   *lat = NULL;

	for (i = 0; i < consumers; i++)
	{
		void	   *ret;
		ThreadResult *tr;

		pthread_join(threads[i], &ret);
		tr = ret;
		acked[i] = tr->acked;
		lat = realloc(lat, sizeof(double) * (nlat + tr->nlat + 1));
		memcpy(lat + nlat, tr->lat, sizeof(double) * tr->nlat);
		nlat += tr->nlat;
		free(tr->lat);
		free(ret);
	}
	printf("{\"consumers\": %d, \"prefetch\": %d, ", consumers, prefetch);
	if (nlat > 0)
	{
		qsort(lat, nlat, sizeof(double), cmp_double);
		printf("\"latency_ms\": {\"n\": %ld, \"p50\": %.3f, \"p99\": %.3f, \"p999\": %.3f, \"max\": %.3f}, ",
			   nlat, lat[nlat / 2] / 1e3, lat[(long) (nlat * 0.99)] / 1e3,
			   lat[(long) (nlat * 0.999)] / 1e3, lat[nlat - 1] / 1e3);
	}
	printf("\"per_consumer\": [");
	for (i = 0; i < consumers; i++)
		printf("%s%ld", i ? ", " : "", acked[i]);
	free(acked);
	free(lat);
	printf("], \"acked\": %ld, \"start\": %.6f, \"first_delivery\": %.6f, \"last_ack\": %.6f,"
		   " \"rate\": %.1f, \"rate_from_start\": %.1f}\n",
		   sh.acked, t0, sh.first_delivery, sh.last_ack,
		   sh.acked > 1 ? (sh.acked - 1) / (sh.last_ack - sh.first_delivery) : 0.0,
		   sh.acked / (sh.last_ack - t0));
	return 0;
}

int
main(int argc, char **argv)
{
	if (argc >= 5 && strcmp(argv[1], "declare") == 0)
		return cmd_declare(argv[2], argv[3], argv[4]);
	if (argc >= 6 && strcmp(argv[1], "publish") == 0)
		return cmd_publish(argv[2], argv[3], argv[4], atol(argv[5]),
						   argc >= 7 ? atof(argv[6]) : 0.0);
	if (argc >= 7 && strcmp(argv[1], "consume") == 0)
		return cmd_consume(argv[2], argv[3], atol(argv[4]), atoi(argv[5]), atoi(argv[6]),
						   argc >= 8 ? atoi(argv[7]) : 0, argc >= 9 ? atoi(argv[8]) : 1,
						   argc >= 10 ? atoi(argv[9]) : 0);
	if (argc >= 4 && strcmp(argv[1], "count") == 0)
		return cmd_count(argv[2], argv[3]);
	fprintf(stderr,
			"usage: amqp_ceiling declare URL EXCHANGE QUEUE\n"
			"       amqp_ceiling publish URL EXCHANGE FILE COUNT [RATE]\n"
			"       amqp_ceiling consume URL QUEUE COUNT CONSUMERS PREFETCH [WORK_US [ACK_EVERY [LATENCY]]]\n"
			"       amqp_ceiling count URL QUEUE\n");
	return 2;
}
