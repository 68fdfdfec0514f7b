/*-------------------------------------------------------------------------
 *
 * render.c
 *		Email templates: {{ name }} placeholders filled from a jsonb object.
 *
 * StoryBoard's templates are Jinja2, but all they do is print fields:
 * where they loop (the fields an update changed, a story's tags, a
 * worklist card), the context (storyboard_worker.email_context()) gives
 * the finished text.  So the template "language" is substitution only, and
 * an operator's template can never run code or reach anything the context
 * does not hold.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "extension.h"
#include "render.h"
#include "util.h"

PG_FUNCTION_INFO_V1(sbw_render_template);

/* The longest placeholder name looked at. */
#define SBW_MAX_NAME	128

/* HTML's special characters and their entities. */
static const char sbw_html_special[] = "&<>\"'";
static const char *const sbw_html_entities[] = {"&amp;", "&lt;", "&gt;", "&quot;", "&#39;"};

/* Append s, escaped for HTML when asked. */
static void
sbw_append_value(StringInfo out, const char *s, int len, bool html)
{
	int			i;

	if (!html)
	{
		appendBinaryStringInfo(out, s, len);
		return;
	}
	for (i = 0; i < len; i++)
	{
		const char *entity = sbw_escape_of((unsigned char) s[i], sbw_html_special,
										   sbw_html_entities);

		if (entity)
			appendStringInfoString(out, entity);
		else
			appendStringInfoChar(out, s[i]);
	}
}

/*
 * Look a dotted name up in the context; false if some part is missing or
 * not an object.
 */
static bool
sbw_lookup(Jsonb *context, const char *name, JsonbValue *result)
{
	JsonbContainer *container = &context->root;
	const char *part = name;

	for (;;)
	{
		const char *dot = strchr(part, '.');
		int			len = dot ? (int) (dot - part) : (int) strlen(part);

		if (!JsonContainerIsObject(container) ||
			getKeyJsonValueFromContainer(container, part, len, result) == NULL)
			return false;
		if (dot == NULL)
			return true;
		if (result->type != jbvBinary)
			return false;
		container = result->val.binary.data;
		part = dot + 1;
	}
}

/* Append the text of a JSON value: strings as they are, null as nothing. */
static void
sbw_append_json(StringInfo out, JsonbValue *v, bool html)
{
	char	   *s;

	switch (v->type)
	{
		case jbvNull:
			return;
		case jbvString:
			sbw_append_value(out, v->val.string.val, v->val.string.len, html);
			return;
		case jbvNumeric:
			s = DatumGetCString(DirectFunctionCall1(numeric_out,
													NumericGetDatum(v->val.numeric)));
			break;
		case jbvBool:
			s = v->val.boolean ? "true" : "false";
			break;
		case jbvBinary:
			s = JsonbToCString(NULL, v->val.binary.data, v->val.binary.len);
			break;
		default:
			return;
	}
	sbw_append_value(out, s, strlen(s), html);
}

/*
 * The name inside "{{ ... }}" starting at p (just after the braces):
 * letters, digits, '_' and '.', spaces around it allowed.  Returns the
 * position after the closing braces, or NULL if this is not a placeholder.
 */
static const char *
sbw_placeholder(const char *p, char *name)
{
	int			n = 0;

	while (*p == ' ')
		p++;
	while ((isalnum((unsigned char) *p) || *p == '_' || *p == '.') && n < SBW_MAX_NAME - 1)
		name[n++] = *p++;
	name[n] = '\0';
	while (*p == ' ')
		p++;
	if (n == 0 || p[0] != '}' || p[1] != '}')
		return NULL;
	return p + 2;
}

/* See render.h. */
char *
sbw_render(const char *tmpl, Jsonb *context, bool html)
{
	StringInfoData out;
	const char *p = tmpl;

	initStringInfo(&out);
	while (*p)
	{
		const char *open = strstr(p, "{{");
		const char *after;
		char		name[SBW_MAX_NAME];
		JsonbValue	v;

		if (open == NULL)
		{
			appendStringInfoString(&out, p);
			break;
		}
		appendBinaryStringInfo(&out, p, open - p);
		after = sbw_placeholder(open + 2, name);
		if (after == NULL)
		{
			appendStringInfoString(&out, "{{");
			p = open + 2;
			continue;
		}
		if (sbw_lookup(context, name, &v))
			sbw_append_json(&out, &v, html);
		p = after;
	}
	return out.data;
}

/*
 * storyboard_worker.render_template(template text, context jsonb,
 * html boolean DEFAULT false) RETURNS text: sbw_render from SQL (digests,
 * and operators trying their templates).
 */
Datum
sbw_render_template(PG_FUNCTION_ARGS)
{
	char	   *tmpl = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Jsonb	   *context = PG_GETARG_JSONB_P(1);
	bool		html = PG_NARGS() > 2 && !PG_ARGISNULL(2) && PG_GETARG_BOOL(2);

	sbw_require_current_version();
	if (!JB_ROOT_IS_OBJECT(context))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the context of an email template must be a JSON object")));
	PG_RETURN_TEXT_P(cstring_to_text(sbw_render(tmpl, context, html)));
}
