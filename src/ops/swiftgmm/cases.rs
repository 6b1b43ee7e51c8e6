//! SwiftGMM in the registry: the case tables of `fusedops check` / `bench`, synthetic inputs,
//! and the named-tensor interface of `fusedops run`.

use std::cell::Cell;

use super::quant::{self, Quant, QuantGmmArgs, QuantInputs, QuantWeights, QuantX};
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
    /// int8 weights with per-channel scales (and for W8A8 int8 x with per-row scales, the
    /// quantization of an f32 x).
    quant: Option<Quant>,
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

    /// The same case with int8 weights (its twin in the bench). The tuner measures the 16-bit
    /// kernels only, so a tuned case's twin takes the cached or default tiles.
    fn quantized(mut self, quant: Quant) -> Self {
        self.name = format!("{} {}", self.name, quant.name());
        self.quant = Some(quant);
        self.w_dtype = DType::I8;
        if quant == Quant::W8A8 {
            self.x_dtype = DType::I8;
        }
        if self.tiling == Tiling::Tune {
            self.tiling = Tiling::Cached;
        }
        self
    }

    /// The float dtype x is made in: x's own, or f32 for W8A8 (quantized on the device).
    fn x_source(&self) -> DType {
        if self.quant == Some(Quant::W8A8) {
            DType::F32
        } else {
            self.x_dtype
        }
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
            (
                "quant".to_string(),
                self.quant.map_or("none", Quant::name).to_string(),
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

    /// As stored: the weights of the experts that receive rows (int8: one byte each, plus their
    /// f32 scales), the routed x rows (int8 rows plus their f32 scales for W8A8), y, the row
    /// scale and the offsets.
    fn bytes(&self) -> u64 {
        let active = self.counts.iter().filter(|&&c| c > 0).count() as u64;
        let routed = self.routed() as u64;
        let (k, n) = (self.k as u64, self.n as u64);
        let scales = match self.quant {
            None => 0,
            Some(Quant::W8A16) => active * n * 4 * (1 + self.has_offset() as u64),
            Some(Quant::W8A8) => active * n * 4 + routed * 4,
        };
        active * k * n * self.w_dtype.size() as u64
            + routed * k * self.x_dtype.size() as u64
            + scales
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
        // W8A8 sums int8 with dot4I8Packed: it has no cooperative-matrix path to compare.
        if self.quant == Some(Quant::W8A8) {
            return false;
        }
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
        if (case.pad.0 > 0 || case.pad.1 > 0) && case.x_source() != DType::F32 {
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
        let quant = case.quant_scales()?;
        let expected = match &quant {
            Some(q) => case.quant_reference_rows(&offsets, &rows, scale.as_ref(), q, &[])?,
            None => case.reference_rows(&offsets, &rows, scale.as_ref(), &[])?,
        };
        Ok(GmmHost {
            case: case.clone(),
            offsets,
            scale,
            quant,
            rows,
            expected,
        })
    }
}

/// The weight scales (and offsets) of a quantized case, made on the host (`[e, n]` f32).
struct QuantScales {
    w_scale: Tensor,
    w_offset: Option<Tensor>,
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

    /// W8A16 cases on `[e, k, n]` weights carry an offset.
    fn has_offset(&self) -> bool {
        self.quant == Some(Quant::W8A16) && self.layout == Layout::Kn
    }

    /// Scales that keep outputs O(1) (int8 weights are uniform in ±127, x in ±1), and small
    /// integer offsets.
    fn quant_scales(&self) -> Result<Option<QuantScales>> {
        let Some(_) = self.quant else {
            return Ok(None);
        };
        let (e, n) = (self.experts, self.n);
        let seed = self.w_seeded().seed as u64;
        let unit_scale = 1.0 / (73.0 * (self.k as f32).sqrt());
        let w_scale = synthetic(&[e, n], DType::F32, |i| {
            unit_scale * (1.0 + 0.5 * unit(seed ^ 3, i as u64))
        })?;
        let w_offset = self
            .has_offset()
            .then(|| {
                synthetic(&[e, n], DType::F32, |i| {
                    (unit(seed ^ 4, i as u64) * 4.0).round()
                })
            })
            .transpose()?;
        Ok(Some(QuantScales { w_scale, w_offset }))
    }

    /// The reference of `rows` of a quantized case: x rows from the seed (quantized by the
    /// reference quantizer for W8A8, which the GPU's matches bit for bit), each group's int8
    /// expert from the seed; the groups flagged in `coop_groups` staged in f16 as the
    /// cooperative-matrix kernel stages them (W8A16).
    fn quant_reference_rows(
        &self,
        offsets: &[u32],
        rows: &[usize],
        scale: Option<&Tensor>,
        q: &QuantScales,
        coop_groups: &[bool],
    ) -> Result<Vec<f64>> {
        let (k, n, n_out) = (self.k, self.n, self.n_out());
        let mut by_group: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, &row) in rows.iter().enumerate() {
            if let Some(g) = reference::group_of_row(offsets, row) {
                match by_group.last_mut() {
                    Some((last, members)) if *last == g => members.push(i),
                    _ => by_group.push((g, vec![i])),
                }
            }
        }
        let (x_seed, w_seed) = (self.x_seeded(), self.w_seeded());
        let [a, b] = self.layout.weight_shape(1, k, n)[1..] else {
            unreachable!("weight shapes have three dimensions")
        };
        let options = Options {
            out_dtype: DType::F32,
            tiling: Tiling::Defaults,
            ..self.options()
        };
        let pick = |t: &Tensor, g: usize| -> Result<Tensor> {
            let all = t.to_f32();
            Tensor::f32(&[1, n], all[g * n..(g + 1) * n].to_vec())
        };
        let parts: Vec<Vec<f64>> = by_group
            .par_iter()
            .map(|(g, members)| {
                let picked: Vec<usize> = members.iter().map(|&i| rows[i]).collect();
                let x = x_seed.rows(&picked, k, self.x_source())?;
                let quantized = (self.quant == Some(Quant::W8A8))
                    .then(|| crate::ops::quantize::reference::quantize(&x))
                    .transpose()?;
                let w = w_seed.slab(*g, &[1, a, b], DType::I8)?;
                let w_scale = pick(&q.w_scale, *g)?;
                let w_offset = q.w_offset.as_ref().map(|o| pick(o, *g)).transpose()?;
                let s = scale
                    .map(|s| {
                        let all = s.to_f32();
                        Tensor::f32(&[picked.len()], picked.iter().map(|&r| all[r]).collect())
                    })
                    .transpose()?;
                let groups = Groups::Counts(vec![picked.len() as u32]);
                let inputs = QuantInputs {
                    x: quantized.as_ref().map_or(&x, |q| &q.q),
                    x_scale: quantized.as_ref().map(|q| &q.scale),
                    groups: &groups,
                    w: &w,
                    w_scale: &w_scale,
                    w_offset: w_offset.as_ref(),
                    row_scale: s.as_ref(),
                };
                let local: Vec<usize> = (0..picked.len()).collect();
                let staged = coop_groups.get(*g).copied().unwrap_or(false);
                quant::reference::grouped_matmul_rows_staged(&inputs, &options, &local, &[staged])
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

    /// The weights `[e, a, b]`, made on the device; slab g is expert g. The same for every token
    /// count of a preset's projection, about 1/sqrt(k) in size (int8: uniform in ±127).
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

/// A case's host half: the offsets, the row scale, the weight scales of a quantized case, the
/// checked rows and their reference.
struct GmmHost {
    case: GmmCase,
    offsets: Vec<u32>,
    scale: Option<Tensor>,
    quant: Option<QuantScales>,
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
            .device_tensor(gpu, &[m_total, k], c.x_source(), 0)?;
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
        if let Some(q) = &self.quant {
            return self.upload_quantized(gpu, q, x_dev, weights, scale_dev, offsets_dev, y);
        }
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
            baseline: Some(baseline),
            y,
            rows: self.rows.clone(),
            expected,
            expected_baseline,
            baseline_recorded: Cell::new(false),
            n_out: c.n_out(),
            tolerance: tolerance(c.out_dtype),
            _inputs: Box::new((x_dev, weights, offsets_dev, scale_dev)),
        })
    }

    /// The quantized plan over the seeded inputs: W8A8 quantizes the f32 x on the device first
    /// (bit-exact, so the reference's quantization of the same rows agrees).
    #[allow(clippy::too_many_arguments)]
    fn upload_quantized<'g>(
        &self,
        gpu: &'g Gpu,
        q: &QuantScales,
        x_dev: DeviceTensor,
        weights: ExpertWeights,
        scale_dev: Option<DeviceTensor>,
        offsets_dev: DeviceTensor,
        y: DeviceTensor,
    ) -> Result<GmmPrepared<'g>> {
        let c = &self.case;
        let (m_total, k) = (c.m_total(), c.k);
        let weights = QuantWeights::from_device(
            weights,
            gpu.upload(&q.w_scale)?,
            q.w_offset.as_ref().map(|o| gpu.upload(o)).transpose()?,
        )?;
        let int8 = match c.quant {
            Some(Quant::W8A8) => {
                let qx = gpu.zeros(&[m_total, k], DType::I8)?;
                let sx = gpu.zeros(&[m_total], DType::F32)?;
                let plan = crate::ops::quantize::QuantizePlan::new(gpu, &x_dev, &qx, &sx)?;
                gpu.run(|rec| plan.record(rec))?;
                Some((qx, sx))
            }
            _ => None,
        };
        let plan = GmmPlan::new_quantized(
            gpu,
            &QuantGmmArgs {
                x: match &int8 {
                    Some((q, scale)) => QuantX::Int8 { q, scale },
                    None => QuantX::Float(&x_dev),
                },
                groups: DeviceGroups::Offsets(&offsets_dev),
                weights: &weights,
                row_scale: scale_dev.as_ref(),
                y: &y,
                host_offsets: Some(&self.offsets),
            },
            &c.options(),
        )?;
        // W8A16 groups on the cooperative-matrix path are checked with f16 staging.
        let coop = plan.coop_groups(&self.offsets);
        let expected = if coop.iter().any(|&c| c) {
            c.quant_reference_rows(&self.offsets, &self.rows, self.scale.as_ref(), q, &coop)?
        } else {
            self.expected.clone()
        };
        Ok(GmmPrepared {
            gpu,
            plan,
            baseline: None,
            y,
            rows: self.rows.clone(),
            expected,
            expected_baseline: None,
            baseline_recorded: Cell::new(false),
            n_out: c.n_out(),
            tolerance: tolerance(c.out_dtype),
            _inputs: Box::new((x_dev, int8, weights, offsets_dev, scale_dev)),
        })
    }
}

struct GmmPrepared<'g> {
    gpu: &'g Gpu,
    plan: GmmPlan,
    /// The per-expert baseline (16-bit and f32 weights only).
    baseline: Option<PerExpertBaseline>,
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
    _inputs: Box<dyn std::any::Any>,
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
        self.baseline
            .as_ref()
            .map(|b| format!("per-expert gemm ({} dispatches)", b.dispatches()))
    }

    fn record_baseline(&self, rec: &mut Recorder) -> Result<()> {
        match &self.baseline {
            Some(b) => {
                self.baseline_recorded.set(true);
                b.record(rec)
            }
            None => Err(Error::unsupported(
                OP,
                "a per-expert baseline for int8 weights",
            )),
        }
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
        quant: None,
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
    // Tuned once per adapter and shape, then read from the tiling cache. Each case is followed
    // by its W8A16 and W8A8 twins (the same shape, bytes as stored).
    let t = Tiling::Tune;
    let mut cases: Vec<GmmCase> = Vec::new();
    for &tok in pangu {
        cases.extend(with_twins(preset_case(
            &PANGU,
            Proj::GateUp,
            tok,
            Layout::Nk,
            shrink,
            t,
        )));
    }
    for &tok in deepseek {
        cases.extend(with_twins(preset_case(
            &DEEPSEEK,
            Proj::GateUp,
            tok,
            Layout::Nk,
            shrink,
            t,
        )));
        cases.extend(with_twins(preset_case(
            &DEEPSEEK,
            Proj::Down,
            tok,
            Layout::Nk,
            shrink,
            t,
        )));
    }
    cases
}

/// A case followed by its W8A16 and W8A8 twins.
fn with_twins(case: GmmCase) -> [GmmCase; 3] {
    [
        case.clone(),
        case.clone().quantized(Quant::W8A16),
        case.quantized(Quant::W8A8),
    ]
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
        quant: None,
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
        ci_case(
            "decode nk swiglu",
            (8, 64, 48),
            Layout::Nk,
            SwiGlu,
            (BF16, BF16, BF16),
            false,
            vec![2, 0, 1, 3, 0, 1, 2, 1],
            (0, 0),
        )
        .quantized(Quant::W8A8),
        ci_case(
            "prefill kn f16 scale offset",
            (3, 72, 40),
            Layout::Kn,
            Plain,
            (F16, F16, F16),
            true,
            vec![40, 0, 33],
            (0, 0),
        )
        .quantized(Quant::W8A16),
        ci_case(
            "kn unaligned k ragged padded",
            (5, 36, 28),
            Layout::Kn,
            Plain,
            (F32, F32, F32),
            true,
            vec![1, 12, 0, 5, 20],
            (3, 2),
        )
        .quantized(Quant::W8A8),
        ci_case(
            "nk unaligned k swiglu scale",
            (4, 44, 64),
            Layout::Nk,
            SwiGlu,
            (F32, BF16, F32),
            true,
            vec![3, 17, 1, 9],
            (1, 0),
        )
        .quantized(Quant::W8A16),
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
                let mut cases = vec![];
                cases.extend(with_twins(preset_case(
                    &PANGU,
                    Proj::GateUp,
                    16,
                    Layout::Nk,
                    1,
                    t,
                )));
                cases.push(preset_case(&PANGU, Proj::GateUp, 256, Layout::Nk, 1, t));
                cases.push(preset_case(&PANGU, Proj::Down, 16, Layout::Nk, 1, t));
                cases.push(preset_case(&DEEPSEEK, Proj::GateUp, 16, Layout::Nk, 1, t));
                cases.extend(with_twins(preset_case(
                    &DEEPSEEK,
                    Proj::Down,
                    16,
                    Layout::Nk,
                    1,
                    t,
                )));
                cases
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
                "w8a16".into(),
                format!(
                    "int8 weights become q + offset in registers (gemv, f32) or while staging \
                     (gemm: {}), the per-channel scale in the epilogue",
                    match coop_support(gpu) {
                        Ok(f) => format!("f16 on cooperative matrices {}", f.name()),
                        Err(_) => "f32, SIMT".to_string(),
                    }
                ),
            ),
            ("w8a8".into(), quant::dot_product_path(gpu)),
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
        let y = match named.quantized()? {
            Some(q) => quant::run(gpu, &q, &named.options)?,
            None => super::run(
                gpu,
                named.x,
                &named.groups,
                named.w,
                named.row_scale,
                &named.options,
            )?,
        };
        Ok(NamedTensors::from([("y".to_string(), y)]))
    }

    fn reference_named(
        &self,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let named = NamedInputs::parse(inputs, params)?;
        if let Some(q) = named.quantized()? {
            let (_, shape) = quant::output_shape(&q, &named.options)?;
            let y = quant::reference::grouped_matmul(&q, &named.options)?;
            let y = Tensor::f32(&shape, y.iter().map(|&v| v as f32).collect())?;
            return Ok(NamedTensors::from([("y".to_string(), y)]));
        }
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
        if let Ok(Some(q)) = named.quantized() {
            // W8A16 may stage x and q + offset in f16 on cooperative matrices: widen by what
            // that staging changes for these inputs (W8A8 never runs there).
            let rows: Vec<usize> = (0..q.x.shape().first().copied().unwrap_or(0)).collect();
            let staged = |all: bool| {
                let groups = vec![all; q.groups.experts()];
                quant::reference::grouped_matmul_rows_staged(&q, &named.options, &rows, &groups)
            };
            let bound = match (q.x.dtype().is_float(), staged(false), staged(true)) {
                (true, Ok(exact), Ok(staged)) => exact
                    .iter()
                    .zip(&staged)
                    .map(|(a, b)| (a - b).abs())
                    .filter(|d| d.is_finite())
                    .fold(0.0, f64::max),
                _ => 0.0,
            };
            return Tolerance {
                abs: base.abs + bound,
                ..base
            };
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

/// The named inputs of `fusedops run`: `x`, `w`, `offsets` or `counts`, optional `row_scale`;
/// quantized: int8 `w` with `w_scale` (and `w_offset`), and for int8 `x` its `x_scale`.
struct NamedInputs<'a> {
    x: &'a Tensor,
    w: &'a Tensor,
    groups: Groups,
    row_scale: Option<&'a Tensor>,
    x_scale: Option<&'a Tensor>,
    w_scale: Option<&'a Tensor>,
    w_offset: Option<&'a Tensor>,
    options: Options,
}

impl<'a> NamedInputs<'a> {
    fn parse(inputs: &'a NamedTensors, params: &serde_json::Value) -> Result<Self> {
        let p: RunParams = params_from_json(OP, params)?;
        check_input_names(
            OP,
            inputs,
            &[
                "x",
                "w",
                "offsets",
                "counts",
                "row_scale",
                "x_scale",
                "w_scale",
                "w_offset",
            ],
        )?;
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
            x_scale: inputs.get("x_scale"),
            w_scale: inputs.get("w_scale"),
            w_offset: inputs.get("w_offset"),
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

    /// The quantized inputs, when int8 weights or any scale of them is given (int8 x with
    /// float weights goes to the float path, which names the mismatch).
    fn quantized(&self) -> Result<Option<QuantInputs<'_>>> {
        let quantized = self.w.dtype() == DType::I8
            || self.w_scale.is_some()
            || self.w_offset.is_some()
            || self.x_scale.is_some();
        if !quantized {
            return Ok(None);
        }
        let Some(w_scale) = self.w_scale else {
            let why = if self.w.dtype() == DType::I8 {
                "missing: int8 w needs its per-output-channel scale [e, n] f32".to_string()
            } else {
                // w_offset or x_scale without int8 weights: say what they belong to.
                let given: Vec<&str> = [("w_offset", self.w_offset), ("x_scale", self.x_scale)]
                    .into_iter()
                    .filter_map(|(name, t)| t.map(|_| name))
                    .collect();
                format!(
                    "missing, and w is {}: {} belongs to int8 weights (W8A16: int8 w with \
                     w_scale; W8A8: int8 x with x_scale and int8 w with w_scale)",
                    self.w.dtype(),
                    given.join(" and ")
                )
            };
            return Err(Error::invalid(OP, "input tensor \"w_scale\"", why));
        };
        Ok(Some(QuantInputs {
            x: self.x,
            x_scale: self.x_scale,
            groups: &self.groups,
            w: self.w,
            w_scale,
            w_offset: self.w_offset,
            row_scale: self.row_scale,
        }))
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
