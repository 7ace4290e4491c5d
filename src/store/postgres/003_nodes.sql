-- State shared by the nodes of a scaled-out service (bans, keys).
CREATE TABLE bans (
    ip TEXT PRIMARY KEY,
    until BIGINT NOT NULL,
    reason TEXT NOT NULL,
    node TEXT NOT NULL
);
CREATE TABLE shared_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    version BIGINT NOT NULL
);
