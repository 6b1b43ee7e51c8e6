//! CPU reference for MerRouter: f64 scoring and selection, a plain counting sort for the dispatch
//! layout, and the combine. Written to be read, not to be fast; the semantics (ordering, ties, NaN)
//! are the ones the kernels implement, see the module docs of [`super`].

use std::cmp::Ordering;

use super::{GroupScore, OP, RouterConfig, Scoring, Selection};
use crate::error::{Error, Result};

/// An error unless `len` is `expected`: the reference is public, so bad slices are errors, never
/// panics.
fn check_len(what: &str, len: usize, expected: usize, shape: &str) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::shape(
            OP,
            what,
            len,
            format!("{expected} values ({shape})"),
        ))
    }
}

/// The routing of every token, as the reference computes it.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingRef {
    /// `[t, k]` selected experts in selection order.
    pub ids: Vec<i32>,
    /// `[t, k]` routing weights.
    pub weights: Vec<f64>,
    /// `[t]` smallest gap between the winner and the runner-up over every arg-max this token's
    /// selection made (group choices included), in choice units; 0 when a decision was a tie.
    /// A decision against a NaN is exact (NaN ranks last) and does not count. Inputs whose
    /// margins exceed the kernel's rounding error are tie-free: the kernel must then produce
    /// exactly [`RoutingRef::ids`].
    pub margins: Vec<f64>,
}

/// The dispatch layout, as the reference computes it (layouts as in
/// [`super::DispatchLayout`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LayoutRef {
    pub counts: Vec<i32>,
    pub offsets: Vec<i32>,
    pub sorted_slots: Vec<i32>,
    pub slot_rows: Vec<i32>,
    pub block_experts: Vec<i32>,
    pub group_loads: Vec<i32>,
    pub imbalance: f64,
}

/// `a · b`, or an error naming `what` when the product does not fit in usize.
fn product(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::invalid(OP, what, format!("{a} x {b} elements do not fit in usize")))
}

/// Rows of the sorted slot list: every slot `t·k` plus, when padding, room for `block_size − 1`
/// padding rows per expert that can receive a slot. At most `min(t·k, e)` experts are non-empty,
/// so the bound is `t·k + min(t·k, e)·(block_size − 1)`: vLLM's `t·k·block_size` when `t·k < e`
/// (DeepSeek-V3, one token, block 64: 512 rows instead of 16 136), `t·k + e·(block_size − 1)`
/// otherwise, 0 for `t = 0`. An error when the count passes `i32::MAX` (slot and row numbers are
/// i32) or does not fit in usize.
pub fn row_capacity(
    tokens: usize,
    top_k: usize,
    experts: usize,
    block_size: usize,
) -> Result<usize> {
    let slots = product("slots (t x k)", tokens, top_k)?;
    let padding = product("padding rows", slots.min(experts), block_size.max(1) - 1)?;
    let rows = slots.saturating_add(padding);
    if rows > i32::MAX as usize {
        return Err(Error::Limit {
            what: format!(
                "dispatch rows of t = {tokens}, k = {top_k}, e = {experts}, block {block_size} \
                 (i32 slot and row numbers)"
            ),
            need: rows as u64,
            max: i32::MAX as u64,
        });
    }
    Ok(rows)
}

/// Whether `a` comes before `b` in the choice order: larger first, NaN after every number.
/// Equal values (and two NaNs) are not ordered; callers break those ties by the lower index.
fn beats(a: f64, b: f64) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (false, true) => true,
        (true, _) => false,
        (false, false) => a > b,
    }
}

/// The winner among `(index, value)` candidates (largest value, lower index on ties, NaN last)
/// and its margin over the runner-up.
fn arg_best(candidates: &[(usize, f64)]) -> (usize, f64) {
    let mut sorted = candidates.to_vec();
    sorted.sort_by(|a, b| {
        if beats(a.1, b.1) {
            Ordering::Less
        } else if beats(b.1, a.1) {
            Ordering::Greater
        } else {
            a.0.cmp(&b.0)
        }
    });
    let winner = sorted[0];
    let margin = match sorted.get(1) {
        Some(runner_up) if !winner.1.is_nan() && !runner_up.1.is_nan() => {
            let gap = winner.1 - runner_up.1;
            // Equal infinities are a tie.
            if gap.is_nan() { 0.0 } else { gap }
        }
        _ => f64::INFINITY,
    };
    (winner.0, margin)
}

/// Softmax over a row: NaN logits are left out of the maximum but, as NaN, poison the sum and so
/// every score of the row; the maximum of an all-NaN row is NaN.
fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
        .unwrap_or(f64::NAN);
    let exps: Vec<f64> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&v| v / sum).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Route `t` tokens: `logits [t, e]`, optional `bias [e]` (only chooses) and `router_scale [e]`.
pub fn route(
    config: &RouterConfig,
    t: usize,
    logits: &[f64],
    bias: Option<&[f64]>,
    router_scale: Option<&[f64]>,
) -> Result<RoutingRef> {
    config.validate()?;
    let (e, g, k) = (config.experts, config.groups, config.top_k);
    check_len("logits", logits.len(), product("logits", t, e)?, "[t, e]")?;
    if let Some(b) = bias {
        check_len("bias", b.len(), e, "[e]")?;
    }
    if let Some(s) = router_scale {
        check_len("router_scale", s.len(), e, "[e]")?;
    }
    let size = e / g;
    let mut out = RoutingRef {
        ids: Vec::with_capacity(t * k),
        weights: Vec::with_capacity(t * k),
        margins: Vec::with_capacity(t),
    };
    for row in logits.chunks(e) {
        let scores = match config.scoring {
            Scoring::Softmax => softmax(row),
            Scoring::Sigmoid => row.iter().map(|&x| sigmoid(x)).collect(),
        };
        // Value of an expert for group scores: score + bias.
        let value = |x: usize| scores[x] + bias.map_or(0.0, |b| b[x]);
        // What experts are ranked by: score + bias, or the logit itself without a bias (softmax
        // and sigmoid are monotonic, so that is the same order without rounding ties).
        let choice = |x: usize| if bias.is_some() { value(x) } else { row[x] };
        let mut margin = f64::INFINITY;
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        // Repeatedly take the best remaining expert of `pool`.
        let mut take = |pool: &[usize], count: usize, chosen: &mut Vec<usize>| {
            let mut left: Vec<(usize, f64)> = pool.iter().map(|&x| (x, choice(x))).collect();
            for _ in 0..count {
                let (best, m) = arg_best(&left);
                margin = margin.min(m);
                chosen.push(best);
                left.retain(|c| c.0 != best);
            }
        };
        match config.selection {
            Selection::Moge => {
                for group in 0..g {
                    let pool: Vec<usize> = (group * size..(group + 1) * size).collect();
                    take(&pool, k / g, &mut chosen);
                }
            }
            Selection::GroupLimited {
                k_group,
                group_score,
            } => {
                let mut pool: Vec<usize> = (0..e).collect();
                let mut group_margin = f64::INFINITY;
                if k_group < g {
                    let group_values: Vec<(usize, f64)> = (0..g)
                        .map(|group| {
                            let members: Vec<(usize, f64)> = (group * size..(group + 1) * size)
                                .map(|x| (x, value(x)))
                                .collect();
                            let (first, _) = arg_best(&members);
                            let score = match group_score {
                                GroupScore::Max => value(first),
                                GroupScore::SumTop2 => {
                                    let rest: Vec<(usize, f64)> =
                                        members.into_iter().filter(|m| m.0 != first).collect();
                                    let (second, _) = arg_best(&rest);
                                    value(first) + value(second)
                                }
                            };
                            (group, score)
                        })
                        .collect();
                    let mut left = group_values;
                    let mut kept = Vec::with_capacity(k_group);
                    for _ in 0..k_group {
                        let (best, m) = arg_best(&left);
                        group_margin = group_margin.min(m);
                        kept.push(best);
                        left.retain(|c| c.0 != best);
                    }
                    pool.retain(|&x| kept.contains(&(x / size)));
                }
                take(&pool, k, &mut chosen);
                margin = margin.min(group_margin);
            }
        }
        let raw: Vec<f64> = chosen.iter().map(|&x| scores[x]).collect();
        let total: f64 = if config.renormalize {
            raw.iter().sum()
        } else {
            1.0
        };
        for (&x, &w) in chosen.iter().zip(&raw) {
            let mut weight = w;
            if config.renormalize {
                weight /= total;
            }
            weight *= config.routed_scaling_factor as f64;
            if let Some(scale) = router_scale {
                weight *= scale[x];
            }
            out.ids.push(x as i32);
            out.weights.push(weight);
        }
        out.margins.push(margin);
    }
    Ok(out)
}

/// The fused gate: `logits[t, e] = hidden[t, h] · weight[h, e]`, accumulated in f64.
pub fn gate_logits(
    t: usize,
    h: usize,
    e: usize,
    hidden: &[f64],
    weight: &[f64],
) -> Result<Vec<f64>> {
    check_len("hidden", hidden.len(), product("hidden", t, h)?, "[t, h]")?;
    check_len(
        "gate weight",
        weight.len(),
        product("gate weight", h, e)?,
        "[h, e]",
    )?;
    let mut logits = vec![0.0; product("logits", t, e)?];
    for token in 0..t {
        for x in 0..e {
            logits[token * e + x] = (0..h)
                .map(|c| hidden[token * h + c] * weight[c * e + x])
                .sum();
        }
    }
    Ok(logits)
}

/// The dispatch layout of `ids [t, k]` (every id in `0..experts`, distinct within a token, as
/// the router produces them and [`super::dispatch`] requires): a stable counting sort of the
/// slots `token * k + j` by expert, each expert padded to `block_size` rows with the sentinel
/// `t * k`. `t = 0` gives an empty layout (zero counts and offsets, no rows, imbalance 0).
pub fn dispatch(
    ids: &[i32],
    t: usize,
    k: usize,
    experts: usize,
    groups: usize,
    block_size: usize,
) -> Result<LayoutRef> {
    let rows = super::dispatch::check_dispatch_shape(t, k, experts, groups, block_size)?;
    let slots = t * k;
    check_len("ids", ids.len(), slots, "[t, k]")?;
    for (slot, &x) in ids.iter().enumerate() {
        let token = &ids[slot - slot % k..slot];
        if x < 0 || x as usize >= experts || token.contains(&x) {
            return Err(Error::invalid(
                OP,
                format!("ids[{}, {}]", slot / k, slot % k),
                format!("{x} is out of 0..{experts} or repeats an expert of the token"),
            ));
        }
    }
    let mut counts = vec![0i32; experts];
    for &x in ids {
        counts[x as usize] += 1;
    }
    let mut offsets = vec![0i32; experts + 1];
    for (x, &count) in counts.iter().enumerate() {
        let padded = (count as usize).div_ceil(block_size) * block_size;
        offsets[x + 1] = offsets[x] + padded as i32;
    }
    let sentinel = slots as i32;
    let mut sorted_slots = vec![sentinel; rows];
    let mut slot_rows = vec![-1i32; slots];
    for (x, &start) in offsets[..experts].iter().enumerate() {
        let mut row = start as usize;
        for (slot, &id) in ids.iter().enumerate() {
            if id as usize == x {
                sorted_slots[row] = slot as i32;
                slot_rows[slot] = row as i32;
                row += 1;
            }
        }
    }
    let mut block_experts = vec![-1i32; rows.div_ceil(block_size)];
    for x in 0..experts {
        let (start, end) = (offsets[x] as usize, offsets[x + 1] as usize);
        block_experts[start / block_size..end / block_size].fill(x as i32);
    }
    let size = experts / groups;
    let group_loads: Vec<i32> = counts.chunks(size).map(|c| c.iter().sum()).collect();
    let max = *group_loads.iter().max().unwrap_or(&0);
    let min = *group_loads.iter().min().unwrap_or(&0);
    Ok(LayoutRef {
        counts,
        offsets,
        sorted_slots,
        slot_rows,
        block_experts,
        group_loads,
        imbalance: if t == 0 {
            0.0
        } else {
            (max - min) as f64 / t as f64
        },
    })
}

/// The combine: `out[token, c] = Σ_j weights[token, j] · y[slot_rows[token·k + j], c]`, with `y`
/// `[rows, n]`; a slot without a row (−1) or with a row past `y` contributes nothing, as in the
/// kernel.
pub fn combine(
    t: usize,
    k: usize,
    n: usize,
    weights: &[f64],
    slot_rows: &[i32],
    y: &[f64],
) -> Result<Vec<f64>> {
    let slots = product("slots (t x k)", t, k)?;
    check_len("weights", weights.len(), slots, "[t, k]")?;
    check_len("slot_rows", slot_rows.len(), slots, "[t, k]")?;
    let rows = y.len().checked_div(n).unwrap_or(0);
    check_len("y", y.len(), rows * n, "[rows, n]")?;
    let mut out = vec![0.0; product("out", t, n)?];
    for token in 0..t {
        for j in 0..k {
            let slot = token * k + j;
            let row = match usize::try_from(slot_rows[slot]) {
                Ok(row) if row < rows => row,
                _ => continue,
            };
            for c in 0..n {
                out[token * n + c] += weights[slot] * y[row * n + c];
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(
        selection: Selection,
        scoring: Scoring,
        e: usize,
        g: usize,
        k: usize,
    ) -> RouterConfig {
        RouterConfig {
            experts: e,
            groups: g,
            top_k: k,
            scoring,
            selection,
            renormalize: false,
            routed_scaling_factor: 1.0,
            block_size: 1,
        }
    }

    #[test]
    fn moge_takes_the_best_of_every_group_in_group_order() {
        let c = config(Selection::Moge, Scoring::Softmax, 6, 2, 2);
        let r = route(&c, 1, &[0.1, 0.9, 0.5, 2.0, -1.0, 0.0], None, None).unwrap();
        assert_eq!(r.ids, vec![1, 3]);
        let total: f64 = [0.1f64, 0.9, 0.5, 2.0, -1.0, 0.0]
            .iter()
            .map(|x| x.exp())
            .sum();
        assert!((r.weights[1] - 2.0f64.exp() / total).abs() < 1e-15);
    }

    #[test]
    fn group_limited_keeps_the_best_groups_then_takes_top_k() {
        let c = config(
            Selection::GroupLimited {
                k_group: 1,
                group_score: GroupScore::SumTop2,
            },
            Scoring::Sigmoid,
            4,
            2,
            2,
        );
        // Group 0 has the single best expert, group 1 the better pair.
        let r = route(&c, 1, &[3.0, -3.0, 1.0, 1.5], None, None).unwrap();
        assert_eq!(r.ids, vec![3, 2]);
    }

    #[test]
    fn ties_go_to_the_lower_index_and_nan_comes_last() {
        let c = config(Selection::Moge, Scoring::Sigmoid, 4, 1, 3);
        let r = route(&c, 1, &[f64::NAN, 1.0, 1.0, 0.5], None, None).unwrap();
        assert_eq!(r.ids, vec![1, 2, 3]);
        assert_eq!(r.margins, vec![0.0]);
        let r = route(&c, 1, &[f64::NAN; 4], None, None).unwrap();
        assert_eq!(r.ids, vec![0, 1, 2]);
        assert_eq!(r.margins, vec![f64::INFINITY]);
    }

    #[test]
    fn dispatch_is_a_stable_padded_counting_sort() {
        // t = 3, k = 2, e = 3, block 2.
        let ids = [2, 0, 0, 2, 2, 1];
        let l = dispatch(&ids, 3, 2, 3, 1, 2).unwrap();
        assert_eq!(l.counts, vec![2, 1, 3]);
        assert_eq!(l.offsets, vec![0, 2, 4, 8]);
        assert_eq!(l.sorted_slots, vec![1, 2, 5, 6, 0, 3, 4, 6, 6]);
        assert_eq!(l.slot_rows, vec![4, 0, 1, 5, 6, 2]);
        assert_eq!(l.block_experts, vec![0, 1, 2, 2, -1]);
        assert_eq!(l.group_loads, vec![6]);
        assert_eq!(l.imbalance, 0.0);
    }

    #[test]
    fn combine_gathers_rows_by_slot() {
        let y = [1.0, 2.0, 10.0, 20.0];
        let out = combine(1, 2, 2, &[0.5, 0.25], &[1, 0], &y).unwrap();
        assert_eq!(out, vec![5.25, 10.5]);
    }

    #[test]
    fn bad_slices_and_configs_are_errors() {
        let c = config(Selection::Moge, Scoring::Softmax, 4, 2, 2);
        assert!(route(&c, 2, &[0.0; 7], None, None).is_err());
        assert!(route(&c, 1, &[0.0; 4], Some(&[0.0; 3]), None).is_err());
        assert!(route(&c, 1, &[0.0; 4], None, Some(&[1.0; 5])).is_err());
        let bad = config(Selection::Moge, Scoring::Softmax, 4, 0, 2);
        assert!(route(&bad, 1, &[0.0; 4], None, None).is_err());
        assert!(gate_logits(2, 3, 4, &[0.0; 5], &[0.0; 12]).is_err());
        assert!(
            dispatch(&[0, 4], 1, 2, 4, 2, 1).is_err(),
            "id past the experts"
        );
        assert!(dispatch(&[0, -1], 1, 2, 4, 2, 1).is_err(), "negative id");
        assert!(dispatch(&[0, 1], 1, 2, 4, 0, 1).is_err(), "no groups");
        assert!(dispatch(&[0, 1], 1, 2, 4, 2, 0).is_err(), "zero block size");
        assert!(dispatch(&[0], 1, 2, 4, 2, 1).is_err(), "short ids");
        assert!(combine(1, 2, 2, &[0.5], &[0, 1], &[0.0; 4]).is_err());
        assert!(combine(1, 2, 2, &[0.5, 0.5], &[0, 1], &[0.0; 3]).is_err());
        // A row past y contributes nothing, as in the kernel.
        let out = combine(1, 1, 2, &[1.0], &[5], &[1.0, 2.0]).unwrap();
        assert_eq!(out, vec![0.0, 0.0]);
    }
}
