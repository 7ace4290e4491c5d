-- 1: the schema of SQLite's migrations 1 to 5, in PostgreSQL types. Times are
-- microseconds since the epoch (BIGINT), as on SQLite, so both backends read alike.
CREATE TABLE orgs (
    name TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    limits TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE sftp_users (
    name TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name) ON DELETE CASCADE,
    password_hash TEXT,
    public_keys TEXT NOT NULL DEFAULT '[]',
    upload BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX sftp_users_org ON sftp_users(org);
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    url TEXT,
    events TEXT NOT NULL,
    path_template TEXT,
    secret TEXT,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    disabled_reason TEXT,
    created_at BIGINT NOT NULL,
    failing_since BIGINT
);
CREATE INDEX webhooks_org ON webhooks(org);
CREATE TABLE custom_value_endpoints (
    org TEXT PRIMARY KEY REFERENCES orgs(name) ON DELETE CASCADE,
    url TEXT NOT NULL
);
CREATE TABLE events (
    org TEXT NOT NULL,
    id TEXT NOT NULL,
    envelope TEXT NOT NULL,
    result TEXT NOT NULL,
    files_pending BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org, id)
);
CREATE INDEX events_files_pending ON events(org, id) WHERE files_pending;
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    last_status INTEGER,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX deliveries_due ON deliveries(next_attempt_at) WHERE status IN ('pending', 'failed');
CREATE INDEX deliveries_webhook ON deliveries(org, webhook_id, created_at);
CREATE TABLE attempts (
    seq BIGSERIAL PRIMARY KEY,
    delivery_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    status INTEGER,
    latency_ms BIGINT NOT NULL,
    error TEXT,
    response_excerpt TEXT,
    outcome TEXT NOT NULL
);
CREATE INDEX attempts_delivery ON attempts(delivery_id, at);
CREATE TABLE downloads (
    org TEXT NOT NULL,
    path TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (org, path)
);
