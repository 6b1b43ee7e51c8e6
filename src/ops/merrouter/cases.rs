//! MerRouter in the registry: the case tables of `fusedops check` / `fusedops bench`, their
//! seeded inputs (tie-free by construction, see [`tie_free_logits`]), and `fusedops run`.

use super::reference::{self, LayoutRef, RoutingRef};
use super::{
    Combiner, DeviceInputs, GroupScore, HostInputs, OP, RouterConfig, Scores, Scoring, Selection,
    UnfusedChain, route::Router,
};
use crate::check::{Tolerance, compare};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::registry::{
    Case, CaseInfo, Checked, Coverage, HostPrepared, NamedTensors, Operator, Prepared, Scale,
    Target, check_input_names, input, params_from_json,
};
use crate::tensor::{DType, DeviceTensor, Tensor};

/// Routing weights: SPEC's rel 1e-6 (f32); the absolute floor only matters below 1e-3.
pub const WEIGHT_TOLERANCE: Tolerance = Tolerance::new(1e-9, 1e-6);
/// The imbalance is one f32 division of exact integers.
pub const IMBALANCE_TOLERANCE: Tolerance = Tolerance::new(0.0, 1e-6);
/// Smallest decision margin (choice units) of generated inputs: far above the kernel's f32
/// rounding, so the ids must match the reference exactly.
pub const MIN_MARGIN: f64 = 1e-5;

/// Tolerance of the combine output: f32 accumulation of k products (abs 1e-5, rel 1e-5), then
/// the conversion to `dtype`, whose relative error reaches 2^-8 for bf16 (8 significant bits,
/// round to nearest) and 2^-10 for f16 (11 bits; WGSL does not fix the rounding of
/// `pack2x16float`): twice that is allowed, so the accumulation error has room.
pub fn combine_tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::BF16 => Tolerance::new(1e-5, 1.0 / 128.0),
        DType::F16 => Tolerance::new(1e-5, 1.0 / 512.0),
        _ => Tolerance::new(1e-5, 1e-5),
    }
}

/// The operator, as registered in [`crate::suite::operators`].
pub struct MerRouterOp;

pub static OPERATOR: MerRouterOp = MerRouterOp;

/// SplitMix64: a small seeded generator, so the library needs no random-number dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in lo..=hi.
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Redraw every token whose reference decision margin is below [`MIN_MARGIN`]; `draw(token)`
/// redraws a token's inputs, `logits()` gives all logits. Deterministic for a seed.
fn redraw_close_calls(
    config: &RouterConfig,
    t: usize,
    bias: Option<&[f64]>,
    mut logits: impl FnMut() -> Result<Vec<f64>>,
    mut draw: impl FnMut(usize),
) -> Result<()> {
    let e = config.experts;
    let mut pending: Vec<usize> = (0..t).collect();
    for _ in 0..64 {
        let all = logits()?;
        let mut close = Vec::with_capacity(pending.len());
        for &token in &pending {
            let row = &all[token * e..(token + 1) * e];
            if reference::route(config, 1, row, bias, None)?.margins[0] < MIN_MARGIN {
                close.push(token);
            }
        }
        pending = close;
        if pending.is_empty() {
            return Ok(());
        }
        for &token in &pending {
            draw(token);
        }
    }
    Err(Error::invalid(
        OP,
        "case inputs",
        format!("{} tokens keep near-ties after 64 draws", pending.len()),
    ))
}

/// `[t, e]` f32 logits, uniform in [-3, 3), with every token's decisions clear of ties.
pub fn tie_free_logits(
    config: &RouterConfig,
    t: usize,
    bias: Option<&[f64]>,
    seed: u64,
) -> Result<Vec<f32>> {
    let e = config.experts;
    let mut rng = SplitMix(seed);
    let logits = std::cell::RefCell::new(
        (0..t * e)
            .map(|_| rng.uniform(-3.0, 3.0) as f32)
            .collect::<Vec<f32>>(),
    );
    redraw_close_calls(
        config,
        t,
        bias,
        || Ok(to_f64(&logits.borrow())),
        |token| {
            for v in &mut logits.borrow_mut()[token * e..(token + 1) * e] {
                *v = rng.uniform(-3.0, 3.0) as f32;
            }
        },
    )?;
    Ok(logits.into_inner())
}

/// Fused-gate inputs whose f32 products and sums are exact (hidden = i/8, weight = j/256 with
/// small integers, exact in bf16 too), so the gate adds no rounding and the ids must match.
pub fn tie_free_gate(
    config: &RouterConfig,
    t: usize,
    h: usize,
    bias: Option<&[f64]>,
    seed: u64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let e = config.experts;
    let mut rng = SplitMix(seed);
    let weight: Vec<f32> = (0..h * e)
        .map(|_| rng.int(-32, 32) as f32 / 256.0)
        .collect();
    let hidden = std::cell::RefCell::new(
        (0..t * h)
            .map(|_| rng.int(-8, 8) as f32 / 8.0)
            .collect::<Vec<f32>>(),
    );
    let weight64 = to_f64(&weight);
    redraw_close_calls(
        config,
        t,
        bias,
        || reference::gate_logits(t, h, e, &to_f64(&hidden.borrow()), &weight64),
        |token| {
            for v in &mut hidden.borrow_mut()[token * h..(token + 1) * h] {
                *v = rng.int(-8, 8) as f32 / 8.0;
            }
        },
    )?;
    Ok((hidden.into_inner(), weight))
}

/// What a case runs.
#[derive(Clone, Debug)]
enum Stage {
    /// Routing + dispatch layout.
    Route,
    /// The combine over `cols` columns of y in `dtype`.
    Combine { cols: usize, dtype: DType },
}

#[derive(Clone, Debug)]
struct RouterCase {
    preset: &'static str,
    config: RouterConfig,
    tokens: usize,
    /// Fused gate: hidden size and the dtype of hidden and the gate weight.
    gate: Option<(usize, DType)>,
    bias: bool,
    router_scale: bool,
    stage: Stage,
    seed: u64,
}

impl RouterCase {
    /// Pangu Pro MoE with its router scale.
    fn pangu(tokens: usize) -> Self {
        RouterCase {
            preset: "pangu-pro-moe",
            config: RouterConfig::pangu_pro_moe(),
            tokens,
            gate: None,
            bias: false,
            router_scale: true,
            stage: Stage::Route,
            seed: 0x7061_6e67 ^ tokens as u64,
        }
    }

    /// DeepSeek-V3 with its bias.
    fn deepseek(tokens: usize) -> Self {
        RouterCase {
            preset: "deepseek-v3",
            config: RouterConfig::deepseek_v3(),
            tokens,
            gate: None,
            bias: true,
            router_scale: false,
            stage: Stage::Route,
            seed: 0x6473_7633 ^ tokens as u64,
        }
    }

    fn gate(mut self, hidden: usize, dtype: DType) -> Self {
        self.gate = Some((hidden, dtype));
        self
    }

    fn block(mut self, block_size: usize) -> Self {
        self.config.block_size = block_size;
        self
    }

    fn combine(mut self, cols: usize, dtype: DType) -> Self {
        self.stage = Stage::Combine { cols, dtype };
        self
    }

    fn custom(config: RouterConfig, tokens: usize, bias: bool, router_scale: bool) -> Self {
        RouterCase {
            preset: "custom",
            config,
            tokens,
            gate: None,
            bias,
            router_scale,
            stage: Stage::Route,
            seed: 0x6375_7374 ^ tokens as u64,
        }
    }

    fn rows(&self) -> Result<usize> {
        let c = &self.config;
        reference::row_capacity(self.tokens, c.top_k, c.experts, c.block_size)
    }

    /// Seeded host inputs: logits (or hidden and the gate weight), bias, router scale.
    fn host_inputs(&self) -> Result<(ScoreTensors, Option<Tensor>, Option<Tensor>)> {
        let (t, e) = (self.tokens, self.config.experts);
        let mut rng = SplitMix(self.seed ^ 0xb1a5);
        let bias: Option<Vec<f32>> = self
            .bias
            .then(|| (0..e).map(|_| rng.uniform(-0.1, 0.1) as f32).collect());
        let scale: Option<Vec<f32>> = self
            .router_scale
            .then(|| (0..e).map(|_| rng.uniform(0.5, 1.5) as f32).collect());
        let bias64 = bias.as_deref().map(to_f64);
        let scores = match self.gate {
            None => (
                Tensor::f32(
                    &[t, e],
                    tie_free_logits(&self.config, t, bias64.as_deref(), self.seed)?,
                )?,
                None,
            ),
            Some((h, dtype)) => {
                let (hidden, weight) =
                    tie_free_gate(&self.config, t, h, bias64.as_deref(), self.seed)?;
                (
                    Tensor::from_f32(&[t, h], &hidden, dtype)?,
                    Some(Tensor::from_f32(&[h, e], &weight, dtype)?),
                )
            }
        };
        Ok((
            scores,
            bias.map(|b| Tensor::f32(&[e], b)).transpose()?,
            scale.map(|s| Tensor::f32(&[e], s)).transpose()?,
        ))
    }
}

/// Logits, or hidden and the gate weight.
type ScoreTensors = (Tensor, Option<Tensor>);

/// The [`Scores`] of logits, or of hidden with a gate weight.
fn scores_of<'a, T>(first: &'a T, gate_weight: Option<&'a T>) -> Scores<'a, T> {
    match gate_weight {
        None => Scores::Logits(first),
        Some(weight) => Scores::Gate {
            hidden: first,
            weight,
        },
    }
}

fn host_inputs_of<'a>(
    scores: &'a ScoreTensors,
    bias: Option<&'a Tensor>,
    router_scale: Option<&'a Tensor>,
) -> HostInputs<'a> {
    HostInputs {
        scores: scores_of(&scores.0, scores.1.as_ref()),
        bias,
        router_scale,
    }
}

/// The reference routing and layout for host inputs.
fn reference_of(config: &RouterConfig, inputs: &HostInputs<'_>) -> Result<(RoutingRef, LayoutRef)> {
    let e = config.experts;
    let (t, logits) = match inputs.scores {
        Scores::Logits(l) => (l.shape()[0], l.to_f64()),
        Scores::Gate { hidden, weight } => {
            let (t, h) = (hidden.shape()[0], hidden.shape()[1]);
            (
                t,
                reference::gate_logits(t, h, e, &hidden.to_f64(), &weight.to_f64())?,
            )
        }
    };
    let bias = inputs.bias.map(Tensor::to_f64);
    let scale = inputs.router_scale.map(Tensor::to_f64);
    let routing = reference::route(config, t, &logits, bias.as_deref(), scale.as_deref())?;
    let layout = reference::dispatch(
        &routing.ids,
        t,
        config.top_k,
        e,
        config.groups,
        config.block_size,
    )?;
    Ok((routing, layout))
}

impl Case for RouterCase {
    fn info(&self) -> CaseInfo {
        let c = &self.config;
        let mode = match c.selection {
            Selection::Moge => "moge".to_string(),
            Selection::GroupLimited {
                k_group,
                group_score,
            } => format!(
                "group-limited k_group={k_group} {}",
                match group_score {
                    GroupScore::Max => "max",
                    GroupScore::SumTop2 => "sum-top2",
                }
            ),
        };
        let scoring = match c.scoring {
            Scoring::Softmax => "softmax",
            Scoring::Sigmoid => "sigmoid",
        };
        let input = match self.gate {
            None => "logits".to_string(),
            Some((h, dtype)) => format!("gate h={h} {dtype}"),
        };
        let stage = match &self.stage {
            Stage::Route => "route".to_string(),
            Stage::Combine { cols, dtype } => format!("combine n={cols} {dtype}"),
        };
        let mut name = format!("t={} e={} k={} {input}", self.tokens, c.experts, c.top_k);
        if c.block_size > 1 {
            name += &format!(" block={}", c.block_size);
        }
        if let Stage::Combine { .. } = self.stage {
            name = format!("{stage} t={} k={}", self.tokens, c.top_k);
        }
        if self.preset == "custom" {
            name += &format!(" g={} {mode} {scoring}", c.groups);
        }
        CaseInfo {
            op: OP,
            name,
            preset: self.preset.to_string(),
            params: vec![
                ("stage".into(), stage),
                ("t".into(), self.tokens.to_string()),
                ("e".into(), c.experts.to_string()),
                ("g".into(), c.groups.to_string()),
                ("k".into(), c.top_k.to_string()),
                ("mode".into(), mode),
                ("scoring".into(), scoring.into()),
                ("input".into(), input),
                ("block".into(), c.block_size.to_string()),
            ],
        }
    }

    fn bytes(&self) -> u64 {
        let c = &self.config;
        let (t, e, k) = (self.tokens as u64, c.experts as u64, c.top_k as u64);
        match self.stage {
            Stage::Combine { cols, dtype } => {
                let n = cols as u64;
                let size = dtype.size() as u64;
                t * k * 8 + t * k * n * size + t * n * size
            }
            Stage::Route => {
                let scores = match self.gate {
                    None => t * e * 4,
                    Some((h, dtype)) => (t * h as u64 + h as u64 * e) * dtype.size() as u64,
                };
                let extras = 4 * e * (self.bias as u64 + self.router_scale as u64);
                // A case whose rows do not fit fails in prepare(); its size does not matter.
                let rows = self.rows().unwrap_or(0) as u64;
                let row_blocks = rows.div_ceil(c.block_size as u64);
                let layout = 4 * (e + e + 1 + rows + t * k + row_blocks + c.groups as u64 + 1);
                scores + extras + 2 * 4 * t * k + layout
            }
        }
    }

    fn flops(&self) -> u64 {
        let (t, e, k) = (
            self.tokens as u64,
            self.config.experts as u64,
            self.config.top_k as u64,
        );
        // Routing is counted as operations per (token, expert): the scoring (softmax: max, sub,
        // exp, sum, divide; sigmoid: negate, exp, add, divide) and one compare per selected
        // expert, so the case has a place on the roofline; the fused gate adds its GEMV.
        let scoring = match self.config.scoring {
            Scoring::Softmax => 5,
            Scoring::Sigmoid => 4,
        };
        let routing = t * e * (scoring + k);
        match (&self.stage, self.gate) {
            (Stage::Combine { cols, .. }, _) => 2 * t * k * *cols as u64,
            (Stage::Route, Some((h, _))) => 2 * t * h as u64 * e + routing,
            (Stage::Route, None) => routing,
        }
    }

    fn host(&self, _target: &Target) -> Result<Box<dyn HostPrepared>> {
        let (scores, bias, scale) = self.host_inputs()?;
        let host = host_inputs_of(&scores, bias.as_ref(), scale.as_ref());
        let (routing, layout) = reference_of(&self.config, &host)?;
        let combine = match self.stage {
            Stage::Route => None,
            Stage::Combine { cols, dtype } => {
                let (t, k) = (self.tokens, self.config.top_k);
                let rows = self.rows()?;
                let mut rng = SplitMix(self.seed ^ 0xc0b1);
                // Padding rows hold NaN: a read of one would poison the output.
                let mut y = vec![f32::NAN; rows * cols];
                for (r, &slot) in layout.sorted_slots.iter().enumerate() {
                    if slot != (t * k) as i32 {
                        for v in &mut y[r * cols..(r + 1) * cols] {
                            *v = rng.uniform(-2.0, 2.0) as f32;
                        }
                    }
                }
                let y = Tensor::from_f32(&[rows, cols], &y, dtype)?;
                let weights: Vec<f32> = routing.weights.iter().map(|&w| w as f32).collect();
                let expected = reference::combine(
                    t,
                    k,
                    cols,
                    &to_f64(&weights),
                    &layout.slot_rows,
                    &y.to_f64(),
                )?;
                Some(CombineHost {
                    weights: Tensor::f32(&[t, k], weights)?,
                    y,
                    expected,
                })
            }
        };
        Ok(Box::new(RouterHost {
            case: self.clone(),
            scores,
            bias,
            scale,
            routing,
            layout,
            combine,
        }))
    }
}

/// The combine stage's host inputs and reference.
struct CombineHost {
    /// `[t, k]` routing weights.
    weights: Tensor,
    /// `[rows, cols]` expert outputs in dispatch order, NaN in padding rows.
    y: Tensor,
    expected: Vec<f64>,
}

/// A case's host half: its inputs, the reference routing and layout, and for the combine stage
/// its inputs and reference.
struct RouterHost {
    case: RouterCase,
    scores: ScoreTensors,
    bias: Option<Tensor>,
    scale: Option<Tensor>,
    routing: RoutingRef,
    layout: LayoutRef,
    combine: Option<CombineHost>,
}

impl HostPrepared for RouterHost {
    fn upload<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>> {
        let c = &self.case;
        if let Some(combine) = &self.combine {
            let t = c.tokens;
            let weights = gpu.upload(&combine.weights)?;
            let slot_rows = gpu.upload(&Tensor::i32(
                &[t, c.config.top_k],
                self.layout.slot_rows.clone(),
            )?)?;
            let y = gpu.upload(&combine.y)?;
            let out = gpu.zeros(&[t, combine.y.shape()[1]], combine.y.dtype())?;
            let combiner = Combiner::new(gpu, &weights, &slot_rows, &y, &out)?;
            return Ok(Box::new(CombinePrepared {
                gpu,
                combiner,
                out,
                expected: combine.expected.clone(),
                _inputs: [weights, slot_rows, y],
            }));
        }
        let first = gpu.upload(&self.scores.0)?;
        let gate_weight = self.scores.1.as_ref().map(|w| gpu.upload(w)).transpose()?;
        let bias = self.bias.as_ref().map(|b| gpu.upload(b)).transpose()?;
        let scale = self.scale.as_ref().map(|s| gpu.upload(s)).transpose()?;
        let inputs = DeviceInputs {
            scores: scores_of(&first, gate_weight.as_ref()),
            bias: bias.as_ref(),
            router_scale: scale.as_ref(),
        };
        let router = Router::new(gpu, &c.config, &inputs)?;
        let chain = router.unfused_chain(gpu)?;
        Ok(Box::new(RoutePrepared {
            gpu,
            router,
            chain,
            routing: self.routing.clone(),
            layout: self.layout.clone(),
        }))
    }

    fn coverage(&self) -> Coverage {
        Coverage::new(self.case.tokens, self.case.tokens, "tokens")
    }
}

struct RoutePrepared<'g> {
    gpu: &'g Gpu,
    router: Router,
    chain: UnfusedChain,
    routing: RoutingRef,
    layout: LayoutRef,
}

/// Compare a routing and layout read back from the GPU with the reference.
pub fn check_router_output(
    out: &super::RouterOutput,
    routing: &RoutingRef,
    layout: &LayoutRef,
) -> Vec<Checked> {
    let exact = |name: &str, got: &Tensor, want: &[i32]| {
        let got = got.as_i32().unwrap_or(&[]);
        Checked::new(name, &[want.len()], compare(got, want, Tolerance::EXACT))
    };
    let ids = out.topk_ids.shape().to_vec();
    let l = &out.layout;
    vec![
        Checked::new(
            "topk_ids",
            &ids,
            compare(
                out.topk_ids.as_i32().unwrap_or(&[]),
                &routing.ids,
                Tolerance::EXACT,
            ),
        ),
        Checked::new(
            "topk_weights",
            &ids,
            compare(
                out.topk_weights.as_f32().unwrap_or(&[]),
                &routing.weights,
                WEIGHT_TOLERANCE,
            ),
        ),
        exact("counts", &l.counts, &layout.counts),
        exact("offsets", &l.offsets, &layout.offsets),
        exact("sorted_slots", &l.sorted_slots, &layout.sorted_slots),
        exact("slot_rows", &l.slot_rows, &layout.slot_rows),
        exact("block_experts", &l.block_experts, &layout.block_experts),
        exact("group_loads", &l.group_loads, &layout.group_loads),
        Checked::new(
            "imbalance",
            &[1],
            compare(
                l.imbalance.as_f32().unwrap_or(&[]),
                &[layout.imbalance],
                IMBALANCE_TOLERANCE,
            ),
        ),
    ]
}

impl Prepared for RoutePrepared<'_> {
    fn variant(&self) -> String {
        self.router.variant()
    }

    fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.router.record(rec)
    }

    fn verify(&self) -> Result<Vec<Checked>> {
        let out = self.router.download(self.gpu)?;
        Ok(check_router_output(&out, &self.routing, &self.layout))
    }

    fn baseline(&self) -> Option<String> {
        Some(format!(
            "unfused chain ({} kernels)",
            self.chain.dispatches()
        ))
    }

    fn record_baseline(&self, rec: &mut Recorder) -> Result<()> {
        self.chain.record(rec)
    }
}

struct CombinePrepared<'g> {
    gpu: &'g Gpu,
    combiner: Combiner,
    out: DeviceTensor,
    expected: Vec<f64>,
    _inputs: [DeviceTensor; 3],
}

impl Prepared for CombinePrepared<'_> {
    fn variant(&self) -> String {
        "one thread per output word".to_string()
    }

    fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.combiner.record(rec)
    }

    fn verify(&self) -> Result<Vec<Checked>> {
        let got = self.gpu.download_f32(&self.out)?;
        Ok(vec![Checked::new(
            "out",
            self.out.shape(),
            compare(&got, &self.expected, combine_tolerance(self.out.dtype())),
        )])
    }
}

fn custom_cases() -> Vec<RouterCase> {
    let moge = RouterConfig {
        experts: 12,
        groups: 3,
        top_k: 6,
        scoring: Scoring::Sigmoid,
        selection: Selection::Moge,
        renormalize: true,
        routed_scaling_factor: 1.5,
        block_size: 4,
    };
    let limited = RouterConfig {
        experts: 20,
        groups: 4,
        top_k: 5,
        scoring: Scoring::Softmax,
        selection: Selection::GroupLimited {
            k_group: 2,
            group_score: GroupScore::Max,
        },
        renormalize: false,
        routed_scaling_factor: 1.0,
        block_size: 1,
    };
    vec![
        RouterCase::custom(moge, 9, false, true),
        RouterCase::custom(limited, 9, true, false),
    ]
}

impl Operator for MerRouterOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cases(&self, scale: Scale, gpu: &Gpu) -> Vec<Box<dyn Case>> {
        let cases: Vec<RouterCase> = match scale {
            Scale::Ci => {
                let mut v = vec![
                    RouterCase::pangu(7),
                    RouterCase::deepseek(7),
                    RouterCase::pangu(33).gate(64, DType::BF16),
                    RouterCase::deepseek(5).block(16),
                    RouterCase::deepseek(7).block(16).combine(40, DType::BF16),
                ];
                v.extend(custom_cases());
                v
            }
            Scale::Full => vec![
                RouterCase::pangu(1),
                RouterCase::pangu(4096),
                RouterCase::deepseek(1),
                RouterCase::deepseek(4096),
                RouterCase::deepseek(4096).block(64),
                RouterCase::pangu(128).gate(5120, DType::BF16),
                RouterCase::deepseek(64).gate(7168, DType::BF16),
                RouterCase::deepseek(512).combine(7168, DType::BF16),
            ],
            Scale::Bench => return self.headline(!gpu.is_cpu()),
        };
        cases
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Case>)
            .collect()
    }

    /// Routing and the full dispatch layout of 4096 tokens (256 on a CPU adapter) for
    /// pangu-pro-moe and deepseek-v3, against the unfused chain of separate kernels.
    fn headline(&self, full: bool) -> Vec<Box<dyn Case>> {
        let t = if full { 4096 } else { 256 };
        vec![
            Box::new(RouterCase::pangu(t)),
            Box::new(RouterCase::deepseek(t)),
        ]
    }

    fn paths(&self, gpu: &Gpu) -> Vec<(String, String)> {
        super::route::paths(gpu)
    }

    fn run_named(
        &self,
        gpu: &Gpu,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let run: RunParams = params_from_json(OP, params)?;
        let config = run.config()?;
        let (scores, bias, scale) = named_inputs(inputs)?;
        let host = host_inputs_of(&scores, bias, scale);
        let out = super::route_and_dispatch(gpu, &config, &host)?;
        let mut named = NamedTensors::new();
        if let Some(y) = inputs.get("y") {
            check_y_rows(y, out.layout.sorted_slots.numel())?;
            let combined =
                super::combine(gpu, &out.topk_weights, &out.layout.slot_rows, y, y.dtype())?;
            named.insert("out".into(), combined);
        }
        for (name, tensor) in out.layout.named() {
            named.insert(name.into(), tensor.clone());
        }
        named.insert("topk_ids".into(), out.topk_ids);
        named.insert("topk_weights".into(), out.topk_weights);
        Ok(named)
    }

    fn reference_named(
        &self,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let run: RunParams = params_from_json(OP, params)?;
        let config = run.config()?;
        let (scores, bias, scale) = named_inputs(inputs)?;
        let host = host_inputs_of(&scores, bias, scale);
        let shape = super::check_inputs(&config, &host)?;
        let (routing, layout) = reference_of(&config, &host)?;
        let (t, k) = (shape.tokens, config.top_k);
        let i32s = |shape: &[usize], v: &[i32]| Tensor::i32(shape, v.to_vec());
        let mut named = NamedTensors::new();
        if let Some(y) = inputs.get("y") {
            check_y_rows(y, layout.sorted_slots.len())?;
            let out = reference::combine(
                t,
                k,
                y.shape()[1],
                &routing.weights,
                &layout.slot_rows,
                &y.to_f64(),
            )?;
            let out: Vec<f32> = out.iter().map(|&v| v as f32).collect();
            named.insert(
                "out".into(),
                Tensor::from_f32(&[t, y.shape()[1]], &out, y.dtype())?,
            );
        }
        let weights: Vec<f32> = routing.weights.iter().map(|&w| w as f32).collect();
        named.insert("topk_ids".into(), i32s(&[t, k], &routing.ids)?);
        named.insert("topk_weights".into(), Tensor::f32(&[t, k], weights)?);
        let e = config.experts;
        named.insert("counts".into(), i32s(&[e], &layout.counts)?);
        named.insert("offsets".into(), i32s(&[e + 1], &layout.offsets)?);
        let rows = layout.sorted_slots.len();
        named.insert("sorted_slots".into(), i32s(&[rows], &layout.sorted_slots)?);
        named.insert("slot_rows".into(), i32s(&[t, k], &layout.slot_rows)?);
        let blocks = layout.block_experts.len();
        named.insert(
            "block_experts".into(),
            i32s(&[blocks], &layout.block_experts)?,
        );
        named.insert(
            "group_loads".into(),
            i32s(&[config.groups], &layout.group_loads)?,
        );
        named.insert(
            "imbalance".into(),
            Tensor::f32(&[1], vec![layout.imbalance as f32])?,
        );
        Ok(named)
    }

    fn tolerance(
        &self,
        output: &str,
        inputs: &NamedTensors,
        _params: &serde_json::Value,
    ) -> Tolerance {
        match output {
            "topk_weights" => WEIGHT_TOLERANCE,
            "imbalance" => IMBALANCE_TOLERANCE,
            "out" => combine_tolerance(inputs.get("y").map_or(DType::F32, |y| y.dtype())),
            _ => Tolerance::EXACT,
        }
    }
}

/// `y` must have one row per row of the dispatch layout, in sorted-slot order.
fn check_y_rows(y: &Tensor, rows: usize) -> Result<()> {
    match y.shape() {
        &[r, n] if r == rows && n > 0 => Ok(()),
        other => Err(Error::shape(
            OP,
            "y",
            other,
            format!("[{rows}, n] (one row per dispatch row: t*k + min(t*k, e)*(block_size - 1))"),
        )),
    }
}

/// The tensors `fusedops run merrouter` takes.
const INPUT_NAMES: [&str; 6] = [
    "logits",
    "hidden",
    "gate_weight",
    "bias",
    "router_scale",
    "y",
];

/// `logits`, or `hidden` + `gate_weight`; optional `bias`, `router_scale`.
fn named_inputs(inputs: &NamedTensors) -> Result<(ScoreTensors, Option<&Tensor>, Option<&Tensor>)> {
    check_input_names(OP, inputs, &INPUT_NAMES)?;
    if inputs.contains_key("logits") && inputs.contains_key("hidden") {
        return Err(Error::invalid(
            OP,
            "input tensors",
            "give \"logits\" or \"hidden\" with \"gate_weight\", not both",
        ));
    }
    if inputs.contains_key("logits") && inputs.contains_key("gate_weight") {
        return Err(Error::invalid(
            OP,
            "input tensor \"gate_weight\"",
            "it goes with \"hidden\" (the fused gate), not with \"logits\"",
        ));
    }
    let scores = if inputs.contains_key("logits") {
        (input(OP, inputs, "logits")?.clone(), None)
    } else if inputs.contains_key("hidden") {
        (
            input(OP, inputs, "hidden")?.clone(),
            Some(input(OP, inputs, "gate_weight")?.clone()),
        )
    } else {
        let have: Vec<&str> = inputs.keys().map(String::as_str).collect();
        return Err(Error::invalid(
            OP,
            "input tensors",
            format!(
                "need \"logits\" [t, e], or \"hidden\" [t, h] with \"gate_weight\" [h, e]; \
                 the file has {have:?}"
            ),
        ));
    };
    Ok((scores, inputs.get("bias"), inputs.get("router_scale")))
}

/// `fusedops run` parameters: a preset (default `pangu-pro-moe`) with any field overridden.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RunParams {
    preset: Option<String>,
    experts: Option<usize>,
    groups: Option<usize>,
    top_k: Option<usize>,
    scoring: Option<Scoring>,
    /// `moge` or `group-limited`.
    selection: Option<String>,
    k_group: Option<usize>,
    group_score: Option<GroupScore>,
    renormalize: Option<bool>,
    routed_scaling_factor: Option<f32>,
    block_size: Option<usize>,
}

impl RunParams {
    fn config(&self) -> Result<RouterConfig> {
        let mut c = RouterConfig::preset(self.preset.as_deref().unwrap_or("pangu-pro-moe"))?;
        c.experts = self.experts.unwrap_or(c.experts);
        c.groups = self.groups.unwrap_or(c.groups);
        c.top_k = self.top_k.unwrap_or(c.top_k);
        c.scoring = self.scoring.unwrap_or(c.scoring);
        c.renormalize = self.renormalize.unwrap_or(c.renormalize);
        c.routed_scaling_factor = self
            .routed_scaling_factor
            .unwrap_or(c.routed_scaling_factor);
        c.block_size = self.block_size.unwrap_or(c.block_size);
        let (base_k_group, base_score) = match c.selection {
            Selection::Moge => (c.groups, GroupScore::SumTop2),
            Selection::GroupLimited {
                k_group,
                group_score,
            } => (k_group, group_score),
        };
        let limited = match self.selection.as_deref() {
            None => matches!(c.selection, Selection::GroupLimited { .. }),
            Some("moge") => false,
            Some("group-limited") => true,
            Some(other) => {
                return Err(Error::invalid(
                    OP,
                    "selection",
                    format!("{other:?} (expected \"moge\" or \"group-limited\")"),
                ));
            }
        };
        c.selection = if limited {
            Selection::GroupLimited {
                k_group: self.k_group.unwrap_or(base_k_group.min(c.groups)),
                group_score: self.group_score.unwrap_or(base_score),
            }
        } else {
            Selection::Moge
        };
        c.validate()?;
        Ok(c)
    }
}
