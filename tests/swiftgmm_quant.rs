//! SwiftGMM with int8 weights (W8A16, W8A8) against the CPU reference on the default adapter:
//! both layouts, both paths forced and automatic, SwiGLU and row scale, offsets, every output
//! dtype, unaligned k and n, empty and one-row experts, weight shards; W8A8 sums exact against
//! integer arithmetic (values at ±127 and k large enough that f32 sums would round); the chain
//! quantize → W8A8 in one command buffer; the registry cases and `fusedops run`; every error path.

mod common;

use common::gpu;
use fusedops::check::{Tolerance, compare};
use fusedops::error::Error;
use fusedops::gpu::Gpu;
use fusedops::ops::quantize::{self, QuantizePlan};
use fusedops::ops::swiftgmm::quant::{
    self, Quant, QuantGmmArgs, QuantInputs, QuantWeights, QuantX, reference,
};
use fusedops::ops::swiftgmm::{
    self, Activation, DeviceGroups, GmmPlan, Groups, Layout, Mode, Options, Tiling,
};
use fusedops::registry::{NamedTensors, Operator, Scale};
use fusedops::tensor::{DType, Tensor};
use rand::Rng;

/// A quantized problem.
#[derive(Clone)]
struct Spec {
    quant: Quant,
    experts: usize,
    k: usize,
    n: usize,
    counts: Vec<u32>,
    layout: Layout,
    activation: Activation,
    x_dtype: DType,
    out_dtype: DType,
    row_scale: bool,
    offset: bool,
    mode: Mode,
}

impl Spec {
    fn new(quant: Quant, experts: usize, k: usize, n: usize, counts: &[u32]) -> Self {
        assert_eq!(counts.len(), experts);
        Spec {
            quant,
            experts,
            k,
            n,
            counts: counts.to_vec(),
            layout: Layout::Nk,
            activation: Activation::None,
            x_dtype: DType::BF16,
            out_dtype: DType::F32,
            row_scale: false,
            offset: false,
            mode: Mode::Auto,
        }
    }

    fn m_total(&self) -> usize {
        self.counts.iter().map(|&c| c as usize).sum()
    }

    fn options(&self) -> Options {
        Options {
            layout: self.layout,
            activation: self.activation,
            out_dtype: self.out_dtype,
            mode: self.mode,
            tiling: Tiling::Defaults,
            ..Options::default()
        }
    }
}

/// Host tensors of a spec.
struct Host {
    x: Tensor,
    x_scale: Option<Tensor>,
    groups: Groups,
    w: Tensor,
    w_scale: Tensor,
    w_offset: Option<Tensor>,
    row_scale: Option<Tensor>,
}

impl Host {
    fn inputs(&self) -> QuantInputs<'_> {
        QuantInputs {
            x: &self.x,
            x_scale: self.x_scale.as_ref(),
            groups: &self.groups,
            w: &self.w,
            w_scale: &self.w_scale,
            w_offset: self.w_offset.as_ref(),
            row_scale: self.row_scale.as_ref(),
        }
    }
}

fn host(spec: &Spec, seed: u64) -> Host {
    let mut rng = common::rng(seed);
    let (m, k, n, e) = (spec.m_total(), spec.k, spec.n, spec.experts);
    let xf: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let (x, x_scale) = match spec.quant {
        Quant::W8A16 => (Tensor::from_f32(&[m, k], &xf, spec.x_dtype).unwrap(), None),
        Quant::W8A8 => {
            let q = quantize::reference::quantize(&Tensor::f32(&[m, k], xf).unwrap()).unwrap();
            (q.q, Some(q.scale))
        }
    };
    let w: Vec<i8> = (0..e * k * n)
        .map(|_| rng.random_range(-127..=127))
        .collect();
    let w_shape = spec.layout.weight_shape(e, k, n);
    // Scales that keep the outputs O(1).
    let unit = 1.0 / (127.0 * (k as f32).sqrt());
    let w_scale: Vec<f32> = (0..e * n)
        .map(|_| unit * rng.random_range(0.5..2.0))
        .collect();
    let w_offset = spec.offset.then(|| {
        let o: Vec<f32> = (0..e * n)
            .map(|_| rng.random_range(-3.0..3.0f32).round())
            .collect();
        Tensor::f32(&[e, n], o).unwrap()
    });
    let row_scale = spec.row_scale.then(|| {
        let s: Vec<f32> = (0..m).map(|_| rng.random_range(0.25..1.0)).collect();
        Tensor::f32(&[m], s).unwrap()
    });
    Host {
        x,
        x_scale,
        groups: Groups::Counts(spec.counts.clone()),
        w: Tensor::i8(&w_shape, w).unwrap(),
        w_scale: Tensor::f32(&[e, n], w_scale).unwrap(),
        w_offset,
        row_scale,
    }
}

/// Run through the device API against the reference, the W8A16 groups on cooperative matrices
/// with their f16 staging (on the coop lane, W8A16 groups on the GEMM path must run there).
fn check(g: &Gpu, spec: &Spec, seed: u64, what: &str) {
    let h = host(spec, seed);
    let options = spec.options();
    let m = spec.m_total();
    let n_out = match spec.activation {
        Activation::None => spec.n,
        Activation::SwiGlu => spec.n / 2,
    };
    let offsets = h.groups.offsets(m).unwrap();
    let x = g.upload(&h.x).unwrap();
    let x_scale = h.x_scale.as_ref().map(|s| g.upload(s).unwrap());
    let weights = QuantWeights::upload(g, &h.w, &h.w_scale, h.w_offset.as_ref()).unwrap();
    let row_scale = h.row_scale.as_ref().map(|s| g.upload(s).unwrap());
    let offsets_dev = g
        .upload(&Tensor::u32(&[offsets.len()], offsets.clone()).unwrap())
        .unwrap();
    let y = g.zeros(&[m, n_out], spec.out_dtype).unwrap();
    let plan = GmmPlan::new_quantized(
        g,
        &QuantGmmArgs {
            x: match &x_scale {
                Some(scale) => QuantX::Int8 { q: &x, scale },
                None => QuantX::Float(&x),
            },
            groups: DeviceGroups::Offsets(&offsets_dev),
            weights: &weights,
            row_scale: row_scale.as_ref(),
            y: &y,
            host_offsets: Some(&offsets),
        },
        &options,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    g.run(|rec| plan.record(rec)).unwrap();
    let coop = plan.coop_groups(&offsets);
    // Groups on the GEMM path (the default threshold is 8 rows).
    let gemm_groups = spec.counts.iter().any(|&c| match spec.mode {
        Mode::Gemm => c > 0,
        Mode::Gemv => false,
        Mode::Auto => c > 8,
    });
    if common::expect_coop() && spec.quant == Quant::W8A16 && gemm_groups {
        assert!(
            coop.iter().any(|&c| c),
            "{what}: W8A16 GEMM not on cooperative matrices"
        );
        assert!(
            plan.variant().contains("coop"),
            "{what}: {}",
            plan.variant()
        );
    }
    let rows: Vec<usize> = (0..m).collect();
    let want = reference::grouped_matmul_rows_staged(&h.inputs(), &options, &rows, &coop).unwrap();
    let got = g.download_f32(&y).unwrap();
    let c = compare(&got, &want, swiftgmm::tolerance(spec.out_dtype));
    assert!(
        c.pass,
        "{what} ({}): {}",
        plan.variant(),
        c.summary(&[m, n_out])
    );
}

/// Each path forced (the automatic choice is covered below and by the registry cases).
#[test]
fn both_formats_layouts_and_paths() {
    let g = gpu();
    let counts = [3, 0, 1, 12, 2];
    for quant in [Quant::W8A16, Quant::W8A8] {
        for layout in [Layout::Nk, Layout::Kn] {
            for mode in [Mode::Gemv, Mode::Gemm] {
                let mut spec = Spec::new(quant, 5, 64, 40, &counts);
                spec.layout = layout;
                spec.mode = mode;
                check(g, &spec, 1, &format!("{quant:?} {layout:?} {mode:?}"));
            }
        }
    }
}

/// SwiGLU and the row scale (offsets for W8A16) on both layouts, one output dtype each, with
/// groups on both paths (1 and 4 rows GEMV, 9 rows GEMM).
#[test]
fn swiglu_row_scale_offsets_and_output_dtypes() {
    let g = gpu();
    let counts = [1, 9, 0, 4];
    let table = [
        (Quant::W8A16, Layout::Nk, DType::BF16, DType::BF16),
        (Quant::W8A16, Layout::Kn, DType::F16, DType::F16),
        (Quant::W8A8, Layout::Nk, DType::F32, DType::F32),
        (Quant::W8A8, Layout::Kn, DType::BF16, DType::BF16),
    ];
    for (quant, layout, x_dtype, out) in table {
        let mut spec = Spec::new(quant, 4, 48, 64, &counts);
        spec.layout = layout;
        spec.activation = Activation::SwiGlu;
        spec.row_scale = true;
        spec.offset = quant == Quant::W8A16;
        spec.out_dtype = out;
        spec.x_dtype = x_dtype;
        check(
            g,
            &spec,
            2,
            &format!("{quant:?} {layout:?} swiglu out {out}"),
        );
    }
}

#[test]
fn unaligned_k_and_n_and_corner_groups() {
    let g = gpu();
    // k % 16 != 0 (word loads instead of vectors), n not a multiple of any tile; a one-row
    // expert (GEMV), an empty one, one of 11 rows (GEMM).
    for quant in [Quant::W8A16, Quant::W8A8] {
        for layout in [Layout::Nk, Layout::Kn] {
            let mut spec = Spec::new(quant, 3, 36, 44, &[1, 0, 11]);
            spec.layout = layout;
            check(g, &spec, 3, &format!("{quant:?} {layout:?}"));
        }
    }
    // Every expert empty: nothing to compute, y stays zero.
    check(
        g,
        &Spec::new(Quant::W8A8, 3, 36, 44, &[0, 0, 0]),
        3,
        "all empty",
    );
}

/// W8A8 sums equal integer arithmetic: with power-of-two scales the output is the exact i32 sum
/// rounded once to f32 and scaled, so anything but an exact integer accumulation (an f32 sum, a
/// lost partial) shows. Values at ±127 and k = 2048, where the sums pass 2^24.
#[test]
fn w8a8_sums_are_exact_integer_arithmetic() {
    let g = gpu();
    let mut rng = common::rng(4);
    let (e, k, n) = (3, 2048, 24);
    let counts = [1u32, 0, 9];
    let m = 10;
    for layout in [Layout::Nk, Layout::Kn] {
        for mode in [Mode::Gemv, Mode::Gemm] {
            // Mostly ±127 (large sums of one sign in some rows and columns), some random values.
            let x: Vec<i8> = (0..m * k)
                .map(|i| match (i / k) % 3 {
                    0 => 127,
                    1 => {
                        if i % 2 == 0 {
                            127
                        } else {
                            -127
                        }
                    }
                    _ => rng.random_range(-127..=127),
                })
                .collect();
            // Columns of +127 (sums of 2048 · 127² with the +127 rows), of alternating ±127, and
            // random columns.
            let mut w = vec![0i8; e * k * n];
            for grp in 0..e {
                for col in 0..n {
                    for kk in 0..k {
                        let at = match layout {
                            Layout::Kn => (grp * k + kk) * n + col,
                            Layout::Nk => (grp * n + col) * k + kk,
                        };
                        w[at] = match col % 3 {
                            0 => 127,
                            1 => {
                                if kk % 2 == 0 {
                                    -127
                                } else {
                                    127
                                }
                            }
                            _ => rng.random_range(-128..=127),
                        };
                    }
                }
            }
            let x = Tensor::i8(&[m, k], x).unwrap();
            let x_scale =
                Tensor::f32(&[m], (0..m).map(|r| 2f32.powi(r as i32 - 20)).collect()).unwrap();
            let w = Tensor::i8(&layout.weight_shape(e, k, n), w).unwrap();
            let w_scale = Tensor::f32(
                &[e, n],
                (0..e * n).map(|c| 2f32.powi((c % 7) as i32 - 3)).collect(),
            )
            .unwrap();
            let groups = Groups::Counts(counts.to_vec());
            let inputs = QuantInputs {
                x: &x,
                x_scale: Some(&x_scale),
                groups: &groups,
                w: &w,
                w_scale: &w_scale,
                w_offset: None,
                row_scale: None,
            };
            let options = Options {
                layout,
                mode,
                tiling: Tiling::Defaults,
                ..Options::default()
            };
            let got = quant::run(g, &inputs, &options).unwrap();
            let rows: Vec<usize> = (0..m).collect();
            let ints = reference::int8_accumulators(&inputs, layout, &rows).unwrap();
            assert!(
                ints.iter().any(|&a| a.abs() > 1 << 24),
                "the sums must pass 2^24 for the test to mean anything"
            );
            let offsets = groups.offsets(m).unwrap();
            let want: Vec<f64> = ints
                .iter()
                .enumerate()
                .map(|(i, &a)| {
                    let (row, col) = (i / n, i % n);
                    let grp = (0..e)
                        .find(|&g| offsets[g] as usize <= row && row < offsets[g + 1] as usize);
                    match grp {
                        Some(grp) => {
                            (a as f32 * x_scale.to_f32()[row] * w_scale.to_f32()[grp * n + col])
                                as f64
                        }
                        None => 0.0,
                    }
                })
                .collect();
            let c = compare(&got.to_f32(), &want, Tolerance::EXACT);
            assert!(c.pass, "{layout:?} {mode:?}: {}", c.summary(got.shape()));
        }
    }
}

#[test]
fn quantize_then_w8a8_in_one_command_buffer() {
    let g = gpu();
    let spec = Spec {
        layout: Layout::Nk,
        activation: Activation::SwiGlu,
        out_dtype: DType::BF16,
        ..Spec::new(Quant::W8A16, 4, 64, 32, &[2, 0, 5, 1])
    };
    let h = host(&spec, 6);
    let m = spec.m_total();
    // Quantize x on the GPU, then the W8A8 matmul, one submission.
    let x_dev = g.upload(&h.x).unwrap();
    let q = g.zeros(&[m, spec.k], DType::I8).unwrap();
    let s = g.zeros(&[m], DType::F32).unwrap();
    let quantize = QuantizePlan::new(g, &x_dev, &q, &s).unwrap();
    let weights = QuantWeights::upload(g, &h.w, &h.w_scale, None).unwrap();
    let counts = g
        .upload(&Tensor::u32(&[4], spec.counts.clone()).unwrap())
        .unwrap();
    let y = g.zeros(&[m, spec.n / 2], DType::BF16).unwrap();
    let plan = GmmPlan::new_quantized(
        g,
        &QuantGmmArgs {
            x: QuantX::Int8 { q: &q, scale: &s },
            groups: DeviceGroups::Counts(&counts),
            weights: &weights,
            row_scale: None,
            y: &y,
            host_offsets: None,
        },
        &spec.options(),
    )
    .unwrap();
    assert!(plan.variant().starts_with("w8a8 "), "{}", plan.variant());
    g.run(|rec| {
        quantize.record(rec)?;
        plan.record(rec)
    })
    .unwrap();
    let qx = quantize::reference::quantize(&h.x).unwrap();
    let inputs = QuantInputs {
        x: &qx.q,
        x_scale: Some(&qx.scale),
        ..h.inputs()
    };
    let want = reference::grouped_matmul(&inputs, &spec.options()).unwrap();
    let got = g.download_f32(&y).unwrap();
    let c = compare(&got, &want, swiftgmm::tolerance(DType::BF16));
    assert!(c.pass, "{}", c.summary(&[m, spec.n / 2]));
}

#[test]
fn weights_split_across_shards() {
    let g = gpu();
    for quant in [Quant::W8A16, Quant::W8A8] {
        let spec = Spec::new(quant, 5, 32, 16, &[2, 1, 0, 3, 1]);
        let h = host(&spec, 7);
        // Two experts per shard (one expert is 512 bytes).
        let weights = QuantWeights::upload_split(g, &h.w, &h.w_scale, None, 1024).unwrap();
        assert_eq!(weights.weights().shards().len(), 3);
        let m = spec.m_total();
        let x = g.upload(&h.x).unwrap();
        let x_scale = h.x_scale.as_ref().map(|s| g.upload(s).unwrap());
        let counts = g
            .upload(&Tensor::u32(&[5], spec.counts.clone()).unwrap())
            .unwrap();
        let y = g.zeros(&[m, 16], DType::F32).unwrap();
        let plan = GmmPlan::new_quantized(
            g,
            &QuantGmmArgs {
                x: match &x_scale {
                    Some(scale) => QuantX::Int8 { q: &x, scale },
                    None => QuantX::Float(&x),
                },
                groups: DeviceGroups::Counts(&counts),
                weights: &weights,
                row_scale: None,
                y: &y,
                host_offsets: None,
            },
            &spec.options(),
        )
        .unwrap();
        g.run(|rec| plan.record(rec)).unwrap();
        let want = reference::grouped_matmul(&h.inputs(), &spec.options()).unwrap();
        let c = compare(
            &g.download_f32(&y).unwrap(),
            &want,
            swiftgmm::tolerance(DType::F32),
        );
        assert!(c.pass, "{quant:?}: {}", c.summary(&[m, 16]));
    }
}

#[test]
fn zero_and_negative_scales_are_only_multiplied() {
    let g = gpu();
    let spec = Spec::new(Quant::W8A8, 2, 32, 16, &[3, 2]);
    let mut h = host(&spec, 8);
    let s: Vec<f32> = (0..32).map(|i| [0.0, -0.01, 0.02, -0.0][i % 4]).collect();
    h.w_scale = Tensor::f32(&[2, 16], s).unwrap();
    let got = quant::run(g, &h.inputs(), &spec.options()).unwrap();
    let want = reference::grouped_matmul(&h.inputs(), &spec.options()).unwrap();
    let c = compare(&got.to_f32(), &want, swiftgmm::tolerance(DType::F32));
    assert!(c.pass, "{}", c.summary(got.shape()));
    // A NaN per-row scale (the quantizer's mark of a NaN/inf row) poisons exactly its row.
    let mut x_scale = h.x_scale.clone().unwrap().to_f32();
    x_scale[1] = f32::NAN;
    h.x_scale = Some(Tensor::f32(&[5], x_scale).unwrap());
    let got = quant::run(g, &h.inputs(), &spec.options())
        .unwrap()
        .to_f32();
    let want = reference::grouped_matmul(&h.inputs(), &spec.options()).unwrap();
    assert!(got[16..32].iter().all(|v| v.is_nan()) && want[16..32].iter().all(|v| v.is_nan()));
    let c = compare(&got, &want, swiftgmm::tolerance(DType::F32));
    assert!(c.pass, "{}", c.summary(&[5, 16]));
}

#[test]
fn registry_cases_match_the_reference() {
    let g = gpu();
    let op = &swiftgmm::OPERATOR;
    let cases: Vec<_> = op
        .cases(Scale::Ci, g)
        .into_iter()
        .filter(|c| {
            c.info()
                .params
                .iter()
                .any(|(k, v)| k == "quant" && v != "none")
        })
        .collect();
    assert!(cases.len() >= 4, "the CI table has quantized cases");
    for case in cases {
        let name = case.info().name;
        let prepared = case.prepare(g).unwrap();
        assert!(prepared.baseline().is_none());
        g.run(|rec| prepared.record(rec)).unwrap();
        for c in prepared.verify().unwrap() {
            assert!(
                c.comparison.pass,
                "{name}: {}",
                c.comparison.summary(&c.shape)
            );
        }
    }
    let paths = op.paths(g);
    let w8a8 = paths.iter().find(|(what, _)| what == "w8a8").unwrap();
    assert!(w8a8.1.contains("dot4I8Packed"), "{}", w8a8.1);
}

#[test]
fn named_tensor_interface_matches_its_reference() {
    let g = gpu();
    let op = &swiftgmm::OPERATOR;
    let mut spec = Spec::new(Quant::W8A8, 3, 32, 24, &[2, 0, 5]);
    spec.layout = Layout::Kn;
    spec.activation = Activation::SwiGlu;
    spec.row_scale = true;
    let h = host(&spec, 9);
    let mut named = NamedTensors::new();
    named.insert("x".into(), h.x.clone());
    named.insert("x_scale".into(), h.x_scale.clone().unwrap());
    named.insert("w".into(), h.w.clone());
    named.insert("w_scale".into(), h.w_scale.clone());
    named.insert("row_scale".into(), h.row_scale.clone().unwrap());
    named.insert("counts".into(), Tensor::i32(&[3], vec![2, 0, 5]).unwrap());
    let params = serde_json::json!({
        "layout": "kn", "activation": "swiglu", "out_dtype": "bf16", "tiling": "defaults"
    });
    let got = op.run_named(g, &named, &params).unwrap();
    let want = op.reference_named(&named, &params).unwrap();
    assert_eq!(got["y"].shape(), &[7, 12]);
    let c = compare(
        &got["y"].to_f32(),
        &want["y"].to_f32(),
        op.tolerance("y", &named, &params),
    );
    assert!(c.pass, "{}", c.summary(got["y"].shape()));
    // W8A16 with f32 x and offsets, a group on the GEMM path (cooperative matrices on the coop
    // lane: the tolerance covers their f16 staging of these inputs).
    let mut a16 = Spec::new(Quant::W8A16, 2, 32, 24, &[2, 12]);
    a16.x_dtype = DType::F32;
    a16.offset = true;
    let h16 = host(&a16, 12);
    let mut named16 = NamedTensors::new();
    named16.insert("x".into(), h16.x.clone());
    named16.insert("w".into(), h16.w.clone());
    named16.insert("w_scale".into(), h16.w_scale.clone());
    named16.insert("w_offset".into(), h16.w_offset.clone().unwrap());
    named16.insert("counts".into(), Tensor::u32(&[2], vec![2, 12]).unwrap());
    let params16 = serde_json::json!({"layout": "nk", "tiling": "defaults"});
    let got = op.run_named(g, &named16, &params16).unwrap();
    let want = op.reference_named(&named16, &params16).unwrap();
    let c = compare(
        &got["y"].to_f32(),
        &want["y"].to_f32(),
        op.tolerance("y", &named16, &params16),
    );
    assert!(c.pass, "w8a16: {}", c.summary(got["y"].shape()));
    // int8 w without its scale; a scale for float weights.
    named.remove("w_scale");
    let e = op.run_named(g, &named, &params).unwrap_err();
    assert!(e.to_string().contains("w_scale"), "{e}");
    named.insert("w_scale".into(), h.w_scale.clone());
    named.insert(
        "w".into(),
        Tensor::from_f32(&[3, 32, 24], &[0.5; 3 * 32 * 24], DType::BF16).unwrap(),
    );
    let e = op.run_named(g, &named, &params).unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("w of dtype bf16"),
        "{e}"
    );
}

/// Host inputs refused before anything is uploaded, each naming the tensor.
#[test]
fn bad_host_inputs_are_typed_errors_naming_the_tensor() {
    let g = gpu();
    let a8 = Spec::new(Quant::W8A8, 2, 32, 16, &[3, 2]);
    let a16 = Spec::new(Quant::W8A16, 2, 32, 16, &[3, 2]);
    let h8 = host(&a8, 10);
    let h16 = host(&a16, 10);
    let opts = a8.options();
    let refused = |inputs: QuantInputs, options: &Options, word: &str| -> Error {
        let e = quant::run(g, &inputs, options).unwrap_err();
        assert!(e.to_string().contains(word), "{e} does not name {word}");
        assert!(
            reference::grouped_matmul(&inputs, options).is_err(),
            "reference accepts: {e}"
        );
        e
    };
    // W8A8 without x_scale, with one of the wrong length or dtype.
    let e = refused(
        QuantInputs {
            x_scale: None,
            ..h8.inputs()
        },
        &opts,
        "x_scale",
    );
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    let short = Tensor::f32(&[4], vec![1.0; 4]).unwrap();
    let e = refused(
        QuantInputs {
            x_scale: Some(&short),
            ..h8.inputs()
        },
        &opts,
        "x_scale",
    );
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let ints = Tensor::i32(&[5], vec![1; 5]).unwrap();
    refused(
        QuantInputs {
            x_scale: Some(&ints),
            ..h8.inputs()
        },
        &opts,
        "x_scale",
    );
    // A per-row scale with float x.
    let e = refused(
        QuantInputs {
            x_scale: h8.x_scale.as_ref(),
            ..h16.inputs()
        },
        &opts,
        "x_scale",
    );
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    // w_scale of the wrong length, NaN, inf; an offset that is not finite; an offset with W8A8.
    let wrong = Tensor::f32(&[2, 15], vec![1.0; 30]).unwrap();
    let e = refused(
        QuantInputs {
            w_scale: &wrong,
            ..h8.inputs()
        },
        &opts,
        "w_scale",
    );
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let wrong = Tensor::f32(&[1, 16], vec![1.0; 16]).unwrap();
    refused(
        QuantInputs {
            w_scale: &wrong,
            ..h8.inputs()
        },
        &opts,
        "w_scale",
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut s = h8.w_scale.to_f32();
        s[7] = bad;
        let s = Tensor::f32(&[2, 16], s).unwrap();
        let e = refused(
            QuantInputs {
                w_scale: &s,
                ..h8.inputs()
            },
            &opts,
            "w_scale",
        );
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
        let o = Tensor::f32(
            &[2, 16],
            (0..32).map(|i| if i == 3 { bad } else { 1.0 }).collect(),
        )
        .unwrap();
        let e = refused(
            QuantInputs {
                w_offset: Some(&o),
                ..h16.inputs()
            },
            &opts,
            "w_offset",
        );
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
    }
    let o = Tensor::f32(&[2, 16], vec![1.0; 32]).unwrap();
    let e = refused(
        QuantInputs {
            w_offset: Some(&o),
            ..h8.inputs()
        },
        &opts,
        "w_offset",
    );
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    // Float weights with scales; int8 weights for the float path; int8 x for the float path.
    let wf = Tensor::from_f32(&[2, 16, 32], &[0.5; 1024], DType::F16).unwrap();
    let e = refused(
        QuantInputs {
            w: &wf,
            ..h16.inputs()
        },
        &opts,
        "w of dtype f16",
    );
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let e = swiftgmm::run(g, &h16.x, &h16.groups, &h16.w, None, &opts).unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("i8"),
        "{e}"
    );
    let e = swiftgmm::run(g, &h8.x, &h8.groups, &wf, None, &opts).unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("x dtype i8"),
        "{e}"
    );
    // int8 rows that do not hold whole words: x with k = 30, weights with k = 30 ([e, n, k]).
    let x30 = Tensor::i8(&[5, 30], vec![1; 150]).unwrap();
    let w30 = Tensor::i8(&[2, 16, 30], vec![1; 960]).unwrap();
    let e = refused(
        QuantInputs {
            x: &x30,
            w: &w30,
            ..h8.inputs()
        },
        &opts,
        "multiple of 4",
    );
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let x30f = Tensor::from_f32(&[5, 30], &[1.0; 150], DType::BF16).unwrap();
    let e = refused(
        QuantInputs {
            x: &x30f,
            w: &w30,
            ..h16.inputs()
        },
        &opts,
        "multiple of 4",
    );
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    // [e, k, n] SwiGLU with n_out = 6: the up half would start mid-word.
    let wkn = Tensor::i8(&[2, 32, 12], vec![1; 768]).unwrap();
    let skn = Tensor::f32(&[2, 12], vec![1.0; 24]).unwrap();
    let kn_swiglu = Options {
        layout: Layout::Kn,
        activation: Activation::SwiGlu,
        ..opts
    };
    let e = refused(
        QuantInputs {
            w: &wkn,
            w_scale: &skn,
            ..h16.inputs()
        },
        &kn_swiglu,
        "n_out",
    );
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    // The tuner measures 16-bit kernels only.
    let tune = Options {
        tiling: Tiling::Tune,
        ..opts
    };
    let e = quant::run(g, &h8.inputs(), &tune).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

/// Device inputs refused by the plan: nothing is dispatched, y keeps its contents.
#[test]
fn bad_device_inputs_dispatch_nothing() {
    let g = gpu();
    let spec = Spec::new(Quant::W8A8, 2, 32, 16, &[3, 2]);
    let h = host(&spec, 11);
    let x = g.upload(&h.x).unwrap();
    let x_scale = g.upload(h.x_scale.as_ref().unwrap()).unwrap();
    let weights = QuantWeights::upload(g, &h.w, &h.w_scale, None).unwrap();
    let counts = g.upload(&Tensor::u32(&[2], vec![3, 2]).unwrap()).unwrap();
    let y = g
        .upload(&Tensor::f32(&[5, 16], vec![1.5; 80]).unwrap())
        .unwrap();
    let args = QuantGmmArgs {
        x: QuantX::Int8 {
            q: &x,
            scale: &x_scale,
        },
        groups: DeviceGroups::Counts(&counts),
        weights: &weights,
        row_scale: None,
        y: &y,
        host_offsets: None,
    };
    let opts = spec.options();
    let refused = |args: &QuantGmmArgs, word: &str| {
        let e = GmmPlan::new_quantized(g, args, &opts).unwrap_err();
        assert!(e.to_string().contains(word), "{e} does not name {word}");
        g.wait().unwrap();
        assert_eq!(g.download_f32(&y).unwrap(), vec![1.5; 80], "y changed: {e}");
    };
    // x_scale of the wrong length; a float "q"; int8 x passed as float x.
    let short = g.zeros(&[4], DType::F32).unwrap();
    refused(
        &QuantGmmArgs {
            x: QuantX::Int8 {
                q: &x,
                scale: &short,
            },
            ..args
        },
        "x_scale",
    );
    let xf = g
        .upload(&Tensor::from_f32(&[5, 32], &[1.0; 160], DType::BF16).unwrap())
        .unwrap();
    refused(
        &QuantGmmArgs {
            x: QuantX::Int8 {
                q: &xf,
                scale: &x_scale,
            },
            ..args
        },
        "x_scale",
    );
    refused(
        &QuantGmmArgs {
            x: QuantX::Float(&x),
            ..args
        },
        "x_scale",
    );
    // y of the wrong shape; offsets of the wrong length.
    let y_bad = g.zeros(&[5, 15], DType::F32).unwrap();
    refused(&QuantGmmArgs { y: &y_bad, ..args }, "y");
    let short_counts = g
        .upload(&Tensor::u32(&[3], vec![3, 2, 0]).unwrap())
        .unwrap();
    refused(
        &QuantGmmArgs {
            groups: DeviceGroups::Counts(&short_counts),
            ..args
        },
        "counts",
    );
    // Weights: float shards with scales; a scale tensor of the wrong shape.
    let wf = swiftgmm::ExpertWeights::upload(
        g,
        &Tensor::from_f32(&[2, 16, 32], &[0.5; 1024], DType::BF16).unwrap(),
    )
    .unwrap();
    let e =
        QuantWeights::from_device(wf, g.zeros(&[2, 16], DType::F32).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("w of dtype bf16"), "{e}");
    let wi = swiftgmm::ExpertWeights::upload(g, &h.w).unwrap();
    let e =
        QuantWeights::from_device(wi, g.zeros(&[3, 16], DType::F32).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("w_scale"), "{e}");
    // The float plan refuses int8 weights.
    let wi = swiftgmm::ExpertWeights::upload(g, &h.w).unwrap();
    let e = GmmPlan::new(
        g,
        &swiftgmm::GmmArgs {
            x: &xf,
            groups: DeviceGroups::Counts(&counts),
            weights: &wi,
            row_scale: None,
            y: &y,
            host_offsets: None,
        },
        &opts,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("i8"),
        "{e}"
    );
}
