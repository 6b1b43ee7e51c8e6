//! SwiftGMM in the registry: the case tables of `fusedops check` / `bench`, synthetic inputs,
//! and the named-tensor interface of `fusedops run`.

use std::cell::Cell;

use super::tiling::{self, CacheLocation, GemmPath, ShapeKey};
use super::{
    Activation, DeviceGroups, ExpertWeights, GemmKernel, GmmArgs, GmmPlan, Groups, Layout, Mode,
    Options, PerExpertBaseline, Tiling, coop_support, gemm_path, reference, tolerance,
};
use crate::check::{Tolerance, compare};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use rayon::prelude::*;

use crate::registry::{
    Case, CaseInfo, Checked, Coverage, HostPrepared, NamedTensors, Operator, Prepared, Scale,
    Target, check_input_names, input, params_from_json,
};
use crate::seeded::Seeded;
use crate::tensor::{DType, DeviceTensor, Tensor};
use crate::util::{synthetic, unit};

const OP: &str = "swiftgmm";

/// The registered operator.
pub struct SwiftGmmOperator;

/// The instance in [`crate::suite::operators`].
pub static OPERATOR: SwiftGmmOperator = SwiftGmmOperator;

/// How many rows each expert gets.
fn route(tokens: usize, topk: usize, experts: usize, moge: bool, seed: u64) -> Vec<u32> {
    let mut counts = vec![0u32; experts];
    let mut draw = 0u64;
    let mut next = |m: usize| {
        draw += 1;
        ((unit(seed, draw) + 1.0) * 0.5 * m as f32) as usize % m
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
            ..Options::default()
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

    /// The GEMM path runs on cooperative matrices here and some group takes it (forced, or more
    /// rows than the default GEMV threshold).
    fn uses_tensor_cores(&self, gpu: &Gpu) -> bool {
        let gemm_groups = match self.mode {
            Mode::Gemm => self.routed() > 0,
            Mode::Gemv => false,
            Mode::Auto => self.counts.iter().any(|&c| c > 8),
        };
        gemm_groups && matches!(gemm_path(gpu, GemmKernel::Auto), Ok(GemmPath::Coop(_)))
    }

    fn host(&self, _target: &Target) -> Result<Box<dyn HostPrepared>> {
        Ok(Box::new(GmmHost::new(self)?))
    }
}

impl GmmHost {
    /// Generate the host inputs (row scale) and the reference of the checked rows.
    fn new(case: &GmmCase) -> Result<Self> {
        let m_total = case.m_total();
        if (case.pad.0 > 0 || case.pad.1 > 0) && case.x_dtype != DType::F32 {
            // NaN padding rows are written over the seeded x in whole 32-bit words.
            return Err(Error::invalid(
                OP,
                "case table",
                "padding rows need an f32 x",
            ));
        }
        let scale = if case.scale {
            Some(synthetic(&[m_total], DType::F32, |i| {
                0.5 + 0.5 * unit(case.seed() ^ 2, i as u64)
            })?)
        } else {
            None
        };
        let offsets = case.offsets();
        let rows = case.checked_rows();
        let expected = case.reference_rows(&offsets, &rows, scale.as_ref(), &[])?;
        Ok(GmmHost {
            case: case.clone(),
            offsets,
            scale,
            rows,
            expected,
        })
    }
}

impl GmmCase {
    /// Seed of the case's x (and row scale): from its name.
    fn seed(&self) -> u64 {
        self.name
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31) ^ b as u64)
    }

    /// x `[m_total, k]`, made on the device; slab r is row r. Values in [-1, 1).
    fn x_seeded(&self) -> Seeded {
        Seeded::new(self.seed() as u32, 0)
    }

    /// The weights `[e, a, b]`, made on the device; slab g is expert g. The same for every token
    /// count of a preset's projection, about 1/sqrt(k) in size.
    fn w_seeded(&self) -> Seeded {
        let seed = format!("{} {} {} {}", self.preset, self.experts, self.k, self.n)
            .bytes()
            .fold(11u32, |h, b| h.wrapping_mul(31) ^ b as u32);
        Seeded::new(seed, Seeded::shift_for_dot(self.k))
    }

    /// The reference of `rows` (each group's rows on its own core, its expert made once), with
    /// the operands of the groups flagged in `coop_groups` staged in f16 as the
    /// cooperative-matrix kernel stages them (empty: none).
    fn reference_rows(
        &self,
        offsets: &[u32],
        rows: &[usize],
        scale: Option<&Tensor>,
        coop_groups: &[bool],
    ) -> Result<Vec<f64>> {
        let (k, n_out) = (self.k, self.n_out());
        let mut by_group: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, &row) in rows.iter().enumerate() {
            let Some(g) = reference::group_of_row(offsets, row) else {
                continue; // padding: the reference is 0 there
            };
            match by_group.last_mut() {
                Some((last, members)) if *last == g => members.push(i),
                _ => by_group.push((g, vec![i])),
            }
        }
        let (x_seed, w_seed) = (self.x_seeded(), self.w_seeded());
        let [a, b] = self.layout.weight_shape(1, k, self.n)[1..] else {
            unreachable!("weight shapes have three dimensions")
        };
        let parts: Vec<Vec<f64>> = by_group
            .par_iter()
            .map(|(g, members)| {
                let picked: Vec<usize> = members.iter().map(|&i| rows[i]).collect();
                let x = x_seed.rows(&picked, k, self.x_dtype)?;
                let w = w_seed.slab(*g, &[1, a, b], self.w_dtype)?;
                let s = scale
                    .map(|s| {
                        let all = s.to_f32();
                        Tensor::f32(&[picked.len()], picked.iter().map(|&r| all[r]).collect())
                    })
                    .transpose()?;
                let local: Vec<usize> = (0..picked.len()).collect();
                let staged = coop_groups.get(*g).copied().unwrap_or(false);
                reference::grouped_matmul_rows_staged(
                    &x,
                    &[0, picked.len() as u32],
                    &w,
                    self.layout,
                    self.activation,
                    s.as_ref(),
                    &local,
                    &[staged],
                )
            })
            .collect::<Result<_>>()?;
        let mut expected = vec![0.0; rows.len() * n_out];
        for ((_, members), part) in by_group.iter().zip(parts) {
            for (j, &i) in members.iter().enumerate() {
                expected[i * n_out..(i + 1) * n_out]
                    .copy_from_slice(&part[j * n_out..(j + 1) * n_out]);
            }
        }
        Ok(expected)
    }
}

/// A case's host half: the offsets, the row scale, the checked rows and their reference.
struct GmmHost {
    case: GmmCase,
    offsets: Vec<u32>,
    scale: Option<Tensor>,
    rows: Vec<usize>,
    expected: Vec<f64>,
}

impl HostPrepared for GmmHost {
    fn upload<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>> {
        Ok(Box::new(self.upload_gmm(gpu)?))
    }

    fn coverage(&self) -> Coverage {
        Coverage::new(self.rows.len(), self.case.m_total(), "rows")
    }
}

impl GmmHost {
    fn upload_gmm<'g>(&self, gpu: &'g Gpu) -> Result<GmmPrepared<'g>> {
        let c = &self.case;
        let (m_total, k) = (c.m_total(), c.k);
        let x_dev = c
            .x_seeded()
            .device_tensor(gpu, &[m_total, k], c.x_dtype, 0)?;
        // Padding rows (f32 x) hold NaN: a read of one would poison its output row.
        for rows in [0..c.pad.0, m_total - c.pad.1..m_total] {
            if !rows.is_empty() {
                let nan = vec![f32::NAN; rows.len() * k];
                gpu.checked(|| {
                    gpu.queue.write_buffer(
                        x_dev.buffer(),
                        (rows.start * k * 4) as u64,
                        bytemuck::cast_slice(&nan),
                    )
                })?;
            }
        }
        let w_dims = c.layout.weight_shape(c.experts, k, c.n);
        let weights = ExpertWeights::from_shards(c.w_seeded().device_shards(
            gpu,
            c.experts,
            &w_dims[1..],
            c.w_dtype,
        )?)?;
        let scale_dev = self.scale.as_ref().map(|s| gpu.upload(s)).transpose()?;
        let offsets_dev = gpu.upload(&Tensor::u32(&[self.offsets.len()], self.offsets.clone())?)?;
        let y = gpu.zeros(&[m_total, c.n_out()], c.out_dtype)?;
        let args = GmmArgs {
            x: &x_dev,
            groups: DeviceGroups::Offsets(&offsets_dev),
            weights: &weights,
            row_scale: scale_dev.as_ref(),
            y: &y,
            host_offsets: Some(&self.offsets),
        };
        let options = c.options();
        let plan = GmmPlan::new(gpu, &args, &options)?;
        let baseline = PerExpertBaseline::new(gpu, &args, &options)?;
        // Groups on the cooperative-matrix path are checked with their operands staged in f16
        // as the kernel stages them; the baseline runs every group on the GEMM kernel.
        let expected_for = |coop: &[bool]| -> Result<Vec<f64>> {
            if coop.iter().any(|&c| c) {
                c.reference_rows(&self.offsets, &self.rows, self.scale.as_ref(), coop)
            } else {
                Ok(self.expected.clone())
            }
        };
        let (plan_coop, baseline_coop) = (
            plan.coop_groups(&self.offsets),
            baseline.coop_groups(&self.offsets),
        );
        let expected = expected_for(&plan_coop)?;
        let expected_baseline = if baseline_coop == plan_coop {
            None
        } else {
            Some(expected_for(&baseline_coop)?)
        };
        Ok(GmmPrepared {
            gpu,
            plan,
            baseline,
            y,
            rows: self.rows.clone(),
            expected,
            expected_baseline,
            baseline_recorded: Cell::new(false),
            n_out: c.n_out(),
            tolerance: tolerance(c.out_dtype),
            _inputs: (x_dev, weights, offsets_dev, scale_dev),
        })
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
    }
}

/// The headline cases of `fusedops bench`: pangu-pro-moe's gate/up at 16, 256 and 4096 tokens,
/// deepseek-v3's gate/up and down at 16 and 4096, each against one dispatch per expert. A CPU
/// adapter gets the same cases at 1/8 of every dimension and 4, 16, 64 tokens.
fn headline(full: bool) -> Vec<GmmCase> {
    let (shrink, pangu, deepseek): (usize, &[usize], &[usize]) = if full {
        (1, &[16, 256, 4096], &[16, 4096])
    } else {
        (8, &[4, 16, 64], &[4, 64])
    };
    // Tuned once per adapter and shape, then read from the tiling cache.
    let t = Tiling::Tune;
    let mut cases: Vec<GmmCase> = pangu
        .iter()
        .map(|&tok| preset_case(&PANGU, Proj::GateUp, tok, Layout::Nk, shrink, t))
        .collect();
    for &tok in deepseek {
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
    cases
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
            Scale::Bench => return self.headline(!gpu.is_cpu()),
        };
        cases
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Case>)
            .collect()
    }

    fn headline(&self, full: bool) -> Vec<Box<dyn Case>> {
        headline(full)
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
        check_input_names(OP, inputs, &["x", "w", "offsets", "counts", "row_scale"])?;
        let groups = match (inputs.get("offsets"), inputs.get("counts")) {
            (Some(o), None) => Groups::from_tensor(o, false)?,
            (None, Some(c)) => Groups::from_tensor(c, true)?,
            _ => {
                return Err(Error::invalid(
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

    /// The sampled check can fail: a wrong value in one sampled row of y fails it, while the
    /// same corruption in a row outside the sample goes unseen (the report says how many rows
    /// it checked).
    #[test]
    fn sampled_verification_fails_on_a_corrupted_sampled_row() {
        let gpu = Gpu::new().unwrap_or_else(|e| panic!("this test needs a GPU adapter.\n{e}"));
        // 8000 rows x 512 x 64: past FULL_REFERENCE_MACS, so the reference samples rows.
        let case = ci_case(
            "sampled",
            (40, 512, 64),
            Layout::Nk,
            Activation::None,
            (DType::F32, DType::BF16, DType::F32),
            false,
            vec![200; 40],
            (0, 0),
        );
        let host = GmmHost::new(&case).unwrap();
        assert!(
            host.rows.len() < case.m_total() / 10,
            "{} rows",
            host.rows.len()
        );
        let prepared = host.upload_gmm(&gpu).unwrap();
        gpu.run(|rec| prepared.record(rec)).unwrap();
        assert!(prepared.verify().unwrap()[0].comparison.pass);
        let unsampled = (0..case.m_total())
            .find(|r| !host.rows.contains(r))
            .unwrap();
        let sampled = host.rows[host.rows.len() / 2];
        let corrupt = |row: usize| {
            let bytes = (row * case.n_out() * 4) as u64;
            gpu.queue
                .write_buffer(prepared.y.buffer(), bytes + 8, bytemuck::bytes_of(&1e3f32));
            gpu.queue.submit(std::iter::empty());
        };
        corrupt(unsampled);
        assert!(prepared.verify().unwrap()[0].comparison.pass);
        corrupt(sampled);
        let checked = prepared.verify().unwrap();
        assert!(
            !checked[0].comparison.pass,
            "a corrupted sampled row must fail"
        );
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
