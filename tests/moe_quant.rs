//! The MoE layer in W8A8 on the default adapter against the reference that emulates every
//! quantization step: both small presets at several token counts, both layouts, with and
//! without the shared expert, padded dispatch blocks (the gather's int8 rows and scales checked
//! bit for bit, padding rows zero), the passes of one submission, an empty batch, the registry
//! and `fusedops run`, and every error path (nothing dispatched, output untouched).

mod common;

use common::{gpu, rng};
use fusedops::check::compare;
use fusedops::error::Error;
use fusedops::gpu::Gpu;
use fusedops::ops::merrouter::{self, Scoring};
use fusedops::ops::moe::quant::{
    self, QuantHostWeights, QuantMoeWeights, QuantSharedWeights, QuantTensor, reference,
};
use fusedops::ops::moe::{
    self, MoeConfig, MoeLayer, MoeOptions, MoeOutput, OPERATOR, QUANT_STEPS, STEPS,
};
use fusedops::ops::quantize;
use fusedops::ops::swiftgmm::quant::QuantWeights;
use fusedops::ops::swiftgmm::{Layout, Mode, Tiling};
use fusedops::registry::{NamedTensors, Operator, Scale};
use fusedops::tensor::{DType, DeviceTensor, Tensor};
use rand::Rng;

const DEFAULTS: MoeOptions = MoeOptions {
    tiling: Tiling::Defaults,
    mode: Mode::Auto,
    max_workgroups: None,
};

/// int8 weights and their scales.
struct Int8 {
    q: Tensor,
    scale: Tensor,
}

impl Int8 {
    fn view(&self) -> QuantTensor<'_> {
        QuantTensor {
            q: &self.q,
            scale: &self.scale,
        }
    }
}

/// A W8A8 layer's host inputs: tie-free router inputs, int8 experts in ±127 with scales that
/// keep values O(1).
struct Layer {
    config: MoeConfig,
    hidden: Tensor,
    gate: Tensor,
    bias: Option<Tensor>,
    router_scale: Option<Tensor>,
    gate_up: Int8,
    down: Int8,
    shared: Option<(Int8, Int8)>,
}

impl Layer {
    fn new(config: &MoeConfig, t: usize, act: DType, seed: u64) -> Layer {
        let mut r = rng(seed);
        let (h, i, e) = (config.hidden, config.intermediate, config.router.experts);
        let sigmoid = config.router.scoring == Scoring::Sigmoid;
        let bias: Option<Vec<f32>> =
            sigmoid.then(|| (0..e).map(|_| r.random_range(-0.1..0.1)).collect());
        let router_scale: Option<Vec<f32>> =
            (!sigmoid).then(|| (0..e).map(|_| r.random_range(0.5..1.5)).collect());
        let bias64: Option<Vec<f64>> = bias.as_ref().map(|b| b.iter().map(|&v| v as f64).collect());
        let (hidden, gate) =
            merrouter::tie_free_gate(&config.router, t, h, bias64.as_deref(), seed).unwrap();
        let mut int8 = |experts: usize, dims: [usize; 2], k: usize, n: usize| Int8 {
            q: Tensor::i8(
                &[experts, dims[0], dims[1]],
                (0..experts * dims[0] * dims[1])
                    .map(|_| r.random_range(-127..=127))
                    .collect(),
            )
            .unwrap(),
            scale: Tensor::f32(
                &[experts, n],
                (0..experts * n)
                    .map(|_| r.random_range(0.5..1.5) / (73.0 * (k as f32).sqrt()))
                    .collect(),
            )
            .unwrap(),
        };
        let gate_up = int8(e, config.gate_up_dims(i), h, 2 * i);
        let down = int8(e, config.down_dims(i), i, h);
        let shared = config.shared_intermediate.map(|is| {
            (
                int8(1, config.gate_up_dims(is), h, 2 * is),
                int8(1, config.down_dims(is), is, h),
            )
        });
        Layer {
            config: config.clone(),
            hidden: Tensor::from_f32(&[t, h], &hidden, act).unwrap(),
            gate: Tensor::from_f32(&[h, e], &gate, act).unwrap(),
            bias: bias.map(|b| Tensor::f32(&[e], b).unwrap()),
            router_scale: router_scale.map(|s| Tensor::f32(&[e], s).unwrap()),
            gate_up,
            down,
            shared,
        }
    }

    fn weights(&self) -> QuantHostWeights<'_> {
        QuantHostWeights {
            gate: &self.gate,
            bias: self.bias.as_ref(),
            router_scale: self.router_scale.as_ref(),
            gate_up: self.gate_up.view(),
            down: self.down.view(),
            shared: self.shared.as_ref().map(|(g, d)| (g.view(), d.view())),
        }
    }

    fn run(&self, g: &Gpu, out: DType) -> MoeOutput {
        quant::run_w8a8(
            g,
            &self.config,
            &self.hidden,
            &self.weights(),
            out,
            &DEFAULTS,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn check(&self, g: &Gpu, out: DType, what: &str) {
        let got = self.run(g, out);
        let want = reference::layer(&self.config, &self.hidden, &self.weights(), out).unwrap();
        let c = compare(
            &got.out.to_f32(),
            &want.out,
            moe::tolerance(self.hidden.dtype(), out),
        );
        assert!(c.pass, "{what}: out {}", c.summary(got.out.shape()));
        for checked in merrouter::check_router_output(&got.router, &want.routing, &want.layout) {
            assert!(checked.comparison.pass, "{what}: {}", checked.output);
        }
    }
}

fn preset(name: &str) -> MoeConfig {
    MoeConfig::preset(name).unwrap()
}

#[test]
fn small_presets_match_the_emulating_reference() {
    let g = gpu();
    // t = 1 leaves most experts empty and the chosen ones with one row; t = 33 gives the
    // GEMM path rows.
    for (name, t, act, out) in [
        ("pangu-pro-moe-small-w8a8", 1, DType::BF16, DType::BF16),
        ("pangu-pro-moe-small-w8a8", 9, DType::F16, DType::F32),
        ("deepseek-v3-small-w8a8", 5, DType::BF16, DType::BF16),
        ("deepseek-v3-small-w8a8", 33, DType::F32, DType::F32),
    ] {
        Layer::new(&preset(name), t, act, t as u64).check(g, out, &format!("{name} t={t} {act}"));
    }
    // [e, k, n] weights, no shared expert.
    let mut config = preset("pangu-pro-moe-small-w8a8");
    config.layout = Layout::Kn;
    config.shared_intermediate = None;
    Layer::new(&config, 6, DType::BF16, 3).check(g, DType::BF16, "kn no-shared");
}

/// The gather quantizes every dispatch row exactly as the quantizer does (padding rows zero with
/// scale 0), the token-order copy equals the quantization of hidden, and the intermediates are
/// re-quantized exactly.
#[test]
fn the_gather_quantizes_rows_exactly() {
    let g = gpu();
    let mut config = preset("deepseek-v3-small-w8a8");
    config.router.block_size = 16;
    let t = 6;
    let layer = Layer::new(&config, t, DType::BF16, 21);
    let (hidden, w, out) = upload(g, &layer);
    let built = MoeLayer::new_w8a8(g, &config, &hidden, &w.weights(), &out, &DEFAULTS).unwrap();
    g.run(|rec| built.record(rec)).unwrap();
    let m = built.intermediates();
    let q = m.quantized.as_ref().unwrap();
    let slots: Vec<i32> = g
        .download(&built.router().layout().sorted_slots)
        .unwrap()
        .as_i32()
        .unwrap()
        .to_vec();
    let h = config.hidden;
    let want = quantize::reference::quantize(&layer.hidden).unwrap();
    let (wq, ws) = (want.q.as_i8().unwrap(), want.scale.as_f32().unwrap());
    let x = g.download(&m.x_sorted).unwrap();
    let x = x.as_i8().unwrap();
    let xs = g.download_f32(&q.x_scale).unwrap();
    let k = config.router.top_k as i32;
    let mut padding = 0;
    for (row, &slot) in slots.iter().enumerate() {
        let got = &x[row * h..(row + 1) * h];
        if slot < 0 || slot >= t as i32 * k {
            padding += 1;
            assert!(
                got.iter().all(|&v| v == 0) && xs[row] == 0.0,
                "padding row {row}"
            );
        } else {
            let token = (slot / k) as usize;
            assert_eq!(
                got,
                &wq[token * h..(token + 1) * h],
                "row {row} (token {token})"
            );
            assert_eq!(xs[row].to_bits(), ws[token].to_bits(), "scale of row {row}");
        }
    }
    assert!(padding > 0, "block size 16 pads the groups");
    let (hq, hs) = q.hidden.as_ref().unwrap();
    assert_eq!(
        g.download(hq).unwrap().as_i8().unwrap(),
        wq,
        "token-order copy"
    );
    assert_eq!(g.download_f32(hs).unwrap(), ws);
    // The re-quantized intermediate is the quantization of the stored intermediate.
    let inter = g.download(&m.intermediate).unwrap();
    let want = quantize::reference::quantize(&inter).unwrap();
    let (iq, is) = &q.intermediate;
    assert_eq!(g.download(iq).unwrap(), want.q);
    assert_eq!(g.download(is).unwrap(), want.scale);
}

/// The device inputs of a layer.
struct Uploaded {
    gate: DeviceTensor,
    bias: Option<DeviceTensor>,
    router_scale: Option<DeviceTensor>,
    gate_up: QuantWeights,
    down: QuantWeights,
    shared: Option<(QuantWeights, QuantWeights)>,
}

impl Uploaded {
    fn weights(&self) -> QuantMoeWeights<'_> {
        QuantMoeWeights {
            gate: &self.gate,
            bias: self.bias.as_ref(),
            router_scale: self.router_scale.as_ref(),
            gate_up: &self.gate_up,
            down: &self.down,
            shared: self
                .shared
                .as_ref()
                .map(|(gate_up, down)| QuantSharedWeights { gate_up, down }),
        }
    }
}

fn upload(g: &Gpu, l: &Layer) -> (DeviceTensor, Uploaded, DeviceTensor) {
    let int8 = |w: &Int8| QuantWeights::upload(g, &w.q, &w.scale, None).unwrap();
    let up = |t: &Option<Tensor>| t.as_ref().map(|t| g.upload(t).unwrap());
    let t = l.hidden.shape()[0];
    (
        g.upload(&l.hidden).unwrap(),
        Uploaded {
            gate: g.upload(&l.gate).unwrap(),
            bias: up(&l.bias),
            router_scale: up(&l.router_scale),
            gate_up: int8(&l.gate_up),
            down: int8(&l.down),
            shared: l.shared.as_ref().map(|(a, b)| (int8(a), int8(b))),
        },
        g.upload(&Tensor::f32(&[t, l.config.hidden], vec![1.5; t * l.config.hidden]).unwrap())
            .unwrap(),
    )
}

#[test]
fn one_submission_with_the_quantize_passes_and_empty_batches() {
    let g = gpu();
    let config = preset("pangu-pro-moe-small-w8a8");
    let layer = Layer::new(&config, 4, DType::BF16, 5);
    let (hidden, w, out) = upload(g, &layer);
    let built = MoeLayer::new_w8a8(g, &config, &hidden, &w.weights(), &out, &DEFAULTS).unwrap();
    assert_eq!(
        built.steps(),
        vec![
            STEPS[0],
            STEPS[1],
            STEPS[2],
            QUANT_STEPS[0],
            STEPS[3],
            STEPS[4],
            QUANT_STEPS[1],
            STEPS[5],
            STEPS[6]
        ]
    );
    assert!(
        built.variant().contains("int8 quantization fused"),
        "{}",
        built.variant()
    );
    let timing = g.time(0, 2, |rec| built.record(rec)).unwrap();
    assert_eq!(timing.pass_labels, built.steps());
    // Recorded twice in one command buffer: the same output as the reference.
    g.run(|rec| {
        built.record(rec)?;
        built.record(rec)
    })
    .unwrap();
    let want = reference::layer(&config, &layer.hidden, &layer.weights(), DType::BF16).unwrap();
    let c = compare(
        &g.download_f32(&out).unwrap(),
        &want.out,
        moe::tolerance(DType::BF16, DType::BF16),
    );
    assert!(c.pass, "recorded twice: {}", c.summary(&[4, config.hidden]));
    // An empty batch: nothing recorded, an empty output.
    let empty = Layer::new(&config, 0, DType::BF16, 6);
    let got = empty.run(g, DType::BF16);
    assert_eq!(got.out.shape(), &[0, config.hidden]);
}

#[test]
fn registry_cases_and_named_tensors() {
    let g = gpu();
    let cases: Vec<_> = OPERATOR
        .cases(Scale::Ci, g)
        .into_iter()
        .filter(|c| {
            c.info()
                .params
                .iter()
                .any(|(k, v)| k == "quant" && v == "w8a8")
        })
        .collect();
    assert!(cases.len() >= 3);
    for case in cases {
        let name = case.info().name;
        assert!(case.info().preset.ends_with("-w8a8"), "{name}");
        let prepared = case.prepare(g).unwrap();
        assert!(prepared.baseline().is_none());
        g.run(|rec| prepared.record(rec)).unwrap();
        for c in prepared.verify().unwrap() {
            assert!(
                c.comparison.pass,
                "{name} {}: {}",
                c.output,
                c.comparison.summary(&c.shape)
            );
        }
    }
    // fusedops run with int8 expert weights and their scales.
    let layer = Layer::new(&preset("deepseek-v3-small-w8a8"), 3, DType::BF16, 8);
    let mut named = NamedTensors::new();
    named.insert("hidden".into(), layer.hidden.clone());
    named.insert("gate_weight".into(), layer.gate.clone());
    named.insert("bias".into(), layer.bias.clone().unwrap());
    for (name, w) in [("gate_up", &layer.gate_up), ("down", &layer.down)] {
        named.insert(name.into(), w.q.clone());
        named.insert(format!("{name}_scale"), w.scale.clone());
    }
    let (sg, sd) = layer.shared.as_ref().unwrap();
    for (name, w) in [("shared_gate_up", sg), ("shared_down", sd)] {
        named.insert(name.into(), w.q.clone());
        named.insert(format!("{name}_scale"), w.scale.clone());
    }
    let params = serde_json::json!({"preset": "deepseek-v3-w8a8", "tiling": "defaults"});
    let got = OPERATOR.run_named(g, &named, &params).unwrap();
    let want = OPERATOR.reference_named(&named, &params).unwrap();
    for output in ["out", "topk_ids", "topk_weights"] {
        let c = compare(
            &got[output].to_f32(),
            &want[output].to_f32(),
            OPERATOR.tolerance(output, &named, &params),
        );
        assert!(c.pass, "{output}: {}", c.summary(got[output].shape()));
    }
    // A missing scale is named; a -w8a8 preset with float experts is refused.
    let mut missing = named.clone();
    missing.remove("shared_down_scale");
    let e = OPERATOR.run_named(g, &missing, &params).unwrap_err();
    assert!(e.to_string().contains("shared_down_scale"), "{e}");
    let mut float = NamedTensors::new();
    for name in ["hidden", "gate_weight", "bias"] {
        float.insert(name.into(), named[name].clone());
    }
    for name in ["gate_up", "down", "shared_gate_up", "shared_down"] {
        let q = &named[name];
        float.insert(
            name.into(),
            Tensor::from_f32(q.shape(), &q.to_f32(), DType::BF16).unwrap(),
        );
    }
    let e = OPERATOR.run_named(g, &float, &params).unwrap_err();
    assert!(
        matches!(e, Error::Invalid { .. }) && e.to_string().contains("int8"),
        "{e}"
    );
}

#[test]
fn bad_input_is_refused_and_dispatches_nothing() {
    let g = gpu();
    let config = preset("pangu-pro-moe-small-w8a8");
    let layer = Layer::new(&config, 3, DType::BF16, 9);
    // Host: a NaN scale, an inf scale, a scale of the wrong length, float experts with scales.
    let refused = |w: QuantHostWeights, word: &str| {
        let e = quant::run_w8a8(g, &config, &layer.hidden, &w, DType::BF16, &DEFAULTS).unwrap_err();
        assert!(e.to_string().contains(word), "{e} does not name {word}");
        assert!(reference::layer(&config, &layer.hidden, &w, DType::BF16).is_err());
        e
    };
    for bad in [f32::NAN, f32::INFINITY] {
        let mut s = layer.down.scale.to_f32();
        s[5] = bad;
        let s = Tensor::f32(layer.down.scale.shape(), s).unwrap();
        let w = QuantHostWeights {
            down: QuantTensor {
                q: &layer.down.q,
                scale: &s,
            },
            ..layer.weights()
        };
        let e = refused(w, "down scale");
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
    }
    let short = Tensor::f32(&[64, 95], vec![0.01; 64 * 95]).unwrap();
    let w = QuantHostWeights {
        gate_up: QuantTensor {
            q: &layer.gate_up.q,
            scale: &short,
        },
        ..layer.weights()
    };
    let e = refused(w, "gate_up scale");
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let float =
        Tensor::from_f32(layer.down.q.shape(), &layer.down.q.to_f32(), DType::BF16).unwrap();
    let w = QuantHostWeights {
        down: QuantTensor {
            q: &float,
            scale: &layer.down.scale,
        },
        ..layer.weights()
    };
    let e = refused(w, "down weights");
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    // int8 experts for the 16-bit layer: refused with a pointer to W8A8.
    let e = moe::run(
        g,
        &config,
        &layer.hidden,
        &moe::HostWeights {
            gate: &layer.gate,
            bias: None,
            router_scale: layer.router_scale.as_ref(),
            gate_up: &layer.gate_up.q,
            down: &layer.down.q,
            shared: layer.shared.as_ref().map(|(a, b)| (&a.q, &b.q)),
        },
        DType::BF16,
        &DEFAULTS,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("W8A8"),
        "{e}"
    );
    // An intermediate size that is not a multiple of 4 (int8 rows hold whole words).
    let mut odd = config.clone();
    odd.intermediate = 46;
    let odd_layer = Layer::new(&odd, 3, DType::BF16, 10);
    let e = quant::run_w8a8(
        g,
        &odd,
        &odd_layer.hidden,
        &odd_layer.weights(),
        DType::BF16,
        &DEFAULTS,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("intermediate"),
        "{e}"
    );
    // Device: a scale of the wrong shape; the output stays as it was.
    let (hidden, w, out) = upload(g, &layer);
    let wrong_scale = QuantWeights::from_device(
        fusedops::ops::swiftgmm::ExpertWeights::upload(g, &layer.down.q).unwrap(),
        g.zeros(&[64, 96], DType::F32).unwrap(),
        None,
    )
    .unwrap();
    let bad = QuantMoeWeights {
        gate_up: &wrong_scale,
        ..w.weights()
    };
    let e = MoeLayer::new_w8a8(g, &config, &hidden, &bad, &out, &DEFAULTS).unwrap_err();
    assert!(e.to_string().contains("gate_up"), "{e}");
    g.wait().unwrap();
    assert_eq!(
        g.download_f32(&out).unwrap(),
        vec![1.5; 3 * 96],
        "out changed"
    );
}
