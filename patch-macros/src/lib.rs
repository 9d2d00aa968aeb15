//! Procedural macros of `altpatch`. Use them through the `altpatch` crate, which documents them;
//! this crate only parses and generates, reaching runtime items through `altpatch::__private`
//! (or `<path>::__private` with `crate = path`).

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Attribute, Error, Ident, ItemFn, LitStr, Path, Token, parenthesized};

mod asm;
mod call_site;
mod inline_seq;
mod methods;
mod regs;
mod trampoline;

/// See `altpatch::alternative`.
#[proc_macro_attribute]
pub fn alternative(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(args as Args);
    let func = syn::parse_macro_input!(item as ItemFn);
    let self_candidate = args.candidates.iter().any(|c| {
        matches!(&c.target, Target::Call(path) if path.segments.first().is_some_and(|s| s.ident == "Self"))
    });
    if mentions_self(&func.sig) || self_candidate {
        // One error, and the function as written so that nothing else fails around it.
        let error = Error::new(func.sig.ident.span(), METHOD_NEEDS_IMPL).into_compile_error();
        return quote!(#error #func).into();
    }
    match expand(&args, &func, None) {
        Ok(Expanded {
            head,
            helpers,
            body,
        }) => quote!(#head { #helpers #body }).into(),
        Err(e) => e.into_compile_error().into(),
    }
}

/// See `altpatch::alternative_impl`.
#[proc_macro_attribute]
pub fn alternative_impl(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(args as methods::ImplArgs);
    let item = syn::parse_macro_input!(item as syn::ItemImpl);
    methods::expand_impl(args, item)
        .unwrap_or_else(Error::into_compile_error)
        .into()
}

/// See `altpatch::alternative_asm!`.
#[proc_macro]
pub fn alternative_asm(input: TokenStream) -> TokenStream {
    let seq = syn::parse_macro_input!(input as inline_seq::InlineSeq);
    inline_seq::expand(seq)
        .unwrap_or_else(Error::into_compile_error)
        .into()
}

/// `inline, name = "..", crate = path, name: predicate => target, ...`
#[derive(Default)]
struct Args {
    inline: Option<Span>,
    /// `name = "..."`: the site's name in reports and `ALTPATCH`, instead of `module::function`.
    name: Option<LitStr>,
    /// `crate = path`: where the `altpatch` facade is, when it is not `::altpatch`.
    krate: Option<Path>,
    candidates: Vec<CandidateArg>,
}

struct CandidateArg {
    name: String,
    span: Span,
    predicate: PredicateArg,
    target: Target,
}

enum PredicateArg {
    Feature(Ident),
    AnyHypervisor,
    KvmHintsRealtime,
    Hypervisor(LitStr),
    When(Path),
    Not(Box<PredicateArg>),
    All(Vec<PredicateArg>),
    Any(Vec<PredicateArg>),
}

enum Target {
    /// A function with the same signature, reached by a direct `call`.
    Call(Path),
    /// Instructions to run inline at every call site.
    Asm(Vec<LitStr>),
    /// Nothing: the site becomes NOPs.
    Nop,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Args::default();
        while !input.is_empty() {
            if parse_option(input, &mut args.name, &mut args.krate)? {
                continue;
            }
            if input.peek(Ident) && input.peek2(Token![,])
                || input.peek(Ident) && input.peek2(syn::parse::End)
            {
                let fork = input.fork();
                let word: Ident = fork.parse()?;
                if word == "inline" {
                    input.parse::<Ident>()?;
                    args.inline = Some(word.span());
                    if !input.is_empty() {
                        input.parse::<Token![,]>()?;
                    }
                    continue;
                }
            }
            args.candidates.push(input.parse()?);
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(args)
    }
}

/// `name = "..."` or `crate = path` (and the comma after it), if the input starts with one;
/// returns whether it did.
fn parse_option(
    input: ParseStream<'_>,
    name: &mut Option<LitStr>,
    krate: &mut Option<Path>,
) -> syn::Result<bool> {
    if input.peek(Token![crate]) && input.peek2(Token![=]) {
        input.parse::<Token![crate]>()?;
        input.parse::<Token![=]>()?;
        *krate = Some(Path::parse_mod_style(input)?);
    } else {
        let fork = input.fork();
        if !(fork.parse::<Ident>().is_ok_and(|i| i == "name")
            && fork.peek(Token![=])
            && !fork.peek(Token![=>]))
        {
            return Ok(false);
        }
        input.parse::<Ident>()?;
        input.parse::<Token![=]>()?;
        *name = Some(input.parse::<LitStr>()?);
    }
    if !input.is_empty() {
        input.parse::<Token![,]>()?;
    }
    Ok(true)
}

impl Parse for CandidateArg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let span = input.span();
        let explicit = if input.peek(Ident) && input.peek2(Token![:]) && !input.peek2(Token![::]) {
            let name: Ident = input.parse()?;
            input.parse::<Token![:]>()?;
            Some(name.to_string())
        } else {
            None
        };
        let predicate: PredicateArg = input.parse()?;
        input.parse::<Token![=>]>()?;
        let target: Target = input.parse()?;
        let name = match (explicit, &predicate, &target) {
            (Some(name), _, _) => name,
            (None, PredicateArg::Feature(f), _) => f.to_string(),
            (None, PredicateArg::Hypervisor(kind), _) => kind.value(),
            (None, _, Target::Call(path)) => path
                .segments
                .last()
                .map(|s| s.ident.to_string())
                .unwrap_or_default(),
            (None, _, _) => {
                return Err(Error::new(
                    span,
                    "name this candidate: write `name: predicate => target`, e.g. `fast: all(avx2, bmi2) => asm(\"...\")`",
                ));
            }
        };
        Ok(CandidateArg {
            name,
            span,
            predicate,
            target,
        })
    }
}

impl Parse for PredicateArg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let word: Ident = input.parse()?;
        let list = |input: ParseStream<'_>| -> syn::Result<Vec<PredicateArg>> {
            let content;
            parenthesized!(content in input);
            Ok(
                Punctuated::<PredicateArg, Token![,]>::parse_terminated(&content)?
                    .into_iter()
                    .collect(),
            )
        };
        match word.to_string().as_str() {
            "all" if input.peek(syn::token::Paren) => Ok(PredicateArg::All(list(input)?)),
            "any" if input.peek(syn::token::Paren) => Ok(PredicateArg::Any(list(input)?)),
            "not" if input.peek(syn::token::Paren) => {
                let mut inner = list(input)?;
                if inner.len() != 1 {
                    return Err(Error::new(
                        word.span(),
                        "`not(...)` takes exactly one predicate",
                    ));
                }
                Ok(PredicateArg::Not(Box::new(inner.remove(0))))
            }
            // `peek(Token![=])` also matches the first character of `=>`.
            "hypervisor" if input.peek(Token![=]) && !input.peek(Token![=>]) => {
                input.parse::<Token![=]>()?;
                Ok(PredicateArg::Hypervisor(input.parse()?))
            }
            "hypervisor" => Ok(PredicateArg::AnyHypervisor),
            "kvm_hints_realtime" => Ok(PredicateArg::KvmHintsRealtime),
            "when" => {
                input.parse::<Token![=]>()?;
                Ok(PredicateArg::When(input.parse()?))
            }
            _ => Ok(PredicateArg::Feature(word)),
        }
    }
}

impl Parse for Target {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(Ident) && input.peek2(syn::token::Paren) {
            let fork = input.fork();
            if fork.parse::<Ident>()? == "asm" {
                input.parse::<Ident>()?;
                let content;
                parenthesized!(content in input);
                let lines = Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?;
                return Ok(Target::Asm(lines.into_iter().collect()));
            }
        }
        if input.peek(Ident) && (input.peek2(Token![,]) || input.peek2(syn::parse::End)) {
            let fork = input.fork();
            if fork.parse::<Ident>()? == "nop" {
                input.parse::<Ident>()?;
                return Ok(Target::Nop);
            }
        }
        Ok(Target::Call(input.parse()?))
    }
}

impl PredicateArg {
    /// The predicate as written, normalized (`all(avx2, bmi2)`), matching `Predicate`'s Display.
    fn text(&self) -> String {
        let list = |name: &str, items: &[PredicateArg]| {
            let inner: Vec<String> = items.iter().map(PredicateArg::text).collect();
            format!("{name}({})", inner.join(", "))
        };
        match self {
            PredicateArg::Feature(ident) => ident.to_string(),
            PredicateArg::AnyHypervisor => "hypervisor".into(),
            PredicateArg::KvmHintsRealtime => "kvm_hints_realtime".into(),
            PredicateArg::Hypervisor(kind) => format!("hypervisor = \"{}\"", kind.value()),
            PredicateArg::When(path) => {
                format!("when = {}", quote!(#path).to_string().replace(' ', ""))
            }
            PredicateArg::Not(inner) => format!("not({})", inner.text()),
            PredicateArg::All(items) => list("all", items),
            PredicateArg::Any(items) => list("any", items),
        }
    }

    /// The `Predicate` value, with `private` the path of `altpatch::__private`.
    fn to_tokens(&self, private: &TokenStream2) -> TokenStream2 {
        let p = quote!(#private::Predicate);
        match self {
            PredicateArg::Feature(ident) => {
                let name = ident.to_string();
                let message = format!(
                    "altpatch: unknown CPU feature `{name}`; the names are those of altpatch::Feature, e.g. avx2, sse4_2, popcnt, bmi2"
                );
                quote_spanned! {ident.span()=>
                    #p::Feature(match #private::Feature::from_name_const(#name) {
                        ::core::option::Option::Some(f) => f,
                        ::core::option::Option::None => ::core::panic!(#message),
                    })
                }
            }
            PredicateArg::AnyHypervisor => quote!(#p::AnyHypervisor),
            PredicateArg::KvmHintsRealtime => quote!(#p::KvmHintsRealtime),
            PredicateArg::Hypervisor(kind) => {
                let message = format!(
                    "altpatch: unknown hypervisor `{}`; expected kvm, xen, vmware, hyperv, bhyve, qemu, acrn or other",
                    kind.value()
                );
                quote_spanned! {kind.span()=>
                    #p::Hypervisor(match #private::HypervisorKind::from_name_const(#kind) {
                        ::core::option::Option::Some(k) => k,
                        ::core::option::Option::None => ::core::panic!(#message),
                    })
                }
            }
            PredicateArg::When(path) => {
                let name = quote!(#path).to_string().replace(' ', "");
                quote!(#p::When(#name, #path))
            }
            PredicateArg::Not(inner) => {
                let inner = inner.to_tokens(private);
                quote!(#p::Not(&#inner))
            }
            PredicateArg::All(list) | PredicateArg::Any(list) => {
                let items = list.iter().map(|p| p.to_tokens(private));
                let variant = if matches!(self, PredicateArg::All(_)) {
                    quote!(All)
                } else {
                    quote!(Any)
                };
                quote!(#p::#variant(&[#(#items),*]))
            }
        }
    }
}

/// The type (and trait) of the impl block a method is in, given by `#[alternative_impl]`.
struct Owner {
    type_name: String,
    trait_name: Option<String>,
}

/// A function made patchable: the wrapper that replaces it, and the items it calls.
struct Expanded {
    /// The wrapper's attributes and signature.
    head: TokenStream2,
    /// Generated items: nested in the wrapper for a free function, an inherent impl for methods.
    helpers: TokenStream2,
    /// The wrapper's body.
    body: TokenStream2,
}

/// What every mode needs to know about the function being expanded.
struct Ctx<'a> {
    args: &'a Args,
    func: &'a ItemFn,
    owner: Option<&'a Owner>,
    names: Vec<String>,
    /// `path::to::altpatch::__private`.
    p: TokenStream2,
    /// `Self::` when the helpers are siblings in an impl, else nothing.
    prefix: TokenStream2,
    /// The user's `#[target_feature]` attributes: the default's code needs them too.
    features: Vec<&'a Attribute>,
    /// The wrapper's inline attribute: the user's, else `#[inline]` with `#[target_feature]`
    /// (rustc refuses `#[inline(always)]` there), else `#[inline(always)]`.
    wrapper_inline: TokenStream2,
}

const METHOD_NEEDS_IMPL: &str = "#[alternative] on a method (or with a `Self::` candidate) needs #[altpatch::alternative_impl] on its impl block: \
     it names the site after its type (`module::Type::method`) and puts the generated functions \
     in an impl of their own (which also makes trait-impl methods work)";

impl<'a> Ctx<'a> {
    fn new(args: &'a Args, func: &'a ItemFn, owner: Option<&'a Owner>) -> syn::Result<Self> {
        let sig = &func.sig;
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            return Err(Error::new(
                sig.generics.span(),
                "#[alternative] cannot patch a generic function: each instantiation would need its own site; \
                 write a non-generic wrapper and put #[alternative] on it",
            ));
        }
        if let Some(c) = &sig.constness {
            return Err(Error::new(
                c.span(),
                "#[alternative] cannot patch a `const fn`: its site is chosen at run time; \
                 keep the `const fn` and patch a non-const function that calls it",
            ));
        }
        if let Some(a) = &sig.asyncness {
            return Err(Error::new(
                a.span(),
                "#[alternative] cannot patch an `async fn`; patch the synchronous function it awaits",
            ));
        }
        let mut names = vec!["default".to_string()];
        for c in &args.candidates {
            if names.contains(&c.name) {
                return Err(Error::new(
                    c.span,
                    format!(
                        "two candidates are named `{}`; name one with `other_name: predicate => target`",
                        c.name
                    ),
                ));
            }
            names.push(c.name.clone());
        }
        let inline: Vec<&Attribute> = func
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("inline"))
            .collect();
        if let [_, second, ..] = inline[..] {
            return Err(Error::new(
                second.span(),
                "several #[inline] attributes: keep one (#[alternative] uses it for the function it generates)",
            ));
        }
        let features: Vec<&Attribute> = func
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("target_feature"))
            .collect();
        let wrapper_inline = match (inline.first(), features.is_empty()) {
            (Some(attr), _) => quote!(#attr),
            (None, false) => quote!(#[inline]),
            (None, true) => quote!(#[inline(always)]),
        };
        let krate = match &args.krate {
            Some(path) => quote!(#path),
            None => quote!(::altpatch),
        };
        Ok(Ctx {
            args,
            func,
            owner,
            names,
            p: quote!(#krate::__private),
            prefix: if owner.is_some() {
                quote!(Self::)
            } else {
                quote!()
            },
            features,
            wrapper_inline,
        })
    }

    /// The name of a generated item: `__altpatch_{role}_{fn}` (with the trait in a trait impl).
    fn helper(&self, role: &str) -> Ident {
        let f = &self.func.sig.ident;
        match self.owner.and_then(|o| o.trait_name.as_ref()) {
            Some(t) => format_ident!("__altpatch_{}_{}_{}", role, t, f),
            None => format_ident!("__altpatch_{}_{}", role, f),
        }
    }

    /// The wrapper's attributes (the user's, with one inline attribute) and signature.
    fn head(&self) -> TokenStream2 {
        let attrs = self
            .func
            .attrs
            .iter()
            .filter(|a| !a.path().is_ident("inline"));
        let inline = &self.wrapper_inline;
        let vis = &self.func.vis;
        // The wrapper only passes its arguments on: a `mut` binding belongs to the body.
        let mut sig = self.func.sig.clone();
        for input in &mut sig.inputs {
            match input {
                syn::FnArg::Receiver(r) if r.reference.is_none() => r.mutability = None,
                syn::FnArg::Typed(pt) => {
                    if let syn::Pat::Ident(pi) = &mut *pt.pat {
                        pi.mutability = None;
                    }
                }
                syn::FnArg::Receiver(_) => {}
            }
        }
        quote!(#(#attrs)* #inline #vis #sig)
    }

    /// The function holding the user's body, called by the default's shim.
    fn body_fn(&self, name: &Ident) -> TokenStream2 {
        let sig = &self.func.sig;
        let (unsafety, inputs, output) = (&sig.unsafety, &sig.inputs, &sig.output);
        let block = &self.func.block;
        let features = &self.features;
        let inline = if features.is_empty() {
            quote!(#[inline(always)])
        } else {
            quote!(#[inline])
        };
        quote! {
            #[doc(hidden)]
            #[allow(non_snake_case)]
            #inline
            #(#features)*
            #unsafety fn #name(#inputs) #output #block
        }
    }

    fn feature_attrs(&self) -> TokenStream2 {
        let features = &self.features;
        quote!(#(#features)*)
    }

    /// `unsafe` when the function is.
    fn unsafe_call(&self, call: TokenStream2) -> TokenStream2 {
        if self.func.sig.unsafety.is_some() {
            quote!(unsafe { #call })
        } else {
            call
        }
    }

    /// The `SiteDescriptor` initializer of the site.
    fn descriptor(&self) -> TokenStream2 {
        let p = &self.p;
        let args = self.args;
        let fn_name = &self.func.sig.ident;
        let names = &self.names;
        let predicates = std::iter::once(quote!(#p::Predicate::Always))
            .chain(args.candidates.iter().map(|c| c.predicate.to_tokens(p)));
        let texts = std::iter::once("always".to_string())
            .chain(args.candidates.iter().map(|c| c.predicate.text()));
        let site_name = match (&args.name, self.owner) {
            (Some(name), _) => quote!(#name),
            (None, Some(owner)) => {
                let ty = &owner.type_name;
                quote!(::core::concat!(
                    ::core::module_path!(),
                    "::",
                    #ty,
                    "::",
                    ::core::stringify!(#fn_name)
                ))
            }
            (None, None) => quote!(::core::concat!(
                ::core::module_path!(),
                "::",
                ::core::stringify!(#fn_name)
            )),
        };
        quote! {
            #p::SiteDescriptor {
                name: #site_name,
                file: ::core::file!(),
                line: ::core::line!(),
                candidates: &[#(#p::Candidate { name: #names, predicate_text: #texts, predicate: #predicates }),*],
                key: ::core::option::Option::None,
            }
        }
    }
}

fn expand(args: &Args, func: &ItemFn, owner: Option<&Owner>) -> syn::Result<Expanded> {
    let ctx = Ctx::new(args, func, owner)?;
    if args.inline.is_some() {
        call_site::expand(&ctx)
    } else {
        trampoline::expand(&ctx)
    }
}

/// Whether the signature has a receiver or names `Self`: then the generated functions must be
/// items of the impl, which only `#[alternative_impl]` can place.
fn mentions_self(sig: &syn::Signature) -> bool {
    fn walk(tokens: TokenStream2) -> bool {
        tokens.into_iter().any(|t| match t {
            proc_macro2::TokenTree::Ident(i) => i == "Self" || i == "self",
            proc_macro2::TokenTree::Group(g) => walk(g.stream()),
            _ => false,
        })
    }
    walk(quote!(#sig))
}

/// `#[target_feature]` for a candidate's shim: the features its predicate guarantees, so a
/// `#[target_feature]` candidate can be called (and inlined) from it.
fn shim_attributes(predicate: &PredicateArg) -> TokenStream2 {
    fn collect(p: &PredicateArg, out: &mut Vec<&'static str>) {
        match p {
            PredicateArg::Feature(f) => out.extend(rustc_target_feature(&f.to_string())),
            PredicateArg::All(list) => list.iter().for_each(|p| collect(p, out)),
            _ => {}
        }
    }
    let mut features = Vec::new();
    collect(predicate, &mut features);
    if features.is_empty() {
        quote!()
    } else {
        let list = features.join(",");
        quote!(#[target_feature(enable = #list)])
    }
}

/// rustc's name for an altpatch feature, where rustc has one.
fn rustc_target_feature(name: &str) -> Option<&'static str> {
    Some(match name {
        "sse3" => "sse3",
        "ssse3" => "ssse3",
        "sse4_1" => "sse4.1",
        "sse4_2" => "sse4.2",
        "popcnt" => "popcnt",
        "lzcnt" | "abm" => "lzcnt",
        "bmi1" => "bmi1",
        "bmi2" => "bmi2",
        "avx" => "avx",
        "avx2" => "avx2",
        "fma" => "fma",
        "f16c" => "f16c",
        "avx512f" => "avx512f",
        "avx512dq" => "avx512dq",
        "avx512cd" => "avx512cd",
        "avx512bw" => "avx512bw",
        "avx512vl" => "avx512vl",
        "movbe" => "movbe",
        "sha" | "sha_ni" => "sha",
        "aes" => "aes",
        "pclmulqdq" => "pclmulqdq",
        "rdrand" => "rdrand",
        "rdseed" => "rdseed",
        "adx" => "adx",
        "xsave" => "xsave",
        "cmpxchg16b" | "cx16" => "cmpxchg16b",
        _ => return None,
    })
}
