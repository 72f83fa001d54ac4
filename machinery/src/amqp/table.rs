//! Conversions between JSON (configuration arguments, signature headers) and AMQP field tables, and the
//! checked construction of AMQP short strings.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

use super::error::AmqpError;

/// A queue name, exchange name or routing key as an AMQP short string. lapin panics on names longer
/// than 255 bytes; routing keys come from messages, so they are checked here instead.
pub(crate) fn short(what: &'static str, name: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(name).map_err(|_| AmqpError::NameTooLong {
        what,
        name: name.chars().take(64).collect::<String>() + "…",
        len: name.len(),
    })
}

/// A JSON object as an AMQP field table. Keys longer than 255 bytes cannot be encoded and are left out.
///
/// Integers become signed 64-bit (`l`), as RabbitMQ treats integer widths of equal value as equivalent in
/// queue arguments (so `x-max-priority: 10` from YAML matches Go's declaration), floats `d`, strings
/// long strings, and nested objects and arrays tables and arrays.
pub(crate) fn json_table(map: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in map {
        if let Ok(key) = ShortString::try_new(key.as_str()) {
            table.insert(key, json_value(value));
        } else {
            tracing::warn!(key = %key.chars().take(64).collect::<String>(), "leaving out an AMQP table key longer than 255 bytes");
        }
    }
    table
}

/// One JSON value as an AMQP value.
pub(crate) fn json_value(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => number(n),
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(json_value).collect::<Vec<_>>(),
        )),
        Value::Object(map) => AMQPValue::FieldTable(json_table(map)),
    }
}

fn number(n: &Number) -> AMQPValue {
    if let Some(i) = n.as_i64() {
        AMQPValue::LongLongInt(i)
    } else if let Some(u) = n.as_u64() {
        // Above i64::MAX: AMQP 0-9-1 as RabbitMQ speaks it has no unsigned 64-bit type.
        AMQPValue::Double(u as f64)
    } else {
        AMQPValue::Double(n.as_f64().unwrap_or(0.0))
    }
}

/// An AMQP value as JSON (for reading headers back). Byte arrays and strings that are not UTF-8 become
/// lossy strings; decimals become floats; timestamps integers.
pub(crate) fn amqp_value(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => Value::from(*f),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => {
            Value::from(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(amqp_value).collect())
        }
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(table) => Value::Object(amqp_table(table)),
        AMQPValue::ByteArray(bytes) => {
            Value::String(String::from_utf8_lossy(bytes.as_slice()).into())
        }
        AMQPValue::Void => Value::Null,
    }
}

/// An AMQP field table as a JSON object.
pub(crate) fn amqp_table(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), amqp_value(v)))
        .collect()
}

/// A string header of a table, if present and a string.
pub(crate) fn string_field(table: Option<&FieldTable>, key: &str) -> Option<String> {
    match table?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_arguments_become_amqp_values_and_back() {
        let args = json!({
            "x-max-priority": 10,
            "x-queue-mode": "lazy",
            "ratio": 0.5,
            "flag": true,
            "nested": {"a": [1, "b", null]},
        });
        let table = json_table(args.as_object().unwrap());
        assert_eq!(
            table.inner().get("x-max-priority"),
            Some(&AMQPValue::LongLongInt(10))
        );
        assert_eq!(Value::Object(amqp_table(&table)), args);
    }

    #[test]
    fn names_longer_than_255_bytes_are_an_error_not_a_panic() {
        let long = "q".repeat(256);
        let err = short("routing key", &long).unwrap_err();
        assert!(err.to_string().contains("256 bytes"), "{err}");
        assert!(short("routing key", &"q".repeat(255)).is_ok());
    }
}
