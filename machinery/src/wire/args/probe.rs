//! The probe that finds a Rust type's Go type tag: a deserializer that records which `deserialize_*`
//! method the type asks for, then stops it (see the parent module).

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, SeqAccess, Visitor};
use serde::Deserializer;

use super::Scalar;

/// What `T`'s `Deserialize` asked for first.
pub(super) fn probe<T: DeserializeOwned>() -> Option<Probed> {
    let out = Cell::new(None);
    // The probe always stops the deserializer with an error once it has seen what it needs.
    let _ = T::deserialize(Probe { out: &out });
    out.get()
}

/// The shape a type's `Deserialize` asked for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Probed {
    Scalar(Scalar),
    Seq(Option<Scalar>),
    Unit,
    Tuple(usize),
    Any,
    Other,
}

/// The error the probe stops every deserialization with; it carries nothing so probing never allocates.
#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("type probe finished")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Stop
    }
}

struct Probe<'a> {
    out: &'a Cell<Option<Probed>>,
}

impl Probe<'_> {
    fn found<V>(self, probed: Probed) -> Result<V, Stop> {
        self.out.set(Some(probed));
        Err(Stop)
    }
}

macro_rules! probe_as {
    ($($method:ident => $probed:expr),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
            self.found($probed)
        })*
    };
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    probe_as! {
        deserialize_any => Probed::Any,
        deserialize_bool => Probed::Scalar(Scalar::Bool),
        deserialize_i8 => Probed::Scalar(Scalar::Int8),
        deserialize_i16 => Probed::Scalar(Scalar::Int16),
        deserialize_i32 => Probed::Scalar(Scalar::Int32),
        deserialize_i64 => Probed::Scalar(Scalar::Int64),
        deserialize_i128 => Probed::Other,
        deserialize_u8 => Probed::Scalar(Scalar::Uint8),
        deserialize_u16 => Probed::Scalar(Scalar::Uint16),
        deserialize_u32 => Probed::Scalar(Scalar::Uint32),
        deserialize_u64 => Probed::Scalar(Scalar::Uint64),
        deserialize_u128 => Probed::Other,
        deserialize_f32 => Probed::Scalar(Scalar::Float32),
        deserialize_f64 => Probed::Scalar(Scalar::Float64),
        deserialize_char => Probed::Scalar(Scalar::String),
        deserialize_str => Probed::Scalar(Scalar::String),
        deserialize_string => Probed::Scalar(Scalar::String),
        deserialize_bytes => Probed::Seq(Some(Scalar::Uint8)),
        deserialize_byte_buf => Probed::Seq(Some(Scalar::Uint8)),
        deserialize_option => Probed::Other,
        deserialize_unit => Probed::Unit,
        deserialize_map => Probed::Other,
        deserialize_identifier => Probed::Other,
        deserialize_ignored_any => Probed::Other,
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: V,
    ) -> Result<V::Value, Stop> {
        self.found(Probed::Other)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        // A newtype is transparent in JSON, so it takes the tag of what it wraps.
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        let element = Cell::new(None);
        let _ = visitor.visit_seq(ProbeSeq { out: &element });
        let probed = match element.get() {
            Some(Probed::Scalar(s)) => Probed::Seq(Some(s)),
            _ => Probed::Seq(None),
        };
        self.found(probed)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, _: V) -> Result<V::Value, Stop> {
        self.found(Probed::Tuple(len))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        _: V,
    ) -> Result<V::Value, Stop> {
        self.found(Probed::Other)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        self.found(Probed::Other)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        self.found(Probed::Other)
    }
}

/// A sequence whose first element is probed (and whose probing stops the sequence).
struct ProbeSeq<'a> {
    out: &'a Cell<Option<Probed>>,
}

impl<'de> SeqAccess<'de> for ProbeSeq<'_> {
    type Error = Stop;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Stop> {
        let nested = Cell::new(None);
        let result = seed.deserialize(Probe { out: &nested });
        // Only a plain scalar element makes a Go slice type; anything nested is `json`.
        self.out.set(match nested.get() {
            Some(Probed::Scalar(s)) => Some(Probed::Scalar(s)),
            _ => Some(Probed::Other),
        });
        result.map(Some)
    }
}
