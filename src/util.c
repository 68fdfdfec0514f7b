/*-------------------------------------------------------------------------
 *
 * util.c
 *		Small helpers several modules share.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "mb/pg_wchar.h"

#include "util.h"

/*
 * See util.h.  AMQP short strings (routing key, message_id) are bytes: a
 * publisher may send anything, and text columns, log lines and the stats
 * view must only ever see valid text.  The hex form keeps every byte, so
 * two different ids never become one.
 */
char *
sbw_storable_text(const char *bytes, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	char	   *out;
	size_t		i;

	if (memchr(bytes, '\0', len) == NULL &&
		pg_verify_mbstr(GetDatabaseEncoding(), bytes, (int) len, true))
		return pnstrdup(bytes, len);

	out = palloc(2 + 2 * len + 1);
	out[0] = '\\';
	out[1] = 'x';
	for (i = 0; i < len; i++)
	{
		out[2 + 2 * i] = hex[((unsigned char) bytes[i]) >> 4];
		out[3 + 2 * i] = hex[((unsigned char) bytes[i]) & 0x0f];
	}
	out[2 + 2 * len] = '\0';
	return out;
}

/*
 * See util.h.  For fixed-size buffers in shared memory (the stats view's
 * last_error), whose readers expect valid text.
 */
void
sbw_strlcpy_mb(char *dst, const char *src, size_t size)
{
	int			len;

	if (size == 0)
		return;
	len = pg_mbcliplen(src, strlen(src), (int) size - 1);
	memcpy(dst, src, len);
	dst[len] = '\0';
}

/* See util.h: one lookup for the HTML and the JSON escapes. */
const char *
sbw_escape_of(int c, const char *from, const char *const *to)
{
	const char *hit = (c > 0 && c < 256) ? strchr(from, c) : NULL;

	return hit ? to[hit - from] : NULL;
}
