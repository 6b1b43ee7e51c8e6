//! The layer's own two kernels, around the router and the grouped matmuls: the gather of the
//! expert inputs into dispatch-row order (with the per-row routing weight) and the combine back to
//! token order (with the shared expert's output). W8A8 layers gather with the int8 quantization
//! fused in (`gather_quantize` of shaders/quantize.wgsl).

use std::sync::Arc;

use super::OP;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, Recorder, grid};
use crate::tensor::{DType, DeviceTensor};

const GATHER: Kernel = Kernel {
    name: "moe_gather",
    source: include_str!("../../../shaders/moe_gather.wgsl"),
};
const COMBINE: Kernel = Kernel {
    name: "moe_combine",
    source: include_str!("../../../shaders/moe_combine.wgsl"),
};

/// Invocations per workgroup of both kernels.
const WG: u32 = 256;

/// Params of `gather` (moe_gather.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GatherParams {
    pub tokens: u32, // t: rows of hidden [t, h]
    pub cols: u32,   // h: elements per row of hidden [t, h] and x_sorted [rows, h]
    pub rows: u32,   // rows of x_sorted and row_weights: t·k + min(t·k, e)·(block_size − 1)
    pub words: u32,  // 32-bit words of x_sorted: rows·h, or ceil(rows·h / 2) for 16 bits
}

/// Params of `combine` (moe_combine.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct CombineParams {
    pub tokens: u32, // t
    pub cols: u32,   // h: columns of y [y_rows, h], shared [t, h] and out [t, h]
    pub y_rows: u32, // rows of y
    pub words: u32,  // 32-bit words of out
}

/// One dispatch: pipeline, bind group, grid, and the params buffer it binds.
pub(crate) struct Step {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind: wgpu::BindGroup,
    groups: (u32, u32, u32),
    _params: wgpu::Buffer,
}

impl Step {
    /// Record the dispatch as its own compute pass named `label`.
    pub fn record(&self, rec: &mut Recorder, label: &str) {
        let mut pass = rec.compute_pass(label);
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
        let (x, y, z) = self.groups;
        pass.dispatch_workgroups(x, y, z);
    }
}

/// Words of 32 bits that `elements` of `dtype` occupy.
fn words(elements: usize, dtype: DType) -> u64 {
    (elements as u64 * dtype.size() as u64).div_ceil(4)
}

/// Refuse grids whose invocation index would pass u32.
fn check_invocations(what: &str, invocations: u64) -> Result<u32> {
    u32::try_from(invocations)
        .ok()
        .filter(|&n| n <= u32::MAX - WG)
        .ok_or_else(|| Error::Limit {
            what: format!("{OP} {what} invocations (32-bit indices)"),
            need: invocations,
            max: (u32::MAX - WG) as u64,
        })
}

/// The gather: `x_sorted [rows, h]` and `row_weights [rows]` from `hidden [t, h]`, the sorted slot
/// list `[rows]` and `topk_weights [t, k]`. Shapes are validated by the caller; 16-bit rows of odd
/// length share words with their neighbours (see moe_gather.wgsl).
pub(crate) fn gather(
    gpu: &Gpu,
    hidden: &DeviceTensor,
    sorted_slots: &DeviceTensor,
    topk_weights: &DeviceTensor,
    x_sorted: &DeviceTensor,
    row_weights: &DeviceTensor,
) -> Result<Step> {
    let (t, h) = (hidden.shape()[0], hidden.shape()[1]);
    let k = topk_weights.shape()[1];
    let rows = x_sorted.shape()[0];
    let total = words(rows * h, hidden.dtype());
    let invocations = check_invocations("gather", total.max(rows as u64))?;
    let params = gpu.uniform(&GatherParams {
        tokens: t as u32,
        cols: h as u32,
        rows: rows as u32,
        words: total as u32,
    })?;
    let halves = if hidden.dtype().size() == 2 { 1.0 } else { 0.0 };
    let pipeline = gpu.pipeline(
        &GATHER,
        "gather",
        &[("WG", WG as f64), ("K", k as f64), ("HALVES", halves)],
    )?;
    let bind = gpu.bind_group(
        &pipeline,
        &[
            hidden.binding(),
            sorted_slots.binding(),
            topk_weights.binding(),
            x_sorted.binding(),
            row_weights.binding(),
            params.as_entire_binding(),
        ],
    )?;
    Ok(Step {
        pipeline,
        bind,
        groups: grid(invocations.div_ceil(WG), gpu.caps.max_workgroups_per_dim),
        _params: params,
    })
}

/// The gather fused with the dynamic int8 quantization (W8A8): row r of `x_q [rows, h]` int8 and
/// `x_scale [rows]` is the quantization of `hidden[sorted_slots[r] / k]` (zero for sentinel
/// rows), `row_weights` as [`gather`]; with `tokens`, the row of each token's first slot also
/// writes the token-order copy `(q [t, h], scale [t])` the shared expert reads. One workgroup
/// per row; `h` is a multiple of 4 (checked by the caller); `unused` stands in for absent
/// token outputs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gather_quantize(
    gpu: &Gpu,
    hidden: &DeviceTensor,
    sorted_slots: &DeviceTensor,
    topk_weights: &DeviceTensor,
    (x_q, x_scale): (&DeviceTensor, &DeviceTensor),
    row_weights: &DeviceTensor,
    tokens: Option<(&DeviceTensor, &DeviceTensor)>,
    unused: &wgpu::Buffer,
) -> Result<Step> {
    use crate::ops::quantize;
    let (t, h) = (hidden.shape()[0], hidden.shape()[1]);
    let k = topk_weights.shape()[1];
    let rows = x_q.shape()[0];
    quantize::check_elements(gpu, "gathered int8 rows", rows as u64 * h as u64, DType::I8)?;
    let params = gpu.uniform(&quantize::QuantParams {
        rows: rows as u32,
        k: h as u32,
        row_words: (h / 4) as u32,
        tokens: t as u32,
    })?;
    let pipeline = gpu.pipeline(
        &quantize::KERNEL,
        "gather_quantize",
        &[
            ("WG", quantize::workgroup(gpu) as f64),
            ("X_DTYPE", hidden.dtype().shader_code() as f64),
            ("K", k as f64),
            ("TOKEN_ROWS", if tokens.is_some() { 1.0 } else { 0.0 }),
        ],
    )?;
    let token_binding = |i: usize| {
        tokens.map_or_else(
            || unused.as_entire_binding(),
            |pair| [pair.0, pair.1][i].binding(),
        )
    };
    let bind = gpu.bind_group(
        &pipeline,
        &[
            params.as_entire_binding(),
            hidden.binding(),
            x_q.binding(),
            x_scale.binding(),
            token_binding(0),
            token_binding(1),
            sorted_slots.binding(),
            topk_weights.binding(),
            row_weights.binding(),
        ],
    )?;
    Ok(Step {
        pipeline,
        bind,
        groups: grid(rows as u32, gpu.caps.max_workgroups_per_dim),
        _params: params,
    })
}

/// The combine: `out [t, h] = Σ_j y[slot_rows[t, j]] (+ shared [t, h])`. `y` and `shared` share a
/// dtype; `unused` is bound in place of an absent shared output.
pub(crate) fn combine(
    gpu: &Gpu,
    slot_rows: &DeviceTensor,
    y: &DeviceTensor,
    shared: Option<&DeviceTensor>,
    unused: &wgpu::Buffer,
    out: &DeviceTensor,
) -> Result<Step> {
    let (t, k) = (slot_rows.shape()[0], slot_rows.shape()[1]);
    let h = out.shape()[1];
    let out_words = words(t * h, out.dtype());
    let invocations = check_invocations("combine", out_words)?;
    let params = gpu.uniform(&CombineParams {
        tokens: t as u32,
        cols: h as u32,
        y_rows: y.shape()[0] as u32,
        words: invocations,
    })?;
    let pipeline = gpu.pipeline(
        &COMBINE,
        "combine",
        &[
            ("WG", WG as f64),
            ("K", k as f64),
            ("Y_DTYPE", y.dtype().shader_code() as f64),
            ("OUT_DTYPE", out.dtype().shader_code() as f64),
            ("HAS_SHARED", if shared.is_some() { 1.0 } else { 0.0 }),
        ],
    )?;
    let bind = gpu.bind_group(
        &pipeline,
        &[
            slot_rows.binding(),
            y.binding(),
            shared.map_or_else(|| unused.as_entire_binding(), |s| s.binding()),
            out.binding(),
            params.as_entire_binding(),
        ],
    )?;
    Ok(Step {
        pipeline,
        bind,
        groups: grid(invocations.div_ceil(WG), gpu.caps.max_workgroups_per_dim),
        _params: params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_16_bytes() {
        for size in [
            std::mem::size_of::<GatherParams>(),
            std::mem::size_of::<CombineParams>(),
        ] {
            assert_eq!(size, 16);
            assert_eq!(size % 16, 0);
        }
    }

    #[test]
    fn words_round_up() {
        assert_eq!(words(5, DType::F32), 5);
        assert_eq!(words(6, DType::BF16), 3);
        assert_eq!(words(7, DType::F16), 4);
    }
}
