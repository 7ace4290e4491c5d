-- The deliveries table is a queue: a job's row is claimed, maybe handed back, claimed
-- again and given its outcome, all within seconds of its insert. Claims and hand-backs
-- change no indexed column, so with room left on the row's page PostgreSQL updates it in
-- place (HOT: no new index entries); a full page (fillfactor 100) sends every such update
-- to another page with a new entry in each of the three indexes. 70 leaves room for a
-- few versions per row until page pruning reclaims them. New pages only: a table
-- already full of old, delivered rows keeps those pages as they are.
ALTER TABLE deliveries SET (fillfactor = 70);
-- Statistics and dead rows of a queue go stale in seconds, not at autovacuum's default
-- 10% / 20% of a large table: analyze and vacuum it after 2% / 5% has changed.
ALTER TABLE deliveries SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_scale_factor = 0.05);
