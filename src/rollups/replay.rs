//! Replay of a roll-up hook: `POST …/webhooks/{id}/replay` with `since` (and `until`)
//! rebuilds every closed partition of the hook that holds an event accepted in
//! `[since, until)`, whole, by the closer's one path (see [`super::closer`]): the same
//! lines give the same part names and bytes, the partition is hidden while it is
//! rewritten, and a kill -9 during the rebuild leaves it reopened, so the redo finishes it.
//!
//! The lines come from the store, where a closed partition's lines are kept for as long
//! as the org's retention keeps files (`retention_days`; forever when 0). A range whose
//! first partition began before that is refused: some of its lines may be gone.

use chrono::{DateTime, Utc};

use crate::ingress::problem::Problem;
use crate::store::Webhook;
use crate::App;

/// Reopens the partitions of `hook` (a roll-up hook) for the range; returns their folders
/// under `/rollups`. The closer rebuilds them at its next pass.
pub async fn rebuild_range(
    app: &App,
    hook: &Webhook,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<Vec<String>, Problem> {
    let now = crate::clock::now();
    let Some(since) = since else {
        return Err(Problem::bad_request(
            "give `since` (RFC 3339) and optionally `until` (default: now): the partitions \
             holding events accepted in that range are rebuilt",
        ));
    };
    if since > now {
        return Err(Problem::bad_request(format!(
            "`since` ({since}) is in the future: no event was accepted then"
        )));
    }
    let until = until.unwrap_or(now);
    if until <= since {
        return Err(Problem::bad_request(format!(
            "`until` ({until}) must be after `since` ({since})"
        )));
    }
    if let Some(org) = app.store.get_org(&hook.org).await? {
        let days = app.current().limits.for_org(&org.limits).retention_days;
        let kept_from = now - chrono::Duration::days(i64::from(days));
        // Retention drops lines one by one, but a rebuild rewrites a partition whole: one
        // that began before `kept_from` may have lost its first lines, and rebuilding it
        // would drop events already published. So the partition holding `since` must begin
        // inside the kept window; the day's start bounds both periods (a hook may have
        // changed from daily to hourly).
        let first = super::Period::Day.start(since);
        if days > 0 && first < kept_from {
            return Err(Problem::bad_request(format!(
                "`since` ({since}) falls in a partition that began at {first}, before \
                 {kept_from}: the org keeps files and roll-up lines for {days} days \
                 (retention_days), so partitions that began earlier cannot be rebuilt"
            )));
        }
    }
    let parts = app
        .store
        .reopen_partitions(&hook.org, &hook.id, since, until, now)
        .await?;
    let folders: Vec<String> = parts
        .iter()
        .map(|p| format!("{}/{p}", super::ROOT))
        .collect();
    tracing::info!(target: "audit", event = "rollup_replay", org = %hook.org, hook = %hook.id,
        %since, %until, partitions = folders.len(), "roll-up partitions reopened for a rebuild");
    metrics::counter!("hookbridge_rollup_rebuilds_requested_total").increment(folders.len() as u64);
    Ok(folders)
}
