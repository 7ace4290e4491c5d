//! Crash repair against a real SQLite store and real org storage: a file an ETL job took
//! while its event was still pending (the node died between publishing it and marking it
//! written) is never written again by a repair on any node.

use std::sync::Arc;

use super::*;
use crate::storage::local::LocalStorage;
use crate::store::{CommitOutcome, NewEvent};

fn event(id: &str, files: &[&str]) -> NewEvent {
    NewEvent {
        org: "acme".into(),
        id: id.into(),
        envelope_json: format!("{{\"id\":\"{id}\"}}"),
        files: files.iter().map(|f| f.to_string()).collect(),
        deliveries: vec![],
        quota: None,
        ..Default::default()
    }
}

/// A SQLite store and a local org folder for org `acme`, in a temp dir kept by the caller.
async fn acme() -> (tempfile::TempDir, Arc<dyn Store>, Arc<dyn Storage>, OrgName) {
    let dir = tempfile::tempdir().unwrap();
    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [8u8; 32]);
    let secrets = Arc::new(crate::secrets::SecretBox::from_base64(&key).unwrap());
    let store: Arc<dyn Store> =
        Arc::new(crate::store::sqlite_for_tests(&dir.path().join("state.db"), secrets).unwrap());
    let storage: Arc<dyn Storage> =
        Arc::new(LocalStorage::open(&dir.path().join("orgs"), &dir.path().join("tmp")).unwrap());
    let org = OrgName::new("acme").unwrap();
    store.put_org("acme", "Acme").await.unwrap();
    storage.create_org(&org).await.unwrap();
    (dir, store, storage, org)
}

#[tokio::test]
async fn a_file_taken_while_its_event_was_pending_never_comes_back() {
    let (_dir, store, storage, org) = acme().await;

    // Node A commits two events and publishes their files, then dies (kill -9) before it
    // marks them written: the store still says pending.
    let events = vec![event("e1", &["/p/e1.json"]), event("e2", &["/p/e2.json"])];
    let out = store.commit_events(events.clone(), vec![]).await.unwrap();
    assert!(out.iter().all(|o| matches!(o, CommitOutcome::New(_))));
    let (files, _) = event_files(&events);
    for r in storage.write_events(&files).await {
        r.unwrap();
    }
    assert_eq!(store.pending_files().await.unwrap().len(), 2);

    // An ETL job takes e1's file over SFTP: the session records it as taken, then deletes
    // it (the order `sftp::ops::remove` keeps).
    let taken = StoragePath::parse("/p/e1.json").unwrap();
    store.record_taken("acme", "/p/e1.json").await.unwrap();
    storage.delete(&org, &taken).await.unwrap();
    // ... and e2's file is lost some other way (the repair must still write that one).
    storage
        .delete(&org, &StoragePath::parse("/p/e2.json").unwrap())
        .await
        .unwrap();

    // The next node that starts, or the periodic repair, runs; twice, as two nodes might.
    recover(&store, &storage).await.unwrap();
    recover(&store, &storage).await.unwrap();
    let names: Vec<String> = storage
        .walk(&org)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.path.virtual_path())
        .collect();
    assert_eq!(
        names,
        ["/p/e2.json"],
        "the taken file stays gone; the lost one is back"
    );
    assert!(
        store.pending_files().await.unwrap().is_empty(),
        "both events are done"
    );
}

/// The interleaving the take record alone cannot stop: a repair reads the pending list,
/// then a user takes the file (record, delete), then the repair writes. The repair checks
/// the takes after writing and removes what it re-created.
#[tokio::test]
async fn a_repair_that_read_the_list_before_the_take_removes_what_it_recreated() {
    let (_dir, store, storage, org) = acme().await;
    let events = vec![event("e1", &["/p/e1.json"])];
    store.commit_events(events.clone(), vec![]).await.unwrap();
    let (files, _) = event_files(&events);
    for r in storage.write_events(&files).await {
        r.unwrap();
    }

    // The repair on another node reads the list now...
    let stale = store.pending_files().await.unwrap();
    assert_eq!(stale[0].files, ["/p/e1.json"]);
    // ... the ETL job takes the file ...
    let p = StoragePath::parse("/p/e1.json").unwrap();
    store.record_taken("acme", "/p/e1.json").await.unwrap();
    storage.delete(&org, &p).await.unwrap();
    // ... and the repair writes from its stale list.
    repair(&store, &storage, stale).await.unwrap();
    assert!(
        matches!(storage.stat(&org, &p).await, Err(StorageError::NotFound)),
        "the taken file is gone again"
    );
    assert!(store.pending_files().await.unwrap().is_empty());

    // A repair whose file is simply there writes nothing and marks the event done.
    let events = vec![event("e2", &["/p/e2.json"])];
    store.commit_events(events.clone(), vec![]).await.unwrap();
    let (files, _) = event_files(&events);
    for r in storage.write_events(&files).await {
        r.unwrap();
    }
    recover(&store, &storage).await.unwrap();
    let names: Vec<String> = storage
        .walk(&org)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.path.virtual_path())
        .collect();
    assert_eq!(names, ["/p/e2.json"]);
    assert!(store.pending_files().await.unwrap().is_empty());
}
