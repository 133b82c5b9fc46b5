//! `#[gpu_test]`: a test that needs the GPU.
//!
//! ```ignore
//! #[gpu_test]
//! fn conv_matches_reference(ctx: GpuContext) {
//!     // ... uses ctx ...
//! }
//! ```
//! expands to a `#[test] fn conv_matches_reference()` whose body first opens the test context with
//! `crate::common::gpu()`: a missing adapter FAILS the test, unless the run opted out explicitly
//! with `ACCLIMATE_ALLOW_NO_GPU=1`, in which case the test prints why and returns. The one
//! argument names the context and its type; a test that only needs the check writes `_ctx`.

use proc_macro::TokenStream;
use quote::quote;
use syn::{FnArg, ItemFn, parse_macro_input};

#[proc_macro_attribute]
pub fn gpu_test(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let attr = proc_macro2::TokenStream::from(attr);
        return syn::Error::new_spanned(attr, "#[gpu_test] takes no arguments").to_compile_error().into();
    }
    let mut f = parse_macro_input!(item as ItemFn);
    let arg = match (f.sig.inputs.len(), f.sig.inputs.first()) {
        (1, Some(FnArg::Typed(arg))) => arg.clone(),
        _ => {
            return syn::Error::new_spanned(
                &f.sig,
                "#[gpu_test] functions take exactly one argument, the context: `fn name(ctx: GpuContext)`",
            )
            .to_compile_error()
            .into();
        }
    };
    if !matches!(f.sig.output, syn::ReturnType::Default) {
        return syn::Error::new_spanned(&f.sig.output, "#[gpu_test] functions return ()").to_compile_error().into();
    }
    let (pat, ty) = (&arg.pat, &arg.ty);
    let body = &f.block;
    f.sig.inputs.clear();
    f.block = syn::parse_quote!({
        let Some(#pat): Option<#ty> = crate::common::gpu() else { return };
        #body
    });
    quote!(#[test] #f).into()
}
