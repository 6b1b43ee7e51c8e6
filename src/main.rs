//! The `fusedops` command line: info | check | bench | run | tune | ascend-plan.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use fusedops::bench::{self, BenchSettings, Environment, Filter, parse_key_value};
use fusedops::check::compare;
use fusedops::error::{Error, Result};
use fusedops::gpu::Gpu;
use fusedops::registry::{Operator, Scale, operators};
use fusedops::report::{self, BenchReport, probe_lines};
use fusedops::roofline::{self, ProbeSizes};

#[derive(Parser)]
#[command(
    name = "fusedops",
    version,
    about = "Fused LLM-inference operators (AMLA, SwiftGMM, MerRouter) on any GPU through wgpu, \
             each checked against a CPU reference.",
    after_help = "Environment: WGPU_BACKEND (vulkan|metal|dx12), WGPU_ADAPTER_NAME (substring), \
                  FUSEDOPS_DISABLE (f16,subgroups,coop,timestamps: run the plain fallbacks)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Adapter, driver, features, limits, kernel paths and the roofline probes.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Skip the roofline probes (they take a few seconds).
        #[arg(long)]
        no_probes: bool,
    },
    /// Check every operator's cases against their CPU references; non-zero exit on any failure.
    Check {
        /// The real preset sizes instead of the small CI shapes.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Benchmark every operator on its presets (each case checked first), with the same run's
    /// roofline probes as denominators.
    Bench {
        #[command(flatten)]
        filter: FilterArgs,
        /// Timed iterations per case (after warm-up).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Untimed warm-up iterations per case.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Also write the full report as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Print the tables as Markdown (for docs/PERFORMANCE.md) instead of plain text.
        #[arg(long)]
        markdown: bool,
        /// Also draw the roofline plot (intensity vs TFLOP/s, one point per case) to this SVG.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Run one operator on tensors from a safetensors file and write its outputs to another.
    Run {
        /// The operator (see `fusedops check` for the registered ones).
        op: String,
        /// Input tensors (names per operator: see the README).
        #[arg(long, value_name = "FILE.safetensors")]
        input: PathBuf,
        /// Where to write the output tensors.
        #[arg(long, value_name = "FILE.safetensors")]
        output: PathBuf,
        /// Operator parameters as JSON, or @FILE to read them from a file.
        #[arg(long, value_name = "JSON")]
        params: Option<String>,
        /// Also compute the CPU reference and print the comparison (non-zero exit on mismatch).
        #[arg(long)]
        reference: bool,
    },
    /// SwiftGMM's tiling cache (best tile configuration per adapter and shape bucket, measured
    /// once): show it, clear it, or measure every stored shape again on this adapter. The file is
    /// $FUSEDOPS_CACHE_DIR, else $XDG_CACHE_HOME/fusedops, else ~/.cache/fusedops
    /// (swiftgmm_tiling.json); FUSEDOPS_TILING_CACHE=off disables it.
    Tune {
        /// Delete the cache file.
        #[arg(long, conflicts_with = "rebuild")]
        clear: bool,
        /// Measure every stored shape again on the current adapter and save.
        #[arg(long)]
        rebuild: bool,
    },
    /// Plan an operator's tiling on an Ascend NPU: per-core buffers against UB/L1/L0 capacity,
    /// alignment, core split and a roofline estimate (docs/ascend/README.md).
    AscendPlan {
        /// amla | swiftgmm | merrouter
        op: String,
        /// 910B2 | 910B4 | 310P3
        #[arg(long)]
        chip: String,
        /// deepseek-v3 | pangu-pro-moe (default: DeepSeek-V3 shapes)
        #[arg(long)]
        preset: Option<String>,
        /// Override a shape or tile parameter (repeatable; keys per operator in the docs).
        #[arg(long = "shape", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        shape: Vec<(String, String)>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct FilterArgs {
    /// Only this operator.
    #[arg(long)]
    op: Option<String>,
    /// Only cases of this preset (deepseek-v3, pangu-pro-moe, custom).
    #[arg(long)]
    preset: Option<String>,
    /// Only cases whose parameter KEY equals VALUE (repeatable).
    #[arg(long = "case", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    params: Vec<(String, String)>,
}

impl FilterArgs {
    fn to_filter(&self) -> Result<Filter> {
        if let Some(op) = &self.op {
            let known: Vec<&str> = operators().iter().map(|o| o.name()).collect();
            if !known.contains(&op.as_str()) {
                return Err(Error::Format {
                    what: "--op".into(),
                    why: format!("unknown operator {op:?}; registered: {known:?}"),
                });
            }
        }
        Ok(Filter {
            op: self.op.clone(),
            preset: self.preset.clone(),
            params: self.params.clone(),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Info { json, no_probes } => info(json, no_probes),
        Command::Check { full, filter } => check(full, &filter.to_filter()?),
        Command::Bench {
            filter,
            iters,
            warmup,
            json,
            markdown,
            svg,
        } => bench_cmd(
            &filter.to_filter()?,
            BenchSettings { warmup, iters },
            &BenchOutputs {
                json,
                markdown,
                svg,
            },
        ),
        Command::Run {
            op,
            input,
            output,
            params,
            reference,
        } => run_cmd(&op, &input, &output, params.as_deref(), reference),
        Command::Tune { clear, rebuild } => tune_cmd(clear, rebuild),
        Command::AscendPlan {
            op,
            chip,
            preset,
            shape,
            json,
        } => {
            let plan = fusedops::ascend::plan_command(&op, &chip, preset.as_deref(), &shape)?;
            if json {
                println!("{}", plan.to_json());
            } else {
                print!("{}", plan.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn info(json: bool, no_probes: bool) -> Result<ExitCode> {
    let gpu = Gpu::new()?;
    let env = Environment::of(&gpu);
    let roof = if no_probes {
        None
    } else {
        Some(roofline::measure(&gpu, &ProbeSizes::for_gpu(&gpu))?)
    };
    let paths: Vec<(String, String, String)> = operators()
        .iter()
        .flat_map(|op| {
            op.paths(&gpu)
                .into_iter()
                .map(|(what, choice)| (op.name().to_string(), what, choice))
        })
        .collect();
    if json {
        let value = serde_json::json!({
            "environment": env,
            "coop_fragment": gpu.caps.coop_fragment().map(|f| f.name()),
            "paths": paths,
            "roofline": roof,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("serialisable")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let c = &gpu.caps;
    let a = &env.adapter;
    println!("adapter      {} ({}, {})", a.name, a.backend, a.device_type);
    println!("driver       {} {}", a.driver, a.driver_info);
    println!(
        "features     shader-f16 {}, subgroups {}, timestamps {} (inside passes {}, encoders {}), cooperative-matrix {}",
        yes(c.shader_f16),
        yes(c.subgroups),
        yes(c.timestamps),
        yes(c.timestamps_inside_passes),
        yes(c.timestamps_inside_encoders),
        yes(!c.coop_matrix.is_empty())
    );
    if !c.disabled.is_empty() {
        println!("disabled     {} (FUSEDOPS_DISABLE)", c.disabled.join(", "));
    }
    println!(
        "subgroup     {}",
        if c.subgroup_size.0 == c.subgroup_size.1 {
            format!("{}", c.subgroup_size.0)
        } else {
            format!("{}..{}", c.subgroup_size.0, c.subgroup_size.1)
        }
    );
    let coop: Vec<String> = c.coop_matrix.iter().map(|m| m.to_string()).collect();
    println!(
        "coop-matrix  {}",
        if coop.is_empty() {
            "none".to_string()
        } else {
            coop.join(", ")
        }
    );
    println!(
        "fragment     {}",
        match c.coop_fragment() {
            Some(f) => format!(
                "{} f16 x f16 -> f32 (the cooperative-matrix kernels' instantiation)",
                f.name()
            ),
            None => "none: every operator runs its SIMT kernel".to_string(),
        }
    );
    println!(
        "limits       storage binding {} MiB, buffer {} MiB, workgroup memory {} KiB, {} invocations/workgroup, {} workgroups/dim, {} storage buffers/stage",
        c.max_storage_binding >> 20,
        c.max_buffer_size >> 20,
        c.max_workgroup_storage >> 10,
        c.max_invocations_per_workgroup,
        c.max_workgroups_per_dim,
        c.max_storage_buffers_per_stage
    );
    for (op, what, choice) in &paths {
        println!("path         {op} {what}: {choice}");
    }
    if let Some(roof) = &roof {
        println!("roofline ({} UTC):", env.date_utc);
        print!("{}", probe_lines(roof));
        if gpu.is_cpu() {
            println!("  (CPU adapter: these figures say nothing about GPU speed)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn no_operators() -> ExitCode {
    println!("no operator is registered yet: nothing to run");
    ExitCode::SUCCESS
}

fn check(full: bool, filter: &Filter) -> Result<ExitCode> {
    let gpu = Gpu::new()?;
    if operators().is_empty() {
        return Ok(no_operators());
    }
    let scale = if full { Scale::Full } else { Scale::Ci };
    let cases = bench::selected_cases(&gpu, scale, filter);
    if cases.is_empty() {
        println!("no case matches the filter");
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "checking {} cases on {} ({:?})",
        cases.len(),
        gpu.info.name,
        gpu.info.backend
    );
    let mut failed = 0;
    for case in &cases {
        let row = bench::check_case(case.as_ref(), &gpu);
        if !row.pass {
            failed += 1;
        }
        println!(
            "{} {:<10} {:<40} {:<24} {}",
            if row.pass { "PASS" } else { "FAIL" },
            row.case.op,
            row.case.name,
            row.variant,
            row.summary()
        );
    }
    println!("{} passed, {} failed", cases.len() - failed, failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct BenchOutputs {
    json: Option<PathBuf>,
    markdown: bool,
    svg: Option<PathBuf>,
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

fn bench_cmd(filter: &Filter, settings: BenchSettings, outputs: &BenchOutputs) -> Result<ExitCode> {
    let gpu = Gpu::new()?;
    if operators().is_empty() {
        return Ok(no_operators());
    }
    let env = Environment::of(&gpu);
    let a = &env.adapter;
    println!(
        "{} ({}, {}), {} {}",
        a.name, a.backend, a.device_type, a.driver, a.driver_info
    );
    if gpu.is_cpu() {
        println!(
            "CPU adapter: benchmark sizes are shrunk to fit; timings say nothing about GPU speed."
        );
    }
    let roof = roofline::measure(&gpu, &ProbeSizes::for_gpu(&gpu))?;
    println!("roofline ({} UTC):", env.date_utc);
    print!("{}", probe_lines(&roof));
    let cases = bench::selected_cases(&gpu, Scale::Bench, filter);
    if cases.is_empty() {
        println!("no case matches the filter");
        return Ok(ExitCode::FAILURE);
    }
    let progress = indicatif::ProgressBar::new(cases.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let mut rows = Vec::with_capacity(cases.len());
    for case in &cases {
        let info = case.info();
        progress.set_message(format!("{} {}", info.op, info.name));
        rows.push(bench::bench_case(case.as_ref(), &gpu, &roof, settings));
        progress.inc(1);
    }
    progress.finish_and_clear();
    let report = BenchReport::new(env, roof, rows);
    if outputs.markdown {
        print!("{}", report::markdown(&report));
    } else {
        print!("{}", report::text(&report));
    }
    if let Some(path) = &outputs.json {
        write_file(path, &report.to_json())?;
    }
    if let Some(path) = &outputs.svg {
        write_file(path, &report::roofline_svg(&report)?)?;
    }
    let failed = report.failures();
    if failed > 0 {
        println!("{failed} case(s) failed their check");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn find_operator(name: &str) -> Result<&'static dyn Operator> {
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

fn run_cmd(
    op: &str,
    input: &Path,
    output: &Path,
    params: Option<&str>,
    reference: bool,
) -> Result<ExitCode> {
    let operator = find_operator(op)?;
    let params: serde_json::Value = match params {
        None => serde_json::Value::Null,
        Some(text) => {
            let text = match text.strip_prefix('@') {
                Some(file) => std::fs::read_to_string(file).map_err(|source| Error::Io {
                    path: file.to_string(),
                    source,
                })?,
                None => text.to_string(),
            };
            serde_json::from_str(&text).map_err(|e| Error::Format {
                what: "--params".into(),
                why: e.to_string(),
            })?
        }
    };
    let inputs = fusedops::io::load(input)?;
    let gpu = Gpu::new()?;
    let outputs = operator.run_named(&gpu, &inputs, &params)?;
    fusedops::io::save(output, &outputs)?;
    for (name, t) in &outputs {
        println!("{name}: {:?} {}", t.shape(), t.dtype());
    }
    println!("wrote {}", output.display());
    if !reference {
        return Ok(ExitCode::SUCCESS);
    }
    let expected = operator.reference_named(&inputs, &params)?;
    let mut failed = 0;
    for (name, want) in &expected {
        let Some(got) = outputs.get(name) else {
            println!("{name}: FAIL (missing from the GPU outputs)");
            failed += 1;
            continue;
        };
        let c = compare(
            &got.to_f64(),
            &want.to_f64(),
            operator.tolerance(name, &inputs, &params),
        );
        if !c.pass {
            failed += 1;
        }
        println!("{name}: {}", c.summary(want.shape()));
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn tune_cmd(clear: bool, rebuild: bool) -> Result<ExitCode> {
    use fusedops::ops::swiftgmm::tiling;
    let location = tiling::CacheLocation::from_env();
    let Some(path) = location.path() else {
        println!("the tiling cache is off ({location:?}): nothing is read or written");
        return Ok(ExitCode::SUCCESS);
    };
    if clear {
        tiling::clear_cache()?;
        println!("cleared {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let cache = if rebuild {
        let gpu = Gpu::new()?;
        tiling::rebuild_cache(&gpu, &tiling::TuneSettings::for_gpu(&gpu))?
    } else {
        tiling::load_cache()?
    };
    println!("{} ({} entries)", path.display(), cache.entries().len());
    for e in cache.entries() {
        let k = &e.key;
        println!(
            "  {} | x {} w {} {} k={} n={} rows/group<={} -> {} (measured {})",
            e.adapter,
            k.x_dtype,
            k.w_dtype,
            k.layout.name(),
            k.k,
            k.n,
            k.rows_bucket,
            e.config.describe(k.gemm),
            e.measured_utc
        );
    }
    Ok(ExitCode::SUCCESS)
}
