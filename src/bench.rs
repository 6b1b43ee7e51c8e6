//! Running the registry: `check` verifies every case against its CPU reference; `bench` also
//! times it (and its baseline) and relates the result to the same run's roofline probes;
//! `bench --host-only` measures the host half of each case (inputs and reference) alone.

use crate::error::Result;
use crate::gpu::{Capabilities, Clock, Gpu, Timing};
use crate::registry::{Bound, Case, CaseInfo, Checked, Coverage, HostPrepared, Operator, Target};
use crate::roofline::Roofline;

/// Which cases to run.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub op: Option<String>,
    pub preset: Option<String>,
    /// `key=value` pairs that must all match.
    pub params: Vec<(String, String)>,
}

impl Filter {
    pub fn accepts_op(&self, op: &dyn Operator) -> bool {
        self.op.as_deref().is_none_or(|o| o == op.name())
    }

    pub fn accepts(&self, info: &CaseInfo) -> bool {
        self.preset.as_deref().is_none_or(|p| p == info.preset) && info.matches(&self.params)
    }
}

/// Parse `key=value`.
pub fn parse_key_value(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// Outcome of checking one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckRow {
    pub case: CaseInfo,
    pub variant: String,
    /// How much of the output was compared (all of it, or sampled rows on large cases).
    pub coverage: Option<Coverage>,
    pub checks: Vec<Checked>,
    /// Set when the case could not run (an error from the operator or the device).
    pub error: Option<String>,
    pub pass: bool,
}

impl CheckRow {
    /// A one-line summary of the worst output.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("ERROR: {e}");
        }
        self.checks
            .iter()
            .find(|c| !c.comparison.pass)
            .or(self.checks.first())
            .map(|c| format!("{}: {}", c.output, c.comparison.summary(&c.shape)))
            .unwrap_or_else(|| "no outputs compared".to_string())
    }

    fn failed(case: CaseInfo, coverage: Option<Coverage>, error: String) -> Self {
        CheckRow {
            case,
            variant: String::new(),
            coverage,
            checks: Vec::new(),
            error: Some(error),
            pass: false,
        }
    }
}

fn all_pass(checks: &[Checked]) -> bool {
    !checks.is_empty() && checks.iter().all(|c| c.comparison.pass)
}

fn check_host(host: &dyn HostPrepared, gpu: &Gpu) -> Result<(String, Vec<Checked>)> {
    let prepared = host.upload(gpu)?;
    gpu.run(|rec| prepared.record(rec))?;
    let checks = prepared.verify()?;
    Ok((prepared.variant(), checks))
}

/// Verify one case.
pub fn check_case(case: &dyn Case, gpu: &Gpu) -> CheckRow {
    let info = case.info();
    let host = match case.host(&Target::of(gpu)) {
        Ok(host) => host,
        Err(e) => return CheckRow::failed(info, None, e.to_string()),
    };
    let coverage = Some(host.coverage());
    match check_host(host.as_ref(), gpu) {
        Ok((variant, checks)) => CheckRow {
            case: info,
            variant,
            coverage,
            pass: all_pass(&checks),
            checks,
            error: None,
        },
        Err(e) => CheckRow::failed(info, coverage, e.to_string()),
    }
}

/// Timing summary for a report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TimeSummary {
    pub clock: Clock,
    pub median_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub iters: usize,
    /// Median µs per compute pass (GPU timestamps only).
    pub passes: Vec<(String, f64)>,
}

impl From<&Timing> for TimeSummary {
    fn from(t: &Timing) -> Self {
        TimeSummary {
            clock: t.clock,
            median_us: t.median_ns() / 1e3,
            min_us: t.min_ns() / 1e3,
            max_us: t.max_ns() / 1e3,
            iters: t.samples_ns.len(),
            passes: t
                .pass_labels
                .iter()
                .cloned()
                .zip(t.pass_median_ns.iter().map(|ns| ns / 1e3))
                .collect(),
        }
    }
}

/// Outcome of benchmarking one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRow {
    pub check: CheckRow,
    /// This row times the case of the row before it again with cooperative matrices off (the
    /// SIMT kernels), so that the two stand side by side.
    pub coop_off: bool,
    pub bytes: u64,
    pub flops: u64,
    pub time: Option<TimeSummary>,
    pub gbps: Option<f64>,
    pub tflops: Option<f64>,
    /// Which roof bounds the case (by arithmetic intensity against the ridge point).
    pub bound: Option<Bound>,
    /// Percent of the same run's roof (copy bandwidth or compute peak).
    pub roof_percent: Option<f64>,
    pub baseline: Option<String>,
    pub baseline_time: Option<TimeSummary>,
    /// Baseline time / fused time.
    pub speedup: Option<f64>,
    /// Tokens per second, for cases that name their token count (param `tokens`).
    pub tokens_per_s: Option<f64>,
}

impl BenchRow {
    /// The row of a case that could not be verified or timed.
    fn failed(case: &dyn Case, coverage: Option<Coverage>, error: String) -> Self {
        BenchRow {
            check: CheckRow::failed(case.info(), coverage, error),
            coop_off: false,
            bytes: case.bytes(),
            flops: case.flops(),
            time: None,
            gbps: None,
            tflops: None,
            bound: None,
            roof_percent: None,
            baseline: None,
            baseline_time: None,
            speedup: None,
            tokens_per_s: None,
        }
    }

    /// The row's key for `--compare`: operator, case name, and whether cooperative matrices
    /// were off.
    pub fn key(&self) -> String {
        let c = &self.check.case;
        format!(
            "{} {}{}",
            c.op,
            c.name,
            if self.coop_off { " [coop off]" } else { "" }
        )
    }
}

/// Benchmark settings.
#[derive(Clone, Copy, Debug)]
pub struct BenchSettings {
    pub warmup: usize,
    pub iters: usize,
}

fn bench_host(
    case: &dyn Case,
    host: &dyn HostPrepared,
    gpu: &Gpu,
    roof: &Roofline,
    settings: BenchSettings,
) -> Result<BenchRow> {
    let info = case.info();
    let prepared = host.upload(gpu)?;
    gpu.run(|rec| prepared.record(rec))?;
    let checks = prepared.verify()?;
    let pass = all_pass(&checks);
    let timing = gpu.time(settings.warmup, settings.iters, |rec| prepared.record(rec))?;
    let baseline = prepared.baseline();
    let baseline_timing = match &baseline {
        Some(_) => Some(gpu.time(settings.warmup, settings.iters, |rec| {
            prepared.record_baseline(rec)
        })?),
        None => None,
    };
    let (bytes, flops) = (case.bytes(), case.flops());
    let secs = timing.median_ns() * 1e-9;
    let gbps = (bytes > 0).then(|| bytes as f64 / secs / 1e9);
    let tflops = (flops > 0).then(|| flops as f64 / secs / 1e12);
    let tensor_cores = case.uses_tensor_cores(gpu);
    let bound = match (roof.copy_gbps(), roof.compute_tflops(tensor_cores)) {
        (Some(bw), Some(peak)) => {
            // Ridge point in FLOP/byte: below it the case is memory-bound.
            let ridge = peak * 1e12 / (bw * 1e9);
            let intensity = flops as f64 / bytes.max(1) as f64;
            Some(if intensity < ridge {
                Bound::Memory
            } else {
                Bound::Compute
            })
        }
        (Some(_), None) => Some(Bound::Memory),
        (None, Some(_)) => Some(Bound::Compute),
        (None, None) => None,
    };
    let roof_percent = match bound {
        Some(Bound::Memory) => roof.copy_gbps().zip(gbps).map(|(r, g)| 100.0 * g / r),
        Some(Bound::Compute) => roof
            .compute_tflops(tensor_cores)
            .zip(tflops)
            .map(|(r, t)| 100.0 * t / r),
        None => None,
    };
    let speedup = baseline_timing
        .as_ref()
        .map(|b| b.median_ns() / timing.median_ns());
    let tokens_per_s = info
        .params
        .iter()
        .find(|(k, _)| k == "tokens")
        .and_then(|(_, v)| v.parse::<f64>().ok())
        .map(|tokens| tokens / secs);
    Ok(BenchRow {
        check: CheckRow {
            case: info,
            variant: prepared.variant(),
            coverage: Some(host.coverage()),
            checks,
            error: None,
            pass,
        },
        coop_off: false,
        bytes,
        flops,
        time: Some(TimeSummary::from(&timing)),
        gbps,
        tflops,
        bound,
        roof_percent,
        baseline,
        baseline_time: baseline_timing.as_ref().map(TimeSummary::from),
        speedup,
        tokens_per_s,
    })
}

/// The devices a bench runs on: the adapter as configured and, where it has cooperative
/// matrices, the same adapter with them off, for the SIMT twin of every tensor-core case.
pub struct Devices<'a> {
    pub gpu: &'a Gpu,
    pub simt: Option<&'a Gpu>,
}

/// Verify and time one case, its host work done once; errors become a failed row. A case that
/// uses tensor cores gets a second row from the SIMT device, when there is one.
pub fn bench_case(
    case: &dyn Case,
    devices: &Devices,
    roof: &Roofline,
    settings: BenchSettings,
) -> Vec<BenchRow> {
    let host = match case.host(&Target::of(devices.gpu)) {
        Ok(host) => host,
        Err(e) => return vec![BenchRow::failed(case, None, e.to_string())],
    };
    let coverage = Some(host.coverage());
    let run = |gpu: &Gpu| {
        bench_host(case, host.as_ref(), gpu, roof, settings)
            .unwrap_or_else(|e| BenchRow::failed(case, coverage.clone(), e.to_string()))
    };
    let mut rows = vec![run(devices.gpu)];
    if let Some(simt) = devices.simt.filter(|_| case.uses_tensor_cores(devices.gpu)) {
        let mut twin = run(simt);
        twin.coop_off = true;
        rows.push(twin);
    }
    rows
}

/// The host half of one case, measured: what `fusedops bench --host-only` reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HostRow {
    pub case: CaseInfo,
    pub coverage: Option<Coverage>,
    /// Wall time of [`Case::host`]: input generation and the CPU reference.
    pub seconds: f64,
    /// Peak resident memory of the process while it ran (Linux, whose peak mark is reset
    /// before each case; elsewhere none).
    pub peak_rss_bytes: Option<u64>,
    pub error: Option<String>,
}

/// Run the host half of `case` for `target`, measure it, and drop the result.
pub fn host_case(case: &dyn Case, target: &Target) -> HostRow {
    let reset = reset_peak_rss();
    let start = std::time::Instant::now();
    let host = case.host(target);
    let seconds = start.elapsed().as_secs_f64();
    let peak_rss_bytes = reset.then(peak_rss).flatten();
    let (coverage, error) = match host {
        Ok(h) => (Some(h.coverage()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    HostRow {
        case: case.info(),
        coverage,
        seconds,
        peak_rss_bytes,
        error,
    }
}

/// Reset this process's peak-RSS mark (Linux `clear_refs` 5); false where that is impossible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// This process's peak resident memory since the last reset (Linux `VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Everything a report says about the machine it ran on.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Environment {
    pub fusedops_version: &'static str,
    pub date_utc: String,
    pub adapter: crate::gpu::AdapterSummary,
    pub capabilities: Capabilities,
}

impl Environment {
    pub fn of(gpu: &Gpu) -> Self {
        Environment {
            fusedops_version: env!("CARGO_PKG_VERSION"),
            date_utc: crate::util::utc_now(),
            adapter: gpu.summary(),
            capabilities: gpu.caps.clone(),
        }
    }
}

/// GPU time of `iters` runs of a prepared case, for criterion's `iter_custom` (GPU timestamps
/// where the adapter has them, else the wall clock; see [`Gpu::time`]).
pub fn gpu_duration(
    gpu: &Gpu,
    prepared: &dyn crate::registry::Prepared,
    iters: u64,
) -> Result<std::time::Duration> {
    let timing = gpu.time(0, iters.max(1) as usize, |rec| prepared.record(rec))?;
    let total: f64 = timing.samples_ns.iter().sum();
    Ok(std::time::Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_parsing() {
        assert_eq!(
            parse_key_value("b=128").unwrap(),
            ("b".to_string(), "128".to_string())
        );
        assert!(parse_key_value("b128").is_err());
        assert!(parse_key_value("=3").is_err());
    }
}
