//! The fused router: its plan (workgroup size, reductions, token tile), params and pipelines, and
//! the recording of routing + dispatch layout as three dispatches in one compute pass.

use std::sync::OnceLock;

use super::dispatch::{self, DispatchLayout, Launch, LayoutSteps};
use super::{
    DeviceInputs, GroupScore, InputShape, OP, RouterConfig, RouterOutput, Scores, Scoring,
    Selection, check_inputs,
};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, Recorder};
use crate::tensor::{DType, DeviceTensor};

const ROUTE_SOURCE: &str = include_str!("../../../shaders/merrouter_route.wgsl");
const SUBGROUP_REDUCTIONS: &str = include_str!("../../../shaders/merrouter_route_subgroup.wgsl");
const REDUCTIONS_BEGIN: &str = "// @reductions-begin";
const REDUCTIONS_END: &str = "// @reductions-end";

/// Columns of hidden the fused gate stages per step (HIDDEN_TILE in the shader).
const HIDDEN_TILE: u64 = 32;
/// Tokens per workgroup of the fused gate, at most (each gate weight element is read once per
/// this many tokens).
const GATE_TILE: u32 = 8;

/// The routing kernel with workgroup-memory reductions.
pub(crate) const ROUTE: Kernel = Kernel {
    name: "merrouter_route",
    source: ROUTE_SOURCE,
};

/// The routing kernel with subgroup reductions: merrouter_route.wgsl with its reduction section
/// replaced by merrouter_route_subgroup.wgsl, so the routing code exists once.
pub fn route_subgroup_kernel() -> Kernel {
    static SOURCE: OnceLock<String> = OnceLock::new();
    let source = SOURCE.get_or_init(|| {
        splice_reductions(ROUTE_SOURCE, SUBGROUP_REDUCTIONS)
            .expect("merrouter_route.wgsl has the reduction markers (checked by a unit test)")
    });
    Kernel {
        name: "merrouter_route_subgroup",
        source,
    }
}

/// `base` with the text from the begin marker to the end of the end marker replaced.
fn splice_reductions(base: &str, reductions: &str) -> Option<String> {
    let begin = base.find(REDUCTIONS_BEGIN)?;
    let end = base.find(REDUCTIONS_END)? + REDUCTIONS_END.len();
    (begin < end).then(|| format!("{}{}{}", &base[..begin], reductions, &base[end..]))
}

/// Params of the routing kernel (merrouter_route.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct RouteParams {
    pub tokens: u32,       // t
    pub hidden: u32,       // h: columns of hidden [t, h], rows of gate_weight [h, e] (fused gate)
    pub block_tokens: u32, // tokens per dispatch block: block_counts row = token / block_tokens
    pub scaling: f32,      // routed_scaling_factor
}

/// How the routing kernel is launched on this adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RoutePlan {
    /// Threads per workgroup (a power of two).
    pub wg: u32,
    /// Subgroup reductions (else workgroup-memory trees).
    pub subgroups: bool,
    /// Posting slots of the subgroup reductions: `wg / smallest subgroup size`, rounded up.
    pub sg_slots: u32,
    /// Tokens per workgroup (1 from logits; up to [`GATE_TILE`] with the fused gate).
    pub tile: u32,
}

impl RoutePlan {
    pub fn new(gpu: &Gpu, config: &RouterConfig, fused_gate: bool) -> Result<Self> {
        let caps = &gpu.caps;
        let max_wg = caps.max_invocations_per_workgroup.max(1);
        let max_wg = 1u32 << (31 - max_wg.leading_zeros());
        let wg = (config.experts as u32)
            .next_power_of_two()
            .clamp(32, 128)
            .min(max_wg);
        let subgroups = caps.subgroups;
        let sg_slots = wg.div_ceil(caps.subgroup_size.0.max(1));
        let shared = |tile: u32| {
            let (e, g, k) = (
                config.experts as u64,
                config.groups as u64,
                config.top_k as u64,
            );
            let reductions = 3 * if subgroups { sg_slots } else { wg } as u64;
            4 * (tile as u64 * e + e + 2 * g + k + tile as u64 * HIDDEN_TILE + reductions)
        };
        let storage = caps.max_workgroup_storage as u64;
        let tiles: &[u32] = if fused_gate {
            &[GATE_TILE, 4, 2, 1]
        } else {
            &[1]
        };
        let tile = tiles
            .iter()
            .copied()
            .find(|&t| shared(t) <= storage)
            .ok_or(Error::Limit {
                what: format!("workgroup memory for routing {} experts", config.experts),
                need: shared(1),
                max: storage,
            })?;
        Ok(RoutePlan {
            wg,
            subgroups,
            sg_slots,
            tile,
        })
    }

    pub fn kernel(&self) -> Kernel {
        if self.subgroups {
            route_subgroup_kernel()
        } else {
            ROUTE
        }
    }

    pub fn describe(&self) -> String {
        let reductions = if self.subgroups {
            "subgroup"
        } else {
            "workgroup-memory"
        };
        let tile = if self.tile > 1 {
            format!(", {} tokens per workgroup", self.tile)
        } else {
            String::new()
        };
        format!("{reductions} reductions, route wg {}{tile}", self.wg)
    }
}

/// Override constants of the routing module: the config, the plan and the inputs' dtypes.
pub(crate) fn route_constants(
    config: &RouterConfig,
    plan: &RoutePlan,
    inputs: &InputBuffers,
) -> Vec<(&'static str, f64)> {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let (selection, group_score) = match config.selection {
        Selection::Moge => (0.0, GroupScore::Max),
        Selection::GroupLimited { group_score, .. } => (1.0, group_score),
    };
    let mut constants = vec![
        ("WG", plan.wg as f64),
        ("E", config.experts as f64),
        ("G", config.groups as f64),
        ("K", config.top_k as f64),
        ("K_GROUP", config.kept_groups() as f64),
        ("TILE", plan.tile as f64),
        (
            "SCORING",
            match config.scoring {
                Scoring::Softmax => 0.0,
                Scoring::Sigmoid => 1.0,
            },
        ),
        ("SELECTION", selection),
        (
            "GROUP_SCORE",
            match group_score {
                GroupScore::Max => 0.0,
                GroupScore::SumTop2 => 1.0,
            },
        ),
        ("HAS_BIAS", flag(inputs.bias.is_some())),
        ("HAS_SCALE", flag(inputs.router_scale.is_some())),
        ("RENORMALIZE", flag(config.renormalize)),
        ("FUSED_GATE", flag(inputs.hidden.is_some())),
        ("IN_DTYPE", inputs.in_dtype.shader_code() as f64),
        ("W_DTYPE", inputs.weight_dtype.shader_code() as f64),
        ("BIAS_DTYPE", inputs.bias_dtype.shader_code() as f64),
        ("SCALE_DTYPE", inputs.scale_dtype.shader_code() as f64),
    ];
    if plan.subgroups {
        constants.push(("SG_SLOTS", plan.sg_slots as f64));
    }
    constants
}

/// The router's input buffers (kept for the unfused chain, which binds them again).
pub(crate) struct InputBuffers {
    /// Logits, or hidden with the fused gate.
    pub scores: wgpu::Buffer,
    /// The gate weight (fused gate) or a 16-byte placeholder.
    pub gate_weight: wgpu::Buffer,
    pub bias: Option<wgpu::Buffer>,
    pub router_scale: Option<wgpu::Buffer>,
    /// Placeholder bound where an optional input is absent.
    pub unused: wgpu::Buffer,
    pub in_dtype: DType,
    pub weight_dtype: DType,
    /// Dtypes of the bias and the router scale (f32 when absent).
    pub bias_dtype: DType,
    pub scale_dtype: DType,
    /// Hidden size with the fused gate.
    pub hidden: Option<usize>,
}

impl InputBuffers {
    pub fn bias(&self) -> wgpu::BindingResource<'_> {
        self.bias
            .as_ref()
            .unwrap_or(&self.unused)
            .as_entire_binding()
    }
    pub fn router_scale(&self) -> wgpu::BindingResource<'_> {
        self.router_scale
            .as_ref()
            .unwrap_or(&self.unused)
            .as_entire_binding()
    }
}

/// The routing outputs on the device.
#[derive(Debug)]
pub struct Routing {
    /// `[t, k]` i32: chosen experts, in selection order (MoGE: group by group).
    pub topk_ids: DeviceTensor,
    /// `[t, k]` f32.
    pub topk_weights: DeviceTensor,
}

/// The fused router bound to its inputs: routing and the full dispatch layout, recorded into a
/// caller's [`Recorder`] as three dispatches in one compute pass (no host round trip).
pub struct Router {
    config: RouterConfig,
    plan: RoutePlan,
    shape: InputShape,
    routing: Routing,
    layout: DispatchLayout,
    route: Launch,
    layout_steps: LayoutSteps,
    inputs: InputBuffers,
    params: wgpu::Buffer,
}

impl Router {
    /// Check the config and inputs, plan the kernels for this adapter, allocate the outputs and
    /// bind everything. Bad input returns an error before anything is allocated or compiled.
    pub fn new(gpu: &Gpu, config: &RouterConfig, inputs: &DeviceInputs<'_>) -> Result<Self> {
        let shape = check_inputs(config, inputs)?;
        let (t, e, k) = (shape.tokens, config.experts, config.top_k);
        let (scores, gate_weight, scores_name) = match inputs.scores {
            Scores::Logits(logits) => (logits, None, "logits"),
            Scores::Gate { hidden, weight } => (hidden, Some(weight), "hidden"),
        };
        gpu.check_binding(scores_name, scores.size_bytes())?;
        if let Some(weight) = gate_weight {
            gpu.check_binding("gate weight", weight.size_bytes())?;
        }
        gpu.check_binding("topk_ids", 4 * (t * k) as u64)?;
        dispatch::check_layout_limits(gpu, e, config.groups)?;
        let block_tokens = dispatch::block_tokens(gpu, e)?;
        let plan = RoutePlan::new(gpu, config, gate_weight.is_some())?;

        let inputs = InputBuffers {
            scores: scores.buffer().clone(),
            gate_weight: match gate_weight {
                Some(w) => w.buffer().clone(),
                None => gpu.storage_buffer("unused", 16)?,
            },
            bias: inputs.bias.map(|b| b.buffer().clone()),
            router_scale: inputs.router_scale.map(|s| s.buffer().clone()),
            unused: gpu.storage_buffer("unused", 16)?,
            in_dtype: scores.dtype(),
            weight_dtype: gate_weight.map_or(DType::F32, |w| w.dtype()),
            bias_dtype: inputs.bias.map_or(DType::F32, |b| b.dtype()),
            scale_dtype: inputs.router_scale.map_or(DType::F32, |s| s.dtype()),
            hidden: shape.hidden,
        };
        let routing = Routing {
            topk_ids: gpu.zeros(&[t, k], DType::I32)?,
            topk_weights: gpu.zeros(&[t, k], DType::F32)?,
        };
        let layout = DispatchLayout::new(
            gpu,
            (t, k),
            (e, config.groups),
            config.block_size,
            block_tokens,
        )?;
        let params = gpu.uniform(&RouteParams {
            tokens: t as u32,
            hidden: shape.hidden.unwrap_or(0) as u32,
            block_tokens,
            scaling: config.routed_scaling_factor,
        })?;
        let route = Launch::new(
            gpu,
            &plan.kernel(),
            "route",
            &route_constants(config, &plan, &inputs),
            &[
                (0, inputs.scores.as_entire_binding()),
                (1, inputs.gate_weight.as_entire_binding()),
                (2, inputs.bias()),
                (3, inputs.router_scale()),
                (4, routing.topk_ids.binding()),
                (5, routing.topk_weights.binding()),
                (6, layout.block_counts.binding()),
                (7, params.as_entire_binding()),
            ],
            (t as u32).div_ceil(plan.tile),
        )?;
        let layout_steps = LayoutSteps::new(gpu, &layout, &routing.topk_ids)?;
        Ok(Router {
            config: config.clone(),
            plan,
            shape,
            routing,
            layout,
            route,
            layout_steps,
            inputs,
            params,
        })
    }

    /// Record routing and the dispatch layout: a clear of the block counts, then one compute pass
    /// with `route`, `build_layout` and `scatter`. With no tokens nothing is recorded: the
    /// outputs are empty and the layout's zero-initialised counts, offsets, group loads and
    /// imbalance are already right.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.record_as(rec, OP)
    }

    /// [`Router::record`] with the compute pass named `label` (per-step timing of a chain).
    pub fn record_as(&self, rec: &mut Recorder, label: &str) -> Result<()> {
        if self.shape.tokens == 0 {
            return Ok(());
        }
        rec.encoder()
            .clear_buffer(self.layout.block_counts.buffer(), 0, None);
        let mut pass = rec.compute_pass(label);
        self.route.record(&mut pass);
        self.layout_steps.record(&mut pass);
        Ok(())
    }

    /// Kernel dispatches one [`Router::record`] makes (none for an empty batch).
    pub fn dispatches(&self) -> usize {
        if self.shape.tokens == 0 {
            0
        } else {
            1 + LayoutSteps::DISPATCHES
        }
    }

    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    pub fn layout(&self) -> &DispatchLayout {
        &self.layout
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    pub fn tokens(&self) -> usize {
        self.shape.tokens
    }

    /// The kernel variant this adapter got, e.g. `subgroup reductions, route wg 64, scatter
    /// blocks of 256 tokens`.
    pub fn variant(&self) -> String {
        format!(
            "{}, scatter blocks of {} tokens",
            self.plan.describe(),
            self.layout.block_tokens()
        )
    }

    /// Read the routing and the layout back.
    pub fn download(&self, gpu: &Gpu) -> Result<RouterOutput> {
        Ok(RouterOutput {
            topk_ids: gpu.download(&self.routing.topk_ids)?,
            topk_weights: gpu.download(&self.routing.topk_weights)?,
            layout: self.layout.download(gpu)?,
        })
    }

    /// The unfused baseline chain over the same inputs, writing the same outputs.
    pub fn unfused_chain(&self, gpu: &Gpu) -> Result<super::UnfusedChain> {
        super::baseline::UnfusedChain::new(gpu, self)
    }

    pub(crate) fn parts(&self) -> (&RoutePlan, &InputBuffers, &wgpu::Buffer) {
        (&self.plan, &self.inputs, &self.params)
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("config", &self.config)
            .field("tokens", &self.shape.tokens)
            .field("variant", &self.variant())
            .finish_non_exhaustive()
    }
}

/// The paths this adapter gets, for `fusedops info`.
pub(crate) fn paths(gpu: &Gpu) -> Vec<(String, String)> {
    let reductions = if gpu.caps.subgroups {
        format!(
            "subgroups (size {}..{})",
            gpu.caps.subgroup_size.0, gpu.caps.subgroup_size.1
        )
    } else {
        "workgroup memory".to_string()
    };
    vec![("routing reductions".to_string(), reductions)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_params_are_16_bytes() {
        assert_eq!(std::mem::size_of::<RouteParams>(), 16);
    }

    #[test]
    fn the_subgroup_variant_replaces_exactly_the_reductions() {
        let spliced = route_subgroup_kernel().source;
        assert!(!spliced.contains(REDUCTIONS_BEGIN) && !spliced.contains(REDUCTIONS_END));
        assert!(spliced.contains("subgroupMax") && !spliced.contains("array<u32, WG>"));
        assert!(spliced.contains("fn select_round") && spliced.contains("fn staged_topk"));
        assert_eq!(splice_reductions("no markers", "x"), None);
        // The spliced module validates like every file in shaders/ (tests/shaders_parse.rs).
        let composed = crate::gpu::compose_shader(spliced);
        let module = naga::front::wgsl::parse_str(&composed).expect("parses");
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .expect("validates");
    }
}
