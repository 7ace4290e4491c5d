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
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(rename = "type", default, borrow)]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow)]
    org: Option<&'a RawValue>,
    #[serde(default, borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
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
            Some(raw) if raw.get() == "null" => new_event_id(),
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
            Some(raw) if raw.get() == "null" => now,
            Some(raw) => {
                let s = string_field(raw, "timestamp")?;
                DateTime::parse_from_rfc3339(&s)
                    .map_err(|e| field("timestamp", format!("{s:?} is not an RFC 3339 time: {e}")))?
                    .with_timezone(&Utc)
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
