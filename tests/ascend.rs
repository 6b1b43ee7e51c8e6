//! Ascend porting plans: every preset fits every chip, oversized tiles, sizes that cannot be
//! planned and 310P features it lacks are refused with the right error naming the field, the
//! arithmetic of a small plan is exact, the generated TilingData compiles with g++ against a
//! stand-in of CANN's macros and holds the plan's values, the pipeline SVG names every stage, a
//! 310P plan never mentions Fixpipe, and the tables, C++ and pictures in docs/ascend/ are the
//! ones the code generates. No GPU is involved.

use std::path::PathBuf;
use std::process::Command;

use fusedops::Error;
use fusedops::ascend::chips::{CHIPS, CoreArch, Memory, chip, markdown_table};
use fusedops::ascend::plan::{CROSS_FLAG_IDS, FieldValue};
use fusedops::ascend::timeline::Pipe;
use fusedops::ascend::{AscendPlan, OPERATORS, plan_command};

fn flags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn plan(op: &str, chip: &str, preset: Option<&str>, pairs: &[(&str, &str)]) -> AscendPlan {
    plan_command(op, chip, preset, &flags(pairs))
        .unwrap_or_else(|e| panic!("{op} on {chip} ({preset:?}, {pairs:?}): {e}"))
}

fn refusal(op: &str, chip: &str, preset: Option<&str>, pairs: &[(&str, &str)]) -> Error {
    match plan_command(op, chip, preset, &flags(pairs)) {
        Ok(_) => panic!("{op} on {chip} with {pairs:?} was planned, expected a refusal"),
        Err(e) => e,
    }
}

fn choice<'a>(plan: &'a AscendPlan, key: &str) -> &'a str {
    plan.choices
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no choice {key} in {:?}", plan.choices))
}

/// Every buffer starts aligned, buffers of one memory do not overlap, and each memory fits.
fn assert_fits(plan: &AscendPlan) {
    let c = plan.chip;
    for m in &plan.memory {
        assert!(
            m.used <= m.capacity,
            "{} {}: {} > {}",
            plan.op,
            m.memory.name(),
            m.used,
            m.capacity
        );
        assert_eq!(m.capacity, c.capacity(m.memory));
        let mut here: Vec<_> = plan
            .buffers
            .iter()
            .filter(|b| b.memory == m.memory && b.core == m.core && b.kernel == m.kernel)
            .collect();
        here.sort_by_key(|b| b.offset);
        let mut end = 0;
        for b in here {
            let align = m.memory.alignment();
            assert_eq!(b.offset % align, 0, "{} {} offset", plan.op, b.name);
            assert_eq!(b.aligned_bytes % align, 0, "{} {} size", plan.op, b.name);
            assert!(b.aligned_bytes >= b.bytes && b.aligned_bytes < b.bytes + align);
            assert_eq!(
                b.offset, end,
                "{} {} overlaps or leaves a gap",
                plan.op, b.name
            );
            end = b.offset + b.total();
        }
        assert_eq!(end, m.used);
    }
    assert!(!plan.kernels.is_empty());
    for k in &plan.kernels {
        let s = &k.split;
        assert!(s.cube_cores_used <= c.cube_cores);
        assert!(s.vector_cores_used <= c.vector_cores);
        assert!(
            s.units_per_core * u64::from(c.cube_cores.max(s.vector_cores_used)) >= s.work_units
        );
        assert!(s.block_dim >= 1);
        assert_eq!(k.workspace.cores, s.block_dim);
        assert_eq!(
            k.workspace.total,
            k.workspace.per_core * u64::from(k.workspace.cores) + k.workspace.system
        );
        // Each buffer and memory use names a kernel of the plan.
        assert!(plan.buffers.iter().any(|b| b.kernel == k.name));
    }
}

#[test]
fn every_preset_plans_on_every_chip_and_fits() {
    for c in &CHIPS {
        for op in OPERATORS {
            for preset in [None, Some("deepseek-v3"), Some("pangu-pro-moe")] {
                if op == "amla" && preset == Some("pangu-pro-moe") {
                    continue;
                }
                let p = plan(op, c.name, preset, &[]);
                assert_fits(&p);
                assert!(
                    p.command
                        .starts_with(&format!("fusedops ascend-plan {op} --chip"))
                );
                // Every memory the operator uses is checked: cube ops fill L1/L0, all use UB.
                let used: Vec<Memory> = p.memory.iter().map(|m| m.memory).collect();
                assert!(used.contains(&Memory::Ub));
                if op != "merrouter" {
                    for m in [Memory::L1, Memory::L0A, Memory::L0B, Memory::L0C] {
                        assert!(used.contains(&m), "{op} on {} has no {m:?}", c.name);
                    }
                    assert!(p.roofline.cube_flops_per_core > 0.0);
                }
                assert!(p.roofline.gm_bytes_per_core > 0.0);
                assert!(!p.stages.is_empty() && p.kernels.iter().all(|k| !k.tiling.is_empty()));
                assert!(!p.start.is_empty() && !p.correspondence.is_empty());
                let text = p.to_text();
                assert!(text.contains("tiling field") && text.contains("replaces (WGSL)"));
                assert!(text.contains(c.name) && text.contains("blockDim"));
                let json: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
                assert_eq!(json["op"], op);
                assert_eq!(json["chip"]["name"], c.name);
                assert_eq!(json["buffers"].as_array().unwrap().len(), p.buffers.len());
                assert_eq!(json["stages"].as_array().unwrap().len(), p.stages.len());
                assert_eq!(json["kernels"].as_array().unwrap().len(), p.kernels.len());
            }
        }
    }
}

#[test]
fn larger_decode_shapes_also_fit() {
    let cases: &[(&str, &[(&str, &str)])] = &[
        (
            "amla",
            &[("s_q", "4"), ("heads", "64"), ("kv_len", "16384")],
        ),
        ("amla", &[("heads", "16"), ("batch", "1"), ("page", "64")]),
        ("amla", &[("update", "ub"), ("rescale", "multiply")]),
        ("swiftgmm", &[("tokens", "65536"), ("proj", "down")]),
        ("swiftgmm", &[("tokens", "1")]),
        ("merrouter", &[("tokens", "65536")]),
        ("merrouter", &[("tokens", "1")]),
    ];
    for c in &CHIPS {
        for (op, pairs) in cases {
            assert_fits(&plan(op, c.name, Some("deepseek-v3"), pairs));
        }
    }
}

#[test]
fn oversized_tiles_are_refused_with_the_memory_that_overflows() {
    let limit = |e: Error| match e {
        Error::Limit { what, need, max } => {
            assert!(need > max, "{what}: {need} <= {max}");
            what
        }
        other => panic!("expected Error::Limit, got {other}"),
    };
    // Two 1024-key K/V blocks cannot fit the 512 KiB L1 of an A2 cube core.
    let what = limit(refusal("amla", "910B2", None, &[("kv_tile", "1024")]));
    assert!(
        what.contains("L1") && what.contains("kv (K and V)"),
        "{what}"
    );
    // A double-buffered [128, 256] f32 accumulator is 256 KiB: too big for L0C on A2 ...
    let gemm = [
        ("mode", "gemm"),
        ("proj", "down"),
        ("m0", "128"),
        ("n0", "256"),
        ("k0", "64"),
        ("k1", "256"),
    ];
    let what = limit(refusal(
        "swiftgmm",
        "910B4",
        None,
        &[&gemm[..], &[("tokens", "8192")]].concat(),
    ));
    assert!(what.contains("L0C") && what.contains("910B4"), "{what}");
    // ... and exactly the 256 KiB L0C of a 310P3 core.
    let p = plan(
        "swiftgmm",
        "310P3",
        None,
        &[&gemm[..], &[("tokens", "8192")]].concat(),
    );
    let l0c = p.memory.iter().find(|m| m.memory == Memory::L0C).unwrap();
    assert_eq!((l0c.used, l0c.capacity), (256 * 1024, 256 * 1024));
    // 4096 rows of 256 f32 logits, double-buffered, cannot fit a UB.
    let what = limit(refusal("merrouter", "910B2", None, &[("rows", "4096")]));
    assert!(what.contains("UB") && what.contains("logits"), "{what}");
    // L0B holds k0 x max(kv_tile, n0): 128 x 512 f16 twice is 256 KiB.
    let what = limit(refusal(
        "amla",
        "910B2",
        None,
        &[("head_tile", "16"), ("kv_tile", "512"), ("k0", "128")],
    ));
    assert!(what.contains("L0B") || what.contains("L1"), "{what}");
}

#[test]
fn misaligned_or_impossible_tiles_are_invalid() {
    for (op, pairs) in [
        ("amla", &[("kv_tile", "100")][..]),
        ("amla", &[("page", "72")][..]),
        ("amla", &[("kv_tile", "96"), ("page", "128")][..]),
        ("amla", &[("head_tile", "256")][..]),
        ("amla", &[("kv_len", "256"), ("splits", "64")][..]),
        ("amla", &[("n0", "1024")][..]),
        ("swiftgmm", &[("n0", "24")][..]),
        ("swiftgmm", &[("mode", "gemv"), ("m0", "32")][..]),
        ("swiftgmm", &[("k0", "64"), ("k1", "96")][..]),
        ("swiftgmm", &[("proj", "gate_up"), ("n", "4095")][..]),
        ("merrouter", &[("experts", "250")][..]),
        ("merrouter", &[("select", "moge"), ("top_k", "12")][..]),
        ("merrouter", &[("k_group", "9")][..]),
        ("merrouter", &[("top_k", "100"), ("k_group", "2")][..]),
        ("amla", &[("batch", "0")][..]),
        ("amla", &[("batch", "many")][..]),
        ("amla", &[("update", "atomic"), ("rescale", "multiply")][..]),
    ] {
        match refusal(op, "910B2", None, pairs) {
            Error::Invalid { .. } => {}
            other => panic!("{op} {pairs:?}: expected Error::Invalid, got {other}"),
        }
    }
}

#[test]
fn features_the_310p_lacks_are_refused_and_work_on_a2() {
    let requests: &[(&str, &[(&str, &str)])] = &[
        ("amla", &[("dtype", "bf16")]),
        ("amla", &[("update", "atomic")]),
        ("swiftgmm", &[("dtype", "bf16")]),
        ("merrouter", &[("histogram", "atomic")]),
    ];
    for (op, pairs) in requests {
        match refusal(op, "310P3", Some("deepseek-v3"), pairs) {
            Error::Unsupported { what, .. } => {
                assert!(what.contains("310P3"), "{what}");
                assert!(
                    what.contains(pairs[0].0),
                    "{what} should name {}",
                    pairs[0].0
                );
            }
            other => panic!("{op} {pairs:?} on 310P3: expected Error::Unsupported, got {other}"),
        }
        for a2 in ["910B2", "910B4"] {
            assert_fits(&plan(op, a2, Some("deepseek-v3"), pairs));
        }
    }
    // Without explicit requests, 310P3 plans avoid what it lacks and A2 plans use it.
    let amla_310 = plan("amla", "310P3", None, &[]);
    assert_eq!(choice(&amla_310, "update"), "ub");
    assert_eq!(
        choice(&plan("amla", "910B2", None, &[]), "update"),
        "atomic"
    );
    let router_310 = plan("merrouter", "310P3", None, &[]);
    assert_eq!(choice(&router_310, "topk_impl"), "reduce");
    assert_eq!(choice(&router_310, "histogram"), "workspace");
    let router_a2 = plan("merrouter", "910B2", None, &[]);
    assert_eq!(choice(&router_a2, "topk_impl"), "sort");
    // Every core publishes its own counts row: no atomics unless asked for.
    assert_eq!(choice(&router_a2, "histogram"), "workspace");
    // 310P3 has no Sort32, but the high-level Sort runs there on region proposals: 32 B per
    // element instead of A2's 8 B (score, index) pairs.
    let sorted = |chip: &str| {
        let p = plan(
            "merrouter",
            chip,
            None,
            &[("topk_impl", "sort"), ("rows", "4")],
        );
        let b = p
            .buffers
            .iter()
            .find(|b| b.name == "sorted choices")
            .unwrap()
            .bytes;
        (choice(&p, "topk_impl").to_string(), b)
    };
    assert_eq!(sorted("910B2"), ("sort".into(), 4 * 256 * 8));
    assert_eq!(sorted("310P3"), ("sort".into(), 4 * 256 * 32));
    // CANN built-ins on 310P3: none for AMLA, GroupedMatmul's Ascend310P configuration (f16,
    // NZ weights), MoeInitRoutingV2 for the dispatch and MoeFinalizeRoutingV2 for the combine.
    let compare = |op: &str| -> String {
        plan(op, "310P3", None, &[])
            .start
            .iter()
            .find(|s| s.kind == "compare with")
            .unwrap()
            .what
            .clone()
    };
    assert!(compare("amla").starts_with("none"));
    let gmm = compare("swiftgmm");
    assert!(
        gmm.contains("Ascend310P") && gmm.contains("FRACTAL_NZ"),
        "{gmm}"
    );
    let router = compare("merrouter");
    assert!(
        router.starts_with("MoeInitRoutingV2") && router.contains("MoeFinalizeRoutingV2"),
        "{router}"
    );
    assert!(compare("swiftgmm").contains("ascend310p") || gmm.contains("Ascend310P"));
}

#[test]
fn bad_names_are_format_errors() {
    for (op, chip, preset, pairs) in [
        ("gemm", "910B2", None, &[][..]),
        ("amla", "910C", None, &[][..]),
        ("amla", "910B2", Some("llama"), &[][..]),
        ("amla", "910B2", None, &[("experts", "8")][..]),
        ("amla", "910B2", None, &[("batch", "2"), ("batch", "3")][..]),
    ] {
        match plan_command(op, chip, preset, &flags(pairs)) {
            Err(Error::Format { .. }) => {}
            other => {
                panic!("{op} {chip} {preset:?} {pairs:?}: expected Error::Format, got {other:?}")
            }
        }
    }
    match refusal("amla", "910B2", Some("pangu-pro-moe"), &[]) {
        Error::Unsupported { what, .. } => assert!(what.contains("GQA"), "{what}"),
        other => panic!("expected Error::Unsupported, got {other}"),
    }
    // Chip names are accepted with or without the SoC prefix, in any case.
    assert_eq!(chip("ascend910b4").unwrap().name, "910B4");
}

#[test]
fn small_amla_plan_has_exact_arithmetic() {
    // One sequence, 16 heads, one 128-key tile: one work unit on one core.
    let p = plan(
        "amla",
        "910B2",
        None,
        &[
            ("batch", "1"),
            ("heads", "16"),
            ("kv_len", "128"),
            ("page", "128"),
        ],
    );
    assert_eq!(choice(&p, "kv_tile"), "128");
    assert_eq!(choice(&p, "splits"), "1");
    let split = &p.kernels[0].split;
    assert_eq!(
        (split.work_units, split.units_per_core, split.block_dim),
        (1, 1, 1)
    );
    // QK: 2 * 16 * 128 * 576, PV: 2 * 16 * 128 * 512.
    assert_eq!(
        p.roofline.cube_flops_per_core,
        (2 * 16 * 128 * (576 + 512)) as f64
    );
    // K/V tile + Q + O, f16.
    let bytes = 128 * 576 * 2 + 16 * 576 * 2 + 16 * 512 * 2;
    assert_eq!(p.roofline.gm_bytes_per_core, bytes as f64);
    // 910B2 has a cube estimate but no public bandwidth: a compute time and no bound.
    assert!(p.roofline.compute_us.is_some() && p.roofline.bound.is_none());
    let q = p.buffers.iter().find(|b| b.name == "q").unwrap();
    assert_eq!((q.bytes, q.copies, q.offset), (16 * 576 * 2, 1, 0));
    let kv = p.buffers.iter().find(|b| b.name == "kv (K and V)").unwrap();
    assert_eq!(
        (kv.bytes, kv.copies, kv.offset),
        (128 * 576 * 2, 2, 16 * 576 * 2)
    );
}

#[test]
fn roofline_bound_needs_peaks() {
    let with = plan(
        "swiftgmm",
        "910B2",
        Some("deepseek-v3"),
        &[("peak_tflops", "300"), ("mem_gbps", "1500")],
    );
    let r = &with.roofline;
    let peak = r.peak.as_ref().expect("caller-supplied peaks");
    assert!(peak.source.contains("caller"));
    assert_eq!(r.ridge, Some(300e12 / 1500e9));
    assert!(r.compute_us.unwrap() > 0.0 && r.memory_us.unwrap() > 0.0);
    // Decode GEMV streams each expert's weights once: far below the ridge, memory bound.
    assert!(r.intensity < r.ridge.unwrap());
    assert_eq!(r.bound, Some(fusedops::ascend::plan::Bound::Memory));
    // 310P3 carries public figures of its own.
    let p310 = plan("amla", "310P3", None, &[]);
    let source = &p310.roofline.peak.as_ref().unwrap().source;
    assert!(source.contains("cube: public figure") && source.contains("memory: public figure"));
    assert!(p310.roofline.bound.is_some());
    // 910B: an estimated cube peak (24 x 4096 x 2 x 1.8 GHz), labelled as one, and the caller's
    // number wins; the bound then needs only the bandwidth.
    let estimate = plan("swiftgmm", "910B2", None, &[]);
    let peak = estimate.roofline.peak.as_ref().unwrap();
    let tflops = peak.cube_fp16_tflops.unwrap();
    assert!(
        (tflops - 24.0 * 4096.0 * 2.0 * 1.8e9 / 1e12).abs() < 1e-9,
        "{tflops}"
    );
    assert!(peak.source.contains("estimate"), "{}", peak.source);
    assert!(estimate.roofline.compute_us.is_some() && estimate.roofline.bound.is_none());
    let text = estimate.to_text();
    assert!(
        text.contains("353.9 TFLOP/s") && text.contains("mem_gbps"),
        "{text}"
    );
    let own = plan("swiftgmm", "910B2", None, &[("peak_tflops", "100")]);
    assert_eq!(
        own.roofline.peak.as_ref().unwrap().cube_fp16_tflops,
        Some(100.0)
    );
    let bound = plan("swiftgmm", "910B4", None, &[("mem_gbps", "800")]);
    assert!(bound.roofline.bound.is_some());
    assert!(
        (bound
            .roofline
            .peak
            .as_ref()
            .unwrap()
            .cube_fp16_tflops
            .unwrap()
            - 294.912)
            .abs()
            < 1e-6
    );
    match refusal("amla", "910B2", None, &[("mem_gbps", "-1")]) {
        Error::Invalid { .. } => {}
        other => panic!("expected Error::Invalid, got {other}"),
    }
}

#[test]
fn chip_specs_are_the_spec_facts() {
    let facts = [
        ("910B2", 24, 48, 192, 512, 64, 64, 128),
        ("910B4", 20, 40, 192, 512, 64, 64, 128),
        ("310P3", 8, 8, 256, 1024, 64, 64, 256),
    ];
    for (name, cube, vector, ub, l1, l0a, l0b, l0c) in facts {
        let c = chip(name).unwrap();
        assert_eq!((c.cube_cores, c.vector_cores), (cube, vector), "{name}");
        let kib = |m| c.capacity(m) / 1024;
        assert_eq!(
            (
                kib(Memory::Ub),
                kib(Memory::L1),
                kib(Memory::L0A),
                kib(Memory::L0B),
                kib(Memory::L0C)
            ),
            (ub, l1, l0a, l0b, l0c),
            "{name}"
        );
        assert!(!c.sources.is_empty());
    }
    assert_eq!(Memory::Ub.alignment(), 32);
    assert_eq!(Memory::L1.alignment(), 32);
    assert_eq!(Memory::L0A.alignment(), 512);
    assert_eq!(Memory::L0B.alignment(), 512);
}

#[test]
fn docs_chip_table_is_generated_from_the_code() {
    let readme = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/ascend/README.md"
    ))
    .unwrap();
    let table = markdown_table();
    assert!(
        readme.contains(&table),
        "docs/ascend/README.md must contain the chip table exactly as chips::markdown_table() \
         prints it:\n{table}"
    );
    // Every chip name and SoC version the code knows appears in the docs.
    for c in &CHIPS {
        assert!(readme.contains(c.name) && readme.contains(c.soc_version));
    }
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `@compute` entry points of a shader file.
fn entry_points(shader: &str) -> Vec<String> {
    let text = repo_file(&format!("shaders/{shader}"));
    let mut entries = Vec::new();
    let mut after_compute = false;
    for line in text.lines() {
        if line.contains("@compute") {
            after_compute = true;
        }
        if after_compute && let Some(rest) = line.trim_start().strip_prefix("fn ") {
            entries.push(rest.split('(').next().unwrap().trim().to_string());
            after_compute = false;
        }
    }
    entries
}

/// Every function a shader file defines.
fn functions(shader: &str) -> Vec<String> {
    repo_file(&format!("shaders/{shader}"))
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("fn "))
        .map(|rest| rest.split('(').next().unwrap().trim().to_string())
        .collect()
}

/// `word` occurs in `text` as a whole identifier.
fn names(text: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[test]
fn plan_stages_name_every_kernel_of_the_wgsl_port() {
    // The fused path of each operator: the unfused baselines (`staged_*`, `gemm_expert`) and the
    // dispatch of externally given ids (`histogram`) are not what a port reproduces.
    let skipped = |entry: &str| entry.starts_with("staged_") || entry == "gemm_expert";
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: &[Case] = &[
        (
            "amla",
            &["amla_prep.wgsl", "amla_decode.wgsl", "amla_combine.wgsl"],
            // split-KV, so that the combine stage exists
            &[("batch", "1"), ("splits", "4")],
        ),
        (
            "swiftgmm",
            &["swiftgmm_schedule.wgsl", "swiftgmm_matmul.wgsl"],
            &[],
        ),
        (
            "merrouter",
            &[
                "merrouter_route.wgsl",
                "merrouter_layout.wgsl",
                "merrouter_scatter.wgsl",
                "merrouter_combine.wgsl",
            ],
            &[],
        ),
        (
            "moe",
            &[
                "moe_gather.wgsl",
                "moe_combine.wgsl",
                "merrouter_route.wgsl",
                "swiftgmm_matmul.wgsl",
            ],
            &[],
        ),
    ];
    for c in &CHIPS {
        for (op, shaders, pairs) in cases {
            let p = plan(op, c.name, None, pairs);
            let wgsl: Vec<&str> = p.stages.iter().map(|s| s.wgsl.as_str()).collect();
            for shader in *shaders {
                let entries = entry_points(shader);
                assert!(!entries.is_empty(), "{shader} has no entry point");
                for entry in entries.iter().filter(|e| !skipped(e) && *e != "histogram") {
                    assert!(
                        wgsl.iter().any(|w| w.contains(shader) && names(w, entry)),
                        "{op} on {}: no stage replaces {shader}: {entry}; stages: {wgsl:?}",
                        c.name
                    );
                }
            }
            // Every shader a stage names exists and has the function it names first.
            for w in &wgsl {
                if let Some((file, rest)) = w.split_once(": ") {
                    let name = rest.split([' ', ',']).next().unwrap();
                    let functions = functions(file);
                    assert!(
                        functions.iter().any(|f| f == name)
                            || name.ends_with('*')
                                && functions
                                    .iter()
                                    .any(|f| f.starts_with(name.trim_end_matches('*'))),
                        "{op}: stage names {file}: {name}, functions are {functions:?}"
                    );
                }
            }
            for st in &p.stages {
                let unit = match c.arch {
                    fusedops::ascend::chips::CoreArch::Separated => ["AIC", "AIV"],
                    fusedops::ascend::chips::CoreArch::Coupled => {
                        ["AI core (cube)", "AI core (vector)"]
                    }
                };
                assert!(unit.contains(&st.unit.as_str()), "{op}: {}", st.unit);
            }
        }
    }
}

#[test]
fn the_router_plan_produces_every_output_of_the_wgsl_router() {
    use fusedops::ops::merrouter::HostLayout;
    use fusedops::tensor::Tensor;
    let empty = || Tensor::i32(&[0], vec![]).unwrap();
    let layout = HostLayout {
        counts: empty(),
        offsets: empty(),
        sorted_slots: empty(),
        slot_rows: empty(),
        block_experts: empty(),
        group_loads: empty(),
        imbalance: empty(),
    };
    let outputs: Vec<&str> = layout
        .named()
        .iter()
        .map(|(name, _)| *name)
        .chain(["topk_ids", "topk_weights"])
        .collect();
    for c in &CHIPS {
        for preset in ["deepseek-v3", "pangu-pro-moe"] {
            let p = plan("merrouter", c.name, Some(preset), &[]);
            let work: String = p.stages.iter().map(|s| s.work.as_str()).collect();
            for name in &outputs {
                assert!(
                    names(&work, name),
                    "merrouter on {}: no stage writes {name}",
                    c.name
                );
            }
            // MoGE has no group choice; the group-limited mode does.
            let group_stage = p.stages.iter().any(|s| s.name == "group select");
            assert_eq!(group_stage, preset == "deepseek-v3");
        }
    }
}

#[test]
fn router_sort_keys_stay_exact_in_f32() {
    // experts x rows x top_k must stay within 2^24 for the dispatch's f32 sort keys.
    let p = plan("merrouter", "910B2", None, &[("tokens", "65536")]);
    let span: u64 = p.kernels[0]
        .tiling
        .iter()
        .find(|f| f.name == "sortKeySpan")
        .map(|f| match f.value {
            FieldValue::Int(v) => v,
            FieldValue::Float(_) => panic!("sortKeySpan is an integer"),
        })
        .unwrap();
    assert!(span <= 1 << 24);
    assert_eq!(span, 256 * choice(&p, "rows").parse::<u64>().unwrap() * 8);
    match refusal(
        "merrouter",
        "910B2",
        None,
        &[("experts", "2048"), ("rows", "1024"), ("top_k", "16")],
    ) {
        Error::Invalid { what, .. } => assert!(what.contains("rows"), "{what}"),
        other => panic!("expected Error::Invalid, got {other}"),
    }
}

#[test]
fn grouped_matmul_plans_hold_both_paths_unless_one_is_forced() {
    let fields = |pairs: &[(&str, &str)]| -> Vec<String> {
        plan("swiftgmm", "910B2", Some("deepseek-v3"), pairs).kernels[0]
            .tiling
            .iter()
            .map(|f| f.name.clone())
            .collect()
    };
    for tokens in ["16", "256", "8192"] {
        let auto = fields(&[("tokens", tokens)]);
        for f in ["gemvMaxRows", "gemvM0", "gemvK1", "gemmM0", "gemmK1"] {
            assert!(auto.iter().any(|n| n == f), "tokens={tokens}: no {f}");
        }
    }
    let gemv = fields(&[("mode", "gemv")]);
    assert!(gemv.iter().any(|n| n == "gemvN0") && !gemv.iter().any(|n| n == "gemmN0"));
    let gemm = fields(&[("mode", "gemm")]);
    assert!(gemm.iter().any(|n| n == "gemmN0") && !gemm.iter().any(|n| n == "gemvN0"));
    // The tiles the plan reports are those of the path uniform routing takes.
    let decode = plan("swiftgmm", "910B2", Some("deepseek-v3"), &[]);
    let m0 = decode.kernels[0]
        .tiling
        .iter()
        .find(|f| f.name == "gemvM0")
        .unwrap();
    assert_eq!(m0.value.to_string(), choice(&decode, "m0"));
    let prefill = plan(
        "swiftgmm",
        "910B2",
        Some("deepseek-v3"),
        &[("tokens", "8192")],
    );
    let m0 = prefill.kernels[0]
        .tiling
        .iter()
        .find(|f| f.name == "gemmM0")
        .unwrap();
    assert_eq!(m0.value.to_string(), choice(&prefill, "m0"));
}

#[test]
fn amla_rescale_lands_before_or_after_pv_by_update_mode() {
    let order = |pairs: &[(&str, &str)]| -> Vec<String> {
        plan("amla", "910B2", None, pairs)
            .stages
            .iter()
            .map(|s| s.name.clone())
            .collect()
    };
    let position = |stages: &[String], name: &str| stages.iter().position(|s| s == name).unwrap();
    // In GM the step is added to O before P·V_j lands; through UB the vector core rescales O
    // and adds the P·V_j the cube produced.
    let atomic = order(&[("update", "atomic")]);
    assert!(position(&atomic, "rescale O") < position(&atomic, "PV"));
    let ub = order(&[("update", "ub")]);
    assert!(position(&ub, "rescale O") > position(&ub, "PV"));
    // The head tile starts at 128 query rows (128 / s_q heads) and halves until it fits: all
    // of it on an A2 cube core.
    for s_q in [1u64, 2, 4] {
        let s = s_q.to_string();
        let p = plan("amla", "910B2", None, &[("s_q", &s)]);
        assert_eq!(choice(&p, "head_tile"), (128 / s_q).to_string());
        let p = plan("amla", "310P3", None, &[("s_q", &s)]);
        let head_tile: u64 = choice(&p, "head_tile").parse().unwrap();
        assert!((128 / s_q).is_multiple_of(head_tile) && head_tile < 128 / s_q);
    }
    // The combine exists only for split sequences.
    assert!(!order(&[("splits", "1")]).iter().any(|s| s == "combine"));
    assert!(order(&[("splits", "2")]).iter().any(|s| s == "combine"));
}

/// Generated blocks in the porting docs: `<!-- plan: OP CHIP PRESET [KEY=VALUE ...] | KIND -->`,
/// the generated text, `<!-- /plan -->`; PRESET may be `none`. Returns (spec, body start, body
/// end) with byte offsets into `doc`.
fn plan_blocks(doc: &str) -> Vec<(String, usize, usize)> {
    let mut blocks = Vec::new();
    let mut from = 0;
    while let Some(start) = doc[from..].find("<!-- plan: ") {
        let spec_start = from + start + "<!-- plan: ".len();
        let spec_end = spec_start + doc[spec_start..].find(" -->").expect("unterminated marker");
        let body_start = spec_end + " -->".len();
        let body_end = body_start
            + doc[body_start..]
                .find("<!-- /plan -->")
                .unwrap_or_else(|| panic!("plan block has no end marker"));
        blocks.push((doc[spec_start..spec_end].to_string(), body_start, body_end));
        from = body_end;
    }
    blocks
}

/// The plan a marker spec `OP CHIP PRESET [KEY=VALUE ...]` names, and its command line.
fn plan_of_spec(doc: &str, args: &str) -> (AscendPlan, String) {
    let words: Vec<&str> = args.split_whitespace().collect();
    let [op, chip, preset, pairs @ ..] = words.as_slice() else {
        panic!("{doc}: bad plan marker {args}");
    };
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|kv| kv.split_once('=').expect("KEY=VALUE"))
        .collect();
    let preset = (*preset != "none").then_some(*preset);
    let p = plan(op, chip, preset, &pairs);
    let command = p.command.clone();
    (p, command)
}

/// What a block of `kind` holds for `p`.
fn generated(doc: &str, p: &AscendPlan, kind: &str) -> String {
    match kind {
        "stages" => p.stages_markdown(),
        "tiling" => p.tiling_markdown(),
        "launch" => p.launch_markdown(),
        "kernel" => p.kernel_markdown(),
        "buffers" => p.buffers_markdown(),
        "start" => p.start_markdown(),
        "correspondence" => p.correspondence_markdown(),
        "timeline" => p.timeline_markdown(),
        "tiling-data" => format!("```cpp\n{}```", p.tiling_data_cpp()),
        _ => panic!("{doc}: unknown block kind {kind}"),
    }
}

/// Timeline pictures in the porting docs: `<!-- svg: OP CHIP PRESET [KEY=VALUE ...] -> FILE -->`
/// followed by an image link to FILE (relative to docs/ascend/).
fn svg_markers(doc: &str) -> Vec<(String, String)> {
    doc.match_indices("<!-- svg: ")
        .map(|(at, m)| {
            let rest = &doc[at + m.len()..];
            let line = &rest[..rest.find(" -->").expect("unterminated svg marker")];
            let (args, file) = line.split_once(" -> ").expect("svg marker: SPEC -> FILE");
            (args.to_string(), file.to_string())
        })
        .collect()
}

const PORTING_DOCS: [(&str, &str); 4] = [
    ("docs/ascend/amla.md", "amla"),
    ("docs/ascend/swiftgmm.md", "swiftgmm"),
    ("docs/ascend/merrouter.md", "merrouter"),
    ("docs/ascend/moe.md", "moe"),
];

/// The generated blocks and pictures of the porting docs are what the code prints.
/// `FUSEDOPS_BLESS=1` rewrites them from the code.
#[test]
fn docs_plan_tables_are_generated_from_the_code() {
    let bless = std::env::var("FUSEDOPS_BLESS").is_ok_and(|v| v == "1");
    for (doc, op) in PORTING_DOCS {
        let path = format!("{}/{doc}", env!("CARGO_MANIFEST_DIR"));
        let mut text = repo_file(doc);
        if bless {
            for (spec, start, end) in plan_blocks(&text).into_iter().rev() {
                let (args, kind) = spec.split_once(" | ").expect("spec | kind");
                let (p, _) = plan_of_spec(doc, args);
                text.replace_range(start..end, &format!("\n{}\n", generated(doc, &p, kind)));
            }
            std::fs::write(&path, &text).unwrap();
        }
        let mut kinds = Vec::new();
        for (spec, start, end) in plan_blocks(&text) {
            let body = text[start..end].trim();
            let (args, kind) = spec.split_once(" | ").expect("spec | kind");
            assert!(args.starts_with(op), "{doc}: {spec}");
            let (p, command) = plan_of_spec(doc, args);
            let expected = generated(doc, &p, kind);
            assert_eq!(
                body,
                expected.trim(),
                "{doc}: the block `{spec}` is not what the code generates (FUSEDOPS_BLESS=1 \
                 rewrites it); it generates:\n{expected}"
            );
            // The command that prints the same plan is quoted in the document.
            assert!(
                text.contains(&format!("`{command}`")),
                "{doc}: no `{command}` for block {spec}"
            );
            kinds.push((p.chip.name.to_string(), kind.to_string()));
        }
        // Each doc shows the stages, C++ tiling data, kernel shape, start and correspondence
        // for an A2 chip and for 310P3, and an operator's doc also the tiling table and buffers.
        let mut required = vec!["stages", "tiling-data", "kernel", "start", "correspondence"];
        if op != "moe" {
            required.extend(["tiling", "buffers"]);
        }
        for kind in required {
            for chip in ["910B", "310P3"] {
                assert!(
                    kinds.iter().any(|(c, k)| c.starts_with(chip) && k == kind),
                    "{doc} has no generated {kind} block for {chip}"
                );
            }
        }
        // And the timeline picture of both, generated from the plan.
        let markers = svg_markers(&text);
        for chip in ["910B", "310P3"] {
            assert!(
                markers.iter().any(|(args, _)| args
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|c| c.starts_with(chip))),
                "{doc} has no timeline picture for {chip}"
            );
        }
        for (args, file) in markers {
            let (p, _) = plan_of_spec(doc, &args);
            let svg = p.timeline_svg().unwrap();
            let svg_path = format!("{}/docs/ascend/{file}", env!("CARGO_MANIFEST_DIR"));
            if bless {
                std::fs::write(&svg_path, &svg).unwrap();
            }
            assert!(
                text.contains(&format!("]({file})")),
                "{doc}: the picture {file} is not linked"
            );
            let on_disk = std::fs::read_to_string(&svg_path)
                .unwrap_or_else(|e| panic!("{svg_path}: {e} (FUSEDOPS_BLESS=1 writes it)"));
            assert!(
                on_disk == svg,
                "{svg_path} is not what `{} --timeline` draws (FUSEDOPS_BLESS=1 rewrites it)",
                p.command
            );
        }
    }
}

#[test]
fn the_porting_readme_links_the_operator_docs() {
    let readme = repo_file("docs/ascend/README.md");
    for (doc, _) in PORTING_DOCS {
        let name = doc.trim_start_matches("docs/ascend/");
        assert!(
            readme.contains(&format!("]({name})")),
            "README does not link {name}"
        );
    }
}

type Request = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Vec<(&'static str, &'static str)>,
);

/// Every plan the checks below look at: each operator on each chip with each preset it takes,
/// and the quantised, int8-cache and split variants.
fn all_requests() -> Vec<Request> {
    let mut list = Vec::new();
    for c in &CHIPS {
        for op in OPERATORS {
            for preset in [None, Some("deepseek-v3"), Some("pangu-pro-moe")] {
                if op == "amla" && preset == Some("pangu-pro-moe") {
                    continue;
                }
                list.push((op, c.name, preset, vec![]));
            }
        }
        for quant in ["w8a16", "w8a8"] {
            list.push(("swiftgmm", c.name, None, vec![("quant", quant)]));
            list.push((
                "swiftgmm",
                c.name,
                Some("pangu-pro-moe"),
                vec![("quant", quant), ("tokens", "8192"), ("proj", "down")],
            ));
            list.push(("moe", c.name, Some("deepseek-v3"), vec![("quant", quant)]));
        }
        list.push((
            "swiftgmm",
            c.name,
            None,
            vec![("layout", "kn"), ("quant", "w8a8")],
        ));
        list.push(("amla", c.name, None, vec![("cache", "int8")]));
        list.push((
            "amla",
            c.name,
            None,
            vec![("update", "ub"), ("splits", "1")],
        ));
    }
    list
}

fn plan_of(req: &Request) -> AscendPlan {
    plan(req.0, req.1, req.2, &req.3)
}

/// A stand-in for the pieces of CANN the generated C++ uses: the tiling macros of
/// register/tilingdata_base.h (each field a member with set_ / get_ accessors, recorded in
/// declaration order so the test can print them) and the op_host registration types.
const STAND_IN: &str = r#"#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

struct StandInField {
    const char *name;
    int kind;
    const void *value;
};
inline int stand_in_kind(const uint32_t *) { return 0; }
inline int stand_in_kind(const uint64_t *) { return 1; }
inline int stand_in_kind(const float *) { return 2; }
inline std::string stand_in_text(const StandInField &f)
{
    if (f.kind == 0) {
        return std::to_string(*static_cast<const uint32_t *>(f.value));
    }
    if (f.kind == 1) {
        return std::to_string(*static_cast<const uint64_t *>(f.value));
    }
    uint32_t bits = 0;
    std::memcpy(&bits, f.value, sizeof bits);
    return "f32bits:" + std::to_string(bits);
}
#define BEGIN_TILING_DATA_DEF(name)            \
    struct name {                              \
        std::vector<StandInField> fields_;     \
        name() = default;                      \
        name(const name &) = delete;           \
        name &operator=(const name &) = delete;
#define TILING_DATA_FIELD_DEF(type, field)                                                   \
    type field##_ = 0;                                                                       \
    bool field##_recorded_ =                                                                 \
        (fields_.push_back({#field, stand_in_kind(&field##_), &field##_}), true);            \
    void set_##field(type v) { field##_ = v; }                                               \
    type get_##field() const { return field##_; }
#define END_TILING_DATA_DEF }
#define REGISTER_TILING_DATA_CLASS(op, name) static_assert(sizeof(name) > 0, #op);

namespace ge {
enum DataType { DT_FLOAT16, DT_BF16, DT_FLOAT, DT_INT8, DT_INT32, DT_INT64 };
enum Format { FORMAT_ND, FORMAT_FRACTAL_NZ };
}
inline const char *stand_in_name(ge::DataType t)
{
    const char *names[] = {"DT_FLOAT16", "DT_BF16", "DT_FLOAT", "DT_INT8", "DT_INT32", "DT_INT64"};
    return names[t];
}
inline const char *stand_in_name(ge::Format f)
{
    return f == ge::FORMAT_ND ? "FORMAT_ND" : "FORMAT_FRACTAL_NZ";
}
enum ParamKind { REQUIRED, OPTIONAL };
struct OpParamDef {
    explicit OpParamDef(const char *n) : name(n) {}
    std::string name;
    bool optional = false;
    std::vector<ge::DataType> types;
    std::vector<ge::Format> formats;
    OpParamDef &ParamType(ParamKind k) { optional = k == OPTIONAL; return *this; }
    OpParamDef &DataType(std::vector<ge::DataType> t) { types = t; return *this; }
    OpParamDef &Format(std::vector<ge::Format> f) { formats = f; return *this; }
};
struct OpAICoreDef {
    std::vector<std::string> configs;
    void AddConfig(const char *soc) { configs.push_back(soc); }
};
struct OpDef {
    explicit OpDef(const char *name) : name_(name) {}
    OpParamDef &Input(const char *n) { inputs_.emplace_back(n); return inputs_.back(); }
    OpParamDef &Output(const char *n) { outputs_.emplace_back(n); return outputs_.back(); }
    OpAICoreDef &AICore() { return core_; }
    std::string name_;
    std::deque<OpParamDef> inputs_, outputs_;
    OpAICoreDef core_;
};
#define OP_ADD(name) static_assert(sizeof(name) > 0, #name)

template <typename T> void stand_in_print(const char *tag, const T &tiling)
{
    for (const auto &f : tiling.fields_) {
        std::printf("%s field %s %s\n", tag, f.name, stand_in_text(f).c_str());
    }
}
inline void stand_in_print_op(const char *tag, OpDef &op)
{
    for (const auto &io : op.inputs_) {
        std::printf("%s input %s %s %s %d\n", tag, io.name.c_str(), stand_in_name(io.types.at(0)),
                    stand_in_name(io.formats.at(0)), io.optional ? 1 : 0);
    }
    for (const auto &io : op.outputs_) {
        std::printf("%s output %s %s %s %d\n", tag, io.name.c_str(), stand_in_name(io.types.at(0)),
                    stand_in_name(io.formats.at(0)), io.optional ? 1 : 0);
    }
    for (const auto &c : op.AICore().configs) {
        std::printf("%s config %s\n", tag, c.c_str());
    }
}
"#;

/// `AmlaDecode` -> `AMLA_DECODE`, as the generated constants are named.
fn upper_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A fresh temporary directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusedops-ascend-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn tiling_data_compiles_with_gpp_and_holds_the_plans_values() {
    let version = Command::new("g++").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "this test compiles the generated TilingData with g++, which was not found or does not \
         run ({version:?}); install it (Debian/Ubuntu: `sudo apt-get install g++`)"
    );
    let dir = temp_dir("tiling-data");
    std::fs::write(dir.join("stand_in.h"), STAND_IN).unwrap();
    let mut main = String::from("#include \"stand_in.h\"\n\n");
    let mut body = String::new();
    let mut expected = Vec::new();
    for (i, req) in all_requests().iter().enumerate() {
        let p = plan_of(req);
        std::fs::write(dir.join(format!("case_{i}.h")), p.tiling_data_cpp()).unwrap();
        main.push_str(&format!(
            "namespace case_{i} {{\n#include \"case_{i}.h\"\n}}\n"
        ));
        for k in &p.kernels {
            let tag = format!("{i} {}", k.name);
            let upper = upper_snake(&k.name);
            body.push_str(&format!(
                "    {{\n        case_{i}::optiling::{0}TilingData t;\n        \
                 case_{i}::optiling::Fill{0}TilingData(t);\n        \
                 stand_in_print(\"{tag}\", t);\n        \
                 std::printf(\"{tag} key %llu\\n\", (unsigned long long)case_{i}::optiling::{upper}_TILING_KEY);\n        \
                 std::printf(\"{tag} block_dim %u\\n\", (unsigned)case_{i}::optiling::{upper}_BLOCK_DIM);\n        \
                 std::printf(\"{tag} workspace %llu\\n\", (unsigned long long)case_{i}::optiling::{upper}_WORKSPACE_SIZE);\n        \
                 case_{i}::ops::{0} op(\"{0}\");\n        stand_in_print_op(\"{tag}\", op);\n    }}\n",
                k.name
            ));
            for f in &k.tiling {
                let value = match f.value {
                    FieldValue::Int(v) => v.to_string(),
                    FieldValue::Float(v) => format!("f32bits:{}", v.to_bits()),
                };
                expected.push(format!("{tag} field {} {value}", f.name));
            }
            expected.push(format!("{tag} key {}", k.key.value));
            expected.push(format!("{tag} block_dim {}", k.split.block_dim));
            expected.push(format!("{tag} workspace {}", k.workspace.total));
            for (kind, list) in [("input", &k.op_def.inputs), ("output", &k.op_def.outputs)] {
                for io in list {
                    expected.push(format!(
                        "{tag} {kind} {} {} {} {}",
                        io.name,
                        io.dtype,
                        io.format,
                        u8::from(io.optional)
                    ));
                }
            }
            expected.push(format!("{tag} config {}", k.op_def.config));
        }
    }
    main.push_str(&format!("\nint main()\n{{\n{body}    return 0;\n}}\n"));
    std::fs::write(dir.join("main.cpp"), main).unwrap();
    let exe = dir.join("main");
    let compiled = Command::new("g++")
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-O0", "-o"])
        .arg(&exe)
        .arg(dir.join("main.cpp"))
        .output()
        .unwrap();
    assert!(
        compiled.status.success(),
        "the generated TilingData does not compile ({}):\n{}",
        dir.display(),
        String::from_utf8_lossy(&compiled.stderr)
    );
    let ran = Command::new(&exe).output().unwrap();
    assert!(ran.status.success());
    let printed: Vec<String> = String::from_utf8(ran.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(printed.len(), expected.len());
    for (got, want) in printed.iter().zip(&expected) {
        assert_eq!(got, want);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tiling_keys_are_the_decimal_digits_of_their_parts() {
    for req in all_requests() {
        for k in &plan_of(&req).kernels {
            let mut value = 0;
            for (i, part) in k.key.parts.iter().enumerate() {
                assert!((part.code as usize) < part.options.len().min(10));
                assert_eq!(part.options[part.code as usize], part.choice);
                value += part.code * 10u64.pow(i as u32);
            }
            assert_eq!(value, k.key.value, "{req:?} {}", k.name);
        }
    }
}

#[test]
fn cross_core_flags_stay_within_the_budget() {
    for req in all_requests() {
        let p = plan_of(&req);
        for k in &p.kernels {
            let flags = &k.shape.flags;
            assert!(flags.len() as u32 <= CROSS_FLAG_IDS, "{req:?}");
            let mut ids: Vec<u32> = flags.iter().map(|f| f.id).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), flags.len(), "{req:?}: flag ids repeat");
            assert!(ids.iter().all(|&id| id < CROSS_FLAG_IDS));
            match p.chip.arch {
                CoreArch::Coupled => assert!(flags.is_empty(), "{req:?}: flags on 310P"),
                CoreArch::Separated => {
                    // Mixed kernels hand tiles over with flags; vector-only ones need none.
                    let mixed = k.shape.kernel_type == "KERNEL_TYPE_MIX_AIC_1_2";
                    assert_eq!(mixed, !flags.is_empty(), "{req:?} {}", k.name);
                }
            }
            // Every cross-core wait of the timeline is one of the kernel's flags (or SyncAll).
            let steps = &k.timeline.steps;
            for s in steps {
                for w in &s.waits {
                    if steps[w.step].core != s.core {
                        assert!(
                            flags.iter().any(|f| f.name == w.event),
                            "{req:?} {}: {} waits for {} ({}) which is no flag of the kernel",
                            k.name,
                            s.label,
                            steps[w.step].label,
                            w.event
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn pipeline_timelines_are_consistent_and_the_svg_names_every_stage() {
    for req in all_requests() {
        let p = plan_of(&req);
        let mut pipes = std::collections::BTreeSet::new();
        for k in &p.kernels {
            let steps = &k.timeline.steps;
            assert!(!steps.is_empty());
            let mut busy = std::collections::BTreeSet::new();
            for (i, s) in steps.iter().enumerate() {
                assert_eq!(s.kernel, k.name);
                assert!(
                    busy.insert((s.core, s.pipe, s.slot)),
                    "{req:?}: two steps share a slot"
                );
                assert!(s.slot < k.timeline.slots);
                for w in &s.waits {
                    assert!(
                        w.step < i && steps[w.step].slot < s.slot,
                        "{req:?}: {}",
                        s.label
                    );
                    assert!(!w.event.is_empty());
                }
                pipes.insert(s.pipe);
            }
        }
        let cube = p.roofline.cube_flops_per_core > 0.0;
        let separated = p.chip.arch == CoreArch::Separated;
        let mut wanted = vec![Pipe::Mte2, Pipe::V, Pipe::Mte3];
        if cube {
            wanted.extend([
                Pipe::Mte1,
                Pipe::M,
                if separated { Pipe::Fix } else { Pipe::Co1Co2 },
            ]);
        }
        for pipe in &wanted {
            assert!(pipes.contains(pipe), "{req:?}: no {pipe:?} step");
        }
        let svg = p.timeline_svg().unwrap();
        assert!(svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for pipe in &wanted {
            let name = pipe.name();
            assert!(
                svg.contains(name) || svg.contains(&name.replace('>', "&gt;")),
                "{req:?}: the SVG does not name {name}"
            );
        }
        assert!(svg.contains(&p.command.replace('>', "&gt;")) || svg.contains(&p.command));
    }
}

#[test]
fn a_310p_plan_never_mentions_fixpipe() {
    let everything = |p: &AscendPlan| {
        [
            p.to_text(),
            p.to_json(),
            p.tiling_data_cpp(),
            p.timeline_svg().unwrap(),
            p.stages_markdown(),
            p.tiling_markdown(),
            p.launch_markdown(),
            p.kernel_markdown(),
            p.buffers_markdown(),
            p.start_markdown(),
            p.correspondence_markdown(),
            p.timeline_markdown(),
        ]
        .join("\n")
    };
    let mut a2_mentions = 0;
    for req in all_requests() {
        let p = plan_of(&req);
        let text = everything(&p);
        let fix_steps = p
            .kernels
            .iter()
            .flat_map(|k| &k.timeline.steps)
            .filter(|s| s.pipe == Pipe::Fix)
            .count();
        if p.chip.arch == CoreArch::Coupled {
            assert!(
                !text.to_lowercase().contains("fixpipe") && fix_steps == 0,
                "{req:?} mentions Fixpipe"
            );
            assert!(
                !text.contains("\"FIX\"") && !text.contains(">FIX<"),
                "{req:?}"
            );
        } else if text.contains("Fixpipe") && fix_steps > 0 {
            a2_mentions += 1;
        }
    }
    // The check can fail: the A2 plans of the cube operators do name Fixpipe.
    assert!(a2_mentions > 0);
}

fn invalid_field(req: (&str, &str, Option<&str>, &[(&str, &str)])) -> String {
    match plan_command(req.0, req.1, req.2, &flags(req.3)) {
        Err(Error::Invalid { what, .. }) => what,
        Err(other) => panic!("{req:?}: expected Error::Invalid, got {other}"),
        Ok(_) => panic!("{req:?} was planned"),
    }
}

#[test]
fn sizes_that_cannot_be_planned_are_refused_naming_the_field() {
    let huge = "4611686018427387904";
    let max = u64::MAX.to_string();
    let max = max.as_str();
    let cases: &[(&str, &str, &str)] = &[
        ("swiftgmm", "tokens", huge),
        ("swiftgmm", "tokens", max),
        ("swiftgmm", "k", max),
        ("swiftgmm", "n", max),
        ("swiftgmm", "experts", max),
        ("amla", "batch", max),
        ("amla", "kv_len", max),
        ("amla", "heads", max),
        ("amla", "batch", huge),
        ("merrouter", "tokens", max),
        ("merrouter", "experts", huge),
        ("moe", "tokens", max),
        ("moe", "tokens", huge),
    ];
    for c in ["910B2", "310P3"] {
        for (op, key, value) in cases {
            let what = invalid_field((op, c, None, &[(key, value)]));
            assert!(
                what.contains(key),
                "{op} {key}={value}: the error names {what}"
            );
        }
        // Values that fit a uint32_t field but whose products do not fit the fields they feed.
        let what = invalid_field((
            "swiftgmm",
            c,
            None,
            &[("tokens", "4294967295"), ("top_k", "8")],
        ));
        assert!(what.contains("tokens"), "{what}");
        let what = invalid_field(("moe", c, None, &[("tokens", "4294967295")]));
        assert!(what.contains("tokens"), "{what}");
        let what = invalid_field((
            "amla",
            c,
            None,
            &[
                ("batch", "4294967295"),
                ("heads", "128"),
                ("head_tile", "1"),
            ],
        ));
        assert!(what.contains("taskNum") || what.contains("batch"), "{what}");
        // A 64-bit overflow of a byte count names what it counts.
        let what = invalid_field((
            "swiftgmm",
            c,
            None,
            &[
                ("k", "4294967295"),
                ("n", "4294967294"),
                ("experts", "4294967295"),
                ("tokens", "4294967295"),
                ("top_k", "1"),
            ],
        ));
        assert!(!what.is_empty());
    }
}

#[test]
fn no_shape_value_panics_or_wraps() {
    use fusedops::ascend::{amla, merrouter, moe, swiftgmm};
    let values = [
        "1",
        "3",
        "4294967295",
        "4294967296",
        "4611686018427387904",
        "18446744073709551615",
        "18446744073709551616",
        "0",
        "-1",
        "nan",
        "",
    ];
    for (op, keys) in [
        ("amla", amla::KEYS),
        ("swiftgmm", swiftgmm::KEYS),
        ("merrouter", merrouter::KEYS),
        ("moe", moe::KEYS),
    ] {
        for c in ["910B2", "310P3"] {
            for key in keys {
                for value in values {
                    if let Ok(p) = plan_command(op, c, None, &flags(&[(key, value)])) {
                        assert_fits(&p);
                        let r = &p.roofline;
                        assert!(r.cube_flops_per_core.is_finite() && r.cube_flops_per_core >= 0.0);
                        assert!(r.gm_bytes_per_core.is_finite() && r.gm_bytes_per_core > 0.0);
                        assert!(p.tiling_data_cpp().contains("BEGIN_TILING_DATA_DEF"));
                    }
                }
            }
        }
    }
}

fn fusedops_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fusedops"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs")
}

#[test]
fn the_cli_refuses_unplannable_sizes_with_an_error_naming_the_field() {
    let max = u64::MAX.to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "swiftgmm".into(),
                "--shape".into(),
                "tokens=4611686018427387904".into(),
            ],
            "tokens",
        ),
        (
            vec!["swiftgmm".into(), "--shape".into(), format!("k={max}")],
            "k",
        ),
        (
            vec!["swiftgmm".into(), "--shape".into(), format!("tokens={max}")],
            "tokens",
        ),
        (
            vec!["amla".into(), "--shape".into(), format!("batch={max}")],
            "batch",
        ),
        (
            vec!["amla".into(), "--shape".into(), format!("kv_len={max}")],
            "kv_len",
        ),
        (
            vec!["moe".into(), "--shape".into(), "tokens=4294967295".into()],
            "tokens",
        ),
        (
            vec!["merrouter".into(), "--shape".into(), "rows=0".into()],
            "rows",
        ),
        (vec!["gemm".into()], "gemm"),
        (
            vec!["amla".into(), "--shape".into(), "dtype=bf16".into()],
            "bf16",
        ),
    ];
    for (args, field) in cases {
        for chip in ["910B2", "310P3"] {
            let mut all: Vec<&str> = vec!["ascend-plan"];
            all.extend(args.iter().map(String::as_str));
            all.extend(["--chip", chip]);
            let out = fusedops_cli(&all);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if chip == "910B2" && field == "bf16" {
                assert!(out.status.success(), "{all:?}: {stderr}");
                continue;
            }
            assert_eq!(out.status.code(), Some(2), "{all:?}: {stderr}");
            assert!(stderr.contains(field), "{all:?}: {stderr}");
            assert!(
                !stderr.contains("panicked") && !stderr.contains("backtrace"),
                "{all:?}: {stderr}"
            );
        }
    }
}

#[test]
fn the_cli_prints_tiling_data_and_draws_the_timeline() {
    let dir = temp_dir("cli");
    let svg = dir.join("amla.svg");
    let out = fusedops_cli(&[
        "ascend-plan",
        "amla",
        "--chip",
        "310P3",
        "--tiling-data",
        "--timeline",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cpp = String::from_utf8(out.stdout).unwrap();
    let p = plan("amla", "310P3", None, &[]);
    assert_eq!(cpp, p.tiling_data_cpp());
    assert!(cpp.contains("BEGIN_TILING_DATA_DEF(AmlaDecodeTilingData)"));
    assert!(cpp.contains("AddConfig(\"ascend310p\")"));
    assert_eq!(
        std::fs::read_to_string(&svg).unwrap(),
        p.timeline_svg().unwrap()
    );
    // --tiling-data and --json exclude each other; clap refuses without a panic.
    let out = fusedops_cli(&[
        "ascend-plan",
        "amla",
        "--chip",
        "910B2",
        "--tiling-data",
        "--json",
    ]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quantised_matmuls_use_int8_tiles_checked_against_l0() {
    for c in &CHIPS {
        let w8a8 = plan("swiftgmm", c.name, None, &[("quant", "w8a8")]);
        let none = plan("swiftgmm", c.name, None, &[]);
        let shape = |p: &AscendPlan, name: &str| {
            p.buffers
                .iter()
                .find(|b| b.name == name)
                .unwrap_or_else(|| panic!("no buffer {name}"))
                .clone()
        };
        for name in ["x", "w", "a", "b"] {
            assert!(shape(&w8a8, name).shape.ends_with("i8"), "{name}");
        }
        assert!(shape(&w8a8, "c").shape.ends_with("i32"));
        assert!(w8a8.roofline.int8_cube && !none.roofline.int8_cube);
        let k0: u64 = choice(&w8a8, "k0").parse().unwrap();
        assert!(k0.is_multiple_of(32));
        // Decode streams the weights: one byte per weight instead of two.
        assert!(w8a8.roofline.gm_bytes_per_core < 0.6 * none.roofline.gm_bytes_per_core);
        let quant = &w8a8.kernels[0].key.parts[3];
        assert_eq!((quant.name.as_str(), quant.code), ("quant", 2));
        // The int8 fractal is 16 x 32: k tiles must be multiples of 32.
        let what = invalid_field(("swiftgmm", c.name, None, &[("quant", "w8a8"), ("k0", "48")]));
        assert_eq!(what, "k0");
        // [128, 256] int32 twice is 256 KiB: too big for an A2 L0C, exactly a 310P3 L0C.
        let gemm = [
            ("quant", "w8a8"),
            ("mode", "gemm"),
            ("proj", "down"),
            ("tokens", "8192"),
            ("m0", "128"),
            ("n0", "256"),
            ("k0", "128"),
            ("k1", "256"),
        ];
        match plan_command("swiftgmm", c.name, None, &flags(&gemm)) {
            Err(Error::Limit { what, need, max }) => {
                assert_eq!(c.arch, CoreArch::Separated);
                assert!(what.contains("L0C") && need > max, "{what}");
            }
            Ok(p) => {
                assert_eq!(c.arch, CoreArch::Coupled);
                let l0c = p.memory.iter().find(|m| m.memory == Memory::L0C).unwrap();
                assert_eq!(l0c.used, l0c.capacity);
                let l0a = p.memory.iter().find(|m| m.memory == Memory::L0A).unwrap();
                assert_eq!(l0a.used, 2 * 128 * 128);
            }
            Err(other) => panic!("{other}"),
        }
        // W8A16 dequantises on the vector core: through a workspace slot on A2, straight into
        // L1 on 310P.
        let w8a16 = plan("swiftgmm", c.name, None, &[("quant", "w8a16")]);
        let k = &w8a16.kernels[0];
        assert!(
            shape(&w8a16, "w").shape.ends_with("f16")
                && shape(&w8a16, "w int8").shape.ends_with("i8")
        );
        match c.arch {
            CoreArch::Separated => {
                assert!(k.shape.flags.iter().any(|f| f.name == "W_READY"));
                assert!(k.workspace.per_core > none.kernels[0].workspace.per_core);
            }
            CoreArch::Coupled => {
                assert!(w8a16.stages.iter().any(|s| s.work.contains("VECOUT -> B1")));
                assert_eq!(k.workspace.per_core, 0);
            }
        }
        assert_eq!(
            k.op_def
                .inputs
                .iter()
                .find(|io| io.name == "weight")
                .unwrap()
                .dtype,
            "DT_INT8"
        );
        // The W8A8 MoE chain re-quantises the intermediate for the down projection.
        let moe = plan("moe", c.name, Some("deepseek-v3"), &[("quant", "w8a8")]);
        let names: Vec<&str> = moe.kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "MerRouter",
                "MoeGather",
                "GmmGateUp",
                "MoeQuant",
                "GmmDown",
                "MoeCombine"
            ]
        );
        assert!(moe.roofline.int8_cube);
    }
}

#[test]
fn the_int8_latent_cache_halves_the_key_bytes() {
    for c in &CHIPS {
        let args = [
            ("batch", "1"),
            ("heads", "16"),
            ("kv_len", "128"),
            ("splits", "1"),
        ];
        let sixteen = plan("amla", c.name, None, &args);
        let int8 = plan(
            "amla",
            c.name,
            None,
            &[&args[..], &[("cache", "int8")]].concat(),
        );
        // One 128-key tile: 128 x 656 B instead of 128 x 1152 B, plus the same q and out.
        let diff = sixteen.roofline.gm_bytes_per_core - int8.roofline.gm_bytes_per_core;
        assert_eq!(diff, (128 * (1152 - 656)) as f64);
        assert_eq!(fusedops::ascend::amla::INT8_ROW_BYTES, 656);
        let k = &int8.kernels[0];
        assert_eq!(
            k.op_def
                .inputs
                .iter()
                .find(|io| io.name == "kv_cache")
                .unwrap()
                .dtype,
            "DT_INT8"
        );
        assert!(
            int8.buffers
                .iter()
                .any(|b| b.name == "kv int8" && b.memory == Memory::Ub)
        );
        assert!(k.tiling.iter().any(|f| f.name == "dequantKeys"));
        // The cube still runs on 16 bits.
        assert!(
            int8.buffers
                .iter()
                .any(|b| b.name == "kv (K and V)" && b.shape.ends_with("f16"))
        );
        if c.arch == CoreArch::Separated {
            assert!(k.shape.flags.iter().any(|f| f.name == "KV_READY"));
        }
        // dq_keys belongs to the int8 cache only.
        let what = invalid_field(("amla", c.name, None, &[("dq_keys", "16")]));
        assert_eq!(what, "dq_keys");
    }
}

#[test]
fn the_o_traffic_note_prints_what_it_compares() {
    let p = plan("amla", "310P3", Some("deepseek-v3"), &[]);
    let note = p
        .notes
        .iter()
        .find(|n| n.starts_with("O traffic"))
        .expect("a note about O traffic");
    // Both directions (2 x 131072 B) against the 147456 B KV tile.
    assert!(
        note.contains("262144 B") && note.contains("147456 B"),
        "{note}"
    );
}
