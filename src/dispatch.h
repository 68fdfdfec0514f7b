/*-------------------------------------------------------------------------
 *
 * dispatch.h
 *		One event through every plugin (dispatch.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_DISPATCH_H
#define SBW_DISPATCH_H

#include "nodes/pg_list.h"

#include "storyboard_worker.h"

/* What happened to one plugin (or, plugin NULL, to the message itself). */
typedef struct SbwOutcome
{
	char	   *plugin;
	bool		succeeded;
	bool		skipped;		/* its enabled() said no */
	char	   *sqlstate;
	char	   *error;
	int64		dead_letter_id; /* 0 = none kept */
} SbwOutcome;

/* Options in, results out. */
typedef struct SbwDispatch
{
	/* in */
	const char *only_plugin;	/* NULL = every registered plugin */
	bool		keep_failures;	/* store plugin failures as dead letters */
	bool		keep_undecodable;	/* store undecodable bodies as dead letters */
	MemoryContext resultcxt;	/* where outcomes are allocated */
	/* out */
	bool		decoded;
	bool		undecodable;
	int			ndead_lettered;
	List	   *outcomes;		/* of SbwOutcome * */
} SbwDispatch;

extern void sbw_dispatch(SbwDispatch *d, const SbwMessage *msg);
extern void sbw_dispatch_give_up(SbwDispatch *d, const SbwMessage *msg,
								 int failures, const char *last_error);

/* Delete dead letters received before the cutoff (SPI connected). */
extern uint64 sbw_dead_letters_prune(TimestampTz cutoff);

#endif							/* SBW_DISPATCH_H */
