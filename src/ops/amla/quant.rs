//! The 8-bit latent cache: FlashMLA's "FP8 with scale" row and its int8 twin.
//!
//! A token's 576 values take 656 bytes (FlashMLA, `README.md` and `tests/quant.py` at commit
//! 9241ae3e, and the `stride_kv_row == 656` check of its sm90 FP8 decode kernel):
//!
//! | bytes | what |
//! |---|---|
//! | 0..512 | values 0..512 as 8-bit codes: FP8 E4M3 (`float8_e4m3fn`) or int8 |
//! | 512..528 | four f32 scales, little-endian: scale i multiplies values 128 i .. 128 i + 127 |
//! | 528..656 | values 512..576 (the rope part) as bf16, not quantized |
//!
//! A value is `code × scale` (FlashMLA's `dequantize_k_cache`). The cache tensor is `u8`
//! `[num_blocks, page, 656]` or `[num_blocks, page, 1, 656]` (FlashMLA's shape, h_kv = 1).
//!
//! [`quantize_cache`] makes such a cache from a float one the way FlashMLA's test quantizer
//! does for FP8 (a power-of-two scale per 128 values, `2^ceil(log2(max(amax / 448, 1e-4)))`,
//! codes rounded to nearest even) and, for int8, with the symmetric scale `amax / 127` (at least
//! the smallest normal f32) and codes rounded to nearest even. A 128-value group holding NaN or
//! ±inf gets a NaN scale (and NaN codes for FP8), as FlashMLA's quantizer gives it: the row then
//! decodes to NaN, like its source.

use half::bf16;

use super::{D_QK, D_V, KvFormat};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Bytes of one packed token.
pub const ROW_BYTES: usize = 656;
/// Values sharing one scale.
pub const GROUP: usize = 128;
/// Scales per token.
pub const SCALES: usize = D_V / GROUP;
/// Byte offset of the first scale.
pub const SCALES_AT: usize = D_V;
/// Byte offset of the first rope (bf16) value.
pub const ROPE_AT: usize = D_V + 4 * SCALES;
/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Largest int8 code of the symmetric quantizer.
pub const INT8_MAX: f32 = 127.0;
/// FlashMLA's floor on the FP8 scale before it is rounded up to a power of two.
const FP8_MIN_SCALE: f32 = 1e-4;

const _: () = assert!(ROPE_AT + 2 * (D_QK - D_V) == ROW_BYTES);

/// The value of an FP8 E4M3 code (OCP `e4m3fn`: bias 7, no infinities, S.1111.111 is NaN).
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((code >> 3) & 0xf);
    let mantissa = f32::from(code & 7);
    if code & 0x7f == 0x7f {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        mantissa * (-9.0f32).exp2() // subnormal: m / 8 * 2^-6
    } else {
        (8.0 + mantissa) * ((exponent - 10) as f32).exp2()
    };
    sign * magnitude
}

/// `x` as the nearest E4M3 code (ties to even). |x| beyond 448 saturates to ±448; NaN and ±inf
/// give the NaN code (E4M3 has no infinity).
pub fn f32_to_e4m3(x: f32) -> u8 {
    if !x.is_finite() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    // Spacing of the codes around a: 2^-9 below 2^-6 (subnormals), else 2^(e - 3).
    let exponent = if a < (-6.0f32).exp2() {
        -6
    } else {
        a.log2().floor() as i32
    };
    let step = ((exponent - 3) as f32).exp2();
    let units = (a / step).round_ties_even(); // exact: a / step is a power-of-two scaling
    let code = if exponent == -6 && units < 8.0 {
        units as u8 // subnormal (or 0)
    } else if units >= 16.0 {
        // Rounded up into the next binade.
        (((exponent + 8) as u8) << 3) & 0x78
    } else {
        (((exponent + 7) as u8) << 3) | (units as u8 - 8)
    };
    sign | code
}

/// Largest scale whose product with every code stays finite in f32.
pub fn max_scale(format: KvFormat) -> f32 {
    match format {
        KvFormat::Int8 => f32::MAX / 128.0, // int8 codes reach -128
        _ => f32::MAX / E4M3_MAX,
    }
}

/// The 576 values of one packed row, exactly, in f64: `code × scale` for the first 512 (NaN for
/// an E4M3 NaN code, non-finite for a non-finite scale), the bf16 rope values after them.
pub fn decode_row(row: &[u8], format: KvFormat) -> Vec<f64> {
    let scales: Vec<f64> = (0..SCALES)
        .map(|i| {
            let at = SCALES_AT + 4 * i;
            f32::from_le_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]]) as f64
        })
        .collect();
    let mut out = Vec::with_capacity(D_QK);
    for (d, &code) in row[..D_V].iter().enumerate() {
        let value = match format {
            KvFormat::Int8 => code as i8 as f64,
            _ => e4m3_to_f32(code) as f64,
        };
        out.push(value * scales[d / GROUP]);
    }
    for pair in row[ROPE_AT..ROW_BYTES].chunks_exact(2) {
        out.push(bf16::from_le_bytes([pair[0], pair[1]]).to_f64());
    }
    out
}

/// The scale of one 128-value group: FlashMLA's power of two for FP8, `amax / 127` for int8;
/// NaN when the group holds NaN or ±inf.
fn group_scale(values: &[f32], format: KvFormat) -> f32 {
    if values.iter().any(|v| !v.is_finite()) {
        return f32::NAN;
    }
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    match format {
        KvFormat::Int8 => (amax / INT8_MAX).max(f32::MIN_POSITIVE),
        _ => (amax / E4M3_MAX).max(FP8_MIN_SCALE).log2().ceil().exp2(),
    }
}

/// One packed row of `values` (576 f32).
fn encode_row(values: &[f32], format: KvFormat, row: &mut [u8]) {
    for g in 0..SCALES {
        let group = &values[g * GROUP..(g + 1) * GROUP];
        let scale = group_scale(group, format);
        for (d, &v) in group.iter().enumerate() {
            row[g * GROUP + d] = match format {
                KvFormat::Int8 if scale.is_nan() => 0,
                KvFormat::Int8 => {
                    (v / scale).round_ties_even().clamp(-INT8_MAX, INT8_MAX) as i8 as u8
                }
                _ => f32_to_e4m3(v / scale),
            };
        }
        row[SCALES_AT + 4 * g..SCALES_AT + 4 * g + 4].copy_from_slice(&scale.to_le_bytes());
    }
    for (d, &v) in values[D_V..].iter().enumerate() {
        let at = ROPE_AT + 2 * d;
        row[at..at + 2].copy_from_slice(&bf16::from_f32(v).to_le_bytes());
    }
}

/// Quantize a float cache (`[num_blocks, page, 576]` or `[num_blocks, page, 1, 576]`, f32 / f16
/// / bf16) into the packed 8-bit layout of `format` (`Fp8` or `Int8`), keeping the rank:
/// `u8 [num_blocks, page, 656]` or `[num_blocks, page, 1, 656]`. Every row is quantized,
/// unused ones too (NaN padding stays NaN).
pub fn quantize_cache(kv_cache: &Tensor, format: KvFormat) -> Result<Tensor> {
    const OP: &str = "amla quantize_cache";
    if format == KvFormat::Float {
        return Err(Error::invalid(
            OP,
            "format",
            "float (expected fp8 or int8: the 8-bit formats)",
        ));
    }
    if !kv_cache.dtype().is_float() {
        return Err(Error::unsupported(
            OP,
            format!(
                "kv_cache dtype {} (expected f32, f16 or bf16)",
                kv_cache.dtype()
            ),
        ));
    }
    let shape = kv_cache.shape();
    let ok = match shape.len() {
        3 => shape[2] == D_QK,
        4 => shape[2] == 1 && shape[3] == D_QK,
        _ => false,
    };
    if !ok {
        return Err(Error::shape(
            OP,
            "kv_cache",
            shape,
            "[num_blocks, page, 576] or [num_blocks, page, 1, 576]",
        ));
    }
    let values = kv_cache.to_f32();
    let rows = values.len() / D_QK;
    let mut bytes = vec![0u8; rows * ROW_BYTES];
    for (src, dst) in values
        .chunks_exact(D_QK)
        .zip(bytes.chunks_exact_mut(ROW_BYTES))
    {
        encode_row(src, format, dst);
    }
    let mut packed_shape = shape.to_vec();
    *packed_shape.last_mut().expect("rank >= 3") = ROW_BYTES;
    Tensor::u8(&packed_shape, bytes)
}

/// Check the scales of the packed rows `rows` (row indices into `[num_blocks · page]`) of an
/// 8-bit cache: each must be NaN or ±inf (its 128 values are then non-finite data, which
/// propagates like a NaN value) or in `(0, max_scale]`. Zero, negative and too large scales are
/// refused, naming the row: no quantizer of this layout makes them, and they would silently
/// zero, flip or overflow 128 values.
pub fn check_scales(
    op: &'static str,
    kv_cache: &[u8],
    format: KvFormat,
    page: usize,
    rows: impl Iterator<Item = usize>,
) -> Result<()> {
    let max = max_scale(format);
    for row in rows {
        for i in 0..SCALES {
            let at = row * ROW_BYTES + SCALES_AT + 4 * i;
            let s = f32::from_le_bytes([
                kv_cache[at],
                kv_cache[at + 1],
                kv_cache[at + 2],
                kv_cache[at + 3],
            ]);
            if s.is_finite() && !(s > 0.0 && s <= max) {
                return Err(Error::invalid(
                    op,
                    format!("kv_cache[{}, {}] scale {i}", row / page, row % page),
                    format!(
                        "{s:e}: a scale of a used cache row must be > 0 and at most {max:e} \
                         (or NaN/inf, which propagates as NaN)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// True for the storage dtype of a packed 8-bit cache (one-byte elements: u8).
pub fn is_packed(dtype: DType) -> bool {
    dtype.size() == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_codes_round_trip() {
        for code in 0..=255u8 {
            let v = e4m3_to_f32(code);
            if code & 0x7f == 0x7f {
                assert!(v.is_nan());
                continue;
            }
            // -0 encodes back to 0x80, every other value to its own code.
            assert_eq!(f32_to_e4m3(v), code, "{code:#04x} {v}");
        }
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), (-9.0f32).exp2());
        assert_eq!(e4m3_to_f32(0x08), (-6.0f32).exp2());
        assert_eq!(f32_to_e4m3(1000.0), 0x7e);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0x7f);
        // Ties to even: 1 + 1/16 lies halfway between 1 (even) and 1 + 1/8.
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625)), 1.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.1875)), 1.25);
        // Rounding up across a binade, and from the largest subnormal into the normals.
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.95)), 2.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(0.0155)), (-6.0f32).exp2());
    }

    #[test]
    fn quantized_rows_decode_close_to_their_source() {
        let values: Vec<f32> = (0..D_QK)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let cache = Tensor::f32(&[1, 1, D_QK], values.clone()).unwrap();
        for (format, rel) in [(KvFormat::Fp8, 1.0 / 16.0), (KvFormat::Int8, 1.0 / 254.0)] {
            let packed = quantize_cache(&cache, format).unwrap();
            assert_eq!(packed.shape(), &[1, 1, ROW_BYTES]);
            let decoded = decode_row(packed.as_u8().unwrap(), format);
            for g in 0..SCALES {
                let amax = values[g * GROUP..(g + 1) * GROUP]
                    .iter()
                    .fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                for d in g * GROUP..(g + 1) * GROUP {
                    let err = (decoded[d] - values[d] as f64).abs();
                    // E4M3: half a code step relative; int8: half a step of amax / 127.
                    let bound = match format {
                        KvFormat::Int8 => rel * amax,
                        _ => rel * (values[d] as f64).abs() + (-10.0f64).exp2(),
                    };
                    assert!(
                        err <= bound,
                        "{format:?} {d}: {} vs {}",
                        decoded[d],
                        values[d]
                    );
                }
            }
            for d in D_V..D_QK {
                assert_eq!(decoded[d], bf16::from_f32(values[d]).to_f64());
            }
        }
    }

    #[test]
    fn non_finite_groups_get_a_nan_scale() {
        let mut values = vec![0.5f32; D_QK];
        values[130] = f32::INFINITY;
        let cache = Tensor::f32(&[1, 1, 1, D_QK], values).unwrap();
        for format in [KvFormat::Fp8, KvFormat::Int8] {
            let packed = quantize_cache(&cache, format).unwrap();
            assert_eq!(packed.shape(), &[1, 1, 1, ROW_BYTES]);
            let decoded = decode_row(packed.as_u8().unwrap(), format);
            assert!(
                decoded[..GROUP].iter().all(|v| (v - 0.5).abs() < 1e-7),
                "{format:?}"
            );
            assert!(decoded[GROUP..2 * GROUP].iter().all(|v| v.is_nan()));
            // An all-zero group still gets a positive scale.
            let zeros = quantize_cache(
                &Tensor::f32(&[1, 1, D_QK], vec![0.0; D_QK]).unwrap(),
                format,
            )
            .unwrap();
            check_scales("t", zeros.as_u8().unwrap(), format, 1, 0..1).unwrap();
        }
    }

    #[test]
    fn bad_inputs_and_scales_are_errors() {
        let cache = Tensor::f32(&[1, 1, 512], vec![0.0; 512]).unwrap();
        assert!(matches!(
            quantize_cache(&cache, KvFormat::Fp8),
            Err(Error::Shape { .. })
        ));
        let ints = Tensor::zeros(&[1, 1, D_QK], DType::I32).unwrap();
        assert!(matches!(
            quantize_cache(&ints, KvFormat::Int8),
            Err(Error::Unsupported { .. })
        ));
        let ok = Tensor::zeros(&[2, 1, D_QK], DType::BF16).unwrap();
        assert!(matches!(
            quantize_cache(&ok, KvFormat::Float),
            Err(Error::Invalid { .. })
        ));
        let packed = quantize_cache(&ok, KvFormat::Fp8).unwrap();
        for bad in [0.0f32, -1.0, f32::MAX] {
            let mut bytes = packed.as_u8().unwrap().to_vec();
            let at = ROW_BYTES + SCALES_AT + 8; // row 1, scale 2
            bytes[at..at + 4].copy_from_slice(&bad.to_le_bytes());
            let err = check_scales("t", &bytes, KvFormat::Fp8, 1, 0..2).unwrap_err();
            assert!(err.to_string().contains("kv_cache[1, 0] scale 2"), "{err}");
            // Row 1 unused: anything goes.
            check_scales("t", &bytes, KvFormat::Fp8, 1, 0..1).unwrap();
        }
    }
}
