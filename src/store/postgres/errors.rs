//! PostgreSQL errors as the store reports them: an outage is `Unavailable` (503 and
//! retry), a lost lock conflict too (and ingest runs its batch again first), anything
//! else the server answered is a database error.

use super::super::StoreError;

const CONTENTION_DEADLOCK: &str = "40P01";
const CONTENTION_SERIALIZATION: &str = "40001";
/// Ends the message of a transaction that lost a lock conflict, so callers that can
/// retry it at once (`is_contention`) tell it from an outage.
const CONTENTION: &str = " (conflict with a concurrent transaction; retry)";

/// A transaction that lost a deadlock or serialization conflict: safe to run again.
pub(crate) fn is_contention(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(m) if m.ends_with(CONTENTION))
}

pub(super) fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StoreError::Unavailable(format!("PostgreSQL: {other}")),
    }
}

/// A server that cannot be reached, is shutting down or refuses connections is
/// "unavailable" (503, retry); an error the server answered with is a database error.
pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return match code {
            "53100" => StoreError::DiskFull,
            // A deadlock or serialization failure with another node's transaction: nothing
            // was written, and the same work succeeds when tried again (503, Retry-After).
            CONTENTION_DEADLOCK | CONTENTION_SERIALIZATION => {
                StoreError::Unavailable(format!("PostgreSQL: {db}{CONTENTION}"))
            }
            // connection exceptions, operator intervention (shutdown, restart), too many
            // connections, cannot connect now (starting up)
            c if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                StoreError::Unavailable(format!("PostgreSQL: {db}"))
            }
            _ => StoreError::Db(format!("PostgreSQL: {db}")),
        };
    }
    let source = std::error::Error::source(&e);
    let io = source.is_some_and(|s| s.is::<std::io::Error>());
    // "error connecting to server" alone does not say why: add the cause (refused, timeout).
    let why = match source {
        Some(s) => format!("PostgreSQL: {e}: {s}"),
        None => format!("PostgreSQL: {e}"),
    };
    if e.is_closed() || io || e.to_string().starts_with("error connecting") {
        StoreError::Unavailable(why)
    } else {
        StoreError::Db(why)
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        pg_err(e)
    }
}
