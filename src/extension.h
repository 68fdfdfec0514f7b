/*-------------------------------------------------------------------------
 *
 * extension.h
 *		The installed extension as the library sees it (extension.c): its
 *		owner, the version of its SQL objects, whether the workers may use
 *		it, and the guard every SQL-callable function runs first.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_EXTENSION_H
#define SBW_EXTENSION_H

/*
 * The owner of the extension (extoid), InvalidOid if gone.  The workers
 * write the extension's tables as a superuser: an owner who is not one
 * could attach triggers to them.
 */
extern Oid	sbw_extension_owner(Oid extoid);

/* The version of its SQL objects (pg_extension.extversion), or NULL. */
extern char *sbw_extension_version(Oid extoid);

/* Why the workers may not use the extension, or NULL if they may. */
extern const char *sbw_extension_not_ready(Oid extoid);

/*
 * ERROR (SQLSTATE 55000, with a hint to run ALTER EXTENSION ... UPDATE)
 * unless the SQL objects are the version this library was built for.
 * Called first by every SQL-callable function of the library.
 */
extern void sbw_require_current_version(void);

#endif							/* SBW_EXTENSION_H */
