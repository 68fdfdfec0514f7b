/*-------------------------------------------------------------------------
 *
 * pg_stubs.h
 *		Test-only helpers of pg_stubs.c (not part of the extension).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_PG_STUBS_H
#define SBW_PG_STUBS_H

/* palloc'd chunks not yet pfree'd */
extern long sbw_stub_live_allocations(void);

/* pfree every string of a decoded event (SbwEvent, event_decode.h) */
struct SbwEvent;
extern void sbw_stub_free_event(struct SbwEvent *ev);

#endif							/* SBW_PG_STUBS_H */
