//! Trampoline mode: `#[alternative(...)]` on a function or method of any signature.
//!
//! ```text
//! fn sum(xs: &[u32]) -> u64          the wrapper, #[inline(always)]: calls the trampoline
//! fn __altpatch_tramp_sum            #[unsafe(naked)]: `jmp __altpatch_default_sum`, the site
//! fn __altpatch_default_sum          the default; also emits the record (see below)
//! fn __altpatch_candidate1_sum       calls candidate 1 (inlined into it when it can be)
//! ```
//!
//! The wrapper calls the trampoline from an `asm!` block with a `sym` operand, so that a caller
//! in another crate makes a `call rel32` too (a Rust call to another crate's function goes
//! through the GOT in a PIE build); the default and the shims take raw registers
//! (`extern "sysv64"`, see `regs.rs`), values of other types through memory. Only an
//! `impl Trait` or `!` result, which no `MaybeUninit` can name, or more arguments than registers
//! keeps a Rust call: then every
//! piece uses the `extern "C"` ABI with the same Rust types, so the trampoline's `jmp` hands over
//! arguments and return slot untouched.
//!
//! The trampoline is naked and never inlined, so it is one site. Its record and the descriptor
//! are emitted from an instruction-less `asm!` in the default's body: a naked function may hold
//! nothing but its instructions, and an impl block cannot hold a `static`.

use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Error, FnArg, Ident, ReturnType, Type};

use crate::regs::{Fit, RegSig};
use crate::{Ctx, Expanded, Target, asm, shim_attributes};

pub fn expand(ctx: &Ctx<'_>) -> syn::Result<Expanded> {
    for c in &ctx.args.candidates {
        if !matches!(c.target, Target::Call(_)) {
            return Err(Error::new(
                c.span,
                "only `predicate => path::to::function` candidates work in trampoline mode; \
                 `asm(...)` and `nop` candidates need `#[alternative(inline, ...)]`",
            ));
        }
    }
    match RegSig::of(&ctx.func.sig, Fit::AnyType) {
        Ok(regs) => Ok(registers(ctx, &regs)),
        Err(_) => any_signature(ctx),
    }
}

/// The trampoline's record and descriptor, as a statement of the default's body.
fn record(ctx: &Ctx<'_>, tramp_fn: &Ident, syms: &[TokenStream2]) -> TokenStream2 {
    let (p, prefix) = (&ctx.p, &ctx.prefix);
    let record = asm::trampoline_record(ctx.names.len());
    let kind = asm::KIND_TRAMPOLINE;
    let desc = ctx.descriptor();
    quote! {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            static __ALTPATCH_SITE: #p::SiteDescriptor = #desc;
            // SAFETY: emits the trampoline's record into other sections; no instructions here.
            unsafe {
                ::core::arch::asm!(
                    #record,
                    tramp = sym #prefix #tramp_fn,
                    #(#syms,)*
                    desc = sym __ALTPATCH_SITE,
                    kind = const #kind,
                    options(nomem, nostack, preserves_flags),
                );
            }
        }
    }
}

/// The naked trampoline: `jmp` to the default, padded.
fn trampoline(
    ctx: &Ctx<'_>,
    tramp_fn: &Ident,
    default_fn: &Ident,
    signature: TokenStream2,
) -> TokenStream2 {
    let prefix = &ctx.prefix;
    let unsafety = &ctx.func.sig.unsafety;
    let body = asm::TRAMPOLINE_BODY;
    quote! {
        #[doc(hidden)]
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        #[allow(improper_ctypes_definitions, non_snake_case)]
        #[unsafe(naked)]
        #unsafety extern "C" fn #tramp_fn #signature {
            ::core::arch::naked_asm!(#body, d0 = sym #prefix #default_fn)
        }
    }
}

/// Arguments and result in registers (or memory): the wrapper's `call` is an `asm!`
/// `call {tramp}`.
fn registers(ctx: &Ctx<'_>, regs: &RegSig) -> Expanded {
    let (prefix, unsafety) = (&ctx.prefix, ctx.func.sig.unsafety);
    let body_fn = ctx.helper("body");
    let default_fn = ctx.helper("default");
    let tramp_fn = ctx.helper("tramp");
    let mut shims = Vec::new();
    let mut syms = vec![quote!(d0 = sym #prefix #default_fn)];
    for (i, c) in ctx.args.candidates.iter().enumerate() {
        let Target::Call(path) = &c.target else {
            unreachable!("checked in expand")
        };
        let name = ctx.helper(&format!("candidate{}", i + 1));
        let features = shim_attributes(&c.predicate);
        shims.push(regs.shim(&name, &quote!(#path), features, unsafety, quote!()));
        let operand = format_ident!("d{}", i + 1);
        syms.push(quote!(#operand = sym #prefix #name));
    }
    let record = record(ctx, &tramp_fn, &syms);
    let default = regs.shim(
        &default_fn,
        &quote!(#prefix #body_fn),
        ctx.feature_attrs(),
        unsafety,
        record,
    );
    let body = ctx.body_fn(&body_fn);
    let tramp = trampoline(ctx, &tramp_fn, &default_fn, quote!(()));
    let call = regs.asm_call(
        &quote!("call {tramp}"),
        &[quote!(tramp = sym #prefix #tramp_fn)],
    );
    let args = regs.arg_names();
    let fallback = ctx.unsafe_call(quote!(#prefix #body_fn(#(#args),*)));
    Expanded {
        head: ctx.head(),
        helpers: quote!(#body #default #(#shims)* #tramp),
        body: quote! {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                #call
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            {
                #fallback
            }
        },
    }
}

/// An `impl Trait` or `!` result, more arguments than registers (or an argument pattern this
/// reports as an error): the wrapper
/// makes a Rust call to the trampoline, and every piece is an `extern "C"` function of the same
/// Rust types.
fn any_signature(ctx: &Ctx<'_>) -> syn::Result<Expanded> {
    let sig = &ctx.func.sig;
    // Arguments keep their types but get plain names in the generated functions.
    let mut receiver = None;
    let mut typed: Vec<(Ident, Type)> = Vec::new();
    for (i, input) in sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(r) => receiver = Some(r.clone()),
            FnArg::Typed(pt) => typed.push((format_ident!("__arg{}", i), (*pt.ty).clone())),
        }
    }
    let prefix = &ctx.prefix;
    let plain_inputs = {
        let recv = receiver.iter().map(|r| quote!(#r));
        let rest = typed.iter().map(|(n, t)| quote!(#n: #t));
        quote!(#(#recv,)* #(#rest),*)
    };
    let arg_exprs = {
        let recv = receiver.iter().map(|_| quote!(self));
        let rest = typed.iter().map(|(n, _)| quote!(#n));
        quote!(#(#recv,)* #(#rest),*)
    };
    let wrapper_args = {
        let recv = receiver.iter().map(|_| quote!(self));
        let rest = sig.inputs.iter().filter_map(|input| match input {
            FnArg::Typed(pt) => Some(pat_as_expr(&pt.pat)),
            FnArg::Receiver(_) => None,
        });
        let rest: Vec<TokenStream2> = rest.collect::<syn::Result<_>>()?;
        quote!(#(#recv,)* #(#rest),*)
    };
    let output = match &sig.output {
        ReturnType::Default => quote!(),
        out => quote!(#out),
    };
    let unsafety = &sig.unsafety;
    let default_fn = ctx.helper("default");
    let tramp_fn = ctx.helper("tramp");
    let inputs = &sig.inputs;

    let mut shims = Vec::new();
    let mut syms = vec![quote!(d0 = sym #prefix #default_fn)];
    for (i, c) in ctx.args.candidates.iter().enumerate() {
        let Target::Call(path) = &c.target else {
            unreachable!("checked in expand")
        };
        let shim = ctx.helper(&format!("candidate{}", i + 1));
        let call = if unsafety.is_some() {
            quote_spanned!(path.span()=> unsafe { #path(#arg_exprs) })
        } else {
            quote_spanned!(path.span()=> #path(#arg_exprs))
        };
        let features = shim_attributes(&c.predicate);
        shims.push(quote! {
            #[doc(hidden)]
            // `unused_unsafe`: an `unsafe fn`'s candidate may be a safe function.
            #[allow(improper_ctypes_definitions, non_snake_case, unused_unsafe)]
            #features
            #unsafety extern "C" fn #shim(#plain_inputs) #output {
                // A candidate whose signature differs is a type error here.
                #call
            }
        });
        let operand = format_ident!("d{}", i + 1);
        syms.push(quote!(#operand = sym #prefix #shim));
    }
    let record = record(ctx, &tramp_fn, &syms);
    let features = ctx.feature_attrs();
    // The body's statements follow the record's: a body that is one block expression (a struct
    // literal) spliced in as `{ S { .. } }` would draw rustc's "unnecessary braces" warning.
    let stmts = &ctx.func.block.stmts;
    let tramp = trampoline(ctx, &tramp_fn, &default_fn, quote!((#plain_inputs) #output));
    let helpers = quote! {
        #[doc(hidden)]
        #[allow(improper_ctypes_definitions, non_snake_case)]
        #features
        #unsafety extern "C" fn #default_fn(#inputs) #output {
            #record
            #(#stmts)*
        }
        #(#shims)*
        #tramp
    };
    let call = ctx.unsafe_call(quote!(#prefix #tramp_fn(#wrapper_args)));
    let fallback = ctx.unsafe_call(quote!(#prefix #default_fn(#wrapper_args)));
    Ok(Expanded {
        head: ctx.head(),
        helpers,
        body: quote! {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            { #call }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            { #fallback }
        },
    })
}

/// The argument as an expression to pass on: its identifier. Other patterns cannot be forwarded.
fn pat_as_expr(pat: &syn::Pat) -> syn::Result<TokenStream2> {
    match pat {
        syn::Pat::Ident(pi) if pi.subpat.is_none() => {
            let ident = &pi.ident;
            Ok(quote!(#ident))
        }
        other => Err(Error::new(
            other.span(),
            "#[alternative] needs plain identifiers as argument patterns (destructure inside the body)",
        )),
    }
}
