//! Timestamps as Go's `time.Time` writes them in JSON (RFC 3339 with 0–9 fraction digits).
//!
//! Go drops trailing zeros of the fraction (`…05.1Z`, `…05Z`), so fixtures captured from Go are only
//! reproduced exactly when we do the same. Reading is lenient: any offset, any number of fraction digits,
//! and (unlike Go) a missing offset, which is taken as UTC.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serializer};

/// Go's zero `time.Time` (`0001-01-01T00:00:00Z`), which Go writes for states that carry no creation time.
pub fn zero_time() -> DateTime<Utc> {
    ZERO_TIME
}

/// Made once at compile time: every state a worker builds carries it.
const ZERO_TIME: DateTime<Utc> = match NaiveDate::from_ymd_opt(1, 1, 1) {
    Some(date) => DateTime::from_naive_utc_and_offset(date.and_time(NaiveTime::MIN), Utc),
    None => DateTime::<Utc>::MIN_UTC,
};

/// Formats `t` exactly like Go's `time.Time.MarshalJSON` does for a UTC time.
pub fn format(t: &DateTime<Utc>) -> String {
    let mut out = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.nanosecond() % 1_000_000_000;
    if nanos != 0 {
        let digits = format!("{nanos:09}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Parses an RFC 3339 timestamp with any offset (converted to UTC); a timestamp without an offset is
/// taken as UTC.
pub fn parse(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match DateTime::parse_from_rfc3339(text) {
        Ok(t) => Ok(t.with_timezone(&Utc)),
        Err(err) => NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
            .map(|naive| naive.and_utc())
            .map_err(|_| err),
    }
}

pub(crate) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(t))
}

pub(crate) fn serialize_opt<S: Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize(t, s),
        None => s.serialize_none(),
    }
}

/// Reads an optional timestamp: `null`, a missing value and an empty string are all "none".
pub(crate) fn deserialize_opt<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    let text: Option<std::borrow::Cow<'de, str>> = Option::deserialize(d)?;
    match text.as_deref() {
        None | Some("") => Ok(None),
        Some(text) => parse(text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("invalid RFC 3339 time {text:?}: {e}"))),
    }
}

/// Reads a timestamp where Go always writes one; `null` or a missing value gives Go's zero time.
pub(crate) fn deserialize_or_zero<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<DateTime<Utc>, D::Error> {
    Ok(deserialize_opt(d)?.unwrap_or_else(zero_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go_dropping_trailing_zeros() {
        let t = parse("2026-11-26T14:23:29.286444580Z").unwrap();
        assert_eq!(format(&t), "2026-11-26T14:23:29.28644458Z");
        let t = parse("2025-01-02T03:04:05Z").unwrap();
        assert_eq!(format(&t), "2025-01-02T03:04:05Z");
        let t = parse("2025-01-02T03:04:05.678901234Z").unwrap();
        assert_eq!(format(&t), "2025-01-02T03:04:05.678901234Z");
    }

    #[test]
    fn zero_time_matches_go() {
        assert_eq!(format(&zero_time()), "0001-01-01T00:00:00Z");
        assert_eq!(parse("0001-01-01T00:00:00Z").unwrap(), zero_time());
    }

    #[test]
    fn parses_offsets_and_missing_offsets() {
        let t = parse("2025-01-02T05:04:05+02:00").unwrap();
        assert_eq!(format(&t), "2025-01-02T03:04:05Z");
        let t = parse("2025-01-02T03:04:05.5").unwrap();
        assert_eq!(format(&t), "2025-01-02T03:04:05.5Z");
        assert!(parse("yesterday").is_err());
    }
}
