//! Pipeline timelines: which pipe of which core runs which step of a few tiles, in order, with
//! the events between them, and the picture of it as an SVG.
//!
//! The model is order, not time. Each step takes one slot; a pipe runs its steps in program
//! order (the order they are added, as the pipes of an AI core issue them); a step starts in the
//! first slot after every step it waits for. Double buffering appears as a load of tile `j + 2`
//! waiting for the consumer of tile `j` to free the buffer. No step length is a measurement or
//! an estimate: the picture shows what overlaps with what and which event each wait needs.

use std::collections::BTreeMap;

use plotters::prelude::*;
use serde::Serialize;

use super::AscendPlan;
use super::plan::CoreRole;
use crate::error::{Error, Result};

/// A pipe of an AI core, as the timeline rows name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Pipe {
    /// GM -> L1 / UB copies.
    #[serde(rename = "MTE2")]
    Mte2,
    /// L1 -> L0A / L0B.
    #[serde(rename = "MTE1")]
    Mte1,
    /// The cube (Mmad).
    #[serde(rename = "M")]
    M,
    /// Fixpipe, L0C -> GM (A2).
    #[serde(rename = "FIX")]
    Fix,
    /// DataCopy CO1 -> CO2, L0C -> UB (310P).
    #[serde(rename = "CO1->CO2")]
    Co1Co2,
    /// DataCopy VECOUT -> A1/B1, UB -> L1 (310P).
    #[serde(rename = "UB->L1")]
    UbToL1,
    /// The vector unit.
    #[serde(rename = "V")]
    V,
    /// UB -> GM copies.
    #[serde(rename = "MTE3")]
    Mte3,
}

impl Pipe {
    pub fn name(self) -> &'static str {
        match self {
            Pipe::Mte2 => "MTE2",
            Pipe::Mte1 => "MTE1",
            Pipe::M => "M",
            Pipe::Fix => "FIX",
            Pipe::Co1Co2 => "CO1->CO2",
            Pipe::UbToL1 => "UB->L1",
            Pipe::V => "V",
            Pipe::Mte3 => "MTE3",
        }
    }

    /// The `HardEvent` name part of a pipe, where the pipe has one.
    fn event_name(self) -> Option<&'static str> {
        match self {
            Pipe::Co1Co2 | Pipe::UbToL1 => None,
            other => Some(other.name()),
        }
    }
}

/// What a step waits for.
#[derive(Clone, Debug, Serialize)]
pub struct Wait {
    /// Index of the step waited for.
    pub step: usize,
    /// The synchronisation that carries the wait: `HardEvent::MTE2_MTE1`, a cross-core flag,
    /// `SyncAll`, a queue hand-off.
    pub event: String,
}

/// One step of a timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// The kernel the step belongs to.
    pub kernel: String,
    pub core: CoreRole,
    pub pipe: Pipe,
    pub label: String,
    pub slot: u32,
    pub waits: Vec<Wait>,
}

/// A scheduled timeline.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timeline {
    pub steps: Vec<Step>,
    /// Slots the timeline spans.
    pub slots: u32,
}

/// A dependency of a step being added.
pub enum Dep<'a> {
    /// Same core: the event is derived from the two pipes.
    On(usize),
    /// Across cores or kernels: named (a cross-core flag, `SyncAll`).
    Named(usize, &'a str),
}

/// Builds a timeline in program order.
pub struct Builder {
    kernel: String,
    steps: Vec<Step>,
    /// First free slot of each (core, pipe).
    free: BTreeMap<(CoreRole, Pipe), u32>,
}

impl Builder {
    pub fn new(kernel: &str) -> Self {
        Builder {
            kernel: kernel.to_string(),
            steps: Vec::new(),
            free: BTreeMap::new(),
        }
    }

    /// Add a step on `core`'s `pipe` after `deps`; returns its index.
    pub fn step(&mut self, core: CoreRole, pipe: Pipe, label: &str, deps: &[Dep]) -> usize {
        let mut slot = self.free.get(&(core, pipe)).copied().unwrap_or(0);
        let mut waits = Vec::new();
        for dep in deps {
            let (index, named) = match dep {
                Dep::On(i) => (*i, None),
                Dep::Named(i, name) => (*i, Some(*name)),
            };
            let from = &self.steps[index];
            slot = slot.max(from.slot + 1);
            let event = match named {
                Some(name) => name.to_string(),
                None if from.pipe == pipe && from.core == core => continue,
                None => match (from.pipe.event_name(), pipe.event_name()) {
                    (Some(a), Some(b)) => format!("HardEvent::{a}_{b}"),
                    _ => format!("queue {} -> {}", from.pipe.name(), pipe.name()),
                },
            };
            waits.push(Wait { step: index, event });
        }
        self.free.insert((core, pipe), slot + 1);
        self.steps.push(Step {
            kernel: self.kernel.clone(),
            core,
            pipe,
            label: label.to_string(),
            slot,
            waits,
        });
        self.steps.len() - 1
    }

    pub fn finish(self) -> Timeline {
        let slots = self.steps.iter().map(|s| s.slot + 1).max().unwrap_or(0);
        Timeline {
            steps: self.steps,
            slots,
        }
    }
}

impl Timeline {
    /// The steps as a markdown table, in slot order.
    pub fn markdown(&self) -> String {
        let mut order: Vec<usize> = (0..self.steps.len()).collect();
        order.sort_by_key(|&i| (self.steps[i].slot, lane_rank(&self.steps[i]), i));
        let rows: Vec<Vec<String>> = order
            .iter()
            .map(|&i| {
                let s = &self.steps[i];
                let waits: Vec<String> = s
                    .waits
                    .iter()
                    .map(|w| format!("{} ({})", self.steps[w.step].label, w.event))
                    .collect();
                vec![
                    s.slot.to_string(),
                    format!("{} {}", s.core.name(), s.pipe.name()),
                    s.label.clone(),
                    if waits.is_empty() {
                        "-".to_string()
                    } else {
                        waits.join("; ")
                    },
                ]
            })
            .collect();
        super::markdown_table(&["slot", "pipe", "step", "waits for (event)"], &rows)
    }
}

/// Rows top to bottom: cube pipes, then vector pipes.
fn lane_rank(s: &Step) -> (u8, Pipe) {
    let core = match s.core {
        CoreRole::Aic => 0,
        CoreRole::AiCore => 1,
        CoreRole::Aiv => 2,
    };
    (core, s.pipe)
}

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::Format {
        what: "timeline plot".into(),
        why: e.to_string(),
    }
}

const LEFT: i32 = 150;
const TOP: i32 = 60;
const SLOT_W: i32 = 64;
const ROW_H: i32 = 34;

/// Colour of a pipe's boxes.
fn colour(pipe: Pipe) -> RGBColor {
    match pipe {
        Pipe::Mte2 => RGBColor(0x9e, 0xc5, 0xe8),
        Pipe::Mte1 => RGBColor(0xb4, 0xd8, 0xb0),
        Pipe::M => RGBColor(0xf4, 0xb6, 0x7a),
        Pipe::Fix | Pipe::Co1Co2 => RGBColor(0xe8, 0xa0, 0xa0),
        Pipe::UbToL1 => RGBColor(0xc9, 0xb3, 0xe0),
        Pipe::V => RGBColor(0xf2, 0xe0, 0x8a),
        Pipe::Mte3 => RGBColor(0xa8, 0xd8, 0xd8),
    }
}

/// The plan's kernels' timelines, one after another, as an SVG document: one row per pipe of
/// each core kind, one box per step with its label, a line per wait between different rows
/// (cross-core flags and `SyncAll` in red, with their names).
pub fn svg(plan: &AscendPlan, title: &str) -> Result<String> {
    // Lay the kernels out one after another, a slot apart.
    let mut placed: Vec<(&Step, u32)> = Vec::new();
    let mut kernel_spans: Vec<(String, u32, u32)> = Vec::new();
    let mut start = 0;
    for kernel in &plan.kernels {
        for step in &kernel.timeline.steps {
            placed.push((step, start + step.slot));
        }
        kernel_spans.push((kernel.name.clone(), start, start + kernel.timeline.slots));
        start += kernel.timeline.slots + 1;
    }
    let slots = start.saturating_sub(1).max(1);
    let mut lanes: Vec<(u8, Pipe, CoreRole)> = placed
        .iter()
        .map(|(s, _)| {
            let (rank, pipe) = lane_rank(s);
            (rank, pipe, s.core)
        })
        .collect();
    lanes.sort();
    lanes.dedup();
    let row_of = |s: &Step| {
        let (rank, pipe) = lane_rank(s);
        lanes
            .iter()
            .position(|l| l.0 == rank && l.1 == pipe)
            .unwrap_or(0) as i32
    };
    let width = (LEFT + SLOT_W * slots as i32 + 30).max(700) as u32;
    let height = (TOP + ROW_H * lanes.len() as i32 + 70) as u32;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let text = |size| ("sans-serif", size).into_font().color(&BLACK);
        root.draw(&Text::new(title.to_string(), (10, 8), text(15)))
            .map_err(plot_error)?;
        for (name, from, to) in &kernel_spans {
            let x = LEFT + SLOT_W * *from as i32;
            root.draw(&Text::new(name.clone(), (x + 2, TOP - 20), text(12)))
                .map_err(plot_error)?;
            let x_end = LEFT + SLOT_W * *to as i32;
            root.draw(&PathElement::new(
                vec![(x, TOP - 4), (x_end, TOP - 4)],
                BLACK.stroke_width(1),
            ))
            .map_err(plot_error)?;
        }
        for (row, (_, pipe, core)) in lanes.iter().enumerate() {
            let y = TOP + ROW_H * row as i32;
            let label = match core {
                CoreRole::AiCore => pipe.name().to_string(),
                other => format!("{} {}", other.name(), pipe.name()),
            };
            root.draw(&Text::new(label, (8, y + ROW_H / 2 - 7), text(13)))
                .map_err(plot_error)?;
            root.draw(&PathElement::new(
                vec![(LEFT, y + ROW_H), (LEFT + SLOT_W * slots as i32, y + ROW_H)],
                RGBColor(0xdd, 0xdd, 0xdd).stroke_width(1),
            ))
            .map_err(plot_error)?;
        }
        let centre = |s: &Step, slot: u32, right: bool| {
            let x = LEFT + SLOT_W * slot as i32 + if right { SLOT_W - 4 } else { 4 };
            (x, TOP + ROW_H * row_of(s) + ROW_H / 2)
        };
        // Waits between rows first, so the boxes are drawn over them.
        for (step, slot) in &placed {
            for w in &step.waits {
                let from = &step_of(plan, step, w.step);
                let from_slot = placed
                    .iter()
                    .find(|(s, _)| std::ptr::eq(*s, *from))
                    .map(|p| p.1)
                    .unwrap_or(0);
                if row_of(from) == row_of(step) {
                    continue;
                }
                let named = !w.event.starts_with("HardEvent") && !w.event.starts_with("queue");
                let style = if named {
                    RED.stroke_width(1)
                } else {
                    RGBColor(0x88, 0x88, 0x88).stroke_width(1)
                };
                let a = centre(from, from_slot, true);
                let b = centre(step, *slot, false);
                root.draw(&PathElement::new(vec![a, b], style))
                    .map_err(plot_error)?;
                if named {
                    let mid = ((a.0 + b.0) / 2, (a.1 + b.1) / 2 - 10);
                    root.draw(&Text::new(
                        w.event.clone(),
                        mid,
                        ("sans-serif", 9).into_font().color(&RED),
                    ))
                    .map_err(plot_error)?;
                }
            }
        }
        for (step, slot) in &placed {
            let x = LEFT + SLOT_W * *slot as i32;
            let y = TOP + ROW_H * row_of(step);
            root.draw(&Rectangle::new(
                [(x + 3, y + 4), (x + SLOT_W - 3, y + ROW_H - 4)],
                colour(step.pipe).filled(),
            ))
            .map_err(plot_error)?;
            root.draw(&Text::new(step.label.clone(), (x + 6, y + 11), text(10)))
                .map_err(plot_error)?;
        }
        let foot = TOP + ROW_H * lanes.len() as i32 + 14;
        root.draw(&Text::new(
            "One slot per step in program order: what overlaps and what waits, not time (no \
             step length is measured or estimated). Grey: events inside a core; red: cross-core \
             flags and SyncAll."
                .to_string(),
            (10, foot),
            text(11),
        ))
        .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(out)
}

/// The step a wait of `step` points at: waits index into the timeline of the step's kernel.
fn step_of<'p>(plan: &'p AscendPlan, step: &Step, index: usize) -> &'p Step {
    let kernel = plan
        .kernels
        .iter()
        .find(|k| k.name == step.kernel)
        .expect("a step belongs to one of the plan's kernels");
    &kernel.timeline.steps[index]
}
