//! The MoE layer in the registry: the case tables of `fusedops check` / `fusedops bench`, their
//! seeded inputs (router inputs free of near-ties, expert weights hashed one expert at a time),
//! and the named-tensor interface of `fusedops run`.

use std::cell::OnceCell;
use std::sync::Arc;

use rayon::prelude::*;

use super::quant::{
    self, QuantHostWeights, QuantMoeWeights, QuantSharedWeights, QuantTensor,
    reference::QuantExperts,
};
use super::reference::{self, ExpertSource, Experts};
use super::{
    HostWeights, MoeConfig, MoeLayer, MoeOptions, MoeWeights, OP, PerExpertChain, SharedWeights,
    tolerance,
};
use crate::check::{Tolerance, compare};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::ops::merrouter::reference::{LayoutRef, RoutingRef};
use crate::ops::merrouter::{
    self, MIN_MARGIN, RouterConfig, Selection, WEIGHT_TOLERANCE, check_router_output,
};
use crate::ops::swiftgmm::quant::QuantWeights;
use crate::ops::swiftgmm::{self, ExpertWeights, Layout, Mode, Tiling};
use crate::registry::{
    Case, CaseInfo, Checked, Coverage, HostPrepared, NamedTensors, Operator, Prepared, Scale,
    Target, check_input_names, input, params_from_json,
};
use crate::seeded::Seeded;
use crate::tensor::{DType, DeviceTensor, Tensor};
use crate::util::{fill_parallel, mix, synthetic, unit};

/// The operator, as registered in [`crate::suite::operators`].
pub struct MoeOperator;

pub static OPERATOR: MoeOperator = MoeOperator;

/// Uniform integer in -m..=m.
fn small_int(seed: u64, i: u64, m: i32) -> i32 {
    (mix(seed, i) % (2 * m as u64 + 1)) as i32 - m
}

/// `value(i)` for every element, computed on every core.
fn filled<T: Copy + Send>(len: usize, zero: T, value: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out = vec![zero; len];
    fill_parallel(&mut out, value);
    out
}

/// Weights up to this size get NaN in the experts no token chooses, so a read of one would show.
const POISON_BYTES: u64 = 64 << 20;

/// Seeded expert weights `[e, a, b]` ([`crate::seeded`]): the device makes all of them in place,
/// and the reference makes any one expert alone, so no host ever holds the experts of a large
/// preset.
#[derive(Clone, Copy, Debug)]
struct SeededExperts {
    experts: usize,
    dims: [usize; 2],
    dtype: DType,
    seeded: Seeded,
}

impl ExpertSource for SeededExperts {
    fn experts(&self) -> usize {
        self.experts
    }

    fn expert(&self, e: usize) -> Result<Tensor> {
        let [a, b] = self.dims;
        self.seeded.slab(e, &[1, a, b], self.dtype)
    }
}

impl SeededExperts {
    fn expert_bytes(&self) -> u64 {
        (self.dims[0] * self.dims[1] * self.dtype.size()) as u64
    }

    /// int8 experts' per-output-channel scales `[e, n]` (n: the output columns of `layout`),
    /// which keep the products O(1) like the 16-bit weights' size; with `idle`, the experts no
    /// token chooses get NaN scales, so a read of one would show.
    fn scales(&self, layout: Layout, idle: Option<&[bool]>) -> Result<Tensor> {
        let (k, n) = layout.k_n(self.dims);
        let unit_scale = 1.0 / (73.0 * (k as f32).sqrt());
        let seed = self.seeded.seed as u64 ^ 0x5ca1e;
        synthetic(&[self.experts, n], DType::F32, |i| match idle {
            Some(active) if !active[i / n] => f32::NAN,
            _ => unit_scale * (1.0 + 0.5 * unit(seed, i as u64)),
        })
    }

    /// The device weights of a W8A8 layer: int8 made on the device, scales from the host.
    fn upload_int8(
        &self,
        gpu: &Gpu,
        layout: Layout,
        active: &[bool],
        poison: bool,
    ) -> Result<QuantWeights> {
        let weights = ExpertWeights::from_shards(self.seeded.device_shards(
            gpu,
            self.experts,
            &self.dims,
            DType::I8,
        )?)?;
        let scale = self.scales(layout, poison.then_some(active))?;
        QuantWeights::from_device(weights, gpu.upload(&scale)?, None)
    }

    fn bytes(&self) -> u64 {
        self.experts as u64 * self.expert_bytes()
    }

    /// Make the weights on the device, in shards of whole experts that each fit one binding.
    /// With `poison`, the experts not `active` are then overwritten with NaN: the layer must
    /// never read them.
    fn upload(&self, gpu: &Gpu, active: &[bool], poison: bool) -> Result<ExpertWeights> {
        let weights = ExpertWeights::from_shards(self.seeded.device_shards(
            gpu,
            self.experts,
            &self.dims,
            self.dtype,
        )?)?;
        if !poison {
            return Ok(weights);
        }
        let [a, b] = self.dims;
        let slab = self.expert_bytes();
        if !slab.is_multiple_of(4) {
            return Err(Error::invalid(
                OP,
                "case weights",
                format!("one expert is {slab} bytes; NaN writes need a multiple of 4"),
            ));
        }
        let nan = synthetic(&[1, a, b], self.dtype, |_| f32::NAN)?;
        for shard in weights.shards() {
            let count = shard.tensor.shape()[0];
            let idle = active
                .iter()
                .enumerate()
                .skip(shard.first_expert)
                .take(count);
            for (e, _) in idle.filter(|(_, busy)| !**busy) {
                let offset = (e - shard.first_expert) as u64 * slab;
                gpu.checked(|| {
                    gpu.queue
                        .write_buffer(shard.tensor.buffer(), offset, nan.bytes())
                })?;
            }
        }
        gpu.queue.submit(std::iter::empty());
        gpu.wait()?;
        Ok(weights)
    }
}

/// Router inputs whose gate logits are exact in f32: hidden = `a/8` (|a| ≤ 8) and gate weight =
/// `b/256` (|b| ≤ `m` ≤ 32), all exact in bf16, so every product is a multiple of 2⁻¹¹ and every
/// sum of up to 2¹³·… terms stays below 2²⁴ units: the GPU's f32 logits equal the reference's.
/// Tokens whose routing decisions are closer than [`MIN_MARGIN`] are redrawn, so the GPU must
/// choose exactly the reference's experts (no flaky id flips).
struct RouterInts {
    /// `[t, h]`, in units of 1/8.
    hidden: Vec<i32>,
    /// `[h, e]`, in units of 1/256.
    gate: Vec<i32>,
    /// `[t, e]`, exact.
    logits: Vec<f64>,
}

/// Largest hidden size whose gate sums stay exact in f32 with |a| ≤ 8, |b| ≤ 32.
const MAX_EXACT_HIDDEN: usize = 1 << 15;

impl RouterInts {
    fn new(
        config: &RouterConfig,
        t: usize,
        h: usize,
        bias: Option<&[f64]>,
        seed: u64,
    ) -> Result<Self> {
        if h > MAX_EXACT_HIDDEN {
            return Err(Error::invalid(
                OP,
                "case hidden size",
                format!("{h} is past {MAX_EXACT_HIDDEN}, where exact gate logits end"),
            ));
        }
        let e = config.experts;
        // Logits of standard deviation about 1.5 at large h: unsaturated scores.
        let m = ((1.2e6 / h as f64).sqrt() as i32).clamp(1, 32);
        let gate = filled(h * e, 0, |i| small_int(seed ^ 0x6a7e, i as u64, m));
        let mut hidden = filled(t * h, 0, |i| small_int(seed, i as u64, 8));
        let row_logits = |row: &[i32]| -> Vec<f64> {
            let mut acc = vec![0i64; e];
            for (c, &x) in row.iter().enumerate() {
                if x != 0 {
                    for (a, &w) in acc.iter_mut().zip(&gate[c * e..(c + 1) * e]) {
                        *a += x as i64 * w as i64;
                    }
                }
            }
            acc.iter().map(|&a| a as f64 / 2048.0).collect()
        };
        let mut logits = vec![0.0; t * e];
        logits
            .par_chunks_mut(e)
            .zip(hidden.par_chunks(h))
            .for_each(|(out, row)| out.copy_from_slice(&row_logits(row)));
        let close = |logits: &[f64], token: usize| -> Result<bool> {
            let row = &logits[token * e..(token + 1) * e];
            Ok(merrouter::reference::route(config, 1, row, bias, None)?.margins[0] < MIN_MARGIN)
        };
        let mut pending = Vec::new();
        for token in 0..t {
            if close(&logits, token)? {
                pending.push(token);
            }
        }
        for round in 1..=64u64 {
            if pending.is_empty() {
                return Ok(RouterInts {
                    hidden,
                    gate,
                    logits,
                });
            }
            for &token in &pending {
                let row = &mut hidden[token * h..(token + 1) * h];
                for (c, x) in row.iter_mut().enumerate() {
                    *x = small_int(seed ^ mix(round, token as u64), c as u64, 8);
                }
                let fresh = row_logits(row);
                logits[token * e..(token + 1) * e].copy_from_slice(&fresh);
            }
            let mut still_close = Vec::with_capacity(pending.len());
            for &token in &pending {
                if close(&logits, token)? {
                    still_close.push(token);
                }
            }
            pending = still_close;
        }
        Err(Error::invalid(
            OP,
            "case inputs",
            format!("{} tokens keep near-ties after 64 draws", pending.len()),
        ))
    }
}

/// The inputs of a case, its routing and layout (made once, on first use).
struct CaseData {
    /// `[t, h]` in the activation dtype.
    hidden: Tensor,
    /// `[h, e]` in the weight dtype.
    gate: Tensor,
    bias: Option<Tensor>,
    router_scale: Option<Tensor>,
    routing: RoutingRef,
    layout: LayoutRef,
}

/// Multiply-adds the reference may spend per case before it checks a sample of the tokens.
const REFERENCE_MACS: u64 = 1 << 31;

/// One registry case.
#[derive(Clone)]
struct MoeCase {
    /// The [`MoeConfig::preset`] it starts from.
    preset: &'static str,
    config: MoeConfig,
    tokens: usize,
    act: DType,
    weights: DType,
    out: DType,
    /// A bias that chooses (DeepSeek-V3), or a per-expert router scale (Pangu Pro MoE).
    bias: bool,
    router_scale: bool,
    /// Every token chooses the same `k` experts (a bias of +1 on them; needs `bias`): the other
    /// experts get no token, the chosen ones all of them.
    hot: bool,
    /// A W8A8 layer (a `-w8a8` preset): int8 expert weights with per-channel scales.
    w8a8: bool,
    options: MoeOptions,
    seed: u64,
    data: OnceCell<Arc<CaseData>>,
}

impl MoeCase {
    fn new(preset: &'static str, tokens: usize) -> Self {
        let config = MoeConfig::preset(preset).expect("the case tables name presets");
        let deepseek = config.router.selection != Selection::Moge;
        MoeCase {
            preset,
            config,
            tokens,
            act: DType::BF16,
            weights: DType::BF16,
            out: DType::BF16,
            bias: deepseek,
            router_scale: !deepseek,
            hot: false,
            w8a8: quant::is_w8a8_preset(preset),
            options: MoeOptions {
                tiling: Tiling::Defaults,
                ..MoeOptions::default()
            },
            seed: preset
                .bytes()
                .fold(0x006d_6f65_u64 ^ tokens as u64, |h, b| {
                    h.wrapping_mul(31) ^ b as u64
                }),
            data: OnceCell::new(),
        }
    }

    fn dtypes(mut self, act: DType, weights: DType, out: DType) -> Self {
        (self.act, self.weights, self.out) = (act, weights, out);
        self
    }

    fn layout(mut self, layout: Layout) -> Self {
        self.config.layout = layout;
        self
    }

    fn without_shared(mut self) -> Self {
        self.config.shared_intermediate = None;
        self
    }

    fn block(mut self, block_size: usize) -> Self {
        self.config.router.block_size = block_size;
        self
    }

    fn hot(mut self) -> Self {
        self.hot = true;
        self
    }

    fn tiling(mut self, tiling: Tiling) -> Self {
        self.options.tiling = tiling;
        self
    }

    /// The experts every token chooses in a `hot` case: two in each of the first `k/2` groups
    /// (so that those groups also win the group choice).
    fn hot_experts(&self) -> Vec<usize> {
        let r = &self.config.router;
        let size = r.group_size();
        (0..r.top_k)
            .map(|j| (j / 2 % r.groups) * size + (1 + 7 * (j % 2)) % size)
            .collect()
    }

    fn data(&self) -> Result<Arc<CaseData>> {
        if let Some(data) = self.data.get() {
            return Ok(data.clone());
        }
        let data = Arc::new(self.make_data()?);
        Ok(self.data.get_or_init(|| data).clone())
    }

    fn make_data(&self) -> Result<CaseData> {
        let (t, h, e) = (self.tokens, self.config.hidden, self.config.router.experts);
        let bias: Option<Vec<f32>> = self.bias.then(|| {
            let hot = if self.hot { self.hot_experts() } else { vec![] };
            (0..e)
                .map(|x| {
                    let boost = if hot.contains(&x) { 1.0 } else { 0.0 };
                    0.1 * unit(self.seed ^ 0xb1a5, x as u64) + boost
                })
                .collect()
        });
        let router_scale: Option<Vec<f32>> = self.router_scale.then(|| {
            (0..e)
                .map(|x| 1.0 + 0.5 * unit(self.seed ^ 0x5ca1e, x as u64))
                .collect()
        });
        // The reference chooses and weighs with the f32 values the GPU gets.
        let widen = |v: &Vec<f32>| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
        let bias64 = bias.as_ref().map(widen);
        let scale64 = router_scale.as_ref().map(widen);
        let ints = RouterInts::new(&self.config.router, t, h, bias64.as_deref(), self.seed)?;
        let hidden = synthetic(&[t, h], self.act, |i| ints.hidden[i] as f32 / 8.0)?;
        let gate = synthetic(&[h, e], self.weights, |i| ints.gate[i] as f32 / 256.0)?;
        let (routing, layout) = reference::routing(
            &self.config,
            t,
            &ints.logits,
            bias64.as_deref(),
            scale64.as_deref(),
        )?;
        Ok(CaseData {
            hidden,
            gate,
            bias: bias.map(|b| Tensor::f32(&[e], b)).transpose()?,
            router_scale: router_scale.map(|s| Tensor::f32(&[e], s)).transpose()?,
            routing,
            layout,
        })
    }

    /// The seeded weights: routed gate/up and down, and the shared expert's pair. Scales keep
    /// every product O(1): about 1/sqrt(k) over a k-long dot product of O(1) inputs.
    fn sources(
        &self,
    ) -> (
        SeededExperts,
        SeededExperts,
        Option<(SeededExperts, SeededExperts)>,
    ) {
        let c = &self.config;
        let dtype = if self.w8a8 { DType::I8 } else { self.weights };
        let source = |experts, dims, seed: u64, k: usize| SeededExperts {
            experts,
            dims,
            dtype,
            seeded: Seeded::new((self.seed ^ seed) as u32, Seeded::shift_for_dot(k)),
        };
        let e = c.router.experts;
        let (h, i) = (c.hidden, c.intermediate);
        (
            source(e, c.gate_up_dims(i), 0x1, h),
            source(e, c.down_dims(i), 0x2, i),
            c.shared_intermediate.map(|is| {
                (
                    source(1, c.gate_up_dims(is), 0x3, h),
                    source(1, c.down_dims(is), 0x4, is),
                )
            }),
        )
    }

    /// Multiply-adds of one token through the experts (routed and shared).
    fn token_macs(&self) -> u64 {
        let c = &self.config;
        let (h, i) = (c.hidden as u64, c.intermediate as u64);
        let shared = c.shared_intermediate.map_or(0, |is| 3 * h * is as u64);
        c.router.top_k as u64 * 3 * h * i + shared
    }

    /// The tokens the reference checks: all of them, or evenly spaced ones (first and last
    /// included) within [`REFERENCE_MACS`].
    fn checked_tokens(&self) -> Vec<usize> {
        let t = self.tokens;
        let count = ((REFERENCE_MACS / self.token_macs().max(1)) as usize).max(2);
        if count >= t {
            return (0..t).collect();
        }
        let mut tokens: Vec<usize> = (0..count).map(|j| j * (t - 1) / (count - 1)).collect();
        tokens.dedup();
        tokens
    }

    fn name(&self) -> String {
        let c = &self.config;
        let mut name = format!("{} t={} {}", self.preset, self.tokens, self.act);
        if self.weights != self.act {
            name += &format!(" w={}", self.weights);
        }
        if self.out != self.act {
            name += &format!(" out={}", self.out);
        }
        if c.layout != Layout::Nk {
            name += &format!(" {}", c.layout.name());
        }
        if c.shared_intermediate.is_none() {
            name += " no-shared";
        }
        if c.router.block_size > 1 {
            name += &format!(" block={}", c.router.block_size);
        }
        if self.hot {
            name += " hot-experts";
        }
        name
    }
}

impl Case for MoeCase {
    fn info(&self) -> CaseInfo {
        let c = &self.config;
        let r = &c.router;
        let base = self.preset.replace("-small", "");
        let shared = c
            .shared_intermediate
            .map_or("none".to_string(), |is| is.to_string());
        CaseInfo {
            op: OP,
            name: self.name(),
            preset: base.to_string(),
            params: vec![
                ("tokens".into(), self.tokens.to_string()),
                (
                    "size".into(),
                    if base == self.preset { "full" } else { "small" }.into(),
                ),
                ("e".into(), r.experts.to_string()),
                ("k".into(), r.top_k.to_string()),
                ("h".into(), c.hidden.to_string()),
                ("i".into(), c.intermediate.to_string()),
                ("shared_i".into(), shared),
                ("act".into(), self.act.name().into()),
                ("w".into(), self.weights.name().into()),
                ("out".into(), self.out.name().into()),
                ("layout".into(), c.layout.name().into()),
                ("block".into(), r.block_size.to_string()),
                (
                    "quant".into(),
                    if self.w8a8 { "w8a8" } else { "none" }.into(),
                ),
            ],
        }
    }

    /// The weights streamed as stored (the gate, the shared expert, and only the experts that
    /// receive a token: the grouped matmuls never read the others; int8 weights at a byte each
    /// plus their f32 scales) plus hidden in and out once. The intermediates are the
    /// implementation's own traffic and are not counted.
    fn bytes(&self) -> u64 {
        let Ok(data) = self.data() else {
            return 0;
        };
        let (gate_up, down, shared) = self.sources();
        let active = data.layout.counts.iter().filter(|&&c| c > 0).count() as u64;
        let c = &self.config;
        let (t, h, e) = (self.tokens as u64, c.hidden as u64, c.router.experts as u64);
        // Scales: one f32 per output column, [e, 2i] and [e, h] (shared: 2·is and h).
        let scale_bytes = |src: &SeededExperts| {
            if self.w8a8 {
                4 * c.layout.k_n(src.dims).1 as u64
            } else {
                0
            }
        };
        let weights = active
            * (gate_up.expert_bytes()
                + down.expert_bytes()
                + scale_bytes(&gate_up)
                + scale_bytes(&down))
            + shared.map_or(0, |(g, d)| {
                g.bytes() + d.bytes() + scale_bytes(&g) + scale_bytes(&d)
            })
            + h * e * self.weights.size() as u64;
        let router = 4 * e * (self.bias as u64 + self.router_scale as u64);
        weights + router + t * h * (self.act.size() + self.out.size()) as u64
    }

    /// SwiftGMM's GEMM path runs on cooperative matrices here and some expert takes it (forced,
    /// or more rows than the default GEMV threshold of 8: the shared expert, hot experts, or the
    /// average routed expert).
    fn uses_tensor_cores(&self, gpu: &Gpu) -> bool {
        // A W8A8 layer's matmuls sum int8 with dot4I8Packed: no cooperative-matrix path.
        if self.w8a8 {
            return false;
        }
        let (t, r) = (self.tokens, &self.config.router);
        let gemm = match self.options.mode {
            Mode::Gemm => true,
            Mode::Gemv => false,
            Mode::Auto => {
                t > 8
                    && (self.hot
                        || self.config.shared_intermediate.is_some()
                        || t * r.top_k > 8 * r.experts)
            }
        };
        gemm && matches!(
            swiftgmm::gemm_path(gpu, swiftgmm::GemmKernel::Auto),
            Ok(swiftgmm::tiling::GemmPath::Coop(_))
        )
    }

    /// 2 per multiply-add: the gate GEMV, every token's `k` experts and the shared expert.
    fn flops(&self) -> u64 {
        let c = &self.config;
        let gate = c.hidden as u64 * c.router.experts as u64;
        2 * self.tokens as u64 * (gate + self.token_macs())
    }

    fn host(&self, _target: &Target) -> Result<Box<dyn HostPrepared>> {
        let data = self.data()?;
        let (gate_up, down, shared) = self.sources();
        let (config, hidden, routing, out) = (&self.config, &data.hidden, &data.routing, self.out);
        let tokens = self.checked_tokens();
        let layout = config.layout;
        let scales = if self.w8a8 {
            Some((
                gate_up.scales(layout, None)?,
                down.scales(layout, None)?,
                shared
                    .as_ref()
                    .map(|(g, d)| {
                        Ok::<_, Error>((g.scales(layout, None)?, d.scales(layout, None)?))
                    })
                    .transpose()?,
            ))
        } else {
            None
        };
        // One token per core: each makes its own experts (few tokens share one).
        let per_token: Vec<Vec<f64>> = tokens
            .par_iter()
            .map(|&token| {
                let experts = Experts {
                    gate_up: &gate_up,
                    down: &down,
                    shared: shared
                        .as_ref()
                        .map(|(g, d)| (g as &dyn ExpertSource, d as &dyn ExpertSource)),
                };
                match &scales {
                    Some((g_s, d_s, shared_s)) => {
                        let experts = QuantExperts {
                            gate_up: (experts.gate_up, g_s),
                            down: (experts.down, d_s),
                            shared: experts
                                .shared
                                .zip(shared_s.as_ref())
                                .map(|((g, d), (gs, ds))| ((g, gs), (d, ds))),
                        };
                        quant::reference::token_outputs(
                            config,
                            hidden,
                            routing,
                            &experts,
                            &[token],
                            out,
                        )
                    }
                    None => {
                        reference::token_outputs(config, hidden, routing, &experts, &[token], out)
                    }
                }
            })
            .collect::<Result<_>>()?;
        Ok(Box::new(MoeHost {
            case: self.clone(),
            data,
            tokens,
            expected: per_token.concat(),
        }))
    }
}

/// A case's host half: its inputs and routing, the checked tokens and their reference.
struct MoeHost {
    case: MoeCase,
    data: Arc<CaseData>,
    tokens: Vec<usize>,
    expected: Vec<f64>,
}

impl HostPrepared for MoeHost {
    fn upload<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>> {
        if self.case.w8a8 {
            return self.upload_w8a8(gpu);
        }
        let (c, data) = (&self.case, &self.data);
        let (gate_up_src, down_src, shared_src) = c.sources();
        let active: Vec<bool> = data.layout.counts.iter().map(|&c| c > 0).collect();
        let poison = gate_up_src.bytes() + down_src.bytes() <= POISON_BYTES;
        let gate_up = gate_up_src.upload(gpu, &active, poison)?;
        let down = down_src.upload(gpu, &active, poison)?;
        let shared = match &shared_src {
            Some((g, d)) => Some((
                g.upload(gpu, &[true], false)?,
                d.upload(gpu, &[true], false)?,
            )),
            None => None,
        };
        let upload = |t: Option<&Tensor>| t.map(|t| gpu.upload(t)).transpose();
        let hidden = gpu.upload(&data.hidden)?;
        let gate = gpu.upload(&data.gate)?;
        let bias = upload(data.bias.as_ref())?;
        let router_scale = upload(data.router_scale.as_ref())?;
        let out = gpu.zeros(&[c.tokens, c.config.hidden], c.out)?;
        let weights = MoeWeights {
            gate: &gate,
            bias: bias.as_ref(),
            router_scale: router_scale.as_ref(),
            gate_up: &gate_up,
            down: &down,
            shared: shared
                .as_ref()
                .map(|(gate_up, down)| SharedWeights { gate_up, down }),
        };
        let layer = MoeLayer::new(gpu, &c.config, &hidden, &weights, &out, &c.options)?;
        let host_offsets: Vec<u32> = data.layout.offsets.iter().map(|&o| o as u32).collect();
        let baseline = layer.per_expert_baseline(gpu, &weights, &host_offsets, &c.options)?;
        Ok(Box::new(MoePrepared {
            gpu,
            layer,
            baseline: Some(baseline),
            out,
            tokens: self.tokens.clone(),
            expected: self.expected.clone(),
            routing: data.routing.clone(),
            layout: data.layout.clone(),
            tolerance: tolerance(c.act, c.out),
            _inputs: Box::new((hidden, gate, bias, router_scale, gate_up, down, shared)),
        }))
    }

    fn coverage(&self) -> Coverage {
        Coverage::new(self.tokens.len(), self.case.tokens, "tokens")
    }
}

impl MoeHost {
    /// A W8A8 case on the device: int8 experts made there with their scales (NaN scales for
    /// the idle experts of small cases), the W8A8 layer; no per-expert baseline.
    fn upload_w8a8<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>> {
        let (c, data) = (&self.case, &self.data);
        let layout = c.config.layout;
        let (gate_up_src, down_src, shared_src) = c.sources();
        let active: Vec<bool> = data.layout.counts.iter().map(|&c| c > 0).collect();
        let poison = gate_up_src.bytes() + down_src.bytes() <= POISON_BYTES;
        let gate_up = gate_up_src.upload_int8(gpu, layout, &active, poison)?;
        let down = down_src.upload_int8(gpu, layout, &active, poison)?;
        let shared = match &shared_src {
            Some((g, d)) => Some((
                g.upload_int8(gpu, layout, &[true], false)?,
                d.upload_int8(gpu, layout, &[true], false)?,
            )),
            None => None,
        };
        let upload = |t: Option<&Tensor>| t.map(|t| gpu.upload(t)).transpose();
        let hidden = gpu.upload(&data.hidden)?;
        let gate = gpu.upload(&data.gate)?;
        let bias = upload(data.bias.as_ref())?;
        let router_scale = upload(data.router_scale.as_ref())?;
        let out = gpu.zeros(&[c.tokens, c.config.hidden], c.out)?;
        let weights = QuantMoeWeights {
            gate: &gate,
            bias: bias.as_ref(),
            router_scale: router_scale.as_ref(),
            gate_up: &gate_up,
            down: &down,
            shared: shared
                .as_ref()
                .map(|(gate_up, down)| QuantSharedWeights { gate_up, down }),
        };
        let layer = MoeLayer::new_w8a8(gpu, &c.config, &hidden, &weights, &out, &c.options)?;
        Ok(Box::new(MoePrepared {
            gpu,
            layer,
            baseline: None,
            out,
            tokens: self.tokens.clone(),
            expected: self.expected.clone(),
            routing: data.routing.clone(),
            layout: data.layout.clone(),
            tolerance: tolerance(c.act, c.out),
            _inputs: Box::new((hidden, gate, bias, router_scale, gate_up, down, shared)),
        }))
    }
}

struct MoePrepared<'g> {
    gpu: &'g Gpu,
    layer: MoeLayer,
    /// The per-expert baseline (16-bit layers only).
    baseline: Option<PerExpertChain>,
    out: DeviceTensor,
    tokens: Vec<usize>,
    expected: Vec<f64>,
    routing: RoutingRef,
    layout: LayoutRef,
    tolerance: Tolerance,
    /// The device inputs the layer's bind groups read.
    _inputs: Box<dyn std::any::Any>,
}

impl Prepared for MoePrepared<'_> {
    fn variant(&self) -> String {
        self.layer.variant()
    }

    fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.layer.record(rec)
    }

    fn verify(&self) -> Result<Vec<Checked>> {
        let h = self.layer.config().hidden;
        let t = self.layer.tokens();
        let out = self.gpu.download_f32(&self.out)?;
        let got: Vec<f32> = self
            .tokens
            .iter()
            .flat_map(|&token| out[token * h..(token + 1) * h].iter().copied())
            .collect();
        let label = if self.tokens.len() == t {
            "out".to_string()
        } else {
            format!("out ({} of {t} tokens)", self.tokens.len())
        };
        let mut checks = vec![Checked::new(
            label,
            &[self.tokens.len(), h],
            compare(&got, &self.expected, self.tolerance),
        )];
        let router = self.layer.router().download(self.gpu)?;
        checks.extend(check_router_output(&router, &self.routing, &self.layout));
        Ok(checks)
    }

    fn baseline(&self) -> Option<String> {
        self.baseline
            .as_ref()
            .map(|b| format!("per-expert matmuls ({} dispatches)", b.dispatches()))
    }

    fn record_baseline(&self, rec: &mut Recorder) -> Result<()> {
        match &self.baseline {
            Some(b) => self.layer.record_baseline(rec, b),
            None => Err(Error::unsupported(
                OP,
                "a per-expert baseline for a W8A8 layer",
            )),
        }
    }
}

fn ci_cases() -> Vec<MoeCase> {
    use DType::{BF16, F16, F32};
    vec![
        MoeCase::new("pangu-pro-moe-small", 7),
        MoeCase::new("deepseek-v3-small", 5),
        MoeCase::new("pangu-pro-moe-small", 1)
            .dtypes(F32, F32, F32)
            .layout(Layout::Kn)
            .without_shared(),
        MoeCase::new("deepseek-v3-small", 33)
            .dtypes(F16, F16, F16)
            .block(16),
        MoeCase::new("deepseek-v3-small", 40)
            .dtypes(BF16, BF16, F32)
            .hot(),
        MoeCase::new("pangu-pro-moe-small-w8a8", 7),
        MoeCase::new("deepseek-v3-small-w8a8", 5),
        MoeCase::new("pangu-pro-moe-small-w8a8", 1)
            .dtypes(F32, F32, F32)
            .layout(Layout::Kn)
            .without_shared(),
        MoeCase::new("deepseek-v3-small-w8a8", 33)
            .dtypes(F16, F16, F16)
            .block(16),
    ]
}

impl Operator for MoeOperator {
    fn name(&self) -> &'static str {
        OP
    }

    fn cases(&self, scale: Scale, gpu: &Gpu) -> Vec<Box<dyn Case>> {
        let cases: Vec<MoeCase> = match scale {
            Scale::Ci => ci_cases(),
            Scale::Full => vec![
                MoeCase::new("pangu-pro-moe", 1).tiling(Tiling::Cached),
                MoeCase::new("pangu-pro-moe", 16).tiling(Tiling::Cached),
                MoeCase::new("pangu-pro-moe-w8a8", 16).tiling(Tiling::Cached),
                MoeCase::new("deepseek-v3", 16).tiling(Tiling::Cached),
                MoeCase::new("deepseek-v3-w8a8", 16).tiling(Tiling::Cached),
            ],
            Scale::Bench => return self.headline(!gpu.is_cpu()),
        };
        cases
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Case>)
            .collect()
    }

    /// pangu-pro-moe at 16 and 4096 tokens and deepseek-v3 at 16, against one dispatch per
    /// expert; the small presets at 16 and 256 tokens on a CPU adapter.
    fn headline(&self, full: bool) -> Vec<Box<dyn Case>> {
        let (pangu, deepseek, tokens) = if full {
            ("pangu-pro-moe", "deepseek-v3", [16, 4096])
        } else {
            ("pangu-pro-moe-small", "deepseek-v3-small", [16, 256])
        };
        // Each case is followed by its W8A8 twin (the same shapes; the tuner measures the 16-bit
        // kernels only, so the twin takes the cached or default tiles).
        [
            (pangu, tokens[0]),
            (pangu, tokens[1]),
            (deepseek, tokens[0]),
        ]
        .into_iter()
        .flat_map(|(preset, t)| {
            let twin = format!("{preset}{}", quant::PRESET_SUFFIX);
            let twin = super::PRESETS.iter().find(|p| **p == twin).copied();
            [
                Some(MoeCase::new(preset, t).tiling(Tiling::Tune)),
                twin.map(|p| MoeCase::new(p, t).tiling(Tiling::Cached)),
            ]
        })
        .flatten()
        .map(|c| Box::new(c) as Box<dyn Case>)
        .collect()
    }

    fn paths(&self, gpu: &Gpu) -> Vec<(String, String)> {
        let mut paths = merrouter::OPERATOR.paths(gpu);
        let gemm =
            swiftgmm::gemm_path(gpu, swiftgmm::GemmKernel::Auto).map_or("simt", |path| path.name());
        paths.push((
            "expert matmuls".into(),
            format!(
                "SwiftGMM from the router's device offsets (GEMV or GEMM per expert, indirect \
                 dispatch; GEMM {gemm})"
            ),
        ));
        paths.push((
            "gather / combine".into(),
            "one invocation per 32-bit word (plain WGSL)".into(),
        ));
        paths.push((
            "w8a8".into(),
            format!(
                "int8 quantization fused into the gather (one workgroup per row), SwiGLU \
                 intermediates re-quantized, SwiftGMM W8A8 matmuls: {}",
                crate::ops::swiftgmm::quant::dot_product_path(gpu)
            ),
        ));
        paths
    }

    fn run_named(
        &self,
        gpu: &Gpu,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let named = NamedInputs::parse(inputs, params)?;
        let out = match named.quantized(inputs)? {
            Some(w) => quant::run_w8a8(
                gpu,
                &named.config,
                named.hidden,
                &w,
                named.out_dtype,
                &named.options,
            )?,
            None => super::run(
                gpu,
                &named.config,
                named.hidden,
                &named.weights,
                named.out_dtype,
                &named.options,
            )?,
        };
        Ok(NamedTensors::from([
            ("out".to_string(), out.out),
            ("topk_ids".to_string(), out.router.topk_ids),
            ("topk_weights".to_string(), out.router.topk_weights),
        ]))
    }

    fn reference_named(
        &self,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let named = NamedInputs::parse(inputs, params)?;
        let r = match named.quantized(inputs)? {
            Some(w) => quant::reference::layer(&named.config, named.hidden, &w, named.out_dtype)?,
            None => reference::layer(&named.config, named.hidden, &named.weights, named.out_dtype)?,
        };
        // `layer` validated hidden as [t, h].
        let (t, k) = (named.hidden.shape()[0], named.config.router.top_k);
        let out: Vec<f32> = r.out.iter().map(|&v| v as f32).collect();
        let weights: Vec<f32> = r.routing.weights.iter().map(|&v| v as f32).collect();
        Ok(NamedTensors::from([
            (
                "out".to_string(),
                Tensor::from_f32(&[t, named.config.hidden], &out, named.out_dtype)?,
            ),
            ("topk_ids".to_string(), Tensor::i32(&[t, k], r.routing.ids)?),
            ("topk_weights".to_string(), Tensor::f32(&[t, k], weights)?),
        ]))
    }

    fn tolerance(
        &self,
        output: &str,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Tolerance {
        match output {
            "topk_ids" => Tolerance::EXACT,
            "topk_weights" => WEIGHT_TOLERANCE,
            _ => {
                let act = inputs.get("hidden").map_or(DType::F32, |h| h.dtype());
                // Unparsable params never reach a comparison (run_named refuses them first).
                let out = params_from_json::<RunParams>(OP, params)
                    .ok()
                    .and_then(|p| p.out_dtype)
                    .unwrap_or(act);
                tolerance(act, out)
            }
        }
    }
}

/// `fusedops run` parameters (JSON); every field optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RunParams {
    /// A [`MoeConfig::preset`] (default `pangu-pro-moe`): its routing and layout. The sizes come
    /// from the tensors.
    preset: Option<String>,
    /// A whole [`RouterConfig`] in place of the preset's.
    router: Option<RouterConfig>,
    layout: Option<Layout>,
    /// Default: hidden's dtype.
    out_dtype: Option<DType>,
    mode: Mode,
    tiling: Tiling,
}

/// The tensors `fusedops run moe` takes (the scales with int8 expert weights, W8A8).
const INPUT_NAMES: [&str; 12] = [
    "hidden",
    "gate_weight",
    "gate_up",
    "down",
    "bias",
    "router_scale",
    "shared_gate_up",
    "shared_down",
    "gate_up_scale",
    "down_scale",
    "shared_gate_up_scale",
    "shared_down_scale",
];

/// The named inputs of `fusedops run` and the config they describe.
struct NamedInputs<'a> {
    config: MoeConfig,
    /// A `-w8a8` preset was named.
    w8a8_preset: bool,
    hidden: &'a Tensor,
    weights: HostWeights<'a>,
    out_dtype: DType,
    options: MoeOptions,
}

impl<'a> NamedInputs<'a> {
    fn parse(inputs: &'a NamedTensors, params: &serde_json::Value) -> Result<Self> {
        let p: RunParams = params_from_json(OP, params)?;
        check_input_names(OP, inputs, &INPUT_NAMES)?;
        let preset = p.preset.as_deref().unwrap_or("pangu-pro-moe");
        let mut config = MoeConfig::preset(preset)?;
        if let Some(router) = &p.router {
            config.router = router.clone();
        }
        config.layout = p.layout.unwrap_or(config.layout);
        let hidden = input(OP, inputs, "hidden")?;
        let down = input(OP, inputs, "down")?;
        // The intermediate size of down weights [e, h, i] (nk) or [e, i, h] (kn).
        let intermediate = |what: &str, w: &Tensor| match *w.shape() {
            [_, a, b] => Ok(match config.layout {
                Layout::Nk => b,
                Layout::Kn => a,
            }),
            _ => Err(Error::shape(OP, what, w.shape(), "[experts, a, b]")),
        };
        config.hidden = match *hidden.shape() {
            [_, h] => h,
            _ => return Err(Error::shape(OP, "hidden", hidden.shape(), "[t, h]")),
        };
        config.intermediate = intermediate("down", down)?;
        let shared = match (inputs.get("shared_gate_up"), inputs.get("shared_down")) {
            (Some(g), Some(d)) => Some((g, d)),
            (None, None) => None,
            _ => {
                return Err(Error::invalid(
                    OP,
                    "inputs",
                    "give both \"shared_gate_up\" and \"shared_down\", or neither",
                ));
            }
        };
        config.shared_intermediate = shared
            .map(|(_, d)| intermediate("shared_down", d))
            .transpose()?;
        Ok(NamedInputs {
            out_dtype: p.out_dtype.unwrap_or(hidden.dtype()),
            w8a8_preset: quant::is_w8a8_preset(preset),
            hidden,
            weights: HostWeights {
                gate: input(OP, inputs, "gate_weight")?,
                bias: inputs.get("bias"),
                router_scale: inputs.get("router_scale"),
                gate_up: input(OP, inputs, "gate_up")?,
                down,
                shared,
            },
            config,
            options: MoeOptions {
                tiling: p.tiling,
                mode: p.mode,
                max_workgroups: None,
            },
        })
    }

    /// The W8A8 weights, when the expert weights are int8 or a scale is given: every expert
    /// weight then needs its `<name>_scale` `[e, n]` f32. A `-w8a8` preset with float weights is
    /// an error.
    fn quantized(&self, inputs: &'a NamedTensors) -> Result<Option<QuantHostWeights<'a>>> {
        let w = &self.weights;
        let scale_names = [
            "gate_up_scale",
            "down_scale",
            "shared_gate_up_scale",
            "shared_down_scale",
        ];
        let int8 = w.gate_up.dtype() == DType::I8
            || w.down.dtype() == DType::I8
            || scale_names.iter().any(|n| inputs.contains_key(*n));
        if !int8 {
            if self.w8a8_preset {
                return Err(Error::invalid(
                    OP,
                    "expert weights",
                    format!(
                        "a {} preset takes int8 expert weights with their scales, got {}",
                        quant::PRESET_SUFFIX,
                        w.gate_up.dtype()
                    ),
                ));
            }
            return Ok(None);
        }
        let with_scale = |q: &'a Tensor, name: &str| -> Result<QuantTensor<'a>> {
            Ok(QuantTensor {
                q,
                scale: input(OP, inputs, &format!("{name}_scale"))?,
            })
        };
        Ok(Some(QuantHostWeights {
            gate: w.gate,
            bias: w.bias,
            router_scale: w.router_scale,
            gate_up: with_scale(w.gate_up, "gate_up")?,
            down: with_scale(w.down, "down")?,
            shared: match w.shared {
                Some((g, d)) => Some((
                    with_scale(g, "shared_gate_up")?,
                    with_scale(d, "shared_down")?,
                )),
                None => None,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::merrouter::GroupScore;

    #[test]
    fn router_inputs_are_exact_and_tie_free() {
        let config = MoeConfig::preset("deepseek-v3-small").unwrap();
        let bias: Vec<f64> = (0..256).map(|x| 0.001 * x as f64).collect();
        let ints = RouterInts::new(&config.router, 20, 96, Some(&bias), 5).unwrap();
        for token in 0..20 {
            let row = &ints.logits[token * 256..(token + 1) * 256];
            let r = merrouter::reference::route(&config.router, 1, row, Some(&bias), None).unwrap();
            assert!(r.margins[0] >= MIN_MARGIN);
            // Exact: the f32 sum in any order gives the same value.
            let h = &ints.hidden[token * 96..(token + 1) * 96];
            let f32_sum: f32 = (0..96)
                .map(|c| h[c] as f32 / 8.0 * (ints.gate[c * 256 + 7] as f32 / 256.0))
                .sum();
            assert_eq!(f32_sum as f64, row[7]);
        }
    }

    #[test]
    fn seeded_experts_are_made_one_at_a_time() {
        let w = SeededExperts {
            experts: 3,
            dims: [4, 6],
            dtype: DType::BF16,
            seeded: Seeded::new(9, 1),
        };
        let one = w.expert(2).unwrap();
        assert_eq!(one.shape(), &[1, 4, 6]);
        assert!(one.to_f32().iter().all(|v| v.abs() <= 0.5));
        assert_eq!(one.to_f32()[5], w.seeded.value(2, 5), "expert e is slab e");
        assert_ne!(one.to_f32(), w.expert(1).unwrap().to_f32());
        assert_eq!(w.bytes(), 3 * 48);
    }

    #[test]
    fn hot_experts_sit_in_k_over_2_groups() {
        let case = MoeCase::new("deepseek-v3-small", 4).hot();
        let hot = case.hot_experts();
        assert_eq!(hot.len(), 8);
        let mut groups: Vec<usize> = hot.iter().map(|x| x / 32).collect();
        groups.dedup();
        assert_eq!(groups, vec![0, 1, 2, 3]);
        let Selection::GroupLimited {
            k_group,
            group_score,
        } = case.config.router.selection
        else {
            panic!("deepseek routing");
        };
        assert_eq!((k_group, group_score), (4, GroupScore::SumTop2));
    }

    #[test]
    fn large_cases_check_a_sample_of_tokens() {
        let case = MoeCase::new("pangu-pro-moe", 4096);
        let tokens = case.checked_tokens();
        assert!(tokens.len() >= 2 && tokens.len() < 16, "{tokens:?}");
        assert_eq!((tokens[0], *tokens.last().unwrap()), (0, 4095));
        assert_eq!(
            MoeCase::new("pangu-pro-moe-small", 7)
                .checked_tokens()
                .len(),
            7
        );
        // bytes() counts only the experts that receive tokens: one of each group at t = 1.
        let small = MoeCase::new("pangu-pro-moe-small", 1);
        let (g, d, shared) = small.sources();
        let (sg, sd) = shared.unwrap();
        let (h, e) = (96, 64);
        let want = 8 * (g.expert_bytes() + d.expert_bytes())
            + sg.bytes()
            + sd.bytes()
            + h * e * 2
            + 4 * e
            + h * (2 + 2);
        assert_eq!(small.bytes(), want);
    }
}
