//! Shared by the GPU tests: one device per test binary. A test that needs a GPU fails with the
//! install hint when there is none; it never passes silently.
#![allow(dead_code)]

use std::sync::OnceLock;

use fusedops::gpu::{Feature, Gpu, GpuOptions};

/// The default adapter, opened once per test binary.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new().unwrap_or_else(|e| panic!("this test needs a GPU adapter.\n{e}")))
}

/// The default adapter with some optional features switched off (to test the fallbacks).
pub fn gpu_without(features: &[Feature]) -> Gpu {
    let mut options = GpuOptions::from_env().expect("valid environment");
    options.disabled.extend_from_slice(features);
    Gpu::with_options(&options).unwrap_or_else(|e| panic!("this test needs a GPU adapter.\n{e}"))
}

/// A seeded generator, so every failure reproduces.
pub fn rng(seed: u64) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// True on the cooperative-matrix CI lane (.ci/coop-lane sets FUSEDOPS_EXPECT_COOP=1): there,
/// tests assert that the cooperative-matrix paths were chosen instead of quietly testing the
/// SIMT fallbacks.
pub fn expect_coop() -> bool {
    std::env::var("FUSEDOPS_EXPECT_COOP").is_ok_and(|v| v == "1")
}

/// The fragment size the coop kernels use on the default adapter; on the coop lane a missing
/// one fails the test.
pub fn coop_fragment() -> Option<fusedops::gpu::Fragment> {
    let fragment = gpu().caps.coop_fragment();
    assert!(
        fragment.is_some() || !expect_coop(),
        "FUSEDOPS_EXPECT_COOP=1 but the adapter reports no f16 -> f32 cooperative-matrix \
         fragment: {:?}",
        gpu().caps.coop_matrix
    );
    fragment
}
