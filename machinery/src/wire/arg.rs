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
    /// A value that is valid JSON but cannot be held in a [`Value`]: kept as its text, so that the task
    /// fails naming this argument and a re-published message carries the text unchanged.
    unreadable: Option<Unreadable>,
}

/// The raw text of an argument value that could not be read, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unreadable {
    pub(crate) raw: String,
    pub(crate) reason: String,
}

/// How deep an argument value may nest (serde_json's own limit), so that reading, dropping and
/// formatting it stay within any thread's stack.
pub const MAX_VALUE_DEPTH: usize = 128;

impl Arg {
    /// An argument with the given name, type tag and value.
    pub fn new(name: impl Into<String>, type_tag: impl Into<String>, value: Value) -> Self {
        Arg {
            name: name.into(),
            type_tag: type_tag.into(),
            value,
            unreadable: None,
        }
    }

    /// Why the message's value of this argument could not be read (a number JSON cannot hold such as
    /// `1e400`, or nesting deeper than [`MAX_VALUE_DEPTH`]), if it could not.
    pub fn unreadable(&self) -> Option<&str> {
        self.unreadable.as_ref().map(|u| u.reason.as_str())
    }

    pub(crate) fn unreadable_value(&self) -> Option<&Unreadable> {
        self.unreadable.as_ref()
    }

    /// Reads an argument value from its raw JSON text; what cannot be read is kept as text.
    fn read_value(&mut self, raw: &RawValue) {
        match serde_json::from_str::<Value>(raw.get()) {
            Ok(value) => self.value = value,
            Err(error) => {
                let text = error.to_string();
                let reason = if text.starts_with("recursion limit exceeded") {
                    format!("nested too deeply (more than {MAX_VALUE_DEPTH} levels)")
                } else {
                    // serde_json says where in the value's own text; that is no help to a reader.
                    text.split(" at line ")
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                };
                self.unreadable = Some(Unreadable {
                    raw: raw.get().to_owned(),
                    reason,
                });
            }
        }
    }
}

impl Serialize for Arg {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Arg", 3)?;
        st.serialize_field("Name", &self.name)?;
        st.serialize_field("Type", &self.type_tag)?;
        match &self.unreadable {
            Some(unreadable) => {
                let raw =
                    RawValue::from_string(unreadable.raw.clone()).map_err(ser::Error::custom)?;
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
