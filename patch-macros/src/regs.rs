//! Signatures that fit the C ABI in registers, and the code that calls a site with them.
//!
//! Call sites, and trampolines whose signature fits, are entered from an `asm!` block that puts
//! the arguments in their registers and `call`s a `sym` operand. Unlike a Rust call, that `call`
//! is a `call rel32` from any crate: rustc reaches a function of another crate through the GOT in
//! a PIE build, while the assembler's `call sym` is a PLT32 relocation the linker resolves
//! directly. The targets are `extern "sysv64"` shims that take the raw parts in those registers
//! and rebuild the Rust values.

use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Error, FnArg, GenericArgument, Ident, Pat, PathArguments, ReturnType, Signature, Type};

/// How a value travels in the C ABI.
#[derive(Clone, Copy, PartialEq)]
pub enum Class {
    /// Integers, `bool`, raw pointers: a general-purpose register, widened to 64 bits.
    Int,
    /// `f32`/`f64`: an SSE register.
    Float,
}

/// `$t:ty` fragments of `macro_rules!` arrive wrapped in an invisible group.
fn ungroup(ty: &Type) -> &Type {
    match ty {
        Type::Group(g) => ungroup(&g.elem),
        Type::Paren(p) => ungroup(&p.elem),
        other => other,
    }
}

fn classify(ty: &Type) -> Option<Class> {
    match ungroup(ty) {
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
        _ => None,
    }
}

fn is_bool(ty: &Type) -> bool {
    matches!(ungroup(ty), Type::Path(p) if p.qself.is_none() && p.path.is_ident("bool"))
}

/// `Wrapper<T>` (by the last path segment) → `T`.
fn single_generic<'a>(ty: &'a Type, wrapper: &str) -> Option<&'a Type> {
    let Type::Path(p) = ungroup(ty) else {
        return None;
    };
    let last = p.path.segments.last()?;
    if p.qself.is_some() || last.ident != wrapper {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match (args.args.len(), args.args.first()?) {
        (1, GenericArgument::Type(inner)) => Some(inner),
        _ => None,
    }
}

/// A reference to a sized type (one register): `Some((mutable, elem))`.
fn thin_ref(ty: &Type) -> Option<(bool, Type)> {
    let Type::Reference(r) = ungroup(ty) else {
        return None;
    };
    match ungroup(&r.elem) {
        Type::Slice(_) | Type::TraitObject(_) => None,
        Type::Path(p) if p.path.is_ident("str") => None,
        elem => Some((r.mutability.is_some(), elem.clone())),
    }
}

/// How an argument travels.
pub enum ArgKind {
    /// One register of `class`.
    Scalar(Class),
    /// `&[T]` / `&mut [T]` (`&str` with `elem` = `u8` and `str`): pointer and length in two
    /// registers.
    Slice {
        mutable: bool,
        elem: Type,
        str: bool,
    },
    /// A pointer `Option` keeps in one register (see `PtrForm`).
    Pointer { form: PtrForm, elem: Type },
    /// Any other type (trampolines only): a pointer to the value, which the wrapper gives up
    /// (`ManuallyDrop`) and the shim moves out of.
    Moved,
}

impl ArgKind {
    fn of(ty: &Type) -> Option<ArgKind> {
        if let Type::Reference(r) = ungroup(ty) {
            let mutable = r.mutability.is_some();
            match ungroup(&r.elem) {
                Type::Slice(slice) => {
                    let elem = (*slice.elem).clone();
                    let str = false;
                    return Some(ArgKind::Slice { mutable, elem, str });
                }
                Type::Path(p) if p.path.is_ident("str") => {
                    let elem = syn::parse_quote!(u8);
                    let str = true;
                    return Some(ArgKind::Slice { mutable, elem, str });
                }
                _ => {}
            }
        }
        if let Some((form, elem)) = PtrForm::of(ty) {
            return Some(ArgKind::Pointer { form, elem });
        }
        classify(ty).map(ArgKind::Scalar)
    }

    fn classes(&self) -> Vec<Class> {
        match self {
            ArgKind::Scalar(class) => vec![*class],
            ArgKind::Slice { .. } => vec![Class::Int, Class::Int],
            ArgKind::Pointer { .. } | ArgKind::Moved => vec![Class::Int],
        }
    }
}

/// How the return value travels.
pub enum RetKind {
    /// An integer, raw pointer or float as written.
    Scalar(Class, Type),
    Bool,
    /// `&T`, `Option<&T>`, `NonNull<T>`, `Option<NonNull<T>>` (and `&mut`): one pointer, null
    /// for `None`.
    Pointer {
        form: PtrForm,
        elem: Type,
    },
    /// Any other type (trampolines only): written by the shim through a pointer the wrapper
    /// passes first, in `rdi`, to its own `MaybeUninit`.
    Memory(Type),
}

#[derive(Clone, Copy)]
pub enum PtrForm {
    Ref { mutable: bool, optional: bool },
    NonNull { optional: bool },
}

impl RetKind {
    fn of(ty: &Type) -> syn::Result<Option<RetKind>> {
        if matches!(ungroup(ty), Type::Tuple(t) if t.elems.is_empty()) {
            return Ok(None);
        }
        if is_bool(ty) {
            return Ok(Some(RetKind::Bool));
        }
        if let Some(class) = classify(ty) {
            return Ok(Some(RetKind::Scalar(class, ty.clone())));
        }
        if let Some((form, elem)) = PtrForm::of(ty) {
            return Ok(Some(RetKind::Pointer { form, elem }));
        }
        if single_generic(ty, "Option").is_some_and(|inner| matches!(ungroup(inner), Type::Ptr(_)))
        {
            return Err(Error::new(
                ty.span(),
                "#[alternative(inline)] cannot return an `Option` of a raw pointer: it takes two \
                 registers; return the raw pointer (null for `None`) or `Option<NonNull<T>>`, \
                 or remove `inline` to use a trampoline",
            ));
        }
        Err(Error::new(ty.span(), UNSUPPORTED_SIGNATURE))
    }
}

impl PtrForm {
    /// `&T`, `NonNull<T>`, or an `Option` of either (`T` sized): the form and `T`.
    fn of(ty: &Type) -> Option<(PtrForm, Type)> {
        let (optional, inner) = match single_generic(ty, "Option") {
            Some(inner) => (true, inner),
            None => (false, ty),
        };
        if let Some((mutable, elem)) = thin_ref(inner) {
            return Some((PtrForm::Ref { mutable, optional }, elem));
        }
        let elem = single_generic(inner, "NonNull")?;
        Some((PtrForm::NonNull { optional }, elem.clone()))
    }

    fn mutable(self) -> bool {
        matches!(
            self,
            PtrForm::Ref { mutable: true, .. } | PtrForm::NonNull { .. }
        )
    }

    /// The raw pointer type.
    fn raw(self, elem: &Type) -> TokenStream2 {
        if self.mutable() {
            quote!(*mut #elem)
        } else {
            quote!(*const #elem)
        }
    }

    /// The raw pointer of `value`, an expression of this form (null for `None`).
    fn to_raw(self, value: TokenStream2) -> TokenStream2 {
        match self {
            PtrForm::Ref { mutable, optional } => {
                let (from, null) = if mutable {
                    (
                        quote!(::core::ptr::from_mut),
                        quote!(::core::ptr::null_mut()),
                    )
                } else {
                    (quote!(::core::ptr::from_ref), quote!(::core::ptr::null()))
                };
                if optional {
                    quote!(match #value {
                        ::core::option::Option::Some(r) => #from(r),
                        ::core::option::Option::None => #null,
                    })
                } else {
                    quote!(#from(#value))
                }
            }
            PtrForm::NonNull { optional: false } => quote!(#value.as_ptr()),
            PtrForm::NonNull { optional: true } => quote!(match #value {
                ::core::option::Option::Some(p) => p.as_ptr(),
                ::core::option::Option::None => ::core::ptr::null_mut(),
            }),
        }
    }

    /// The value of this form rebuilt from `raw`, a raw pointer that `to_raw` made.
    fn rebuild(self, raw: TokenStream2) -> TokenStream2 {
        let safety = quote!(
            // SAFETY: the pointer is a reference (or `NonNull`) of this form, passed through a
            // register unchanged; null only for `None`.
        );
        match self {
            PtrForm::Ref {
                mutable: false,
                optional: false,
            } => quote!({ #safety unsafe { &*#raw } }),
            PtrForm::Ref {
                mutable: true,
                optional: false,
            } => quote!({ #safety unsafe { &mut *#raw } }),
            PtrForm::Ref {
                mutable: false,
                optional: true,
            } => quote!({ #safety unsafe { #raw.as_ref() } }),
            PtrForm::Ref {
                mutable: true,
                optional: true,
            } => quote!({ #safety unsafe { #raw.as_mut() } }),
            PtrForm::NonNull { optional: false } => {
                quote!({ #safety unsafe { ::core::ptr::NonNull::new_unchecked(#raw) } })
            }
            PtrForm::NonNull { optional: true } => quote!(::core::ptr::NonNull::new(#raw)),
        }
    }
}

pub const UNSUPPORTED_SIGNATURE: &str = "#[alternative(inline)] needs a signature that fits the C ABI in registers: up to six \
     integer, bool, raw-pointer, reference, `NonNull`, `Option<&T>` or `Option<NonNull<T>>` arguments \
     (a slice or `&str` counts two) and up to eight f32/f64, returning one of those (not a slice) \
     or (); remove `inline` to use a trampoline";

/// One argument.
pub struct Param {
    /// The name the wrapper knows it by (`self` for a receiver).
    pub ident: Ident,
    kind: ArgKind,
    ty: Type,
    regs: Vec<&'static str>,
    index: usize,
}

const INT_REGS: [&str; 6] = ["rdi", "rsi", "rdx", "rcx", "r8", "r9"];
const FLOAT_REGS: [&str; 8] = [
    "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
];

/// A signature whose arguments and result travel in registers.
pub struct RegSig {
    pub params: Vec<Param>,
    pub ret: Option<RetKind>,
}

/// Which signatures `RegSig::of` takes.
#[derive(Clone, Copy, PartialEq)]
pub enum Fit {
    /// Registers only, as a call site's `asm` candidates see them.
    Registers,
    /// Also values of any other type, through memory: fine where only Rust code is called.
    AnyType,
}

/// A type `MaybeUninit<T>` and a shim parameter can name (not `impl Trait`, not `!`).
fn nameable(ty: &Type) -> bool {
    !matches!(
        ungroup(ty),
        Type::ImplTrait(_) | Type::Never(_) | Type::Infer(_)
    )
}

impl RegSig {
    /// The register layout of `sig`, or an error at what does not fit.
    pub fn of(sig: &Signature, fit: Fit) -> syn::Result<RegSig> {
        let ret = match &sig.output {
            ReturnType::Default => None,
            ReturnType::Type(_, ty) => match RetKind::of(ty) {
                Err(_) if fit == Fit::AnyType && nameable(ty) => {
                    Some(RetKind::Memory((**ty).clone()))
                }
                other => other?,
            },
        };
        // The pointer to a result in memory comes first, in `rdi`.
        let mut ints = usize::from(matches!(ret, Some(RetKind::Memory(_))));
        let mut floats = 0;
        let mut params = Vec::new();
        for (index, input) in sig.inputs.iter().enumerate() {
            let (ident, ty, span) = match input {
                FnArg::Receiver(r) => (
                    Ident::new("self", r.self_token.span),
                    (*r.ty).clone(),
                    r.span(),
                ),
                FnArg::Typed(pt) => {
                    let Pat::Ident(pi) = &*pt.pat else {
                        return Err(Error::new(
                            pt.pat.span(),
                            "#[alternative] needs plain identifiers as argument patterns (destructure inside the body)",
                        ));
                    };
                    (pi.ident.clone(), (*pt.ty).clone(), pt.span())
                }
            };
            let kind = match ArgKind::of(&ty) {
                Some(kind) => kind,
                None if fit == Fit::AnyType && nameable(&ty) => ArgKind::Moved,
                None => return Err(Error::new(ty.span(), UNSUPPORTED_SIGNATURE)),
            };
            let mut regs = Vec::new();
            for class in kind.classes() {
                let reg = match class {
                    Class::Int => INT_REGS.get(ints).inspect(|_| ints += 1),
                    Class::Float => FLOAT_REGS.get(floats).inspect(|_| floats += 1),
                };
                regs.push(*reg.ok_or_else(|| Error::new(span, UNSUPPORTED_SIGNATURE))?);
            }
            params.push(Param {
                ident,
                kind,
                ty,
                regs,
                index,
            });
        }
        Ok(RegSig { params, ret })
    }

    pub fn returns_value(&self) -> bool {
        self.ret.is_some()
    }

    /// An `extern "sysv64"` function named `name` taking the raw parts, running `prologue`, then
    /// calling `target` (a path) with the rebuilt values and returning its result as raw parts.
    pub fn shim(
        &self,
        name: &Ident,
        target: &TokenStream2,
        attrs: TokenStream2,
        unsafety: Option<syn::token::Unsafe>,
        prologue: TokenStream2,
    ) -> TokenStream2 {
        let out_param = match &self.ret {
            Some(RetKind::Memory(ty)) => Some(quote!(__altpatch_out: *mut #ty)),
            _ => None,
        };
        let raw_params = out_param
            .into_iter()
            .chain(self.params.iter().flat_map(Param::raw_params));
        let rebuilt = self.params.iter().map(Param::rebuild);
        let call = if unsafety.is_some() {
            quote_spanned!(target.span()=> unsafe { #target(#(#rebuilt),*) })
        } else {
            quote_spanned!(target.span()=> #target(#(#rebuilt),*))
        };
        let (output, value) = match &self.ret {
            None => (quote!(), call),
            Some(RetKind::Bool) => (quote!(-> bool), call),
            Some(RetKind::Scalar(_, ty)) => (quote!(-> #ty), call),
            Some(RetKind::Pointer { form, elem }) => {
                let ptr = form.raw(elem);
                (quote!(-> #ptr), form.to_raw(call))
            }
            Some(RetKind::Memory(_)) => (
                quote!(),
                quote! {
                    let value = #call;
                    // SAFETY: `__altpatch_out` points at the wrapper's `MaybeUninit` for the
                    // result, written once here.
                    unsafe { __altpatch_out.write(value) }
                },
            ),
        };
        quote! {
            #[doc(hidden)]
            // `unused_unsafe`: an `unsafe fn`'s candidate may be a safe function.
            #[allow(improper_ctypes_definitions, non_snake_case, unused_unsafe, clippy::missing_safety_doc)]
            #attrs
            #unsafety extern "sysv64" fn #name(#(#raw_params),*) #output {
                #prologue
                // A candidate with another signature is a type error here.
                #value
            }
        }
    }

    /// The wrapper's statements: an `asm!` block running `template` (which calls or holds the
    /// site) with the arguments in their registers, then the result rebuilt.
    pub fn asm_call(&self, template: &TokenStream2, operands: &[TokenStream2]) -> TokenStream2 {
        let moved = self.params.iter().filter_map(Param::give_up);
        let in_operands = self.params.iter().flat_map(Param::in_operands);
        let (ret_decl, out_operand, ret_value) = match &self.ret {
            None => (quote!(), quote!(), quote!()),
            Some(RetKind::Bool) => (
                quote!(let __altpatch_ret: u64;),
                quote!(lateout("rax") __altpatch_ret,),
                // Only `al` is defined for a `bool` result.
                quote!((__altpatch_ret as u8) != 0),
            ),
            Some(RetKind::Scalar(Class::Int, ty)) => (
                quote!(let __altpatch_ret: u64;),
                quote!(lateout("rax") __altpatch_ret,),
                quote!(__altpatch_ret as #ty),
            ),
            Some(RetKind::Scalar(Class::Float, ty)) => (
                quote!(let __altpatch_ret: #ty;),
                quote!(lateout("xmm0") __altpatch_ret,),
                quote!(__altpatch_ret),
            ),
            Some(RetKind::Pointer { form, elem }) => {
                let ptr = form.raw(elem);
                (
                    quote!(let __altpatch_ret: #ptr;),
                    quote!(lateout("rax") __altpatch_ret,),
                    form.rebuild(quote!(__altpatch_ret)),
                )
            }
            Some(RetKind::Memory(ty)) => (
                quote!(let mut __altpatch_out = ::core::mem::MaybeUninit::<#ty>::uninit();),
                quote!(in("rdi") __altpatch_out.as_mut_ptr(),),
                quote!({
                    // SAFETY: the shim the trampoline reached wrote the result there.
                    unsafe { __altpatch_out.assume_init() }
                }),
            ),
        };
        quote! {
            #(#moved)*
            #ret_decl
            // SAFETY: the site calls an `extern "sysv64"` function with exactly these argument
            // registers, or runs the instructions a candidate gave for the same registers; every
            // caller-saved register is declared clobbered, and the stack is aligned for a call on
            // entry to an asm block (no `nostack`).
            unsafe {
                ::core::arch::asm!(
                    #template,
                    #(#operands,)*
                    #(#in_operands,)*
                    #out_operand
                    clobber_abi("C"),
                );
            }
            #ret_value
        }
    }

    /// The arguments as the wrapper passes them on (`self, a, b`).
    pub fn arg_names(&self) -> Vec<&Ident> {
        self.params.iter().map(|p| &p.ident).collect()
    }
}

impl Param {
    fn raw(&self, part: usize) -> Ident {
        format_ident!(
            "__altpatch_arg{}_{}",
            self.index,
            part,
            span = Span::call_site()
        )
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
                ..
            } => vec![quote!(#p0: *const #elem), quote!(#p1: usize)],
            ArgKind::Slice {
                mutable: true,
                elem,
                ..
            } => vec![quote!(#p0: *mut #elem), quote!(#p1: usize)],
            ArgKind::Pointer { form, elem } => {
                let raw = form.raw(elem);
                vec![quote!(#p0: #raw)]
            }
            ArgKind::Moved => vec![quote!(#p0: *mut #ty)],
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
            ArgKind::Slice {
                mutable: false,
                str: false,
                ..
            } => quote!({ #safety unsafe { ::core::slice::from_raw_parts(#p0, #p1) } }),
            ArgKind::Slice {
                mutable: true,
                str: false,
                ..
            } => quote!({ #safety unsafe { ::core::slice::from_raw_parts_mut(#p0, #p1) } }),
            ArgKind::Slice {
                mutable: false,
                str: true,
                ..
            } => quote!({ #safety unsafe {
                ::core::str::from_utf8_unchecked(::core::slice::from_raw_parts(#p0, #p1))
            } }),
            ArgKind::Slice {
                mutable: true,
                str: true,
                ..
            } => quote!({ #safety unsafe {
                ::core::str::from_utf8_unchecked_mut(::core::slice::from_raw_parts_mut(#p0, #p1))
            } }),
            ArgKind::Pointer { form, .. } => form.rebuild(quote!(#p0)),
            ArgKind::Moved => quote!({
                // SAFETY: the wrapper gave the value up (`ManuallyDrop`) for this one read.
                unsafe { ::core::ptr::read(#p0) }
            }),
        }
    }

    /// The `asm!` inputs that put this argument in its registers.
    fn in_operands(&self) -> Vec<TokenStream2> {
        let ident = &self.ident;
        let r = &self.regs;
        match &self.kind {
            ArgKind::Scalar(Class::Int) if is_bool(&self.ty) => {
                vec![quote!(in(#(#r)*) u64::from(#ident))]
            }
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
            ArgKind::Pointer { form, .. } => {
                let value = form.to_raw(quote!(#ident));
                vec![quote!(in(#(#r)*) #value)]
            }
            ArgKind::Moved => {
                let moved = self.moved();
                vec![quote!(in(#(#r)*) ::core::ptr::from_mut(&mut *#moved))]
            }
        }
    }

    fn moved(&self) -> Ident {
        format_ident!("__altpatch_moved{}", self.index, span = Span::call_site())
    }

    /// For a value passed through memory, the statement that gives it up to the shim.
    fn give_up(&self) -> Option<TokenStream2> {
        let ArgKind::Moved = self.kind else {
            return None;
        };
        let (ident, moved) = (&self.ident, self.moved());
        Some(quote!(let mut #moved = ::core::mem::ManuallyDrop::new(#ident);))
    }
}
