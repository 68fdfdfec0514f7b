#!/usr/bin/env bash
# tools/demo.sh: storyboard_worker end to end in a minute (`make demo`), as root on Debian 12.
#
# Installs the packages, builds and installs the extension, starts a throw-away
# RabbitMQ and PostgreSQL 15 (preloading storyboard_worker), creates database
# storyboard with StoryBoard's schema (test/fixtures/*.sql when present),
# CREATE EXTENSION storyboard_worker, turns notifications on, does three API
# actions the way StoryBoard does (rows in its tables, then the messages
# published with tools/publish.py: a story created, a task status change, a
# comment), waits, and prints subscription_events and the stats view.
#
# Environment: DEMO_KEEP=1 leaves both services running (and prints how to
# connect and stop them); SKIP_APT=1 skips apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PY=/usr/bin/python3
SCHEMA=test/fixtures/storyboard_schema.sql
DATA=test/fixtures/storyboard_demo_data.sql
[ -f "$DATA" ] || DATA=test/fixtures/storyboard_mock_data.sql     # StoryBoard's own test data
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root" >&2; exit 2; }

if [ "${SKIP_APT:-0}" != 1 ]; then
	step "installing packages"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null
	apt-get install -y -q --no-install-recommends postgresql-15 postgresql-server-dev-15 librabbitmq-dev \
		libjson-c-dev libcurl4-openssl-dev rabbitmq-server amqp-tools python3-pika python3-psycopg2 pkg-config make gcc \
		iproute2 util-linux procps >/tmp/sbw-demo-apt.log 2>&1 || { tail -30 /tmp/sbw-demo-apt.log >&2; exit 1; }
fi

# shellcheck source=test/services.sh
. "$ROOT/test/services.sh"
SVC_DIR=$(mktemp -d /tmp/sbw-demo.XXXXXX)
export SVC_DIR
KEEP=${DEMO_KEEP:-0}
on_exit() {
	local rc=$?
	set +e
	if [ "$KEEP" = 1 ] && [ "$rc" = 0 ]; then return; fi
	svc_load
	svc_stop_all
	if [ "$rc" = 0 ]; then rm -rf "$SVC_DIR"; else echo "demo failed; logs kept in $SVC_DIR" >&2; fi
	exit $rc
}
trap on_exit EXIT
trap 'exit 143' TERM INT
svc_init
rmq_launch

step "building storyboard_worker"
if ! { make -s -j2 PG_CONFIG="$PG_CONFIG" && make -s install PG_CONFIG="$PG_CONFIG"; } >"$SVC_DIR/build.log" 2>&1; then
	tail -40 "$SVC_DIR/build.log" >&2
	exit 1
fi
echo "installed into $($PG_CONFIG --pkglibdir)"

step "starting RabbitMQ and PostgreSQL"
sbw_pg_conf "$SVC_DIR/sbw.conf"
PG_PRELOAD=storyboard_worker PG_EXTRA_CONF="$SVC_DIR/sbw.conf" pg_start
rmq_wait_ready
rmq_setup_user
echo "PostgreSQL: host=$PGHOST port=$PGPORT (pid $PG_PID)"
echo "RabbitMQ:   127.0.0.1:$AMQP_PORT (pid $RMQ_BEAM_PID), user $SBW_RMQ_USER/$SBW_RMQ_PASS and guest"

psql_sb() { pg_psql -d storyboard -q "$@"; }

step "creating database storyboard"
pg_psql -d postgres -q -c "CREATE DATABASE storyboard"
HAVE_SCHEMA=0
if [ -f "$SCHEMA" ]; then
	psql_sb -f "$SCHEMA" >/dev/null
	HAVE_SCHEMA=1
	echo "StoryBoard schema loaded from $SCHEMA"
	if [ -f "$DATA" ]; then psql_sb -f "$DATA" >/dev/null; echo "demo data loaded from $DATA"; fi
else
	echo "($SCHEMA not there yet: no StoryBoard schema, the demo records events with its own plugin)"
fi
psql_sb -c "CREATE EXTENSION storyboard_worker"
if [ "$HAVE_SCHEMA" = 0 ]; then
	psql_sb <<'SQL'
-- Without StoryBoard's tables the built-in 'subscription' plugin has nothing to
-- work on: swap it for a plugin that records what it receives.
SELECT storyboard_worker.unregister_plugin('subscription');
CREATE SCHEMA demo;
CREATE TABLE demo.received (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp(),
	routing_key text, method text, path text, resource text, resource_id bigint,
	sub_resource text, sub_resource_id bigint, author_id bigint, event_type text);
CREATE FUNCTION demo.record(e storyboard_worker.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO demo.received (routing_key, method, path, resource, resource_id, sub_resource,
		sub_resource_id, author_id, event_type)
	VALUES (e.routing_key, e.method, e.path, e.resource, e.resource_id, e.sub_resource,
		e.sub_resource_id, e.author_id, e.resource_after->>'event_type');
END $$;
SELECT storyboard_worker.register_plugin('demo', 'demo.record(storyboard_worker.event)');
SQL
fi
psql_sb -c "SELECT name, handler FROM storyboard_worker.plugins ORDER BY position"

step "enable_notifications = on"
pg_psql -d postgres -q -c "ALTER SYSTEM SET storyboard_worker.enable_notifications = on" -c "SELECT pg_reload_conf()" >/dev/null
for i in $(seq 1 150); do
	c=$(psql_sb -Atc "SELECT count(*) FILTER (WHERE state = 'consuming') || '/' || count(*) FROM storyboard_worker.stats")
	[ "${c%/*}" != 0 ] && [ "${c%/*}" = "${c#*/}" ] && break
	sleep 0.2
done
echo "consumers consuming: $c"

step "three API actions: a story created, a task status change, a comment"
PUB=("$PY" tools/publish.py --url "$AMQP_URL" --mandatory)
if [ "$HAVE_SCHEMA" = 1 ] && ids=$(psql_sb -At -v ON_ERROR_STOP=1 2>"$SVC_DIR/demo-api.err" <<'SQL'
-- What StoryBoard's API writes before it publishes (its tables, section 6 of
-- the reference): a new story with a task, the task set to merged, a
-- comment; each with its timeline event row.  The author is user 2; user 3
-- subscribes to the new story; user 1 already follows project group 1
-- (mock data), which holds the task's project.
-- Output: story|task|comment|ev1|ev2|ev3|author
BEGIN;
CREATE TEMP TABLE demo_ids (k text PRIMARY KEY, v bigint);
INSERT INTO demo_ids SELECT 'author', coalesce((SELECT id FROM users WHERE id = 2), (SELECT min(id) FROM users));
WITH s AS (INSERT INTO stories (creator_id, title, description, is_bug, story_type_id, private)
	VALUES ((SELECT v FROM demo_ids WHERE k = 'author'),
		'Demo: the worker runs inside PostgreSQL', 'Created by tools/demo.sh', false, 1, false) RETURNING id)
INSERT INTO demo_ids SELECT 'story', id FROM s;
WITH t AS (INSERT INTO tasks (title, status, story_id, project_id, creator_id, priority)
	VALUES ('Write the consumer', 'inprogress', (SELECT v FROM demo_ids WHERE k = 'story'),
		(SELECT min(id) FROM projects), (SELECT v FROM demo_ids WHERE k = 'author'), 'medium') RETURNING id)
INSERT INTO demo_ids SELECT 'task', id FROM t;
UPDATE tasks SET status = 'merged', updated_at = now() AT TIME ZONE 'UTC'
	WHERE id = (SELECT v FROM demo_ids WHERE k = 'task');
WITH c AS (INSERT INTO comments (content, is_active) VALUES ('Looks good to me', true) RETURNING id)
INSERT INTO demo_ids SELECT 'comment', id FROM c;
WITH e AS (INSERT INTO events (story_id, author_id, event_type, event_info)
	SELECT s.v, a.v, 'story_created',
		json_build_object('story_id', s.v, 'story_title', 'Demo: the worker runs inside PostgreSQL')::text
	FROM demo_ids s, demo_ids a WHERE s.k = 'story' AND a.k = 'author' RETURNING id)
INSERT INTO demo_ids SELECT 'ev1', id FROM e;
WITH e AS (INSERT INTO events (story_id, author_id, event_type, event_info)
	SELECT s.v, a.v, 'task_status_changed',
		json_build_object('story_id', s.v, 'task_id', t.v, 'task_title', 'Write the consumer',
			'old_status', 'inprogress', 'new_status', 'merged')::text
	FROM demo_ids s, demo_ids a, demo_ids t WHERE s.k = 'story' AND a.k = 'author' AND t.k = 'task' RETURNING id)
INSERT INTO demo_ids SELECT 'ev2', id FROM e;
WITH e AS (INSERT INTO events (story_id, comment_id, author_id, event_type)
	SELECT s.v, c.v, a.v, 'user_comment'
	FROM demo_ids s, demo_ids a, demo_ids c WHERE s.k = 'story' AND a.k = 'author' AND c.k = 'comment' RETURNING id)
INSERT INTO demo_ids SELECT 'ev3', id FROM e;
INSERT INTO subscriptions (user_id, target_type, target_id)
	SELECT coalesce((SELECT id FROM users WHERE id = 3), a.v), 'story', s.v
	FROM demo_ids s, demo_ids a WHERE s.k = 'story' AND a.k = 'author';
COMMIT;
SELECT string_agg(v::text, '|' ORDER BY array_position(ARRAY['story','task','comment','ev1','ev2','ev3','author'], k))
FROM demo_ids;
SQL
) && [[ $ids =~ ^[0-9]+(\|[0-9]+){6}$ ]]; then
	IFS='|' read -r sid tid cid ev1 ev2 ev3 aid <<<"$ids"
	"${PUB[@]}" story-created --story-id "$sid" --author-id "$aid" --event-id "$ev1" --title "Demo: the worker runs inside PostgreSQL"
	"${PUB[@]}" task-status --task-id "$tid" --story-id "$sid" --old inprogress --new merged --author-id "$aid" --event-id "$ev2" --title "Write the consumer"
	"${PUB[@]}" comment --story-id "$sid" --comment-id "$cid" --author-id "$aid" --event-id "$ev3" --title "Demo: the worker runs inside PostgreSQL"
else
	if [ "$HAVE_SCHEMA" = 1 ]; then
		echo "(could not write the StoryBoard rows [$ids]: $(head -3 "$SVC_DIR/demo-api.err"); publishing the sample events only)"
	fi
	"${PUB[@]}" demo
fi

step "waiting for the workers"
for i in $(seq 1 50); do
	n=$(psql_sb -Atc "SELECT coalesce(sum(messages_processed + messages_dead_lettered), 0) FROM storyboard_worker.stats")
	[ "$n" -ge 6 ] && break
	sleep 0.2
done
sleep 0.5

step "result"
if [ "$HAVE_SCHEMA" = 1 ] && [ "$(psql_sb -Atc "SELECT to_regclass('subscription_events') IS NOT NULL")" = t ]; then
	echo "subscription_events:"
	psql_sb -P pager=off -c "SELECT id, subscriber_id, author_id, event_type, left(event_info, 90) AS event_info FROM subscription_events ORDER BY id"
else
	echo "what the demo plugin received:"
	psql_sb -P pager=off -c "SELECT routing_key, method, path, resource, resource_id, sub_resource, sub_resource_id, author_id, event_type FROM demo.received ORDER BY id"
fi
if [ "$(psql_sb -Atc "SELECT count(*) FROM storyboard_worker.dead_letters")" != 0 ]; then
	echo "dead letters:"
	psql_sb -P pager=off -c "SELECT id, routing_key, plugin, sqlstate, left(error, 100) AS error FROM storyboard_worker.dead_letters ORDER BY id"
fi
echo "storyboard_worker.stats:"
psql_sb -P pager=off -c "SELECT worker_id, pid, state, broker, messages_received AS received, messages_processed AS processed, messages_dead_lettered AS dead, last_error FROM storyboard_worker.stats"

if [ "$KEEP" = 1 ]; then
	step "left running (DEMO_KEEP=1)"
	cat <<EOF
  psql:      psql -h $PGHOST -p $PGPORT -U postgres storyboard
  publish:   AMQP_URL=$AMQP_URL $PY tools/publish.py task-status --task-id 1 --story-id 1
  logs:      $PG_LOG  $SVC_DIR/rmq/log/
  stop:      SVC_DIR=$SVC_DIR bash test/services.sh svc_cleanup
EOF
else
	step "stopping"
	svc_stop_all
	echo "stopped"
fi
