//! Finding a NaN or an infinity anywhere inside a value (a struct field, an `Option<f64>`, a map value)
//! before it is encoded: serde_json would write `null` for it, silently changing what the value says,
//! where Go's encoder refuses it.

use std::fmt;

use serde::ser::{self, Serialize, Serializer};

/// Whether serializing `value` meets a float that is NaN or infinite.
pub(super) fn has_non_finite<T: Serialize + ?Sized>(value: &T) -> bool {
    matches!(value.serialize(Finder), Err(Found(true)))
}

/// A serializer that writes nothing and stops at the first non-finite float.
#[derive(Clone, Copy)]
struct Finder;

/// Why the finder stopped: `true` for a non-finite float, `false` for an error of the value's own
/// `Serialize` (which the real encoding reports).
#[derive(Debug)]
struct Found(bool);

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a float that is not finite")
    }
}

impl std::error::Error for Found {}

impl ser::Error for Found {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Found(false)
    }
}

macro_rules! nothing_to_find {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, _: $ty) -> Result<(), Found> { Ok(()) })*
    };
}

impl Serializer for Finder {
    type Ok = ();
    type Error = Found;
    type SerializeSeq = Finder;
    type SerializeTuple = Finder;
    type SerializeTupleStruct = Finder;
    type SerializeTupleVariant = Finder;
    type SerializeMap = Finder;
    type SerializeStruct = Finder;
    type SerializeStructVariant = Finder;

    nothing_to_find!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    fn serialize_f32(self, v: f32) -> Result<(), Found> {
        self.serialize_f64(f64::from(v))
    }

    fn serialize_f64(self, v: f64) -> Result<(), Found> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(Found(true))
        }
    }

    fn serialize_none(self) -> Result<(), Found> {
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Found> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Found> {
        Ok(())
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Found> {
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        value.serialize(self)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Finder, Found> {
        Ok(self)
    }

    fn serialize_tuple(self, _: usize) -> Result<Finder, Found> {
        Ok(self)
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Finder, Found> {
        Ok(self)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Finder, Found> {
        Ok(self)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Finder, Found> {
        Ok(self)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Finder, Found> {
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Finder, Found> {
        Ok(self)
    }
}

macro_rules! compound {
    ($($trait:ident { $($method:ident$(<$key:lifetime>)?),* }),* $(,)?) => {$(
        impl ser::$trait for Finder {
            type Ok = ();
            type Error = Found;
            $(fn $method<T: Serialize + ?Sized>(
                &mut self,
                $(_: &$key str,)?
                value: &T,
            ) -> Result<(), Found> {
                value.serialize(Finder)
            })*
            fn end(self) -> Result<(), Found> {
                Ok(())
            }
        }
    )*};
}

compound!(
    SerializeSeq { serialize_element },
    SerializeTuple { serialize_element },
    SerializeTupleStruct { serialize_field },
    SerializeTupleVariant { serialize_field },
    SerializeMap { serialize_key, serialize_value },
    SerializeStruct { serialize_field<'static> },
    SerializeStructVariant { serialize_field<'static> },
);
