//! The commit side of the direct hand-off: `commit_and_claim` reports the jobs it
//! inserted, and on a shared store claims them for the committing node.

use chrono::{Duration, Utc};

use super::*;

fn lease(node: &str) -> Lease {
    Lease {
        node: node.into(),
        length: std::time::Duration::from_secs(300),
    }
}

/// Every backend: the jobs a commit inserted are named (a repost inserts none), so the
/// committer hands over exactly those.
pub(super) async fn a_commit_names_the_jobs_it_inserted(s: S) {
    org(&s, "acme").await;
    s.put_webhook(&http_hook("acme", "wh")).await.unwrap();
    let first = s
        .commit_and_claim(
            vec![
                event("acme", "e0", &[], &[("d0", "wh")]),
                event("acme", "e1", &[], &[("d1", "wh"), ("d2", "wh")]),
            ],
            vec![],
            Some(lease("node-a")),
        )
        .await
        .unwrap();
    let mut inserted = first.inserted.clone();
    inserted.sort();
    assert_eq!(inserted, ["d0", "d1", "d2"]);
    assert_eq!(first.outcomes.len(), 2);
    // A repost of e0 (new delivery ids from the request) inserts nothing.
    let again = s
        .commit_and_claim(
            vec![event("acme", "e0", &[], &[("d9", "wh")])],
            vec![],
            Some(lease("node-a")),
        )
        .await
        .unwrap();
    assert!(again.inserted.is_empty(), "{:?}", again.inserted);
    assert!(matches!(again.outcomes[0], CommitOutcome::Known { .. }));
    // Without a lease: inserted, unclaimed, due for any poll.
    let plain = s
        .commit_and_claim(
            vec![event("acme", "e2", &[], &[("d3", "wh")])],
            vec![],
            None,
        )
        .await
        .unwrap();
    assert_eq!(plain.inserted, ["d3"]);
    assert!(plain.claim.is_none());
    assert!(ids(&due(&s).await).contains(&"d3".to_string()));
}

/// Shared store: jobs claimed at commit are no node's to poll while the lease runs; the
/// committer records them under that claim, or releases them for any node's poll.
pub(super) async fn jobs_claimed_at_commit_are_held_until_recorded_or_released(s: S) {
    org(&s, "acme").await;
    s.put_webhook(&http_hook("acme", "wh")).await.unwrap();
    let c = s
        .commit_and_claim(
            vec![
                event("acme", "e0", &[], &[("d0", "wh")]),
                event("acme", "e1", &[], &[("d1", "wh")]),
            ],
            vec![],
            Some(lease("node-a")),
        )
        .await
        .unwrap();
    let claim = c.claim.clone().expect("a shared store claims at commit");
    assert!(claim.0.starts_with("node-a/"), "{claim:?}");
    let other = Busy {
        lease: Some(lease("node-b")),
        ..Default::default()
    };
    assert!(
        s.due_jobs(Utc::now(), 10, other.clone())
            .await
            .unwrap()
            .is_empty(),
        "claimed at commit: not handed to another node"
    );
    // The committer's outcome is recorded under the commit's claim.
    let handed = |id: &str| DeliveryJob {
        id: id.into(),
        org: "acme".into(),
        webhook_id: "wh".into(),
        event_id: id.replace('d', "e"),
        payload: String::new(),
        attempts: 0,
        created_at: Utc::now(),
        webhook: None,
        claim: Some(claim.clone()),
        took_over: None,
    };
    record(
        &s,
        &handed("d0"),
        AttemptResult::Delivered { status: 200 },
        AttemptOutcome::Delivered,
    )
    .await;
    assert_eq!(delivery(&s, "d0").await.status, DeliveryStatus::Delivered);
    // A release under another claim does nothing; under the commit's, d1 is due at once.
    let wrong = ClaimId::new("node-a");
    assert_eq!(
        s.release_claims(&wrong, vec!["d1".into()]).await.unwrap(),
        0
    );
    assert!(s
        .due_jobs(Utc::now(), 10, other.clone())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.release_claims(&claim, vec!["d1".into(), "d0".into()])
            .await
            .unwrap(),
        1,
        "only the job still held is released"
    );
    let taken = s.due_jobs(Utc::now(), 10, other).await.unwrap();
    assert_eq!(ids(&taken), ["d1"]);
    assert!(taken[0].took_over.is_none(), "a release is not a takeover");
}

/// Shared store: a node that died holding jobs claimed at commit gets them back at its
/// next start; unreleased, they are taken over once the lease runs out.
pub(super) async fn commit_claims_are_released_with_the_node(s: S) {
    org(&s, "acme").await;
    s.put_webhook(&http_hook("acme", "wh")).await.unwrap();
    s.commit_and_claim(
        vec![event("acme", "e0", &[], &[("d0", "wh")])],
        vec![],
        Some(lease("node-a")),
    )
    .await
    .unwrap();
    let b = Busy {
        lease: Some(lease("node-b")),
        ..Default::default()
    };
    let later = Utc::now() + Duration::minutes(6);
    let taken = s.due_jobs(later, 10, b.clone()).await.unwrap();
    assert_eq!(ids(&taken), ["d0"], "taken over after the lease");
    assert!(taken[0].took_over.is_some());
    s.commit_and_claim(
        vec![event("acme", "e1", &[], &[("d1", "wh")])],
        vec![],
        Some(lease("node-a")),
    )
    .await
    .unwrap();
    assert!(s.release_node_claims("node-a").await.unwrap() >= 1);
    assert_eq!(ids(&s.due_jobs(Utc::now(), 10, b).await.unwrap()), ["d1"]);
}
