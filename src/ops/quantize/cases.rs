//! The quantization in the registry: the case tables of `fusedops check` / `bench` (random rows,
//! and rows built to hit the corners: ties, saturation, zero, NaN and ±inf rows, subnormal
//! scales) and the named-tensor interface of `fusedops run`.

use super::{OP, QuantizePlan, Quantized, check_input, reference, workgroup};
use crate::check::{Tolerance, compare};
use crate::error::Result;
use crate::gpu::{Gpu, Recorder};
use crate::registry::{
    Case, CaseInfo, Checked, Coverage, HostPrepared, NamedTensors, Operator, Prepared, Scale,
    Target, check_input_names, input, params_from_json,
};
use crate::tensor::{DType, DeviceTensor, Tensor};
use crate::util::unit;

/// The registered operator.
pub struct QuantizeOperator;

/// The instance in [`crate::suite::operators`].
pub static OPERATOR: QuantizeOperator = QuantizeOperator;

/// Rows of `k` values that hit the corners of the definition, each exact in `dtype`:
/// ties at scale 1 (amax 127), an all-zero row, NaN, +inf and −inf rows, a row near the largest
/// finite value, rows whose values are multiples of half the scale at a power-of-two scale (every
/// value a tie or exact), and for f32 subnormal rows (a subnormal scale, values that saturate, a
/// scale that underflows to 0).
pub fn corner_rows(k: usize, dtype: DType) -> Vec<Vec<f32>> {
    let fill = |first: &[f32], rest: f32| -> Vec<f32> {
        (0..k)
            .map(|i| first.get(i).copied().unwrap_or(rest))
            .collect()
    };
    let big = match dtype {
        DType::F16 => 65504.0,
        _ => 1.5 * 2f32.powi(127),
    };
    let mut rows = vec![
        fill(
            &[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0, 63.5],
            0.0,
        ),
        vec![0.0; k],
        fill(&[1.0, f32::NAN, 2.0], -1.0),
        fill(&[1.0, 2.0, f32::INFINITY], 0.5),
        fill(&[f32::NEG_INFINITY], 3.0),
        fill(&[big, -big / 3.0, big / 127.0, big / 254.0], 1.0),
    ];
    // Power-of-two scales (amax = 127 · 2^p): every value j/2 · 2^p is exact or a tie.
    for (r, p) in [-3i32, 4, -10].into_iter().enumerate() {
        let unit = 2f32.powi(p);
        rows.push(
            (0..k)
                .map(|i| match i {
                    0 => 127.0 * unit,
                    _ => ((i * 37 + r * 11) % 255) as f32 / 2.0 * unit - 63.5 * unit,
                })
                .collect(),
        );
    }
    match dtype {
        DType::F32 => {
            let sub = |bits: u32| f32::from_bits(bits);
            // amax 190 · 2^-149 gives the subnormal scale 2^-149: values up to 190 saturate.
            rows.push(fill(
                &[sub(190), -sub(190), sub(128), sub(127), sub(3)],
                0.0,
            ));
            // amax 2^-149: the scale underflows to 0, the row quantizes to zeros.
            rows.push(fill(&[sub(1), -sub(1)], 0.0));
            // A subnormal scale with many significant bits.
            rows.push((0..k).map(|i| sub(0x0012_3457 - i as u32 * 4099)).collect());
        }
        DType::F16 => {
            // f16 subnormals (decoded exactly by the kernel's integer path).
            let h = |bits: u16| half::f16::from_bits(bits).to_f32();
            rows.push((0..k).map(|i| h(1 + (i as u16 * 37) % 1023)).collect());
        }
        _ => {}
    }
    rows
}

/// One registry case.
struct QuantCase {
    name: String,
    preset: &'static str,
    rows: usize,
    k: usize,
    dtype: DType,
    /// Rows from [`corner_rows`] first, random rows after.
    corners: bool,
}

impl QuantCase {
    fn input(&self) -> Result<Tensor> {
        let mut values: Vec<f32> = Vec::with_capacity(self.rows * self.k);
        let corners = if self.corners {
            corner_rows(self.k, self.dtype)
        } else {
            Vec::new()
        };
        let seed = self
            .name
            .bytes()
            .fold(3u64, |h, b| h.wrapping_mul(31) ^ b as u64);
        for r in 0..self.rows {
            match corners.get(r) {
                Some(row) => values.extend(row),
                None => {
                    // Row magnitudes spread over decades, as activations are.
                    let row_scale = 2f32.powi((r % 9) as i32 - 4);
                    values.extend(
                        (0..self.k).map(|i| unit(seed, (r * self.k + i) as u64) * row_scale),
                    );
                }
            }
        }
        Tensor::from_f32(&[self.rows, self.k], &values, self.dtype)
    }
}

impl Case for QuantCase {
    fn info(&self) -> CaseInfo {
        CaseInfo {
            op: OP,
            name: self.name.clone(),
            preset: self.preset.to_string(),
            params: vec![
                ("rows".into(), self.rows.to_string()),
                ("k".into(), self.k.to_string()),
                ("x".into(), self.dtype.name().into()),
            ],
        }
    }

    /// x read once, q and the scales written once.
    fn bytes(&self) -> u64 {
        let (m, k) = (self.rows as u64, self.k as u64);
        m * k * (self.dtype.size() as u64 + 1) + 4 * m
    }

    /// One division-equivalent per element (counted as one operation).
    fn flops(&self) -> u64 {
        (self.rows * self.k) as u64
    }

    fn host(&self, _target: &Target) -> Result<Box<dyn HostPrepared>> {
        let x = self.input()?;
        let expected = reference::quantize(&x)?;
        Ok(Box::new(QuantHost { x, expected }))
    }
}

/// A case's input and its reference.
struct QuantHost {
    x: Tensor,
    expected: Quantized,
}

impl HostPrepared for QuantHost {
    fn upload<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>> {
        let shape = self.x.shape();
        let x_dev = gpu.upload(&self.x)?;
        let q = gpu.zeros(shape, DType::I8)?;
        let scale = gpu.zeros(&shape[..1], DType::F32)?;
        let plan = QuantizePlan::new(gpu, &x_dev, &q, &scale)?;
        Ok(Box::new(QuantPrepared {
            gpu,
            plan,
            q,
            scale,
            expected: self.expected.clone(),
            wg: workgroup(gpu),
            _x: x_dev,
        }))
    }

    fn coverage(&self) -> Coverage {
        let rows = self.x.shape()[0];
        Coverage::new(rows, rows, "rows")
    }
}

struct QuantPrepared<'g> {
    gpu: &'g Gpu,
    plan: QuantizePlan,
    q: DeviceTensor,
    scale: DeviceTensor,
    expected: Quantized,
    wg: u32,
    _x: DeviceTensor,
}

impl Prepared for QuantPrepared<'_> {
    fn variant(&self) -> String {
        format!(
            "integer bit arithmetic, one workgroup of {} per row",
            self.wg
        )
    }

    fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.plan.record(rec)
    }

    fn verify(&self) -> Result<Vec<Checked>> {
        let q = self.gpu.download_f32(&self.q)?;
        let scale = self.gpu.download_f32(&self.scale)?;
        Ok(vec![
            Checked::new(
                "q",
                self.q.shape(),
                compare(&q, &self.expected.q.to_f32(), Tolerance::EXACT),
            ),
            Checked::new(
                "scale",
                self.scale.shape(),
                compare(&scale, &self.expected.scale.to_f32(), Tolerance::EXACT),
            ),
        ])
    }
}

fn case(name: &str, preset: &'static str, rows: usize, k: usize, dtype: DType) -> QuantCase {
    QuantCase {
        name: name.to_string(),
        preset,
        rows,
        k,
        dtype,
        corners: false,
    }
}

fn corner_case(name: &str, rows: usize, k: usize, dtype: DType) -> QuantCase {
    QuantCase {
        corners: true,
        ..case(name, "custom", rows, k, dtype)
    }
}

/// `fusedops run quantize` parameters: none.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RunParams {}

impl Operator for QuantizeOperator {
    fn name(&self) -> &'static str {
        OP
    }

    fn cases(&self, scale: Scale, gpu: &Gpu) -> Vec<Box<dyn Case>> {
        use DType::{BF16, F16, F32};
        let cases = match scale {
            Scale::Ci => vec![
                case("random bf16 7x96", "custom", 7, 96, BF16),
                corner_case("corners f32 16x12", 16, 12, F32),
                corner_case("corners f16 12x20", 12, 20, F16),
                corner_case("corners bf16 11x8", 11, 8, BF16),
                case("one row f32 k=4", "custom", 1, 4, F32),
                case("no rows bf16", "custom", 0, 16, BF16),
            ],
            Scale::Full => vec![
                case("pangu-pro-moe t=256", "pangu-pro-moe", 256, 5120, BF16),
                case("deepseek-v3 t=4096", "deepseek-v3", 4096, 7168, BF16),
            ],
            Scale::Bench => return self.headline(!gpu.is_cpu()),
        };
        cases
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Case>)
            .collect()
    }

    /// The activations of the MoE presets at 16 and 4096 tokens (a CPU adapter: 1/8 of the
    /// hidden size, 16 and 256 tokens).
    fn headline(&self, full: bool) -> Vec<Box<dyn Case>> {
        let (shrink, tokens): (usize, &[usize]) = if full {
            (1, &[16, 4096])
        } else {
            (8, &[16, 256])
        };
        tokens
            .iter()
            .flat_map(|&t| {
                [
                    case(
                        &format!("pangu-pro-moe hidden t={t}"),
                        "pangu-pro-moe",
                        t,
                        5120 / shrink,
                        DType::BF16,
                    ),
                    case(
                        &format!("deepseek-v3 hidden t={t}"),
                        "deepseek-v3",
                        t,
                        7168 / shrink,
                        DType::BF16,
                    ),
                ]
            })
            .map(|c| Box::new(c) as Box<dyn Case>)
            .collect()
    }

    fn paths(&self, gpu: &Gpu) -> Vec<(String, String)> {
        vec![(
            "rows".into(),
            format!(
                "integer arithmetic on the f32 bit patterns (bit-exact on every device), one \
                 workgroup of {} per row (plain WGSL)",
                workgroup(gpu)
            ),
        )]
    }

    fn run_named(
        &self,
        gpu: &Gpu,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let _: RunParams = params_from_json(OP, params)?;
        check_input_names(OP, inputs, &["x"])?;
        let out = super::quantize(gpu, input(OP, inputs, "x")?)?;
        Ok(NamedTensors::from([
            ("q".to_string(), out.q),
            ("scale".to_string(), out.scale),
        ]))
    }

    fn reference_named(
        &self,
        inputs: &NamedTensors,
        params: &serde_json::Value,
    ) -> Result<NamedTensors> {
        let _: RunParams = params_from_json(OP, params)?;
        check_input_names(OP, inputs, &["x"])?;
        let x = input(OP, inputs, "x")?;
        check_input(x)?;
        let out = reference::quantize(x)?;
        Ok(NamedTensors::from([
            ("q".to_string(), out.q),
            ("scale".to_string(), out.scale),
        ]))
    }

    fn tolerance(
        &self,
        _output: &str,
        _inputs: &NamedTensors,
        _params: &serde_json::Value,
    ) -> Tolerance {
        Tolerance::EXACT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tie_rows_are_exact_in_their_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let rows = corner_rows(12, dtype);
            // Row 0 (scale 1) and the three power-of-two-scale rows after the special ones.
            for row in [&rows[0], &rows[6], &rows[7], &rows[8]] {
                for &v in row {
                    assert!(dtype.round(v) == v, "{v} is not exact in {dtype}");
                }
            }
        }
    }

    #[test]
    fn corner_rows_contain_ties_and_saturation() {
        let rows = corner_rows(12, DType::F32);
        let (q, s) = reference::quantize_row(&rows[0]);
        assert_eq!(s, 1.0);
        assert_eq!(&q[..10], &[127, 0, 2, 2, 0, -2, -2, 126, -127, 64]);
        let saturating = rows.iter().find(|r| r[0] == f32::from_bits(190)).unwrap();
        let (q, s) = reference::quantize_row(saturating);
        assert_eq!(s, f32::from_bits(1));
        assert_eq!(&q[..5], &[127, -127, 127, 127, 3]);
    }
}
