/*-------------------------------------------------------------------------
 *
 * ledger.h
 *		Exactly-once effects and poison-message counting (ledger.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_LEDGER_H
#define SBW_LEDGER_H

#include "datatype/timestamp.h"
#include "utils/uuid.h"

struct SbwMessage;

/* Which of the bookkeeping tables this database's extension version has. */
typedef struct SbwLedgerTables
{
	Oid			extension;		/* the extension's OID (InvalidOid: none) */
	bool		ledger;			/* storyboard_worker.ledger (1.1) */
	bool		redeliveries;	/* storyboard_worker.redeliveries (1.2) */
} SbwLedgerTables;

/* Looked up again only after DDL; needs a transaction. */
extern SbwLedgerTables sbw_ledger_tables(void);

/* The key of a message: message_id, or a digest of routing key and body. */
extern pg_uuid_t *sbw_ledger_key(const struct SbwMessage *msg);

/* All of these need SPI connected, in the caller's transaction. */
extern bool sbw_ledger_claim(pg_uuid_t *key);
extern bool sbw_ledger_contains(pg_uuid_t *key);
extern int	sbw_ledger_count_attempt(pg_uuid_t *key, char **last_error);
extern void sbw_ledger_note_failure(pg_uuid_t *key, const char *error, bool refund);
extern void sbw_ledger_forget_attempts(pg_uuid_t *key);
extern uint64 sbw_ledger_prune(TimestampTz cutoff);

#endif							/* SBW_LEDGER_H */
