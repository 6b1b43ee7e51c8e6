//! # Dynamic per-token int8 quantization
//!
//! `x [m, k]` (f32, f16 or bf16) becomes `q [m, k]` int8 and `scale [m]` f32 with
//! `x ≈ q · scale[row]`: per row, `scale = max|x| / 127` (rounded to nearest f32) and
//! `q = round(x / scale)` to nearest with **ties to even**, saturated at ±127 — the activation
//! format of W8A8 grouped matmuls ([`crate::ops::swiftgmm::quant`]) and CANN's DynamicQuant.
//! The GPU result equals [`reference::quantize`] bit for bit on every device: the kernel works on
//! the bit patterns with integer arithmetic (WGSL's f32 division is only accurate to 2.5 ulp, and
//! implementations may flush subnormals).
//!
//! Special rows: an all-zero row (or one so small that the scale underflows) gets scale 0 and
//! q = 0, so no division by zero happens; a row holding NaN or ±inf gets scale NaN and q = 0,
//! so that whatever is computed from it is NaN rather than silently wrong.
//!
//! int8 rows hold whole 32-bit words (four values per word, the first in the low byte, the operand
//! format of `dot4I8Packed`): `k` must be a multiple of 4.
//!
//! ```
//! use fusedops::gpu::Gpu;
//! use fusedops::ops::quantize;
//! use fusedops::tensor::{DType, Tensor};
//!
//! # fn main() -> fusedops::Result<()> {
//! let gpu = Gpu::new()?;
//! let x = Tensor::from_f32(&[2, 4], &[1.0, -2.0, 0.5, 2.54, 0.0, 0.0, 0.0, 0.0], DType::BF16)?;
//! let out = quantize::quantize(&gpu, &x)?;
//! assert_eq!(out.q.as_i8().unwrap()[..4], [50, -100, 25, 127]);
//! assert_eq!(out.scale.as_f32().unwrap()[1], 0.0); // an all-zero row
//! assert_eq!(out, quantize::reference::quantize(&x)?);
//! # Ok(())
//! # }
//! ```

mod cases;
pub mod reference;

use std::sync::Arc;

pub use cases::{OPERATOR, QuantizeOperator};

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, Recorder, grid};
use crate::tensor::{DType, DeviceTensor, Tensor};

pub(crate) const OP: &str = "quantize";

/// `shaders/quantize.wgsl`: `quantize_rows`, and the MoE layer's `gather_quantize`.
pub(crate) const KERNEL: Kernel = Kernel {
    name: "quantize",
    source: include_str!("../../../shaders/quantize.wgsl"),
};

/// Params of both entry points (`QuantParams` in quantize.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct QuantParams {
    pub rows: u32,      // rows of q [rows, k] and scale [rows]
    pub k: u32,         // elements per row (a multiple of 4)
    pub row_words: u32, // 32-bit words per int8 row: k / 4
    pub tokens: u32,    // gather_quantize: t, rows of hidden [t, k] (quantize_rows: = rows)
}

/// A row-quantized tensor: `q [m, k]` int8 and `scale [m]` f32, `x ≈ q · scale[row]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    pub q: Tensor,
    pub scale: Tensor,
}

/// Invocations per workgroup (one workgroup per row): fewer on CPU drivers, which run a
/// workgroup as a loop.
pub(crate) fn workgroup(gpu: &Gpu) -> u32 {
    if gpu.is_cpu() { 64 } else { 256 }
}

/// Check the shape of an activation tensor that is (or becomes) int8 rows: `[m, k]` with k a
/// positive multiple of 4. Returns `(m, k)`.
pub(crate) fn check_rows(op: &'static str, what: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [m, k] if k > 0 && k.is_multiple_of(4) => Ok((m, k)),
        [_, k] if k > 0 => Err(Error::unsupported(
            op,
            format!(
                "{what} with k = {k}: int8 rows hold whole 32-bit words, k must be a multiple of 4"
            ),
        )),
        _ => Err(Error::shape(op, what, shape, "[m, k] with k >= 1")),
    }
}

/// Check the float input `x [m, k]`; returns `(m, k)`.
pub(crate) fn check_input(x: &Tensor) -> Result<(usize, usize)> {
    check_float_rows(x.shape(), x.dtype())
}

fn check_float_rows(shape: &[usize], dtype: DType) -> Result<(usize, usize)> {
    if !dtype.is_float() {
        return Err(Error::unsupported(
            OP,
            format!("x of dtype {dtype} (expected f32, f16 or bf16)"),
        ));
    }
    check_rows(OP, "x", shape)
}

/// Refuse a buffer of `elements` past the binding limit or past 32-bit element indices.
pub(crate) fn check_elements(gpu: &Gpu, what: &str, elements: u64, dtype: DType) -> Result<()> {
    gpu.check_binding(what, elements * dtype.size() as u64)?;
    if elements >= u32::MAX as u64 {
        return Err(Error::Limit {
            what: format!("{what} elements (32-bit indices)"),
            need: elements,
            max: u32::MAX as u64 - 1,
        });
    }
    Ok(())
}

/// The quantization of device rows, ready to record (any number of times).
pub struct QuantizePlan {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind: wgpu::BindGroup,
    groups: (u32, u32, u32),
    _buffers: [wgpu::Buffer; 2],
}

impl std::fmt::Debug for QuantizePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizePlan")
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

impl QuantizePlan {
    /// `q [m, k]` i8 and `scale [m]` f32 from `x [m, k]` (f32, f16 or bf16, k a multiple of 4).
    /// Everything is validated here; nothing is dispatched.
    pub fn new(
        gpu: &Gpu,
        x: &DeviceTensor,
        q: &DeviceTensor,
        scale: &DeviceTensor,
    ) -> Result<Self> {
        let (m, k) = check_float_rows(x.shape(), x.dtype())?;
        if q.shape() != [m, k] || q.dtype() != DType::I8 {
            return Err(Error::shape(
                OP,
                "q",
                (q.shape(), q.dtype()),
                format!("[{m}, {k}] i8"),
            ));
        }
        if scale.shape() != [m] || scale.dtype() != DType::F32 {
            return Err(Error::shape(
                OP,
                "scale",
                (scale.shape(), scale.dtype()),
                format!("[{m}] f32"),
            ));
        }
        let elements = (m as u64) * (k as u64);
        check_elements(gpu, "x", elements, x.dtype())?;
        check_elements(gpu, "q", elements, DType::I8)?;
        let wg = workgroup(gpu);
        let params = gpu.uniform(&QuantParams {
            rows: m as u32,
            k: k as u32,
            row_words: (k / 4) as u32,
            tokens: m as u32,
        })?;
        let unused = gpu.storage_buffer("quantize unused", 16)?;
        let pipeline = gpu.pipeline(
            &KERNEL,
            "quantize_rows",
            &[
                ("WG", wg as f64),
                ("X_DTYPE", x.dtype().shader_code() as f64),
            ],
        )?;
        let bind = gpu.bind_group(
            &pipeline,
            &[
                params.as_entire_binding(),
                x.binding(),
                q.binding(),
                scale.binding(),
                unused.as_entire_binding(),
                unused.as_entire_binding(),
            ],
        )?;
        Ok(QuantizePlan {
            pipeline,
            bind,
            groups: grid(m as u32, gpu.caps.max_workgroups_per_dim),
            _buffers: [params, unused],
        })
    }

    /// Record the dispatch as a compute pass named `quantize`.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.record_as(rec, OP)
    }

    /// Record the dispatch as a compute pass named `label`.
    pub fn record_as(&self, rec: &mut Recorder, label: &str) -> Result<()> {
        let mut pass = rec.compute_pass(label);
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
        let (x, y, z) = self.groups;
        pass.dispatch_workgroups(x, y, z);
        Ok(())
    }
}

/// Validate, upload, quantize on the GPU and read back.
pub fn quantize(gpu: &Gpu, x: &Tensor) -> Result<Quantized> {
    let (m, k) = check_input(x)?;
    let x_dev = gpu.upload(x)?;
    let q = gpu.zeros(&[m, k], DType::I8)?;
    let scale = gpu.zeros(&[m], DType::F32)?;
    let plan = QuantizePlan::new(gpu, &x_dev, &q, &scale)?;
    gpu.run(|rec| plan.record(rec))?;
    Ok(Quantized {
        q: gpu.download(&q)?,
        scale: gpu.download(&scale)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_16_bytes() {
        assert_eq!(std::mem::size_of::<QuantParams>(), 16);
    }

    #[test]
    fn rows_must_hold_whole_words() {
        assert_eq!(check_rows(OP, "x", &[3, 8]).unwrap(), (3, 8));
        assert_eq!(check_rows(OP, "x", &[0, 4]).unwrap(), (0, 4));
        assert!(matches!(
            check_rows(OP, "x", &[3, 6]),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            check_rows(OP, "x", &[3, 0]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check_rows(OP, "x", &[12]),
            Err(Error::Shape { .. })
        ));
        let x = Tensor::i8(&[1, 4], vec![0; 4]).unwrap();
        assert!(matches!(check_input(&x), Err(Error::Unsupported { .. })));
    }
}
