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

/// `fusedops run` with `input` and `output`, and extra arguments.
fn run_op(op: &str, input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        op,
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend(extra);
    fusedops(&args)
}

/// Exit code 2, no panic, and `needles` all in stderr.
fn assert_refused(out: &Output, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}{stderr}", text(&out.stdout));
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    no_panic(out);
}

/// Files in `dir` whose names contain `.tmp` (left-over temporary outputs).
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

#[test]
fn run_never_overwrites_its_input() {
    let dir = temp_dir("same-file");
    let input = dir.join("in.safetensors");
    write_inputs(&input, &router_inputs(3, 64));
    let original = std::fs::read(&input).unwrap();
    let hard = dir.join("hard.safetensors");
    std::fs::hard_link(&input, &hard).unwrap();
    let sym = dir.join("sym.safetensors");
    std::os::unix::fs::symlink(&input, &sym).unwrap();
    let dotted = dir.join(".").join("in.safetensors");
    for output in [&input, &dotted, &hard, &sym] {
        let out = run_op("merrouter", &input, output, &[]);
        assert_refused(&out, &["--output", "is the input file"]);
    }
    // The other way round: the input through a link, the output the file itself.
    let out = run_op("merrouter", &sym, &input, &[]);
    assert_refused(&out, &["is the input file"]);
    assert_eq!(
        std::fs::read(&input).unwrap(),
        original,
        "the input changed"
    );
    assert!(temporaries(&dir).is_empty(), "{:?}", temporaries(&dir));
}

#[test]
fn outputs_are_checked_first_and_replaced_atomically() {
    let dir = temp_dir("atomic");
    let input = dir.join("in.safetensors");
    write_inputs(&input, &router_inputs(3, 64));
    // An output that cannot be created fails before the input is even read: here the input is
    // corrupt too, and the error is about the output.
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"not a safetensors file").unwrap();
    let under_a_file = input.join("out.safetensors");
    assert_refused(
        &run_op("merrouter", &corrupt, &under_a_file, &[]),
        &["out.safetensors"],
    );
    assert_refused(
        &run_op("merrouter", &corrupt, &dir, &[]),
        &["is a directory"],
    );
    // A failed run leaves a previous output as it was and no temporary file behind.
    let output = dir.join("out.safetensors");
    std::fs::write(&output, b"the previous good output").unwrap();
    let out = run_op(
        "merrouter",
        &input,
        &output,
        &["--params", r#"{"experts": 3}"#],
    );
    assert_refused(&out, &["3 experts"]);
    assert_eq!(std::fs::read(&output).unwrap(), b"the previous good output");
    assert!(temporaries(&dir).is_empty(), "{:?}", temporaries(&dir));
    // A good run replaces it whole.
    let out = run_op("merrouter", &input, &output, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        fusedops::io::load(&output).unwrap()["topk_ids"].shape(),
        &[3, 8]
    );
    assert!(temporaries(&dir).is_empty(), "{:?}", temporaries(&dir));

    // bench: report paths are checked before any case runs (no roofline is measured).
    let mut args = vec!["bench", "--iters", "1", "--warmup", "0"];
    args.extend(TINY_CASE);
    let bad_json = under_a_file.with_extension("json");
    let mut json_args = args.clone();
    json_args.extend(["--json", bad_json.to_str().unwrap()]);
    let out = fusedops(&json_args);
    assert_refused(&out, &["out.json"]);
    assert!(!text(&out.stdout).contains("roofline"), "the bench ran");
    let same = dir.join("report");
    let mut same_args = args.clone();
    same_args.extend([
        "--json",
        same.to_str().unwrap(),
        "--svg",
        same.to_str().unwrap(),
    ]);
    assert_refused(&fusedops(&same_args), &["--json and --svg"]);
}

fn moe_inputs(t: usize, h: usize, i: usize) -> NamedTensors {
    // pangu-pro-moe routing (64 experts), sizes from the tensors.
    let e = 64;
    let values = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|j| ((j * 7919 % 1009) as f32 / 1009.0 - 0.5) * scale)
            .collect()
    };
    let bf16 = |shape: &[usize], scale: f32| {
        let n = shape.iter().product();
        Tensor::from_f32(shape, &values(n, scale), DType::BF16).unwrap()
    };
    NamedTensors::from([
        ("hidden".to_string(), bf16(&[t, h], 1.0)),
        ("gate_weight".to_string(), bf16(&[h, e], 1.0)),
        ("router_scale".to_string(), bf16(&[e], 1.0)),
        ("gate_up".to_string(), bf16(&[e, 2 * i, h], 0.5)),
        ("down".to_string(), bf16(&[e, h, i], 0.5)),
    ])
}

/// Output names and the shapes they must have.
type ExpectedShapes = &'static [(&'static str, &'static [usize])];

/// Serving loops send empty batches: t = 0 runs end to end, the GPU outputs are empty and match
/// the (empty) reference.
#[test]
fn run_accepts_empty_batches() {
    let dir = temp_dir("empty");
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let cases: [(&str, NamedTensors, &str, ExpectedShapes); 2] = [
        (
            "merrouter",
            router_inputs(0, 256),
            r#"{"preset": "deepseek-v3", "block_size": 64}"#,
            &[
                ("topk_ids", &[0, 8]),
                ("sorted_slots", &[0]),
                ("offsets", &[257]),
            ],
        ),
        (
            "moe",
            moe_inputs(0, 8, 4),
            r#"{"tiling": "defaults"}"#,
            &[("out", &[0, 8]), ("topk_weights", &[0, 8])],
        ),
    ];
    for (op, inputs, params, shapes) in cases {
        write_inputs(&input, &inputs);
        let out = run_op(op, &input, &output, &["--params", params, "--reference"]);
        assert!(
            out.status.success(),
            "{op}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let got = fusedops::io::load(&output).unwrap();
        for (name, shape) in shapes {
            assert_eq!(got[*name].shape(), *shape, "{op} {name}");
        }
    }
}

/// sglang's tests give the DeepSeek-V3 correction bias in bf16: `run` routes with it and matches
/// the reference.
#[test]
fn run_takes_a_bf16_bias() {
    let dir = temp_dir("bf16-bias");
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let mut inputs = router_inputs(4, 256);
    let bias: Vec<f32> = (0..256).map(|x| (x % 13) as f32 / 256.0).collect();
    inputs.insert(
        "bias".into(),
        Tensor::from_f32(&[256], &bias, DType::BF16).unwrap(),
    );
    write_inputs(&input, &inputs);
    let out = run_op(
        "merrouter",
        &input,
        &output,
        &["--params", r#"{"preset": "deepseek-v3"}"#, "--reference"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("topk_ids: ok"));
}

/// Parameters are strict: an object of named fields, each once, of the right type and range;
/// every error names the field, the value and what is allowed. Unknown tensors are refused with
/// the accepted names.
#[test]
fn run_params_and_tensor_names_are_strict() {
    let dir = temp_dir("strict");
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    write_inputs(&input, &router_inputs(3, 64));
    let merrouter: &[(&str, &[&str])] = &[
        ("[0.01, true]", &["expected a JSON object", "[0.01,true]"]),
        ("\"pangu-pro-moe\"", &["expected a JSON object"]),
        (r#"{"top_k": 8, "top_k": 4}"#, &["duplicate key \"top_k\""]),
        (
            r#"{"routed_scaling_factor": 1e300}"#,
            &["routed_scaling_factor", "1e300", "f32 range"],
        ),
        (
            r#"{"routed_scaling_factor": 1e-300}"#,
            &["routed_scaling_factor", "would become 0"],
        ),
        (
            r#"{"routed_scaling_factor": "2.5"}"#,
            &["routed_scaling_factor", "\"2.5\"", "expected f32"],
        ),
        (r#"{"experts": -1}"#, &["experts", "-1", "expected usize"]),
        (
            r#"{"scoring": "tanh"}"#,
            &["scoring", "tanh", "softmax", "sigmoid"],
        ),
        (
            r#"{"selection": "random"}"#,
            &["selection", "random", "moge"],
        ),
        (
            r#"{"renormalize": 1}"#,
            &["renormalize", "expected a boolean"],
        ),
        (r#"{"topk": 4}"#, &["unknown field `topk`", "top_k"]),
        (r#"{"group_score": ["max"]}"#, &["group_score", "list"]),
    ];
    for (params, needles) in merrouter {
        let out = run_op("merrouter", &input, &output, &["--params", params]);
        assert_refused(&out, needles);
    }
    // The other operators' fields (their tensors need not be valid: params come first).
    let others: &[(&str, &str, &[&str])] = &[
        (
            "amla",
            r#"{"softmax_scale": "x"}"#,
            &["softmax_scale", "\"x\"", "f32"],
        ),
        (
            "amla",
            r#"{"softmax_scale": 3e39}"#,
            &["softmax_scale", "f32 range"],
        ),
        (
            "amla",
            r#"{"rescale": "add"}"#,
            &["rescale", "add", "multiply"],
        ),
        (
            "amla",
            r#"{"p_precision": "f8"}"#,
            &["p_precision", "f8", "f16"],
        ),
        (
            "amla",
            r#"{"causal": "yes"}"#,
            &["causal", "yes", "boolean"],
        ),
        (
            "amla",
            r#"{"split": {"chunk": -3}}"#,
            &["split", "-3", "chunk"],
        ),
        ("swiftgmm", r#"{"layout": "mn"}"#, &["layout", "mn", "nk"]),
        (
            "swiftgmm",
            r#"{"activation": "gelu"}"#,
            &["activation", "gelu", "swiglu"],
        ),
        ("swiftgmm", r#"{"mode": "fast"}"#, &["mode", "fast", "gemv"]),
        (
            "swiftgmm",
            r#"{"tiling": {"fixed": {"threshold": 1}}}"#,
            &["tiling.fixed", "missing field `gemv`"],
        ),
        (
            "moe",
            r#"{"router": {"experts": 64}}"#,
            &["router", "missing field"],
        ),
        ("moe", r#"{"router": [64, 8, 8]}"#, &["router", "list"]),
        (
            "moe",
            r#"{"router": {"experts": -1}}"#,
            &["router.experts", "-1", "usize"],
        ),
        (
            "moe",
            r#"{"routed_scaling_factor": 2.5}"#,
            &["unknown field `routed_scaling_factor`", "router"],
        ),
    ];
    write_inputs(
        &input,
        &NamedTensors::from([("q".to_string(), Tensor::f32(&[1], vec![0.0]).unwrap())]),
    );
    for (op, params, needles) in others {
        let out = run_op(op, &input, &output, &["--params", params]);
        assert_refused(&out, needles);
    }

    // A misspelled optional tensor is an error listing the accepted names, not ignored.
    let mut typo = router_inputs(3, 64);
    typo.insert(
        "router_scales".into(),
        Tensor::f32(&[64], vec![2.0; 64]).unwrap(),
    );
    write_inputs(&input, &typo);
    assert_refused(
        &run_op("merrouter", &input, &output, &[]),
        &["\"router_scales\"", "\"router_scale\"", "\"logits\""],
    );
    let mut x = NamedTensors::new();
    x.insert("x".into(), Tensor::f32(&[4, 8], vec![0.0; 32]).unwrap());
    x.insert("w".into(), Tensor::f32(&[2, 8, 4], vec![0.0; 64]).unwrap());
    x.insert("offsets".into(), Tensor::i32(&[0], vec![]).unwrap());
    write_inputs(&input, &x);
    assert_refused(
        &run_op("swiftgmm", &input, &output, &[]),
        &["offsets", "[0]", "empty list"],
    );
    x.insert(
        "row_scales".into(),
        Tensor::f32(&[4], vec![2.0; 4]).unwrap(),
    );
    write_inputs(&input, &x);
    assert_refused(
        &run_op("swiftgmm", &input, &output, &[]),
        &["\"row_scales\"", "\"row_scale\""],
    );
    assert!(!output.exists(), "no output file is written on error");
}
