//! Reading a task's typed arguments and results back, with the errors a worker or a sender reports for
//! values that do not fit.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::{decode_value, normalize, Shape, TypeTag};
use crate::wire::signature::Arg;
use crate::wire::state::TaskResult;

/// What the arguments of a task did not satisfy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArgError {
    /// The message carries fewer or more arguments than the task takes.
    #[error("task {task}: expected {expected} arguments, got {found}")]
    Count {
        /// The task name.
        task: String,
        /// What the task takes (`"2"`, or `"at least 1"` for a trailing `Vec`).
        expected: String,
        /// How many arguments the message carries.
        found: usize,
    },
    /// An argument has the wrong type or value.
    #[error("task {task}: argument {index}: expected {expected}, got {found}")]
    Type {
        /// The task name.
        task: String,
        /// The 1-based position of the argument.
        index: usize,
        /// The expected Go type tag (or `json (RustType)`).
        expected: String,
        /// The received tag and value, e.g. `string "x"`.
        found: String,
    },
}

/// Reads a task's arguments in order, with the errors a worker reports for bad input.
#[derive(Debug)]
pub struct ArgReader<'a> {
    task: &'a str,
    args: &'a [Arg],
    pos: usize,
    arity: usize,
    variadic: bool,
}

impl<'a> ArgReader<'a> {
    /// A reader for a task that takes `arity` parameters, the last of which is a `Vec<T>` if `variadic`.
    pub fn new(task: &'a str, args: &'a [Arg], arity: usize, variadic: bool) -> Self {
        ArgReader {
            task,
            args,
            pos: 0,
            arity,
            variadic,
        }
    }

    fn count_error(&self) -> ArgError {
        let expected = if self.variadic {
            format!("at least {}", self.arity.saturating_sub(1))
        } else {
            self.arity.to_string()
        };
        ArgError::Count {
            task: self.task.to_owned(),
            expected,
            found: self.args.len(),
        }
    }

    fn type_error<T: DeserializeOwned>(&self, index: usize, arg: &Arg) -> ArgError {
        let expected = match TypeTag::of::<T>() {
            TypeTag::Json => format!("json ({})", std::any::type_name::<T>()),
            tag => tag.as_str().to_owned(),
        };
        let found = match arg.raw_text() {
            Some(raw) => {
                let text = describe_text(&arg.type_tag, raw.text.clone());
                match &raw.unreadable {
                    Some(reason) => format!("{text}: {reason}"),
                    None => text,
                }
            }
            None => describe(&arg.type_tag, &arg.value),
        };
        ArgError::Type {
            task: self.task.to_owned(),
            index: index + 1,
            expected,
            found,
        }
    }

    /// Reads the next argument as a `T`.
    // Not an `Iterator`: each call decodes a different type.
    #[allow(clippy::should_implement_trait)]
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<T, ArgError> {
        let index = self.pos;
        let arg = self.args.get(index).ok_or_else(|| self.count_error())?;
        self.pos += 1;
        if arg.unreadable().is_some() || !TypeTag::of::<T>().accepts(&arg.type_tag) {
            return Err(self.type_error::<T>(index, arg));
        }
        decode_value(&arg.type_tag, &arg.value).map_err(|_| self.type_error::<T>(index, arg))
    }

    /// Reads all remaining arguments into a `Vec<T>`: one slice argument, trailing scalar arguments of `T`
    /// (Go's variadic calls, and results appended by chains and chords), or a mix of both, in order.
    ///
    /// Each argument's tag must fit: the element's tag (or one of its kind) for a single element, the
    /// slice's for a slice (see [`TypeTag::accepts`]).
    pub fn rest<T: DeserializeOwned>(&mut self) -> Result<Vec<T>, ArgError> {
        let element = TypeTag::of::<T>();
        let slice = TypeTag::of::<Vec<T>>();
        let mut out = Vec::new();
        while let Some(arg) = self.args.get(self.pos) {
            let index = self.pos;
            self.pos += 1;
            if arg.unreadable().is_some() {
                return Err(self.type_error::<Vec<T>>(index, arg));
            }
            let as_element = element.accepts(&arg.type_tag);
            let as_slice = slice.accepts(&arg.type_tag);
            let value = normalize(&arg.type_tag, &arg.value);
            if as_slice && value.is_null() && element != slice {
                // Go's nil slice.
                continue;
            }
            if as_slice && value.is_array() {
                if let Ok(items) = Vec::<T>::deserialize(value.as_ref()) {
                    out.extend(items);
                    continue;
                }
            }
            match T::deserialize(value.as_ref()) {
                Ok(item) if as_element => out.push(item),
                _ => return Err(self.type_error::<Vec<T>>(index, arg)),
            }
        }
        Ok(out)
    }

    /// Checks that every argument was used.
    pub fn finish(&self) -> Result<(), ArgError> {
        if self.pos < self.args.len() {
            return Err(self.count_error());
        }
        Ok(())
    }
}

/// `string "x"`, `int64 3`, ... for error messages; long values are cut.
fn describe(type_tag: &str, value: &Value) -> String {
    describe_text(type_tag, value.to_string())
}

fn describe_text(type_tag: &str, mut text: String) -> String {
    if text.len() > 64 {
        let mut cut = 61;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    if type_tag.is_empty() {
        format!("untyped {text}")
    } else {
        format!("{type_tag} {text}")
    }
}

/// Why a task's results could not be read as the expected Rust type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResultDecodeError {
    /// The task stored a different number of results than the output type has.
    #[error("expected {expected} results, got {found}")]
    Count {
        /// How many results the output type takes.
        expected: usize,
        /// How many the task stored.
        found: usize,
    },
    /// A result does not decode as the expected type.
    #[error("result {index}: expected {expected}, got {found}: {source}")]
    Type {
        /// The 1-based position of the result.
        index: usize,
        /// The expected Rust type.
        expected: &'static str,
        /// The stored tag and value.
        found: String,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
}

/// Decodes a task's stored results into its Rust output type: `()` for none, a tuple for several (Go's
/// multiple return values), otherwise exactly one.
pub fn decode_results<T: DeserializeOwned>(results: &[TaskResult]) -> Result<T, ResultDecodeError> {
    let type_error = |index: usize, found: String, source| ResultDecodeError::Type {
        index,
        expected: std::any::type_name::<T>(),
        found,
        source,
    };
    match Shape::of::<T>() {
        Shape::Unit => T::deserialize(&Value::Null).map_err(|e| type_error(0, "nothing".into(), e)),
        Shape::Tuple(n) => {
            if results.len() != n {
                return Err(ResultDecodeError::Count {
                    expected: n,
                    found: results.len(),
                });
            }
            let items: Vec<Value> = results
                .iter()
                .map(|r| normalize(&r.type_tag, &r.value).into_owned())
                .collect();
            T::deserialize(&Value::Array(items)).map_err(|e| type_error(1, "tuple".into(), e))
        }
        Shape::Any => {
            let value = match results {
                [] => Value::Null,
                [one] => normalize(&one.type_tag, &one.value).into_owned(),
                many => Value::Array(
                    many.iter()
                        .map(|r| normalize(&r.type_tag, &r.value).into_owned())
                        .collect(),
                ),
            };
            T::deserialize(&value).map_err(|e| type_error(1, "results".into(), e))
        }
        Shape::Value(_) => match results {
            [] => T::deserialize(&Value::Null).map_err(|_| ResultDecodeError::Count {
                expected: 1,
                found: 0,
            }),
            [one] => decode_value(&one.type_tag, &one.value)
                .map_err(|e| type_error(1, describe(&one.type_tag, &one.value), e)),
            many => Err(ResultDecodeError::Count {
                expected: 1,
                found: many.len(),
            }),
        },
    }
}
