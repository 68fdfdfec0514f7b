-- Hostile message bodies through process_event: each one is kept as a dead
-- letter (plugin NULL) with a precise error and SQLSTATE; no plugin runs.
CREATE EXTENSION storyboard_worker;
SET client_min_messages = error;
SELECT storyboard_worker.unregister_plugin('subscription');
CREATE TABLE ran (n int);
CREATE FUNCTION count_it(e storyboard_worker.event) RETURNS void LANGUAGE sql
  AS 'INSERT INTO ran VALUES (1)';
SELECT storyboard_worker.register_plugin('count_it', 'count_it(storyboard_worker.event)');

CREATE TABLE hostile (n serial, body text);
INSERT INTO hostile (body) VALUES
 ('{"resource":"task"} x'),
 ('[{"resource":"task"}]'),
 ('{''resource'':''task''}'),
 ('{"resource":"task","status":NaN}'),
 ('{"resource":"task","x":' || repeat('[',64) || repeat(']',64) || '}'),
 ('{"resource":"task","resource_id":1,"resource_id":"x"}'),
 ('{"resource":"task","resource_after":{"id":1,"title":"x\u0000"}}'),
 ('{"resource":"task","resource_before":{"ti\u0000tle":"x"}}'),
 ('{"resource":"task","url":"\ud800"}'),
 ('{"resource":"task","resource_after":{"id":18446744073709551616}}'),
 ('{"author_id":-9223372036854775809,"resource":"task"}'),
 ('{"resource":"task","status":2147483648}'),
 ('{"resource":"task","resource_after":{"x":1e131072}}'),
 ('{"resource":"task","sub_resource_id":"-1"}'),
 ('{"resource":"task","resource_after":[{"id":1}]}'),
 ('{"method":"PUT","resource_id":1}'),
 ('{"resource":"task","resource_after":{"a":01}}'),
 ('{"resource":"task"'),
 (''),
 ('"just a string"'),
 ('{"resource":"task","author_id":1.5}'),
 ('{"resource":"task","url":["a"]}'),
 ('{"resource":"task","query_string":{}}'),
 ('{"resource":"task","path":false}'),
 ('{"resource":"task","status":"two hundred"}'),
 ('{"resource":"task","method":"post"}'),
 ('{"resource":"task","sub_resource":7}'),
 ('{"resource":"task","resource_before":"{}"}'),
 ('{"resource":"task","x":1e999999}'),
 ('{"resource":"task","resource_id":1e999999}');

SELECT h.n, r.plugin, r.succeeded, r.sqlstate, r.error, r.dead_letter_id IS NOT NULL AS kept
  FROM hostile h, LATERAL storyboard_worker.process_event(h.body, 'task') r
 ORDER BY h.n;
SELECT count(*) AS plugin_runs FROM ran;
-- every body is kept byte for byte
SELECT count(*) AS kept_exactly
  FROM hostile h JOIN storyboard_worker.dead_letters d ON d.body = convert_to(h.body, 'UTF8');

-- Invalid UTF-8 cannot be a text argument; replay a dead letter holding it.
INSERT INTO storyboard_worker.dead_letters (routing_key, body, error)
VALUES ('task', '\x7b227265736f75726365223a227461736b222c2275726c223a22ff227d'::bytea, 'injected');
SELECT storyboard_worker.replay(max(id)) FROM storyboard_worker.dead_letters;
SELECT error, sqlstate, replay_count FROM storyboard_worker.dead_letters WHERE routing_key = 'task' AND error LIKE 'invalid UTF-8%';

-- Good bodies still go through, with falsy values as NULL.
SELECT plugin, succeeded FROM storyboard_worker.process_event('{"resource":"task","resource_id":"007","status":"201","author_id":null,"resource_before":{},"url":""}');
SELECT count(*) AS plugin_runs FROM ran;
-- Duplicate keys: the last one wins, as for Python's json.loads in StoryBoard.
SELECT plugin, succeeded FROM storyboard_worker.process_event('{"resource":"nope","resource":"task"}');
SELECT count(*) AS plugin_runs FROM ran;
-- Numbers numeric cannot hold: jsonb_in refuses the snapshot, a dead letter.
SELECT plugin, succeeded, sqlstate, error FROM storyboard_worker.process_event('{"resource":"task","resource_before":{"x":1.5e-16383},"resource_after":{"x":0.5}}');
SELECT count(*) AS plugin_runs FROM ran;

DROP EXTENSION storyboard_worker CASCADE;
DROP TABLE ran, hostile;
