//! Writing a [`Comparison`]: `compare.json`, CSV tables, charts and `report.html` in one folder,
//! and the short table the terminal prints.

use super::compare::{Comparison, NamedStats};
use super::stats::{GroupStats, ModelStats};
use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Writes the comparison into `dir` (made if missing): `compare.json`, `models.csv`,
/// `blocks.csv`, `keys.csv`, `pairwise_l2.csv`, `pairwise_cos.csv`, the charts (SVG and PNG,
/// [`super::write_charts`]) and `report.html` ([`super::write_html`]). A folder holding files
/// is refused unless `overwrite` (then the files of the same names are replaced, others kept).
/// Returns the files written.
pub fn write_report(c: &Comparison, dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    prepare_dir(dir, overwrite)?;
    let json = serde_json::to_string_pretty(c).map_err(|e| Error::Output {
        path: dir.join("compare.json"),
        message: format!("cannot encode: {e}"),
    })?;
    let inputs: Vec<&Path> = c
        .models
        .iter()
        .chain(&c.base)
        .map(|m| m.path.as_path())
        .collect();
    let files = [
        ("compare.json", json),
        ("models.csv", models_csv(c)),
        ("blocks.csv", groups_csv(c, "block", &c.blocks)),
        ("keys.csv", keys_csv(c)),
        ("pairwise_l2.csv", pairwise_csv(c, |s| &s.l2)),
        ("pairwise_cos.csv", pairwise_csv(c, |s| &s.cos)),
    ];
    let mut written = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        crate::io::dest::write_atomic(&path, text.as_bytes(), &inputs, true)?;
        written.push(path);
    }
    let charts = super::write_charts(c, dir)?;
    for chart in &charts {
        written.extend([chart.svg.clone(), chart.png.clone()]);
    }
    written.push(super::write_html(c, &charts, dir)?);
    Ok(written)
}

/// Makes `dir`, or checks that it is empty (or `overwrite`).
fn prepare_dir(dir: &Path, overwrite: bool) -> Result<()> {
    let refuse = |message: String| Error::Output {
        path: dir.to_path_buf(),
        message,
    };
    if dir.exists() {
        if !dir.is_dir() {
            return Err(refuse("is not a folder".into()));
        }
        let mut entries =
            std::fs::read_dir(dir).map_err(|e| refuse(format!("cannot list it: {e}")))?;
        if !overwrite && entries.next().is_some() {
            return Err(refuse(
                "holds files already; pick an empty or new folder, or --overwrite to replace \
                 the report's files there"
                    .into(),
            ));
        }
        Ok(())
    } else {
        std::fs::create_dir_all(dir).map_err(|e| refuse(format!("cannot make it: {e}")))
    }
}

/// A CSV field: quoted when it holds a comma, a quote or a line break.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A number as CSV writes it: empty for none or NaN.
fn num(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x}"),
        _ => String::new(),
    }
}

const STATS_HEADER: &str = "dist_base,cos_base,dist_mean,cos_mean";

fn stats_fields(s: &ModelStats) -> String {
    format!(
        "{},{},{},{}",
        num(s.dist_base),
        num(s.cos_base),
        num(Some(s.dist_mean)),
        num(Some(s.cos_mean))
    )
}

/// One row per (group, model) of `groups`, `kind` naming the grouping.
fn group_rows(out: &mut String, c: &Comparison, kind: &str, groups: &[NamedStats]) {
    for g in groups {
        for (m, s) in c.models.iter().zip(&g.stats.models) {
            let _ = writeln!(
                out,
                "{kind},{},{},{}",
                field(&g.name),
                field(&m.name),
                stats_fields(s)
            );
        }
    }
}

/// The whole model and each component, per model.
fn models_csv(c: &Comparison) -> String {
    let mut out = format!("group_kind,group,model,{STATS_HEADER}\n");
    let total = [NamedStats {
        name: "all".into(),
        stats: c.total.clone(),
    }];
    group_rows(&mut out, c, "total", &total);
    group_rows(&mut out, c, "component", &c.components);
    out
}

fn groups_csv(c: &Comparison, kind: &str, groups: &[NamedStats]) -> String {
    let mut out = format!("group_kind,group,model,{STATS_HEADER}\n");
    group_rows(&mut out, c, kind, groups);
    out
}

fn keys_csv(c: &Comparison) -> String {
    let mut out = format!("key,component,block,elements,model,{STATS_HEADER}\n");
    for k in &c.keys {
        for (m, s) in c.models.iter().zip(&k.models) {
            let Some(s) = s else { continue };
            let _ = writeln!(
                out,
                "{},{},{},{},{},{}",
                field(&k.key),
                field(&k.component),
                field(&k.block),
                k.elements,
                field(&m.name),
                stats_fields(s)
            );
        }
    }
    out
}

/// The N × N matrix of the whole model, and below it each component's, each headed by a row
/// `group,<model names>`.
fn pairwise_csv(c: &Comparison, pick: fn(&GroupStats) -> &Vec<Vec<f64>>) -> String {
    let names: Vec<String> = c.models.iter().map(|m| field(&m.name)).collect();
    let mut out = String::new();
    let groups = std::iter::once(("all", &c.total))
        .chain(c.components.iter().map(|g| (g.name.as_str(), &g.stats)));
    for (name, stats) in groups {
        let _ = writeln!(out, "{},{}", field(name), names.join(","));
        for (m, row) in names.iter().zip(pick(stats)) {
            let cells: Vec<String> = row.iter().map(|&v| num(Some(v))).collect();
            let _ = writeln!(out, "{m},{}", cells.join(","));
        }
    }
    out
}

/// The terminal's summary: per model, the whole model's figures and the outliers flagged.
pub fn summary_table(c: &Comparison) -> String {
    let width = c
        .models
        .iter()
        .map(|m| m.name.chars().count())
        .max()
        .unwrap_or(5)
        .clamp(5, 40);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>12} {:>9} {:>12} {:>9}",
        "model", "L2 to base", "cos base", "L2 to mean", "cos mean"
    );
    let f = |v: Option<f64>, prec: usize| match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => "-".to_string(),
    };
    for (m, s) in c.models.iter().zip(&c.total.models) {
        let flag = if c.outliers.iter().any(|o| o.model == m.name) {
            "  OUTLIER"
        } else {
            ""
        };
        let name: String = if m.name.chars().count() > width {
            m.name.chars().take(width - 1).chain(['…']).collect()
        } else {
            m.name.clone()
        };
        let _ = writeln!(
            out,
            "{name:<width$}  {:>12} {:>9} {:>12} {:>9}{flag}",
            f(s.dist_base, 4),
            f(s.cos_base, 6),
            f(Some(s.dist_mean), 4),
            f(Some(s.cos_mean), 4),
        );
    }
    for o in &c.outliers {
        let _ = writeln!(
            out,
            "outlier: {} ({} {:.4} > {:.4})",
            o.model, o.measure, o.value, o.threshold
        );
    }
    out
}
