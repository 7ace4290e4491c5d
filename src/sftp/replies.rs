//! The one writer of a channel's replies, in the order the requests came.
//!
//! READ and WRITE run concurrently, so their replies finish out of order. The SFTP
//! protocol allows that, but PuTTY's `pscp` (and WinSCP, built on PuTTY's core) takes
//! every reply to a download as the next block of the file: an early EOF or a later
//! block arriving first makes it stop with "Lost connection". OpenSSH's sftp-server
//! answers strictly in order, so we do too: each request gets a sequence number, and
//! replies that finish early wait here (never in their task, which would hold the
//! concurrency permit the missing reply may need) until their turn.

use std::collections::BTreeMap;

use bytes::Bytes;
use russh::server::Msg;
use russh::ChannelWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The reply to request number `seq` of the channel; `None` when it has none (an
/// encoding failure), so the requests after it are not held back.
pub struct Reply {
    pub seq: u64,
    pub bytes: Option<Bytes>,
}

/// Puts replies back into request order.
#[derive(Default)]
pub struct Sequencer {
    next: u64,
    early: BTreeMap<u64, Option<Bytes>>,
}

impl Sequencer {
    /// Takes a finished reply; returns those now due, in order.
    pub fn push(&mut self, r: Reply) -> Vec<Bytes> {
        self.early.insert(r.seq, r.bytes);
        let mut due = Vec::new();
        while let Some(b) = self.early.remove(&self.next) {
            self.next += 1;
            due.extend(b);
        }
        due
    }

    /// Everything still waiting, in order (the channel is ending; a missing reply
    /// must not keep the rest back).
    pub fn drain(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.early)
            .into_values()
            .flatten()
            .collect()
    }
}

pub async fn writer(
    tx: ChannelWriteHalf<Msg>,
    mut replies: mpsc::Receiver<Reply>,
    gone: CancellationToken,
) -> ChannelWriteHalf<Msg> {
    let mut seq = Sequencer::default();
    let mut alive = true;
    while let Some(r) = replies.recv().await {
        if !alive {
            // Nobody will read them: keep draining so no sender ever blocks.
            continue;
        }
        for b in seq.push(r) {
            if !send(&tx, b, &gone).await {
                alive = false;
                break;
            }
        }
    }
    if alive {
        for b in seq.drain() {
            if !send(&tx, b, &gone).await {
                break;
            }
        }
    }
    tx
}

async fn send(tx: &ChannelWriteHalf<Msg>, b: Bytes, gone: &CancellationToken) -> bool {
    // russh waits for window space without noticing that the connection died
    // (a client killed mid-download): stop on `gone` as well as on an error.
    tokio::select! {
        r = tx.data_bytes(b) => r.is_ok(),
        _ = gone.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(seq: u64, s: &'static str) -> Reply {
        Reply {
            seq,
            bytes: Some(Bytes::from_static(s.as_bytes())),
        }
    }

    #[test]
    fn replies_leave_in_request_order() {
        let mut s = Sequencer::default();
        assert!(s.push(r(2, "c")).is_empty());
        assert!(s.push(r(1, "b")).is_empty());
        assert_eq!(s.push(r(0, "a")), vec!["a", "b", "c"]);
        assert_eq!(s.push(r(3, "d")), vec!["d"]);
    }

    #[test]
    fn a_request_without_reply_holds_nothing_back() {
        let mut s = Sequencer::default();
        assert!(s.push(r(1, "b")).is_empty());
        assert_eq!(
            s.push(Reply {
                seq: 0,
                bytes: None
            }),
            vec!["b"]
        );
    }

    #[test]
    fn drain_skips_gaps() {
        let mut s = Sequencer::default();
        s.push(r(3, "d"));
        s.push(r(2, "c"));
        assert_eq!(s.drain(), vec!["c", "d"]);
    }
}
