//! Running a parameter sweep: every point of a [`Sweep`] written from one read of the inputs
//! ([`crate::merge_outputs`]), each output embedding its own exact recipe, and the sweep table
//! that lists them, optionally with how far apart they are ([`crate::analysis::compare`]).

use crate::analysis::{self, CompareOptions};
use crate::engine::{merge_outputs, OutputPoint};
use crate::error::{Error, Result};
use crate::options::{MergeOptions, Progress};
use crate::recipe::graph::Graph;
use crate::recipe::sweep::{Combine, Sweep};
use crate::report::MergeReport;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One output of a sweep, as the table lists it.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    /// The point's number.
    pub index: usize,
    /// `parameter → value` as written.
    pub values: Vec<(String, String)>,
    /// The file written.
    pub output: PathBuf,
    /// Its L2 distance to the base (with `compare` and a base).
    pub dist_base: Option<f64>,
    /// Its L2 distance to the mean of the sweep's outputs (with `compare`).
    pub dist_mean: Option<f64>,
    /// Its L2 distance to each output, in point order (with `compare`).
    pub dist_outputs: Option<Vec<f64>>,
}

/// What a sweep wrote (written as JSON, printed as a table).
#[derive(Clone, Debug, Serialize)]
pub struct SweepTable {
    /// How the axes combined.
    pub combine: Combine,
    /// The swept parameters.
    pub parameters: Vec<String>,
    /// One row per output.
    pub rows: Vec<SweepRow>,
    /// The base the outputs were compared to.
    pub base: Option<PathBuf>,
    /// Bytes of the inputs, and bytes the sweep read.
    pub input_bytes: u64,
    /// Bytes actually read for all the outputs.
    pub bytes_read: u64,
    /// Wall time of the merge.
    pub seconds: f64,
}

/// Writes every point of `sweep` over `graph`, to `template` with each point's values put in
/// (see [`Sweep::points`]), from one read of the inputs; with `compare_base`
/// (`Some(None)`: compare without a base), compares the outputs afterwards. `opts` are the
/// options of every point (its `output` is replaced).
pub fn run_sweep(
    graph: &Graph,
    sweep: &Sweep,
    template: &str,
    opts: &MergeOptions,
    compare_base: Option<Option<&Path>>,
    progress: &dyn Progress,
) -> Result<(SweepTable, Vec<MergeReport>)> {
    if opts.report_json.is_some() {
        return Err(Error::Invalid(
            "a sweep writes its own table (sweep.json); a per-point report JSON is not \
             available"
                .into(),
        ));
    }
    let points = sweep.points(graph, template)?;
    let outputs: Vec<OutputPoint> = points
        .iter()
        .map(|p| {
            let mut o = opts.clone();
            o.output = p.output.clone();
            OutputPoint {
                graph: p.graph.clone(),
                opts: o,
            }
        })
        .collect();
    let reports = merge_outputs(&outputs, progress)?;
    let mut rows: Vec<SweepRow> = points
        .iter()
        .map(|p| SweepRow {
            index: p.index,
            values: p.values.clone(),
            output: p.output.clone(),
            dist_base: None,
            dist_mean: None,
            dist_outputs: None,
        })
        .collect();
    let mut base = None;
    if let Some(b) = compare_base {
        let files: Vec<PathBuf> = points.iter().map(|p| p.output.clone()).collect();
        if files.len() >= 2 || b.is_some() {
            let c = analysis::compare(&files, b, &CompareOptions::default(), progress)?;
            for (row, (m, l2)) in rows.iter_mut().zip(c.total.models.iter().zip(&c.total.l2)) {
                row.dist_base = m.dist_base;
                row.dist_mean = Some(m.dist_mean);
                row.dist_outputs = Some(l2.clone());
            }
            base = b.map(Path::to_path_buf);
        }
    }
    let table = SweepTable {
        combine: sweep.combine,
        parameters: sweep.axes.iter().map(|a| a.target.clone()).collect(),
        rows,
        base,
        input_bytes: reports.first().map_or(0, |r| r.input_bytes),
        bytes_read: reports.first().map_or(0, |r| r.bytes_read),
        seconds: reports.first().map_or(0.0, |r| r.elapsed.as_secs_f64()),
    };
    Ok((table, reports))
}

impl SweepTable {
    /// The table as the terminal prints it: one line per output.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut header: Vec<String> = vec!["#".into()];
        header.extend(self.parameters.iter().cloned());
        let compared = self.rows.iter().any(|r| r.dist_mean.is_some());
        if compared {
            header.extend(["L2 to base".into(), "L2 to mean".into()]);
        }
        header.push("output".into());
        let mut lines = vec![header];
        for r in &self.rows {
            let mut line = vec![r.index.to_string()];
            line.extend(r.values.iter().map(|(_, v)| v.clone()));
            if compared {
                let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.4}"));
                line.extend([f(r.dist_base), f(r.dist_mean)]);
            }
            line.push(r.output.display().to_string());
            lines.push(line);
        }
        let cols = lines[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                lines
                    .iter()
                    .map(|l| l[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for l in &lines {
            let cells: Vec<String> = l
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| {
                    if i + 1 == cols {
                        c.clone()
                    } else {
                        format!("{c:<w$}")
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  "));
        }
        let _ = writeln!(
            out,
            "{} outputs from one read: read {} of {} input bytes in {:.1} s",
            self.rows.len(),
            crate::size::format_bytes(self.bytes_read),
            crate::size::format_bytes(self.input_bytes),
            self.seconds
        );
        out
    }
}
