//! The MoE layer on the default adapter (lavapipe in CI), end to end against the CPU reference:
//! both presets' small variants at several token counts and dtypes, a single expert taking every
//! token, empty experts, t = 1, bf16 weights under f32 activations, padded dispatch blocks, forced
//! GEMV / GEMM paths, MoGE's zero imbalance, the steps of one submission, the fallback device, the
//! registry and `fusedops run` interfaces, and every error path (nothing dispatched, output
//! untouched).

mod common;

use common::{gpu, gpu_without, rng};
use fusedops::check::{Tolerance, compare};
use fusedops::error::Error;
use fusedops::gpu::{Feature, Gpu};
use fusedops::ops::merrouter::{
    self, GroupScore, IMBALANCE_TOLERANCE, RouterConfig, Scoring, Selection, WEIGHT_TOLERANCE,
};
use fusedops::ops::moe::{
    self, HostWeights, MoeConfig, MoeLayer, MoeOptions, MoeOutput, MoeWeights, OPERATOR, STEPS,
    SharedWeights,
    reference::{self, LayerRef},
};
use fusedops::ops::swiftgmm::{ExpertWeights, Layout, Mode, Tiling};
use fusedops::registry::{NamedTensors, Operator, Scale};
use fusedops::tensor::{DType, DeviceTensor, Tensor};
use rand::Rng;

const DEFAULTS: MoeOptions = MoeOptions {
    tiling: Tiling::Defaults,
    mode: Mode::Auto,
    max_workgroups: None,
};

/// A layer's host inputs: tie-free router inputs (exact gate logits, decisions clear of
/// near-ties, see `merrouter::tie_free_gate`), seeded weights scaled to keep values O(1).
struct Layer {
    config: MoeConfig,
    hidden: Tensor,
    gate: Tensor,
    bias: Option<Tensor>,
    router_scale: Option<Tensor>,
    gate_up: Tensor,
    down: Tensor,
    shared: Option<(Tensor, Tensor)>,
}

fn uniform(rng: &mut impl Rng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

impl Layer {
    /// Inputs for `config` with a bias (sigmoid routing) or a router scale (softmax routing).
    fn new(config: &MoeConfig, t: usize, act: DType, w: DType, seed: u64) -> Layer {
        let mut r = rng(seed);
        let e = config.router.experts;
        let sigmoid = config.router.scoring == Scoring::Sigmoid;
        let bias: Option<Vec<f32>> = sigmoid.then(|| uniform(&mut r, e, 0.1));
        let router_scale: Option<Vec<f32>> =
            (!sigmoid).then(|| (0..e).map(|_| r.random_range(0.5..1.5)).collect());
        Layer::with_router_inputs(config, t, act, w, seed, bias, router_scale)
    }

    fn with_router_inputs(
        config: &MoeConfig,
        t: usize,
        act: DType,
        w: DType,
        seed: u64,
        bias: Option<Vec<f32>>,
        router_scale: Option<Vec<f32>>,
    ) -> Layer {
        let mut r = rng(seed ^ 0x77);
        let (h, i, e) = (config.hidden, config.intermediate, config.router.experts);
        let bias64: Option<Vec<f64>> = bias.as_ref().map(|b| b.iter().map(|&v| v as f64).collect());
        let (hidden, gate) =
            merrouter::tie_free_gate(&config.router, t, h, bias64.as_deref(), seed).unwrap();
        let tensor = |shape: &[usize], values: &[f32], dtype| {
            Tensor::from_f32(shape, values, dtype).unwrap()
        };
        let mut expert = |experts: usize, inter: usize| {
            let gate_up_dims = config.gate_up_dims(inter);
            let down_dims = config.down_dims(inter);
            let gate_up_shape = [experts, gate_up_dims[0], gate_up_dims[1]];
            let down_shape = [experts, down_dims[0], down_dims[1]];
            let g = uniform(&mut r, experts * 2 * inter * h, (8.0 / h as f32).sqrt());
            let d = uniform(&mut r, experts * inter * h, (8.0 / inter as f32).sqrt());
            (tensor(&gate_up_shape, &g, w), tensor(&down_shape, &d, w))
        };
        let (gate_up, down) = expert(e, i);
        let shared = config.shared_intermediate.map(|is| expert(1, is));
        Layer {
            config: config.clone(),
            hidden: tensor(&[t, h], &hidden, act),
            gate: tensor(&[h, e], &gate, w),
            bias: bias.map(|b| Tensor::f32(&[e], b).unwrap()),
            router_scale: router_scale.map(|s| Tensor::f32(&[e], s).unwrap()),
            gate_up,
            down,
            shared,
        }
    }

    fn weights(&self) -> HostWeights<'_> {
        HostWeights {
            gate: &self.gate,
            bias: self.bias.as_ref(),
            router_scale: self.router_scale.as_ref(),
            gate_up: &self.gate_up,
            down: &self.down,
            shared: self.shared.as_ref().map(|(g, d)| (g, d)),
        }
    }

    fn run(&self, g: &Gpu, out: DType, options: &MoeOptions) -> MoeOutput {
        moe::run(g, &self.config, &self.hidden, &self.weights(), out, options)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn reference(&self, out: DType) -> LayerRef {
        reference::layer(&self.config, &self.hidden, &self.weights(), out).unwrap()
    }

    fn tolerance(&self, out: DType) -> Tolerance {
        moe::tolerance(self.hidden.dtype(), out)
    }
}

/// The GPU output and routing against the reference: out within the layer tolerance, ids exact,
/// weights and the layout as the router's own checks.
fn assert_matches(got: &MoeOutput, want: &LayerRef, tol: Tolerance, what: &str) {
    let shape = got.out.shape().to_vec();
    let c = compare(&got.out.to_f32(), &want.out, tol);
    assert!(c.pass, "{what}: out {}", c.summary(&shape));
    for checked in merrouter::check_router_output(&got.router, &want.routing, &want.layout) {
        assert!(
            checked.comparison.pass,
            "{what}: {} {}",
            checked.output,
            checked.comparison.summary(&checked.shape)
        );
    }
}

fn preset(name: &str) -> MoeConfig {
    MoeConfig::preset(name).unwrap()
}

#[test]
fn small_presets_match_the_reference() {
    let g = gpu();
    use DType::{BF16, F16, F32};
    // (preset, t, activations, weights, out, layout, shared expert)
    let table = [
        ("pangu-pro-moe-small", 1, BF16, BF16, BF16, Layout::Nk, true),
        ("pangu-pro-moe-small", 7, BF16, BF16, BF16, Layout::Nk, true),
        (
            "pangu-pro-moe-small",
            33,
            BF16,
            BF16,
            BF16,
            Layout::Kn,
            true,
        ),
        ("deepseek-v3-small", 1, BF16, BF16, BF16, Layout::Nk, true),
        ("deepseek-v3-small", 9, BF16, BF16, F32, Layout::Nk, true),
        ("deepseek-v3-small", 12, F32, F32, F32, Layout::Kn, false),
        ("deepseek-v3-small", 5, F16, F16, F16, Layout::Nk, true),
        ("pangu-pro-moe-small", 6, F32, BF16, F32, Layout::Nk, false),
    ];
    for (n, &(name, t, act, w, out, layout, shared)) in table.iter().enumerate() {
        let mut config = preset(name);
        config.layout = layout;
        if !shared {
            config.shared_intermediate = None;
        }
        let layer = Layer::new(&config, t, act, w, 100 + n as u64);
        let what = format!("{name} t={t} {act}/{w}/{out} {layout:?} shared={shared}");
        let got = layer.run(g, out, &DEFAULTS);
        assert_eq!(got.out.dtype(), out, "{what}");
        assert_matches(&got, &layer.reference(out), layer.tolerance(out), &what);
    }
}

#[test]
fn one_token_leaves_most_experts_empty() {
    let g = gpu();
    for name in ["pangu-pro-moe-small", "deepseek-v3-small"] {
        let config = preset(name);
        let layer = Layer::new(&config, 1, DType::BF16, DType::BF16, 7);
        let got = layer.run(g, DType::BF16, &DEFAULTS);
        let counts = got.router.layout.counts.as_i32().unwrap();
        let empty = counts.iter().filter(|&&c| c == 0).count();
        assert_eq!(empty, config.router.experts - config.router.top_k, "{name}");
        assert_matches(
            &got,
            &layer.reference(DType::BF16),
            layer.tolerance(DType::BF16),
            name,
        );
    }
}

/// One expert of four takes every token (a bias of +5 decides); the other three get none.
#[test]
fn a_single_expert_takes_every_token() {
    let g = gpu();
    let router = RouterConfig {
        experts: 4,
        groups: 1,
        top_k: 1,
        scoring: Scoring::Sigmoid,
        selection: Selection::GroupLimited {
            k_group: 1,
            group_score: GroupScore::Max,
        },
        renormalize: false,
        routed_scaling_factor: 1.0,
        block_size: 1,
    };
    let config = MoeConfig {
        router,
        hidden: 40,
        intermediate: 24,
        shared_intermediate: Some(16),
        layout: Layout::Nk,
    };
    for t in [1, 20] {
        let layer = Layer::with_router_inputs(
            &config,
            t,
            DType::BF16,
            DType::BF16,
            11,
            Some(vec![0.0, 0.0, 5.0, 0.0]),
            None,
        );
        let got = layer.run(g, DType::BF16, &DEFAULTS);
        assert_eq!(
            got.router.layout.counts.as_i32().unwrap(),
            &[0, 0, t as i32, 0]
        );
        assert!(
            got.router
                .topk_ids
                .as_i32()
                .unwrap()
                .iter()
                .all(|&x| x == 2)
        );
        assert_matches(
            &got,
            &layer.reference(DType::BF16),
            layer.tolerance(DType::BF16),
            &format!("single expert t={t}"),
        );
    }
}

#[test]
fn moge_routing_has_zero_imbalance() {
    let g = gpu();
    let t = 33;
    let pangu = Layer::new(
        &preset("pangu-pro-moe-small"),
        t,
        DType::BF16,
        DType::BF16,
        21,
    );
    let got = pangu.run(g, DType::BF16, &DEFAULTS);
    let layout = &got.router.layout;
    assert_eq!(layout.imbalance.as_f32().unwrap(), &[0.0]);
    assert!(
        layout
            .group_loads
            .as_i32()
            .unwrap()
            .iter()
            .all(|&l| l == t as i32),
        "every group gets one slot of every token"
    );
    // The figure is not zero by construction: group-limited routing is not balanced.
    let deepseek = Layer::new(
        &preset("deepseek-v3-small"),
        t,
        DType::BF16,
        DType::BF16,
        22,
    );
    let got = deepseek.run(g, DType::BF16, &DEFAULTS);
    let want = deepseek.reference(DType::BF16);
    assert!(want.layout.imbalance > 0.0);
    let c = compare(
        got.router.layout.imbalance.as_f32().unwrap(),
        &[want.layout.imbalance],
        IMBALANCE_TOLERANCE,
    );
    assert!(c.pass, "{}", c.summary(&[1]));
}

/// The device API over a padded dispatch (block size 16): padding rows of the gathered inputs
/// and their routing weights are zero, and the output still matches.
#[test]
fn padded_dispatch_rows_are_zero() {
    let g = gpu();
    let mut config = preset("deepseek-v3-small");
    config.router.block_size = 16;
    let t = 9;
    let layer = Layer::new(&config, t, DType::BF16, DType::BF16, 31);
    let want = layer.reference(DType::BF16);
    let upload = |t: &Tensor| g.upload(t).unwrap();
    let hidden = upload(&layer.hidden);
    let gate = upload(&layer.gate);
    let bias = layer.bias.as_ref().map(upload);
    let gate_up = ExpertWeights::upload(g, &layer.gate_up).unwrap();
    let down = ExpertWeights::upload(g, &layer.down).unwrap();
    let (sg, sd) = layer.shared.as_ref().unwrap();
    let (shared_gate_up, shared_down) = (
        ExpertWeights::upload(g, sg).unwrap(),
        ExpertWeights::upload(g, sd).unwrap(),
    );
    let out = g.zeros(&[t, config.hidden], DType::BF16).unwrap();
    let weights = MoeWeights {
        gate: &gate,
        bias: bias.as_ref(),
        router_scale: None,
        gate_up: &gate_up,
        down: &down,
        shared: Some(SharedWeights {
            gate_up: &shared_gate_up,
            down: &shared_down,
        }),
    };
    let moe = MoeLayer::new(g, &config, &hidden, &weights, &out, &DEFAULTS).unwrap();
    g.run(|rec| moe.record(rec)).unwrap();
    let got = MoeOutput {
        out: g.download(&out).unwrap(),
        router: moe.router().download(g).unwrap(),
    };
    assert_matches(&got, &want, layer.tolerance(DType::BF16), "block 16");

    // t·k = 72 < e = 256: at most 72 experts receive a row, so vLLM's bound t·k·block holds.
    let rows = config.rows(t).unwrap();
    assert_eq!(rows, t * 8 * 16);
    let slots = want.layout.sorted_slots.clone();
    let x = g.download_f32(&moe.intermediates().x_sorted).unwrap();
    let w = g.download_f32(&moe.intermediates().row_weights).unwrap();
    let h = config.hidden;
    let hidden_values = layer.hidden.to_f32();
    let gpu_weights = got.router.topk_weights.to_f32();
    for (row, &slot) in slots.iter().enumerate() {
        let x_row = &x[row * h..(row + 1) * h];
        if slot as usize == t * 8 {
            assert!(x_row.iter().all(|&v| v == 0.0), "padding row {row}");
            assert_eq!(w[row], 0.0);
        } else {
            let token = slot as usize / 8;
            assert_eq!(
                x_row,
                &hidden_values[token * h..(token + 1) * h],
                "row {row}"
            );
            // A copy of the routing weight the GPU computed.
            assert_eq!(w[row], gpu_weights[slot as usize], "row {row}");
        }
    }
}

/// Every token on the same 8 experts (hot experts by bias), through forced GEMV, forced GEMM and
/// the automatic choice: all agree with the reference.
#[test]
fn forced_paths_agree() {
    let g = gpu();
    let config = preset("deepseek-v3-small");
    let mut bias = vec![0.0f32; 256];
    for (j, x) in [1usize, 8, 33, 40, 65, 72, 97, 104].into_iter().enumerate() {
        bias[x] = 1.0 + 0.01 * j as f32;
    }
    let t = 20;
    let layer =
        Layer::with_router_inputs(&config, t, DType::BF16, DType::BF16, 41, Some(bias), None);
    let want = layer.reference(DType::BF16);
    let active = want.layout.counts.iter().filter(|&&c| c > 0).count();
    assert_eq!(active, 8);
    for mode in [Mode::Gemv, Mode::Gemm, Mode::Auto] {
        let options = MoeOptions { mode, ..DEFAULTS };
        let got = layer.run(g, DType::BF16, &options);
        assert_matches(
            &got,
            &want,
            layer.tolerance(DType::BF16),
            &format!("{mode:?}"),
        );
    }
    // A persistent grid of two workgroups per path loops over every tile.
    let options = MoeOptions {
        max_workgroups: Some(2),
        ..DEFAULTS
    };
    let got = layer.run(g, DType::BF16, &options);
    assert_matches(&got, &want, layer.tolerance(DType::BF16), "two workgroups");
}

/// The device inputs and weights of a layer, uploaded.
struct DeviceLayer {
    hidden: DeviceTensor,
    gate: DeviceTensor,
    bias: Option<DeviceTensor>,
    router_scale: Option<DeviceTensor>,
    gate_up: ExpertWeights,
    down: ExpertWeights,
    shared: Option<(ExpertWeights, ExpertWeights)>,
}

impl DeviceLayer {
    fn upload(g: &Gpu, layer: &Layer) -> DeviceLayer {
        let upload = |t: &Tensor| g.upload(t).unwrap();
        DeviceLayer {
            hidden: upload(&layer.hidden),
            gate: upload(&layer.gate),
            bias: layer.bias.as_ref().map(upload),
            router_scale: layer.router_scale.as_ref().map(upload),
            gate_up: ExpertWeights::upload(g, &layer.gate_up).unwrap(),
            down: ExpertWeights::upload(g, &layer.down).unwrap(),
            shared: layer.shared.as_ref().map(|(gu, d)| {
                (
                    ExpertWeights::upload(g, gu).unwrap(),
                    ExpertWeights::upload(g, d).unwrap(),
                )
            }),
        }
    }

    fn weights(&self) -> MoeWeights<'_> {
        MoeWeights {
            gate: &self.gate,
            bias: self.bias.as_ref(),
            router_scale: self.router_scale.as_ref(),
            gate_up: &self.gate_up,
            down: &self.down,
            shared: self
                .shared
                .as_ref()
                .map(|(gate_up, down)| SharedWeights { gate_up, down }),
        }
    }
}

/// The whole layer is one recording: its compute passes are the named steps, timed per pass, and
/// recording twice into one command buffer gives the same output.
#[test]
fn one_submission_with_named_steps() {
    let g = gpu();
    for shared in [true, false] {
        let mut config = preset("pangu-pro-moe-small");
        if !shared {
            config.shared_intermediate = None;
        }
        let t = 5;
        let layer = Layer::new(&config, t, DType::BF16, DType::BF16, 51);
        let dev = DeviceLayer::upload(g, &layer);
        let out = g.zeros(&[t, config.hidden], DType::BF16).unwrap();
        let moe = MoeLayer::new(g, &config, &dev.hidden, &dev.weights(), &out, &DEFAULTS).unwrap();
        let timing = g.time(0, 2, |rec| moe.record(rec)).unwrap();
        let want: Vec<&str> = if shared {
            STEPS.to_vec()
        } else {
            STEPS
                .iter()
                .copied()
                .filter(|s| !s.contains("shared"))
                .collect()
        };
        assert_eq!(timing.pass_labels, want);
        assert_eq!(moe.steps(), want);
        if g.caps.timestamps {
            assert_eq!(timing.pass_median_ns.len(), want.len());
        }
        g.run(|rec| {
            moe.record(rec)?;
            moe.record(rec)
        })
        .unwrap();
        let got = MoeOutput {
            out: g.download(&out).unwrap(),
            router: moe.router().download(g).unwrap(),
        };
        assert_matches(
            &got,
            &layer.reference(DType::BF16),
            layer.tolerance(DType::BF16),
            &format!("shared={shared}"),
        );
    }
}

/// The expert matmuls take SwiftGMM's GEMM kernel for the adapter: cooperative matrices on the
/// coop lane (asserted there), SIMT elsewhere; forced GEMM puts the routed and the shared experts
/// on it, and the layer still matches the reference.
#[test]
fn expert_matmuls_run_on_the_adapters_gemm_kernel() {
    let g = gpu();
    let config = preset("pangu-pro-moe-small");
    let t = 9;
    let layer = Layer::new(&config, t, DType::BF16, DType::BF16, 71);
    let dev = DeviceLayer::upload(g, &layer);
    let out = g.zeros(&[t, config.hidden], DType::BF16).unwrap();
    let options = MoeOptions {
        mode: Mode::Gemm,
        ..DEFAULTS
    };
    let moe = MoeLayer::new(g, &config, &dev.hidden, &dev.weights(), &out, &options).unwrap();
    let kernel = match common::coop_fragment() {
        Some(fragment) => format!("gemm coop{}", fragment.name()),
        None => "gemm simt".to_string(),
    };
    let variant = moe.variant();
    assert_eq!(variant.matches(&kernel).count(), 4, "{variant}");
    g.run(|rec| moe.record(rec)).unwrap();
    let got = MoeOutput {
        out: g.download(&out).unwrap(),
        router: moe.router().download(g).unwrap(),
    };
    assert_matches(
        &got,
        &layer.reference(DType::BF16),
        layer.tolerance(DType::BF16),
        &variant,
    );
}

/// The router's workgroup-memory reductions and no f16 arithmetic: the same results.
#[test]
fn fallback_device_gives_the_same_result() {
    let g = gpu_without(&[Feature::Subgroups, Feature::ShaderF16]);
    assert!(!g.caps.subgroups && !g.caps.shader_f16);
    for name in ["pangu-pro-moe-small", "deepseek-v3-small"] {
        let layer = Layer::new(&preset(name), 9, DType::BF16, DType::BF16, 61);
        let got = layer.run(&g, DType::BF16, &DEFAULTS);
        assert_matches(
            &got,
            &layer.reference(DType::BF16),
            layer.tolerance(DType::BF16),
            name,
        );
    }
    let variant = OPERATOR.paths(&g);
    assert!(
        variant
            .iter()
            .any(|(what, how)| what == "routing reductions" && how == "workgroup memory"),
        "{variant:?}"
    );
}

#[test]
fn registry_cases_and_their_baseline_pass() {
    let g = gpu();
    // The 16-bit cases (the W8A8 ones, without a baseline, are in tests/moe_quant.rs).
    let cases: Vec<_> = OPERATOR
        .cases(Scale::Ci, g)
        .into_iter()
        .filter(|c| {
            c.info()
                .params
                .iter()
                .any(|(k, v)| k == "quant" && v == "none")
        })
        .collect();
    assert!(cases.len() >= 5);
    for case in cases {
        let info = case.info();
        assert!(
            info.params.iter().any(|(k, _)| k == "tokens"),
            "{}",
            info.name
        );
        assert!(case.bytes() > 0 && case.flops() > 0);
        let prepared = case.prepare(g).unwrap();
        for record_baseline in [false, true] {
            g.run(|rec| {
                if record_baseline {
                    prepared.record_baseline(rec)
                } else {
                    prepared.record(rec)
                }
            })
            .unwrap();
            let checks = prepared.verify().unwrap();
            assert!(checks.len() >= 10);
            for c in checks {
                assert!(
                    c.comparison.pass,
                    "{} (baseline {record_baseline}) {}: {}",
                    info.name,
                    c.output,
                    c.comparison.summary(&c.shape)
                );
            }
        }
        assert!(prepared.baseline().unwrap().contains("per-expert"));
    }
}

#[test]
fn run_named_matches_reference_named() {
    let g = gpu();
    let config = preset("deepseek-v3-small");
    let layer = Layer::new(&config, 6, DType::BF16, DType::BF16, 71);
    let (sg, sd) = layer.shared.clone().unwrap();
    let inputs = NamedTensors::from([
        ("hidden".to_string(), layer.hidden.clone()),
        ("gate_weight".to_string(), layer.gate.clone()),
        ("bias".to_string(), layer.bias.clone().unwrap()),
        ("gate_up".to_string(), layer.gate_up.clone()),
        ("down".to_string(), layer.down.clone()),
        ("shared_gate_up".to_string(), sg),
        ("shared_down".to_string(), sd),
    ]);
    let params = serde_json::json!({"preset": "deepseek-v3", "tiling": "defaults"});
    let got = OPERATOR.run_named(g, &inputs, &params).unwrap();
    let want = OPERATOR.reference_named(&inputs, &params).unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in &want {
        let c = compare(
            &got[name].to_f64(),
            &w.to_f64(),
            OPERATOR.tolerance(name, &inputs, &params),
        );
        assert!(c.pass, "{name}: {}", c.summary(w.shape()));
    }
    assert_eq!(
        OPERATOR.tolerance("topk_weights", &inputs, &params),
        WEIGHT_TOLERANCE
    );
    // Half a shared expert is refused.
    let mut partial = inputs.clone();
    partial.remove("shared_down");
    assert!(matches!(
        OPERATOR.run_named(g, &partial, &params),
        Err(Error::Invalid { .. })
    ));
    let bad = serde_json::json!({"preset": "deepseek-v3", "colour": "blue"});
    assert!(OPERATOR.run_named(g, &inputs, &bad).is_err());
}

/// Bad input: a typed error before anything is compiled or dispatched, the output untouched.
#[test]
fn bad_input_is_refused_and_dispatches_nothing() {
    let g = gpu_without(&[]);
    let config = preset("deepseek-v3-small");
    let (t, h) = (4, config.hidden);
    let layer = Layer::new(&config, t, DType::BF16, DType::BF16, 81);
    let dev = DeviceLayer::upload(&g, &layer);
    let before = g.cached_pipelines();
    let pattern = Tensor::from_f32(&[t, h], &vec![3.0; t * h], DType::BF16).unwrap();
    let out = g.upload(&pattern).unwrap();
    let zeros = |shape: &[usize], dtype| g.zeros(shape, dtype).unwrap();
    let weights = dev.weights();
    let refuse = |what: &str,
                  config: &MoeConfig,
                  hidden: &DeviceTensor,
                  weights: &MoeWeights,
                  out: &DeviceTensor,
                  expected: fn(&Error) -> bool| {
        match MoeLayer::new(&g, config, hidden, weights, out, &DEFAULTS) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => assert!(expected(&e), "{what}: wrong error {e}"),
        }
    };
    let shape = |e: &Error| matches!(e, Error::Shape { .. });
    let invalid = |e: &Error| matches!(e, Error::Invalid { .. });
    let unsupported = |e: &Error| matches!(e, Error::Unsupported { .. });
    let limit = |e: &Error| matches!(e, Error::Limit { .. });

    let wide = zeros(&[t, h + 2], DType::BF16);
    refuse("hidden width", &config, &wide, &weights, &out, shape);
    let ints = zeros(&[t, h], DType::I32);
    refuse(
        "integer hidden",
        &config,
        &ints,
        &weights,
        &out,
        unsupported,
    );
    let empty = zeros(&[0, h], DType::BF16);
    refuse("no tokens", &config, &empty, &weights, &out, shape);

    let short_gate = zeros(&[h, 255], DType::BF16);
    let w = MoeWeights {
        gate: &short_gate,
        ..weights
    };
    refuse("gate shape", &config, &dev.hidden, &w, &out, shape);
    let short_bias = zeros(&[255], DType::F32);
    let w = MoeWeights {
        bias: Some(&short_bias),
        ..weights
    };
    refuse("bias length", &config, &dev.hidden, &w, &out, shape);
    let scale_i32 = zeros(&[256], DType::I32);
    let w = MoeWeights {
        router_scale: Some(&scale_i32),
        ..weights
    };
    refuse("router scale dtype", &config, &dev.hidden, &w, &out, shape);

    // Expert weights: the down weights in the gate/up slot, too few experts, the other layout.
    let w = MoeWeights {
        gate_up: &dev.down,
        ..weights
    };
    refuse("gate_up shape", &config, &dev.hidden, &w, &out, shape);
    let few = ExpertWeights::from_device(zeros(&[255, 2 * 48, h], DType::BF16)).unwrap();
    let w = MoeWeights {
        gate_up: &few,
        ..weights
    };
    refuse("gate_up experts", &config, &dev.hidden, &w, &out, shape);
    let mut kn = config.clone();
    kn.layout = Layout::Kn;
    refuse("layout", &kn, &dev.hidden, &weights, &out, shape);
    let int_down = ExpertWeights::from_device(zeros(&[256, h, 48], DType::I32));
    assert!(matches!(int_down, Err(Error::Unsupported { .. })));

    // The shared expert must match the config.
    let w = MoeWeights {
        shared: None,
        ..weights
    };
    refuse(
        "missing shared expert",
        &config,
        &dev.hidden,
        &w,
        &out,
        invalid,
    );
    let mut no_shared = config.clone();
    no_shared.shared_intermediate = None;
    refuse(
        "unexpected shared expert",
        &no_shared,
        &dev.hidden,
        &weights,
        &out,
        invalid,
    );
    let mut bigger_shared = config.clone();
    bigger_shared.shared_intermediate = Some(64);
    refuse(
        "shared size",
        &bigger_shared,
        &dev.hidden,
        &weights,
        &out,
        shape,
    );

    // Config and output.
    let mut moge_k = config.clone();
    moge_k.router.selection = Selection::Moge;
    moge_k.router.top_k = 12;
    refuse(
        "router config",
        &moge_k,
        &dev.hidden,
        &weights,
        &out,
        invalid,
    );
    let mut zero = config.clone();
    zero.intermediate = 0;
    refuse(
        "zero intermediate",
        &zero,
        &dev.hidden,
        &weights,
        &out,
        invalid,
    );
    let long_out = zeros(&[t + 1, h], DType::BF16);
    refuse(
        "out shape",
        &config,
        &dev.hidden,
        &weights,
        &long_out,
        shape,
    );
    let int_out = zeros(&[t, h], DType::U32);
    refuse(
        "out dtype",
        &config,
        &dev.hidden,
        &weights,
        &int_out,
        unsupported,
    );

    // More dispatch rows than one binding holds (t·k rows of h bf16 values).
    let rows_limit = g.caps.max_storage_binding / (2 * h as u64 * 8) + 1;
    if rows_limit < 200_000 {
        let huge = zeros(&[rows_limit as usize, h], DType::BF16);
        let huge_out = zeros(&[rows_limit as usize, h], DType::BF16);
        refuse("binding limit", &config, &huge, &weights, &huge_out, limit);
    }

    assert_eq!(
        g.cached_pipelines(),
        before,
        "a refused layer compiled a kernel"
    );
    assert_eq!(
        g.download(&out).unwrap(),
        pattern,
        "a refused layer wrote out"
    );

    // The host convenience refuses before uploading or compiling anything.
    let mut host_weights = layer.weights();
    let odd_down = Tensor::zeros(&[256, h, 47], DType::BF16).unwrap();
    host_weights.down = &odd_down;
    assert!(matches!(
        moe::run(
            &g,
            &config,
            &layer.hidden,
            &host_weights,
            DType::BF16,
            &DEFAULTS
        ),
        Err(Error::Shape { .. })
    ));
    let flat = Tensor::zeros(&[256 * h * 48], DType::BF16).unwrap();
    host_weights.down = &flat;
    assert!(matches!(
        moe::run(
            &g,
            &config,
            &layer.hidden,
            &host_weights,
            DType::BF16,
            &DEFAULTS
        ),
        Err(Error::Shape { .. })
    ));
    assert_eq!(
        g.cached_pipelines(),
        before,
        "a refused run compiled a kernel"
    );
}

/// Serving loops call the layer with empty batches (vLLM returns an empty output): t = 0 gives
/// out [0, h] and an empty routing, and the layer records nothing.
#[test]
fn empty_batch_gives_empty_outputs_and_dispatches_nothing() {
    let g = gpu();
    for name in ["deepseek-v3-small", "pangu-pro-moe-small"] {
        let config = preset(name);
        let (h, k) = (config.hidden, config.router.top_k);
        let layer = Layer::new(&config, 0, DType::BF16, DType::BF16, 91);
        assert_eq!(layer.hidden.shape(), &[0, h]);
        let got = layer.run(g, DType::BF16, &DEFAULTS);
        assert_eq!(got.out.shape(), &[0, h], "{name}");
        assert_eq!(got.router.topk_ids.shape(), &[0, k], "{name}");
        assert!(got.router.layout.counts.to_f32().iter().all(|&c| c == 0.0));
        let want = layer.reference(DType::BF16);
        assert!(want.out.is_empty() && want.routing.ids.is_empty());

        let dev = DeviceLayer::upload(g, &layer);
        let out = g.zeros(&[0, h], DType::F32).unwrap();
        let moe = MoeLayer::new(g, &config, &dev.hidden, &dev.weights(), &out, &DEFAULTS).unwrap();
        assert!(moe.steps().is_empty(), "{name}: {:?}", moe.steps());
        let offsets = vec![0u32; config.router.experts + 1];
        let chain = moe
            .per_expert_baseline(g, &dev.weights(), &offsets, &DEFAULTS)
            .unwrap();
        assert_eq!(chain.dispatches(), 0);
        let mut encoder = g.device.create_command_encoder(&Default::default());
        let mut rec = fusedops::gpu::Recorder::new(&mut encoder);
        moe.record(&mut rec).unwrap();
        moe.record_baseline(&mut rec, &chain).unwrap();
        assert!(rec.pass_labels().is_empty(), "{name}: recorded a pass");
    }
}

/// 16-bit layer outputs of odd row length (torch has no such limit): with f32 activations the
/// combine writes out [t, h] bf16 / f16 for odd h, one 32-bit word per invocation (two
/// neighbouring elements, possibly of two tokens), so no two invocations share a word.
#[test]
fn odd_hidden_size_with_16_bit_output() {
    let g = gpu();
    for (n, (h, out)) in [(45, DType::BF16), (33, DType::F16), (3, DType::BF16)]
        .into_iter()
        .enumerate()
    {
        let mut config = preset("deepseek-v3-small");
        config.hidden = h;
        let layer = Layer::new(&config, 5, DType::F32, DType::BF16, 120 + n as u64);
        let what = format!("h={h} out {out}");
        let got = layer.run(g, out, &DEFAULTS);
        assert_eq!(
            (got.out.shape(), got.out.dtype()),
            (&[5, h][..], out),
            "{what}"
        );
        assert_matches(&got, &layer.reference(out), layer.tolerance(out), &what);
    }
}

/// A small router for odd sizes: 8 experts in 2 groups, top-2 of the best group, sigmoid with a
/// bias, renormalised and scaled, block size 4 (so every group has padding rows and the dispatch
/// ends in sentinel rows).
fn small_router() -> RouterConfig {
    RouterConfig {
        experts: 8,
        groups: 2,
        top_k: 2,
        scoring: Scoring::Sigmoid,
        selection: Selection::GroupLimited {
            k_group: 1,
            group_score: GroupScore::SumTop2,
        },
        renormalize: true,
        routed_scaling_factor: 2.5,
        block_size: 4,
    }
}

/// Rows of a dispatch-order tensor `[rows, cols]` that hold a sentinel slot (padding, or past the
/// routed total) are zero; `what` names the tensor.
fn assert_sentinel_rows_zero(values: &[f32], cols: usize, slots: &[i32], tk: usize, what: &str) {
    for (row, &slot) in slots.iter().enumerate() {
        if slot < 0 || slot as usize >= tk {
            let r = &values[row * cols..(row + 1) * cols];
            assert!(
                r.iter().all(|&v| v == 0.0),
                "{what}: sentinel row {row} {r:?}"
            );
        }
    }
}

/// 16-bit activations with odd `h`, `i` and shared intermediate (torch has no even-length limit):
/// each of 1, 3, 33 and 45 in every position, f16 and bf16, both layouts, with and without the
/// shared expert, through GEMV, GEMM (cooperative matrices on the coop lane) and the automatic
/// choice. Odd 16-bit rows share 32-bit words with their neighbours: the whole layer matches the
/// reference, gathered rows are exact copies of their tokens' rows, and every sentinel row of the
/// gathered inputs, the intermediate and the expert outputs is still zero (no write leaked across
/// a row boundary).
#[test]
fn odd_sizes_with_16_bit_activations() {
    let g = gpu();
    use DType::{BF16, F16, F32};
    use Layout::{Kn, Nk};
    // (h, i, shared intermediate, activations = weights, out, layout, mode, t)
    let table = [
        (1, 3, Some(33), F16, F16, Nk, Mode::Gemm, 5),
        (3, 45, Some(1), BF16, BF16, Kn, Mode::Gemv, 3),
        (33, 1, Some(45), F16, F32, Kn, Mode::Auto, 9),
        (45, 33, Some(3), BF16, BF16, Nk, Mode::Gemm, 7),
        (1, 3, Some(33), BF16, F16, Kn, Mode::Gemv, 4),
        (3, 45, Some(1), F16, F16, Nk, Mode::Gemm, 6),
        (33, 1, Some(45), BF16, BF16, Nk, Mode::Gemv, 11),
        (45, 33, Some(3), F16, F16, Kn, Mode::Gemm, 1),
        (33, 45, None, F16, BF16, Nk, Mode::Gemm, 8),
        (45, 3, None, BF16, BF16, Kn, Mode::Auto, 10),
    ];
    for (n, &(h, i, shared_i, act, out_dtype, layout, mode, t)) in table.iter().enumerate() {
        let config = MoeConfig {
            router: small_router(),
            hidden: h,
            intermediate: i,
            shared_intermediate: shared_i,
            layout,
        };
        let what =
            format!("h={h} i={i} is={shared_i:?} {act}->{out_dtype} {layout:?} {mode:?} t={t}");
        let layer = Layer::new(&config, t, act, act, 150 + n as u64);
        let dev = DeviceLayer::upload(g, &layer);
        let out = g.zeros(&[t, h], out_dtype).unwrap();
        let options = MoeOptions { mode, ..DEFAULTS };
        let moe = MoeLayer::new(g, &config, &dev.hidden, &dev.weights(), &out, &options)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if mode == Mode::Gemm {
            let kernel = match common::coop_fragment() {
                Some(fragment) => format!("gemm coop{}", fragment.name()),
                None => "gemm simt".to_string(),
            };
            let matmuls = if shared_i.is_some() { 4 } else { 2 };
            let variant = moe.variant();
            assert_eq!(
                variant.matches(&kernel).count(),
                matmuls,
                "{what}: {variant}"
            );
        }
        g.run(|rec| moe.record(rec)).unwrap();
        let got = MoeOutput {
            out: g.download(&out).unwrap(),
            router: moe.router().download(g).unwrap(),
        };
        assert_eq!((got.out.shape(), got.out.dtype()), (&[t, h][..], out_dtype));
        assert_matches(
            &got,
            &layer.reference(out_dtype),
            moe::tolerance(act, out_dtype),
            &what,
        );

        let m = moe.intermediates();
        let slots = got.router.layout.sorted_slots.as_i32().unwrap();
        let tk = t * config.router.top_k;
        assert_eq!(slots.len(), config.rows(t).unwrap());
        assert!(
            slots.iter().any(|&s| s as usize == tk),
            "{what}: no sentinel row"
        );
        let x = g.download_f32(&m.x_sorted).unwrap();
        let hidden = layer.hidden.to_f32();
        for (row, &slot) in slots.iter().enumerate() {
            if (slot as usize) < tk {
                let token = slot as usize / config.router.top_k;
                assert_eq!(
                    &x[row * h..(row + 1) * h],
                    &hidden[token * h..(token + 1) * h],
                    "{what}: gathered row {row}"
                );
            }
        }
        assert_sentinel_rows_zero(&x, h, slots, tk, &format!("{what}: x_sorted"));
        let w = g.download_f32(&m.row_weights).unwrap();
        assert_sentinel_rows_zero(&w, 1, slots, tk, &format!("{what}: row_weights"));
        let inter = g.download_f32(&m.intermediate).unwrap();
        assert_sentinel_rows_zero(&inter, i, slots, tk, &format!("{what}: intermediate"));
        let y = g.download_f32(&m.expert_out).unwrap();
        assert_sentinel_rows_zero(&y, h, slots, tk, &format!("{what}: expert_out"));
    }
}

/// sglang's DeepSeek-V3 tests give the correction bias in bf16: the layer routes with it as the
/// router does (widened exactly), and a 16-bit router scale likewise.
#[test]
fn bias_and_router_scale_in_16_bits() {
    let g = gpu();
    let config = preset("deepseek-v3-small");
    let e = config.router.experts;
    let mut r = rng(130);
    let bias: Vec<f32> = uniform(&mut r, e, 0.1)
        .iter()
        .map(|&b| DType::BF16.round(b))
        .collect();
    let scale: Vec<f32> = (0..e)
        .map(|_| DType::F16.round(r.random_range(0.5..1.5)))
        .collect();
    let mut layer = Layer::with_router_inputs(
        &config,
        6,
        DType::BF16,
        DType::BF16,
        131,
        Some(bias.clone()),
        None,
    );
    layer.bias = Some(Tensor::from_f32(&[e], &bias, DType::BF16).unwrap());
    layer.router_scale = Some(Tensor::from_f32(&[e], &scale, DType::F16).unwrap());
    let got = layer.run(g, DType::BF16, &DEFAULTS);
    let what = "bf16 bias, f16 router scale";
    assert_matches(
        &got,
        &layer.reference(DType::BF16),
        layer.tolerance(DType::BF16),
        what,
    );
}

/// The public reference validates like the layer: a routing for fewer tokens than hidden has, ids
/// out of range, or experts that do not match the config are errors, not index panics.
#[test]
fn token_outputs_refuses_a_routing_of_other_tokens() {
    let config = preset("deepseek-v3-small");
    let layer = Layer::new(&config, 4, DType::F32, DType::F32, 140);
    let want = layer.reference(DType::F32);
    let experts = reference::Experts::of(&layer.weights());
    let tokens = [0, 3];
    let ok = reference::token_outputs(
        &config,
        &layer.hidden,
        &want.routing,
        &experts,
        &tokens,
        DType::F32,
    )
    .unwrap();
    assert_eq!(ok.len(), 2 * config.hidden);
    let mut short = want.routing.clone();
    short.ids.truncate(2 * 8);
    short.weights.truncate(2 * 8);
    let mut bad_id = want.routing.clone();
    bad_id.ids[5] = 256;
    for (what, routing, tokens) in [
        ("routing for 2 of 4 tokens", &short, &tokens[..]),
        ("expert id 256", &bad_id, &tokens[..]),
        ("token past hidden", &want.routing, &[4][..]),
    ] {
        let err = reference::token_outputs(
            &config,
            &layer.hidden,
            routing,
            &experts,
            tokens,
            DType::F32,
        );
        assert!(err.is_err(), "{what}");
    }
    let mut other = config.clone();
    other.shared_intermediate = None;
    assert!(
        reference::token_outputs(
            &other,
            &layer.hidden,
            &want.routing,
            &experts,
            &tokens,
            DType::F32
        )
        .is_err(),
        "shared expert the config does not have"
    );
}
