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

#include "utils/timestamp.h"

/*
 * A message: its body and the delivery's metadata.  routing_key and
 * message_id are text that PostgreSQL can store (sbw_storable_text);
 * message_id_raw holds the id's bytes as sent, for the ledger key.
 */
typedef struct SbwMessage
{
	const char *routing_key;
	const char *message_id;		/* NULL when the publisher set none */
	const char *message_id_raw;
	size_t		message_id_len;
	bool		redelivered;
	const char *body;
	size_t		body_len;		/* bytes held in body */
	size_t		body_declared_len;	/* bytes sent: more when cut short */
} SbwMessage;

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
