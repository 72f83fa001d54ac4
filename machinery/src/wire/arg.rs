//! One task argument, `{"Name": "", "Type": "int64", "Value": 1}`, and how its value is read: through its
//! raw text, so that a value JSON allows but a [`Value`] cannot hold (`1e400`, nesting deeper than
//! [`MAX_VALUE_DEPTH`]) fails the task naming the argument instead of the whole message.

use std::fmt;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::ser::{self, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

use super::tolerant::{wire_fields, Lenient};

/// One task argument: `{"Name": "", "Type": "int64", "Value": 1}`.
///
/// `Name` is informational (Go never binds by it); `Type` is a Go type tag (see [`TypeTag`](super::args::TypeTag)).
#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    /// The parameter name, informational only.
    pub name: String,
    /// The Go type tag, e.g. `int64`, `[]string`, or `json`.
    pub type_tag: String,
    /// The JSON value (`null` when the message's value could not be read, see [`Arg::unreadable`]).
    pub value: Value,
    /// The value's text as the message had it, when a [`Value`] cannot hold it (`1e400`, nesting deeper
    /// than [`MAX_VALUE_DEPTH`]) or holds it only approximately (an integer beyond 64 bits): errors show
    /// it exactly, and a re-published message carries it unchanged.
    raw: Option<RawText>,
}

/// The text of an argument value, and why it could not be read, if it could not.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawText {
    pub(crate) text: String,
    pub(crate) unreadable: Option<String>,
}

/// How deep an argument value or `Headers` may nest (serde_json's own limit), so that reading, dropping
/// and formatting it stay within any thread's stack.
pub const MAX_VALUE_DEPTH: usize = 128;

/// Reads a free-form value (an argument's, `Headers`) from its raw text with serde_json's depth limit;
/// the error says why, without serde_json's position inside the value's own text.
pub(crate) fn free_form_value<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T, String> {
    serde_json::from_str(raw).map_err(|error| {
        let text = error.to_string();
        if text.starts_with("recursion limit exceeded") {
            format!("nested too deeply (more than {MAX_VALUE_DEPTH} levels)")
        } else {
            text.split(" at line ")
                .next()
                .unwrap_or_default()
                .to_owned()
        }
    })
}

/// Whether `text` is a JSON integer literal (`-12`, `0`), which Go reads as an integer whatever its size.
pub(crate) fn is_integer_literal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

impl Arg {
    /// An argument with the given name, type tag and value.
    pub fn new(name: impl Into<String>, type_tag: impl Into<String>, value: Value) -> Self {
        Arg {
            name: name.into(),
            type_tag: type_tag.into(),
            value,
            raw: None,
        }
    }

    /// Why the message's value of this argument could not be read (a number JSON cannot hold such as
    /// `1e400`, or nesting deeper than [`MAX_VALUE_DEPTH`]), if it could not.
    pub fn unreadable(&self) -> Option<&str> {
        self.raw.as_ref().and_then(|r| r.unreadable.as_deref())
    }

    /// The value's text as the message had it, when [`Arg::value`] does not hold it exactly.
    pub(crate) fn raw_text(&self) -> Option<&RawText> {
        self.raw.as_ref()
    }

    /// Reads an argument value from its raw JSON text; what cannot be read, or only approximately, is
    /// kept as text too.
    fn read_value(&mut self, raw: &RawValue) {
        let text = raw.get().trim();
        match free_form_value::<Value>(text) {
            Ok(value) => {
                let approximate = value.is_f64() && is_integer_literal(text);
                self.value = value;
                if approximate && self.value.as_f64() == Some(0.0) {
                    // `-0`: Go reads it as the integer 0.
                    self.value = Value::from(0);
                } else if approximate {
                    self.raw = Some(RawText {
                        text: text.to_owned(),
                        unreadable: None,
                    });
                }
            }
            Err(reason) => {
                self.raw = Some(RawText {
                    text: text.to_owned(),
                    unreadable: Some(reason),
                })
            }
        }
    }
}

impl Serialize for Arg {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Arg", 3)?;
        st.serialize_field("Name", &self.name)?;
        st.serialize_field("Type", &self.type_tag)?;
        match &self.raw {
            Some(raw) => {
                let raw = RawValue::from_string(raw.text.clone()).map_err(ser::Error::custom)?;
                st.serialize_field("Value", &raw)?;
            }
            None => st.serialize_field("Value", &self.value)?,
        }
        st.end()
    }
}

wire_fields!(
    enum ArgField {
        Name = "Name",
        Type = "Type",
        Value = "Value",
    }
);

impl<'de> Deserialize<'de> for Arg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ArgVisitor;
        impl<'de> Visitor<'de> for ArgVisitor {
            type Value = Arg;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a machinery Arg object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Arg, A::Error> {
                let mut arg = Arg::new("", "", Value::Null);
                while let Some(key) = map.next_key::<ArgField>()? {
                    match key {
                        ArgField::Name => arg.name = map.next_value::<Lenient<String>>()?.0,
                        ArgField::Type => arg.type_tag = map.next_value::<Lenient<String>>()?.0,
                        ArgField::Value => arg.read_value(&map.next_value::<Box<RawValue>>()?),
                        ArgField::Unknown => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(arg)
            }
        }
        d.deserialize_map(ArgVisitor)
    }
}
