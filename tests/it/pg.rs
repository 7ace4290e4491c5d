//! PostgreSQL for the tests: a fresh database per test (or per group of nodes), dropped
//! once the last daemon using it is gone, so runs do not pile databases up on the server.

use std::sync::Arc;
use std::time::Duration;

use crate::harness::{require_that, Daemon, Opts};

/// A database made for a test on the PostgreSQL of `HOOKBRIDGE_TEST_PG_URL`. Dropped
/// (`WITH (FORCE)`, PostgreSQL 13+) with the last reference: a daemon holds one through
/// [`Opts::pg`], and is killed before its fields go, so nothing is using the database then.
pub struct PgDatabase {
    /// The database's URL, for `store.url`.
    pub url: String,
    admin: String,
    name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await and may run on a runtime's thread (where blocking on that
        // runtime would panic): a thread with a runtime of its own, bounded in time.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let drop = async {
                    let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::spawn(conn);
                    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .map_err(|e| e.to_string())
                };
                tokio::time::timeout(Duration::from_secs(30), drop)
                    .await
                    .unwrap_or_else(|_| Err("timed out after 30 s".into()))
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the dropping thread panicked".into()));
        if let Err(e) = dropped {
            eprintln!("test database {} left on the server: {e}", self.name);
        }
    }
}

/// A new, empty database on the PostgreSQL of `HOOKBRIDGE_TEST_PG_URL` (an admin URL): each
/// daemon gets its own, so no test sees another's state.
pub async fn fresh_pg_database() -> Arc<PgDatabase> {
    let admin = std::env::var("HOOKBRIDGE_TEST_PG_URL")
        .expect("HOOKBRIDGE_TEST_STORE=postgres needs HOOKBRIDGE_TEST_PG_URL (an admin URL)");
    let name = format!("hb_{}", ulid::Ulid::new().to_string().to_lowercase());
    let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("connect to HOOKBRIDGE_TEST_PG_URL");
    tokio::spawn(conn);
    c.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (base, _) = admin
        .rsplit_once('/')
        .expect("HOOKBRIDGE_TEST_PG_URL is postgres://…/database");
    Arc::new(PgDatabase {
        url: format!("{base}/{name}"),
        admin,
        name,
    })
}

/// A fresh PostgreSQL database for a test that needs one, or `None`: a skip with a message,
/// or a failure under CI=true (`require_that`).
pub async fn pg_database_or_skip() -> Option<Arc<PgDatabase>> {
    if !require_that(
        "HOOKBRIDGE_TEST_PG_URL (a PostgreSQL admin URL)",
        std::env::var("HOOKBRIDGE_TEST_PG_URL").is_ok(),
    ) {
        return None;
    }
    Some(fresh_pg_database().await)
}

/// A fresh PostgreSQL database and the shared S3 server, for the scale-out tests; `None` as
/// [`pg_database_or_skip`].
pub async fn pg_and_s3_or_skip() -> Option<(Arc<PgDatabase>, crate::seaweed::S3Server)> {
    let db = pg_database_or_skip().await?;
    let Some(s3) = crate::seaweed::server().await else {
        assert!(require_that("SeaweedFS (weed)", false), "unreachable");
        return None;
    };
    Some((db, s3))
}

/// Nodes `a` and `b` of one service: one fresh PostgreSQL database, one S3 prefix (named
/// after `name`), each node its own data dir. `node` gives the options both nodes share
/// (`delivery`, `extra`, …); the store, the S3 prefix and `node_id` are set here. `None` as
/// [`pg_database_or_skip`].
pub async fn two_nodes_on_pg_and_s3<'a>(
    name: &str,
    node: impl Fn() -> Opts<'a>,
) -> Option<(Daemon, Daemon)> {
    let (db, s3) = pg_and_s3_or_skip().await?;
    let prefix = crate::seaweed::unique_prefix(name);
    let start = |id: &'static str| {
        Daemon::start_opts(Opts {
            top: id,
            pg: Some(db.clone()),
            s3: Some(s3.clone()),
            s3_prefix: Some(prefix.clone()),
            ..node()
        })
    };
    let a = start(r#"node_id = "a""#).await;
    let b = start(r#"node_id = "b""#).await;
    assert_ne!(a.data_dir(), b.data_dir());
    Some((a, b))
}
