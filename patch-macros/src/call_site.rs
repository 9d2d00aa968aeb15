//! Call-site mode, `#[alternative(inline, ...)]`: every inlined call is a site with the C ABI in
//! registers.
//!
//! ```text
//! fn popcount(x: u64) -> u64           #[inline(always)]: the site, `call __altpatch_default_..`
//! fn __altpatch_body_popcount          the body
//! extern "sysv64" fn __altpatch_default_popcount      raw registers → the body
//! extern "sysv64" fn __altpatch_candidate1_popcount   raw registers → candidate 1
//! ```

use quote::{format_ident, quote};
use syn::{Error, LitStr};

use crate::regs::{Fit, RegSig};
use crate::{Ctx, Expanded, Target, asm, shim_attributes};

pub fn expand(ctx: &Ctx<'_>) -> syn::Result<Expanded> {
    let sig = &ctx.func.sig;
    let regs = RegSig::of(sig, Fit::Registers)?;
    for c in &ctx.args.candidates {
        if matches!(c.target, Target::Nop) && regs.returns_value() {
            return Err(Error::new(
                c.span,
                "a `nop` candidate leaves no return value: only a function returning () can have one",
            ));
        }
    }
    let (p, prefix, unsafety) = (&ctx.p, &ctx.prefix, sig.unsafety);
    let body_fn = ctx.helper("body");
    let default_fn = ctx.helper("default");
    let mut helpers = vec![
        ctx.body_fn(&body_fn),
        regs.shim(
            &default_fn,
            &quote!(#prefix #body_fn),
            ctx.feature_attrs(),
            unsafety,
            quote!(),
        ),
    ];
    // Each operand under the name its `call {dN}` uses: N is the candidate's index, not the
    // operand's position (asm and nop candidates have none).
    let mut operands = vec![quote!(d0 = sym #prefix #default_fn)];
    let mut blocks = vec![asm::Block::Call("d0".into())];
    for (i, c) in ctx.args.candidates.iter().enumerate() {
        blocks.push(match &c.target {
            Target::Call(path) => {
                let name = ctx.helper(&format!("candidate{}", i + 1));
                helpers.push(regs.shim(
                    &name,
                    &quote!(#path),
                    shim_attributes(&c.predicate),
                    unsafety,
                    quote!(),
                ));
                let operand = format_ident!("d{}", i + 1);
                operands.push(quote!(#operand = sym #prefix #name));
                asm::Block::Call(operand.to_string())
            }
            Target::Asm(lines) => asm::Block::Asm(lines.iter().map(LitStr::value).collect()),
            Target::Nop => asm::Block::Nop,
        });
    }
    let template = asm::padded_site(&blocks);
    let kind = asm::KIND_CALL_SITE;
    operands.push(quote!(desc = sym __ALTPATCH_SITE));
    operands.push(quote!(kind = const #kind));
    let call = regs.asm_call(&quote!(#template), &operands);
    let desc = ctx.descriptor();
    let args = regs.arg_names();
    let fallback = ctx.unsafe_call(quote!(#prefix #body_fn(#(#args),*)));
    Ok(Expanded {
        head: ctx.head(),
        helpers: quote!(#(#helpers)*),
        body: quote! {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                static __ALTPATCH_SITE: #p::SiteDescriptor = #desc;
                #call
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            {
                #fallback
            }
        },
    })
}
