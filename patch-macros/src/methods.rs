//! `#[alternative_impl]` on an impl block: expands the `#[alternative]` methods inside it.
//!
//! An attribute on a method sees neither its impl's type nor whether the impl is a trait's, so
//! the impl-level attribute does the work: it names each site `module::Type::method` and puts the
//! generated functions in an inherent impl of their own, reached as `Self::__altpatch_..`, which
//! works for trait impls too (an item a trait does not declare cannot go in its impl).

use proc_macro2::TokenStream as TokenStream2;
use quote::quote;
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{Error, ImplItem, ItemFn, ItemImpl, Meta, Path, Type};

use crate::{Args, Expanded, Owner, expand, parse_option};

/// `crate = path`, passed on to every method's `#[alternative]` that does not give its own.
#[derive(Default)]
pub struct ImplArgs {
    krate: Option<Path>,
}

impl Parse for ImplArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let (mut name, mut krate) = (None, None);
        while !input.is_empty() {
            if !parse_option(input, &mut name, &mut krate)? || name.is_some() {
                return Err(Error::new(
                    input.span(),
                    "#[alternative_impl] takes only `crate = path`; name sites in their #[alternative]",
                ));
            }
        }
        Ok(ImplArgs { krate })
    }
}

fn is_alternative(attr: &syn::Attribute) -> bool {
    attr.path()
        .segments
        .last()
        .is_some_and(|s| s.ident == "alternative")
}

fn last_segment(ty: &Type) -> String {
    match ty {
        Type::Path(p) if p.qself.is_none() => p
            .path
            .segments
            .last()
            .map(|s| s.ident.to_string())
            .unwrap_or_default(),
        Type::Group(g) => last_segment(&g.elem),
        other => quote!(#other).to_string().replace(' ', ""),
    }
}

pub fn expand_impl(args: ImplArgs, mut item: ItemImpl) -> syn::Result<TokenStream2> {
    let owner = Owner {
        type_name: last_segment(&item.self_ty),
        trait_name: item
            .trait_
            .as_ref()
            .and_then(|(_, path, _)| path.segments.last().map(|s| s.ident.to_string())),
    };
    let mut helpers = Vec::new();
    for impl_item in &mut item.items {
        let ImplItem::Fn(method) = impl_item else {
            continue;
        };
        let Some(at) = method.attrs.iter().position(is_alternative) else {
            continue;
        };
        let attr = method.attrs.remove(at);
        if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
            return Err(Error::new(
                item.generics.span(),
                "#[alternative] cannot patch a method of a generic impl: each instantiation would need \
                 its own site; write a non-generic function and put #[alternative] on it",
            ));
        }
        let mut method_args = match &attr.meta {
            Meta::Path(_) => Args::default(),
            _ => attr.parse_args::<Args>()?,
        };
        if method_args.krate.is_none() {
            method_args.krate = args.krate.clone();
        }
        let func = ItemFn {
            attrs: method.attrs.clone(),
            vis: method.vis.clone(),
            sig: method.sig.clone(),
            block: Box::new(method.block.clone()),
        };
        let Expanded {
            head,
            helpers: generated,
            body,
        } = expand(&method_args, &func, Some(&owner))?;
        helpers.push(generated);
        *impl_item = ImplItem::Verbatim(quote!(#head { #body }));
    }
    let self_ty = &item.self_ty;
    let helpers = if helpers.is_empty() {
        quote!()
    } else {
        quote! {
            #[doc(hidden)]
            impl #self_ty {
                #(#helpers)*
            }
        }
    };
    Ok(quote!(#item #helpers))
}
