/*-------------------------------------------------------------------------
 *
 * namecache.h
 *		When to look names up again (namecache.c).
 *
 * Code that resolves StoryBoard's tables through search_path (the author
 * lookup, the subscription plugin) keeps what it found, and asks here
 * whether that may have changed: after DDL on any relation or schema, or
 * when the search_path differs from the one the names were resolved with.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_NAMECACHE_H
#define SBW_NAMECACHE_H

typedef struct SbwNameCache
{
	MemoryContext cxt;			/* holds path; reset on refresh */
	void	   *path;			/* the search_path at resolution */
	uint64		generation;		/* sbw_catalog_generation() then */
} SbwNameCache;

/* Must names resolved under this cache be looked up again? */
extern bool sbw_name_cache_stale(SbwNameCache *nc);

/*
 * The names are about to be looked up again: remember the current path and
 * generation.  Called before the lookups, so that an invalidation arriving
 * during them makes the cache stale again.
 */
extern void sbw_name_cache_refresh(SbwNameCache *nc);

#endif							/* SBW_NAMECACHE_H */
