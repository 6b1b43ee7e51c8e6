//! The MoE layer's chain on Ascend: MerRouter (routing and the dispatch layout), a gather of the
//! routed rows (quantising them for W8A8), the gate/up grouped matmul with SwiGLU, (for W8A8) a
//! per-token quantisation of the intermediate, the down grouped matmul with the routing weight as
//! a row scale, and the combine. Each kernel is planned as its operator is (the router and the
//! grouped matmuls by [`super::merrouter`] and [`super::swiftgmm`]); the chain adds the gather,
//! quantisation and combine kernels and sums the roofline over the kernels.
//!
//! Keys: `tokens`, `dtype` (f16|bf16), `quant` (none | w8a16 | w8a8, as for `swiftgmm`), and
//! `peak_tflops`, `mem_gbps`. The preset gives the routing and the FFN sizes (DeepSeek-V3 without
//! one); the shared expert is not part of the chain plan (it is two more grouped matmuls with one
//! group, or a plain matmul).

use super::chips::{ChipSpec, CoreArch, Memory};
use super::plan::{
    Args, CoreRole, CoreSplit, Correspondence, Dtype, Io, Kernel, KernelShape, Layout, OP,
    OpDefSpec, Peak, Roofline, RooflineWork, Stage, StartPoint, TilingField, TilingKey, Workspace,
    add, first_fit, mul, product, soc_config, spread, vector_unit,
};
use super::timeline::{Builder, Dep, Pipe};
use super::{AscendPlan, Preset, merrouter, swiftgmm};
use crate::error::{Error, Result};

/// Shape keys `moe` takes.
pub const KEYS: &[&str] = &["tokens", "dtype", "quant", "peak_tflops", "mem_gbps"];

/// Columns of a hidden row a vector kernel handles at once (the row is walked in chunks).
const CHUNKS: [u64; 4] = [2048, 1024, 512, 256];

/// Plan the MoE chain on `chip`; see the module docs for the keys.
pub fn plan(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    shape: &[(String, String)],
) -> Result<AscendPlan> {
    let args = Args::parse("moe", shape, KEYS)?;
    let tokens = args.count("tokens")?.unwrap_or(256);
    let dtype = args.dtype(chip)?;
    let quant = args.choice("quant", &["none", "w8a16", "w8a8"], "none")?;
    let peak = Peak::resolve(chip, &args)?;
    let (experts, top_k, hidden, inter) = swiftgmm::preset_moe(preset);
    let rows = mul("tokens x top_k", tokens, top_k)?;
    if rows > u64::from(u32::MAX) {
        return Err(Error::invalid(
            OP,
            "tokens",
            format!(
                "tokens x top_k = {rows} does not fit the uint32_t row counts of the tiling \
                 structs: this shape cannot be planned"
            ),
        ));
    }

    let pass = |key: &str, value: String| (key.to_string(), value);
    // The router takes f32 logits; the matmuls take the activation dtype.
    let mut common = vec![pass("tokens", tokens.to_string())];
    for key in ["peak_tflops", "mem_gbps"] {
        if let Some(v) = args.text(key) {
            common.push(pass(key, v.to_string()));
        }
    }
    let router = merrouter::plan(chip, preset, &common)?;
    let gmm = |proj: &str| {
        let mut shape = common.clone();
        shape.push(pass("dtype", dtype.name().to_string()));
        shape.push(pass("proj", proj.to_string()));
        shape.push(pass("quant", quant.to_string()));
        swiftgmm::plan(chip, preset, &shape)
    };
    let gate_up = gmm("gate_up")?;
    let down = gmm("down")?;
    let w8a8 = quant == "w8a8";

    let mut parts: Vec<(&str, AscendPlan)> = vec![("MerRouter", router)];
    parts.push((
        "MoeGather",
        vector_kernel(
            chip,
            preset,
            VectorJob::Gather { quantise: w8a8 },
            rows,
            hidden,
            top_k,
            dtype,
            peak.clone(),
        )?,
    ));
    parts.push(("GmmGateUp", gate_up));
    if w8a8 {
        parts.push((
            "MoeQuant",
            vector_kernel(
                chip,
                preset,
                VectorJob::Quantise,
                rows,
                inter,
                top_k,
                dtype,
                peak.clone(),
            )?,
        ));
    }
    parts.push(("GmmDown", down));
    parts.push((
        "MoeCombine",
        vector_kernel(
            chip,
            preset,
            VectorJob::Combine,
            tokens,
            hidden,
            top_k,
            dtype,
            peak,
        )?,
    ));
    Ok(chain(chip, preset, tokens, experts, quant, dtype, parts))
}

/// The vector-only kernels the chain adds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum VectorJob {
    /// Rows gathered by the dispatch layout (and quantised per token for W8A8).
    Gather { quantise: bool },
    /// Per-token dynamic quantisation of the intermediate (W8A8).
    Quantise,
    /// out[t] = Σ_j w[t, j] · expert_out[slot_rows[t, j]].
    Combine,
}

impl VectorJob {
    fn kernel(self) -> &'static str {
        match self {
            VectorJob::Gather { .. } => "MoeGather",
            VectorJob::Quantise => "MoeQuant",
            VectorJob::Combine => "MoeCombine",
        }
    }

    fn quantises(self) -> bool {
        matches!(
            self,
            VectorJob::Gather { quantise: true } | VectorJob::Quantise
        )
    }
}

/// A vector-only kernel of the chain over `rows` rows of `width` columns (for the combine:
/// `rows` tokens, each summing `top_k` expert rows), walked in column chunks.
#[allow(clippy::too_many_arguments)]
fn vector_kernel(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    job: VectorJob,
    rows: u64,
    width: u64,
    top_k: u64,
    dtype: Dtype,
    peak: Option<Peak>,
) -> Result<AscendPlan> {
    let chunks: Vec<u64> = CHUNKS
        .into_iter()
        .filter(|&c| c <= width.next_power_of_two().max(256))
        .collect();
    first_fit(chunks, |chunk| {
        vector_build(
            chip,
            preset,
            job,
            rows,
            width,
            top_k,
            dtype,
            chunk,
            peak.clone(),
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn vector_build(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    job: VectorJob,
    rows: u64,
    width: u64,
    top_k: u64,
    dtype: Dtype,
    chunk: u64,
    peak: Option<Peak>,
) -> Result<AscendPlan> {
    let kernel = job.kernel();
    let e = dtype.bytes();
    let dt = dtype.name();
    let separated = chip.arch == CoreArch::Separated;
    let mut layout = Layout::new(
        chip,
        kernel,
        format!("{kernel} on {} (chunk={chunk})", chip.name),
    );
    // Rows a core has in flight: one row, walked chunk by chunk (k rows for the combine).
    let in_rows = if job == VectorJob::Combine { top_k } else { 1 };
    if job != VectorJob::Quantise {
        layout.add(
            Memory::Ub,
            "row indices",
            format!("[{in_rows}] i32"),
            &[in_rows],
            4,
            2,
        );
    }
    layout.add(
        Memory::Ub,
        "rows in",
        format!("[{in_rows}, {chunk}] {dt}"),
        &[in_rows, chunk],
        e,
        2,
    );
    layout.add(
        Memory::Ub,
        "f32 chunk",
        format!("[{chunk}] f32"),
        &[chunk],
        4,
        1,
    );
    if job == VectorJob::Combine {
        layout.add(
            Memory::Ub,
            "weights",
            format!("[{top_k}] f32"),
            &[top_k],
            4,
            2,
        );
    }
    if job.quantises() {
        layout.add(
            Memory::Ub,
            "int8 out",
            format!("[{chunk}] i8"),
            &[chunk],
            1,
            2,
        );
        layout.add(Memory::Ub, "scale", "[1] f32".into(), &[1], 4, 2);
    } else {
        layout.add(Memory::Ub, "out", format!("[{chunk}] {dt}"), &[chunk], e, 2);
    }
    let (buffers, memory) = layout.finish()?;

    let (cores_used, rows_per_core) = spread(rows, chip.vector_cores);
    let chunks_per_row = width.div_ceil(chunk);
    let out_bytes = if job.quantises() { 1 } else { e };
    // Quantising reads a row twice (max, then scale and round): the row stays in L2 between.
    let reads = if job.quantises() { 2 } else { 1 };
    let row_in = product("row bytes", &[in_rows, width, e, reads])?;
    let row_out = add(
        "row bytes",
        mul("row bytes", width, out_bytes)?,
        if job.quantises() { 4 } else { 0 },
    )?;
    let per_row = add(
        "row bytes",
        add("row bytes", row_in, row_out)?,
        mul("row bytes", in_rows, 8)?,
    )?;
    let gm_bytes = mul("GM bytes", rows_per_core, per_row)?;
    let roofline = Roofline::estimate(
        chip,
        cores_used,
        RooflineWork {
            cube_flops: 0.0,
            gm_bytes: gm_bytes as f64,
            workspace_bytes: 0.0,
            int8_cube: false,
        },
        peak,
    );
    let core = if separated {
        CoreRole::Aiv
    } else {
        CoreRole::AiCore
    };
    let (stage, wgsl, work) = match job {
        VectorJob::Gather { quantise } => (
            "gather",
            "moe_gather.wgsl: gather",
            format!(
                "per dispatch row: read sorted_slots[row], DataCopy the token's hidden row \
                 (slot / k) GM -> UB in {chunk}-column chunks{}, CopyOut to x_sorted; the row's \
                 weight to row_weights",
                if quantise {
                    "; DynamicQuant fused: a first pass takes max |x| (Abs, ReduceMax), scale = \
                     max / 127, a second pass Muls by 1 / scale, Cast to int8 (round to nearest), \
                     writes the int8 row and its f32 scale"
                } else {
                    ""
                }
            ),
        ),
        VectorJob::Quantise => (
            "quantise",
            "-",
            format!(
                "per intermediate row: max |x| over the {width} columns (chunked), scale = max / \
                 127, Muls by 1 / scale, Cast to int8 (round to nearest), CopyOut the int8 row \
                 and the f32 per-token scale for the down projection"
            ),
        ),
        VectorJob::Combine => (
            "combine",
            "moe_combine.wgsl: combine",
            format!(
                "per token: CopyIn its k slot rows (slot_rows) and weights, then per \
                 {chunk}-column chunk DataCopy the k expert rows, Muls by the weight and Add in \
                 slot order in f32 (the weight is already applied by the down projection's row \
                 scale in our layer: then plain Adds), Cast, CopyOut"
            ),
        ),
    };
    let mut b = Builder::new(kernel);
    let mut computed: Vec<usize> = Vec::new();
    for j in 0..3usize {
        let mut deps = Vec::new();
        if j >= 2 {
            deps.push(Dep::On(computed[j - 2]));
        }
        let load = b.step(core, Pipe::Mte2, &format!("rows{j}"), &deps);
        let v = b.step(core, Pipe::V, &format!("{stage}{j}"), &[Dep::On(load)]);
        computed.push(v);
        b.step(core, Pipe::Mte3, &format!("out{j}"), &[Dep::On(v)]);
    }
    let io = |name: &str, dtype: &str| Io::new(name, dtype, "FORMAT_ND");
    let (inputs, outputs) = match job {
        VectorJob::Gather { quantise } => (
            vec![
                io("hidden", dtype.ge()),
                io("sorted_slots", "DT_INT32"),
                io("topk_weights", "DT_FLOAT"),
            ],
            vec![
                io("x_sorted", if quantise { "DT_INT8" } else { dtype.ge() }),
                io("row_weights", "DT_FLOAT"),
            ]
            .into_iter()
            .chain(quantise.then(|| io("x_scale", "DT_FLOAT")))
            .collect(),
        ),
        VectorJob::Quantise => (
            vec![io("intermediate", dtype.ge())],
            vec![io("y", "DT_INT8"), io("scale", "DT_FLOAT")],
        ),
        VectorJob::Combine => (
            vec![
                io("expert_out", dtype.ge()),
                io("slot_rows", "DT_INT32"),
                io("topk_weights", "DT_FLOAT"),
            ],
            vec![io("out", dtype.ge())],
        ),
    };
    let kernel_def = Kernel {
        name: kernel.into(),
        split: CoreSplit {
            kernel: if separated {
                "vector only (AIV)".into()
            } else {
                "AI core (vector unit)".into()
            },
            block_dim: cores_used,
            cube_cores_used: 0,
            vector_cores_used: cores_used,
            work_unit: if job == VectorJob::Combine {
                "token".into()
            } else {
                "row".into()
            },
            work_units: rows,
            units_per_core: rows_per_core,
        },
        tiling: vec![
            TilingField::u32("rows", rows, "tokens x top_k (tokens for the combine)")?,
            TilingField::u32(
                "width",
                width,
                "h (the intermediate i for the quantisation)",
            )?,
            TilingField::u32("topK", top_k, "k")?,
            TilingField::u32(
                "chunk",
                chunk,
                "none: one invocation per 32-bit word on the GPU",
            )?,
            TilingField::u32("chunksPerRow", chunks_per_row, "none")?,
            TilingField::u32(
                "rowsPerCore",
                rows_per_core,
                "none: the GPU grid covers every row",
            )?,
        ],
        key: TilingKey::new(&[
            (
                "dtype",
                &["f16", "bf16"],
                dt,
                "OUT_DTYPE / Y_DTYPE overrides",
            ),
            (
                "quantise",
                &["off", "on"],
                if job.quantises() { "on" } else { "off" },
                "none: the GPU W8A8 path quantises in its own kernels",
            ),
        ]),
        workspace: Workspace::new(0, cores_used)?,
        op_def: OpDefSpec {
            inputs,
            outputs,
            config: soc_config(chip).into(),
        },
        shape: KernelShape {
            kernel_type: if separated {
                "KERNEL_TYPE_AIV_ONLY".into()
            } else {
                "the AI core's vector unit (no cube work)".into()
            },
            flags: Vec::new(),
            sync: "queues between MTE2, V and MTE3".into(),
            params: vec![(
                "DataCopyExtParams + DataCopyPadExtParams".into(),
                "one row (or chunk) per copy, rows addressed through the index list".into(),
            )],
        },
        timeline: b.finish(),
    };
    Ok(AscendPlan {
        op: "moe",
        command: String::new(),
        chip,
        preset,
        problem: Vec::new(),
        choices: vec![("chunk".into(), chunk.to_string())],
        kernels: vec![kernel_def],
        stages: vec![Stage::new(stage, vector_unit(chip), wgsl, work)],
        buffers,
        memory,
        roofline,
        start: Vec::new(),
        correspondence: Vec::new(),
        notes: Vec::new(),
    })
}

/// Give a component plan's kernel, buffers and timeline the chain's name for it.
fn rename(plan: &mut AscendPlan, name: &str) {
    for k in &mut plan.kernels {
        k.name = name.to_string();
        for step in &mut k.timeline.steps {
            step.kernel = name.to_string();
        }
    }
    for b in &mut plan.buffers {
        b.kernel = name.to_string();
    }
    for m in &mut plan.memory {
        m.kernel = name.to_string();
    }
}

/// Optional times add up; unknown if any is unknown.
fn sum_us(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.sum()
}

fn chain(
    chip: &'static ChipSpec,
    preset: Option<Preset>,
    tokens: u64,
    experts: u64,
    quant: &str,
    dtype: Dtype,
    parts: Vec<(&str, AscendPlan)>,
) -> AscendPlan {
    let separated = chip.arch == CoreArch::Separated;
    let mut kernels = Vec::new();
    let mut stages = Vec::new();
    let mut buffers = Vec::new();
    let mut memory = Vec::new();
    let mut choices = Vec::new();
    let mut rooflines = Vec::new();
    for (name, mut part) in parts {
        rename(&mut part, name);
        for st in part.stages {
            stages.push(Stage {
                name: format!("{name}: {}", st.name),
                ..st
            });
        }
        for (k, v) in part.choices {
            choices.push((format!("{name}.{k}"), v));
        }
        kernels.extend(part.kernels);
        buffers.extend(part.buffers);
        memory.extend(part.memory);
        rooflines.push(part.roofline);
    }
    let peak = rooflines.first().and_then(|r| r.peak.clone());
    let cube: f64 = rooflines.iter().map(|r| r.cube_flops_per_core).sum();
    let gm: f64 = rooflines.iter().map(|r| r.gm_bytes_per_core).sum();
    let compute_us = sum_us(rooflines.iter().map(|r| r.compute_us));
    let memory_us = sum_us(rooflines.iter().map(|r| r.memory_us));
    let roofline = Roofline {
        cube_flops_per_core: cube,
        int8_cube: quant == "w8a8",
        gm_bytes_per_core: gm,
        workspace_bytes_per_core: rooflines.iter().map(|r| r.workspace_bytes_per_core).sum(),
        intensity: if gm > 0.0 { cube / gm } else { 0.0 },
        ridge: rooflines.iter().find_map(|r| r.ridge),
        peak,
        compute_us,
        memory_us,
        bound: match (compute_us, memory_us) {
            (Some(c), Some(m)) if c > m => Some(super::plan::Bound::Compute),
            (Some(_), Some(_)) => Some(super::plan::Bound::Memory),
            _ => None,
        },
    };
    let w8a8 = quant == "w8a8";
    let start = if separated {
        vec![
            StartPoint::new(
                "compare with",
                format!(
                    "MoeGatingTopK -> {} -> GroupedMatmul V5 (gate/up) -> {} -> GroupedMatmul V5 \
                     (down) -> MoeFinalizeRoutingV2 (dropPadMode 2: our row-major slot order)",
                    if w8a8 {
                        "MoeInitRoutingQuantV2 (routing with dynamic quantisation)"
                    } else {
                        "MoeInitRoutingV2"
                    },
                    if w8a8 {
                        "GroupedMatmulSwigluQuant (dequantisation, SwiGLU and re-quantisation \
                         fused)"
                    } else {
                        "SwiGlu"
                    }
                ),
                "hicann/ops-transformer moe/moe_gating_top_k, moe/moe_init_routing_v2, \
                 moe/moe_init_routing_quant_v2, gmm/grouped_matmul, gmm/grouped_matmul_swiglu_quant, \
                 moe/moe_finalize_routing_v2",
            ),
            StartPoint::new(
                "torch_npu",
                "npu_moe_gating_top_k -> npu_moe_init_routing_v2 (quant_mode for W8A8) -> \
                 npu_grouped_matmul -> npu_grouped_matmul -> npu_moe_finalize_routing",
                "Ascend Extension for PyTorch API (torch_npu)",
            ),
        ]
    } else {
        vec![
            StartPoint::new(
                "compare with",
                "MoeInitRoutingV2 (dispatch, f16/f32) -> GroupedMatmul (f16, NZ weights, no \
                 activation, no quantisation) -> SwiGlu -> GroupedMatmul -> MoeFinalizeRoutingV2 \
                 (CANN 8.5: dropPadMode 2, f16/f32) or MoeTokenUnpermute; no routing built-in \
                 (MoeGatingTopK is A2/A3 only) and no quantised grouped matmul on this chip",
                "hicann/ops-transformer op_host registrations (ascend310p configurations)",
            ),
            StartPoint::new(
                "torch_npu",
                "npu_moe_init_routing_v2 -> npu_grouped_matmul -> npu_grouped_matmul, f16",
                "Ascend Extension for PyTorch API (torch_npu)",
            ),
        ]
    };
    let correspondence = vec![
        Correspondence::new(
            "one command buffer, seven compute passes (moe::STEPS)",
            "one launch per kernel on one stream; each kernel's outputs in GM feed the next",
        ),
        Correspondence::new(
            "indirect dispatches sized from the router's device offsets",
            "each grouped matmul reads the group list from GM in scalar code; blockDim fixed on \
             the host",
        ),
        Correspondence::new(
            "`moe_gather.wgsl` (x_sorted, row_weights)",
            "MoeGather (vector only), DynamicQuant fused for W8A8",
        ),
        Correspondence::new(
            "`moe_combine.wgsl` (Σ over the token's k rows, plus the shared expert)",
            "MoeCombine (vector only); the shared expert's output added as one more row",
        ),
    ];
    let notes = vec![
        format!(
            "{} kernels in order: {}; every kernel is planned as its operator would be, with \
             uniform routing",
            kernels.len(),
            kernels
                .iter()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>()
                .join(" -> ")
        ),
        "the roofline sums the busiest core of every kernel (launch overheads not modelled)"
            .to_string(),
        "the shared expert is not planned here: two more grouped matmuls with one group, or \
         one plain matmul, beside the routed experts"
            .to_string(),
    ];
    AscendPlan {
        op: "moe",
        command: String::new(),
        chip,
        preset,
        problem: vec![
            ("tokens".into(), tokens.to_string()),
            ("experts".into(), experts.to_string()),
            ("dtype".into(), dtype.name().into()),
            ("quant".into(), quant.into()),
        ],
        choices,
        kernels,
        stages,
        buffers,
        memory,
        roofline,
        start,
        correspondence,
        notes,
    }
}
