//! The operator's registry entry: the case tables of `fusedops check` / `bench`, the named
//! tensors of `fusedops run`, and the tolerances.

use super::inputs::{AmlaInputs, ColumnFill, InputSpec, Pattern};
use super::reference::{self, Emulation, Exact};
use super::{
    AmlaBindings, AmlaParams, AmlaPlan, AmlaSchedule, AmlaShape, D_QK, D_V, KvFormat, PPrecision,
    Rescale, Split, TileConfig, kv_row_bytes, visible_keys,
};
use crate::check::{Tolerance, compare};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::registry::{
    Case, CaseInfo, Checked, NamedTensors, Operator, Prepared, Scale, input, params_from_json,
};
use crate::tensor::{DType, DeviceTensor, Tensor};

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

/// Registered in [`crate::registry::operators`].
pub static OPERATOR: AmlaOperator = AmlaOperator;

/// One case: inputs generated from `spec` and `seed`, run with `params`.
#[derive(Clone, Debug)]
pub struct AmlaCase {
    pub name: String,
    pub preset: &'static str,
    pub spec: InputSpec,
    pub params: AmlaParams,
    pub seed: u64,
}

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

    fn visible_pairs(&self) -> u64 {
        let s = &self.spec;
        s.seqlens
            .iter()
            .map(|&len| {
                (0..s.s_q)
                    .map(|t| (visible_keys(len, s.s_q, t, self.params.causal) * s.h_q) as u64)
                    .sum::<u64>()
            })
            .sum()
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

    fn prepare<'g>(&self, gpu: &'g Gpu) -> Result<Box<dyn Prepared + 'g>> {
        let x = AmlaInputs::generate(&self.spec, self.seed)?;
        let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens)?;
        let plan = AmlaPlan::new(gpu, &shape, &self.params)?;
        let exact = reference::exact(
            &x.q,
            &x.kv_cache,
            &x.block_table,
            &x.cache_seqlens,
            &self.params,
        )?;
        let emulation = reference::emulate(
            &x.q,
            &x.kv_cache,
            &x.block_table,
            &x.cache_seqlens,
            &self.params,
            plan.tiles(),
        )?;
        let q = gpu.upload(&x.q)?;
        let kv = gpu.upload(&x.kv_cache)?;
        let main = Run::new(gpu, plan, &x, &q, &kv)?;
        let baseline = if self.params.rescale == Rescale::Amla {
            let params = AmlaParams {
                rescale: Rescale::Multiply,
                ..self.params
            };
            let plan = AmlaPlan::with_tiles(gpu, &shape, &params, *main.plan.tiles())?;
            Some(Run::new(gpu, plan, &x, &q, &kv)?)
        } else {
            None
        };
        let exact_tolerance = exact_out_tolerance(
            self.params.rescale,
            main.plan.p_rounding(),
            reference::max_abs_v(&x.kv_cache, self.params.kv_format),
        );
        Ok(Box::new(AmlaPrepared {
            gpu,
            shape,
            main,
            baseline,
            exact,
            exact_tolerance,
            emulation,
            _inputs: (q, kv),
        }))
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
        x: &AmlaInputs,
        q: &DeviceTensor,
        kv: &DeviceTensor,
    ) -> Result<Self> {
        let schedule = plan.schedule(gpu, &x.block_table, &x.cache_seqlens)?;
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
    main: Run,
    baseline: Option<Run>,
    exact: Exact,
    exact_tolerance: Tolerance,
    emulation: Emulation,
    _inputs: (DeviceTensor, DeviceTensor),
}

impl Prepared for AmlaPrepared<'_> {
    fn variant(&self) -> String {
        self.main.plan.variant()
    }

    fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.main.plan.record_bound(rec, &self.main.bindings)
    }

    fn verify(&self) -> Result<Vec<Checked>> {
        let out = self.gpu.download_f32(&self.main.out)?;
        let lse = self.gpu.download_f32(&self.main.lse)?;
        let (out_shape, lse_shape) = (self.shape.out_shape(), self.shape.lse_shape());
        Ok(vec![
            Checked::new(
                "out",
                &out_shape,
                compare(&out, &self.exact.out, self.exact_tolerance),
            ),
            Checked::new(
                "lse",
                &lse_shape,
                compare(&lse, &self.exact.lse, lse_tolerance()),
            ),
            Checked::new(
                "out~emulation",
                &out_shape,
                compare(
                    &out,
                    &round_to(self.shape.out_dtype, &self.emulation.out),
                    self.emulation.out_tolerance(self.shape.out_dtype),
                ),
            ),
            Checked::new(
                "lse~emulation",
                &lse_shape,
                compare(&lse, &self.emulation.lse, self.emulation.lse_tolerance()),
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
    let mut rng = super::inputs::SplitMix::new(seed);
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

fn bench_cases(gpu: &Gpu) -> Vec<AmlaCase> {
    let d = "deepseek-v3";
    let amla = params(Rescale::Amla, PPrecision::F32, Split::default(), false);
    let amla16 = AmlaParams {
        p_precision: PPrecision::F16,
        ..amla
    };
    // The multiply variant as cases of its own too, so that criterion lists it next to AMLA
    // (`fusedops bench` also times it as every AMLA case's baseline).
    let multiply = AmlaParams {
        rescale: Rescale::Multiply,
        ..amla
    };
    // CPU adapters get the same mix at a size they finish.
    let (b, sk, b_big_h) = if gpu.is_cpu() {
        (4, 512, 2)
    } else {
        (128, 4096, 128)
    };
    // The 8-bit caches beside their bf16 twin: same shape, same values before quantization.
    let fp8 = packed(KvFormat::Fp8, amla);
    let int8 = packed(KvFormat::Int8, amla);
    vec![
        AmlaCase::new(d, &vec![sk; b], 1, 16, 64, DType::BF16, amla, 30),
        AmlaCase::new(d, &vec![sk; b], 1, 16, 64, DType::BF16, fp8, 30),
        AmlaCase::new(d, &vec![sk; b], 1, 16, 64, DType::BF16, int8, 30),
        AmlaCase::new(d, &vec![sk; b], 1, 16, 64, DType::BF16, multiply, 30),
        AmlaCase::new(d, &vec![sk; b], 1, 16, 64, DType::BF16, amla16, 30),
        AmlaCase::new(d, &vec![sk; b_big_h], 1, 128, 64, DType::BF16, amla, 31),
        AmlaCase::new(d, &vec![sk; b_big_h], 1, 128, 64, DType::BF16, multiply, 31),
        AmlaCase::new(d, &spread(b, 2 * sk, 32), 1, 16, 64, DType::BF16, amla, 32),
        AmlaCase::new(
            d,
            &spread(b, 2 * sk, 33),
            2,
            16,
            64,
            DType::BF16,
            AmlaParams {
                causal: true,
                ..amla
            },
            33,
        ),
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
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum SplitParam {
    Word(String),
    Chunk { chunk: u32 },
    Target { target_workgroups: u32 },
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
            Scale::Bench => bench_cases(gpu),
        };
        cases
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
        vec![
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
        if output == "lse" {
            return lse_tolerance();
        }
        let (Ok(p), Ok(x)) = (
            params_from_json::<RunParams>("amla", params).and_then(|p| p.to_params()),
            named_inputs(inputs),
        ) else {
            return out_tolerance();
        };
        exact_out_tolerance(
            p.rescale,
            p.p_precision.resolve(x.kv_cache.dtype()),
            reference::max_abs_v(x.kv_cache, p.kv_format),
        )
    }
}
