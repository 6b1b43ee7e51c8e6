//! CPU references for AMLA.
//!
//! - [`exact`]: f64 softmax(q·kᵀ·scale)·v per (sequence, query token, head) row, and its lse. The
//!   judge of every variant.
//! - [`emulate`]: the kernel's own steps in f32, in its block order: the same q pre-scaling, the
//!   same key tiles and split boundaries (from [`schedule::plan_work`]), the same d-group order of
//!   the score sums, the per-tile max, the AMLA exponent step as an integer add on the f32 bits
//!   (with the -30 clamp, the rounding compensation and exact zeros left alone) or the multiply,
//!   the f16 rounding of P, the 1e10 guard and the combine of split partials. It matches the kernel far more tightly
//!   than the exact reference does, so a mismatch can be traced to one step; it also counts how
//!   often the clamp and the guard acted ([`AmlaStats`]).
//!
//! Rows that see no key give out = 0 and lse = -inf in both.

use half::f16;

use super::schedule::{self, QUADS, TileConfig};
use super::{AmlaParams, AmlaShape, D_QK, D_V, PPrecision, Rescale};
use crate::error::Result;
use crate::tensor::{Tensor, TensorData};

/// Score of a masked key and the initial running max (as the kernel's MASKED).
pub const MASKED: f32 = -3.0e38;
/// Bits of 1e10: O entries whose magnitude bits exceed these are zeroed by the AMLA guard.
pub const GUARD_BITS: u32 = 0x501502f9;
/// The AMLA exponent step never goes below 2^-30.
pub const MIN_EXPONENT_STEP: f32 = -30.0;

/// Elements `start .. start + len` of a float tensor as f64.
fn values_f64(t: &Tensor, start: usize, len: usize) -> Vec<f64> {
    let r = start..start + len;
    match t.data() {
        TensorData::F32(v) => v[r].iter().map(|&x| x as f64).collect(),
        TensorData::F16(v) => v[r].iter().map(|x| x.to_f64()).collect(),
        TensorData::BF16(v) => v[r].iter().map(|x| x.to_f64()).collect(),
        TensorData::I32(v) => v[r].iter().map(|&x| x as f64).collect(),
        TensorData::U32(v) => v[r].iter().map(|&x| x as f64).collect(),
    }
}

/// The inputs, validated, with the lengths.
struct Checked<'a> {
    shape: AmlaShape,
    q: &'a Tensor,
    kv: &'a Tensor,
    table: &'a [i32],
    lengths: Vec<usize>,
}

impl<'a> Checked<'a> {
    fn new(
        q: &'a Tensor,
        kv: &'a Tensor,
        block_table: &'a Tensor,
        cache_seqlens: &'a Tensor,
    ) -> Result<Self> {
        let shape = AmlaShape::of(q, kv, block_table, cache_seqlens)?;
        // The dtypes were checked above.
        let table = block_table.as_i32().unwrap_or_default();
        let seqlens = cache_seqlens.as_i32().unwrap_or_default();
        let lengths = shape.validate_indices(table, seqlens)?;
        Ok(Checked {
            shape,
            q,
            kv,
            table,
            lengths,
        })
    }

    /// Flat element offset of key `k` of sequence `seq` in the cache.
    fn key_offset(&self, seq: usize, k: usize) -> usize {
        let s = &self.shape;
        let block = self.table[seq * s.max_blocks + k / s.page_size] as usize;
        (block * s.page_size + k % s.page_size) * D_QK
    }

    /// The keys of sequence `seq` as one `[len, 576]` f64 array.
    fn keys(&self, seq: usize) -> Vec<f64> {
        let mut keys = Vec::with_capacity(self.lengths[seq] * D_QK);
        for k in 0..self.lengths[seq] {
            keys.extend(values_f64(self.kv, self.key_offset(seq, k), D_QK));
        }
        keys
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
    let x = Checked::new(q, kv_cache, block_table, cache_seqlens)?;
    let s = x.shape;
    let rows = s.rows();
    let scale = params.scale() as f64;
    let per_seq = per_sequence(s.batch, |seq| {
        let keys = x.keys(seq);
        let len = x.lengths[seq];
        let mut out = vec![0.0; rows * D_V];
        let mut lse = vec![f64::NEG_INFINITY; rows];
        let mut scores = vec![0.0; len];
        for row in 0..rows {
            let visible = s.visible_keys(len, row / s.h_q, params.causal);
            if visible == 0 {
                continue;
            }
            let qv = values_f64(x.q, (seq * rows + row) * D_QK, D_QK);
            for (k, score) in scores[..visible].iter_mut().enumerate() {
                let kr = &keys[k * D_QK..(k + 1) * D_QK];
                *score = scale * qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>();
            }
            let m = scores[..visible]
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores[..visible].iter().map(|&v| (v - m).exp()).sum();
            let row_lse = m + sum.ln();
            let o = &mut out[row * D_V..(row + 1) * D_V];
            for (k, &score) in scores[..visible].iter().enumerate() {
                let p = (score - row_lse).exp();
                for (od, vd) in o.iter_mut().zip(&keys[k * D_QK..k * D_QK + D_V]) {
                    *od += p * vd;
                }
            }
            lse[row] = row_lse;
        }
        (out, lse)
    });
    let mut out = Vec::with_capacity(s.batch * rows * D_V);
    let mut lse = vec![0.0; s.batch * rows];
    for (seq, (o, l)) in per_seq.into_iter().enumerate() {
        out.extend(o);
        for (row, v) in l.into_iter().enumerate() {
            let (token, head) = (row / s.h_q, row % s.h_q);
            lse[(seq * s.h_q + head) * s.s_q + token] = v;
        }
    }
    Ok(Exact { out, lse })
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
    /// Output entries zeroed by the 1e10 guard.
    pub guard_zeroed: u64,
}

impl std::ops::AddAssign for AmlaStats {
    fn add_assign(&mut self, o: AmlaStats) {
        self.tiles += o.tiles;
        self.exponent_steps += o.exponent_steps;
        self.clamped_steps += o.clamped_steps;
        self.guard_zeroed += o.guard_zeroed;
    }
}

/// Emulated outputs in f32 (before any rounding to the output dtype).
#[derive(Clone, Debug, PartialEq)]
pub struct Emulation {
    /// `[b, s_q, h_q, 512]`.
    pub out: Vec<f32>,
    /// `[b, h_q, s_q]`.
    pub lse: Vec<f32>,
    pub stats: AmlaStats,
    /// Largest |score| of a visible key, in log2 units: f32 scores carry an absolute rounding
    /// error of a few ulps of it, which moves p relatively by as much (times ln 2).
    pub max_score: f32,
}

/// A non-negative f32 rounded to the nearest f16 value (ties to even), as the kernel's
/// `round_f16`.
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// AMLA's rescale of one O entry: `step` added to its f32 bits as an integer (wrapping, as the
/// kernel's add). An exact +-0 stays as it is: the add would wrap its exponent field.
pub fn add_to_exponent(o: f32, step: u32) -> f32 {
    if o.to_bits() & 0x7fff_ffff == 0 {
        return o;
    }
    f32::from_bits(o.to_bits().wrapping_add(step))
}

/// The AMLA guard: |O| > 1e10 (a wrapped denormal) becomes 0; NaN passes through.
pub fn guard(o: f32) -> Option<f32> {
    let magnitude = o.to_bits() & 0x7fff_ffff;
    (magnitude > GUARD_BITS && magnitude <= 0x7f80_0000).then_some(0.0)
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
struct RowState {
    m: f32,
    l: f32,
    n: f32,
    cof: f32,
    c_hat: f32,
}

impl RowState {
    fn new() -> Self {
        RowState {
            m: MASKED,
            l: 0.0,
            n: 0.0,
            cof: 1.0,
            c_hat: 1.0,
        }
    }

    /// One tile: update the state from the tile's scores (log2 units, MASKED when masked) and
    /// return the O rescale step (integer add or multiply factor, as bits) and P.
    fn tile(
        &mut self,
        scores: &[f32],
        amla: bool,
        p_half: bool,
        stats: &mut AmlaStats,
    ) -> (u32, Vec<f32>) {
        stats.tiles += 1;
        let m_tile = scores.iter().copied().fold(MASKED, f32::max);
        let m_new = self.m.max(m_tile);
        let changed = m_new > self.m;
        let first = self.m == MASKED;
        let decay = if changed {
            if first { 0.0 } else { (self.m - m_new).exp2() }
        } else {
            1.0
        };
        let mut step = decay.to_bits();
        if amla {
            step = 0;
            if changed {
                let n_new = -m_new.round_ties_even();
                let c = (m_new + n_new).exp2();
                let c_hat = if p_half { round_f16(c) } else { c };
                let cof = c / c_hat;
                if !first {
                    if n_new - self.n < MIN_EXPONENT_STEP {
                        stats.clamped_steps += 1;
                    }
                    step = exponent_step(self.n, n_new, self.cof, cof);
                    stats.exponent_steps += 1;
                }
                self.n = n_new;
                self.cof = cof;
                self.c_hat = c_hat;
            }
        }
        let p_mult = if amla { self.c_hat } else { 1.0 };
        let mut l_tile = 0.0f32;
        let p = scores
            .iter()
            .map(|&s| {
                let p = if s > MASKED { (s - m_new).exp2() } else { 0.0 };
                l_tile += p;
                let pv = p * p_mult;
                if p_half { round_f16(pv) } else { pv }
            })
            .collect();
        self.l = self.l * decay + l_tile;
        self.m = m_new;
        (step, p)
    }

    /// Normalise O (after the AMLA guard) and return the lse (natural log, -inf when empty).
    fn finish(&self, o: &mut [f32], amla: bool, stats: &mut AmlaStats) -> f32 {
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

/// Merge split partials as the combine kernel: weights exp(lse_i - max), lse = max + ln(sum).
pub(super) fn combine(parts: &[(Vec<f32>, f32)]) -> (Vec<f32>, f32) {
    let live: Vec<&(Vec<f32>, f32)> = parts.iter().filter(|p| p.1 != f32::NEG_INFINITY).collect();
    let m = live.iter().map(|p| p.1).fold(MASKED, f32::max);
    let mut acc = vec![0.0f32; D_V];
    let mut total = 0.0f32;
    for (o, l) in live {
        let w = (l - m).exp();
        total += w;
        for (a, &x) in acc.iter_mut().zip(o) {
            *a = w.mul_add(x, *a);
        }
    }
    if total > 0.0 {
        for a in acc.iter_mut() {
            *a /= total;
        }
        (acc, m + total.ln())
    } else {
        (acc, f32::NEG_INFINITY)
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
    let x = Checked::new(q, kv_cache, block_table, cache_seqlens)?;
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
    let p_half = params.p_precision == PPrecision::F16;
    let tn = tiles.tile_keys as usize;
    let scale_log2 = (params.scale() as f64 * std::f64::consts::LOG2_E) as f32;
    let per_seq = per_sequence(s.batch, |seq| {
        let len = x.lengths[seq];
        let keys: Vec<f32> = x.keys(seq).into_iter().map(|v| v as f32).collect();
        let mut stats = AmlaStats::default();
        let mut max_score = 0.0f32;
        let mut out = Vec::with_capacity(rows * D_V);
        let mut lse = Vec::with_capacity(rows);
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
                let mut o = vec![0.0f32; D_V];
                for tile_begin in (begin..end).step_by(tn) {
                    let tile_keys = tn.min(end - tile_begin);
                    let scores: Vec<f32> = (0..tn)
                        .map(|c| {
                            let k = tile_begin + c;
                            if k < end && k < limit {
                                kernel_score(
                                    &q_prep,
                                    &keys[k * D_QK..(k + 1) * D_QK],
                                    tiles.d_groups as usize,
                                )
                            } else {
                                MASKED
                            }
                        })
                        .collect();
                    for &s in scores.iter().filter(|&&s| s > MASKED) {
                        max_score = max_score.max(s.abs());
                    }
                    let (step, p) = state.tile(&scores, amla, p_half, &mut stats);
                    for v in o.iter_mut() {
                        *v = if amla {
                            add_to_exponent(*v, step)
                        } else {
                            *v * f32::from_bits(step)
                        };
                    }
                    for (c, &pc) in p[..tile_keys].iter().enumerate() {
                        let v = &keys[(tile_begin + c) * D_QK..][..D_V];
                        for (od, &vd) in o.iter_mut().zip(v) {
                            *od = pc.mul_add(vd, *od);
                        }
                    }
                }
                let l = state.finish(&mut o, amla, &mut stats);
                parts.push((o, l));
            }
            let (o, l) = if parts.len() == 1 {
                parts.pop().expect("one part")
            } else {
                combine(&parts)
            };
            out.extend(o);
            lse.push(l);
        }
        (out, lse, stats, max_score)
    });
    let mut out = Vec::with_capacity(s.batch * rows * D_V);
    let mut lse = vec![0.0; s.batch * rows];
    let mut stats = AmlaStats::default();
    let mut max_score = 0.0f32;
    for (seq, (o, l, st, m)) in per_seq.into_iter().enumerate() {
        out.extend(o);
        stats += st;
        max_score = max_score.max(m);
        for (row, v) in l.into_iter().enumerate() {
            let (token, head) = (row / s.h_q, row % s.h_q);
            lse[(seq * s.h_q + head) * s.s_q + token] = v;
        }
    }
    Ok(Emulation {
        out,
        lse,
        stats,
        max_score,
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
        // Zero stays zero; a denormal wraps: the guard's job. NaN is left for the caller.
        assert_eq!(add_to_exponent(0.0, (-3i32 << 23) as u32).to_bits(), 0);
        assert_eq!(
            add_to_exponent(-0.0, (-3i32 << 23) as u32).to_bits(),
            0x8000_0000
        );
        let wrapped = add_to_exponent(1e-40, (-3i32 << 23) as u32);
        assert_eq!(guard(wrapped), Some(0.0));
        assert_eq!(guard(f32::INFINITY), Some(0.0));
        assert_eq!(guard(f32::NAN), None);
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
        // O_j = 2^n_j / cof_j * U_j: with f16 c_hat the emulated O times cof / 2^n stays the
        // unnormalised sum of 2^s v (here v = 1) to first order.
        let mut state = RowState::new();
        let mut stats = AmlaStats::default();
        let mut o = 0.0f32;
        let mut u = 0.0f64;
        for scores in [[0.3f32, -1.0], [2.7, 1.1], [2.9, 6.2], [13.4, 9.0]] {
            let (step, p) = state.tile(&scores, true, true, &mut stats);
            o = add_to_exponent(o, step);
            o += p.iter().sum::<f32>();
            u += scores.iter().map(|&s| (s as f64).exp2()).sum::<f64>();
            let invariant = o as f64 * state.cof as f64 / (state.n as f64).exp2();
            assert!((invariant / u - 1.0).abs() < 2e-3, "{invariant} vs {u}");
        }
        assert_eq!(stats.exponent_steps, 3);
        // L = l * c_hat turns O into the softmax average.
        assert!(((o / (state.l * state.c_hat)) - 1.0).abs() < 2e-3);
    }
}
