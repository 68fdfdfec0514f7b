/* storyboard_worker--1.3--1.4.sql: email notifications (StoryBoard's
   subscription-email plugin): templates, the outbox, digests */

\echo Use "ALTER EXTENSION storyboard_worker UPDATE TO '1.4'" to load this file. \quit

-- ---------------------------------------------------------------- templates
-- One template per (resource[/sub_resource]/METHOD) StoryBoard has, plus
-- the digest.  Text with {{ name }} placeholders filled from the event's
-- context (jsonb; storyboard_worker.email_context() says which names each
-- template has); nothing else.  The defaults belong to the extension (an
-- update may improve them); an operator's edits go to email_templates,
-- which wins when it has a row of the same name and is kept by pg_dump and
-- by ALTER EXTENSION ... UPDATE.
CREATE TABLE storyboard_worker.email_templates_default (
	name		text PRIMARY KEY,
	subject		text NOT NULL,
	body_text	text NOT NULL,
	body_html	text
);
CREATE TABLE storyboard_worker.email_templates (
	name		text PRIMARY KEY,
	subject		text NOT NULL,
	body_text	text NOT NULL,
	body_html	text,
	edited_at	timestamptz NOT NULL DEFAULT pg_catalog.now()
);
SELECT pg_catalog.pg_extension_config_dump('storyboard_worker.email_templates', '');
COMMENT ON TABLE storyboard_worker.email_templates IS
	'Operators'' versions of email templates; a row here replaces the default of the same name';
REVOKE ALL ON storyboard_worker.email_templates_default FROM PUBLIC;
REVOKE ALL ON storyboard_worker.email_templates FROM PUBLIC;

INSERT INTO storyboard_worker.email_templates_default (name, subject, body_text) VALUES
('story/POST', 'Story "{{title}}" was created.',
$t$Story "{{title}}" was created by {{author}}:

{{story_url}}

Full description:
{{description}}
$t$),
('story/PUT', 'Story "{{title}}" was updated.',
$t$Story "{{title}}" was updated by {{author}}:

{{story_url}}

Changes:
{{changes}}
$t$),
('story/comment/POST', '{{author}} commented on "{{title}}"',
$t${{author}} commented on "{{title}}":

{{comment}}

{{story_url}}

Posted at {{comment_created_at}}
$t$),
('story/tag/PUT', 'Tag "{{tag}}" was added to story "{{title}}"',
$t$Tag "{{tag}}" was added to story "{{title}}" by {{author}}:

{{story_url}}

Tags of the story now: {{tags}}
$t$),
('story/tag/DELETE', 'Tag "{{tag}}" was deleted from story "{{title}}"',
$t$Tag "{{tag}}" was deleted from story "{{title}}" by {{author}}:

{{story_url}}

Tags of the story now: {{tags}}
$t$),
('task/POST', 'Task "{{title}}" was created.',
$t$Task "{{title}}" was created by {{author}}:

{{story_url}}

Story: {{story_title}}
Project: {{project}}
Assignee: {{assignee}}
Status: {{status}}
Priority: {{priority}}
$t$),
('task/PUT', 'Task "{{title}}" was updated.',
$t$Task "{{title}}" was updated by {{author}}:

{{story_url}}

Story: {{story_title}}
Project: {{project}}
Assignee: {{assignee}}
Status: {{status}}
Priority: {{priority}}
Notes: {{link}}

Changes:
{{changes}}
$t$),
('task/DELETE', 'Task "{{title}}" was deleted by {{author}}',
$t$Task "{{title}}" was deleted by {{author}}:

{{story_url}}
$t$),
('worklist/POST', 'Worklist "{{title}}" was created by {{author}}',
$t$Worklist "{{title}}" was created by {{author}}:

{{worklist_url}}

{{event}}
$t$),
('worklist/PUT', 'Worklist "{{title}}" was updated by {{author}}',
$t$Worklist "{{title}}" was updated by {{author}}:

{{worklist_url}}

{{field}} changed
from: {{old_value}}
to:   {{new_value}}
$t$),
('worklist/filter/PUT', 'Worklist "{{title}}" had its filters modified by {{author}}',
$t$Worklist "{{title}}" had its filters modified by {{author}}:

{{filters}}
$t$),
('worklist/item/PUT', 'Worklist "{{title}}" had its content updated by {{author}}',
$t$Worklist "{{title}}" had its content updated by {{author}}:

{{items}}
$t$),
('worklist/permission/POST', 'New permission created for worklist "{{title}}" by {{author}}',
$t$New permission created for worklist "{{title}}" by {{author}}:

Permission: {{codename}}
Users: {{users}}
$t$),
('worklist/permission/PUT', 'A permission for worklist "{{title}}" was modified by {{author}}',
$t$A permission for worklist "{{title}}" was modified by {{author}}:

{{permission}}
People added: {{added}}
People removed: {{removed}}
$t$),
('digest', 'StoryBoard: {{count}} notifications since your last digest',
$t$Hello {{full_name}},

here is what happened on StoryBoard since your last digest.

{{items}}
$t$);

-- ---------------------------------------------------------------- the outbox
-- One row per mail: written by the email plugin in the event's own
-- transaction (so exactly once, like every effect of an event), sent by
-- the mailer worker after it commits.  status: pending (to send),
-- sent, failed (a permanent refusal, or out of attempts; retry_mail()
-- queues it again), digest (waits for the subscriber's daily digest).
CREATE TABLE storyboard_worker.outbox (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	created_at		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	subscriber_id	bigint,
	recipient		text NOT NULL,
	full_name		text,
	subject			text NOT NULL,
	body_text		text NOT NULL,
	body_html		text,
	message_id		text NOT NULL,
	in_reply_to		text,
	kind			text NOT NULL,
	story_id		bigint,
	story_title		text,
	digest_time		integer,
	status			text NOT NULL DEFAULT 'pending'
		CONSTRAINT outbox_status_check
		CHECK (status IN ('pending', 'sent', 'failed', 'digest')),
	attempts		integer NOT NULL DEFAULT 0,
	next_attempt_at	timestamptz NOT NULL DEFAULT pg_catalog.now(),
	sent_at			timestamptz,
	last_error		text,
	digest_id		bigint
);
CREATE INDEX outbox_pending_idx ON storyboard_worker.outbox (next_attempt_at)
	WHERE status = 'pending';
CREATE INDEX outbox_digest_idx ON storyboard_worker.outbox (subscriber_id, created_at)
	WHERE status = 'digest';
CREATE INDEX outbox_sent_idx ON storyboard_worker.outbox (sent_at)
	WHERE status = 'sent';
REVOKE ALL ON storyboard_worker.outbox FROM PUBLIC;
-- mail not sent yet survives pg_dump and a restore (sent mail is history)
SELECT pg_catalog.pg_extension_config_dump('storyboard_worker.outbox',
	'WHERE status OPERATOR(pg_catalog.<>) ''sent''');
SELECT pg_catalog.pg_extension_config_dump('storyboard_worker.outbox_id_seq', '');
COMMENT ON TABLE storyboard_worker.outbox IS
	'Email notifications: queued by the email plugin with the event, sent by the mailer';

-- ---------------------------------------------------------------- the plugin
-- {{ name }} placeholders of a template filled from a jsonb object (a
-- dotted name reads nested objects); html escapes the values.
CREATE FUNCTION storyboard_worker.render_template(template text, context jsonb,
												  html boolean DEFAULT false)
	RETURNS text
	AS 'MODULE_PATHNAME', 'sbw_render_template'
	LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Which template an event would use, and for whom: the event's resource
-- and id (a task DELETE reaches the subscribers of its story, as
-- StoryBoard's plugin does), the story whose privacy limits the recipients
-- (and whether it is private, when the message says), and a task's
-- project.  A NULL template: no mail for this event.  Runs as the plugin
-- role: StoryBoard's tables are found through its search_path.
CREATE FUNCTION storyboard_worker.email_route(e storyboard_worker.event,
	OUT template text, OUT kind text, OUT resource text, OUT resource_id bigint,
	OUT story_id bigint, OUT project_id bigint, OUT story_private boolean)
	LANGUAGE plpgsql STABLE AS $$
DECLARE
	et		text;
	info	jsonb;
	item	jsonb;
	method	text := e.method;
	sub		text := e.sub_resource;
BEGIN
	resource := e.resource;
	resource_id := e.resource_id;
	IF resource = 'timeline_event' THEN
		-- StoryBoard mails about worklist timeline events only
		resource_id := (e.resource_after OPERATOR(pg_catalog.->>) 'worklist_id')::bigint;
		IF resource_id IS NULL THEN
			RETURN;
		END IF;
		resource := 'worklist';
		et := COALESCE(e.resource_after OPERATOR(pg_catalog.->>) 'event_type', '');
		method := CASE WHEN pg_catalog.strpos(et, 'created') OPERATOR(pg_catalog.>) 0
					   THEN 'POST' ELSE 'PUT' END;
		sub := CASE WHEN pg_catalog.strpos(et, 'contents') OPERATOR(pg_catalog.>) 0 THEN 'item'
					WHEN pg_catalog.strpos(et, 'filters') OPERATOR(pg_catalog.>) 0 THEN 'filter'
					WHEN pg_catalog.strpos(et, 'permission') OPERATOR(pg_catalog.>) 0 THEN 'permission'
			   END;
		IF sub OPERATOR(pg_catalog.=) 'item' THEN
			-- the story (or task) the card is about: its privacy applies too
			info := storyboard_worker.email_event_info(e);
			item := COALESCE(info OPERATOR(pg_catalog.->) 'added',
										info OPERATOR(pg_catalog.->) 'removed',
										info OPERATOR(pg_catalog.#>) '{updated,old}');
			IF item OPERATOR(pg_catalog.->>) 'item_type' OPERATOR(pg_catalog.=) 'story' THEN
				story_id := (item OPERATOR(pg_catalog.->>) 'item_id')::bigint;
			ELSIF item OPERATOR(pg_catalog.->>) 'item_type' OPERATOR(pg_catalog.=) 'task' THEN
				SELECT t.story_id INTO story_id FROM tasks t
				 WHERE t.id = (item OPERATOR(pg_catalog.->>) 'item_id')::bigint;
				IF NOT FOUND THEN
					RAISE EXCEPTION 'task % is not visible yet', item OPERATOR(pg_catalog.->>) 'item_id'
						USING ERRCODE = 'SB001',
							  HINT = 'StoryBoard publishes before its transaction commits; retried.';
				END IF;
			END IF;
		END IF;
	ELSIF resource IS NULL OR resource NOT IN ('task', 'project_group', 'project', 'story') THEN
		resource := NULL;
		RETURN;
	END IF;
	IF method IS NULL OR method OPERATOR(pg_catalog.=) 'GET'
		OR COALESCE(e.status, 200) OPERATOR(pg_catalog.>=) 300 THEN
		resource := NULL;
		RETURN;
	END IF;
	kind := resource;
	template := resource OPERATOR(pg_catalog.||)
		COALESCE('/' OPERATOR(pg_catalog.||) sub, '')
		OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) method;
	IF resource OPERATOR(pg_catalog.=) 'story' THEN
		-- the message's own snapshot says whether the story is private now (a
		-- PUT making it private may not be visible in the table yet)
		story_id := resource_id;
		story_private := (COALESCE(e.resource_after, e.resource_before)
						  OPERATOR(pg_catalog.->>) 'private')::boolean;
	ELSIF resource OPERATOR(pg_catalog.=) 'task' THEN
		IF method OPERATOR(pg_catalog.=) 'DELETE' THEN
			-- the subscribers of its story; a story gone too counts as private
			resource := 'story';
			resource_id := (e.resource_before OPERATOR(pg_catalog.->>) 'story_id')::bigint;
			story_id := resource_id;
			story_private := COALESCE((SELECT st.private FROM stories st WHERE st.id = story_id), true);
		ELSE
			-- where the task is now: the snapshot, else the table (a task
			-- created in a transaction not committed yet: retried)
			story_id := (e.resource_after OPERATOR(pg_catalog.->>) 'story_id')::bigint;
			project_id := (e.resource_after OPERATOR(pg_catalog.->>) 'project_id')::bigint;
			IF story_id IS NULL THEN
				SELECT t.story_id, t.project_id INTO story_id, project_id
				  FROM tasks t WHERE t.id = e.resource_id;
				IF NOT FOUND THEN
					RAISE EXCEPTION 'task % is not visible yet', e.resource_id
						USING ERRCODE = 'SB001',
							  HINT = 'StoryBoard publishes before its transaction commits; retried.';
				END IF;
			END IF;
		END IF;
	END IF;
END
$$;

-- event_info of a timeline event, decoded (StoryBoard sends it as a JSON
-- string inside the message).
CREATE FUNCTION storyboard_worker.email_event_info(e storyboard_worker.event)
	RETURNS jsonb
	LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	RETURN (SELECT CASE pg_catalog.jsonb_typeof(e.resource_after OPERATOR(pg_catalog.->) 'event_info')
			   WHEN 'string' THEN (e.resource_after OPERATOR(pg_catalog.->>) 'event_info')::jsonb
			   WHEN 'object' THEN e.resource_after OPERATOR(pg_catalog.->) 'event_info'
		   END);
END
$$;

-- Whether a user preference reads as true: StoryBoard's webclient stores
-- 'true'/'false' strings, its API may store a bool 'True'.
CREATE FUNCTION storyboard_worker.email_preference(user_id bigint, key text)
	RETURNS text
	LANGUAGE plpgsql STABLE AS $$
BEGIN
	RETURN (SELECT p.value FROM user_preferences p
	 WHERE p.user_id = $1 AND p.key = $2
	 ORDER BY p.id DESC LIMIT 1);
END
$$;

CREATE FUNCTION storyboard_worker.email_subscribers(resource text, resource_id bigint,
													story_id bigint, project_id bigint)
	RETURNS bigint[]
	LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
	ids		bigint[];
BEGIN
	-- one branch per resource, each its own cached plan using the indexes
	IF $1 = 'story' THEN
		SELECT pg_catalog.array_agg(DISTINCT x.user_id) INTO ids FROM (
			SELECT s.user_id FROM subscriptions s
			 WHERE s.target_type::text = 'story' AND s.target_id = $2
			UNION ALL
			SELECT s.user_id FROM tasks t JOIN subscriptions s ON s.target_id = t.id
			 WHERE t.story_id = $2 AND s.target_type::text = 'task'
			UNION ALL
			SELECT s.user_id FROM (SELECT DISTINCT t.project_id FROM tasks t WHERE t.story_id = $2) p
			  JOIN subscriptions s ON s.target_id = p.project_id
			 WHERE s.target_type::text = 'project'
			UNION ALL
			SELECT s.user_id FROM (SELECT DISTINCT m.project_group_id FROM tasks t
									 JOIN project_group_mapping m ON m.project_id = t.project_id
									WHERE t.story_id = $2) g
			  JOIN subscriptions s ON s.target_id = g.project_group_id
			 WHERE s.target_type::text = 'project_group') x;
	ELSIF $1 = 'task' THEN
		-- its story and project as the message has them ($3, $4)
		SELECT pg_catalog.array_agg(DISTINCT x.user_id) INTO ids FROM (
			SELECT s.user_id FROM subscriptions s
			 WHERE s.target_type::text = 'task' AND s.target_id = $2
			UNION ALL
			SELECT s.user_id FROM subscriptions s
			 WHERE s.target_type::text = 'story' AND s.target_id = $3
			UNION ALL
			SELECT s.user_id FROM subscriptions s
			 WHERE s.target_type::text = 'project' AND s.target_id = $4
			UNION ALL
			SELECT s.user_id FROM project_group_mapping m
			  JOIN subscriptions s ON s.target_id = m.project_group_id
			 WHERE m.project_id = $4 AND s.target_type::text = 'project_group') x;
	ELSIF $1 = 'project' THEN
		SELECT pg_catalog.array_agg(DISTINCT x.user_id) INTO ids FROM (
			SELECT s.user_id FROM subscriptions s
			 WHERE s.target_type::text = 'project' AND s.target_id = $2
			UNION ALL
			SELECT s.user_id FROM project_group_mapping m JOIN subscriptions s ON s.target_id = m.project_group_id
			 WHERE m.project_id = $2 AND s.target_type::text = 'project_group') x;
	ELSIF $1 IN ('project_group', 'worklist') THEN
		SELECT pg_catalog.array_agg(DISTINCT s.user_id) INTO ids FROM subscriptions s
		 WHERE s.target_type::text = $1 AND s.target_id = $2;
	END IF;
	RETURN ids;
END
$$;

-- Who gets mail about an event (reference: storyboard-email.md section 3):
-- the subscribers of the resource (email_subscribers()) whose
-- plugin_email_enable is true; a private story only to users who may see
-- it (directly or through a team); worklist mail only to those with
-- receive_notifications_worklists and, for a private worklist, its
-- permission.  digest: the mail waits for the subscriber's daily digest.
CREATE FUNCTION storyboard_worker.email_recipients(resource text, resource_id bigint,
												   story_id bigint, project_id bigint,
												   story_private boolean)
	RETURNS TABLE (user_id bigint, email text, full_name text, digest boolean,
				   digest_time integer)
	LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
	ids		bigint[] := storyboard_worker.email_subscribers($1, $2, $3, $4);
	is_private	boolean := $5;
BEGIN
	IF ids IS NULL THEN
		RETURN;
	END IF;
	IF $3 IS NOT NULL AND is_private IS NULL THEN
		-- fails closed: a story not visible yet is retried, not taken for public
		SELECT st.private INTO is_private FROM stories st WHERE st.id = $3;
		IF NOT FOUND THEN
			RAISE EXCEPTION 'story % is not visible yet', $3
				USING ERRCODE = 'SB001',
					  HINT = 'StoryBoard publishes before its transaction commits; retried.';
		END IF;
	END IF;
	RETURN QUERY
	SELECT u.id::bigint, u.email::text, u.full_name::text,
		   pg_catalog.lower(COALESCE(pr.digest, '')) = 'true',
		   CASE WHEN pr.digest_time ~ '^[0-9]{1,5}$' THEN LEAST(pr.digest_time::integer, 86399)
				ELSE 28800 END
	  FROM users u
	  -- the preferences, the newest row of each key deciding (one sort for all)
	  LEFT JOIN (SELECT d.user_id,
						pg_catalog.max(d.value) FILTER (WHERE d.key = 'plugin_email_enable') AS enable,
						pg_catalog.max(d.value) FILTER (WHERE d.key = 'plugin_email_digest') AS digest,
						pg_catalog.max(d.value) FILTER (WHERE d.key = 'plugin_email_digest_time') AS digest_time,
						pg_catalog.max(d.value) FILTER (WHERE d.key = 'receive_notifications_worklists') AS worklists
				   FROM (SELECT DISTINCT ON (p.user_id, p.key) p.user_id, p.key, p.value
						   FROM user_preferences p
						  WHERE p.user_id = ANY (ids)
							AND p.key IN ('plugin_email_enable', 'plugin_email_digest',
										  'plugin_email_digest_time', 'receive_notifications_worklists')
						  ORDER BY p.user_id, p.key, p.id DESC) d
				  GROUP BY d.user_id) pr ON pr.user_id = u.id
	 WHERE u.id = ANY (ids)
	   AND u.email IS NOT NULL AND u.email <> ''
	   AND pg_catalog.lower(COALESCE(pr.enable, '')) = 'true'
	   -- a private story (or the story a worklist card is about)
	   AND ($3 IS NULL
			OR NOT COALESCE(is_private, false)
			OR EXISTS (SELECT 1 FROM story_permissions sp
						 JOIN user_permissions up ON up.permission_id = sp.permission_id
						WHERE sp.story_id = $3 AND up.user_id = u.id)
			OR EXISTS (SELECT 1 FROM story_permissions sp
						 JOIN team_permissions tp ON tp.permission_id = sp.permission_id
						 JOIN team_membership ms ON ms.team_id = tp.team_id
						WHERE sp.story_id = $3 AND ms.user_id = u.id))
	   -- worklists: the preference, and a private worklist's permission
	   AND ($1 <> 'worklist'
			OR (pg_catalog.lower(COALESCE(pr.worklists, '')) = 'true'
				AND (NOT COALESCE((SELECT w.private FROM worklists w WHERE w.id = $2), false)
					 OR EXISTS (SELECT 1 FROM worklist_permissions wp
								  JOIN user_permissions up ON up.permission_id = wp.permission_id
								 WHERE wp.worklist_id = $2 AND up.user_id = u.id))))
	 ORDER BY u.id;
END
$$;

-- The context a template is filled from: the names each template uses,
-- from the message's own snapshots where it holds them (StoryBoard
-- publishes before its transaction commits, so the database may not show
-- the change yet) and from StoryBoard's tables for the rest.  Raises SB001
-- (retry later) while a row the mail needs is not visible yet.
CREATE FUNCTION storyboard_worker.email_context(e storyboard_worker.event, template text,
												resource_id bigint)
	RETURNS jsonb
	LANGUAGE plpgsql STABLE AS $$
DECLARE
	base	text := COALESCE(NULLIF(e.url, ''),
					pg_catalog.current_setting('storyboard_worker.email_default_url', true), '');
	ctx		jsonb;
	snap	jsonb := COALESCE(e.resource_after, e.resource_before);
	sid		bigint;
	info	jsonb;
	created	timestamp;
BEGIN
	ctx := pg_catalog.jsonb_build_object(
		-- the author's name, looked up here only for events that mail someone
		-- (registered without reads_author: no lookup per event for the rest)
		'author', COALESCE(e.author OPERATOR(pg_catalog.->>) 'full_name',
						   (SELECT u.full_name FROM users u WHERE u.id = e.author_id), 'Someone'),
		'url', base);
	IF pg_catalog.starts_with(template, 'story/') OR pg_catalog.starts_with(template, 'task/') THEN
		IF pg_catalog.starts_with(template, 'story/') THEN
			sid := resource_id;
		ELSE
			sid := (snap OPERATOR(pg_catalog.->>) 'story_id')::bigint;
		END IF;
		SELECT s.created_at INTO created FROM stories s WHERE s.id = sid;
		ctx := ctx OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(
			'title', snap OPERATOR(pg_catalog.->>) 'title',
			'story_id', sid,
			'story_url', base OPERATOR(pg_catalog.||) '#!/story/' OPERATOR(pg_catalog.||) sid,
			'thread', 'story.' OPERATOR(pg_catalog.||)
				COALESCE(pg_catalog.to_char(created, 'YYYYMMDDHH24MI'), '0')
				OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) sid);
	END IF;
	IF pg_catalog.starts_with(template, 'story/') THEN
		ctx := ctx OPERATOR(pg_catalog.||) storyboard_worker.email_story_context(e, template, sid);
	ELSIF pg_catalog.starts_with(template, 'task/') THEN
		ctx := ctx OPERATOR(pg_catalog.||) storyboard_worker.email_task_context(e, template, sid);
	ELSIF pg_catalog.starts_with(template, 'worklist/') THEN
		ctx := ctx OPERATOR(pg_catalog.||)
			storyboard_worker.email_worklist_context(e, template, resource_id, base);
	END IF;
	RETURN ctx;
END
$$;

-- "key: before -> after" for every field an update changed (StoryBoard's
-- get_changed_properties: created_at and updated_at left out, a missing
-- key is None, equal values left out).
CREATE FUNCTION storyboard_worker.email_changes(before jsonb, after jsonb)
	RETURNS text
	LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	RETURN (SELECT pg_catalog.string_agg(k OPERATOR(pg_catalog.||) ': '
			 OPERATOR(pg_catalog.||) COALESCE($1 OPERATOR(pg_catalog.->>) k, 'None')
			 OPERATOR(pg_catalog.||) ' -> '
			 OPERATOR(pg_catalog.||) COALESCE($2 OPERATOR(pg_catalog.->>) k, 'None'),
			 E'\n' ORDER BY k)
	  FROM (SELECT pg_catalog.jsonb_object_keys(COALESCE($1, '{}'))
			UNION SELECT pg_catalog.jsonb_object_keys(COALESCE($2, '{}'))) AS keys(k)
	 WHERE k NOT IN ('created_at', 'updated_at')
	   AND COALESCE($1 OPERATOR(pg_catalog.->) k, 'null')
		   IS DISTINCT FROM COALESCE($2 OPERATOR(pg_catalog.->) k, 'null'));
END
$$;

-- %XX and + of a query string value, decoded (UTF-8); as it is if that is
-- not UTF-8.
CREATE FUNCTION storyboard_worker.email_url_decode(s text)
	RETURNS text
	LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
	RETURN (SELECT pg_catalog.convert_from(COALESCE(pg_catalog.string_agg(
			 CASE WHEN m[1] IS NOT NULL THEN pg_catalog.decode(pg_catalog.substr(m[1], 2), 'hex')
				  ELSE pg_catalog.convert_to(m[2], 'UTF8') END, ''::bytea ORDER BY n), ''::bytea), 'UTF8')
	  FROM pg_catalog.regexp_matches(pg_catalog.replace($1, '+', ' '),
									 '(%[0-9A-Fa-f]{2})|([^%]+|%)', 'g') WITH ORDINALITY AS r(m, n));
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
	RETURN $1;	-- not UTF-8 once decoded: shown as it came
END
$$;

CREATE FUNCTION storyboard_worker.email_story_context(e storyboard_worker.event, template text,
													  sid bigint)
	RETURNS jsonb
	LANGUAGE plpgsql STABLE AS $$
DECLARE
	ctx		jsonb := '{}';
	c		record;
	tag		text;
	tags	text;
	has_tag	boolean;
BEGIN
	IF template OPERATOR(pg_catalog.=) 'story/POST' THEN
		ctx := pg_catalog.jsonb_build_object('description',
			e.resource_after OPERATOR(pg_catalog.->>) 'description');
	ELSIF template OPERATOR(pg_catalog.=) 'story/PUT' THEN
		ctx := pg_catalog.jsonb_build_object('changes',
			storyboard_worker.email_changes(e.resource_before, e.resource_after));
	ELSIF template OPERATOR(pg_catalog.=) 'story/comment/POST' THEN
		SELECT cm.content, cm.created_at INTO c FROM comments cm WHERE cm.id = e.sub_resource_id;
		IF NOT FOUND THEN
			RAISE EXCEPTION 'comment % is not visible yet', e.sub_resource_id
				USING ERRCODE = 'SB001',
					  HINT = 'StoryBoard publishes before its transaction commits; retried.';
		END IF;
		ctx := pg_catalog.jsonb_build_object('comment', c.content,
			'comment_created_at', pg_catalog.to_char(c.created_at, 'YYYY-MM-DD HH24:MI:SS'));
	ELSIF pg_catalog.starts_with(template, 'story/tag/') THEN
		-- the tag from the query string (tags=x), as StoryBoard's template
		-- prints it, but decoded; several are joined
		SELECT pg_catalog.string_agg(storyboard_worker.email_url_decode(
				   pg_catalog.substr(kv, pg_catalog.strpos(kv, '=') OPERATOR(pg_catalog.+) 1)), ', ')
		  INTO tag
		  FROM pg_catalog.regexp_split_to_table(COALESCE(e.query_string, ''), '&') AS kv
		 WHERE pg_catalog.strpos(kv, '=') OPERATOR(pg_catalog.>) 0;
		IF pg_catalog.to_regclass('story_storytags') IS NOT NULL
			AND pg_catalog.to_regclass('storytags') IS NOT NULL THEN
			EXECUTE 'SELECT string_agg(t.name, '', '' ORDER BY t.name),'
					'       bool_or(t.name = $2)'
					'  FROM story_storytags st JOIN storytags t ON t.id = st.storytag_id'
					' WHERE st.story_id = $1'
			   INTO tags, has_tag USING sid, tag;
			-- not yet visible: an added tag missing, a deleted one still there
			IF tag IS NOT NULL AND pg_catalog.strpos(tag, ',') OPERATOR(pg_catalog.=) 0
				AND COALESCE(has_tag, false) OPERATOR(pg_catalog.<>)
					(e.method OPERATOR(pg_catalog.=) 'PUT') THEN
				RAISE EXCEPTION 'the tags of story % do not show this change yet', sid
					USING ERRCODE = 'SB001',
						  HINT = 'StoryBoard publishes before its transaction commits; retried.';
			END IF;
		END IF;
		ctx := pg_catalog.jsonb_build_object('tag', tag, 'tags', COALESCE(tags, ''));
	END IF;
	RETURN ctx;
END
$$;

CREATE FUNCTION storyboard_worker.email_task_context(e storyboard_worker.event, template text,
													 sid bigint)
	RETURNS jsonb
	LANGUAGE plpgsql STABLE AS $$
DECLARE
	snap	jsonb := COALESCE(e.resource_after, e.resource_before);
BEGIN
	RETURN pg_catalog.jsonb_build_object(
		'story_title', (SELECT s.title FROM stories s WHERE s.id = sid),
		'project', (SELECT p.name FROM projects p
					 WHERE p.id = (snap OPERATOR(pg_catalog.->>) 'project_id')::bigint),
		'assignee', (SELECT u.full_name FROM users u
					  WHERE u.id = (snap OPERATOR(pg_catalog.->>) 'assignee_id')::bigint),
		'status', snap OPERATOR(pg_catalog.->>) 'status',
		'priority', snap OPERATOR(pg_catalog.->>) 'priority',
		'link', snap OPERATOR(pg_catalog.->>) 'link',
		'changes', CASE WHEN template OPERATOR(pg_catalog.=) 'task/PUT'
						THEN storyboard_worker.email_changes(e.resource_before, e.resource_after) END);
END
$$;

-- The full names of users, by id, in order.
CREATE FUNCTION storyboard_worker.email_user_names(ids jsonb)
	RETURNS text
	LANGUAGE plpgsql STABLE AS $$
BEGIN
	RETURN (SELECT pg_catalog.string_agg(COALESCE(u.full_name, 'user ' OPERATOR(pg_catalog.||) i.id), ', '
								 ORDER BY i.n)
	  FROM pg_catalog.jsonb_array_elements_text(
			   CASE pg_catalog.jsonb_typeof($1) WHEN 'array' THEN $1 ELSE '[]' END)
		   WITH ORDINALITY AS i(id, n)
	  LEFT JOIN users u ON u.id::text = i.id);
END
$$;

-- One line per key of a worklist filter or card object.
CREATE FUNCTION storyboard_worker.email_describe(label text, obj jsonb)
	RETURNS text
	LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	RETURN (SELECT CASE WHEN $2 IS NULL OR pg_catalog.jsonb_typeof($2) OPERATOR(pg_catalog.=) 'null' THEN NULL
				WHEN pg_catalog.jsonb_typeof($2) OPERATOR(pg_catalog.<>) 'object'
				THEN $1 OPERATOR(pg_catalog.||) ': ' OPERATOR(pg_catalog.||) ($2)::text
				ELSE $1 OPERATOR(pg_catalog.||) E':\n' OPERATOR(pg_catalog.||)
					 (SELECT pg_catalog.string_agg('  ' OPERATOR(pg_catalog.||) k OPERATOR(pg_catalog.||) ': '
							OPERATOR(pg_catalog.||) CASE pg_catalog.jsonb_typeof(v)
													  WHEN 'string' THEN v OPERATOR(pg_catalog.#>>) '{}'
													  ELSE v::text END,
							E'\n' ORDER BY k)
						FROM pg_catalog.jsonb_each($2) AS x(k, v))
		   END);
END
$$;

CREATE FUNCTION storyboard_worker.email_worklist_context(e storyboard_worker.event,
														 template text, wid bigint, base text)
	RETURNS jsonb
	LANGUAGE plpgsql STABLE AS $$
DECLARE
	info	jsonb := storyboard_worker.email_event_info(e);
	title	text;
	created	timestamp;
	ctx		jsonb;
	code	text;
BEGIN
	SELECT w.title, w.created_at INTO title, created FROM worklists w WHERE w.id = wid;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'worklist % is not visible yet', wid
			USING ERRCODE = 'SB001',
				  HINT = 'StoryBoard publishes before its transaction commits; retried.';
	END IF;
	ctx := pg_catalog.jsonb_build_object(
		'title', title,
		'worklist_url', base OPERATOR(pg_catalog.||) '#!/worklist/' OPERATOR(pg_catalog.||) wid,
		'thread', 'worklist.' OPERATOR(pg_catalog.||)
			COALESCE(pg_catalog.to_char(created, 'YYYYMMDDHH24MI'), '0')
			OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) wid);
	IF template OPERATOR(pg_catalog.=) 'worklist/POST' THEN
		ctx := ctx OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('event',
			pg_catalog.jsonb_pretty(e.resource_after));
	ELSIF template OPERATOR(pg_catalog.=) 'worklist/PUT' THEN
		ctx := ctx OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(
			'field', pg_catalog.initcap(pg_catalog.replace(info OPERATOR(pg_catalog.->>) 'field', '_', ' ')),
			'old_value', info OPERATOR(pg_catalog.->>) 'old_value',
			'new_value', info OPERATOR(pg_catalog.->>) 'new_value');
	ELSIF template OPERATOR(pg_catalog.=) 'worklist/filter/PUT' THEN
		ctx := ctx OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('filters',
			pg_catalog.concat_ws(E'\n\n',
				storyboard_worker.email_describe('Filter added', info OPERATOR(pg_catalog.->) 'added'),
				storyboard_worker.email_describe('Filter removed', info OPERATOR(pg_catalog.->) 'removed'),
				storyboard_worker.email_describe('Filter updated from', info OPERATOR(pg_catalog.#>) '{updated,old}'),
				storyboard_worker.email_describe('Filter updated to', info OPERATOR(pg_catalog.#>) '{updated,new}')));
	ELSIF template OPERATOR(pg_catalog.=) 'worklist/item/PUT' THEN
		ctx := ctx OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('items',
			pg_catalog.concat_ws(E'\n\n',
				storyboard_worker.email_describe('Card added', info OPERATOR(pg_catalog.->) 'added'),
				storyboard_worker.email_describe('Card archived', info OPERATOR(pg_catalog.->) 'removed'),
				storyboard_worker.email_describe('Card moved or changed, before', info OPERATOR(pg_catalog.#>) '{updated,old}'),
				storyboard_worker.email_describe('Card moved or changed, after', info OPERATOR(pg_catalog.#>) '{updated,new}')));
	ELSIF pg_catalog.starts_with(template, 'worklist/permission/') THEN
		code := info OPERATOR(pg_catalog.->>) 'codename';
		ctx := ctx OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(
			'codename', code,
			'permission', CASE code WHEN 'edit_worklist' THEN 'Owners'
									WHEN 'move_items' THEN 'Users' ELSE code END,
			'users', storyboard_worker.email_user_names(info OPERATOR(pg_catalog.->) 'users'),
			'added', storyboard_worker.email_user_names(info OPERATOR(pg_catalog.->) 'added'),
			'removed', storyboard_worker.email_user_names(info OPERATOR(pg_catalog.->) 'removed'));
	END IF;
	RETURN ctx;
END
$$;

-- The plugin itself, registered after "subscription"; enabled() is
-- storyboard_worker.email_enable.  It looks the author up itself, and only
-- when there is mail to write.
CREATE FUNCTION storyboard_worker.email_handler(event storyboard_worker.event)
	RETURNS void
	AS 'MODULE_PATHNAME', 'sbw_email_handler'
	LANGUAGE C VOLATILE;
-- The host name in Message-IDs and thread ids (email_smtp_local_hostname,
-- else this host's name).
CREATE FUNCTION storyboard_worker.email_host()
	RETURNS text
	AS 'MODULE_PATHNAME', 'sbw_email_host_sql'
	LANGUAGE C STABLE;
CREATE FUNCTION storyboard_worker.email_enabled()
	RETURNS boolean
	AS 'MODULE_PATHNAME', 'sbw_email_enabled'
	LANGUAGE C STABLE;
COMMENT ON FUNCTION storyboard_worker.email_handler(storyboard_worker.event) IS
	'The built-in "email" plugin: queues StoryBoard''s notification mails in storyboard_worker.outbox';
REVOKE ALL ON FUNCTION storyboard_worker.email_handler(storyboard_worker.event) FROM PUBLIC;
SELECT storyboard_worker.register_plugin('email',
	'storyboard_worker.email_handler(storyboard_worker.event)',
	'storyboard_worker.email_enabled()', false);
-- like "subscription", CREATE EXTENSION registers it: pg_dump leaves it out;
-- the identities of the registry and the dead letters go on after a restore
SELECT pg_catalog.pg_extension_config_dump('storyboard_worker.plugins',
	'WHERE name OPERATOR(pg_catalog.<>) ALL (''{subscription,email}''::text[])');
SELECT pg_catalog.pg_extension_config_dump('storyboard_worker.plugins_position_seq', '');
SELECT pg_catalog.pg_extension_config_dump('storyboard_worker.dead_letters_id_seq', '');

-- ---------------------------------------------------------------- digests
-- Queue the digests that are due: for every subscriber with mails waiting
-- (status digest) from before the last time of day their
-- plugin_email_digest_time names (UTC), one mail listing them, grouped by
-- story; with force, every waiting mail.  The mails listed are marked sent
-- (digest_id names the digest).  Returns how many digests were queued.
CREATE FUNCTION storyboard_worker.send_digests(force boolean DEFAULT false)
	RETURNS integer
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	r		record;
	tmpl	record;
	n		integer := 0;
	digest	bigint;
	ids		bigint[];
	items	text;
	ctx		jsonb;
	host	text := storyboard_worker.email_host();
BEGIN
	SELECT t.subject, t.body_text, t.body_html INTO tmpl
	  FROM (SELECT o.subject, o.body_text, o.body_html, 0 AS pref
			  FROM storyboard_worker.email_templates o WHERE o.name OPERATOR(pg_catalog.=) 'digest'
			UNION ALL
			SELECT d.subject, d.body_text, d.body_html, 1
			  FROM storyboard_worker.email_templates_default d WHERE d.name OPERATOR(pg_catalog.=) 'digest') t
	 ORDER BY t.pref LIMIT 1;
	FOR r IN
		SELECT o.subscriber_id, o.recipient,
			   (pg_catalog.array_agg(o.full_name ORDER BY o.id DESC))[1] AS full_name,
			   (pg_catalog.array_agg(o.digest_time ORDER BY o.id DESC))[1] AS digest_time
		  FROM storyboard_worker.outbox o
		 WHERE o.status OPERATOR(pg_catalog.=) 'digest'
		 GROUP BY o.subscriber_id, o.recipient
	LOOP
		-- the waiting mails from before the last digest time of day that
		-- has passed (UTC)
		ids := ARRAY(
		SELECT o.id FROM storyboard_worker.outbox o
		 WHERE o.status OPERATOR(pg_catalog.=) 'digest'
		   AND o.subscriber_id IS NOT DISTINCT FROM r.subscriber_id
		   AND o.recipient OPERATOR(pg_catalog.=) r.recipient
		   AND (force OR o.created_at OPERATOR(pg_catalog.<)
				(SELECT CASE WHEN b OPERATOR(pg_catalog.>) pg_catalog.now()
							 THEN b OPERATOR(pg_catalog.-) interval '1 day' ELSE b END
				   FROM (SELECT (pg_catalog.date_trunc('day', pg_catalog.now() AT TIME ZONE 'UTC')
								 OPERATOR(pg_catalog.+) pg_catalog.make_interval(
									 secs => COALESCE(r.digest_time, 28800)::double precision))
								AT TIME ZONE 'UTC' AS b) x))
		 ORDER BY o.id
		   FOR UPDATE OF o SKIP LOCKED);
		CONTINUE WHEN pg_catalog.cardinality(ids) OPERATOR(pg_catalog.=) 0;
		SELECT pg_catalog.string_agg(s.block, E'\n\n' ORDER BY s.first_id) INTO items
		  FROM (SELECT pg_catalog.min(o.id) AS first_id,
					   COALESCE('Story "' OPERATOR(pg_catalog.||)
							(pg_catalog.array_agg(o.story_title ORDER BY o.id DESC))[1]
						   OPERATOR(pg_catalog.||) '"', 'Worklists')
					   OPERATOR(pg_catalog.||) E':\n' OPERATOR(pg_catalog.||)
					   pg_catalog.string_agg('  - ' OPERATOR(pg_catalog.||)
						   pg_catalog.to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')
						   OPERATOR(pg_catalog.||) ' UTC  ' OPERATOR(pg_catalog.||) o.subject,
						   E'\n' ORDER BY o.id) AS block
				  FROM storyboard_worker.outbox o
				 WHERE o.id OPERATOR(pg_catalog.=) ANY (ids)
				 GROUP BY o.story_id) s;
		ctx := pg_catalog.jsonb_build_object('full_name', COALESCE(r.full_name, r.recipient),
			'count', pg_catalog.cardinality(ids), 'items', items);
		INSERT INTO storyboard_worker.outbox (subscriber_id, recipient, full_name, subject, body_text,
											  body_html, message_id, kind)
		VALUES (r.subscriber_id, r.recipient, r.full_name,
				storyboard_worker.render_template(tmpl.subject, ctx),
				storyboard_worker.render_template(tmpl.body_text, ctx),
				CASE WHEN tmpl.body_html IS NOT NULL
					 THEN storyboard_worker.render_template(tmpl.body_html, ctx, true) END,
				'<storyboard.digest.' OPERATOR(pg_catalog.||) pg_catalog.gen_random_uuid()
					OPERATOR(pg_catalog.||) '@' OPERATOR(pg_catalog.||) host OPERATOR(pg_catalog.||) '>',
				'digest')
		RETURNING id INTO digest;
		UPDATE storyboard_worker.outbox o
		   SET status = 'sent', sent_at = pg_catalog.now(), digest_id = digest
		 WHERE o.id OPERATOR(pg_catalog.=) ANY (ids);
		n := n OPERATOR(pg_catalog.+) 1;
	END LOOP;
	IF n OPERATOR(pg_catalog.>) 0 THEN
		PERFORM storyboard_worker.wake_workers();
	END IF;
	RETURN n;
END
$$;
REVOKE ALL ON FUNCTION storyboard_worker.send_digests(boolean) FROM PUBLIC;

-- A failed mail, queued again (attempts start over).
CREATE FUNCTION storyboard_worker.retry_mail(id bigint)
	RETURNS boolean
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	UPDATE storyboard_worker.outbox o
	   SET status = 'pending', attempts = 0, next_attempt_at = pg_catalog.now(), last_error = NULL
	 WHERE o.id OPERATOR(pg_catalog.=) retry_mail.id AND o.status OPERATOR(pg_catalog.=) 'failed';
	IF NOT FOUND THEN
		RETURN false;
	END IF;
	PERFORM storyboard_worker.wake_workers();
	RETURN true;
END
$$;
REVOKE ALL ON FUNCTION storyboard_worker.retry_mail(bigint) FROM PUBLIC;

-- ---------------------------------------------------------------- status
CREATE FUNCTION storyboard_worker.mailer_status(
	OUT pid integer, OUT state text, OUT mails_sent bigint, OUT mails_failed bigint,
	OUT mails_retried bigint, OUT last_sent_at timestamptz, OUT last_error text,
	OUT last_error_at timestamptz)
	RETURNS record
	AS 'MODULE_PATHNAME', 'sbw_mailer_status'
	LANGUAGE C VOLATILE;

CREATE VIEW storyboard_worker.outbox_stats AS
SELECT (SELECT pg_catalog.count(*) FROM storyboard_worker.outbox
		 WHERE status OPERATOR(pg_catalog.=) 'pending') AS pending,
	   (SELECT pg_catalog.count(*) FROM storyboard_worker.outbox
		 WHERE status OPERATOR(pg_catalog.=) 'sent') AS sent,
	   (SELECT pg_catalog.count(*) FROM storyboard_worker.outbox
		 WHERE status OPERATOR(pg_catalog.=) 'failed') AS failed,
	   (SELECT pg_catalog.count(*) FROM storyboard_worker.outbox
		 WHERE status OPERATOR(pg_catalog.=) 'digest') AS digest,
	   (SELECT pg_catalog.min(next_attempt_at) FROM storyboard_worker.outbox
		 WHERE status OPERATOR(pg_catalog.=) 'pending') AS next_attempt_at,
	   m.pid AS mailer_pid, m.state AS mailer_state, m.mails_sent, m.mails_failed,
	   m.mails_retried, m.last_sent_at, m.last_error, m.last_error_at
  FROM storyboard_worker.mailer_status() m;
-- last_error may hold recipients' addresses: the owner's, or granted
REVOKE ALL ON storyboard_worker.outbox_stats FROM PUBLIC;
