/*-------------------------------------------------------------------------
 *
 * ledger.c
 *		Exactly-once effects, and the count of unfinished redeliveries.
 *
 * A consumer that dies (or loses its connection) after COMMIT but before
 * its basic.ack reaches the broker gets the message again, flagged
 * redelivered.  Running the plugins again would apply the event twice, so
 * every processed message leaves a row in storyboard_worker.ledger, written
 * in the event's own transaction, before its plugins run: either the
 * effects and the ledger row both committed, or neither did.  A redelivered
 * message whose key is already there is a duplicate; a first delivery whose
 * key is there is a different message with the same routing key and body
 * (StoryBoard sets no message_id) and is processed.  One index insert per
 * event.
 *
 * A message that kills its consumer (a plugin that crashes the backend) or
 * whose transaction cannot commit comes back redelivered, again and again.
 * storyboard_worker.redeliveries counts, per message, the redelivered
 * copies whose processing started: the consumer commits (and flushes) the
 * count before running the plugins, so it survives the crash it is there
 * to count, and deletes it in the transaction that finally applies the
 * event.  Only redelivered messages pay for this.
 *
 * The key is the AMQP message_id when the publisher sets one, otherwise a
 * SHA-256 digest of routing key and body (StoryBoard sets no message_id).
 * Rows older than storyboard_worker.ledger_retention are pruned by
 * consumer 0; a message redelivered after that long would run again.
 *
 * Every statement here is internal (scope.h): schema-qualified, operators
 * spelled OPERATOR(pg_catalog.x), values bound with their exact types, run
 * with search_path pg_catalog, pg_temp.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/cryptohash.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/uuid.h"

#include "plugins.h"
#include "scope.h"
#include "storyboard_worker.h"
#include "dispatch.h"
#include "ledger.h"

static SbwStmt claim_stmt = SBW_STMT(
	"INSERT INTO storyboard_worker.ledger (message_key) VALUES ($1)"
	" ON CONFLICT (message_key) DO NOTHING",
	1, UUIDOID);

static SbwStmt contains_stmt = SBW_STMT(
	"SELECT 1 FROM storyboard_worker.ledger"
	" WHERE message_key OPERATOR(pg_catalog.=) $1",
	1, UUIDOID);

static SbwStmt count_stmt = SBW_STMT(
	"WITH before AS (SELECT last_error FROM storyboard_worker.redeliveries"
	"                 WHERE message_key OPERATOR(pg_catalog.=) $1)"
	" INSERT INTO storyboard_worker.redeliveries AS r (message_key) VALUES ($1)"
	" ON CONFLICT (message_key) DO UPDATE"
	" SET attempts = r.attempts OPERATOR(pg_catalog.+) 1,"
	"     last_at = pg_catalog.now(), last_error = NULL"
	" RETURNING r.attempts, (SELECT last_error FROM before)",
	1, UUIDOID);

static SbwStmt failure_stmt = SBW_STMT(
	"INSERT INTO storyboard_worker.redeliveries AS r (message_key, attempts, last_error)"
	" VALUES ($1, 0, $2)"
	" ON CONFLICT (message_key) DO UPDATE"
	" SET last_error = EXCLUDED.last_error, last_at = pg_catalog.now(),"
	"     attempts = CASE WHEN $3 THEN pg_catalog.int4larger(r.attempts OPERATOR(pg_catalog.-) 1, 0)"
	"                     ELSE r.attempts END",
	3, UUIDOID, TEXTOID, BOOLOID);

static SbwStmt forget_stmt = SBW_STMT(
	"DELETE FROM storyboard_worker.redeliveries"
	" WHERE message_key OPERATOR(pg_catalog.=) $1",
	1, UUIDOID);

/* Both prunes in one round trip; the count returned is the ledger's. */
static SbwStmt prune_stmt = SBW_STMT(
	"WITH counts AS (DELETE FROM storyboard_worker.redeliveries"
	"                 WHERE last_at OPERATOR(pg_catalog.<) $1)"
	" DELETE FROM storyboard_worker.ledger"
	" WHERE processed_at OPERATOR(pg_catalog.<) $1",
	1, TIMESTAMPTZOID);

/*
 * Which bookkeeping tables exist?  An extension whose SQL objects are older
 * than the library (ALTER EXTENSION ... UPDATE not yet run) lacks some: the
 * consumer then works without them, as that version did.  Looked up again
 * only after DDL, not for every batch.
 */
SbwLedgerTables
sbw_ledger_tables(void)
{
	static uint64 generation = 0;
	static SbwLedgerTables tables;

	if (generation != sbw_catalog_generation())
	{
		Oid			nspid = get_namespace_oid(SBW_SCHEMA_NAME, true);

		tables.extension = get_extension_oid(SBW_EXTENSION_NAME, true);
		tables.ledger = OidIsValid(nspid) &&
			OidIsValid(get_relname_relid("ledger", nspid));
		tables.redeliveries = OidIsValid(nspid) &&
			OidIsValid(get_relname_relid("redeliveries", nspid));
		generation = sbw_catalog_generation();
	}
	return tables;
}

/*
 * The key of a message, 16 bytes: the first half of the SHA-256 digest of
 * "m:" and the message_id (all its bytes, NULs included), or of the routing
 * key, a NUL and the body, plus the announced length for a body cut short
 * at max_message_bytes (two long bodies that differ only after the cut are
 * still two messages, as far as the length tells).  A uuid column holds it:
 * a fixed-width index key, compared as two words.
 */
pg_uuid_t *
sbw_ledger_key(const SbwMessage *msg)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	pg_uuid_t  *key = palloc(sizeof(pg_uuid_t));
	bool		ok;

	ok = ctx != NULL && pg_cryptohash_init(ctx) == 0;
	if (ok && msg->message_id_len > 0)
		ok = pg_cryptohash_update(ctx, (const uint8 *) "m:", 2) == 0 &&
			pg_cryptohash_update(ctx, (const uint8 *) msg->message_id_raw,
								 msg->message_id_len) == 0;
	else if (ok)
	{
		const char *rk = msg->routing_key ? msg->routing_key : "";

		ok = pg_cryptohash_update(ctx, (const uint8 *) rk, strlen(rk) + 1) == 0 &&
			pg_cryptohash_update(ctx, (const uint8 *) msg->body, msg->body_len) == 0 &&
			(msg->body_declared_len <= msg->body_len ||
			 pg_cryptohash_update(ctx, (const uint8 *) &msg->body_declared_len,
								  sizeof(msg->body_declared_len)) == 0);
	}
	if (!ok || pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not compute SHA-256 digest of a message");
	pg_cryptohash_free(ctx);
	memcpy(key->data, digest, UUID_LEN);
	return key;
}

/*
 * Claim the message in the ledger, in the current transaction, before any
 * plugin runs.  Returns false if the key is already there.  Claiming first
 * matters when two consumers hold the same message at once (the broker
 * dropped a slow consumer for missed heartbeats and redelivered its message
 * elsewhere): the second INSERT waits on the first's uncommitted row, then
 * finds it committed (a duplicate: skip) or rolled back (claimed: run).
 */
bool
sbw_ledger_claim(pg_uuid_t *key)
{
	Datum		values[1] = {UUIDPGetDatum(key)};

	(void) sbw_stmt_execute(&claim_stmt, values, NULL, false, 0, SPI_OK_INSERT);
	return SPI_processed == 1;
}

/* Was this message processed already (committed, or claimed by us)? */
bool
sbw_ledger_contains(pg_uuid_t *key)
{
	Datum		values[1] = {UUIDPGetDatum(key)};

	(void) sbw_stmt_execute(&contains_stmt, values, NULL, true, 1, SPI_OK_SELECT);
	return SPI_processed > 0;
}

/*
 * Count one more started attempt of a redelivered message; returns the
 * count, this attempt included, and in *last_error why the previous attempt
 * failed (NULL if it crashed, or none was recorded).  The caller commits and
 * flushes it before running any plugin.
 */
int
sbw_ledger_count_attempt(pg_uuid_t *key, char **last_error)
{
	Datum		values[1] = {UUIDPGetDatum(key)};
	bool		isnull;

	(void) sbw_stmt_execute(&count_stmt, values, NULL, false, 0,
							SPI_OK_INSERT_RETURNING);
	if (SPI_processed != 1)
		elog(ERROR, "redelivery count returned %llu rows",
			 (unsigned long long) SPI_processed);
	*last_error = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	return DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Remember why a message's transaction failed, for the dead letter it may
 * become; a first delivery gets a row with no attempt counted yet.  With
 * 'refund', the attempt just counted is taken back: the failure was the
 * database's (a privilege, a missing role, no disk), not the message's.
 */
void
sbw_ledger_note_failure(pg_uuid_t *key, const char *error, bool refund)
{
	Datum		values[3] = {UUIDPGetDatum(key), CStringGetTextDatum(error),
	BoolGetDatum(refund)};

	(void) sbw_stmt_execute(&failure_stmt, values, NULL, false, 0, SPI_OK_INSERT);
}

/* The message is applied (or dead-lettered) at last: drop its count. */
void
sbw_ledger_forget_attempts(pg_uuid_t *key)
{
	Datum		values[1] = {UUIDPGetDatum(key)};

	(void) sbw_stmt_execute(&forget_stmt, values, NULL, false, 0, SPI_OK_DELETE);
}

/*
 * Delete ledger rows processed before the cutoff, and counts of messages
 * last seen before it (they never came back); returns how many ledger rows
 * went.  The cutoff is computed by the caller, in C: no interval
 * arithmetic is resolved in SQL.
 */
uint64
sbw_ledger_prune(TimestampTz cutoff)
{
	Datum		values[1] = {TimestampTzGetDatum(cutoff)};
	SbwLedgerTables tables = sbw_ledger_tables();

	/* both tables exist whenever a consumer runs: it waits for the update */
	if (!tables.ledger || !tables.redeliveries)
		return 0;
	(void) sbw_stmt_execute(&prune_stmt, values, NULL, false, 0, SPI_OK_DELETE);
	return SPI_processed;
}
