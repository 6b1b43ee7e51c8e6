//! The top floor: the list of registered operators that every command walks, the headline
//! suite that `fusedops bench` runs, and what `info` and `bench` report, assembled once for the
//! command line and the Python package. The operators sit below it and implement the
//! [`crate::registry`] traits; nothing below this module names them as a set, so no floor
//! reaches up.

use crate::bench::{self, BenchSettings, Devices, Environment, Filter};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::registry::{Case, CaseInfo, Operator, Scale};
use crate::report::BenchReport;
use crate::roofline::{self, ProbeSizes, Roofline};

/// Every registered operator.
pub fn operators() -> Vec<&'static dyn Operator> {
    vec![
        &crate::ops::amla::OPERATOR,
        &crate::ops::merrouter::OPERATOR,
        &crate::ops::moe::OPERATOR,
        &crate::ops::quantize::OPERATOR,
        &crate::ops::swiftgmm::OPERATOR,
    ]
}

/// The registered operator called `name`, or an [`Error::Format`] listing the registered ones.
pub fn operator(name: &str) -> Result<&'static dyn Operator> {
    operators()
        .into_iter()
        .find(|o| o.name() == name)
        .ok_or_else(|| Error::Format {
            what: "operator".into(),
            why: format!(
                "unknown operator {name:?}; registered: {:?}",
                operators().iter().map(|o| o.name()).collect::<Vec<_>>()
            ),
        })
}

/// The registered cases at `scale` that pass the filter.
pub fn selected_cases(gpu: &Gpu, scale: Scale, filter: &Filter) -> Vec<Box<dyn Case>> {
    operators()
        .into_iter()
        .filter(|op| filter.accepts_op(*op))
        .flat_map(|op| op.cases(scale, gpu))
        .filter(|case| filter.accepts(&case.info()))
        .collect()
}

/// The headline suite `fusedops bench` runs, at full size or at CPU size, filtered. Listing it
/// needs no GPU.
pub fn headline(full: bool, filter: &Filter) -> Vec<Box<dyn Case>> {
    operators()
        .into_iter()
        .filter(|op| filter.accepts_op(*op))
        .flat_map(|op| op.headline(full))
        .filter(|case| filter.accepts(&case.info()))
        .collect()
}

/// What `fusedops info` reports: the adapter and its capabilities, the cooperative-matrix
/// fragment the kernels are instantiated at, the kernel path each operator takes, and (when
/// asked for) the roofline probes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Info {
    pub environment: Environment,
    /// `8x8x8` or `16x16x16`; none when every operator runs its SIMT kernel.
    pub coop_fragment: Option<&'static str>,
    /// Every feature-dependent kernel choice of every operator on this adapter.
    pub paths: Vec<PathChoice>,
    pub roofline: Option<Roofline>,
}

/// One kernel choice: `op`'s `what` (e.g. "gemm") takes `choice` (the kernel and why).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PathChoice {
    pub op: String,
    pub what: String,
    pub choice: String,
}

impl Info {
    /// Gather it on `gpu`; `probes` runs the roofline probes (a few seconds).
    pub fn of(gpu: &Gpu, probes: bool) -> Result<Info> {
        let environment = Environment::of(gpu);
        let roofline = if probes {
            Some(roofline::measure(gpu, &ProbeSizes::for_gpu(gpu))?)
        } else {
            None
        };
        let paths = operators()
            .iter()
            .flat_map(|op| {
                op.paths(gpu).into_iter().map(|(what, choice)| PathChoice {
                    op: op.name().to_string(),
                    what,
                    choice,
                })
            })
            .collect();
        Ok(Info {
            environment,
            coop_fragment: gpu.caps.coop_fragment().map(|f| f.name()),
            paths,
            roofline,
        })
    }

    /// The JSON of `fusedops info --json` (keys sorted).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("serialisable")
    }
}

/// Verify and time `cases` on `devices` (see [`bench::bench_case`]) against the run's roofline,
/// and assemble the report, which records `command` as what produced it. `progress` is told
/// each case before it runs, with the number of cases done.
pub fn run_bench(
    cases: &[Box<dyn Case>],
    devices: &Devices,
    environment: Environment,
    roofline: Roofline,
    settings: BenchSettings,
    command: String,
    mut progress: impl FnMut(usize, &CaseInfo),
) -> BenchReport {
    let started = std::time::Instant::now();
    let mut rows = Vec::with_capacity(cases.len());
    for (done, case) in cases.iter().enumerate() {
        progress(done, &case.info());
        rows.extend(bench::bench_case(
            case.as_ref(),
            devices,
            &roofline,
            settings,
        ));
    }
    let wall_seconds = started.elapsed().as_secs_f64();
    BenchReport::with_command(command, environment, roofline, rows, wall_seconds)
}
