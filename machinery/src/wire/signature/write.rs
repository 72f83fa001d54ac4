//! Writing a [`Signature`] as Go's JSON: Go's keys, in Go's order, every key present, empty lists as
//! `null`. One list of the fields ([`Signature::write_fields`]) feeds two writers: serde's (`impl
//! Serialize`, for any serializer) and a direct one for [`Signature::to_json`], the hot path of every
//! send. The direct one writes the keys as fixed text and copies a string that needs no escaping as it
//! is, where serde_json escapes every string byte by byte; both write the same bytes (tested).

use chrono::{DateTime, Utc};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use super::{deep, Headers, Signature};
use crate::wire::arg::Arg;
use crate::wire::gotime;

/// A field's key: its name, and its JSON text `"Name":` made at compile time (Go's keys need no
/// escaping).
#[derive(Clone, Copy)]
struct Key {
    name: &'static str,
    json: &'static [u8],
}

macro_rules! key {
    ($name:literal) => {
        Key {
            name: $name,
            json: concat!("\"", $name, "\":").as_bytes(),
        }
    };
}

/// What the fields of a signature are written to, one call per field in Go's order.
trait Fields {
    type Error;
    fn string(&mut self, key: Key, value: &str) -> Result<(), Self::Error>;
    fn number(&mut self, key: Key, value: u32) -> Result<(), Self::Error>;
    fn boolean(&mut self, key: Key, value: bool) -> Result<(), Self::Error>;
    fn time(&mut self, key: Key, value: &Option<DateTime<Utc>>) -> Result<(), Self::Error>;
    fn args(&mut self, key: Key, value: &[Arg]) -> Result<(), Self::Error>;
    fn headers(&mut self, key: Key, value: &Option<Headers>) -> Result<(), Self::Error>;
    fn signatures(&mut self, key: Key, value: &[Signature]) -> Result<(), Self::Error>;
    fn callback(&mut self, key: Key, value: &Option<Box<Signature>>) -> Result<(), Self::Error>;
}

impl<T> Signature<T> {
    fn write_fields<F: Fields>(&self, f: &mut F) -> Result<(), F::Error> {
        f.string(key!("UUID"), &self.uuid)?;
        f.string(key!("Name"), &self.name)?;
        f.string(key!("RoutingKey"), &self.routing_key)?;
        f.time(key!("ETA"), &self.eta)?;
        f.string(key!("GroupUUID"), &self.group_uuid)?;
        f.number(key!("GroupTaskCount"), self.group_task_count)?;
        f.args(key!("Args"), &self.args)?;
        f.headers(key!("Headers"), &self.headers)?;
        f.number(key!("Priority"), u32::from(self.priority))?;
        f.boolean(key!("Immutable"), self.immutable)?;
        f.number(key!("RetryCount"), self.retry_count)?;
        f.number(key!("RetryTimeout"), self.retry_timeout)?;
        f.signatures(key!("OnSuccess"), &self.on_success)?;
        f.signatures(key!("OnError"), &self.on_error)?;
        f.callback(key!("ChordCallback"), &self.chord_callback)?;
        f.string(key!("BrokerMessageGroupId"), &self.broker_message_group_id)?;
        f.string(key!("SQSReceiptHandle"), &self.sqs_receipt_handle)?;
        f.boolean(
            key!("StopTaskDeletionOnError"),
            self.stop_task_deletion_on_error,
        )?;
        f.boolean(
            key!("IgnoreWhenTaskNotRegistered"),
            self.ignore_when_task_not_registered,
        )
    }

    /// Appends the message's JSON to `out` (see the module's text).
    pub(super) fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        deep(|| {
            out.push(b'{');
            self.write_fields(&mut Direct { out, first: true })?;
            out.push(b'}');
            Ok(())
        })
    }
}

impl<T> Serialize for Signature<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        deep(|| {
            let mut fields = Struct(s.serialize_struct("Signature", 19)?);
            self.write_fields(&mut fields)?;
            fields.0.end()
        })
    }
}

/// `[]` and Go's nil slice are the same to every reader; we write Go's `null` for an empty list.
struct NullIfEmpty<'a, E>(&'a [E]);

impl<E: Serialize> Serialize for NullIfEmpty<'_, E> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            s.serialize_none()
        } else {
            self.0.serialize(s)
        }
    }
}

struct Time<'a>(&'a Option<DateTime<Utc>>);

impl Serialize for Time<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        gotime::serialize_opt(self.0, s)
    }
}

/// The fields through serde.
struct Struct<S>(S);

impl<S: SerializeStruct> Fields for Struct<S> {
    type Error = S::Error;
    fn string(&mut self, key: Key, value: &str) -> Result<(), S::Error> {
        self.0.serialize_field(key.name, value)
    }
    fn number(&mut self, key: Key, value: u32) -> Result<(), S::Error> {
        self.0.serialize_field(key.name, &value)
    }
    fn boolean(&mut self, key: Key, value: bool) -> Result<(), S::Error> {
        self.0.serialize_field(key.name, &value)
    }
    fn time(&mut self, key: Key, value: &Option<DateTime<Utc>>) -> Result<(), S::Error> {
        self.0.serialize_field(key.name, &Time(value))
    }
    fn args(&mut self, key: Key, value: &[Arg]) -> Result<(), S::Error> {
        self.0.serialize_field(key.name, &NullIfEmpty(value))
    }
    fn headers(&mut self, key: Key, value: &Option<Headers>) -> Result<(), S::Error> {
        self.0.serialize_field(key.name, value)
    }
    fn signatures(&mut self, key: Key, value: &[Signature]) -> Result<(), S::Error> {
        self.0.serialize_field(key.name, &NullIfEmpty(value))
    }
    fn callback(&mut self, key: Key, value: &Option<Box<Signature>>) -> Result<(), S::Error> {
        self.0.serialize_field(key.name, value)
    }
}

/// The fields written straight into a buffer.
struct Direct<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl Direct<'_> {
    /// `,"key":` (no comma before the first).
    fn key(&mut self, key: Key) {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
        self.out.extend_from_slice(key.json);
    }

    /// `value` through serde_json, for the fields that are rarely set or free-form.
    fn serde(&mut self, value: &impl Serialize) -> Result<(), serde_json::Error> {
        serde_json::to_writer(&mut *self.out, value)
    }
}

/// Whether serde_json writes `text` as it is between quotes: it escapes only `"`, `\` and control
/// characters.
fn needs_no_escape(text: &str) -> bool {
    // Every byte looked at, without stopping at the first that needs escaping: the compiler then checks
    // many bytes at once (escaping is rare, and these strings are short).
    text.bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'))
}

impl Fields for Direct<'_> {
    type Error = serde_json::Error;
    fn string(&mut self, key: Key, value: &str) -> Result<(), Self::Error> {
        self.key(key);
        if needs_no_escape(value) {
            self.out.reserve(value.len() + 2);
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
            Ok(())
        } else {
            self.serde(&value)
        }
    }
    fn number(&mut self, key: Key, value: u32) -> Result<(), Self::Error> {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        Ok(())
    }
    fn boolean(&mut self, key: Key, value: bool) -> Result<(), Self::Error> {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
        Ok(())
    }
    fn time(&mut self, key: Key, value: &Option<DateTime<Utc>>) -> Result<(), Self::Error> {
        self.key(key);
        self.serde(&Time(value))
    }
    fn args(&mut self, key: Key, value: &[Arg]) -> Result<(), Self::Error> {
        self.key(key);
        self.serde(&NullIfEmpty(value))
    }
    fn headers(&mut self, key: Key, value: &Option<Headers>) -> Result<(), Self::Error> {
        self.key(key);
        self.serde(value)
    }
    fn signatures(&mut self, key: Key, value: &[Signature]) -> Result<(), Self::Error> {
        self.key(key);
        if value.is_empty() {
            self.out.extend_from_slice(b"null");
            return Ok(());
        }
        self.out.push(b'[');
        for (i, signature) in value.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            signature.write_json(self.out)?;
        }
        self.out.push(b']');
        Ok(())
    }
    fn callback(&mut self, key: Key, value: &Option<Box<Signature>>) -> Result<(), Self::Error> {
        self.key(key);
        match value {
            Some(signature) => signature.write_json(self.out),
            None => {
                self.out.extend_from_slice(b"null");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    /// The direct writer and serde's write the same bytes.
    fn same_bytes(signature: &Signature) {
        let direct = signature.to_json().unwrap();
        let serde = serde_json::to_vec(signature).unwrap();
        assert_eq!(
            String::from_utf8(direct).unwrap(),
            String::from_utf8(serde).unwrap()
        );
    }

    #[test]
    fn the_direct_writer_writes_what_serde_writes() {
        same_bytes(&Signature::new("add"));
        let mut full = Signature::with_args(
            "add",
            vec![
                Arg::new("a", "int64", json!(1)),
                Arg::new("", "[]string", json!(["x", "y\"z"])),
            ],
        )
        .with_uuid("task_1");
        full.routing_key = "queue \"quoted\" \\ back\tslash\u{1}".into();
        full.eta = Some(Utc.with_ymd_and_hms(2026, 12, 5, 11, 0, 0).unwrap());
        full.group_uuid = "group_ü_✓".into();
        full.group_task_count = 3;
        full.priority = 9;
        full.immutable = true;
        full.retry_count = 4_000_000_000;
        full.retry_timeout = 7;
        full.headers = Some(
            json!({"traceparent": "00-abc", "n": 1.5, "deep": {"a": [null]}})
                .as_object()
                .cloned()
                .unwrap(),
        );
        full.broker_message_group_id = "\u{7f}".into();
        full.sqs_receipt_handle = "h".into();
        full.stop_task_deletion_on_error = true;
        full.ignore_when_task_not_registered = true;
        let mut step = Signature::new("next").with_uuid("task_2");
        step.on_error = vec![Signature::new("on_error")];
        full.on_success = vec![step, Signature::new("other")];
        full.on_error = vec![Signature::new("failed")];
        full.chord_callback = Some(Box::new(Signature::new("callback").with_uuid("chord_1")));
        same_bytes(&full);
    }

    #[test]
    fn a_long_chain_is_written_without_running_out_of_stack() {
        let mut chain = Signature::new("step");
        for _ in 0..5_000 {
            let mut outer = Signature::new("step");
            outer.on_success = vec![chain];
            chain = outer;
        }
        same_bytes(&chain);
    }
}
