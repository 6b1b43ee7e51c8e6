//! Every shader in shaders/ parses, validates and translates to SPIR-V through naga, no GPU
//! needed. Kernels are checked as the pipeline cache compiles them: composed with
//! shaders/common.wgsl (and, for an operator with a shared library `<op>_shared.wgsl`, with that
//! library first), and cooperative-matrix kernels once per fragment size (8x8 and 16x16),
//! whatever the adapter at hand supports. SPIR-V generation runs per entry point with the
//! default override values and under each bounds-check policy wgpu's Vulkan backend uses
//! (restricted indices; storage accesses restricted, or unchecked where the device has
//! robustBufferAccess2, as NVIDIA's does), which is where naga's writer has panicked on code it
//! validated.

use std::path::Path;

use fusedops::gpu::{Fragment, compose_coop_shader, compose_shader};

fn validate(name: &str, source: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| format!("{name}: parse error:\n{}", e.emit_to_string(source)))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| format!("{name}: validation error:\n{}", e.emit_to_string(source)))?;
    for entry in &module.entry_points {
        let stage_entry = (entry.stage, entry.name.as_str());
        let (resolved, resolved_info) = naga::back::pipeline_constants::process_overrides(
            &module,
            &info,
            Some(stage_entry),
            &Default::default(),
        )
        .map_err(|e| format!("{name}::{}: overrides: {e}", entry.name))?;
        let pipeline = naga::back::spv::PipelineOptions {
            shader_stage: entry.stage,
            entry_point: entry.name.clone(),
        };
        use naga::proc::BoundsCheckPolicy::{Restrict, Unchecked};
        for buffer in [Restrict, Unchecked] {
            let options = naga::back::spv::Options {
                bounds_check_policies: naga::proc::BoundsCheckPolicies {
                    index: Restrict,
                    buffer,
                    image_load: Restrict,
                    binding_array: Unchecked,
                },
                ..Default::default()
            };
            let written = std::panic::catch_unwind(|| {
                naga::back::spv::write_vec(&resolved, &resolved_info, &options, Some(&pipeline))
            });
            let what = format!("{name}::{} (storage accesses {buffer:?})", entry.name);
            match written {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("{what}: SPIR-V: {e}")),
                Err(_) => return Err(format!("{what}: the SPIR-V writer panicked")),
            }
        }
    }
    Ok(())
}

/// A kernel of an operator with a shared library (`<op>_shared.wgsl`) as its pipeline is built:
/// the library, then the kernel.
fn with_library(dir: &Path, name: &str, raw: String) -> String {
    let op = name.split('_').next().unwrap_or_default();
    let library = format!("{op}_shared.wgsl");
    match std::fs::read_to_string(dir.join(&library)) {
        Ok(shared) if name != library => shared + &raw,
        _ => raw,
    }
}

/// The composed sources the pipeline cache can build from one shader file.
fn instantiations(name: &str, raw: &str) -> Vec<(String, String)> {
    if name == "common.wgsl" {
        return vec![(name.to_string(), raw.to_string())];
    }
    if raw.contains("enable wgpu_cooperative_matrix;") {
        return Fragment::ALL
            .into_iter()
            .map(|f| {
                (
                    format!("{name} ({})", f.name()),
                    compose_coop_shader(raw, f),
                )
            })
            .collect();
    }
    vec![(name.to_string(), compose_shader(raw))]
}

#[test]
fn every_shader_parses_validates_and_translates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("shaders/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    names.sort();
    assert!(
        names.len() >= 5,
        "expected the shader files, found {names:?}"
    );
    let mut failures = Vec::new();
    let mut coop_instances = 0;
    for path in &names {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let raw = with_library(&dir, &name, std::fs::read_to_string(path).unwrap());
        for (label, source) in instantiations(&name, &raw) {
            coop_instances += usize::from(label.contains('('));
            if let Err(e) = validate(&label, &source) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        coop_instances >= 2,
        "expected cooperative-matrix kernels instantiated per fragment size"
    );
}

#[test]
fn a_broken_shader_is_caught() {
    // The check above must be able to fail.
    let broken = compose_shader("fn f() -> u32 { return 1.5; }");
    assert!(validate("broken", &broken).is_err());
}

#[test]
fn fragment_instantiations_differ_only_in_the_prelude() {
    let kernel = "enable f16;\nenable wgpu_cooperative_matrix;\n\
                  var<workgroup> t: array<f16, 256>;\n\
                  @compute @workgroup_size(8) fn k() {\n\
                  let a = coopLoadT<FragA>(&t[0], FRAG);\n\
                  let b = coopLoadT<FragB>(&t[0], FRAG);\n\
                  var c = FragC();\n\
                  c = coopMultiplyAdd(a, b, c);\n}\n";
    for f in Fragment::ALL {
        let source = compose_coop_shader(kernel, f);
        assert!(source.starts_with("enable f16;\nenable wgpu_cooperative_matrix;\n"));
        let t = format!("coop_mat{0}x{0}<f16, A>", f.size());
        assert!(source.contains(&t), "{source}");
        validate(f.name(), &source).unwrap();
    }
}

/// The int8 kernels translate both ways wgpu's Vulkan backend writes `dot4I8Packed`: as `OpSDot`
/// where the device has integer dot products (the capabilities above allow everything), and as
/// naga's polyfill where it has not (here: shader capabilities only), and the two differ.
#[test]
fn int8_dot_products_translate_with_and_without_the_dot_product_capability() {
    use naga::back::spv::Capability;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let raw = std::fs::read_to_string(dir.join("swiftgmm_quant.wgsl")).unwrap();
    let source = compose_shader(&raw);
    let module = naga::front::wgsl::parse_str(&source).unwrap();
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap();
    let entry = (naga::ShaderStage::Compute, "gemv_nk_w8a8");
    let (resolved, resolved_info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some(entry),
        &Default::default(),
    )
    .unwrap();
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: entry.0,
        entry_point: entry.1.to_string(),
    };
    let spirv = |capabilities: Option<Vec<Capability>>| {
        let options = naga::back::spv::Options {
            capabilities: capabilities.map(|c| c.into_iter().collect()),
            ..Default::default()
        };
        naga::back::spv::write_vec(&resolved, &resolved_info, &options, Some(&pipeline))
    };
    let native = spirv(None).unwrap();
    let polyfill = spirv(Some(vec![Capability::Shader])).unwrap();
    // OpSDot is opcode 4450.
    let has_sdot = |words: &[u32]| words.iter().any(|&w| w & 0xffff == 4450 && w >> 16 == 6);
    assert!(
        has_sdot(&native),
        "OpSDot with the dot-product capabilities"
    );
    assert!(!has_sdot(&polyfill), "the polyfill without them");
}
