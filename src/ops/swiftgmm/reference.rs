//! CPU reference of SwiGLU-capable grouped matmul: per-group products accumulated in f64 over
//! the dtype-rounded inputs, then the epilogue. Written for clarity; it converts one expert's
//! weights at a time so that large weight tensors are never widened as a whole.
//!
//! The `_staged` variants model the cooperative-matrix GEMM path: the groups it runs have their
//! x rows and weights rounded to f16 as the kernel stages them ([`stage_f16`]) before the f64
//! products, so the comparison tolerance stays the one of f32 accumulation.

use super::{Activation, Layout};
use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorData};

const OP: &str = "swiftgmm reference";

/// `v` as the cooperative-matrix kernel stages it in f16, back as f32: finite values of magnitude
/// 65504 and more saturated at ±65504 (never inf), NaN and ±inf unchanged, the rest rounded to
/// the nearest f16 value (ties to even; below 2^-14 in steps of 2^-24, the f16 subnormals), as
/// the f32 -> f16 conversion does on NVIDIA and lavapipe.
pub fn stage_f16(v: f32) -> f32 {
    if !v.is_finite() {
        v
    } else if v.abs() >= 65504.0 {
        65504.0f32.copysign(v)
    } else {
        half::f16::from_f32(v).to_f32()
    }
}

/// `silu(v) = v · sigmoid(v)`.
pub fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// Elements `range` of a tensor as f64.
fn values_f64(t: &Tensor, range: std::ops::Range<usize>) -> Vec<f64> {
    match t.data() {
        TensorData::F32(v) => v[range].iter().map(|&x| x as f64).collect(),
        TensorData::F16(v) => v[range].iter().map(|x| x.to_f64()).collect(),
        TensorData::BF16(v) => v[range].iter().map(|x| x.to_f64()).collect(),
        TensorData::I32(v) => v[range].iter().map(|&x| x as f64).collect(),
        TensorData::U32(v) => v[range].iter().map(|&x| x as f64).collect(),
        TensorData::U8(v) => v[range].iter().map(|&x| x as f64).collect(),
        TensorData::I8(v) => v[range].iter().map(|&x| x as f64).collect(),
    }
}

/// The group holding `row`, if any (offsets validated: monotone, `[e + 1]`).
pub fn group_of_row(offsets: &[u32], row: usize) -> Option<usize> {
    let row = row as u32;
    if offsets.is_empty() || row < offsets[0] || row >= offsets[offsets.len() - 1] {
        return None;
    }
    // The last g with offsets[g] <= row; it is non-empty because offsets[g + 1] > row.
    Some(offsets.partition_point(|&o| o <= row) - 1)
}

/// The selected rows of `y`, `[rows.len(), n_out]` row-major: for a row of group g,
/// `epilogue(x[row] · W_g)`; rows outside every group are 0 (the operator leaves them untouched,
/// and [`super::run`] starts from zeros). `x [m_total, k]`, `w` by `layout`, `offsets [e + 1]`
/// already validated, `row_scale [m_total]`.
pub fn grouped_matmul_rows(
    x: &Tensor,
    offsets: &[u32],
    w: &Tensor,
    layout: Layout,
    activation: Activation,
    row_scale: Option<&Tensor>,
    rows: &[usize],
) -> Result<Vec<f64>> {
    grouped_matmul_rows_staged(x, offsets, w, layout, activation, row_scale, rows, &[])
}

/// [`grouped_matmul_rows`] with the x rows and weights of every group g with `coop_groups[g]`
/// staged in f16 ([`stage_f16`]), as the cooperative-matrix path does
/// ([`super::GmmPlan::coop_groups`]); an empty `coop_groups` stages nothing.
#[allow(clippy::too_many_arguments)]
pub fn grouped_matmul_rows_staged(
    x: &Tensor,
    offsets: &[u32],
    w: &Tensor,
    layout: Layout,
    activation: Activation,
    row_scale: Option<&Tensor>,
    rows: &[usize],
    coop_groups: &[bool],
) -> Result<Vec<f64>> {
    let Dims {
        m_total,
        k,
        n,
        experts,
    } = check_inputs(x, offsets, w, layout, row_scale, coop_groups)?;
    let n_out = match activation {
        Activation::None => n,
        Activation::SwiGlu => n / 2,
    };
    let scale = row_scale.map(|s| s.to_f64());
    let mut out = vec![0.0; rows.len() * n_out];
    // Rows grouped by expert, so each expert's weights are widened once.
    let mut by_group: Vec<Vec<usize>> = vec![Vec::new(); experts];
    for (i, &row) in rows.iter().enumerate() {
        if row >= m_total {
            return Err(Error::invalid(
                OP,
                "row",
                format!("{row} >= m_total {m_total}"),
            ));
        }
        if let Some(g) = group_of_row(offsets, row) {
            by_group[g].push(i);
        }
    }
    for (g, wanted) in by_group.iter().enumerate() {
        if wanted.is_empty() {
            continue;
        }
        let staged = coop_groups.get(g).copied().unwrap_or(false);
        let stage = |v: Vec<f64>| -> Vec<f64> {
            if staged {
                v.into_iter().map(|x| stage_f16(x as f32) as f64).collect()
            } else {
                v
            }
        };
        let wg = stage(values_f64(w, g * k * n..(g + 1) * k * n));
        let weight = |kk: usize, col: usize| match layout {
            Layout::Kn => wg[kk * n + col],
            Layout::Nk => wg[col * k + kk],
        };
        for &i in wanted {
            let row = rows[i];
            let xr = stage(values_f64(x, row * k..(row + 1) * k));
            let acc: Vec<f64> = (0..n)
                .map(|col| (0..k).map(|kk| xr[kk] * weight(kk, col)).sum())
                .collect();
            let s = scale.as_ref().map_or(1.0, |s| s[row]);
            for col in 0..n_out {
                let v = match activation {
                    Activation::None => acc[col],
                    Activation::SwiGlu => silu(acc[col]) * acc[n_out + col],
                };
                out[i * n_out + col] = v * s;
            }
        }
    }
    Ok(out)
}

/// Sizes of validated reference inputs.
struct Dims {
    m_total: usize,
    k: usize,
    n: usize,
    experts: usize,
}

/// Check the shapes, the offsets (monotone, within x: the group lookup relies on it), the row
/// scale and the per-group flags.
fn check_inputs(
    x: &Tensor,
    offsets: &[u32],
    w: &Tensor,
    layout: Layout,
    row_scale: Option<&Tensor>,
    coop_groups: &[bool],
) -> Result<Dims> {
    let (m_total, k) = match *x.shape() {
        [m, k] => (m, k),
        _ => return Err(Error::shape(OP, "x", x.shape(), "[m_total, k]")),
    };
    let (experts, dims) = match *w.shape() {
        [e, a, b] => (e, [a, b]),
        _ => return Err(Error::shape(OP, "w", w.shape(), "[e, k, n] or [e, n, k]")),
    };
    let (wk, n) = layout.k_n(dims);
    if wk != k || offsets.len() != experts + 1 {
        return Err(Error::shape(
            OP,
            "w",
            w.shape(),
            format!("k = {k}, e + 1 = {} offsets", offsets.len()),
        ));
    }
    // Monotone and within x: the group lookups rely on it.
    super::check_offsets(offsets, experts, m_total)?;
    if !coop_groups.is_empty() && coop_groups.len() != experts {
        return Err(Error::shape(
            OP,
            "coop_groups",
            [coop_groups.len()],
            format!("[{experts}] (one flag per group) or empty"),
        ));
    }
    if let Some(s) = row_scale {
        if s.shape() != [m_total] {
            return Err(Error::shape(
                OP,
                "row_scale",
                s.shape(),
                format!("[{m_total}]"),
            ));
        }
    }
    Ok(Dims {
        m_total,
        k,
        n,
        experts,
    })
}

/// Every row of `y`, `[m_total, n_out]`.
pub fn grouped_matmul(
    x: &Tensor,
    offsets: &[u32],
    w: &Tensor,
    layout: Layout,
    activation: Activation,
    row_scale: Option<&Tensor>,
) -> Result<Vec<f64>> {
    grouped_matmul_staged(x, offsets, w, layout, activation, row_scale, &[])
}

/// Every row of [`grouped_matmul_rows_staged`].
pub fn grouped_matmul_staged(
    x: &Tensor,
    offsets: &[u32],
    w: &Tensor,
    layout: Layout,
    activation: Activation,
    row_scale: Option<&Tensor>,
    coop_groups: &[bool],
) -> Result<Vec<f64>> {
    let rows: Vec<usize> = (0..x.shape().first().copied().unwrap_or(0)).collect();
    grouped_matmul_rows_staged(
        x,
        offsets,
        w,
        layout,
        activation,
        row_scale,
        &rows,
        coop_groups,
    )
}

/// Per element of `y [m_total, n_out]`, a bound on how far the f16 staging of the
/// cooperative-matrix path can move it from the exact product, derived from each staged input's
/// own rounding `δ = stage_f16(v) − v` (zero for f16 inputs, for bf16 ones from 2^-14 to 65504,
/// at most 2^-11·|v| for other f32 values in range, 2^-25 below 2^-14; a saturated value's whole
/// excess): `|Σ x̂ŵ − Σ xw| ≤ Σ_k |δx||w| + |x̂||δw|`. Through SwiGLU,
/// `|silu(ĝ)û − silu(g)u| ≤ Σ|x̂||ŵ|_gate · Δu + 1.1 · Σ|x||w|_up · Δg` (|silu(v)| ≤ |v|,
/// |silu'| < 1.1); times |row_scale|. Rows outside `coop_groups` (and padding) get 0. The f32
/// accumulation and the output rounding ([`super::tolerance`]) come on top.
pub fn staging_bound(
    x: &Tensor,
    offsets: &[u32],
    w: &Tensor,
    layout: Layout,
    activation: Activation,
    row_scale: Option<&Tensor>,
    coop_groups: &[bool],
) -> Result<Vec<f64>> {
    let Dims { m_total, k, n, .. } = check_inputs(x, offsets, w, layout, row_scale, coop_groups)?;
    let n_out = match activation {
        Activation::None => n,
        Activation::SwiGlu => n / 2,
    };
    let scale = row_scale.map(|s| s.to_f64());
    let mut out = vec![0.0; m_total * n_out];
    for g in (0..coop_groups.len()).filter(|&g| coop_groups[g]) {
        let wg = values_f64(w, g * k * n..(g + 1) * k * n);
        let at = |kk: usize, col: usize| match layout {
            Layout::Kn => kk * n + col,
            Layout::Nk => col * k + kk,
        };
        let delta = |v: f64| (stage_f16(v as f32) as f64 - v).abs();
        for row in offsets[g] as usize..offsets[g + 1] as usize {
            let xr = values_f64(x, row * k..(row + 1) * k);
            // Per weight column: the bound D, Σ|x||w| and Σ|x̂||ŵ|.
            let per_col: Vec<(f64, f64, f64)> = (0..n)
                .map(|col| {
                    (0..k).fold((0.0, 0.0, 0.0), |(d, s, s_hat), kk| {
                        let (xv, wv) = (xr[kk], wg[at(kk, col)]);
                        let (dx, dw) = (delta(xv), delta(wv));
                        let x_hat = xv.abs() + dx;
                        (
                            d + dx * wv.abs() + x_hat * dw,
                            s + (xv * wv).abs(),
                            s_hat + x_hat * (wv.abs() + dw),
                        )
                    })
                })
                .collect();
            let s = scale.as_ref().map_or(1.0, |s| s[row].abs());
            for col in 0..n_out {
                let bound = match activation {
                    Activation::None => per_col[col].0,
                    Activation::SwiGlu => {
                        let (dg, _, gate_hat) = per_col[col];
                        let (du, up, _) = per_col[n_out + col];
                        gate_hat * du + 1.1 * up * dg
                    }
                };
                out[row * n_out + col] = bound * s;
            }
        }
    }
    Ok(out)
}

/// The offsets the GPU scheduler makes of device-side offsets `raw [e + 1]` (i32 or u32 values
/// given as i64): each clamped to `[0, m_total]`, then a running max, so groups never overlap.
pub fn repair_offsets(raw: &[i64], m_total: usize) -> Vec<u32> {
    let mut run = 0u32;
    raw.iter()
        .map(|&v| {
            run = run.max(v.clamp(0, m_total as i64) as u32);
            run
        })
        .collect()
}

/// The offsets the GPU scheduler makes of device-side counts `raw [e]`: each count clamped to
/// `[0, m_total]`, summed saturating at `m_total`, starting at 0.
pub fn repair_counts(raw: &[i64], m_total: usize) -> Vec<u32> {
    let mut run = 0u32;
    std::iter::once(0)
        .chain(raw.iter().map(|&v| {
            run = (run + v.clamp(0, m_total as i64) as u32).min(m_total as u32);
            run
        }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn rows_map_to_their_group() {
        let offsets = [1, 3, 3, 6];
        let groups: Vec<Option<usize>> = (0..7).map(|r| group_of_row(&offsets, r)).collect();
        assert_eq!(
            groups,
            vec![None, Some(0), Some(0), Some(2), Some(2), Some(2), None]
        );
    }

    #[test]
    fn small_example_by_hand() {
        // Two experts, k = 2, n = 2; expert 0 doubles, expert 1 swaps.
        let x = Tensor::f32(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let w = Tensor::f32(&[2, 2, 2], vec![2.0, 0.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0]).unwrap();
        let y = grouped_matmul(&x, &[0, 1, 3], &w, Layout::Kn, Activation::None, None).unwrap();
        assert_eq!(y, vec![2.0, 4.0, 4.0, 3.0, 6.0, 5.0]);
        // [e, n, k] of the same matrices (expert 1 is symmetric, expert 0 diagonal).
        let y_nk = grouped_matmul(&x, &[0, 1, 3], &w, Layout::Nk, Activation::None, None).unwrap();
        assert_eq!(y_nk, y);
        let scale = Tensor::f32(&[3], vec![1.0, 0.5, 2.0]).unwrap();
        let y = grouped_matmul(
            &x,
            &[0, 1, 3],
            &w,
            Layout::Kn,
            Activation::SwiGlu,
            Some(&scale),
        )
        .unwrap();
        let want = [
            silu(2.0) * 4.0,
            0.5 * silu(4.0) * 3.0,
            2.0 * silu(6.0) * 5.0,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12);
        }
        let x16 = Tensor::from_f32(&[3, 2], &[1.0; 6], DType::BF16).unwrap();
        let padded = grouped_matmul(&x16, &[1, 1, 2], &w, Layout::Kn, Activation::None, None);
        assert_eq!(padded.unwrap(), vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn bad_offsets_and_scales_are_errors() {
        let x = Tensor::f32(&[3, 2], vec![1.0; 6]).unwrap();
        let w = Tensor::f32(&[2, 2, 2], vec![1.0; 8]).unwrap();
        let gmm = |offsets: &[u32], scale: Option<&Tensor>| {
            grouped_matmul(&x, offsets, &w, Layout::Kn, Activation::None, scale)
        };
        // Not monotone (the group lookup would underflow) and past m_total.
        assert!(gmm(&[2, 0, 3], None).is_err());
        assert!(gmm(&[0, 1, 4], None).is_err());
        // A row scale shorter than x.
        let short = Tensor::f32(&[2], vec![1.0; 2]).unwrap();
        assert!(gmm(&[0, 1, 3], Some(&short)).is_err());
        assert!(gmm(&[0, 1, 3], None).is_ok());
    }

    #[test]
    fn staging_rounds_to_f16_and_saturates() {
        assert_eq!(stage_f16(1.0 + 1.0 / 2048.0), 1.0, "tie to even");
        assert_eq!(
            stage_f16(1.0 + 3.0 / 2048.0),
            1.0 + 1.0 / 512.0,
            "tie to even"
        );
        assert_eq!(stage_f16(65519.0), 65504.0);
        assert_eq!(stage_f16(-1e30), -65504.0, "saturated, not -inf");
        assert_eq!(stage_f16(f32::INFINITY), f32::INFINITY);
        assert!(stage_f16(f32::NAN).is_nan());
        assert_eq!(stage_f16(3e-8), 2f32.powi(-24), "f16 subnormal");
        assert_eq!(stage_f16(2e-8), 0.0);
        // bf16 values between 2^-14 and 65504 are exact.
        let b = half::bf16::from_f32(0.123_456).to_f32();
        assert_eq!(stage_f16(b), b);
        // Staged groups only.
        let x = Tensor::f32(&[2, 1], vec![1.0 + 1.0 / 4096.0, 1.0 + 1.0 / 4096.0]).unwrap();
        let w = Tensor::f32(&[2, 1, 1], vec![1.0, 1.0]).unwrap();
        let gmm = |staged: &[bool]| {
            grouped_matmul_staged(
                &x,
                &[0, 1, 2],
                &w,
                Layout::Kn,
                Activation::None,
                None,
                staged,
            )
        };
        assert_eq!(gmm(&[false, true]).unwrap(), vec![1.0 + 1.0 / 4096.0, 1.0]);
        assert!(gmm(&[true]).is_err());
    }

    #[test]
    fn device_offsets_repair() {
        assert_eq!(repair_offsets(&[0, 5, 3, 9, -1], 7), vec![0, 5, 5, 7, 7]);
        assert_eq!(repair_counts(&[2, -4, 9, 1], 7), vec![0, 2, 2, 7, 7]);
    }
}
