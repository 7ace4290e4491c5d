//! PostgreSQL only: what several processes on one database need beyond the shared cases.
//! Wake-ups across stores (LISTEN/NOTIFY), lock conflicts answered as "retry", and the
//! lock order of ingest batches.

use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Two stores (two nodes) on one fresh database.
async fn two_nodes() -> Option<(S, S, String, String)> {
    let (admin, db, url) = fresh_pg_database().await?;
    let a: S = Arc::new(postgres_at(&url).await);
    let b: S = Arc::new(postgres_at(&url).await);
    Some((a, b, admin, db))
}

/// Waits (bounded) for a wake-up; the listener connects in the background.
async fn woken(rx: &mut tokio::sync::mpsc::Receiver<()>, what: &str) {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no wake-up for {what}"))
        .expect("the listener stopped");
}

/// Committing jobs on one store wakes the other one's scheduler: ingest with deliveries,
/// a replay and a recorded retry each do.
#[tokio::test]
async fn a_commit_on_one_node_wakes_the_other() {
    let Some((a, b, admin, db)) = two_nodes().await else {
        return;
    };
    let mut rx = b.job_wakeups().expect("PostgreSQL has wake-ups");
    // The listener is up once a commit made after it reaches it; commit until one does
    // (each commit is a real job, so every wake-up below is for a committed job).
    org(&a, "acme").await;
    a.put_webhook(&http_hook("acme", "wh")).await.unwrap();
    let mut i = 0;
    loop {
        let ev = event("acme", &format!("e{i}"), &[], &[(&format!("d{i}"), "wh")]);
        a.commit_events(vec![ev], vec![]).await.unwrap();
        i += 1;
        if tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_ok()
        {
            break;
        }
        assert!(i < 100, "B's listener never received A's commits");
    }
    while rx.try_recv().is_ok() {}
    a.commit_events(
        vec![event("acme", "loud", &[], &[("d_loud", "wh")])],
        vec![],
    )
    .await
    .unwrap();
    woken(&mut rx, "an ingest commit with a job").await;
    // A replay on A.
    assert_eq!(a.replay("acme", "wh", Some("d0"), None).await.unwrap(), 1);
    woken(&mut rx, "a replay").await;
    // A retry recorded on A (B learns when it falls due).
    let job = a
        .due_jobs(Utc::now(), 1, Busy::default())
        .await
        .unwrap()
        .remove(0);
    record(
        &a,
        &job,
        AttemptResult::HttpError { status: 500 },
        AttemptOutcome::Retry {
            at: Utc::now() + Duration::from_secs(3600),
        },
    )
    .await;
    woken(&mut rx, "a recorded retry").await;
    drop((a, b, rx));
    drop_database(&admin, &db).await;
}

/// A real deadlock between two sessions (SQLSTATE 40P01) is "unavailable, retry" (503
/// with Retry-After at the HTTP edge; ingest runs its batch again first), never a plain
/// database error (500).
#[tokio::test]
async fn a_deadlock_is_a_retryable_conflict() {
    let Some((admin, db, url)) = fresh_pg_database().await else {
        return;
    };
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    let (c1, c2) = (connect().await, connect().await);
    c1.batch_execute("CREATE TABLE locks (k int PRIMARY KEY); INSERT INTO locks VALUES (1), (2)")
        .await
        .unwrap();
    c1.batch_execute("BEGIN; SELECT k FROM locks WHERE k = 1 FOR UPDATE")
        .await
        .unwrap();
    c2.batch_execute("BEGIN; SELECT k FROM locks WHERE k = 2 FOR UPDATE")
        .await
        .unwrap();
    // Each now waits for the other's row: PostgreSQL aborts one of them with 40P01 (after
    // `deadlock_timeout`); the victim's rollback lets the other through.
    let cross = |c: tokio_postgres::Client, k: i32| {
        tokio::spawn(async move {
            let r = c
                .execute("SELECT k FROM locks WHERE k = $1 FOR UPDATE", &[&k])
                .await;
            let _ = c.batch_execute("ROLLBACK").await;
            r.map(|_| ())
        })
    };
    let (h1, h2) = (cross(c1, 2), cross(c2, 1));
    let (r1, r2) = (h1.await.unwrap(), h2.await.unwrap());
    let err = match (r1, r2) {
        (Err(e), Ok(())) | (Ok(()), Err(e)) => e,
        other => panic!("expected exactly one deadlock victim: {other:?}"),
    };
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("40P01"),
        "not a deadlock: {err}"
    );
    let mapped = super::super::postgres::pg_err(err);
    assert!(
        matches!(mapped, StoreError::Unavailable(_)),
        "a deadlock must be retryable (503), got {mapped:?}"
    );
    assert!(super::super::postgres::is_contention(&mapped), "{mapped:?}");
    drop_database(&admin, &db).await;
}

/// An ingest batch takes its orgs' quota rows in one order (sorted), whatever the order of
/// its events: while it waits for the first org's row, it holds no later one. Without the
/// order, a batch for `zeta, alpha` would hold `zeta` while waiting for `alpha`, and a
/// node committing `alpha, zeta` would deadlock with it.
#[tokio::test]
async fn an_ingest_batch_locks_quota_rows_in_org_order() {
    let Some((admin, db, url)) = fresh_pg_database().await else {
        return;
    };
    let s: S = Arc::new(postgres_at(&url).await);
    for o in ["alpha", "zeta"] {
        org(&s, o).await;
        s.set_org_usage(o, crate::limits::OrgUsage::default(), true)
            .await
            .unwrap();
    }
    let (other, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // Another node's transaction holds `alpha`.
    other
        .batch_execute("BEGIN; SELECT org FROM org_usage WHERE org = 'alpha' FOR UPDATE")
        .await
        .unwrap();
    let batch = vec![
        event("zeta", "z1", &["/z1.json"], &[]),
        event("alpha", "a1", &["/a1.json"], &[]),
    ];
    let committing = tokio::spawn({
        let s = s.clone();
        async move { s.commit_events(batch, vec![]).await }
    });
    // The batch now waits for a lock (the state, not a guess at a delay).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = other
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the batch never waited for alpha's row"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // `zeta` is free: the waiting batch did not take it before `alpha`.
    other
        .batch_execute("SELECT org FROM org_usage WHERE org = 'zeta' FOR UPDATE NOWAIT")
        .await
        .expect("the batch holds zeta's row while waiting for alpha's: a deadlock in waiting");
    other.batch_execute("COMMIT").await.unwrap();
    let out = committing.await.unwrap().unwrap();
    assert_eq!(out.len(), 2);
    let usage = s.org_usage("zeta").await.unwrap().unwrap();
    assert_eq!(usage.files, 1, "{usage:?}");
    drop(s);
    drop_database(&admin, &db).await;
}
