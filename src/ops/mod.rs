//! The operators, one folder each: public API and parameters in `mod.rs`, the CPU reference in
//! `reference.rs`, and the operator's own planning code (schedules, tiling, dispatch layout).

pub mod amla;
pub mod merrouter;
pub mod moe;
pub mod quantize;
pub mod swiftgmm;
