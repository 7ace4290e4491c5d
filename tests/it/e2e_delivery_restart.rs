//! The direct hand-off of new jobs and what a restart keeps: a job handed over and cut off
//! by kill -9 before its outcome was recorded is sent again with the same `webhook-id`;
//! a retry due later keeps its time across a restart.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::e2e_delivery::{deliveries, http_hook, org, post, reply_retry_after, Receiver};
use crate::harness::*;

const T: Duration = Duration::from_secs(20);

/// `hookbridge_delivery_jobs_claimed_total{via="…"}` as /metrics reports it (0 if absent).
async fn claimed(d: &Daemon, via: &str) -> u64 {
    let label = format!("hookbridge_delivery_jobs_claimed_total{{via=\"{via}\"}} ");
    d.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&label).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[tokio::test]
async fn a_job_handed_over_directly_and_killed_before_its_outcome_is_sent_again() {
    let mut d = Daemon::start().await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    let h = http_hook(&d, "acme", &r.url("/h"), &["*"], false).await;
    let hook = h["id"].as_str().unwrap().to_owned();
    // The receiver holds the request until the kill: the outcome cannot be recorded first.
    r.hold(true);
    post(&d, "acme", "evt_1", "payment").await;
    wait_for("the attempt under way", T, || async {
        (r.events().len() == 1).then_some(())
    })
    .await;
    // It came through the hand-off from the committer, not a poll of the outbox.
    assert_eq!(claimed(&d, "handoff").await, 1, "{}", d.log());
    assert_eq!(claimed(&d, "poll").await, 0, "{}", d.log());
    d.kill9();
    r.hold(false);
    d.spawn().await;
    wait_for("the job sent again after the restart", T, || async {
        (r.events().len() == 2).then_some(())
    })
    .await;
    let seen = r.events();
    assert_eq!(seen[1].json()["id"], "evt_1");
    assert!(!seen[0].header("webhook-id").is_empty());
    assert_eq!(seen[0].header("webhook-id"), seen[1].header("webhook-id"));
    // Found again in the outbox at start: the store is the source of truth.
    assert_eq!(claimed(&d, "poll").await, 1, "{}", d.log());
    wait_for("recorded as delivered", T, || async {
        (deliveries(&d, "acme", &hook, "delivered").await.len() == 1).then_some(())
    })
    .await;
    assert_eq!(r.events().len(), 2, "delivered once more, not twice");
}

#[tokio::test]
async fn a_restart_keeps_the_time_of_a_retry_due_later() {
    let mut d = Daemon::start().await;
    org(&d, "acme").await;
    let r = Receiver::start().await;
    let h = http_hook(&d, "acme", &r.url("/h"), &["*"], false).await;
    let hook = h["id"].as_str().unwrap().to_owned();
    r.plan(vec![reply_retry_after(503, 4)]);
    post(&d, "acme", "evt_1", "payment").await;
    let due = |v: &serde_json::Value| {
        v["next_attempt_at"]
            .as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
    };
    let first = wait_for("the retry scheduled", T, || async {
        deliveries(&d, "acme", &hook, "failed")
            .await
            .first()
            .and_then(due)
    })
    .await;
    d.kill9();
    d.spawn().await;
    let after = deliveries(&d, "acme", &hook, "failed").await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        due(&after[0]),
        Some(first),
        "the schedule survives the restart"
    );
    wait_for("the retry", T, || async {
        (r.events().len() == 2).then_some(())
    })
    .await;
    let seen = r.events();
    assert!(
        seen[1].wall >= first,
        "retried at {} before its time {first}",
        seen[1].wall
    );
    assert_eq!(seen[0].header("webhook-id"), seen[1].header("webhook-id"));
}
