/*-------------------------------------------------------------------------
 *
 * plugins.h
 *		The plugin registry and its cache (plugins.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_PLUGINS_H
#define SBW_PLUGINS_H

#include "fmgr.h"
#include "nodes/pg_list.h"

typedef struct SbwPlugin
{
	char	   *name;
	Oid			handler;		/* InvalidOid = a function of it is gone */
	Oid			enabled;		/* InvalidOid = always enabled */
	Oid			handler_owner;
	Oid			enabled_owner;
	bool		reads_author;	/* it reads event.author */
	bool		resolved;		/* the FmgrInfos below are filled */
	FmgrInfo	handler_finfo;
	FmgrInfo	enabled_finfo;
} SbwPlugin;

/*
 * One load of the registry.  A dispatch pins the set it runs with, so that
 * an invalidation arriving meanwhile (a plugin's own DDL, a nested
 * process_event) cannot free the list or the FmgrInfos under it; a stale
 * set is freed when its last pin goes.
 */
typedef struct SbwPluginSet
{
	MemoryContext cxt;
	List	   *plugins;		/* of SbwPlugin *, in registration order */
	Oid			event_type;		/* storyboard_worker.event */
	Oid			ext_owner;		/* owner of the extension */
	bool		reads_author;	/* some plugin reads event.author */
	int			pins;
	bool		stale;
} SbwPluginSet;

/* Fill a plugin's FmgrInfos (in its set's context) before its first call. */
extern void sbw_plugin_resolve(SbwPlugin *p, MemoryContext cxt);

/* The current set, pinned; NULL when the extension is not installed here. */
extern SbwPluginSet *sbw_plugins_pin(void);
extern void sbw_plugins_unpin(SbwPluginSet *set);

/*
 * May code owned by 'owner' run as the plugin role?  Only if nobody but
 * the plugin role, the extension owner or a superuser can replace it.
 */
extern bool sbw_owner_trusted(Oid owner, Oid plugin_role, Oid ext_owner);

/*
 * The role plugins run as: storyboard_worker.role, or the database owner
 * when it is empty.  Raises if the named role does not exist.
 */
extern Oid	sbw_plugin_role(void);

/* Refuse callers other than the extension's owner (or a superuser). */
extern void sbw_check_owner(const char *what);

/* Bumped whenever a relation or schema may have changed. */
extern uint64 sbw_catalog_generation(void);

#endif							/* SBW_PLUGINS_H */
