//! Go machinery's typed values: the `{"Type": "int64", "Value": 1}` pairs used for task arguments and
//! results, and their mapping to Rust types.
//!
//! Go tags every value with the name of its Go type (reference §3.2). We derive the tag of a Rust type from
//! its `Deserialize` implementation: a probe deserializer records which `deserialize_*` method the type
//! asks for (`deserialize_i64` → `int64`, a sequence of `u8` → `[]uint8`, ...). Any other shape (structs,
//! maps, options, enums, ...) travels with the tag `json`, which only Rust peers understand.

use std::fmt;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Number, Value};

mod finite;
mod probe;
mod read;

pub use read::{decode_results, ArgError, ArgReader, ResultDecodeError};

use self::probe::{probe, Probed};
use super::signature::Arg;
use super::state::TaskResult;

/// A scalar Go type that has a machinery type tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Scalar {
    Bool,
    Int,
    Int8,
    Int16,
    Int32,
    Int64,
    Uint,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Float32,
    Float64,
    String,
}

impl Scalar {
    /// The Go spelling of this type.
    pub fn as_str(self) -> &'static str {
        match self {
            Scalar::Bool => "bool",
            Scalar::Int => "int",
            Scalar::Int8 => "int8",
            Scalar::Int16 => "int16",
            Scalar::Int32 => "int32",
            Scalar::Int64 => "int64",
            Scalar::Uint => "uint",
            Scalar::Uint8 => "uint8",
            Scalar::Uint16 => "uint16",
            Scalar::Uint32 => "uint32",
            Scalar::Uint64 => "uint64",
            Scalar::Float32 => "float32",
            Scalar::Float64 => "float64",
            Scalar::String => "string",
        }
    }

    fn slice_str(self) -> &'static str {
        match self {
            Scalar::Bool => "[]bool",
            Scalar::Int => "[]int",
            Scalar::Int8 => "[]int8",
            Scalar::Int16 => "[]int16",
            Scalar::Int32 => "[]int32",
            Scalar::Int64 => "[]int64",
            Scalar::Uint => "[]uint",
            Scalar::Uint8 => "[]uint8",
            Scalar::Uint16 => "[]uint16",
            Scalar::Uint32 => "[]uint32",
            Scalar::Uint64 => "[]uint64",
            Scalar::Float32 => "[]float32",
            Scalar::Float64 => "[]float64",
            Scalar::String => "[]string",
        }
    }

    /// The kind of value a Go type holds: two tags of one kind can carry each other's values (the value's
    /// range is checked when it is decoded).
    fn kind(self) -> Kind {
        match self {
            Scalar::Bool => Kind::Bool,
            Scalar::Float32 | Scalar::Float64 => Kind::Float,
            Scalar::String => Kind::String,
            _ => Kind::Integer,
        }
    }

    fn parse(tag: &str) -> Option<Scalar> {
        Some(match tag {
            "bool" => Scalar::Bool,
            "int" => Scalar::Int,
            "int8" => Scalar::Int8,
            "int16" => Scalar::Int16,
            "int32" => Scalar::Int32,
            "int64" => Scalar::Int64,
            "uint" => Scalar::Uint,
            "uint8" => Scalar::Uint8,
            "uint16" => Scalar::Uint16,
            "uint32" => Scalar::Uint32,
            "uint64" => Scalar::Uint64,
            "float32" => Scalar::Float32,
            "float64" => Scalar::Float64,
            "string" => Scalar::String,
            _ => return None,
        })
    }
}

/// See [`Scalar::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Integer,
    Float,
    String,
}

/// The type tag of a value on the wire: one of Go machinery's 29 tags, or `json` for any other serde type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TypeTag {
    /// A Go scalar such as `int64` or `string`.
    Scalar(Scalar),
    /// A Go slice of a scalar such as `[]int64`; `[]uint8` values travel as base64 strings.
    Slice(Scalar),
    /// Any other serde type, encoded as plain JSON (understood by Rust peers only).
    Json,
}

impl TypeTag {
    /// The tag as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TypeTag::Scalar(s) => s.as_str(),
            TypeTag::Slice(s) => s.slice_str(),
            TypeTag::Json => "json",
        }
    }

    /// Parses a wire tag; `[]byte` is Go's alias of `[]uint8`. Unknown tags give `None`.
    pub fn parse(tag: &str) -> Option<TypeTag> {
        if tag == "json" {
            return Some(TypeTag::Json);
        }
        if tag == "[]byte" {
            return Some(TypeTag::Slice(Scalar::Uint8));
        }
        match tag.strip_prefix("[]") {
            Some(inner) => Scalar::parse(inner).map(TypeTag::Slice),
            None => Scalar::parse(tag).map(TypeTag::Scalar),
        }
    }

    /// Whether a value tagged `found` on the wire may be read as a parameter whose tag is `self`. Go checks
    /// the tag of every argument against its parameter; we accept the tags of the same kind of value:
    /// any Go integer type for an integer parameter (the value's range is checked when it is decoded),
    /// `float32`/`float64` for a float, `[]T` forms of those for a slice, and, for a Rust-only type
    /// (`json`), any tag Go or we write. A tag that names another kind, or no known type, is refused.
    pub fn accepts(self, found: &str) -> bool {
        let Some(found) = TypeTag::parse(found) else {
            return false;
        };
        match (self, found) {
            (TypeTag::Json, _) => true,
            (TypeTag::Scalar(want), TypeTag::Scalar(got))
            | (TypeTag::Slice(want), TypeTag::Slice(got)) => want.kind() == got.kind(),
            _ => false,
        }
    }

    /// The tag of the Rust type `T`.
    pub fn of<T: DeserializeOwned>() -> TypeTag {
        match Shape::of::<T>() {
            Shape::Value(tag) => tag,
            Shape::Unit | Shape::Tuple(_) | Shape::Any => TypeTag::Json,
        }
    }
}

impl fmt::Display for TypeTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a Rust output type maps onto a task's list of results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `()`: no result.
    Unit,
    /// A tuple of this many elements: one result per element, as Go stores multiple return values.
    Tuple(usize),
    /// One value with this tag.
    Value(TypeTag),
    /// A self-describing type such as `serde_json::Value`: takes whatever results there are.
    Any,
}

impl Shape {
    /// The shape of `T`, found by probing its `Deserialize` implementation.
    pub fn of<T: DeserializeOwned>() -> Shape {
        match probe::<T>() {
            Some(Probed::Scalar(s)) => Shape::Value(TypeTag::Scalar(s)),
            Some(Probed::Seq(Some(s))) => Shape::Value(TypeTag::Slice(s)),
            Some(Probed::Unit) => Shape::Unit,
            Some(Probed::Tuple(n)) => Shape::Tuple(n),
            Some(Probed::Any) => Shape::Any,
            Some(Probed::Seq(None)) | Some(Probed::Other) | None => Shape::Value(TypeTag::Json),
        }
    }
}

/// A value that could not be turned into JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// serde could not serialize it.
    #[error("cannot encode {rust_type} as a task value: {source}")]
    Serialize {
        /// The Rust type.
        rust_type: &'static str,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// A float that is NaN or infinite: JSON has no such numbers (Go's encoder refuses them too, where
    /// serde would write `null`).
    #[error("{what} is not a finite number ({rust_type} NaN or infinity): JSON cannot hold it")]
    NotFinite {
        /// `result` or `argument`.
        what: &'static str,
        /// The Rust type.
        rust_type: &'static str,
    },
}

impl EncodeError {
    fn of(self, what: &'static str) -> Self {
        match self {
            EncodeError::NotFinite { rust_type, .. } => EncodeError::NotFinite { what, rust_type },
            other => other,
        }
    }
}

/// Encodes a Rust value as a wire value with its type tag. A NaN or infinite float anywhere in it (alone,
/// in a slice, in a struct's field) is an error, as in Go, rather than serde's `null`.
pub fn encode_value<T: Serialize + DeserializeOwned>(
    value: &T,
) -> Result<(TypeTag, Value), EncodeError> {
    let tag = TypeTag::of::<T>();
    let rust_type = std::any::type_name::<T>();
    let mut json = serde_json::to_value(value)
        .map_err(|source| EncodeError::Serialize { rust_type, source })?;
    if finite::has_non_finite(value) {
        return Err(EncodeError::NotFinite {
            what: "value",
            rust_type,
        });
    }
    apply_go_conventions(tag, &mut json);
    Ok((tag, json))
}

/// Encodes one task argument.
pub fn encode_arg<T: Serialize + DeserializeOwned>(
    name: &str,
    value: &T,
) -> Result<Arg, EncodeError> {
    let (tag, value) = encode_value(value).map_err(|e| e.of("argument"))?;
    Ok(Arg::new(name, tag.as_str(), value))
}

/// Encodes each element of a `Vec<T>` as its own argument, as Go's variadic functions expect.
pub fn encode_variadic_args<T: Serialize + DeserializeOwned>(
    name: &str,
    values: &[T],
) -> Result<Vec<Arg>, EncodeError> {
    values.iter().map(|v| encode_arg(name, v)).collect()
}

/// Encodes one task result.
pub fn encode_result<T: Serialize + DeserializeOwned>(
    value: &T,
) -> Result<TaskResult, EncodeError> {
    let (tag, value) = encode_value(value).map_err(|e| e.of("result"))?;
    Ok(TaskResult::new(tag.as_str(), value))
}

/// Rewrites serde's JSON into the form Go writes: integral floats without a fraction, `[]uint8` as base64.
fn apply_go_conventions(tag: TypeTag, json: &mut Value) {
    match tag {
        TypeTag::Scalar(s @ (Scalar::Float32 | Scalar::Float64)) => go_float(s, json),
        TypeTag::Slice(s @ (Scalar::Float32 | Scalar::Float64)) => {
            if let Value::Array(items) = json {
                items.iter_mut().for_each(|item| go_float(s, item));
            }
        }
        TypeTag::Slice(Scalar::Uint8) => {
            if let Value::Array(items) = json {
                let bytes: Option<Vec<u8>> = items
                    .iter()
                    .map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
                    .collect();
                if let Some(bytes) = bytes {
                    *json = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
                }
            }
        }
        _ => {}
    }
}

/// Go writes `float64(3)` as `3` and a `float32` in its shortest `float32` form (`0.1`, not
/// `0.10000000149011612`).
fn go_float(kind: Scalar, json: &mut Value) {
    let Some(mut f) = json.as_f64() else { return };
    if kind == Scalar::Float32 {
        if let Ok(shortest) = (f as f32).to_string().parse::<f64>() {
            f = shortest;
        }
    }
    // Go switches to exponent notation at 1e21; below that an integral float is written as an integer.
    let number = if f.fract() == 0.0 && f.abs() < 1e21 {
        if f >= i64::MIN as f64 && f <= i64::MAX as f64 {
            Some(Number::from(f as i64))
        } else if f >= 0.0 && f <= u64::MAX as f64 {
            Some(Number::from(f as u64))
        } else {
            Number::from_f64(f)
        }
    } else {
        Number::from_f64(f)
    };
    if let Some(number) = number {
        *json = Value::Number(number);
    }
}

/// Turns a Go `[]uint8`/`[]byte` value sent as a base64 string back into an array of numbers.
fn normalize<'v>(type_tag: &str, value: &'v Value) -> std::borrow::Cow<'v, Value> {
    use std::borrow::Cow;
    match value {
        Value::String(text) if type_tag == "[]uint8" || type_tag == "[]byte" => {
            match base64::engine::general_purpose::STANDARD.decode(text) {
                Ok(bytes) => Cow::Owned(Value::Array(bytes.into_iter().map(Value::from).collect())),
                Err(_) => Cow::Borrowed(value),
            }
        }
        _ => Cow::Borrowed(value),
    }
}

/// Decodes a wire value into `T`, accepting Go's encodings (base64 bytes, integral floats).
pub fn decode_value<T: DeserializeOwned>(
    type_tag: &str,
    value: &Value,
) -> Result<T, serde_json::Error> {
    T::deserialize(normalize(type_tag, value).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Point {
        x: i32,
        y: i32,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct UserId(u64);

    #[test]
    fn tags_follow_go_names() {
        assert_eq!(TypeTag::of::<bool>().as_str(), "bool");
        assert_eq!(TypeTag::of::<i8>().as_str(), "int8");
        assert_eq!(TypeTag::of::<i64>().as_str(), "int64");
        assert_eq!(TypeTag::of::<u64>().as_str(), "uint64");
        assert_eq!(TypeTag::of::<f32>().as_str(), "float32");
        assert_eq!(TypeTag::of::<String>().as_str(), "string");
        assert_eq!(TypeTag::of::<Vec<i64>>().as_str(), "[]int64");
        assert_eq!(TypeTag::of::<Vec<u8>>().as_str(), "[]uint8");
        assert_eq!(TypeTag::of::<Vec<String>>().as_str(), "[]string");
        assert_eq!(TypeTag::of::<UserId>().as_str(), "uint64");
        assert_eq!(TypeTag::of::<Point>().as_str(), "json");
        assert_eq!(TypeTag::of::<Vec<Point>>().as_str(), "json");
        assert_eq!(TypeTag::of::<Option<i64>>().as_str(), "json");
        assert_eq!(Shape::of::<()>(), Shape::Unit);
        assert_eq!(Shape::of::<(String, i64)>(), Shape::Tuple(2));
        assert_eq!(Shape::of::<Value>(), Shape::Any);
    }

    #[test]
    fn parses_all_29_go_tags() {
        let scalars = [
            "bool", "int", "int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32",
            "uint64", "float32", "float64", "string",
        ];
        let mut count = 0;
        for s in scalars {
            assert_eq!(TypeTag::parse(s).unwrap().as_str(), s);
            let slice = format!("[]{s}");
            assert_eq!(TypeTag::parse(&slice).unwrap().as_str(), slice);
            count += 2;
        }
        assert_eq!(
            TypeTag::parse("[]byte"),
            Some(TypeTag::Slice(Scalar::Uint8))
        );
        count += 1;
        assert_eq!(count, 29);
        assert_eq!(TypeTag::parse("map[string]int"), None);
    }

    #[test]
    fn encodes_values_the_way_go_does() {
        assert_eq!(encode_value(&3.0f64).unwrap().1, json!(3));
        assert_eq!(encode_value(&0.1f32).unwrap().1, json!(0.1));
        assert_eq!(encode_value(&4.2f64).unwrap().1, json!(4.2));
        assert_eq!(encode_value(&vec![1.0f64, 2.5]).unwrap().1, json!([1, 2.5]));
        assert_eq!(
            encode_value(&b"hello".to_vec()).unwrap(),
            (TypeTag::Slice(Scalar::Uint8), json!("aGVsbG8="))
        );
        assert_eq!(
            encode_value(&u64::MAX).unwrap().1,
            json!(18446744073709551615u64)
        );
        assert_eq!(
            encode_value(&Point { x: 1, y: 2 }).unwrap(),
            (TypeTag::Json, json!({"x": 1, "y": 2}))
        );
    }

    #[test]
    fn non_finite_floats_are_errors() {
        for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let error = encode_result(&f).unwrap_err().to_string();
            assert!(
                error.starts_with("result is not a finite number"),
                "{error}"
            );
            assert!(encode_arg("x", &vec![1.0, f]).is_err());
            assert!(encode_value(&(f as f32)).is_err());
        }
        assert_eq!(encode_value(&f64::MAX).unwrap().1, json!(f64::MAX));
        #[derive(Serialize, Deserialize)]
        struct Reading {
            at: String,
            value: Option<f64>,
        }
        let nan = Reading {
            at: "now".into(),
            value: Some(f64::NAN),
        };
        assert!(encode_result(&nan).is_err());
        assert!(encode_result(&std::collections::BTreeMap::from([(
            "x".to_owned(),
            f32::INFINITY
        )]))
        .is_err());
        let fine = Reading {
            at: "now".into(),
            value: None,
        };
        assert_eq!(
            encode_value(&fine).unwrap().1,
            json!({"at": "now", "value": null})
        );
    }

    #[test]
    fn decodes_go_encodings() {
        assert_eq!(
            decode_value::<Vec<u8>>("[]uint8", &json!("aGVsbG8=")).unwrap(),
            b"hello"
        );
        assert_eq!(
            decode_value::<Vec<u8>>("[]uint8", &json!([104, 105])).unwrap(),
            b"hi"
        );
        assert_eq!(decode_value::<f64>("float64", &json!(3)).unwrap(), 3.0);
        assert!(decode_value::<i64>("int64", &json!(1.5)).is_err());
        assert!(decode_value::<u8>("int64", &json!(300)).is_err());
    }

    fn arg(tag: &str, value: Value) -> Arg {
        Arg::new("", tag, value)
    }

    #[test]
    fn reader_reports_task_index_expected_and_found() {
        let args = [arg("int64", json!(1)), arg("string", json!("x"))];
        let mut reader = ArgReader::new("add", &args, 2, false);
        assert_eq!(reader.next::<i64>().unwrap(), 1);
        let err = reader.next::<i64>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "task add: argument 2: expected int64, got string \"x\""
        );
    }

    #[test]
    fn reader_reports_wrong_arity() {
        let args = [
            arg("int64", json!(1)),
            arg("int64", json!(2)),
            arg("int64", json!(3)),
        ];
        let mut reader = ArgReader::new("add", &args, 2, false);
        reader.next::<i64>().unwrap();
        reader.next::<i64>().unwrap();
        assert_eq!(
            reader.finish().unwrap_err().to_string(),
            "task add: expected 2 arguments, got 3"
        );
        let mut short = ArgReader::new("add", &args[..1], 2, false);
        short.next::<i64>().unwrap();
        assert_eq!(
            short.next::<i64>().unwrap_err().to_string(),
            "task add: expected 2 arguments, got 1"
        );
    }

    #[test]
    fn rest_accepts_slice_and_variadic_forms() {
        let slice = [arg("[]int64", json!([1, 2, 3]))];
        assert_eq!(
            ArgReader::new("sum", &slice, 1, true)
                .rest::<i64>()
                .unwrap(),
            vec![1, 2, 3]
        );
        let variadic = [arg("int64", json!(1)), arg("int64", json!(2))];
        assert_eq!(
            ArgReader::new("sum", &variadic, 1, true)
                .rest::<i64>()
                .unwrap(),
            vec![1, 2]
        );
        let mixed = [arg("[]int64", json!([1, 2])), arg("int64", json!(3))];
        assert_eq!(
            ArgReader::new("sum", &mixed, 1, true)
                .rest::<i64>()
                .unwrap(),
            vec![1, 2, 3]
        );
        let empty: [Arg; 0] = [];
        assert!(ArgReader::new("sum", &empty, 1, true)
            .rest::<i64>()
            .unwrap()
            .is_empty());
        let bad = [arg("string", json!("x"))];
        let err = ArgReader::new("sum", &bad, 1, true)
            .rest::<i64>()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "task sum: argument 1: expected []int64, got string \"x\""
        );
    }

    #[test]
    fn tags_must_fit_the_parameter() {
        let cases: [(&str, Value, bool); 10] = [
            ("int32", json!(5), true),
            ("uint8", json!(5), true),
            ("int128", json!(5), false),
            ("string", json!(5), false),
            ("float64", json!(5), false),
            ("json", json!(5), false),
            ("main.Money", json!(5), false),
            ("", json!(5), false),
            ("int8", json!(-0), true),
            ("uint64", json!(u64::MAX), false),
        ];
        for (tag, value, ok) in cases {
            let args = [arg(tag, value.clone())];
            let result = ArgReader::new("t", &args, 1, false).next::<i64>();
            assert_eq!(result.is_ok(), ok, "{tag} {value}: {result:?}");
        }
        let args = [arg("bool", json!("str"))];
        assert_eq!(
            ArgReader::new("echo", &args, 1, false)
                .next::<String>()
                .unwrap_err()
                .to_string(),
            "task echo: argument 1: expected string, got bool \"str\""
        );
        let args = [arg("float32", json!(1.5)), arg("[]float32", json!([2]))];
        let mut reader = ArgReader::new("f", &args, 2, false);
        assert_eq!(reader.next::<f64>().unwrap(), 1.5);
        assert_eq!(reader.next::<Vec<f64>>().unwrap(), vec![2.0]);
        // Rust-only types take any known tag, never an unknown one.
        let args = [arg("int64", json!(1)), arg("main.Money", json!(1))];
        let mut reader = ArgReader::new("v", &args, 2, false);
        assert_eq!(reader.next::<Value>().unwrap(), json!(1));
        assert!(reader.next::<Value>().is_err());
        // A variadic tail checks each argument: elements of the element's kind, slices of the slice's.
        let args = [arg("[]int32", json!([1, 2])), arg("uint8", json!(3))];
        assert_eq!(
            ArgReader::new("sum", &args, 1, true).rest::<i64>().unwrap(),
            vec![1, 2, 3]
        );
        for bad in [arg("[]string", json!([1])), arg("string", json!(1))] {
            let args = [bad];
            assert!(ArgReader::new("sum", &args, 1, true).rest::<i64>().is_err());
        }
        let args = [arg("[]int64", Value::Null)];
        assert!(ArgReader::new("sum", &args, 1, true)
            .rest::<i64>()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn results_decode_by_shape() {
        let two = [
            TaskResult::new("string", json!("foo")),
            TaskResult::new("string", json!("bar")),
        ];
        let (a, b): (String, String) = decode_results(&two).unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("foo", "bar"));
        assert!(decode_results::<String>(&two).is_err());
        decode_results::<()>(&[]).unwrap();
        let one = [TaskResult::new("[]uint8", json!("aGVsbG8="))];
        assert_eq!(decode_results::<Vec<u8>>(&one).unwrap(), b"hello");
        assert_eq!(
            decode_results::<Value>(&two).unwrap(),
            json!(["foo", "bar"])
        );
        assert!(matches!(
            decode_results::<i64>(&[]),
            Err(ResultDecodeError::Count {
                expected: 1,
                found: 0
            })
        ));
    }
}
