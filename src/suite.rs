//! The top floor: the list of registered operators that every command walks, and the headline
//! suite that `fusedops bench` runs. The operators sit
//! below it and implement the [`crate::registry`] traits; nothing below this module names them as
//! a set, so no floor reaches up.

use crate::bench::Filter;
use crate::gpu::Gpu;
use crate::registry::{Case, Operator, Scale};

/// Every registered operator.
pub fn operators() -> Vec<&'static dyn Operator> {
    vec![
        &crate::ops::amla::OPERATOR,
        &crate::ops::merrouter::OPERATOR,
        &crate::ops::moe::OPERATOR,
        &crate::ops::quantize::OPERATOR,
        &crate::ops::swiftgmm::OPERATOR,
    ]
}

/// The registered cases at `scale` that pass the filter.
pub fn selected_cases(gpu: &Gpu, scale: Scale, filter: &Filter) -> Vec<Box<dyn Case>> {
    operators()
        .into_iter()
        .filter(|op| filter.accepts_op(*op))
        .flat_map(|op| op.cases(scale, gpu))
        .filter(|case| filter.accepts(&case.info()))
        .collect()
}

/// The headline suite `fusedops bench` runs, at full size or at CPU size, filtered. Listing it
/// needs no GPU.
pub fn headline(full: bool, filter: &Filter) -> Vec<Box<dyn Case>> {
    operators()
        .into_iter()
        .filter(|op| filter.accepts_op(*op))
        .flat_map(|op| op.headline(full))
        .filter(|case| filter.accepts(&case.info()))
        .collect()
}
