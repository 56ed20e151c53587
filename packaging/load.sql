-- The application for the compose demo (pgbench -f): 9 in 10 transactions
-- rename a random user, 1 in 10 sign a new one up. It is a well-behaved
-- application across the migration's deploys:
--   * before expand, and while :dual_write is 0, it writes full_name only:
--     the old application, whose every write the sync phase corrects;
--   * with -D dual_write=1 (LOAD_DUAL_WRITE=1 in docker-compose.yml) it also
--     writes first_name and last_name once they exist: the new application,
--     so corrections stop and dual_write.detect=auto moves on to verify;
--   * once the contract has dropped full_name, it writes only the new columns.
-- It reads which columns exist inside the transaction, after taking an
-- ACCESS SHARE lock on users, so no DDL can commit between the check and the
-- write: a failed transaction here is the daemon's fault, never the script's.
-- Run with the simple query protocol (the default): a prepared statement
-- would name columns that do not exist yet. :dual_write must be given (-D).
\set id random(1, 200000)
\set nid random(1000001, 1000000000000)
\set first random(1, 8)
\set last random(1, 8)
\set n random(1, 1000000)
\set signup random(1, 10)
BEGIN;
LOCK TABLE users IN ACCESS SHARE MODE;
SELECT count(*) FILTER (WHERE attname = 'full_name') AS has_old,
       count(*) FILTER (WHERE attname = 'first_name') AS has_new
  FROM pg_attribute
 WHERE attrelid = 'public.users'::regclass AND attnum > 0 AND NOT attisdropped \gset
-- pgbench substitutes variables as plain text: keep the name a quoted literal
SELECT quote_literal((ARRAY['Ada','Grace','Alan','Edsger','Barbara','Donald','Margaret','Ken'])[:first]
       || ' ' ||
       (ARRAY['Lovelace','Hopper','Turing','Dijkstra','Liskov','Knuth','Hamilton','Thompson'])[:last]
       || :n) AS name \gset
\if :signup = 1
\if :has_old = 0
INSERT INTO users (id, first_name, last_name, email)
VALUES (:nid, split_part(:name, ' ', 1), split_part(:name, ' ', 2), 'user' || :nid || '@example.com')
ON CONFLICT (id) DO NOTHING;
\elif :has_new = 1 AND :dual_write = 1
INSERT INTO users (id, full_name, first_name, last_name, email)
VALUES (:nid, :name, split_part(:name, ' ', 1), split_part(:name, ' ', 2), 'user' || :nid || '@example.com')
ON CONFLICT (id) DO NOTHING;
\else
INSERT INTO users (id, full_name, email)
VALUES (:nid, :name, 'user' || :nid || '@example.com')
ON CONFLICT (id) DO NOTHING;
\endif
\else
\if :has_old = 0
UPDATE users SET first_name = split_part(:name, ' ', 1), last_name = split_part(:name, ' ', 2) WHERE id = :id;
\elif :has_new = 1 AND :dual_write = 1
UPDATE users SET full_name = :name, first_name = split_part(:name, ' ', 1), last_name = split_part(:name, ' ', 2) WHERE id = :id;
\else
UPDATE users SET full_name = :name WHERE id = :id;
\endif
\endif
END;
