//! `fusedops._native`: the compiled half of the Python package. It stays thin on purpose: tensors
//! cross as (bytes, shape, dtype) and parameters as the JSON of `fusedops run --params`, every
//! operator goes through the crate's registry (`Operator::run_named` / `reference_named`), and
//! `info` and `bench` are assembled by the same functions as the command line's
//! (`suite::Info`, `suite::run_bench`), so the validation, defaults, parameter names and reports
//! are the crate's own. Array conversion, dtypes and result types live in the Python half
//! (`fusedops/*.py`).

use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, OnceLock};

use fusedops::bench::{BenchSettings, Devices, Environment, Filter};
use fusedops::gpu::Gpu;
use fusedops::ops::amla::{self, KvFormat};
use fusedops::registry::{self, NamedTensors, Scale};
use fusedops::roofline::{self, ProbeSizes};
use fusedops::suite::{self, Info, operators, selected_cases};
use fusedops::tensor::{DType, Tensor, checked_numel};
use fusedops::{Error, Result};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict, PyTuple};

/// The process's GPU context, created on first use. A failed creation is not remembered, so a
/// later call tries again (e.g. after WGPU_ADAPTER_NAME was changed).
static GPU: OnceLock<Gpu> = OnceLock::new();
/// Serialises GPU work: `Gpu` reports device errors through process-wide scopes, so two Python
/// threads must not interleave their submissions. Taken with the GIL released.
static GPU_LOCK: Mutex<()> = Mutex::new(());

fn lock_gpu() -> Result<(MutexGuard<'static, ()>, &'static Gpu)> {
    // A panic while holding the lock leaves nothing half-written that later calls depend on.
    let guard = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = match GPU.get() {
        Some(gpu) => gpu,
        None => {
            let gpu = Gpu::new()?;
            GPU.get_or_init(|| gpu)
        }
    };
    Ok((guard, gpu))
}

/// A fusedops error as the Python exception class of its kind (`fusedops._errors`), with the
/// crate's message. The match has no catch-all: a new error kind must get its own class.
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let class = match &e {
        Error::NoAdapter { .. } => "NoAdapterError",
        Error::Shape { .. } => "ShapeError",
        Error::Invalid { .. } => "InvalidError",
        Error::Unsupported { .. } => "UnsupportedError",
        Error::Limit { .. } => "LimitError",
        Error::Device(_) => "DeviceError",
        Error::Io { .. } => "IoError",
        Error::Format { .. } => "FormatError",
    };
    let message = e.to_string();
    match py
        .import("fusedops._errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((message,)))
    {
        Ok(exception) => PyErr::from_value(exception),
        Err(import_failed) => import_failed,
    }
}

/// One input tensor from `(buffer, shape, dtype)`: `buffer` holds C-contiguous bytes (the Python
/// side makes it so), exactly `prod(shape) * dtype size` of them. The bytes are copied.
fn tensor_of(py: Python<'_>, name: &str, item: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let (buffer, shape, dtype): (Bound<'_, PyAny>, Vec<usize>, String) = item.extract()?;
    let buffer = PyBuffer::<u8>::get(&buffer)?;
    let dtype = DType::from_str(&dtype).map_err(|e| to_py(py, e))?;
    let bytes = checked_numel("python", &shape)
        .ok()
        .and_then(|n| n.checked_mul(dtype.size()));
    if !buffer.is_c_contiguous() || Some(buffer.len_bytes()) != bytes {
        let e = Error::shape(
            "python",
            format!("{name} buffer"),
            buffer.len_bytes(),
            format!("the contiguous bytes of {shape:?} {dtype}"),
        );
        return Err(to_py(py, e));
    }
    Tensor::from_bytes(&shape, dtype, &buffer.to_vec(py)?).map_err(|e| to_py(py, e))
}

fn inputs_of(py: Python<'_>, inputs: &Bound<'_, PyDict>) -> PyResult<NamedTensors> {
    let mut named = NamedTensors::new();
    for (name, item) in inputs.iter() {
        let name: String = name.extract()?;
        let tensor = tensor_of(py, &name, &item)?;
        named.insert(name, tensor);
    }
    Ok(named)
}

/// A tensor as `(bytearray, shape, dtype)`; a bytearray so that the NumPy arrays made from it are
/// writable.
fn output_of<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        [
            PyByteArray::new(py, t.bytes()).into_any(),
            t.shape().into_pyobject(py)?.into_any(),
            t.dtype().name().into_pyobject(py)?.into_any(),
        ],
    )
}

/// Output tensors as `{name: (bytearray, shape, dtype)}`.
fn outputs_of<'py>(py: Python<'py>, named: &NamedTensors) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, t) in named {
        dict.set_item(name, output_of(py, t)?)?;
    }
    Ok(dict)
}

/// Run operator `op` on the GPU: `inputs` `{name: (buffer, shape, dtype)}` and `params` (JSON)
/// as `fusedops run` takes them. Returns the outputs in the same form.
#[pyfunction]
#[pyo3(signature = (op, inputs, params, /))]
fn run<'py>(
    py: Python<'py>,
    op: &str,
    inputs: &Bound<'py, PyDict>,
    params: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let named = inputs_of(py, inputs)?;
    let outputs = py
        .detach(|| -> Result<NamedTensors> {
            let operator = suite::operator(op)?;
            let params = registry::parse_params(params)?;
            let (_guard, gpu) = lock_gpu()?;
            operator.run_named(gpu, &named, &params)
        })
        .map_err(|e| to_py(py, e))?;
    outputs_of(py, &outputs)
}

/// The CPU reference of operator `op` on the same inputs and parameters as [`run`].
#[pyfunction]
#[pyo3(signature = (op, inputs, params, /))]
fn reference<'py>(
    py: Python<'py>,
    op: &str,
    inputs: &Bound<'py, PyDict>,
    params: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let named = inputs_of(py, inputs)?;
    let outputs = py
        .detach(|| -> Result<NamedTensors> {
            suite::operator(op)?.reference_named(&named, &registry::parse_params(params)?)
        })
        .map_err(|e| to_py(py, e))?;
    outputs_of(py, &outputs)
}

/// The adapter, its capabilities, every operator's kernel path and, with `probes`, the roofline
/// probes: the JSON of `fusedops info --json`.
#[pyfunction]
#[pyo3(signature = (probes, /))]
fn info(py: Python<'_>, probes: bool) -> PyResult<String> {
    py.detach(|| -> Result<String> {
        let (_guard, gpu) = lock_gpu()?;
        Ok(Info::of(gpu, probes)?.to_value().to_string())
    })
    .map_err(|e| to_py(py, e))
}

/// AMLA's packed 8-bit cache (`fusedops::ops::amla::quantize_cache`) of a float cache, in the
/// format named by `kv_format` (AMLA's parameter: `fp8` or `int8`).
#[pyfunction]
#[pyo3(signature = (kv_cache, kv_format, /))]
fn quantize_cache<'py>(
    py: Python<'py>,
    kv_cache: &Bound<'py, PyAny>,
    kv_format: &str,
) -> PyResult<Bound<'py, PyTuple>> {
    let cache = tensor_of(py, "kv_cache", kv_cache)?;
    let packed = py
        .detach(|| -> Result<Tensor> {
            let format: KvFormat = serde_json::from_value(kv_format.into()).map_err(|e| {
                Error::Format {
                    what: "amla quantize_cache kv_format".into(),
                    why: e.to_string(),
                }
            })?;
            amla::quantize_cache(&cache, format)
        })
        .map_err(|e| to_py(py, e))?;
    output_of(py, &packed)
}

/// The crate's name of a dtype given by any name it accepts (`bfloat16` -> `bf16`).
#[pyfunction]
#[pyo3(signature = (name, /))]
fn dtype_name(py: Python<'_>, name: &str) -> PyResult<&'static str> {
    DType::from_str(name)
        .map(DType::name)
        .map_err(|e| to_py(py, e))
}

/// Verify and time the registered cases that pass the filter (`fusedops bench`): the report as
/// JSON. `scale` is `bench` (the benchmark shapes, shrunk on CPU adapters), `ci` (the small test
/// shapes) or `full`.
#[pyfunction(name = "bench")]
#[pyo3(signature = (op, preset, params, iters, warmup, scale, /))]
fn bench_report(
    py: Python<'_>,
    op: Option<String>,
    preset: Option<String>,
    params: Vec<(String, String)>,
    iters: usize,
    warmup: usize,
    scale: &str,
) -> PyResult<String> {
    py.detach(|| -> Result<String> {
        let filter = Filter { op, preset, params };
        let scale = match scale {
            "bench" => Scale::Bench,
            "ci" => Scale::Ci,
            "full" => Scale::Full,
            other => {
                return Err(Error::invalid(
                    "bench",
                    "scale",
                    format!("{other:?} (expected \"bench\", \"ci\" or \"full\")"),
                ));
            }
        };
        if let Some(op) = &filter.op {
            suite::operator(op)?;
        }
        if iters == 0 {
            return Err(Error::invalid("bench", "iters", "must be at least 1"));
        }
        let command = format!(
            "fusedops.bench(op={:?}, preset={:?}, case={:?}, iters={iters}, warmup={warmup}, scale={scale:?})",
            filter.op, filter.preset, filter.params
        );
        let (_guard, gpu) = lock_gpu()?;
        let cases = selected_cases(gpu, scale, &filter);
        if cases.is_empty() {
            return Err(Error::invalid("bench", "filter", "no case matches it"));
        }
        let environment = Environment::of(gpu);
        let roof = roofline::measure(gpu, &ProbeSizes::for_gpu(gpu))?;
        // One GPU context: no second, cooperative-matrix-free device for SIMT comparison rows
        // (`fusedops bench` adds those on adapters with cooperative matrices).
        let devices = Devices { gpu, simt: None };
        let settings = BenchSettings { warmup, iters };
        let report = suite::run_bench(
            &cases,
            &devices,
            environment,
            roof,
            settings,
            command,
            |_, _| {},
        );
        Ok(report.to_json())
    })
    .map_err(|e| to_py(py, e))
}

/// The registered operator names.
#[pyfunction]
fn operator_names() -> Vec<&'static str> {
    operators().iter().map(|o| o.name()).collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(reference, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(bench_report, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_cache, m)?)?;
    m.add_function(wrap_pyfunction!(dtype_name, m)?)?;
    m.add_function(wrap_pyfunction!(operator_names, m)?)?;
    Ok(())
}
