//! The headline suite and its report: the list names every operator and preset of the issue,
//! the terminal table fits 160 columns, `--compare` reads two saved runs, and inputs seeded on
//! the device are the values the CPU reference makes again.

use std::collections::BTreeSet;
use std::process::Command;

use fusedops::bench::{BenchRow, CheckRow, Environment, Filter, TimeSummary};
use fusedops::check::{Tolerance, compare};
use fusedops::gpu::{Clock, Gpu};
use fusedops::registry::{Bound, CaseInfo, Checked, Coverage, Scale};
use fusedops::report::{self, BenchReport, TEXT_WIDTH};
use fusedops::roofline::Roofline;
use fusedops::seeded::Seeded;
use fusedops::suite::{self, operators};
use fusedops::tensor::DType;

fn gpu() -> Gpu {
    Gpu::new().unwrap_or_else(|e| panic!("this test needs a GPU adapter.\n{e}"))
}

fn param<'a>(info: &'a CaseInfo, key: &str) -> &'a str {
    info.params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{} {} has no param {key}", info.op, info.name))
}

#[test]
fn headline_names_every_operator_and_the_issues_presets() {
    let full: Vec<CaseInfo> = suite::headline(true, &Filter::default())
        .iter()
        .map(|c| c.info())
        .collect();
    let ops: BTreeSet<&str> = full.iter().map(|i| i.op).collect();
    let registered: BTreeSet<&str> = operators().iter().map(|o| o.name()).collect();
    assert_eq!(ops, registered, "every operator is in the headline suite");
    let has = |op: &str, want: &[(&str, &str)]| {
        full.iter()
            .any(|i| i.op == op && want.iter().all(|(k, v)| param(i, k) == *v))
    };
    for h in ["16", "128"] {
        for rescale in ["amla", "multiply"] {
            let want = [
                ("b", "128"),
                ("s_q", "1"),
                ("h_q", h),
                ("s_k", "4096"),
                ("dtype", "bf16"),
                ("rescale", rescale),
            ];
            assert!(has("amla", &want), "amla h_q={h} {rescale}");
        }
    }
    let causal = full
        .iter()
        .find(|i| i.op == "amla" && param(i, "causal") == "true" && param(i, "s_q") == "2");
    let causal = causal.expect("the causal AMLA case");
    assert_eq!((param(causal, "b"), param(causal, "h_q")), ("128", "128"));
    assert!(param(causal, "s_k").parse::<usize>().unwrap() <= 8192);
    for t in ["16", "256", "4096"] {
        let want = [("e", "64"), ("k", "5120"), ("n", "2688"), ("t", t)];
        assert!(has("swiftgmm", &want), "swiftgmm pangu t={t}");
    }
    for t in ["16", "4096"] {
        for act in ["swiglu", "none"] {
            let want = [("e", "256"), ("act", act), ("t", t)];
            assert!(has("swiftgmm", &want), "swiftgmm deepseek-v3 {act} t={t}");
        }
    }
    for e in ["64", "256"] {
        let want = [("t", "4096"), ("e", e), ("stage", "route")];
        assert!(has("merrouter", &want), "merrouter e={e} t=4096");
    }
    for (preset, t) in [
        ("pangu-pro-moe", "16"),
        ("pangu-pro-moe", "4096"),
        ("deepseek-v3", "16"),
    ] {
        let found = full.iter().any(|i| {
            i.op == "moe"
                && i.preset == preset
                && param(i, "tokens") == t
                && param(i, "size") == "full"
        });
        assert!(found, "moe {preset} t={t}");
    }
    // The CPU-size suite has the same cases, shrunk.
    let small = suite::headline(false, &Filter::default());
    assert_eq!(small.len(), full.len());
    for (s, f) in small.iter().map(|c| c.info()).zip(&full) {
        assert_eq!((s.op, &s.preset), (f.op, &f.preset));
    }
    // `fusedops bench` on a CPU adapter runs the CPU-size list.
    let g = gpu();
    if g.is_cpu() {
        let bench: Vec<String> = suite::selected_cases(&g, Scale::Bench, &Filter::default())
            .iter()
            .map(|c| c.info().name)
            .collect();
        let names: Vec<String> = small.iter().map(|c| c.info().name).collect();
        assert_eq!(bench, names);
    }
}

/// A row as the bench makes it, with the longest strings a run can produce: the case's real
/// name, a long path, large times, a failed check with a long error.
fn row(info: CaseInfo, path: String, fail: bool, sampled: bool) -> BenchRow {
    let comparison = compare(
        &[1.0f32, 2.0],
        &[1.0f64, if fail { 9.0 } else { 2.0 }],
        Tolerance::EXACT,
    );
    let time = TimeSummary {
        clock: Clock::GpuTimestamps,
        median_us: 12_345_678.9,
        min_us: 12_000_000.0,
        max_us: 99_999_999.9,
        iters: 20,
        passes: vec![("moe gate_up".into(), 1234.5), ("moe down".into(), 99.0)],
    };
    BenchRow {
        check: CheckRow {
            case: info,
            variant: path,
            coverage: Some(Coverage::new(
                if sampled { 64 } else { 32768 },
                32768,
                "rows",
            )),
            checks: vec![Checked::new("out (64 sampled rows)", &[2], comparison)],
            error: fail.then(|| format!("device error: {}", "validation failed ".repeat(20))),
            pass: !fail,
        },
        coop_off: sampled,
        bytes: 1 << 40,
        flops: 1 << 50,
        time: Some(time),
        gbps: Some(123_456.7),
        tflops: Some(0.000_012_3),
        bound: Some(Bound::Compute),
        roof_percent: Some(100.0),
        baseline: Some("per-expert matmuls (380 dispatches)".into()),
        baseline_time: None,
        speedup: Some(12.34),
        tokens_per_s: Some(1.5e9),
    }
}

#[test]
fn terminal_table_fits_160_columns_on_the_ci_and_headline_suites() {
    let g = gpu();
    let long_path = "route: subgroup reductions, route wg 128, 8 tokens per workgroup; gate_up: \
                     gemv+gemm nk [gemv<=8 r8/64/sk8/u2, gemm 32x64x16/4x8]; down: gemm nk"
        .to_string();
    let mut rows = Vec::new();
    for scale in [Scale::Ci, Scale::Bench] {
        for (i, case) in suite::selected_cases(&g, scale, &Filter::default())
            .iter()
            .enumerate()
        {
            rows.push(row(case.info(), long_path.clone(), i % 3 == 0, i % 2 == 0));
        }
    }
    for case in suite::headline(true, &Filter::default()) {
        rows.push(row(case.info(), long_path.clone(), false, true));
    }
    let report = BenchReport::new(Environment::of(&g), Roofline::default(), rows, 1.0);
    let text = report::text(&report);
    for line in text.lines() {
        assert!(
            line.chars().count() <= TEXT_WIDTH,
            "{} columns: {line}",
            line.chars().count()
        );
    }
    // What the table cuts is in the details: the whole error of a failed case, the full path.
    assert!(text.contains("details:"));
    assert!(text.contains("validation failed validation failed"));
    assert!(text.contains("8 tokens per workgroup;"));
    assert!(
        text.contains("pass 64/32768 rows"),
        "sampled checks say how many"
    );
}

fn fusedops(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fusedops"))
        .args(args)
        .output()
        .expect("the binary runs")
}

#[test]
fn compare_gives_the_ratio_to_a_saved_run() {
    let dir = std::env::temp_dir().join(format!("fusedops-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (old, new) = (dir.join("old.json"), dir.join("new.json"));
    let tiny = [
        "--op",
        "merrouter",
        "--case",
        "e=64",
        "--iters",
        "2",
        "--warmup",
        "0",
    ];
    let run = |extra: &[&str]| {
        let mut args = vec!["bench"];
        args.extend(tiny);
        args.extend(extra);
        let out = fusedops(&args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    run(&["--json", old.to_str().unwrap()]);
    let stdout = run(&[
        "--json",
        new.to_str().unwrap(),
        "--compare",
        old.to_str().unwrap(),
    ]);
    assert!(stdout.contains("compared with"), "{stdout}");

    // The ratio printed is the saved runs' new median over the old.
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (o, n) = (read(&old), read(&new));
    let median = |v: &serde_json::Value| v["cases"][0]["time"]["median_us"].as_f64().unwrap();
    let ratio = format!("{:.2}x", median(&n) / median(&o));
    let table = report::compare(&n, &o);
    let line = table
        .lines()
        .find(|l| l.starts_with("merrouter"))
        .expect("a row per case");
    assert!(line.ends_with(&ratio), "{line} vs {ratio}");
    assert!(stdout.contains(line), "the command prints the same table");
    // A case the old run lacks is named as new; a bad file is an error, not a panic.
    let mut fewer = o.clone();
    fewer["cases"] = serde_json::json!([]);
    assert!(report::compare(&n, &fewer).contains("new case"));
    std::fs::write(&old, "not json").unwrap();
    let out = fusedops(&[
        "bench",
        "--op",
        "merrouter",
        "--compare",
        old.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));

    // The Markdown of a saved run names its device, date and command.
    let out = fusedops(&["report", new.to_str().unwrap()]);
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        md.contains(n["environment"]["date_utc"].as_str().unwrap()),
        "{md}"
    );
    assert!(md.contains("| op | case | path |"), "{md}");
    assert!(md.contains("--compare"), "the command line: {md}");
}

#[test]
fn inputs_seeded_on_the_device_are_the_values_the_host_makes() {
    let g = gpu();
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::I8] {
        let seeded = Seeded::new(42, 3);
        // 3 slabs of 7 elements: odd lengths straddle the 16-bit pairs and the int8 words.
        let t = seeded.device_tensor(&g, &[3, 7], dtype, 5).unwrap();
        let got = g.download(&t).unwrap();
        for slab in 0..3 {
            let want = seeded.slab(5 + slab, &[7], dtype).unwrap();
            let bytes = 7 * dtype.size();
            assert_eq!(
                &got.bytes()[slab * bytes..(slab + 1) * bytes],
                want.bytes(),
                "{dtype} slab {slab}"
            );
        }
    }
    // int8 values cover ±127 and never -128.
    let ints = Seeded::new(3, 0).slab(0, &[4096], DType::I8).unwrap();
    let ints = ints.as_i8().unwrap();
    assert_eq!(ints.iter().min(), Some(&-127));
    assert_eq!(ints.iter().max(), Some(&127));
    // Shards of whole slabs, each within one binding.
    let shards = Seeded::new(1, 0)
        .device_shards(&g, 3, &[4, 8], DType::BF16)
        .unwrap();
    assert_eq!(shards.iter().map(|s| s.shape()[0]).sum::<usize>(), 3);
}

/// Only cases whose kernels run on cooperative matrices get the bench's "coop off" twin row and
/// its compute roof: W8A8 (dot4I8Packed) never does; on the coop lane the 16-bit and W8A16 GEMM
/// cases do.
#[test]
fn only_tensor_core_cases_get_a_coop_off_twin() {
    let g = gpu();
    let cases = suite::selected_cases(&g, Scale::Ci, &Filter::default());
    let mut coop = 0;
    for case in &cases {
        let info = case.info();
        let uses = case.uses_tensor_cores(&g);
        let quant = info
            .params
            .iter()
            .find(|(k, _)| k == "quant")
            .map(|(_, v)| v.as_str());
        if quant == Some("w8a8") {
            assert!(
                !uses,
                "{} {}: W8A8 has no tensor-core path",
                info.op, info.name
            );
        }
        if uses {
            assert!(
                g.caps.coop_fragment().is_some(),
                "{} {}",
                info.op,
                info.name
            );
            coop += 1;
        }
    }
    assert!(
        cases.iter().any(|c| c
            .info()
            .params
            .iter()
            .any(|(k, v)| k == "quant" && v == "w8a8")),
        "the CI suite has W8A8 cases"
    );
    if std::env::var("FUSEDOPS_EXPECT_COOP").is_ok_and(|v| v == "1") {
        assert!(coop > 0, "on the coop lane some case runs on tensor cores");
    }
}
