//! The plan as the C++ a CANN operator project starts from: per kernel, the tiling struct
//! (`BEGIN_TILING_DATA_DEF` / `TILING_DATA_FIELD_DEF` / `END_TILING_DATA_DEF` /
//! `REGISTER_TILING_DATA_CLASS`), a function that fills it with this plan's values, the tiling
//! key, blockDim and workspace size as constants, and the op_host registration (`OpDef`) for
//! the plan's chip. The text uses only the CANN macros and types named here and includes no
//! header itself, so it compiles wherever those are defined (tests/ascend.rs compiles it
//! against a stand-in header with g++).

use super::AscendPlan;
use super::plan::{CType, FieldValue, Kernel};

/// `AmlaDecode` -> `AMLA_DECODE`.
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

/// A C++ literal of `value` for a field of type `ctype`.
fn literal(ctype: CType, value: FieldValue) -> String {
    match (ctype, value) {
        (CType::U32, FieldValue::Int(v)) => format!("{v}U"),
        (CType::U64, FieldValue::Int(v)) => format!("{v}ULL"),
        (_, FieldValue::Float(v)) => format!("{v:?}F"),
        (CType::F32, FieldValue::Int(v)) => format!("{v}.0F"),
    }
}

/// A comment that stays on one line.
fn comment(text: &str) -> String {
    text.replace('\n', " ")
}

fn kernel_tiling(out: &mut String, k: &Kernel) {
    let upper = upper_snake(&k.name);
    out.push_str(&format!("BEGIN_TILING_DATA_DEF({}TilingData)\n", k.name));
    let width = k
        .tiling
        .iter()
        .map(|f| f.ctype.c_name().len() + f.name.len())
        .max()
        .unwrap_or(0);
    for f in &k.tiling {
        let decl = format!("TILING_DATA_FIELD_DEF({}, {});", f.ctype.c_name(), f.name);
        let pad = width + 26 - decl.len().min(width + 26);
        out.push_str(&format!(
            "    {decl}{}  // {}\n",
            " ".repeat(pad),
            comment(&f.origin)
        ));
    }
    out.push_str("END_TILING_DATA_DEF;\n");
    out.push_str(&format!(
        "REGISTER_TILING_DATA_CLASS({}, {}TilingData)\n\n",
        k.name, k.name
    ));

    let parts: Vec<String> = k
        .key
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let options: Vec<String> = p
                .options
                .iter()
                .enumerate()
                .map(|(code, o)| format!("{code} {o}"))
                .collect();
            format!(
                "//   digit {i}: {} = {} ({})",
                p.name,
                p.choice,
                options.join(", ")
            )
        })
        .collect();
    out.push_str(&format!(
        "// Tiling key (SetTilingKey on the host, TILING_KEY_IS in the kernel):\n{}\n",
        parts.join("\n")
    ));
    out.push_str(&format!(
        "constexpr uint64_t {upper}_TILING_KEY = {}ULL;\n",
        k.key.value
    ));
    out.push_str(&format!(
        "// {}: {} units of {}, at most {} per core.\n",
        comment(&k.split.kernel),
        k.split.work_units,
        comment(&k.split.work_unit),
        k.split.units_per_core
    ));
    out.push_str(&format!(
        "constexpr uint32_t {upper}_BLOCK_DIM = {}U;\n",
        k.split.block_dim
    ));
    out.push_str(&format!(
        "// Workspace: {} B per core x {} cores + {} B system workspace (GetWorkspaceSizes(1)[0]).\n",
        k.workspace.per_core, k.workspace.cores, k.workspace.system
    ));
    out.push_str(&format!(
        "constexpr uint64_t {upper}_WORKSPACE_SIZE = {}ULL;\n\n",
        k.workspace.total
    ));
    out.push_str(&format!(
        "// This plan's values; the tiling function computes them per shape.\ninline void Fill{0}TilingData({0}TilingData &tiling)\n{{\n",
        k.name
    ));
    for f in &k.tiling {
        out.push_str(&format!(
            "    tiling.set_{}({});\n",
            f.name,
            literal(f.ctype, f.value)
        ));
    }
    out.push_str("}\n\n");
}

fn op_def(out: &mut String, k: &Kernel) {
    out.push_str(&format!(
        "class {0} : public OpDef {{\npublic:\n    explicit {0}(const char *name) : OpDef(name)\n    {{\n",
        k.name
    ));
    for (kind, list) in [("Input", &k.op_def.inputs), ("Output", &k.op_def.outputs)] {
        for io in list {
            out.push_str(&format!(
                "        this->{kind}(\"{}\").ParamType({}).DataType({{ge::{}}}).Format({{ge::{}}});\n",
                io.name,
                if io.optional { "OPTIONAL" } else { "REQUIRED" },
                io.dtype,
                io.format
            ));
        }
    }
    out.push_str(&format!(
        "        this->AICore().AddConfig(\"{}\");\n    }}\n}};\nOP_ADD({});\n\n",
        k.op_def.config, k.name
    ));
}

/// The C++ of `plan`: tiling structs, values, keys, launch constants, registrations.
pub fn tiling_data(plan: &AscendPlan) -> String {
    let mut out = format!(
        "// Generated by `{}`.\n// {} kernel(s) for {} ({}); the tiling function of a port \
         computes these per shape.\n\nnamespace optiling {{\n",
        plan.command,
        plan.kernels.len(),
        plan.chip.name,
        plan.chip.soc_version
    );
    for k in &plan.kernels {
        kernel_tiling(&mut out, k);
    }
    out.push_str("}  // namespace optiling\n\nnamespace ops {\n");
    for k in &plan.kernels {
        op_def(&mut out, k);
    }
    out.push_str("}  // namespace ops\n");
    out
}
