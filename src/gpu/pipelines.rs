//! Shader modules and the compute-pipeline cache.
//!
//! Every kernel source is composed with `shaders/common.wgsl` (dtype codes and 16-bit
//! pack/unpack helpers) before compilation; its `enable` directives are hoisted above the common
//! part because WGSL requires them first.

use std::sync::Arc;

use super::Gpu;
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
    let (enables, body): (Vec<&str>, Vec<&str>) = kernel_source
        .lines()
        .partition(|l| l.trim_start().starts_with("enable "));
    let mut out = String::with_capacity(kernel_source.len() + COMMON_WGSL.len() + 64);
    for line in enables {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(COMMON_WGSL);
    out.push('\n');
    for line in body {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Cache key of a compute pipeline: shader, entry point and override constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub shader: &'static str,
    pub entry: &'static str,
    /// (name, value bits), sorted by name.
    pub constants: Vec<(&'static str, u64)>,
}

impl Gpu {
    fn shader_module(&self, kernel: &Kernel) -> Result<Arc<wgpu::ShaderModule>> {
        if let Some(m) = self.shaders.lock().unwrap().get(kernel.name) {
            return Ok(m.clone());
        }
        let source = kernel.composed_source();
        let module = self.checked(|| {
            self.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(kernel.name),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                })
        })?;
        let module = Arc::new(module);
        self.shaders
            .lock()
            .unwrap()
            .insert(kernel.name, module.clone());
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
        let mut sorted: Vec<(&'static str, f64)> = constants.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let key = PipelineKey {
            shader: kernel.name,
            entry,
            constants: sorted.iter().map(|(k, v)| (*k, v.to_bits())).collect(),
        };
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let module = self.shader_module(kernel)?;
        let pipeline = self
            .checked(|| {
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
            .map_err(|e| match e {
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
