//! Numbered migrations, embedded in the binary. `schema_version` holds the number applied;
//! nodes starting together serialise on an advisory lock, and a node refuses a schema a
//! newer binary migrated (it would not know its tables).

use super::super::{Result, StoreError};

const MIGRATIONS: &[&str] = &[
    include_str!("001_init.sql"),
    include_str!("002_usage_rollups.sql"),
    include_str!("003_nodes.sql"),
    include_str!("004_leases.sql"),
    include_str!("005_rollup_keep.sql"),
    include_str!("006_partition_lease_node.sql"),
    include_str!("007_queue_pages.sql"),
];

/// An arbitrary constant: the advisory lock all hookbridge nodes take to migrate.
const MIGRATION_LOCK: i64 = 0x686f_6f6b_6272_6467;

pub(super) async fn migrate(c: &mut deadpool_postgres::Object) -> Result<()> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .await?;
    let version: i64 = match tx
        .query_opt("SELECT version FROM schema_version", &[])
        .await?
    {
        Some(r) => r.get(0),
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])
                .await?;
            0
        }
    };
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::SchemaTooNew {
            found: version,
            known,
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(m).await?;
        tx.execute("UPDATE schema_version SET version = $1", &[&(i as i64 + 1)])
            .await?;
        tracing::info!(version = i + 1, "applied PostgreSQL state migration");
    }
    tx.commit().await?;
    Ok(())
}

/// The number of migrations this binary knows.
pub(crate) fn known() -> i64 {
    MIGRATIONS.len() as i64
}

/// The schema version of a database (0: never migrated), read without changing it.
pub(super) async fn applied(c: &tokio_postgres::Client) -> Result<i64> {
    let exists: bool = c
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(c.query_opt("SELECT version FROM schema_version", &[])
        .await?
        .map(|r| r.get(0))
        .unwrap_or(0))
}
