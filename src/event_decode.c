/*-------------------------------------------------------------------------
 *
 * event_decode.c
 *		Decode one StoryBoard message body (JSON) into an SbwEvent.
 *
 * This is the only file that includes json-c (its json_object type clashes
 * with utils/builtins.h, which must therefore never be included here).
 *
 * Decoding runs in three phases:
 *
 * 1. A strict scanner of our own walks the raw bytes once.  It checks UTF-8
 *    with PostgreSQL's own rules, RFC 8259 syntax, the nesting depth, and
 *    the contents that PostgreSQL text/jsonb cannot hold: \u0000, lone UTF-16
 *    surrogates, integers beyond 64 bits and numbers beyond numeric's range.
 *    It reports them with byte offsets or key paths.  We need it because
 *    json-c 0.16, even with JSON_TOKENER_STRICT, accepts NaN, Infinity,
 *    "01.5", "-.5", "1.", single-quoted strings, raw control characters and
 *    lone surrogates (replaced by U+FFFD).  It clamps integers beyond
 *    int64/uint64 to INT64_MIN/UINT64_MAX without error, truncates keys at
 *    \u0000, and its JSON_TOKENER_VALIDATE_UTF8 flag lets overlong forms and
 *    surrogates through.  The scanner also counts the top-level members and
 *    notes where the 12 known values lie, so that every output buffer can
 *    be allocated before json-c runs.
 *
 * 2. json-c parses the same bytes (explicit length, depth 64, STRICT and
 *    VALIDATE_UTF8 as a second line of defence).  While json-c objects are
 *    alive we only copy into the buffers from phase 1.  Nothing can throw,
 *    so json-c memory is freed on every path, including out-of-memory
 *    errors from palloc, which happen before or after this phase.
 *
 * 3. StoryBoard's rules (types, "payload[key] or None", method and resource
 *    names) are applied to the copies.  Error messages are built here.
 *
 * The decoder never calls ereport/elog.  It uses only palloc, palloc0,
 * pstrdup, pnstrdup, psprintf, pfree and pure functions (pg_utf_mblen,
 * pg_utf8_islegal, qsort), so the fuzz harness (fuzz/) and the unit test
 * (test/unit/) link it with malloc-based stubs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <json-c/json.h>

#include "mb/pg_wchar.h"
#include "utils/errcodes.h"
#include "utils/memutils.h"

#include "event_decode.h"

/* Deepest nesting accepted; the top-level object is level 1. */
#define SBW_JSON_MAX_DEPTH		64

/*
 * Hard cap on the body length, whatever max_message_bytes says.  Every
 * output buffer is at most len + 1 bytes and must stay a legal palloc
 * request (MaxAllocSize); json-c also takes the length as an int.
 */
#define SBW_HARD_MAX_BYTES		(MaxAllocSize - 1)

/* How many bytes of a value, key or number text are quoted in a message. */
#define SBW_MSG_QUOTE_BYTES		40

/*
 * numeric's limits, as seen from jsonb_in (checked against PostgreSQL 15):
 * display scale at most NUMERIC_DSCALE_MAX (0x3FFF), decimal weight of the
 * most significant digit at most 4 * (NUMERIC_WEIGHT_MAX + 1) - 1, and
 * set_var_from_str refuses exponents of INT_MAX / 2 or more.  The macros
 * live in numeric.c, not in a header, so they are repeated here.
 */
#define SBW_NUMERIC_DSCALE_MAX		16383
#define SBW_NUMERIC_DWEIGHT_MAX		131071
#define SBW_NUMERIC_EXPONENT_LIMIT	((int64) (PG_INT32_MAX / 2))

/* isdigit() depends on the locale; JSON digits do not. */
#define SBW_IS_DIGIT(c)			((c) >= '0' && (c) <= '9')

/* Flags for json_object_to_json_string_ext: compact, '/' unescaped. */
#define SBW_JSON_C_TO_STRING_FLAGS \
	(JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE)

/* The 12 keys of the message body (reference section 2.5), in order. */
typedef enum SbwKey
{
	SBW_KEY_AUTHOR_ID,
	SBW_KEY_METHOD,
	SBW_KEY_URL,
	SBW_KEY_PATH,
	SBW_KEY_QUERY_STRING,
	SBW_KEY_STATUS,
	SBW_KEY_RESOURCE,
	SBW_KEY_RESOURCE_ID,
	SBW_KEY_SUB_RESOURCE,
	SBW_KEY_SUB_RESOURCE_ID,
	SBW_KEY_RESOURCE_BEFORE,
	SBW_KEY_RESOURCE_AFTER,
	SBW_NUM_KEYS
} SbwKey;

static const char *const sbw_key_names[SBW_NUM_KEYS] = {
	"author_id",
	"method",
	"url",
	"path",
	"query_string",
	"status",
	"resource",
	"resource_id",
	"sub_resource",
	"sub_resource_id",
	"resource_before",
	"resource_after"
};

/* Longest name above ("resource_before"), plus room to detect longer keys. */
#define SBW_KEY_NAME_BUF		24

/*
 * StoryBoard's singular resource names: the values of singularize_resource
 * (reference section 2.2).  "comment" only ever appears as a sub-resource.
 */
static const char *const sbw_resource_names[] = {
	"story",
	"project",
	"project_group",
	"task",
	"branch",
	"milestone",
	"timeline_event",
	"user",
	"team",
	"tag",
	"task_status",
	"subscription",
	"subscription_event",
	"systeminfo",
	"openid",
	"worklist",
	"board",
	"due_date",
	"event",
	"comment"
};

/* A small growable palloc'd string, for messages only. */
typedef struct SbwBuf
{
	char	   *data;
	size_t		len;
	size_t		cap;
} SbwBuf;

/* One level of the key path: a member's raw key, or an array index. */
typedef struct SbwPathSeg
{
	const char *key;			/* raw key text between the quotes, or NULL */
	size_t		keylen;
	int64		index;			/* array index when key is NULL */
} SbwPathSeg;

/* Where a string's decoded bytes go (may be NULL: validate only). */
typedef struct SbwDecodeTarget
{
	char	   *data;
	size_t		cap;
	size_t		len;
	bool		overflow;		/* more bytes than cap were produced */
} SbwDecodeTarget;

/* First content problem found inside one string. */
typedef enum SbwStrProblem
{
	SBW_STR_OK,
	SBW_STR_NUL,				/* \u0000 */
	SBW_STR_LONE_SURROGATE		/* \uD800-\uDFFF without its partner */
} SbwStrProblem;

/* A decoded top-level key, kept only by the duplicate search. */
typedef struct SbwTopKey
{
	const char *name;			/* decoded, in SbwScan.keybuf */
	size_t		len;
	size_t		pos;			/* byte offset of the key in the body */
} SbwTopKey;

/* State of the strict scanner (phase 1). */
typedef struct SbwScan
{
	const unsigned char *buf;
	size_t		len;
	size_t		pos;
	int			depth;			/* containers currently open */
	bool		content_checks; /* top level is an object: check contents */
	SbwPathSeg	path[SBW_JSON_MAX_DEPTH];
	int			npath;			/* valid entries of path[] */

	/* results for the known keys and the top-level object */
	int64		nmembers;		/* members of the top-level object */
	bool		seen[SBW_NUM_KEYS];
	size_t		span_start[SBW_NUM_KEYS];
	size_t		span_len[SBW_NUM_KEYS];

	/* duplicate search only (second pass) */
	bool		collect_keys;
	char	   *keybuf;
	size_t		keybuf_len;
	SbwTopKey  *keys;
	int64		nkeys;
	int64		maxkeys;

	/* the first syntax error, which stops the scan */
	char	   *errmsg;
	int			sqlstate;

	/*
	 * The first content error (\u0000, lone surrogate, number range), which
	 * does not stop it: a syntax error found later still wins.
	 */
	char	   *content_errmsg;
	int			content_sqlstate;
} SbwScan;

/* What json-c found for one known key (phase 2). */
typedef enum SbwValKind
{
	SBW_VAL_NONE,				/* missing, null or falsy: SQL NULL */
	SBW_VAL_TRUE,
	SBW_VAL_INT,				/* fits int64, in ival */
	SBW_VAL_BIG,				/* uint64 above INT64_MAX, text in buf */
	SBW_VAL_DOUBLE,				/* original text in buf */
	SBW_VAL_STRING,				/* decoded text in buf */
	SBW_VAL_ARRAY,
	SBW_VAL_OBJECT				/* compact JSON text in buf */
} SbwValKind;

typedef struct SbwSlot
{
	SbwValKind	kind;
	int64		ival;
	char	   *buf;			/* palloc'd before json-c runs, or NULL */
	size_t		cap;
	size_t		textlen;
	json_type	jtype;			/* the JSON type, also of a falsy value */
} SbwSlot;

/*
 * Message helpers
 */

/*
 * Append n bytes to a message buffer.  Messages are short, so doubling with
 * palloc/pfree is enough and keeps the stub surface small (no repalloc).
 */
static void
buf_append(SbwBuf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap)
	{
		size_t		newcap = b->cap ? b->cap : 64;
		char	   *newdata;

		while (b->len + n + 1 > newcap)
			newcap *= 2;
		newdata = palloc(newcap);
		if (b->len > 0)
			memcpy(newdata, b->data, b->len);
		if (b->data)
			pfree(b->data);
		b->data = newdata;
		b->cap = newcap;
	}
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
}

static void
buf_append_str(SbwBuf *b, const char *s)
{
	buf_append(b, s, strlen(s));
}

/*
 * Append prefix followed by a byte in hex ("0x" "%02x" without snprintf,
 * which port.h maps to pg_snprintf: the decoder keeps to palloc/psprintf).
 */
static void
buf_append_hex(SbwBuf *b, const char *prefix, unsigned char c)
{
	static const char hexdigits[] = "0123456789abcdef";
	char		hex[2] = {hexdigits[c >> 4], hexdigits[c & 0x0F]};

	buf_append_str(b, prefix);
	buf_append(b, hex, 2);
}

/*
 * Length of the longest prefix of s[0..n) that is at most max bytes and
 * does not end inside a UTF-8 character, so that truncated text in a
 * message stays valid UTF-8 (messages go to the log and to a table).
 */
static size_t
utf8_clip(const char *s, size_t n, size_t max)
{
	size_t		cut;

	if (n <= max)
		return n;
	cut = max;
	while (cut > 0 && (((unsigned char) s[cut]) & 0xC0) == 0x80)
		cut--;
	return cut;
}

/*
 * Render decoded text (valid UTF-8, no NUL) as a double-quoted, one-line,
 * bounded string for an error message.  Control characters could break the
 * log line or the dead-letter row, so they are shown as \u00XX.
 */
static char *
quote_for_message(const char *s, size_t n)
{
	SbwBuf		b = {0};
	size_t		shown = utf8_clip(s, n, SBW_MSG_QUOTE_BYTES);
	size_t		i;

	buf_append(&b, "\"", 1);
	for (i = 0; i < shown; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c == '"' || c == '\\')
		{
			char		esc[2] = {'\\', (char) c};

			buf_append(&b, esc, 2);
		}
		else if (c < 0x20 || c == 0x7F)
			buf_append_hex(&b, "\\u00", c);
		else
			buf_append(&b, (const char *) &s[i], 1);
	}
	buf_append(&b, "\"", 1);
	if (shown < n)
		buf_append(&b, "...", 3);
	return b.data;
}

/*
 * Render raw ASCII text (a number as written) for a message, truncated.
 */
static char *
clip_for_message(const char *s, size_t n)
{
	if (n <= SBW_MSG_QUOTE_BYTES)
		return pnstrdup(s, n);
	return psprintf("%.*s...", SBW_MSG_QUOTE_BYTES, s);
}

/*
 * Describe the character at buf[pos] for a syntax error: printable ASCII
 * quoted, control bytes in hex, anything else as a code point (the body is
 * known to be valid UTF-8 by then, so a lead byte starts a whole character).
 */
static char *
describe_char(const unsigned char *buf, size_t len, size_t pos)
{
	unsigned char c = buf[pos];

	if (c == '"' || c == '\\')
		return psprintf("\"\\%c\"", c);
	if (c >= 0x20 && c < 0x7F)
		return psprintf("\"%c\"", c);
	if (c < 0x80)
		return psprintf("0x%02x", c);
	else
	{
		int			n = pg_utf_mblen(&buf[pos]);
		uint32		cp;
		int			i;

		if (n < 2 || n > 4 || pos + n > len)
			return psprintf("0x%02x", c);
		cp = c & (0xFF >> (n + 1));
		for (i = 1; i < n; i++)
			cp = (cp << 6) | (buf[pos + i] & 0x3F);
		return psprintf("U+%04X", cp);
	}
}

/*
 * Scanner errors.  Only the first one is kept: every scanner function
 * returns false as soon as one is set and the callers unwind.
 */
static bool
scan_fail(SbwScan *s, int sqlstate, char *msg)
{
	if (s->errmsg == NULL)
	{
		s->errmsg = msg;
		s->sqlstate = sqlstate;
	}
	else
		pfree(msg);
	return false;
}

/*
 * A syntax error: "message body is not valid JSON: <what> at byte offset N".
 * Offsets are 0-based and count bytes, like the AMQP body.
 */
static bool
syntax_error(SbwScan *s, size_t pos, const char *what)
{
	return scan_fail(s, ERRCODE_INVALID_TEXT_REPRESENTATION,
					 psprintf("message body is not valid JSON: %s at byte offset %zu",
							  what, pos));
}

/*
 * Complain about the byte at s->pos, or about the end of input if there is
 * none; "expected" tells the reader what would have been valid there.
 */
static bool
unexpected_here(SbwScan *s, const char *expected)
{
	char	   *ch;
	char	   *what;

	if (s->pos >= s->len)
	{
		what = psprintf("unexpected end of input, expected %s", expected);
		syntax_error(s, s->pos, what);
		pfree(what);
		return false;
	}
	ch = describe_char(s->buf, s->len, s->pos);
	what = psprintf("unexpected character %s, expected %s", ch, expected);
	syntax_error(s, s->pos, what);
	pfree(what);
	pfree(ch);
	return false;
}

/*
 * Render the key path of the scanner's current position, such as
 * resource_after.tags[2].name.  Keys appear as written in the body (escapes
 * undecoded), which keeps the message on one line; long keys and deep paths
 * are shortened.
 */
static char *
render_path(const SbwScan *s)
{
	SbwBuf		b = {0};
	int			i;

	buf_append(&b, "", 0);
	for (i = 0; i < s->npath; i++)
	{
		const SbwPathSeg *seg = &s->path[i];

		/* keep the first 3 and the last 4 levels of a deep path */
		if (s->npath > 8 && i == 3)
		{
			buf_append_str(&b, ".(...)");
			i = s->npath - 5;
			continue;
		}
		if (seg->key != NULL)
		{
			size_t		shown = utf8_clip(seg->key, seg->keylen,
										  SBW_MSG_QUOTE_BYTES);

			if (i > 0)
				buf_append(&b, ".", 1);
			buf_append(&b, seg->key, shown);
			if (shown < seg->keylen)
				buf_append(&b, "...", 3);
		}
		else
		{
			char	   *idx = psprintf("[" INT64_FORMAT "]", seg->index);

			buf_append_str(&b, idx);
			pfree(idx);
		}
	}
	return b.data;
}

/*
 * An error about the content at the current key path (NUL, surrogate,
 * number range): "key \"<path>\" <what>".  Only the first is kept, and the
 * scan goes on, so that a body which is not JSON at all is always reported
 * as such, whatever it contains before the syntax error.
 */
static void
content_error(SbwScan *s, int sqlstate, const char *what)
{
	char	   *path;

	if (s->content_errmsg != NULL)
		return;
	path = render_path(s);
	s->content_errmsg = psprintf("key \"%s\" %s", path, what);
	s->content_sqlstate = sqlstate;
	pfree(path);
}

/*
 * Phase 1: the strict scanner
 */

/*
 * Check the whole body against PostgreSQL's UTF-8 rules (pg_utf8_islegal:
 * no overlong forms, no surrogates, nothing above U+10FFFF), because every
 * string ends up in text or jsonb, and json-c's own check is weaker.
 */
static bool
check_utf8(SbwScan *s)
{
	size_t		pos = 0;

	while (pos < s->len)
	{
		const unsigned char *p = &s->buf[pos];
		int			l;

		if (*p < 0x80)
		{
			pos++;
			continue;
		}
		l = pg_utf_mblen(p);
		if (pos + l > s->len || !pg_utf8_islegal(p, l))
		{
			SbwBuf		b = {0};
			size_t		avail = Min((size_t) l, s->len - pos);
			size_t		i;
			char	   *msg;

			for (i = 0; i < avail; i++)
				buf_append_hex(&b, i ? " 0x" : "0x", p[i]);
			msg = psprintf("invalid UTF-8 byte sequence %s at byte offset %zu of the message body",
						   b.data, pos);
			pfree(b.data);
			return scan_fail(s, ERRCODE_CHARACTER_NOT_IN_REPERTOIRE, msg);
		}
		pos += l;
	}
	return true;
}

/* JSON's four whitespace characters, nothing else (RFC 8259). */
static void
skip_ws(SbwScan *s)
{
	while (s->pos < s->len)
	{
		unsigned char c = s->buf[s->pos];

		if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
			break;
		s->pos++;
	}
}

/* Value of one hex digit, or -1. */
static int
hex_value(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * Read the 4 hex digits of a \u escape starting at pos (just after "\u").
 * Returns -1 if they are not 4 hex digits.
 */
static int32
read_u_escape(const SbwScan *s, size_t pos)
{
	int32		v = 0;
	int			i;

	if (pos + 4 > s->len)
		return -1;
	for (i = 0; i < 4; i++)
	{
		int			h = hex_value(s->buf[pos + i]);

		if (h < 0)
			return -1;
		v = (v << 4) | h;
	}
	return v;
}

/* Append bytes to a decode target, noting (not overrunning) overflow. */
static void
target_append(SbwDecodeTarget *dt, const char *p, size_t n)
{
	if (dt == NULL)
		return;
	if (dt->len + n > dt->cap)
	{
		dt->overflow = true;
		return;
	}
	memcpy(dt->data + dt->len, p, n);
	dt->len += n;
}

/* Append one code point as UTF-8 (cp is a valid scalar value here). */
static void
target_append_cp(SbwDecodeTarget *dt, uint32 cp)
{
	char		u[4];
	size_t		n;

	if (cp < 0x80)
	{
		u[0] = (char) cp;
		n = 1;
	}
	else if (cp < 0x800)
	{
		u[0] = (char) (0xC0 | (cp >> 6));
		u[1] = (char) (0x80 | (cp & 0x3F));
		n = 2;
	}
	else if (cp < 0x10000)
	{
		u[0] = (char) (0xE0 | (cp >> 12));
		u[1] = (char) (0x80 | ((cp >> 6) & 0x3F));
		u[2] = (char) (0x80 | (cp & 0x3F));
		n = 3;
	}
	else
	{
		u[0] = (char) (0xF0 | (cp >> 18));
		u[1] = (char) (0x80 | ((cp >> 12) & 0x3F));
		u[2] = (char) (0x80 | ((cp >> 6) & 0x3F));
		u[3] = (char) (0x80 | (cp & 0x3F));
		n = 4;
	}
	target_append(dt, u, n);
}

/*
 * Scan a string starting at the opening quote.  Syntax errors (raw control
 * characters, bad escapes, no closing quote) fail at once.  Content
 * problems (\u0000, lone surrogates) are only noted in *problem, because
 * the key path that the message must name is complete only after a key's
 * closing quote; the caller reports them.  Decoded bytes go to dt if given.
 */
static bool
scan_string(SbwScan *s, SbwDecodeTarget *dt, SbwStrProblem *problem,
			uint32 *problem_unit)
{
	*problem = SBW_STR_OK;
	s->pos++;					/* opening quote */
	for (;;)
	{
		size_t		run = s->pos;
		unsigned char c;

		/* copy plain bytes in runs */
		while (s->pos < s->len)
		{
			c = s->buf[s->pos];
			if (c == '"' || c == '\\' || c < 0x20)
				break;
			s->pos++;
		}
		if (s->pos > run)
			target_append(dt, (const char *) &s->buf[run], s->pos - run);
		if (s->pos >= s->len)
			return syntax_error(s, s->pos,
								"unexpected end of input inside a string");
		c = s->buf[s->pos];
		if (c == '"')
		{
			s->pos++;
			return true;
		}
		if (c < 0x20)
		{
			char	   *what = psprintf("control character 0x%02x must be escaped inside a string",
										c);

			syntax_error(s, s->pos, what);
			pfree(what);
			return false;
		}

		/* a backslash escape */
		if (s->pos + 1 >= s->len)
			return syntax_error(s, s->pos + 1,
								"unexpected end of input inside a string");
		c = s->buf[s->pos + 1];
		switch (c)
		{
			case '"':
			case '\\':
			case '/':
				target_append(dt, (const char *) &c, 1);
				s->pos += 2;
				break;
			case 'b':
				target_append(dt, "\b", 1);
				s->pos += 2;
				break;
			case 'f':
				target_append(dt, "\f", 1);
				s->pos += 2;
				break;
			case 'n':
				target_append(dt, "\n", 1);
				s->pos += 2;
				break;
			case 'r':
				target_append(dt, "\r", 1);
				s->pos += 2;
				break;
			case 't':
				target_append(dt, "\t", 1);
				s->pos += 2;
				break;
			case 'u':
				{
					int32		unit = read_u_escape(s, s->pos + 2);

					if (unit < 0)
						return syntax_error(s, s->pos,
											"invalid \\u escape (4 hex digits expected) inside a string");
					s->pos += 6;
					if (unit >= 0xD800 && unit <= 0xDBFF)
					{
						int32		low = -1;

						if (s->pos + 1 < s->len && s->buf[s->pos] == '\\' &&
							s->buf[s->pos + 1] == 'u')
							low = read_u_escape(s, s->pos + 2);
						if (low >= 0xDC00 && low <= 0xDFFF)
						{
							s->pos += 6;
							target_append_cp(dt, 0x10000 +
											 (((uint32) unit - 0xD800) << 10) +
											 ((uint32) low - 0xDC00));
							break;
						}
						/* lone high surrogate; the next escape is read on */
						if (*problem == SBW_STR_OK)
						{
							*problem = SBW_STR_LONE_SURROGATE;
							*problem_unit = (uint32) unit;
						}
						break;
					}
					if (unit >= 0xDC00 && unit <= 0xDFFF)
					{
						if (*problem == SBW_STR_OK)
						{
							*problem = SBW_STR_LONE_SURROGATE;
							*problem_unit = (uint32) unit;
						}
						break;
					}
					if (unit == 0 && *problem == SBW_STR_OK)
					{
						*problem = SBW_STR_NUL;
						*problem_unit = 0;
					}
					target_append_cp(dt, (uint32) unit);
				}
				break;
			default:
				{
					char	   *what;

					if (c > 0x20 && c < 0x7F)
						what = psprintf("invalid escape \"\\%c\" inside a string", c);
					else
					{
						char	   *ch = describe_char(s->buf, s->len, s->pos + 1);

						what = psprintf("invalid escape (backslash followed by %s) inside a string",
										ch);
						pfree(ch);
					}
					syntax_error(s, s->pos, what);
					pfree(what);
					return false;
				}
		}
	}
}

/*
 * Report a content problem noted by scan_string, now that the key path is
 * complete.  For a key, the path already ends with that key.  NUL follows
 * PostgreSQL's own SQLSTATE for "\u0000 cannot be converted to text";
 * a lone surrogate follows jsonb's (invalid text representation).
 */
static void
report_string_problem(SbwScan *s, SbwStrProblem problem, uint32 unit,
					  bool is_key)
{
	char	   *what;

	if (problem == SBW_STR_OK || !s->content_checks)
		return;
	if (problem == SBW_STR_NUL)
	{
		content_error(s, ERRCODE_UNTRANSLATABLE_CHARACTER,
					  is_key ?
					  "has \\u0000 in its name, which PostgreSQL text and jsonb cannot store" :
					  "contains \\u0000, which PostgreSQL text and jsonb cannot store");
		return;
	}
	what = psprintf(is_key ?
					"has a lone UTF-16 surrogate \\u%04x in its name" :
					"contains a lone UTF-16 surrogate \\u%04x",
					unit);
	content_error(s, ERRCODE_INVALID_TEXT_REPRESENTATION, what);
	pfree(what);
}

/*
 * Is the unsigned decimal digit string d[0..n) (no leading zeros) greater
 * than the limit written the same way?
 */
static bool
digits_exceed(const unsigned char *d, size_t n, const char *limit)
{
	size_t		ln = strlen(limit);

	if (n != ln)
		return n > ln;
	return memcmp(d, limit, n) > 0;
}

/*
 * Scan a number with RFC 8259's grammar, then check what json-c and
 * jsonb would do with it: an integer beyond int64 (negative) or uint64
 * (positive) is clamped by json-c without error; a number with a fraction
 * or exponent keeps its text through json-c, so it must fit numeric for
 * jsonb_in to take the serialized snapshot later.
 */
static bool
scan_number(SbwScan *s)
{
	size_t		start = s->pos;
	bool		neg = false;
	size_t		int_start;
	size_t		int_len;
	size_t		frac_start = 0;
	size_t		frac_len = 0;
	bool		has_exp = false;
	bool		exp_neg = false;
	int64		exponent = 0;
	unsigned char c;

	if (s->buf[s->pos] == '-')
	{
		neg = true;
		s->pos++;
	}
	int_start = s->pos;
	if (s->pos >= s->len || !SBW_IS_DIGIT(s->buf[s->pos]))
		return syntax_error(s, start, "invalid number");
	if (s->buf[s->pos] == '0')
		s->pos++;
	else
		while (s->pos < s->len && SBW_IS_DIGIT(s->buf[s->pos]))
			s->pos++;
	int_len = s->pos - int_start;

	if (s->pos < s->len && s->buf[s->pos] == '.')
	{
		s->pos++;
		frac_start = s->pos;
		while (s->pos < s->len && SBW_IS_DIGIT(s->buf[s->pos]))
			s->pos++;
		frac_len = s->pos - frac_start;
		if (frac_len == 0)
			return syntax_error(s, start, "invalid number");
	}
	if (s->pos < s->len && (s->buf[s->pos] == 'e' || s->buf[s->pos] == 'E'))
	{
		size_t		exp_digits;

		has_exp = true;
		s->pos++;
		if (s->pos < s->len && (s->buf[s->pos] == '+' || s->buf[s->pos] == '-'))
		{
			exp_neg = (s->buf[s->pos] == '-');
			s->pos++;
		}
		exp_digits = s->pos;
		while (s->pos < s->len && SBW_IS_DIGIT(s->buf[s->pos]))
		{
			/* saturate: anything this large is out of range anyway */
			if (exponent < PG_INT32_MAX)
				exponent = exponent * 10 + (s->buf[s->pos] - '0');
			s->pos++;
		}
		if (s->pos == exp_digits)
			return syntax_error(s, start, "invalid number");
		if (exp_neg)
			exponent = -exponent;
	}
	/* "01", "1.2.3", "1e5e5" and the like */
	if (s->pos < s->len)
	{
		c = s->buf[s->pos];
		if (SBW_IS_DIGIT(c) || c == '.' || c == 'e' || c == 'E' ||
			c == '+' || c == '-')
			return syntax_error(s, start, "invalid number");
	}

	if (!s->content_checks)
		return true;

	if (frac_len == 0 && !has_exp)
	{
		/* an integer: json-c holds int64 and, for positives, uint64 */
		if (digits_exceed(&s->buf[int_start], int_len,
						  neg ? "9223372036854775808" : "18446744073709551615"))
		{
			char	   *num = clip_for_message((const char *) &s->buf[start],
											   s->pos - start);
			char	   *what = psprintf("is out of range for a 64-bit integer: %s",
										num);

			content_error(s, ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE, what);
			pfree(what);
			pfree(num);
		}
		return true;
	}
	else
	{
		/* a fraction or exponent: check numeric's limits */
		int64		dscale = (int64) frac_len - exponent;
		bool		overflow = false;
		size_t		i;

		if (exponent >= SBW_NUMERIC_EXPONENT_LIMIT ||
			exponent <= -SBW_NUMERIC_EXPONENT_LIMIT ||
			dscale > SBW_NUMERIC_DSCALE_MAX)
			overflow = true;
		else
		{
			/* decimal weight of the most significant non-zero digit */
			for (i = 0; i < int_len; i++)
			{
				if (s->buf[int_start + i] != '0')
				{
					if ((int64) (int_len - 1 - i) + exponent >
						SBW_NUMERIC_DWEIGHT_MAX)
						overflow = true;
					break;
				}
			}
			if (i == int_len)
			{
				for (i = 0; i < frac_len; i++)
				{
					if (s->buf[frac_start + i] != '0')
					{
						if (-(int64) (i + 1) + exponent >
							SBW_NUMERIC_DWEIGHT_MAX)
							overflow = true;
						break;
					}
				}
			}
		}
		if (overflow)
		{
			char	   *num = clip_for_message((const char *) &s->buf[start],
											   s->pos - start);
			char	   *what = psprintf("is out of range for a jsonb number: %s",
										num);

			content_error(s, ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE, what);
			pfree(what);
			pfree(num);
		}
		return true;
	}
}

/* Scan true, false or null. */
static bool
scan_literal(SbwScan *s, const char *word)
{
	size_t		n = strlen(word);
	size_t		i;

	for (i = 0; i < n; i++)
	{
		if (s->pos + i >= s->len)
		{
			s->pos += i;
			return unexpected_here(s, word);
		}
		if (s->buf[s->pos + i] != (unsigned char) word[i])
			return syntax_error(s, s->pos,
								"invalid literal (true, false or null expected)");
	}
	s->pos += n;
	return true;
}

static bool scan_value(SbwScan *s);

/*
 * Open a container, enforcing the depth limit with a precise message: the
 * top-level object is level 1, as in json-c's json_tokener_new_ex(64).
 */
static bool
enter_container(SbwScan *s)
{
	if (s->depth >= SBW_JSON_MAX_DEPTH)
	{
		char	   *msg = psprintf("JSON nesting deeper than %d levels at byte offset %zu",
								   SBW_JSON_MAX_DEPTH, s->pos);

		return scan_fail(s, ERRCODE_PROGRAM_LIMIT_EXCEEDED, msg);
	}
	s->depth++;
	s->pos++;
	return true;
}

/*
 * Remember a top-level key for the duplicate search, decoded so that
 * "resource" and "r\u0065source" compare equal (as they do for json-c).
 */
static void
collect_top_key(SbwScan *s, const char *name, size_t len, size_t pos)
{
	if (s->nkeys == s->maxkeys)
	{
		int64		newmax = s->maxkeys ? s->maxkeys * 2 : 32;
		SbwTopKey  *newkeys = palloc(sizeof(SbwTopKey) * newmax);

		if (s->nkeys > 0)
			memcpy(newkeys, s->keys, sizeof(SbwTopKey) * s->nkeys);
		if (s->keys)
			pfree(s->keys);
		s->keys = newkeys;
		s->maxkeys = newmax;
	}
	s->keys[s->nkeys].name = name;
	s->keys[s->nkeys].len = len;
	s->keys[s->nkeys].pos = pos;
	s->nkeys++;
}

/*
 * Scan an object.  At the top level, also count members, note the spans of
 * the 12 known keys' values, and (second pass) collect decoded key names.
 */
static bool
scan_object(SbwScan *s)
{
	int			level;
	bool		top;

	if (!enter_container(s))
		return false;
	level = s->depth;
	top = (level == 1);
	skip_ws(s);
	if (s->pos < s->len && s->buf[s->pos] == '}')
	{
		s->pos++;
		s->depth--;
		return true;
	}
	for (;;)
	{
		size_t		key_pos;
		char		namebuf[SBW_KEY_NAME_BUF];
		SbwDecodeTarget small = {namebuf, sizeof(namebuf) - 1, 0, false};
		SbwDecodeTarget big = {0};
		SbwDecodeTarget *dt = NULL;
		SbwStrProblem problem;
		uint32		unit = 0;
		int			known = -1;
		size_t		value_start;

		skip_ws(s);
		if (s->pos >= s->len || s->buf[s->pos] != '"')
			return unexpected_here(s, "a string key");
		key_pos = s->pos;
		if (top && s->collect_keys)
		{
			big.data = s->keybuf + s->keybuf_len;
			/* decoded keys never outgrow their raw text in the body */
			big.cap = s->len - s->keybuf_len;
			dt = &big;
		}
		else if (top)
			dt = &small;
		if (!scan_string(s, dt, &problem, &unit))
			return false;

		s->path[level - 1].key = (const char *) &s->buf[key_pos + 1];
		s->path[level - 1].keylen = s->pos - key_pos - 2;
		s->npath = level;
		report_string_problem(s, problem, unit, true);

		if (top)
		{
			s->nmembers++;
			if (s->collect_keys)
			{
				collect_top_key(s, big.data, big.len, key_pos);
				s->keybuf_len += big.len;
			}
			else if (!small.overflow)
			{
				int			k;

				for (k = 0; k < SBW_NUM_KEYS; k++)
				{
					if (strlen(sbw_key_names[k]) == small.len &&
						memcmp(sbw_key_names[k], namebuf, small.len) == 0)
					{
						known = k;
						break;
					}
				}
			}
		}

		skip_ws(s);
		if (s->pos >= s->len || s->buf[s->pos] != ':')
			return unexpected_here(s, "\":\" after an object key");
		s->pos++;
		skip_ws(s);
		value_start = s->pos;
		if (!scan_value(s))
			return false;
		if (known >= 0)
		{
			s->seen[known] = true;
			s->span_start[known] = value_start;
			s->span_len[known] = s->pos - value_start;
		}
		s->npath = level - 1;

		skip_ws(s);
		if (s->pos < s->len && s->buf[s->pos] == ',')
		{
			s->pos++;
			continue;
		}
		if (s->pos < s->len && s->buf[s->pos] == '}')
		{
			s->pos++;
			s->depth--;
			return true;
		}
		return unexpected_here(s, "\",\" or \"}\"");
	}
}

/* Scan an array; element positions appear in key paths as [n]. */
static bool
scan_array(SbwScan *s)
{
	int			level;
	int64		index = 0;

	if (!enter_container(s))
		return false;
	level = s->depth;
	skip_ws(s);
	if (s->pos < s->len && s->buf[s->pos] == ']')
	{
		s->pos++;
		s->depth--;
		return true;
	}
	for (;;)
	{
		s->path[level - 1].key = NULL;
		s->path[level - 1].index = index++;
		s->npath = level;
		if (!scan_value(s))
			return false;
		s->npath = level - 1;
		skip_ws(s);
		if (s->pos < s->len && s->buf[s->pos] == ',')
		{
			s->pos++;
			continue;
		}
		if (s->pos < s->len && s->buf[s->pos] == ']')
		{
			s->pos++;
			s->depth--;
			return true;
		}
		return unexpected_here(s, "\",\" or \"]\"");
	}
}

/*
 * Scan any value.  Recursion is bounded by SBW_JSON_MAX_DEPTH, so the C
 * stack stays small whatever the input.
 */
static bool
scan_value(SbwScan *s)
{
	skip_ws(s);
	if (s->pos >= s->len)
		return unexpected_here(s, "a JSON value");
	switch (s->buf[s->pos])
	{
		case '{':
			return scan_object(s);
		case '[':
			return scan_array(s);
		case '"':
			{
				SbwStrProblem problem;
				uint32		unit = 0;

				if (!scan_string(s, NULL, &problem, &unit))
					return false;
				report_string_problem(s, problem, unit, false);
				return true;
			}
		case 't':
			return scan_literal(s, "true");
		case 'f':
			return scan_literal(s, "false");
		case 'n':
			return scan_literal(s, "null");
		case '-':
		case '0':
		case '1':
		case '2':
		case '3':
		case '4':
		case '5':
		case '6':
		case '7':
		case '8':
		case '9':
			return scan_number(s);
		default:
			return unexpected_here(s, "a JSON value");
	}
}

/*
 * Scan the whole body: one value, surrounded by whitespace only.  Contents
 * are checked only when the top level is an object; anything else is
 * refused by the caller anyway, with a message about its type.
 */
static bool
scan_body(SbwScan *s)
{
	skip_ws(s);
	s->content_checks = (s->pos < s->len && s->buf[s->pos] == '{');
	if (!scan_value(s))
		return false;
	skip_ws(s);
	if (s->pos < s->len)
		return syntax_error(s, s->pos,
							"unexpected data after the top-level value");
	return true;
}

/* Do two collected top-level keys have the same decoded name? */
static bool
topkey_same_name(const SbwTopKey *a, const SbwTopKey *b)
{
	return a->len == b->len && memcmp(a->name, b->name, a->len) == 0;
}

/* qsort comparator: by decoded name, then by position in the body. */
static int
topkey_cmp(const void *a, const void *b)
{
	const SbwTopKey *ka = (const SbwTopKey *) a;
	const SbwTopKey *kb = (const SbwTopKey *) b;
	int			c = memcmp(ka->name, kb->name, Min(ka->len, kb->len));

	if (c != 0)
		return c;
	if (ka->len != kb->len)
		return ka->len < kb->len ? -1 : 1;
	if (ka->pos != kb->pos)
		return ka->pos < kb->pos ? -1 : 1;
	return 0;
}

/*
 * Name the duplicated top-level key.  Runs only when json-c kept fewer
 * members than the scanner counted, i.e. only for bodies that have a
 * duplicate: a second scanning pass collects the decoded names, sorts them
 * and reports the duplicate whose second occurrence comes first.
 */
static void
find_duplicate_key(const char *body, size_t len, char **errmsg, int *sqlstate)
{
	SbwScan    *s = palloc0(sizeof(SbwScan));
	int64		i;
	int64		best = -1;

	s->buf = (const unsigned char *) body;
	s->len = len;
	s->collect_keys = true;
	s->keybuf = palloc(len + 1);
	if (scan_body(s) && s->nkeys > 1)
	{
		qsort(s->keys, s->nkeys, sizeof(SbwTopKey), topkey_cmp);
		for (i = 1; i < s->nkeys; i++)
		{
			if (topkey_same_name(&s->keys[i - 1], &s->keys[i]) &&
				(best < 0 || s->keys[i].pos < s->keys[best].pos))
				best = i;
		}
	}
	if (best >= 0)
	{
		char	   *name = quote_for_message(s->keys[best].name,
											 s->keys[best].len);

		*errmsg = psprintf("duplicate key %s in the message body at byte offset %zu",
						   name, s->keys[best].pos);
		*sqlstate = ERRCODE_DUPLICATE_JSON_OBJECT_KEY_VALUE;
		pfree(name);
	}
	else
	{
		*errmsg = pstrdup("internal error in the event decoder: json-c merged top-level keys that the scanner found distinct");
		*sqlstate = ERRCODE_INTERNAL_ERROR;
	}
	if (s->errmsg)
		pfree(s->errmsg);
	if (s->content_errmsg)
		pfree(s->content_errmsg);
	if (s->keys)
		pfree(s->keys);
	pfree(s->keybuf);
	pfree(s);
}

/*
 * Phase 2: json-c.  No palloc/psprintf may happen between
 * json_tokener_new_ex and the matching frees: a palloc that fails throws,
 * and the throw would leak json-c's malloc'd objects.
 */

/*
 * Copy text into a slot's buffer (allocated from the scanner's span of the
 * raw value, which is never shorter than json-c's decoded or re-serialized
 * form).  Returns false, copying nothing, if that bound were ever wrong.
 */
static bool
slot_copy(SbwSlot *slot, const char *text, size_t n)
{
	if (slot->buf == NULL || n + 1 > slot->cap)
		return false;
	memcpy(slot->buf, text, n);
	slot->buf[n] = '\0';
	slot->textlen = n;
	return true;
}

/*
 * Classify one value the way Python's "payload[key] or None" would, and
 * copy the text we may need.  Falsy values (null, false, 0, 0.0, "", [],
 * {}) become SBW_VAL_NONE: StoryBoard's worker passes them to plugins as
 * None, so they become SQL NULL here.
 */
static bool
classify_value(json_object *v, SbwSlot *slot)
{
	const char *text;
	size_t		n;

	slot->jtype = json_object_get_type(v);
	switch (slot->jtype)
	{
		case json_type_null:
			slot->kind = SBW_VAL_NONE;
			return true;
		case json_type_boolean:
			slot->kind = json_object_get_boolean(v) ? SBW_VAL_TRUE : SBW_VAL_NONE;
			return true;
		case json_type_int:
			{
				int64_t		i64 = json_object_get_int64(v);
				uint64_t	u64 = json_object_get_uint64(v);

				/* get_int64 clamps a uint64 above INT64_MAX to INT64_MAX */
				if (u64 > (uint64_t) PG_INT64_MAX)
				{
					slot->kind = SBW_VAL_BIG;
					text = json_object_to_json_string_length(v, SBW_JSON_C_TO_STRING_FLAGS, &n);
					return text != NULL && slot_copy(slot, text, n);
				}
				slot->kind = (i64 == 0) ? SBW_VAL_NONE : SBW_VAL_INT;
				slot->ival = (int64) i64;
				return true;
			}
		case json_type_double:
			if (json_object_get_double(v) == 0.0)
			{
				slot->kind = SBW_VAL_NONE;
				return true;
			}
			slot->kind = SBW_VAL_DOUBLE;
			/* json-c keeps the number's original text for serialization */
			text = json_object_to_json_string_length(v, SBW_JSON_C_TO_STRING_FLAGS, &n);
			return text != NULL && slot_copy(slot, text, n);
		case json_type_string:
			n = (size_t) json_object_get_string_len(v);
			if (n == 0)
			{
				slot->kind = SBW_VAL_NONE;
				return true;
			}
			slot->kind = SBW_VAL_STRING;
			return slot_copy(slot, json_object_get_string(v), n);
		case json_type_array:
			slot->kind = json_object_array_length(v) == 0 ? SBW_VAL_NONE : SBW_VAL_ARRAY;
			return true;
		case json_type_object:
			if (json_object_object_length(v) == 0)
			{
				slot->kind = SBW_VAL_NONE;
				return true;
			}
			slot->kind = SBW_VAL_OBJECT;
			text = json_object_to_json_string_length(v, SBW_JSON_C_TO_STRING_FLAGS, &n);
			return text != NULL && slot_copy(slot, text, n);
	}
	return false;
}

/* Outcome of the json-c phase. */
typedef enum SbwJsoncResult
{
	SBW_JSONC_OK,
	SBW_JSONC_NO_MEMORY,
	SBW_JSONC_DISAGREES,		/* json-c refused what the scanner accepted */
	SBW_JSONC_DUPLICATE,		/* fewer members than the scanner counted */
	SBW_JSONC_MISMATCH			/* a key's value is not what the scanner saw */
} SbwJsoncResult;

/*
 * Parse with json-c and fill the slots.  The body has already passed the
 * scanner, so json-c should accept it; the explicit length matters because
 * AMQP bodies are not NUL-terminated, and json-c treats a NUL byte as the
 * end of input, so the parse end is compared with the length as well.
 */
static SbwJsoncResult
run_jsonc(const char *body, size_t len, int64 nmembers, SbwSlot *slots,
		  int *jerr_out, size_t *jend_out, int *bad_key)
{
	json_tokener *tok;
	json_object *root;
	SbwJsoncResult result = SBW_JSONC_OK;
	int			k;

	tok = json_tokener_new_ex(SBW_JSON_MAX_DEPTH);
	if (tok == NULL)
		return SBW_JSONC_NO_MEMORY;
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
	root = json_tokener_parse_ex(tok, body, (int) len);
	*jerr_out = (int) json_tokener_get_error(tok);
	*jend_out = json_tokener_get_parse_end(tok);

	if (root == NULL || *jerr_out != json_tokener_success ||
		*jend_out != len || !json_object_is_type(root, json_type_object))
		result = SBW_JSONC_DISAGREES;
	else if ((int64) json_object_object_length(root) != nmembers)
		result = SBW_JSONC_DUPLICATE;
	else
	{
		for (k = 0; k < SBW_NUM_KEYS; k++)
		{
			json_object *v;

			if (!json_object_object_get_ex(root, sbw_key_names[k], &v))
			{
				/* the scanner saw the key: json-c must have it too */
				if (slots[k].buf != NULL)
				{
					result = SBW_JSONC_MISMATCH;
					*bad_key = k;
					break;
				}
				slots[k].kind = SBW_VAL_NONE;
				continue;
			}
			if (!classify_value(v, &slots[k]))
			{
				result = SBW_JSONC_MISMATCH;
				*bad_key = k;
				break;
			}
		}
	}

	if (root != NULL)
		json_object_put(root);
	json_tokener_free(tok);
	return result;
}

/*
 * Phase 3: StoryBoard's rules
 */

/*
 * How a wrong-typed value is described in "..., not <this>".  Values are
 * shown when short text makes the message clearer (numbers, strings).
 */
static char *
describe_value(const SbwSlot *slot)
{
	switch (slot->kind)
	{
		case SBW_VAL_TRUE:
			return pstrdup("a boolean");
		case SBW_VAL_INT:
			return psprintf("the integer " INT64_FORMAT, slot->ival);
		case SBW_VAL_BIG:
			{
				char	   *num = clip_for_message(slot->buf, slot->textlen);
				char	   *d = psprintf("the integer %s", num);

				pfree(num);
				return d;
			}
		case SBW_VAL_DOUBLE:
			{
				char	   *num = clip_for_message(slot->buf, slot->textlen);
				char	   *d = psprintf("the number %s", num);

				pfree(num);
				return d;
			}
		case SBW_VAL_STRING:
			{
				char	   *q = quote_for_message(slot->buf, slot->textlen);
				char	   *d = psprintf("the string %s", q);

				pfree(q);
				return d;
			}
		case SBW_VAL_ARRAY:
			return pstrdup("an array");
		case SBW_VAL_OBJECT:
			return pstrdup("an object");
		case SBW_VAL_NONE:
			break;
	}
	/* a falsy value of some type */
	switch (slot->jtype)
	{
		case json_type_boolean:
			return pstrdup("a boolean");
		case json_type_int:
			return pstrdup("the integer 0");
		case json_type_double:
			return pstrdup("the number 0");
		case json_type_string:
			return pstrdup("an empty string");
		case json_type_array:
			return pstrdup("an array");
		case json_type_object:
			return pstrdup("an object");
		case json_type_null:
			break;
	}
	return pstrdup("null");
}

/*
 * A falsy value (StoryBoard's "or None") becomes NULL only when it has a
 * type the key accepts: "" for a string, 0 for an id, {} for a snapshot.
 * false for a path or [] for a URL is a wrong type, like true or [1].
 */
static bool
falsy_of_type(const SbwSlot *slot, json_type a, json_type b)
{
	return slot->jtype == json_type_null || slot->jtype == a || slot->jtype == b;
}

/* Fail with "key \"<key>\" must be <expected>, not <what it is>". */
static bool
type_error(SbwKey key, const SbwSlot *slot, const char *expected,
		   char **errmsg, int *sqlstate)
{
	char	   *what = describe_value(slot);

	*errmsg = psprintf("key \"%s\" must be %s, not %s",
					   sbw_key_names[key], expected, what);
	*sqlstate = ERRCODE_DATATYPE_MISMATCH;
	pfree(what);
	return false;
}

/*
 * An id or status: a JSON integer (negatives allowed), a string of ASCII
 * digits (StoryBoard passes URL ids as strings such as "1"), or NULL.
 * Values outside [min, max] are out of range; "bits" names the width.
 */
static bool
take_integer(SbwKey key, const SbwSlot *slot, int64 min, int64 max, int bits,
			 bool *has, int64 *out, char **errmsg, int *sqlstate)
{
	const char *expected = "an integer, a string of digits or null";
	int64		v = 0;
	char	   *shown = NULL;

	*has = false;
	switch (slot->kind)
	{
		case SBW_VAL_NONE:
			if (!falsy_of_type(slot, json_type_int, json_type_string))
				return type_error(key, slot, expected, errmsg, sqlstate);
			return true;
		case SBW_VAL_INT:
			v = slot->ival;
			if (v < min || v > max)
				shown = psprintf(INT64_FORMAT, v);
			break;
		case SBW_VAL_BIG:
			shown = clip_for_message(slot->buf, slot->textlen);
			break;
		case SBW_VAL_STRING:
			{
				size_t		i;
				bool		overflow = false;

				for (i = 0; i < slot->textlen; i++)
				{
					int			d = slot->buf[i] - '0';

					if (d < 0 || d > 9)
						return type_error(key, slot, expected, errmsg, sqlstate);
					if (v > (PG_INT64_MAX - d) / 10)
						overflow = true;
					else
						v = v * 10 + d;
				}
				if (overflow || v > max)
					shown = quote_for_message(slot->buf, slot->textlen);
			}
			break;
		default:
			return type_error(key, slot, expected, errmsg, sqlstate);
	}
	if (shown != NULL)
	{
		*errmsg = psprintf("key \"%s\" is out of range for a %d-bit integer: %s",
						   sbw_key_names[key], bits, shown);
		*sqlstate = ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE;
		pfree(shown);
		return false;
	}
	*has = true;
	*out = v;
	return true;
}

/*
 * A string key: hand the slot's buffer over to the event (NULL for NONE).
 * The buffer then belongs to the event, so the slot forgets it.
 */
static bool
take_string(SbwKey key, SbwSlot *slot, char **out, char **errmsg,
			int *sqlstate)
{
	*out = NULL;
	if (slot->kind == SBW_VAL_NONE &&
		falsy_of_type(slot, json_type_string, json_type_string))
		return true;
	if (slot->kind != SBW_VAL_STRING)
		return type_error(key, slot, "a string or null", errmsg, sqlstate);
	*out = slot->buf;
	slot->buf = NULL;
	return true;
}

/* A snapshot key: same, for JSON objects (compact text for jsonb_in). */
static bool
take_object(SbwKey key, SbwSlot *slot, char **out, char **errmsg,
			int *sqlstate)
{
	*out = NULL;
	if (slot->kind == SBW_VAL_NONE &&
		falsy_of_type(slot, json_type_object, json_type_object))
		return true;
	if (slot->kind != SBW_VAL_OBJECT)
		return type_error(key, slot, "an object or null", errmsg, sqlstate);
	*out = slot->buf;
	slot->buf = NULL;
	return true;
}

/*
 * Apply the per-key rules in the order of the 12-key table, so that the
 * first problem reported is deterministic.
 */
static bool
apply_rules(SbwSlot *slots, SbwEvent *ev, char **errmsg, int *sqlstate)
{
	if (!take_integer(SBW_KEY_AUTHOR_ID, &slots[SBW_KEY_AUTHOR_ID],
					  PG_INT64_MIN, PG_INT64_MAX, 64,
					  &ev->has_author_id, &ev->author_id, errmsg, sqlstate))
		return false;

	if (!take_string(SBW_KEY_METHOD, &slots[SBW_KEY_METHOD], &ev->method,
					 errmsg, sqlstate))
		return false;
	/* StoryBoard only publishes for these (NotificationHook, section 2.2) */
	if (ev->method != NULL &&
		strcmp(ev->method, "POST") != 0 &&
		strcmp(ev->method, "PUT") != 0 &&
		strcmp(ev->method, "DELETE") != 0)
	{
		char	   *q = quote_for_message(ev->method, strlen(ev->method));

		*errmsg = psprintf("method %s is not one of POST, PUT, DELETE", q);
		*sqlstate = ERRCODE_INVALID_PARAMETER_VALUE;
		pfree(q);
		return false;
	}

	if (!take_string(SBW_KEY_URL, &slots[SBW_KEY_URL], &ev->url,
					 errmsg, sqlstate) ||
		!take_string(SBW_KEY_PATH, &slots[SBW_KEY_PATH], &ev->path,
					 errmsg, sqlstate) ||
		!take_string(SBW_KEY_QUERY_STRING, &slots[SBW_KEY_QUERY_STRING],
					 &ev->query_string, errmsg, sqlstate))
		return false;

	{
		int64		status = 0;

		if (!take_integer(SBW_KEY_STATUS, &slots[SBW_KEY_STATUS],
						  PG_INT32_MIN, PG_INT32_MAX, 32,
						  &ev->has_status, &status, errmsg, sqlstate))
			return false;
		ev->status = (int32) status;
	}

	if (!take_string(SBW_KEY_RESOURCE, &slots[SBW_KEY_RESOURCE],
					 &ev->resource, errmsg, sqlstate))
		return false;
	/* publish() refuses to send without a resource: it is the routing key */
	if (ev->resource == NULL)
	{
		*errmsg = pstrdup("key \"resource\" is missing, null or empty");
		*sqlstate = ERRCODE_INVALID_PARAMETER_VALUE;
		return false;
	}
	if (!sbw_known_resource(ev->resource))
	{
		char	   *q = quote_for_message(ev->resource, strlen(ev->resource));

		*errmsg = psprintf("unknown resource %s", q);
		*sqlstate = ERRCODE_INVALID_PARAMETER_VALUE;
		pfree(q);
		return false;
	}

	if (!take_integer(SBW_KEY_RESOURCE_ID, &slots[SBW_KEY_RESOURCE_ID],
					  PG_INT64_MIN, PG_INT64_MAX, 64,
					  &ev->has_resource_id, &ev->resource_id, errmsg, sqlstate) ||
		!take_string(SBW_KEY_SUB_RESOURCE, &slots[SBW_KEY_SUB_RESOURCE],
					 &ev->sub_resource, errmsg, sqlstate) ||
		!take_integer(SBW_KEY_SUB_RESOURCE_ID, &slots[SBW_KEY_SUB_RESOURCE_ID],
					  PG_INT64_MIN, PG_INT64_MAX, 64,
					  &ev->has_sub_resource_id, &ev->sub_resource_id,
					  errmsg, sqlstate) ||
		!take_object(SBW_KEY_RESOURCE_BEFORE, &slots[SBW_KEY_RESOURCE_BEFORE],
					 &ev->resource_before, errmsg, sqlstate) ||
		!take_object(SBW_KEY_RESOURCE_AFTER, &slots[SBW_KEY_RESOURCE_AFTER],
					 &ev->resource_after, errmsg, sqlstate))
		return false;

	return true;
}

/*
 * Free what a failed decode handed to the event and zero it, so callers
 * never see a half-filled event.
 */
static void
clear_event(SbwEvent *ev)
{
	char	   *strs[] = {ev->method, ev->url, ev->path, ev->query_string,
		ev->resource, ev->sub_resource, ev->resource_before, ev->resource_after};
	int			i;

	for (i = 0; i < lengthof(strs); i++)
		if (strs[i] != NULL)
			pfree(strs[i]);
	memset(ev, 0, sizeof(SbwEvent));
}

/*
 * sbw_decode_event: see event_decode.h.
 *
 * Errors come out in this order: size, UTF-8 (first bad sequence), JSON
 * syntax and depth (first in the body), contents PostgreSQL cannot store
 * (first \u0000, lone surrogate or number out of range, naming its key
 * path), top-level type, duplicate top-level keys, then the 12 keys' rules
 * in table order.
 */
bool
sbw_decode_event(const char *body, size_t len, size_t max_bytes,
				 SbwEvent *ev, char **errmsg, int *sqlstate)
{
	SbwScan    *s;
	SbwSlot		slots[SBW_NUM_KEYS];
	SbwJsoncResult jr;
	int			jerr = 0;
	size_t		jend = 0;
	int			bad_key = 0;
	bool		ok;
	int			k;

	memset(ev, 0, sizeof(SbwEvent));
	*errmsg = NULL;
	*sqlstate = 0;

	if (body == NULL && len > 0)
	{
		*errmsg = pstrdup("internal error in the event decoder: message body pointer is NULL");
		*sqlstate = ERRCODE_INTERNAL_ERROR;
		return false;
	}
	if (max_bytes > 0 && len > max_bytes)
	{
		*errmsg = psprintf("message body of %zu bytes exceeds storyboard_worker.max_message_bytes (%zu)",
						   len, max_bytes);
		*sqlstate = ERRCODE_PROGRAM_LIMIT_EXCEEDED;
		return false;
	}
	if (len > SBW_HARD_MAX_BYTES)
	{
		*errmsg = psprintf("message body of %zu bytes exceeds the decoder's limit of %zu bytes",
						   len, (size_t) SBW_HARD_MAX_BYTES);
		*sqlstate = ERRCODE_PROGRAM_LIMIT_EXCEEDED;
		return false;
	}

	/* phase 1 */
	s = palloc0(sizeof(SbwScan));
	s->buf = (const unsigned char *) body;
	s->len = len;
	skip_ws(s);
	if (s->pos >= len)
	{
		*errmsg = pstrdup(len == 0 ? "message body is empty" :
						  "message body contains only whitespace");
		*sqlstate = ERRCODE_INVALID_TEXT_REPRESENTATION;
		pfree(s);
		return false;
	}
	s->pos = 0;
	if (!check_utf8(s) || !scan_body(s) || s->content_errmsg != NULL)
	{
		if (s->errmsg != NULL)
		{
			*errmsg = s->errmsg;
			*sqlstate = s->sqlstate;
			if (s->content_errmsg != NULL)
				pfree(s->content_errmsg);
		}
		else
		{
			*errmsg = s->content_errmsg;
			*sqlstate = s->content_sqlstate;
		}
		pfree(s);
		return false;
	}
	if (!s->content_checks)
	{
		const char *what;

		s->pos = 0;
		skip_ws(s);
		switch (s->buf[s->pos])
		{
			case '[':
				what = "a JSON array";
				break;
			case '"':
				what = "a JSON string";
				break;
			case 't':
			case 'f':
				what = "a JSON boolean";
				break;
			case 'n':
				what = "JSON null";
				break;
			default:
				what = "a JSON number";
				break;
		}
		*errmsg = psprintf("message body is %s, not an object", what);
		*sqlstate = ERRCODE_DATATYPE_MISMATCH;
		pfree(s);
		return false;
	}

	/* allocate every output buffer before json-c runs */
	memset(slots, 0, sizeof(slots));
	for (k = 0; k < SBW_NUM_KEYS; k++)
	{
		if (!s->seen[k])
			continue;
		slots[k].cap = s->span_len[k] + 1;
		slots[k].buf = palloc(slots[k].cap);
	}

	/* phase 2 */
	jr = run_jsonc(body, len, s->nmembers, slots, &jerr, &jend, &bad_key);

	/* phase 3 */
	switch (jr)
	{
		case SBW_JSONC_OK:
			ok = apply_rules(slots, ev, errmsg, sqlstate);
			break;
		case SBW_JSONC_DUPLICATE:
			find_duplicate_key(body, len, errmsg, sqlstate);
			ok = false;
			break;
		case SBW_JSONC_NO_MEMORY:
			*errmsg = pstrdup("out of memory in json-c while decoding the message body");
			*sqlstate = ERRCODE_OUT_OF_MEMORY;
			ok = false;
			break;
		case SBW_JSONC_DISAGREES:
			*errmsg = psprintf("internal error in the event decoder: json-c refused a body the scanner accepted (%s at byte offset %zu)",
							   json_tokener_error_desc((enum json_tokener_error) jerr),
							   jend);
			*sqlstate = ERRCODE_INTERNAL_ERROR;
			ok = false;
			break;
		case SBW_JSONC_MISMATCH:
		default:
			*errmsg = psprintf("internal error in the event decoder: json-c's value of key \"%s\" does not match the scanned text",
							   sbw_key_names[bad_key]);
			*sqlstate = ERRCODE_INTERNAL_ERROR;
			ok = false;
			break;
	}

	/* buffers not handed over to the event */
	for (k = 0; k < SBW_NUM_KEYS; k++)
		if (slots[k].buf != NULL)
			pfree(slots[k].buf);
	if (!ok)
		clear_event(ev);
	pfree(s);
	return ok;
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
