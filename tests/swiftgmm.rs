//! SwiftGMM against its CPU reference on the default adapter (lavapipe in CI, on both lanes): every
//! dtype and layout, both paths forced and automatic, the GEMM path on cooperative matrices where
//! the adapter has them (the coop lane asserts it) and on SIMT, corner groups, padding, 16-bit
//! outputs of odd length, bf16 values outside the f16 range, device-side offsets (also bad ones),
//! the MoE chain in one command buffer, weight shards, the tiling cache (also unreadable and
//! unwritable), the registry cases with their per-expert baseline, and every error path.
//!
//! Groups on the cooperative-matrix path are checked against the reference with their operands
//! staged in f16 as the kernel stages them (`reference::grouped_matmul_staged`), with the SIMT
//! tolerance; one test also holds them to the derived staging bound against the exact reference.

mod common;

use common::{gpu, gpu_without};
use fusedops::check::{Tolerance, compare};
use fusedops::error::Error;
use fusedops::gpu::{Feature, Gpu};
use fusedops::ops::swiftgmm::tiling::{
    self, GemmPath, ShapeKey, TileConfig, TilingCache, TuneSettings,
};
use fusedops::ops::swiftgmm::{
    self, Activation, DeviceGroups, ExpertWeights, GemmKernel, GmmArgs, GmmPlan, Groups, Layout,
    Mode, Options, PerExpertBaseline, Tiling, reference,
};
use fusedops::registry::{Operator, Scale};
use fusedops::tensor::{DType, DeviceTensor, Tensor};
use rand::Rng;

/// Host inputs of one grouped matmul.
struct Inputs {
    x: Tensor,
    w: Tensor,
    offsets: Vec<u32>,
    scale: Option<Tensor>,
    options: Options,
}

/// A problem description for [`inputs`].
#[derive(Clone)]
struct Spec {
    experts: usize,
    k: usize,
    n: usize,
    counts: Vec<u32>,
    /// Rows before and after the groups (NaN in x).
    pad: (usize, usize),
    layout: Layout,
    activation: Activation,
    x_dtype: DType,
    w_dtype: DType,
    out_dtype: DType,
    scale: bool,
    mode: Mode,
    gemm_kernel: GemmKernel,
}

impl Spec {
    fn new(experts: usize, k: usize, n: usize, counts: &[u32]) -> Self {
        assert_eq!(counts.len(), experts);
        Spec {
            experts,
            k,
            n,
            counts: counts.to_vec(),
            pad: (0, 0),
            layout: Layout::Nk,
            activation: Activation::None,
            x_dtype: DType::BF16,
            w_dtype: DType::BF16,
            out_dtype: DType::F32,
            scale: false,
            mode: Mode::Auto,
            gemm_kernel: GemmKernel::Auto,
        }
    }

    fn dtypes(mut self, x: DType, w: DType, out: DType) -> Self {
        (self.x_dtype, self.w_dtype, self.out_dtype) = (x, w, out);
        self
    }

    fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    fn swiglu(mut self) -> Self {
        self.activation = Activation::SwiGlu;
        self
    }

    fn scaled(mut self) -> Self {
        self.scale = true;
        self
    }

    fn padded(mut self, before: usize, after: usize) -> Self {
        self.pad = (before, after);
        self
    }

    fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    fn kernel(mut self, kernel: GemmKernel) -> Self {
        self.gemm_kernel = kernel;
        self
    }
}

fn inputs(spec: &Spec, seed: u64) -> Inputs {
    let mut rng = common::rng(seed);
    let routed: usize = spec.counts.iter().map(|&c| c as usize).sum();
    let m_total = spec.pad.0 + routed + spec.pad.1;
    let (k, n) = (spec.k, spec.n);
    let x: Vec<f32> = (0..m_total * k)
        .map(|i| {
            let row = i / k;
            if row < spec.pad.0 || row >= spec.pad.0 + routed {
                f32::NAN
            } else {
                rng.random_range(-1.0..1.0)
            }
        })
        .collect();
    let scale = 1.0 / (k as f32).sqrt();
    let w: Vec<f32> = (0..spec.experts * k * n)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    let row_scale: Vec<f32> = (0..m_total).map(|_| rng.random_range(0.1..1.0)).collect();
    let mut offsets = vec![spec.pad.0 as u32];
    for &c in &spec.counts {
        offsets.push(offsets.last().unwrap() + c);
    }
    Inputs {
        x: Tensor::from_f32(&[m_total, k], &x, spec.x_dtype).unwrap(),
        w: Tensor::from_f32(
            &spec.layout.weight_shape(spec.experts, k, n),
            &w,
            spec.w_dtype,
        )
        .unwrap(),
        offsets,
        scale: spec
            .scale
            .then(|| Tensor::f32(&[m_total], row_scale).unwrap()),
        options: Options {
            layout: spec.layout,
            activation: spec.activation,
            out_dtype: spec.out_dtype,
            mode: spec.mode,
            tiling: Tiling::Defaults,
            max_workgroups: None,
            gemm_kernel: spec.gemm_kernel,
        },
    }
}

impl Inputs {
    fn m_total(&self) -> usize {
        self.x.shape()[0]
    }

    /// The reference with the groups flagged in `coop` staged in f16 (`GmmPlan::coop_groups`).
    fn reference(&self, coop: &[bool]) -> Vec<f64> {
        reference::grouped_matmul_staged(
            &self.x,
            &self.offsets,
            &self.w,
            self.options.layout,
            self.options.activation,
            self.scale.as_ref(),
            coop,
        )
        .unwrap()
    }

    /// The groups `run` puts on the cooperative-matrix path (a plan over the same inputs).
    fn coop_groups(&self, g: &Gpu) -> Vec<bool> {
        let dev = upload(g, self);
        let offsets = g
            .upload(&Tensor::u32(&[self.offsets.len()], self.offsets.clone()).unwrap())
            .unwrap();
        let y = g.zeros(&self.y_shape(), self.options.out_dtype).unwrap();
        let plan = GmmPlan::new(
            g,
            &GmmArgs {
                x: &dev.x,
                groups: DeviceGroups::Offsets(&offsets),
                weights: &dev.weights,
                row_scale: dev.scale.as_ref(),
                y: &y,
                host_offsets: Some(&self.offsets),
            },
            &self.options,
        )
        .unwrap();
        plan.coop_groups(&self.offsets)
    }

    fn y_shape(&self) -> [usize; 2] {
        let (_, n) = self
            .options
            .layout
            .k_n([self.w.shape()[1], self.w.shape()[2]]);
        match self.options.activation {
            Activation::None => [self.m_total(), n],
            Activation::SwiGlu => [self.m_total(), n / 2],
        }
    }

    fn run(&self, g: &Gpu) -> Tensor {
        swiftgmm::run(
            g,
            &self.x,
            &Groups::Offsets(self.offsets.clone()),
            &self.w,
            self.scale.as_ref(),
            &self.options,
        )
        .unwrap()
    }
}

/// The inputs on the GPU, for plans.
struct OnDevice {
    x: DeviceTensor,
    weights: ExpertWeights,
    scale: Option<DeviceTensor>,
}

fn upload(g: &Gpu, inp: &Inputs) -> OnDevice {
    OnDevice {
        x: g.upload(&inp.x).unwrap(),
        weights: ExpertWeights::upload(g, &inp.w).unwrap(),
        scale: inp.scale.as_ref().map(|s| g.upload(s).unwrap()),
    }
}

fn assert_matches(got: &[f32], want: &[f64], tol: Tolerance, what: &str) {
    let c = compare(got, want, tol);
    assert!(c.pass, "{what}: {}", c.summary(&[got.len()]));
}

/// Run through `swiftgmm::run` and compare; returns which groups ran on cooperative matrices.
fn check_inputs(g: &Gpu, inp: &Inputs, what: &str) -> Vec<bool> {
    let y = inp.run(g);
    assert_eq!(y.shape(), &inp.y_shape(), "{what}");
    assert_eq!(y.dtype(), inp.options.out_dtype, "{what}");
    let coop = inp.coop_groups(g);
    assert_matches(
        &y.to_f32(),
        &inp.reference(&coop),
        swiftgmm::tolerance(inp.options.out_dtype),
        what,
    );
    coop
}

fn check(g: &Gpu, spec: &Spec, seed: u64, what: &str) -> Vec<bool> {
    check_inputs(g, &inputs(spec, seed), what)
}

/// The GEMM path's kernel `Auto` gives on the default adapter.
fn auto_path(g: &Gpu) -> GemmPath {
    swiftgmm::gemm_path(g, GemmKernel::Auto).unwrap()
}

/// Groups small and large, so that automatic mode uses both paths.
const MIXED: [u32; 6] = [0, 3, 1, 14, 0, 6];

#[test]
fn every_dtype_and_layout() {
    let g = gpu();
    for layout in [Layout::Kn, Layout::Nk] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let spec = Spec::new(6, 40, 24, &MIXED)
                .layout(layout)
                .dtypes(dtype, dtype, dtype);
            check(g, &spec, 1, &format!("{layout:?} {dtype}"));
        }
    }
    // x and w of different dtypes.
    let spec = Spec::new(6, 40, 24, &MIXED).dtypes(DType::F32, DType::BF16, DType::F16);
    check(g, &spec, 2, "f32 x, bf16 w");
}

#[test]
fn swiglu_and_row_scale_on_both_layouts() {
    let g = gpu();
    for layout in [Layout::Kn, Layout::Nk] {
        let spec = Spec::new(4, 48, 64, &[2, 11, 0, 5])
            .layout(layout)
            .swiglu()
            .scaled();
        check(g, &spec, 3, &format!("{layout:?} swiglu + scale"));
        let spec = Spec::new(4, 48, 64, &[2, 11, 0, 5]).layout(layout).scaled();
        check(g, &spec, 4, &format!("{layout:?} scale"));
    }
}

#[test]
fn corner_groups() {
    let g = gpu();
    let cases: [(&str, Vec<u32>, (usize, usize)); 5] = [
        ("one-row experts", vec![1, 1, 1, 1, 1], (0, 0)),
        ("all rows in one expert", vec![0, 0, 23, 0, 0], (0, 0)),
        (
            "empty experts around busy ones",
            vec![0, 9, 0, 0, 2],
            (0, 0),
        ),
        (
            "every expert empty, padding only",
            vec![0, 0, 0, 0, 0],
            (2, 3),
        ),
        ("no rows at all", vec![0, 0, 0, 0, 0], (0, 0)),
    ];
    for (what, counts, (before, after)) in cases {
        let spec = Spec::new(5, 32, 40, &counts).padded(before, after);
        check(g, &spec, 5, what);
    }
}

#[test]
fn k_and_n_not_multiples_of_any_tile() {
    let g = gpu();
    // Odd k and n: scalar loads everywhere (f32 output, as 16-bit outputs need an even n_out).
    check(
        g,
        &Spec::new(3, 37, 53, &[2, 13, 4]).layout(Layout::Kn),
        6,
        "kn k=37 n=53",
    );
    check(
        g,
        &Spec::new(3, 37, 53, &[2, 13, 4]).dtypes(DType::F32, DType::F32, DType::F32),
        7,
        "nk f32 k=37 n=53",
    );
    check(
        g,
        &Spec::new(3, 37, 53, &[2, 13, 4]),
        25,
        "nk bf16 k=37 n=53",
    );
    // Even but unaligned n (n % 8 != 0) with a 16-bit output, and SwiGLU halves of 26 columns.
    check(
        g,
        &Spec::new(3, 45, 54, &[2, 13, 4]).layout(Layout::Kn).dtypes(
            DType::F16,
            DType::F16,
            DType::F16,
        ),
        8,
        "kn f16 k=45 n=54",
    );
    check(
        g,
        &Spec::new(3, 36, 52, &[5, 1, 12])
            .layout(Layout::Kn)
            .swiglu()
            .dtypes(DType::BF16, DType::BF16, DType::BF16),
        9,
        "kn swiglu n_out=26",
    );
}

#[test]
fn padded_rows_are_neither_read_nor_written() {
    let g = gpu();
    let spec = Spec::new(4, 32, 40, &[3, 10, 0, 2]).padded(3, 4);
    let inp = inputs(&spec, 10);
    let dev = upload(g, &inp);
    let offsets_dev = g
        .upload(&Tensor::u32(&[5], inp.offsets.clone()).unwrap())
        .unwrap();
    let m = inp.m_total();
    let sentinel = 7.25f32;
    let y = g
        .upload(&Tensor::f32(&[m, 40], vec![sentinel; m * 40]).unwrap())
        .unwrap();
    let args = GmmArgs {
        x: &dev.x,
        groups: DeviceGroups::Offsets(&offsets_dev),
        weights: &dev.weights,
        row_scale: None,
        y: &y,
        host_offsets: Some(&inp.offsets),
    };
    let plan = GmmPlan::new(g, &args, &inp.options).unwrap();
    g.run(|rec| plan.record(rec)).unwrap();
    let got = g.download_f32(&y).unwrap();
    let want = inp.reference(&plan.coop_groups(&inp.offsets));
    for row in 0..m {
        let r = &got[row * 40..(row + 1) * 40];
        if row < 3 || row >= m - 4 {
            assert!(
                r.iter().all(|&v| v == sentinel),
                "padding row {row} written"
            );
        } else {
            assert!(
                r.iter().all(|v| v.is_finite()),
                "NaN padding leaked into row {row}"
            );
            assert_matches(
                r,
                &want[row * 40..(row + 1) * 40],
                swiftgmm::tolerance(DType::F32),
                "rows",
            );
        }
    }
}

#[test]
fn forced_paths_agree_with_automatic() {
    let g = gpu();
    // Group sizes up to 21 rows: forced GEMV takes several row blocks per group.
    let counts = [21, 1, 0, 9, 4];
    for mode in [Mode::Auto, Mode::Gemv, Mode::Gemm] {
        let spec = Spec::new(5, 48, 40, &counts).mode(mode).swiglu();
        let inp = inputs(&spec, 11);
        let dev = upload(g, &inp);
        let offsets_dev = g
            .upload(&Tensor::u32(&[6], inp.offsets.clone()).unwrap())
            .unwrap();
        let y = g.zeros(&[inp.m_total(), 20], DType::F32).unwrap();
        let args = GmmArgs {
            x: &dev.x,
            groups: DeviceGroups::Offsets(&offsets_dev),
            weights: &dev.weights,
            row_scale: None,
            y: &y,
            host_offsets: Some(&inp.offsets),
        };
        let plan = GmmPlan::new(g, &args, &inp.options).unwrap();
        let path = plan
            .variant()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let expected = match mode {
            Mode::Auto => "gemv+gemm",
            Mode::Gemv => "gemv",
            Mode::Gemm => "gemm",
        };
        assert_eq!(path, expected, "{}", plan.variant());
        g.run(|rec| plan.record(rec)).unwrap();
        assert_matches(
            &g.download_f32(&y).unwrap(),
            &inp.reference(&plan.coop_groups(&inp.offsets)),
            swiftgmm::tolerance(DType::F32),
            &format!("{mode:?}"),
        );
    }
}

#[test]
fn automatic_mode_follows_the_threshold() {
    let g = gpu();
    let config = tiling::default_config(
        g,
        &ShapeKey {
            x_dtype: DType::BF16,
            w_dtype: DType::BF16,
            layout: Layout::Nk,
            k: 32,
            n: 40,
            rows_bucket: 4,
            gemm: auto_path(g),
        },
    );
    let t = config.threshold;
    let variant = |counts: &[u32]| {
        let spec = Spec::new(counts.len(), 32, 40, counts);
        let inp = inputs(&spec, 12);
        let dev = upload(g, &inp);
        let offsets_dev = g
            .upload(&Tensor::u32(&[counts.len() + 1], inp.offsets.clone()).unwrap())
            .unwrap();
        let y = g.zeros(&[inp.m_total(), 40], DType::F32).unwrap();
        let args = GmmArgs {
            x: &dev.x,
            groups: DeviceGroups::Offsets(&offsets_dev),
            weights: &dev.weights,
            row_scale: None,
            y: &y,
            host_offsets: Some(&inp.offsets),
        };
        let plan = GmmPlan::new(g, &args, &inp.options).unwrap();
        plan.variant()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(variant(&[t, 1, 0]), "gemv");
    assert_eq!(variant(&[t + 1, 0]), "gemm");
    assert_eq!(variant(&[t, t + 1]), "gemv+gemm");
}

#[test]
fn the_gpu_schedule_picks_the_path_per_group() {
    let g = gpu();
    // Device offsets only: the path choice happens in the scheduling kernel.
    let spec = Spec::new(6, 40, 24, &MIXED);
    let inp = inputs(&spec, 23);
    let dev = upload(g, &inp);
    let offsets_dev = g
        .upload(&Tensor::u32(&[7], inp.offsets.clone()).unwrap())
        .unwrap();
    let y = g.zeros(&[inp.m_total(), 24], DType::F32).unwrap();
    let args = GmmArgs {
        x: &dev.x,
        groups: DeviceGroups::Offsets(&offsets_dev),
        weights: &dev.weights,
        row_scale: None,
        y: &y,
        host_offsets: None,
    };
    for mode in [Mode::Auto, Mode::Gemv, Mode::Gemm] {
        let plan = GmmPlan::new(
            g,
            &args,
            &Options {
                mode,
                ..inp.options
            },
        )
        .unwrap();
        g.run(|rec| plan.record(rec)).unwrap();
        let schedule = plan.read_schedule(g).unwrap();
        assert_eq!(schedule.offsets, inp.offsets);
        let config = plan.config();
        for (grp, &rows) in MIXED.iter().enumerate() {
            let gemv = match mode {
                Mode::Auto => rows > 0 && rows <= config.threshold,
                Mode::Gemv => rows > 0,
                Mode::Gemm => false,
            };
            let gemm = rows > 0 && !gemv;
            assert_eq!(schedule.gemv_tiles[grp] > 0, gemv, "{mode:?} group {grp}");
            assert_eq!(schedule.gemm_tiles[grp] > 0, gemm, "{mode:?} group {grp}");
        }
        if mode == Mode::Gemv {
            // 14 rows in row blocks of the GEMV configuration.
            let blocks = 14u32.div_ceil(config.gemv.rows);
            assert_eq!(schedule.gemv_tiles[3] % blocks, 0);
        }
        assert_matches(
            &g.download_f32(&y).unwrap(),
            &inp.reference(&plan.coop_groups(&inp.offsets)),
            swiftgmm::tolerance(DType::F32),
            &format!("{mode:?}"),
        );
    }
}

#[test]
fn persistent_workgroups_loop_over_every_tile() {
    let g = gpu();
    let spec = Spec::new(6, 40, 72, &MIXED).swiglu();
    let mut inp = inputs(&spec, 13);
    inp.options.max_workgroups = Some(2);
    check_inputs(g, &inp, "two workgroups per path");
}

/// Run a plan with device-side groups and no host offsets (weights [e, n, k], no SwiGLU); y
/// starts as `sentinel`. Returns y and the plan (for `coop_groups` of the repaired offsets).
fn run_device_groups(
    g: &Gpu,
    inp: &Inputs,
    groups: &Tensor,
    counts: bool,
    sentinel: f32,
) -> (Vec<f32>, GmmPlan) {
    let dev = upload(g, inp);
    let groups_dev = g.upload(groups).unwrap();
    let m = inp.m_total();
    let n_out = inp.w.shape()[1];
    let y = g
        .upload(&Tensor::f32(&[m, n_out], vec![sentinel; m * n_out]).unwrap())
        .unwrap();
    let args = GmmArgs {
        x: &dev.x,
        groups: if counts {
            DeviceGroups::Counts(&groups_dev)
        } else {
            DeviceGroups::Offsets(&groups_dev)
        },
        weights: &dev.weights,
        row_scale: dev.scale.as_ref(),
        y: &y,
        host_offsets: None,
    };
    let plan = GmmPlan::new(g, &args, &inp.options).unwrap();
    assert!(
        plan.variant().starts_with("gemv+gemm"),
        "{}",
        plan.variant()
    );
    g.run(|rec| plan.record(rec)).unwrap();
    (g.download_f32(&y).unwrap(), plan)
}

#[test]
fn device_offsets_i32_u32_and_counts() {
    let g = gpu();
    let spec = Spec::new(6, 40, 24, &MIXED).scaled();
    let inp = inputs(&spec, 14);
    let tol = swiftgmm::tolerance(DType::F32);
    let want = |plan: &GmmPlan| inp.reference(&plan.coop_groups(&inp.offsets));
    let as_i32: Vec<i32> = inp.offsets.iter().map(|&o| o as i32).collect();
    let (got, plan) = run_device_groups(g, &inp, &Tensor::i32(&[7], as_i32).unwrap(), false, 0.0);
    assert_matches(&got, &want(&plan), tol, "i32 offsets");
    let (got, plan) = run_device_groups(
        g,
        &inp,
        &Tensor::u32(&[7], inp.offsets.clone()).unwrap(),
        false,
        0.0,
    );
    assert_matches(&got, &want(&plan), tol, "u32 offsets");
    let counts: Vec<i32> = MIXED.iter().map(|&c| c as i32).collect();
    let (got, plan) = run_device_groups(g, &inp, &Tensor::i32(&[6], counts).unwrap(), true, 0.0);
    assert_matches(&got, &want(&plan), tol, "i32 counts");
}

#[test]
fn bad_device_offsets_are_repaired_not_followed_out_of_range() {
    let g = gpu();
    // 20 rows; the offsets go backwards, negative and past the end.
    let spec = Spec::new(6, 40, 24, &[4, 4, 4, 4, 4, 0]);
    let inp = inputs(&spec, 15);
    let m = inp.m_total() as i64;
    let sentinel = -3.5f32;
    let cases: [(&str, Vec<i64>, bool); 3] = [
        ("offsets", vec![-5, 6, 2, 30, 12, 1 << 31, 20], false),
        (
            "offsets from the middle",
            vec![3, 3, 9, 8, 15, 16, 17],
            false,
        ),
        ("counts", vec![7, -2, 9, 1 << 30, 3, 5], true),
    ];
    for (what, raw, counts) in cases {
        let tensor = Tensor::i32(&[raw.len()], raw.iter().map(|&v| v as i32).collect()).unwrap();
        let (got, plan) = run_device_groups(g, &inp, &tensor, counts, sentinel);
        let repaired = if counts {
            reference::repair_counts(
                &raw.iter().map(|&v| v as i32 as i64).collect::<Vec<_>>(),
                m as usize,
            )
        } else {
            reference::repair_offsets(
                &raw.iter().map(|&v| v as i32 as i64).collect::<Vec<_>>(),
                m as usize,
            )
        };
        let want = reference::grouped_matmul_staged(
            &inp.x,
            &repaired,
            &inp.w,
            Layout::Nk,
            Activation::None,
            None,
            &plan.coop_groups(&repaired),
        )
        .unwrap();
        for row in 0..m as usize {
            let r = &got[row * 24..(row + 1) * 24];
            if reference::group_of_row(&repaired, row).is_none() {
                assert!(
                    r.iter().all(|&v| v == sentinel),
                    "{what}: row {row} written"
                );
            } else {
                assert_matches(
                    r,
                    &want[row * 24..(row + 1) * 24],
                    swiftgmm::tolerance(DType::F32),
                    what,
                );
            }
        }
    }
}

#[test]
fn moe_chain_in_one_command_buffer() {
    // router offsets (on the GPU) -> gate/up with SwiGLU -> down with the routing weight, one
    // submission, no host round trip in between.
    let g = gpu();
    let (experts, hidden, inter) = (4, 48, 32);
    let counts = [3, 0, 12, 5];
    let up_spec = Spec::new(experts, hidden, 2 * inter, &counts)
        .swiglu()
        .dtypes(DType::BF16, DType::BF16, DType::BF16);
    let up = inputs(&up_spec, 16);
    let down_spec = Spec::new(experts, inter, hidden, &counts).scaled();
    let down = inputs(&down_spec, 17);
    let m = up.m_total();
    let offsets_dev = g
        .upload(
            &Tensor::i32(
                &[experts + 1],
                up.offsets.iter().map(|&o| o as i32).collect(),
            )
            .unwrap(),
        )
        .unwrap();
    let x = g.upload(&up.x).unwrap();
    let w_up = ExpertWeights::upload(g, &up.w).unwrap();
    let w_down = ExpertWeights::upload(g, &down.w).unwrap();
    let scale = g.upload(down.scale.as_ref().unwrap()).unwrap();
    let h = g.zeros(&[m, inter], DType::BF16).unwrap();
    let out = g.zeros(&[m, hidden], DType::F32).unwrap();
    let gate_up = GmmPlan::new(
        g,
        &GmmArgs {
            x: &x,
            groups: DeviceGroups::Offsets(&offsets_dev),
            weights: &w_up,
            row_scale: None,
            y: &h,
            host_offsets: None,
        },
        &up.options,
    )
    .unwrap();
    let down_plan = GmmPlan::new(
        g,
        &GmmArgs {
            x: &h,
            groups: DeviceGroups::Offsets(&offsets_dev),
            weights: &w_down,
            row_scale: Some(&scale),
            y: &out,
            host_offsets: None,
        },
        &down.options,
    )
    .unwrap();
    g.run(|rec| {
        gate_up.record(rec)?;
        down_plan.record(rec)
    })
    .unwrap();
    // Reference: the intermediate is stored in bf16, as on the GPU.
    let h_ref = up.reference(&gate_up.coop_groups(&up.offsets));
    let h_host = Tensor::from_f32(
        &[m, inter],
        &h_ref.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        DType::BF16,
    )
    .unwrap();
    assert_matches(
        &g.download_f32(&h).unwrap(),
        &h_ref,
        swiftgmm::tolerance(DType::BF16),
        "intermediate",
    );
    let want = reference::grouped_matmul_staged(
        &h_host,
        &up.offsets,
        &down.w,
        Layout::Nk,
        Activation::None,
        down.scale.as_ref(),
        &down_plan.coop_groups(&up.offsets),
    )
    .unwrap();
    // The GPU's intermediate may round a few values the other way: bf16 tolerance.
    assert_matches(
        &g.download_f32(&out).unwrap(),
        &want,
        swiftgmm::tolerance(DType::BF16),
        "chain output",
    );
}

#[test]
fn weights_split_across_shards() {
    let g = gpu();
    let spec = Spec::new(6, 40, 24, &MIXED).layout(Layout::Kn).swiglu();
    let inp = inputs(&spec, 18);
    let expert_bytes = (40 * 24 * 2) as u64;
    let weights = ExpertWeights::upload_split(g, &inp.w, 2 * expert_bytes + 16).unwrap();
    assert_eq!(weights.shards().len(), 3);
    assert_eq!(
        weights
            .shards()
            .iter()
            .map(|s| s.first_expert)
            .collect::<Vec<_>>(),
        vec![0, 2, 4]
    );
    let x = g.upload(&inp.x).unwrap();
    let offsets_dev = g
        .upload(&Tensor::u32(&[7], inp.offsets.clone()).unwrap())
        .unwrap();
    for host in [true, false] {
        let y = g.zeros(&[inp.m_total(), 12], DType::F32).unwrap();
        let args = GmmArgs {
            x: &x,
            groups: DeviceGroups::Offsets(&offsets_dev),
            weights: &weights,
            row_scale: None,
            y: &y,
            host_offsets: host.then_some(inp.offsets.as_slice()),
        };
        let plan = GmmPlan::new(g, &args, &inp.options).unwrap();
        assert!(
            plan.variant().contains("3 weight shards"),
            "{}",
            plan.variant()
        );
        g.run(|rec| plan.record(rec)).unwrap();
        assert_matches(
            &g.download_f32(&y).unwrap(),
            &inp.reference(&plan.coop_groups(&inp.offsets)),
            swiftgmm::tolerance(DType::F32),
            "sharded",
        );
    }
    // An expert larger than the shard limit cannot be split further.
    let err = ExpertWeights::upload_split(g, &inp.w, expert_bytes - 16).unwrap_err();
    assert!(matches!(err, Error::Limit { .. }), "{err}");
}

#[test]
fn registry_cases_and_per_expert_baseline_match_the_reference() {
    let g = gpu();
    let op = &swiftgmm::OPERATOR;
    // The 16-bit cases (the int8 ones, without a baseline, are in tests/swiftgmm_quant.rs).
    let cases: Vec<_> = op
        .cases(Scale::Ci, g)
        .into_iter()
        .filter(|c| {
            c.info()
                .params
                .iter()
                .any(|(k, v)| k == "quant" && v == "none")
        })
        .collect();
    assert!(cases.len() >= 4);
    for case in cases {
        let name = case.info().name;
        // The baseline alone, on fresh (zero) outputs.
        let prepared = case.prepare(g).unwrap();
        assert!(prepared.baseline().is_some());
        g.run(|rec| prepared.record_baseline(rec)).unwrap();
        let checks = prepared.verify().unwrap();
        assert!(!checks.is_empty(), "{name}: nothing verified");
        for c in checks {
            assert!(
                c.comparison.pass,
                "{name} baseline: {}",
                c.comparison.summary(&c.shape)
            );
        }
        let prepared = case.prepare(g).unwrap();
        g.run(|rec| prepared.record(rec)).unwrap();
        let checks = prepared.verify().unwrap();
        assert!(!checks.is_empty(), "{name}: nothing verified");
        for c in checks {
            assert!(
                c.comparison.pass,
                "{name}: {}",
                c.comparison.summary(&c.shape)
            );
        }
        assert!(case.bytes() > 0 && case.flops() > 0);
    }
    assert!(!op.paths(g).is_empty());
}

#[test]
fn named_tensor_interface_matches_its_reference() {
    let g = gpu();
    let op = &swiftgmm::OPERATOR;
    let spec = Spec::new(4, 32, 40, &[3, 0, 11, 2])
        .layout(Layout::Kn)
        .swiglu()
        .scaled();
    let inp = inputs(&spec, 24);
    let mut named = fusedops::registry::NamedTensors::new();
    named.insert("x".into(), inp.x.clone());
    named.insert("w".into(), inp.w.clone());
    named.insert(
        "counts".into(),
        Tensor::i32(&[4], vec![3, 0, 11, 2]).unwrap(),
    );
    named.insert("row_scale".into(), inp.scale.clone().unwrap());
    // Default tiling: the test must not read the user's tiling cache.
    let params = serde_json::json!({
        "layout": "kn", "activation": "swiglu", "out_dtype": "bf16", "tiling": "defaults"
    });
    let got = op.run_named(g, &named, &params).unwrap();
    let want = op.reference_named(&named, &params).unwrap();
    assert_eq!(got["y"].dtype(), DType::BF16);
    assert_eq!(got["y"].shape(), want["y"].shape());
    let c = compare(
        &got["y"].to_f32(),
        &want["y"].to_f32(),
        op.tolerance("y", &named, &params),
    );
    assert!(c.pass, "{}", c.summary(got["y"].shape()));
    // Both group forms at once, an unknown parameter: errors.
    named.insert(
        "offsets".into(),
        Tensor::u32(&[5], vec![0, 3, 3, 14, 16]).unwrap(),
    );
    assert!(matches!(
        op.run_named(g, &named, &params),
        Err(Error::Invalid { .. })
    ));
    named.remove("counts");
    let bad = serde_json::json!({"layout": "kn", "tile": 3});
    assert!(matches!(
        op.run_named(g, &named, &bad),
        Err(Error::Format { .. })
    ));
}

#[test]
fn runs_without_optional_features() {
    // No kernel depends on f16 arithmetic or subgroups: the plain device gives the same result.
    let g = gpu_without(&[Feature::ShaderF16, Feature::Subgroups]);
    let spec = Spec::new(6, 40, 24, &MIXED).swiglu().scaled();
    check(&g, &spec, 19, "without f16 and subgroups");
}

#[test]
fn tiling_cache_round_trip() {
    let g = gpu();
    let dir = std::env::temp_dir().join(format!("swiftgmm-cache-test-{}", std::process::id()));
    let path = dir.join(tiling::CACHE_FILE);
    let key = ShapeKey {
        x_dtype: DType::BF16,
        w_dtype: DType::BF16,
        layout: Layout::Nk,
        k: 32,
        n: 48,
        rows_bucket: 2,
        gemm: auto_path(g),
    };
    let settings = TuneSettings {
        warmup: 0,
        iters: 1,
        weight_bytes: 1 << 14,
        max_experts: 2,
        max_rows: 8,
        threshold_probes: vec![1, 4],
        max_candidates: 2,
    };
    let mut cache = TilingCache::open(&path).unwrap();
    assert!(
        cache.entries().is_empty(),
        "a missing file is an empty cache"
    );
    let config: TileConfig = cache.lookup_or_tune(g, &key, &settings).unwrap();
    assert!(path.exists(), "tuning saves the cache");
    let entry = cache.get(&tiling::adapter_id(g), &key).unwrap().clone();
    assert_eq!(entry.config, config);
    assert!(entry.gemv_us.is_some_and(|t| t > 0.0) && entry.gemm_us.is_some_and(|t| t > 0.0));
    assert_eq!(entry.probes.len(), 2);
    assert!([0, 1, 4].contains(&config.threshold));

    // Reused on the next run: a fresh load finds the same entry, and no tuning happens.
    let mut reopened = TilingCache::open(&path).unwrap();
    assert_eq!(reopened.entries(), std::slice::from_ref(&entry));
    assert_eq!(reopened.lookup_or_tune(g, &key, &settings).unwrap(), config);
    assert_eq!(
        reopened.entries(),
        std::slice::from_ref(&entry),
        "a hit measures nothing"
    );

    // The stored configuration computes correct results.
    let spec = Spec::new(3, 32, 48, &[2, 0, 4]);
    let mut inp = inputs(&spec, 20);
    inp.options.tiling = Tiling::Fixed(config);
    check_inputs(g, &inp, "tuned config");

    // Rebuild measures every entry again; clear removes the file.
    assert_eq!(reopened.rebuild(g, &settings).unwrap(), 1);
    assert_eq!(TilingCache::open(&path).unwrap().entries().len(), 1);
    reopened.clear().unwrap();
    assert!(!path.exists() && reopened.entries().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_configurations_are_refused() {
    let g = gpu();
    let spec = Spec::new(3, 32, 48, &[2, 0, 4]);
    let mut inp = inputs(&spec, 21);
    let mut config = tiling::default_config(
        g,
        &ShapeKey {
            x_dtype: DType::BF16,
            w_dtype: DType::BF16,
            layout: Layout::Nk,
            k: 32,
            n: 48,
            rows_bucket: 2,
            gemm: auto_path(g),
        },
    );
    config.threshold = config.gemv.rows + 1;
    inp.options.tiling = Tiling::Fixed(config);
    let err = swiftgmm::run(
        g,
        &inp.x,
        &Groups::Offsets(inp.offsets.clone()),
        &inp.w,
        None,
        &inp.options,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    config.threshold = 0;
    // Tiles past the invocation limit, on the GEMM kernel in use.
    match auto_path(g) {
        GemmPath::Simt => config.gemm.tm = 4096,
        GemmPath::Coop(_) => config.coop.sg_m = 128,
    }
    inp.options.tiling = Tiling::Fixed(config);
    let err = swiftgmm::run(
        g,
        &inp.x,
        &Groups::Offsets(inp.offsets.clone()),
        &inp.w,
        None,
        &inp.options,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Limit { .. }), "{err}");
}

/// A plan over device tensors that must fail; y must be untouched afterwards.
fn plan_error(g: &Gpu, args: &GmmArgs, options: &Options) -> Error {
    let before = g.download(args.y).unwrap();
    let err = GmmPlan::new(g, args, options).unwrap_err();
    g.wait().unwrap();
    assert_eq!(
        g.download(args.y).unwrap(),
        before,
        "output changed on error: {err}"
    );
    err
}

#[test]
fn bad_inputs_return_typed_errors_and_dispatch_nothing() {
    // The cooperative-matrix GEMM path (where the adapter has it) refuses exactly what the SIMT
    // one refuses.
    refuses_bad_inputs(gpu(), GemmKernel::Simt);
    refuses_bad_inputs(gpu(), GemmKernel::Auto);
}

fn refuses_bad_inputs(g: &Gpu, kernel: GemmKernel) {
    let spec = Spec::new(3, 32, 48, &[2, 0, 4]).kernel(kernel);
    let inp = inputs(&spec, 22);
    let dev = upload(g, &inp);
    let m = inp.m_total();
    let y = g
        .upload(&Tensor::f32(&[m, 48], vec![1.5; m * 48]).unwrap())
        .unwrap();
    let offsets_dev = g
        .upload(&Tensor::u32(&[4], inp.offsets.clone()).unwrap())
        .unwrap();
    let args = GmmArgs {
        x: &dev.x,
        groups: DeviceGroups::Offsets(&offsets_dev),
        weights: &dev.weights,
        row_scale: None,
        y: &y,
        host_offsets: Some(&inp.offsets),
    };
    let opts = inp.options;

    // Host offsets: not monotone, past m_total, wrong length.
    let err = plan_error(
        g,
        &GmmArgs {
            host_offsets: Some(&[0, 3, 2, 6]),
            ..args
        },
        &opts,
    );
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    let err = plan_error(
        g,
        &GmmArgs {
            host_offsets: Some(&[0, 2, 2, 7]),
            ..args
        },
        &opts,
    );
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    let err = plan_error(
        g,
        &GmmArgs {
            host_offsets: Some(&[0, 2, 6]),
            ..args
        },
        &opts,
    );
    assert!(matches!(err, Error::Shape { .. }), "{err}");

    // Device offsets of the wrong length or dtype.
    let short = g
        .upload(&Tensor::u32(&[3], vec![0, 2, 6]).unwrap())
        .unwrap();
    let err = plan_error(
        g,
        &GmmArgs {
            groups: DeviceGroups::Offsets(&short),
            ..args
        },
        &opts,
    );
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let float = g
        .upload(&Tensor::f32(&[4], vec![0.0, 2.0, 2.0, 6.0]).unwrap())
        .unwrap();
    let err = plan_error(
        g,
        &GmmArgs {
            groups: DeviceGroups::Offsets(&float),
            ..args
        },
        &opts,
    );
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");

    // Weights whose k differs from x, or given in the other layout.
    let wrong =
        ExpertWeights::upload(g, &Tensor::zeros(&[3, 48, 33], DType::BF16).unwrap()).unwrap();
    let err = plan_error(
        g,
        &GmmArgs {
            weights: &wrong,
            ..args
        },
        &opts,
    );
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let kn = Options {
        layout: Layout::Kn,
        ..opts
    };
    let err = plan_error(g, &args, &kn);
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let four =
        ExpertWeights::upload(g, &Tensor::zeros(&[4, 48, 32], DType::BF16).unwrap()).unwrap();
    let err = plan_error(
        g,
        &GmmArgs {
            weights: &four,
            ..args
        },
        &opts,
    );
    assert!(matches!(err, Error::Shape { .. }), "{err}");

    // SwiGLU with odd n; output of the wrong shape.
    let odd = ExpertWeights::upload(g, &Tensor::zeros(&[3, 47, 32], DType::BF16).unwrap()).unwrap();
    let y_odd = g.zeros(&[m, 47], DType::F32).unwrap();
    let swiglu = Options {
        activation: Activation::SwiGlu,
        ..opts
    };
    let err = plan_error(
        g,
        &GmmArgs {
            weights: &odd,
            y: &y_odd,
            ..args
        },
        &swiglu,
    );
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    let err = plan_error(g, &args, &swiglu);
    assert!(matches!(err, Error::Shape { .. }), "{err}");

    // Row scale of the wrong shape or dtype.
    let scale = g.zeros(&[m + 1], DType::F32).unwrap();
    let err = plan_error(
        g,
        &GmmArgs {
            row_scale: Some(&scale),
            ..args
        },
        &opts,
    );
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let scale16 = g.zeros(&[m], DType::F16).unwrap();
    let err = plan_error(
        g,
        &GmmArgs {
            row_scale: Some(&scale16),
            ..args
        },
        &opts,
    );
    assert!(matches!(err, Error::Shape { .. }), "{err}");

    // The per-expert baseline needs host offsets.
    let err = PerExpertBaseline::new(
        g,
        &GmmArgs {
            host_offsets: None,
            ..args
        },
        &opts,
    )
    .err();
    assert!(matches!(err, Some(Error::Invalid { .. })));

    // The convenience call validates before uploading anything.
    let run = |groups: Groups| swiftgmm::run(g, &inp.x, &groups, &inp.w, None, &opts).unwrap_err();
    assert!(matches!(
        run(Groups::Counts(vec![4, 0, 4])),
        Error::Invalid { .. }
    ));
    assert!(matches!(
        run(Groups::Counts(vec![1, 1])),
        Error::Shape { .. }
    ));
    assert!(matches!(
        run(Groups::Offsets(vec![0, 5, 4, 6])),
        Error::Invalid { .. }
    ));
    assert!(matches!(
        Groups::from_tensor(&Tensor::i32(&[2], vec![0, -1]).unwrap(), false),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn a_binding_past_the_device_limit_is_refused() {
    let g = gpu();
    // One expert with k = 16 and enough columns to pass the storage-binding limit by a little.
    let max = g.caps.max_storage_binding;
    let n = (max / (16 * 4) + 1) as usize;
    let too_big = g.zeros(&[1, 16, n], DType::F32);
    let Ok(w) = too_big else {
        // The buffer limit is the binding limit here: the refusal came at allocation.
        let err = too_big.unwrap_err();
        assert!(matches!(err, Error::Limit { .. }), "{err}");
        return;
    };
    let weights = ExpertWeights::from_device(w).unwrap();
    let x = g.zeros(&[1, 16], DType::F32).unwrap();
    let offsets = g.upload(&Tensor::u32(&[2], vec![0, 1]).unwrap()).unwrap();
    let y = g.zeros(&[1, n], DType::F32).unwrap();
    let args = GmmArgs {
        x: &x,
        groups: DeviceGroups::Offsets(&offsets),
        weights: &weights,
        row_scale: None,
        y: &y,
        host_offsets: Some(&[0, 1]),
    };
    let options = Options {
        layout: Layout::Kn,
        tiling: Tiling::Defaults,
        ..Options::default()
    };
    let err = GmmPlan::new(g, &args, &options).unwrap_err();
    assert!(matches!(err, Error::Limit { .. }), "{err}");
}

/// On the coop lane the GEMM path runs on cooperative matrices with the adapter's fragment and
/// is checked; `FUSEDOPS_DISABLE=coop` (here: the feature left off) gives SIMT, and forcing the
/// cooperative-matrix kernel there is refused.
#[test]
fn the_coop_path_is_chosen_and_checked() {
    let g = gpu();
    let spec = Spec::new(4, 40, 48, &[20, 0, 9, 3]).swiglu();
    let inp = inputs(&spec, 30);
    match common::coop_fragment() {
        Some(fragment) => {
            assert_eq!(auto_path(g), GemmPath::Coop(fragment));
            let coop = check_inputs(g, &inp, "coop");
            assert_eq!(
                coop,
                vec![true, false, true, false],
                "GEMM-sized groups on coop"
            );
            let variant = plan_variant(g, &inp);
            assert!(
                variant.contains(&format!("gemm coop{}", fragment.name())),
                "{variant}"
            );
            let info = swiftgmm::OPERATOR.paths(g);
            assert!(
                info.iter()
                    .any(|(what, how)| what == "gemm" && how.contains(fragment.name())),
                "{info:?}"
            );
        }
        None => assert_eq!(auto_path(g), GemmPath::Simt),
    }
    let plain = gpu_without(&[Feature::CooperativeMatrix]);
    assert_eq!(auto_path(&plain), GemmPath::Simt);
    assert!(plan_variant(&plain, &inp).contains("gemm simt"));
    let coop = check_inputs(&plain, &inp, "coop switched off");
    assert!(coop.iter().all(|&c| !c));
    let forced = Options {
        gemm_kernel: GemmKernel::Coop,
        ..inp.options
    };
    let err = swiftgmm::run(
        &plain,
        &inp.x,
        &Groups::Offsets(inp.offsets.clone()),
        &inp.w,
        None,
        &forced,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    let (_, reason) = swiftgmm::OPERATOR
        .paths(&plain)
        .into_iter()
        .find(|(what, _)| what == "gemm")
        .unwrap();
    assert!(reason.contains("SIMT"), "{reason}");
}

fn plan_variant(g: &Gpu, inp: &Inputs) -> String {
    let dev = upload(g, inp);
    let offsets = g
        .upload(&Tensor::u32(&[inp.offsets.len()], inp.offsets.clone()).unwrap())
        .unwrap();
    let y = g.zeros(&inp.y_shape(), inp.options.out_dtype).unwrap();
    let args = GmmArgs {
        x: &dev.x,
        groups: DeviceGroups::Offsets(&offsets),
        weights: &dev.weights,
        row_scale: dev.scale.as_ref(),
        y: &y,
        host_offsets: Some(&inp.offsets),
    };
    GmmPlan::new(g, &args, &inp.options)
        .unwrap()
        .variant()
        .to_string()
}

/// Forced GEMM (so that even 1-row groups take it), on both kernels: m, n and k not multiples of
/// the block (k 37, n 53 or 54, groups of 1 to 33 rows), empty experts, all rows in one expert,
/// both layouts, every epilogue and output dtype (16-bit with odd row lengths too).
#[test]
fn gemm_edge_tiles_layouts_and_epilogues_on_both_kernels() {
    let g = gpu();
    use DType::{BF16, F16, F32};
    let groups: [&[u32]; 3] = [&[33, 0, 1, 7], &[0, 0, 0, 29], &[1, 1, 0, 1]];
    let mut seed = 100;
    for kernel in [GemmKernel::Simt, GemmKernel::Auto] {
        for layout in [Layout::Kn, Layout::Nk] {
            for (act, n) in [(Activation::None, 53), (Activation::SwiGlu, 54)] {
                for (out, counts) in [(F32, groups[0]), (F16, groups[1]), (BF16, groups[2])] {
                    seed += 1;
                    let mut spec = Spec::new(4, 37, n, counts)
                        .layout(layout)
                        .dtypes(BF16, BF16, out)
                        .mode(Mode::Gemm)
                        .kernel(kernel)
                        .padded(1, 2);
                    spec.activation = act;
                    spec.scale = seed % 2 == 0;
                    let what = format!("{kernel:?} {layout:?} {act:?} n={n} {out} {counts:?}");
                    let coop = check(g, &spec, seed, &what);
                    let on_coop = kernel == GemmKernel::Auto && common::coop_fragment().is_some();
                    let busy: Vec<bool> = counts.iter().map(|&c| c > 0).collect();
                    assert_eq!(coop, if on_coop { busy } else { vec![false; 4] }, "{what}");
                }
            }
        }
    }
    // Mixed dtypes: f32 x (4 elements per vector) with f16 weights, k a multiple of 8.
    let spec = Spec::new(3, 40, 24, &[17, 0, 5])
        .dtypes(F32, F16, F32)
        .mode(Mode::Gemm);
    check(g, &spec, 150, "f32 x f16 w");
}

/// 16-bit outputs of odd length: with an odd n_out the rows do not start on a word, so two
/// outputs of one word can belong to different tiles, paths or dispatches. Words are never raced
/// on: padding rows keep their sentinel bits exactly, and every group row matches.
#[test]
fn sixteen_bit_outputs_of_odd_length() {
    let g = gpu();
    // GEMV-sized and GEMM-sized groups side by side, padding before and after.
    let counts = [3, 17, 0, 1, 40];
    for kernel in [GemmKernel::Simt, GemmKernel::Auto] {
        for (out, act, n, layout) in [
            (DType::BF16, Activation::None, 33, Layout::Nk),
            (DType::F16, Activation::SwiGlu, 42, Layout::Kn),
            (DType::BF16, Activation::SwiGlu, 2, Layout::Nk),
        ] {
            let mut spec = Spec::new(5, 24, n, &counts)
                .layout(layout)
                .dtypes(DType::BF16, DType::BF16, out)
                .kernel(kernel)
                .padded(3, 1);
            spec.activation = act;
            let inp = inputs(&spec, 160 + n as u64);
            let [m, n_out] = inp.y_shape();
            assert_eq!(n_out % 2, 1);
            let sentinel = Tensor::from_f32(&[m, n_out], &vec![7.25; m * n_out], out).unwrap();
            let dev = upload(g, &inp);
            let offsets = g
                .upload(&Tensor::u32(&[6], inp.offsets.clone()).unwrap())
                .unwrap();
            let y = g.upload(&sentinel).unwrap();
            let args = GmmArgs {
                x: &dev.x,
                groups: DeviceGroups::Offsets(&offsets),
                weights: &dev.weights,
                row_scale: None,
                y: &y,
                host_offsets: Some(&inp.offsets),
            };
            let plan = GmmPlan::new(g, &args, &inp.options).unwrap();
            assert!(
                plan.variant().starts_with("gemv+gemm"),
                "{}",
                plan.variant()
            );
            g.run(|rec| plan.record(rec)).unwrap();
            let got = g.download(&y).unwrap().to_f32();
            let want = inp.reference(&plan.coop_groups(&inp.offsets));
            let what = format!("{kernel:?} {out} {act:?} n_out={n_out}");
            for row in 0..m {
                let r = &got[row * n_out..(row + 1) * n_out];
                if reference::group_of_row(&inp.offsets, row).is_none() {
                    assert!(
                        r.iter().all(|&v| v == 7.25),
                        "{what}: padding row {row}: {r:?}"
                    );
                } else {
                    let w = &want[row * n_out..(row + 1) * n_out];
                    assert_matches(r, w, swiftgmm::tolerance(out), &format!("{what} row {row}"));
                }
            }
        }
    }
}

/// bf16 inputs past the f16 range: on cooperative matrices they are saturated at ±65504 while
/// staged (a finite input never becomes inf), exactly as `reference::stage_f16`; on SIMT they
/// are used as they are. inf and NaN inputs still reach the output.
#[test]
fn bf16_values_outside_the_f16_range() {
    let g = gpu();
    let spec = Spec::new(2, 24, 16, &[12, 9])
        .dtypes(DType::BF16, DType::BF16, DType::F32)
        .mode(Mode::Gemm);
    let mut inp = inputs(&spec, 170);
    let mut x = inp.x.to_f32();
    // Row 0: huge finite values (1e5, -3e38, 65520 rounds past f16's max, 7e4); row 1: inf.
    for (i, v) in [(0, 1e5), (5, -3e38), (9, 65520.0), (23, 7e4)] {
        x[i] = v;
    }
    x[24 + 3] = f32::INFINITY;
    // Row 12 (the second group) has a huge weight partner instead: w[1][0][*] (nk: column 0).
    inp.x = Tensor::from_f32(&[21, 24], &x, DType::BF16).unwrap();
    let mut w = inp.w.to_f32();
    w[24 * 16] = 2e6;
    inp.w = Tensor::from_f32(inp.w.shape(), &w, DType::BF16).unwrap();
    for kernel in [GemmKernel::Simt, GemmKernel::Auto] {
        inp.options.gemm_kernel = kernel;
        let y = inp.run(g).to_f32();
        let coop = inp.coop_groups(g);
        assert_matches(
            &y,
            &inp.reference(&coop),
            swiftgmm::tolerance(DType::F32),
            "",
        );
        // Finite inputs give finite outputs; the inf row gives inf or NaN (inf · 0) per column.
        for (row, r) in y.chunks(16).enumerate() {
            if row == 1 {
                assert!(r.iter().all(|v| !v.is_finite()), "{kernel:?} row 1: {r:?}");
            } else {
                assert!(
                    r.iter().all(|v| v.is_finite()),
                    "{kernel:?} row {row}: {r:?}"
                );
            }
        }
        let exact = inp.reference(&[]);
        let saturated = (y[0] as f64 - exact[0]).abs() > 1.0;
        assert_eq!(
            saturated, coop[0],
            "{kernel:?}: saturation only on cooperative matrices"
        );
    }
}

/// Against the exact reference, the cooperative-matrix path stays within the bound derived from
/// the f16 rounding of each staged input (reference::staging_bound), plus the output tolerance:
/// f32 inputs, where staging rounds every value.
#[test]
fn coop_error_is_within_the_derived_staging_bound() {
    let g = gpu();
    for (act, scale) in [(Activation::None, false), (Activation::SwiGlu, true)] {
        let mut spec = Spec::new(3, 64, 48, &[19, 0, 11])
            .dtypes(DType::F32, DType::F32, DType::F32)
            .mode(Mode::Gemm);
        spec.activation = act;
        spec.scale = scale;
        let inp = inputs(&spec, 180);
        let y = inp.run(g).to_f32();
        let coop = inp.coop_groups(g);
        let exact = inp.reference(&[]);
        let bound = reference::staging_bound(
            &inp.x,
            &inp.offsets,
            &inp.w,
            inp.options.layout,
            act,
            inp.scale.as_ref(),
            &coop,
        )
        .unwrap();
        let tol = swiftgmm::tolerance(DType::F32);
        let mut worst: f64 = 0.0;
        for (i, (&got, &want)) in y.iter().zip(&exact).enumerate() {
            let allowed = bound[i] + tol.abs.max(tol.rel * want.abs());
            let err = (got as f64 - want).abs();
            assert!(
                err <= allowed,
                "{act:?} element {i}: {got} vs {want}, bound {}",
                bound[i]
            );
            worst = worst.max(err / allowed);
        }
        if coop.iter().any(|&c| c) {
            // The bound is not vacuous: staging f32 inputs moves the result.
            assert!(bound.iter().any(|&b| b > 1e-4), "{act:?}");
            assert!(worst > 0.0);
        }
    }
}

fn cli(args: &[&str], cache_dir: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fusedops"))
        .args(args)
        .env("FUSEDOPS_CACHE_DIR", cache_dir)
        .env_remove("FUSEDOPS_TILING_CACHE")
        .output()
        .expect("the binary runs")
}

/// Issue 13 item 7: a tiling cache that cannot be read or written, or holds an unusable entry, is
/// a warning naming swiftgmm_tiling.json, and the run goes on (an unwritable one is found before
/// tuning, not after).
#[test]
fn an_unusable_tiling_cache_is_a_warning() {
    let g = gpu();
    let dir = std::env::temp_dir().join(format!("swiftgmm-cli-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = Spec::new(2, 32, 48, &[12, 3]);
    let inp = inputs(&spec, 190);
    let mut named = fusedops::registry::NamedTensors::new();
    named.insert("x".into(), inp.x.clone());
    named.insert("w".into(), inp.w.clone());
    named.insert("counts".into(), Tensor::u32(&[2], vec![12, 3]).unwrap());
    let input = dir.join("in.safetensors");
    fusedops::io::save(&input, &named).unwrap();
    let run = |params: &str, cache: &std::path::Path, name: &str| {
        let output = dir.join(format!("{name}.safetensors"));
        let out = cli(
            &[
                "run",
                "swiftgmm",
                "--input",
                input.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
                "--params",
                params,
                "--reference",
            ],
            cache,
        );
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        );
        assert!(out.status.success(), "{name}: {stdout}{stderr}");
        assert!(stdout.contains("y: ok"), "{name}: {stdout}");
        assert!(output.exists(), "{name}");
        stderr
    };
    let params = r#"{"layout": "nk"}"#;

    // The cache directory is a file: tuning warns first, then runs and keeps the result in memory.
    let file = dir.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let stderr = run(r#"{"layout": "nk", "tiling": "tune"}"#, &file, "tune");
    assert!(
        stderr.contains("warning") && stderr.contains("swiftgmm_tiling.json"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot be written"), "{stderr}");

    // The cache file cannot be read (it is a directory).
    let unreadable = dir.join("unreadable");
    std::fs::create_dir_all(unreadable.join(tiling::CACHE_FILE)).unwrap();
    let stderr = run(params, &unreadable, "unreadable");
    assert!(
        stderr.contains("warning") && stderr.contains("swiftgmm_tiling.json"),
        "{stderr}"
    );

    // An entry for exactly this run whose configuration breaks a rule.
    let cached = dir.join("cached");
    let key = ShapeKey {
        x_dtype: DType::BF16,
        w_dtype: DType::BF16,
        layout: Layout::Nk,
        k: 32,
        n: 48,
        rows_bucket: tiling::rows_bucket(15, 2),
        gemm: auto_path(g),
    };
    let mut config = tiling::default_config(g, &key);
    config.threshold = config.gemv.rows + 1;
    let mut cache = TilingCache::open(cached.join(tiling::CACHE_FILE)).unwrap();
    cache.insert(tiling::CacheEntry {
        adapter: tiling::adapter_id(g),
        key,
        config,
        gemv_us: None,
        gemm_us: None,
        probes: vec![],
        measured_utc: "2026-01-01 00:00:00".into(),
    });
    cache.save().unwrap();
    let stderr = run(params, &cached, "invalid entry");
    assert!(
        stderr.contains("swiftgmm_tiling.json") && stderr.contains("not usable"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
