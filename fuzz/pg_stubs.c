/*-------------------------------------------------------------------------
 *
 * pg_stubs.c
 *		malloc-based stand-ins for the PostgreSQL memory functions that
 *		src/event_decode.c uses, so that the decoder can be linked outside
 *		the server: by the libFuzzer target (fuzz/) and by the unit test
 *		(test/unit/).
 *
 * The decoder uses only palloc, palloc0, pstrdup, pnstrdup, psprintf and
 * pfree, plus pure functions from libpgcommon/libpgport (pg_utf_mblen,
 * pg_utf8_islegal, pg_qsort), which are linked from the real archives.
 *
 * Every allocation is a separate malloc, so AddressSanitizer sees overruns
 * and LeakSanitizer sees anything the decoder forgets to pfree.  A live
 * allocation counter lets the unit test check the same without ASan.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "utils/memutils.h"

#include "event_decode.h"
#include "pg_stubs.h"

/* port.h maps these to pg_* versions that live in the server */
#undef vsnprintf

static long sbw_stub_live = 0;

/*
 * Like the server, refuse requests above MaxAllocSize (the server would
 * throw an ERROR; here that is a bug worth a crash report).
 */
void *
palloc(Size size)
{
	void	   *p;

	if (size > MaxAllocSize)
	{
		fprintf(stderr, "pg_stubs: invalid palloc request size %zu\n", size);
		abort();
	}
	p = malloc(size > 0 ? size : 1);
	if (p == NULL)
	{
		fprintf(stderr, "pg_stubs: out of memory (%zu bytes)\n", size);
		abort();
	}
	sbw_stub_live++;
	return p;
}

void *
palloc0(Size size)
{
	void	   *p = palloc(size);

	memset(p, 0, size);
	return p;
}

/* The server crashes on pfree(NULL), so the stub does too. */
void
pfree(void *pointer)
{
	if (pointer == NULL)
	{
		fprintf(stderr, "pg_stubs: pfree(NULL)\n");
		abort();
	}
	sbw_stub_live--;
	free(pointer);
}

char *
pstrdup(const char *in)
{
	size_t		len = strlen(in);
	char	   *out = palloc(len + 1);

	memcpy(out, in, len + 1);
	return out;
}

/* Same contract as the server: at most len bytes, stopping at a NUL. */
char *
pnstrdup(const char *in, Size len)
{
	char	   *out;

	len = strnlen(in, len);
	out = palloc(len + 1);
	memcpy(out, in, len);
	out[len] = '\0';
	return out;
}

char *
psprintf(const char *fmt,...)
{
	va_list		args;
	int			n;
	char	   *out;

	va_start(args, fmt);
	n = vsnprintf(NULL, 0, fmt, args);
	va_end(args);
	if (n < 0)
		abort();
	out = palloc((size_t) n + 1);
	va_start(args, fmt);
	vsnprintf(out, (size_t) n + 1, fmt, args);
	va_end(args);
	return out;
}

long
sbw_stub_live_allocations(void)
{
	return sbw_stub_live;
}

/*
 * Free what a successful sbw_decode_event() handed back, so the harnesses
 * can check that nothing else is left allocated.
 */
void
sbw_stub_free_event(struct SbwEvent *ev)
{
	char	   *strs[] = {ev->method, ev->url, ev->path, ev->query_string,
		ev->resource, ev->sub_resource, ev->resource_before, ev->resource_after};
	size_t		i;

	for (i = 0; i < lengthof(strs); i++)
		if (strs[i] != NULL)
			pfree(strs[i]);
}
