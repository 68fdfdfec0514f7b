/*-------------------------------------------------------------------------
 *
 * subscription.c
 *		The built-in "subscription" plugin: StoryBoard's
 *		storyboard.plugin.subscription.base:Subscription, in set-based SQL.
 *
 * For every event StoryBoard's plugin does at most three things (reference
 * section 5.1):
 *
 *	timeline_event	one subscription_events row per subscriber of the story
 *					(expanded through its tasks, their projects and those
 *					projects' groups, section 5.2) and/or of the worklist,
 *					skipping users who may not see the event;
 *	project_group	one row per subscriber of the group when a project is
 *					added to or removed from it, or when it is deleted;
 *	DELETE			of a top-level story, task or project group: remove the
 *					subscriptions to it.
 *
 * Each of these is one prepared statement, kept across events
 * (SPI_keepplan): subscriber resolution, visibility and the INSERT ...
 * SELECT happen in a single statement, whatever the number of subscribers.
 * The one extra statement is for user_comment events, whose event_info
 * StoryBoard builds from the comment with Python's json.dumps; that text is
 * built here in C, byte for byte as Python would print it.
 *
 * Each statement is a constant SQL text below (sbw_timeline_sql,
 * sbw_comment_sql, sbw_project_group_sql, sbw_deletion_sql) with its
 * parameters and their types listed above it: it can be copied into PREPARE
 * and EXPLAIN EXECUTE as it is (README, "The subscription plugin's
 * statements"), and is logged at DEBUG1 whenever it is prepared.
 *
 * StoryBoard's tables are found through search_path: nothing here names a
 * schema, and the extension creates none of them.  A missing table is
 * reported by name before anything is prepared.
 *
 * Where StoryBoard raises or silently drops, this plugin does better; each
 * such place is marked "Differs from StoryBoard" below and listed in the
 * README:
 *	- an unknown or NULL author gives author_id NULL (StoryBoard:
 *	  AttributeError on author.id);
 *	- a private story with no permission row has no subscribers
 *	  (StoryBoard: IndexError on story.permissions[0]), and members of teams
 *	  granted the story are subscribers too (StoryBoard: only the users of
 *	  its first permission);
 *	- a timeline_event whose events row is not visible yet (StoryBoard
 *	  publishes before its API transaction commits) raises
 *	  ERRCODE_SBW_RETRY_LATER so that the dispatcher retries it and finally
 *	  keeps it as a dead letter (StoryBoard: silently skipped);
 *	- subscriptions whose user_id names no users row are ignored
 *	  (StoryBoard: AttributeError for timeline events);
 *	- a DELETE removes subscriptions whose target_type is exactly the
 *	  resource (StoryBoard: target_type LIKE '%<resource minus its last
 *	  letter>%', so a project DELETE would also hit project_group
 *	  subscriptions).
 *
 * IDENTIFICATION
 *	  src/subscription.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "namecache.h"
#include "scope.h"
#include "storyboard_worker.h"
#include "util.h"
#include "event_decode.h"
#include "extension.h"

PG_FUNCTION_INFO_V1(sbw_subscription_handler);

/* The fields of storyboard_worker.event this plugin looks at. */
typedef struct SbwSubEvent
{
	SbwEvent	msg;			/* method, resource, sub_resource, ids */
	Jsonb	   *resource_after;
} SbwSubEvent;

/*
 * A statement prepared once and kept for the life of the backend, together
 * with the StoryBoard tables it uses.  Their OIDs, as found through
 * search_path when the plan was prepared, are remembered: if a lookup finds
 * other relations (tables recreated, another search_path), the plan is
 * prepared again under a search_path made of those tables' schemas.  The
 * names are looked up again only after DDL (sbw_catalog_generation() moved)
 * or when the search_path differs, not for every event.
 *
 * The text never changes.  For the statements that write
 * subscription_events, the type of its created_at column chooses the type
 * of the created_at parameter (and a table without the column the
 * sql_no_created_at text), so a change of that column prepares them again
 * too.
 */
#define SBW_SUB_MAX_TABLES	24
#define SBW_SUB_MAX_ARGS	7

typedef struct SbwSubPlan
{
	const char *name;
	const char *const *tables;	/* NULL-terminated */
	const char *sql;
	const char *sql_no_created_at;	/* NULL: does not write created_at */
	int			nargs;			/* created_at, if any, is the last */
	Oid			argtypes[SBW_SUB_MAX_ARGS];
	SPIPlanPtr	plan;
	Oid			relids[SBW_SUB_MAX_TABLES];
	Oid			created_at_type;	/* sbw_created_at_type() when prepared */
	SbwNameCache names;			/* when to look the tables up again */
	char	   *exec_path;		/* search_path the plan runs under */
} SbwSubPlan;

/*
 * The timeline_event statement, up to the rows to insert ("notify").  The
 * INSERT follows it in sbw_timeline_sql, the one text to read; the other
 * text differs only for a subscription_events table without created_at.
 *
 * Parameters (as PREPARE would declare them):
 *	$1 bigint		events.id: resource_after.id, else the message's
 *					resource_id
 *	$2 bigint		resource_after.story_id, NULL if none
 *	$3 bigint		resource_after.worklist_id, NULL if none
 *	$4 text			resource_after.event_type
 *	$5 text			event_info: resource_after.event_info, or for
 *					user_comment the JSON built by sbw_comment_event_info()
 *	$6 bigint		the message's author_id, NULL if none
 *	$7 timestamp	created_at: the transaction's start as UTC wall-clock
 *					time, i.e. now() AT TIME ZONE 'UTC'; of type timestamptz,
 *					and now(), when subscription_events.created_at is
 *					timestamptz
 * It returns one row: events_rows, 1 if the events row is visible to this
 * transaction and 0 if not, and inserted, the number of subscription_events
 * rows written.  README, "The subscription plugin's statements", says how
 * to PREPARE and EXPLAIN it.
 *
 * What each part reproduces of StoryBoard:
 *
 * story_viewers, worklist_viewers, board_viewers: who may see a private
 * story, worklist or board (filter_private_stories() and friends).  A
 * permission attached to the story (any codename) granted to the user
 * directly (user_permissions) or to a team the user belongs to
 * (team_permissions, team_membership); worklists and boards look at
 * user_permissions only, as StoryBoard grants them to users, never to
 * teams.  NOT MATERIALIZED: each use below is planned as its own indexed
 * lookup for one (object, user) pair.
 *
 * story_targets, story_subscribers: subscription_get_all_subscriber_ids
 * ('story', $2), section 5.2: subscribers of the story, of its tasks, of
 * those tasks' projects and of those projects' groups; if the story is
 * private, only users who may see it.  Differs from StoryBoard, whose
 * whitelist is the users of story.permissions[0] only (no team members, and
 * IndexError when the story has no permission), and which raises when the
 * story row is missing (here: nobody).  target_type is compared as text:
 * StoryBoard's migrations make it a PostgreSQL enum, which may lack
 * 'worklist' on an old schema, and a text comparison works for enum,
 * varchar and text columns alike.
 *
 * recipients: the story's subscribers, and the worklist's.  Both branches
 * run when both ids are set, and a user in both gets two rows, as with
 * StoryBoard's two handle_timeline_events() calls.
 *
 * notify: author_id is the author's users row id, NULL when there is none
 * (differs from StoryBoard, where author.id raises for an unknown author).
 * Then, per recipient, what handle_timeline_events() checks:
 *	- the users row exists (differs from StoryBoard, which raises for a
 *	  subscription whose user_id names no user, losing the whole event);
 *	- for an event with a worklist_id, the preference
 *	  receive_notifications_worklists casts to the string 'true'
 *	  (UserPreference.cast_value: type 'bool' gives a Python bool, never
 *	  equal to 'true'; 'int' and 'float' fail to cast 'true' and give the
 *	  raw value back; the newest row wins if a key is duplicated);
 *	- events_api.event_get(id, current_user): the story, worklist (lists,
 *	  then lanes: hide_lanes=False) and board filters applied to the events
 *	  row;
 *	- events_api.is_visible(): for worklist_contents events, the story or
 *	  task the change is about (item: updated.old, else removed, else added)
 *	  must be visible too.
 */
#define SBW_TIMELINE_NOTIFY \
"WITH ev AS MATERIALIZED (\n" \
"  SELECT e.id, e.story_id, e.worklist_id, e.board_id,\n" \
"         CASE WHEN strpos(e.event_type::text, 'worklist_contents') > 0\n" \
"              THEN e.event_info::jsonb END AS contents\n" \
"    FROM events e\n" \
"   WHERE e.id = $1\n" \
"),\n" \
"item AS MATERIALIZED (\n" \
"  SELECT x.info->>'item_type' AS item_type, (x.info->>'item_id')::bigint AS item_id\n" \
"    FROM ev, LATERAL (SELECT CASE\n" \
"      WHEN nullif(ev.contents->'updated', 'null') IS NOT NULL THEN ev.contents->'updated'->'old'\n" \
"      WHEN nullif(ev.contents->'removed', 'null') IS NOT NULL THEN ev.contents->'removed'\n" \
"      ELSE nullif(ev.contents->'added', 'null') END AS info) x\n" \
"),\n" \
"story_viewers (story_id, user_id) AS NOT MATERIALIZED (\n" \
"  SELECT sp.story_id, up.user_id\n" \
"    FROM story_permissions sp\n" \
"    JOIN permissions p ON p.id = sp.permission_id\n" \
"    JOIN user_permissions up ON up.permission_id = p.id\n" \
"  UNION ALL\n" \
"  SELECT sp.story_id, ms.user_id\n" \
"    FROM story_permissions sp\n" \
"    JOIN permissions p ON p.id = sp.permission_id\n" \
"    JOIN team_permissions tp ON tp.permission_id = p.id\n" \
"    JOIN teams tm ON tm.id = tp.team_id\n" \
"    JOIN team_membership ms ON ms.team_id = tm.id\n" \
"),\n" \
"worklist_viewers (worklist_id, user_id) AS NOT MATERIALIZED (\n" \
"  SELECT wp.worklist_id, up.user_id\n" \
"    FROM worklist_permissions wp\n" \
"    JOIN permissions p ON p.id = wp.permission_id\n" \
"    JOIN user_permissions up ON up.permission_id = p.id\n" \
"),\n" \
"board_viewers (board_id, user_id) AS NOT MATERIALIZED (\n" \
"  SELECT bp.board_id, up.user_id\n" \
"    FROM board_permissions bp\n" \
"    JOIN permissions p ON p.id = bp.permission_id\n" \
"    JOIN user_permissions up ON up.permission_id = p.id\n" \
"),\n" \
"story_targets (target_type, target_id) AS (\n" \
"  SELECT 'story'::text, $2\n" \
"  UNION ALL\n" \
"  SELECT 'task', t.id FROM tasks t WHERE t.story_id = $2\n" \
"  UNION ALL\n" \
"  SELECT DISTINCT 'project', t.project_id FROM tasks t\n" \
"   WHERE t.story_id = $2 AND t.project_id IS NOT NULL\n" \
"  UNION ALL\n" \
"  SELECT DISTINCT 'project_group', m.project_group_id\n" \
"    FROM project_group_mapping m\n" \
"   WHERE m.project_id IN (SELECT t.project_id FROM tasks t WHERE t.story_id = $2)\n" \
"),\n" \
"story_subscribers AS (\n" \
"  SELECT DISTINCT sub.user_id\n" \
"    FROM stories s\n" \
"    CROSS JOIN story_targets tg\n" \
"    JOIN subscriptions sub\n" \
"      ON sub.target_id = tg.target_id AND sub.target_type::text = tg.target_type\n" \
"   WHERE s.id = $2\n" \
"     AND (s.private IS NOT TRUE\n" \
"          OR EXISTS (SELECT 1 FROM story_viewers v\n" \
"                      WHERE v.story_id = s.id AND v.user_id = sub.user_id))\n" \
"),\n" \
"recipients AS (\n" \
"  SELECT user_id FROM story_subscribers\n" \
"  UNION ALL\n" \
"  (SELECT DISTINCT sub.user_id FROM subscriptions sub\n" \
"    WHERE $3 IS NOT NULL AND sub.target_type::text = 'worklist'\n" \
"      AND sub.target_id = $3)\n" \
"),\n" \
"notify AS (\n" \
"  SELECT (SELECT a.id FROM users a WHERE a.id = $6) AS author_id,\n" \
"         u.id AS subscriber_id, $4 AS event_type, $5 AS event_info\n" \
"    FROM recipients r\n" \
"    JOIN users u ON u.id = r.user_id\n" \
"    CROSS JOIN ev\n" \
"    CROSS JOIN item\n" \
"    LEFT JOIN stories es ON es.id = ev.story_id\n" \
"    LEFT JOIN worklists ew ON ew.id = ev.worklist_id\n" \
"    LEFT JOIN boards eb ON eb.id = ev.board_id\n" \
"   WHERE ($3 IS NULL OR\n" \
"          (SELECT pr.value = 'true' AND pr.type::text <> 'bool'\n" \
"             FROM user_preferences pr\n" \
"            WHERE pr.user_id = u.id AND pr.key = 'receive_notifications_worklists'\n" \
"            ORDER BY pr.id DESC LIMIT 1))\n" \
"     AND (es.id IS NULL OR es.private = false\n" \
"          OR (es.private = true AND EXISTS (SELECT 1 FROM story_viewers v\n" \
"                                             WHERE v.story_id = es.id AND v.user_id = u.id)))\n" \
"     AND (((NOT EXISTS (SELECT 1 FROM board_worklists bw WHERE bw.list_id = ew.id)\n" \
"            OR EXISTS (SELECT 1 FROM board_worklists bw\n" \
"                        WHERE bw.list_id = ew.id AND bw.board_id IS NULL))\n" \
"           AND (ew.id IS NULL OR ew.private = false\n" \
"                OR (ew.private = true AND EXISTS (SELECT 1 FROM worklist_viewers v\n" \
"                                                   WHERE v.worklist_id = ew.id AND v.user_id = u.id))))\n" \
"          OR EXISTS (SELECT 1 FROM board_worklists bw\n" \
"                       JOIN boards b ON b.id = bw.board_id\n" \
"                      WHERE bw.list_id = ew.id\n" \
"                        AND (b.private = false\n" \
"                             OR (b.private = true AND EXISTS (SELECT 1 FROM board_viewers v\n" \
"                                                               WHERE v.board_id = b.id AND v.user_id = u.id)))))\n" \
"     AND (eb.id IS NULL OR eb.private = false\n" \
"          OR (eb.private = true AND EXISTS (SELECT 1 FROM board_viewers v\n" \
"                                             WHERE v.board_id = eb.id AND v.user_id = u.id)))\n" \
"     AND (item.item_type IS DISTINCT FROM 'story'\n" \
"          OR EXISTS (SELECT 1 FROM stories s2\n" \
"                      WHERE s2.id = item.item_id\n" \
"                        AND (s2.private = false\n" \
"                             OR (s2.private = true AND EXISTS (SELECT 1 FROM story_viewers v\n" \
"                                                                WHERE v.story_id = s2.id AND v.user_id = u.id)))))\n" \
"     AND (item.item_type IS DISTINCT FROM 'task'\n" \
"          OR EXISTS (SELECT 1 FROM tasks t2 LEFT JOIN stories s3 ON s3.id = t2.story_id\n" \
"                      WHERE t2.id = item.item_id\n" \
"                        AND (s3.id IS NULL OR s3.private = false\n" \
"                             OR (s3.private = true AND EXISTS (SELECT 1 FROM story_viewers v\n" \
"                                                                WHERE v.story_id = s3.id AND v.user_id = u.id)))))\n" \
"),\n"

static const char sbw_timeline_sql[] = SBW_TIMELINE_NOTIFY
"ins AS (\n"
"  INSERT INTO subscription_events (author_id, subscriber_id, event_type, event_info, created_at)\n"
"  SELECT author_id, subscriber_id, event_type, event_info, $7 FROM notify\n"
"  RETURNING 1\n"
")\n"
"SELECT (SELECT count(*) FROM ev) AS events_rows, (SELECT count(*) FROM ins) AS inserted";

static const char sbw_timeline_sql_no_created_at[] = SBW_TIMELINE_NOTIFY
"ins AS (\n"
"  INSERT INTO subscription_events (author_id, subscriber_id, event_type, event_info)\n"
"  SELECT author_id, subscriber_id, event_type, event_info FROM notify\n"
"  RETURNING 1\n"
")\n"
"SELECT (SELECT count(*) FROM ev) AS events_rows, (SELECT count(*) FROM ins) AS inserted";

/*
 * resolve_comments() for a user_comment event, and whether the events row
 * is visible, read under one snapshot.  $1 bigint events.id, $2 bigint the
 * comment id (resource_after.comment_id).  StoryBoard takes the story from
 * the first events row that names the comment (first by id here) and
 * returns None if the comment, that row or the story is missing.
 */
static const char sbw_comment_sql[] =
"SELECT EXISTS (SELECT 1 FROM events WHERE id = $1) AS events_row,\n"
"       c.id::text, c.content::text, s.id::text, s.title::text\n"
"  FROM (VALUES (1)) AS one (x)\n"
"  LEFT JOIN comments c ON c.id = $2\n"
"  LEFT JOIN LATERAL (SELECT e.story_id FROM events e\n"
"                      WHERE e.comment_id = c.id\n"
"                      ORDER BY e.id LIMIT 1) first_event ON true\n"
"  LEFT JOIN stories s ON s.id = first_event.story_id";

/*
 * handle_resources(): every subscriber of the project group gets the event.
 * No expansion, no visibility rule, no preference.  As for timeline events,
 * author_id is NULL for an unknown author and subscriptions naming no users
 * row are skipped (both differ from StoryBoard).  $1 bigint the group's id,
 * $2 text event_type, $3 text event_info, $4 bigint the message's
 * author_id, $5 timestamp created_at (as $7 of sbw_timeline_sql).
 */
static const char sbw_project_group_sql[] =
"INSERT INTO subscription_events (author_id, subscriber_id, event_type, event_info, created_at)\n"
"SELECT (SELECT a.id FROM users a WHERE a.id = $4), u.id, $2, $3, $5\n"
"  FROM (SELECT DISTINCT sub.user_id FROM subscriptions sub\n"
"         WHERE sub.target_type::text = 'project_group' AND sub.target_id = $1) s\n"
"  JOIN users u ON u.id = s.user_id";

static const char sbw_project_group_sql_no_created_at[] =
"INSERT INTO subscription_events (author_id, subscriber_id, event_type, event_info)\n"
"SELECT (SELECT a.id FROM users a WHERE a.id = $4), u.id, $2, $3\n"
"  FROM (SELECT DISTINCT sub.user_id FROM subscriptions sub\n"
"         WHERE sub.target_type::text = 'project_group' AND sub.target_id = $1) s\n"
"  JOIN users u ON u.id = s.user_id";

/*
 * handle_deletions(), with an exact target_type: $1 text the resource
 * ('story', 'task', ...), $2 bigint its id.  Differs from StoryBoard, which
 * matches target_type LIKE '%<resource minus its last letter>%'.
 */
static const char sbw_deletion_sql[] =
"DELETE FROM subscriptions WHERE target_type::text = $1 AND target_id = $2";

static const char *const sbw_timeline_tables[] = {
	"events", "stories", "tasks", "project_group_mapping", "subscriptions",
	"permissions", "story_permissions", "user_permissions",
	"team_permissions", "teams", "team_membership", "users",
	"user_preferences", "worklists", "worklist_permissions",
	"board_worklists", "boards", "board_permissions",
	"subscription_events", NULL
};

static const char *const sbw_comment_tables[] = {
	"events", "comments", "stories", NULL
};

static const char *const sbw_project_group_tables[] = {
	"subscriptions", "users", "subscription_events", NULL
};

static const char *const sbw_deletion_tables[] = {
	"subscriptions", NULL
};

static void sbw_prepare(SbwSubPlan *sp, const Oid *relids, int n, char *path,
						Oid created_at_type);

static SbwSubPlan sbw_timeline_plan = {
	"timeline_event", sbw_timeline_tables,
	sbw_timeline_sql, sbw_timeline_sql_no_created_at,
	7, {INT8OID, INT8OID, INT8OID, TEXTOID, TEXTOID, INT8OID, TIMESTAMPOID}
};
static SbwSubPlan sbw_comment_plan = {
	"user_comment", sbw_comment_tables, sbw_comment_sql, NULL,
	2, {INT8OID, INT8OID}
};
static SbwSubPlan sbw_project_group_plan = {
	"project_group", sbw_project_group_tables,
	sbw_project_group_sql, sbw_project_group_sql_no_created_at,
	5, {INT8OID, TEXTOID, TEXTOID, INT8OID, TIMESTAMPOID}
};
static SbwSubPlan sbw_deletion_plan = {
	"deletion", sbw_deletion_tables, sbw_deletion_sql, NULL,
	2, {TEXTOID, INT8OID}
};


/*
 * The type of the created_at parameter.  StoryBoard stores naive UTC
 * datetimes (UTCDateTime over DATETIME); the fixture port uses timestamp
 * without time zone for them.  A deployment may have chosen timestamptz
 * instead, so look at the column: timestamptz (bound to now()) for
 * timestamptz, timestamp (the UTC wall-clock time, converted to the column's
 * type as any INSERT would) for anything else.  InvalidOid when there is no
 * created_at column at all (then it is left out of the INSERT).
 */
static Oid
sbw_created_at_type(void)
{
	Oid			relid;
	AttrNumber	attnum;

	relid = RangeVarGetRelid(makeRangeVar(NULL, "subscription_events", -1),
							 NoLock, true);
	if (!OidIsValid(relid))
		return InvalidOid;
	attnum = get_attnum(relid, "created_at");
	if (attnum == InvalidAttrNumber)
		return InvalidOid;
	if (get_atttype(relid, attnum) == TIMESTAMPTZOID)
		return TIMESTAMPTZOID;
	return TIMESTAMPOID;
}

/*
 * The created_at value: the transaction's start, which is now() as a
 * timestamptz and, since both count microseconds since 2000-01-01 00:00
 * UTC, now() AT TIME ZONE 'UTC' as a timestamp: the same Datum serves both
 * parameter types.
 */
static Datum
sbw_created_at_value(void)
{
	return TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
}

/*
 * Return the plan, after making sure that its tables are still the ones
 * search_path finds, and preparing it (again) if not.  The names are
 * resolved again only after DDL or a search_path change; a missing table
 * is reported by name, with a hint, rather than by a stale plan.
 */
static SPIPlanPtr
sbw_get_plan(SbwSubPlan *sp)
{
	Oid			relids[SBW_SUB_MAX_TABLES];
	bool		same;
	char	   *path;
	Oid			created_at_type;
	int			i;

	if (sp->plan != NULL && !sbw_name_cache_stale(&sp->names))
		return sp->plan;

	sbw_name_cache_refresh(&sp->names);
	same = (sp->plan != NULL);
	for (i = 0; sp->tables[i] != NULL; i++)
	{
		const char *name = sp->tables[i];

		Assert(i < SBW_SUB_MAX_TABLES);
		relids[i] = RangeVarGetRelid(makeRangeVar(NULL, (char *) name, -1),
									 NoLock, true);
		if (!OidIsValid(relids[i]))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_TABLE),
					 errmsg("relation \"%s\" does not exist", name),
					 errdetail("The subscription plugin needs StoryBoard's table \"%s\" and found none in search_path \"%s\".",
							   name, namespace_search_path),
					 errhint("Put the schema holding StoryBoard's tables on the workers' search_path, e.g. ALTER DATABASE ... SET search_path = storyboard, public, or load StoryBoard's schema into this database.")));
		if (relids[i] != sp->relids[i])
			same = false;
	}

	/* The INSERTs' parameters depend on the type of created_at, too */
	created_at_type = sp->sql_no_created_at ? sbw_created_at_type() : InvalidOid;
	if (created_at_type != sp->created_at_type)
		same = false;
	/* and the plan's own search_path on the tables' schemas (SET SCHEMA) */
	path = sbw_tables_search_path(relids, i);
	if (sp->exec_path == NULL || strcmp(path, sp->exec_path) != 0)
		same = false;

	if (!same)
		sbw_prepare(sp, relids, i, path, created_at_type);
	else
		pfree(path);
	return sp->plan;
}

/*
 * Prepare (again) a plan for the tables found, under its own search_path.
 * The statement's text, parameter types and search_path are logged at
 * DEBUG1, so that what runs can be read, and EXPLAINed, as it is.
 */
static void
sbw_prepare(SbwSubPlan *sp, const Oid *relids, int n, char *path,
			Oid created_at_type)
{
	const char *sql = sp->sql;
	SPIPlanPtr	plan;
	int			nestlevel;

	if (sp->plan != NULL)
	{
		SPI_freeplan(sp->plan);
		sp->plan = NULL;
	}
	if (sp->exec_path)
		pfree(sp->exec_path);
	sp->exec_path = path;
	if (sp->sql_no_created_at != NULL)
	{
		if (OidIsValid(created_at_type))
			sp->argtypes[sp->nargs - 1] = created_at_type;
		else
			sql = sp->sql_no_created_at;
	}
	elog(DEBUG1, "subscription plugin: preparing the %s statement, created_at %s, under search_path %s:\n%s",
		 sp->name, OidIsValid(created_at_type) ? format_type_be(created_at_type) : "not written",
		 sp->exec_path, sql);

	/*
	 * A generic plan from the start: the statements are selective on every
	 * parameter value, and the plancache's five custom plans before it
	 * settles cost 10-20 ms each on a real dataset.
	 */
	nestlevel = sbw_search_path_begin(sp->exec_path);
	plan = SPI_prepare_cursor(sql, sp->nargs, sp->argtypes,
							  CURSOR_OPT_GENERIC_PLAN);
	sbw_search_path_end(nestlevel);
	if (plan == NULL)
		elog(ERROR, "could not prepare the subscription plugin's %s statement: %s",
			 sp->name, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "could not keep the subscription plugin's %s statement",
			 sp->name);
	sp->plan = plan;
	memcpy(sp->relids, relids, sizeof(Oid) * n);
	sp->created_at_type = created_at_type;
}

/* Run a kept plan; NULL values come from the nulls array (' ' or 'n'). */
static void
sbw_execute(SbwSubPlan *sp, Datum *values, const char *nulls, int expected)
{
	SPIPlanPtr	plan = sbw_get_plan(sp);
	int			nestlevel = sbw_search_path_begin(sp->exec_path);
	int			rc;

	rc = SPI_execute_plan(plan, values, nulls, false, 0);
	sbw_search_path_end(nestlevel);
	if (rc != expected)
		elog(ERROR, "subscription plugin's %s statement failed: %s",
			 sp->name, SPI_result_code_string(rc));
}

/*
 * The events row a timeline_event is about is not visible to us yet:
 * StoryBoard publishes the message from inside the API request, before its
 * transaction commits (reference section 2.9).  Ask the dispatcher to retry
 * rather than skip the event as StoryBoard does, because the subscribers
 * themselves (the story's new tasks, its permissions) may be in that same
 * uncommitted transaction.  Differs from StoryBoard.
 */
static void
sbw_not_visible_yet(int64 event_id)
{
	ereport(ERROR,
			(errcode(ERRCODE_SBW_RETRY_LATER),
			 errmsg("events row %lld is not visible yet", (long long) event_id),
			 errdetail("StoryBoard publishes a timeline_event before the API transaction that inserts the events row commits."),
			 errhint("The event is retried up to storyboard_worker.max_retries times, then kept as a dead letter; storyboard_worker.replay() runs it again.")));
}

/*
 * The value of key in a JSON object: false when obj is not an object, or
 * the key is missing or JSON null.
 */
static bool
sbw_jsonb_get(Jsonb *obj, const char *key, JsonbValue *v)
{
	if (obj == NULL || !JB_ROOT_IS_OBJECT(obj))
		return false;
	if (getKeyJsonValueFromContainer(&obj->root, key, strlen(key), v) == NULL)
		return false;
	return v->type != jbvNull;
}

/*
 * Fetch key from a JSON object as an int64.  Returns false when the key is
 * missing or JSON null.  StoryBoard's ids are JSON integers; a string of
 * digits is accepted too, anything else is an error.
 */
static bool
sbw_jsonb_int8(Jsonb *obj, const char *key, int64 *out)
{
	JsonbValue	v;
	char	   *s;
	char	   *end;

	if (!sbw_jsonb_get(obj, key, &v))
		return false;
	switch (v.type)
	{
		case jbvNumeric:
			s = DatumGetCString(DirectFunctionCall1(numeric_out,
													NumericGetDatum(v.val.numeric)));
			break;
		case jbvString:
			s = pnstrdup(v.val.string.val, v.val.string.len);
			break;
		default:
			s = NULL;
			break;
	}

	if (s != NULL && *s != '\0')
	{
		errno = 0;
		*out = strtoi64(s, &end, 10);
		if (errno == 0 && *end == '\0')
			return true;
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("resource_after.%s is not an integer id", key),
			 errdetail("The value is %s.", s ? s : "not a number or string")));
	return false;				/* keep compiler quiet */
}

/*
 * Fetch key from a JSON object as text: a JSON string's contents, the JSON
 * text of anything else, NULL when missing or JSON null.
 */
static char *
sbw_jsonb_text(Jsonb *obj, const char *key)
{
	JsonbValue	v;

	if (!sbw_jsonb_get(obj, key, &v))
		return NULL;
	switch (v.type)
	{
		case jbvString:
			return pnstrdup(v.val.string.val, v.val.string.len);
		case jbvNumeric:
			return DatumGetCString(DirectFunctionCall1(numeric_out,
													   NumericGetDatum(v.val.numeric)));
		case jbvBool:
			return pstrdup(v.val.boolean ? "true" : "false");
		case jbvBinary:
			return JsonbToCString(NULL, v.val.binary.data, v.val.binary.len);
		default:
			return NULL;
	}
}

/* The characters json.dumps() escapes with a backslash, and how. */
static const char sbw_json_special[] = "\"\\\b\f\n\r\t";
static const char *const sbw_json_escapes[] = {"\\\"", "\\\\", "\\b", "\\f", "\\n", "\\r", "\\t"};

/*
 * Append s (server encoding) as a JSON string exactly as Python 3's
 * json.dumps() prints it with its default ensure_ascii=True: printable
 * ASCII as is except " and \, the five short escapes \b \f \n \r \t, and
 * every other character as \u followed by four lowercase hex digits, with a
 * UTF-16 surrogate pair above U+FFFF.  StoryBoard stores that text in
 * subscription_events.event_info, so readers may compare it byte for byte.
 */
static void
sbw_append_py_json_string(StringInfo buf, const char *s)
{
	const unsigned char *p;
	const unsigned char *end;

	p = (const unsigned char *) pg_server_to_any(s, strlen(s), PG_UTF8);
	end = p + strlen((const char *) p);

	appendStringInfoChar(buf, '"');
	while (p < end)
	{
		pg_wchar	c;
		int			len;
		const char *esc;

		if (*p < 0x80)
		{
			c = *p;
			len = 1;
		}
		else
		{
			len = pg_utf_mblen(p);
			if (len <= end - p && pg_utf8_islegal(p, len))
				c = utf8_to_unicode(p);
			else
			{
				/* not UTF-8 (SQL_ASCII database): one byte, as Latin-1 */
				c = *p;
				len = 1;
			}
		}
		p += len;

		esc = sbw_escape_of(c < 0x80 ? (int) c : 0, sbw_json_special, sbw_json_escapes);
		if (esc)
			appendStringInfoString(buf, esc);
		else if (c >= 0x20 && c <= 0x7e)
			appendStringInfoChar(buf, (char) c);
		else if (c > 0xffff)
		{
			c -= 0x10000;
			appendStringInfo(buf, "\\u%04x\\u%04x",
							 (unsigned int) (0xd800 | (c >> 10)),
							 (unsigned int) (0xdc00 | (c & 0x3ff)));
		}
		else
			appendStringInfo(buf, "\\u%04x", (unsigned int) c);
	}
	appendStringInfoChar(buf, '"');
}

/* A Python json.dumps() str or None: the JSON string, or null. */
static void
sbw_append_py_json_text(StringInfo buf, const char *s)
{
	if (s == NULL)
		appendStringInfoString(buf, "null");
	else
		sbw_append_py_json_string(buf, s);
}

/*
 * user_comment: StoryBoard stores json.dumps(resolve_comments(...)), i.e.
 * {"comment_id": .., "comment_content": .., "story_id": .., "story_title": ..}
 * in that key order, or the text null when the comment, its first events
 * row or its story is missing.  Also checks, under the same snapshot, that
 * the events row itself is visible.
 */
static char *
sbw_comment_event_info(int64 event_id, bool has_comment, int64 comment_id)
{
	Datum		values[2];
	char		nulls[2] = {' ', ' '};
	TupleDesc	tupdesc;
	HeapTuple	tuple;
	bool		isnull;
	char	   *cid;
	char	   *content;
	char	   *sid;
	char	   *title;
	StringInfoData buf;

	values[0] = Int64GetDatum(event_id);
	values[1] = Int64GetDatum(comment_id);
	if (!has_comment)
		nulls[1] = 'n';
	sbw_execute(&sbw_comment_plan, values, nulls, SPI_OK_SELECT);
	if (SPI_processed != 1)
		elog(ERROR, "subscription plugin's user_comment statement returned %llu rows",
			 (unsigned long long) SPI_processed);

	tupdesc = SPI_tuptable->tupdesc;
	tuple = SPI_tuptable->vals[0];
	if (!DatumGetBool(SPI_getbinval(tuple, tupdesc, 1, &isnull)))
		sbw_not_visible_yet(event_id);

	cid = SPI_getvalue(tuple, tupdesc, 2);
	content = SPI_getvalue(tuple, tupdesc, 3);
	sid = SPI_getvalue(tuple, tupdesc, 4);
	title = SPI_getvalue(tuple, tupdesc, 5);

	if (cid == NULL || sid == NULL)
		return pstrdup("null");

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"comment_id\": ");
	appendStringInfoString(&buf, cid);
	appendStringInfoString(&buf, ", \"comment_content\": ");
	sbw_append_py_json_text(&buf, content);
	appendStringInfoString(&buf, ", \"story_id\": ");
	appendStringInfoString(&buf, sid);
	appendStringInfoString(&buf, ", \"story_title\": ");
	sbw_append_py_json_text(&buf, title);
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/*
 * resource == 'timeline_event'.  StoryBoard reads story_id, worklist_id,
 * event_type and event_info from the message's resource_after (the events
 * row as the API serialised it), and checks visibility against the events
 * row in the database; so does this.
 */
static void
sbw_handle_timeline_event(SbwSubEvent *ev)
{
	Jsonb	   *after = ev->resource_after;
	int64		event_id = 0;
	int64		story_id = 0;
	int64		worklist_id = 0;
	int64		comment_id = 0;
	bool		has_story;
	bool		has_worklist;
	bool		has_comment;
	char	   *event_type;
	char	   *event_info;
	Datum		values[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	bool		isnull;
	int64		found;
	int64		inserted;

	if (after == NULL || !JB_ROOT_IS_OBJECT(after))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("timeline_event message has no resource_after object"),
				 errdetail("StoryBoard sends the new events row as resource_after; without it the event cannot be tied to a story or worklist.")));

	has_story = sbw_jsonb_int8(after, "story_id", &story_id);
	has_worklist = sbw_jsonb_int8(after, "worklist_id", &worklist_id);

	/* Board-only events: StoryBoard does nothing, whatever the database. */
	if (!has_story && !has_worklist)
		return;

	if (!sbw_jsonb_int8(after, "id", &event_id))
	{
		if (!ev->msg.has_resource_id)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("timeline_event message names no events row"),
					 errdetail("Neither resource_after.id nor resource_id is set.")));
		event_id = ev->msg.resource_id;
	}

	event_type = sbw_jsonb_text(after, "event_type");
	if (event_type == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("timeline_event %lld has no event_type in resource_after",
						(long long) event_id)));

	if (strcmp(event_type, "user_comment") == 0)
	{
		has_comment = sbw_jsonb_int8(after, "comment_id", &comment_id);
		event_info = sbw_comment_event_info(event_id, has_comment, comment_id);
	}
	else
		event_info = sbw_jsonb_text(after, "event_info");

	values[0] = Int64GetDatum(event_id);
	values[1] = Int64GetDatum(story_id);
	if (!has_story)
		nulls[1] = 'n';
	values[2] = Int64GetDatum(worklist_id);
	if (!has_worklist)
		nulls[2] = 'n';
	values[3] = CStringGetTextDatum(event_type);
	if (event_info != NULL)
		values[4] = CStringGetTextDatum(event_info);
	else
		nulls[4] = 'n';
	values[5] = Int64GetDatum(ev->msg.author_id);
	if (!ev->msg.has_author_id)
		nulls[5] = 'n';
	values[6] = sbw_created_at_value();

	sbw_execute(&sbw_timeline_plan, values, nulls, SPI_OK_SELECT);
	if (SPI_processed != 1)
		elog(ERROR, "subscription plugin's timeline_event statement returned %llu rows",
			 (unsigned long long) SPI_processed);

	found = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										SPI_tuptable->tupdesc, 1, &isnull));
	inserted = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										   SPI_tuptable->tupdesc, 2, &isnull));
	if (found == 0)
		sbw_not_visible_yet(event_id);

	elog(DEBUG1, "subscription: timeline_event %lld (%s): %lld subscription_events",
		 (long long) event_id, event_type, (long long) inserted);
}

/*
 * resource == 'project_group'.  event_info is json.dumps() of a dict whose
 * values are the ids as StoryBoard got them from the URL, i.e. strings:
 * {"project_group_id": "1", "project_id": "3"}.  (A URL id with leading
 * zeros, "01", would come back as "1": the decoder keeps the number only.)
 */
static void
sbw_handle_project_group(SbwSubEvent *ev)
{
	bool		is_delete = (ev->msg.method && strcmp(ev->msg.method, "DELETE") == 0);
	const char *event_type;
	StringInfoData info;
	char		idbuf[32];
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};

	if (ev->msg.has_sub_resource_id)
		event_type = is_delete ? "project removed from project_group"
			: "project added to project_group";
	else if (is_delete)
		event_type = "project_group deleted";
	else
		return;					/* any other project_group POST or PUT */

	/* No group id: StoryBoard finds no subscriber either. */
	if (!ev->msg.has_resource_id)
		return;

	initStringInfo(&info);
	appendStringInfoString(&info, "{\"project_group_id\": ");
	snprintf(idbuf, sizeof(idbuf), INT64_FORMAT, ev->msg.resource_id);
	sbw_append_py_json_string(&info, idbuf);
	if (ev->msg.has_sub_resource_id)
	{
		appendStringInfoString(&info, ", \"project_id\": ");
		snprintf(idbuf, sizeof(idbuf), INT64_FORMAT, ev->msg.sub_resource_id);
		sbw_append_py_json_string(&info, idbuf);
	}
	appendStringInfoChar(&info, '}');

	values[0] = Int64GetDatum(ev->msg.resource_id);
	values[1] = CStringGetTextDatum(event_type);
	values[2] = CStringGetTextDatum(info.data);
	values[3] = Int64GetDatum(ev->msg.author_id);
	if (!ev->msg.has_author_id)
		nulls[3] = 'n';
	values[4] = sbw_created_at_value();

	sbw_execute(&sbw_project_group_plan, values, nulls, SPI_OK_INSERT);
	elog(DEBUG1, "subscription: %s: " UINT64_FORMAT " subscription_events",
		 event_type, SPI_processed);
}

/*
 * method == 'DELETE' without a sub-resource: the target is gone, so are its
 * subscriptions.  Only the subscription target types can match anything;
 * deleting a tag from a story (/v1/stories/1/tags, a sub-resource) never
 * gets here, which is StoryBoard's fix 708f6f2.
 */
static void
sbw_handle_deletion(SbwSubEvent *ev)
{
	static const char *const targets[] = {
		"story", "task", "project", "project_group", "worklist", NULL
	};
	Datum		values[2];
	int			i;

	if (ev->msg.resource == NULL || !ev->msg.has_resource_id)
		return;
	for (i = 0; targets[i] != NULL; i++)
		if (strcmp(ev->msg.resource, targets[i]) == 0)
			break;
	if (targets[i] == NULL)
		return;

	values[0] = CStringGetTextDatum(ev->msg.resource);
	values[1] = Int64GetDatum(ev->msg.resource_id);
	sbw_execute(&sbw_deletion_plan, values, NULL, SPI_OK_DELETE);
	elog(DEBUG1, "subscription: DELETE %s " INT64_FORMAT ": " UINT64_FORMAT " subscriptions removed",
		 ev->msg.resource, ev->msg.resource_id, SPI_processed);
}

/* A text field of the event row, NULL when SQL NULL or empty. */
static char *
sbw_event_text(HeapTupleHeader row, const char *field)
{
	bool		isnull;
	Datum		d = GetAttributeByName(row, field, &isnull);
	char	   *s;

	if (isnull)
		return NULL;
	s = TextDatumGetCString(d);
	return (*s == '\0') ? NULL : s;
}

/* A bigint field of the event row; false when SQL NULL. */
static bool
sbw_event_int8(HeapTupleHeader row, const char *field, int64 *out)
{
	bool		isnull;
	Datum		d = GetAttributeByName(row, field, &isnull);

	*out = isnull ? 0 : DatumGetInt64(d);
	return !isnull;
}

/*
 * storyboard_worker.subscription_handler(event storyboard_worker.event)
 *
 * The plugin's entry point, called by the dispatcher inside the event's
 * subtransaction.  It only connects to SPI and raises on problems: rolling
 * back and keeping the event as a dead letter is the dispatcher's job.
 */
Datum
sbw_subscription_handler(PG_FUNCTION_ARGS)
{
	HeapTupleHeader row = PG_GETARG_HEAPTUPLEHEADER(0);
	SbwSubEvent ev;
	bool		isnull;
	Datum		d;

	sbw_require_current_version();
	memset(&ev, 0, sizeof(ev));
	ev.msg.method = sbw_event_text(row, "method");
	ev.msg.resource = sbw_event_text(row, "resource");
	ev.msg.sub_resource = sbw_event_text(row, "sub_resource");
	ev.msg.has_resource_id = sbw_event_int8(row, "resource_id", &ev.msg.resource_id);
	ev.msg.has_sub_resource_id = sbw_event_int8(row, "sub_resource_id",
											&ev.msg.sub_resource_id);
	ev.msg.has_author_id = sbw_event_int8(row, "author_id", &ev.msg.author_id);
	d = GetAttributeByName(row, "resource_after", &isnull);
	ev.resource_after = isnull ? NULL : DatumGetJsonbP(d);

	if (ev.msg.resource == NULL)
		PG_RETURN_VOID();

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "subscription plugin: SPI_connect failed");

	if (strcmp(ev.msg.resource, "timeline_event") == 0)
		sbw_handle_timeline_event(&ev);
	else if (strcmp(ev.msg.resource, "project_group") == 0)
		sbw_handle_project_group(&ev);

	/* For any resource: a DELETE of the resource itself. */
	if (ev.msg.method && strcmp(ev.msg.method, "DELETE") == 0 &&
		!ev.msg.has_sub_resource_id && ev.msg.sub_resource == NULL)
		sbw_handle_deletion(&ev);

	SPI_finish();
	PG_RETURN_VOID();
}
