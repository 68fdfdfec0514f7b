-- bench/storyboard_schema.sql: the StoryBoard tables the subscription plugin
-- reads and writes, ported to PostgreSQL for the benchmark (used only when
-- test/fixtures/storyboard_schema.sql is not there).
--
-- Column names, types and enums follow StoryBoard's models and migrations
-- (reference section 6).  Datetimes are naive UTC (timestamp without time
-- zone), as UTCDateTime stores them.  Foreign keys only where the
-- migrations create them (not the model-only ones: subscriptions.user_id,
-- subscription_events.*, user_preferences.user_id, events.story_id/...).
-- Indexes: MySQL/InnoDB, StoryBoard's
-- production database, indexes every foreign-key column by itself, so the
-- same columns are indexed here, plus subscriptions (target_type,
-- target_id), which subscriber resolution looks up by.

CREATE TYPE task_status AS ENUM ('todo', 'inprogress', 'invalid', 'review', 'merged');
CREATE TYPE task_priority AS ENUM ('low', 'medium', 'high');
CREATE TYPE target_type AS ENUM ('task', 'story', 'project', 'project_group', 'worklist');
CREATE TYPE pref_type AS ENUM ('string', 'int', 'bool', 'float');

CREATE TABLE users (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	full_name varchar(255), email varchar(100) CONSTRAINT uniq_user_email UNIQUE,
	openid varchar(255), is_staff boolean, is_active boolean, is_superuser boolean,
	last_login timestamp, enable_login boolean NOT NULL DEFAULT true);

CREATE TABLE user_preferences (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	user_id integer NOT NULL,
	key varchar(100) NOT NULL, type pref_type NOT NULL DEFAULT 'string',
	value varchar(255) NOT NULL);
CREATE INDEX ON user_preferences (user_id);

CREATE TABLE teams (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	name varchar(100) CONSTRAINT uniq_team_name UNIQUE);

CREATE TABLE team_membership (
	user_id integer REFERENCES users (id),
	team_id integer REFERENCES teams (id));
CREATE INDEX ON team_membership (user_id);
CREATE INDEX ON team_membership (team_id);

CREATE TABLE permissions (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	name varchar(50) UNIQUE, codename varchar(255));

CREATE TABLE user_permissions (
	user_id integer REFERENCES users (id),
	permission_id integer REFERENCES permissions (id));
CREATE INDEX ON user_permissions (user_id);
CREATE INDEX ON user_permissions (permission_id);

CREATE TABLE team_permissions (
	permission_id integer REFERENCES permissions (id),
	team_id integer REFERENCES teams (id));
CREATE INDEX ON team_permissions (permission_id);
CREATE INDEX ON team_permissions (team_id);

CREATE TABLE projects (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	name varchar(100) CONSTRAINT uniq_project_name UNIQUE,
	description text, team_id integer REFERENCES teams (id),
	is_active boolean NOT NULL DEFAULT true, repo_url varchar(255),
	autocreate_branches boolean);

CREATE TABLE project_groups (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	name varchar(100) CONSTRAINT uniq_group_name UNIQUE, title varchar(255));

CREATE TABLE project_group_mapping (
	project_id integer REFERENCES projects (id),
	project_group_id integer REFERENCES project_groups (id));
CREATE INDEX ON project_group_mapping (project_id);
CREATE INDEX ON project_group_mapping (project_group_id);

CREATE TABLE stories (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	creator_id integer REFERENCES users (id),
	title varchar(255), description text, is_bug boolean,
	story_type_id integer DEFAULT 1, private boolean NOT NULL DEFAULT false);
CREATE INDEX ON stories (creator_id);

CREATE TABLE story_permissions (
	story_id integer REFERENCES stories (id),
	permission_id integer REFERENCES permissions (id));
CREATE INDEX ON story_permissions (story_id);
CREATE INDEX ON story_permissions (permission_id);

CREATE TABLE tasks (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	title varchar(255), status task_status DEFAULT 'todo',
	story_id integer REFERENCES stories (id),
	project_id integer REFERENCES projects (id),
	assignee_id integer REFERENCES users (id),
	creator_id integer REFERENCES users (id),
	priority task_priority DEFAULT 'medium',
	branch_id integer, milestone_id integer, link text);
CREATE INDEX ON tasks (story_id);
CREATE INDEX ON tasks (project_id);
CREATE INDEX ON tasks (assignee_id);
CREATE INDEX ON tasks (creator_id);

CREATE TABLE comments (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	content text, is_active boolean NOT NULL DEFAULT true,
	in_reply_to integer REFERENCES comments (id));

CREATE TABLE worklists (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	title varchar(100), creator_id integer REFERENCES users (id),
	project_id integer REFERENCES projects (id),
	private boolean, archived boolean, automatic boolean);

CREATE TABLE worklist_permissions (
	worklist_id integer REFERENCES worklists (id),
	permission_id integer REFERENCES permissions (id));
CREATE INDEX ON worklist_permissions (worklist_id);

CREATE TABLE boards (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	title varchar(100) NOT NULL, description text,
	creator_id integer REFERENCES users (id),
	project_id integer REFERENCES projects (id),
	private boolean, archived boolean);

CREATE TABLE board_worklists (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	board_id integer NOT NULL REFERENCES boards (id),
	list_id integer NOT NULL REFERENCES worklists (id),
	position integer NOT NULL);
CREATE INDEX ON board_worklists (board_id);
CREATE INDEX ON board_worklists (list_id);

CREATE TABLE board_permissions (
	board_id integer REFERENCES boards (id),
	permission_id integer REFERENCES permissions (id));
CREATE INDEX ON board_permissions (board_id);

CREATE TABLE events (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	story_id integer, comment_id integer, author_id integer,
	event_type varchar(100) NOT NULL, event_info text,
	board_id integer CONSTRAINT fk_event_board REFERENCES boards (id),
	worklist_id integer CONSTRAINT fk_event_worklist REFERENCES worklists (id));
CREATE INDEX ON events (story_id);
CREATE INDEX ON events (comment_id);
CREATE INDEX ON events (author_id);

CREATE TABLE subscriptions (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	user_id integer,
	target_type target_type, target_id integer);
CREATE INDEX ON subscriptions (user_id);
CREATE INDEX ON subscriptions (target_type, target_id);

CREATE TABLE subscription_events (
	id serial PRIMARY KEY,
	created_at timestamp, updated_at timestamp,
	subscriber_id integer NOT NULL,
	event_type varchar(100) NOT NULL, event_info text,
	author_id integer);
CREATE INDEX ON subscription_events (subscriber_id);
