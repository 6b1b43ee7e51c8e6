//! Roofline probes measured on the current adapter: copy bandwidth, f32 and f16 FMA throughput
//! and, where cooperative matrices exist, an f16 GEMM with f32 accumulation on SwiftGMM's tiled
//! cooperative-matrix kernel (so the compute roof is what a good tiled kernel reaches, at the
//! adapter's fragment size). Each probe checks its own output against the CPU before its number
//! is trusted; benchmark reports divide by these figures.

use crate::error::Result;
use crate::gpu::{Clock, Gpu, Kernel, grid};
use crate::ops::swiftgmm::{
    self, DeviceGroups, ExpertWeights, GemmKernel, GmmArgs, GmmPlan, Layout, Mode, Options, Tiling,
};
use crate::tensor::{DType, Tensor};

const COPY: Kernel = Kernel {
    name: "roofline_copy",
    source: include_str!("../shaders/roofline_copy.wgsl"),
};
const FMA_F32: Kernel = Kernel {
    name: "roofline_fma",
    source: include_str!("../shaders/roofline_fma.wgsl"),
};
const FMA_F16: Kernel = Kernel {
    name: "roofline_fma_f16",
    source: include_str!("../shaders/roofline_fma_f16.wgsl"),
};

/// One probe's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Probe {
    pub name: &'static str,
    /// GB/s for bandwidth probes, TFLOP/s for compute probes.
    pub value: f64,
    pub unit: &'static str,
    pub median_ns: f64,
    pub clock: Clock,
    /// Problem size, for the report.
    pub size: String,
    /// Whether the probe's output matched the CPU; an unverified number is never a denominator.
    pub verified: bool,
}

/// The roofline of the current adapter.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Roofline {
    pub copy: Option<Probe>,
    pub fma_f32: Option<Probe>,
    pub fma_f16: Option<Probe>,
    pub coop_f16: Option<Probe>,
}

impl Roofline {
    /// Verified copy bandwidth in GB/s (read + write bytes).
    pub fn copy_gbps(&self) -> Option<f64> {
        self.copy.as_ref().filter(|p| p.verified).map(|p| p.value)
    }

    /// The best verified compute peak in TFLOP/s for a kernel of this precision class: the
    /// cooperative-matrix probe where `tensor_cores`, else the larger FMA probe.
    pub fn compute_tflops(&self, tensor_cores: bool) -> Option<f64> {
        let verified = |p: &Option<Probe>| p.as_ref().filter(|p| p.verified).map(|p| p.value);
        if tensor_cores {
            if let Some(v) = verified(&self.coop_f16) {
                return Some(v);
            }
        }
        match (verified(&self.fma_f32), verified(&self.fma_f16)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// All probes that ran.
    pub fn probes(&self) -> Vec<&Probe> {
        [&self.copy, &self.fma_f32, &self.fma_f16, &self.coop_f16]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Problem sizes of the probes; [`ProbeSizes::for_gpu`] shrinks them on CPU adapters.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSizes {
    /// Bytes per copy buffer.
    pub copy_bytes: u64,
    /// Invocations and chain length of the FMA probes.
    pub fma_invocations: u32,
    pub fma_iters: u32,
    /// Square GEMM size of the cooperative-matrix probe.
    pub gemm_n: u32,
    pub warmup: usize,
    pub iters: usize,
}

impl ProbeSizes {
    pub fn for_gpu(gpu: &Gpu) -> Self {
        if gpu.is_cpu() {
            ProbeSizes {
                copy_bytes: 16 << 20,
                fma_invocations: 1 << 14,
                fma_iters: 64,
                gemm_n: 256,
                warmup: 1,
                iters: 3,
            }
        } else {
            ProbeSizes {
                copy_bytes: 1 << 30,
                fma_invocations: 1 << 21,
                fma_iters: 1024,
                gemm_n: 8192,
                warmup: 3,
                iters: 20,
            }
        }
    }
}

/// Measure every probe the adapter supports.
pub fn measure(gpu: &Gpu, sizes: &ProbeSizes) -> Result<Roofline> {
    Ok(Roofline {
        copy: Some(copy_probe(gpu, sizes)?),
        fma_f32: Some(fma_probe(gpu, sizes, false)?),
        fma_f16: if gpu.caps.shader_f16 {
            Some(fma_probe(gpu, sizes, true)?)
        } else {
            None
        },
        coop_f16: if swiftgmm::coop_support(gpu).is_ok() {
            Some(coop_gemm_probe(gpu, sizes)?)
        } else {
            None
        },
    })
}

fn dispatch_1d(gpu: &Gpu, pass: &mut wgpu::ComputePass<'_>, groups: u32) {
    let (x, y, z) = grid(groups, gpu.caps.max_workgroups_per_dim);
    pass.dispatch_workgroups(x, y, z);
}

/// Copy bandwidth: read + write bytes per second of a vec4 copy.
pub fn copy_probe(gpu: &Gpu, sizes: &ProbeSizes) -> Result<Probe> {
    let limit = gpu.caps.max_storage_binding.min(gpu.caps.max_buffer_size);
    let bytes = (sizes.copy_bytes.min(limit) / 16) * 16;
    let words = (bytes / 4) as usize;
    // A pattern that a lost or misplaced word would break.
    let pattern: Vec<u32> = (0..words as u32)
        .map(|i| i.wrapping_mul(2654435761))
        .collect();
    let src = gpu.storage_buffer_with("copy src", bytemuck::cast_slice(&pattern))?;
    let dst = gpu.storage_buffer("copy dst", bytes)?;
    let (wg, unroll) = (256u32, 4u32);
    let pipeline = gpu.pipeline(
        &COPY,
        "copy",
        &[("WG", wg as f64), ("UNROLL", unroll as f64)],
    )?;
    let bind = gpu.bind_group(
        &pipeline,
        &[src.as_entire_binding(), dst.as_entire_binding()],
    )?;
    let groups = (bytes / 16).div_ceil((wg * unroll) as u64) as u32;
    let timing = gpu.time(sizes.warmup, sizes.iters, |rec| {
        let mut pass = rec.compute_pass("copy");
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        dispatch_1d(gpu, &mut pass, groups);
        Ok(())
    })?;
    let copied = gpu.read_bytes(&dst, bytes)?;
    let verified = copied == bytemuck::cast_slice::<u32, u8>(&pattern);
    let ns = timing.median_ns();
    Ok(Probe {
        name: "copy",
        value: 2.0 * bytes as f64 / ns,
        unit: "GB/s",
        median_ns: ns,
        clock: timing.clock,
        size: format!("{} MiB read + written", bytes >> 20),
        verified,
    })
}

/// FMA throughput in TFLOP/s (2 FLOPs per FMA), f32 or f16.
pub fn fma_probe(gpu: &Gpu, sizes: &ProbeSizes, half: bool) -> Result<Probe> {
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    #[repr(C)]
    struct Params {
        a: f32,
        b: f32,
        pad: [u32; 2],
    }
    let (a, b) = (0.5f32, 0.25f32);
    let params = gpu.uniform(&Params { a, b, pad: [0; 2] })?;
    let n = sizes.fma_invocations;
    let out = gpu.storage_buffer("fma out", n as u64 * 16)?;
    let wg = 256u32;
    let (kernel, entry) = if half {
        (FMA_F16, "fma_f16")
    } else {
        (FMA_F32, "fma_f32")
    };
    let pipeline = gpu.pipeline(
        &kernel,
        entry,
        &[("WG", wg as f64), ("ITERS", sizes.fma_iters as f64)],
    )?;
    let bind = gpu.bind_group(
        &pipeline,
        &[out.as_entire_binding(), params.as_entire_binding()],
    )?;
    let timing = gpu.time(sizes.warmup, sizes.iters, |rec| {
        let mut pass = rec.compute_pass(entry);
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        dispatch_1d(gpu, &mut pass, n.div_ceil(wg));
        Ok(())
    })?;
    let got: Vec<f32> = bytemuck::cast_slice(&gpu.read_bytes(&out, n as u64 * 16)?).to_vec();
    // The chains converge to b / (1 - a) from any start; check a spread of invocations.
    let verified = (0..n as usize).step_by(997).all(|id| {
        let seed = (id & 1023) as f64 * 1e-3;
        (0..4).all(|lane| {
            let mut sum = 0.0;
            for chain in 0..8 {
                let mut x = seed + 0.1 * lane as f64 + chain as f64;
                for _ in 0..sizes.fma_iters {
                    x = x * a as f64 + b as f64;
                }
                sum += x;
            }
            let tol = if half { 2e-2 } else { 1e-5 };
            (got[id * 4 + lane] as f64 - sum).abs() <= tol * sum.abs().max(1.0)
        })
    });
    let flops = n as f64 * sizes.fma_iters as f64 * 8.0 * 4.0 * 2.0;
    let ns = timing.median_ns();
    Ok(Probe {
        name: if half { "fma_f16" } else { "fma_f32" },
        value: flops / ns / 1e3,
        unit: "TFLOP/s",
        median_ns: ns,
        clock: timing.clock,
        size: format!("{n} invocations x {} iterations", sizes.fma_iters),
        verified,
    })
}

/// f16 GEMM with f32 accumulation on cooperative matrices in TFLOP/s: one `n x n x n` group
/// through SwiftGMM's tiled cooperative-matrix kernel (forced GEMM path, the default tiles of
/// large groups), checked on sampled outputs against an f64 CPU product of the same f16 values.
/// [`Error::Unsupported`](crate::Error::Unsupported) on an adapter without cooperative matrices.
pub fn coop_gemm_probe(gpu: &Gpu, sizes: &ProbeSizes) -> Result<Probe> {
    // Keep each operand within one binding (the f32 output is the largest).
    let mut n = sizes.gemm_n.max(16);
    while (n as u64 * n as u64 * 4) > gpu.caps.max_storage_binding && n > 16 {
        n /= 2;
    }
    let nn = n as usize;
    let values = |seed: u32| -> Vec<f32> {
        (0..n * n)
            .map(|i| ((i.wrapping_mul(seed) >> 7) % 17) as f32 / 16.0 - 0.5)
            .collect()
    };
    let x_host = Tensor::from_f32(&[nn, nn], &values(2654435761), DType::F16)?;
    let w_host = Tensor::from_f32(&[1, nn, nn], &values(2246822519), DType::F16)?;
    let x = gpu.upload(&x_host)?;
    let weights = ExpertWeights::upload(gpu, &w_host)?;
    let offsets_host = [0, n];
    let offsets = gpu.upload(&Tensor::u32(&[2], offsets_host.to_vec())?)?;
    let y = gpu.zeros(&[nn, nn], DType::F32)?;
    let plan = GmmPlan::new(
        gpu,
        &GmmArgs {
            x: &x,
            groups: DeviceGroups::Offsets(&offsets),
            weights: &weights,
            row_scale: None,
            y: &y,
            host_offsets: Some(&offsets_host),
        },
        &Options {
            layout: Layout::Kn,
            mode: Mode::Gemm,
            tiling: Tiling::Defaults,
            gemm_kernel: GemmKernel::Coop,
            ..Options::default()
        },
    )?;
    let timing = gpu.time(sizes.warmup, sizes.iters, |rec| {
        plan.record_as(rec, "coop_gemm")
    })?;
    let got = gpu.download_f32(&y)?;
    let (xv, wv) = (x_host.to_f64(), w_host.to_f64());
    // The values are multiples of 1/16 in [-0.5, 0.5]: exact in f16, products exact in f32, so
    // only the f32 accumulation order differs from the f64 sum.
    let verified = (0..64).all(|s| {
        let (i, j) = ((s * 7919) % nn, (s * 104_729 + 13) % nn);
        let want: f64 = (0..nn).map(|k| xv[i * nn + k] * wv[k * nn + j]).sum();
        (got[i * nn + j] as f64 - want).abs() <= 1e-3 * want.abs().max(1.0)
    });
    let ns = timing.median_ns();
    Ok(Probe {
        name: "coop_f16",
        value: 2.0 * (n as f64).powi(3) / ns / 1e3,
        unit: "TFLOP/s",
        median_ns: ns,
        clock: timing.clock,
        size: format!("{n}^3 f16 -> f32, SwiftGMM {}", plan.variant()),
        verified,
    })
}
