-- Email templates: {{ name }} substitution over a jsonb context, nothing more.
SET client_min_messages = warning;
CREATE EXTENSION storyboard_worker;
SELECT storyboard_worker.render_template('Story "{{title}}" by {{ author }}.',
	'{"title": "T", "author": "Ann"}');
-- dotted names read nested objects; numbers, booleans and objects print as JSON;
-- null and missing keys print nothing (StoryBoard's Jinja printed "None")
SELECT storyboard_worker.render_template('{{a.b.c}}|{{n}}|{{t}}|{{o}}|{{nul}}|{{missing}}|{{a.missing}}',
	'{"a": {"b": {"c": "deep"}}, "n": 12.5, "t": true, "o": {"x": [1, 2]}, "nul": null}');
-- values are not templates: a value holding {{x}} prints as it is
SELECT storyboard_worker.render_template('{{v}}', '{"v": "{{x}}", "x": "no"}');
-- what is not a placeholder is kept
SELECT storyboard_worker.render_template('{{ }} {{not closed {x}} }}{{ok}}', '{"ok": "yes"}');
-- HTML: values escaped, the template not
SELECT storyboard_worker.render_template('<b>{{v}}</b>',
	'{"v": "<script>alert(\"x\") & ''y''</script>"}', true);
SELECT storyboard_worker.render_template('{{v}}', '{"v": "<i>"}', false);
-- the context must be an object
SELECT storyboard_worker.render_template('{{v}}', '[1]');
-- every template StoryBoard has, and the digest
SELECT name FROM storyboard_worker.email_templates_default ORDER BY name;
-- the defaults render the subjects StoryBoard's templates produce
SELECT name, storyboard_worker.render_template(subject,
	'{"title": "Fix it", "author": "Ann", "tag": "bug", "count": 3}') AS subject
  FROM storyboard_worker.email_templates_default ORDER BY name;
-- the plugin is registered after "subscription", enabled by email_enable
SELECT name, enabled, reads_author FROM storyboard_worker.plugins ORDER BY position;
SELECT storyboard_worker.email_enabled();
-- helpers: StoryBoard's changed-fields list, query-string decoding
SELECT storyboard_worker.email_changes('{"title": "a", "updated_at": 1, "x": 1, "y": null}',
	'{"title": "b", "updated_at": 2, "x": 1, "z": 3}');
SELECT storyboard_worker.email_url_decode('urgent%20fix+%C3%A9t%C3%A9%2');
-- not UTF-8 once decoded: as it came
SELECT storyboard_worker.email_url_decode('bad%FFbyte');
DROP EXTENSION storyboard_worker;
