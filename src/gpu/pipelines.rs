//! Shader modules and the compute-pipeline cache.
//!
//! Every kernel source is composed with `shaders/common.wgsl` (dtype codes and 16-bit
//! pack/unpack helpers) before compilation; its `enable` directives are hoisted above the common
//! part because WGSL requires them first. Cooperative-matrix kernels are also instantiated per
//! fragment size ([`Fragment::prelude`]); the size is part of the cache key.

use std::sync::Arc;

use super::{Fragment, Gpu};
use crate::error::{Error, Result};

/// Shared WGSL helpers prepended to every kernel.
pub const COMMON_WGSL: &str = include_str!("../../shaders/common.wgsl");

/// A WGSL kernel file: its name (the file stem in shaders/) and its source.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
}

impl Kernel {
    /// The full module source: the kernel's `enable` lines, then common.wgsl, then the kernel.
    pub fn composed_source(&self) -> String {
        compose(self.source)
    }
}

/// Compose a kernel source with the common helpers (see the module docs).
pub fn compose(kernel_source: &str) -> String {
    compose_with(kernel_source, "")
}

/// Compose a cooperative-matrix kernel for one fragment size: as [`compose`], with the fragment
/// aliases (`FragA`, `FragB`, `FragC`, `FRAG`) declared before the kernel.
pub fn compose_coop(kernel_source: &str, fragment: Fragment) -> String {
    compose_with(kernel_source, &fragment.prelude())
}

fn compose_with(kernel_source: &str, prelude: &str) -> String {
    let (enables, body): (Vec<&str>, Vec<&str>) = kernel_source
        .lines()
        .partition(|l| l.trim_start().starts_with("enable "));
    let mut out =
        String::with_capacity(kernel_source.len() + COMMON_WGSL.len() + prelude.len() + 64);
    for line in enables {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(COMMON_WGSL);
    out.push('\n');
    out.push_str(prelude);
    for line in body {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Cache key of a compute pipeline: shader, fragment size, entry point and override constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub shader: &'static str,
    /// The cooperative-matrix instantiation, `None` for plain kernels.
    pub fragment: Option<Fragment>,
    pub entry: &'static str,
    /// (name, value bits), sorted by name.
    pub constants: Vec<(&'static str, u64)>,
}

impl Gpu {
    fn shader_module(
        &self,
        kernel: &Kernel,
        fragment: Option<Fragment>,
    ) -> Result<Arc<wgpu::ShaderModule>> {
        let key = (kernel.name, fragment);
        if let Some(m) = self.shaders.lock().unwrap().get(&key) {
            return Ok(m.clone());
        }
        let source = match fragment {
            None => kernel.composed_source(),
            Some(f) => compose_coop(kernel.source, f),
        };
        let module = self.checked(|| {
            self.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(kernel.name),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                })
        })?;
        let module = Arc::new(module);
        self.shaders.lock().unwrap().insert(key, module.clone());
        Ok(module)
    }

    /// The compute pipeline for `entry` of `kernel` with these override constants, compiled once
    /// and cached. Compilation errors come back as [`Error::Device`].
    pub fn pipeline(
        &self,
        kernel: &Kernel,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipeline_instance(kernel, None, entry, constants)
    }

    /// The pipeline of a cooperative-matrix kernel instantiated with `fragment`, which must be a
    /// configuration the adapter reports ([`Capabilities::has_coop_fragment`]): an
    /// [`Error::Unsupported`] otherwise, since drivers may run sizes they do not support.
    ///
    /// [`Capabilities::has_coop_fragment`]: super::Capabilities::has_coop_fragment
    pub fn coop_pipeline(
        &self,
        kernel: &Kernel,
        fragment: Fragment,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        if !self.caps.has_coop_fragment(fragment) {
            return Err(Error::unsupported(
                "gpu",
                format!(
                    "{} cooperative-matrix fragments (f16 -> f32) for {}: the adapter reports [{}]",
                    fragment.name(),
                    kernel.name,
                    self.caps
                        .coop_matrix
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        self.pipeline_instance(kernel, Some(fragment), entry, constants)
    }

    fn pipeline_instance(
        &self,
        kernel: &Kernel,
        fragment: Option<Fragment>,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut sorted: Vec<(&'static str, f64)> = constants.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let key = PipelineKey {
            shader: kernel.name,
            fragment,
            entry,
            constants: sorted.iter().map(|(k, v)| (*k, v.to_bits())).collect(),
        };
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let module = self.shader_module(kernel, fragment)?;
        let compile = || {
            self.checked(|| {
                self.device
                    .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(entry),
                        layout: None,
                        module: &module,
                        entry_point: Some(entry),
                        compilation_options: wgpu::PipelineCompilationOptions {
                            constants: &sorted,
                            // Kernels initialise the workgroup memory they read.
                            zero_initialize_workgroup_memory: false,
                        },
                        cache: None,
                    })
            })
        };
        // naga 30's SPIR-V writer panics on some cooperative-matrix code it validated (a
        // coopStore whose offset or stride is a runtime expression not bound with `let`). The
        // GPU-free shader test catches that; this keeps it an error, not a crash, at run time.
        let compiled = super::catch_quietly(compile).unwrap_or_else(|panic| {
            let why = super::panic_message(&*panic);
            Err(Error::Device(format!("shader compiler panicked: {why}")))
        });
        let pipeline = compiled.map_err(|e| match e {
            Error::Device(msg) => {
                Error::Device(format!("compiling {}::{entry}: {msg}", kernel.name))
            }
            other => other,
        })?;
        let pipeline = Arc::new(pipeline);
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// Number of pipelines compiled so far (for tests of the cache).
    pub fn cached_pipelines(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }

    /// A bind group for group 0 of `pipeline`, binding `resources` at 0, 1, 2, ...
    pub fn bind_group(
        &self,
        pipeline: &wgpu::ComputePipeline,
        resources: &[wgpu::BindingResource<'_>],
    ) -> Result<wgpu::BindGroup> {
        let entries: Vec<wgpu::BindGroupEntry> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: r.clone(),
            })
            .collect();
        self.checked(|| {
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enables_are_hoisted_above_the_common_part() {
        let src = "// kernel\nenable f16;\nfn f() {}\n";
        let out = compose(src);
        assert!(out.starts_with("enable f16;\n"));
        assert!(out.find("fn f()").unwrap() > out.find("DTYPE_F32").unwrap());
    }
}
