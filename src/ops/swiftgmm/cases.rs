//! SwiftGMM in the registry: the case tables of `fusedops check` / `bench`, synthetic inputs,
//! and the named-tensor interface of `fusedops run`.

use std::cell::Cell;

use half::{bf16, f16};

use super::tiling::{self, CacheLocation, GemmPath, ShapeKey};
use super::{
    Activation, DeviceGroups, ExpertWeights, GemmKernel, GmmArgs, GmmPlan, Groups, Layout, Mode,
    Options, PerExpertBaseline, Tiling, coop_support, reference, tolerance,
};
use crate::check::{Tolerance, compare};
use crate::error::Result;
use crate::gpu::{Gpu, Recorder};
use crate::registry::{
    Case, CaseInfo, Checked, NamedTensors, Operator, Prepared, Scale, input, params_from_json,
};
use crate::tensor::{DType, DeviceTensor, Tensor, TensorData};

const OP: &str = "swiftgmm";

/// The registered operator.
pub struct SwiftGmmOperator;

/// The instance in `registry::operators()`.
pub static OPERATOR: SwiftGmmOperator = SwiftGmmOperator;

/// A deterministic value in [-1, 1) for index `i` (splitmix64 of seed and index).
fn hash_value(seed: u64, i: u64) -> f32 {
    let mut z = seed
        .wrapping_mul(0xd1b5_4a32_d192_ed03)
        .wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Fill `out` with `value(i)` on every core (the bench weights reach gigabytes).
fn fill_parallel<T: Send>(out: &mut [T], value: impl Fn(usize) -> T + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = out.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            let value = &value;
            s.spawn(move || {
                for (j, slot) in part.iter_mut().enumerate() {
                    *slot = value(c * chunk + j);
                }
            });
        }
    });
}

/// A tensor of `dtype` with `value(i)` rounded to it.
pub(crate) fn synthetic(
    shape: &[usize],
    dtype: DType,
    value: impl Fn(usize) -> f32 + Sync,
) -> Result<Tensor> {
    let len: usize = shape.iter().product();
    let data = match dtype {
        DType::BF16 => {
            let mut v = vec![bf16::ZERO; len];
            fill_parallel(&mut v, |i| bf16::from_f32(value(i)));
            TensorData::BF16(v)
        }
        DType::F16 => {
            let mut v = vec![f16::ZERO; len];
            fill_parallel(&mut v, |i| f16::from_f32(value(i)));
            TensorData::F16(v)
        }
        _ => {
            let mut v = vec![0.0f32; len];
            fill_parallel(&mut v, &value);
            TensorData::F32(v)
        }
    };
    Tensor::new(shape, data)
}

/// Hashed values in [-scale, scale).
pub(crate) fn hashed(shape: &[usize], dtype: DType, seed: u64, scale: f32) -> Result<Tensor> {
    synthetic(shape, dtype, |i| hash_value(seed, i as u64) * scale)
}

/// How many rows each expert gets.
fn route(tokens: usize, topk: usize, experts: usize, moge: bool, seed: u64) -> Vec<u32> {
    let mut counts = vec![0u32; experts];
    let mut draw = 0u64;
    let mut next = |m: usize| {
        draw += 1;
        ((hash_value(seed, draw) + 1.0) * 0.5 * m as f32) as usize % m
    };
    for _ in 0..tokens {
        if moge {
            // Pangu's MoGE: experts in topk equal groups, one from every group.
            let per_group = experts / topk;
            for group in 0..topk {
                counts[group * per_group + next(per_group)] += 1;
            }
        } else {
            let mut picked: Vec<usize> = Vec::with_capacity(topk);
            while picked.len() < topk.min(experts) {
                let e = next(experts);
                if !picked.contains(&e) {
                    picked.push(e);
                }
            }
            for e in picked {
                counts[e] += 1;
            }
        }
    }
    counts
}

/// One registry case.
#[derive(Clone, Debug)]
struct GmmCase {
    name: String,
    preset: &'static str,
    experts: usize,
    k: usize,
    n: usize,
    layout: Layout,
    activation: Activation,
    x_dtype: DType,
    w_dtype: DType,
    out_dtype: DType,
    scale: bool,
    counts: Vec<u32>,
    /// Padding rows (belonging to no group) before and after the routed rows, NaN in x.
    pad: (usize, usize),
    tokens: Option<usize>,
    mode: Mode,
    tiling: Tiling,
    /// The GEMM path's kernel: the bench runs the SIMT kernel beside the cooperative-matrix one.
    gemm_kernel: GemmKernel,
}

/// Above this many multiply-adds the reference checks sampled rows only.
const FULL_REFERENCE_MACS: u64 = 1 << 27;

impl GmmCase {
    fn routed(&self) -> usize {
        self.counts.iter().map(|&c| c as usize).sum()
    }

    fn m_total(&self) -> usize {
        self.pad.0 + self.routed() + self.pad.1
    }

    fn n_out(&self) -> usize {
        match self.activation {
            Activation::None => self.n,
            Activation::SwiGlu => self.n / 2,
        }
    }

    fn offsets(&self) -> Vec<u32> {
        let mut offsets = vec![self.pad.0 as u32];
        for &c in &self.counts {
            offsets.push(offsets.last().unwrap() + c);
        }
        offsets
    }

    fn options(&self) -> Options {
        Options {
            layout: self.layout,
            activation: self.activation,
            out_dtype: self.out_dtype,
            mode: self.mode,
            tiling: self.tiling,
            max_workgroups: None,
            gemm_kernel: self.gemm_kernel,
        }
    }

    /// The rows the reference is computed for: all of them on small cases; else the first and
    /// last row of up to 32 groups spread over the experts, and the padding's edges.
    fn checked_rows(&self) -> Vec<usize> {
        let macs = self.routed() as u64 * self.k as u64 * self.n as u64;
        if macs <= FULL_REFERENCE_MACS {
            return (0..self.m_total()).collect();
        }
        let offsets = self.offsets();
        let busy: Vec<usize> = (0..self.experts)
            .filter(|&g| offsets[g + 1] > offsets[g])
            .collect();
        let step = busy.len().div_ceil(32).max(1);
        let mut rows = Vec::new();
        for &g in busy.iter().step_by(step) {
            rows.push(offsets[g] as usize);
            rows.push(offsets[g + 1] as usize - 1);
        }
        if self.pad.0 > 0 {
            rows.push(0);
        }
        if self.pad.1 > 0 {
            rows.push(self.m_total() - 1);
        }
        rows.sort_unstable();
        rows.dedup();
        rows
    }
}

impl Case for GmmCase {
    fn info(&self) -> CaseInfo {
        let mut params = vec![
            ("e".to_string(), self.experts.to_string()),
            ("k".to_string(), self.k.to_string()),
            ("n".to_string(), self.n.to_string()),
            ("rows".to_string(), self.routed().to_string()),
            ("layout".to_string(), self.layout.name().to_string()),
            (
                "act".to_string(),
                match self.activation {
                    Activation::None => "none",
                    Activation::SwiGlu => "swiglu",
                }
                .to_string(),
            ),
            ("x".to_string(), self.x_dtype.name().to_string()),
            ("w".to_string(), self.w_dtype.name().to_string()),
            ("out".to_string(), self.out_dtype.name().to_string()),
            ("scale".to_string(), self.scale.to_string()),
            (
                "mode".to_string(),
                format!("{:?}", self.mode).to_lowercase(),
            ),
            (
                "gemm".to_string(),
                format!("{:?}", self.gemm_kernel).to_lowercase(),
            ),
        ];
        if let Some(t) = self.tokens {
            params.push(("t".to_string(), t.to_string()));
        }
        CaseInfo {
            op: OP,
            name: self.name.clone(),
            preset: self.preset.to_string(),
            params,
        }
    }

    fn bytes(&self) -> u64 {
        let active = self.counts.iter().filter(|&&c| c > 0).count() as u64;
        let routed = self.routed() as u64;
        let (k, n) = (self.k as u64, self.n as u64);
        active * k * n * self.w_dtype.size() as u64
            + routed * k * self.x_dtype.size() as u64
            + routed * self.n_out() as u64 * self.out_dtype.size() as u64
            + if self.scale { routed * 4 } else { 0 }
            + (self.experts as u64 + 1) * 4
    }

    fn flops(&self) -> u64 {
        2 * self.routed() as u64 * self.k as u64 * self.n as u64
    }

    fn prepare<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>> {
        let (m_total, k, n) = (self.m_total(), self.k, self.n);
        let routed_end = self.pad.0 + self.routed();
        let seed = self
            .name
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31) ^ b as u64);
        let x = synthetic(&[m_total, k], self.x_dtype, |i| {
            let row = i / k;
            if row < self.pad.0 || row >= routed_end {
                f32::NAN
            } else {
                hash_value(seed, i as u64)
            }
        })?;
        let w_shape = self.layout.weight_shape(self.experts, k, n);
        let w = hashed(&w_shape, self.w_dtype, seed ^ 1, 1.0 / (k as f32).sqrt())?;
        let scale = if self.scale {
            Some(synthetic(&[m_total], DType::F32, |i| {
                0.5 + 0.5 * hash_value(seed ^ 2, i as u64)
            })?)
        } else {
            None
        };
        let offsets = self.offsets();
        let x_dev = gpu.upload(&x)?;
        let weights = ExpertWeights::upload(gpu, &w)?;
        let scale_dev = scale.as_ref().map(|s| gpu.upload(s)).transpose()?;
        let offsets_dev = gpu.upload(&Tensor::u32(&[offsets.len()], offsets.clone())?)?;
        let y = gpu.zeros(&[m_total, self.n_out()], self.out_dtype)?;
        let args = GmmArgs {
            x: &x_dev,
            groups: DeviceGroups::Offsets(&offsets_dev),
            weights: &weights,
            row_scale: scale_dev.as_ref(),
            y: &y,
            host_offsets: Some(&offsets),
        };
        let options = self.options();
        let plan = GmmPlan::new(gpu, &args, &options)?;
        let baseline = PerExpertBaseline::new(gpu, &args, &options)?;
        // The groups on the cooperative-matrix path are checked with their operands staged in
        // f16 as the kernel stages them. The baseline runs every group on the GEMM kernel.
        let rows = self.checked_rows();
        let reference_for = |coop: &[bool]| {
            reference::grouped_matmul_rows_staged(
                &x,
                &offsets,
                &w,
                self.layout,
                self.activation,
                scale.as_ref(),
                &rows,
                coop,
            )
        };
        let (plan_coop, baseline_coop) =
            (plan.coop_groups(&offsets), baseline.coop_groups(&offsets));
        let expected = reference_for(&plan_coop)?;
        let expected_baseline = if baseline_coop == plan_coop {
            None
        } else {
            Some(reference_for(&baseline_coop)?)
        };
        drop((x, w));
        Ok(Box::new(GmmPrepared {
            gpu,
            plan,
            baseline,
            y,
            rows,
            expected,
            expected_baseline,
            baseline_recorded: Cell::new(false),
            n_out: self.n_out(),
            tolerance: tolerance(self.out_dtype),
            _inputs: (x_dev, weights, offsets_dev, scale_dev),
        }))
    }
}

struct GmmPrepared<'g> {
    gpu: &'g Gpu,
    plan: GmmPlan,
    baseline: PerExpertBaseline,
    y: DeviceTensor,
    rows: Vec<usize>,
    expected: Vec<f64>,
    /// The baseline's expectation where it stages other groups than the plan.
    expected_baseline: Option<Vec<f64>>,
    /// Whether the last recording was the baseline's (what `verify` checks).
    baseline_recorded: Cell<bool>,
    n_out: usize,
    tolerance: Tolerance,
    /// The inputs the plans' bind groups read.
    _inputs: (
        DeviceTensor,
        ExpertWeights,
        DeviceTensor,
        Option<DeviceTensor>,
    ),
}

impl Prepared for GmmPrepared<'_> {
    fn variant(&self) -> String {
        self.plan.variant().to_string()
    }

    fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.baseline_recorded.set(false);
        self.plan.record(rec)
    }

    fn verify(&self) -> Result<Vec<Checked>> {
        let y = self.gpu.download_f32(&self.y)?;
        let got: Vec<f32> = self
            .rows
            .iter()
            .flat_map(|&r| y[r * self.n_out..(r + 1) * self.n_out].iter().copied())
            .collect();
        let expected = match (&self.expected_baseline, self.baseline_recorded.get()) {
            (Some(baseline), true) => baseline,
            _ => &self.expected,
        };
        let label = if self.rows.len() * self.n_out == y.len() {
            "y".to_string()
        } else {
            format!("y ({} sampled rows)", self.rows.len())
        };
        Ok(vec![Checked::new(
            label,
            &[self.rows.len(), self.n_out],
            compare(&got, expected, self.tolerance),
        )])
    }

    fn baseline(&self) -> Option<String> {
        Some(format!(
            "per-expert gemm ({} dispatches)",
            self.baseline.dispatches()
        ))
    }

    fn record_baseline(&self, rec: &mut Recorder) -> Result<()> {
        self.baseline_recorded.set(true);
        self.baseline.record(rec)
    }
}

/// Shapes of a preset's expert FFN.
struct Preset {
    name: &'static str,
    experts: usize,
    hidden: usize,
    intermediate: usize,
    topk: usize,
    moge: bool,
}

const PANGU: Preset = Preset {
    name: "pangu-pro-moe",
    experts: 64,
    hidden: 5120,
    intermediate: 1344,
    topk: 8,
    moge: true,
};

const DEEPSEEK: Preset = Preset {
    name: "deepseek-v3",
    experts: 256,
    hidden: 7168,
    intermediate: 2048,
    topk: 8,
    moge: false,
};

/// Which projection of the expert FFN.
#[derive(Clone, Copy)]
enum Proj {
    /// `[hidden] -> [2 intermediate]` with SwiGLU.
    GateUp,
    /// `[intermediate] -> [hidden]` with the routing weight as row scale.
    Down,
}

fn preset_case(
    p: &Preset,
    proj: Proj,
    tokens: usize,
    layout: Layout,
    shrink: usize,
    tiling: Tiling,
) -> GmmCase {
    // On CPU adapters every dimension (and the expert count) is divided by `shrink`.
    let experts = (p.experts / shrink).max(p.topk);
    let (hidden, inter) = (p.hidden / shrink, p.intermediate / shrink);
    let (k, n, activation, scale, what) = match proj {
        Proj::GateUp => (hidden, 2 * inter, Activation::SwiGlu, false, "gate_up"),
        Proj::Down => (inter, hidden, Activation::None, true, "down"),
    };
    let counts = route(
        tokens,
        p.topk,
        experts,
        p.moge,
        tokens as u64 * 131 + k as u64,
    );
    GmmCase {
        name: format!(
            "{} {what} t={tokens} {}{}",
            p.name,
            layout.name(),
            if shrink > 1 {
                format!(" (1/{shrink} size)")
            } else {
                String::new()
            }
        ),
        preset: p.name,
        experts,
        k,
        n,
        layout,
        activation,
        x_dtype: DType::BF16,
        w_dtype: DType::BF16,
        out_dtype: DType::BF16,
        scale,
        counts,
        pad: (0, 0),
        tokens: Some(tokens),
        mode: Mode::Auto,
        tiling,
        gemm_kernel: GemmKernel::Auto,
    }
}

/// On an adapter with both GEMM kernels, each case whose groups average more rows than the
/// default GEMV threshold (so the GEMM path runs) is followed by the same case on the SIMT kernel.
fn with_simt_twins(cases: Vec<GmmCase>, gpu: &Gpu) -> Vec<GmmCase> {
    if coop_support(gpu).is_err() {
        return cases;
    }
    let mut out = Vec::new();
    for case in cases {
        let gemm_rows = case.routed() > 8 * case.experts;
        let twin = gemm_rows.then(|| GmmCase {
            name: format!("{} simt", case.name),
            gemm_kernel: GemmKernel::Simt,
            ..case.clone()
        });
        out.push(case);
        out.extend(twin);
    }
    out
}

/// A small case for CI.
#[allow(clippy::too_many_arguments)]
fn ci_case(
    name: &str,
    (experts, k, n): (usize, usize, usize),
    layout: Layout,
    activation: Activation,
    (x_dtype, w_dtype, out_dtype): (DType, DType, DType),
    scale: bool,
    counts: Vec<u32>,
    pad: (usize, usize),
) -> GmmCase {
    assert_eq!(counts.len(), experts, "case table");
    GmmCase {
        name: name.to_string(),
        preset: "custom",
        experts,
        k,
        n,
        layout,
        activation,
        x_dtype,
        w_dtype,
        out_dtype,
        scale,
        counts,
        pad,
        tokens: None,
        mode: Mode::Auto,
        tiling: Tiling::Defaults,
        gemm_kernel: GemmKernel::Auto,
    }
}

fn ci_cases() -> Vec<GmmCase> {
    use Activation::{None as Plain, SwiGlu};
    use DType::{BF16, F16, F32};
    vec![
        ci_case(
            "decode nk bf16 swiglu",
            (8, 64, 48),
            Layout::Nk,
            SwiGlu,
            (BF16, BF16, BF16),
            false,
            vec![2, 0, 1, 3, 0, 1, 2, 1],
            (0, 0),
        ),
        ci_case(
            "prefill kn f16 scale",
            (3, 72, 40),
            Layout::Kn,
            Plain,
            (F16, F16, F16),
            true,
            vec![40, 0, 33],
            (0, 0),
        ),
        ci_case(
            "mixed nk f32 ragged padded",
            (5, 37, 29),
            Layout::Nk,
            Plain,
            (F32, F32, F32),
            false,
            vec![1, 12, 0, 5, 20],
            (3, 2),
        ),
        ci_case(
            "mixed kn bf16 swiglu scale",
            (4, 48, 64),
            Layout::Kn,
            SwiGlu,
            (BF16, BF16, F32),
            true,
            vec![3, 17, 1, 9],
            (0, 0),
        ),
        ci_case(
            "mixed kn f32 x bf16 w",
            (4, 40, 24),
            Layout::Kn,
            Plain,
            (F32, BF16, F16),
            false,
            vec![0, 9, 2, 0],
            (1, 0),
        ),
    ]
}

impl Operator for SwiftGmmOperator {
    fn name(&self) -> &'static str {
        OP
    }

    fn cases(&self, scale: Scale, gpu: &Gpu) -> Vec<Box<dyn Case>> {
        let cases: Vec<GmmCase> = match scale {
            Scale::Ci => ci_cases(),
            Scale::Full => {
                let t = Tiling::Cached;
                vec![
                    preset_case(&PANGU, Proj::GateUp, 16, Layout::Nk, 1, t),
                    preset_case(&PANGU, Proj::GateUp, 256, Layout::Nk, 1, t),
                    preset_case(&PANGU, Proj::Down, 16, Layout::Nk, 1, t),
                    preset_case(&DEEPSEEK, Proj::GateUp, 16, Layout::Nk, 1, t),
                    preset_case(&DEEPSEEK, Proj::Down, 16, Layout::Nk, 1, t),
                ]
            }
            Scale::Bench => {
                let t = Tiling::Tune;
                let (shrink, tokens): (usize, &[usize]) = if gpu.is_cpu() {
                    (8, &[4, 64])
                } else {
                    (1, &[16, 256, 4096])
                };
                let mut cases = Vec::new();
                for &tok in tokens {
                    cases.push(preset_case(
                        &PANGU,
                        Proj::GateUp,
                        tok,
                        Layout::Nk,
                        shrink,
                        t,
                    ));
                }
                cases.push(preset_case(
                    &PANGU,
                    Proj::GateUp,
                    tokens[0],
                    Layout::Kn,
                    shrink,
                    t,
                ));
                for &tok in tokens {
                    cases.push(preset_case(
                        &DEEPSEEK,
                        Proj::GateUp,
                        tok,
                        Layout::Nk,
                        shrink,
                        t,
                    ));
                    cases.push(preset_case(
                        &DEEPSEEK,
                        Proj::Down,
                        tok,
                        Layout::Nk,
                        shrink,
                        t,
                    ));
                }
                with_simt_twins(cases, gpu)
            }
        };
        cases
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Case>)
            .collect()
    }

    fn paths(&self, gpu: &Gpu) -> Vec<(String, String)> {
        let gemm = match coop_support(gpu) {
            Ok(fragment) => {
                // The tiles of large groups (bf16 in and out, 128 rows per group).
                let key = ShapeKey {
                    x_dtype: DType::BF16,
                    w_dtype: DType::BF16,
                    layout: Layout::Nk,
                    k: 4096,
                    n: 4096,
                    rows_bucket: 128,
                    gemm: GemmPath::Coop(fragment),
                };
                let config = tiling::default_config(gpu, &key).coop;
                let limits = tiling::KernelLimits::of(gpu);
                let geo = config.geometry(
                    fragment,
                    limits.subgroup_size,
                    key.layout,
                    key.x_dtype,
                    key.w_dtype,
                );
                format!(
                    "cooperative matrices {} (f16 operands staged in workgroup memory, f32 \
                     accumulation; FUSEDOPS_DISABLE=coop for SIMT), default tile {}, {} B of {} B \
                     workgroup memory",
                    fragment.name(),
                    config.describe(fragment),
                    geo.workgroup_bytes,
                    limits.max_workgroup_bytes
                )
            }
            Err(why) => format!("workgroup-memory tiles, f32 register blocks (SIMT: {why})"),
        };
        vec![
            (
                "schedule".into(),
                "one-workgroup scan of the offsets on the GPU, indirect dispatch per path".into(),
            ),
            (
                "gemv".into(),
                "16-byte weight vectors, split-k reduced in workgroup memory (plain WGSL)".into(),
            ),
            ("gemm".into(), gemm),
            (
                "tiling cache".into(),
                match CacheLocation::from_env() {
                    CacheLocation::File(path) => path.display().to_string(),
                    CacheLocation::Disabled => "off (FUSEDOPS_TILING_CACHE)".into(),
                    CacheLocation::Unavailable => "in memory (no cache directory)".into(),
                },
            ),
        ]
    }

    fn run_named(
        &self,
        gpu: &Gpu,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let named = NamedInputs::parse(inputs, params)?;
        let y = super::run(
            gpu,
            named.x,
            &named.groups,
            named.w,
            named.row_scale,
            &named.options,
        )?;
        Ok(NamedTensors::from([("y".to_string(), y)]))
    }

    fn reference_named(
        &self,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let named = NamedInputs::parse(inputs, params)?;
        let (problem, offsets) = super::check_host(
            named.x,
            &named.groups,
            named.w,
            named.row_scale,
            &named.options,
        )?;
        let y = reference::grouped_matmul(
            named.x,
            &offsets,
            named.w,
            named.options.layout,
            named.options.activation,
            named.row_scale,
        )?;
        let y = Tensor::f32(
            &[problem.m_total, problem.n_out],
            y.iter().map(|&v| v as f32).collect(),
        )?;
        Ok(NamedTensors::from([("y".to_string(), y)]))
    }

    fn tolerance(
        &self,
        _output: &str,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Tolerance {
        // Unparsable params or inputs never reach a comparison (run_named refuses them first).
        let Ok(named) = NamedInputs::parse(inputs, params) else {
            return tolerance(DType::F32);
        };
        let base = tolerance(named.options.out_dtype);
        if named.options.gemm_kernel == GemmKernel::Simt {
            return base;
        }
        // The reference is exact, and every group may run on cooperative matrices: widen the
        // bound by the largest error the f16 staging can cause (reference::staging_bound).
        let bound = super::check_host(
            named.x,
            &named.groups,
            named.w,
            named.row_scale,
            &named.options,
        )
        .and_then(|(problem, offsets)| {
            reference::staging_bound(
                named.x,
                &offsets,
                named.w,
                named.options.layout,
                named.options.activation,
                named.row_scale,
                &vec![true; problem.experts],
            )
        })
        .map_or(0.0, |b| b.into_iter().fold(0.0, f64::max));
        Tolerance {
            abs: base.abs + bound,
            ..base
        }
    }
}

/// `fusedops run` parameters (JSON); every field optional.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RunParams {
    layout: Layout,
    activation: Activation,
    out_dtype: Option<DType>,
    mode: Mode,
    /// "cached" (default), "tune", "defaults" or {"fixed": TileConfig}.
    tiling: Tiling,
    /// "auto" (default), "simt" or "coop".
    gemm_kernel: GemmKernel,
}

/// The named inputs of `fusedops run`: `x`, `w`, `offsets` or `counts`, optional `row_scale`.
struct NamedInputs<'a> {
    x: &'a Tensor,
    w: &'a Tensor,
    groups: Groups,
    row_scale: Option<&'a Tensor>,
    options: Options,
}

impl<'a> NamedInputs<'a> {
    fn parse(inputs: &'a NamedTensors, params: &serde_json::Value) -> Result<Self> {
        let p: RunParams = params_from_json(OP, params)?;
        let groups = match (inputs.get("offsets"), inputs.get("counts")) {
            (Some(o), None) => Groups::from_tensor(o, false)?,
            (None, Some(c)) => Groups::from_tensor(c, true)?,
            _ => {
                return Err(crate::error::Error::invalid(
                    OP,
                    "inputs",
                    "give exactly one of \"offsets\" [e + 1] or \"counts\" [e]",
                ));
            }
        };
        Ok(NamedInputs {
            x: input(OP, inputs, "x")?,
            w: input(OP, inputs, "w")?,
            groups,
            row_scale: inputs.get("row_scale"),
            options: Options {
                layout: p.layout,
                activation: p.activation,
                out_dtype: p.out_dtype.unwrap_or(DType::F32),
                mode: p.mode,
                tiling: p.tiling,
                max_workgroups: None,
                gemm_kernel: p.gemm_kernel,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_gives_topk_rows_per_token() {
        let moge = route(16, 8, 64, true, 3);
        assert_eq!(moge.iter().sum::<u32>(), 128);
        for group in 0..8 {
            let in_group: u32 = moge[group * 8..(group + 1) * 8].iter().sum();
            assert_eq!(in_group, 16, "one expert per group per token");
        }
        let uniform = route(10, 8, 32, false, 4);
        assert_eq!(uniform.iter().sum::<u32>(), 80);
        assert!(
            uniform.iter().all(|&c| c <= 10),
            "distinct experts per token"
        );
    }

    #[test]
    fn hashed_values_stay_in_range() {
        let t = hashed(&[1000], DType::F32, 9, 1.0).unwrap();
        let v = t.to_f32();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean: f32 = v.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1, "mean {mean}");
    }

    #[test]
    fn preset_bench_bytes_are_the_active_weights() {
        let c = preset_case(&PANGU, Proj::GateUp, 16, Layout::Nk, 1, Tiling::Defaults);
        let active = c.counts.iter().filter(|&&n| n > 0).count() as u64;
        assert!(c.bytes() > active * 5120 * 2688 * 2);
        assert!(c.bytes() < (active + 1) * 5120 * 2688 * 2);
        assert_eq!(c.flops(), 2 * 128 * 5120 * 2688);
        assert!(c.checked_rows().len() <= 66, "sampled reference");
    }
}
