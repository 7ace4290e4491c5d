-- Roll-up lines are kept after their partition closes (state 1), for rebuilds by replay
-- (state 2 = reopened), until the org's retention drops them. 0 = open.
ALTER TABLE rollup_lines ADD COLUMN state SMALLINT NOT NULL DEFAULT 0;
DROP INDEX rollup_lines_closes;
CREATE INDEX rollup_lines_due ON rollup_lines(state, closes_at);
CREATE INDEX rollup_lines_kept ON rollup_lines(org, accepted_at);
