//! The `fusedops` command line end to end on the default adapter (lavapipe in CI): bench on a
//! tiny case with its JSON and SVG reports, check, run with a safetensors round trip, and the
//! error paths.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fusedops::registry::NamedTensors;
use fusedops::tensor::{DType, Tensor};

fn fusedops(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusedops"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

/// A fresh temporary directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusedops-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn no_panic(out: &Output) {
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );
}

/// The smallest bench case of the router (64 experts, routing only).
const TINY_CASE: [&str; 6] = [
    "--op",
    "merrouter",
    "--case",
    "e=64",
    "--case",
    "stage=route",
];

#[test]
fn bench_writes_json_and_svg_with_one_point_per_case() {
    let dir = temp_dir("bench");
    let (json, svg) = (dir.join("r.json"), dir.join("r.svg"));
    let mut args = vec!["bench", "--iters", "2", "--warmup", "1"];
    args.extend(TINY_CASE);
    args.extend([
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let out = fusedops(&args);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("roofline"), "{stdout}");
    assert!(stdout.contains("merrouter"), "{stdout}");

    // The JSON layout is part of the interface: these keys must stay.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["schema_version"], 1);
    for key in ["command", "environment", "roofline", "cases"] {
        assert!(!report[key].is_null(), "missing {key}");
    }
    let env = &report["environment"];
    for key in ["fusedops_version", "date_utc", "adapter", "capabilities"] {
        assert!(!env[key].is_null(), "missing environment.{key}");
    }
    assert!(report["roofline"]["copy"]["value"].as_f64().unwrap() > 0.0);
    let cases = report["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        for key in [
            "bytes",
            "flops",
            "time",
            "gbps",
            "tflops",
            "bound",
            "roof_percent",
            "speedup",
        ] {
            assert!(case.get(key).is_some(), "case lacks {key}: {case}");
        }
        let check = &case["check"];
        assert_eq!(check["case"]["op"], "merrouter");
        assert!(check["pass"].as_bool().unwrap(), "{check}");
        assert!(case["time"]["median_us"].as_f64().unwrap() > 0.0);
        assert!(matches!(
            case["time"]["clock"].as_str(),
            Some("gpu-timestamps" | "wall-clock")
        ));
    }

    // The full key structure is pinned by a golden file: a renamed or removed field fails here.
    // After a deliberate change, regenerate it with FUSEDOPS_BLESS=1.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/bench_report_keys.txt");
    let mut keys = Vec::new();
    key_paths(&report, "", &mut keys);
    keys.sort();
    keys.dedup();
    let keys = keys.join("\n") + "\n";
    if std::env::var_os("FUSEDOPS_BLESS").is_some() {
        std::fs::write(&golden, &keys).unwrap();
    }
    assert_eq!(
        keys,
        std::fs::read_to_string(&golden).unwrap(),
        "bench JSON keys differ from {golden:?} (FUSEDOPS_BLESS=1 regenerates it)"
    );

    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg"), "not an SVG document");
    // One labelled point per case: each case's label appears once.
    for case in cases {
        let label = format!(
            "merrouter {}",
            case["check"]["case"]["name"].as_str().unwrap()
        );
        assert_eq!(svg.matches(&label).count(), 1, "point for {label}");
    }
}

/// Every object key path of a JSON value (`cases[].check.pass`), scalars' types left out so that
/// optional numbers (null or not) do not matter. What depends on the adapter is normalised: the
/// probes under `roofline` (f16 and cooperative-matrix probes exist only where supported) all
/// become `roofline.*`, and the elements of the cooperative-matrix list are not descended into.
fn key_paths(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    if prefix == "environment.capabilities.coop_matrix" {
        return;
    }
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = match prefix {
                    "" => k.clone(),
                    "roofline" => "roofline.*".to_string(),
                    _ => format!("{prefix}.{k}"),
                };
                out.push(path.clone());
                key_paths(v, &path, out);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                key_paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn bench_markdown_has_the_tables() {
    let mut args = vec!["bench", "--iters", "1", "--warmup", "0", "--markdown"];
    args.extend(TINY_CASE);
    let out = fusedops(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("| probe | value |"), "{stdout}");
    assert!(stdout.contains("| op | case | path |"), "{stdout}");
    assert!(stdout.contains("| merrouter |"), "{stdout}");
}

#[test]
fn check_passes_and_filters() {
    let out = fusedops(&["check", "--op", "merrouter"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("PASS merrouter"), "{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");

    let out = fusedops(&["check", "--op", "merrouter", "--case", "e=999999"]);
    assert!(!out.status.success(), "an empty selection is not a pass");
    assert!(text(&out.stdout).contains("no case matches"));
}

#[test]
fn unknown_operator_and_bad_filters_are_errors() {
    let out = fusedops(&["check", "--op", "nonesuch"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown operator"));
    no_panic(&out);
    let out = fusedops(&["check", "--case", "novalue"]);
    assert!(!out.status.success());
    no_panic(&out);
}

fn write_inputs(path: &Path, tensors: &NamedTensors) {
    fusedops::io::save(path, tensors).unwrap();
}

fn router_inputs(t: usize, e: usize) -> NamedTensors {
    // Distinct logits per token so no tie decides the ids.
    let logits: Vec<f32> = (0..t * e)
        .map(|i| ((i * 7919) % 1009) as f32 / 97.0 - 5.0)
        .collect();
    let mut inputs = NamedTensors::new();
    inputs.insert("logits".into(), Tensor::f32(&[t, e], logits).unwrap());
    inputs
}

#[test]
fn run_round_trips_safetensors_and_matches_the_reference() {
    let dir = temp_dir("run");
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    write_inputs(&input, &router_inputs(5, 64));
    let out = fusedops(&[
        "run",
        "merrouter",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--params",
        r#"{"preset": "pangu-pro-moe"}"#,
        "--reference",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("topk_ids: ok"), "{stdout}");
    let outputs = fusedops::io::load(&output).unwrap();
    let ids = &outputs["topk_ids"];
    assert_eq!(ids.shape(), &[5, 8]);
    assert_eq!(ids.dtype(), DType::I32);
    assert!(ids.as_i32().unwrap().iter().all(|&i| (0..64).contains(&i)));
    assert_eq!(outputs["topk_weights"].shape(), &[5, 8]);
}

#[test]
fn run_reports_bad_files_and_tensors_by_name() {
    let dir = temp_dir("run-errors");
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let run = |params: &str| {
        fusedops(&[
            "run",
            "merrouter",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--params",
            params,
        ])
    };
    let expect_error = |out: Output, needle: &str| {
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
        let stderr = text(&out.stderr);
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
        no_panic(&out);
    };

    // A missing file.
    expect_error(run("{}"), "in.safetensors");
    // A corrupt file.
    std::fs::write(&input, b"definitely not safetensors").unwrap();
    expect_error(run("{}"), "not a valid safetensors file");
    // A missing tensor.
    let mut other = NamedTensors::new();
    other.insert("weights".into(), Tensor::f32(&[2], vec![1.0, 2.0]).unwrap());
    write_inputs(&input, &other);
    expect_error(run("{}"), "logits");
    // A mis-shaped tensor: 63 experts where the preset has 64.
    write_inputs(&input, &router_inputs(3, 63));
    expect_error(run("{}"), "logits");
    // A wrong dtype.
    let mut ints = NamedTensors::new();
    ints.insert("logits".into(), Tensor::i32(&[1, 64], vec![0; 64]).unwrap());
    write_inputs(&input, &ints);
    expect_error(run("{}"), "logits");
    // Bad params.
    write_inputs(&input, &router_inputs(3, 64));
    expect_error(run("{not json"), "--params");
    expect_error(run(r#"{"no_such_param": 1}"#), "no_such_param");
    assert!(!output.exists(), "no output file is written on error");
}

#[test]
fn ascend_plan_prints_and_refuses() {
    let out = fusedops(&[
        "ascend-plan",
        "swiftgmm",
        "--chip",
        "910B2",
        "--preset",
        "pangu-pro-moe",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("910B2"));
    let out = fusedops(&[
        "ascend-plan",
        "amla",
        "--chip",
        "310P3",
        "--shape",
        "dtype=bf16",
    ]);
    assert_eq!(out.status.code(), Some(2));
    no_panic(&out);
}
