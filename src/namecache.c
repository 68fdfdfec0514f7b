/*-------------------------------------------------------------------------
 *
 * namecache.c
 *		When to look names up again: one rule for every cached lookup.
 *
 * The rule: a name resolved through search_path stays valid until a
 * relation or schema changes anywhere (a relcache or pg_namespace
 * invalidation moves sbw_catalog_generation()) or the active search_path
 * no longer matches the one it was resolved under.  The path is kept in a
 * memory context of the cache's own, reset at each refresh, so nothing of
 * an older path (its schema list included) is left behind.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "utils/memutils.h"

#include "compat.h"
#include "plugins.h"
#include "namecache.h"

/* See namecache.h. */
bool
sbw_name_cache_stale(SbwNameCache *nc)
{
	return nc->path == NULL ||
		nc->generation != sbw_catalog_generation() ||
		!sbw_search_path_is_current((SBW_SAVED_PATH_TYPE *) nc->path);
}

/* See namecache.h. */
void
sbw_name_cache_refresh(SbwNameCache *nc)
{
	if (nc->cxt == NULL)
		nc->cxt = AllocSetContextCreate(TopMemoryContext,
										"storyboard_worker name cache",
										ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(nc->cxt);
	nc->path = sbw_save_search_path(nc->cxt);
	nc->generation = sbw_catalog_generation();
}
