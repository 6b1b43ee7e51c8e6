//! CPU references for AMLA.
//!
//! - [`exact`]: f64 softmax(q·kᵀ·scale)·v per (sequence, query token, head) row, and its lse, on
//!   the cache's exact values (8-bit codes times their scales). The judge of every variant.
//! - [`emulate`]: the kernel's own steps in f32, in its block order: the same q pre-scaling, the
//!   same decoding of the cache into the key tile (NaN and infinities cleared and flagged), the
//!   same key tiles and split boundaries (from [`schedule::plan_work`]), the same d-group order
//!   of the score sums, the per-tile max, the AMLA exponent step as an integer add on the f32
//!   bits (with the -30 clamp, the rounding compensation and the entries whose exponent field is
//!   0 left alone) or the multiply, the 16-bit rounding of P, the 1e10 guard and the combine of
//!   split partials. It matches the kernel far more tightly than the exact reference does, so a
//!   mismatch can be traced to one step; it counts how often the clamp and the guard acted
//!   ([`AmlaStats`]), and it derives how far a conforming GPU may legitimately differ from it
//!   ([`Emulation::out_tolerance`], docs/amla.md "Emulation bounds").
//!
//! Rows that see no key give out = 0 and lse = -inf in both. A row that sees at least one key and
//! whose q row or one of whose visible keys holds a NaN or ±inf (an 8-bit cache: a NaN code, a
//! NaN or infinite scale, a non-finite rope value) gives out = NaN (all 512) and lse = NaN in
//! both: the kernel's rule.

use half::{bf16, f16};

use super::quant;
use super::schedule::{self, QUADS, TileConfig};
use super::{AmlaParams, AmlaShape, D_QK, D_V, KvFormat, PPrecision, Rescale, check_values};
use crate::check::Tolerance;
use crate::error::Result;
use crate::tensor::{DType, Tensor, TensorData};

/// Score of a masked key and the initial running max (as the kernel's MASKED).
pub const MASKED: f32 = -3.0e38;
/// Score of a visible key that holds a NaN or infinity (as the kernel's POISONED).
pub const POISONED: f32 = -3.2e38;
/// Bits of 1e10: O entries whose magnitude bits exceed these are zeroed by the AMLA guard.
pub const GUARD_BITS: u32 = 0x501502f9;
/// The AMLA exponent step never goes below 2^-30.
pub const MIN_EXPONENT_STEP: f32 = -30.0;
/// f32 unit roundoff, 2^-24.
pub(super) const U: f64 = 1.0 / 16_777_216.0;

/// Elements `start .. start + len` of a tensor as f64.
fn values_f64(t: &Tensor, start: usize, len: usize) -> Vec<f64> {
    let r = start..start + len;
    match t.data() {
        TensorData::F32(v) => v[r].iter().map(|&x| x as f64).collect(),
        TensorData::F16(v) => v[r].iter().map(|x| x.to_f64()).collect(),
        TensorData::BF16(v) => v[r].iter().map(|x| x.to_f64()).collect(),
        TensorData::I32(v) => v[r].iter().map(|&x| x as f64).collect(),
        TensorData::U32(v) => v[r].iter().map(|&x| x as f64).collect(),
        TensorData::U8(v) => v[r].iter().map(|&x| x as f64).collect(),
        TensorData::I8(v) => v[r].iter().map(|&x| x as f64).collect(),
    }
}

/// The inputs, validated, with the lengths.
pub(super) struct Checked<'a> {
    pub(super) shape: AmlaShape,
    format: KvFormat,
    pub(super) q: &'a Tensor,
    kv: &'a Tensor,
    table: &'a [i32],
    pub(super) lengths: Vec<usize>,
}

impl<'a> Checked<'a> {
    pub(super) fn new(
        q: &'a Tensor,
        kv: &'a Tensor,
        block_table: &'a Tensor,
        cache_seqlens: &'a Tensor,
        params: &AmlaParams,
    ) -> Result<Self> {
        let shape = AmlaShape::of(q, kv, block_table, cache_seqlens)?;
        shape.check_format(params.kv_format)?;
        // The dtypes were checked above.
        let table = block_table.as_i32().unwrap_or_default();
        let seqlens = cache_seqlens.as_i32().unwrap_or_default();
        let lengths = shape.validate_indices(table, seqlens)?;
        check_values(&shape, params, q, kv, table, &lengths)?;
        Ok(Checked {
            shape,
            format: params.kv_format,
            q,
            kv,
            table,
            lengths,
        })
    }

    /// The cache rows sequence `seq` uses, in key order.
    pub(super) fn rows(&self, seq: usize) -> Vec<usize> {
        self.shape
            .sequence_rows(self.table, seq, self.lengths[seq])
            .collect()
    }

    /// Cache row `row` as its exact values: the stored floats, or codes times scales.
    fn row_exact(&self, row: usize) -> Vec<f64> {
        match self.kv.as_u8() {
            Some(bytes) => quant::decode_row(
                &bytes[row * quant::ROW_BYTES..(row + 1) * quant::ROW_BYTES],
                self.format,
            ),
            None => values_f64(self.kv, row * D_QK, D_QK),
        }
    }

    /// Cache row `row` as the kernel's key tile holds it: f32 values (a packed row decoded in
    /// f32 arithmetic, four values at a time) with NaN and infinities cleared to 0, and whether
    /// one was cleared.
    pub(super) fn row_tile(&self, row: usize) -> (Vec<f32>, bool) {
        let mut bad = false;
        let mut out = Vec::with_capacity(D_QK);
        match self.kv.as_u8() {
            None => {
                for v in values_f64(self.kv, row * D_QK, D_QK) {
                    let v = v as f32;
                    bad |= !v.is_finite();
                    out.push(if v.is_finite() { v } else { 0.0 });
                }
            }
            Some(bytes) => {
                let r = &bytes[row * quant::ROW_BYTES..(row + 1) * quant::ROW_BYTES];
                for quad in 0..D_V / 4 {
                    let at = quant::SCALES_AT + 4 * (quad * 4 / quant::GROUP);
                    let scale = f32::from_le_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]);
                    let mut quad_bad = !scale.is_finite();
                    let scale = if scale.is_finite() { scale } else { 0.0 };
                    let mut v = [0.0f32; 4];
                    for (j, x) in v.iter_mut().enumerate() {
                        let code = r[4 * quad + j];
                        let value = match self.format {
                            KvFormat::Int8 => code as i8 as f32,
                            _ if code & 0x7f == 0x7f => {
                                quad_bad = true;
                                0.0
                            }
                            _ => quant::e4m3_to_f32(code),
                        };
                        *x = value * scale;
                    }
                    if v.iter().any(|x| !x.is_finite()) {
                        v = [0.0; 4];
                        quad_bad = true;
                    }
                    bad |= quad_bad;
                    out.extend(v);
                }
                for pair in r[quant::ROPE_AT..].chunks_exact(2) {
                    let v = bf16::from_le_bytes([pair[0], pair[1]]).to_f32();
                    bad |= !v.is_finite();
                    out.push(if v.is_finite() { v } else { 0.0 });
                }
            }
        }
        (out, bad)
    }
}

/// Run `f(seq)` for every sequence on all cores, results in sequence order.
pub(super) fn per_sequence<T: Send>(batch: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(batch.max(1));
    let mut results: Vec<Option<T>> = (0..batch).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                scope.spawn(move || {
                    (t..batch)
                        .step_by(threads)
                        .map(|s| (s, f(s)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (s, r) in h.join().expect("reference worker panicked") {
                results[s] = Some(r);
            }
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every sequence computed"))
        .collect()
}

/// Rows of every sequence into the output layouts: out `[b, s_q, h_q, 512]` (rows in order),
/// lse `[b, h_q, s_q]`.
pub(super) fn scatter_lse<T: Copy + Default>(s: &AmlaShape, per_seq: Vec<Vec<T>>) -> Vec<T> {
    let rows = s.rows();
    let mut lse = vec![T::default(); s.batch * rows];
    for (seq, l) in per_seq.into_iter().enumerate() {
        for (row, v) in l.into_iter().enumerate() {
            let (token, head) = (row / s.h_q, row % s.h_q);
            lse[(seq * s.h_q + head) * s.s_q + token] = v;
        }
    }
    lse
}

/// The largest finite |v| (the first 512 values of a cache row) over every row of the cache
/// (what AMLA's compensation residual is relative to, see
/// [`super::cases::exact_out_tolerance`]).
pub fn max_abs_v(kv_cache: &Tensor, format: KvFormat) -> f64 {
    let finite_max = |m: f64, v: f64| if v.is_finite() { m.max(v.abs()) } else { m };
    match kv_cache.as_u8() {
        Some(bytes) => bytes
            .chunks_exact(quant::ROW_BYTES)
            .flat_map(|row| quant::decode_row(row, format).into_iter().take(D_V))
            .fold(0.0, finite_max),
        None => kv_cache
            .to_f64()
            .chunks_exact(D_QK)
            .flat_map(|row| row[..D_V].to_vec())
            .fold(0.0, finite_max),
    }
}

/// Exact outputs in f64: `out [b, s_q, h_q, 512]`, `lse [b, h_q, s_q]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Exact {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

/// The exact reference (f64 softmax, natural-log lse).
pub fn exact(
    q: &Tensor,
    kv_cache: &Tensor,
    block_table: &Tensor,
    cache_seqlens: &Tensor,
    params: &AmlaParams,
) -> Result<Exact> {
    let x = Checked::new(q, kv_cache, block_table, cache_seqlens, params)?;
    let s = x.shape;
    let rows = s.rows();
    let scale = params.scale() as f64;
    let per_seq = per_sequence(s.batch, |seq| {
        let keys: Vec<Vec<f64>> = x.rows(seq).into_iter().map(|r| x.row_exact(r)).collect();
        let finite: Vec<bool> = keys
            .iter()
            .map(|k| k.iter().all(|v| v.is_finite()))
            .collect();
        let len = x.lengths[seq];
        let mut out = vec![0.0; rows * D_V];
        let mut lse = vec![f64::NEG_INFINITY; rows];
        let mut scores = vec![0.0; len];
        for row in 0..rows {
            let visible = s.visible_keys(len, row / s.h_q, params.causal);
            if visible == 0 {
                continue;
            }
            let o = &mut out[row * D_V..(row + 1) * D_V];
            let qv = values_f64(x.q, (seq * rows + row) * D_QK, D_QK);
            if qv.iter().any(|v| !v.is_finite()) || finite[..visible].contains(&false) {
                o.fill(f64::NAN);
                lse[row] = f64::NAN;
                continue;
            }
            for (score, k) in scores[..visible].iter_mut().zip(&keys) {
                *score = scale * qv.iter().zip(k).map(|(a, b)| a * b).sum::<f64>();
            }
            let m = scores[..visible]
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores[..visible].iter().map(|&v| (v - m).exp()).sum();
            let row_lse = m + sum.ln();
            for (&score, k) in scores[..visible].iter().zip(&keys) {
                let p = (score - row_lse).exp();
                for (od, vd) in o.iter_mut().zip(&k[..D_V]) {
                    *od += p * vd;
                }
            }
            lse[row] = row_lse;
        }
        (out, lse)
    });
    let (outs, lses): (Vec<_>, Vec<_>) = per_seq.into_iter().unzip();
    Ok(Exact {
        out: outs.concat(),
        lse: scatter_lse(&s, lses),
    })
}

/// How often the AMLA-specific steps acted in an emulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AmlaStats {
    /// Key tiles processed (per row).
    pub tiles: u64,
    /// Exponent steps applied (the running max grew after the first tile).
    pub exponent_steps: u64,
    /// Steps where the max grew by more than 30 binades and the -30 clamp acted.
    pub clamped_steps: u64,
    /// Nonzero O entries whose exponent field was 0 (denormals), left unscaled by a step.
    pub denormals_kept: u64,
    /// Output entries zeroed by the 1e10 guard.
    pub guard_zeroed: u64,
    /// 16-bit roundings of P or c_hat whose input lay within the f32 noise of a rounding
    /// boundary, so that a conforming GPU may round them the other way (see
    /// [`Emulation::out_tolerance`]).
    pub ambiguous_roundings: u64,
}

impl std::ops::AddAssign for AmlaStats {
    fn add_assign(&mut self, o: AmlaStats) {
        self.tiles += o.tiles;
        self.exponent_steps += o.exponent_steps;
        self.clamped_steps += o.clamped_steps;
        self.denormals_kept += o.denormals_kept;
        self.guard_zeroed += o.guard_zeroed;
        self.ambiguous_roundings += o.ambiguous_roundings;
    }
}

/// Emulated outputs in f32 (before any rounding to the output dtype), with the bounds a
/// conforming GPU stays within.
#[derive(Clone, Debug, PartialEq)]
pub struct Emulation {
    /// `[b, s_q, h_q, 512]`.
    pub out: Vec<f32>,
    /// `[b, h_q, s_q]`.
    pub lse: Vec<f32>,
    /// Per `out` entry: how far the kernel's f32 result may be from `out` (0 for NaN rows).
    pub out_bound: Vec<f64>,
    /// Per `lse` entry: how far the kernel's lse may be from `lse`.
    pub lse_bound: Vec<f64>,
    pub stats: AmlaStats,
}

impl Emulation {
    /// The tolerance of the kernel's `out` (stored as `out_dtype`) against this emulation
    /// rounded to `out_dtype` ([`round_to`](super::cases::round_to)), from the per-entry
    /// bounds: an entry may differ by its bound (f32 out), or by the one 16-bit step that lies
    /// within its bound (16-bit out: 0 when no rounding boundary is that close). The abs
    /// tolerance is the largest such allowance; the cosine difference, which is
    /// Σ(a - e)² / Σ(a² + e²), is bounded by Σ allowance² / Σ e².
    pub fn out_tolerance(&self, out_dtype: DType) -> Tolerance {
        let (mut max, mut allowed_sq, mut norm_sq) = (0.0f64, 0.0f64, 0.0f64);
        for (&e, &bound) in self.out.iter().zip(&self.out_bound) {
            if !e.is_finite() {
                continue;
            }
            let allowed = match out_dtype {
                DType::F32 => bound,
                dtype => {
                    let lo = dtype.round((e as f64 - bound) as f32) as f64;
                    let hi = dtype.round((e as f64 + bound) as f32) as f64;
                    hi - lo
                }
            };
            let e = out_dtype.round(e) as f64;
            max = max.max(allowed);
            allowed_sq += allowed * allowed;
            norm_sq += e * e;
        }
        let cos = if norm_sq > 0.0 {
            allowed_sq / norm_sq
        } else {
            0.0
        };
        // The smallest positive f32 keeps exact agreement from being an abs bound of 0.
        Tolerance::new(max.max(f32::MIN_POSITIVE as f64), 0.0).with_cos_diff(cos)
    }

    /// The tolerance of the kernel's `lse` against this emulation: the largest per-row bound.
    pub fn lse_tolerance(&self) -> Tolerance {
        let max = self.lse_bound.iter().fold(0.0f64, |m, &b| m.max(b));
        Tolerance::new(max.max(f32::MIN_POSITIVE as f64), 0.0)
    }
}

/// A non-negative f32 rounded to the nearest value of P's 16-bit type (ties to even), as the
/// kernel's `round_p`; unchanged for `F32`.
pub fn round_p(x: f32, p: PPrecision) -> f32 {
    match p {
        PPrecision::F16 => f16::from_f32(x).to_f32(),
        PPrecision::BF16 | PPrecision::Cache => bf16::from_f32(x).to_f32(),
        PPrecision::F32 => x,
    }
}

/// A non-negative f32 rounded to the nearest f16 value (ties to even), as the kernel's
/// `round_f16`.
pub fn round_f16(x: f32) -> f32 {
    round_p(x, PPrecision::F16)
}

/// Spacing of P's 16-bit type at the non-negative `x`.
fn spacing(x: f32, p: PPrecision) -> f64 {
    let exponent = ((x.to_bits() >> 23) as i32 - 127).max(-126);
    match p {
        PPrecision::F16 => (exponent.max(-14) as f64 - 10.0).exp2(),
        _ => (exponent as f64 - 7.0).exp2(),
    }
}

/// AMLA's rescale of one O entry: `step` added to its f32 bits as an integer (wrapping, as the
/// kernel's add). An entry whose exponent field is 0 (±0 or a denormal) keeps its value: the add
/// would wrap it, and not scaling it is at most a denormal's error.
pub fn add_to_exponent(o: f32, step: u32) -> f32 {
    if o.to_bits() & 0x7fff_ffff < 0x0080_0000 {
        return o;
    }
    f32::from_bits(o.to_bits().wrapping_add(step))
}

/// The AMLA guard: |O| > 1e10 becomes 0, compared on the magnitude bits, so NaN and infinity
/// patterns (only wrapped entries produce them: non-finite inputs never reach O) become 0 too.
pub fn guard(o: f32) -> Option<f32> {
    (o.to_bits() & 0x7fff_ffff > GUARD_BITS).then_some(0.0)
}

/// The exponent step for a max that moved from 2^-n_old to 2^-n_new with compensation factors
/// cof_old, cof_new: round(N * 2^23) with N = max(dn, -30) + 1.5 (cof_old / cof_new - 1) + 1e-6,
/// as bits to add (two's complement).
pub fn exponent_step(n_old: f32, n_new: f32, cof_old: f32, cof_new: f32) -> u32 {
    let dn = (n_new - n_old).max(MIN_EXPONENT_STEP);
    let frac = 1.5 * (cof_old / cof_new - 1.0) + 1e-6;
    ((dn as i32) << 23).wrapping_add((frac * 8_388_608.0).round_ties_even() as i32) as u32
}

/// The running state of one row, as the kernel's row invocation holds it.
pub(super) struct RowState {
    pub(super) m: f32,
    pub(super) l: f32,
    n: f32,
    cof: f32,
    pub(super) c_hat: f32,
    pub(super) poisoned: bool,
}

/// What one tile did to a row.
pub(super) struct TileStep {
    /// The O rescale: an integer add (AMLA) or the bits of an f32 factor (multiply).
    pub(super) step: u32,
    /// Whether the step applies to O (the max grew after the row's first key).
    pub(super) rescales: bool,
    /// The nominal factor the step multiplies O by, and l's factor (for the bounds).
    factor: f64,
    decay: f32,
    /// The largest score of the tile, what it had to exceed to move the max (the running max,
    /// plus the lazy threshold of the coop kernel), the new running max, and c = 2^(m + n) when
    /// AMLA recomputed it.
    m_tile: f32,
    threshold: f32,
    m: f32,
    c: Option<f32>,
    /// p, p · c_hat (AMLA) or p before the 16-bit rounding, and P as the P·V product uses it.
    x_unscaled: Vec<f32>,
    x: Vec<f32>,
    pub(super) p: Vec<f32>,
}

impl RowState {
    pub(super) fn new() -> Self {
        RowState {
            m: MASKED,
            l: 0.0,
            n: 0.0,
            cof: 1.0,
            c_hat: 1.0,
            poisoned: false,
        }
    }

    /// One tile: update the state from the tile's scores (log2 units, MASKED when masked,
    /// POISONED for a visible non-finite key) and return the O rescale step and P. The max moves
    /// only to a tile max above the running max plus `lazy` binades (the SIMT kernel: 0, where
    /// this is the plain running max; the coop kernel's lazy reference max otherwise).
    pub(super) fn tile(
        &mut self,
        scores: &[f32],
        amla: bool,
        rounding: PPrecision,
        lazy: f32,
        stats: &mut AmlaStats,
    ) -> TileStep {
        stats.tiles += 1;
        self.poisoned |= scores.contains(&POISONED);
        let m_tile = scores.iter().copied().fold(MASKED, f32::max);
        let threshold = self.m + lazy;
        let changed = m_tile > threshold;
        let m_new = if changed { m_tile } else { self.m };
        let first = self.m == MASKED;
        let decay = if changed {
            if first { 0.0 } else { (self.m - m_new).exp2() }
        } else {
            1.0
        };
        let mut t = TileStep {
            step: decay.to_bits(),
            rescales: changed && !first,
            factor: decay as f64,
            decay,
            m_tile,
            threshold,
            m: m_new,
            c: None,
            x_unscaled: Vec::with_capacity(scores.len()),
            x: Vec::with_capacity(scores.len()),
            p: Vec::with_capacity(scores.len()),
        };
        if amla {
            t.step = 0;
            t.factor = 1.0;
            if changed {
                let n_new = -m_new.round_ties_even();
                let c = (m_new + n_new).exp2();
                let c_hat = round_p(c, rounding);
                let cof = c / c_hat;
                if !first {
                    if n_new - self.n < MIN_EXPONENT_STEP {
                        stats.clamped_steps += 1;
                    }
                    t.step = exponent_step(self.n, n_new, self.cof, cof);
                    t.factor = ((n_new - self.n).max(MIN_EXPONENT_STEP) as f64).exp2()
                        * (self.cof as f64 / cof as f64);
                    stats.exponent_steps += 1;
                }
                self.n = n_new;
                self.cof = cof;
                self.c_hat = c_hat;
                t.c = Some(c);
            }
        }
        let p_mult = if amla { self.c_hat } else { 1.0 };
        let mut l_tile = 0.0f32;
        for &s in scores {
            let p = if s > MASKED { (s - m_new).exp2() } else { 0.0 };
            l_tile += p;
            let x = p * p_mult;
            t.x_unscaled.push(p);
            t.x.push(x);
            t.p.push(round_p(x, rounding));
        }
        self.l = self.l * decay + l_tile;
        self.m = m_new;
        t
    }

    /// Normalise O (after the AMLA guard) and return the lse (natural log, -inf when empty).
    pub(super) fn finish(&self, o: &mut [f32], amla: bool, stats: &mut AmlaStats) -> f32 {
        let norm = if self.l > 0.0 {
            1.0 / if amla { self.l * self.c_hat } else { self.l }
        } else {
            0.0
        };
        for x in o.iter_mut() {
            if let (true, Some(zero)) = (amla, guard(*x)) {
                *x = zero;
                stats.guard_zeroed += 1;
            }
            *x *= norm;
        }
        if self.l > 0.0 {
            (self.m + self.l.log2()) * std::f32::consts::LN_2
        } else {
            f32::NEG_INFINITY
        }
    }
}

/// How far a conforming GPU may be from the emulation, accumulated over one row's key range in
/// O's units (docs/amla.md, "Emulation bounds"). The model: the kernel runs the same f32 steps in
/// the same order; a GPU may round each fma's product separately (WGSL allows it), so a score
/// may differ by `σ = 2u·Σ_d |q_d k_d|` (u = 2^-24), and `exp2` by its WGSL allowance of
/// `3 + 2|x|` ulp. A shift of the running max alone changes nothing (p, c and the steps all
/// follow it, and AMLA's invariant holds for any max), but it moves the inputs of the 16-bit
/// roundings: a rounding of P (or of c_hat) whose input lies within that relative noise `η` of
/// a rounding boundary may go the other way — a whole 16-bit step, and for c_hat every P̃ of
/// the tiles that use it plus half of c_hat's relative step in AMLA's compensation of the old O
/// (`lin`, summed as a worst case). The remaining f32-level noise (scores, exp2, the fma of
/// P·V, c in the compensation, the decays), and the rounding errors of P̃ drawn anew from a
/// c_hat that may differ, are independent from key to key and from step to step and are summed
/// in squares (`var`, bounded at [`NOISE_SIGMAS`] times its root).
pub(super) struct Bounds {
    /// Worst-case part, per O entry.
    lin: Vec<f64>,
    /// Sum of squares of the independent f32-level noise, per O entry.
    var: Vec<f64>,
    /// Sum of squares of the noise of l, in l's units.
    l_var: f64,
    /// Bound on the running max's difference (log2 units).
    sigma_m: f64,
    /// c_hat (and so every P̃ since) may have been rounded the other way at the last step.
    c_hat_ambiguous: bool,
    /// The coop kernel's lazy reference max may have moved on one side only (a tile max within
    /// the noise of the threshold): from then on the references may differ for the rest of the
    /// range, and with them every P̃'s rounding and AMLA's compensation at each step.
    reference_ambiguous: bool,
}

/// Allowance of WGSL's `exp2(x)`: 3 + 2|x| ulp, relative.
fn exp2_allowance(x: f64) -> f64 {
    (3.0 + 2.0 * x.abs()) * 2.0 * U
}

/// Relative noise of AMLA's c = exp2(m + n), |m + n| <= 0.5, beyond the shift of m.
const C_NOISE: f64 = 4.0 * 2.0 * U + 2.0 * U;

/// Independent f32-level noise is bounded at this many times its root-sum-square.
const NOISE_SIGMAS: f64 = 6.0;

impl Bounds {
    pub(super) fn new() -> Self {
        Bounds {
            lin: vec![0.0; D_V],
            var: vec![0.0; D_V],
            l_var: 0.0,
            sigma_m: 0.0,
            c_hat_ambiguous: false,
            reference_ambiguous: false,
        }
    }

    /// How far a conforming GPU may round `x` (with relative noise `eta`) from where the
    /// emulation rounds it, in P's 16-bit type: 0, or one (or more) 16-bit steps.
    fn flip(x: f32, eta: f64, rounding: PPrecision) -> f64 {
        let lo = round_p((x as f64 * (1.0 - eta)) as f32, rounding) as f64;
        let hi = round_p((x as f64 * (1.0 + eta)) as f32, rounding) as f64;
        hi - lo
    }

    /// Account for one tile of the row: `o_old` is O after this tile's rescale, `keys` the tile's
    /// key rows (tile values), `scores` and `sigmas` the scores and their noise bounds.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tile(
        &mut self,
        t: &TileStep,
        m_old: f32,
        o_old: &[f32],
        keys: &[&[f32]],
        scores: &[f32],
        sigmas: &[f64],
        amla: bool,
        rounding: PPrecision,
        stats: &mut AmlaStats,
    ) {
        let ln2 = std::f64::consts::LN_2;
        for (&s, &sigma) in scores.iter().zip(sigmas) {
            if s > MASKED {
                self.sigma_m = self.sigma_m.max(sigma);
            }
        }
        let sigma_m = self.sigma_m;
        let rounded = rounding != PPrecision::F32;
        // Worst-case and independent relative errors on the old O.
        let (mut lin_old, mut noise_old) = (0.0f64, 0.0f64);
        // The tile's max lies within the noise of the running max: one side may step (AMLA: its
        // 1e-6 bias) and the other not.
        if m_old != MASKED
            && t.m_tile > MASKED
            && ((t.m_tile - t.threshold) as f64).abs() <= 2.0 * sigma_m
        {
            lin_old += 2e-6 + 3.0 * ln2 * sigma_m;
            // A lazy threshold: one side may move the reference by the threshold or more.
            self.reference_ambiguous |= t.threshold != m_old;
        }
        // While the references may differ, either side may step in any tile, and the
        // compensations of the two differ by up to c_hat's relative step.
        if self.reference_ambiguous && rounded && amla {
            lin_old += 0.5 * spacing(1.0, rounding);
        }
        if t.rescales {
            self.l_var *= t.decay as f64 * t.decay as f64;
            let decay_noise = exp2_allowance((m_old - t.m) as f64) + 2.0 * U;
            if amla {
                // round(N · 2^23) and the compensation's view of c on both sides.
                noise_old += 3.0 * C_NOISE + (-23.0f64).exp2();
            } else {
                noise_old += decay_noise;
            }
            for (l, v) in self.lin.iter_mut().zip(self.var.iter_mut()) {
                *l *= t.factor.abs();
                *v *= t.factor * t.factor;
            }
        }
        if let Some(c) = t.c {
            let mut ambiguous = false;
            if rounded {
                ambiguous = Bounds::flip(c, ln2 * sigma_m + C_NOISE, rounding) != 0.0;
                stats.ambiguous_roundings += u64::from(ambiguous);
                // A c_hat that may differ now or at the previous step changes the compensation
                // of this step by up to half of c_hat's relative step.
                if t.rescales && (ambiguous || self.c_hat_ambiguous) {
                    lin_old += 0.5 * spacing(c, rounding) / c as f64;
                }
            }
            self.c_hat_ambiguous = ambiguous;
        }
        for ((l, v), &o) in self.lin.iter_mut().zip(self.var.iter_mut()).zip(o_old) {
            // A wrapped entry (beyond the guard) is zeroed at the end either way.
            let o = if guard(o).is_some() {
                0.0
            } else {
                o.abs() as f64
            };
            *l += lin_old * o;
            *v += (noise_old * o).powi(2);
        }
        for (c, key) in keys.iter().enumerate() {
            let x = t.x[c];
            if x == 0.0 {
                continue;
            }
            let v = &key[..D_V];
            // p's own noise (its score, exp2, the multiply), and with the max's shift the noise
            // its rounding decision sees.
            let own = ln2 * sigmas[c] + exp2_allowance((scores[c] - t.m) as f64) + 2.0 * U;
            let (mut step, mut noise) = (0.0, 0.0);
            if rounded && ((amla && self.c_hat_ambiguous) || self.reference_ambiguous) {
                // From a c_hat one step apart (or another reference max), every rounding error
                // of P̃ is drawn anew: up to one 16-bit step each, independently from key to key.
                noise = spacing(x, rounding);
            } else if rounded {
                step = Bounds::flip(x, own + ln2 * sigma_m, rounding);
                stats.ambiguous_roundings += u64::from(step != 0.0);
            } else {
                noise = own * x as f64;
                if amla {
                    // P̃ = p · c: c's noise is shared by the keys of one max.
                    step = C_NOISE * x as f64;
                }
            }
            let p = t.p[c] as f64;
            // The P·V fma: a product rounding and the sum's rounding.
            let w = noise * noise + (2.0 * U * p).powi(2);
            for ((l, var), &vd) in self.lin.iter_mut().zip(self.var.iter_mut()).zip(v) {
                let vd = vd.abs() as f64;
                *l += step * vd;
                *var += w * vd * vd;
            }
            self.l_var += (own * t.x_unscaled[c] as f64).powi(2);
        }
        self.l_var += (2.0 * U).powi(2) * (keys.len() as f64);
    }

    /// The bounds of the normalised output `out = O · norm` and of the lse, for a row with
    /// row sum `l`.
    pub(super) fn finish(&self, out: &[f32], norm: f32, l: f32, lse: f32) -> (Vec<f64>, f64) {
        // L = l (· c_hat): l's noise and the division.
        let eta_l = NOISE_SIGMAS * self.l_var.sqrt() / l.max(f32::MIN_POSITIVE) as f64;
        let eta_norm = eta_l + C_NOISE + 2.0 * U;
        let bound = self
            .lin
            .iter()
            .zip(&self.var)
            .zip(out)
            .map(|((&lin, &var), &o)| {
                (lin + NOISE_SIGMAS * var.sqrt()) * norm.abs() as f64 + eta_norm * o.abs() as f64
            })
            .collect();
        let lse_bound = std::f64::consts::LN_2 * self.sigma_m
            + eta_l
            + (-21.0f64).exp2()
            + 4.0 * U * (lse.abs() as f64);
        (bound, lse_bound)
    }
}

/// The kernel's score: q (pre-scaled f32) · k as an fma chain over quads dg, dg + DG, ... per
/// d-group, then the d-groups summed in order.
fn kernel_score(q: &[f32], k: &[f32], d_groups: usize) -> f32 {
    let mut s = 0.0f32;
    for g in 0..d_groups {
        let mut acc = 0.0f32;
        for quad in (g..QUADS as usize).step_by(d_groups) {
            for d in 4 * quad..4 * quad + 4 {
                acc = q[d].mul_add(k[d], acc);
            }
        }
        s += acc;
    }
    s
}

/// One row's result over one key range, or the merge of several.
pub(super) struct Part {
    pub(super) o: Vec<f32>,
    pub(super) lse: f32,
    pub(super) bound: Vec<f64>,
    pub(super) lse_bound: f64,
}

impl Part {
    pub(super) fn poisoned() -> Part {
        Part {
            o: vec![f32::NAN; D_V],
            lse: f32::NAN,
            bound: vec![0.0; D_V],
            lse_bound: 0.0,
        }
    }
}

/// Merge split partials as the combine kernel: weights exp(lse_i - max), lse = max + ln(sum);
/// a NaN partial makes the row NaN.
pub(super) fn combine(parts: &[Part]) -> Part {
    if parts.iter().any(|p| p.lse.is_nan()) {
        return Part::poisoned();
    }
    let live: Vec<&Part> = parts
        .iter()
        .filter(|p| p.lse != f32::NEG_INFINITY)
        .collect();
    let m = live.iter().map(|p| p.lse).fold(MASKED, f32::max);
    let mut acc = vec![0.0f32; D_V];
    let mut total = 0.0f32;
    let mut weights = Vec::with_capacity(live.len());
    for p in &live {
        let w = (p.lse - m).exp();
        total += w;
        weights.push(w);
        for (a, &x) in acc.iter_mut().zip(&p.o) {
            *a = w.mul_add(x, *a);
        }
    }
    if total <= 0.0 {
        return Part {
            o: acc,
            lse: f32::NEG_INFINITY,
            bound: vec![0.0; D_V],
            lse_bound: 0.0,
        };
    }
    for a in acc.iter_mut() {
        *a /= total;
    }
    // Each weight may be off by its lse's bound plus the max's, and exp's allowance.
    let lse_max_bound = live.iter().fold(0.0f64, |b, p| b.max(p.lse_bound));
    let delta = live
        .iter()
        .map(|p| p.lse_bound + lse_max_bound + exp2_allowance((p.lse - m) as f64) + 2.0 * U)
        .fold(0.0f64, f64::max);
    let mut bound = vec![0.0f64; D_V];
    for (p, &w) in live.iter().zip(&weights) {
        let share = (w / total) as f64;
        for ((b, &pb), &o) in bound.iter_mut().zip(&p.bound).zip(&p.o) {
            *b += share * (pb + 2.0 * delta * o.abs() as f64);
        }
    }
    for (b, &a) in bound.iter_mut().zip(&acc) {
        *b += 2.0 * U * a.abs() as f64;
    }
    let lse = m + total.ln();
    Part {
        o: acc,
        lse,
        bound,
        lse_bound: lse_max_bound + delta + (-21.0f64).exp2() + 4.0 * U * lse.abs() as f64,
    }
}

/// The kernel's steps in its block order, for the tile configuration `tiles` (as planned by
/// [`super::AmlaPlan`] for the same shape and device).
pub fn emulate(
    q: &Tensor,
    kv_cache: &Tensor,
    block_table: &Tensor,
    cache_seqlens: &Tensor,
    params: &AmlaParams,
    tiles: &TileConfig,
) -> Result<Emulation> {
    let x = Checked::new(q, kv_cache, block_table, cache_seqlens, params)?;
    let s = x.shape;
    tiles.check(s.kv_dtype)?;
    let rows = s.rows();
    let work = schedule::plan_work(
        &x.lengths,
        tiles.row_blocks(rows),
        tiles.tile_keys,
        params.split,
    )?;
    let amla = params.rescale == Rescale::Amla;
    let rounding = params.p_precision.resolve(s.kv_dtype);
    let tn = tiles.tile_keys as usize;
    let dg = tiles.d_groups as usize;
    let scale_log2 = params.scale_log2();
    let per_seq = per_sequence(s.batch, |seq| {
        let len = x.lengths[seq];
        let (keys, flagged): (Vec<Vec<f32>>, Vec<bool>) =
            x.rows(seq).into_iter().map(|r| x.row_tile(r)).unzip();
        let mut stats = AmlaStats::default();
        let mut rows_out = Vec::with_capacity(rows);
        for row in 0..rows {
            let limit = s.visible_keys(len, row / s.h_q, params.causal);
            let q_prep: Vec<f32> = values_f64(x.q, (seq * rows + row) * D_QK, D_QK)
                .into_iter()
                .map(|v| v as f32 * scale_log2)
                .collect();
            let mut parts = Vec::new();
            for &(begin, end) in &work.ranges[seq] {
                let (begin, end) = (begin as usize, end as usize);
                let mut state = RowState::new();
                let mut bounds = Bounds::new();
                let mut o = vec![0.0f32; D_V];
                for tile_begin in (begin..end).step_by(tn) {
                    let tile_keys = tn.min(end - tile_begin);
                    let mut scores = vec![MASKED; tn];
                    let mut sigmas = vec![0.0f64; tn];
                    for (c, (score, sigma)) in scores.iter_mut().zip(&mut sigmas).enumerate() {
                        let k = tile_begin + c;
                        if k < end && k < limit {
                            let sc = kernel_score(&q_prep, &keys[k], dg);
                            *score = if flagged[k] || !sc.is_finite() {
                                POISONED
                            } else {
                                sc
                            };
                            *sigma = 2.0
                                * U
                                * q_prep
                                    .iter()
                                    .zip(&keys[k])
                                    .map(|(a, b)| (a * b).abs() as f64)
                                    .sum::<f64>();
                        }
                    }
                    let m_old = state.m;
                    let t = state.tile(&scores, amla, rounding, 0.0, &mut stats);
                    if t.rescales {
                        for v in o.iter_mut() {
                            if amla {
                                stats.denormals_kept +=
                                    u64::from(*v != 0.0 && v.to_bits() & 0x7fff_ffff < 0x0080_0000);
                                *v = add_to_exponent(*v, t.step);
                            } else {
                                *v *= f32::from_bits(t.step);
                            }
                        }
                    }
                    let tile_rows: Vec<&[f32]> = (tile_begin..tile_begin + tile_keys)
                        .map(|k| keys[k].as_slice())
                        .collect();
                    bounds.tile(
                        &t,
                        m_old,
                        &o,
                        &tile_rows,
                        &scores[..tile_keys],
                        &sigmas[..tile_keys],
                        amla,
                        rounding,
                        &mut stats,
                    );
                    for (&pc, key) in t.p.iter().zip(&tile_rows) {
                        for (od, &vd) in o.iter_mut().zip(&key[..D_V]) {
                            *od = pc.mul_add(vd, *od);
                        }
                    }
                }
                if state.poisoned {
                    parts.push(Part::poisoned());
                    continue;
                }
                let lse = state.finish(&mut o, amla, &mut stats);
                let norm = if state.l > 0.0 {
                    1.0 / if amla { state.l * state.c_hat } else { state.l }
                } else {
                    0.0
                };
                let (bound, lse_bound) = bounds.finish(&o, norm, state.l, lse);
                parts.push(Part {
                    o,
                    lse,
                    bound,
                    lse_bound,
                });
            }
            rows_out.push(if parts.len() == 1 {
                parts.pop().expect("one part")
            } else {
                combine(&parts)
            });
        }
        (rows_out, stats)
    });
    let mut out = Vec::with_capacity(s.batch * rows * D_V);
    let mut out_bound = Vec::with_capacity(s.batch * rows * D_V);
    let (mut lses, mut lse_bounds) = (Vec::new(), Vec::new());
    let mut stats = AmlaStats::default();
    for (parts, st) in per_seq {
        stats += st;
        let mut l = Vec::with_capacity(rows);
        let mut lb = Vec::with_capacity(rows);
        for p in parts {
            out.extend(p.o);
            out_bound.extend(p.bound);
            l.push(p.lse);
            lb.push(p.lse_bound);
        }
        lses.push(l);
        lse_bounds.push(lb);
    }
    Ok(Emulation {
        out,
        lse: scatter_lse(&s, lses),
        out_bound,
        lse_bound: scatter_lse(&s, lse_bounds),
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_add_on_the_exponent_is_a_power_of_two_multiply() {
        for &o in &[1.0f32, -3.75, 1.0e-20, 6.5e12, 0.3] {
            for dn in [-30i32, -7, -1, 0] {
                let step = (dn << 23) as u32;
                assert_eq!(add_to_exponent(o, step), o * (dn as f32).exp2(), "{o} {dn}");
            }
        }
        // Zero and denormals stay as they are (0x000AE3A0 plus a -1 step with its 8-ulp bias
        // would be the NaN pattern 0xFF8AE3A8); a normal entry that a step takes below 2^-126
        // wraps: the guard's job, NaN patterns included.
        let step = exponent_step(0.0, -1.0, 1.0, 1.0);
        assert_eq!(step, 0xff80_0008);
        for bits in [0u32, 0x8000_0000, 0x000a_e3a0, 0x807f_ffff] {
            assert_eq!(add_to_exponent(f32::from_bits(bits), step).to_bits(), bits);
        }
        let wrapped = add_to_exponent(f32::from_bits(0x0080_0001), (-2i32 << 23) as u32);
        assert!(wrapped.is_nan());
        assert_eq!(guard(wrapped), Some(0.0));
        // 1e-37 has exponent field 4: a -6 step borrows from the sign bit (about -2^127).
        assert_eq!(
            guard(add_to_exponent(1e-37, (-6i32 << 23) as u32)),
            Some(0.0)
        );
        assert_eq!(guard(add_to_exponent(1e-37, (-3i32 << 23) as u32)), None);
        assert_eq!(guard(f32::INFINITY), Some(0.0));
        assert_eq!(guard(9.9e9), None);
        assert_eq!(GUARD_BITS, 1e10f32.to_bits());
    }

    #[test]
    fn exponent_step_clamps_and_compensates() {
        // Uncompensated steps are dn << 23 plus the 1e-6 bias (8 ulps).
        assert_eq!(
            exponent_step(5.0, 2.0, 1.0, 1.0),
            ((-3i32 << 23) + 8) as u32
        );
        assert_eq!(
            exponent_step(0.0, -45.0, 1.0, 1.0),
            ((-30i32 << 23) + 8) as u32
        );
        // The compensation multiplies by about cof_old / cof_new: exact to first order at
        // mid-mantissa, within 0.5 (cof_old/cof_new - 1) relative anywhere.
        for &(cof_old, cof_new) in &[(1.0f32, 1.0004), (0.9996, 1.0), (1.0003, 0.9998)] {
            let want = cof_old / cof_new;
            let eps = (want - 1.0).abs();
            for &o in &[1.0f32, 1.5, 1.999] {
                let got = add_to_exponent(o, exponent_step(0.0, 0.0, cof_old, cof_new)) / o;
                assert!(
                    (got / want - 1.0).abs() <= 0.5 * eps + 2e-6,
                    "{o} {cof_old} {cof_new}: {got} vs {want}"
                );
            }
            let mid = add_to_exponent(1.5, exponent_step(0.0, 0.0, cof_old, cof_new)) / 1.5;
            assert!((mid / want - 1.0).abs() <= 0.01 * eps + 2e-6);
        }
    }

    #[test]
    fn amla_invariant_holds_over_tiles() {
        // O_j = 2^n_j / cof_j * U_j: with 16-bit c_hat the emulated O times cof / 2^n stays the
        // unnormalised sum of 2^s v (here v = 1) to first order.
        for (rounding, tol) in [(PPrecision::F16, 2e-3), (PPrecision::BF16, 1.6e-2)] {
            let mut state = RowState::new();
            let mut stats = AmlaStats::default();
            let mut o = 0.0f32;
            let mut u = 0.0f64;
            for scores in [[0.3f32, -1.0], [2.7, 1.1], [2.9, 6.2], [13.4, 9.0]] {
                let t = state.tile(&scores, true, rounding, 0.0, &mut stats);
                if t.rescales {
                    o = add_to_exponent(o, t.step);
                }
                o += t.p.iter().sum::<f32>();
                u += scores.iter().map(|&s| (s as f64).exp2()).sum::<f64>();
                let invariant = o as f64 * state.cof as f64 / (state.n as f64).exp2();
                assert!((invariant / u - 1.0).abs() < tol, "{invariant} vs {u}");
            }
            assert_eq!(stats.exponent_steps, 3);
            // L = l * c_hat turns O into the softmax average.
            assert!(((o / (state.l * state.c_hat)) as f64 - 1.0).abs() < tol);
        }
    }

    #[test]
    fn p_rounding_matches_the_kernel_and_spacing_is_one_step() {
        for &x in &[0.3f32, 1.0, 0.999, 6.1e-5, 1e-6, 3.0e-39] {
            for p in [PPrecision::F16, PPrecision::BF16] {
                let r = round_p(x, p);
                let step = spacing(r.max(x), p);
                assert!((r as f64 - x as f64).abs() <= 0.5 * step, "{x} {p:?}");
            }
        }
        assert_eq!(round_p(1.0 + 1.0 / 256.0, PPrecision::BF16), 1.0); // tie to even
        assert_eq!(spacing(1.5, PPrecision::BF16), 1.0 / 128.0);
        assert_eq!(spacing(1.5, PPrecision::F16), 1.0 / 1024.0);
        assert_eq!(
            Bounds::flip(1.0 + 1.0 / 256.0, 1e-6, PPrecision::BF16),
            1.0 / 128.0
        );
        assert_eq!(Bounds::flip(1.3, 1e-6, PPrecision::BF16), 0.0);
    }
}
