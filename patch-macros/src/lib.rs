//! Procedural macros of `altpatch`. Use them through the `altpatch` crate, which documents them;
//! this crate only parses and generates, reaching runtime items through `::altpatch::__private`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Error, FnArg, Ident, ItemFn, LitStr, Pat, Path, ReturnType, Token, Type, parenthesized};

mod asm;
mod inline_seq;
mod trampoline;

/// See `altpatch::alternative`.
#[proc_macro_attribute]
pub fn alternative(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(args as Args);
    let func = syn::parse_macro_input!(item as ItemFn);
    expand(args, func)
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

/// `inline, name: predicate => target, ...`
struct Args {
    inline: Option<Span>,
    /// `name = "..."`: the site's name in reports and `ALTPATCH`, instead of `module::function`.
    name: Option<LitStr>,
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
        let mut inline = None;
        let mut name = None;
        let mut candidates = Vec::new();
        while !input.is_empty() {
            if let Some(given) = parse_name_option(input)? {
                name = Some(given);
                continue;
            }
            if input.peek(Ident) && input.peek2(Token![,])
                || input.peek(Ident) && input.peek2(syn::parse::End)
            {
                let fork = input.fork();
                let word: Ident = fork.parse()?;
                if word == "inline" {
                    input.parse::<Ident>()?;
                    inline = Some(word.span());
                    if !input.is_empty() {
                        input.parse::<Token![,]>()?;
                    }
                    continue;
                }
            }
            candidates.push(input.parse()?);
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(Args {
            inline,
            name,
            candidates,
        })
    }
}

/// `name = "..."` (and the comma after it), if the input starts with it.
fn parse_name_option(input: ParseStream<'_>) -> syn::Result<Option<LitStr>> {
    let fork = input.fork();
    if !(fork.parse::<Ident>().is_ok_and(|i| i == "name")
        && fork.peek(Token![=])
        && !fork.peek(Token![=>]))
    {
        return Ok(None);
    }
    input.parse::<Ident>()?;
    input.parse::<Token![=]>()?;
    let name = input.parse::<LitStr>()?;
    if !input.is_empty() {
        input.parse::<Token![,]>()?;
    }
    Ok(Some(name))
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

    fn to_tokens(&self) -> TokenStream2 {
        let p = quote!(::altpatch::__private::Predicate);
        match self {
            PredicateArg::Feature(ident) => {
                let name = ident.to_string();
                let message = format!(
                    "altpatch: unknown CPU feature `{name}`; the names are those of altpatch::Feature, e.g. avx2, sse4_2, popcnt, bmi2"
                );
                quote_spanned! {ident.span()=>
                    #p::Feature(match ::altpatch::__private::Feature::from_name_const(#name) {
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
                    #p::Hypervisor(match ::altpatch::__private::HypervisorKind::from_name_const(#kind) {
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
                let inner = inner.to_tokens();
                quote!(#p::Not(&#inner))
            }
            PredicateArg::All(list) | PredicateArg::Any(list) => {
                let items = list.iter().map(PredicateArg::to_tokens);
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

/// How one argument or the return value travels in the C ABI.
#[derive(Clone, Copy, PartialEq)]
enum Class {
    /// Integers, `bool`, raw pointers: a general-purpose register, widened to 64 bits.
    Int,
    /// `f32`/`f64`: an SSE register.
    Float,
}

fn classify(ty: &Type) -> Option<Class> {
    match ty {
        Type::Ptr(_) => Some(Class::Int),
        Type::Path(p) if p.qself.is_none() => {
            let name = p.path.get_ident()?.to_string();
            match name.as_str() {
                "u8" | "u16" | "u32" | "u64" | "usize" | "i8" | "i16" | "i32" | "i64" | "isize"
                | "bool" => Some(Class::Int),
                "f32" | "f64" => Some(Class::Float),
                _ => None,
            }
        }
        Type::Paren(inner) => classify(&inner.elem),
        _ => None,
    }
}

/// How an argument of a call site travels.
enum ArgKind {
    /// One register of `class`.
    Scalar(Class),
    /// `&[T]` / `&mut [T]`: pointer and length in two registers.
    Slice { mutable: bool, elem: Type },
    /// `&T` / `&mut T`: a pointer.
    Ref { mutable: bool, elem: Type },
}

impl ArgKind {
    fn of(ty: &Type) -> Option<ArgKind> {
        if let Type::Reference(r) = ty {
            let mutable = r.mutability.is_some();
            return match &*r.elem {
                Type::Slice(slice) => Some(ArgKind::Slice {
                    mutable,
                    elem: (*slice.elem).clone(),
                }),
                // A reference to an unsized type is two words that one register cannot hold.
                Type::TraitObject(_) => None,
                Type::Path(p) if p.path.is_ident("str") => None,
                elem => Some(ArgKind::Ref {
                    mutable,
                    elem: elem.clone(),
                }),
            };
        }
        classify(ty).map(ArgKind::Scalar)
    }

    fn classes(&self) -> Vec<Class> {
        match self {
            ArgKind::Scalar(class) => vec![*class],
            ArgKind::Slice { .. } => vec![Class::Int, Class::Int],
            ArgKind::Ref { .. } => vec![Class::Int],
        }
    }
}

/// One argument of a call site.
struct Param {
    ident: Ident,
    ty: Type,
    kind: ArgKind,
    regs: Vec<&'static str>,
    index: usize,
}

impl Param {
    fn raw(&self, part: usize) -> Ident {
        format_ident!("__altpatch_arg{}_{}", self.index, part)
    }

    /// The shim's parameters for this argument.
    fn raw_params(&self) -> Vec<TokenStream2> {
        let (p0, p1) = (self.raw(0), self.raw(1));
        let ty = &self.ty;
        match &self.kind {
            ArgKind::Scalar(_) => vec![quote!(#p0: #ty)],
            ArgKind::Slice {
                mutable: false,
                elem,
            } => vec![quote!(#p0: *const #elem), quote!(#p1: usize)],
            ArgKind::Slice {
                mutable: true,
                elem,
            } => vec![quote!(#p0: *mut #elem), quote!(#p1: usize)],
            ArgKind::Ref {
                mutable: false,
                elem,
            } => vec![quote!(#p0: *const #elem)],
            ArgKind::Ref {
                mutable: true,
                elem,
            } => vec![quote!(#p0: *mut #elem)],
        }
    }

    /// The Rust value, rebuilt inside a shim from its raw parts.
    fn rebuild(&self) -> TokenStream2 {
        let (p0, p1) = (self.raw(0), self.raw(1));
        let safety = quote!(
            // SAFETY: the site passes exactly the parts of a live reference of the caller,
            // borrowed for the duration of the call.
        );
        match &self.kind {
            ArgKind::Scalar(_) => quote!(#p0),
            ArgKind::Slice { mutable: false, .. } => {
                quote!({ #safety unsafe { ::core::slice::from_raw_parts(#p0, #p1) } })
            }
            ArgKind::Slice { mutable: true, .. } => {
                quote!({ #safety unsafe { ::core::slice::from_raw_parts_mut(#p0, #p1) } })
            }
            ArgKind::Ref { mutable: false, .. } => quote!({ #safety unsafe { &*#p0 } }),
            ArgKind::Ref { mutable: true, .. } => quote!({ #safety unsafe { &mut *#p0 } }),
        }
    }

    /// The `asm!` inputs that put this argument in its registers.
    fn in_operands(&self) -> Vec<TokenStream2> {
        let ident = &self.ident;
        let r = &self.regs;
        match &self.kind {
            ArgKind::Scalar(Class::Int) => vec![quote!(in(#(#r)*) (#ident as u64))],
            ArgKind::Scalar(Class::Float) => vec![quote!(in(#(#r)*) #ident)],
            ArgKind::Slice { mutable: false, .. } => {
                let (a, b) = (r[0], r[1]);
                vec![quote!(in(#a) #ident.as_ptr()), quote!(in(#b) #ident.len())]
            }
            ArgKind::Slice { mutable: true, .. } => {
                let (a, b) = (r[0], r[1]);
                vec![
                    quote!(in(#b) #ident.len()),
                    quote!(in(#a) #ident.as_mut_ptr()),
                ]
            }
            ArgKind::Ref {
                mutable: false,
                elem,
            } => vec![quote!(in(#(#r)*) (#ident as *const #elem))],
            ArgKind::Ref {
                mutable: true,
                elem,
            } => vec![quote!(in(#(#r)*) (#ident as *mut #elem))],
        }
    }
}

const INT_REGS: [&str; 6] = ["rdi", "rsi", "rdx", "rcx", "r8", "r9"];
const FLOAT_REGS: [&str; 8] = [
    "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
];

const UNSUPPORTED_SIGNATURE: &str = "#[alternative(inline)] needs a signature that fits the C ABI in registers: up to six \
     integer, bool, raw-pointer or reference arguments (a slice counts two) and up to eight f32/f64, \
     returning an integer, bool, raw pointer, f32/f64 or (); remove `inline` to use a trampoline";

fn expand(args: Args, func: ItemFn) -> syn::Result<TokenStream2> {
    let sig = &func.sig;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(Error::new(
            sig.generics.span(),
            "#[alternative] cannot patch a generic function: each instantiation would need its own site; \
             write a non-generic wrapper and put #[alternative] on it",
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
    if args.inline.is_some() {
        expand_inline(&args, &func, &names)
    } else {
        trampoline::expand(&args, &func, &names)
    }
}

/// The `SiteDescriptor` initializer of a site.
fn descriptor(args: &Args, fn_name: &Ident, names: &[String]) -> TokenStream2 {
    let p = quote!(::altpatch::__private);
    let predicates = std::iter::once(quote!(#p::Predicate::Always))
        .chain(args.candidates.iter().map(|c| c.predicate.to_tokens()));
    let texts = std::iter::once("always".to_string())
        .chain(args.candidates.iter().map(|c| c.predicate.text()));
    let site_name = match &args.name {
        Some(name) => quote!(#name),
        None => quote!(::core::concat!(
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

/// Call-site mode: every inlined call is a site with the C ABI in registers.
fn expand_inline(args: &Args, func: &ItemFn, names: &[String]) -> syn::Result<TokenStream2> {
    let sig = &func.sig;
    // Arguments → registers, as raw parts the shims turn back into the Rust values.
    let (mut ints, mut floats) = (0, 0);
    let mut params: Vec<Param> = Vec::new();
    for (i, input) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(pt) = input else {
            return Err(Error::new(
                input.span(),
                "#[alternative(inline)] does not support methods; remove `inline` to use a trampoline",
            ));
        };
        let Pat::Ident(pi) = &*pt.pat else {
            return Err(Error::new(
                pt.pat.span(),
                "#[alternative(inline)] needs plain identifiers as argument patterns",
            ));
        };
        let kind =
            ArgKind::of(&pt.ty).ok_or_else(|| Error::new(pt.ty.span(), UNSUPPORTED_SIGNATURE))?;
        let mut regs = Vec::new();
        for class in kind.classes() {
            let reg = match class {
                Class::Int => INT_REGS.get(ints).inspect(|_| ints += 1),
                Class::Float => FLOAT_REGS.get(floats).inspect(|_| floats += 1),
            };
            regs.push(*reg.ok_or_else(|| Error::new(pt.span(), UNSUPPORTED_SIGNATURE))?);
        }
        params.push(Param {
            ident: pi.ident.clone(),
            ty: (*pt.ty).clone(),
            kind,
            regs,
            index: i,
        });
    }
    let ret = match &sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) if matches!(&**ty, Type::Tuple(t) if t.elems.is_empty()) => None,
        ReturnType::Type(_, ty) => Some((
            (**ty).clone(),
            classify(ty).ok_or_else(|| Error::new(ty.span(), UNSUPPORTED_SIGNATURE))?,
        )),
    };
    for c in &args.candidates {
        if matches!(c.target, Target::Nop) && ret.is_some() {
            return Err(Error::new(
                c.span,
                "a `nop` candidate leaves no return value: only a function returning () can have one",
            ));
        }
    }

    let vis = &func.vis;
    let attrs = &func.attrs;
    let block = &func.block;
    let fn_name = &sig.ident;
    let inputs = &sig.inputs;
    let output = &sig.output;
    let unsafety = &sig.unsafety;
    let raw_params: Vec<TokenStream2> = params.iter().flat_map(Param::raw_params).collect();
    let rebuilt: Vec<TokenStream2> = params.iter().map(Param::rebuild).collect();

    // One `extern "sysv64"` shim per call target, the default body included, taking the raw
    // parts in the site's registers and calling the target with the Rust values.
    let body_fn = format_ident!("__altpatch_body");
    let shim = |name: &Ident, path: TokenStream2, features: TokenStream2| {
        let call = if unsafety.is_some() {
            quote_spanned!(path.span()=> unsafe { #path(#(#rebuilt),*) })
        } else {
            quote_spanned!(path.span()=> #path(#(#rebuilt),*))
        };
        quote_spanned! {path.span()=>
            #[allow(improper_ctypes_definitions, clippy::missing_safety_doc)]
            #features
            #unsafety extern "sysv64" fn #name(#(#raw_params),*) #output {
                // A candidate with another signature is a type error here.
                #call
            }
        }
    };
    let default_fn = format_ident!("__altpatch_default");
    let mut shims = vec![
        quote! {
            #[inline(always)]
            #unsafety fn #body_fn(#inputs) #output #block
        },
        shim(&default_fn, quote!(#body_fn), quote!()),
    ];
    let mut syms = vec![(format_ident!("d0"), quote!(#default_fn))];
    let mut blocks = vec![asm::Block::Call("d0".into())];
    for (i, c) in args.candidates.iter().enumerate() {
        blocks.push(match &c.target {
            Target::Call(path) => {
                let name = format_ident!("__altpatch_candidate_{}", i + 1);
                shims.push(shim(&name, quote!(#path), shim_attributes(&c.predicate)));
                let operand = format!("d{}", i + 1);
                syms.push((format_ident!("d{}", i + 1), quote!(#name)));
                asm::Block::Call(operand)
            }
            Target::Asm(lines) => asm::Block::Asm(lines.iter().map(LitStr::value).collect()),
            Target::Nop => asm::Block::Nop,
        });
    }
    let template = asm::padded_site(&blocks);
    // Each operand under the name its `call {dN}` uses: N is the candidate's index, not the
    // operand's position (asm and nop candidates have none).
    let sym_operands = syms.iter().map(|(name, path)| quote!(#name = sym #path));
    let desc = descriptor(args, fn_name, names);
    let in_operands: Vec<TokenStream2> = params.iter().flat_map(Param::in_operands).collect();
    let (out_operand, ret_value) = match &ret {
        None => (quote!(), quote!()),
        Some((ty, Class::Int)) if quote!(#ty).to_string() == "bool" => (
            quote!(lateout("rax") __altpatch_ret,),
            quote!((__altpatch_ret as u8) != 0),
        ),
        Some((ty, Class::Int)) => (
            quote!(lateout("rax") __altpatch_ret,),
            quote!(__altpatch_ret as #ty),
        ),
        Some((_, Class::Float)) => (
            quote!(lateout("xmm0") __altpatch_ret,),
            quote!(__altpatch_ret),
        ),
    };
    let ret_decl = match &ret {
        None => quote!(),
        Some((_, Class::Int)) => quote!(let __altpatch_ret: u64;),
        Some((ty, Class::Float)) => quote!(let __altpatch_ret: #ty;),
    };
    let kind = asm::KIND_CALL_SITE;
    let arg_names: Vec<&Ident> = params.iter().map(|p| &p.ident).collect();
    let unsafe_call = if unsafety.is_some() {
        quote!(unsafe)
    } else {
        quote!()
    };

    Ok(quote! {
        #(#attrs)*
        #[inline(always)]
        #vis #unsafety fn #fn_name(#inputs) #output {
            #(#shims)*
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                static __ALTPATCH_SITE: ::altpatch::__private::SiteDescriptor = #desc;
                #ret_decl
                // SAFETY: the site calls an `extern "sysv64"` function with exactly these argument
                // registers, or runs the instructions a candidate gave for the same registers;
                // every caller-saved register is declared clobbered, and the stack is aligned for a
                // call on entry to an asm block (no `nostack`).
                unsafe {
                    ::core::arch::asm!(
                        #template,
                        #(#sym_operands,)*
                        desc = sym __ALTPATCH_SITE,
                        kind = const #kind,
                        #(#in_operands,)*
                        #out_operand
                        clobber_abi("C"),
                    );
                }
                #ret_value
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            {
                #unsafe_call { #body_fn(#(#arg_names),*) }
            }
        }
    })
}
