/*-------------------------------------------------------------------------
 *
 * util.h
 *		Small helpers several modules share (util.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_UTIL_H
#define SBW_UTIL_H

/*
 * bytes[0..len) as text PostgreSQL can store and log: a copy when it is
 * valid in the database encoding and holds no NUL, otherwise "\x" and its
 * bytes in hex (the bytea output format), never cut short.
 */
extern char *sbw_storable_text(const char *bytes, size_t len);

/* strlcpy that never cuts a multibyte character in the middle. */
extern void sbw_strlcpy_mb(char *dst, const char *src, size_t size);

/*
 * What c becomes in an escape table: from holds the characters, to[i] the
 * text that replaces from[i].  NULL when c is not in the table (NUL never
 * is).
 */
extern const char *sbw_escape_of(int c, const char *from, const char *const *to);

#endif							/* SBW_UTIL_H */
