//! Benchmark reports: the terminal table, Markdown for docs/PERFORMANCE.md, JSON, and an SVG
//! roofline plot (arithmetic intensity against achieved TFLOP/s under the measured roofs).

use plotters::prelude::*;

use serde_json::Value;

use crate::bench::{BenchRow, Environment, HostRow};
use crate::error::{Error, Result};
use crate::registry::Bound;
use crate::roofline::Roofline;
use crate::util::{fmt_num, text_table};

/// Version of the JSON layout below; bumped on any incompatible change (fields are only added
/// within a version).
pub const SCHEMA_VERSION: u32 = 1;

/// The terminal table's width limit: it fits a normal terminal without wrapping.
pub const TEXT_WIDTH: usize = 160;

/// This process's command line, as reports record it.
pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// Everything one `fusedops bench` run produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub schema_version: u32,
    /// The command line that produced the report.
    pub command: String,
    pub environment: Environment,
    pub roofline: Roofline,
    pub cases: Vec<BenchRow>,
    /// Wall time of the cases (host work, verification and timing), probes excluded.
    pub wall_seconds: f64,
}

impl BenchReport {
    /// A report of this process, whose command line it records.
    pub fn new(
        environment: Environment,
        roofline: Roofline,
        cases: Vec<BenchRow>,
        wall_seconds: f64,
    ) -> Self {
        BenchReport::with_command(command_line(), environment, roofline, cases, wall_seconds)
    }

    /// A report that records `command` as what produced it (a call from Python, say, whose
    /// process command line says nothing about the run).
    pub fn with_command(
        command: String,
        environment: Environment,
        roofline: Roofline,
        cases: Vec<BenchRow>,
        wall_seconds: f64,
    ) -> Self {
        BenchReport {
            schema_version: SCHEMA_VERSION,
            command,
            environment,
            roofline,
            cases,
            wall_seconds,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports serialise")
    }

    /// The report as JSON data: what the Markdown and `--compare` read, so that a saved report
    /// renders exactly as a fresh one.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("reports serialise")
    }

    pub fn failures(&self) -> usize {
        self.cases.iter().filter(|r| !r.check.pass).count()
    }
}

/// The check column: pass or FAIL, and how much was compared when it was a sample.
fn check_cell(r: &BenchRow) -> String {
    let verdict = if r.check.pass { "pass" } else { "FAIL" };
    match &r.check.coverage {
        Some(c) if c.is_sampled() => format!("{verdict} {}/{} {}", c.checked, c.total, c.unit),
        _ => verdict.to_string(),
    }
}

/// The path column; a row with cooperative matrices off says so first.
fn path_cell(r: &BenchRow) -> String {
    if r.coop_off {
        format!("coop off: {}", r.check.variant)
    } else {
        r.check.variant.clone()
    }
}

const TEXT_HEADER: [&str; 10] = [
    "op", "case", "path", "time us", "GB/s", "TFLOP/s", "tokens/s", "roof", "vs base", "check",
];

fn text_cells(r: &BenchRow) -> Vec<String> {
    let roof = match (r.roof_percent, r.bound) {
        (Some(p), Some(Bound::Memory)) => format!("{p:.0}% mem"),
        (Some(p), Some(Bound::Compute)) => format!("{p:.0}% comp"),
        _ => "-".into(),
    };
    vec![
        r.check.case.op.to_string(),
        r.check.case.name.clone(),
        path_cell(r),
        r.time
            .as_ref()
            .map_or("-".into(), |t| format!("{:.1}", t.median_us)),
        fmt_num(r.gbps),
        fmt_num(r.tflops),
        fmt_num(r.tokens_per_s),
        roof,
        r.speedup.map_or("-".into(), |s| format!("{s:.2}x")),
        check_cell(r),
    ]
}

/// Columns that give way, in this order, when a table is wider than the limit: the path,
/// then the case name. Each keeps at least this many characters.
const SHRINKABLE: [(usize, usize); 2] = [(2, 16), (1, 24)];

/// Cut the cells of the shrinkable columns until `text_table` fits `max` characters.
fn fit(header: &[&str], rows: &mut [Vec<String>], max: usize) {
    let width = |rows: &[Vec<String>], col: usize| {
        rows.iter()
            .map(|r| r[col].chars().count())
            .max()
            .unwrap_or(0)
            .max(header[col].len())
    };
    let total = |rows: &[Vec<String>]| {
        (0..header.len()).map(|c| width(rows, c)).sum::<usize>() + 2 * (header.len() - 1)
    };
    for (col, floor) in SHRINKABLE {
        let over = total(rows).saturating_sub(max);
        if over == 0 {
            return;
        }
        let target = width(rows, col).saturating_sub(over).max(floor);
        for row in rows.iter_mut() {
            row[col] = shorten(&row[col], target);
        }
    }
}

/// The terminal table (at most [`TEXT_WIDTH`] columns), the per-pass split of multi-pass cases,
/// and details: the baselines, each path cut in the table, and the whole error of every failed
/// case (the JSON has everything).
pub fn text(report: &BenchReport) -> String {
    let mut rows: Vec<Vec<String>> = report.cases.iter().map(text_cells).collect();
    fit(&TEXT_HEADER, &mut rows, TEXT_WIDTH);
    let mut s = text_table(&TEXT_HEADER, &rows);
    let split = pass_split_lines(report);
    if !split.is_empty() {
        s += "\ntime per pass (median):\n";
        for line in split {
            s += &wrap(&line, TEXT_WIDTH);
        }
    }
    let mut details = Vec::new();
    for (r, row) in report.cases.iter().zip(&rows) {
        let name = format!("{} {}", r.check.case.op, r.check.case.name);
        if row[2] != path_cell(r) {
            details.push(format!("{name}: path {}", path_cell(r)));
        }
        if let (Some(base), Some(speedup)) = (&r.baseline, r.speedup) {
            details.push(format!("{name}: {speedup:.2}x against {base}"));
        }
        if !r.check.pass {
            details.push(format!("{name}: {}", r.check.summary()));
        }
    }
    if !details.is_empty() {
        s += "\ndetails:\n";
        for line in details {
            s += &wrap(&line, TEXT_WIDTH);
        }
    }
    s
}

/// `text` indented by two spaces and wrapped at spaces to lines of at most `width` characters
/// (continuation lines indented by four; a word longer than a line is cut).
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::from("  ");
    for word in text.split(' ') {
        let used = line.chars().count();
        if used > 4 && used + 1 + word.chars().count() > width {
            out += line.trim_end();
            out.push('\n');
            line = String::from("    ");
        }
        if !line.trim().is_empty() {
            line.push(' ');
        }
        line += &shorten(word, width - 4);
    }
    out += line.trim_end();
    out.push('\n');
    out
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
    pass_splits(&report.to_value())
}

fn pass_splits(report: &Value) -> Vec<String> {
    cases_of(report)
        .iter()
        .filter_map(|r| {
            let passes = r["time"]["passes"].as_array()?;
            (passes.len() > 1).then(|| {
                let steps: Vec<String> = passes
                    .iter()
                    .map(|p| format!("{} {:.1} us", str_of(&p[0]), p[1].as_f64().unwrap_or(0.0)))
                    .collect();
                format!("{}: {}", row_name(r), steps.join(", "))
            })
        })
        .collect()
}

fn md_row(cells: &[String]) -> String {
    let escaped: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
    format!("| {} |\n", escaped.join(" | "))
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn cases_of(report: &Value) -> Vec<Value> {
    report["cases"].as_array().cloned().unwrap_or_default()
}

/// `op name`, with `[coop off]` for the SIMT twin of a tensor-core case: a row's key.
fn row_name(r: &Value) -> String {
    let case = &r["check"]["case"];
    format!(
        "{} {}{}",
        str_of(&case["op"]),
        str_of(&case["name"]),
        if r["coop_off"].as_bool() == Some(true) {
            " [coop off]"
        } else {
            ""
        }
    )
}

const MD_HEADER: [&str; 11] = [
    "op",
    "case",
    "path",
    "time us (min-max)",
    "GB/s",
    "TFLOP/s",
    "tokens/s",
    "roof",
    "vs baseline",
    "checked",
    "max error",
];

fn md_cells(r: &Value) -> Vec<String> {
    let check = &r["check"];
    let time = &r["time"];
    let time = match (
        num(&time["median_us"]),
        num(&time["min_us"]),
        num(&time["max_us"]),
    ) {
        (Some(m), Some(lo), Some(hi)) => format!("{m:.1} ({lo:.1}-{hi:.1})"),
        _ => "-".into(),
    };
    let roof = match (num(&r["roof_percent"]), r["bound"].as_str()) {
        (Some(p), Some(b)) => format!("{p:.0}% of {b}"),
        _ => "-".into(),
    };
    let speedup = match (r["baseline"].as_str(), num(&r["speedup"])) {
        (Some(name), Some(s)) => format!("{s:.2}x {name}"),
        _ => "-".into(),
    };
    let coverage = &check["coverage"];
    let checked = match (coverage["checked"].as_u64(), coverage["total"].as_u64()) {
        (Some(c), Some(t)) if c < t => format!("{c} of {t} {}", str_of(&coverage["unit"])),
        (Some(_), Some(t)) => format!("all {t} {}", str_of(&coverage["unit"])),
        _ => "-".into(),
    };
    let verdict = if check["pass"].as_bool() == Some(true) {
        "pass"
    } else {
        "FAIL"
    };
    let worst = match check["error"].as_str() {
        Some(e) => format!("ERROR: {e}"),
        None => check["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let cmp = &c["comparison"];
                format!(
                    "{} max abs {:.2e} rel {:.2e}",
                    str_of(&c["output"]),
                    num(&cmp["max_abs"]).unwrap_or(f64::NAN),
                    num(&cmp["max_rel"]).unwrap_or(f64::NAN)
                )
            })
            .next()
            .unwrap_or_default(),
    };
    let case = &check["case"];
    let path = if r["coop_off"].as_bool() == Some(true) {
        format!("coop off: {}", str_of(&check["variant"]))
    } else {
        str_of(&check["variant"])
    };
    vec![
        str_of(&case["op"]),
        str_of(&case["name"]),
        path,
        time,
        fmt_num(num(&r["gbps"])),
        fmt_num(num(&r["tflops"])),
        fmt_num(num(&r["tokens_per_s"])),
        roof,
        speedup,
        format!("{verdict}, {checked}"),
        worst,
    ]
}

/// One device's section of docs/PERFORMANCE.md from a report's JSON (fresh, or saved by
/// `--json`): the device, driver, date and command, the probes, the case table and the per-pass
/// split.
pub fn markdown(report: &Value) -> String {
    let env = &report["environment"];
    let a = &env["adapter"];
    let mut s = format!(
        "### {} ({}, {})\n\nDriver {} {}; fusedops {}; {} UTC; suite wall time {}; command `{}`\n\n",
        str_of(&a["name"]),
        str_of(&a["backend"]),
        str_of(&a["device_type"]),
        str_of(&a["driver"]),
        str_of(&a["driver_info"]),
        str_of(&env["fusedops_version"]),
        str_of(&env["date_utc"]),
        num(&report["wall_seconds"]).map_or("-".into(), |w| format!("{w:.1} s")),
        str_of(&report["command"])
    );
    if str_of(&a["device_type"]) == "Cpu" {
        s += "A CPU driver: correctness only. The suite runs at CPU size and these timings say \
              nothing about GPU speed.\n\n";
    }
    s += "| probe | value | size | clock | verified |\n|---|---|---|---|---|\n";
    if let Some(probes) = report["roofline"].as_object() {
        for p in probes.values().filter(|p| p.is_object()) {
            s += &md_row(&[
                str_of(&p["name"]),
                format!(
                    "{} {}",
                    significant(num(&p["value"]).unwrap_or(0.0)),
                    str_of(&p["unit"])
                ),
                str_of(&p["size"]),
                str_of(&p["clock"]),
                if p["verified"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "NO"
                }
                .to_string(),
            ]);
        }
    }
    s.push('\n');
    s += &md_row(&MD_HEADER.map(String::from));
    s += &format!("|{}\n", "---|".repeat(MD_HEADER.len()));
    for r in cases_of(report) {
        s += &md_row(&md_cells(&r));
    }
    let split = pass_splits(report);
    if !split.is_empty() {
        s += "\nTime per compute pass (median):\n\n";
        for line in split {
            s += &format!("- {line}\n");
        }
    }
    s
}

/// Per case of `new`, its median time against the same case in `old` (matched by operator, name
/// and coop-off): `new / old` below 1 is faster.
pub fn compare(new: &Value, old: &Value) -> String {
    let median = |r: &Value| num(&r["time"]["median_us"]);
    let old_times: std::collections::HashMap<String, Option<f64>> = cases_of(old)
        .iter()
        .map(|r| (row_name(r), median(r)))
        .collect();
    let mut rows: Vec<Vec<String>> = cases_of(new)
        .iter()
        .map(|r| {
            let name = row_name(r);
            let now = median(r);
            let before = old_times.get(&name).copied().flatten();
            let ratio = match (now, before) {
                (Some(n), Some(b)) if b > 0.0 => format!("{:.2}x", n / b),
                _ if !old_times.contains_key(&name) => "new case".into(),
                _ => "-".into(),
            };
            vec![
                name,
                before.map_or("-".into(), |b| format!("{b:.1}")),
                now.map_or("-".into(), |n| format!("{n:.1}")),
                ratio,
            ]
        })
        .collect();
    let header = ["case", "old us", "new us", "new/old"];
    fit_first(&header, &mut rows, TEXT_WIDTH);
    format!(
        "\ncompared with {} ({}):\n{}",
        str_of(&old["environment"]["date_utc"]),
        str_of(&old["environment"]["adapter"]["name"]),
        text_table(&header, &rows)
    )
}

/// Cut the first column until the table fits `max` characters.
fn fit_first(header: &[&str], rows: &mut [Vec<String>], max: usize) {
    let others: usize = (1..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
                .max(header[c].len())
                + 2
        })
        .sum();
    for row in rows.iter_mut() {
        row[0] = shorten(&row[0], max.saturating_sub(others).max(16));
    }
}

/// One case of `fusedops bench --host-only`.
pub fn host_line(row: &HostRow) -> String {
    let coverage = row.coverage.as_ref().map_or("-".into(), |c| c.to_string());
    let rss = row
        .peak_rss_bytes
        .map_or("-".into(), |b| format!("{:.2} GB", b as f64 / 1e9));
    let line = format!(
        "{:>8.2} s  peak {:>9}  {:<24} {} {}",
        row.seconds, rss, coverage, row.case.op, row.case.name
    );
    match &row.error {
        Some(e) => format!("{line}\n  ERROR: {e}"),
        None => line,
    }
}

/// The totals of a host-only run.
pub fn host_summary(rows: &[HostRow], total: f64, threads: usize) -> String {
    let peak = rows.iter().filter_map(|r| r.peak_rss_bytes).max();
    format!(
        "total {total:.1} s on {threads} threads; largest per-case peak {}\n",
        peak.map_or("-".into(), |b| format!("{:.2} GB", b as f64 / 1e9))
    )
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
