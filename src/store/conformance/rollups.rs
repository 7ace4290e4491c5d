//! Roll-up staging, partition claims and closes, alike on every backend.

use chrono::{Duration, TimeZone, Utc};

use super::{event, org, S};
use crate::rollups::StagedLine;
use crate::store::PartitionRef;

/// Lines are staged for new events only (a repost stages nothing); a partition is due
/// once its close time passed; one claim wins while its lease lives, another after it
/// expired; a close drops lines up to `through_seq` and the lease.
pub(super) async fn rollup_claims_and_closes(s: S) {
    org(&s, "acme").await;
    let at = Utc.with_ymd_and_hms(2026, 11, 25, 10, 15, 0).unwrap();
    let closes = at + Duration::hours(1);
    let staged = |id: &str| {
        let mut e = event("acme", id, &[], &[]);
        e.lines = vec![StagedLine {
            hook: "wh".into(),
            partition: "2026-11-25/10".into(),
            closes_at: closes,
        }];
        e.accepted_at = Some(at);
        e
    };
    s.commit_events(vec![staged("e1"), staged("e2")], vec![])
        .await
        .unwrap();
    s.commit_events(vec![staged("e1")], vec![]).await.unwrap();
    assert_eq!(s.rollup_backlog().await.unwrap(), (2, Some(closes)));
    assert!(s.due_partitions(at, 10).await.unwrap().is_empty());
    let due = s.due_partitions(closes, 10).await.unwrap();
    let p = PartitionRef {
        org: "acme".into(),
        hook: "wh".into(),
        partition: "2026-11-25/10".into(),
    };
    assert_eq!(due.len(), 1);
    assert_eq!(
        (&due[0].org, &due[0].hook, &due[0].partition),
        (&p.org, &p.hook, &p.partition)
    );
    let lease = closes + Duration::minutes(5);
    assert!(s.claim_partition(&p, closes, lease).await.unwrap());
    assert!(
        !s.claim_partition(&p, closes, lease).await.unwrap(),
        "a live lease was taken twice"
    );
    assert!(s.due_partitions(closes, 10).await.unwrap().is_empty());
    let later = lease + Duration::seconds(1);
    assert!(
        s.claim_partition(&p, later, later + Duration::minutes(5))
            .await
            .unwrap(),
        "an expired lease was not taken over"
    );
    let lines = s.partition_lines(&p).await.unwrap();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].seq < lines[1].seq);
    assert_eq!(lines[0].accepted_at, at);
    assert_eq!(lines[0].envelope, r#"{"id":"e1"}"#);
    s.close_partition(&p, lines[0].seq, 1, 12, later)
        .await
        .unwrap();
    let left = s.partition_lines(&p).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, lines[1].seq);
    assert_eq!(s.rollup_backlog().await.unwrap(), (1, Some(closes)));
    // The close dropped the lease: what is left is due again, and claimable.
    assert_eq!(s.due_partitions(later, 10).await.unwrap().len(), 1);
    assert!(s.claim_partition(&p, later, later).await.unwrap());
}
