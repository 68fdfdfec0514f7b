/*-------------------------------------------------------------------------
 *
 * pg_stubs.c
 *		malloc-based stand-ins for the PostgreSQL memory functions that
 *		src/event_decode.c uses, so that the decoder can be linked outside
 *		the server: by the libFuzzer target (fuzz/) and by the unit test
 *		(test/unit/).
 *
 * The decoder uses palloc, palloc0, palloc_extended, pstrdup, pnstrdup,
 * psprintf, pfree and one scratch memory context (AllocSetContextCreate,
 * MemoryContextSwitchTo, MemoryContextDelete) for PostgreSQL's JSON parser,
 * which allocates in the current context and does not free everything on
 * every error path.  That parser (common/jsonapi.c), its StringInfo
 * (common/stringinfo.c, which also needs repalloc and pvsnprintf) and the
 * UTF-8 verifier (common/wchar.c) are linked from the real frontend
 * archives, libpgcommon.a and libpgport.a.  Defining every symbol of
 * fe_memutils.o and psprintf.o here keeps those two out of the link.
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

/*
 * Each chunk is on its context's doubly-linked list, so that deleting the
 * context frees what is left in it.  32 bytes keep the data 16-aligned.
 */
typedef struct StubChunk
{
	struct StubChunk *prev;
	struct StubChunk *next;
	struct StubContext *cxt;
	Size		size;
} StubChunk;

typedef struct StubContext
{
	StubChunk	head;			/* list sentinel */
} StubContext;

static StubContext stub_top = {{&stub_top.head, &stub_top.head, &stub_top, 0}};

MemoryContext CurrentMemoryContext = (MemoryContext) &stub_top;

static long sbw_stub_live = 0;

/*
 * Like the server, refuse requests above MaxAllocSize (the server would
 * throw an ERROR; here that is a bug worth a crash report).
 */
void *
palloc_extended(Size size, int flags)
{
	StubContext *cxt = (StubContext *) CurrentMemoryContext;
	StubChunk  *c;

	if (size > MaxAllocSize)
	{
		fprintf(stderr, "pg_stubs: invalid palloc request size %zu\n", size);
		abort();
	}
	c = malloc(sizeof(StubChunk) + size);
	if (c == NULL)
	{
		if (flags & MCXT_ALLOC_NO_OOM)
			return NULL;
		fprintf(stderr, "pg_stubs: out of memory (%zu bytes)\n", size);
		abort();
	}
	c->cxt = cxt;
	c->size = size;
	c->next = cxt->head.next;
	c->prev = &cxt->head;
	cxt->head.next->prev = c;
	cxt->head.next = c;
	sbw_stub_live++;
	if (flags & MCXT_ALLOC_ZERO)
		memset(c + 1, 0, size);
	return c + 1;
}

void *
palloc(Size size)
{
	return palloc_extended(size, 0);
}

void *
palloc0(Size size)
{
	return palloc_extended(size, MCXT_ALLOC_ZERO);
}

/* The server crashes on pfree(NULL), so the stub does too. */
void
pfree(void *pointer)
{
	StubChunk  *c;

	if (pointer == NULL)
	{
		fprintf(stderr, "pg_stubs: pfree(NULL)\n");
		abort();
	}
	c = (StubChunk *) pointer - 1;
	c->prev->next = c->next;
	c->next->prev = c->prev;
	sbw_stub_live--;
	free(c);
}

/* A new chunk in the same context, as in the server. */
void *
repalloc(void *pointer, Size size)
{
	StubChunk  *old = (StubChunk *) pointer - 1;
	MemoryContext save = CurrentMemoryContext;
	void	   *p;

	CurrentMemoryContext = (MemoryContext) old->cxt;
	p = palloc(size);
	CurrentMemoryContext = save;
	memcpy(p, pointer, Min(size, old->size));
	pfree(pointer);
	return p;
}

MemoryContext
AllocSetContextCreateInternal(MemoryContext parent, const char *name,
							  Size minContextSize, Size initBlockSize,
							  Size maxBlockSize)
{
	StubContext *cxt = malloc(sizeof(StubContext));

	if (cxt == NULL)
		abort();
	cxt->head.prev = cxt->head.next = &cxt->head;
	cxt->head.cxt = cxt;
	return (MemoryContext) cxt;
}

/* Free whatever is left in the context, then the context. */
void
MemoryContextDelete(MemoryContext context)
{
	StubContext *cxt = (StubContext *) context;

	while (cxt->head.next != &cxt->head)
		pfree(cxt->head.next + 1);
	free(cxt);
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

/* common/psprintf.c's contract: the length if it fit, else the size needed */
size_t
pvsnprintf(char *buf, size_t len, const char *fmt, va_list args)
{
	int			n = vsnprintf(buf, len, fmt, args);

	if (n < 0)
		abort();
	return ((size_t) n < len) ? (size_t) n : (size_t) n + 1;
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
