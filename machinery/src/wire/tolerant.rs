//! Helpers for reading Go machinery's JSON tolerantly, as Go's `encoding/json` does: keys in any case,
//! `null` or missing values as zero values, unknown keys ignored.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Declares an enum of a wire struct's fields whose `Deserialize` matches keys case-insensitively and maps
/// unknown keys to `Unknown`, without allocating.
macro_rules! wire_fields {
    ($vis:vis enum $name:ident { $($variant:ident = $key:literal),* $(,)? }) => {
        #[derive(Clone, Copy, Debug)]
        $vis enum $name { $($variant,)* Unknown }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct KeyVisitor;
                impl<'de> ::serde::de::Visitor<'de> for KeyVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                        f.write_str("a field name")
                    }
                    fn visit_str<E: ::serde::de::Error>(self, key: &str) -> Result<$name, E> {
                        $(if key.eq_ignore_ascii_case($key) { return Ok($name::$variant); })*
                        Ok($name::Unknown)
                    }
                }
                d.deserialize_identifier(KeyVisitor)
            }
        }
    };
}
pub(crate) use wire_fields;

/// A value read leniently: `null` gives the type's default, and integers accept any JSON number that
/// fits (negative counts become 0).
pub(crate) struct Lenient<T>(pub(crate) T);

impl<'de> Deserialize<'de> for Lenient<String> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Lenient(
            Option::<String>::deserialize(d)?.unwrap_or_default(),
        ))
    }
}

impl<'de> Deserialize<'de> for Lenient<bool> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Lenient(Option::<bool>::deserialize(d)?.unwrap_or_default()))
    }
}

macro_rules! lenient_int {
    ($($ty:ty),*) => {$(
        impl<'de> Deserialize<'de> for Lenient<$ty> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(IntVisitor::<$ty>(PhantomData)).map(Lenient)
            }
        }
    )*};
}
lenient_int!(u8, u32, i64);

struct IntVisitor<T>(PhantomData<T>);

impl<'de, T> Visitor<'de> for IntVisitor<T>
where
    T: TryFrom<i64> + TryFrom<u64> + Default + Bounded,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if v < 0 && !T::SIGNED {
            return Ok(T::default());
        }
        T::try_from(v).map_err(|_| E::custom(format!("integer {v} out of range")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::custom(format!("integer {v} out of range")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        if v.fract() != 0.0 {
            return Err(E::custom(format!("expected an integer, got {v}")));
        }
        self.visit_i64(v as i64)
    }
}

pub(crate) trait Bounded {
    const SIGNED: bool;
}
impl Bounded for u8 {
    const SIGNED: bool = false;
}
impl Bounded for u32 {
    const SIGNED: bool = false;
}
impl Bounded for i64 {
    const SIGNED: bool = true;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_values() {
        let Lenient(n): Lenient<u32> = serde_json::from_str("null").unwrap();
        assert_eq!(n, 0);
        let Lenient(n): Lenient<u32> = serde_json::from_str("-3").unwrap();
        assert_eq!(n, 0);
        let Lenient(n): Lenient<u32> = serde_json::from_str("4.0").unwrap();
        assert_eq!(n, 4);
        assert!(serde_json::from_str::<Lenient<u8>>("300").is_err());
        let Lenient(s): Lenient<String> = serde_json::from_str("null").unwrap();
        assert_eq!(s, "");
    }
}
