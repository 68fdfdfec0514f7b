/*-------------------------------------------------------------------------
 *
 * render.h
 *		Email templates: {{ name }} placeholders filled from a jsonb object
 *		(render.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_RENDER_H
#define SBW_RENDER_H

#include "utils/jsonb.h"

/*
 * The template with every {{ name }} (a key of the context; a dotted name
 * reads nested objects) replaced by its value: strings as they are, null
 * or a missing key as nothing, other JSON as its text.  With html, the
 * values are escaped for HTML.  Anything else is copied as it is.
 */
extern char *sbw_render(const char *tmpl, Jsonb *context, bool html);

#endif							/* SBW_RENDER_H */
