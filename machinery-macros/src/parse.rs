//! First stage: the attribute's options and the function's signature, read from tokens.
//!
//! Nothing here decides whether a task is valid as a whole (that is [`crate::model`]); it only turns
//! tokens into typed values and records every problem it meets in [`Errors`], so all of them reach the
//! user in one compile.

use std::fmt::Display;

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use quote::ToTokens;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{
    Attribute, Expr, ExprLit, ExprUnary, Lit, LitStr, Meta, Path, Signature, Token, UnOp,
    Visibility,
};

/// Errors collected over one expansion, reported together (`syn::Error::combine`).
#[derive(Default)]
pub(crate) struct Errors {
    first: Option<syn::Error>,
}

impl Errors {
    /// Records an error spanned on `tokens` (start to end, as `syn::Error::new_spanned` does).
    pub(crate) fn spanned(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// Records an error (which may itself hold several).
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.first {
            Some(first) => first.combine(error),
            None => self.first = Some(error),
        }
    }

    /// Every error recorded, or `Ok` if there was none.
    pub(crate) fn finish(self) -> syn::Result<()> {
        self.first.map_or(Ok(()), Err)
    }
}

/// The options of `#[task(...)]`. Their names are spelled here and nowhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OptionName {
    Name,
    Queue,
    Retries,
    RetryTimeout,
    Timeout,
    Backoff,
    UniqueFor,
    RateLimit,
    Variadic,
    Crate,
}

impl OptionName {
    /// Every option, in the order the docs and error messages list them.
    pub(crate) const ALL: [OptionName; 10] = [
        OptionName::Name,
        OptionName::Queue,
        OptionName::Retries,
        OptionName::RetryTimeout,
        OptionName::Timeout,
        OptionName::Backoff,
        OptionName::UniqueFor,
        OptionName::RateLimit,
        OptionName::Variadic,
        OptionName::Crate,
    ];

    /// How the option is written.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OptionName::Name => "name",
            OptionName::Queue => "queue",
            OptionName::Retries => "retries",
            OptionName::RetryTimeout => "retry_timeout",
            OptionName::Timeout => "timeout",
            OptionName::Backoff => "backoff",
            OptionName::UniqueFor => "unique_for",
            OptionName::RateLimit => "rate_limit",
            OptionName::Variadic => "variadic",
            OptionName::Crate => "crate",
        }
    }

    fn from_path(path: &Path) -> Option<OptionName> {
        let ident = path.get_ident()?;
        OptionName::ALL.into_iter().find(|o| ident == o.as_str())
    }

    /// What a well-formed use looks like, for error messages.
    fn example(self) -> &'static str {
        match self {
            OptionName::Name => "a string literal, such as `name = \"add\"`",
            OptionName::Queue => "a string literal, such as `queue = \"emails\"`",
            OptionName::Retries => "a non-negative integer, such as `retries = 3`",
            OptionName::RetryTimeout => {
                "whole seconds or a duration string, such as `retry_timeout = 5` or `retry_timeout = \"5s\"`"
            }
            OptionName::Timeout => {
                "a duration string or whole seconds, such as `timeout = \"30s\"`, `timeout = \"500ms\"` or `timeout = 30`"
            }
            OptionName::Backoff => {
                "a constant expression of a type implementing `machinery::retry::BackoffStrategy`, such as `backoff = MY_BACKOFF`"
            }
            OptionName::UniqueFor => {
                "a duration string or whole seconds, such as `unique_for = \"1h\"` or `unique_for = \"30s\"`"
            }
            OptionName::RateLimit => {
                "a count per second, minute or hour, such as `rate_limit = \"100/s\"`, `\"10/m\"` or `\"500/h\"`"
            }
            OptionName::Variadic => "no value: write `variadic`",
            OptionName::Crate => {
                "a string literal holding a path, such as `crate = \"my_facade::machinery\"`"
            }
        }
    }
}

/// The options as written, each checked on its own (a missing option is `None`).
#[derive(Default)]
pub(crate) struct Options {
    pub(crate) name: Option<LitStr>,
    pub(crate) queue: Option<LitStr>,
    pub(crate) retries: Option<u32>,
    /// Whole seconds.
    pub(crate) retry_timeout: Option<u32>,
    /// Milliseconds.
    pub(crate) timeout: Option<u64>,
    /// A constant expression of a `BackoffStrategy` type.
    pub(crate) backoff: Option<Expr>,
    /// Milliseconds.
    pub(crate) unique_for: Option<u64>,
    /// Starts per period, and the period in seconds.
    pub(crate) rate_limit: Option<(u32, u64)>,
    /// The option's name, for errors about it (`variadic` with no `Vec<T>` to spread).
    pub(crate) variadic: Option<Path>,
    pub(crate) krate: Option<Path>,
}

impl Options {
    /// Reads `#[task(...)]`'s tokens. Every problem is recorded and reading goes on, so one compile
    /// reports them all.
    pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> Options {
        let mut options = Options::default();
        let metas = match syn::parse::Parser::parse2(
            Punctuated::<Meta, Token![,]>::parse_terminated,
            tokens,
        ) {
            Ok(metas) => metas,
            Err(e) => {
                errors.push(e);
                return options;
            }
        };
        let mut seen: Vec<OptionName> = Vec::new();
        for meta in metas {
            let Some(option) = OptionName::from_path(meta.path()) else {
                let expected = OptionName::ALL
                    .iter()
                    .map(|o| format!("`{}`", o.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ");
                errors.spanned(
                    meta.path(),
                    format_args!(
                        "unknown `#[task]` option `{}`; expected one of {expected}",
                        meta.path().to_token_stream().to_string().replace(' ', "")
                    ),
                );
                continue;
            };
            if seen.contains(&option) {
                errors.spanned(
                    meta.path(),
                    format_args!("duplicate `#[task]` option `{}`", option.as_str()),
                );
                continue;
            }
            seen.push(option);
            if let Err(e) = options.set(option, &meta) {
                errors.push(e);
            }
        }
        options
    }

    fn set(&mut self, option: OptionName, meta: &Meta) -> syn::Result<()> {
        let bad = |tokens: &dyn ToTokens| {
            syn::Error::new_spanned(
                tokens,
                format_args!("`{}` takes {}", option.as_str(), option.example()),
            )
        };
        if option == OptionName::Variadic {
            return match meta {
                Meta::Path(_) => {
                    self.variadic = Some(meta.path().clone());
                    Ok(())
                }
                _ => Err(bad(meta)),
            };
        }
        let Meta::NameValue(pair) = meta else {
            return Err(bad(meta));
        };
        let value = &pair.value;
        match option {
            OptionName::Name | OptionName::Queue => {
                let lit = string_literal(value).ok_or_else(|| bad(value))?;
                if lit.value().is_empty() {
                    return Err(syn::Error::new_spanned(
                        lit,
                        format_args!("`{}` cannot be empty", option.as_str()),
                    ));
                }
                let slot = if option == OptionName::Name {
                    &mut self.name
                } else {
                    &mut self.queue
                };
                *slot = Some(lit.clone());
            }
            OptionName::Retries => {
                let n = integer(value, option)?;
                let n = u32::try_from(n).map_err(|_| {
                    syn::Error::new_spanned(
                        value,
                        format_args!("`retries` is too large; the largest is {}", u32::MAX),
                    )
                })?;
                self.retries = Some(n);
            }
            OptionName::RetryTimeout => {
                let seconds = match string_literal(value) {
                    Some(lit) => parse_duration(&lit.value())
                        .map(|ms| ms.div_ceil(1000))
                        .map_err(|e| syn::Error::new_spanned(lit, e))?,
                    None => integer(value, option)?,
                };
                let seconds = u32::try_from(seconds).map_err(|_| {
                    syn::Error::new_spanned(
                        value,
                        format_args!(
                            "`retry_timeout` is too large; the largest is {} seconds",
                            u32::MAX
                        ),
                    )
                })?;
                self.retry_timeout = Some(seconds);
            }
            OptionName::Timeout => {
                let millis = positive_duration(value, option, "leave it out for no time limit")?;
                self.timeout = Some(millis);
            }
            OptionName::UniqueFor => {
                let millis =
                    positive_duration(value, option, "leave it out for a task that is not unique")?;
                self.unique_for = Some(millis);
            }
            OptionName::RateLimit => {
                let lit = string_literal(value).ok_or_else(|| bad(value))?;
                let limit =
                    parse_rate(&lit.value()).map_err(|e| syn::Error::new_spanned(lit, e))?;
                self.rate_limit = Some(limit);
            }
            OptionName::Backoff => {
                if string_literal(value).is_some() {
                    return Err(bad(value));
                }
                self.backoff = Some(value.clone());
            }
            OptionName::Crate => {
                let lit = string_literal(value).ok_or_else(|| bad(value))?;
                let path = lit.parse::<Path>().map_err(|_| {
                    syn::Error::new_spanned(
                        lit,
                        format_args!(
                            "`crate` takes a path to the machinery crate, such as `crate = \"my_facade::machinery\"`; `{}` is not a path",
                            lit.value()
                        ),
                    )
                })?;
                self.krate = Some(path);
            }
            OptionName::Variadic => unreachable!("handled above"),
        }
        Ok(())
    }
}

/// A duration longer than zero, in milliseconds: a duration string or whole seconds. `zero` says what to
/// do instead of writing zero.
fn positive_duration(value: &Expr, option: OptionName, zero: &str) -> syn::Result<u64> {
    let name = option.as_str();
    let millis = match string_literal(value) {
        Some(lit) => parse_duration(&lit.value()).map_err(|e| syn::Error::new_spanned(lit, e))?,
        None => integer(value, option)?
            .checked_mul(1000)
            .ok_or_else(|| syn::Error::new_spanned(value, format_args!("`{name}` is too large")))?,
    };
    if millis == 0 {
        return Err(syn::Error::new_spanned(
            value,
            format_args!("`{name}` must be longer than zero; {zero}"),
        ));
    }
    Ok(millis)
}

fn string_literal(value: &Expr) -> Option<&LitStr> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Some(lit),
        _ => None,
    }
}

/// A non-negative integer literal (`-1` and `"3"` are errors that say what the option takes).
fn integer(value: &Expr, option: OptionName) -> syn::Result<u64> {
    let bad = || {
        syn::Error::new_spanned(
            value,
            format_args!("`{}` takes {}", option.as_str(), option.example()),
        )
    };
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => lit.base10_parse::<u64>().map_err(|_| bad()),
        Expr::Unary(ExprUnary {
            op: UnOp::Neg(_), ..
        }) => Err(syn::Error::new_spanned(
            value,
            format_args!(
                "`{}` cannot be negative; it takes {}",
                option.as_str(),
                option.example()
            ),
        )),
        _ => Err(bad()),
    }
}

/// Parses a rate limit such as `"100/s"`, `"10/m"` or `"500/h"` into starts per period and the period in
/// seconds.
pub(crate) fn parse_rate(text: &str) -> Result<(u32, u64), String> {
    let invalid = |why: &str| {
        format!(
            "invalid rate limit `{text}`: {why}; write a whole number of starts per second, minute or hour, such as `\"100/s\"`, `\"10/m\"` or `\"500/h\"`"
        )
    };
    let Some((count, unit)) = text.split_once('/') else {
        return Err(invalid("it has no `/`"));
    };
    let period = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(invalid("the period must be `s`, `m` or `h`")),
    };
    let count = count.trim();
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("the count must be a whole number"));
    }
    let count: u32 = count.parse().map_err(|_| {
        invalid(&format!(
            "the count is too large; the largest is {}",
            u32::MAX
        ))
    })?;
    if count == 0 {
        return Err(invalid("it must allow at least one start"));
    }
    Ok((count, period))
}

/// Parses a duration such as `"30s"`, `"500ms"`, `"2m"`, `"1h"` or `"1m30s"` into milliseconds.
pub(crate) fn parse_duration(text: &str) -> Result<u64, String> {
    let invalid = |why: &str| {
        format!(
            "invalid duration `{text}`: {why}; write a whole number followed by `ms`, `s`, `m` or `h`, such as `\"30s\"` or `\"1m30s\"`"
        )
    };
    if text.is_empty() {
        return Err(invalid("it is empty"));
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid("expected a number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| invalid("the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => return Err(invalid("a unit is missing")),
            _ => return Err(invalid("unknown unit")),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(scale)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| invalid("it is too long"))?;
    }
    Ok(total)
}

/// The annotated item: a function whose body is kept as raw tokens (never parsed, never rewritten), so a
/// body that does not parse still gets its signature checked, and rustc reports the body's own errors.
pub(crate) struct TaskFn {
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) sig: Signature,
}

impl Parse for TaskFn {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        let sig: Signature = input.parse()?;
        let rest: TokenStream = input.parse()?;
        let mut rest = rest.into_iter();
        match (rest.next(), rest.next()) {
            (Some(TokenTree::Group(body)), None) if body.delimiter() == Delimiter::Brace => {
                Ok(TaskFn { attrs, vis, sig })
            }
            _ => Err(syn::Error::new_spanned(
                &sig,
                "`#[task]` needs a function with a body",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn options(tokens: TokenStream) -> (Options, syn::Result<()>) {
        let mut errors = Errors::default();
        let options = Options::parse(tokens, &mut errors);
        (options, errors.finish())
    }

    fn messages(result: syn::Result<()>) -> Vec<String> {
        match result {
            Ok(()) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("30s"), Ok(30_000));
        assert_eq!(parse_duration("2m"), Ok(120_000));
        assert_eq!(parse_duration("1h"), Ok(3_600_000));
        assert_eq!(parse_duration("1m30s"), Ok(90_000));
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        for (text, why) in [
            ("", "it is empty"),
            ("5", "a unit is missing"),
            ("5x", "unknown unit"),
            ("s", "expected a number"),
            ("1.5s", "unknown unit"),
            ("99999999999999999999s", "the number is too large"),
            ("18446744073709551615h", "it is too long"),
        ] {
            let error = parse_duration(text).unwrap_err();
            assert!(error.contains(why), "{text:?}: {error}");
        }
    }

    #[test]
    fn every_option_form() {
        let (o, result) = options(quote!(
            name = "Add",
            queue = "q",
            retries = 3,
            retry_timeout = "1500ms",
            timeout = 2,
            variadic,
            crate = "facade::machinery"
        ));
        assert!(result.is_ok());
        assert_eq!(o.name.unwrap().value(), "Add");
        assert_eq!(o.queue.unwrap().value(), "q");
        assert_eq!(o.retries.unwrap(), 3);
        assert_eq!(o.retry_timeout.unwrap(), 2, "rounded up to whole seconds");
        assert_eq!(o.timeout.unwrap(), 2_000);
        assert!(o.variadic.is_some());
        assert_eq!(
            o.krate.unwrap().to_token_stream().to_string(),
            "facade :: machinery"
        );
        let (o, _) = options(quote!(retry_timeout = 7, timeout = "1m"));
        assert_eq!(o.retry_timeout.unwrap(), 7);
        assert_eq!(o.timeout.unwrap(), 60_000);
    }

    #[test]
    fn all_option_errors_are_reported_together() {
        let (_, result) = options(quote!(
            nme = "x",
            queue = "a",
            queue = "b",
            retries = -1,
            timeout = "soon",
            variadic = true,
            name = 5,
            retry_timeout = "0",
            crate = "not a path"
        ));
        let messages = messages(result);
        let expected = [
            "unknown `#[task]` option `nme`; expected one of `name`, `queue`, `retries`, `retry_timeout`, `timeout`, `backoff`, `unique_for`, `rate_limit`, `variadic`, `crate`",
            "duplicate `#[task]` option `queue`",
            "`retries` cannot be negative",
            "invalid duration `soon`",
            "`variadic` takes no value",
            "`name` takes a string literal",
            "invalid duration `0`: a unit is missing",
            "`crate` takes a path to the machinery crate",
        ];
        assert_eq!(messages.len(), expected.len(), "{messages:#?}");
        for (message, expected) in messages.iter().zip(expected) {
            assert!(
                message.starts_with(expected),
                "{message:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn rate_limits_parse() {
        assert_eq!(parse_rate("100/s"), Ok((100, 1)));
        assert_eq!(parse_rate("10/m"), Ok((10, 60)));
        assert_eq!(parse_rate("500/h"), Ok((500, 3600)));
        for bad in [
            "fast",
            "0/s",
            "-1/s",
            "10/d",
            "/s",
            "1.5/s",
            "99999999999/s",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_timeout_and_huge_retries_are_rejected() {
        let (_, result) = options(quote!(timeout = "0s", retries = 4294967296));
        let messages = messages(result);
        assert!(messages[0].starts_with("`timeout` must be longer than zero"));
        assert!(messages[1].starts_with("`retries` is too large"));
    }

    #[test]
    fn empty_name_is_rejected() {
        let (_, result) = options(quote!(name = ""));
        assert_eq!(messages(result), ["`name` cannot be empty"]);
    }

    #[test]
    fn a_function_without_body_is_rejected() {
        assert!(syn::parse2::<TaskFn>(quote!(
            async fn f();
        ))
        .is_err());
        assert!(syn::parse2::<TaskFn>(quote!(
            pub async fn f(a: i64) -> R {
                body
            }
        ))
        .is_ok());
    }
}
