/*-------------------------------------------------------------------------
 *
 * email.c
 *		The built-in "email" plugin: StoryBoard's subscription-email, as
 *		rows of storyboard_worker.outbox written in the event's own
 *		transaction.
 *
 * What StoryBoard's tables say (which template, who receives it, what it
 * shows) is computed by the SQL functions of the 1.4 script, run as the
 * plugin role under a search_path of pg_catalog and the schemas holding
 * StoryBoard's tables only.  The templates are read and the outbox written
 * as the extension's owner, in the safe scope: the plugin role has no
 * rights on either.  Nothing is sent from here: the mailer (mailer.c)
 * sends after the commit, woken by it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <unistd.h>

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "nodes/makefuncs.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"

#include "email.h"
#include "render.h"
#include "scope.h"
#include "storyboard_worker.h"
#include "guc.h"
#include "stats.h"
#include "extension.h"

PG_FUNCTION_INFO_V1(sbw_email_handler);
PG_FUNCTION_INFO_V1(sbw_email_enabled);
PG_FUNCTION_INFO_V1(sbw_email_host_sql);

/* StoryBoard's subject limit (factory.py): longer ones end in "...". */
#define SBW_SUBJECT_MAX		78
#define SBW_SUBJECT_KEEP	75

/* The tables the SQL functions read: their schemas make up the path. */
static const char *const email_tables[] = {
	"subscriptions", "users", "user_preferences", "stories", "tasks",
	"projects", "project_group_mapping", "comments", "worklists",
	"story_permissions", "user_permissions", "team_permissions",
	"team_membership", "worklist_permissions", "storytags",
	"story_storytags", NULL
};

/* Where an event goes (storyboard_worker.email_route()). */
typedef struct SbwEmailRoute
{
	char	   *template;
	char	   *kind;
	char	   *resource;
	Datum		resource_id;
	bool		resource_id_null;
	Datum		story_id;
	bool		story_id_null;
	Datum		project_id;
	bool		project_id_null;
	Datum		story_private;
	bool		story_private_null;
} SbwEmailRoute;

/* A template: subject, text, optional HTML. */
typedef struct SbwEmailTemplate
{
	char	   *subject;
	char	   *body_text;
	char	   *body_html;
} SbwEmailTemplate;

/* What is the same in every recipient's mail. */
typedef struct SbwEmailMail
{
	const char *kind;
	char	   *subject;
	char	   *body_text;
	char	   *body_html;
	char	   *in_reply_to;
	char	   *story_title;
	Datum		story_id;
	bool		has_story_id;
	const char *host;
} SbwEmailMail;

/*
 * One of the plugin's own statements, run as the plugin role: prepared once
 * per backend (a generic plan: planning the inlined recipients query cost
 * more than running it) and prepared again if the event type changed (the
 * extension was created again).
 */
typedef struct SbwEmailPlan
{
	const char *sql;
	int			nargs;
	Oid			argtypes[5];	/* InvalidOid: the event's row type */
	Oid			event_type;		/* the row type the plan was made for */
	SPIPlanPtr	plan;
} SbwEmailPlan;

static SbwEmailPlan route_plan = {
	"SELECT r.template, r.kind, r.resource, r.resource_id, r.story_id,"
	"       r.project_id, r.story_private"
	"  FROM storyboard_worker.email_route($1) r",
	1, {InvalidOid}
};
static SbwEmailPlan recipients_plan = {
	"SELECT r.user_id, r.email, r.full_name, r.digest, r.digest_time"
	"  FROM storyboard_worker.email_recipients($1, $2, $3, $4, $5) r",
	5, {TEXTOID, INT8OID, INT8OID, INT8OID, BOOLOID}
};
static SbwEmailPlan context_plan = {
	"SELECT storyboard_worker.email_context($1, $2, $3)",
	3, {InvalidOid, TEXTOID, INT8OID}
};

static SbwStmt template_stmt = SBW_STMT(
	"SELECT t.subject, t.body_text, t.body_html"
	"  FROM (SELECT o.subject, o.body_text, o.body_html, 0 AS pref"
	"          FROM storyboard_worker.email_templates o"
	"         WHERE o.name OPERATOR(pg_catalog.=) $1"
	"        UNION ALL"
	"        SELECT d.subject, d.body_text, d.body_html, 1"
	"          FROM storyboard_worker.email_templates_default d"
	"         WHERE d.name OPERATOR(pg_catalog.=) $1) t"
	" ORDER BY t.pref LIMIT 1",
	1, TEXTOID);

/*
 * Every recipient's row in one statement (one executor run, where an
 * INSERT per recipient cost more than the rest of the plugin): the
 * per-recipient values as arrays, the shared ones once.
 */
static SbwStmt outbox_stmt = SBW_STMT(
	"INSERT INTO storyboard_worker.outbox (subscriber_id, recipient, full_name,"
	" subject, body_text, body_html, message_id, in_reply_to, kind, story_id,"
	" story_title, digest_time, status)"
	" SELECT r.subscriber_id, r.recipient, r.full_name, $4, $5, $6, r.message_id, $8, $9,"
	"        $10, $11, r.digest_time, r.status"
	"   FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3),"
	"                   pg_catalog.unnest($7), pg_catalog.unnest($12), pg_catalog.unnest($13))"
	"        WITH ORDINALITY AS r(subscriber_id, recipient, full_name, message_id,"
	"                             digest_time, status, n)"
	"  ORDER BY r.n",
	13, INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTOID, TEXTOID, TEXTOID,
	TEXTARRAYOID, TEXTOID, TEXTOID, INT8OID, TEXTOID, INT4ARRAYOID, TEXTARRAYOID);

/*
 * The name mails identify this host by (Message-ID, the thread ids, and the
 * EHLO greeting): storyboard_worker.email_smtp_local_hostname, else the
 * host's name, as StoryBoard uses getfqdn().
 */
char *
sbw_email_host(void)
{
	char		name[256];

	if (sbw_email_smtp_local_hostname && sbw_email_smtp_local_hostname[0])
		return pstrdup(sbw_email_smtp_local_hostname);
	if (gethostname(name, sizeof(name)) != 0 || name[0] == '\0')
		return pstrdup("localhost");
	name[sizeof(name) - 1] = '\0';
	name[strspn(name, SBW_HOST_NAME_CHARS)] = '\0';
	return pstrdup(name[0] ? name : "localhost");
}

/*
 * The subject as one header line: StoryBoard turns every line break into a
 * space and shortens a subject over 78 characters to its first 75 and
 * "...".  Any other control character goes too: nothing a user typed can
 * start a header of its own.
 */
char *
sbw_email_subject_line(const char *s)
{
	StringInfoData buf;
	int			len;

	initStringInfo(&buf);
	for (; *s; s++)
	{
		if (*s == '\r' && s[1] == '\n')
			continue;			/* \r\n is one break */
		if ((unsigned char) *s < 0x20 || *s == 0x7f)
			appendStringInfoChar(&buf, ' ');
		else
			appendStringInfoChar(&buf, *s);
	}
	len = pg_mbstrlen(buf.data);
	if (len > SBW_SUBJECT_MAX)
	{
		int			cut = pg_mbcharcliplen(buf.data, buf.len, SBW_SUBJECT_KEEP);

		buf.data[cut] = '\0';
		buf.len = cut;
		appendStringInfoString(&buf, "...");
	}
	return buf.data;
}

/*
 * The search_path the SQL functions run under: pg_catalog, then the
 * schemas the plugin role's path finds StoryBoard's tables in, pg_temp.
 * Nothing is looked up in any other schema of that path.
 */
static char *
sbw_email_search_path(void)
{
	Oid			relids[lengthof(email_tables)];
	int			n = 0;
	int			i;

	for (i = 0; email_tables[i] != NULL; i++)
	{
		Oid			relid = RangeVarGetRelid(makeRangeVar(NULL, (char *) email_tables[i], -1),
											 NoLock, true);

		if (OidIsValid(relid))
			relids[n++] = relid;
	}
	return sbw_tables_search_path(relids, n);
}

/* A text column of the current SPI result row, NULL if null. */
static char *
sbw_spi_text(int row, int col)
{
	return SPI_getvalue(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col);
}

/*
 * Run one of the plugin's statements (see SbwEmailPlan) for an event of
 * row type 'event_type', under the search_path already set; the result is
 * in SPI_tuptable.
 */
static void
sbw_email_exec(SbwEmailPlan *p, Oid event_type, Datum *args, const char *nulls)
{
	int			rc;

	if (p->plan != NULL && p->event_type != event_type)
	{
		SPI_freeplan(p->plan);
		p->plan = NULL;
	}
	if (p->plan == NULL)
	{
		Oid			types[5];
		SPIPlanPtr	plan;
		int			i;

		for (i = 0; i < p->nargs; i++)
			types[i] = OidIsValid(p->argtypes[i]) ? p->argtypes[i] : event_type;
		plan = SPI_prepare_cursor(p->sql, p->nargs, types, CURSOR_OPT_GENERIC_PLAN);
		if (plan == NULL || SPI_keepplan(plan) != 0)
			elog(ERROR, "email plugin: could not prepare \"%s\": %s", p->sql,
				 SPI_result_code_string(SPI_result));
		p->plan = plan;
		p->event_type = event_type;
	}
	rc = SPI_execute_plan(p->plan, args, nulls, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "email plugin: \"%s\" failed: %s", p->sql, SPI_result_code_string(rc));
}

/*
 * Ask email_route() where the event goes; false when it sends no mail (a
 * GET, a failed request, a resource StoryBoard does not mail about).
 */
static bool
sbw_email_route(HeapTupleHeader row, SbwEmailRoute *route)
{
	Oid			argtype = HeapTupleHeaderGetTypeId(row);
	Datum		arg = PointerGetDatum(row);
	HeapTuple	tup;
	TupleDesc	desc;

	sbw_email_exec(&route_plan, argtype, &arg, NULL);
	if (SPI_processed != 1)
		elog(ERROR, "email plugin: storyboard_worker.email_route() returned no row");
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	route->template = sbw_spi_text(0, 1);
	route->kind = sbw_spi_text(0, 2);
	route->resource = sbw_spi_text(0, 3);
	route->resource_id = SPI_getbinval(tup, desc, 4, &route->resource_id_null);
	route->story_id = SPI_getbinval(tup, desc, 5, &route->story_id_null);
	route->project_id = SPI_getbinval(tup, desc, 6, &route->project_id_null);
	route->story_private = SPI_getbinval(tup, desc, 7, &route->story_private_null);
	return route->template != NULL && route->resource != NULL && !route->resource_id_null;
}

/*
 * The template of that name: the operator's if there is one, else the
 * extension's.  Read as the extension's owner.  False if neither exists
 * (StoryBoard has no template for the event: no mail).
 */
static bool
sbw_email_template(const char *name, SbwEmailTemplate *tmpl)
{
	SbwOwnerScope scope;
	Datum		arg = CStringGetTextDatum(name);
	bool		found;

	sbw_owner_scope_begin(&scope);
	(void) sbw_stmt_execute(&template_stmt, &arg, NULL, true, 1, SPI_OK_SELECT);
	sbw_owner_scope_end(&scope);
	found = (SPI_processed == 1);
	if (found)
	{
		tmpl->subject = sbw_spi_text(0, 1);
		tmpl->body_text = sbw_spi_text(0, 2);
		tmpl->body_html = sbw_spi_text(0, 3);
	}
	return found;
}

/* The context the template is filled from (email_context()). */
static Jsonb *
sbw_email_context(HeapTupleHeader row, SbwEmailRoute *route)
{
	Datum		args[3];
	bool		isnull;
	Datum		d;

	args[0] = PointerGetDatum(row);
	args[1] = CStringGetTextDatum(route->template);
	args[2] = route->resource_id;
	sbw_email_exec(&context_plan, HeapTupleHeaderGetTypeId(row), args, NULL);
	if (SPI_processed != 1)
		elog(ERROR, "email plugin: storyboard_worker.email_context() returned no row");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		elog(ERROR, "email plugin: storyboard_worker.email_context() returned NULL");
	return DatumGetJsonbPCopy(d);
}

/* A string value of the context, or NULL. */
static char *
sbw_context_text(Jsonb *ctx, const char *key)
{
	JsonbValue	k;
	JsonbValue *v;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	v = findJsonbValueFromContainer(&ctx->root, JB_FOBJECT, &k);
	if (v == NULL || v->type == jbvNull)
		return NULL;
	if (v->type == jbvString)
		return pnstrdup(v->val.string.val, v->val.string.len);
	if (v->type == jbvNumeric)
		return DatumGetCString(DirectFunctionCall1(numeric_out,
												   NumericGetDatum(v->val.numeric)));
	return NULL;
}

/*
 * Render the mail once (the templates name nothing recipient-specific) and
 * find what every recipient's row shares: the thread it replies to and the
 * story a digest lists it under.
 */
static void
sbw_email_render(SbwEmailMail *mail, SbwEmailTemplate *tmpl, Jsonb *ctx,
				 SbwEmailRoute *route)
{
	char	   *thread = sbw_context_text(ctx, "thread");
	char	   *story_id = sbw_context_text(ctx, "story_id");

	mail->kind = route->kind;
	mail->host = sbw_email_host();
	mail->subject = sbw_email_subject_line(sbw_render(tmpl->subject, ctx, false));
	mail->body_text = sbw_render(tmpl->body_text, ctx, false);
	mail->body_html = tmpl->body_html ? sbw_render(tmpl->body_html, ctx, true) : NULL;
	mail->in_reply_to = thread ? psprintf("<storyboard.%s@%s>", thread, mail->host) : NULL;
	mail->has_story_id = (story_id != NULL && strcmp(route->kind, "worklist") != 0);
	mail->story_id = mail->has_story_id ?
		DirectFunctionCall1(int8in, CStringGetDatum(story_id)) : (Datum) 0;
	mail->story_title = sbw_context_text(ctx, "story_title");
	if (mail->story_title == NULL && strcmp(route->kind, "story") == 0)
		mail->story_title = sbw_context_text(ctx, "title");
}

/* A Message-ID no other mail has: random, with the recipient's id. */
static char *
sbw_email_message_id(int64 user_id, const char *host)
{
	uint8		rnd[16];
	char		hex[33];
	int			i;

	if (!pg_strong_random(rnd, sizeof(rnd)))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random bytes for a Message-ID")));
	for (i = 0; i < 16; i++)
		sprintf(hex + 2 * i, "%02x", rnd[i]);
	return psprintf("<storyboard.%s." INT64_FORMAT "@%s>", hex, user_id, host);
}

/* A text argument, or a NULL one. */
static void
sbw_text_arg(Datum *values, char *nulls, int i, const char *s)
{
	values[i] = s ? CStringGetTextDatum(s) : (Datum) 0;
	nulls[i] = s ? ' ' : 'n';
}

/* A one-dimensional array of n values of a type. */
static Datum
sbw_array(Datum *elems, bool *isnull, int n, Oid type)
{
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int16		typlen;
	bool		typbyval;
	char		typalign;

	get_typlenbyvalalign(type, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(elems, isnull, 1, dims, lbs, type,
											  typlen, typbyval, typalign));
}

/*
 * One outbox row per recipient (the rows of the recipients query, kept in
 * 'rcpt'): pending, or waiting for the recipient's digest.  Written as the
 * extension's owner, in one statement.
 */
static int
sbw_email_queue(SbwEmailMail *mail, SPITupleTable *rcpt, uint64 n)
{
	SbwOwnerScope scope;
	Datum	   *col[6];
	bool	   *colnull[6];
	Oid			coltype[6] = {INT8OID, TEXTOID, TEXTOID, TEXTOID, INT4OID, TEXTOID};
	Datum		v[13];
	char		nulls[13];
	uint64		i;
	int			c;

	for (c = 0; c < 6; c++)
	{
		col[c] = palloc0(sizeof(Datum) * n);
		colnull[c] = palloc0(sizeof(bool) * n);
	}
	for (i = 0; i < n; i++)
	{
		HeapTuple	tup = rcpt->vals[i];
		TupleDesc	desc = rcpt->tupdesc;
		bool		isnull;
		bool		digest;

		col[0][i] = SPI_getbinval(tup, desc, 1, &colnull[0][i]);
		col[1][i] = SPI_getbinval(tup, desc, 2, &colnull[1][i]);
		col[2][i] = SPI_getbinval(tup, desc, 3, &colnull[2][i]);
		col[3][i] = CStringGetTextDatum(sbw_email_message_id(colnull[0][i] ? 0 :
															 DatumGetInt64(col[0][i]),
															 mail->host));
		col[4][i] = SPI_getbinval(tup, desc, 5, &colnull[4][i]);
		digest = DatumGetBool(SPI_getbinval(tup, desc, 4, &isnull)) && !isnull;
		col[5][i] = CStringGetTextDatum(digest ? "digest" : "pending");
	}
	memset(nulls, ' ', sizeof(nulls));
	v[0] = sbw_array(col[0], colnull[0], n, coltype[0]);
	v[1] = sbw_array(col[1], colnull[1], n, coltype[1]);
	v[2] = sbw_array(col[2], colnull[2], n, coltype[2]);
	v[6] = sbw_array(col[3], colnull[3], n, coltype[3]);
	v[11] = sbw_array(col[4], colnull[4], n, coltype[4]);
	v[12] = sbw_array(col[5], colnull[5], n, coltype[5]);
	sbw_text_arg(v, nulls, 3, mail->subject);
	sbw_text_arg(v, nulls, 4, mail->body_text);
	sbw_text_arg(v, nulls, 5, mail->body_html);
	sbw_text_arg(v, nulls, 7, mail->in_reply_to);
	sbw_text_arg(v, nulls, 8, mail->kind);
	v[9] = mail->story_id;
	nulls[9] = mail->has_story_id ? ' ' : 'n';
	sbw_text_arg(v, nulls, 10, mail->story_title);

	sbw_owner_scope_begin(&scope);
	(void) sbw_stmt_execute(&outbox_stmt, v, nulls, false, 0, SPI_OK_INSERT);
	sbw_owner_scope_end(&scope);
	return (int) n;
}

/*
 * Who receives the mail (email_recipients()); the rows stay in the
 * returned table until SPI_finish.
 */
static SPITupleTable *
sbw_email_recipients(SbwEmailRoute *route, Oid event_type, uint64 *n)
{
	Datum		args[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};

	args[0] = CStringGetTextDatum(route->resource);
	args[1] = route->resource_id;
	args[2] = route->story_id;
	nulls[2] = route->story_id_null ? 'n' : ' ';
	args[3] = route->project_id;
	nulls[3] = route->project_id_null ? 'n' : ' ';
	args[4] = route->story_private;
	nulls[4] = route->story_private_null ? 'n' : ' ';
	sbw_email_exec(&recipients_plan, event_type, args, nulls);
	*n = SPI_processed;
	return SPI_tuptable;
}

/* The handler's work, SPI connected, under the plugin's search_path. */
static void
sbw_email_event(HeapTupleHeader row)
{
	SbwEmailRoute route;
	SbwEmailTemplate tmpl;
	SbwEmailMail mail;
	SPITupleTable *rcpt;
	uint64		n;
	Jsonb	   *ctx;

	if (!sbw_email_route(row, &route))
		return;
	rcpt = sbw_email_recipients(&route, HeapTupleHeaderGetTypeId(row), &n);
	if (n == 0)
		return;
	if (!sbw_email_template(route.template, &tmpl))
	{
		elog(DEBUG1, "email plugin: no template \"%s\"; no mail", route.template);
		return;
	}
	ctx = sbw_email_context(row, &route);
	memset(&mail, 0, sizeof(mail));
	sbw_email_render(&mail, &tmpl, ctx, &route);
	if (sbw_email_queue(&mail, rcpt, n) > 0)
		sbw_wake_at_commit(SBW_WAKE_MAILER);
}

/*
 * storyboard_worker.email_handler(event storyboard_worker.event)
 *
 * Called by the dispatcher as the plugin role inside the event's
 * subtransaction: an error rolls back every row it queued, and the
 * dispatcher keeps the event as a dead letter (or retries it, SB001).
 */
Datum
sbw_email_handler(PG_FUNCTION_ARGS)
{
	HeapTupleHeader row = PG_GETARG_HEAPTUPLEHEADER(0);
	char	   *path;
	int			nestlevel;

	sbw_require_current_version();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "email plugin: SPI_connect failed");
	path = sbw_email_search_path();
	nestlevel = sbw_search_path_begin(path);
	pfree(path);

	/*
	 * Generic plans for the SQL functions' statements too: their custom
	 * plans (PL/pgSQL's first choice, and kept while they look cheaper)
	 * are planned again at every event, which cost more than running them.
	 */
	(void) set_config_option("plan_cache_mode", "force_generic_plan",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	sbw_email_event(row);
	sbw_search_path_end(nestlevel);
	SPI_finish();
	PG_RETURN_VOID();
}

/* storyboard_worker.email_host(): the host name mails carry (digests too). */
Datum
sbw_email_host_sql(PG_FUNCTION_ARGS)
{
	sbw_require_current_version();
	PG_RETURN_TEXT_P(cstring_to_text(sbw_email_host()));
}

/* storyboard_worker.email_enabled(): storyboard_worker.email_enable. */
Datum
sbw_email_enabled(PG_FUNCTION_ARGS)
{
	sbw_require_current_version();
	PG_RETURN_BOOL(sbw_email_enable);
}
