//! # fusedops
//!
//! Fused LLM-inference operators written as WGSL compute shaders and run through wgpu on any GPU
//! (Vulkan, Metal, DX12, or Mesa's lavapipe CPU driver), each paired with a CPU reference:
//!
//! - **AMLA**: MLA decode attention over a paged latent KV cache, with the online-softmax rescale
//!   done as an integer add on the f32 exponent bits;
//! - **SwiftGMM**: grouped matmul for MoE experts, GEMV-like or tiled per expert, one dispatch;
//! - **MerRouter**: fused MoE routing, dispatch layout and combine;
//! - **MoE layer**: router → grouped matmuls → combine in one command buffer.
//!
//! The data path: host [`tensor::Tensor`]s → [`gpu::Gpu::upload`] → an operator validates shapes
//! and limits, picks a kernel variant and records its dispatches through a [`gpu::Recorder`] →
//! readback → [`check::compare`] against the operator's CPU reference.
//!
//! ```
//! use fusedops::{check::{compare, Tolerance}, gpu::Gpu, tensor::{DType, Tensor}};
//!
//! # fn main() -> fusedops::error::Result<()> {
//! let gpu = Gpu::new()?; // Error::NoAdapter (with an install hint) when there is no GPU
//! let x = Tensor::from_f32(&[4], &[1.0, 2.5, -3.0, 0.125], DType::BF16)?;
//! let on_gpu = gpu.upload(&x)?;
//! let back = gpu.download_f32(&on_gpu)?;
//! assert!(compare(&back, &x.to_f32(), Tolerance::EXACT).pass);
//! # Ok(())
//! # }
//! ```

pub mod ascend;
pub mod bench;
pub mod check;
pub mod error;
pub mod gpu;
pub mod io;
pub mod ops;
pub mod registry;
pub mod report;
pub mod roofline;
pub mod seeded;
pub mod suite;
pub mod tensor;
pub mod util;

pub use error::{Error, Result};
