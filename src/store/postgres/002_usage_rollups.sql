-- 2: SQLite's migrations 6 and 7. Org usage counted as files come and go (quotas across
-- nodes without a listing); which pending events were charged (a deferred one is not);
-- paths users took while their event was still pending (a repair must not write them).
CREATE TABLE org_usage (
    org TEXT PRIMARY KEY,
    files BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);
ALTER TABLE events ADD COLUMN charged BOOLEAN NOT NULL DEFAULT TRUE;
CREATE TABLE taken_files (
    org TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (org, path)
);
-- Roll-ups: a webhook's settings (JSON), lines staged with their event (seq is the
-- accept order), and partitions' leases and close records (the lease is what keeps
-- nodes sharing this database from closing one partition twice).
ALTER TABLE webhooks ADD COLUMN rollup TEXT;
CREATE TABLE rollup_lines (
    seq BIGSERIAL PRIMARY KEY,
    org TEXT NOT NULL,
    hook TEXT NOT NULL,
    partition TEXT NOT NULL,
    closes_at BIGINT NOT NULL,
    accepted_at BIGINT NOT NULL,
    envelope TEXT NOT NULL
);
CREATE INDEX rollup_lines_partition ON rollup_lines(hook, partition, seq);
CREATE INDEX rollup_lines_closes ON rollup_lines(closes_at);
CREATE TABLE rollup_partitions (
    hook TEXT NOT NULL,
    partition TEXT NOT NULL,
    org TEXT NOT NULL,
    lease_until BIGINT,
    closed_at BIGINT,
    events BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (hook, partition)
);
