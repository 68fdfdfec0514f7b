/*-------------------------------------------------------------------------
 *
 * fuzz_decode.c
 *		libFuzzer target for sbw_decode_event (src/event_decode.c).
 *
 * Besides crashes, undefined behaviour and leaks (ASan, UBSan, LSan), it
 * checks the decoder's promises and aborts when one is broken:
 *	- an error has a non-empty, one-line, bounded, valid UTF-8 message and
 *	  a SQLSTATE, and is never one of the decoder's "internal error"s
 *	  (json-c disagreeing with PostgreSQL's parser);
 *	- a success has NUL-free, non-empty, valid UTF-8 strings, a method of
 *	  POST/PUT/DELETE, a known resource, and snapshots that are JSON
 *	  objects which decode again to exactly the same text;
 *	- a body over max_message_bytes is always refused with 54000.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <stdio.h>
#include <stdlib.h>

#include "mb/pg_wchar.h"
#include "utils/errcodes.h"

#include "event_decode.h"

/* port.h maps these to pg_* versions that live in the server */
#undef fprintf
#undef printf

#define SBW_MAX_ERRMSG	2048

static void
fail(const char *what, const char *detail)
{
	fprintf(stderr, "fuzz_decode: %s: %s\n", what, detail ? detail : "(null)");
	abort();
}

static bool
valid_utf8(const char *s, size_t n)
{
	size_t		pos = 0;

	while (pos < n)
	{
		const unsigned char *p = (const unsigned char *) s + pos;
		int			l = (*p < 0x80) ? 1 : pg_utf_mblen(p);

		if (pos + l > n || (*p >= 0x80 && !pg_utf8_islegal(p, l)))
			return false;
		pos += l;
	}
	return true;
}

static void
check_string(const char *name, const char *v)
{
	if (v == NULL)
		return;
	if (v[0] == '\0')
		fail("empty string instead of NULL", name);
	if (!valid_utf8(v, strlen(v)))
		fail("invalid UTF-8 in a decoded string", name);
}


/*
 * A snapshot must be a JSON object that the decoder accepts again and
 * serializes to the same text: json-c's compact form is a fixed point.
 */
static void
check_snapshot(const char *snap)
{
	char	   *body;
	SbwEvent	ev2;
	char	   *errmsg;
	int			sqlstate;

	if (snap == NULL)
		return;
	if (snap[0] != '{')
		fail("snapshot is not an object", snap);
	body = psprintf("{\"resource\":\"story\",\"resource_after\":%s}", snap);
	if (!sbw_decode_event(body, strlen(body), 0, &ev2, &errmsg, &sqlstate))
		fail("snapshot does not decode again", errmsg);
	if (ev2.resource_after == NULL || strcmp(ev2.resource_after, snap) != 0)
		fail("snapshot changes when decoded again", ev2.resource_after);
	sbw_stub_free_event(&ev2);
	pfree(body);
}

static void
check_event(const SbwEvent *ev)
{
	check_string("method", ev->method);
	check_string("url", ev->url);
	check_string("path", ev->path);
	check_string("query_string", ev->query_string);
	check_string("resource", ev->resource);
	check_string("sub_resource", ev->sub_resource);
	check_string("resource_before", ev->resource_before);
	check_string("resource_after", ev->resource_after);
	if (ev->method != NULL && strcmp(ev->method, "POST") != 0 &&
		strcmp(ev->method, "PUT") != 0 && strcmp(ev->method, "DELETE") != 0)
		fail("method accepted", ev->method);
	if (!sbw_known_resource(ev->resource))
		fail("resource accepted", ev->resource);
	check_snapshot(ev->resource_before);
	check_snapshot(ev->resource_after);
}

static void
check_error(const char *errmsg, int sqlstate)
{
	size_t		n;

	if (errmsg == NULL)
		fail("failure without a message", NULL);
	n = strlen(errmsg);
	if (n == 0 || n > SBW_MAX_ERRMSG)
		fail("message empty or too long", errmsg);
	if (strchr(errmsg, '\n') != NULL || strchr(errmsg, '\r') != NULL)
		fail("message spans lines", errmsg);
	if (!valid_utf8(errmsg, n))
		fail("message is not valid UTF-8", errmsg);
	if (sqlstate == 0)
		fail("failure without a SQLSTATE", errmsg);
	if (sqlstate == ERRCODE_INTERNAL_ERROR)
		fail("internal error", errmsg);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	SbwEvent	ev;
	char	   *errmsg;
	int			sqlstate;

	/* libFuzzer's buffer is exactly size bytes: ASan sees any overread */
	if (sbw_decode_event((const char *) data, size, 0, &ev, &errmsg, &sqlstate))
	{
		if (errmsg != NULL || sqlstate != 0)
			fail("success with an error set", errmsg);
		check_event(&ev);
		sbw_stub_free_event(&ev);
	}
	else
	{
		check_error(errmsg, sqlstate);
		pfree(errmsg);
	}

	/* max_bytes = 0 means no limit, so a 1-byte body cannot be refused */
	if (size > 1)
	{
		if (sbw_decode_event((const char *) data, size, size - 1, &ev,
							 &errmsg, &sqlstate))
			fail("body over max_message_bytes accepted", NULL);
		if (sqlstate != ERRCODE_PROGRAM_LIMIT_EXCEEDED)
			fail("wrong SQLSTATE for the size limit", errmsg);
		pfree(errmsg);
	}
	return 0;
}
