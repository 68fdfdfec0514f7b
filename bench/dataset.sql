-- bench/dataset.sql: a realistic StoryBoard dataset for the subscription
-- workload, generated server-side and deterministically.
--
-- psql variables (bench/bench.py sets them):
--   stories   number of stories (3 tasks each)
--   users     number of users
--   projects  number of projects
--   groups    number of project groups
--   events    size of the pool of timeline events (events rows) the
--             benchmark publishes messages for
--
-- Shape, per story: 3 tasks in 3 different projects; subscribers: 3 on the
-- story, 1 on each task, 1 on each project, 1 on each project group (every
-- project is in one group, every fifth in two), so about 10 distinct users
-- are notified of each event on a story.  5 % of the stories are private,
-- visible to 3 users directly and to one team.  Half of the users have two
-- preferences.  Events: 30 % user_comment (each with its comment), 40 %
-- task_status_changed, 10 % each task_assignee_changed,
-- story_details_changed, task_created; event id i is about story
-- ((i * 7919) % stories) + 1, so the pgbench scripts can compute it.
--
-- Every INSERT names StoryBoard's columns, and every enum value is a quoted
-- literal, so the script works with the enum or text columns of any port of
-- StoryBoard's schema.

\set ON_ERROR_STOP 1
SELECT setseed(0.42);

INSERT INTO users (id, created_at, full_name, email, openid, is_staff, is_active, is_superuser, enable_login)
SELECT u, timestamp '2015-01-01' + u * interval '1 hour', 'User ' || u,
       'user' || u || '@example.org', 'https://login.example.org/+id/' || md5(u::text),
       u <= 5, true, u = 1, true
  FROM generate_series(1, :users) u;

INSERT INTO user_preferences (user_id, key, type, value, created_at)
SELECT u, 'receive_notifications_worklists', 'string', 'true', now() FROM generate_series(1, :users, 2) u;
INSERT INTO user_preferences (user_id, key, type, value, created_at)
SELECT u, 'display_events_user_comment', 'bool', 'true', now() FROM generate_series(1, :users, 2) u;

INSERT INTO teams (id, name, created_at) SELECT t, 'team-' || t, now() FROM generate_series(1, 20) t;
INSERT INTO team_membership (user_id, team_id)
SELECT u, 1 + (u % 20) FROM generate_series(1, :users) u WHERE u % 3 = 0;

INSERT INTO projects (id, name, description, is_active, created_at)
SELECT p, 'openstack/project-' || p, 'Project ' || p, true, now() FROM generate_series(1, :projects) p;
INSERT INTO project_groups (id, name, title, created_at)
SELECT g, 'group-' || g, 'Project group ' || g, now() FROM generate_series(1, :groups) g;
INSERT INTO project_group_mapping (project_id, project_group_id)
SELECT p, 1 + (p % :groups) FROM generate_series(1, :projects) p
UNION ALL
SELECT p, 1 + ((p + 7) % :groups) FROM generate_series(1, :projects) p WHERE p % 5 = 0;

INSERT INTO stories (id, created_at, creator_id, title, description, is_bug, story_type_id, private)
SELECT s, timestamp '2016-01-01' + s * interval '1 minute', 1 + (s * 31) % :users,
       'Story ' || s || ': ' || md5(s::text), repeat('Some description. ', 10),
       s % 2 = 0, 1, s % 20 = 0
  FROM generate_series(1, :stories) s;

-- private stories: permission view_story_<id>, 3 users and one team
INSERT INTO permissions (id, name, codename, created_at)
SELECT s / 20, 'view_story_' || s, 'view_story', now()
  FROM generate_series(20, :stories, 20) s;
INSERT INTO story_permissions (story_id, permission_id)
SELECT s, s / 20 FROM generate_series(20, :stories, 20) s;
INSERT INTO user_permissions (user_id, permission_id)
SELECT 1 + (s * k * 13) % :users, s / 20
  FROM generate_series(20, :stories, 20) s, generate_series(1, 3) k;
INSERT INTO team_permissions (permission_id, team_id)
SELECT s / 20, 1 + (s % 20) FROM generate_series(20, :stories, 20) s;

INSERT INTO tasks (id, created_at, title, status, story_id, project_id, assignee_id, creator_id, priority, branch_id)
SELECT 3 * (s - 1) + k, now(), 'Task ' || k || ' of story ' || s, 'todo', s,
       1 + ((s * 17 + k * 61) % :projects), 1 + (s * k * 7) % :users,
       1 + (s * 31) % :users, 'medium', 1
  FROM generate_series(1, :stories) s, generate_series(1, 3) k;

-- subscriptions
INSERT INTO subscriptions (user_id, target_type, target_id, created_at)
SELECT 1 + (s * 101 + k * 997) % :users, 'story', s, now()
  FROM generate_series(1, :stories) s, generate_series(1, 3) k;
INSERT INTO subscriptions (user_id, target_type, target_id, created_at)
SELECT 1 + (t * 37 + 11) % :users, 'task', t, now()
  FROM generate_series(1, 3 * :stories) t;
INSERT INTO subscriptions (user_id, target_type, target_id, created_at)
SELECT 1 + (p * 53 + 5) % :users, 'project', p, now()
  FROM generate_series(1, :projects) p;
INSERT INTO subscriptions (user_id, target_type, target_id, created_at)
SELECT 1 + (g * 71 + 3) % :users, 'project_group', g, now()
  FROM generate_series(1, :groups) g;

-- a few worklists and boards (the visibility rules join them)
INSERT INTO worklists (id, title, creator_id, project_id, private, archived, automatic, created_at)
SELECT w, 'Worklist ' || w, 1 + w % :users, 1 + w % :projects, w % 4 = 0, false, false, now()
  FROM generate_series(1, 50) w;
INSERT INTO boards (id, title, description, creator_id, project_id, private, archived, created_at)
SELECT b, 'Board ' || b, 'A board', 1 + b % :users, 1 + b % :projects, b % 4 = 0, false, now()
  FROM generate_series(1, 10) b;
INSERT INTO board_worklists (board_id, list_id, position, created_at)
SELECT 1 + (w % 10), w, w / 10, now() FROM generate_series(1, 50) w WHERE w % 2 = 0;

-- the pool of timeline events; comments for the user_comment ones
INSERT INTO comments (id, created_at, content, is_active)
SELECT i, now(), 'Comment ' || i || ': looks good to me, “ü” ' || md5(i::text), true
  FROM generate_series(1, :events) i WHERE (i - 1) % 10 < 3;

INSERT INTO events (id, created_at, story_id, comment_id, author_id, event_type, event_info)
SELECT i, timestamp '2019-04-11 13:03:42' + i * interval '1 second', st,
       CASE WHEN kind < 3 THEN i END,
       1 + (i * 13) % :users,
       CASE WHEN kind < 3 THEN 'user_comment'
            WHEN kind < 7 THEN 'task_status_changed'
            WHEN kind = 7 THEN 'task_assignee_changed'
            WHEN kind = 8 THEN 'story_details_changed'
            ELSE 'task_created' END,
       CASE WHEN kind < 3 THEN NULL
            WHEN kind < 7 THEN format('{"story_id": %s, "task_id": %s, "task_title": "Task 1 of story %s", "old_status": "todo", "new_status": "inprogress"}', st, 3 * (st - 1) + 1, st)
            WHEN kind = 7 THEN format('{"story_id": %s, "task_id": %s, "task_title": "Task 2 of story %s", "old_assignee_id": null, "new_assignee_id": %s}', st, 3 * (st - 1) + 2, st, 1 + i % :users)
            WHEN kind = 8 THEN format('{"story_id": %s, "story_title": "Story %s"}', st, st)
            ELSE format('{"story_id": %s, "task_id": %s, "task_title": "Task 3 of story %s"}', st, 3 * (st - 1) + 3, st) END
  FROM (SELECT i, ((i * 7919) % :stories) + 1 AS st, (i - 1) % 10 AS kind
          FROM generate_series(1, :events) i) x;

-- keep the sequences ahead of the explicit ids
SELECT setval(pg_get_serial_sequence(t, 'id'), 100000000)
  FROM unnest(ARRAY['users', 'teams', 'projects', 'project_groups', 'stories', 'permissions',
                    'tasks', 'comments', 'events', 'worklists', 'boards']) t
 WHERE pg_get_serial_sequence(t, 'id') IS NOT NULL;

VACUUM ANALYZE;
