//! The GPU context, buffers, pipeline cache, timing, error capture, roofline probes and the CLI,
//! run for real on the default adapter (lavapipe in CI).

mod common;

use std::process::Command;

use common::{coop_fragment, gpu, gpu_without};
use fusedops::error::Error;
use fusedops::gpu::{Clock, Feature, Fragment, Kernel};
use fusedops::roofline::{self, ProbeSizes};
use fusedops::tensor::{DType, Tensor};

const COPY: Kernel = Kernel {
    name: "roofline_copy",
    source: include_str!("../shaders/roofline_copy.wgsl"),
};

fn tiny_probes() -> ProbeSizes {
    ProbeSizes {
        copy_bytes: 1 << 20,
        fma_invocations: 4096,
        fma_iters: 32,
        gemm_n: 64,
        warmup: 1,
        iters: 2,
    }
}

#[test]
fn device_reports_what_it_got() {
    let g = gpu();
    let c = &g.caps;
    assert!(c.max_storage_binding >= 1 << 20);
    assert!(c.subgroup_size.0 >= 1 && c.subgroup_size.0 <= c.subgroup_size.1);
    // Cooperative matrices are only reported when the device has the feature on.
    assert_eq!(
        c.coop_matrix.is_empty(),
        !g.device
            .features()
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
    );
    assert_eq!(
        c.shader_f16,
        g.device.features().contains(wgpu::Features::SHADER_F16)
    );
}

#[test]
fn disabled_features_are_not_requested() {
    let g = gpu_without(&[Feature::ShaderF16, Feature::Subgroups, Feature::Timestamps]);
    assert!(!g.caps.shader_f16 && !g.caps.subgroups && !g.caps.timestamps);
    assert!(g.caps.coop_matrix.is_empty(), "coop needs f16");
    assert_eq!(g.caps.disabled, vec!["f16", "subgroups", "timestamps"]);
}

#[test]
fn upload_download_round_trip_every_dtype() {
    let g = gpu();
    // Odd lengths exercise the 16-byte padding and the half-word at the end.
    let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.37 - 5.0).collect();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = Tensor::from_f32(&[37], &values, dtype).unwrap();
        let d = g.upload(&t).unwrap();
        assert_eq!(g.download(&d).unwrap(), t, "{dtype}");
    }
    let ids = Tensor::i32(&[3], vec![-1, 0, i32::MAX]).unwrap();
    assert_eq!(g.download(&g.upload(&ids).unwrap()).unwrap(), ids);
    let z = g.zeros(&[5], DType::F16).unwrap();
    assert_eq!(g.download_f32(&z).unwrap(), vec![0.0; 5]);
}

#[test]
fn write_rejects_a_mismatched_tensor() {
    let g = gpu();
    let d = g.zeros(&[4], DType::F32).unwrap();
    let wrong = Tensor::f32(&[5], vec![1.0; 5]).unwrap();
    assert!(matches!(g.write(&d, &wrong), Err(Error::Shape { .. })));
    let right = Tensor::f32(&[4], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    g.write(&d, &right).unwrap();
    assert_eq!(g.download(&d).unwrap(), right);
}

#[test]
fn pipeline_cache_keys_on_constants() {
    let g = gpu();
    let a = g
        .pipeline(&COPY, "copy", &[("WG", 64.0), ("UNROLL", 2.0)])
        .unwrap();
    let b = g
        .pipeline(&COPY, "copy", &[("UNROLL", 2.0), ("WG", 64.0)])
        .unwrap();
    let c = g
        .pipeline(&COPY, "copy", &[("WG", 64.0), ("UNROLL", 1.0)])
        .unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&a, &b),
        "constant order must not matter"
    );
    assert!(!std::sync::Arc::ptr_eq(&a, &c));
}

/// One fragment-sized product C = A·B, written once against the aliases and instantiated by the
/// pipeline cache for the adapter's fragment size.
const COOP_TILE: Kernel = Kernel {
    name: "test_coop_tile",
    source: "enable f16;\nenable wgpu_cooperative_matrix;\n\
        @group(0) @binding(0) var<storage, read> a: array<f16>;\n\
        @group(0) @binding(1) var<storage, read> b: array<f16>;\n\
        @group(0) @binding(2) var<storage, read_write> c: array<f32>;\n\
        override SG: u32 = 32u;\n\
        @compute @workgroup_size(SG) fn tile() {\n\
            let x = coopLoadT<FragA>(&a[0], FRAG);\n\
            let y = coopLoadT<FragB>(&b[0], FRAG);\n\
            var acc = FragC();\n\
            acc = coopMultiplyAdd(x, y, acc);\n\
            let first = 0u;\n\
            let stride = FRAG;\n\
            coopStoreT(acc, &c[first], stride);\n\
        }\n",
};

#[test]
fn coop_kernels_are_instantiated_for_the_adapters_fragment() {
    let g = gpu();
    let Some(fragment) = coop_fragment() else {
        // Without cooperative matrices the pipeline is refused, not compiled for a guess.
        let e = g
            .coop_pipeline(&COOP_TILE, Fragment::Size8, "tile", &[])
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        return;
    };
    // A size the adapter does not report is refused even though naga would compile it.
    for other in Fragment::ALL {
        if !g.caps.has_coop_fragment(other) {
            assert!(g.coop_pipeline(&COOP_TILE, other, "tile", &[]).is_err());
        }
    }
    let f = fragment.size() as usize;
    let sg = g.caps.subgroup_size.1 as f64;
    let pipeline = g
        .coop_pipeline(&COOP_TILE, fragment, "tile", &[("SG", sg)])
        .unwrap();
    let again = g
        .coop_pipeline(&COOP_TILE, fragment, "tile", &[("SG", sg)])
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&pipeline, &again));
    // Small integers: exact in f16 and in the f32 sum.
    let av: Vec<f32> = (0..f * f).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
    let bv: Vec<f32> = (0..f * f).map(|i| ((i * 3) % 7) as f32 - 3.0).collect();
    let a = g
        .upload(&Tensor::from_f32(&[f * f], &av, DType::F16).unwrap())
        .unwrap();
    let b = g
        .upload(&Tensor::from_f32(&[f * f], &bv, DType::F16).unwrap())
        .unwrap();
    let c = g.zeros(&[f * f], DType::F32).unwrap();
    let bind = g
        .bind_group(
            &pipeline,
            &[
                a.buffer().as_entire_binding(),
                b.buffer().as_entire_binding(),
                c.buffer().as_entire_binding(),
            ],
        )
        .unwrap();
    g.run(|rec| {
        let mut pass = rec.compute_pass("coop tile");
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        Ok(())
    })
    .unwrap();
    let got = g.download_f32(&c).unwrap();
    for i in 0..f {
        for j in 0..f {
            let want: f32 = (0..f).map(|t| av[i * f + t] * bv[t * f + j]).sum();
            assert_eq!(
                got[i * f + j],
                want,
                "C[{i}][{j}] with {} fragments",
                fragment.name()
            );
        }
    }
}

#[test]
fn wgpu_errors_come_back_as_values() {
    let g = gpu();
    // An entry point that does not exist: a validation error, not a panic.
    let err = g.pipeline(&COPY, "no_such_entry", &[]).unwrap_err();
    assert!(matches!(err, Error::Device(_)), "{err}");
    // A bind group missing a binding.
    let p = g.pipeline(&COPY, "copy", &[]).unwrap();
    let buf = g.storage_buffer("x", 64).unwrap();
    let err = g.bind_group(&p, &[buf.as_entire_binding()]).unwrap_err();
    assert!(matches!(err, Error::Device(_)), "{err}");
    // The device is still usable afterwards.
    g.health().unwrap();
}

#[test]
fn oversized_binding_is_refused() {
    let g = gpu();
    let err = g
        .check_binding("huge", g.caps.max_storage_binding + 4)
        .unwrap_err();
    assert!(matches!(err, Error::Limit { .. }));
    let err = g
        .storage_buffer("huge", g.caps.max_buffer_size + 16)
        .unwrap_err();
    assert!(matches!(err, Error::Limit { .. }));
    // A shape whose size wraps around usize must not become a 16-byte buffer with that shape.
    let err = g.zeros(&[1 << 40, 1 << 40], DType::F32).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let err = g.zeros(&[1 << 62], DType::F32).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
}

#[test]
fn copy_probe_is_verified_and_timed() {
    let g = gpu();
    let p = roofline::copy_probe(g, &tiny_probes()).unwrap();
    assert!(p.verified, "copy kernel output differs from its input");
    assert!(p.value > 0.0 && p.median_ns > 0.0);
    let expected = if g.caps.timestamps {
        Clock::GpuTimestamps
    } else {
        Clock::WallClock
    };
    assert_eq!(p.clock, expected);
}

#[test]
fn fma_probes_are_verified() {
    let g = gpu();
    let p = roofline::fma_probe(g, &tiny_probes(), false).unwrap();
    assert!(p.verified && p.value > 0.0);
    if g.caps.shader_f16 {
        let p = roofline::fma_probe(g, &tiny_probes(), true).unwrap();
        assert!(p.verified && p.value > 0.0);
    }
    // The cooperative-matrix probe (SwiftGMM's tiled kernel) at the adapter's fragment size; on
    // the coop lane it must run.
    let coop = fusedops::ops::swiftgmm::coop_support(g);
    assert!(coop.is_ok() || !common::expect_coop(), "{coop:?}");
    if coop.is_ok() {
        let p = roofline::coop_gemm_probe(g, &tiny_probes()).unwrap();
        assert!(p.verified && p.value > 0.0, "{p:?}");
    }
}

#[test]
fn wall_clock_timing_without_timestamps() {
    let g = gpu_without(&[Feature::Timestamps]);
    let p = roofline::copy_probe(&g, &tiny_probes()).unwrap();
    assert!(p.verified);
    assert_eq!(p.clock, Clock::WallClock);
}

#[test]
fn timing_reports_each_pass() {
    let g = gpu();
    if !g.caps.timestamps {
        return eprintln!("adapter has no timestamps: per-pass split not available");
    }
    let p = g.pipeline(&COPY, "copy", &[]).unwrap();
    let src = g.storage_buffer("src", 4096).unwrap();
    let dst = g.storage_buffer("dst", 4096).unwrap();
    let bind = g
        .bind_group(&p, &[src.as_entire_binding(), dst.as_entire_binding()])
        .unwrap();
    let t = g
        .time(1, 3, |rec| {
            for label in ["first", "second"] {
                let mut pass = rec.compute_pass(label);
                pass.set_pipeline(&p);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(t.samples_ns.len(), 3);
    assert_eq!(t.pass_labels, vec!["first", "second"]);
    assert_eq!(t.pass_median_ns.len(), 2);
    assert!(t.median_ns() >= t.pass_median_ns[0]);
}

#[test]
fn timing_a_recording_without_passes_is_an_error() {
    let err = gpu().time(1, 1, |_| Ok(())).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }));
}

fn fusedops() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fusedops"))
}

#[test]
fn cli_info_runs_and_prints_json() {
    let out = fusedops().args(["info", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["environment"]["adapter"]["name"].is_string());
    assert!(v["roofline"]["copy"]["verified"].as_bool().unwrap());
}

#[test]
fn a_feature_the_driver_refuses_is_dropped_and_reported() {
    // Mesa 26.1 lavapipe at 128-bit vectors (an SSE-only CPU) advertises cooperative matrices and
    // then fails vkCreateDevice with them; wgpu-hal panics on that. The device must open without
    // the feature and say so. Other drivers ignore the variable, and then nothing is refused.
    let out = fusedops()
        .args(["info", "--no-probes"])
        .env("LP_NATIVE_VECTOR_WIDTH", "128")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    // A refusal is an info line, not a panic message.
    assert!(!stderr.contains("panicked"), "{stderr}");
    let coop_line = stdout
        .lines()
        .find(|l| l.starts_with("coop-matrix"))
        .expect("info names the cooperative-matrix configurations");
    let refused: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("refused"))
        .collect();
    if common::expect_coop() && coop_line.contains("none") {
        assert!(
            refused.iter().any(|l| l.contains("coop")),
            "cooperative matrices vanished without a `refused` line:\n{stdout}"
        );
    }
    for line in refused {
        assert!(line.contains("advertised"), "{line}");
    }
}

#[test]
fn cli_without_a_driver_fails_with_the_hint() {
    // Point the Vulkan loader at no driver at all: no adapter can exist.
    let out = fusedops()
        .args(["info"])
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no GPU adapter found"), "{stderr}");
    assert!(stderr.contains("mesa-vulkan-drivers"), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("stack backtrace"));
}

#[test]
fn cli_rejects_an_unknown_adapter_name() {
    let out = fusedops()
        .args(["info", "--no-probes"])
        .env("WGPU_ADAPTER_NAME", "no-such-adapter-anywhere")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("matches none of"), "{stderr}");
}
