//! Second stage: a validated description of the task, built from the parsed options and signature.
//!
//! [`Task::new`] always returns a description, even when it records errors: the parts it could read (the
//! parameters, the output type as far as it is known) still shape the stub that is emitted next to the
//! errors, so call sites of `send` do not add errors of their own.

use quote::format_ident;
use syn::ext::IdentExt;
use syn::{
    Attribute, FnArg, GenericArgument, GenericParam, Generics, Ident, Pat, Path, PathArguments,
    ReturnType, Type, TypePath, Visibility,
};

use crate::parse::{Errors, Options, TaskFn};

/// The constants and statics the generated module defines (a parameter of `send` cannot be named so).
const GENERATED_CONSTANTS: [&str; 2] = ["NAME", "TASK"];

/// A task, as the expansion needs it.
pub(crate) struct Task {
    /// The function's `#[cfg(..)]` attributes, repeated on everything generated for it.
    pub(crate) cfgs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    /// The function's name (and the name of the generated module).
    pub(crate) ident: Ident,
    /// The wire name.
    pub(crate) name: String,
    /// The path of the machinery crate (`::machinery`, or `crate = ".."`).
    pub(crate) root: Path,
    /// The function takes `&TaskContext` first.
    pub(crate) takes_context: bool,
    /// The parameters that travel in the message (the context excluded).
    pub(crate) params: Vec<Param>,
    pub(crate) output: Output,
    /// The error type, where it is written (`Result<T, E>`; not for `io::Result<T>`).
    pub(crate) error: Option<syn::Type>,
    /// The return type as written (compile-time checks point at it).
    pub(crate) return_type: Option<syn::Type>,
    /// The function's generics; only the stub emitted next to errors uses them.
    pub(crate) generics: Generics,
    pub(crate) queue: Option<String>,
    pub(crate) retries: u32,
    /// Whole seconds.
    pub(crate) retry_timeout: u32,
    /// Milliseconds.
    pub(crate) timeout: Option<u64>,
    /// The retry back-off strategy expression.
    pub(crate) backoff: Option<syn::Expr>,
    /// Milliseconds.
    pub(crate) unique_for: Option<u64>,
    /// Starts per period, and the period in seconds.
    pub(crate) rate_limit: Option<(u32, u64)>,
    /// `send` and `signature` spread the last `Vec<T>` parameter into one argument per element.
    pub(crate) variadic: bool,
}

/// One parameter that travels in the message.
pub(crate) struct Param {
    /// The name of the field in `Args`.
    pub(crate) ident: Ident,
    /// The name of the parameter of `send`/`signature`: `ident`, unless that is the name of a constant
    /// of the generated module (`NAME`, `TASK`), which a parameter pattern cannot bind.
    pub(crate) binding: Ident,
    /// The name written into the message's `Name` key.
    pub(crate) wire_name: String,
    pub(crate) ty: Type,
    pub(crate) kind: ParamKind,
}

/// What the syntax of a parameter's type says about how it is passed and read.
pub(crate) enum ParamKind {
    /// Passed and read as itself.
    Plain,
    /// `String`: `send`/`signature` take `impl Into<String>`.
    String,
    /// `Vec<T>` (the last parameter only): the worker reads it from one slice argument or from trailing
    /// scalar arguments of `T`.
    Rest(Box<Type>),
}

/// The task's output: the `T` of its `Result<T, E>`.
pub(crate) struct Output {
    pub(crate) ty: Type,
    pub(crate) shape: Shape,
}

/// How the output becomes the task's results (decided from the syntax of the type).
pub(crate) enum Shape {
    /// `()`: no result.
    Unit,
    /// `(A, B, ..)`: one result per element, as Go stores multiple return values.
    Tuple(usize),
    /// Anything else: one result.
    Single,
}

impl Task {
    /// Validates the function and the options, recording every problem in `errors`.
    pub(crate) fn new(func: &TaskFn, options: Options, errors: &mut Errors) -> Task {
        let sig = &func.sig;
        if sig.asyncness.is_none() {
            errors.spanned(sig.fn_token, "`#[task]` functions must be `async fn`");
        }
        if let Some(unsafety) = sig.unsafety {
            errors.spanned(
                unsafety,
                "`#[task]` functions cannot be `unsafe`: the worker calls them with decoded arguments",
            );
        }
        check_generics(&sig.generics, errors);

        let mut takes_context = false;
        let mut params = Vec::new();
        for (index, input) in sig.inputs.iter().enumerate() {
            let typed = match input {
                FnArg::Receiver(receiver) => {
                    errors.spanned(
                        receiver,
                        "`#[task]` functions cannot take `self`: a task is a free function the worker calls with decoded arguments",
                    );
                    continue;
                }
                FnArg::Typed(typed) => typed,
            };
            if index == 0 && is_context_ref(&typed.ty) {
                takes_context = true;
                continue;
            }
            check_param_type(&typed.ty, errors);
            let ident = match &*typed.pat {
                Pat::Ident(pat) => pat.ident.clone(),
                _ => format_ident!("arg{}", params.len() + 1),
            };
            let kind = if is_string(&typed.ty) {
                ParamKind::String
            } else if let (true, Some(elem)) =
                (index + 1 == sig.inputs.len(), vec_element(&typed.ty))
            {
                ParamKind::Rest(Box::new(elem.clone()))
            } else {
                ParamKind::Plain
            };
            let binding = if GENERATED_CONSTANTS.iter().any(|c| ident == c) {
                format_ident!("__machinery_{}", ident.to_string().to_lowercase())
            } else {
                ident.clone()
            };
            params.push(Param {
                wire_name: ident.unraw().to_string(),
                ident,
                binding,
                ty: (*typed.ty).clone(),
                kind,
            });
        }

        let (output, error, return_type) = match &sig.output {
            ReturnType::Default => {
                errors.spanned(
                    &sig.ident,
                    "`#[task]` functions must return a `Result`: add `-> Result<T, E>`",
                );
                (unit_output(), None, None)
            }
            ReturnType::Type(_, ty) => {
                check_no_impl_trait(ty, errors);
                match result_parts(ty) {
                    Some((ok, err)) => (output(ok), err.cloned(), Some((**ty).clone())),
                    None => {
                        errors.spanned(
                            ty,
                            "`#[task]` functions must return `Result<T, E>`, or an alias whose name ends in `Result` with the output type first, such as `anyhow::Result<T>`",
                        );
                        // The stub guesses that the type written is the output the user meant.
                        (output(ty), None, None)
                    }
                }
            }
        };

        let variadic = match &options.variadic {
            Some(option) => {
                let last_is_vec = matches!(
                    params.last(),
                    Some(Param {
                        kind: ParamKind::Rest(_),
                        ..
                    })
                );
                if !last_is_vec {
                    let found = match params.last() {
                        Some(last) => format!("`{}` is not written `Vec<T>`", last.ident.unraw()),
                        None => "the function takes no arguments".to_owned(),
                    };
                    errors.spanned(
                        option,
                        format_args!(
                            "`variadic` needs a last parameter of type `Vec<T>`, whose elements it sends as separate arguments; {found}"
                        ),
                    );
                }
                last_is_vec
            }
            None => false,
        };

        Task {
            cfgs: func
                .attrs
                .iter()
                .filter(|attr| attr.path().is_ident("cfg"))
                .cloned()
                .collect(),
            vis: func.vis.clone(),
            ident: sig.ident.clone(),
            name: options
                .name
                .map_or_else(|| sig.ident.unraw().to_string(), |n| n.value()),
            root: options
                .krate
                .unwrap_or_else(|| syn::parse_quote!(::machinery)),
            takes_context,
            params,
            output,
            error,
            return_type,
            generics: sig.generics.clone(),
            queue: options.queue.map(|q| q.value()),
            retries: options.retries.unwrap_or(0),
            retry_timeout: options.retry_timeout.unwrap_or(0),
            timeout: options.timeout,
            backoff: options.backoff,
            unique_for: options.unique_for,
            rate_limit: options.rate_limit,
            variadic,
        }
    }
}

fn check_generics(generics: &Generics, errors: &mut Errors) {
    for param in &generics.params {
        match param {
            GenericParam::Lifetime(lifetime) => errors.spanned(
                lifetime,
                "`#[task]` functions cannot have lifetime parameters: the worker decodes each argument into an owned value, and the task's future must be `'static`",
            ),
            GenericParam::Type(_) | GenericParam::Const(_) => errors.spanned(
                param,
                "`#[task]` functions cannot be generic: the worker must know the concrete type of each argument to decode it",
            ),
        }
    }
    if let Some(where_clause) = &generics.where_clause {
        if generics.params.is_empty() {
            errors.spanned(
                where_clause,
                "`#[task]` functions cannot have a `where` clause",
            );
        }
    }
}

/// `&TaskContext` (any path ending in `TaskContext`, shared reference, no generics).
fn is_context_ref(ty: &Type) -> bool {
    match ty {
        Type::Reference(r) if r.mutability.is_none() => {
            last_segment(&r.elem).is_some_and(|s| s.ident == "TaskContext" && s.arguments.is_none())
        }
        _ => false,
    }
}

/// A type path's last segment, if the type is a plain path (`a::b::C<..>`).
fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(TypePath { qself: None, path }) => path.segments.last(),
        Type::Group(group) => last_segment(&group.elem),
        _ => None,
    }
}

/// A path ending in `String`, without generics.
fn is_string(ty: &Type) -> bool {
    last_segment(ty).is_some_and(|s| s.ident == "String" && s.arguments.is_none())
}

/// The `T` of a type written `Vec<T>` (any path ending in `Vec`).
fn vec_element(ty: &Type) -> Option<&Type> {
    let segment = last_segment(ty).filter(|s| s.ident == "Vec")?;
    match generic_types(segment).as_slice() {
        [elem] => Some(elem),
        _ => None,
    }
}

/// The type arguments of a path segment (lifetimes and constants skipped).
fn generic_types(segment: &syn::PathSegment) -> Vec<&Type> {
    match &segment.arguments {
        PathArguments::AngleBracketed(args) => args
            .args
            .iter()
            .filter_map(|arg| match arg {
                GenericArgument::Type(ty) => Some(ty),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `T` and `E` of a return type whose last segment ends in `Result` and whose first type argument is
/// the output: `Result<T, E>`, `io::Result<T>`, `anyhow::Result<T>`.
fn result_parts(ty: &Type) -> Option<(&Type, Option<&Type>)> {
    let segment = last_segment(ty).filter(|s| s.ident.to_string().ends_with("Result"))?;
    let types = generic_types(segment);
    let ok = *types.first()?;
    Some((ok, types.get(1).copied()))
}

fn output(ty: &Type) -> Output {
    let shape = match ty {
        Type::Tuple(tuple) if tuple.elems.is_empty() => Shape::Unit,
        Type::Tuple(tuple) => Shape::Tuple(tuple.elems.len()),
        _ => Shape::Single,
    };
    Output {
        ty: ty.clone(),
        shape,
    }
}

fn unit_output() -> Output {
    Output {
        ty: syn::parse_quote!(()),
        shape: Shape::Unit,
    }
}

/// A parameter's type must be an owned, concrete type: no references, no `impl Trait`, no `'_`.
fn check_param_type(ty: &Type, errors: &mut Errors) {
    match ty {
        Type::Reference(reference) => {
            let message = if is_context_ref(ty) {
                "`&TaskContext` must be the first parameter of a `#[task]` function".to_owned()
            } else if reference.mutability.is_some()
                && last_segment(&reference.elem).is_some_and(|s| s.ident == "TaskContext")
            {
                "take the task context as `&TaskContext`, the first parameter".to_owned()
            } else {
                format!(
                    "`#[task]` parameters cannot be references: the worker decodes each argument into an owned value; take {}",
                    owned_hint(&reference.elem)
                )
            };
            errors.spanned(ty, message);
        }
        Type::Path(_) if last_segment(ty).is_some_and(|s| s.ident == "TaskContext") => {
            errors.spanned(
                ty,
                "take the task context as `&TaskContext`, the first parameter",
            );
        }
        Type::ImplTrait(_) => errors.spanned(
            ty,
            "`#[task]` parameters cannot be `impl Trait`: the worker must know the concrete type of each argument to decode it",
        ),
        Type::Path(path) => {
            if let Some(qself) = &path.qself {
                check_param_type(&qself.ty, errors);
            }
            for segment in &path.path.segments {
                match &segment.arguments {
                    PathArguments::AngleBracketed(args) => {
                        for arg in &args.args {
                            match arg {
                                GenericArgument::Type(ty) => check_param_type(ty, errors),
                                GenericArgument::Lifetime(lifetime) if lifetime.ident == "_" => {
                                    errors.spanned(
                                        lifetime,
                                        "`#[task]` parameters cannot borrow: the worker decodes each argument into an owned value",
                                    );
                                }
                                _ => {}
                            }
                        }
                    }
                    PathArguments::Parenthesized(_) | PathArguments::None => {}
                }
            }
        }
        Type::Array(array) => check_param_type(&array.elem, errors),
        Type::Slice(slice) => check_param_type(&slice.elem, errors),
        Type::Group(group) => check_param_type(&group.elem, errors),
        Type::Paren(paren) => check_param_type(&paren.elem, errors),
        Type::Tuple(tuple) => tuple.elems.iter().for_each(|t| check_param_type(t, errors)),
        // Anything else is either rejected by rustc itself or fails the hidden serde checks, which
        // point at the type.
        _ => {}
    }
}

/// What to take instead of `&inner`.
fn owned_hint(inner: &Type) -> String {
    match inner {
        Type::Path(path) if path.path.is_ident("str") => "`String` instead of `&str`".to_owned(),
        Type::Slice(slice) => format!("`Vec<{}>` instead of a slice", type_text(&slice.elem)),
        other => format!("`{}` by value", type_text(other)),
    }
}

/// `impl Trait` anywhere in the return type.
fn check_no_impl_trait(ty: &Type, errors: &mut Errors) {
    match ty {
        Type::ImplTrait(_) => errors.spanned(
            ty,
            "`#[task]` functions cannot return `impl Trait`: the output is decoded into a named type",
        ),
        Type::Path(path) => {
            for segment in &path.path.segments {
                if let PathArguments::AngleBracketed(args) = &segment.arguments {
                    for arg in &args.args {
                        if let GenericArgument::Type(ty) = arg {
                            check_no_impl_trait(ty, errors);
                        }
                    }
                }
            }
        }
        Type::Tuple(tuple) => tuple.elems.iter().for_each(|t| check_no_impl_trait(t, errors)),
        Type::Group(group) => check_no_impl_trait(&group.elem, errors),
        Type::Paren(paren) => check_no_impl_trait(&paren.elem, errors),
        _ => {}
    }
}

/// A type as a person writes it (`Vec<u8>`, not `Vec < u8 >`), for error messages.
fn type_text(ty: &Type) -> String {
    let text = quote::quote!(#ty).to_string();
    [
        (" <", "<"),
        ("< ", "<"),
        (" >", ">"),
        (" ,", ","),
        (" :: ", "::"),
        (":: ", "::"),
        ("& ", "&"),
    ]
    .iter()
    .fold(text, |text, (from, to)| text.replace(from, to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proc_macro2::TokenStream;
    use quote::{quote, ToTokens};

    fn validate(attr: TokenStream, item: TokenStream) -> (Task, Vec<String>) {
        let mut errors = Errors::default();
        let options = Options::parse(attr, &mut errors);
        let func: TaskFn = syn::parse2(item).unwrap();
        let task = Task::new(&func, options, &mut errors);
        let messages = match errors.finish() {
            Ok(()) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        };
        (task, messages)
    }

    fn errors_of(item: TokenStream) -> Vec<String> {
        validate(TokenStream::new(), item).1
    }

    #[test]
    fn a_plain_task() {
        let (task, errors) = validate(
            quote!(),
            quote!(
                pub async fn add(a: i64, mut b: i64) -> Result<i64, TaskError> {
                    Ok(a + b)
                }
            ),
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(task.name, "add");
        assert_eq!(task.root.to_token_stream().to_string(), ":: machinery");
        assert!(!task.takes_context);
        let names: Vec<_> = task.params.iter().map(|p| p.wire_name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(task.output.shape, Shape::Single));
        assert!(task.error.is_some());
        assert_eq!(task.timeout, None);
    }

    #[test]
    fn parameter_kinds() {
        let (task, errors) = validate(
            quote!(variadic),
            quote!(
                async fn f(
                    ctx: &machinery::TaskContext,
                    s: std::string::String,
                    n: i64,
                    r#type: u8,
                    rest: Vec<u8>,
                ) -> Result<(), E> {
                }
            ),
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert!(task.takes_context);
        assert!(task.variadic);
        let kinds: Vec<_> = task
            .params
            .iter()
            .map(|p| match p.kind {
                ParamKind::Plain => "plain",
                ParamKind::String => "string",
                ParamKind::Rest(_) => "rest",
            })
            .collect();
        assert_eq!(kinds, ["string", "plain", "plain", "rest"]);
        assert_eq!(
            task.params[2].wire_name, "type",
            "raw identifiers lose their r#"
        );
        assert!(matches!(task.output.shape, Shape::Unit));
    }

    #[test]
    fn only_the_last_vec_is_read_as_the_rest() {
        let (task, _) = validate(
            quote!(),
            quote!(
                async fn f(a: Vec<i64>, b: i64) -> Result<(), E> {}
            ),
        );
        assert!(matches!(task.params[0].kind, ParamKind::Plain));
    }

    #[test]
    fn destructured_parameters_get_positional_names() {
        let (task, errors) = validate(
            quote!(),
            quote!(
                async fn f((a, b): (i64, i64), _: u8) -> Result<(), E> {}
            ),
        );
        assert!(errors.is_empty(), "{errors:?}");
        let names: Vec<_> = task.params.iter().map(|p| p.ident.to_string()).collect();
        assert_eq!(names, ["arg1", "arg2"]);
    }

    #[test]
    fn parameters_named_like_generated_constants_get_other_bindings() {
        let (task, _) = validate(
            quote!(),
            quote!(
                async fn f(NAME: i64, TASK: i64, name: i64) -> Result<(), E> {}
            ),
        );
        let bindings: Vec<_> = task.params.iter().map(|p| p.binding.to_string()).collect();
        assert_eq!(bindings, ["__machinery_name", "__machinery_task", "name"]);
    }

    #[test]
    fn result_forms() {
        for (ret, shape_is_tuple, error_written) in [
            (quote!(Result<(String, i64), TaskError>), true, true),
            (quote!(anyhow::Result<i64>), false, false),
            (quote!(std::io::Result<Vec<u8>>), false, false),
            (quote!(MyResult<i64>), false, false),
        ] {
            let (task, errors) = validate(quote!(), quote!(async fn f() -> #ret {}));
            assert!(errors.is_empty(), "{ret}: {errors:?}");
            assert_eq!(
                matches!(task.output.shape, Shape::Tuple(2)),
                shape_is_tuple,
                "{ret}"
            );
            assert_eq!(task.error.is_some(), error_written, "{ret}");
        }
    }

    #[test]
    fn each_signature_error_has_its_message() {
        let cases = [
            (
                quote!(
                    fn f() -> Result<(), E> {}
                ),
                "`#[task]` functions must be `async fn`",
            ),
            (
                quote!(
                    async unsafe fn f() -> Result<(), E> {}
                ),
                "`#[task]` functions cannot be `unsafe`",
            ),
            (
                quote!(
                    async fn f<T>(t: T) -> Result<(), E> {}
                ),
                "`#[task]` functions cannot be generic",
            ),
            (
                quote!(
                    async fn f<const N: usize>() -> Result<(), E> {}
                ),
                "`#[task]` functions cannot be generic",
            ),
            (
                quote!(
                    async fn f<'a>(t: Cow<'a, str>) -> Result<(), E> {}
                ),
                "`#[task]` functions cannot have lifetime parameters",
            ),
            (
                quote!(
                    async fn f(t: Cow<'_, str>) -> Result<(), E> {}
                ),
                "`#[task]` parameters cannot borrow",
            ),
            (
                quote!(
                    async fn f(&self) -> Result<(), E> {}
                ),
                "`#[task]` functions cannot take `self`",
            ),
            (
                quote!(
                    async fn f(t: impl Display) -> Result<(), E> {}
                ),
                "`#[task]` parameters cannot be `impl Trait`",
            ),
            (
                quote!(
                    async fn f(t: &str) -> Result<(), E> {}
                ),
                "take `String` instead of `&str`",
            ),
            (
                quote!(
                    async fn f(t: &[u8]) -> Result<(), E> {}
                ),
                "take `Vec<u8>` instead of a slice",
            ),
            (
                quote!(
                    async fn f(t: Vec<&Point>) -> Result<(), E> {}
                ),
                "take `Point` by value",
            ),
            (
                quote!(
                    async fn f(a: i64, c: &TaskContext) -> Result<(), E> {}
                ),
                "`&TaskContext` must be the first parameter",
            ),
            (
                quote!(
                    async fn f(c: &mut TaskContext) -> Result<(), E> {}
                ),
                "take the task context as `&TaskContext`",
            ),
            (
                quote!(
                    async fn f() {}
                ),
                "`#[task]` functions must return a `Result`",
            ),
            (
                quote!(
                    async fn f() -> Option<i64> {}
                ),
                "`#[task]` functions must return `Result<T, E>`",
            ),
            (
                quote!(
                    async fn f() -> Result {}
                ),
                "`#[task]` functions must return `Result<T, E>`",
            ),
            (
                quote!(
                    async fn f() -> Result<impl Serialize, E> {}
                ),
                "`#[task]` functions cannot return `impl Trait`",
            ),
        ];
        for (item, expected) in cases {
            let errors = errors_of(item.clone());
            assert_eq!(errors.len(), 1, "{item}: {errors:?}");
            assert!(
                errors[0].contains(expected),
                "{item}: {:?} should contain {expected:?}",
                errors[0]
            );
        }
    }

    #[test]
    fn variadic_needs_a_last_vec() {
        let (task, errors) = validate(
            quote!(variadic),
            quote!(
                async fn f(a: i64) -> Result<(), E> {}
            ),
        );
        assert!(!task.variadic);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("`variadic` needs a last parameter of type `Vec<T>`"));
        assert!(errors[0].ends_with("`a` is not written `Vec<T>`"));
        let (_, errors) = validate(
            quote!(variadic),
            quote!(
                async fn f() -> Result<(), E> {}
            ),
        );
        assert!(errors[0].ends_with("the function takes no arguments"));
    }

    #[test]
    fn option_and_signature_errors_are_reported_together() {
        let (task, errors) = validate(
            quote!(name = "", bogus),
            quote!(
                fn f(a: &str) -> i64 {}
            ),
        );
        assert_eq!(errors.len(), 5, "{errors:?}");
        // The stub keeps what could be read: the parameter, and the written type as the output.
        assert_eq!(task.params.len(), 1);
        assert_eq!(task.output.ty.to_token_stream().to_string(), "i64");
    }
}
