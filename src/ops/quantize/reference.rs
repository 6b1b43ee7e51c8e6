//! CPU reference of the dynamic per-token quantization, written from the definition with IEEE
//! arithmetic (the GPU kernel reaches the same bits with integer arithmetic on the bit patterns):
//!
//! - `amax = max |x|` over the row;
//! - `scale = amax / 127` in f32, rounded to nearest (an IEEE f32 division, subnormal results
//!   included);
//! - `q = round(x / scale)` of the exact quotient, to nearest with ties to even, clamped to ±127.
//!   The quotient is formed in f64, which cannot land on a tie the exact value misses: two f32
//!   values' quotient below 128 is at least 2⁻³² (relative) away from any non-tie half-integer.
//!
//! Special rows: `amax = 0`, or a scale that underflows to 0, gives scale 0 and q = 0; a row
//! holding NaN or ±inf gives scale NaN and q = 0.

use super::{Quantized, check_input};
use crate::error::Result;
use crate::tensor::Tensor;

/// Largest magnitude of a quantized value (the range is symmetric: −128 is never produced).
pub const Q_MAX: f32 = 127.0;

/// The scale of a row whose largest magnitude is `amax` (finite, ≥ 0): `amax / 127` rounded to
/// nearest f32.
pub fn scale_of(amax: f32) -> f32 {
    amax / Q_MAX
}

/// `round(x / scale)`, ties to even, saturated at ±127 (`scale` finite and > 0).
pub fn quantize_value(x: f32, scale: f32) -> i8 {
    let q = (x as f64 / scale as f64).round_ties_even();
    q.clamp(-Q_MAX as f64, Q_MAX as f64) as i8
}

/// One row: `(q, scale)`.
pub fn quantize_row(x: &[f32]) -> (Vec<i8>, f32) {
    if x.iter().any(|v| !v.is_finite()) {
        return (vec![0; x.len()], f32::NAN);
    }
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = scale_of(amax);
    if scale == 0.0 {
        return (vec![0; x.len()], 0.0);
    }
    (x.iter().map(|&v| quantize_value(v, scale)).collect(), scale)
}

/// Every row of `x [m, k]` (f32, f16 or bf16, k a multiple of 4).
pub fn quantize(x: &Tensor) -> Result<Quantized> {
    let (m, k) = check_input(x)?;
    let values = x.to_f32();
    let mut q = Vec::with_capacity(m * k);
    let mut scale = Vec::with_capacity(m);
    for row in values.chunks_exact(k.max(1)).take(m) {
        let (qr, s) = quantize_row(row);
        q.extend(qr);
        scale.push(s);
    }
    Ok(Quantized {
        q: Tensor::i8(&[m, k], q)?,
        scale: Tensor::f32(&[m], scale)?,
    })
}

/// `q · scale[row]` in f64: the values a quantized tensor stands for.
pub fn dequantize(q: &[i8], scale: &[f32], k: usize) -> Vec<f64> {
    q.chunks(k.max(1))
        .zip(scale)
        .flat_map(|(row, &s)| row.iter().map(move |&v| v as f64 * s as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_even_and_values_saturate() {
        // amax 127 gives scale 1: x / scale is x itself.
        let (q, s) = quantize_row(&[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5, -3.49]);
        assert_eq!(s, 1.0);
        assert_eq!(q, vec![127, 0, 2, 2, -2, 0, 126, -3]);
        assert_eq!(quantize_value(1000.0, 1.0), 127);
        assert_eq!(quantize_value(-1000.0, 1.0), -127);
    }

    #[test]
    fn special_rows() {
        assert_eq!(quantize_row(&[0.0, -0.0, 0.0, 0.0]), (vec![0; 4], 0.0));
        let (q, s) = quantize_row(&[1.0, f32::NAN, 2.0, 3.0]);
        assert!(s.is_nan() && q == vec![0; 4]);
        let (q, s) = quantize_row(&[1.0, f32::NEG_INFINITY, 2.0, 3.0]);
        assert!(s.is_nan() && q == vec![0; 4]);
        // The smallest subnormal: amax / 127 underflows to 0.
        let tiny = f32::from_bits(1);
        assert_eq!(quantize_row(&[tiny, 0.0, 0.0, 0.0]), (vec![0; 4], 0.0));
        // A subnormal scale still quantizes exactly: amax itself maps to 127.
        let small = f32::from_bits(1 << 20);
        let (q, s) = quantize_row(&[small, -small / 2.0, 0.0, 0.0]);
        assert!(s > 0.0 && s < f32::MIN_POSITIVE);
        assert_eq!(q[0], 127);
    }

    #[test]
    fn the_row_maximum_maps_to_127() {
        for amax in [1.0f32, 3.7, 1e-30, 6.5e4, 3.0e38] {
            let (q, s) = quantize_row(&[amax, -amax / 3.0, amax / 127.0, 0.0]);
            assert_eq!(q[0], 127, "{amax}");
            assert_eq!(q[2], 1, "{amax}");
            assert_eq!(s, amax / 127.0);
        }
    }
}
