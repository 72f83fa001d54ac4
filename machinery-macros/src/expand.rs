//! Third stage: the generated code.
//!
//! Next to the user's function, unchanged, come:
//! - a module of the same name with `NAME`, `Args`, `TASK`, `task()`, `signature(..)` and `send(..)`;
//! - in a `const _: () = { .. };` block beside the function (where the function and the types of its
//!   parameters are in scope, even inside a block): the handler, the hidden compile-time checks, and the
//!   `inventory` registration.
//!
//! Runtime items are named only as `<root>::__private::..`, std items only as `::core::..`/`::std::..`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Ident, Index, Type};

use crate::model::{Param, ParamKind, Shape, Task};
use crate::parse::{Errors, Options, TaskFn};

/// The whole attribute: parse, validate, expand; on errors, the function, a stub module and the errors.
pub(crate) fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func = match syn::parse2::<TaskFn>(item.clone()) {
        Ok(func) => func,
        Err(e) => {
            let error = syn::Error::new(
                e.span(),
                format_args!("`#[task]` applies to an `async fn`: {e}"),
            )
            .to_compile_error();
            return quote!(#item #error);
        }
    };
    let mut errors = Errors::default();
    let options = Options::parse(attr, &mut errors);
    let task = Task::new(&func, options, &mut errors);
    match errors.finish() {
        Ok(()) => expand(item, &task),
        Err(error) => fallback(item, &task, error),
    }
}

/// The function and everything generated for it.
fn expand(item: TokenStream, task: &Task) -> TokenStream {
    let module = module(task);
    let hidden = hidden(task);
    quote! {
        #item
        #module
        #hidden
    }
}

/// The function as written, a stub module whose `send`/`signature` have the signature the user meant
/// (so call sites add no errors of their own), and the errors.
fn fallback(item: TokenStream, task: &Task, error: syn::Error) -> TokenStream {
    let Task {
        cfgs,
        vis,
        ident,
        root,
        ..
    } = task;
    let private = quote!(#root::__private);
    let name = &task.name;
    let (params, _) = params(task);
    let ok = &task.output.ty;
    let (generics, where_clause) = (&task.generics.params, &task.generics.where_clause);
    let server = server_ident(task);
    let send_output = send_output(task, &private);
    let error = error.to_compile_error();
    let docs = Docs::new(task);
    let (module_doc, send_doc, signature_doc) = (&docs.module, &docs.send, &docs.signature);
    let partial_stubs = partial_stubs(task, &private, &params);
    quote! {
        #item

        #(#cfgs)*
        #[doc = #module_doc]
        #[allow(unused_variables, clippy::too_many_arguments)]
        #vis mod #ident {
            #[allow(unused_imports)]
            use super::*;

            /// The wire name of the task.
            pub const NAME: &str = #name;

            /// The task as the worker knows it.
            pub fn task() -> &'static #private::TaskDef {
                ::core::unreachable!()
            }

            #[doc = #signature_doc]
            pub fn signature<#generics>(#(#params),*) -> #private::Signature<#ok> #where_clause {
                ::core::unreachable!()
            }

            #[doc = #send_doc]
            pub fn send<'__machinery, #generics>(
                #server: &'__machinery #private::Server,
                #(#params),*
            ) -> #send_output #where_clause {
                ::core::unreachable!()
            }

            #partial_stubs
        }

        #error
    }
}

/// `partial`/`partial_with` with no body, next to macro errors. The open parameter's type is left generic:
/// it may be the very type the error is about (a reference, say), which could not be written here.
fn partial_stubs(task: &Task, private: &TokenStream, params: &[TokenStream]) -> TokenStream {
    let Some(last) = task.params.last() else {
        return TokenStream::new();
    };
    let ok = &task.output.ty;
    let lead = &params[..params.len() - 1];
    let with = matches!(last.kind, ParamKind::Rest(_)).then(|| {
        quote! {
            /// Stub emitted next to a `#[task]` error.
            pub fn partial_with<__MachineryIn>(#(#params),*) -> #private::Partial<__MachineryIn, #ok> {
                ::core::unreachable!()
            }
        }
    });
    quote! {
        /// Stub emitted next to a `#[task]` error.
        pub fn partial<__MachineryIn>(#(#lead),*) -> #private::Partial<__MachineryIn, #ok> {
            ::core::unreachable!()
        }
        #with
    }
}

/// The doc comments of the generated module.
struct Docs {
    module: String,
    signature: String,
    send: String,
}

impl Docs {
    fn new(task: &Task) -> Docs {
        let ident = task.ident.unraw();
        let name = &task.name;
        Docs {
            module: format!(
                "The task `{ident}` (wire name `{name}`), generated by `#[task]`: its arguments, its typed \
                 `send` and `signature`, and its registration with the worker."
            ),
            signature: format!(
                "A typed message for the task `{name}` with these arguments and the task's declared \
                 options, to adjust (ETA, retries, routing key, ...) and send with `Server::send`, or to \
                 use in a workflow."
            ),
            send: format!(
                "Sends the task `{name}` with these arguments; the returned handle reads its typed output."
            ),
        }
    }
}

/// The name of `send`'s server parameter: `server`, unless a task parameter has that name.
fn server_ident(task: &Task) -> Ident {
    if task.params.iter().any(|p| p.ident == "server") {
        format_ident!("__machinery_server")
    } else {
        format_ident!("server")
    }
}

/// The parameters of `signature`/`send` (a `String` takes `impl Into<String>`), and the statements that
/// turn those into the parameter types.
fn params(task: &Task) -> (Vec<TokenStream>, Vec<TokenStream>) {
    task.params
        .iter()
        .map(|param| {
            let Param { binding, ty, .. } = param;
            match param.kind {
                ParamKind::String => (
                    quote!(#binding: impl ::core::convert::Into<#ty>),
                    quote!(let #binding: #ty = ::core::convert::Into::into(#binding);),
                ),
                ParamKind::Plain | ParamKind::Rest(_) => {
                    (quote!(#binding: #ty), TokenStream::new())
                }
            }
        })
        .unzip()
}

/// The module named like the function.
fn module(task: &Task) -> TokenStream {
    let Task {
        cfgs,
        vis,
        ident,
        root,
        ..
    } = task;
    let private = quote!(#root::__private);
    let serde = format!("{}", quote!(#private::serde));
    let name = &task.name;
    let ok = &task.output.ty;
    let (fields, field_helpers): (Vec<_>, Vec<_>) = task
        .params
        .iter()
        .enumerate()
        .map(|(i, param)| args_field(i, param, &private))
        .unzip();
    let (params, conversions) = params(task);
    let bindings: Vec<&Ident> = task.params.iter().map(|p| &p.binding).collect();
    let encoded = encoded_list(task, &private);
    let queue = match &task.queue {
        Some(queue) => quote!(::core::option::Option::Some(#queue)),
        None => quote!(::core::option::Option::None),
    };
    let (retries, retry_timeout) = (task.retries, task.retry_timeout);
    let timeout = match task.timeout {
        Some(ms) => quote!(::core::option::Option::Some(::core::time::Duration::from_millis(#ms))),
        None => quote!(::core::option::Option::None),
    };
    let unique_for = match task.unique_for {
        Some(ms) => quote!(::core::option::Option::Some(::core::time::Duration::from_millis(#ms))),
        None => quote!(::core::option::Option::None),
    };
    let rate_limit = match task.rate_limit {
        Some((count, secs)) => quote! {
            ::core::option::Option::Some(#private::RateLimit::new(
                #count,
                ::core::time::Duration::from_secs(#secs),
            ))
        },
        None => quote!(::core::option::Option::None),
    };
    let backoff = match &task.backoff {
        Some(expr) => quote! {
            ::core::option::Option::Some(&(#expr) as &'static dyn #private::BackoffStrategy)
        },
        None => quote!(::core::option::Option::None),
    };
    let server = server_ident(task);
    let send_output = send_output(task, &private);
    let partials = partials(task, &private, &params, &conversions, &encoded);
    let docs = Docs::new(task);
    let (module_doc, send_doc, signature_doc) = (&docs.module, &docs.send, &docs.signature);
    let args_doc = format!(
        "The arguments of the task `{name}`, named like the function's parameters (the `Name`s of the \
         message's arguments)."
    );
    quote! {
        #(#cfgs)*
        #[doc = #module_doc]
        #vis mod #ident {
            #[allow(unused_imports)]
            use super::*;

            /// The wire name of the task.
            pub const NAME: &str = #name;

            #[doc = #args_doc]
            #[derive(#private::serde::Serialize, #private::serde::Deserialize)]
            #[serde(crate = #serde)]
            pub struct Args {
                #(#fields,)*
            }

            #(#field_helpers)*

            /// The task as the worker knows it (`Worker::register(task())`).
            pub static TASK: #private::TaskDef = #private::TaskDef {
                name: NAME,
                // This module's path is the function's path: they share the name and the parent.
                rust_path: ::core::module_path!(),
                handler: <Args as #private::TaskHandler>::handle,
                options: #private::TaskOptions {
                    queue: #queue,
                    retries: #retries,
                    retry_timeout: #retry_timeout,
                    timeout: #timeout,
                    backoff: #backoff,
                    unique_for: #unique_for,
                    rate_limit: #rate_limit,
                },
            };

            /// The task as the worker knows it, for `Worker::register`.
            pub fn task() -> &'static #private::TaskDef {
                &TASK
            }

            #[doc = #signature_doc]
            #[allow(clippy::too_many_arguments)]
            pub fn signature(#(#params),*) -> #private::Signature<#ok> {
                #[allow(unused_imports)]
                use #private::{Checked as _, Unchecked as _};
                #(#conversions)*
                #private::signature(&self::TASK, ::std::vec![#(#encoded),*])
            }

            #[doc = #send_doc]
            #[allow(clippy::too_many_arguments)]
            pub fn send<'__machinery>(
                #server: &'__machinery #private::Server,
                #(#params),*
            ) -> #send_output {
                let __machinery_signature = self::signature(#(#bindings),*);
                ::std::boxed::Box::pin(#server.send(__machinery_signature))
            }

            #partials
        }
    }
}

/// The encoded arguments, one expression per parameter (a `variadic` last `Vec<T>` spread out).
fn encoded_list(task: &Task, private: &TokenStream) -> Vec<TokenStream> {
    let last = task.params.len().checked_sub(1);
    task.params
        .iter()
        .enumerate()
        .map(|(i, param)| {
            let Param {
                binding,
                wire_name,
                kind,
                ..
            } = param;
            match kind {
                ParamKind::Rest(elem) if task.variadic && Some(i) == last => {
                    quote!((&&#private::Probe::<#elem>::new()).encode_variadic(#wire_name, &#binding))
                }
                _ => quote!((&&#private::Probe::of(&#binding)).encode_arg(#wire_name, &#binding)),
            }
        })
        .collect()
}

/// `partial(..)`: every parameter but the last, which a chain step's previous output or a chord's
/// collected results fill in; and, for a last `Vec<T>` parameter, `partial_with(.., head)`, whose vector
/// starts with `head` and gets the previous output appended (Go's variadic chains).
fn partials(
    task: &Task,
    private: &TokenStream,
    params: &[TokenStream],
    conversions: &[TokenStream],
    encoded: &[TokenStream],
) -> TokenStream {
    let Some(last) = task.params.last() else {
        return TokenStream::new();
    };
    let n = task.params.len() - 1;
    let ok = &task.output.ty;
    let last_ty = &last.ty;
    let name = &task.name;
    let (lead_params, lead_conversions, lead_encoded) =
        (&params[..n], &conversions[..n], &encoded[..n]);
    let partial_doc = format!(
        "A message for the task `{name}` without its last argument, which the previous step of a `Chain` \
         (or a `Chord`'s collected results) fills in."
    );
    let partial = quote! {
        #[doc = #partial_doc]
        #[allow(clippy::too_many_arguments)]
        pub fn partial(#(#lead_params),*) -> #private::Partial<#last_ty, #ok> {
            #[allow(unused_imports)]
            use #private::{Checked as _, Unchecked as _};
            #(#lead_conversions)*
            #private::Partial::new(#private::signature(&self::TASK, ::std::vec![#(#lead_encoded),*]))
        }
    };
    let with = match &last.kind {
        ParamKind::Rest(_) => {
            let with_doc = format!(
                "A message for the task `{name}` whose last argument starts with these elements; a \
                 `Chain`'s previous output is appended to it (how Go chains feed variadic tasks)."
            );
            quote! {
                #[doc = #with_doc]
                #[allow(clippy::too_many_arguments)]
                pub fn partial_with(#(#params),*) -> #private::Partial<#last_ty, #ok> {
                    #[allow(unused_imports)]
                    use #private::{Checked as _, Unchecked as _};
                    #(#conversions)*
                    #private::Partial::new(#private::signature(&self::TASK, ::std::vec![#(#encoded),*]))
                }
            }
        }
        _ => TokenStream::new(),
    };
    quote!(#partial #with)
}

/// The type `send` returns: a boxed future rather than an `async fn`'s, whose type would carry the
/// `impl Into<String>` parameters and repeat a wrong argument's error at the call and at its `.await`.
fn send_output(task: &Task, private: &TokenStream) -> TokenStream {
    let ok = &task.output.ty;
    quote! {
        ::core::pin::Pin<::std::boxed::Box<
            dyn ::core::future::Future<
                Output = ::core::result::Result<#private::AsyncResult<#ok>, #private::SendError>,
            > + ::core::marker::Send + '__machinery,
        >>
    }
}

/// A field of `Args`, and the functions it is serialized and deserialized with: they reach serde through
/// `__private::Probe`, so a type without serde gets the hidden check's error only.
fn args_field(index: usize, param: &Param, private: &TokenStream) -> (TokenStream, TokenStream) {
    let Param { ident, ty, .. } = param;
    let doc = format!("The argument `{}`.", ident.unraw());
    let serialize = format_ident!("__machinery_serialize_{}", index);
    let deserialize = format_ident!("__machinery_deserialize_{}", index);
    let (serialize_name, deserialize_name) = (serialize.to_string(), deserialize.to_string());
    let field = quote! {
        #[doc = #doc]
        #[serde(serialize_with = #serialize_name, deserialize_with = #deserialize_name)]
        pub #ident: #ty
    };
    let helpers = quote! {
        fn #serialize<__MachineryS: #private::serde::Serializer>(
            __machinery_value: &#ty,
            __machinery_serializer: __MachineryS,
        ) -> ::core::result::Result<__MachineryS::Ok, __MachineryS::Error> {
            #[allow(unused_imports)]
            use #private::{Checked as _, Unchecked as _};
            (&&#private::Probe::<#ty>::new()).serialize(__machinery_value, __machinery_serializer)
        }

        fn #deserialize<'de, __MachineryD: #private::serde::Deserializer<'de>>(
            __machinery_deserializer: __MachineryD,
        ) -> ::core::result::Result<#ty, __MachineryD::Error> {
            #[allow(unused_imports)]
            use #private::{Checked as _, Unchecked as _};
            (&&#private::Probe::<#ty>::new()).deserialize(__machinery_deserializer)
        }
    };
    (field, helpers)
}

/// The handler, the compile-time checks and the registration, beside the function.
fn hidden(task: &Task) -> TokenStream {
    let Task {
        cfgs, ident, root, ..
    } = task;
    let private = quote!(#root::__private);
    let handler = handler(task, &private);
    let checks = checks(task, &private);
    quote! {
        #(#cfgs)*
        const _: () = {
            #handler
            #checks
            #private::inventory::submit! {
                #private::Registration(&#ident::TASK)
            }
        };
    }
}

fn handler(task: &Task, private: &TokenStream) -> TokenStream {
    let ident = &task.ident;
    let types: Vec<&Type> = task.params.iter().map(|p| &p.ty).collect();
    let reads = task.params.iter().map(|Param { ty, kind, .. }| match kind {
        ParamKind::Rest(elem) => {
            quote!((&&#private::Probe::<#elem>::new()).rest(&mut __machinery_reader)?)
        }
        ParamKind::Plain | ParamKind::String => {
            quote!((&&#private::Probe::<#ty>::new()).next(&mut __machinery_reader)?)
        }
    });
    let arity = task.params.len();
    let last_is_vec = matches!(
        task.params.last(),
        Some(Param {
            kind: ParamKind::Rest(_),
            ..
        })
    );
    let values: Vec<Ident> = (0..arity)
        .map(|i| format_ident!("__machinery_arg{}", i))
        .collect();
    let context = task.takes_context.then(|| quote!(&__machinery_ctx,));
    // Spanned on the function's name, so a future that is not `Send` is reported there.
    let call = quote_spanned! {task.ident.span()=>
        #private::send_future(#ident(#context #(#values),*))
    };
    let encode = match &task.output.shape {
        Shape::Unit => quote! {{
            let _ = __machinery_output;
            ::core::result::Result::Ok(::std::vec::Vec::new())
        }},
        Shape::Single => quote! {
            (&&#private::Probe::of(&__machinery_output)).encode_output(&__machinery_output)
        },
        Shape::Tuple(n) => {
            let results = (0..*n).map(|i| {
                let i = Index::from(i);
                quote! {
                    (&&#private::Probe::of(&__machinery_output.#i))
                        .encode_result(&__machinery_output.#i)
                }
            });
            quote! {
                #private::encode_outputs(::std::vec![#(#results),*])
            }
        }
    };
    quote! {
        fn __machinery_decode(
            __machinery_args: &[#private::Arg],
        ) -> ::core::result::Result<(#(#types,)*), #private::ArgError> {
            #[allow(unused_imports)]
            use #private::{Checked as _, Unchecked as _};
            let mut __machinery_reader =
                #private::ArgReader::new(#ident::NAME, __machinery_args, #arity, #last_is_vec);
            let __machinery_values = (#(#reads,)*);
            __machinery_reader.finish()?;
            ::core::result::Result::Ok(__machinery_values)
        }

        impl #private::TaskHandler for #ident::Args {
            fn handle(
                __machinery_ctx: #private::TaskContext,
                __machinery_args: ::std::vec::Vec<#private::Arg>,
            ) -> #private::HandlerFuture {
                #[allow(unused_imports)]
                use #private::{Checked as _, CheckedError as _, Unchecked as _, UncheckedError as _};
                let (#(#values,)*) = match __machinery_decode(&__machinery_args) {
                    ::core::result::Result::Ok(__machinery_values) => __machinery_values,
                    ::core::result::Result::Err(__machinery_error) => {
                        return #private::handler_future(::core::future::ready(
                            ::core::result::Result::Err(#private::bad_arguments(__machinery_error)),
                        ));
                    }
                };
                #private::handler_future(async move {
                    match #call.await {
                        ::core::result::Result::Ok(__machinery_output) => #encode,
                        ::core::result::Result::Err(__machinery_error) => {
                            ::core::result::Result::Err(
                                (&&#private::Probe::of(&__machinery_error))
                                    .failure(&__machinery_error, &__machinery_ctx),
                            )
                        }
                    }
                })
            }
        }
    }
}

/// Never-called checks of the trait bounds the runtime needs, each spanned on the type it is about, so
/// rustc's error points there (and not into the handler).
fn checks(task: &Task, private: &TokenStream) -> TokenStream {
    let args = task.params.iter().map(|Param { ty, .. }| {
        quote_spanned! {ty.span()=> #private::assert_arg::<#ty>();}
    });
    let outputs: Vec<&Type> = match (&task.output.shape, &task.output.ty) {
        (Shape::Unit, _) => Vec::new(),
        (Shape::Tuple(_), Type::Tuple(tuple)) => tuple.elems.iter().collect(),
        (_, ty) => vec![ty],
    };
    let outputs = outputs.into_iter().map(|ty| {
        quote_spanned! {ty.span()=> #private::assert_output::<#ty>();}
    });
    let error = match (&task.error, &task.return_type) {
        (Some(ty), _) => quote_spanned! {ty.span()=> #private::assert_error::<#ty>();},
        // `io::Result<T>` and the like: the error type is found from the return type.
        (None, Some(ty)) => quote_spanned! {ty.span()=>
            #private::assert_result_error(::core::marker::PhantomData::<#ty>);
        },
        (None, None) => TokenStream::new(),
    };
    quote! {
        #[allow(dead_code)]
        fn __machinery_checks() {
            #(#args)*
            #(#outputs)*
            #error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(attr: TokenStream, item: TokenStream) -> String {
        task(attr, item).to_string()
    }

    #[test]
    fn the_function_is_emitted_untouched_first() {
        let item = quote! {
            /// Docs.
            #[inline]
            pub async fn add(a: i64, b: i64) -> Result<i64, TaskError> { let x = a + b; Ok(x) }
        };
        let out = expand(TokenStream::new(), item.clone());
        assert!(out.starts_with(&item.to_string()), "{out}");
    }

    #[test]
    fn runtime_items_are_reached_through_the_crate_option() {
        let item = quote!(
            async fn add(a: i64, s: String, v: Vec<i64>) -> Result<(i64, String), E> {
                todo!()
            }
        );
        let default = expand(TokenStream::new(), item.clone());
        assert!(default.contains(":: machinery :: __private ::"));
        let facade = expand(quote!(crate = "my::facade", variadic), item);
        assert!(!facade.contains("machinery ::"), "{facade}");
        assert!(facade.contains("my :: facade :: __private :: inventory :: submit !"));
        assert!(facade.contains("# [serde (crate = \"my :: facade :: __private :: serde\")]"));
    }

    #[test]
    fn std_items_are_named_by_absolute_paths() {
        let out = expand(
            TokenStream::new(),
            quote! {
                async fn add(
                    a: i64,
                    s: ::std::string::String,
                    v: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<(i64, ::std::string::String), E> { todo!() }
            },
        );
        // After the user's function (which uses no prelude name itself): no bare prelude name the
        // user could shadow.
        let generated = &out[out.find("mod add").unwrap()..];
        for bare in [
            " Ok (",
            " Err (",
            " Some (",
            " None",
            " Vec <",
            " Box <",
            " Option <",
            " Result <",
            " String >",
        ] {
            let leaks: Vec<_> = generated
                .match_indices(bare)
                .filter(|(i, _)| !generated[..*i].ends_with("::"))
                .collect();
            assert!(leaks.is_empty(), "{bare:?} in {generated}");
        }
    }

    #[test]
    fn errors_come_with_the_function_and_a_stub_module() {
        let item = quote!(
            fn add(a: i64, b: &str) -> i64 {
                a
            }
        );
        let out = expand(quote!(queue = 1), item.clone());
        assert!(out.starts_with(&item.to_string()));
        assert_eq!(out.matches("compile_error !").count(), 4, "{out}");
        assert!(out.contains("pub fn send <"));
        assert!(out.contains("pub fn signature <"));
        assert!(
            !out.contains("inventory"),
            "no registration of a broken task"
        );
    }

    #[test]
    fn not_a_function_keeps_the_item_and_says_what_is_expected() {
        let out = expand(
            TokenStream::new(),
            quote!(
                struct S;
            ),
        );
        assert!(out.starts_with("struct S ;"));
        assert!(out.contains("`#[task]` applies to an `async fn`"));
    }
}
