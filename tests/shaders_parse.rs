//! Every shader in shaders/ parses and validates through naga, no GPU needed. Kernels are checked
//! as the pipeline cache compiles them: composed with shaders/common.wgsl and, for an operator
//! with a shared library `<op>_shared.wgsl`, with that library first.

use std::path::Path;

fn validate(name: &str, source: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| format!("{name}: parse error:\n{}", e.emit_to_string(source)))?;
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| format!("{name}: validation error:\n{}", e.emit_to_string(source)))?;
    Ok(())
}

#[test]
fn every_shader_parses_and_validates() {
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
    for path in &names {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let raw = std::fs::read_to_string(path).unwrap();
        let source = if name == "common.wgsl" {
            raw
        } else {
            let op = name.split('_').next().unwrap_or_default();
            let shared = dir.join(format!("{op}_shared.wgsl"));
            if shared.exists() && name != format!("{op}_shared.wgsl") {
                let library = std::fs::read_to_string(&shared).unwrap();
                fusedops::gpu::compose_shader(&(library + &raw))
            } else {
                fusedops::gpu::compose_shader(&raw)
            }
        };
        if let Err(e) = validate(&name, &source) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_broken_shader_is_caught() {
    // The check above must be able to fail.
    let broken = fusedops::gpu::compose_shader("fn f() -> u32 { return 1.5; }");
    assert!(validate("broken", &broken).is_err());
}
