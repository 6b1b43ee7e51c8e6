//! The GPU context: adapter choice, device with the optional features fusedops uses, the pipeline
//! cache, buffer helpers, submission with error capture, and timing.

mod buffers;
mod pipelines;
mod timing;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use pipelines::{
    COMMON_WGSL, Kernel, PipelineKey, compose as compose_shader,
    compose_coop as compose_coop_shader,
};
pub use timing::{Clock, Recorder, Timing};

use crate::error::{Error, NO_ADAPTER_HINT, Result};

/// Optional features that a kernel may use; each has a plain fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Feature {
    /// `f16` arithmetic in shaders (SHADER_F16). Loading f16 data never needs it.
    ShaderF16,
    /// Subgroup operations (SUBGROUP).
    Subgroups,
    /// Cooperative matrices (EXPERIMENTAL_COOPERATIVE_MATRIX), i.e. tensor cores.
    CooperativeMatrix,
    /// GPU timestamp queries; without them timing falls back to the wall clock.
    Timestamps,
}

impl Feature {
    pub const ALL: [Feature; 4] = [
        Feature::ShaderF16,
        Feature::Subgroups,
        Feature::CooperativeMatrix,
        Feature::Timestamps,
    ];

    /// Name used by `FUSEDOPS_DISABLE` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Feature::ShaderF16 => "f16",
            Feature::Subgroups => "subgroups",
            Feature::CooperativeMatrix => "coop",
            Feature::Timestamps => "timestamps",
        }
    }
}

/// How to pick the adapter. [`GpuOptions::from_env`] reads the environment.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Only these backends (WGPU_BACKEND, e.g. `vulkan`, `metal`, `dx12`); `None`: all compiled in.
    pub backends: Option<wgpu::Backends>,
    /// Only adapters whose name contains this, case-insensitively (WGPU_ADAPTER_NAME).
    pub adapter_name: Option<String>,
    /// Features not to request even if the adapter has them
    /// (FUSEDOPS_DISABLE=f16,subgroups,coop,timestamps), so that the plain fallbacks can be run
    /// and tested on any adapter.
    pub disabled: Vec<Feature>,
}

impl GpuOptions {
    /// Options from WGPU_BACKEND, WGPU_ADAPTER_NAME and FUSEDOPS_DISABLE.
    pub fn from_env() -> Result<Self> {
        let backends = match std::env::var("WGPU_BACKEND") {
            Ok(s) if !s.trim().is_empty() => Some(wgpu::Backends::from_comma_list(&s)),
            _ => None,
        };
        let adapter_name = std::env::var("WGPU_ADAPTER_NAME")
            .ok()
            .filter(|s| !s.trim().is_empty());
        let disabled = match std::env::var("FUSEDOPS_DISABLE") {
            Ok(s) => parse_disabled(&s)?,
            Err(_) => Vec::new(),
        };
        Ok(GpuOptions {
            backends,
            adapter_name,
            disabled,
        })
    }
}

/// Parse a comma list of feature names (`f16`, `subgroups`, `coop`, `timestamps`).
pub fn parse_disabled(list: &str) -> Result<Vec<Feature>> {
    let mut out = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let feature = Feature::ALL
            .into_iter()
            .find(|f| f.name() == word)
            .ok_or_else(|| Error::Format {
                what: "FUSEDOPS_DISABLE".into(),
                why: format!(
                    "unknown feature {word:?} (expected f16, subgroups, coop or timestamps)"
                ),
            })?;
        out.push(feature);
    }
    Ok(out)
}

/// One cooperative-matrix configuration the adapter supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CoopConfig {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    /// Input (A, B) element type, e.g. "f16".
    pub ab: &'static str,
    /// Accumulator (C) and result element type.
    pub cr: &'static str,
}

impl std::fmt::Display for CoopConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}x{} {}->{}",
            self.m, self.n, self.k, self.ab, self.cr
        )
    }
}

/// Edge of the square cooperative-matrix fragments (f16 inputs, f32 accumulators) a kernel is
/// instantiated with. WGSL has one type per size (`coop_mat8x8`, `coop_mat16x16`), so a kernel is
/// written once against the aliases `FragA`, `FragB`, `FragC` and the constant `FRAG`, and the
/// pipeline cache prepends [`Fragment::prelude`] for the size the adapter reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Fragment {
    /// 8x8x8: lavapipe (Mesa 26), Apple's simdgroup matrices.
    Size8,
    /// 16x16x16: NVIDIA and AMD tensor/matrix cores.
    Size16,
}

impl Fragment {
    pub const ALL: [Fragment; 2] = [Fragment::Size8, Fragment::Size16];

    /// The edge length in elements.
    pub fn size(self) -> u32 {
        match self {
            Fragment::Size8 => 8,
            Fragment::Size16 => 16,
        }
    }

    /// `8x8` or `16x16`, as reports name it.
    pub fn name(self) -> &'static str {
        match self {
            Fragment::Size8 => "8x8",
            Fragment::Size16 => "16x16",
        }
    }

    /// The WGSL declarations a cooperative-matrix kernel is written against.
    pub fn prelude(self) -> String {
        let t = format!("coop_mat{0}x{0}", self.size());
        format!(
            "// Cooperative-matrix fragments of this instantiation (src/gpu/mod.rs, Fragment).\n\
             alias FragA = {t}<f16, A>;\n\
             alias FragB = {t}<f16, B>;\n\
             alias FragC = {t}<f32, C>;\n\
             const FRAG: u32 = {}u;\n",
            self.size()
        )
    }
}

/// What the device got: the optional features that are on, and the limits kernels must respect.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Capabilities {
    pub shader_f16: bool,
    pub subgroups: bool,
    /// Smallest and largest subgroup size the adapter reports (equal on most GPUs).
    pub subgroup_size: (u32, u32),
    /// Timestamp queries at compute-pass boundaries.
    pub timestamps: bool,
    /// Timestamp writes inside passes and encoders (reported; pass boundaries suffice for timing).
    pub timestamps_inside_passes: bool,
    pub timestamps_inside_encoders: bool,
    /// Supported cooperative-matrix configurations; empty when the feature is off.
    pub coop_matrix: Vec<CoopConfig>,
    pub max_storage_binding: u64,
    pub max_buffer_size: u64,
    pub max_workgroup_storage: u32,
    pub max_invocations_per_workgroup: u32,
    pub max_workgroups_per_dim: u32,
    pub max_storage_buffers_per_stage: u32,
    /// Features the user switched off with FUSEDOPS_DISABLE.
    pub disabled: Vec<&'static str>,
    /// Features the adapter advertised but device creation refused, with the driver's reason;
    /// the device was opened without them.
    pub refused: Vec<String>,
}

impl Capabilities {
    /// Whether the adapter reports the square f16 x f16 -> f32 configuration of `fragment`.
    /// naga does not check fragment sizes against the adapter, and drivers may run sizes they do
    /// not report, so this list is the only authority.
    pub fn has_coop_fragment(&self, fragment: Fragment) -> bool {
        let s = fragment.size();
        self.coop_matrix
            .iter()
            .any(|c| c.m == s && c.n == s && c.k == s && c.ab == "f16" && c.cr == "f32")
    }

    /// The fragment size the cooperative-matrix kernels use on this device: the largest square
    /// f16 -> f32 configuration reported, `None` when there is none (or `FUSEDOPS_DISABLE=coop`),
    /// in which case every operator takes its SIMT kernel.
    pub fn coop_fragment(&self) -> Option<Fragment> {
        Fragment::ALL
            .into_iter()
            .rev()
            .find(|&f| self.has_coop_fragment(f))
    }

    /// The subgroup size kernels may rely on: `Some` only when the adapter fixes one size.
    pub fn fixed_subgroup_size(&self) -> Option<u32> {
        (self.subgroups && self.subgroup_size.0 == self.subgroup_size.1)
            .then_some(self.subgroup_size.0)
    }
}

/// Adapter facts for reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub vendor: u32,
    pub device: u32,
}

/// A compiled shader module: the kernel's name and its fragment instantiation.
type ShaderKey = (&'static str, Option<Fragment>);

/// The GPU context every operator runs on.
pub struct Gpu {
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub caps: Capabilities,
    shaders: Mutex<HashMap<ShaderKey, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    /// Errors raised outside any error scope, and the device-lost message, if any.
    uncaptured: Arc<Mutex<Vec<String>>>,
    lost: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish_non_exhaustive()
    }
}

fn device_type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn scalar_name(t: wgpu::CooperativeScalarType) -> &'static str {
    match t {
        wgpu::CooperativeScalarType::F32 => "f32",
        wgpu::CooperativeScalarType::F16 => "f16",
        wgpu::CooperativeScalarType::I32 => "i32",
        wgpu::CooperativeScalarType::U32 => "u32",
    }
}

/// Optional features in the order they are given up when the driver refuses a device: the
/// experimental one first, timing last (it only affects how runs are measured).
const DROP_ORDER: [(wgpu::Features, &str); 4] = [
    (wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX, "coop"),
    (wgpu::Features::SUBGROUP, "subgroups"),
    (wgpu::Features::SHADER_F16, "f16"),
    (
        wgpu::Features::TIMESTAMP_QUERY
            .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
            .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS),
        "timestamps",
    ),
];

/// `request_device` with `features`, its errors and wgpu-hal's panics as a message.
fn open_device(
    adapter: &wgpu::Adapter,
    features: wgpu::Features,
    limits: &wgpu::Limits,
) -> std::result::Result<(wgpu::Device, wgpu::Queue), String> {
    let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        // SAFETY: the opt-in acknowledges that wgpu's experimental cooperative-matrix support
        // may have bugs; every kernel using it checks its results against a CPU reference in
        // `fusedops check`, and plain kernels are used whenever the feature is off.
        unsafe { wgpu::ExperimentalFeatures::enabled() }
    } else {
        wgpu::ExperimentalFeatures::disabled()
    };
    let request = || {
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("fusedops"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
    };
    match catch_quietly(request) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(panic) => Err(panic_message(&*panic)),
    }
}

thread_local! {
    /// Set while this thread runs a call whose panics [`catch_quietly`] turns into errors.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, catching a panic of wgpu or naga as an `Err` without the panic hook printing it
/// (it becomes a typed error, which says what happened). The hook is wrapped once per process:
/// panics on other threads, or outside such calls, still reach the previous hook.
pub(crate) fn catch_quietly<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    static WRAP_HOOK: std::sync::Once = std::sync::Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(false));
    result
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Gpu {
    /// The default adapter, chosen with the options in the environment (see [`GpuOptions`]).
    pub fn new() -> Result<Self> {
        Gpu::with_options(&GpuOptions::from_env()?)
    }

    /// An adapter chosen with explicit options. Prefers a discrete GPU, then integrated, virtual,
    /// CPU.
    pub fn with_options(options: &GpuOptions) -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        if let Some(backends) = options.backends {
            desc.backends = backends;
        }
        let instance = wgpu::Instance::new(desc);
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let found: Vec<String> = adapters
            .iter()
            .map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend))
            .collect();
        let wanted = options.adapter_name.as_deref().map(str::to_lowercase);
        let adapter = adapters
            .into_iter()
            .filter(|a| match &wanted {
                Some(w) => a.get_info().name.to_lowercase().contains(w),
                None => true,
            })
            .min_by_key(|a| device_type_rank(a.get_info().device_type))
            .ok_or_else(|| Error::NoAdapter {
                detail: match (&wanted, found.is_empty()) {
                    (_, true) => "no adapter on any enabled backend".to_string(),
                    (Some(w), false) => format!(
                        "WGPU_ADAPTER_NAME={w:?} matches none of: {}",
                        found.join(", ")
                    ),
                    (None, false) => format!("none usable among: {}", found.join(", ")),
                },
                hint: NO_ADAPTER_HINT.to_string(),
            })?;
        Gpu::from_adapter(adapter, &options.disabled)
    }

    /// Open a device on `adapter` with its own limits and every optional feature we use.
    pub fn from_adapter(adapter: wgpu::Adapter, disabled: &[Feature]) -> Result<Self> {
        use wgpu::Features as F;
        let info = adapter.get_info();
        let offered = adapter.features();
        let mut wanted = F::empty();
        if !disabled.contains(&Feature::Timestamps) {
            wanted |= F::TIMESTAMP_QUERY
                | F::TIMESTAMP_QUERY_INSIDE_PASSES
                | F::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        }
        if !disabled.contains(&Feature::ShaderF16) {
            wanted |= F::SHADER_F16;
        }
        if !disabled.contains(&Feature::Subgroups) {
            wanted |= F::SUBGROUP;
        }
        // Cooperative matrices need f16 in shaders too (all useful configurations take f16).
        let coop_props = adapter.cooperative_matrix_properties();
        if !disabled.contains(&Feature::CooperativeMatrix)
            && !disabled.contains(&Feature::ShaderF16)
            && !coop_props.is_empty()
        {
            wanted |= F::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let limits = adapter.limits();
        // A driver may advertise a feature and then refuse a device with it (Mesa 26.1 lavapipe
        // offers cooperative matrices at 128-bit vectors, LP_NATIVE_VECTOR_WIDTH=128 or an SSE-only
        // CPU, and then fails vkCreateDevice), and wgpu-hal panics on that refusal. Drop optional features one at a time, the
        // experimental one first, and report what was refused instead of crashing.
        let mut features = offered & wanted;
        let mut refused = Vec::new();
        let (device, queue) = loop {
            match open_device(&adapter, features, &limits) {
                Ok(opened) => break opened,
                Err(why) => {
                    let Some(&(flag, name)) =
                        DROP_ORDER.iter().find(|(f, _)| features.intersects(*f))
                    else {
                        let also = if refused.is_empty() {
                            String::new()
                        } else {
                            format!(" (after dropping {})", refused.join("; "))
                        };
                        return Err(Error::Device(format!(
                            "request_device on {}: {why}{also}",
                            info.name
                        )));
                    };
                    refused.push(format!("{name}: {why}"));
                    features.remove(flag);
                }
            }
        };

        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap().push(e.to_string());
        }));
        let lost = Arc::new(Mutex::new(None));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            *lost_sink.lock().unwrap() = Some(format!("{reason:?}: {message}"));
        });

        let coop_matrix = if features.contains(F::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            coop_props
                .iter()
                .map(|p| CoopConfig {
                    m: p.m_size,
                    n: p.n_size,
                    k: p.k_size,
                    ab: scalar_name(p.ab_type),
                    cr: scalar_name(p.cr_type),
                })
                .collect()
        } else {
            Vec::new()
        };
        let caps = Capabilities {
            shader_f16: features.contains(F::SHADER_F16),
            subgroups: features.contains(F::SUBGROUP),
            subgroup_size: (info.subgroup_min_size, info.subgroup_max_size),
            timestamps: features.contains(F::TIMESTAMP_QUERY),
            timestamps_inside_passes: features.contains(F::TIMESTAMP_QUERY_INSIDE_PASSES),
            timestamps_inside_encoders: features.contains(F::TIMESTAMP_QUERY_INSIDE_ENCODERS),
            coop_matrix,
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_stage: limits.max_storage_buffers_per_shader_stage,
            disabled: disabled.iter().map(|f| f.name()).collect(),
            refused,
        };
        Ok(Gpu {
            adapter,
            device,
            queue,
            info,
            caps,
            shaders: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            uncaptured,
            lost,
        })
    }

    /// Adapter facts for reports.
    pub fn summary(&self) -> AdapterSummary {
        AdapterSummary {
            name: self.info.name.clone(),
            backend: format!("{:?}", self.info.backend),
            device_type: format!("{:?}", self.info.device_type),
            driver: self.info.driver.clone(),
            driver_info: self.info.driver_info.clone(),
            vendor: self.info.vendor,
            device: self.info.device,
        }
    }

    /// True on a CPU driver (lavapipe, WARP, SwiftShader): benchmarks shrink their sizes there.
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Run `f` with wgpu's validation, out-of-memory and internal errors captured; the first one
    /// becomes an [`Error::Device`]. Also reports device loss and errors raised outside scopes.
    pub fn checked<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let errors = [
            pollster::block_on(validation.pop()),
            pollster::block_on(oom.pop()),
            pollster::block_on(internal.pop()),
        ];
        if let Some(e) = errors.into_iter().flatten().next() {
            return Err(Error::Device(match e {
                wgpu::Error::OutOfMemory { .. } => "out of GPU memory".to_string(),
                other => other.to_string(),
            }));
        }
        self.health()?;
        Ok(out)
    }

    /// An error if the device was lost or raised an error outside any scope.
    pub fn health(&self) -> Result<()> {
        if let Some(reason) = self.lost.lock().unwrap().clone() {
            return Err(Error::Device(format!("device lost ({reason})")));
        }
        let mut errs = self.uncaptured.lock().unwrap();
        if !errs.is_empty() {
            let all = errs.join("; ");
            errs.clear();
            return Err(Error::Device(all));
        }
        Ok(())
    }

    /// Wait until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("poll: {e}")))?;
        self.health()
    }

    /// Record with `record`, submit, and wait: the convenience path for running operators once.
    pub fn run<R>(&self, record: impl FnOnce(&mut Recorder) -> Result<R>) -> Result<R> {
        let out = self.checked(|| -> Result<R> {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            let out = {
                let mut rec = Recorder::new(&mut encoder);
                record(&mut rec)?
            };
            self.queue.submit([encoder.finish()]);
            Ok(out)
        })??;
        self.wait()?;
        Ok(out)
    }

    /// Check that a binding of `bytes` fits the device's storage-binding limit.
    pub fn check_binding(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.caps.max_storage_binding {
            return Err(Error::Limit {
                what: format!("storage binding {what}"),
                need: bytes,
                max: self.caps.max_storage_binding,
            });
        }
        Ok(())
    }
}

/// Split `groups` workgroups into a 2-D grid within the per-dimension limit; kernels recover the
/// linear index as `wid.x + wid.y * num_workgroups.x` and skip indices past the end.
pub fn grid(groups: u32, max_per_dim: u32) -> (u32, u32, u32) {
    if groups <= max_per_dim {
        (groups.max(1), 1, 1)
    } else {
        let y = groups.div_ceil(max_per_dim);
        (groups.div_ceil(y), y, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_every_workgroup_within_limits() {
        for groups in [0u32, 1, 65535, 65536, 200_000, 10_000_000] {
            let (x, y, z) = grid(groups, 65535);
            assert!(x <= 65535 && y <= 65535 && z == 1);
            assert!(x as u64 * y as u64 >= groups as u64);
        }
    }

    #[test]
    fn disabled_features_parse() {
        assert_eq!(
            parse_disabled("f16, coop").unwrap(),
            vec![Feature::ShaderF16, Feature::CooperativeMatrix]
        );
        assert!(parse_disabled("tensorcores").is_err());
        assert!(parse_disabled("").unwrap().is_empty());
    }
}
