/*-------------------------------------------------------------------------
 *
 * event_decode.c
 *		Decode one StoryBoard message body (JSON) into an SbwEvent.
 *
 * This is the only file that includes json-c (its json_object type clashes
 * with utils/builtins.h, which must therefore never be included here).
 *
 * There is no JSON grammar of our own.  A body goes through, in order:
 * 1. PostgreSQL's UTF-8 verifier: the rules of text and jsonb.
 * 2. PostgreSQL's strict RFC 8259 parser (common/jsonapi.h), de-escaping
 *    when there is a \u escape, so that it refuses \u0000 and lone
 *    surrogates as text and jsonb do.  It reads only up to a bracket beyond
 *    the nesting bound, found on the raw bytes first: it recurses without a
 *    limit in a frontend build (unit test, fuzzer) and would throw from
 *    check_stack_depth() in the server.  Its scalar action checks that
 *    integers fit json-c's 64 bits (json-c clamps bigger ones silently).
 * 3. json-c, which builds the values (a duplicate key: the last one wins,
 *    as in Python's json.loads for StoryBoard, and in jsonb); then the 12
 *    keys' rules.  numeric's range is jsonb_in's: see has_decimal_number.
 *
 * It never calls ereport/elog itself (but see dispatch.c's sbw_decode_body),
 * so the fuzz harness and the unit test link it with fuzz/pg_stubs.c.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <json-c/json.h>
#include <math.h>

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "utils/errcodes.h"
#include "utils/memutils.h"

#include "compat.h"
#include "event_decode.h"

/* Deepest nesting accepted; the top-level object is level 1. */
#define SBW_JSON_MAX_DEPTH		64

/* Whatever max_message_bytes says: palloc's limit, and int lengths */
#define SBW_HARD_MAX_BYTES		(MaxAllocSize - 1)

#define SBW_MSG_QUOTE_BYTES		40	/* bytes of a value quoted in a message */
#define SBW_QUOTED_BYTES		(6 * SBW_MSG_QUOTE_BYTES + 8)
#define SBW_MSG_BYTES			(2 * SBW_QUOTED_BYTES + 200)

/* Flags for json_object_to_json_string_ext: compact, '/' unescaped. */
#define SBW_JSON_C_TO_STRING_FLAGS \
	(JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE)

/* JSON's four whitespace characters (RFC 8259). */
#define SBW_IS_JSON_WS(c)	((c) == ' ' || (c) == '\t' || (c) == '\n' || (c) == '\r')

/* Errors about what text and jsonb cannot hold, not about the syntax. */
#define SBW_IS_CONTENT_ERROR(e) \
	((e) == JSON_UNICODE_CODE_POINT_ZERO || (e) == JSON_UNICODE_HIGH_SURROGATE || \
	 (e) == JSON_UNICODE_LOW_SURROGATE)

/* What a key of the body holds. */
typedef enum SbwKeyType
{
	SBW_INT64,
	SBW_INT32,
	SBW_STRING,
	SBW_OBJECT
} SbwKeyType;

/* One of the 12 keys, and where its value goes in SbwEvent. */
typedef struct SbwKeyDef
{
	const char *name;
	SbwKeyType	type;
	size_t		value;			/* offset of the value */
	size_t		has;			/* offset of the has_ flag (integers) */
} SbwKeyDef;

#define SBW_INT_KEY(n, t)	{#n, t, offsetof(SbwEvent, n), offsetof(SbwEvent, has_##n)}
#define SBW_TEXT_KEY(n, t)	{#n, t, offsetof(SbwEvent, n), 0}

/* The 12 keys (reference section 2.5), in the order they are checked. */
static const SbwKeyDef sbw_keys[] = {
	SBW_INT_KEY(author_id, SBW_INT64),
	SBW_TEXT_KEY(method, SBW_STRING),
	SBW_TEXT_KEY(url, SBW_STRING),
	SBW_TEXT_KEY(path, SBW_STRING),
	SBW_TEXT_KEY(query_string, SBW_STRING),
	SBW_INT_KEY(status, SBW_INT32),
	SBW_TEXT_KEY(resource, SBW_STRING),
	SBW_INT_KEY(resource_id, SBW_INT64),
	SBW_TEXT_KEY(sub_resource, SBW_STRING),
	SBW_INT_KEY(sub_resource_id, SBW_INT64),
	SBW_TEXT_KEY(resource_before, SBW_OBJECT),
	SBW_TEXT_KEY(resource_after, SBW_OBJECT)
};

/*
 * StoryBoard's singular resource names: the values of singularize_resource
 * (reference section 2.2).  "comment" only ever appears as a sub-resource.
 */
static const char *const sbw_resource_names[] = {
	"story", "project", "project_group", "task", "branch", "milestone",
	"timeline_event", "user", "team", "tag", "task_status", "subscription",
	"subscription_event", "systeminfo", "openid", "worklist", "board",
	"due_date", "event", "comment"
};

/* State of the scalar action of PostgreSQL's parser (phase 2). */
typedef struct SbwGate
{
	JsonLexContext *lex;
	bool		has_decimal;	/* a number with a fraction or exponent */
	char	   *too_big;		/* first integer beyond 64 bits, a message */
} SbwGate;

/* Errors of PostgreSQL's parser: wording, followed by the token (gate_error) */
static const struct
{
	JsonParseErrorType code;
	const char *what;
}			sbw_json_errors[] = {
	{JSON_INVALID_TOKEN, "invalid token"},
	{JSON_EXPECTED_JSON, "expected a JSON value, found"},
	{JSON_EXPECTED_ARRAY_FIRST, "expected a JSON value or \"]\", found"},
	{JSON_EXPECTED_ARRAY_NEXT, "expected \",\" or \"]\", found"},
	{JSON_EXPECTED_STRING, "expected a string key, found"},
	{JSON_EXPECTED_OBJECT_FIRST, "expected a string key or \"}\", found"},
	{JSON_EXPECTED_COLON, "expected \":\" after an object key, found"},
	{JSON_EXPECTED_OBJECT_NEXT, "expected \",\" or \"}\", found"},
	{JSON_ESCAPING_INVALID, "invalid escape inside a string:"},
	{JSON_ESCAPING_REQUIRED, "control character not escaped inside a string:"},
	{JSON_EXPECTED_END, "unexpected data after the top-level value"},
	{JSON_EXPECTED_MORE, "unexpected end of input"},
	{JSON_UNICODE_ESCAPE_FORMAT, "invalid \\u escape (4 hex digits expected) inside a string"}
};

/*
 * Write s[0..n) for a message into out (SBW_QUOTED_BYTES), quoted or not,
 * cut short with "..." outside any UTF-8 character.  Control characters
 * would break the log line or the dead-letter row: they are shown as
 * \u00XX.  No palloc: json-c's objects may be alive (phase 3).
 */
static void
put_for_message(char *out, const char *s, size_t n, bool quoted)
{
	size_t		shown = Min(n, SBW_MSG_QUOTE_BYTES);

	while (shown > 0 && shown < n && (((unsigned char) s[shown]) & 0xC0) == 0x80)
		shown--;
	if (quoted)
		*out++ = '"';
	for (size_t i = 0; i < shown; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c == '"' || c == '\\')
			*out++ = '\\';
		if (c < 0x20 || c == 0x7F)
			out += sprintf(out, "\\u%04x", c);
		else
			*out++ = (char) c;
	}
	if (quoted)
		*out++ = '"';
	strcpy(out, shown < n ? "..." : "");
}

/* Size limits and empty bodies, judged on the length and whitespace. */
static bool
check_length(const char *body, size_t len, size_t max_bytes,
			 char **errmsg, int *sqlstate)
{
	size_t		i = 0;

	*sqlstate = body == NULL && len > 0 ? ERRCODE_INTERNAL_ERROR : ERRCODE_PROGRAM_LIMIT_EXCEEDED;
	if (body == NULL && len > 0)
		*errmsg = pstrdup("internal error in the event decoder: message body pointer is NULL");
	else if (max_bytes > 0 && len > max_bytes)
		*errmsg = psprintf("message body of %zu bytes exceeds storyboard_worker.max_message_bytes (%zu)",
						   len, max_bytes);
	else if (len > SBW_HARD_MAX_BYTES)
		*errmsg = psprintf("message body of %zu bytes exceeds the decoder's limit of %zu bytes",
						   len, (size_t) SBW_HARD_MAX_BYTES);
	while (*errmsg == NULL && i < len && SBW_IS_JSON_WS(body[i]))
		i++;
	if (*errmsg == NULL && i == len)
	{
		*errmsg = pstrdup(len == 0 ? "message body is empty" :
						  "message body contains only whitespace");
		*sqlstate = ERRCODE_INVALID_TEXT_REPRESENTATION;
	}
	return *errmsg == NULL;
}

/*
 * PostgreSQL's UTF-8 verifier, as strings end up in text or jsonb.  It
 * stops at NUL bytes: valid UTF-8, left to the JSON parser to refuse.
 */
static bool
check_utf8(const char *body, size_t len, char **errmsg, int *sqlstate)
{
	size_t		pos = 0;
	char		shown[4 * 5 + 1];
	size_t		n;

	for (;;)
	{
		pos += pg_encoding_verifymbstr(PG_UTF8, body + pos, (int) (len - pos));
		if (pos >= len)
			return true;
		if (body[pos] != '\0')
			break;
		pos++;
	}
	n = Min((size_t) pg_utf_mblen((const unsigned char *) body + pos), len - pos);
	for (size_t i = 0; i < n; i++)
		sprintf(shown + 5 * i, " 0x%02x", (unsigned char) body[pos + i]);
	*errmsg = psprintf("invalid UTF-8 byte sequence %s at byte offset %zu of the message body",
					   shown + 1, pos);
	*sqlstate = ERRCODE_CHARACTER_NOT_IN_REPERTOIRE;
	return false;
}

/*
 * Where the nesting goes beyond the bound (len: nowhere); brackets inside
 * strings do not count.  On the way, note a \u escape: only those can be
 * \u0000 or a lone surrogate, which PostgreSQL's parser finds only while
 * de-escaping, a copy of every string most bodies can do without; and a
 * backslash before a NUL byte, which PostgreSQL 15's lexer takes for a
 * valid escape unless it de-escapes (strchr finds the terminator).
 */
static size_t
depth_limit_at(const char *body, size_t len, bool *u_escape)
{
	int			depth = 0;
	bool		in_string = false;
	size_t		i;

	for (i = 0; i < len; i++)
	{
		char		c = body[i];

		if (in_string)
		{
			if (c == '\\' && i + 1 < len && (body[++i] == 'u' || body[i] == '\0'))
				*u_escape = true;
			else if (c == '"')
				in_string = false;
		}
		else if (c == '"')
			in_string = true;
		else if (c == ']' || c == '}')
			depth--;
		else if ((c == '[' || c == '{') && ++depth > SBW_JSON_MAX_DEPTH)
			return i;
	}
	return len;
}

/*
 * json-c would clamp an integer beyond int64 (negative) or uint64 silently:
 * note the first, which ends at prev_token_terminator (the lexer has moved
 * on), and a fraction or exponent (has_decimal_number).  Frees the token.
 */
static SBW_JSON_ACTION
gate_scalar(void *state, char *token, JsonTokenType tokentype)
{
	SbwGate    *g = (SbwGate *) state;
	bool		neg = (token != NULL && token[0] == '-');
	const char *limit = neg ? "9223372036854775808" : "18446744073709551615";
	size_t		n = token ? strlen(token) : 0;
	char		num[SBW_QUOTED_BYTES];

	if (tokentype == JSON_TOKEN_NUMBER && token != NULL)
	{
		if (strpbrk(token, ".eE") != NULL)
			g->has_decimal = true;
		else if (g->too_big == NULL &&
				 (n - neg > strlen(limit) ||
				  (n - neg == strlen(limit) && strcmp(token + neg, limit) > 0)))
		{
			put_for_message(num, token, n, false);
			g->too_big = psprintf("number %s at byte offset %zu is out of range for a 64-bit integer",
								  num, (size_t) (g->lex->prev_token_terminator - g->lex->input) - n);
		}
	}
	if (token != NULL)
		pfree(token);
	SBW_JSON_ACTION_DONE;
}

/*
 * Describe an error of PostgreSQL's parser, from its code and its lexer's
 * position; json_errdetail() would quote whole tokens and raw controls.
 */
static void
gate_error(JsonParseErrorType err, JsonLexContext *lex, size_t len,
		   char **errmsg, int *sqlstate)
{
	size_t		at = lex->token_start ? lex->token_start - lex->input : len;
	size_t		end = lex->token_terminator - lex->input;
	const char *what = "error of PostgreSQL's JSON parser";
	char		token[SBW_QUOTED_BYTES + 1] = "";
	int			i;

	*sqlstate = ERRCODE_INVALID_TEXT_REPRESENTATION;
	if (err == JSON_UNICODE_CODE_POINT_ZERO)
	{
		*errmsg = psprintf("message body has \\u0000 in the string at byte offset %zu, which PostgreSQL text and jsonb cannot store",
						   at);
		*sqlstate = ERRCODE_UNTRANSLATABLE_CHARACTER;
		return;
	}
	if (SBW_IS_CONTENT_ERROR(err))
	{
		*errmsg = psprintf("message body has a lone UTF-16 surrogate in the string at byte offset %zu",
						   at);
		return;
	}
	if (err == JSON_EXPECTED_MORE)
		at = len;
	else if (err == JSON_ESCAPING_INVALID)
		at--;					/* the token starts after the backslash */
	else if (err == JSON_ESCAPING_REQUIRED)
		at = end++;				/* the lexer stopped at the character */
	for (i = 0; i < lengthof(sbw_json_errors); i++)
	{
		if (sbw_json_errors[i].code != err)
			continue;
		what = sbw_json_errors[i].what;
		if (err != JSON_EXPECTED_END && err != JSON_EXPECTED_MORE &&	/* no token */
			err != JSON_UNICODE_ESCAPE_FORMAT)
		{
			token[0] = ' ';
			put_for_message(token + 1, lex->input + at, end - at, true);
		}
	}
	*errmsg = psprintf("message body is not valid JSON: %s%s at byte offset %zu",
					   what, token, at);
}

/*
 * The gate: PostgreSQL's parser, on body[0..deep).  Errors come out in
 * this order: syntax, nesting, the top-level type, then what text and
 * jsonb cannot hold (the first in the body: integer beyond 64 bits,
 * \u0000, lone surrogate).  \u0000 and surrogates stop the parser, so a
 * second, syntax-only pass looks for a syntax error behind them.  A memory
 * context of its own: the parser does not free all it allocated on every
 * error path.
 */
static bool
check_json(const char *body, size_t len, size_t deep, bool u_escape,
		   bool *has_decimal, char **errmsg, int *sqlstate)
{
	MemoryContext caller = CurrentMemoryContext;
	MemoryContext scratch = AllocSetContextCreate(caller,
												  "storyboard_worker decoder",
												  ALLOCSET_SMALL_SIZES);
	SbwGate		g = {0};
	JsonSemAction sem = {0};
	JsonLexContext *lex2 = NULL;
	JsonParseErrorType err;
	JsonParseErrorType err2 = JSON_SUCCESS;
	const char *top = body + strspn(body, " \t\n\r");	/* not all blank */

	MemoryContextSwitchTo(scratch);
	sem.semstate = &g;
	sem.scalar = gate_scalar;
	g.lex = sbw_json_lex_context(body, deep, u_escape);
	err = pg_parse_json(g.lex, &sem);
	if (SBW_IS_CONTENT_ERROR(err))
	{
		sem.scalar = NULL;
		lex2 = sbw_json_lex_context(body, deep, false);
		err2 = pg_parse_json(lex2, &sem);
	}
	MemoryContextSwitchTo(caller);
	if (deep < len && (err == JSON_EXPECTED_MORE || err2 == JSON_EXPECTED_MORE))
		err = err2 = JSON_SUCCESS;	/* cut short at the nesting limit */

	*sqlstate = 0;
	if (err2 != JSON_SUCCESS)
		gate_error(err2, lex2, len, errmsg, sqlstate);
	else if (err != JSON_SUCCESS && !SBW_IS_CONTENT_ERROR(err))
		gate_error(err, g.lex, len, errmsg, sqlstate);
	else if (deep < len)
	{
		*errmsg = psprintf("JSON nesting deeper than %d levels at byte offset %zu",
						   SBW_JSON_MAX_DEPTH, deep);
		*sqlstate = ERRCODE_PROGRAM_LIMIT_EXCEEDED;
	}
	else if (*top != '{')
	{
		*errmsg = psprintf("message body is %s, not an object",
						   *top == '[' ? "a JSON array" : *top == '"' ? "a JSON string" :
						   *top == 't' || *top == 'f' ? "a JSON boolean" :
						   *top == 'n' ? "JSON null" : "a JSON number");
		*sqlstate = ERRCODE_DATATYPE_MISMATCH;
	}
	else if (g.too_big != NULL)
	{
		*errmsg = pstrdup(g.too_big);
		*sqlstate = ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE;
	}
	else if (err != JSON_SUCCESS)
		gate_error(err, g.lex, len, errmsg, sqlstate);
	*has_decimal = g.has_decimal;
	MemoryContextDelete(scratch);
	return *sqlstate == 0;
}

/*
 * Phase 3: json-c.  While its objects are alive nothing may throw, so
 * messages go to a buffer of SBW_MSG_BYTES, and copies are made with
 * palloc_extended(MCXT_ALLOC_NO_OOM).  No copy is over MaxAllocSize:
 * json-c's texts are never longer than the body.
 *
 * describe_value: a wrong-typed value in "..., not <this>": numbers and
 * strings shown; a falsy number is "the integer 0" or "the number 0".
 */
static void
describe_value(json_object *v, char *buf)
{
	json_type	type = json_object_get_type(v);
	const char *text = NULL;
	size_t		n = 0;

	if (type == json_type_string && (n = json_object_get_string_len(v)) > 0)
		text = json_object_get_string(v);
	else if ((type == json_type_int || type == json_type_double) &&
			 json_object_get_double(v) != 0.0)
		text = json_object_to_json_string_length(v, SBW_JSON_C_TO_STRING_FLAGS, &n);
	strcpy(buf, type == json_type_string ? (text ? "the string " : "an empty string") :
		   type == json_type_int ? (text ? "the integer " : "the integer 0") :
		   type == json_type_double ? (text ? "the number " : "the number 0") :
		   type == json_type_boolean ? "a boolean" :
		   type == json_type_array ? "an array" :
		   type == json_type_object ? "an object" : "null");
	if (text != NULL)
		put_for_message(buf + strlen(buf), text, n, type == json_type_string);
}

/* Fail with "key \"<key>\" must be <expected>, not <what it is>". */
static bool
type_error(const SbwKeyDef *def, json_object *v, char *msg, int *sqlstate)
{
	char		what[SBW_QUOTED_BYTES + 16];

	describe_value(v, what);
	snprintf(msg, SBW_MSG_BYTES, "key \"%s\" must be %s, not %s", def->name,
			 def->type == SBW_STRING ? "a string or null" :
			 def->type == SBW_OBJECT ? "an object or null" :
			 "an integer, a string of digits or null", what);
	*sqlstate = ERRCODE_DATATYPE_MISMATCH;
	return false;
}

/*
 * An id or status: a JSON integer, a string of ASCII digits (StoryBoard
 * passes URL ids as strings such as "1"), or NULL (also for 0 and "":
 * StoryBoard's "or None"); within 64 or 32 bits.
 */
static bool
take_integer(const SbwKeyDef *def, json_object *v, json_type type,
			 SbwEvent *ev, char *msg, int *sqlstate)
{
	bool		is32 = (def->type == SBW_INT32);
	const char *s = NULL;
	size_t		n = 0;
	size_t		i;
	int64		val = 0;
	bool		too_big = false;
	char		shown[SBW_QUOTED_BYTES];

	if (type == json_type_int)
	{
		/* get_int64 would clamp a uint64 above INT64_MAX */
		too_big = json_object_get_uint64(v) > (uint64_t) PG_INT64_MAX;
		val = json_object_get_int64(v);
	}
	else if (type == json_type_string)
	{
		s = json_object_get_string(v);
		n = (size_t) json_object_get_string_len(v);
		for (i = 0; i < n; i++)
		{
			if (s[i] < '0' || s[i] > '9')
				return type_error(def, v, msg, sqlstate);
			too_big |= (val > (PG_INT64_MAX - (s[i] - '0')) / 10);
			val = too_big ? 0 : val * 10 + (s[i] - '0');
		}
	}
	else if (type == json_type_double && isinf(json_object_get_double(v)))
		too_big = true;			/* beyond double's range, let alone int64's */
	else if (type != json_type_null)
		return type_error(def, v, msg, sqlstate);
	if (too_big || val < (is32 ? PG_INT32_MIN : PG_INT64_MIN) ||
		val > (is32 ? PG_INT32_MAX : PG_INT64_MAX))
	{
		if (s == NULL)
			s = json_object_to_json_string_length(v, SBW_JSON_C_TO_STRING_FLAGS, &n);
		put_for_message(shown, s ? s : "?", s ? n : 1, type == json_type_string);
		snprintf(msg, SBW_MSG_BYTES, "key \"%s\" is out of range for a %d-bit integer: %s",
				 def->name, is32 ? 32 : 64, shown);
		*sqlstate = ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE;
		return false;
	}
	*(bool *) ((char *) ev + def->has) = (s != NULL ? n > 0 : val != 0);
	if (is32)
		*(int32 *) ((char *) ev + def->value) = (int32) val;
	else
		*(int64 *) ((char *) ev + def->value) = val;
	return true;
}

/*
 * A string, or a snapshot as json-c's compact text: copied into the event.
 * NULL for null and for a falsy value of the key's type ("" or {}).
 */
static bool
take_text(const SbwKeyDef *def, json_object *v, json_type type, SbwEvent *ev,
		  char *msg, int *sqlstate)
{
	bool		object = (def->type == SBW_OBJECT);
	const char *text;
	size_t		n = 0;
	char	   *copy;

	if (type == json_type_null)
		return true;
	if (type != (object ? json_type_object : json_type_string))
		return type_error(def, v, msg, sqlstate);
	if ((object ? json_object_object_length(v) : json_object_get_string_len(v)) == 0)
		return true;
	text = object ? json_object_to_json_string_length(v, SBW_JSON_C_TO_STRING_FLAGS, &n) :
		json_object_get_string(v);
	if (!object)
		n = (size_t) json_object_get_string_len(v);
	copy = text ? palloc_extended(n + 1, MCXT_ALLOC_NO_OOM) : NULL;
	if (copy == NULL)
	{
		snprintf(msg, SBW_MSG_BYTES, "out of memory while decoding the message body");
		*sqlstate = ERRCODE_OUT_OF_MEMORY;
		return false;
	}
	memcpy(copy, text, n);
	copy[n] = '\0';
	*(char **) ((char *) ev + def->value) = copy;
	return true;
}

/*
 * StoryBoard only publishes for POST, PUT and DELETE (NotificationHook,
 * section 2.2), and never without a resource (publish()'s routing key).
 */
static bool
check_names(const char *key, const SbwEvent *ev, char *msg, int *sqlstate)
{
	char		q[SBW_QUOTED_BYTES];
	const char *m = ev->method;

	*sqlstate = ERRCODE_INVALID_PARAMETER_VALUE;
	if (strcmp(key, "method") == 0 && m != NULL && strcmp(m, "POST") != 0 &&
		strcmp(m, "PUT") != 0 && strcmp(m, "DELETE") != 0)
	{
		put_for_message(q, m, strlen(m), true);
		snprintf(msg, SBW_MSG_BYTES, "method %s is not one of POST, PUT, DELETE", q);
		return false;
	}
	if (strcmp(key, "resource") != 0 || sbw_known_resource(ev->resource))
	{
		*sqlstate = 0;
		return true;
	}
	if (ev->resource == NULL)
		snprintf(msg, SBW_MSG_BYTES, "key \"resource\" is missing, null or empty");
	else
	{
		put_for_message(q, ev->resource, strlen(ev->resource), true);
		snprintf(msg, SBW_MSG_BYTES, "unknown resource %s", q);
	}
	return false;
}

/* Free what a failed decode put in the event, and zero it. */
static void
clear_event(SbwEvent *ev)
{
	for (int k = 0; k < lengthof(sbw_keys); k++)
	{
		char	  **text = (char **) ((char *) ev + sbw_keys[k].value);

		if (sbw_keys[k].type >= SBW_STRING && *text != NULL)
			pfree(*text);
	}
	memset(ev, 0, sizeof(SbwEvent));
}

/*
 * Parse with json-c (it must accept what the gate accepted; its depth
 * counts a scalar inside the deepest container as one more level) and take
 * the 12 keys in table order: the first problem reported is deterministic.
 * The explicit length matters: AMQP bodies are not NUL-terminated.
 */
static bool
decode_values(const char *body, size_t len, SbwEvent *ev, char **errmsg,
			  int *sqlstate)
{
	json_tokener *tok = json_tokener_new_ex(SBW_JSON_MAX_DEPTH + 1);
	json_object *root = NULL;
	json_object *v;
	json_type	type;
	char		msg[SBW_MSG_BYTES] = "out of memory in json-c while decoding the message body";
	bool		ok;
	int			k;

	*sqlstate = ERRCODE_OUT_OF_MEMORY;
	if (tok != NULL)
	{
		json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
		root = json_tokener_parse_ex(tok, body, (int) len);
	}
	ok = (root != NULL && json_tokener_get_error(tok) == json_tokener_success &&
		  json_tokener_get_parse_end(tok) == len &&
		  json_object_is_type(root, json_type_object));
	if (!ok && tok != NULL)
	{
		snprintf(msg, sizeof(msg), "internal error in the event decoder: json-c refused a body PostgreSQL's parser accepted (%s at byte offset %zu)",
				 json_tokener_error_desc(json_tokener_get_error(tok)),
				 json_tokener_get_parse_end(tok));
		*sqlstate = ERRCODE_INTERNAL_ERROR;
	}
	for (k = 0; ok && k < lengthof(sbw_keys); k++)
	{
		v = NULL;
		json_object_object_get_ex(root, sbw_keys[k].name, &v);
		type = v ? json_object_get_type(v) : json_type_null;
		ok = (sbw_keys[k].type == SBW_INT64 || sbw_keys[k].type == SBW_INT32 ?
			  take_integer(&sbw_keys[k], v, type, ev, msg, sqlstate) :
			  take_text(&sbw_keys[k], v, type, ev, msg, sqlstate)) &&
			check_names(sbw_keys[k].name, ev, msg, sqlstate);
	}
	if (root != NULL)
		json_object_put(root);
	if (tok != NULL)
		json_tokener_free(tok);
	if (!ok)
	{
		*errmsg = pstrdup(msg);
		clear_event(ev);
	}
	return ok;
}

/*
 * sbw_decode_event: see event_decode.h.  Errors come out in this order:
 * size, UTF-8, then check_json's, then the keys' rules.
 */
bool
sbw_decode_event(const char *body, size_t len, size_t max_bytes,
				 SbwEvent *ev, char **errmsg, int *sqlstate)
{
	bool		has_decimal = false;
	bool		u_escape = false;
	size_t		deep;

	memset(ev, 0, sizeof(SbwEvent));
	*errmsg = NULL;
	*sqlstate = 0;
	if (!check_length(body, len, max_bytes, errmsg, sqlstate) ||
		!check_utf8(body, len, errmsg, sqlstate))
		return false;
	deep = depth_limit_at(body, len, &u_escape);
	if (!check_json(body, len, deep, u_escape, &has_decimal, errmsg, sqlstate) ||
		!decode_values(body, len, ev, errmsg, sqlstate))
		return false;
	ev->has_decimal_number = has_decimal;
	return true;
}

/*
 * sbw_known_resource: is name one of StoryBoard's singular resource names?
 * Anything else would have made singularize_resource return None, and
 * publish() would not have sent the message.
 */
bool
sbw_known_resource(const char *name)
{
	int			i;

	if (name == NULL)
		return false;
	for (i = 0; i < lengthof(sbw_resource_names); i++)
		if (strcmp(name, sbw_resource_names[i]) == 0)
			return true;
	return false;
}
