//! Porting plans for Ascend: chip specs and per-operator tiling plans checked against Ascend
//! on-chip memory.
//!
//! [`plan_command`] is what `fusedops ascend-plan` calls: it takes an operator (`amla`,
//! `swiftgmm`, `merrouter`), a chip (`910B2`, `910B4`, `310P3`), a preset (`deepseek-v3`,
//! `pangu-pro-moe`) and `key=value` shape flags, and returns an [`AscendPlan`]: the stages of the
//! Ascend C kernel with the WGSL each replaces, the tiling struct with the origin of each field
//! in our code, per-core tile sizes with double buffering, each buffer's bytes and aligned
//! offset in UB / L1 / L0A / L0B / L0C against the chip's capacity, the core split, the CANN
//! built-in to compare with, the template to port from, and a roofline estimate of the busiest
//! core. A request that cannot be planned is an error: a tile that does not fit is
//! [`Error::Limit`](crate::Error::Limit) naming the memory and its buffers; a feature the chip
//! lacks (bf16 or int32 atomics on 310P) is [`Error::Unsupported`](crate::Error::Unsupported).
//! The porting notes in `docs/ascend/` embed tables from [`AscendPlan::stages_markdown`],
//! [`AscendPlan::tiling_markdown`] and [`AscendPlan::buffers_markdown`].
//!
//! ```
//! let shape = [("batch".to_string(), "8".to_string())];
//! let plan = fusedops::ascend::plan_command("amla", "910B2", Some("deepseek-v3"), &shape)?;
//! assert!(plan.memory.iter().all(|m| m.used <= m.capacity));
//! println!("{}", plan.to_text());
//! # Ok::<(), fusedops::Error>(())
//! ```
//!
//! The concept map from WGSL to Ascend C and the sources of every chip figure are in
//! `docs/ascend/README.md`.

pub mod amla;
pub mod chips;
pub mod merrouter;
pub mod plan;
pub mod swiftgmm;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::util::text_table;
use chips::ChipSpec;
use plan::{Bound, Buffer, CoreSplit, MemoryUse, Roofline, Stage, TilingField};

/// The operators a plan can be made for.
pub const OPERATORS: [&str; 3] = ["amla", "swiftgmm", "merrouter"];

/// Model presets (SPEC.md, "Shapes that matter").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    DeepseekV3,
    PanguProMoe,
}

impl Preset {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "deepseek-v3" => Ok(Preset::DeepseekV3),
            "pangu-pro-moe" => Ok(Preset::PanguProMoe),
            _ => Err(Error::Format {
                what: "--preset".into(),
                why: format!("unknown preset {name:?}; known: deepseek-v3, pangu-pro-moe"),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::DeepseekV3 => "deepseek-v3",
            Preset::PanguProMoe => "pangu-pro-moe",
        }
    }
}

/// A tiling plan for one operator on one chip.
#[derive(Clone, Debug, Serialize)]
pub struct AscendPlan {
    pub op: &'static str,
    pub chip: &'static ChipSpec,
    /// The preset the shape started from, `None` for explicit shapes on the defaults.
    pub preset: Option<Preset>,
    /// The resolved problem shape, `key = value`.
    pub problem: Vec<(String, String)>,
    /// Variants and tile sizes chosen (or given), `key = value`.
    pub choices: Vec<(String, String)>,
    pub split: CoreSplit,
    /// The stages of the Ascend C kernel, each with the WGSL it replaces.
    pub stages: Vec<Stage>,
    /// The host-side tiling struct the kernel reads, each field with its origin in our code.
    pub tiling: Vec<TilingField>,
    /// On-chip buffers of one core of each kind.
    pub buffers: Vec<Buffer>,
    /// How full each memory of each core kind is.
    pub memory: Vec<MemoryUse>,
    /// Global-memory workspace one cube core (or vector core) needs, bytes.
    pub workspace_bytes_per_core: u64,
    pub roofline: Roofline,
    /// The CANN built-in to compare a port with.
    pub cann_builtin: String,
    /// The public Ascend C code to start a port from.
    pub template: String,
    pub notes: Vec<String>,
}

/// Plan `op` (`amla` | `swiftgmm` | `merrouter`) on `chip` (`910B2` | `910B4` | `310P3`).
///
/// - `preset`: `deepseek-v3` or `pangu-pro-moe` (`None`: the DeepSeek-V3 shape as defaults).
/// - `shape`: `key=value` flags that override the preset; each operator documents its keys
///   ([`amla::KEYS`], [`swiftgmm::KEYS`], [`merrouter::KEYS`]). Tile keys fix a tile size instead
///   of the automatic choice (the largest that fits); every operator also takes `peak_tflops=`
///   and `mem_gbps=`, the peaks the roofline bound uses where the chip has no public figure.
///
/// Errors: unknown op, chip, preset or key ([`Error::Format`]); invalid values
/// ([`Error::Invalid`]); a feature the chip lacks ([`Error::Unsupported`]); buffers that do not
/// fit a memory ([`Error::Limit`]).
pub fn plan_command(
    op: &str,
    chip: &str,
    preset: Option<&str>,
    shape: &[(String, String)],
) -> Result<AscendPlan> {
    let chip = chips::chip(chip)?;
    let preset = preset.map(Preset::parse).transpose()?;
    match op {
        "amla" => amla::plan(chip, preset, shape),
        "swiftgmm" => swiftgmm::plan(chip, preset, shape),
        "merrouter" => merrouter::plan(chip, preset, shape),
        _ => Err(Error::Format {
            what: "operator".into(),
            why: format!("unknown operator {op:?} for ascend-plan; known: {OPERATORS:?}"),
        }),
    }
}

/// `1.5 MiB`, `64 KiB`, `96 B`.
pub fn fmt_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        let k = b / KIB;
        if k.fract() == 0.0 {
            format!("{k:.0} KiB")
        } else {
            format!("{k:.1} KiB")
        }
    } else {
        format!("{bytes} B")
    }
}

fn fmt_si(x: f64, unit: &str) -> String {
    let (scaled, prefix) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{scaled:.3} {prefix}{unit}")
}

fn pairs(items: &[(String, String)]) -> String {
    items
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A markdown table; `|` inside cells is escaped.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let line = |cells: Vec<String>| -> String {
        let escaped: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
        format!("| {} |\n", escaped.join(" | "))
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

impl AscendPlan {
    /// The plan as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plans serialise")
    }

    /// The kernel's stages as a markdown table (the docs under `docs/ascend/` embed these).
    pub fn stages_markdown(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .stages
            .iter()
            .map(|st| {
                vec![
                    st.name.clone(),
                    st.unit.clone(),
                    format!("`{}`", st.wgsl),
                    st.work.clone(),
                ]
            })
            .collect();
        markdown_table(&["stage", "runs on", "replaces (WGSL)", "work"], &rows)
    }

    /// The tiling struct as a markdown table.
    pub fn tiling_markdown(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .tiling
            .iter()
            .map(|f| vec![format!("`{}`", f.name), f.value.clone(), f.origin.clone()])
            .collect();
        markdown_table(&["field", "value", "from (our code)"], &rows)
    }

    /// The on-chip buffers and each memory's use as markdown tables.
    pub fn buffers_markdown(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .buffers
            .iter()
            .map(|b| {
                vec![
                    b.core.name().to_string(),
                    b.memory.name().to_string(),
                    b.name.clone(),
                    format!("`{}`", b.shape),
                    fmt_bytes(b.aligned_bytes),
                    b.copies.to_string(),
                    b.offset.to_string(),
                ]
            })
            .collect();
        let mut out = markdown_table(
            &[
                "core", "memory", "buffer", "shape", "bytes", "copies", "offset",
            ],
            &rows,
        );
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .memory
            .iter()
            .map(|m| {
                vec![
                    m.core.name().to_string(),
                    m.memory.name().to_string(),
                    fmt_bytes(m.used),
                    fmt_bytes(m.capacity),
                ]
            })
            .collect();
        out.push_str(&markdown_table(
            &["core", "memory", "used", "capacity"],
            &rows,
        ));
        out
    }

    /// The plan as text tables for the terminal.
    pub fn to_text(&self) -> String {
        let c = self.chip;
        let mut out = format!(
            "ascend-plan {} on {} ({}, {}), preset {}\n",
            self.op,
            c.name,
            c.product,
            match c.arch {
                chips::CoreArch::Separated => "separated AIC + AIV",
                chips::CoreArch::Coupled => "coupled AI cores",
            },
            self.preset.map_or("none", Preset::name)
        );
        out.push_str(&format!("problem  {}\n", pairs(&self.problem)));
        out.push_str(&format!("choices  {}\n", pairs(&self.choices)));
        let s = &self.split;
        out.push_str(&format!(
            "cores    {} kernel, blockDim {}: {} cube + {} vector cores busy; {} units of {}, \
             at most {} per core\n\n",
            s.kernel,
            s.block_dim,
            s.cube_cores_used,
            s.vector_cores_used,
            s.work_units,
            s.work_unit,
            s.units_per_core
        ));
        let rows: Vec<Vec<String>> = self
            .stages
            .iter()
            .map(|st| vec![st.name.clone(), st.unit.clone(), st.wgsl.clone()])
            .collect();
        out.push_str(&text_table(&["stage", "runs on", "replaces (WGSL)"], &rows));
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .tiling
            .iter()
            .map(|f| vec![f.name.clone(), f.value.clone(), f.origin.clone()])
            .collect();
        out.push_str(&text_table(&["tiling field", "value", "from"], &rows));
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .buffers
            .iter()
            .map(|b| {
                vec![
                    b.core.name().to_string(),
                    b.memory.name().to_string(),
                    b.name.clone(),
                    b.shape.clone(),
                    fmt_bytes(b.aligned_bytes),
                    format!("x{}", b.copies),
                    b.offset.to_string(),
                    fmt_bytes(b.total()),
                ]
            })
            .collect();
        out.push_str(&text_table(
            &[
                "core", "memory", "buffer", "shape", "bytes", "copies", "offset", "total",
            ],
            &rows,
        ));
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .memory
            .iter()
            .map(|m| {
                vec![
                    m.core.name().to_string(),
                    m.memory.name().to_string(),
                    fmt_bytes(m.used),
                    fmt_bytes(m.capacity),
                    format!("{:.0}%", 100.0 * m.used as f64 / m.capacity as f64),
                    format!("{} B", m.alignment),
                ]
            })
            .collect();
        out.push_str(&text_table(
            &["core", "memory", "used", "capacity", "use", "aligned to"],
            &rows,
        ));
        out.push_str(&format!(
            "\nworkspace (global memory) per core: {}\n",
            fmt_bytes(self.workspace_bytes_per_core)
        ));
        let r = &self.roofline;
        out.push_str(&format!(
            "\nroofline of the busiest core (model estimate, not a measurement)\n  cube work   {}\n  \
             GM traffic  {}\n  workspace   {}\n  intensity   {:.1} FLOP/B\n",
            fmt_si(r.cube_flops_per_core, "FLOP"),
            fmt_si(r.gm_bytes_per_core, "B"),
            fmt_si(r.workspace_bytes_per_core, "B"),
            r.intensity
        ));
        match (&r.peak, r.ridge, r.compute_us, r.memory_us, r.bound) {
            (Some(p), Some(ridge), Some(compute), Some(memory), Some(bound)) => {
                out.push_str(&format!(
                    "  peaks       {} TFLOP/s fp16 cube, {} GB/s ({})\n  ridge       {:.1} \
                     FLOP/B\n  at peak     cube {:.2} us, memory {:.2} us: {} bound\n",
                    p.cube_fp16_tflops,
                    p.mem_gbps,
                    p.source,
                    ridge,
                    compute,
                    memory,
                    match bound {
                        Bound::Compute => "compute",
                        Bound::Memory => "memory",
                    }
                ));
            }
            _ => out.push_str(
                "  bound       needs peak figures: no public peak for this chip was found; pass \
                 peak_tflops=<TFLOP/s> mem_gbps=<GB/s>\n",
            ),
        }
        out.push_str(&format!(
            "\ncompare with  {}\nport from     {}\n",
            self.cann_builtin, self.template
        ));
        if !self.notes.is_empty() {
            out.push_str("notes\n");
            for note in &self.notes {
                out.push_str(&format!("  - {note}\n"));
            }
        }
        out
    }
}
