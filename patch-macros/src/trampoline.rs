//! Trampoline mode: `#[alternative(...)]` on a function or method of any signature.
//!
//! ```text
//! fn sum(xs: &[u32]) -> u64          #[inline(always)]: calls the trampoline
//! extern "C" fn __altpatch_tramp_sum  #[unsafe(naked)]: `jmp __altpatch_default_sum`, the site
//! extern "C" fn __altpatch_default_sum        the body; also emits the record (see below)
//! extern "C" fn __altpatch_candidate_sum_1    calls candidate 1 (inlined into it when it can be)
//! ```
//!
//! Every piece uses the `extern "C"` ABI with the same Rust types, so the trampoline's `jmp` hands
//! over arguments and return slot untouched, whatever they are. The trampoline is naked (stable,
//! unlike a naked Rust-ABI function) and never inlined, so it is one site. Its record and the
//! descriptor are emitted from an instruction-less `asm!` in the default's body: a naked function
//! may hold nothing but its instructions, and an impl block cannot hold a `static`.

use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Error, FnArg, Ident, ItemFn, ReturnType, Type};

use crate::{Args, Target, asm, descriptor, shim_attributes};

pub fn expand(args: &Args, func: &ItemFn, names: &[String]) -> syn::Result<TokenStream2> {
    let sig = &func.sig;
    let fn_name = &sig.ident;
    for c in &args.candidates {
        if !matches!(c.target, Target::Call(_)) {
            return Err(Error::new(
                c.span,
                "only `predicate => path::to::function` candidates work in trampoline mode; \
                 `asm(...)` and `nop` candidates need `#[alternative(inline, ...)]`",
            ));
        }
    }

    // Arguments keep their types but get plain names in the generated functions.
    let mut receiver = None;
    let mut typed: Vec<(Ident, Type)> = Vec::new();
    for (i, input) in sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(r) => receiver = Some(r.clone()),
            FnArg::Typed(pt) => typed.push((format_ident!("__arg{}", i), (*pt.ty).clone())),
        }
    }
    let mentions_self = receiver.is_some() || quote!(#sig).to_string().contains("Self");
    // Methods (and functions whose signature names `Self`) get their helpers as sibling items
    // reached through `Self::`; everything else nests them inside the wrapper.
    let prefix = if mentions_self {
        quote!(Self::)
    } else {
        quote!()
    };
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
    let default_fn = format_ident!("__altpatch_default_{}", fn_name);
    let tramp_fn = format_ident!("__altpatch_tramp_{}", fn_name);
    let block = &func.block;
    let inputs = &sig.inputs;

    let mut shims = Vec::new();
    let mut syms = vec![quote!(d0 = sym #prefix #default_fn)];
    for (i, c) in args.candidates.iter().enumerate() {
        let Target::Call(path) = &c.target else {
            unreachable!("checked above")
        };
        let shim = format_ident!("__altpatch_candidate_{}_{}", fn_name, i + 1);
        let call = if unsafety.is_some() {
            quote_spanned!(path.span()=> unsafe { #path(#arg_exprs) })
        } else {
            quote_spanned!(path.span()=> #path(#arg_exprs))
        };
        let features = shim_attributes(&c.predicate);
        shims.push(quote! {
            #[doc(hidden)]
            #[allow(improper_ctypes_definitions, non_snake_case)]
            #features
            #unsafety extern "C" fn #shim(#plain_inputs) #output {
                // A candidate whose signature differs is a type error here.
                #call
            }
        });
        let operand = format_ident!("d{}", i + 1);
        syms.push(quote!(#operand = sym #prefix #shim));
    }
    let record = asm::trampoline_record(names.len());
    let body_template = asm::TRAMPOLINE_BODY;
    let kind = asm::KIND_TRAMPOLINE;
    let desc = descriptor(args, fn_name, names);
    let helpers = quote! {
        #[doc(hidden)]
        #[allow(improper_ctypes_definitions, non_snake_case)]
        #unsafety extern "C" fn #default_fn(#inputs) #output {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                static __ALTPATCH_SITE: ::altpatch::__private::SiteDescriptor = #desc;
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
            #block
        }
        #(#shims)*
        #[doc(hidden)]
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        #[allow(improper_ctypes_definitions, non_snake_case)]
        #[unsafe(naked)]
        #unsafety extern "C" fn #tramp_fn(#plain_inputs) #output {
            ::core::arch::naked_asm!(#body_template, d0 = sym #prefix #default_fn)
        }
    };
    let call = quote!(#prefix #tramp_fn(#wrapper_args));
    let fallback = quote!(#prefix #default_fn(#wrapper_args));
    let unsafe_call = unsafety.map(|_| quote!(unsafe));
    let wrapper_body = quote! {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        { #unsafe_call { #call } }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        { #unsafe_call { #fallback } }
    };
    let attrs = &func.attrs;
    let vis = &func.vis;
    let wrapper_sig = quote!(#vis #unsafety fn #fn_name(#inputs) #output);
    Ok(if mentions_self {
        quote! {
            #helpers
            #(#attrs)*
            #[inline(always)]
            #wrapper_sig { #wrapper_body }
        }
    } else {
        quote! {
            #(#attrs)*
            #[inline(always)]
            #wrapper_sig {
                #helpers
                #wrapper_body
            }
        }
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
