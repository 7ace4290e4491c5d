//! Conformance cases for ingest and the delivery queue.

use chrono::{Duration, Utc};

use super::super::health::AttemptRecord;
use super::*;

pub(super) async fn ingest_is_idempotent(s: S) {
    with_jobs(&s, 0).await;
    let first = event("acme", "e1", &["/a/e1.json"], &[("d1", "wh")]);
    let out = s.commit_events(vec![first], vec![]).await.unwrap();
    let CommitOutcome::New(r) = &out[0] else {
        panic!("first commit is New")
    };
    assert_eq!(
        (r.files.clone(), r.deliveries.clone()),
        (vec!["/a/e1.json".to_string()], vec!["d1".to_string()])
    );

    // A repost, with other delivery ids and files (as a second request would make), and
    // the same id twice in one batch: the first result is answered, nothing new is queued.
    let again = event("acme", "e1", &["/b/e1.json"], &[("d2", "wh")]);
    let out = s
        .commit_events(vec![again.clone(), again], vec![])
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    for o in out {
        let CommitOutcome::Known {
            result,
            pending_envelope,
        } = o
        else {
            panic!("Known")
        };
        assert_eq!(&result, r);
        assert_eq!(
            pending_envelope.as_deref(),
            Some(r#"{"id":"e1"}"#),
            "files not done yet"
        );
    }
    assert_eq!(ids(&due(&s).await), ["d1"]);
    // The same id in another org is another event.
    org(&s, "beta").await;
    let out = s
        .commit_events(vec![event("beta", "e1", &[], &[])], vec![])
        .await
        .unwrap();
    assert!(matches!(out[0], CommitOutcome::New(_)));
}

pub(super) async fn pending_files_until_done(s: S) {
    org(&s, "acme").await;
    let batch = vec![
        event("acme", "e1", &["/x/e1.json"], &[]),
        event("acme", "e2", &["/x/e2.json"], &[]),
        event("acme", "e3", &[], &[]),
    ];
    s.commit_events(batch, vec![]).await.unwrap();
    let mut p: Vec<_> = s
        .pending_files()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    p.sort();
    assert_eq!(p, ["e1", "e2"], "an event without files is never pending");
    s.mark_files_done(vec![("acme".into(), "e1".into())])
        .await
        .unwrap();
    // Files done can also ride on the next group commit.
    s.commit_events(vec![], vec![("acme".into(), "e2".into())])
        .await
        .unwrap();
    assert!(s.pending_files().await.unwrap().is_empty());
    let out = s
        .commit_events(vec![event("acme", "e1", &["/x/e1.json"], &[])], vec![])
        .await
        .unwrap();
    let CommitOutcome::Known {
        pending_envelope, ..
    } = &out[0]
    else {
        panic!()
    };
    assert!(
        pending_envelope.is_none(),
        "files done: nothing to write again"
    );
}

pub(super) async fn deferred_files_stay_pending(s: S) {
    org(&s, "acme").await;
    let quota = Some(crate::limits::Quota { files: 1, bytes: 0 });
    let mut e0 = event("acme", "e0", &["/x/e0.json"], &[]);
    e0.quota = quota;
    s.commit_events(vec![e0], vec![]).await.unwrap();
    s.mark_files_done(vec![("acme".into(), "e0".into())])
        .await
        .unwrap();
    // The quota is full: the event is recorded, its file deferred.
    let mut ev = event("acme", "e1", &["/x/e1.json"], &[]);
    ev.quota = quota;
    let out = s.commit_events(vec![ev], vec![]).await.unwrap();
    assert!(
        matches!(out[0], CommitOutcome::Deferred { .. }),
        "the event is recorded, its file deferred: {:?}",
        out[0]
    );
    // Not charged, so no repair writes it: a repost, once there is room, does.
    assert!(s.pending_files().await.unwrap().is_empty());
    let out = s
        .commit_events(vec![event("acme", "e1", &["/x/e1.json"], &[])], vec![])
        .await
        .unwrap();
    let CommitOutcome::Known {
        result,
        pending_envelope,
    } = &out[0]
    else {
        panic!("{:?}", out[0])
    };
    assert_eq!(result.files, ["/x/e1.json"]);
    assert_eq!(pending_envelope.as_deref(), Some(r#"{"id":"e1"}"#));
}

pub(super) async fn due_jobs_and_busy(s: S) {
    with_jobs(&s, 3).await;
    assert_eq!(ids(&due(&s).await), ["d0", "d1", "d2"]);
    let past = Utc::now() - Duration::hours(1);
    assert!(
        s.due_jobs(past, 100, Busy::default())
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    let job = &due(&s).await[0];
    assert_eq!(job.payload, format!(r#"{{"id":"{}"}}"#, job.event_id));
    assert_eq!(
        job.webhook.as_ref().unwrap().secret.as_deref(),
        Some("whsec_test")
    );
    assert_eq!(job.attempts, 0);

    let busy = Busy {
        deliveries: vec!["d0".into()],
        webhooks: vec![],
        ..Default::default()
    };
    assert_eq!(
        ids(&s.due_jobs(Utc::now(), 100, busy.clone()).await.unwrap()),
        ["d1", "d2"]
    );
    assert_eq!(
        s.due_jobs(Utc::now(), 1, Busy::default())
            .await
            .unwrap()
            .len(),
        1,
        "limit"
    );
    let all_busy = Busy {
        deliveries: vec![],
        webhooks: vec!["wh".into()],
        ..Default::default()
    };
    assert!(s
        .due_jobs(Utc::now(), 100, all_busy.clone())
        .await
        .unwrap()
        .is_empty());
    assert!(s.next_due_at(all_busy).await.unwrap().is_none());
    let next = s.next_due_at(Busy::default()).await.unwrap().unwrap();
    assert!(next <= Utc::now());
}

pub(super) async fn attempts_and_health(s: S) {
    with_jobs(&s, 4).await;
    let jobs = due(&s).await;
    let job = |id: &str| jobs.iter().find(|j| j.id == id).unwrap().clone();
    let later = Utc::now() + Duration::hours(1);

    // A refused connection is a failure: the job waits, the webhook is failing.
    record(
        &s,
        &job("d0"),
        AttemptResult::Transport(TransportError::Connect),
        AttemptOutcome::Retry { at: later },
    )
    .await;
    let d0 = delivery(&s, "d0").await;
    assert_eq!((d0.status, d0.attempts), (DeliveryStatus::Failed, 1));
    assert!(d0.next_attempt_at.unwrap() > Utc::now());
    assert_eq!(d0.attempt_log.len(), 1);
    assert_eq!(
        d0.attempt_log[0].result,
        AttemptResult::Transport(TransportError::Connect)
    );
    assert!(
        !ids(&due(&s).await).contains(&"d0".to_string()),
        "not due before its retry time"
    );
    let since = s
        .get_webhook("acme", "wh")
        .await
        .unwrap()
        .unwrap()
        .failing_since
        .unwrap();

    // A second failure keeps the first failure time.
    record(
        &s,
        &job("d1"),
        AttemptResult::HttpError { status: 503 },
        AttemptOutcome::Retry { at: later },
    )
    .await;
    let h = s.get_webhook("acme", "wh").await.unwrap().unwrap();
    assert_eq!(h.failing_since, Some(since));
    assert_eq!(delivery(&s, "d1").await.last_status, Some(503));

    // Nothing sent says nothing about the endpoint.
    record(
        &s,
        &job("d2"),
        AttemptResult::NotAttempted,
        AttemptOutcome::Dead,
    )
    .await;
    assert_eq!(
        s.get_webhook("acme", "wh")
            .await
            .unwrap()
            .unwrap()
            .failing_since,
        Some(since)
    );
    assert_eq!(delivery(&s, "d2").await.status, DeliveryStatus::Dead);

    // A success heals.
    record(
        &s,
        &job("d3"),
        AttemptResult::Delivered { status: 204 },
        AttemptOutcome::Delivered,
    )
    .await;
    let h = s.get_webhook("acme", "wh").await.unwrap().unwrap();
    assert!(h.failing_since.is_none() && h.enabled);
    let d3 = delivery(&s, "d3").await;
    assert_eq!(
        (d3.status, d3.last_status, d3.next_attempt_at),
        (DeliveryStatus::Delivered, Some(204), None)
    );

    // 410 Gone disables the webhook with its reason, and the job is dead.
    let disable = AttemptOutcome::DisableWebhook {
        reason: "410 Gone".into(),
    };
    record(
        &s,
        &job("d0"),
        AttemptResult::HttpError { status: 410 },
        disable,
    )
    .await;
    let h = s.get_webhook("acme", "wh").await.unwrap().unwrap();
    assert!(!h.enabled);
    assert_eq!(h.disabled_reason.as_deref(), Some("410 Gone"));
    let d0 = delivery(&s, "d0").await;
    assert_eq!(
        (d0.status, d0.attempts, d0.attempt_log.len()),
        (DeliveryStatus::Dead, 2, 2)
    );

    // Several records in one group commit.
    let recs = vec![
        AttemptRecord::new(
            job("d1"),
            attempt(AttemptResult::HttpError { status: 500 }),
            AttemptOutcome::Retry { at: later },
        ),
        AttemptRecord::new(
            job("d1"),
            attempt(AttemptResult::Delivered { status: 200 }),
            AttemptOutcome::Delivered,
        ),
    ];
    s.record_attempts(recs.into()).await.unwrap();
    let d1 = delivery(&s, "d1").await;
    assert_eq!(
        (d1.status, d1.attempts),
        (DeliveryStatus::Delivered, 3),
        "applied in order"
    );
    s.record_attempts(Vec::new().into()).await.unwrap();
}

pub(super) async fn list_deliveries_filters(s: S) {
    with_jobs(&s, 3).await;
    let jobs = due(&s).await;
    let later = Utc::now() + Duration::hours(1);
    record(
        &s,
        &jobs[0],
        AttemptResult::HttpError { status: 500 },
        AttemptOutcome::Retry { at: later },
    )
    .await;
    record(
        &s,
        &jobs[1],
        AttemptResult::HttpError { status: 500 },
        AttemptOutcome::Dead,
    )
    .await;
    let list = |st| {
        let s = s.clone();
        async move {
            let mut v: Vec<String> = s
                .list_deliveries("acme", "wh", st, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.id)
                .collect();
            v.sort();
            v
        }
    };
    let (a, b, c) = (jobs[0].id.clone(), jobs[1].id.clone(), jobs[2].id.clone());
    assert_eq!(list(Some(DeliveryStatus::Failed)).await, {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    });
    assert_eq!(list(Some(DeliveryStatus::Dead)).await, [b]);
    assert_eq!(list(Some(DeliveryStatus::Pending)).await, [c]);
    assert_eq!(list(None).await.len(), 3);
    assert_eq!(
        s.list_deliveries("acme", "wh", None, 2)
            .await
            .unwrap()
            .len(),
        2,
        "limit"
    );
    assert!(s
        .list_deliveries("acme", "other", None, 100)
        .await
        .unwrap()
        .is_empty());
}

pub(super) async fn replay_resets_jobs(s: S) {
    with_jobs(&s, 2).await;
    for j in due(&s).await {
        record(
            &s,
            &j,
            AttemptResult::HttpError { status: 500 },
            AttemptOutcome::Dead,
        )
        .await;
    }
    assert!(due(&s).await.is_empty());
    assert_eq!(s.replay("acme", "wh", Some("d0"), None).await.unwrap(), 1);
    let d0 = delivery(&s, "d0").await;
    assert_eq!((d0.status, d0.attempts), (DeliveryStatus::Pending, 0));
    assert_eq!(ids(&due(&s).await), ["d0"]);
    assert_eq!(s.replay("acme", "wh", Some("nope"), None).await.unwrap(), 0);
    let future = Utc::now() + Duration::hours(1);
    assert_eq!(
        s.replay("acme", "wh", None, Some(future)).await.unwrap(),
        0,
        "nothing created since"
    );
    assert_eq!(s.replay("acme", "wh", None, None).await.unwrap(), 2);
    assert_eq!(ids(&due(&s).await), ["d0", "d1"]);
}

pub(super) async fn queue_stats_counts_open_jobs(s: S) {
    assert_eq!(s.queue_stats().await.unwrap(), (0, None));
    with_jobs(&s, 3).await;
    let (n, oldest) = s.queue_stats().await.unwrap();
    assert_eq!(n, 3);
    assert!(oldest.unwrap() <= Utc::now());
    let j = due(&s).await.remove(0);
    let later = Utc::now() + Duration::hours(1);
    record(
        &s,
        &j,
        AttemptResult::HttpError { status: 500 },
        AttemptOutcome::Retry { at: later },
    )
    .await;
    assert_eq!(
        s.queue_stats().await.unwrap().0,
        3,
        "a job waiting for its retry is open"
    );
    record(
        &s,
        &j,
        AttemptResult::Delivered { status: 200 },
        AttemptOutcome::Delivered,
    )
    .await;
    assert_eq!(s.queue_stats().await.unwrap().0, 2);
}

pub(super) async fn downloads(s: S) {
    org(&s, "acme").await;
    let files = [
        "/in/a.json",
        "/in/sub/b.json",
        "/inbox.json",
        "/other/c.json",
    ];
    s.record_downloads(
        files
            .iter()
            .map(|f| ("acme".to_string(), f.to_string()))
            .collect(),
    )
    .await
    .unwrap();
    s.record_downloads(vec![("acme".into(), "/in/a.json".into())])
        .await
        .unwrap();
    assert_eq!(s.downloaded("acme").await.unwrap().len(), 4);
    assert!(s.downloaded("beta").await.unwrap().is_empty());
    // A folder rename moves what is below it, not its look-alike siblings.
    s.move_downloads("acme", "/in", "/done").await.unwrap();
    let got = s.downloaded("acme").await.unwrap();
    for f in [
        "/done/a.json",
        "/done/sub/b.json",
        "/inbox.json",
        "/other/c.json",
    ] {
        assert!(got.contains(f), "{f} in {got:?}");
    }
    s.move_downloads("acme", "/other/c.json", "/other/d.json")
        .await
        .unwrap();
    s.forget_downloads("acme", vec!["/done/a.json".into(), "/nope".into()])
        .await
        .unwrap();
    let got = s.downloaded("acme").await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.contains("/other/d.json") && !got.contains("/done/a.json"));
}

pub(super) async fn deleting_an_org_forgets_its_events(s: S) {
    with_jobs(&s, 1).await;
    assert!(s.delete_org("acme").await.unwrap());
    assert!(due(&s).await.is_empty());
    assert_eq!(s.queue_stats().await.unwrap().0, 0);
    org(&s, "acme").await;
    let out = s
        .commit_events(vec![event("acme", "e0", &[], &[])], vec![])
        .await
        .unwrap();
    assert!(
        matches!(out[0], CommitOutcome::New(_)),
        "a re-created org starts afresh"
    );
}

// ---------- leases (backends with claims shared across nodes: PostgreSQL) ----------
// SQLite ignores `Busy::lease`: one process owns the file and its in-memory in-flight set
// (`Busy::deliveries`) is the claim, so these cases run on PostgreSQL only.

fn leased(minutes: i64) -> Busy {
    Busy {
        lease: Some(Lease {
            node: "node-a".into(),
            length: std::time::Duration::from_secs(minutes as u64 * 60),
        }),
        ..Default::default()
    }
}

pub(super) async fn concurrent_claimers_never_share_a_job(s: S) {
    with_jobs(&s, 20).await;
    let now = Utc::now();
    let claim = |s: S| async move { s.due_jobs(now, 6, leased(5)).await.unwrap() };
    let (a, b, c, d) = tokio::join!(
        claim(s.clone()),
        claim(s.clone()),
        claim(s.clone()),
        claim(s.clone())
    );
    let mut all: Vec<String> = [a, b, c, d].iter().flat_map(|j| ids(j)).collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a job was handed to two claimers");
    let rest = s.due_jobs(now, 100, leased(5)).await.unwrap();
    assert_eq!(n + rest.len(), 20, "every job is claimed once");
    for j in &rest {
        assert!(!all.contains(&j.id), "{} claimed twice", j.id);
        assert!(j.claim.is_some());
    }
    assert!(due(&s).await.is_empty(), "leased jobs are not handed out");
}

pub(super) async fn an_expired_lease_is_claimable_again(s: S) {
    with_jobs(&s, 1).await;
    let now = Utc::now();
    let first = s.due_jobs(now, 10, leased(1)).await.unwrap();
    assert_eq!(ids(&first), ["d0"]);
    assert!(s.due_jobs(now, 10, leased(1)).await.unwrap().is_empty());
    let next = s.next_due_at(Busy::default()).await.unwrap().unwrap();
    assert!(
        next >= now + Duration::seconds(59),
        "due again when the lease ends: {next}"
    );
    // Two minutes on, the first claimer is presumed dead: its job is taken over.
    let later = now + Duration::minutes(2);
    let second = s.due_jobs(later, 10, leased(1)).await.unwrap();
    assert_eq!(ids(&second), ["d0"]);
    assert_ne!(first[0].claim, second[0].claim, "a new claim");
    // The takeover names the claim whose lease ran out (the scheduler logs and counts it);
    // a first claim took nothing over.
    assert_eq!(first[0].took_over, None);
    assert_eq!(second[0].took_over, first[0].claim);
}

pub(super) async fn a_stale_claim_cannot_record(s: S) {
    with_jobs(&s, 1).await;
    let now = Utc::now();
    let stale = s.due_jobs(now, 10, leased(1)).await.unwrap().remove(0);
    let fresh = s
        .due_jobs(now + Duration::minutes(2), 10, leased(1))
        .await
        .unwrap()
        .remove(0);
    let later = Utc::now() + Duration::hours(1);
    record(
        &s,
        &fresh,
        AttemptResult::Delivered { status: 200 },
        AttemptOutcome::Delivered,
    )
    .await;
    // The stale worker comes back late with a failure: it must not undo the delivery.
    record(
        &s,
        &stale,
        AttemptResult::HttpError { status: 500 },
        AttemptOutcome::Retry { at: later },
    )
    .await;
    let d = delivery(&s, "d0").await;
    assert_eq!(
        (d.status, d.attempts, d.attempt_log.len()),
        (DeliveryStatus::Delivered, 1, 1),
        "only the current claim's outcome is recorded"
    );
    // Recorded: the lease is released (a replay makes it due for anyone at once).
    s.replay("acme", "wh", Some("d0"), None).await.unwrap();
    assert_eq!(
        ids(&s.due_jobs(Utc::now(), 10, leased(1)).await.unwrap()),
        ["d0"]
    );
}

/// A node restarted after a crash hands back its previous run's leases (due again at once);
/// another node's leases stay.
pub(super) async fn a_node_releases_only_its_own_leases(s: S) {
    with_jobs(&s, 2).await;
    let now = Utc::now();
    let by = |node: &str| Busy {
        lease: Some(Lease {
            node: node.into(),
            length: std::time::Duration::from_secs(600),
        }),
        ..Default::default()
    };
    let a = s.due_jobs(now, 1, by("node-a")).await.unwrap();
    let b = s.due_jobs(now, 1, by("node-a_b")).await.unwrap();
    assert_eq!((a.len(), b.len()), (1, 1));
    assert!(s.due_jobs(now, 10, by("node-c")).await.unwrap().is_empty());
    assert_eq!(s.release_node_claims("node-a").await.unwrap(), 1);
    let again = s.due_jobs(now, 10, by("node-c")).await.unwrap();
    assert_eq!(ids(&again), ids(&a), "only node-a's lease was handed back");
}
