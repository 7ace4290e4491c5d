//! Building a partition's parts and manifest: a pure function of its staged lines, so a
//! redo after a crash produces the same names and the same bytes.

use std::io::Write;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// One `part-<n>.ndjson.gz` file.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub body: Bytes,
    pub events: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartInfo {
    pub name: String,
    pub bytes: u64,
    pub events: u64,
    pub sha256: String,
}

/// `_manifest.json`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Manifest {
    pub events: u64,
    pub first_accepted: DateTime<Utc>,
    pub last_accepted: DateTime<Utc>,
    pub parts: Vec<PartInfo>,
}

/// Gzip with a fixed header (mtime 0, no file name, OS "unknown") and a fixed level:
/// the same lines always give the same bytes with this build of hookbridge.
fn gzip(ndjson: &[u8]) -> Bytes {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(
            Vec::with_capacity(ndjson.len() / 4),
            flate2::Compression::new(6),
        );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(ndjson);
    Bytes::from(enc.finish().unwrap_or_default())
}

/// Parts of at most `max_part_bytes` of NDJSON each (before compression; a single line
/// longer than that gets a part of its own), named `part-0`, `part-1`, … in accept
/// order, and the manifest that describes them. `lines` are (accept time, envelope),
/// in accept order; empty gives no parts and `None`.
pub fn build_parts(
    lines: &[(DateTime<Utc>, String)],
    max_part_bytes: u64,
) -> Option<(Vec<Part>, Manifest)> {
    let first = lines.first()?.0;
    let last = lines.last()?.0;
    let mut parts = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut n = 0u64;
    let cut = |buf: &mut Vec<u8>, n: &mut u64, parts: &mut Vec<Part>| {
        if *n > 0 {
            parts.push(Part {
                name: format!("part-{}.ndjson.gz", parts.len()),
                body: gzip(buf),
                events: *n,
            });
            buf.clear();
            *n = 0;
        }
    };
    for (_, envelope) in lines {
        let len = envelope.len() as u64 + 1;
        if n > 0 && buf.len() as u64 + len > max_part_bytes {
            cut(&mut buf, &mut n, &mut parts);
        }
        buf.extend_from_slice(envelope.as_bytes());
        buf.push(b'\n');
        n += 1;
    }
    cut(&mut buf, &mut n, &mut parts);
    let manifest = Manifest {
        events: lines.len() as u64,
        first_accepted: first,
        last_accepted: last,
        parts: parts
            .iter()
            .map(|p| PartInfo {
                name: p.name.clone(),
                bytes: p.body.len() as u64,
                events: p.events,
                sha256: hex(&Sha256::digest(&p.body)),
            })
            .collect(),
    };
    Some((parts, manifest))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_cut() {
        let t = Utc::now();
        let lines: Vec<_> = (0..1000)
            .map(|i| {
                (
                    t,
                    format!("{{\"id\":\"evt_{i}\",\"pad\":\"{}\"}}", "x".repeat(100)),
                )
            })
            .collect();
        let (a, ma) = build_parts(&lines, 20_000).unwrap();
        let (b, mb) = build_parts(&lines, 20_000).unwrap();
        assert_eq!(ma, mb);
        assert!(a.len() > 1);
        assert_eq!(a.iter().map(|p| p.events).sum::<u64>(), 1000);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.body, y.body);
        }
        let mut d = flate2::read::GzDecoder::new(&a[0].body[..]);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut d, &mut s).unwrap();
        assert!(s.len() <= 20_000 && s.starts_with("{\"id\":\"evt_0\""));
        assert!(build_parts(&[], 10).is_none());
    }
}
