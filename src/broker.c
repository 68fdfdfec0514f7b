/*-------------------------------------------------------------------------
 *
 * broker.c
 *		The broker settings as one struct: copied and compared as a whole.
 *
 * A reload must reconnect the consumers when, and only when, a setting the
 * connection was made with changed (a reconnection hands every prefetched,
 * unacknowledged delivery back to the queue).  Strings are compared by
 * value, everything else with one memcmp, so a field added to the struct
 * is covered without touching this file unless it is a string.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <stddef.h>

#include "broker.h"

/* Zeroed (padding included), then written field by field by the GUCs. */
SbwBrokerSettings sbw_broker;

/* The string fields, which must be copied and compared by value. */
static const size_t sbw_broker_strings[] = {
	offsetof(SbwBrokerSettings, host),
	offsetof(SbwBrokerSettings, user),
	offsetof(SbwBrokerSettings, password),
	offsetof(SbwBrokerSettings, vhost),
	offsetof(SbwBrokerSettings, exchange),
	offsetof(SbwBrokerSettings, queue),
	offsetof(SbwBrokerSettings, ssl_ca_file),
	offsetof(SbwBrokerSettings, ssl_cert_file),
	offsetof(SbwBrokerSettings, ssl_key_file),
};

#define SBW_FIELD(s, off)	(*(char **) ((char *) (s) + (off)))

/*
 * A copy that survives the reload which frees the GUCs' strings; memcpy,
 * not assignment, so that the padding is copied too (sbw_broker_equal).
 */
SbwBrokerSettings *
sbw_broker_copy(const SbwBrokerSettings *s)
{
	SbwBrokerSettings *c = palloc(sizeof(SbwBrokerSettings));
	int			i;

	memcpy(c, s, sizeof(SbwBrokerSettings));
	for (i = 0; i < lengthof(sbw_broker_strings); i++)
	{
		const char *v = SBW_FIELD(s, sbw_broker_strings[i]);

		SBW_FIELD(c, sbw_broker_strings[i]) = pstrdup(v ? v : "");
	}
	return c;
}

/*
 * Whether two settings would make the same connection: the strings by
 * value (NULL as ""), the rest byte for byte with the string pointers
 * blanked.
 */
bool
sbw_broker_equal(const SbwBrokerSettings *a, const SbwBrokerSettings *b)
{
	SbwBrokerSettings x;
	SbwBrokerSettings y;
	int			i;

	memcpy(&x, a, sizeof(x));
	memcpy(&y, b, sizeof(y));
	for (i = 0; i < lengthof(sbw_broker_strings); i++)
	{
		const char *u = SBW_FIELD(a, sbw_broker_strings[i]);
		const char *v = SBW_FIELD(b, sbw_broker_strings[i]);

		if (strcmp(u ? u : "", v ? v : "") != 0)
			return false;
		SBW_FIELD(&x, sbw_broker_strings[i]) = NULL;
		SBW_FIELD(&y, sbw_broker_strings[i]) = NULL;
	}
	return memcmp(&x, &y, sizeof(x)) == 0;
}
