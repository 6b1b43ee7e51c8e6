//! Benchmark reports: the terminal table, Markdown for docs/PERFORMANCE.md, JSON, and an SVG
//! roofline plot (arithmetic intensity against achieved TFLOP/s under the measured roofs).

use plotters::prelude::*;

use crate::bench::{BenchRow, Environment};
use crate::error::{Error, Result};
use crate::roofline::Roofline;
use crate::util::{fmt_num, text_table};

/// Version of the JSON layout below; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything one `fusedops bench` run produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub schema_version: u32,
    /// The command line that produced the report.
    pub command: String,
    pub environment: Environment,
    pub roofline: Roofline,
    pub cases: Vec<BenchRow>,
}

impl BenchReport {
    pub fn new(environment: Environment, roofline: Roofline, cases: Vec<BenchRow>) -> Self {
        BenchReport {
            schema_version: SCHEMA_VERSION,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            environment,
            roofline,
            cases,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports serialise")
    }

    pub fn failures(&self) -> usize {
        self.cases.iter().filter(|r| !r.check.pass).count()
    }
}

const HEADER: [&str; 11] = [
    "op",
    "case",
    "path",
    "time us (min-max)",
    "GB/s",
    "TFLOP/s",
    "tokens/s",
    "roof",
    "vs baseline",
    "check",
    "max error",
];

fn cells(r: &BenchRow) -> Vec<String> {
    let time = r
        .time
        .as_ref()
        .map(|t| format!("{:.1} ({:.1}-{:.1})", t.median_us, t.min_us, t.max_us))
        .unwrap_or_else(|| "-".into());
    let roof = match (r.roof_percent, r.bound) {
        (Some(p), Some(b)) => format!("{p:.0}% of {}", format!("{b:?}").to_lowercase()),
        _ => "-".into(),
    };
    let speedup = match (&r.baseline, r.speedup) {
        (Some(name), Some(s)) => format!("{s:.2}x {name}"),
        _ => "-".into(),
    };
    vec![
        r.check.case.op.to_string(),
        r.check.case.name.clone(),
        r.check.variant.clone(),
        time,
        fmt_num(r.gbps),
        fmt_num(r.tflops),
        fmt_num(r.tokens_per_s),
        roof,
        speedup,
        if r.check.pass { "pass" } else { "FAIL" }.to_string(),
        r.check.summary(),
    ]
}

/// One line per probe.
pub fn probe_lines(roof: &Roofline) -> String {
    let mut s = String::new();
    for p in roof.probes() {
        s += &format!(
            "  {:<9} {:>9} {:<8} ({}, {}, median {:.1} us{})\n",
            p.name,
            significant(p.value),
            p.unit,
            p.size,
            p.clock,
            p.median_ns / 1e3,
            if p.verified {
                ""
            } else {
                ", OUTPUT WRONG: not used"
            }
        );
    }
    s
}

/// Median time per compute pass of every case that records several (GPU timestamps only), e.g.
/// the steps of the MoE layer: `op case: step a us, step b us, ...`.
pub fn pass_split_lines(report: &BenchReport) -> Vec<String> {
    report
        .cases
        .iter()
        .filter_map(|r| {
            let t = r.time.as_ref()?;
            (t.passes.len() > 1).then(|| {
                let steps: Vec<String> = t
                    .passes
                    .iter()
                    .map(|(label, us)| format!("{label} {us:.1} us"))
                    .collect();
                format!(
                    "{} {}: {}",
                    r.check.case.op,
                    r.check.case.name,
                    steps.join(", ")
                )
            })
        })
        .collect()
}

/// The terminal table, then the per-pass split of multi-pass cases.
pub fn text(report: &BenchReport) -> String {
    // Long path descriptions (the MoE layer names every step's) are cut in the terminal table;
    // the Markdown and JSON reports keep them whole.
    let rows: Vec<Vec<String>> = report
        .cases
        .iter()
        .map(|r| {
            let mut row = cells(r);
            row[2] = shorten(&row[2], 64);
            row
        })
        .collect();
    let mut s = text_table(&HEADER, &rows);
    let split = pass_split_lines(report);
    if !split.is_empty() {
        s += "\ntime per pass (median):\n";
        for line in split {
            s += &format!("  {line}\n");
        }
    }
    s
}

fn md_row(cells: &[String]) -> String {
    let escaped: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
    format!("| {} |\n", escaped.join(" | "))
}

/// Markdown: the environment, the probes and the case table.
pub fn markdown(report: &BenchReport) -> String {
    let env = &report.environment;
    let a = &env.adapter;
    let mut s = format!(
        "Adapter: {} ({}, {}), driver {} {}; fusedops {}; {} UTC; command `{}`\n\n",
        a.name,
        a.backend,
        a.device_type,
        a.driver,
        a.driver_info,
        env.fusedops_version,
        env.date_utc,
        report.command
    );
    s += "| probe | value | size | clock | verified |\n|---|---|---|---|---|\n";
    for p in report.roofline.probes() {
        s += &md_row(&[
            p.name.to_string(),
            format!("{} {}", significant(p.value), p.unit),
            p.size.clone(),
            p.clock.to_string(),
            if p.verified { "yes" } else { "NO" }.to_string(),
        ]);
    }
    s.push('\n');
    s += &md_row(&HEADER.map(String::from));
    s += &format!("|{}\n", "---|".repeat(HEADER.len()));
    for r in &report.cases {
        s += &md_row(&cells(r));
    }
    let split = pass_split_lines(report);
    if !split.is_empty() {
        s += "\nTime per compute pass (median):\n\n";
        for line in split {
            s += &format!("- {line}\n");
        }
    }
    s
}

/// The cases that can be placed on a log-log roofline: timed, with bytes and FLOPs.
pub fn plotted_cases(report: &BenchReport) -> Vec<(String, f64, f64)> {
    report
        .cases
        .iter()
        .filter_map(|r| {
            let tflops = r.tflops?;
            (r.bytes > 0 && tflops > 0.0).then(|| {
                (
                    format!("{} {}", r.check.case.op, r.check.case.name),
                    r.flops as f64 / r.bytes as f64,
                    tflops,
                )
            })
        })
        .collect()
}

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::Format {
        what: "roofline plot".into(),
        why: e.to_string(),
    }
}

/// The roofline plot as an SVG document: the copy-bandwidth roof, one horizontal roof per
/// verified compute probe, and one labelled point per case.
pub fn roofline_svg(report: &BenchReport) -> Result<String> {
    let points = plotted_cases(report);
    let roof = &report.roofline;
    let bw_tbps = roof.copy_gbps().map(|g| g / 1e3);
    let peaks: Vec<(&str, f64)> = [&roof.fma_f32, &roof.fma_f16, &roof.coop_f16]
        .into_iter()
        .flatten()
        .filter(|p| p.verified)
        .map(|p| (p.name, p.value))
        .collect();
    // Axis ranges that hold every point and roof, in whole decades.
    let xs = points.iter().map(|p| p.1);
    let ys = points.iter().map(|p| p.2).chain(peaks.iter().map(|p| p.1));
    let decade_down = |v: f64| 10f64.powf(v.log10().floor());
    let decade_up = |v: f64| 10f64.powf(v.log10().ceil());
    let x_min = decade_down(xs.clone().fold(1.0, f64::min) / 2.0);
    let x_max = decade_up(xs.fold(100.0, f64::max) * 2.0);
    let y_max = decade_up(ys.clone().fold(1e-3, f64::max) * 2.0);
    let y_min = decade_down(ys.fold(y_max / 1e4, f64::min) / 2.0);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 650)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let env = &report.environment;
        let title = format!(
            "fusedops roofline: {} ({}), {}",
            env.adapter.name, env.adapter.backend, env.date_utc
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d((x_min..x_max).log_scale(), (y_min..y_max).log_scale())
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("arithmetic intensity (FLOP/byte)")
            .y_desc("achieved TFLOP/s")
            .draw()
            .map_err(plot_error)?;
        if let Some(bw) = bw_tbps {
            // TFLOP/s = TB/s x FLOP/byte, up to the ridge point of the highest compute roof.
            let highest = peaks.iter().map(|p| p.1).fold(0.0, f64::max);
            let x_end = if highest > 0.0 {
                (highest / bw).clamp(x_min, x_max)
            } else {
                x_max
            };
            let steps = 200;
            let line = (0..=steps).map(|i| {
                let x = x_min * (x_end / x_min).powf(i as f64 / steps as f64);
                (x, bw * x)
            });
            chart
                .draw_series(LineSeries::new(line, BLUE.stroke_width(2)))
                .map_err(plot_error)?
                .label(format!("copy {} GB/s", significant(bw * 1e3)))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        }
        let colours = [RED, GREEN, MAGENTA];
        for ((name, peak), colour) in peaks.iter().zip(colours) {
            let start = bw_tbps.map(|bw| peak / bw).unwrap_or(x_min).max(x_min);
            chart
                .draw_series(LineSeries::new(
                    [(start, *peak), (x_max, *peak)],
                    colour.stroke_width(1),
                ))
                .map_err(plot_error)?
                .label(format!("{name} {} TFLOP/s", significant(*peak)))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
        for (i, (label, x, y)) in points.iter().enumerate() {
            // Alternate labels above and below their points so neighbours stay readable.
            let dy = if i % 2 == 0 { -14 } else { 4 };
            chart
                .draw_series([EmptyElement::at((*x, *y))
                    + Circle::new((0, 0), 4, BLACK.filled())
                    + Text::new(label.clone(), (6, dy), ("sans-serif", 11))])
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// A value with about three significant digits (rates span 0.001 to 1000s).
pub fn significant(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `text` cut to at most `max` characters, with an ellipsis when cut.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}
