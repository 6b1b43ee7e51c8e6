//! The operator's registry entry: the case tables of `fusedops check` / `bench`, the named
//! tensors of `fusedops run`, and the tolerances.

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::inputs::{AmlaInputs, ColumnFill, InputSpec, Pattern, SplitMix};
use super::reference::{self, Emulation, Exact};
use super::schedule::plan_work;
use super::{
    AmlaBindings, AmlaParams, AmlaPlan, AmlaSchedule, AmlaShape, CoopConfig, D_QK, D_V, KvFormat,
    PPrecision, Rescale, Split, TileConfig, coop, kv_row_bytes, quantize_cache, visible_keys,
};
use crate::check::{Tolerance, compare};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::registry::{
    Case, CaseInfo, Checked, Coverage, HostPrepared, NamedTensors, Operator, Prepared, Scale,
    Target, check_input_names, input, params_from_json,
};
use crate::seeded::Seeded;
use crate::tensor::{DType, DeviceTensor, Tensor};
use crate::util::synthetic;

/// Tolerance of `out` against the exact reference: FlashMLA's (abs 8e-4 or rel 2.01/128 per
/// element, cosine difference < 5e-6).
pub fn out_tolerance() -> Tolerance {
    Tolerance::new(8e-4, 2.01 / 128.0).with_cos_diff(5e-6)
}

/// Tolerance of `out` against the exact reference for a variant: FlashMLA's ([`out_tolerance`])
/// when P stays f32, relaxed by what rounding P to b significant bits (f16: 11, bf16: 8) is
/// allowed to cost. Each P̃ is then within 2^-b (half a step, relative) of p c_hat, so an output,
/// an average of v values, moves by at most `2^-b · max|v|` (`max_abs_v` from
/// [`reference::max_abs_v`]); with AMLA, c_hat is rounded too, |cof - 1| <= 2^-b, and a step's
/// first-order compensation of cof_old / cof_new = 1 + ε (|ε| <= 2^(1-b)) leaves at most
/// |ε|/2 = 2^-b of the old O, another `2^-b · max|v|`. The abs part grows by these. The cosine
/// difference of independent rounding errors (uniform, relative half-width 2^-b, variance
/// 2^-2b/3) on zero-mean v is about 2^-2b/6 (the cosine's denominator counts both sides), AMLA's
/// residuals add about as much: the bound grows by 2 · 2^-2b, six times that.
pub fn exact_out_tolerance(rescale: Rescale, rounding: PPrecision, max_abs_v: f64) -> Tolerance {
    let bits: i32 = match rounding {
        PPrecision::F32 => return out_tolerance(),
        PPrecision::F16 => 11,
        PPrecision::BF16 | PPrecision::Cache => 8,
    };
    let terms = if rescale == Rescale::Amla { 2.0 } else { 1.0 };
    let half_step = 2f64.powi(-bits);
    let base = out_tolerance();
    Tolerance {
        abs: base.abs + terms * half_step * max_abs_v,
        max_cos_diff: base.max_cos_diff.map(|c| c + 2.0 * half_step * half_step),
        ..base
    }
}

/// Tolerance of `lse` against the exact reference: FlashMLA's (abs 1e-6 or rel 8.01/65536). The
/// inputs are exact in both (the reference reads the same 16-bit values), the lse comes from the
/// f32 scores and the f32 row sum of unrounded P, so 16-bit inputs need no relaxation.
pub fn lse_tolerance() -> Tolerance {
    Tolerance::new(1e-6, 8.01 / 65536.0)
}

/// f32 values rounded to `dtype` (ties to even), as the kernel stores `out`.
pub fn round_to(dtype: DType, values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| dtype.round(v)).collect()
}

/// The AMLA operator in the registry.
pub struct AmlaOperator;

/// Registered in [`crate::suite::operators`].
pub static OPERATOR: AmlaOperator = AmlaOperator;

/// One case: inputs generated from `spec` and `seed`, run with `params`.
#[derive(Clone, Debug)]
pub struct AmlaCase {
    pub name: String,
    pub preset: &'static str,
    pub spec: InputSpec,
    pub params: AmlaParams,
    pub seed: u64,
    pub source: Source,
}

/// Where a case's inputs come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// [`AmlaInputs::generate`] on the host (patterns, NaN in every unused slot); the reference
    /// checks every sequence.
    Host,
    /// q and the cache made on the device from the seed ([`crate::seeded`]), NaN written into
    /// unused slots; the reference checks sampled sequences, whose q rows and pages the host
    /// makes again.
    Seeded,
}

/// Query-row x key pairs the reference of a seeded case may visit (the sequences it checks are
/// chosen within this, at least two): about 2.3 GFLOP for the exact reference and as much for
/// the emulation.
const SAMPLED_PAIRS: u64 = 1 << 20;

fn rescale_name(r: Rescale) -> &'static str {
    match r {
        Rescale::Amla => "amla",
        Rescale::Multiply => "multiply",
    }
}

fn split_name(s: Split) -> String {
    match s {
        Split::Off => "off".into(),
        Split::Auto { target_workgroups } => format!("auto{target_workgroups}"),
        Split::Chunk { keys } => format!("chunk{keys}"),
    }
}

impl AmlaCase {
    #[allow(clippy::too_many_arguments)]
    fn new(
        preset: &'static str,
        seqlens: &[usize],
        s_q: usize,
        h_q: usize,
        page: usize,
        dtype: DType,
        params: AmlaParams,
        seed: u64,
    ) -> Self {
        let mut spec = InputSpec::new(seqlens, s_q, h_q, page, dtype);
        if params.kv_format != KvFormat::Float {
            spec = spec.quantized(params.kv_format);
        }
        let mut case = AmlaCase {
            name: String::new(),
            preset,
            spec,
            params,
            seed,
            source: Source::Host,
        };
        case.name = case.default_name();
        case
    }

    fn default_name(&self) -> String {
        let s = &self.spec;
        let max = s.seqlens.iter().max().copied().unwrap_or(0);
        let uniform = s.seqlens.iter().all(|&l| l == max);
        let split = if self.params.split == Split::default() {
            String::new()
        } else {
            format!(" split={}", split_name(self.params.split))
        };
        format!(
            "b={} s_q={} h={} sk={}{} {} {} p={}{}{split}",
            s.seqlens.len(),
            s.s_q,
            s.h_q,
            if uniform { "" } else { "<=" },
            max,
            s.kv_label(),
            rescale_name(self.params.rescale),
            self.params.p_precision.name(),
            if self.params.causal { " causal" } else { "" },
        )
    }

    fn with_pattern(mut self, label: &str, pattern: Pattern) -> Self {
        self.spec.pattern = pattern;
        self.name = format!("{} {label}", self.name);
        self
    }

    fn seeded(mut self) -> Self {
        self.source = Source::Seeded;
        self
    }

    fn seq_pairs(&self, len: usize) -> u64 {
        let s = &self.spec;
        (0..s.s_q)
            .map(|t| (visible_keys(len, s.s_q, t, self.params.causal) * s.h_q) as u64)
            .sum()
    }

    fn visible_pairs(&self) -> u64 {
        self.spec.seqlens.iter().map(|&l| self.seq_pairs(l)).sum()
    }

    /// The sequences the reference checks: all of a host case; of a seeded case, evenly spaced
    /// ones (the first and last among them) within [`SAMPLED_PAIRS`].
    fn checked_seqs(&self) -> Vec<usize> {
        let b = self.spec.seqlens.len();
        if self.source == Source::Host || self.visible_pairs() <= SAMPLED_PAIRS {
            return (0..b).collect();
        }
        let per_seq = (self.visible_pairs() / b as u64).max(1);
        let count = ((SAMPLED_PAIRS / per_seq) as usize).clamp(2, b);
        let mut seqs: Vec<usize> = (0..count).map(|j| j * (b - 1) / (count - 1)).collect();
        seqs.dedup();
        seqs
    }
}

impl Case for AmlaCase {
    fn info(&self) -> CaseInfo {
        let s = &self.spec;
        let max = s.seqlens.iter().max().copied().unwrap_or(0);
        CaseInfo {
            op: "amla",
            name: self.name.clone(),
            preset: self.preset.to_string(),
            params: vec![
                ("b".into(), s.seqlens.len().to_string()),
                ("s_q".into(), s.s_q.to_string()),
                ("h_q".into(), s.h_q.to_string()),
                ("s_k".into(), max.to_string()),
                ("page".into(), s.page_size.to_string()),
                ("dtype".into(), s.kv_label().to_string()),
                ("rescale".into(), rescale_name(self.params.rescale).into()),
                ("p".into(), self.params.p_precision.name().into()),
                ("split".into(), split_name(self.params.split)),
                ("causal".into(), self.params.causal.to_string()),
            ],
        }
    }

    /// q, the cache rows the sequences use (as stored: 656 bytes per token for an 8-bit cache),
    /// the block-table entries they use and the lengths, read once; out and lse written once.
    fn bytes(&self) -> u64 {
        let s = &self.spec;
        let rows = (s.seqlens.len() * s.s_q * s.h_q) as u64;
        let keys: u64 = s.seqlens.iter().map(|&l| l as u64).sum();
        let pages: u64 = s.seqlens.iter().map(|&l| s.pages(l) as u64).sum();
        rows * (D_QK * s.q_dtype.size()) as u64
            + keys * kv_row_bytes(s.kv_dtype) as u64
            + rows * (D_V * s.q_dtype.size()) as u64
            + rows * 4
            + 4 * (pages + s.seqlens.len() as u64)
    }

    /// 2 x (576 + 512) per visible (row, key) pair.
    fn flops(&self) -> u64 {
        2 * (D_QK + D_V) as u64 * self.visible_pairs()
    }

    fn uses_tensor_cores(&self, gpu: &Gpu) -> bool {
        let s = &self.spec;
        // Only the dtypes, the cache format and the rows matter to the choice.
        let shape = AmlaShape {
            batch: s.seqlens.len(),
            s_q: s.s_q,
            h_q: s.h_q,
            num_blocks: 1,
            page_size: s.page_size,
            max_blocks: 1,
            q_dtype: s.q_dtype,
            kv_dtype: s.kv_dtype,
            out_dtype: s.q_dtype,
        };
        CoopConfig::choose(gpu, &shape, &self.params).is_ok()
    }

    fn host(&self, target: &Target) -> Result<Box<dyn HostPrepared>> {
        let layout = self.layout()?;
        let shape = self.shape(&layout)?;
        let kernel = DecodeKernel::for_target(target, &shape, &self.params)?;
        let seqs = self.checked_seqs();
        let exact = self.exact(&layout, &seqs)?;
        let emulation = self.emulate(&layout, &seqs, &shape, kernel)?;
        Ok(Box::new(AmlaHost {
            case: self.clone(),
            shape,
            layout,
            seqs,
            exact,
            emulation,
        }))
    }
}

/// The host half of a case's inputs: the block table and lengths, and, for [`Source::Host`],
/// q and the cache.
struct Layout {
    block_table: Tensor,
    cache_seqlens: Tensor,
    num_blocks: usize,
    /// `(q, kv_cache)` of a host case.
    host: Option<(Tensor, Tensor)>,
}

/// The exact reference of the checked sequences, in their order.
struct ExactRows {
    out: Vec<f64>,
    lse: Vec<f64>,
    /// The largest |v| of their caches ([`exact_out_tolerance`]).
    max_abs_v: f64,
    /// What rounding their caches to f16 may do to the scores ([`coop::exact_tolerances`]).
    staging: coop::StagingBound,
}

/// The decode kernel an emulation follows: the SIMT one with its tiles, or the
/// cooperative-matrix one with its configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DecodeKernel {
    Simt(TileConfig),
    Coop(CoopConfig),
}

impl DecodeKernel {
    /// What [`AmlaPlan::new`] picks on a device like `target`.
    fn for_target(target: &Target, shape: &AmlaShape, params: &AmlaParams) -> Result<Self> {
        let (fragment, subgroup) = target.coop.unzip();
        // Every coop configuration has at most 256 invocations, WebGPU's default limit.
        let coop = CoopConfig::choose_for(
            fragment,
            subgroup,
            target.max_workgroup_storage,
            256,
            shape,
            params,
        );
        Ok(match coop {
            Ok(config) => DecodeKernel::Coop(config),
            Err(_) => DecodeKernel::Simt(TileConfig::choose(
                shape.rows(),
                shape.kv_dtype,
                target.max_workgroup_storage,
            )?),
        })
    }

    /// The kernel `plan` runs.
    fn of(plan: &AmlaPlan) -> Self {
        match plan.coop() {
            Some(c) => DecodeKernel::Coop(*c),
            None => DecodeKernel::Simt(*plan.tiles()),
        }
    }

    fn row_blocks(&self, rows: usize) -> usize {
        match self {
            DecodeKernel::Simt(t) => t.row_blocks(rows),
            DecodeKernel::Coop(c) => c.row_blocks(rows),
        }
    }

    fn tile_keys(&self) -> u32 {
        match self {
            DecodeKernel::Simt(t) => t.tile_keys,
            DecodeKernel::Coop(c) => c.tile_keys,
        }
    }

    /// This kernel's emulation of one batch.
    fn emulate(&self, x: [&Tensor; 4], params: &AmlaParams) -> Result<Emulation> {
        let [q, kv, table, lens] = x;
        match self {
            DecodeKernel::Simt(t) => reference::emulate(q, kv, table, lens, params, t),
            DecodeKernel::Coop(c) => Ok(coop::emulate(q, kv, table, lens, params, c)?.emulation),
        }
    }
}

/// The emulation of the checked sequences for one decode kernel.
struct EmulatedRows {
    kernel: DecodeKernel,
    emulation: Emulation,
}

impl EmulatedRows {
    /// The emulations of single sequences, in order, as one.
    fn joined(kernel: DecodeKernel, parts: Vec<Emulation>) -> Self {
        let mut all = Emulation {
            out: Vec::new(),
            lse: Vec::new(),
            out_bound: Vec::new(),
            lse_bound: Vec::new(),
            stats: Default::default(),
        };
        for e in parts {
            all.out.extend(e.out);
            all.lse.extend(e.lse);
            all.out_bound.extend(e.out_bound);
            all.lse_bound.extend(e.lse_bound);
            all.stats += e.stats;
        }
        EmulatedRows {
            kernel,
            emulation: all,
        }
    }
}

/// What the exact reference depends on: shared by a case's `amla` and `multiply` variants.
type ExactKey = (InputSpec, u64, Source, bool, Option<u32>, Vec<usize>);

/// The last exact reference computed, so that the next case with the same inputs (the multiply
/// variant after the AMLA one) reuses it.
static LAST_EXACT: Mutex<Option<(ExactKey, Arc<ExactRows>)>> = Mutex::new(None);

impl AmlaCase {
    /// q `[b · s_q · h_q rows, 576]` of a seeded case: slab r is row r, in [-4, 4).
    fn q_seeded(&self) -> Seeded {
        Seeded::new(self.seed as u32 ^ 0x7171, -2)
    }

    /// The cache of a seeded case: slab p is page p, in [-1, 1).
    fn kv_seeded(&self) -> Seeded {
        Seeded::new(self.seed as u32 ^ 0xcaca, 0)
    }

    fn layout(&self) -> Result<Layout> {
        if self.source == Source::Host {
            let x = AmlaInputs::generate(&self.spec, self.seed)?;
            return Ok(Layout {
                num_blocks: x.kv_cache.shape()[0],
                block_table: x.block_table,
                cache_seqlens: x.cache_seqlens,
                host: Some((x.q, x.kv_cache)),
            });
        }
        // Pages in a shuffled order; columns past a sequence's pages hold -1.
        let s = &self.spec;
        let b = s.seqlens.len();
        let used: usize = s.seqlens.iter().map(|&l| s.pages(l)).sum();
        let num_blocks = (used + s.spare_blocks).max(1);
        let width =
            (s.seqlens.iter().map(|&l| s.pages(l)).max().unwrap_or(0) + s.spare_columns).max(1);
        let mut rng = SplitMix::new(self.seed);
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..num_blocks).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let mut table = vec![-1i32; b * width];
        let mut next = ids.iter();
        for (seq, &len) in s.seqlens.iter().enumerate() {
            for slot in &mut table[seq * width..seq * width + s.pages(len)] {
                *slot = *next.next().expect("enough pages");
            }
        }
        let lens = s.seqlens.iter().map(|&l| l as i32).collect();
        Ok(Layout {
            block_table: Tensor::i32(&[b, width], table)?,
            cache_seqlens: Tensor::i32(&[b], lens)?,
            num_blocks,
            host: None,
        })
    }

    fn shape(&self, layout: &Layout) -> Result<AmlaShape> {
        let s = &self.spec;
        let width = kv_row_bytes(s.kv_dtype) / s.kv_dtype.size();
        AmlaShape::from_parts(
            (&[s.seqlens.len(), s.s_q, s.h_q, D_QK], s.q_dtype),
            (&[layout.num_blocks, s.page_size, width], s.kv_dtype),
            (layout.block_table.shape(), DType::I32),
            (layout.cache_seqlens.shape(), DType::I32),
        )
    }

    /// Page `page` of a seeded cache as stored, with the rows from `nan_from` on NaN: the seeded
    /// values in the cache's dtype, or, for an 8-bit cache, the same values in bf16, quantized.
    fn kv_page(&self, page: usize, nan_from: usize) -> Result<Tensor> {
        let s = &self.spec;
        let dims = [1, s.page_size, D_QK];
        let source = if s.kv_format == KvFormat::Float {
            s.kv_dtype
        } else {
            DType::BF16
        };
        let mut slab = self.kv_seeded().slab(page, &dims, source)?;
        if nan_from < s.page_size {
            let mut values = slab.to_f32();
            values[nan_from * D_QK..].fill(f32::NAN);
            slab = Tensor::from_f32(&dims, &values, source)?;
        }
        match s.kv_format {
            KvFormat::Float => Ok(slab),
            format => quantize_cache(&slab, format),
        }
    }

    /// Sequence `seq` of a seeded case alone: its q rows, its pages (renumbered 0..), its length.
    fn one_sequence(&self, layout: &Layout, seq: usize) -> Result<[Tensor; 4]> {
        let s = &self.spec;
        let rows = s.s_q * s.h_q;
        let row_ids: Vec<usize> = (seq * rows..(seq + 1) * rows).collect();
        let q = self
            .q_seeded()
            .rows(&row_ids, D_QK, s.q_dtype)?
            .reshape(&[1, s.s_q, s.h_q, D_QK])?;
        let len = s.seqlens[seq];
        let width = layout.block_table.shape()[1];
        let table = &layout.block_table.as_i32().expect("i32 table")[seq * width..];
        let pages = s.pages(len);
        let row_bytes = kv_row_bytes(s.kv_dtype);
        let mut bytes = Vec::new();
        for &page in &table[..pages] {
            bytes.extend_from_slice(self.kv_page(page as usize, s.page_size)?.bytes());
        }
        if pages == 0 {
            bytes = vec![0; s.page_size * row_bytes];
        }
        let width = row_bytes / s.kv_dtype.size();
        let cache = Tensor::from_bytes(&[pages.max(1), s.page_size, width], s.kv_dtype, &bytes)?;
        let ids = if pages == 0 {
            vec![-1]
        } else {
            (0..pages as i32).collect()
        };
        Ok([
            q,
            cache,
            Tensor::i32(&[1, pages.max(1)], ids)?,
            Tensor::i32(&[1], vec![len as i32])?,
        ])
    }

    /// The exact reference of `seqs`: the whole batch of a host case, else one sequence per core.
    fn exact(&self, layout: &Layout, seqs: &[usize]) -> Result<Arc<ExactRows>> {
        let key: ExactKey = (
            self.spec.clone(),
            self.seed,
            self.source,
            self.params.causal,
            self.params.softmax_scale.map(f32::to_bits),
            seqs.to_vec(),
        );
        if let Some((k, rows)) = LAST_EXACT.lock().unwrap().as_ref() {
            if *k == key {
                return Ok(rows.clone());
            }
        }
        let rows = Arc::new(match &layout.host {
            Some((q, kv)) => {
                let e = reference::exact(
                    q,
                    kv,
                    &layout.block_table,
                    &layout.cache_seqlens,
                    &self.params,
                )?;
                ExactRows {
                    out: e.out,
                    lse: e.lse,
                    max_abs_v: reference::max_abs_v(kv, self.params.kv_format),
                    staging: coop::StagingBound::of(q, kv, &self.params),
                }
            }
            None => {
                let parts: Vec<(Exact, f64, coop::StagingBound)> = seqs
                    .par_iter()
                    .map(|&seq| {
                        let [q, kv, table, lens] = self.one_sequence(layout, seq)?;
                        let e = reference::exact(&q, &kv, &table, &lens, &self.params)?;
                        let v = reference::max_abs_v(&kv, self.params.kv_format);
                        Ok((e, v, coop::StagingBound::of(&q, &kv, &self.params)))
                    })
                    .collect::<Result<_>>()?;
                ExactRows {
                    out: parts
                        .iter()
                        .flat_map(|(e, _, _)| e.out.iter().copied())
                        .collect(),
                    lse: parts
                        .iter()
                        .flat_map(|(e, _, _)| e.lse.iter().copied())
                        .collect(),
                    max_abs_v: parts.iter().map(|p| p.1).fold(0.0, f64::max),
                    staging: coop::StagingBound {
                        score_abs: parts.iter().map(|p| p.2.score_abs).fold(0.0, f64::max),
                        score_l2: parts.iter().map(|p| p.2.score_l2).fold(0.0, f64::max),
                    },
                }
            }
        });
        *LAST_EXACT.lock().unwrap() = Some((key, rows.clone()));
        Ok(rows)
    }

    /// The emulation of `seqs` for `kernel`. A seeded case emulates each sequence alone, with
    /// the key ranges the whole batch's schedule gives it (`Split::Auto` splits by the batch's
    /// work).
    fn emulate(
        &self,
        layout: &Layout,
        seqs: &[usize],
        shape: &AmlaShape,
        kernel: DecodeKernel,
    ) -> Result<EmulatedRows> {
        if let Some((q, kv)) = &layout.host {
            let x = [q, kv, &layout.block_table, &layout.cache_seqlens];
            return Ok(EmulatedRows {
                kernel,
                emulation: kernel.emulate(x, &self.params)?,
            });
        }
        let work = plan_work(
            &self.spec.seqlens,
            kernel.row_blocks(shape.rows()),
            kernel.tile_keys(),
            self.params.split,
        )?;
        let parts: Vec<Emulation> = seqs
            .par_iter()
            .map(|&seq| {
                let ranges = &work.ranges[seq];
                let split = match ranges.as_slice() {
                    [(begin, end), _, ..] => Split::Chunk { keys: end - begin },
                    _ => Split::Off,
                };
                let params = AmlaParams {
                    split,
                    ..self.params
                };
                let [q, kv, table, lens] = self.one_sequence(layout, seq)?;
                kernel.emulate([&q, &kv, &table, &lens], &params)
            })
            .collect::<Result<_>>()?;
        Ok(EmulatedRows::joined(kernel, parts))
    }
}

/// A case's host half.
struct AmlaHost {
    case: AmlaCase,
    shape: AmlaShape,
    layout: Layout,
    seqs: Vec<usize>,
    exact: Arc<ExactRows>,
    /// For the target's kernel; redone at upload when the device's plan picks another.
    emulation: EmulatedRows,
}

impl AmlaHost {
    /// q and the cache on the device: uploaded, or made from the seed with NaN written into
    /// the spare pages and past every sequence's last key.
    fn inputs(&self, gpu: &Gpu) -> Result<(DeviceTensor, DeviceTensor)> {
        if let Some((q, kv)) = &self.layout.host {
            return Ok((gpu.upload(q)?, gpu.upload(kv)?));
        }
        let (c, sh) = (&self.case, &self.shape);
        let q = gpu.zeros(&[sh.batch, sh.s_q, sh.h_q, D_QK], sh.q_dtype)?;
        c.q_seeded().fill(gpu, &q, 0, D_QK)?;
        if c.spec.kv_format != KvFormat::Float {
            return Ok((q, gpu.upload(&self.packed_cache()?)?));
        }
        let page_len = sh.page_size * D_QK;
        let kv = gpu.zeros(&[sh.num_blocks, sh.page_size, D_QK], sh.kv_dtype)?;
        c.kv_seeded().fill(gpu, &kv, 0, page_len)?;
        let row_bytes = D_QK * sh.kv_dtype.size();
        let nan = synthetic(&[page_len], sh.kv_dtype, |_| f32::NAN)?;
        let width = sh.max_blocks;
        let table = self.layout.block_table.as_i32().expect("i32 table");
        let mut used = vec![false; sh.num_blocks];
        for (seq, &len) in c.spec.seqlens.iter().enumerate() {
            let pages = c.spec.pages(len);
            for &page in &table[seq * width..seq * width + pages] {
                used[page as usize] = true;
            }
            let tail = pages * sh.page_size - len;
            if tail > 0 {
                let last = table[seq * width + pages - 1] as usize;
                let offset = (last * sh.page_size + sh.page_size - tail) * row_bytes;
                let bytes = &nan.bytes()[..tail * row_bytes];
                gpu.checked(|| gpu.queue.write_buffer(kv.buffer(), offset as u64, bytes))?;
            }
        }
        for page in (0..sh.num_blocks).filter(|&p| !used[p]) {
            let offset = (page * page_len * sh.kv_dtype.size()) as u64;
            gpu.checked(|| gpu.queue.write_buffer(kv.buffer(), offset, nan.bytes()))?;
        }
        gpu.queue.submit(std::iter::empty());
        gpu.wait()?;
        Ok((q, kv))
    }

    /// The 8-bit cache of a seeded case, made on the host (there is no quantizer on the device):
    /// every page quantized from its seeded values, NaN past every sequence's last key and in
    /// the spare pages (their groups get NaN scales and codes).
    fn packed_cache(&self) -> Result<Tensor> {
        let (c, sh) = (&self.case, &self.shape);
        let table = self.layout.block_table.as_i32().expect("i32 table");
        // Rows from which each page is NaN: 0 for spare pages, the tail of a last page.
        let mut nan_from = vec![0; sh.num_blocks];
        for (seq, &len) in c.spec.seqlens.iter().enumerate() {
            for (p, &page) in table[seq * sh.max_blocks..][..c.spec.pages(len)]
                .iter()
                .enumerate()
            {
                nan_from[page as usize] = (len - p * sh.page_size).min(sh.page_size);
            }
        }
        let pages: Vec<Tensor> = nan_from
            .par_iter()
            .enumerate()
            .map(|(page, &from)| c.kv_page(page, from))
            .collect::<Result<_>>()?;
        let bytes: Vec<u8> = pages.iter().flat_map(|t| t.bytes().to_vec()).collect();
        Tensor::from_bytes(&sh.kv_shape(), sh.kv_dtype, &bytes)
    }
}

impl HostPrepared for AmlaHost {
    fn upload<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>> {
        let c = &self.case;
        let plan = AmlaPlan::new(gpu, &self.shape, &c.params)?;
        let redone;
        let kernel = DecodeKernel::of(&plan);
        let emulation = if kernel == self.emulation.kernel {
            &self.emulation
        } else {
            redone = c.emulate(&self.layout, &self.seqs, &self.shape, kernel)?;
            &redone
        };
        let mut exact_tolerance = (
            exact_out_tolerance(c.params.rescale, plan.p_rounding(), self.exact.max_abs_v),
            lse_tolerance(),
        );
        if plan.coop().is_some() {
            let (out, lse) = exact_tolerance;
            exact_tolerance = coop::exact_tolerances(
                out,
                lse,
                &c.params,
                self.exact.max_abs_v,
                &self.exact.staging,
            );
        }
        let (q, kv) = self.inputs(gpu)?;
        let (table, lens) = (&self.layout.block_table, &self.layout.cache_seqlens);
        let main = Run::new(gpu, plan, table, lens, &q, &kv)?;
        let baseline = if c.params.rescale == Rescale::Amla {
            let params = AmlaParams {
                rescale: Rescale::Multiply,
                ..c.params
            };
            let plan = main.plan.sibling(gpu, &params)?;
            Some(Run::new(gpu, plan, table, lens, &q, &kv)?)
        } else {
            None
        };
        Ok(Box::new(AmlaPrepared {
            gpu,
            shape: self.shape,
            seqs: self.seqs.clone(),
            main,
            baseline,
            exact: self.exact.clone(),
            exact_tolerance,
            emulation_out: round_to(self.shape.out_dtype, &emulation.emulation.out),
            emulation_out_tolerance: emulation.emulation.out_tolerance(self.shape.out_dtype),
            emulation_lse: emulation.emulation.lse.clone(),
            emulation_lse_tolerance: emulation.emulation.lse_tolerance(),
            _inputs: (q, kv),
        }))
    }

    fn coverage(&self) -> Coverage {
        Coverage::new(self.seqs.len(), self.shape.batch, "sequences")
    }
}

/// One planned, scheduled and bound call.
struct Run {
    plan: AmlaPlan,
    _schedule: AmlaSchedule,
    bindings: AmlaBindings,
    out: DeviceTensor,
    lse: DeviceTensor,
}

impl Run {
    fn new(
        gpu: &Gpu,
        plan: AmlaPlan,
        block_table: &Tensor,
        cache_seqlens: &Tensor,
        q: &DeviceTensor,
        kv: &DeviceTensor,
    ) -> Result<Self> {
        let schedule = plan.schedule(gpu, block_table, cache_seqlens)?;
        let shape = plan.shape();
        let out = gpu.zeros(&shape.out_shape(), shape.out_dtype)?;
        let lse = gpu.zeros(&shape.lse_shape(), DType::F32)?;
        let bindings = plan.bind(gpu, &schedule, q, kv, &out, &lse)?;
        Ok(Run {
            plan,
            _schedule: schedule,
            bindings,
            out,
            lse,
        })
    }
}

struct AmlaPrepared<'g> {
    gpu: &'g Gpu,
    shape: AmlaShape,
    /// The checked sequences.
    seqs: Vec<usize>,
    main: Run,
    baseline: Option<Run>,
    exact: Arc<ExactRows>,
    /// Of `out` and `lse` against the exact reference (they depend on the kernel).
    exact_tolerance: (Tolerance, Tolerance),
    /// The emulation, `out` rounded to the output dtype, and the bounds it derives.
    emulation_out: Vec<f32>,
    emulation_out_tolerance: Tolerance,
    emulation_lse: Vec<f32>,
    emulation_lse_tolerance: Tolerance,
    _inputs: (DeviceTensor, DeviceTensor),
}

impl AmlaPrepared<'_> {
    /// The checked sequences' part of `values` (`per_seq` values each).
    fn picked(&self, values: Vec<f32>, per_seq: usize) -> Vec<f32> {
        if self.seqs.len() == self.shape.batch {
            return values;
        }
        self.seqs
            .iter()
            .flat_map(|&s| values[s * per_seq..(s + 1) * per_seq].iter().copied())
            .collect()
    }
}

impl Prepared for AmlaPrepared<'_> {
    fn variant(&self) -> String {
        self.main.plan.variant()
    }

    fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.main.plan.record_bound(rec, &self.main.bindings)
    }

    fn verify(&self) -> Result<Vec<Checked>> {
        let sh = &self.shape;
        let rows = sh.s_q * sh.h_q;
        let out = self.picked(self.gpu.download_f32(&self.main.out)?, rows * D_V);
        let lse = self.picked(self.gpu.download_f32(&self.main.lse)?, rows);
        let n = self.seqs.len();
        let (out_shape, lse_shape) = ([n, sh.s_q, sh.h_q, D_V], [n, sh.h_q, sh.s_q]);
        Ok(vec![
            Checked::new(
                "out",
                &out_shape,
                compare(&out, &self.exact.out, self.exact_tolerance.0),
            ),
            Checked::new(
                "lse",
                &lse_shape,
                compare(&lse, &self.exact.lse, self.exact_tolerance.1),
            ),
            Checked::new(
                "out~emulation",
                &out_shape,
                compare(&out, &self.emulation_out, self.emulation_out_tolerance),
            ),
            Checked::new(
                "lse~emulation",
                &lse_shape,
                compare(&lse, &self.emulation_lse, self.emulation_lse_tolerance),
            ),
        ])
    }

    fn baseline(&self) -> Option<String> {
        self.baseline.as_ref().map(|b| b.plan.variant())
    }

    fn record_baseline(&self, rec: &mut Recorder) -> Result<()> {
        match &self.baseline {
            Some(b) => b.plan.record_bound(rec, &b.bindings),
            None => Err(Error::unsupported("amla", "baseline of a multiply case")),
        }
    }
}

fn params(rescale: Rescale, p: PPrecision, split: Split, causal: bool) -> AmlaParams {
    AmlaParams {
        softmax_scale: None,
        causal,
        rescale,
        p_precision: p,
        split,
        kv_format: KvFormat::Float,
    }
}

/// `p` for an 8-bit cache of `format`.
fn packed(format: KvFormat, p: AmlaParams) -> AmlaParams {
    AmlaParams {
        kv_format: format,
        ..p
    }
}

/// Lengths 1..=max spread over `b` sequences, reproducibly (a variable-length batch).
fn spread(b: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix::new(seed);
    (0..b).map(|_| 1 + rng.below(max)).collect()
}

fn ci_cases() -> Vec<AmlaCase> {
    use KvFormat::{Fp8, Int8};
    use PPrecision::{Cache, F16, F32};
    use Rescale::{Amla, Multiply};
    let chunk = |keys| Split::Chunk { keys };
    let auto = |t| Split::Auto {
        target_workgroups: t,
    };
    let p = "custom";
    vec![
        AmlaCase::new(
            p,
            &[0, 1, 45, 130],
            1,
            16,
            16,
            DType::BF16,
            params(Amla, F32, Split::Off, false),
            1,
        ),
        AmlaCase::new(
            p,
            &[0, 1, 45, 130],
            1,
            16,
            16,
            DType::BF16,
            params(Multiply, F32, Split::Off, false),
            1,
        ),
        AmlaCase::new(
            p,
            &[0, 1, 45, 130],
            1,
            16,
            16,
            DType::BF16,
            params(Amla, F16, chunk(32), false),
            1,
        ),
        AmlaCase::new(
            p,
            &[3, 70],
            2,
            32,
            32,
            DType::F16,
            params(Amla, F16, auto(8), true),
            2,
        ),
        AmlaCase::new(
            p,
            &[5, 200],
            4,
            1,
            64,
            DType::F32,
            params(Multiply, F16, chunk(64), true),
            3,
        ),
        AmlaCase::new(
            p,
            &[50, 33],
            1,
            128,
            64,
            DType::BF16,
            params(Amla, F16, auto(8), false),
            4,
        ),
        AmlaCase::new(
            p,
            &[300],
            1,
            16,
            64,
            DType::BF16,
            params(Amla, F16, chunk(128), false),
            5,
        )
        .with_pattern(
            "rising-max",
            Pattern {
                ramp_log2_per_key: 2.5,
                column: None,
            },
        ),
        AmlaCase::new(
            p,
            &[150, 97],
            1,
            16,
            128,
            DType::BF16,
            params(Amla, F32, Split::Off, false),
            6,
        )
        .with_pattern(
            "denormal-column",
            Pattern {
                ramp_log2_per_key: 0.3,
                column: Some(ColumnFill {
                    column: 7,
                    value: 1e-39,
                    keys: usize::MAX,
                }),
            },
        ),
        // P and c_hat in bf16 (the cache's type), and the 8-bit caches.
        AmlaCase::new(
            p,
            &[0, 1, 45, 130],
            1,
            16,
            16,
            DType::BF16,
            params(Amla, Cache, chunk(32), false),
            1,
        ),
        AmlaCase::new(
            p,
            &[3, 70, 129],
            1,
            16,
            16,
            DType::BF16,
            packed(Fp8, params(Amla, Cache, Split::Off, false)),
            7,
        ),
        AmlaCase::new(
            p,
            &[50, 33],
            2,
            8,
            32,
            DType::BF16,
            packed(Int8, params(Multiply, F32, auto(8), true)),
            8,
        ),
    ]
}

fn full_cases() -> Vec<AmlaCase> {
    let d = "deepseek-v3";
    let amla = params(Rescale::Amla, PPrecision::F16, Split::default(), false);
    let mut cases: Vec<AmlaCase> = [16, 32, 64, 128]
        .into_iter()
        .map(|h| {
            AmlaCase::new(
                d,
                &spread(64, 4096, h as u64),
                1,
                h,
                64,
                DType::BF16,
                amla,
                10 + h as u64,
            )
        })
        .collect();
    cases.push(AmlaCase::new(
        d,
        &spread(32, 4096, 7),
        2,
        16,
        64,
        DType::BF16,
        AmlaParams {
            causal: true,
            ..amla
        },
        20,
    ));
    cases.push(AmlaCase::new(
        d,
        &spread(64, 4096, 8),
        1,
        16,
        64,
        DType::BF16,
        params(Rescale::Multiply, PPrecision::F32, Split::default(), false),
        21,
    ));
    for (format, seed) in [(KvFormat::Fp8, 22), (KvFormat::Int8, 23)] {
        cases.push(AmlaCase::new(
            d,
            &spread(64, 4096, seed),
            1,
            16,
            64,
            DType::BF16,
            packed(
                format,
                params(Rescale::Amla, PPrecision::Cache, Split::default(), false),
            ),
            seed,
        ));
    }
    cases
}

/// The headline cases of `fusedops bench`: b=128, s_q=1, h_q 16 and 128 over 4096 keys of bf16
/// cache with the `amla` and `multiply` rescales (at h_q 16 also over the FP8 and int8 caches of
/// the same values), and b=128, s_q=2, h_q=128 causal over lengths
/// up to 8192; inputs made on the device, sampled sequences checked. A CPU adapter gets the same
/// mix over b=4 (2 at h_q=128) and 512 keys.
fn headline(full: bool) -> Vec<AmlaCase> {
    let d = "deepseek-v3";
    let amla = params(Rescale::Amla, PPrecision::F32, Split::default(), false);
    let multiply = AmlaParams {
        rescale: Rescale::Multiply,
        ..amla
    };
    let causal = AmlaParams {
        causal: true,
        ..amla
    };
    // P in f16: the tensor-core decode where the adapter has one (the bench times it beside
    // the SIMT kernel).
    let amla16 = AmlaParams {
        p_precision: PPrecision::F16,
        ..amla
    };
    let (b, sk, b_big_h) = if full { (128, 4096, 128) } else { (4, 512, 2) };
    let case = |lens: &[usize], s_q, h, p, seed| {
        AmlaCase::new(d, lens, s_q, h, 64, DType::BF16, p, seed).seeded()
    };
    // The 8-bit caches beside their bf16 twin: same shape, the same values before quantization.
    let fp8 = packed(KvFormat::Fp8, amla);
    let int8 = packed(KvFormat::Int8, amla);
    vec![
        case(&vec![sk; b], 1, 16, amla, 30),
        case(&vec![sk; b], 1, 16, fp8, 30),
        case(&vec![sk; b], 1, 16, int8, 30),
        case(&vec![sk; b], 1, 16, multiply, 30),
        case(&vec![sk; b], 1, 16, amla16, 30),
        case(&vec![sk; b_big_h], 1, 128, amla, 31),
        case(&vec![sk; b_big_h], 1, 128, multiply, 31),
        case(&vec![sk; b_big_h], 1, 128, amla16, 31),
        case(&spread(b_big_h, 2 * sk, 33), 2, 128, causal, 33),
    ]
}

/// Parameters of `fusedops run --params` (JSON): `softmax_scale` (default 1/sqrt(576)),
/// `causal` (false), `rescale` ("amla" | "multiply"), `p_precision` ("f32" | "f16" | "bf16" |
/// "cache"), `split` ("auto" | "off" | {"chunk": keys} | {"target_workgroups": n}),
/// `kv_format` ("float" | "fp8" | "int8"; an 8-bit format needs the packed u8 `kv_cache`).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunParams {
    pub softmax_scale: Option<f32>,
    pub causal: bool,
    pub rescale: Rescale,
    pub p_precision: PPrecision,
    pub split: Option<SplitParam>,
    pub kv_format: KvFormat,
}

/// The `split` field of [`RunParams`].
#[derive(Clone, Debug)]
pub enum SplitParam {
    Word(String),
    Chunk { chunk: u32 },
    Target { target_workgroups: u32 },
}

/// By hand rather than `untagged`, whose error ("did not match any variant") names neither the
/// value nor what is allowed.
impl<'de> serde::Deserialize<'de> for SplitParam {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let bad = || {
            serde::de::Error::custom(format!(
                "{value} is not a split (expected \"auto\", \"off\", {{\"chunk\": keys}} or \
                 {{\"target_workgroups\": n}}, numbers in 0..=4294967295)"
            ))
        };
        let count = |v: &serde_json::Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(bad)
        };
        match &value {
            serde_json::Value::String(word) => Ok(SplitParam::Word(word.clone())),
            serde_json::Value::Object(map) if map.len() == 1 => match map.iter().next() {
                Some((key, v)) if key == "chunk" => Ok(SplitParam::Chunk { chunk: count(v)? }),
                Some((key, v)) if key == "target_workgroups" => Ok(SplitParam::Target {
                    target_workgroups: count(v)?,
                }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl RunParams {
    pub fn to_params(&self) -> Result<AmlaParams> {
        let split = match &self.split {
            None => Split::default(),
            Some(SplitParam::Word(w)) if w == "auto" => Split::default(),
            Some(SplitParam::Word(w)) if w == "off" => Split::Off,
            Some(SplitParam::Word(w)) => {
                return Err(Error::Format {
                    what: "amla params split".into(),
                    why: format!(
                        "{w:?} (expected \"auto\", \"off\", {{\"chunk\": keys}} or {{\"target_workgroups\": n}})"
                    ),
                });
            }
            Some(SplitParam::Chunk { chunk }) => Split::Chunk { keys: *chunk },
            Some(SplitParam::Target { target_workgroups }) => Split::Auto {
                target_workgroups: *target_workgroups,
            },
        };
        Ok(AmlaParams {
            softmax_scale: self.softmax_scale,
            causal: self.causal,
            rescale: self.rescale,
            p_precision: self.p_precision,
            split,
            kv_format: self.kv_format,
        })
    }
}

struct NamedInputs<'a> {
    q: &'a Tensor,
    kv_cache: &'a Tensor,
    block_table: &'a Tensor,
    cache_seqlens: &'a Tensor,
}

fn named_inputs(inputs: &NamedTensors) -> Result<NamedInputs<'_>> {
    check_input_names(
        "amla",
        inputs,
        &["q", "kv_cache", "block_table", "cache_seqlens"],
    )?;
    Ok(NamedInputs {
        q: input("amla", inputs, "q")?,
        kv_cache: input("amla", inputs, "kv_cache")?,
        block_table: input("amla", inputs, "block_table")?,
        cache_seqlens: input("amla", inputs, "cache_seqlens")?,
    })
}

impl Operator for AmlaOperator {
    fn name(&self) -> &'static str {
        "amla"
    }

    fn cases(&self, scale: Scale, gpu: &Gpu) -> Vec<Box<dyn Case>> {
        let cases = match scale {
            Scale::Ci => ci_cases(),
            Scale::Full => full_cases(),
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
        let max = gpu.caps.max_workgroup_storage;
        let tiles = |rows: usize, dtype: DType| match TileConfig::choose(rows, dtype, max) {
            Ok(t) => format!(
                "head block {} x {}-key tiles, {} B of {} B workgroup memory",
                t.head_block, t.tile_keys, t.workgroup_bytes, max
            ),
            Err(e) => format!("unavailable: {e}"),
        };
        // The coop path for a DeepSeek-V3 head count (128 rows: the largest head block).
        let deepseek = AmlaShape {
            batch: 1,
            s_q: 1,
            h_q: 128,
            num_blocks: 1,
            page_size: 64,
            max_blocks: 1,
            q_dtype: DType::BF16,
            kv_dtype: DType::BF16,
            out_dtype: DType::BF16,
        };
        let p16 = AmlaParams {
            p_precision: PPrecision::F16,
            ..AmlaParams::default()
        };
        let coop = match CoopConfig::choose(gpu, &deepseek, &p16) {
            Ok(c) => format!(
                "{} (head block: s_q x h_q rounded up to a power of two, {}..64); the SIMT \
                 kernels below for f32 q, an f32 cache or P in f32",
                c.describe(max),
                c.fragment.size()
            ),
            Err(why) => format!("f32 SIMT ({why})"),
        };
        vec![
            ("decode (16-bit q and P)".into(), coop),
            (
                "decode (16-bit cache)".into(),
                format!("f32 SIMT, {}", tiles(16, DType::BF16)),
            ),
            (
                "decode (f32 cache)".into(),
                format!("f32 SIMT, {}", tiles(16, DType::F32)),
            ),
            (
                "decode (8-bit cache)".into(),
                format!(
                    "fp8/int8 codes x f32 scales decoded to f32 while loading, f32 SIMT, {}",
                    tiles(16, DType::U8)
                ),
            ),
            (
                "reductions".into(),
                "workgroup memory (no subgroup operations: any subgroup size)".into(),
            ),
            (
                "P in f16 / bf16".into(),
                "rounded in f32 arithmetic (no shader-f16 needed)".into(),
            ),
        ]
    }

    fn run_named(
        &self,
        gpu: &Gpu,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let p = params_from_json::<RunParams>("amla", params)?.to_params()?;
        let x = named_inputs(inputs)?;
        let got = super::amla(gpu, x.q, x.kv_cache, x.block_table, x.cache_seqlens, &p)?;
        Ok(NamedTensors::from([
            ("out".to_string(), got.out),
            ("lse".to_string(), got.lse),
        ]))
    }

    fn reference_named(
        &self,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let p = params_from_json::<RunParams>("amla", params)?.to_params()?;
        let x = named_inputs(inputs)?;
        let shape = AmlaShape::of(x.q, x.kv_cache, x.block_table, x.cache_seqlens)?;
        let r = reference::exact(x.q, x.kv_cache, x.block_table, x.cache_seqlens, &p)?;
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        Ok(NamedTensors::from([
            (
                "out".to_string(),
                Tensor::f32(&shape.out_shape(), f32s(&r.out))?,
            ),
            (
                "lse".to_string(),
                Tensor::f32(&shape.lse_shape(), f32s(&r.lse))?,
            ),
        ]))
    }

    fn tolerance(
        &self,
        output: &str,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Tolerance {
        let (Ok(p), Ok(x)) = (
            params_from_json::<RunParams>("amla", params).and_then(|p| p.to_params()),
            named_inputs(inputs),
        ) else {
            return if output == "lse" {
                lse_tolerance()
            } else {
                out_tolerance()
            };
        };
        let max_abs_v = reference::max_abs_v(x.kv_cache, p.kv_format);
        let mut tolerances = (
            exact_out_tolerance(
                p.rescale,
                p.p_precision.resolve(x.kv_cache.dtype()),
                max_abs_v,
            ),
            lse_tolerance(),
        );
        // The coop decode may run (the adapter decides): its f16 staging of an 8-bit cache.
        let coop_possible = AmlaShape::of(x.q, x.kv_cache, x.block_table, x.cache_seqlens)
            .is_ok_and(|shape| coop::eligible(&shape, &p).is_ok());
        if coop_possible {
            let bound = coop::StagingBound::of(x.q, x.kv_cache, &p);
            tolerances = coop::exact_tolerances(tolerances.0, tolerances.1, &p, max_abs_v, &bound);
        }
        if output == "lse" {
            tolerances.1
        } else {
            tolerances.0
        }
    }
}
