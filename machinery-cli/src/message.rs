//! How a message body and a task's values are shown: the fields an operator looks for, and the whole
//! message for scripts.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use machinery::wire::gotime;
use machinery::{Arg, Signature, TaskResult};
use serde_json::{json, Value};

/// A message body read from a broker, decoded as far as it goes.
#[derive(Debug)]
pub(crate) struct Message {
    /// The body as a task signature, if it is one.
    signature: Option<Signature>,
    /// The body as JSON, if it is JSON.
    json: Option<Value>,
    /// The raw body.
    raw: Vec<u8>,
}

impl Message {
    /// Decodes `body`.
    pub(crate) fn decode(body: &[u8]) -> Message {
        let json: Option<Value> = serde_json::from_slice(body).ok();
        let signature = json
            .as_ref()
            .filter(|v| v.is_object())
            .and_then(|_| Signature::from_json(body).ok());
        Message {
            signature,
            json,
            raw: body.to_vec(),
        }
    }

    /// The body as a task signature, if it is one.
    pub(crate) fn signature(&self) -> Option<&Signature> {
        self.signature.as_ref()
    }

    /// The task id, or `-`.
    pub(crate) fn uuid(&self) -> &str {
        match &self.signature {
            Some(s) if !s.uuid.is_empty() => &s.uuid,
            _ => "-",
        }
    }

    /// The task name, or a note saying what the body is instead.
    pub(crate) fn name(&self) -> String {
        match (&self.signature, &self.json) {
            (Some(s), _) if !s.name.is_empty() => s.name.clone(),
            (Some(_), _) | (None, Some(_)) => "(not a task message)".to_owned(),
            (None, None) => "(not JSON)".to_owned(),
        }
    }

    /// The routing key, or `-`.
    pub(crate) fn routing_key(&self) -> &str {
        match &self.signature {
            Some(s) if !s.routing_key.is_empty() => &s.routing_key,
            _ => "-",
        }
    }

    /// The arguments' values, comma-separated, or the start of the raw body when it is not a task.
    pub(crate) fn args_summary(&self) -> String {
        match &self.signature {
            Some(s) if !s.name.is_empty() => s
                .args
                .iter()
                .map(|arg| value_summary(&arg.type_tag, &arg.value))
                .collect::<Vec<_>>()
                .join(", "),
            _ => String::from_utf8_lossy(&self.raw).replace('\n', " "),
        }
    }

    /// The fields scripts want, plus the whole message (`message`: the JSON as sent; `raw`: the body as
    /// text when it is not JSON, `raw_base64` when it is not even UTF-8).
    pub(crate) fn to_json(&self) -> Value {
        let mut out = match &self.signature {
            Some(s) => json!({
                "uuid": s.uuid,
                "name": s.name,
                "routing_key": s.routing_key,
                "eta": s.eta.as_ref().map(gotime::format),
                "args": args_json(&s.args),
            }),
            None => {
                json!({"uuid": null, "name": null, "routing_key": null, "eta": null, "args": null})
            }
        };
        out["message"] = self.json.clone().unwrap_or(Value::Null);
        if self.json.is_none() {
            match std::str::from_utf8(&self.raw) {
                Ok(text) => out["raw"] = Value::String(text.to_owned()),
                Err(_) => {
                    out["raw_base64"] =
                        Value::String(base64::engine::general_purpose::STANDARD.encode(&self.raw))
                }
            }
        }
        out
    }
}

fn args_json(args: &[Arg]) -> Value {
    Value::Array(
        args.iter()
            .map(|a| json!({"Name": a.name, "Type": a.type_tag, "Value": a.value}))
            .collect(),
    )
}

/// A value for people: JSON text, except that `[]uint8` (base64 on the wire) shows as the text it holds
/// (`b"..."`) or as hex bytes.
pub(crate) fn value_summary(type_tag: &str, value: &Value) -> String {
    if matches!(type_tag, "[]uint8" | "[]byte") {
        if let Some(bytes) = value
            .as_str()
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        {
            return match std::str::from_utf8(&bytes) {
                Ok(text) => format!("b{text:?}"),
                Err(_) => {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    format!("bytes[{}]", hex.join(" "))
                }
            };
        }
    }
    value.to_string()
}

/// One result as `value (type)`.
pub(crate) fn result_summary(result: &TaskResult) -> String {
    format!(
        "{} ({})",
        value_summary(&result.type_tag, &result.value),
        result.type_tag
    )
}

/// A time for people: RFC 3339 in UTC to the second, and how far from now.
pub(crate) fn when(t: &DateTime<Utc>, now: DateTime<Utc>) -> String {
    if *t == gotime::zero_time() {
        return "-".to_owned();
    }
    let text = t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let delta = *t - now;
    let secs = delta.num_seconds();
    // Rounded to the nearest unit: a countdown of 600 s seen a moment later is still "in 10m".
    let span = |s: i64| -> String {
        match s {
            0..=119 => format!("{s}s"),
            120..=7199 => format!("{}m", (s + 30) / 60),
            7200..=172_799 => format!("{}h", (s + 1800) / 3600),
            _ => format!("{}d", (s + 43_200) / 86_400),
        }
    };
    if secs >= 0 {
        format!("{text} (in {})", span(secs))
    } else {
        format!("{text} ({} ago)", span(-secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_message_shows_its_fields_and_arguments() {
        let body = br#"{"UUID":"task_1","Name":"add","RoutingKey":"q","Args":[{"Type":"int64","Value":1},{"Type":"[]uint8","Value":"aGk="},{"Type":"string","Value":"x"}]}"#;
        let m = Message::decode(body);
        assert_eq!(
            (m.uuid(), m.name().as_str(), m.routing_key()),
            ("task_1", "add", "q")
        );
        assert_eq!(m.args_summary(), r#"1, b"hi", "x""#);
        let j = m.to_json();
        assert_eq!(j["uuid"], "task_1");
        assert_eq!(j["args"][0]["Value"], 1);
        assert_eq!(j["message"]["Name"], "add");
        assert!(j.get("raw").is_none());
    }

    #[test]
    fn other_bodies_say_what_they_are() {
        let m = Message::decode(b"not json");
        assert_eq!((m.uuid(), m.name().as_str()), ("-", "(not JSON)"));
        assert_eq!(m.args_summary(), "not json");
        assert_eq!(m.to_json()["raw"], "not json");
        assert_eq!(Message::decode(b"[1]").name(), "(not a task message)");
        assert!(Message::decode(&[0xff, 0]).to_json()["raw_base64"].is_string());
    }

    #[test]
    fn times_show_how_far_from_now_rounded() {
        let now = Utc::now();
        let at = |secs: i64| when(&(now + chrono::Duration::seconds(secs)), now);
        assert!(at(599).ends_with("(in 10m)"), "{}", at(599));
        assert!(at(-5).ends_with("(5s ago)"));
        assert!(at(3 * 86_400).ends_with("(in 3d)"));
        assert_eq!(when(&gotime::zero_time(), now), "-");
    }

    #[test]
    fn bytes_that_are_not_text_show_as_hex() {
        assert_eq!(value_summary("[]uint8", &json!("/wA=")), "bytes[ff 00]");
        assert_eq!(value_summary("int64", &json!(3)), "3");
    }
}
