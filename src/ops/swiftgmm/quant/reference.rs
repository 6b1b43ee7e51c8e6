//! CPU reference of the int8 grouped matmuls, in f64 of the values the tensors stand for:
//!
//! - W8A16: `y = epilogue(Σ_k x[row, k] · (q[k, col] + offset[col]) · scale[col])` over x
//!   rounded to its dtype;
//! - W8A8: `acc = Σ_k qx[row, k] · qw[k, col]` exactly (integer arithmetic), then
//!   `y = epilogue(acc · x_scale[row] · w_scale[col])`.
//!
//! The epilogue is SwiftGMM's: SwiGLU on the dequantized gate and up columns, then the row scale.
//! W8A16 groups on the cooperative-matrix path stage x and `q + offset` in f16
//! ([`grouped_matmul_rows_staged`] emulates that with [`stage_f16`]).

use super::{Quant, QuantInputs, check_host};
use crate::error::Result;
use crate::ops::swiftgmm::reference::{group_of_row, silu, stage_f16};
use crate::ops::swiftgmm::{Activation, Layout, Options};
use crate::tensor::Tensor;

/// The exact integer accumulators of W8A8, `[rows.len(), n]` (before the epilogue and the
/// scales): what the GPU's i32 sums must equal. Rows outside every group are 0.
pub fn int8_accumulators(inputs: &QuantInputs, layout: Layout, rows: &[usize]) -> Result<Vec<i64>> {
    let options = Options {
        layout,
        ..Options::default()
    };
    let (p, offsets) = check_host(inputs, &options)?;
    let (k, n) = (p.k, p.n);
    let qx = int8(inputs.x);
    let qw = int8(inputs.w);
    let mut out = vec![0i64; rows.len() * n];
    for (i, &row) in rows.iter().enumerate() {
        let Some(g) = group_of_row(&offsets, row) else {
            continue;
        };
        let xr = &qx[row * k..(row + 1) * k];
        let wg = &qw[g * k * n..(g + 1) * k * n];
        for col in 0..n {
            out[i * n + col] = (0..k)
                .map(|kk| {
                    let w = match layout {
                        Layout::Kn => wg[kk * n + col],
                        Layout::Nk => wg[col * k + kk],
                    };
                    xr[kk] as i64 * w as i64
                })
                .sum();
        }
    }
    Ok(out)
}

/// The elements of an int8 tensor (validated by `check_host`).
fn int8(t: &Tensor) -> &[i8] {
    t.as_i8().unwrap_or_default()
}

/// The selected rows of y, `[rows.len(), n_out]`: for a row of group g the quantized product as
/// above, then the epilogue; rows outside every group are 0.
pub fn grouped_matmul_rows(
    inputs: &QuantInputs,
    options: &Options,
    rows: &[usize],
) -> Result<Vec<f64>> {
    grouped_matmul_rows_staged(inputs, options, rows, &[])
}

/// [`grouped_matmul_rows`] with the W8A16 groups flagged in `staged` (by group; missing: not
/// staged) computed as the cooperative-matrix kernel stages them: x and `q + offset` (an f32
/// sum) rounded to f16 by [`stage_f16`], the scale applied to the sum.
pub fn grouped_matmul_rows_staged(
    inputs: &QuantInputs,
    options: &Options,
    rows: &[usize],
    staged: &[bool],
) -> Result<Vec<f64>> {
    let (p, offsets) = check_host(inputs, options)?;
    let (k, n, n_out) = (p.k, p.n, p.n_out);
    let g_scale = inputs.w_scale.to_f64();
    let g_offset = inputs.w_offset.map(Tensor::to_f64);
    let row_scale = inputs.row_scale.map(Tensor::to_f64);
    // The dequantized products before the epilogue, [rows, n].
    let acc: Vec<f64> = match p.quant {
        Quant::W8A8 => {
            let x_scale = inputs.x_scale.map(Tensor::to_f64).unwrap_or_default();
            let ints = int8_accumulators(inputs, options.layout, rows)?;
            let mut acc = vec![0.0; rows.len() * n];
            for (i, &row) in rows.iter().enumerate() {
                if let Some(g) = group_of_row(&offsets, row) {
                    for col in 0..n {
                        acc[i * n + col] =
                            ints[i * n + col] as f64 * x_scale[row] * g_scale[g * n + col];
                    }
                }
            }
            acc
        }
        Quant::W8A16 => {
            let qw = int8(inputs.w);
            let x = inputs.x.to_f64();
            let mut acc = vec![0.0; rows.len() * n];
            for (i, &row) in rows.iter().enumerate() {
                let Some(g) = group_of_row(&offsets, row) else {
                    continue;
                };
                let xr = &x[row * k..(row + 1) * k];
                let stage = staged.get(g).copied().unwrap_or(false);
                for col in 0..n {
                    let s = g_scale[g * n + col];
                    let o = g_offset.as_ref().map_or(0.0, |o| o[g * n + col]);
                    let sum: f64 = (0..k)
                        .map(|kk| {
                            let q = match options.layout {
                                Layout::Kn => qw[(g * k + kk) * n + col],
                                Layout::Nk => qw[(g * n + col) * k + kk],
                            };
                            if stage {
                                let w = stage_f16(q as f32 + o as f32) as f64;
                                stage_f16(xr[kk] as f32) as f64 * w
                            } else {
                                xr[kk] * (q as f64 + o)
                            }
                        })
                        .sum();
                    acc[i * n + col] = sum * s;
                }
            }
            acc
        }
    };
    let mut out = vec![0.0; rows.len() * n_out];
    for (i, &row) in rows.iter().enumerate() {
        if group_of_row(&offsets, row).is_none() {
            continue;
        }
        let s = row_scale.as_ref().map_or(1.0, |s| s[row]);
        for col in 0..n_out {
            let v = match options.activation {
                Activation::None => acc[i * n + col],
                Activation::SwiGlu => silu(acc[i * n + col]) * acc[i * n + n_out + col],
            };
            out[i * n_out + col] = v * s;
        }
    }
    Ok(out)
}

/// Every row of y, `[m_total, n_out]`.
pub fn grouped_matmul(inputs: &QuantInputs, options: &Options) -> Result<Vec<f64>> {
    let rows: Vec<usize> = (0..inputs.x.shape().first().copied().unwrap_or(0)).collect();
    grouped_matmul_rows(inputs, options, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::swiftgmm::Groups;
    use crate::tensor::DType;

    #[test]
    fn small_examples_by_hand() {
        // One expert, k = 4, n = 4 ([e, n, k]): column c holds c + 1 in every k.
        let w = Tensor::i8(&[1, 4, 4], (0..16).map(|i| (i / 4 + 1) as i8).collect()).unwrap();
        let scale = Tensor::f32(&[1, 4], vec![0.5, 1.0, 2.0, 4.0]).unwrap();
        let groups = Groups::Counts(vec![2]);
        let options = Options {
            layout: Layout::Nk,
            ..Options::default()
        };
        // W8A8: x rows [1, 2, 3, 4] and [-127; 4] with scales 0.25, 1.
        let qx = Tensor::i8(&[2, 4], vec![1, 2, 3, 4, -127, -127, -127, -127]).unwrap();
        let x_scale = Tensor::f32(&[2], vec![0.25, 1.0]).unwrap();
        let a8 = QuantInputs {
            x: &qx,
            x_scale: Some(&x_scale),
            groups: &groups,
            w: &w,
            w_scale: &scale,
            w_offset: None,
            row_scale: None,
        };
        let ints = int8_accumulators(&a8, Layout::Nk, &[0, 1]).unwrap();
        assert_eq!(ints, vec![10, 20, 30, 40, -508, -1016, -1524, -2032]);
        let y = grouped_matmul(&a8, &options).unwrap();
        assert_eq!(&y[..4], &[10.0 * 0.25 * 0.5, 20.0 * 0.25, 30.0 * 0.5, 40.0]);
        // W8A16 with an offset of 1: the weights stand for (c + 2) · scale.
        let x = Tensor::from_f32(
            &[2, 4],
            &[1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0],
            DType::BF16,
        )
        .unwrap();
        let offset = Tensor::f32(&[1, 4], vec![1.0; 4]).unwrap();
        let a16 = QuantInputs {
            x: &x,
            x_scale: None,
            w_offset: Some(&offset),
            ..a8
        };
        let y = grouped_matmul(&a16, &options).unwrap();
        assert_eq!(
            &y[..4],
            &[4.0 * 2.0 * 0.5, 4.0 * 3.0, 4.0 * 4.0 * 2.0, 4.0 * 5.0 * 4.0]
        );
        assert_eq!(
            &y[4..],
            &[0.5 * 2.0 * 0.5, 0.5 * 3.0, 0.5 * 4.0 * 2.0, 0.5 * 5.0 * 4.0]
        );
    }
}
