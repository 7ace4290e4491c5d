//! Roll-ups: an `sftp` webhook with `"format": "ndjson.gz"` gets, instead of one file per
//! event, hourly or daily partitions of gzipped NDJSON for batch ETL jobs:
//!
//! ```text
//! /rollups/<type>/dt=YYYY-MM-DD/hour=HH/part-<n>.ndjson.gz   (no hour= level for "day")
//! /rollups/<type>/dt=YYYY-MM-DD/hour=HH/_manifest.json
//! /rollups/<type>/dt=YYYY-MM-DD/hour=HH/_SUCCESS             (written last)
//! ```
//!
//! Exactly once, in three steps:
//! 1. **Staging.** The spool stamps each batch with its accept time ([`crate::clock`]) and
//!    the store records one staged line per roll-up hook (hook, partition, accept
//!    sequence, exact envelope bytes) in the same transaction that records the event. So
//!    a 202 means the line is durable, and a repost of a known id stages nothing.
//! 2. **Closing** ([`closer`]). Once a partition's period plus `close_after` has passed,
//!    the closer claims it (a lease in the store, so one node closes it when several share
//!    PostgreSQL), reads its lines in accept order and writes the parts deterministically
//!    (gzip with a fixed header, parts cut at `max_part_bytes`), then `_manifest.json`,
//!    then `_SUCCESS`, all create-only through the storage seam.
//! 3. **Marking.** Only then does the store mark the partition closed and drop its lines.
//!    A kill -9 anywhere before leaves the lines staged: the redo builds the very same
//!    bytes under the very same names, and create-only writes keep what is already there.
//!
//! Partitioning by accept time (not the event's own `timestamp`) means no line can arrive
//! for a partition once its period is over, so a closed partition never changes.

pub mod closer;
mod parts;
pub mod replay;

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

use crate::event::EventType;

pub use parts::{build_parts, Manifest, Part, PartInfo};

/// Folder of every roll-up, so that `get -r /rollups` takes only roll-ups.
pub const ROOT: &str = "/rollups";
pub const DEFAULT_CLOSE_AFTER: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_PART_BYTES: u64 = 128 << 20;
/// Smallest part cap accepted: below it a part would hold a handful of events.
pub const MIN_MAX_PART_BYTES: u64 = 64 << 10;
pub const MAX_CLOSE_AFTER: Duration = Duration::from_secs(7 * 86_400);

/// What an `sftp` webhook writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Format {
    /// One file per event at `path_template` (the default).
    #[default]
    #[serde(rename = "json")]
    Json,
    /// Gzipped NDJSON partitions under `/rollups`.
    #[serde(rename = "ndjson.gz")]
    NdjsonGz,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Format::Json),
            "ndjson.gz" => Some(Format::NdjsonGz),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
}

impl Period {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(Period::Hour),
            "day" => Some(Period::Day),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
        }
    }

    /// Start of the period holding `t` (UTC).
    pub fn start(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let h = match self {
            Period::Hour => t.hour(),
            Period::Day => 0,
        };
        Utc.with_ymd_and_hms(t.year(), t.month(), t.day(), h, 0, 0)
            .single()
            .unwrap_or(t)
    }

    pub fn end(self, t: DateTime<Utc>) -> DateTime<Utc> {
        self.start(t)
            + match self {
                Period::Hour => chrono::Duration::hours(1),
                Period::Day => chrono::Duration::days(1),
            }
    }
}

/// The roll-up settings of a webhook whose format is `ndjson.gz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupSpec {
    pub rollup: Period,
    /// Grace after the period ends before the partition closes (late commits, clock skew).
    #[serde(with = "humantime_serde_str")]
    pub close_after: Duration,
    /// Most NDJSON bytes (before compression) in one part.
    pub max_part_bytes: u64,
}

impl RollupSpec {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_part_bytes < MIN_MAX_PART_BYTES {
            return Err((
                "max_part_bytes",
                format!("must be at least {MIN_MAX_PART_BYTES} bytes"),
            ));
        }
        if self.close_after > MAX_CLOSE_AFTER {
            return Err(("close_after", "must be at most 7 days".into()));
        }
        Ok(())
    }
}

mod humantime_serde_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Parses a `close_after` as the API and the config file write it (`"5m"`).
pub fn parse_close_after(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like \"30s\" or \"5m\": {e}"))
}

/// The partition an event of type `kind` accepted at `at` belongs to, as the folder
/// under [`ROOT`]: `<type>/dt=YYYY-MM-DD[/hour=HH]`.
pub fn partition(period: Period, kind: EventType, at: DateTime<Utc>) -> String {
    match period {
        Period::Hour => format!(
            "{}/dt={}/hour={:02}",
            kind.as_str(),
            at.format("%Y-%m-%d"),
            at.hour()
        ),
        Period::Day => format!("{}/dt={}", kind.as_str(), at.format("%Y-%m-%d")),
    }
}

/// A roll-up hook an event goes to (chosen by the request handler).
#[derive(Debug, Clone)]
pub struct Target {
    pub hook: String,
    pub spec: RollupSpec,
}

/// A line to stage for one roll-up hook, computed by the spool at accept time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedLine {
    pub hook: String,
    pub partition: String,
    /// When the partition may close: end of its period plus `close_after`.
    pub closes_at: DateTime<Utc>,
}

/// The staged lines of an event of type `kind` accepted at `at` for `targets`.
pub fn stage(targets: &[Target], kind: EventType, at: DateTime<Utc>) -> Vec<StagedLine> {
    targets
        .iter()
        .map(|t| StagedLine {
            hook: t.hook.clone(),
            partition: partition(t.spec.rollup, kind, at),
            closes_at: t.spec.rollup.end(at)
                + chrono::Duration::from_std(t.spec.close_after).unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sftp_view_hides_this_layout() {
        assert_eq!(
            ROOT,
            format!("/{}", crate::storage::complete_view::ROLLUP_DIR)
        );
    }

    #[test]
    fn partitions_and_close_times() {
        let at = Utc.with_ymd_and_hms(2026, 3, 9, 23, 59, 59).unwrap();
        assert_eq!(
            partition(Period::Hour, EventType::ALL[0], at),
            format!("{}/dt=2026-03-09/hour=23", EventType::ALL[0].as_str())
        );
        assert_eq!(
            partition(Period::Day, EventType::ALL[0], at),
            format!("{}/dt=2026-03-09", EventType::ALL[0].as_str())
        );
        let spec = RollupSpec {
            rollup: Period::Hour,
            close_after: DEFAULT_CLOSE_AFTER,
            max_part_bytes: DEFAULT_MAX_PART_BYTES,
        };
        let l = stage(
            &[Target {
                hook: "h".into(),
                spec,
            }],
            EventType::ALL[0],
            at,
        );
        assert_eq!(
            l[0].closes_at,
            Utc.with_ymd_and_hms(2026, 3, 10, 0, 5, 0).unwrap()
        );
    }
}
