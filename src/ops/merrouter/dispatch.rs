//! The dispatch layout (a stable counting sort of the slots by expert, on the GPU) and the combine.
//!
//! Kernels: the routing kernel (or `histogram` for ids from elsewhere) counts slots per (block of
//! tokens, expert); `build_layout` (one workgroup: the single global sync point) turns the counts
//! into per-expert totals, offsets, per-(block, expert) bases, padding sentinels and group loads;
//! `scatter` ranks each slot within its block with per-expert token bitmasks and writes the sorted
//! slot list, the inverse map and the block experts.

use std::sync::Arc;

use super::{OP, reference};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, Recorder, grid};
use crate::tensor::{DType, DeviceTensor, Tensor};

pub(crate) const LAYOUT: Kernel = Kernel {
    name: "merrouter_layout",
    source: include_str!("../../../shaders/merrouter_layout.wgsl"),
};
pub(crate) const SCATTER: Kernel = Kernel {
    name: "merrouter_scatter",
    source: include_str!("../../../shaders/merrouter_scatter.wgsl"),
};
const COMBINE: Kernel = Kernel {
    name: "merrouter_combine",
    source: include_str!("../../../shaders/merrouter_combine.wgsl"),
};

/// Threads of the single `build_layout` workgroup.
pub(crate) const LAYOUT_WG: u32 = 256;
const COMBINE_WG: u32 = 256;
/// Storage buffers the kernels bind at most (the routing kernel).
pub(crate) const STORAGE_BUFFERS: u32 = 7;

/// Params of `build_layout` and the staged layout steps (merrouter_layout.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LayoutParams {
    pub tokens: u32,     // t
    pub top_k: u32,      // k
    pub blocks: u32,     // token blocks: rows of block_counts [blocks, e]
    pub block_size: u32, // rows per padded block
    pub rows: u32,       // rows of sorted_slots
    pub row_blocks: u32, // entries of block_experts
    pub pad0: u32,
    pub pad1: u32,
}

/// Params of `histogram` and `scatter` (merrouter_scatter.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ScatterParams {
    pub tokens: u32,     // t
    pub block_size: u32, // rows per padded block
    pub rows: u32,       // rows of sorted_slots
    pub pad0: u32,
}

/// Params of `combine` (merrouter_combine.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct CombineParams {
    pub tokens: u32, // t
    pub cols: u32,   // n: columns of y [y_rows, n] and out [t, n]
    pub y_rows: u32, // rows of y
    pub words: u32,  // 32-bit words of out
}

/// One kernel launch: pipeline, bind group, grid.
pub(crate) struct Launch {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind: wgpu::BindGroup,
    groups: (u32, u32, u32),
}

impl Launch {
    /// `entries` are (binding, resource) pairs: exactly the bindings `entry` uses.
    pub fn new(
        gpu: &Gpu,
        kernel: &Kernel,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        entries: &[(u32, wgpu::BindingResource<'_>)],
        workgroups: u32,
    ) -> Result<Self> {
        let pipeline = gpu.pipeline(kernel, entry, constants)?;
        let entries: Vec<wgpu::BindGroupEntry> = entries
            .iter()
            .map(|(binding, resource)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: resource.clone(),
            })
            .collect();
        let bind = gpu.checked(|| {
            gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
        })?;
        Ok(Launch {
            pipeline,
            bind,
            groups: grid(workgroups, gpu.caps.max_workgroups_per_dim),
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
        let (x, y, z) = self.groups;
        pass.dispatch_workgroups(x, y, z);
    }
}

/// Tokens per scatter block (the scatter's workgroup size): the largest of 256, 128, 64, 32 whose
/// two `[e, block / 32]` word arrays fit the device's workgroup memory.
pub(crate) fn block_tokens(gpu: &Gpu, experts: usize) -> Result<u32> {
    let storage = gpu.caps.max_workgroup_storage as u64;
    let need = |bt: u32| 2 * 4 * experts as u64 * (bt / 32) as u64;
    [256u32, 128, 64, 32]
        .into_iter()
        .find(|&bt| bt <= gpu.caps.max_invocations_per_workgroup && need(bt) <= storage)
        .ok_or(Error::Limit {
            what: format!("workgroup memory for the dispatch scatter of {experts} experts"),
            need: need(32),
            max: storage,
        })
}

/// Check the device limits every dispatch kernel needs for `experts` and `groups`.
pub(crate) fn check_layout_limits(gpu: &Gpu, experts: usize, groups: usize) -> Result<()> {
    let need = 4 * (2 * experts as u64 + 1 + LAYOUT_WG as u64 + groups as u64);
    let storage = gpu.caps.max_workgroup_storage as u64;
    if need > storage {
        return Err(Error::Limit {
            what: format!("workgroup memory for the dispatch layout of {experts} experts"),
            need,
            max: storage,
        });
    }
    if gpu.caps.max_invocations_per_workgroup < LAYOUT_WG {
        return Err(Error::Limit {
            what: "invocations per workgroup".into(),
            need: LAYOUT_WG as u64,
            max: gpu.caps.max_invocations_per_workgroup as u64,
        });
    }
    if gpu.caps.max_storage_buffers_per_stage < STORAGE_BUFFERS {
        return Err(Error::Limit {
            what: "storage buffers per shader stage".into(),
            need: STORAGE_BUFFERS as u64,
            max: gpu.caps.max_storage_buffers_per_stage as u64,
        });
    }
    Ok(())
}

/// The dispatch layout on the device. Row numbers index the sorted slot list; the expert inputs
/// for a grouped matmul are gathered in that order (`x[row] = hidden[sorted_slots[row] / k]`,
/// zeros for sentinel rows), so `offsets` serves directly as SwiftGMM's `group_offsets`.
///
/// | tensor | shape | dtype | contents |
/// |---|---|---|---|
/// | `counts` | `[e]` | i32 | slots routed to each expert |
/// | `offsets` | `[e + 1]` | i32 | exclusive prefix of the padded counts; `offsets[e]` = rows used |
/// | `sorted_slots` | `[rows]` | i32 | slot `token·k + j` at each row: expert by expert, ascending slot within an expert; padding rows and rows past `offsets[e]` hold the sentinel `t·k` |
/// | `slot_rows` | `[t, k]` | i32 | row of every slot (the inverse map) |
/// | `block_experts` | `[ceil(rows / block_size)]` | i32 | expert of each block of `block_size` rows; −1 past `offsets[e]` |
/// | `group_loads` | `[g]` | i32 | slots routed to each group of experts |
/// | `imbalance` | `[1]` | f32 | `(max - min group load) / t`, 0 for `t = 0` |
///
/// `rows = t·k + min(t·k, e)·(block_size − 1)` ([`reference::row_capacity`]): every expert's
/// segment is padded to a multiple of `block_size`, and at most `min(t·k, e)` experts have one
/// (with `block_size = 1` there is no padding, `rows = t·k` and `block_experts` is the expert of
/// every row).
#[derive(Debug)]
pub struct DispatchLayout {
    pub counts: DeviceTensor,
    pub offsets: DeviceTensor,
    pub sorted_slots: DeviceTensor,
    pub slot_rows: DeviceTensor,
    pub block_experts: DeviceTensor,
    pub group_loads: DeviceTensor,
    pub imbalance: DeviceTensor,
    /// `[blocks, e]` u32 scratch: slots per (token block, expert), then their prefix over blocks.
    pub(crate) block_counts: DeviceTensor,
    tokens: usize,
    top_k: usize,
    experts: usize,
    groups: usize,
    block_size: usize,
    block_tokens: usize,
}

impl DispatchLayout {
    pub(crate) fn new(
        gpu: &Gpu,
        (tokens, top_k): (usize, usize),
        (experts, groups): (usize, usize),
        block_size: usize,
        block_tokens: u32,
    ) -> Result<Self> {
        let rows = reference::row_capacity(tokens, top_k, experts, block_size)?;
        let blocks = tokens.div_ceil(block_tokens as usize);
        for (what, elements) in [
            ("sorted_slots", rows),
            ("slot_rows", tokens * top_k),
            ("block_counts", blocks * experts),
        ] {
            gpu.check_binding(what, 4 * elements as u64)?;
        }
        Ok(DispatchLayout {
            counts: gpu.zeros(&[experts], DType::I32)?,
            offsets: gpu.zeros(&[experts + 1], DType::I32)?,
            sorted_slots: gpu.zeros(&[rows], DType::I32)?,
            slot_rows: gpu.zeros(&[tokens, top_k], DType::I32)?,
            block_experts: gpu.zeros(&[rows.div_ceil(block_size)], DType::I32)?,
            group_loads: gpu.zeros(&[groups], DType::I32)?,
            imbalance: gpu.zeros(&[1], DType::F32)?,
            block_counts: gpu.zeros(&[blocks, experts], DType::U32)?,
            tokens,
            top_k,
            experts,
            groups,
            block_size,
            block_tokens: block_tokens as usize,
        })
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    pub fn experts(&self) -> usize {
        self.experts
    }
    pub fn groups(&self) -> usize {
        self.groups
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Rows of the sorted slot list (its capacity; `offsets[e]` of them are used).
    pub fn rows(&self) -> usize {
        self.sorted_slots.numel()
    }
    /// Entries of `block_experts`.
    pub fn row_blocks(&self) -> usize {
        self.block_experts.numel()
    }
    /// The value of padding rows in `sorted_slots`: `t·k`, one past the last slot.
    pub fn sentinel(&self) -> i32 {
        (self.tokens * self.top_k) as i32
    }
    /// Tokens per block of the scatter (and rows of the internal block counts).
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub(crate) fn layout_params(&self) -> LayoutParams {
        LayoutParams {
            tokens: self.tokens as u32,
            top_k: self.top_k as u32,
            blocks: self.block_counts.shape()[0] as u32,
            block_size: self.block_size as u32,
            rows: self.rows() as u32,
            row_blocks: self.row_blocks() as u32,
            pad0: 0,
            pad1: 0,
        }
    }

    pub(crate) fn scatter_params(&self) -> ScatterParams {
        ScatterParams {
            tokens: self.tokens as u32,
            block_size: self.block_size as u32,
            rows: self.rows() as u32,
            pad0: 0,
        }
    }

    /// Read every array back.
    pub fn download(&self, gpu: &Gpu) -> Result<HostLayout> {
        Ok(HostLayout {
            counts: gpu.download(&self.counts)?,
            offsets: gpu.download(&self.offsets)?,
            sorted_slots: gpu.download(&self.sorted_slots)?,
            slot_rows: gpu.download(&self.slot_rows)?,
            block_experts: gpu.download(&self.block_experts)?,
            group_loads: gpu.download(&self.group_loads)?,
            imbalance: gpu.download(&self.imbalance)?,
        })
    }
}

/// A [`DispatchLayout`] read back to the host (same names, shapes and dtypes).
#[derive(Clone, Debug, PartialEq)]
pub struct HostLayout {
    pub counts: Tensor,
    pub offsets: Tensor,
    pub sorted_slots: Tensor,
    pub slot_rows: Tensor,
    pub block_experts: Tensor,
    pub group_loads: Tensor,
    pub imbalance: Tensor,
}

impl HostLayout {
    /// The arrays by name, as `fusedops run` writes them.
    pub fn named(&self) -> [(&'static str, &Tensor); 7] {
        [
            ("counts", &self.counts),
            ("offsets", &self.offsets),
            ("sorted_slots", &self.sorted_slots),
            ("slot_rows", &self.slot_rows),
            ("block_experts", &self.block_experts),
            ("group_loads", &self.group_loads),
            ("imbalance", &self.imbalance),
        ]
    }
}

fn uniform_entry(buffer: &wgpu::Buffer) -> wgpu::BindingResource<'_> {
    buffer.as_entire_binding()
}

/// `build_layout` then `scatter`: everything after the block counts.
pub(crate) struct LayoutSteps {
    build: Launch,
    scatter: Launch,
    _params: (wgpu::Buffer, wgpu::Buffer),
}

impl LayoutSteps {
    /// Dispatches [`LayoutSteps::record`] makes.
    pub const DISPATCHES: usize = 2;

    pub fn new(gpu: &Gpu, layout: &DispatchLayout, topk_ids: &DeviceTensor) -> Result<Self> {
        let e = layout.experts as f64;
        let layout_params = gpu.uniform(&layout.layout_params())?;
        let scatter_params = gpu.uniform(&layout.scatter_params())?;
        let build = Launch::new(
            gpu,
            &LAYOUT,
            "build_layout",
            &[
                ("WG", LAYOUT_WG as f64),
                ("E", e),
                ("G", layout.groups as f64),
            ],
            &[
                (0, layout.block_counts.binding()),
                (1, layout.counts.binding()),
                (2, layout.offsets.binding()),
                (3, layout.sorted_slots.binding()),
                (4, layout.block_experts.binding()),
                (5, layout.group_loads.binding()),
                (6, layout.imbalance.binding()),
                (7, uniform_entry(&layout_params)),
            ],
            1,
        )?;
        let scatter = Launch::new(
            gpu,
            &SCATTER,
            "scatter",
            &scatter_constants(layout),
            &[
                (0, topk_ids.binding()),
                (1, layout.block_counts.binding()),
                (2, layout.offsets.binding()),
                (3, layout.sorted_slots.binding()),
                (4, layout.slot_rows.binding()),
                (5, layout.block_experts.binding()),
                (6, uniform_entry(&scatter_params)),
            ],
            layout.block_counts.shape()[0] as u32,
        )?;
        Ok(LayoutSteps {
            build,
            scatter,
            _params: (layout_params, scatter_params),
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.build.record(pass);
        self.scatter.record(pass);
    }
}

pub(crate) fn scatter_constants(layout: &DispatchLayout) -> [(&'static str, f64); 3] {
    [
        ("BT", layout.block_tokens as f64),
        ("E", layout.experts as f64),
        ("K", layout.top_k as f64),
    ]
}

/// The `histogram` launch: slots per (block, expert) of ids that did not come from the router.
pub(crate) fn histogram_launch(
    gpu: &Gpu,
    layout: &DispatchLayout,
    topk_ids: &DeviceTensor,
    params: &wgpu::Buffer,
) -> Result<Launch> {
    Launch::new(
        gpu,
        &SCATTER,
        "histogram",
        &scatter_constants(layout),
        &[
            (0, topk_ids.binding()),
            (1, layout.block_counts.binding()),
            (6, uniform_entry(params)),
        ],
        layout.block_counts.shape()[0] as u32,
    )
}

/// Check a dispatch shape (`experts` in `groups` equal groups, `top_k` distinct experts a token,
/// any number of tokens, 0 included); returns the rows of the layout.
pub(crate) fn check_dispatch_shape(
    tokens: usize,
    top_k: usize,
    experts: usize,
    groups: usize,
    block_size: usize,
) -> Result<usize> {
    if experts == 0 || groups == 0 || !experts.is_multiple_of(groups) {
        return Err(Error::invalid(
            OP,
            "groups",
            format!("{experts} experts do not split into {groups} equal groups"),
        ));
    }
    if top_k == 0 || top_k > experts {
        return Err(Error::invalid(
            OP,
            "topk_ids",
            format!("[{tokens}, {top_k}] needs 1 <= k <= {experts} (distinct experts)"),
        ));
    }
    if block_size == 0 || block_size > super::MAX_BLOCK_SIZE {
        return Err(Error::invalid(
            OP,
            "block_size",
            format!("{block_size} must be in 1..={}", super::MAX_BLOCK_SIZE),
        ));
    }
    reference::row_capacity(tokens, top_k, experts, block_size)
}

/// Host ids must be `[t, k]` i32, each in `0..experts` and distinct within a token.
pub(crate) fn check_host_ids(topk_ids: &Tensor, experts: usize) -> Result<()> {
    let (Some(ids), &[_, k]) = (topk_ids.as_i32(), topk_ids.shape()) else {
        return Err(Error::shape(
            OP,
            "topk_ids",
            (topk_ids.shape(), topk_ids.dtype()),
            "[t, k] i32",
        ));
    };
    for (token, row) in ids.chunks(k.max(1)).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            if x < 0 || x as usize >= experts || row[..j].contains(&x) {
                return Err(Error::invalid(
                    OP,
                    format!("topk_ids[{token}, {j}]"),
                    format!("{x} is out of 0..{experts} or repeats an expert of the token"),
                ));
            }
        }
    }
    Ok(())
}

/// The layout of ids that did not come from the router: `histogram`, `build_layout`, `scatter`.
/// Device ids cannot be checked on the host: out-of-range ids are left out of the layout (their
/// slots get row −1) and a repeated expert within a token shares one row; the host convenience
/// [`super::dispatch`] refuses both.
pub struct Dispatcher {
    layout: DispatchLayout,
    histogram: Launch,
    steps: LayoutSteps,
    _params: wgpu::Buffer,
}

impl Dispatcher {
    pub fn new(
        gpu: &Gpu,
        topk_ids: &DeviceTensor,
        experts: usize,
        groups: usize,
        block_size: usize,
    ) -> Result<Self> {
        let &[tokens, top_k] = topk_ids.shape() else {
            return Err(Error::shape(OP, "topk_ids", topk_ids.shape(), "[t, k]"));
        };
        if topk_ids.dtype() != DType::I32 {
            return Err(Error::unsupported(
                OP,
                format!("topk_ids of dtype {} (expected i32)", topk_ids.dtype()),
            ));
        }
        check_dispatch_shape(tokens, top_k, experts, groups, block_size)?;
        check_layout_limits(gpu, experts, groups)?;
        gpu.check_binding("topk_ids", topk_ids.size_bytes())?;
        let bt = block_tokens(gpu, experts)?;
        let layout = DispatchLayout::new(gpu, (tokens, top_k), (experts, groups), block_size, bt)?;
        let params = gpu.uniform(&layout.scatter_params())?;
        let histogram = histogram_launch(gpu, &layout, topk_ids, &params)?;
        let steps = LayoutSteps::new(gpu, &layout, topk_ids)?;
        Ok(Dispatcher {
            layout,
            histogram,
            steps,
            _params: params,
        })
    }

    /// Record the three dispatches into one compute pass (nothing for `t = 0`: the layout's
    /// zero-initialised arrays are already the empty layout).
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        if self.layout.tokens == 0 {
            return Ok(());
        }
        let mut pass = rec.compute_pass("merrouter dispatch");
        self.histogram.record(&mut pass);
        self.steps.record(&mut pass);
        Ok(())
    }

    pub fn layout(&self) -> &DispatchLayout {
        &self.layout
    }
}

/// Shapes of a combine: weights `[t, k]` f32, slot_rows `[t, k]` i32, y `[rows, n]` float, and the
/// output dtype; returns `(t, n)`.
pub(crate) fn check_combine_shapes<T: super::Shaped>(
    weights: &T,
    slot_rows: &T,
    y: &T,
    out_dtype: DType,
) -> Result<(usize, usize)> {
    let &[t, k] = weights.shape() else {
        return Err(Error::shape(OP, "topk_weights", weights.shape(), "[t, k]"));
    };
    if weights.dtype() != DType::F32 || k == 0 {
        return Err(Error::shape(
            OP,
            "topk_weights",
            (weights.shape(), weights.dtype()),
            "[t, k >= 1] f32",
        ));
    }
    if slot_rows.shape() != [t, k] || slot_rows.dtype() != DType::I32 {
        return Err(Error::shape(
            OP,
            "slot_rows",
            (slot_rows.shape(), slot_rows.dtype()),
            format!("[{t}, {k}] i32"),
        ));
    }
    let &[y_rows, n] = y.shape() else {
        return Err(Error::shape(OP, "y", y.shape(), "[rows, n]"));
    };
    if n == 0 {
        return Err(Error::shape(OP, "y", y.shape(), "[rows, n >= 1]"));
    }
    for (what, dtype) in [("y", y.dtype()), ("out", out_dtype)] {
        if !dtype.is_float() {
            return Err(Error::unsupported(
                OP,
                format!("{what} of dtype {dtype} (expected f32, f16 or bf16)"),
            ));
        }
    }
    let elements = (y_rows * n).max(t * n) as u64;
    if elements > u32::MAX as u64 {
        return Err(Error::Limit {
            what: "combine elements (u32 indices)".into(),
            need: elements,
            max: u32::MAX as u64,
        });
    }
    Ok((t, n))
}

/// Host slot rows must be −1 or rows of `y`.
pub(crate) fn check_host_slot_rows(slot_rows: &Tensor, y: &Tensor) -> Result<()> {
    let y_rows = y.shape().first().copied().unwrap_or(0);
    if let Some(rows) = slot_rows.as_i32() {
        if let Some((i, &r)) = rows
            .iter()
            .enumerate()
            .find(|&(_, &r)| r < -1 || r >= y_rows as i32)
        {
            return Err(Error::invalid(
                OP,
                format!("slot_rows[{i}]"),
                format!("{r} is neither -1 nor a row of y (0..{y_rows})"),
            ));
        }
    }
    Ok(())
}

/// The combine kernel on device tensors. Rows out of range of `y` (possible only with device
/// slot rows that did not come from a layout) contribute nothing.
///
/// One invocation computes one 32-bit word of `out`: one f32 element, or two 16-bit elements
/// (with an odd `n` the two may belong to neighbouring tokens). No two invocations ever write the
/// same word, so any `n` works for every output dtype without atomics or a read-modify-write.
pub struct Combiner {
    launch: Launch,
    words: usize,
    _params: wgpu::Buffer,
}

impl Combiner {
    /// `topk_weights [t, k]` f32, `slot_rows [t, k]` i32, `y [rows, n]` and `out [t, n]` (f32, f16
    /// or bf16 each).
    pub fn new(
        gpu: &Gpu,
        topk_weights: &DeviceTensor,
        slot_rows: &DeviceTensor,
        y: &DeviceTensor,
        out: &DeviceTensor,
    ) -> Result<Self> {
        let (t, n) = check_combine_shapes(topk_weights, slot_rows, y, out.dtype())?;
        if out.shape() != [t, n] {
            return Err(Error::shape(OP, "out", out.shape(), format!("[{t}, {n}]")));
        }
        for (what, tensor) in [("y", y), ("out", out), ("topk_weights", topk_weights)] {
            gpu.check_binding(what, tensor.size_bytes())?;
        }
        let k = topk_weights.shape()[1];
        let per_word = if out.dtype() == DType::F32 { 1 } else { 2 };
        let words = (t * n).div_ceil(per_word);
        let params = gpu.uniform(&CombineParams {
            tokens: t as u32,
            cols: n as u32,
            y_rows: y.shape()[0] as u32,
            words: words as u32,
        })?;
        let launch = Launch::new(
            gpu,
            &COMBINE,
            "combine",
            &[
                ("WG", COMBINE_WG as f64),
                ("K", k as f64),
                ("Y_DTYPE", y.dtype().shader_code() as f64),
                ("OUT_DTYPE", out.dtype().shader_code() as f64),
            ],
            &[
                (0, topk_weights.binding()),
                (1, slot_rows.binding()),
                (2, y.binding()),
                (3, out.binding()),
                (4, uniform_entry(&params)),
            ],
            (words as u32).div_ceil(COMBINE_WG),
        )?;
        Ok(Combiner {
            launch,
            words,
            _params: params,
        })
    }

    /// Record the combine (nothing when `out` is empty: `t = 0`).
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        if self.words == 0 {
            return Ok(());
        }
        let mut pass = rec.compute_pass("merrouter combine");
        self.launch.record(&mut pass);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: bytemuck::Pod>(size: usize) {
        assert_eq!(std::mem::size_of::<T>(), size);
        assert_eq!(std::mem::size_of::<T>() % 16, 0);
    }

    #[test]
    fn params_sizes_are_multiples_of_16() {
        check::<LayoutParams>(32);
        check::<ScatterParams>(16);
        check::<CombineParams>(16);
    }
}
