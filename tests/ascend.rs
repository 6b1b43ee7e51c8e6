//! Ascend porting plans: every preset fits every chip, oversized tiles and 310P features it lacks
//! are refused with the right error, the arithmetic of a small plan is exact, and the chip table
//! in docs/ascend/README.md is the one the code generates. No GPU is involved.

use fusedops::Error;
use fusedops::ascend::chips::{CHIPS, Memory, chip, markdown_table};
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
            .filter(|b| b.memory == m.memory && b.core == m.core)
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
    let s = &plan.split;
    assert!(s.cube_cores_used <= c.cube_cores);
    assert!(s.vector_cores_used <= c.vector_cores);
    assert!(s.units_per_core * u64::from(c.cube_cores.max(s.vector_cores_used)) >= s.work_units);
    assert!(s.block_dim >= 1);
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
                assert!(!p.stages.is_empty() && !p.tiling.is_empty());
                let text = p.to_text();
                assert!(text.contains("tiling field") && text.contains("replaces (WGSL)"));
                assert!(text.contains(c.name) && text.contains("blockDim"));
                let json: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
                assert_eq!(json["op"], op);
                assert_eq!(json["chip"]["name"], c.name);
                assert_eq!(json["buffers"].as_array().unwrap().len(), p.buffers.len());
                assert_eq!(json["stages"].as_array().unwrap().len(), p.stages.len());
                assert_eq!(json["tiling"].as_array().unwrap().len(), p.tiling.len());
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
    // NZ weights), and only MoeInitRoutingV2 of the three MoE routing operators.
    assert!(
        plan("amla", "310P3", None, &[])
            .cann_builtin
            .starts_with("none")
    );
    let gmm = plan("swiftgmm", "310P3", None, &[]).cann_builtin;
    assert!(
        gmm.contains("Ascend310P") && gmm.contains("FRACTAL_NZ"),
        "{gmm}"
    );
    let router = plan("merrouter", "310P3", None, &[]).cann_builtin;
    assert!(router.starts_with("MoeInitRoutingV2 only"), "{router}");
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
    assert_eq!(
        (
            p.split.work_units,
            p.split.units_per_core,
            p.split.block_dim
        ),
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
    assert!(
        p.roofline.bound.is_none(),
        "910B2 has no public peak figure"
    );
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
    assert!(
        p310.roofline
            .peak
            .as_ref()
            .unwrap()
            .source
            .starts_with("public figure")
    );
    assert!(p310.roofline.bound.is_some());
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
    let span: u64 = p
        .tiling
        .iter()
        .find(|f| f.name == "sortKeySpan")
        .unwrap()
        .value
        .parse()
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
        plan("swiftgmm", "910B2", Some("deepseek-v3"), pairs)
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
    let m0 = decode.tiling.iter().find(|f| f.name == "gemvM0").unwrap();
    assert_eq!(m0.value, choice(&decode, "m0"));
    let prefill = plan(
        "swiftgmm",
        "910B2",
        Some("deepseek-v3"),
        &[("tokens", "8192")],
    );
    let m0 = prefill.tiling.iter().find(|f| f.name == "gemmM0").unwrap();
    assert_eq!(m0.value, choice(&prefill, "m0"));
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
/// the table, `<!-- /plan -->`; PRESET may be `none`, KIND is stages, tiling or buffers.
fn plan_blocks(doc: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find("<!-- plan: ") {
        let after = &rest[start + "<!-- plan: ".len()..];
        let spec_end = after.find(" -->").expect("unterminated plan marker");
        let spec = after[..spec_end].to_string();
        let body_start = &after[spec_end + " -->".len()..];
        let end = body_start
            .find("<!-- /plan -->")
            .unwrap_or_else(|| panic!("plan block {spec} has no end marker"));
        blocks.push((spec, body_start[..end].trim().to_string()));
        rest = &body_start[end..];
    }
    blocks
}

#[test]
fn docs_plan_tables_are_generated_from_the_code() {
    for (doc, op) in [
        ("docs/ascend/amla.md", "amla"),
        ("docs/ascend/swiftgmm.md", "swiftgmm"),
        ("docs/ascend/merrouter.md", "merrouter"),
    ] {
        let text = repo_file(doc);
        let blocks = plan_blocks(&text);
        let mut kinds = Vec::new();
        for (spec, body) in &blocks {
            let (args, kind) = spec.split_once(" | ").expect("spec | kind");
            let words: Vec<&str> = args.split_whitespace().collect();
            let [block_op, chip, preset, pairs @ ..] = words.as_slice() else {
                panic!("{doc}: bad plan marker {spec}");
            };
            assert_eq!(*block_op, op, "{doc}: {spec}");
            let pairs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|kv| kv.split_once('=').expect("KEY=VALUE"))
                .collect();
            let preset = (*preset != "none").then_some(*preset);
            let p = plan(op, chip, preset, &pairs);
            let expected = match kind {
                "stages" => p.stages_markdown(),
                "tiling" => p.tiling_markdown(),
                "buffers" => p.buffers_markdown(),
                _ => panic!("{doc}: unknown block kind {kind}"),
            };
            assert_eq!(
                body.trim(),
                expected.trim(),
                "{doc}: the block `{spec}` is not what the code generates; it generates:\n{expected}"
            );
            // The command that prints the same plan is quoted right above the block.
            let command = format!(
                "fusedops ascend-plan {op} --chip {chip}{}{}",
                preset.map_or(String::new(), |p| format!(" --preset {p}")),
                pairs
                    .iter()
                    .map(|(k, v)| format!(" --shape {k}={v}"))
                    .collect::<String>()
            );
            assert!(
                text.contains(&command),
                "{doc}: no `{command}` for block {spec}"
            );
            kinds.push((chip.to_string(), kind.to_string()));
        }
        // Each doc shows the stages, tiling struct and buffers for an A2 chip and for 310P3.
        for kind in ["stages", "tiling", "buffers"] {
            for chip in ["910B", "310P3"] {
                assert!(
                    kinds.iter().any(|(c, k)| c.starts_with(chip) && k == kind),
                    "{doc} has no generated {kind} block for {chip}"
                );
            }
        }
    }
}

#[test]
fn the_porting_readme_links_the_three_operator_docs() {
    let readme = repo_file("docs/ascend/README.md");
    for doc in ["amla.md", "swiftgmm.md", "merrouter.md"] {
        assert!(
            readme.contains(&format!("]({doc})")),
            "README does not link {doc}"
        );
    }
}
