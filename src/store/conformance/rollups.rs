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
    assert!(s.claim_partition(&p, "n", closes, lease).await.unwrap());
    assert!(
        !s.claim_partition(&p, "n", closes, lease).await.unwrap(),
        "a live lease was taken twice"
    );
    assert!(s.due_partitions(closes, 10).await.unwrap().is_empty());
    let later = lease + Duration::seconds(1);
    assert!(
        s.claim_partition(&p, "n", later, later + Duration::minutes(5))
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
    // The closed line is kept (for rebuilds), marked; the open one is still staged.
    let left = s.partition_lines(&p).await.unwrap();
    assert_eq!(left.len(), 2);
    assert!(left[0].closed_before && !left[1].closed_before);
    assert_eq!(s.rollup_backlog().await.unwrap(), (1, Some(closes)));
    // The close dropped the lease: what is left is due again, and claimable.
    assert_eq!(s.due_partitions(later, 10).await.unwrap().len(), 1);
    assert!(s.claim_partition(&p, "n", later, later).await.unwrap());
}

/// A replay reopens closed partitions whole (those with a line accepted in the range,
/// only closed ones, only of that hook); they are due at once; closing them again keeps
/// the lines; retention prunes closed lines only.
pub(super) async fn rollup_reopen_and_prune(s: S) {
    org(&s, "acme").await;
    let h10 = Utc.with_ymd_and_hms(2026, 11, 25, 10, 15, 0).unwrap();
    let h11 = h10 + Duration::hours(1);
    let staged = |id: &str, hook: &str, at: chrono::DateTime<Utc>, part: &str| {
        let mut e = event("acme", id, &[], &[]);
        e.lines = vec![StagedLine {
            hook: hook.into(),
            partition: part.into(),
            closes_at: at + Duration::hours(1),
        }];
        e.accepted_at = Some(at);
        e
    };
    s.commit_events(
        vec![
            staged("a1", "wh", h10, "t/10"),
            staged("a2", "wh", h10 + Duration::minutes(40), "t/10"),
            staged("b1", "wh", h11, "t/11"),
            staged("c1", "other", h10, "t/10"),
        ],
        vec![],
    )
    .await
    .unwrap();
    let pref = |hook: &str, part: &str| PartitionRef {
        org: "acme".into(),
        hook: hook.into(),
        partition: part.into(),
    };
    let (p10, p11, o10) = (
        pref("wh", "t/10"),
        pref("wh", "t/11"),
        pref("other", "t/10"),
    );
    let t = h11 + Duration::hours(2);
    // Close wh's hour 10 and other's hour 10; wh's hour 11 stays open.
    for p in [&p10, &o10] {
        assert!(s
            .claim_partition(p, "n", t, t + Duration::minutes(5))
            .await
            .unwrap());
        let l = s.partition_lines(p).await.unwrap();
        s.close_partition(p, l.last().unwrap().seq, l.len() as u64, 1, t)
            .await
            .unwrap();
    }
    assert_eq!(s.due_partitions(t, 10).await.unwrap(), vec![p11.clone()]);
    // A range touching only the second line of hour 10 reopens the whole hour, of wh only;
    // the open hour 11 is not "reopened".
    let r = s
        .reopen_partitions(
            "acme",
            "wh",
            h10 + Duration::minutes(30),
            h11 + Duration::minutes(1),
            t,
        )
        .await
        .unwrap();
    assert_eq!(r, vec!["t/10".to_string()]);
    let mut due = s.due_partitions(t, 10).await.unwrap();
    due.sort_by(|a, b| a.partition.cmp(&b.partition));
    assert_eq!(due, vec![p10.clone(), p11.clone()]);
    let l = s.partition_lines(&p10).await.unwrap();
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|l| l.closed_before));
    assert_eq!(s.rollup_backlog().await.unwrap().0, 3);
    // Reopened again while being rebuilt: nothing more (that close rebuilds it).
    assert!(s
        .reopen_partitions("acme", "wh", h10, h11, t)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .claim_partition(&p10, "n", t, t + Duration::minutes(5))
        .await
        .unwrap());
    s.close_partition(&p10, l[1].seq, 2, 1, t).await.unwrap();
    assert_eq!(s.partition_lines(&p10).await.unwrap().len(), 2);
    assert_eq!(s.due_partitions(t, 10).await.unwrap(), vec![p11.clone()]);
    // Retention: closed lines accepted before the cut go; open ones (hour 11) stay.
    assert_eq!(
        s.prune_rollup_lines("acme", h11 + Duration::hours(1))
            .await
            .unwrap(),
        3
    );
    assert!(s.partition_lines(&p10).await.unwrap().is_empty());
    assert_eq!(s.partition_lines(&p11).await.unwrap().len(), 1);
    assert!(s
        .reopen_partitions("acme", "wh", h10, t, t)
        .await
        .unwrap()
        .is_empty());
}

/// A node restarted after kill -9 hands back the partition it was closing (due again at
/// once, not when its lease runs out); a partition another node holds stays held.
pub(super) async fn a_node_releases_only_its_own_partition_leases(s: S) {
    org(&s, "acme").await;
    let at = Utc.with_ymd_and_hms(2026, 11, 25, 10, 15, 0).unwrap();
    let closes = at + Duration::hours(1);
    let staged = |id: &str, partition: &str| {
        let mut e = event("acme", id, &[], &[]);
        e.lines = vec![StagedLine {
            hook: "wh".into(),
            partition: partition.into(),
            closes_at: closes,
        }];
        e.accepted_at = Some(at);
        e
    };
    s.commit_events(
        vec![staged("e1", "2026-11-25/10"), staged("e2", "2026-11-25/11")],
        vec![],
    )
    .await
    .unwrap();
    let part = |partition: &str| PartitionRef {
        org: "acme".into(),
        hook: "wh".into(),
        partition: partition.into(),
    };
    let (pa, pb) = (part("2026-11-25/10"), part("2026-11-25/11"));
    let lease = closes + Duration::minutes(10);
    assert!(s
        .claim_partition(&pa, "node-a", closes, lease)
        .await
        .unwrap());
    assert!(s
        .claim_partition(&pb, "node-a_b", closes, lease)
        .await
        .unwrap());
    assert!(s.due_partitions(closes, 10).await.unwrap().is_empty());
    assert_eq!(s.release_node_claims("node-a").await.unwrap(), 1);
    let due = s.due_partitions(closes, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|p| p.partition.as_str()).collect::<Vec<_>>(),
        ["2026-11-25/10"],
        "only node-a's partition was handed back"
    );
    assert!(s
        .claim_partition(&pa, "node-c", closes, lease)
        .await
        .unwrap());
    assert!(!s
        .claim_partition(&pb, "node-c", closes, lease)
        .await
        .unwrap());
}
