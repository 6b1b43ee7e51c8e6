//! The operator's registry entry: the case tables of `fusedops check` / `bench`, the named
//! tensors of `fusedops run`, and the tolerances.

use super::inputs::{AmlaInputs, ColumnFill, InputSpec, Pattern};
use super::reference::{self, Emulation, Exact};
use super::{
    AmlaBindings, AmlaParams, AmlaPlan, AmlaSchedule, AmlaShape, CoopConfig, D_QK, D_V, PPrecision,
    Rescale, Split, TileConfig, coop, visible_keys,
};
use crate::check::{Tolerance, compare};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::registry::{
    Case, CaseInfo, Checked, NamedTensors, Operator, Prepared, Scale, input, params_from_json,
};
use crate::tensor::{DType, DeviceTensor, Tensor};

/// Tolerance of `out` against the exact reference: FlashMLA's (abs 8e-4 or rel 2.01/128 per
/// element, cosine difference < 5e-6) for every dtype and variant.
pub fn out_tolerance() -> Tolerance {
    Tolerance::new(8e-4, 2.01 / 128.0).with_cos_diff(5e-6)
}

/// Tolerance of `lse` against the exact reference: FlashMLA's (abs 1e-6 or rel 8.01/65536). The
/// inputs are exact in both (the reference reads the same 16-bit values), the lse comes from the
/// f32 scores and the f32 row sum of unrounded P, so 16-bit inputs need no relaxation.
pub fn lse_tolerance() -> Tolerance {
    Tolerance::new(1e-6, 8.01 / 65536.0)
}

/// Tolerance of `out` against the emulation rounded to the output dtype ([`round_to`]).
///
/// The two cannot agree bit for bit on every GPU: WGSL lets `exp2` be off by 3 + 2|x| ulp and
/// `fma` be unfused. What remains is one unit in the last place of a 16-bit output (where their
/// f32 values straddle a rounding boundary) and, with P in f32, about 1e-7 relative. With P in
/// f16 such a difference occasionally flips the rounding of one P value by an f16 ulp (2^-11
/// relative), moving its row by up to a few 1e-4. The cosine difference stays below 1e-11 for
/// f32 out with P in f32 (observed: about 1e-14), below 1e-9 with P in f16 or f16 out
/// (observed: up to 1.5e-10) and below 2e-8 for bf16 out (one-ulp flips: observed up to 3e-9),
/// against 5e-6 for the exact reference; leaving out AMLA's rounding compensation shows up as
/// about 1e-8 with f32 out. These figures hold for scores within 16 binades (random data stays
/// below 10); larger scores (`max_score`, from the emulation) carry proportionally larger f32
/// rounding errors, and the bounds grow with them.
pub fn emulation_out_tolerance(out_dtype: DType, p: PPrecision, max_score: f32) -> Tolerance {
    let ulp = match out_dtype {
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
        _ => 0.0,
    };
    let abs = match p {
        PPrecision::F32 => 2e-6,
        PPrecision::F16 => 5e-4,
    };
    let cos = match (out_dtype, p) {
        (DType::BF16, _) => 2e-8,
        (DType::F16, _) | (_, PPrecision::F16) => 1e-9,
        _ => 1e-11,
    };
    let score = (max_score as f64 / 16.0).max(1.0);
    Tolerance::new(abs * score, ulp + 2e-5 * score)
        .with_cos_diff(cos + 1e-11 * (score * score - 1.0))
}

/// Tolerance of `lse` against the emulation (observed: below 1e-6 absolute).
pub fn emulation_lse_tolerance() -> Tolerance {
    Tolerance::new(2e-6, 1e-6)
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

fn p_name(p: PPrecision) -> &'static str {
    match p {
        PPrecision::F32 => "f32",
        PPrecision::F16 => "f16",
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
        let spec = InputSpec::new(seqlens, s_q, h_q, page, dtype);
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
            s.kv_dtype,
            rescale_name(self.params.rescale),
            p_name(self.params.p_precision),
            if self.params.causal { " causal" } else { "" },
        )
    }

    fn with_pattern(mut self, label: &str, pattern: Pattern) -> Self {
        self.spec.pattern = pattern;
        self.name = format!("{} {label}", self.name);
        self
    }

    /// The shape the case plans for (dtypes and rows; the cache size does not matter here).
    fn plan_shape(&self) -> AmlaShape {
        let s = &self.spec;
        AmlaShape {
            batch: s.seqlens.len(),
            s_q: s.s_q,
            h_q: s.h_q,
            num_blocks: 1,
            page_size: s.page_size,
            max_blocks: 1,
            q_dtype: s.q_dtype,
            kv_dtype: s.kv_dtype,
            out_dtype: s.q_dtype,
        }
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
                ("dtype".into(), s.kv_dtype.to_string()),
                ("rescale".into(), rescale_name(self.params.rescale).into()),
                ("p".into(), p_name(self.params.p_precision).into()),
                ("split".into(), split_name(self.params.split)),
                ("causal".into(), self.params.causal.to_string()),
            ],
        }
    }

    /// q, the cache rows the sequences use, the block-table entries they use and the lengths,
    /// read once; out and lse written once.
    fn bytes(&self) -> u64 {
        let s = &self.spec;
        let rows = (s.seqlens.len() * s.s_q * s.h_q) as u64;
        let keys: u64 = s.seqlens.iter().map(|&l| l as u64).sum();
        let pages: u64 = s.seqlens.iter().map(|&l| s.pages(l) as u64).sum();
        rows * (D_QK * s.q_dtype.size()) as u64
            + keys * (D_QK * s.kv_dtype.size()) as u64
            + rows * (D_V * s.q_dtype.size()) as u64
            + rows * 4
            + 4 * (pages + s.seqlens.len() as u64)
    }

    /// 2 x (576 + 512) per visible (row, key) pair.
    fn flops(&self) -> u64 {
        2 * (D_QK + D_V) as u64 * self.visible_pairs()
    }

    fn uses_tensor_cores(&self, gpu: &Gpu) -> bool {
        CoopConfig::choose(gpu, &self.plan_shape(), &self.params).is_ok()
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
        let (emulation, emulation_out, emulation_lse) =
            coop::emulate_plan(&plan, &x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens)?;
        let q = gpu.upload(&x.q)?;
        let kv = gpu.upload(&x.kv_cache)?;
        let main = Run::new(gpu, plan, &x, &q, &kv)?;
        let baseline = if self.params.rescale == Rescale::Amla {
            let params = AmlaParams {
                rescale: Rescale::Multiply,
                ..self.params
            };
            let plan = main.plan.sibling(gpu, &params)?;
            Some(Run::new(gpu, plan, &x, &q, &kv)?)
        } else {
            None
        };
        Ok(Box::new(AmlaPrepared {
            gpu,
            shape,
            main,
            baseline,
            exact,
            emulation,
            emulation_tolerances: (emulation_out, emulation_lse),
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
    emulation: Emulation,
    /// Of `out` and `lse` against the emulation (they depend on the path).
    emulation_tolerances: (Tolerance, Tolerance),
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
                compare(&out, &self.exact.out, out_tolerance()),
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
                    self.emulation_tolerances.0,
                ),
            ),
            Checked::new(
                "lse~emulation",
                &lse_shape,
                compare(&lse, &self.emulation.lse, self.emulation_tolerances.1),
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
    }
}

/// Lengths 1..=max spread over `b` sequences, reproducibly (a variable-length batch).
fn spread(b: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut rng = super::inputs::SplitMix::new(seed);
    (0..b).map(|_| 1 + rng.below(max)).collect()
}

fn ci_cases() -> Vec<AmlaCase> {
    use PPrecision::{F16, F32};
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
    vec![
        AmlaCase::new(d, &vec![sk; b], 1, 16, 64, DType::BF16, amla, 30),
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
/// `causal` (false), `rescale` ("amla" | "multiply"), `p_precision` ("f32" | "f16"), `split`
/// ("auto" | "off" | {"chunk": keys} | {"target_workgroups": n}).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunParams {
    pub softmax_scale: Option<f32>,
    pub causal: bool,
    pub rescale: Rescale,
    pub p_precision: PPrecision,
    pub split: Option<SplitParam>,
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
                 kernel below for f32 q, an f32 cache or P in f32",
                c.describe(max),
                c.fragment.size()
            ),
            Err(why) => format!("f32 SIMT ({why})"),
        };
        vec![
            ("decode (16-bit q, cache and P)".into(), coop),
            (
                "decode (16-bit cache)".into(),
                format!("f32 SIMT, {}", tiles(16, DType::BF16)),
            ),
            (
                "decode (f32 cache)".into(),
                format!("f32 SIMT, {}", tiles(16, DType::F32)),
            ),
            (
                "reductions".into(),
                "workgroup memory (no subgroup operations: any subgroup size)".into(),
            ),
            (
                "P in f16".into(),
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
        _inputs: &NamedTensors,
        _params: &serde_json::Value,
    ) -> Tolerance {
        match output {
            "lse" => lse_tolerance(),
            _ => out_tolerance(),
        }
    }
}
