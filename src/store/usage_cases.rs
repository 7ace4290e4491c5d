//! Store cases for org usage, quota charging and taken paths, written against the trait
//! so that every backend runs the same ones (SQLite below; PostgreSQL by calling `run`).

use super::*;
use crate::limits::{OrgUsage, Quota};

fn ev(id: &str, files: &[&str], quota: Option<Quota>) -> NewEvent {
    NewEvent {
        org: "acme".into(),
        id: id.into(),
        // 9 bytes + newline = 10 per file
        envelope_json: "{\"a\":123}".into(),
        files: files.iter().map(|f| f.to_string()).collect(),
        deliveries: vec![],
        quota,
        ..Default::default()
    }
}

pub async fn run(s: &dyn Store) {
    s.put_org("acme", "Acme").await.unwrap();
    assert_eq!(s.org_usage("acme").await.unwrap(), None, "no count yet");
    let q = Some(Quota { files: 2, bytes: 0 });

    // Charged in the commit, up to the quota; the rest deferred with a reason.
    let out = s
        .commit_events(
            vec![
                ev("e1", &["/a/1.json"], q),
                ev("e2", &["/a/2.json"], q),
                ev("e3", &["/a/3.json"], q),
            ],
            vec![],
        )
        .await
        .unwrap();
    assert!(matches!(out[0], CommitOutcome::New(_)));
    assert!(matches!(out[1], CommitOutcome::New(_)));
    match &out[2] {
        CommitOutcome::Deferred { why, .. } => assert!(why.contains("2 of 2 files"), "{why}"),
        o => panic!("{o:?}"),
    }
    let two = OrgUsage {
        files: 2,
        bytes: 20,
    };
    assert_eq!(s.org_usage("acme").await.unwrap(), Some(two));
    // A deferred event is not for the repair to write; charged pending ones are.
    let mut pending: Vec<String> = s
        .pending_files()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    pending.sort();
    assert_eq!(pending, ["e1", "e2"]);

    // A repost while still full stays deferred and charges nothing.
    let out = s
        .commit_events(vec![ev("e3", &["/a/3.json"], q)], vec![])
        .await
        .unwrap();
    assert!(matches!(out[0], CommitOutcome::Deferred { .. }), "{out:?}");
    assert_eq!(s.org_usage("acme").await.unwrap(), Some(two));

    // A user deletes a file: room again; the repost is charged and its files are owed.
    s.add_org_usage("acme", -1, -10).await.unwrap();
    let out = s
        .commit_events(
            vec![ev("e3", &["/a/3.json"], q)],
            vec![("acme".into(), "e1".into())],
        )
        .await
        .unwrap();
    assert!(
        matches!(
            out[0],
            CommitOutcome::Known {
                pending_envelope: Some(_),
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(s.org_usage("acme").await.unwrap(), Some(two));

    // Taken paths: recorded only while an event still pending lists them, and left out
    // of what a repair writes.
    s.record_taken("acme", "/a/2.json").await.unwrap();
    s.record_taken("acme", "/a/1.json").await.unwrap(); // e1 is written: no record
    s.record_taken("acme", "/elsewhere.json").await.unwrap();
    let mut pending = s.pending_files().await.unwrap();
    pending.sort_by(|a, b| a.id.cmp(&b.id));
    let files: Vec<(String, Vec<String>)> = pending.into_iter().map(|p| (p.id, p.files)).collect();
    assert_eq!(
        files,
        [
            ("e2".to_string(), vec![]),
            ("e3".to_string(), vec!["/a/3.json".to_string()])
        ]
    );
    assert_eq!(
        s.taken_paths(
            "acme",
            vec!["/a/1.json".into(), "/a/2.json".into(), "/a/3.json".into()]
        )
        .await
        .unwrap(),
        ["/a/2.json"]
    );
    // The record outlives the event's pending state: a repair that read the list before
    // the take still finds it after it wrote.
    s.mark_files_done(vec![
        ("acme".into(), "e2".into()),
        ("acme".into(), "e3".into()),
    ])
    .await
    .unwrap();
    assert!(s.pending_files().await.unwrap().is_empty());
    assert_eq!(
        s.taken_paths("acme", vec!["/a/2.json".into()])
            .await
            .unwrap(),
        ["/a/2.json"]
    );

    // Never below zero; a listing fills a missing count only, unless it replaces.
    s.add_org_usage("acme", -100, -1000).await.unwrap();
    assert_eq!(
        s.org_usage("acme").await.unwrap(),
        Some(OrgUsage::default())
    );
    s.set_org_usage(
        "acme",
        OrgUsage {
            files: 7,
            bytes: 70,
        },
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        s.org_usage("acme").await.unwrap(),
        Some(OrgUsage::default())
    );
    s.set_org_usage(
        "acme",
        OrgUsage {
            files: 7,
            bytes: 70,
        },
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        s.org_usage("acme").await.unwrap(),
        Some(OrgUsage {
            files: 7,
            bytes: 70
        })
    );
    s.set_org_usage("other", OrgUsage { files: 1, bytes: 1 }, false)
        .await
        .unwrap();
    assert_eq!(
        s.org_usage("other").await.unwrap(),
        Some(OrgUsage { files: 1, bytes: 1 })
    );

    // Deleting the org forgets its count.
    s.delete_org("acme").await.unwrap();
    assert_eq!(s.org_usage("acme").await.unwrap(), None);
}
