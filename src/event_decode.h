/*-------------------------------------------------------------------------
 *
 * event_decode.h
 *		The StoryBoard event body, decoded from JSON into plain C values.
 *
 * The decoder (event_decode.c) is the only file that includes json-c: its
 * json_object type clashes with PostgreSQL's utils/builtins.h.  So this
 * header must include nothing but postgres.h types.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_EVENT_DECODE_H
#define SBW_EVENT_DECODE_H

/*
 * One decoded StoryBoard message body (reference section 2.5: 12 keys).
 * A NULL char pointer or a false has_* flag means the key was missing, JSON
 * null, or falsy in StoryBoard's sense (payload[key] or None: "", 0, {}).
 * Strings are palloc'd, NUL-free, valid UTF-8.  resource_before/after are
 * JSON object texts for jsonb_in, which alone checks numeric's range: if
 * has_decimal_number is set (some number has a fraction or an exponent),
 * jsonb_in may refuse a snapshot, so the caller converts it where an error
 * can be caught (dispatch.c).
 */
typedef struct SbwEvent
{
	bool		has_author_id;
	int64		author_id;
	char	   *method;
	char	   *url;
	char	   *path;
	char	   *query_string;
	bool		has_status;
	int32		status;
	char	   *resource;
	bool		has_resource_id;
	int64		resource_id;
	char	   *sub_resource;
	bool		has_sub_resource_id;
	int64		sub_resource_id;
	char	   *resource_before;
	char	   *resource_after;
	bool		has_decimal_number;
} SbwEvent;

/*
 * Decode body[0..len).  Returns true on success.  On failure returns false,
 * sets *errmsg to a palloc'd one-line message naming the key and the problem,
 * and *sqlstate to a PostgreSQL error code (MAKE_SQLSTATE value), e.g.
 * ERRCODE_INVALID_TEXT_REPRESENTATION for invalid JSON,
 * ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE for an id out of range,
 * ERRCODE_CHARACTER_NOT_IN_REPERTOIRE for invalid UTF-8,
 * ERRCODE_UNTRANSLATABLE_CHARACTER for \u0000,
 * ERRCODE_PROGRAM_LIMIT_EXCEEDED for size or depth limits,
 * ERRCODE_DATATYPE_MISMATCH for a wrong JSON type.
 * Never throws for bad input in a UTF-8 database; in another, PostgreSQL's
 * parser may raise converting a \u escape (dispatch.c catches that).
 * json-c memory is always freed.
 */
extern bool sbw_decode_event(const char *body, size_t len, size_t max_bytes,
							 SbwEvent *ev, char **errmsg, int *sqlstate);

/* Is this one of StoryBoard's singular resource names (section 2.2)? */
extern bool sbw_known_resource(const char *name);

#endif							/* SBW_EVENT_DECODE_H */
