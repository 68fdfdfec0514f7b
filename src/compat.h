/*-------------------------------------------------------------------------
 *
 * compat.h
 *		The server API where PostgreSQL 15, 17 and 18 differ: one name for
 *		each, so that the code reads the same on all.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_COMPAT_H
#define SBW_COMPAT_H

#include "catalog/namespace.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/acl.h"

/* Is this process a background worker?  (17: a function of its own) */
#if PG_VERSION_NUM >= 170000
#define SBW_IS_BGWORKER()	AmBackgroundWorkerProcess()
#else
#define SBW_IS_BGWORKER()	IsBackgroundWorker
#endif

/* Does the role own the extension?  (16: the generic ownership check) */
#if PG_VERSION_NUM >= 160000
#include "catalog/pg_extension.h"
#define sbw_owns_extension(extoid, roleid) \
	object_ownercheck(ExtensionRelationId, (extoid), (roleid))
#else
#define sbw_owns_extension(extoid, roleid)	pg_extension_ownercheck((extoid), (roleid))
#endif

/* A saved search_path, and whether it is still the current one (17: renamed) */
#if PG_VERSION_NUM >= 170000
#define SBW_SAVED_PATH_TYPE			SearchPathMatcher
#define sbw_save_search_path(cxt)	GetSearchPathMatcher(cxt)
#define sbw_search_path_is_current(p)	SearchPathMatchesCurrentEnvironment(p)
#else
#define SBW_SAVED_PATH_TYPE			OverrideSearchPath
#define sbw_save_search_path(cxt)	GetOverrideSearchPath(cxt)
#define sbw_search_path_is_current(p)	OverrideSearchPathMatchesCurrent(p)
#endif

/* Do we hold this lock (exactly this mode)?  (17: a third argument) */
#if PG_VERSION_NUM >= 170000
#define sbw_lock_held(tag, mode)	LockHeldByMe((tag), (mode), false)
#else
#define sbw_lock_held(tag, mode)	LockHeldByMe((tag), (mode))
#endif

/*
 * A wait event set the caller frees (17: tied to no resource owner; before:
 * allocated in cxt)
 */
#if PG_VERSION_NUM >= 170000
#define sbw_create_wait_event_set(cxt, n)	CreateWaitEventSet(NULL, (n))
#else
#define sbw_create_wait_event_set(cxt, n)	CreateWaitEventSet((cxt), (n))
#endif

/*
 * PostgreSQL's JSON parser (common/jsonapi.h), used by event_decode.c: a
 * lexer over a counted UTF-8 string (17: the caller may pass the context
 * to fill, NULL to allocate one; the text is const), and semantic actions
 * that return an error code (16: before, they return nothing).
 */
#if PG_VERSION_NUM >= 170000
#define sbw_json_lex_context(json, len, need_escapes) \
	makeJsonLexContextCstringLen(NULL, (json), (len), PG_UTF8, (need_escapes))
#else
#define sbw_json_lex_context(json, len, need_escapes) \
	makeJsonLexContextCstringLen((char *) (json), (int) (len), PG_UTF8, (need_escapes))
#endif
#if PG_VERSION_NUM >= 160000
#define SBW_JSON_ACTION			JsonParseErrorType
#define SBW_JSON_ACTION_DONE	return JSON_SUCCESS
#else
#define SBW_JSON_ACTION			void
#define SBW_JSON_ACTION_DONE	return
#endif

#endif							/* SBW_COMPAT_H */
