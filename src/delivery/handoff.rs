//! The direct hand-off of freshly committed jobs from the spool's committer to the
//! delivery scheduler, so new work never waits for a poll of the outbox.
//!
//! Only (delivery id, webhook id) pairs travel here, after their commit is durable. The scheduler still
//! claims them through the store (`Store::claim_announced`), so the store stays the one
//! source of truth: an id already delivered, in flight or gone is simply not handed out,
//! and a lost announcement (full stop, crash) only means the job is found by the next
//! poll of the outbox instead.

use tokio::sync::mpsc;

/// The committer's end: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct Announcer(mpsc::UnboundedSender<Vec<(String, String)>>);

/// The scheduler's end.
#[derive(Debug)]
pub struct Announcements(pub(super) mpsc::UnboundedReceiver<Vec<(String, String)>>);

/// A connected pair. Unbounded on purpose: the committer must not wait on delivery, and
/// what can queue here is bounded by the ingest rate (the scheduler drains it whenever it
/// runs, and ids are small).
pub fn handoff() -> (Announcer, Announcements) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Announcer(tx), Announcements(rx))
}

impl Announcer {
    /// Announces jobs, `(delivery id, webhook id)`, whose commit is durable. With no
    /// scheduler running (shutting down) they are dropped: the jobs stay due in the store.
    pub fn announce(&self, ids: Vec<(String, String)>) {
        if !ids.is_empty() {
            let _ = self.0.send(ids);
        }
    }
}
