//! Helpers for reading Go machinery's JSON tolerantly, as Go's `encoding/json` does: keys in any case,
//! `null` or missing values as zero values, unknown keys ignored.

use serde::de::{self, Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;

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
                        // Keys spelt as Go spells them first: one length-and-bytes comparison each,
                        // where the case-insensitive scan below compares byte by byte.
                        match key {
                            $($key => return Ok($name::$variant),)*
                            _ => {}
                        }
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
                // Read through the raw text, so that an error shows the number as it was sent.
                let raw = Box::<RawValue>::deserialize(d)?;
                lenient_int(raw.get().trim()).map(Lenient).map_err(de::Error::custom)
            }
        }
    )*};
}
lenient_int!(i64);

/// An integer type a field can be read into by [`lenient_int`].
pub(crate) trait LenientInt: TryFrom<i64> + TryFrom<u64> + Default + Bounded {}

impl<T: TryFrom<i64> + TryFrom<u64> + Default + Bounded> LenientInt for T {}

/// Reads an integer field tolerantly from its JSON text: `null` is 0, an integral float is its integer,
/// a negative count is 0; anything else out of range is an error naming the number as sent.
pub(crate) fn lenient_int<T: LenientInt>(text: &str) -> Result<T, String> {
    // The common case, a plain integer that fits, without building a JSON value.
    if let Some(n) = plain_int(text) {
        if n < 0 && !T::SIGNED {
            return Ok(T::default());
        }
        if let Ok(n) = T::try_from(n) {
            return Ok(n);
        }
    }
    let shown = cut(text);
    let out_of_range = || format!("integer {shown} out of range");
    let number = match serde_json::from_str::<Value>(text) {
        Ok(Value::Null) => return Ok(T::default()),
        Ok(Value::Number(number)) => number,
        Ok(_) => return Err(format!("expected an integer, got {shown}")),
        Err(error) => {
            let reason = error.to_string();
            let reason = reason.split(" at line ").next().unwrap_or_default();
            return Err(format!("{shown}: {reason}"));
        }
    };
    if let Some(n) = number.as_i64() {
        if n < 0 && !T::SIGNED {
            return Ok(T::default());
        }
        return T::try_from(n).map_err(|_| out_of_range());
    }
    if let Some(n) = number.as_u64() {
        return T::try_from(n).map_err(|_| out_of_range());
    }
    let f = number.as_f64().unwrap_or(f64::NAN);
    if f.fract() != 0.0 {
        return Err(format!("expected an integer, got {shown}"));
    }
    // `-0` (which serde_json reads as a float) is 0, as in Go; so is any negative count.
    if f == 0.0 || (f < 0.0 && !T::SIGNED) {
        return Ok(T::default());
    }
    // An integer literal that fits neither i64 nor u64 (serde_json made it a float): out of range.
    if super::arg::is_integer_literal(text) {
        return Err(out_of_range());
    }
    // 2^63 and 2^64 are exact as floats.
    const I64_END: f64 = 9_223_372_036_854_775_808.0;
    const U64_END: f64 = 18_446_744_073_709_551_616.0;
    if (-I64_END..I64_END).contains(&f) {
        T::try_from(f as i64).map_err(|_| out_of_range())
    } else if (0.0..U64_END).contains(&f) {
        T::try_from(f as u64).map_err(|_| out_of_range())
    } else {
        Err(out_of_range())
    }
}

/// `text` as an `i64` when it is a plain JSON integer (an optional minus, then digits without a leading
/// zero) that fits; `None` for anything else, which the full reading then handles.
fn plain_int(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let plain = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !plain {
        return None;
    }
    text.parse().ok()
}

/// At most 64 characters of a value's text, for an error message.
fn cut(text: &str) -> String {
    if text.len() <= 64 {
        return text.to_owned();
    }
    let mut end = 61;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
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
        let n: u32 = lenient_int("null").unwrap();
        assert_eq!(n, 0);
        let n: u32 = lenient_int("-3").unwrap();
        assert_eq!(n, 0);
        let n: u32 = lenient_int("4.0").unwrap();
        assert_eq!(n, 4);
        assert!(lenient_int::<u8>("300").is_err());
        let Lenient(n): Lenient<i64> = serde_json::from_str("-0").unwrap();
        assert_eq!(n, 0);
        let Lenient(n): Lenient<i64> = serde_json::from_str("-9223372036854775808").unwrap();
        assert_eq!(n, i64::MIN);
        let error = |text: &str| {
            serde_json::from_str::<Lenient<i64>>(text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(error("1e30").starts_with("integer 1e30 out of range"));
        assert!(
            error("-9223372036854775809").starts_with("integer -9223372036854775809 out of range")
        );
        assert!(error("1e400").starts_with("1e400: number out of range"));
        assert!(error("1.5").starts_with("expected an integer, got 1.5"));
        let error = lenient_int::<u32>("4294967296").unwrap_err();
        assert!(error.starts_with("integer 4294967296 out of range"));
        let n: u8 = lenient_int("255").unwrap();
        assert_eq!(n, 255);
        let n: u32 = lenient_int(" 0 ").unwrap();
        assert_eq!(n, 0);
        assert!(lenient_int::<u32>("07").is_err());
        assert!(lenient_int::<u32>("-").is_err());
        assert_eq!(plain_int("-12"), Some(-12));
        assert_eq!(plain_int("+1"), None);
        assert_eq!(plain_int("1.0"), None);
        assert_eq!(plain_int("99999999999999999999"), None);
        let Lenient(s): Lenient<String> = serde_json::from_str("null").unwrap();
        assert_eq!(s, "");
    }
}
