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

#endif							/* SBW_UTIL_H */
