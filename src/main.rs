//! The `fusedops` command line: info | check | bench | run | tune | ascend-plan.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use fusedops::bench::{self, BenchSettings, Environment, Filter, parse_key_value};
use fusedops::check::compare;
use fusedops::error::{Error, Result};
use fusedops::gpu::{Feature, Gpu, GpuOptions};
use fusedops::io::OutputFile;
use fusedops::registry::{Scale, Target};
use fusedops::report::{self, probe_lines};
use fusedops::roofline::{self, ProbeSizes};
use fusedops::suite::{self, Info, operators};

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
    /// The headline suite: every operator on its presets (each case checked first, large cases
    /// on sampled rows), timed, with the same run's roofline probes as denominators. Full size on
    /// a GPU, shrunk on a CPU adapter.
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
        /// Also print, per case, the ratio of this run's time to the one in an earlier JSON report.
        #[arg(long, value_name = "OLD.json")]
        compare: Option<PathBuf>,
        /// Only the host half of the full-size suite (input generation and the CPU references,
        /// no GPU): time and peak memory per case. RAYON_NUM_THREADS sets the cores used.
        #[arg(long, conflicts_with_all = ["svg", "compare", "markdown"])]
        host_only: bool,
    },
    /// The device sections of docs/PERFORMANCE.md (Markdown) from saved `fusedops bench --json`
    /// reports, one section per file in the order given.
    Report {
        /// Reports written by `fusedops bench --json`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
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
    /// alignment, core split, tiling struct and key, pipeline and a roofline estimate
    /// (docs/ascend/README.md).
    AscendPlan {
        /// amla | swiftgmm | merrouter | moe (the MoE layer's chain of kernels)
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
        /// Print the C++ a CANN operator project starts from instead of tables: TilingData
        /// structs filled with this plan's values, tiling keys, blockDim, workspace sizes and
        /// op_host registrations.
        #[arg(long, conflicts_with = "json")]
        tiling_data: bool,
        /// Also draw the kernels' pipeline timeline (MTE2, MTE1, M, FIX or CO1->CO2, V, MTE3)
        /// to this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        timeline: Option<PathBuf>,
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
            compare,
            host_only,
        } => {
            let filter = filter.to_filter()?;
            if host_only {
                return host_only_cmd(&filter, json.as_deref());
            }
            bench_cmd(
                &filter,
                BenchSettings { warmup, iters },
                &BenchOutputs {
                    json,
                    markdown,
                    svg,
                    compare,
                },
            )
        }
        Command::Report { files } => report_cmd(&files),
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
            tiling_data,
            timeline,
        } => {
            let timeline_file = timeline.as_deref().map(OutputFile::create).transpose()?;
            let plan = fusedops::ascend::plan_command(&op, &chip, preset.as_deref(), &shape)?;
            if let Some(file) = timeline_file {
                file.commit(plan.timeline_svg()?.as_bytes())?;
            }
            if tiling_data {
                print!("{}", plan.tiling_data_cpp());
            } else if json {
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
    let info = Info::of(&gpu, !no_probes)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info.to_value()).expect("serialisable")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let env = &info.environment;
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
    for refused in &c.refused {
        println!("refused      {refused} (advertised, but the device opened only without it)");
    }
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
    for p in &info.paths {
        println!("path         {} {}: {}", p.op, p.what, p.choice);
    }
    if let Some(roof) = &info.roofline {
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
    let cases = suite::selected_cases(&gpu, scale, filter);
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
    compare: Option<PathBuf>,
}

/// The report files, checked writable before anything runs (see [`OutputFile`]).
fn report_files(outputs: &BenchOutputs) -> Result<(Option<OutputFile>, Option<OutputFile>)> {
    if let (Some(json), Some(svg)) = (&outputs.json, &outputs.svg) {
        if fusedops::io::same_file(json, svg) {
            return Err(Error::Format {
                what: "--json and --svg".into(),
                why: format!("both name {}; give two files", json.display()),
            });
        }
    }
    let json = outputs
        .json
        .as_deref()
        .map(OutputFile::create)
        .transpose()?;
    let svg = outputs.svg.as_deref().map(OutputFile::create).transpose()?;
    Ok((json, svg))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        what: path.display().to_string(),
        why: e.to_string(),
    })
}

fn bench_cmd(filter: &Filter, settings: BenchSettings, outputs: &BenchOutputs) -> Result<ExitCode> {
    let (json_file, svg_file) = report_files(outputs)?;
    let gpu = Gpu::new()?;
    // Read the earlier report first: a bad file fails before minutes of benchmarking.
    let old = outputs.compare.as_deref().map(read_json).transpose()?;
    let env = Environment::of(&gpu);
    let a = &env.adapter;
    println!(
        "{} ({}, {}), {} {}",
        a.name, a.backend, a.device_type, a.driver, a.driver_info
    );
    if gpu.is_cpu() {
        println!("CPU adapter: the suite runs at CPU size; timings say nothing about GPU speed.");
    }
    // With cooperative matrices, tensor-core cases are timed again on the same adapter with them
    // off (the SIMT kernels), beside their row.
    let simt = if gpu.caps.coop_matrix.is_empty() {
        None
    } else {
        let mut options = GpuOptions::from_env()?;
        options.disabled.push(Feature::CooperativeMatrix);
        Some(Gpu::with_options(&options)?)
    };
    let roof = roofline::measure(&gpu, &ProbeSizes::for_gpu(&gpu))?;
    println!("roofline ({} UTC):", env.date_utc);
    print!("{}", probe_lines(&roof));
    let cases = suite::headline(!gpu.is_cpu(), filter);
    if cases.is_empty() {
        println!("no case matches the filter");
        return Ok(ExitCode::FAILURE);
    }
    let progress = indicatif::ProgressBar::new(cases.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let devices = bench::Devices {
        gpu: &gpu,
        simt: simt.as_ref(),
    };
    let report = suite::run_bench(
        &cases,
        &devices,
        env,
        roof,
        settings,
        report::command_line(),
        |done, info| {
            progress.set_position(done as u64);
            progress.set_message(format!("{} {}", info.op, info.name));
        },
    );
    progress.finish_and_clear();
    if outputs.markdown {
        print!("{}", report::markdown(&report.to_value()));
    } else {
        print!("{}", report::text(&report));
    }
    if let Some(old) = &old {
        print!("{}", report::compare(&report.to_value(), old));
    }
    if let Some(file) = json_file {
        file.commit(report.to_json().as_bytes())?;
    }
    if let Some(file) = svg_file {
        file.commit(report::roofline_svg(&report)?.as_bytes())?;
    }
    println!("suite wall time {:.1} s", report.wall_seconds);
    let failed = report.failures();
    if failed > 0 {
        println!("{failed} case(s) failed their check");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn host_only_cmd(filter: &Filter, json: Option<&Path>) -> Result<ExitCode> {
    let json_file = json.map(OutputFile::create).transpose()?;
    let cases = suite::headline(true, filter);
    if cases.is_empty() {
        println!("no case matches the filter");
        return Ok(ExitCode::FAILURE);
    }
    let threads = rayon::current_num_threads();
    println!(
        "host half of the full-size suite (inputs and CPU references, no GPU) on {threads} threads, \
         prepared for {} KiB of workgroup memory",
        Target::NVIDIA_VULKAN.max_workgroup_storage >> 10
    );
    let started = std::time::Instant::now();
    let mut rows = Vec::with_capacity(cases.len());
    for case in &cases {
        let row = bench::host_case(case.as_ref(), &Target::NVIDIA_VULKAN);
        println!("{}", report::host_line(&row));
        rows.push(row);
    }
    let total = started.elapsed().as_secs_f64();
    print!("{}", report::host_summary(&rows, total, threads));
    if let Some(file) = json_file {
        let value = serde_json::json!({
            "command": report::command_line(),
            "date_utc": fusedops::util::utc_now(),
            "threads": threads,
            "total_seconds": total,
            "cases": rows,
        });
        file.commit(
            serde_json::to_string_pretty(&value)
                .expect("serialisable")
                .as_bytes(),
        )?;
    }
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        println!("{failed} case(s) failed");
        ExitCode::FAILURE
    })
}

fn report_cmd(files: &[PathBuf]) -> Result<ExitCode> {
    for (i, path) in files.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", report::markdown(&read_json(path)?));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_cmd(
    op: &str,
    input: &Path,
    output: &Path,
    params: Option<&str>,
    reference: bool,
) -> Result<ExitCode> {
    let operator = suite::operator(op)?;
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
            fusedops::registry::parse_params(&text)?
        }
    };
    if fusedops::io::same_file(input, output) {
        return Err(Error::Format {
            what: "--output".into(),
            why: format!(
                "{} is the input file (--input {}); writing it would destroy the input",
                output.display(),
                input.display()
            ),
        });
    }
    // Checked before the work: a run never ends with outputs that cannot be written.
    let output_file = OutputFile::create(output)?;
    let inputs = fusedops::io::load(input)?;
    let gpu = Gpu::new()?;
    let outputs = operator.run_named(&gpu, &inputs, &params)?;
    output_file.commit(&fusedops::io::to_bytes(&outputs)?)?;
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
