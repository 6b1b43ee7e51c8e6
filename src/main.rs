//! The `fusedops` command line: info | check | bench.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use fusedops::bench::{
    self, BenchSettings, Environment, Filter, fmt_num, parse_key_value, text_table,
};
use fusedops::error::{Error, Result};
use fusedops::gpu::Gpu;
use fusedops::registry::{Scale, operators};
use fusedops::roofline::{self, ProbeSizes, Roofline};

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
        json: Option<std::path::PathBuf>,
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
        } => bench_cmd(&filter.to_filter()?, BenchSettings { warmup, iters }, json),
    }
}

fn probe_lines(roof: &Roofline) -> String {
    let mut s = String::new();
    for p in roof.probes() {
        s += &format!(
            "  {:<9} {:>9.1} {:<8} ({}, {}, median {:.1} us{})\n",
            p.name,
            p.value,
            p.unit,
            p.size,
            p.clock,
            p.median_ns / 1e3,
            if p.verified {
                ""
            } else {
                ", OUTPUT WRONG: not used"
            }
        );
    }
    s
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
        println!("roofline ({}):", env.date_utc);
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

fn bench_cmd(
    filter: &Filter,
    settings: BenchSettings,
    json: Option<std::path::PathBuf>,
) -> Result<ExitCode> {
    let gpu = Gpu::new()?;
    if operators().is_empty() {
        return Ok(no_operators());
    }
    let env = Environment::of(&gpu);
    println!(
        "{} ({}, {}), {} {}",
        env.adapter.name,
        env.adapter.backend,
        env.adapter.device_type,
        env.adapter.driver,
        env.adapter.driver_info
    );
    if gpu.is_cpu() {
        println!("CPU adapter: sizes shrunk; timings say nothing about GPU speed.");
    }
    let roof = roofline::measure(&gpu, &ProbeSizes::for_gpu(&gpu))?;
    println!("roofline ({}):", env.date_utc);
    print!("{}", probe_lines(&roof));
    let cases = bench::selected_cases(&gpu, Scale::Bench, filter);
    if cases.is_empty() {
        println!("no case matches the filter");
        return Ok(ExitCode::FAILURE);
    }
    let rows: Vec<bench::BenchRow> = cases
        .iter()
        .map(|c| bench::bench_case(c.as_ref(), &gpu, &roof, settings))
        .collect();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let t = r.time.as_ref();
            vec![
                r.check.case.op.to_string(),
                r.check.case.name.clone(),
                r.check.variant.clone(),
                t.map(|t| format!("{:.1} ({:.1}-{:.1})", t.median_us, t.min_us, t.max_us))
                    .unwrap_or("-".into()),
                fmt_num(r.gbps),
                fmt_num(r.tflops),
                match (r.roof_percent, r.bound) {
                    (Some(p), Some(b)) => format!("{p:.0}% {b:?}").to_lowercase(),
                    _ => "-".into(),
                },
                r.speedup.map(|s| format!("{s:.2}x")).unwrap_or("-".into()),
                if r.check.pass {
                    "pass".to_string()
                } else {
                    "FAIL".to_string()
                },
                r.check.summary(),
            ]
        })
        .collect();
    print!(
        "{}",
        text_table(
            &[
                "op",
                "case",
                "path",
                "time us (min-max)",
                "GB/s",
                "TFLOP/s",
                "roof",
                "vs base",
                "check",
                "error",
            ],
            &table,
        )
    );
    if let Some(path) = json {
        let value = serde_json::json!({ "environment": env, "roofline": roof, "cases": rows });
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&value).expect("serialisable"),
        )
        .map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
    }
    let failed = rows.iter().filter(|r| !r.check.pass).count();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
