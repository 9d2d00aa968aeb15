//! Runtime of `altpatch`: site records, CPU detection, selection, verification and patching.
//!
//! Users depend on the `altpatch` facade crate, which owns the documentation; this crate holds the
//! machinery it re-exports. The flow, one module a stage: [`record`] → [`cpu`] → [`select`] (with
//! [`overrides`]) → [`plan`] → [`write`](mod@write) → [`report`], driven by [`apply`].

pub mod apply;
pub mod arch;
pub mod cpu;
pub mod feature;
pub mod load;
mod lock;
pub mod os;
pub mod overrides;
pub mod plan;
pub mod record;
pub mod report;
mod scan;
pub mod select;
pub mod static_key;
pub mod write;

pub use apply::{Patcher, applied_report, apply_patches, try_apply_patches};
pub use feature::{Feature, FeatureSet};
pub use report::{How, Report, SiteReport};
pub use static_key::{KeyError, KeyUpdate, StaticKey};
