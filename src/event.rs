//! The eight platform event types and the envelope written to files and POSTed to webhooks.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EventType {
    InboundMessage,
    MessageSend,
    DeliveryReport,
    Payment,
    SetStatus,
    ConversationClosed,
    MoveToQueue,
    ConversationAssignment,
}

impl EventType {
    pub const ALL: [EventType; 8] = [
        EventType::InboundMessage,
        EventType::MessageSend,
        EventType::DeliveryReport,
        EventType::Payment,
        EventType::SetStatus,
        EventType::ConversationClosed,
        EventType::MoveToQueue,
        EventType::ConversationAssignment,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::InboundMessage => "inboundMessage",
            EventType::MessageSend => "messageSend",
            EventType::DeliveryReport => "deliveryReport",
            EventType::Payment => "payment",
            EventType::SetStatus => "setStatus",
            EventType::ConversationClosed => "conversationClosed",
            EventType::MoveToQueue => "moveToQueue",
            EventType::ConversationAssignment => "conversationAssignment",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    fn allowed_list() -> String {
        Self::ALL
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A subscription list: empty or `["*"]` means every type; duplicates collapse.
    pub fn parse_filter(items: &[String]) -> Result<Vec<EventType>, String> {
        if items.is_empty() || items.iter().any(|s| s == "*") {
            return Ok(Self::ALL.to_vec());
        }
        let mut out = Vec::new();
        for s in items {
            let t = EventType::parse(s).ok_or_else(|| {
                format!(
                    "unknown event type {s:?}; allowed: {}, or \"*\"",
                    Self::allowed_list()
                )
            })?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out.sort();
        Ok(out)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The envelope exactly as it is stored and delivered. `data` keeps the platform's bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub org: String,
    #[serde(with = "micros")]
    pub timestamp: DateTime<Utc>,
    pub data: Box<RawValue>,
}

mod micros {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// What the platform may send; everything optional so that each problem gets its own message.
/// A member that is present stays `Some` even when it is `null`, so that `null` is refused
/// as "not a string" instead of passing for absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(rename = "type", default, borrow, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    org: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    timestamp: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
}

fn present<'de: 'a, 'a, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'a RawValue>, D::Error> {
    <&'a RawValue>::deserialize(d).map(Some)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("duplicate key {0}: each key may appear once per object")]
    DuplicateKey(String),
    #[error("field `{field}`: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

fn field(field: &'static str, message: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Field {
        field,
        message: message.into(),
    }
}

fn string_field(raw: &RawValue, name: &'static str) -> Result<String, EnvelopeError> {
    serde_json::from_str::<String>(raw.get()).map_err(|_| field(name, "must be a string"))
}

pub const MAX_ID_LEN: usize = 128;

/// Event ids become part of file names: keep them to a portable, unambiguous charset.
pub fn validate_event_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("must be 1 to {MAX_ID_LEN} characters"));
    }
    if id.starts_with('.') || id.starts_with('-') {
        return Err("must not start with '.' or '-'".into());
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err("may contain only letters, digits, '_', '-', '.' and ':'".into());
    }
    Ok(())
}

/// File names hold the UTC time as `YYYYMMDDTHHMMSS.ffffffZ`: fixed width and in time
/// order only for years 0000–9999 and without leap seconds (chrono keeps `23:59:60` as
/// second 59 with 1e9+ nanoseconds, which would print as `…235960…` or worse).
pub fn check_file_stamp_range(t: DateTime<Utc>) -> Result<(), String> {
    use chrono::{Datelike, Timelike};
    if !(0..=9999).contains(&t.year()) {
        return Err(format!(
            "is in year {} in UTC; timestamps must fall in years 0000 to 9999",
            t.year()
        ));
    }
    if t.nanosecond() >= 1_000_000_000 {
        return Err("is a leap second (:60); send :59.999999 or the next second".into());
    }
    Ok(())
}

/// The first key that appears twice in one object, as `"key" at path`.
fn find_duplicate_key(text: &str) -> Result<(), String> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(text);
    match (NoDupes { path: "$" }).deserialize(&mut de) {
        Ok(()) => Ok(()),
        Err(e) => {
            let m = e.to_string();
            match m.strip_prefix(DUP_PREFIX) {
                // Drop serde_json's " at line L column C" suffix: the path says where.
                Some(rest) => Err(rest
                    .rsplit_once(" at line ")
                    .map_or(rest, |(msg, _)| msg)
                    .to_owned()),
                // Not ours: the JSON error is reported by the real parse.
                None => Ok(()),
            }
        }
    }
}

const DUP_PREFIX: &str = "\u{0}dup:";

/// Walks a JSON document without building it, failing on the first repeated key.
struct NoDupes<'p> {
    path: &'p str,
}

impl<'de> serde::de::DeserializeSeed<'de> for NoDupes<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDupes<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let path = format!("{}[{i}]", self.path);
            if seq.next_element_seed(NoDupes { path: &path })?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let path = format!("{}.{key}", self.path);
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "{DUP_PREFIX}{key:?} in {}",
                    self.path
                )));
            }
            map.next_value_seed(NoDupes { path: &path })?;
        }
        Ok(())
    }
}

pub fn new_event_id() -> String {
    format!("evt_{}", ulid::Ulid::new())
}

impl Envelope {
    /// Parses and validates a posted body for `org`; `now` fills a missing timestamp.
    pub fn from_request(
        body: &[u8],
        org: &str,
        now: DateTime<Utc>,
    ) -> Result<Envelope, EnvelopeError> {
        let text = std::str::from_utf8(body)
            .map_err(|_| EnvelopeError::Json("body is not UTF-8".into()))?;
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        // serde_json keeps the last of duplicate keys; readers downstream disagree on which
        // wins, so a body with any is refused, at any depth.
        find_duplicate_key(text).map_err(EnvelopeError::DuplicateKey)?;
        if !value.is_object() {
            return Err(EnvelopeError::Json(
                "the envelope must be a JSON object".into(),
            ));
        }
        let inc: Incoming<'_> = serde_json::from_str(text).map_err(|e| {
            let m = e.to_string();
            match m.strip_prefix("unknown field ") {
                Some(rest) => field(
                    "envelope",
                    format!(
                        "unknown field {}",
                        rest.split(" at line").next().unwrap_or(rest)
                    ),
                ),
                None => EnvelopeError::Json(m),
            }
        })?;

        let kind_raw = inc.kind.ok_or_else(|| field("type", "is required"))?;
        let kind_s = string_field(kind_raw, "type")?;
        let kind = EventType::parse(&kind_s).ok_or_else(|| {
            field(
                "type",
                format!(
                    "unknown event type {kind_s:?}; allowed: {}",
                    EventType::allowed_list()
                ),
            )
        })?;

        let id = match inc.id {
            None => new_event_id(),
            Some(raw) => {
                let id = string_field(raw, "id")?;
                validate_event_id(&id).map_err(|m| field("id", m))?;
                id
            }
        };

        if let Some(raw) = inc.org {
            let o = string_field(raw, "org")?;
            if o != org {
                return Err(field(
                    "org",
                    format!("{o:?} does not match the org of the URL {org:?}"),
                ));
            }
        }

        let timestamp = match inc.timestamp {
            None => now,
            Some(raw) => {
                let s = string_field(raw, "timestamp")?;
                let t = DateTime::parse_from_rfc3339(&s)
                    .map_err(|e| field("timestamp", format!("{s:?} is not an RFC 3339 time: {e}")))?
                    .with_timezone(&Utc);
                check_file_stamp_range(t).map_err(|m| field("timestamp", format!("{s:?} {m}")))?;
                t
            }
        };

        let data = inc
            .data
            .ok_or_else(|| field("data", "is required (a JSON object)"))?;
        if !data.get().trim_start().starts_with('{') {
            return Err(field("data", "must be a JSON object"));
        }
        let data = RawValue::from_string(data.get().to_owned())
            .map_err(|e| EnvelopeError::Json(e.to_string()))?;

        Ok(Envelope {
            id,
            kind,
            org: org.to_owned(),
            timestamp,
            data,
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("envelope serializes")
    }

    /// `YYYYMMDDTHHMMSS.ffffffZ`: fixed width, so name order is time order.
    pub fn file_stamp(&self) -> String {
        self.timestamp.format("%Y%m%dT%H%M%S%.6fZ").to_string()
    }

    pub fn rfc3339(&self) -> String {
        self.timestamp.to_rfc3339_opts(SecondsFormat::Micros, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        "2026-11-25T10:15:02.123456Z".parse().unwrap()
    }

    #[test]
    fn full_envelope_roundtrips_with_data_bytes_kept() {
        let body = br#"{"id":"evt_1","type":"deliveryReport","timestamp":"2026-11-25T11:15:02.5+01:00","data":{"z":1,"a":[2]}}"#;
        let e = Envelope::from_request(body, "acme", now()).unwrap();
        assert_eq!(
            e.to_json(),
            r#"{"id":"evt_1","type":"deliveryReport","org":"acme","timestamp":"2026-11-25T10:15:02.500000Z","data":{"z":1,"a":[2]}}"#
        );
        assert_eq!(e.file_stamp(), "20261125T101502.500000Z");
    }

    #[test]
    fn missing_id_and_timestamp_are_filled() {
        let e = Envelope::from_request(br#"{"type":"payment","data":{}}"#, "acme", now()).unwrap();
        assert!(e.id.starts_with("evt_"));
        assert_eq!(e.timestamp, now());
    }

    #[test]
    fn each_problem_names_its_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "JSON"),
            (b"[]", "object"),
            (br#"{"type":"nope","data":{}}"#, "type"),
            (br#"{"data":{}}"#, "type"),
            (br#"{"type":"payment"}"#, "data"),
            (br#"{"type":"payment","data":3}"#, "data"),
            (br#"{"type":"payment","data":{},"id":"../x"}"#, "id"),
            (br#"{"type":"payment","data":{},"id":7}"#, "id"),
            (br#"{"type":"payment","data":{},"org":"other"}"#, "org"),
            (
                br#"{"type":"payment","data":{},"timestamp":"yesterday"}"#,
                "timestamp",
            ),
            (br#"{"type":"payment","data":{},"extra":1}"#, "extra"),
            (br#"{"type":"payment","data":{},"org":null}"#, "org"),
            (br#"{"type":"payment","data":{},"id":null}"#, "id"),
            (
                br#"{"type":"payment","data":{},"timestamp":null}"#,
                "timestamp",
            ),
            (br#"{"type":null,"data":{}}"#, "type"),
            (br#"{"type":"payment","data":null}"#, "data"),
        ];
        for (body, needle) in cases {
            let e = Envelope::from_request(body, "acme", now())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(needle),
                "{} -> {e}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth_and_named() {
        for (body, key) in [
            (
                r#"{"type":"payment","data":{"a":1,"a":2}}"#,
                r#""a" in $.data"#,
            ),
            (
                r#"{"type":"payment","data":{"x":{"b":[{"c":1,"c":1}]}}}"#,
                r#""c" in $.data.x.b[0]"#,
            ),
            (
                r#"{"type":"payment","type":"payment","data":{}}"#,
                r#""type" in $"#,
            ),
            (
                r#"{"type":"payment","data":{"\u0061":1,"a":2}}"#,
                r#""a" in $.data"#,
            ),
        ] {
            let e = Envelope::from_request(body.as_bytes(), "acme", now()).unwrap_err();
            assert!(matches!(e, EnvelopeError::DuplicateKey(_)), "{body} -> {e}");
            assert!(e.to_string().contains(key), "{body} -> {e}");
        }
        // The same key in sibling objects is fine.
        Envelope::from_request(
            br#"{"type":"payment","data":{"a":{"k":1},"b":{"k":1},"c":[{"k":1},{"k":2}]}}"#,
            "acme",
            now(),
        )
        .unwrap();
    }

    #[test]
    fn timestamps_outside_the_fixed_width_stamp_are_refused() {
        for ts in [
            "9999-12-31T23:59:59-01:00",
            "0000-01-01T00:00:00+01:00",
            "2026-06-30T23:59:60Z",
            "2026-06-30T23:59:60.5Z",
        ] {
            let body = format!(r#"{{"type":"payment","data":{{}},"timestamp":"{ts}"}}"#);
            let e = Envelope::from_request(body.as_bytes(), "acme", now()).unwrap_err();
            assert!(e.to_string().contains("timestamp"), "{ts} -> {e}");
        }
        // The edges that fit keep the fixed width and the time order.
        let stamp = |ts: &str| {
            let body = format!(r#"{{"type":"payment","data":{{}},"timestamp":"{ts}"}}"#);
            Envelope::from_request(body.as_bytes(), "acme", now())
                .unwrap()
                .file_stamp()
        };
        let first = stamp("0000-01-01T00:00:00Z");
        let mid = stamp("0999-12-31T23:59:59.999999Z");
        let last = stamp("9999-12-31T23:59:59.999999Z");
        assert_eq!(first, "00000101T000000.000000Z");
        for s in [&first, &mid, &last] {
            assert_eq!(s.len(), first.len(), "{s}");
        }
        assert!(first < mid && mid < last);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Envelope::from_request(&body, "acme", now());
        }

        #[test]
        fn accepted_ids_are_safe_file_name_parts(id in "\\PC{0,40}") {
            if validate_event_id(&id).is_ok() {
                prop_assert!(!id.contains('/') && !id.starts_with('.') && !id.contains('\0'));
            }
        }
    }
}
