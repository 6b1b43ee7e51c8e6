//! Porting plans for Ascend: chip specs and per-operator plans checked against Ascend on-chip
//! memory, with the host code and pictures a port starts from.
//!
//! [`plan_command`] is what `fusedops ascend-plan` calls: it takes an operator (`amla`,
//! `swiftgmm`, `merrouter`, or `moe` for the MoE layer's chain of kernels), a chip (`910B2`,
//! `910B4`, `310P3`), a preset (`deepseek-v3`, `pangu-pro-moe`) and `key=value` shape flags, and
//! returns an [`AscendPlan`]: per kernel the launch split, the tiling struct with C types and the
//! origin of each field in our code, the tiling key, the workspace, the op_host registration, the
//! kernel's shape (kernel type, cross-core flags, cube parameter structs) and a pipeline
//! timeline; for the whole plan the stages of the Ascend C kernel with the WGSL each replaces,
//! per-core buffers with double buffering checked against UB / L1 / L0A / L0B / L0C, where a
//! port starts on this chip, how our WGSL structure corresponds, and a roofline estimate. A
//! request that cannot be planned is an error: a tile that does not fit is
//! [`Error::Limit`](crate::Error::Limit) naming the memory and its buffers; a feature the chip
//! lacks (bf16, int32 atomics on 310P) is [`Error::Unsupported`](crate::Error::Unsupported); a
//! size that overflows a tiling field or 64-bit arithmetic is
//! [`Error::Invalid`](crate::Error::Invalid) naming the field.
//!
//! The porting notes in `docs/ascend/` embed the markdown, C++ and SVG the plans render; a test
//! keeps them equal.
//!
//! ```
//! let shape = [("batch".to_string(), "8".to_string())];
//! let plan = fusedops::ascend::plan_command("amla", "910B2", Some("deepseek-v3"), &shape)?;
//! assert!(plan.memory.iter().all(|m| m.used <= m.capacity));
//! println!("{}", plan.to_text());
//! println!("{}", plan.tiling_data_cpp());
//! # Ok::<(), fusedops::Error>(())
//! ```
//!
//! The concept map from WGSL to Ascend C and the sources of every chip figure are in
//! `docs/ascend/README.md`.

pub mod amla;
pub mod chips;
pub mod cpp;
pub mod merrouter;
pub mod moe;
pub mod plan;
pub mod swiftgmm;
pub mod timeline;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::util::text_table;
use chips::ChipSpec;
use plan::{Bound, Buffer, Correspondence, Kernel, MemoryUse, Roofline, Stage, StartPoint};

/// The operators a plan can be made for (`moe` is the MoE layer's chain of kernels).
pub const OPERATORS: [&str; 4] = ["amla", "swiftgmm", "merrouter", "moe"];

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

/// A plan for one operator (or the MoE chain) on one chip.
#[derive(Clone, Debug, Serialize)]
pub struct AscendPlan {
    pub op: &'static str,
    /// The command line that prints this plan.
    pub command: String,
    pub chip: &'static ChipSpec,
    /// The preset the shape started from, `None` for explicit shapes on the defaults.
    pub preset: Option<Preset>,
    /// The resolved problem shape, `key = value`.
    pub problem: Vec<(String, String)>,
    /// Variants and tile sizes chosen (or given), `key = value`.
    pub choices: Vec<(String, String)>,
    /// The kernels a port launches, in order.
    pub kernels: Vec<Kernel>,
    /// The stages of the Ascend C kernels, each with the WGSL it replaces.
    pub stages: Vec<Stage>,
    /// On-chip buffers of one core of each kind, per kernel.
    pub buffers: Vec<Buffer>,
    /// How full each memory of each core kind is, per kernel.
    pub memory: Vec<MemoryUse>,
    pub roofline: Roofline,
    /// Where a port starts on this chip: built-in to compare with, code to port from,
    /// torch_npu calls.
    pub start: Vec<StartPoint>,
    /// How our WGSL kernel's workgroup memory and barriers become Ascend buffers and events.
    pub correspondence: Vec<Correspondence>,
    pub notes: Vec<String>,
}

/// Plan `op` (`amla` | `swiftgmm` | `merrouter` | `moe`) on `chip` (`910B2` | `910B4` |
/// `310P3`).
///
/// - `preset`: `deepseek-v3` or `pangu-pro-moe` (`None`: the DeepSeek-V3 shape as defaults).
/// - `shape`: `key=value` flags that override the preset; each operator documents its keys
///   ([`amla::KEYS`], [`swiftgmm::KEYS`], [`merrouter::KEYS`], [`moe::KEYS`]). Tile keys fix a
///   tile size instead of the automatic choice (the largest that fits); every operator also
///   takes `peak_tflops=` and `mem_gbps=`, which win over the chip's figures in the roofline.
///
/// Errors: unknown op, chip, preset or key ([`Error::Format`]); invalid values and sizes that
/// cannot be planned ([`Error::Invalid`], naming the field); a feature the chip lacks
/// ([`Error::Unsupported`]); buffers that do not fit a memory ([`Error::Limit`]).
pub fn plan_command(
    op: &str,
    chip: &str,
    preset: Option<&str>,
    shape: &[(String, String)],
) -> Result<AscendPlan> {
    let chip = chips::chip(chip)?;
    let preset = preset.map(Preset::parse).transpose()?;
    let mut plan = match op {
        "amla" => amla::plan(chip, preset, shape),
        "swiftgmm" => swiftgmm::plan(chip, preset, shape),
        "merrouter" => merrouter::plan(chip, preset, shape),
        "moe" => moe::plan(chip, preset, shape),
        _ => Err(Error::Format {
            what: "operator".into(),
            why: format!("unknown operator {op:?} for ascend-plan; known: {OPERATORS:?}"),
        }),
    }?;
    plan.command = command_line(op, chip.name, preset, shape);
    Ok(plan)
}

/// The `fusedops ascend-plan` command line for a request.
pub fn command_line(
    op: &str,
    chip: &str,
    preset: Option<Preset>,
    shape: &[(String, String)],
) -> String {
    let mut line = format!("fusedops ascend-plan {op} --chip {chip}");
    if let Some(p) = preset {
        line.push_str(&format!(" --preset {}", p.name()));
    }
    for (k, v) in shape {
        line.push_str(&format!(" --shape {k}={v}"));
    }
    line
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

    /// True when the plan has more than one kernel (the tables then name the kernel).
    fn chained(&self) -> bool {
        self.kernels.len() > 1
    }

    /// The kernels' stages as a markdown table (the docs under `docs/ascend/` embed these).
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

    /// The tiling structs as a markdown table: field, C type, value, origin in our code.
    pub fn tiling_markdown(&self) -> String {
        let mut rows = Vec::new();
        for k in &self.kernels {
            for f in &k.tiling {
                let mut row = vec![
                    format!("`{}`", f.name),
                    format!("`{}`", f.ctype.c_name()),
                    f.value.to_string(),
                    f.origin.clone(),
                ];
                if self.chained() {
                    row.insert(0, k.name.clone());
                }
                rows.push(row);
            }
        }
        if self.chained() {
            markdown_table(
                &["kernel", "field", "type", "value", "from (our code)"],
                &rows,
            )
        } else {
            markdown_table(&["field", "type", "value", "from (our code)"], &rows)
        }
    }

    /// Launch facts per kernel: tiling key and its parts, blockDim, workspace, registration.
    pub fn launch_markdown(&self) -> String {
        let mut rows = Vec::new();
        for k in &self.kernels {
            let key: Vec<String> = k
                .key
                .parts
                .iter()
                .map(|p| format!("{}={}", p.name, p.choice))
                .collect();
            let io = |list: &[plan::Io]| -> String {
                list.iter()
                    .map(|io| {
                        format!(
                            "{}{} {}{}",
                            io.name,
                            if io.optional { "?" } else { "" },
                            io.dtype.trim_start_matches("DT_"),
                            if io.format == "FORMAT_ND" {
                                String::new()
                            } else {
                                format!(" {}", io.format.trim_start_matches("FORMAT_"))
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            rows.push(vec![
                k.name.clone(),
                format!("{} ({})", k.key.value, key.join(", ")),
                k.split.block_dim.to_string(),
                format!(
                    "{} x {} + {} system = {}",
                    fmt_bytes(k.workspace.per_core),
                    k.workspace.cores,
                    fmt_bytes(k.workspace.system),
                    fmt_bytes(k.workspace.total)
                ),
                format!(
                    "`{}`: in {}; out {}",
                    k.op_def.config,
                    io(&k.op_def.inputs),
                    io(&k.op_def.outputs)
                ),
            ]);
        }
        markdown_table(
            &[
                "kernel",
                "tiling key",
                "blockDim",
                "workspace",
                "registration",
            ],
            &rows,
        )
    }

    /// The kernels' shape in Ascend C: kernel type, synchronisation, flags, cube structs.
    pub fn kernel_markdown(&self) -> String {
        let mut rows = Vec::new();
        for k in &self.kernels {
            let s = &k.shape;
            rows.push(vec![
                k.name.clone(),
                "kernel type".into(),
                s.kernel_type.clone(),
            ]);
            rows.push(vec![
                k.name.clone(),
                "synchronisation".into(),
                s.sync.clone(),
            ]);
            for f in &s.flags {
                rows.push(vec![
                    k.name.clone(),
                    format!("flag {} `{}`", f.id, f.name),
                    format!("{} -> {}: {}", f.set_by, f.waited_by, f.meaning),
                ]);
            }
            for (name, what) in &s.params {
                rows.push(vec![k.name.clone(), format!("`{name}`"), what.clone()]);
            }
        }
        markdown_table(&["kernel", "part", "what"], &rows)
    }

    /// On-chip buffers and each memory's use as markdown tables.
    pub fn buffers_markdown(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .buffers
            .iter()
            .map(|b| {
                let mut row = vec![
                    b.core.name().to_string(),
                    b.memory.name().to_string(),
                    b.name.clone(),
                    format!("`{}`", b.shape),
                    fmt_bytes(b.aligned_bytes),
                    b.copies.to_string(),
                    b.offset.to_string(),
                ];
                if self.chained() {
                    row.insert(0, b.kernel.clone());
                }
                row
            })
            .collect();
        let header: &[&str] = if self.chained() {
            &[
                "kernel", "core", "memory", "buffer", "shape", "bytes", "copies", "offset",
            ]
        } else {
            &[
                "core", "memory", "buffer", "shape", "bytes", "copies", "offset",
            ]
        };
        let mut out = markdown_table(header, &rows);
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .memory
            .iter()
            .map(|m| {
                let mut row = vec![
                    m.core.name().to_string(),
                    m.memory.name().to_string(),
                    fmt_bytes(m.used),
                    fmt_bytes(m.capacity),
                ];
                if self.chained() {
                    row.insert(0, m.kernel.clone());
                }
                row
            })
            .collect();
        let header: &[&str] = if self.chained() {
            &["kernel", "core", "memory", "used", "capacity"]
        } else {
            &["core", "memory", "used", "capacity"]
        };
        out.push_str(&markdown_table(header, &rows));
        out
    }

    /// Where a port starts on this chip, as a markdown table.
    pub fn start_markdown(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .start
            .iter()
            .map(|s| vec![s.kind.clone(), s.what.clone(), s.source.clone()])
            .collect();
        markdown_table(&["", "what", "source"], &rows)
    }

    /// How the WGSL kernel's structure corresponds to the Ascend C kernel's.
    pub fn correspondence_markdown(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .correspondence
            .iter()
            .map(|c| vec![c.wgsl.clone(), c.ascend.clone()])
            .collect();
        markdown_table(&["WGSL", "Ascend C"], &rows)
    }

    /// The kernels' timelines as markdown tables (one per kernel).
    pub fn timeline_markdown(&self) -> String {
        let mut out = String::new();
        for (i, k) in self.kernels.iter().enumerate() {
            if self.chained() {
                if i > 0 {
                    out.push('\n');
                }
                out.push_str(&format!("{}:\n\n", k.name));
            }
            out.push_str(&k.timeline.markdown());
        }
        out
    }

    /// The C++ a CANN operator project starts from: tiling structs filled with this plan's
    /// values, tiling keys, blockDim, workspace sizes and op_host registrations.
    pub fn tiling_data_cpp(&self) -> String {
        cpp::tiling_data(self)
    }

    /// The kernels' pipeline timelines as an SVG document.
    pub fn timeline_svg(&self) -> Result<String> {
        timeline::svg(self, &self.command)
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
        for k in &self.kernels {
            let s = &k.split;
            out.push_str(&format!(
                "kernel   {}: {} kernel ({}), blockDim {}: {} cube + {} vector cores busy; {} \
                 units of {}, at most {} per core; tiling key {}; workspace {} ({} per core + \
                 {} system)\n",
                k.name,
                s.kernel,
                k.shape.kernel_type,
                s.block_dim,
                s.cube_cores_used,
                s.vector_cores_used,
                s.work_units,
                s.work_unit,
                s.units_per_core,
                k.key.value,
                fmt_bytes(k.workspace.total),
                fmt_bytes(k.workspace.per_core),
                fmt_bytes(k.workspace.system)
            ));
        }
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .stages
            .iter()
            .map(|st| vec![st.name.clone(), st.unit.clone(), st.wgsl.clone()])
            .collect();
        out.push_str(&text_table(&["stage", "runs on", "replaces (WGSL)"], &rows));
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .kernels
            .iter()
            .flat_map(|k| {
                k.tiling.iter().map(|f| {
                    vec![
                        k.name.clone(),
                        f.name.clone(),
                        f.ctype.c_name().to_string(),
                        f.value.to_string(),
                        f.origin.clone(),
                    ]
                })
            })
            .collect();
        out.push_str(&text_table(
            &["kernel", "tiling field", "type", "value", "from"],
            &rows,
        ));
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .buffers
            .iter()
            .map(|b| {
                vec![
                    b.kernel.clone(),
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
                "kernel", "core", "memory", "buffer", "shape", "bytes", "copies", "offset", "total",
            ],
            &rows,
        ));
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .memory
            .iter()
            .map(|m| {
                vec![
                    m.kernel.clone(),
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
            &[
                "kernel",
                "core",
                "memory",
                "used",
                "capacity",
                "use",
                "aligned to",
            ],
            &rows,
        ));
        let r = &self.roofline;
        out.push_str(&format!(
            "\nroofline of the busiest core (model estimate, not a measurement)\n  cube work   {}{}\n  \
             GM traffic  {}\n  workspace   {}\n  intensity   {:.1} op/B\n",
            fmt_si(r.cube_flops_per_core, "op"),
            if r.int8_cube { " (int8 cube)" } else { "" },
            fmt_si(r.gm_bytes_per_core, "B"),
            fmt_si(r.workspace_bytes_per_core, "B"),
            r.intensity
        ));
        if let Some(p) = &r.peak {
            out.push_str(&format!(
                "  peaks       cube {} fp16{}, memory {} ({})\n",
                p.cube_fp16_tflops
                    .map_or("unknown".to_string(), |t| format!("{t:.1} TFLOP/s")),
                if r.int8_cube {
                    " (int8 at twice that)"
                } else {
                    ""
                },
                p.mem_gbps
                    .map_or("unknown".to_string(), |g| format!("{g} GB/s")),
                p.source
            ));
        }
        if let Some(ridge) = r.ridge {
            out.push_str(&format!("  ridge       {ridge:.1} op/B\n"));
        }
        match (r.compute_us, r.memory_us, r.bound) {
            (Some(compute), Some(memory), Some(bound)) => out.push_str(&format!(
                "  at peak     cube {compute:.2} us, memory {memory:.2} us: {} bound\n",
                match bound {
                    Bound::Compute => "compute",
                    Bound::Memory => "memory",
                }
            )),
            (Some(compute), None, _) => out.push_str(&format!(
                "  at peak     cube {compute:.2} us; the bound needs a memory bandwidth: no \
                 public figure with a traceable source was found for this chip, pass \
                 mem_gbps=<GB/s>\n"
            )),
            _ => out.push_str(
                "  bound       needs peak figures: pass peak_tflops=<TFLOP/s> mem_gbps=<GB/s>\n",
            ),
        }
        out.push_str("\nwhere to start\n");
        for s in &self.start {
            out.push_str(&format!("  {:<12} {} [{}]\n", s.kind, s.what, s.source));
        }
        if !self.notes.is_empty() {
            out.push_str("notes\n");
            for note in &self.notes {
                out.push_str(&format!("  - {note}\n"));
            }
        }
        out
    }
}
