/*-------------------------------------------------------------------------
 *
 * ledger.c
 *		Exactly-once effects: the ledger of processed messages.
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
 * The key is the AMQP message_id when the publisher sets one, otherwise a
 * SHA-256 digest of routing key and body (StoryBoard sets no message_id).
 * Rows older than storyboard_worker.ledger_retention are pruned by
 * consumer 0; a message redelivered after that long would run again.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/cryptohash.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "storyboard_worker.h"

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr prune_plan = NULL;

/*
 * Is the ledger table there?  An extension still at version 1.0 (library
 * updated, ALTER EXTENSION ... UPDATE not yet run) has none: the consumer
 * then works without it, as 1.0 did.
 */
bool
sbw_ledger_available(void)
{
	Oid			nspid = get_namespace_oid(SBW_SCHEMA_NAME, true);

	return OidIsValid(nspid) && OidIsValid(get_relname_relid("ledger", nspid));
}

/* The key of a message: "m:" + message_id, or "d:" + sha256(rk \0 body). */
bytea *
sbw_ledger_key(const SbwMessage *msg)
{
	bytea	   *key;

	if (msg->message_id && msg->message_id[0] != '\0')
	{
		size_t		len = strlen(msg->message_id);

		key = palloc(VARHDRSZ + 2 + len);
		SET_VARSIZE(key, VARHDRSZ + 2 + len);
		memcpy(VARDATA(key), "m:", 2);
		memcpy(VARDATA(key) + 2, msg->message_id, len);
	}
	else
	{
		pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
		const char *rk = msg->routing_key ? msg->routing_key : "";

		key = palloc(VARHDRSZ + 2 + PG_SHA256_DIGEST_LENGTH);
		SET_VARSIZE(key, VARHDRSZ + 2 + PG_SHA256_DIGEST_LENGTH);
		memcpy(VARDATA(key), "d:", 2);
		if (ctx == NULL ||
			pg_cryptohash_init(ctx) < 0 ||
			pg_cryptohash_update(ctx, (const uint8 *) rk, strlen(rk) + 1) < 0 ||
			pg_cryptohash_update(ctx, (const uint8 *) msg->body, msg->body_len) < 0 ||
			pg_cryptohash_final(ctx, (uint8 *) VARDATA(key) + 2,
								PG_SHA256_DIGEST_LENGTH) < 0)
			elog(ERROR, "could not compute SHA-256 digest of a message");
		pg_cryptohash_free(ctx);
	}
	return key;
}

/*
 * Prepare a statement once per backend and keep it (SPI_keepplan) in
 * *cache; the plancache re-validates it after DDL.  SPI must be connected.
 */
SPIPlanPtr
sbw_keep_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *types)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(sql, nargs, types);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		*cache = plan;
	}
	return *cache;
}

/*
 * Claim the message in the ledger, in the current transaction, before any
 * plugin runs; SPI must be connected.  Returns false if the key is already
 * there.  Claiming first matters when two consumers hold the same message
 * at once (the broker dropped a slow consumer for missed heartbeats and
 * redelivered its message elsewhere): the second INSERT waits on the
 * first's uncommitted row, then finds it committed (a duplicate: skip) or
 * rolled back (claimed: run).
 */
bool
sbw_ledger_claim(bytea *key)
{
	Oid			types[1] = {BYTEAOID};
	Datum		values[1] = {PointerGetDatum(key)};
	SPIPlanPtr	plan;
	int			ret;

	plan = sbw_keep_plan(&claim_plan,
						   "INSERT INTO storyboard_worker.ledger (message_key)"
						   " VALUES ($1) ON CONFLICT (message_key) DO NOTHING",
						   1, types);
	ret = SPI_execute_plan(plan, values, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "ledger insert failed: %s", SPI_result_code_string(ret));
	return SPI_processed == 1;
}

/* Delete rows older than the retention; returns how many. */
uint64
sbw_ledger_prune(int retention_s)
{
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(retention_s)};
	SPIPlanPtr	plan;
	int			ret;

	plan = sbw_keep_plan(&prune_plan,
						   "DELETE FROM storyboard_worker.ledger"
						   " WHERE processed_at < now() - make_interval(secs => $1)",
						   1, types);
	ret = SPI_execute_plan(plan, values, NULL, false, 0);
	if (ret != SPI_OK_DELETE)
		elog(ERROR, "ledger prune failed: %s", SPI_result_code_string(ret));
	return SPI_processed;
}
