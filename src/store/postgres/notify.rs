//! Wake-ups across nodes: LISTEN/NOTIFY on PostgreSQL.
//!
//! A transaction that commits delivery jobs due now (ingest, replay) or a retry (so other
//! nodes learn when it falls due) calls [`notify`] inside itself: PostgreSQL delivers the
//! notification only if and when the transaction commits, so a node is never woken for
//! jobs it cannot see yet. Every node listens on one dedicated connection (not from the
//! pool: LISTEN belongs to a session) and turns each notification into a wake-up of its
//! scheduler. The payload is the sending store's origin tag, so a node ignores its own
//! commits: those reach its scheduler by the direct hand-off already.
//!
//! Polling stays the fallback: a notification sent while a listener was reconnecting is
//! lost, so the listener wakes its scheduler once after each (re)connect.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use super::super::Result;

/// The channel name (per database, so two services on one server do not wake each other).
pub(super) const CHANNEL: &str = "hookbridge_jobs";
/// Longest wait between reconnect attempts while PostgreSQL is down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Queues a wake-up of the other nodes, sent when `c`'s transaction commits (at once
/// outside a transaction).
pub(super) async fn notify<C: deadpool_postgres::GenericClient + Sync>(
    c: &C,
    origin: &str,
) -> Result<()> {
    c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &origin])
        .await?;
    Ok(())
}

/// Starts the listener; it runs until the receiver is dropped.
pub(super) fn spawn(cfg: tokio_postgres::Config, origin: Arc<str>) -> mpsc::Receiver<()> {
    // One slot: wake-ups coalesce (the scheduler polls the whole outbox on each).
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(listen(cfg, origin, tx));
    rx
}

async fn listen(cfg: tokio_postgres::Config, origin: Arc<str>, wake: mpsc::Sender<()>) {
    let connected = metrics::gauge!("hookbridge_store_listener_connected");
    connected.set(0.0);
    let mut backoff = Duration::from_millis(250);
    let mut ever = false;
    let mut down_logged = false;
    while !wake.is_closed() {
        let (client, mut conn) = match cfg.connect(NoTls).await {
            Ok(c) => c,
            Err(e) => {
                if !down_logged {
                    tracing::warn!(error = %super::pg_err(e), "cannot connect to listen for new delivery jobs of other nodes; retrying (polling covers the gap)");
                    down_logged = true;
                }
                tokio::select! {
                    _ = wake.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // The connection object yields the notifications; drive it on its own task and
        // pass them on, so the LISTEN below can run on the client meanwhile.
        let (ntx, mut nrx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        if ntx.send(n.payload().to_owned()).is_err() {
                            return None;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Some(super::pg_err(e)),
                }
            }
            None
        });
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            driver.abort();
            if !down_logged {
                tracing::warn!(error = %super::pg_err(e), "cannot listen for new delivery jobs of other nodes; retrying (polling covers the gap)");
                down_logged = true;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        connected.set(1.0);
        backoff = Duration::from_millis(250);
        down_logged = false;
        if ever {
            tracing::info!(
                "listening again for new delivery jobs of other nodes (PostgreSQL NOTIFY)"
            );
            // Notifications sent while we were away are lost: look at the outbox once.
            let _ = wake.try_send(());
        } else {
            tracing::info!("listening for new delivery jobs of other nodes (PostgreSQL NOTIFY)");
        }
        ever = true;
        loop {
            tokio::select! {
                _ = wake.closed() => {
                    driver.abort();
                    return;
                }
                n = nrx.recv() => match n {
                    // A full slot means a wake-up is pending already.
                    Some(from) if *from != *origin => { let _ = wake.try_send(()); }
                    Some(_) => {}
                    None => break,
                },
            }
        }
        connected.set(0.0);
        let why = driver.await.ok().flatten();
        drop(client);
        match why {
            Some(e) => tracing::warn!(error = %e, "lost the PostgreSQL connection that listens for new delivery jobs; reconnecting (polling covers the gap)"),
            None => tracing::warn!("the PostgreSQL connection that listens for new delivery jobs closed; reconnecting (polling covers the gap)"),
        }
    }
}
