/*-------------------------------------------------------------------------
 *
 * test_decode.c
 *		Standalone unit test of src/event_decode.c, linked with the
 *		malloc-based stubs of fuzz/pg_stubs.c (no server needed).
 *
 * Each case decodes one body and compares every field of the event, or
 * the exact SQLSTATE and message of the error.  Each case also checks that
 * the decoder pfree'd everything it did not hand back.  The last line is
 * "N passed, M failed"; the exit status is non-zero if M > 0.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <stdio.h>
#include <stdlib.h>

#include "utils/errcodes.h"
#include "utils/memutils.h"

#include "event_decode.h"
#include "pg_stubs.h"

/* port.h maps these to pg_* versions that live in the server */
#undef printf
#undef snprintf

static int	n_passed = 0;
static int	n_failed = 0;

/* "22P02" from a MAKE_SQLSTATE value */
static const char *
sqlstate_str(int code)
{
	static char buf[6];
	int			i;

	for (i = 0; i < 5; i++)
	{
		buf[i] = PGUNSIXBIT(code);
		code >>= 6;
	}
	buf[5] = '\0';
	return buf;
}


static void
result(const char *name, bool ok, const char *why)
{
	if (ok)
		n_passed++;
	else
	{
		n_failed++;
		printf("FAIL %s: %s\n", name, why);
	}
}

static bool
same_str(const char *a, const char *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	return strcmp(a, b) == 0;
}

static char *
show(const char *s)
{
	return s ? psprintf("\"%s\"", s) : pstrdup("NULL");
}

/* Compare one string field; append to *why on mismatch. */
static void
cmp_str(const char *field, const char *got, const char *want, char **why)
{
	if (!same_str(got, want))
	{
		char	   *g = show(got);
		char	   *w = show(want);
		char	   *old = *why;

		*why = psprintf("%s%s: got %s, want %s; ", old ? old : "", field, g, w);
		if (old)
			pfree(old);
		pfree(g);
		pfree(w);
	}
}

static void
cmp_int(const char *field, bool got_has, int64 got, bool want_has, int64 want,
		char **why)
{
	if (got_has != want_has || (want_has && got != want))
	{
		char	   *old = *why;

		*why = psprintf("%s%s: got %s" INT64_FORMAT ", want %s" INT64_FORMAT "; ",
						old ? old : "", field,
						got_has ? "" : "NULL/", got,
						want_has ? "" : "NULL/", want);
		if (old)
			pfree(old);
	}
}

/* Report a case: failed with 'why', or leaked since 'before'. */
static void
finish(const char *name, char *why, long before)
{
	if (why == NULL && sbw_stub_live_allocations() != before)
		why = psprintf("%ld allocations leaked",
					   sbw_stub_live_allocations() - before);
	result(name, why == NULL, why);
	if (why)
		pfree(why);
}

/* Decode body (length len) and expect exactly the event want. */
static void
expect_event_len(const char *name, const char *body, size_t len, SbwEvent want)
{
	SbwEvent	ev;
	char	   *errmsg;
	int			sqlstate;
	char	   *why = NULL;
	long		before = sbw_stub_live_allocations();

	if (!sbw_decode_event(body, len, 0, &ev, &errmsg, &sqlstate))
	{
		why = psprintf("unexpected error %s: %s", sqlstate_str(sqlstate), errmsg);
		pfree(errmsg);
		result(name, false, why);
		pfree(why);
		return;
	}
	cmp_int("author_id", ev.has_author_id, ev.author_id,
			want.has_author_id, want.author_id, &why);
	cmp_str("method", ev.method, want.method, &why);
	cmp_str("url", ev.url, want.url, &why);
	cmp_str("path", ev.path, want.path, &why);
	cmp_str("query_string", ev.query_string, want.query_string, &why);
	cmp_int("status", ev.has_status, ev.status, want.has_status, want.status,
			&why);
	cmp_str("resource", ev.resource, want.resource, &why);
	cmp_int("resource_id", ev.has_resource_id, ev.resource_id,
			want.has_resource_id, want.resource_id, &why);
	cmp_str("sub_resource", ev.sub_resource, want.sub_resource, &why);
	cmp_int("sub_resource_id", ev.has_sub_resource_id, ev.sub_resource_id,
			want.has_sub_resource_id, want.sub_resource_id, &why);
	cmp_str("resource_before", ev.resource_before, want.resource_before, &why);
	cmp_str("resource_after", ev.resource_after, want.resource_after, &why);
	sbw_stub_free_event(&ev);
	finish(name, why, before);
}

static void
expect_event(const char *name, const char *body, SbwEvent want)
{
	expect_event_len(name, body, strlen(body), want);
}

/* Decode and expect an error with this SQLSTATE and exact message. */
static void
expect_error_len(const char *name, const char *body, size_t len,
				 size_t max_bytes, int want_state, const char *want_msg)
{
	SbwEvent	ev;
	char	   *errmsg;
	int			sqlstate;
	char	   *why = NULL;
	long		before = sbw_stub_live_allocations();
	static const SbwEvent zero;

	if (sbw_decode_event(body, len, max_bytes, &ev, &errmsg, &sqlstate))
	{
		sbw_stub_free_event(&ev);
		result(name, false, "decoded, but an error was expected");
		return;
	}
	if (sqlstate != want_state || strcmp(errmsg, want_msg) != 0)
	{
		char	   *got = pstrdup(sqlstate_str(sqlstate));

		why = psprintf("got %s \"%s\", want %s \"%s\"", got, errmsg,
					   sqlstate_str(want_state), want_msg);
		pfree(got);
	}
	else if (memcmp(&ev, &zero, sizeof(ev)) != 0)
		why = pstrdup("event not zeroed after an error");
	pfree(errmsg);
	finish(name, why, before);
}

static void
expect_error(const char *name, const char *body, int want_state,
			 const char *want_msg)
{
	expect_error_len(name, body, strlen(body), 0, want_state, want_msg);
}

/*
 * Decode and expect success, this resource_after, and this value of
 * has_decimal_number (a number jsonb_in may refuse, dispatch.c).
 */
static void
expect_decimal(const char *name, const char *body, const char *want_after,
			   bool want_decimal)
{
	SbwEvent	ev;
	char	   *errmsg;
	int			sqlstate;
	char	   *why = NULL;
	long		before = sbw_stub_live_allocations();

	if (!sbw_decode_event(body, strlen(body), 0, &ev, &errmsg, &sqlstate))
	{
		why = psprintf("unexpected error %s: %s", sqlstate_str(sqlstate), errmsg);
		pfree(errmsg);
		result(name, false, why);
		pfree(why);
		return;
	}
	cmp_str("resource_after", ev.resource_after, want_after, &why);
	if (ev.has_decimal_number != want_decimal && why == NULL)
		why = psprintf("has_decimal_number: got %d, want %d",
					   ev.has_decimal_number, want_decimal);
	sbw_stub_free_event(&ev);
	finish(name, why, before);
}

/*
 * '[' * n + inner + ']' * n, wrapped so the top level is an object:
 * levels of nesting in all.
 */
static char *
nested_body(int levels, const char *inner)
{
	int			n = levels - 1;
	char	   *b = palloc(64 + 2 * n + strlen(inner));
	char	   *p = b;
	int			i;

	p += sprintf(p, "{\"resource\":\"task\",\"x\":");
	for (i = 0; i < n; i++)
		*p++ = '[';
	p += sprintf(p, "%s", inner);
	for (i = 0; i < n; i++)
		*p++ = ']';
	*p++ = '}';
	*p = '\0';
	return b;
}

/* Reference section 2.7 (A): hook message for PUT /v1/tasks/1. */
#define BODY_A \
	"{\"author_id\": 2, \"method\": \"PUT\", \"url\": \"https://storyboard.example.org/\", \"path\": \"/v1/tasks/1\",\n" \
	" \"query_string\": \"\", \"status\": 200, \"resource\": \"task\", \"resource_id\": \"1\",\n" \
	" \"sub_resource\": null, \"sub_resource_id\": null,\n" \
	" \"resource_before\": {\"id\": 1, \"created_at\": \"2019-04-01T10:00:00+00:00\", \"updated_at\": null,\n" \
	"   \"title\": \"A Test Task 1 - foo\", \"status\": \"inprogress\", \"creator_id\": 1, \"story_id\": 1, \"link\": null,\n" \
	"   \"project_id\": 1, \"assignee_id\": 2, \"priority\": \"medium\", \"branch_id\": 1, \"milestone_id\": null},\n" \
	" \"resource_after\": {\"id\": 1, \"status\": \"merged\", \"updated_at\": \"2019-04-11T13:03:42+00:00\"}}\n"

/* (B): the timeline_event message from the same request. */
#define BODY_B \
	"{\"author_id\": 2, \"method\": \"POST\", \"url\": \"https://storyboard.example.org/\", \"path\": \"/v1/tasks/1\",\n" \
	" \"query_string\": null, \"status\": 200, \"resource\": \"timeline_event\", \"resource_id\": 42,\n" \
	" \"sub_resource\": null, \"sub_resource_id\": null, \"resource_before\": null,\n" \
	" \"resource_after\": {\"id\": 42, \"created_at\": \"2019-04-11T13:03:42.123456+00:00\", \"updated_at\": null,\n" \
	"   \"event_type\": \"task_status_changed\",\n" \
	"   \"event_info\": \"{\\\"story_id\\\": 1, \\\"task_id\\\": 1, \\\"task_title\\\": \\\"A Test Task 1 - foo\\\", \\\"old_status\\\": \\\"inprogress\\\", \\\"new_status\\\": \\\"merged\\\"}\",\n" \
	"   \"story_id\": 1, \"worklist_id\": null, \"board_id\": null, \"author_id\": 2, \"comment_id\": null}}"

/* (C): POST /v1/stories/1/comments, the hook message. */
#define BODY_C_HOOK \
	"{\"author_id\": 3, \"method\": \"POST\", \"url\": null, \"path\": \"/api/v1/stories/1/comments\",\n" \
	" \"query_string\": \"\", \"status\": 200, \"resource\": \"story\", \"resource_id\": \"1\",\n" \
	" \"sub_resource\": \"comment\", \"sub_resource_id\": 7,\n" \
	" \"resource_before\": {\"id\": 1, \"title\": \"S\", \"is_bug\": true, \"private\": false},\n" \
	" \"resource_after\": {\"id\": 1, \"title\": \"S\", \"is_bug\": true, \"private\": false}}"

/* (C): the user_comment timeline event, event_info null. */
#define BODY_C_EVENT \
	"{\"author_id\": 3, \"method\": \"POST\", \"url\": null, \"path\": \"/v1/stories/1/comments\", \"query_string\": null,\n" \
	" \"status\": 200, \"resource\": \"timeline_event\", \"resource_id\": 43, \"sub_resource\": null, \"sub_resource_id\": null,\n" \
	" \"resource_before\": null, \"resource_after\": {\"id\": 43, \"event_type\": \"user_comment\", \"event_info\": null,\n" \
	" \"story_id\": 1, \"worklist_id\": null, \"board_id\": null, \"author_id\": 3, \"comment_id\": 7}}"

/* (D): PUT /v1/project_groups/1/projects/3. */
#define BODY_D \
	"{\"author_id\": 1, \"method\": \"PUT\", \"url\": \"https://sb/\", \"path\": \"/v1/project_groups/1/projects/3\",\n" \
	" \"query_string\": \"\", \"status\": 200, \"resource\": \"project_group\", \"resource_id\": \"1\",\n" \
	" \"sub_resource\": \"project\", \"sub_resource_id\": \"3\",\n" \
	" \"resource_before\": {\"id\": 1, \"name\": \"g\", \"title\": \"G\"}, \"resource_after\": {\"id\": 1, \"name\": \"g\", \"title\": \"G\"}}"

static void
test_good_bodies(void)
{
	char	   *deep;

	expect_event("A: task PUT, string resource_id", BODY_A, (SbwEvent) {
		.has_author_id = true,.author_id = 2,.method = "PUT",
			.url = "https://storyboard.example.org/",.path = "/v1/tasks/1",
			.query_string = NULL,.has_status = true,.status = 200,
			.resource = "task",.has_resource_id = true,.resource_id = 1,
			.resource_before = "{\"id\":1,\"created_at\":\"2019-04-01T10:00:00+00:00\",\"updated_at\":null,"
			"\"title\":\"A Test Task 1 - foo\",\"status\":\"inprogress\",\"creator_id\":1,\"story_id\":1,"
			"\"link\":null,\"project_id\":1,\"assignee_id\":2,\"priority\":\"medium\",\"branch_id\":1,"
			"\"milestone_id\":null}",
			.resource_after = "{\"id\":1,\"status\":\"merged\",\"updated_at\":\"2019-04-11T13:03:42+00:00\"}"
	});

	expect_event("B: timeline_event, int resource_id, JSON-in-a-string kept", BODY_B, (SbwEvent) {
		.has_author_id = true,.author_id = 2,.method = "POST",
			.url = "https://storyboard.example.org/",.path = "/v1/tasks/1",
			.has_status = true,.status = 200,.resource = "timeline_event",
			.has_resource_id = true,.resource_id = 42,
			.resource_after = "{\"id\":42,\"created_at\":\"2019-04-11T13:03:42.123456+00:00\",\"updated_at\":null,"
			"\"event_type\":\"task_status_changed\","
			"\"event_info\":\"{\\\"story_id\\\": 1, \\\"task_id\\\": 1, \\\"task_title\\\": \\\"A Test Task 1 - foo\\\", "
			"\\\"old_status\\\": \\\"inprogress\\\", \\\"new_status\\\": \\\"merged\\\"}\","
			"\"story_id\":1,\"worklist_id\":null,\"board_id\":null,\"author_id\":2,\"comment_id\":null}"
	});

	expect_event("C: comment hook, int sub_resource_id", BODY_C_HOOK, (SbwEvent) {
		.has_author_id = true,.author_id = 3,.method = "POST",
			.path = "/api/v1/stories/1/comments",.has_status = true,.status = 200,
			.resource = "story",.has_resource_id = true,.resource_id = 1,
			.sub_resource = "comment",.has_sub_resource_id = true,.sub_resource_id = 7,
			.resource_before = "{\"id\":1,\"title\":\"S\",\"is_bug\":true,\"private\":false}",
			.resource_after = "{\"id\":1,\"title\":\"S\",\"is_bug\":true,\"private\":false}"
	});

	expect_event("C: user_comment timeline event", BODY_C_EVENT, (SbwEvent) {
		.has_author_id = true,.author_id = 3,.method = "POST",
			.path = "/v1/stories/1/comments",.has_status = true,.status = 200,
			.resource = "timeline_event",.has_resource_id = true,.resource_id = 43,
			.resource_after = "{\"id\":43,\"event_type\":\"user_comment\",\"event_info\":null,"
			"\"story_id\":1,\"worklist_id\":null,\"board_id\":null,\"author_id\":3,\"comment_id\":7}"
	});

	expect_event("D: project_group/project, string sub_resource_id", BODY_D, (SbwEvent) {
		.has_author_id = true,.author_id = 1,.method = "PUT",.url = "https://sb/",
			.path = "/v1/project_groups/1/projects/3",.has_status = true,.status = 200,
			.resource = "project_group",.has_resource_id = true,.resource_id = 1,
			.sub_resource = "project",.has_sub_resource_id = true,.sub_resource_id = 3,
			.resource_before = "{\"id\":1,\"name\":\"g\",\"title\":\"G\"}",
			.resource_after = "{\"id\":1,\"name\":\"g\",\"title\":\"G\"}"
	});

	expect_event("DELETE with resource_after null",
				 "{\"method\":\"DELETE\",\"resource\":\"story\",\"resource_id\":\"5\","
				 "\"resource_before\":{\"id\":5},\"resource_after\":null}",
				 (SbwEvent) {
		.method = "DELETE",.resource = "story",.has_resource_id = true,
			.resource_id = 5,.resource_before = "{\"id\":5}"
	});

	expect_event("missing keys become NULL", "{\"resource\":\"task\"}",
				 (SbwEvent) {
		.resource = "task"
	});

	expect_event("falsy values become NULL (payload[key] or None)",
				 "{\"author_id\":0,\"method\":\"\",\"url\":\"\",\"path\":\"\",\"query_string\":\"\","
				 "\"status\":0,\"resource\":\"task\",\"resource_id\":0,\"sub_resource\":\"\","
				 "\"sub_resource_id\":0,\"resource_before\":{},\"resource_after\":{ }}",
				 (SbwEvent) {
		.resource = "task"
	});

	expect_event("falsy values of an accepted type are NULL: 0, -0, \"\", {}",
				 "{\"author_id\":0,\"method\":\"\",\"status\":0,\"resource\":\"task\","
				 "\"resource_id\":-0,\"sub_resource_id\":\"\",\"resource_before\":{},\"resource_after\":null}",
				 (SbwEvent) {
		.resource = "task"
	});
	expect_error("false for an id is a wrong type, falsy or not",
				 "{\"author_id\":false,\"resource\":\"task\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"author_id\" must be an integer, a string of digits or null, not a boolean");
	expect_error("[] for a string key is a wrong type",
				 "{\"method\":[],\"resource\":\"task\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"method\" must be a string or null, not an array");
	expect_error("0.0 for an id is a wrong type",
				 "{\"status\":0.0,\"resource\":\"task\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"status\" must be an integer, a string of digits or null, not the number 0");
	expect_error("false for a snapshot is a wrong type",
				 "{\"resource_before\":false,\"resource\":\"task\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"resource_before\" must be an object or null, not a boolean");
	expect_error("{} for a string key is a wrong type",
				 "{\"query_string\":{},\"resource\":\"task\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"query_string\" must be a string or null, not an object");

	expect_event("negative int id; leading-zero digit string",
				 "{\"author_id\":-5,\"resource\":\"story\",\"resource_id\":\"007\",\"sub_resource_id\":\"0\"}",
				 (SbwEvent) {
		.has_author_id = true,.author_id = -5,.resource = "story",
			.has_resource_id = true,.resource_id = 7,
			.has_sub_resource_id = true,.sub_resource_id = 0
	});

	expect_event("int64 limits as int and as string",
				 "{\"author_id\":-9223372036854775808,\"resource\":\"story\","
				 "\"resource_id\":9223372036854775807,\"sub_resource_id\":\"9223372036854775807\"}",
				 (SbwEvent) {
		.has_author_id = true,.author_id = PG_INT64_MIN,.resource = "story",
			.has_resource_id = true,.resource_id = PG_INT64_MAX,
			.has_sub_resource_id = true,.sub_resource_id = PG_INT64_MAX
	});

	expect_event("status as digit string; int32 max",
				 "{\"status\":\"201\",\"resource\":\"task\",\"resource_id\":2147483647}",
				 (SbwEvent) {
		.has_status = true,.status = 201,.resource = "task",
			.has_resource_id = true,.resource_id = 2147483647
	});

	expect_event("status negative int, -2147483648",
				 "{\"status\":-2147483648,\"resource\":\"task\"}",
				 (SbwEvent) {
		.has_status = true,.status = PG_INT32_MIN,.resource = "task"
	});

	expect_event("unknown keys ignored (even huge or odd ones)",
				 "{\"resource\":\"task\",\"extra\":{\"a\":[1,2,{\"b\":18446744073709551615}]},"
				 "\"x\":true,\"\":null}",
				 (SbwEvent) {
		.resource = "task"
	});

	expect_event("doubles keep their text; uint64 kept",
				 "{\"resource\":\"task\",\"resource_after\":{\"a\":1.50,\"b\":1e2,\"c\":-0.0,"
				 "\"d\":1E+400,\"e\":0.1000000000000000055511151231257827,\"f\":18446744073709551615,\"g\":-0}}",
				 (SbwEvent) {
		.resource = "task",
			.resource_after = "{\"a\":1.50,\"b\":1e2,\"c\":-0.0,\"d\":1E+400,"
			"\"e\":0.1000000000000000055511151231257827,\"f\":18446744073709551615,\"g\":0}"
	});

	expect_event("escapes decoded and re-encoded for jsonb",
				 "{\"resource\":\"task\",\"url\":\"http:\\/\\/x\\u00e9\","
				 "\"resource_after\":{\"t\":\"\\u00e9\\/\\n\\t\\u0001\\ud83d\\ude00\\\"\\\\\"}}",
				 (SbwEvent) {
		.resource = "task",.url = "http://x\xc3\xa9",
			.resource_after = "{\"t\":\"\xc3\xa9/\\n\\t\\u0001\xf0\x9f\x98\x80\\\"\\\\\"}"
	});

	expect_event("whitespace around and an escaped key name",
				 " \r\n\t{ \"r\\u0065source\" : \"user\" , \"method\":\"POST\" }\n\n",
				 (SbwEvent) {
		.resource = "user",.method = "POST"
	});

	expect_event("duplicate top-level key: the last one wins",
				 "{\"resource\":\"task\",\"resource_id\":1,\"resource_id\":2}",
				 (SbwEvent) {
		.resource = "task",.has_resource_id = true,.resource_id = 2
	});

	expect_event("duplicate key spelt with an escape: the last one wins",
				 "{\"resource\":\"task\",\"r\\u0065source\":\"story\"}",
				 (SbwEvent) {
		.resource = "story"
	});

	expect_event("duplicate snapshot: the last one wins, whole",
				 "{\"resource\":\"task\",\"resource_after\":{\"a\":1},\"resource_after\":{\"b\":2},"
				 "\"url\":\"x\",\"url\":null}",
				 (SbwEvent) {
		.resource = "task",.resource_after = "{\"b\":2}"
	});

	expect_event("nested duplicate keys: last wins, as in jsonb",
				 "{\"resource\":\"task\",\"resource_before\":{\"x\":1,\"x\":2}}",
				 (SbwEvent) {
		.resource = "task",.resource_before = "{\"x\":2}"
	});

	deep = nested_body(64, "");
	expect_event("nesting of exactly 64 levels", deep, (SbwEvent) {
		.resource = "task"
	});
	pfree(deep);

	/* json-c counts the scalar as a level of its own (a fuzzer find) */
	deep = nested_body(64, "1E+400");
	expect_event("nesting of exactly 64 levels, a scalar inside", deep, (SbwEvent) {
		.resource = "task"
	});
	pfree(deep);

	expect_event_len("body without a terminating NUL (length-bounded)",
					 "{\"resource\":\"tag\"}GARBAGE", 18, (SbwEvent) {
		.resource = "tag"
	});
}

static void
test_errors(void)
{
	char	   *deep;
	char	   *body;

	expect_error_len("size limit", BODY_A, strlen(BODY_A), 100,
					 ERRCODE_PROGRAM_LIMIT_EXCEEDED,
					 "message body of 613 bytes exceeds storyboard_worker.max_message_bytes (100)");
	expect_error("empty body", "", ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is empty");
	expect_error_len("NULL body of length 0", NULL, 0, 0,
					 ERRCODE_INVALID_TEXT_REPRESENTATION, "message body is empty");
	expect_error_len("NULL body of length 5", NULL, 5, 0, ERRCODE_INTERNAL_ERROR,
					 "internal error in the event decoder: message body pointer is NULL");
	/* refused on the length alone: the decoder reads none of the bytes */
	expect_error_len("hard limit with max_message_bytes = 0", "{}",
					 (size_t) MaxAllocSize, 0, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
					 "message body of 1073741823 bytes exceeds the decoder's limit of 1073741822 bytes");
	expect_error("whitespace body", " \n ", ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body contains only whitespace");

	/* UTF-8 */
	expect_error("bad continuation byte", "{\"resource\":\"t\xc3\x28sk\"}",
				 ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
				 "invalid UTF-8 byte sequence 0xc3 0x28 at byte offset 14 of the message body");
	expect_error("overlong NUL", "{\"url\":\"\xc0\x80\",\"resource\":\"task\"}",
				 ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
				 "invalid UTF-8 byte sequence 0xc0 0x80 at byte offset 8 of the message body");
	expect_error("UTF-8-encoded surrogate", "{\"resource\":\"task\",\"x\":\"\xed\xa0\x80\"}",
				 ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
				 "invalid UTF-8 byte sequence 0xed 0xa0 0x80 at byte offset 24 of the message body");
	expect_error("truncated sequence at the end", "{\"resource\":\"task\"}\xe2\x82",
				 ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
				 "invalid UTF-8 byte sequence 0xe2 0x82 at byte offset 19 of the message body");

	/* top level */
	expect_error("top-level array", "[{\"resource\":\"task\"}]",
				 ERRCODE_DATATYPE_MISMATCH, "message body is a JSON array, not an object");
	expect_error("top-level string", " \"task\" ",
				 ERRCODE_DATATYPE_MISMATCH, "message body is a JSON string, not an object");
	expect_error("top-level null", "null",
				 ERRCODE_DATATYPE_MISMATCH, "message body is JSON null, not an object");
	expect_error("top-level number", "-12.5e3",
				 ERRCODE_DATATYPE_MISMATCH, "message body is a JSON number, not an object");

	/* syntax */
	expect_error("trailing garbage", "{\"resource\":\"task\"}x",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid token \"x\" at byte offset 19");
	expect_error("two objects", "{\"resource\":\"task\"} {}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: unexpected data after the top-level value at byte offset 20");
	expect_error_len("NUL byte after the object", "{\"resource\":\"task\"}\0", 20, 0,
					 ERRCODE_INVALID_TEXT_REPRESENTATION,
					 "message body is not valid JSON: invalid token \"\\u0000\" at byte offset 19");
	expect_error("truncated body", "{\"resource\":\"task\"",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: unexpected end of input at byte offset 18");
	expect_error("single quotes", "{'resource':'task'}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid token \"'\" at byte offset 1");
	expect_error("trailing comma", "{\"resource\":\"task\",}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: expected a string key, found \"}\" at byte offset 19");
	expect_error("NaN", "{\"resource\":\"task\",\"status\":NaN}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid token \"NaN\" at byte offset 28");
	expect_error("leading zero", "{\"resource\":\"task\",\"status\":0200}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid token \"0200\" at byte offset 28");
	expect_error("number without digits after the point",
				 "{\"resource\":\"task\",\"resource_after\":{\"a\":1.}}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid token \"1.\" at byte offset 41");
	expect_error("raw newline in a string", "{\"resource\":\"ta\nsk\"}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: control character not escaped inside a string: \"\\u000a\" at byte offset 15");
	expect_error("invalid escape", "{\"resource\":\"ta\\qsk\"}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid escape inside a string: \"\\\\q\" at byte offset 15");
	expect_error("backslash before a control character", "{\"resource\":\"ta\\\x01sk\"}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid escape inside a string: \"\\\\\\u0001\" at byte offset 15");
	/* PostgreSQL 15's lexer, not de-escaping, takes a backslash before NUL for an escape */
	expect_error_len("backslash before a NUL byte", "{\"resource\":\"ta\\\0sk\"}", 22, 0,
					 ERRCODE_INVALID_TEXT_REPRESENTATION,
					 "message body is not valid JSON: invalid escape inside a string: \"\\\\\\u0000\" at byte offset 15");
	expect_error("bad \\u escape", "{\"resource\":\"\\u12G4\"}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid \\u escape (4 hex digits expected) inside a string at byte offset 12");
	expect_error("byte order mark", "\xef\xbb\xbf{\"resource\":\"task\"}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid token \"\xef\xbb\xbf\" at byte offset 0");
	expect_error("misspelt literal", "{\"resource\":\"task\",\"url\":nul}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid token \"nul\" at byte offset 25");

	deep = nested_body(65, "");
	expect_error("nesting of 65 levels", deep, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
				 "JSON nesting deeper than 64 levels at byte offset 86");
	pfree(deep);

	/* a number beyond double's range in an id is out of range, as in 1.4 */
	expect_error("id beyond double's range", "{\"resource\":\"task\",\"resource_id\":1e999999}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "key \"resource_id\" is out of range for a 64-bit integer: 1e999999");

	/* the first problem wins: a syntax error before the nesting bound ... */
	expect_error("syntax error before too deep a nesting",
				 "{\"url\":nul,\"x\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid token \"nul\" at byte offset 7");
	/* ... and the nesting before a syntax error behind it */
	expect_error("too deep a nesting before a syntax error",
				 "{\"x\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]],\"url\":nul}",
				 ERRCODE_PROGRAM_LIMIT_EXCEEDED,
				 "JSON nesting deeper than 64 levels at byte offset 68");

	/* bracket characters inside strings do not count as nesting */
	body = psprintf("{\"resource\":\"task\",\"x\":\"%0100d\"}", 0);
	memset(strchr(body, '0'), '[', 100);
	expect_event("brackets inside a string are not nesting", body, (SbwEvent) {
		.resource = "task"
	});
	pfree(body);
	expect_error("nesting counted in a top-level array too",
				 "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
				 ERRCODE_PROGRAM_LIMIT_EXCEEDED,
				 "JSON nesting deeper than 64 levels at byte offset 64");

	/* \u0000 and surrogates */
	expect_error("NUL in a top-level string", "{\"resource\":\"task\",\"url\":\"a\\u0000b\"}",
				 ERRCODE_UNTRANSLATABLE_CHARACTER,
				 "message body has \\u0000 in the string at byte offset 25, which PostgreSQL text and jsonb cannot store");
	expect_error("NUL in a snapshot string",
				 "{\"resource\":\"task\",\"resource_after\":{\"id\":1,\"title\":\"x\\u0000\"}}",
				 ERRCODE_UNTRANSLATABLE_CHARACTER,
				 "message body has \\u0000 in the string at byte offset 52, which PostgreSQL text and jsonb cannot store");
	expect_error("NUL in a snapshot key name",
				 "{\"resource\":\"task\",\"resource_before\":{\"ti\\u0000tle\":\"x\"}}",
				 ERRCODE_UNTRANSLATABLE_CHARACTER,
				 "message body has \\u0000 in the string at byte offset 38, which PostgreSQL text and jsonb cannot store");
	expect_error("NUL in an array element",
				 "{\"resource\":\"task\",\"resource_after\":{\"tags\":[\"a\",{\"n\":[\"\\u0000\"]}]}}",
				 ERRCODE_UNTRANSLATABLE_CHARACTER,
				 "message body has \\u0000 in the string at byte offset 55, which PostgreSQL text and jsonb cannot store");
	expect_error("lone surrogate",
				 "{\"resource\":\"task\",\"resource_after\":{\"title\":\"\\ud800x\"}}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body has a lone UTF-16 surrogate in the string at byte offset 45");
	expect_error("lone high surrogate at the end of a string",
				 "{\"resource\":\"task\",\"url\":\"x\\udbff\"}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body has a lone UTF-16 surrogate in the string at byte offset 25");
	expect_error("lone low surrogate",
				 "{\"resource\":\"task\",\"url\":\"\\udc00\\ud800\"}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body has a lone UTF-16 surrogate in the string at byte offset 25");
	expect_error("two high surrogates",
				 "{\"resource\":\"task\",\"url\":\"\\ud800\\ud800\\udc00\"}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body has a lone UTF-16 surrogate in the string at byte offset 25");
	expect_error("lone surrogate in a key name",
				 "{\"resource\":\"task\",\"\\ud800\":1}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body has a lone UTF-16 surrogate in the string at byte offset 19");
	expect_error_len("raw NUL byte inside a string", "{\"resource\":\"ta\0sk\"}", 20, 0,
					 ERRCODE_INVALID_TEXT_REPRESENTATION,
					 "message body is not valid JSON: control character not escaped inside a string: \"\\u0000\" at byte offset 15");

	/* integers json-c would clamp, numbers numeric cannot hold */
	expect_error("snapshot integer beyond uint64",
				 "{\"resource\":\"task\",\"resource_after\":{\"id\":18446744073709551616}}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "number 18446744073709551616 at byte offset 42 is out of range for a 64-bit integer");
	expect_error("author_id below int64",
				 "{\"author_id\":-9223372036854775809,\"resource\":\"task\"}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "number -9223372036854775809 at byte offset 13 is out of range for a 64-bit integer");
	expect_error("resource_id above int64 (json-c uint64)",
				 "{\"resource\":\"task\",\"resource_id\":9223372036854775808}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "key \"resource_id\" is out of range for a 64-bit integer: 9223372036854775808");
	expect_error("resource_id digit string above int64",
				 "{\"resource\":\"task\",\"resource_id\":\"99999999999999999999\"}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "key \"resource_id\" is out of range for a 64-bit integer: \"99999999999999999999\"");
	expect_error("status above int32", "{\"resource\":\"task\",\"status\":2147483648}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "key \"status\" is out of range for a 32-bit integer: 2147483648");
	expect_error("unknown key with an integer beyond uint64",
				 "{\"resource\":\"task\",\"x\":[1,-99999999999999999999]}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "number -99999999999999999999 at byte offset 26 is out of range for a 64-bit integer");
	expect_error("sub_resource_id below int64 as JSON",
				 "{\"resource\":\"task\",\"sub_resource_id\":-9223372036854775809}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "number -9223372036854775809 at byte offset 37 is out of range for a 64-bit integer");
	expect_error("status below int32", "{\"resource\":\"task\",\"status\":-2147483649}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "key \"status\" is out of range for a 32-bit integer: -2147483649");
	expect_error("status digit string above int32", "{\"resource\":\"task\",\"status\":\"2147483648\"}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "key \"status\" is out of range for a 32-bit integer: \"2147483648\"");

	/*
	 * numeric's range is jsonb_in's to check (dispatch.c, pg_regress test
	 * "decode"): the decoder passes such numbers through and flags them.
	 */
	expect_decimal("snapshot number beyond numeric: passed on, flagged",
				   "{\"resource\":\"task\",\"resource_after\":{\"x\":1e131072}}",
				   "{\"x\":1e131072}", true);
	expect_decimal("snapshot number with too large a scale: passed on, flagged",
				   "{\"resource\":\"task\",\"resource_after\":{\"x\":1.5e-16383}}",
				   "{\"x\":1.5e-16383}", true);
	expect_decimal("integers only: not flagged",
				   "{\"resource\":\"task\",\"resource_after\":{\"x\":-12,\"y\":[0]}}",
				   "{\"x\":-12,\"y\":[0]}", false);
	expect_decimal("a fraction in an unknown key: flagged",
				   "{\"resource\":\"task\",\"z\":0.5,\"resource_after\":{\"x\":1}}",
				   "{\"x\":1}", true);

	/* types */
	expect_error("resource_id boolean", "{\"resource\":\"task\",\"resource_id\":true}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"resource_id\" must be an integer, a string of digits or null, not a boolean");
	expect_error("resource_id non-digit string", "{\"resource\":\"task\",\"resource_id\":\"1a\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"resource_id\" must be an integer, a string of digits or null, not the string \"1a\"");
	expect_error("negative id as a string", "{\"resource\":\"task\",\"sub_resource_id\":\"-1\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"sub_resource_id\" must be an integer, a string of digits or null, not the string \"-1\"");
	expect_error("author_id fraction", "{\"author_id\":1.5,\"resource\":\"task\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"author_id\" must be an integer, a string of digits or null, not the number 1.5");
	expect_error("resource_id array", "{\"resource\":\"task\",\"resource_id\":[1]}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"resource_id\" must be an integer, a string of digits or null, not an array");
	expect_error("status string", "{\"resource\":\"task\",\"status\":\"OK\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"status\" must be an integer, a string of digits or null, not the string \"OK\"");
	expect_error("method integer", "{\"method\":1,\"resource\":\"task\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"method\" must be a string or null, not the integer 1");
	expect_error("url object", "{\"resource\":\"task\",\"url\":{\"a\":1}}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"url\" must be a string or null, not an object");
	expect_error("resource_after array", "{\"resource\":\"task\",\"resource_after\":[{\"id\":1}]}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"resource_after\" must be an object or null, not an array");
	expect_error("resource_before string", "{\"resource\":\"task\",\"resource_before\":\"{}\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"resource_before\" must be an object or null, not the string \"{}\"");
	expect_error("string with a control character shown escaped",
				 "{\"resource\":\"task\",\"resource_id\":\"1\\n2\"}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"resource_id\" must be an integer, a string of digits or null, not the string \"1\\u000a2\"");

	/* method and resource values */
	expect_error("method GET", "{\"method\":\"GET\",\"resource\":\"task\"}",
				 ERRCODE_INVALID_PARAMETER_VALUE,
				 "method \"GET\" is not one of POST, PUT, DELETE");
	expect_error("method lower case", "{\"method\":\"post\",\"resource\":\"task\"}",
				 ERRCODE_INVALID_PARAMETER_VALUE,
				 "method \"post\" is not one of POST, PUT, DELETE");
	expect_error("resource missing", "{\"method\":\"PUT\",\"resource_id\":1}",
				 ERRCODE_INVALID_PARAMETER_VALUE,
				 "key \"resource\" is missing, null or empty");
	expect_error("resource empty", "{\"resource\":\"\"}",
				 ERRCODE_INVALID_PARAMETER_VALUE,
				 "key \"resource\" is missing, null or empty");
	expect_error("resource unknown", "{\"resource\":\"foo\"}",
				 ERRCODE_INVALID_PARAMETER_VALUE, "unknown resource \"foo\"");
	expect_error("resource plural", "{\"resource\":\"stories\"}",
				 ERRCODE_INVALID_PARAMETER_VALUE, "unknown resource \"stories\"");
	expect_error("resource not a string", "{\"resource\":7}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"resource\" must be a string or null, not the integer 7");

	/* long values and deep paths are shortened in messages */
	expect_error("long value truncated",
				 "{\"resource\":\"abcdefghijabcdefghijabcdefghijabcdefghijabcdefghij\"}",
				 ERRCODE_INVALID_PARAMETER_VALUE,
				 "unknown resource \"abcdefghijabcdefghijabcdefghijabcdefghij\"...");
	expect_error("long number shortened",
				 "{\"resource\":\"task\",\"x\":123456789012345678901234567890123456789012345678901234567890}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "number 1234567890123456789012345678901234567890... at byte offset 23 is out of range for a 64-bit integer");
	expect_error("long token shortened",
				 "{\"resource\":\"task\",\"x\":abcdefghijabcdefghijabcdefghijabcdefghijabcdefghij}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: invalid token \"abcdefghijabcdefghijabcdefghijabcdefghij\"... at byte offset 23");
	expect_error("error order: a syntax error wins over an earlier \\u0000",
				 "{\"resource\":\"nope\",\"url\":\"\\u0000\",\"x\":[}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body is not valid JSON: expected a JSON value, found \"}\" at byte offset 39");
	expect_error("error order: first content problem wins (integer first)",
				 "{\"resource\":\"task\",\"resource_after\":{\"a\":18446744073709551616,\"b\":\"\\u0000\"}}",
				 ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
				 "number 18446744073709551616 at byte offset 41 is out of range for a 64-bit integer");
	expect_error("error order: first content problem wins (\\u0000 first)",
				 "{\"resource\":\"task\",\"resource_after\":{\"b\":\"\\u0000\",\"a\":18446744073709551616}}",
				 ERRCODE_UNTRANSLATABLE_CHARACTER,
				 "message body has \\u0000 in the string at byte offset 41, which PostgreSQL text and jsonb cannot store");
	expect_error("error order: the top-level type before contents",
				 "[\"\\u0000\"]", ERRCODE_DATATYPE_MISMATCH,
				 "message body is a JSON array, not an object");
	expect_error("error order: contents before types",
				 "{\"resource\":\"nope\",\"resource\":1,\"x\":\"\\udc00\"}",
				 ERRCODE_INVALID_TEXT_REPRESENTATION,
				 "message body has a lone UTF-16 surrogate in the string at byte offset 36");

	/*
	 * Duplicate keys: the last one wins, as for Python's json.loads in
	 * StoryBoard and for jsonb (they used to be refused, 22030).
	 */
	expect_error("duplicate keys: the last one is checked",
				 "{\"resource\":\"nope\",\"resource\":1}",
				 ERRCODE_DATATYPE_MISMATCH,
				 "key \"resource\" must be a string or null, not the integer 1");
	expect_error("duplicate keys: the last one is checked, even if the first was fine",
				 "{\"resource\":\"task\",\"method\":\"PUT\",\"method\":\"GET\"}",
				 ERRCODE_INVALID_PARAMETER_VALUE,
				 "method \"GET\" is not one of POST, PUT, DELETE");
}

static void
test_known_resource(void)
{
	const char *good[] = {"story", "project", "project_group", "task", "branch",
		"milestone", "timeline_event", "user", "team", "tag", "task_status",
		"subscription", "subscription_event", "systeminfo", "openid",
		"worklist", "board", "due_date", "event", "comment"};
	const char *bad[] = {"stories", "Story", "", "task ", "comments", "projects"};
	size_t		i;
	bool		ok = true;

	for (i = 0; i < lengthof(good); i++)
		ok &= sbw_known_resource(good[i]);
	for (i = 0; i < lengthof(bad); i++)
		ok &= !sbw_known_resource(bad[i]);
	ok &= !sbw_known_resource(NULL);
	result("sbw_known_resource: 20 names in, others out", ok, "mismatch");
}

int
main(void)
{
	test_good_bodies();
	test_errors();
	test_known_resource();
	printf("%d passed, %d failed\n", n_passed, n_failed);
	return n_failed == 0 ? 0 : 1;
}
