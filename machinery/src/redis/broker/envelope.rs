//! The dead-letter envelope: what a message the worker gave up on looks like in `<queue>.dead`, so that
//! the command-line tool can say where it came from, why and when, and requeue it byte for byte.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::broker::DeadLetter;

/// A dead letter as stored in `<queue>.dead`.
#[derive(Debug, Serialize, Deserialize)]
pub(in crate::redis) struct Envelope {
    queue: String,
    reason: String,
    at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

impl Envelope {
    pub(in crate::redis) fn encode(
        queue: &str,
        reason: &str,
        at: DateTime<Utc>,
        body: &[u8],
    ) -> Vec<u8> {
        use base64::Engine as _;
        let (body, body_base64) = match std::str::from_utf8(body) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(body)),
            ),
        };
        let envelope = Envelope {
            queue: queue.to_owned(),
            reason: reason.to_owned(),
            at: crate::wire::gotime::format(&at),
            body,
            body_base64,
        };
        // Serializing a struct of strings cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// Reads an entry; one that is not our envelope (pushed by hand) is returned whole as the body.
    pub(in crate::redis) fn decode(queue: &str, entry: &[u8]) -> DeadLetter {
        use base64::Engine as _;
        match serde_json::from_slice::<Envelope>(entry) {
            Ok(envelope) => {
                let body = match (envelope.body, envelope.body_base64) {
                    (Some(text), _) => text.into_bytes(),
                    (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap_or_default(),
                    (None, None) => Vec::new(),
                };
                DeadLetter {
                    queue: envelope.queue,
                    reason: envelope.reason,
                    at: crate::wire::gotime::parse(&envelope.at).unwrap_or_else(|_| Utc::now()),
                    body,
                }
            }
            Err(_) => DeadLetter {
                queue: queue.to_owned(),
                reason: "unknown (not a machinery dead-letter envelope)".to_owned(),
                at: crate::wire::gotime::zero_time(),
                body: entry.to_vec(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_text_and_binary_bodies() {
        let at = Utc::now();
        for body in [b"{\"UUID\":1}".to_vec(), vec![0xff, 0x00, 0x7b]] {
            let raw = Envelope::encode("q", "why", at, &body);
            let letter = Envelope::decode("q", &raw);
            assert_eq!(letter.body, body);
            assert_eq!(
                (letter.queue.as_str(), letter.reason.as_str()),
                ("q", "why")
            );
        }
        let foreign = Envelope::decode("q", b"not an envelope");
        assert_eq!(foreign.body, b"not an envelope");
    }
}
