//! `alternative_asm!`: multi-way inline assembly in the style of the kernel's `ALTERNATIVE_2/_3`.
//!
//! ```text
//! alternative_asm!(
//!     name = "mul3",                               // optional; default `module::alternative_L<line>`
//!     crate = altpatch,                            // optional: the facade's path
//!     "imul {r}, {x}, 3",                          // the default: strings, as `asm!` takes them
//!     bmi2 => "lea {r}, [{x} + {x}*2]",            // candidates, in preference order
//!     x = in(reg) x, r = lateout(reg) r,           // `asm!` operands and options, passed through
//! )
//! ```
//!
//! All candidates are assembled in the same `asm!` block, so they share its operands and register
//! allocation; the site is padded at build time to the longest one.

use proc_macro2::TokenStream as TokenStream2;
use quote::quote;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Error, Ident, LitStr, Path, Token, bracketed};

use crate::{PredicateArg, asm, parse_option};

pub struct InlineSeq {
    name: Option<LitStr>,
    krate: Option<Path>,
    default: Vec<LitStr>,
    candidates: Vec<(String, PredicateArg, Vec<LitStr>)>,
    operands: TokenStream2,
}

/// One instruction string, several as `asm!` takes them (`"a", "b"`), or a list `["a", "b"]`.
fn lines(input: ParseStream<'_>) -> syn::Result<Vec<LitStr>> {
    if input.peek(syn::token::Bracket) {
        let content;
        bracketed!(content in input);
        return Ok(Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?
            .into_iter()
            .collect());
    }
    let mut lines = vec![input.parse()?];
    while input.peek(Token![,]) && input.peek2(LitStr) {
        input.parse::<Token![,]>()?;
        lines.push(input.parse()?);
    }
    Ok(lines)
}

impl Parse for InlineSeq {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let (mut name, mut krate) = (None, None);
        while parse_option(input, &mut name, &mut krate)? {}
        let default = lines(input)?;
        let mut candidates = Vec::new();
        while input.peek(Token![,]) {
            // A candidate is `[name:] predicate => "asm"`; anything else starts the operands.
            let fork = input.fork();
            fork.parse::<Token![,]>()?;
            let explicit = if fork.peek(Ident) && fork.peek2(Token![:]) && !fork.peek2(Token![::]) {
                let n: Ident = fork.parse()?;
                fork.parse::<Token![:]>()?;
                Some(n.to_string())
            } else {
                None
            };
            let Ok(predicate) = fork.parse::<PredicateArg>() else {
                break;
            };
            if !fork.peek(Token![=>]) {
                break;
            }
            fork.parse::<Token![=>]>()?;
            let body = lines(&fork)?;
            let name = match (explicit, &predicate) {
                (Some(n), _) => n,
                (None, PredicateArg::Feature(f)) => f.to_string(),
                (None, PredicateArg::Hypervisor(k)) => k.value(),
                (None, _) => {
                    return Err(Error::new(
                        input.span(),
                        "name this candidate: write `name: predicate => \"asm\"`",
                    ));
                }
            };
            candidates.push((name, predicate, body));
            use syn::parse::discouraged::Speculative;
            input.advance_to(&fork);
        }
        if input.peek(Token![,]) {
            input.parse::<Token![,]>()?;
        }
        Ok(InlineSeq {
            name,
            krate,
            default,
            candidates,
            operands: input.parse()?,
        })
    }
}

pub fn expand(seq: InlineSeq) -> syn::Result<TokenStream2> {
    let mut names = vec!["default".to_string()];
    for (name, _, _) in &seq.candidates {
        if names.contains(name) {
            return Err(Error::new(
                proc_macro2::Span::call_site(),
                format!("two candidates are named `{name}`"),
            ));
        }
        names.push(name.clone());
    }
    let mut blocks = vec![asm::Block::Asm(
        seq.default.iter().map(LitStr::value).collect(),
    )];
    blocks.extend(
        seq.candidates
            .iter()
            .map(|(_, _, body)| asm::Block::Asm(body.iter().map(LitStr::value).collect())),
    );
    let template = asm::padded_site(&blocks);
    let p = match &seq.krate {
        Some(path) => quote!(#path::__private),
        None => quote!(::altpatch::__private),
    };
    let predicates = std::iter::once(quote!(#p::Predicate::Always))
        .chain(seq.candidates.iter().map(|(_, pr, _)| pr.to_tokens(&p)));
    let texts = std::iter::once("always".to_string())
        .chain(seq.candidates.iter().map(|(_, pr, _)| pr.text()));
    let site_name = match &seq.name {
        Some(name) => quote!(#name),
        None => quote!(::core::concat!(
            ::core::module_path!(),
            "::alternative_L",
            ::core::line!()
        )),
    };
    let kind = asm::KIND_INLINE;
    let operands = &seq.operands;
    let default_only = seq.default.iter();
    Ok(quote! {{
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            static __ALTPATCH_SITE: #p::SiteDescriptor = #p::SiteDescriptor {
                name: #site_name,
                file: ::core::file!(),
                line: ::core::line!(),
                candidates: &[#(#p::Candidate { name: #names, predicate_text: #texts, predicate: #predicates }),*],
                key: ::core::option::Option::None,
            };
            ::core::arch::asm!(#template, desc = sym __ALTPATCH_SITE, kind = const #kind, #operands)
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            ::core::arch::asm!(#(#default_only),*, #operands)
        }
    }})
}
