/*-------------------------------------------------------------------------
 *
 * my_worker_plugin.c
 *		An example storyboard_worker plugin, written in C: the example of
 *		StoryBoard's "Event Worker Plugins" guide
 *		(doc/source/extending/plugin_worker.rst), which, for every timeline
 *		event, reads the events row and copies its event_type and event_info
 *		into subscription_events, one row per subscriber of the story.
 *
 * What a plugin gets and may do:
 *	- one argument, a storyboard_worker.event (the message's 12 keys, the
 *	  routing key, the redelivered flag and the author's users row);
 *	- it runs inside the event's transaction, in a subtransaction of its
 *	  own: raise an error and only its own work is rolled back, and the
 *	  event is kept as a dead letter for it;
 *	- raise SQLSTATE SB001 to say "not yet": storyboard_worker retries the
 *	  plugin a few times (storyboard_worker.max_retries) before giving up;
 *	- StoryBoard's tables are found through search_path, like any SQL.
 *
 * IDENTIFICATION
 *	  examples/my_worker_plugin/my_worker_plugin.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(my_worker_plugin_handle);

/*
 * storyboard_worker's "retry later" SQLSTATE (ERRCODE_SBW_RETRY_LATER in its
 * storyboard_worker.h), repeated here so that this example builds on its
 * own.
 */
#define MY_ERRCODE_RETRY_LATER	MAKE_SQLSTATE('S','B','0','0','1')

/*
 * The one statement, prepared once per backend and kept (SPI_keepplan):
 * the events row ($1), the subscribers of its story as StoryBoard's
 * subscription_get_all_subscriber_ids('story', ...) finds them (the story,
 * its tasks, their projects, those projects' groups; for a private story
 * only users granted it, directly or through a team), and one INSERT for
 * all of them.  $2 is the author's id.  It returns whether the events row
 * was found and how many rows it wrote, so that a missing row can be told
 * from a story nobody follows.
 */
static SPIPlanPtr copy_plan = NULL;

static const char *copy_sql =
"WITH ev AS MATERIALIZED ("
"    SELECT e.story_id, e.event_type, e.event_info FROM events e WHERE e.id = $1"
"), targets (target_type, target_id) AS ("
"    SELECT 'story', ev.story_id FROM ev"
"    UNION ALL SELECT 'task', t.id FROM tasks t, ev WHERE t.story_id = ev.story_id"
"    UNION ALL SELECT 'project', t.project_id FROM tasks t, ev WHERE t.story_id = ev.story_id"
"    UNION ALL SELECT 'project_group', m.project_group_id"
"      FROM project_group_mapping m JOIN tasks t ON t.project_id = m.project_id, ev"
"     WHERE t.story_id = ev.story_id"
"), subscribers AS ("
"    SELECT DISTINCT sub.user_id"
"      FROM targets tg"
"      JOIN subscriptions sub"
"        ON sub.target_id = tg.target_id AND sub.target_type::text = tg.target_type"
"      JOIN users u ON u.id = sub.user_id"
"      JOIN stories s ON s.id = (SELECT story_id FROM ev)"
"     WHERE NOT s.private"
"        OR sub.user_id IN (SELECT up.user_id FROM story_permissions sp"
"                             JOIN user_permissions up ON up.permission_id = sp.permission_id"
"                            WHERE sp.story_id = s.id"
"                           UNION"
"                           SELECT tm.user_id FROM story_permissions sp"
"                             JOIN team_permissions tp ON tp.permission_id = sp.permission_id"
"                             JOIN team_membership tm ON tm.team_id = tp.team_id"
"                            WHERE sp.story_id = s.id)"
"), ins AS ("
"    INSERT INTO subscription_events (author_id, subscriber_id, event_type, event_info, created_at)"
"    SELECT (SELECT a.id FROM users a WHERE a.id = $2), s.user_id,"
"           ev.event_type, ev.event_info, now() AT TIME ZONE 'UTC'"
"      FROM subscribers s, ev"
"    RETURNING 1"
")"
"SELECT (SELECT count(*) FROM ev), (SELECT count(*) FROM ins)";

/*
 * Prepare the statement on first use and keep it: later events only bind
 * parameters and run it.  If StoryBoard's tables are altered or dropped,
 * PostgreSQL re-plans it by itself.
 */
static SPIPlanPtr
my_get_plan(void)
{
	if (copy_plan == NULL)
	{
		Oid			argtypes[2] = {INT8OID, INT8OID};
		SPIPlanPtr	plan = SPI_prepare(copy_sql, 2, argtypes);

		if (plan == NULL)
			elog(ERROR, "my_worker_plugin: SPI_prepare failed: %s",
				 SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "my_worker_plugin: SPI_keepplan failed");
		copy_plan = plan;
	}
	return copy_plan;
}

/*
 * my_worker_plugin.handle(event storyboard_worker.event) RETURNS void
 *
 * StoryBoard's example, handle(): on a timeline_event, read the
 * TimeLineEvent by resource_id and give each subscriber of its story a
 * subscription_events row.  Everything else is ignored.
 */
Datum
my_worker_plugin_handle(PG_FUNCTION_ARGS)
{
	HeapTupleHeader event = PG_GETARG_HEAPTUPLEHEADER(0);
	bool		isnull;
	Datum		d;
	Datum		values[2];
	char		nulls[2] = {' ', ' '};
	int64		found;
	int64		written;
	int			rc;

	/* Fields of the composite are read by name. */
	d = GetAttributeByName(event, "resource", &isnull);
	if (isnull || strcmp(TextDatumGetCString(d), "timeline_event") != 0)
		PG_RETURN_VOID();

	values[0] = GetAttributeByName(event, "resource_id", &isnull);
	if (isnull)
		PG_RETURN_VOID();
	values[1] = GetAttributeByName(event, "author_id", &isnull);
	if (isnull)
		nulls[1] = 'n';

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "my_worker_plugin: SPI_connect failed");

	rc = SPI_execute_plan(my_get_plan(), values, nulls, false, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "my_worker_plugin: statement failed: %s",
			 SPI_result_code_string(rc));
	found = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										SPI_tuptable->tupdesc, 1, &isnull));
	written = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										  SPI_tuptable->tupdesc, 2, &isnull));

	/*
	 * StoryBoard publishes the message before its API transaction commits:
	 * if the row is not there yet, ask to be called again a bit later
	 * instead of losing the event.
	 */
	if (found == 0)
		ereport(ERROR,
				(errcode(MY_ERRCODE_RETRY_LATER),
				 errmsg("events row " INT64_FORMAT " is not visible yet",
						DatumGetInt64(values[0]))));

	elog(DEBUG1, "my_worker_plugin: event " INT64_FORMAT ": " INT64_FORMAT " rows",
		 DatumGetInt64(values[0]), written);

	SPI_finish();
	PG_RETURN_VOID();
}
