//! The streaming merge engine.
//!
//! 1. **Plan** (headers only): open every input, take the union of their keys, check shapes, and
//!    resolve for each key the expression that computes it: which node applies to which inputs,
//!    with the inputs lacking the key left out or the key taken from a fallback model (the key
//!    policy, see [`KeyAction`]). Every error here comes before any tensor is read.
//! 2. **Statistics** (only for methods that declare passes): per key, every fixed-size block
//!    ([`BLOCK`], rounded up to whole units when a method declares a unit) is fed to the method
//!    and the per-block results are folded in block order.
//! 3. **Whole-model methods** ([`prepare`]): re-basin's permutations are found from whole
//!    models first (a node input merged once to a temporary file, which the pass then reads);
//!    model-wide ranges ([`ranges`]: supermerger's cosine modes) are read from whole models the
//!    same way and become their nodes' parameters.
//! 4. **Output stages** ([`stages`]): a recipe whose output node writes another kind of file (a
//!    LoRA) merges the node's inputs to temporary files first, then runs the stage on them.
//! 5. **Execute**: keys in name order are cut into tasks (a run of elements whose encoded output
//!    fits one buffer) and tasks into sub-chunks whose buffers, one per input and per node, fit in
//!    the CPU cache; both sizes follow from the memory budget, the number of inputs and the thread
//!    count, so memory does not grow with the number of models or the size of a tensor. Tasks run
//!    in parallel; each reads its inputs with positioned reads into reused buffers, evaluates the
//!    node expression, encodes the output dtype and writes the result at its fixed offset in the
//!    output. Per element the summation order over models is fixed by the methods, so the bytes
//!    do not depend on threads, task or sub-chunk size.

mod cache;
mod exec;
mod expr;
mod inputs;
mod keys;
mod out_view;
mod outputs;
mod plan;
mod prepare;
mod ranges;
mod schedule;
mod stages;
#[cfg(test)]
mod tests;
mod views;

use cache::*;
use exec::*;
use expr::*;
use inputs::*;
use keys::*;
use out_view::*;
use outputs::*;
use plan::*;
use schedule::*;
use views::*;

use crate::error::{Error, Result};
use crate::io::dtype::{dtype_name, FloatDtype};
use crate::io::input::ModelFile;
use crate::io::non_finite::{InputNonFinite, NonFinite};
use crate::io::output::{OutputFile, OutputTensor};
use crate::layout::arch::Layout;
use crate::method::{
    ErasedPass, KeyCtx, KeyMerge, KeyMergePoints, Method, OnMissing, Params, Passes,
};
use crate::methods;
use crate::real::{ComputeDtype, Real};
use crate::recipe::graph::{Graph, Ref};
use crate::report::{KeyAction, MergeReport, TakenBecause};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

pub use crate::options::{MergeOptions, NoProgress, Progress, BLOCK};
pub use outputs::OutputPoint;

/// Merges the graph's inputs into `opts.output`.
///
/// Model paths are made absolute (links resolved) first, so that the recipe embedded in the
/// output, and so the output's bytes, do not depend on the folder the merge was started from or
/// on the links it was given.
pub fn merge(graph: &Graph, opts: &MergeOptions, progress: &dyn Progress) -> Result<MergeReport> {
    graph.validate()?;
    if let Some(n) = graph.output_stage() {
        return stages::run_stage(&canonical_paths(graph), n, opts, progress);
    }
    let point = OutputPoint {
        graph: graph.clone(),
        opts: opts.clone(),
    };
    let mut reports = merge_outputs(std::slice::from_ref(&point), progress)?;
    Ok(reports.remove(0))
}

/// Writes several outputs from one read of their inputs: each point's graph into its own file
/// (a parameter sweep, say). The points must read the same models with the same options but
/// for the output file, the seed and the metadata (see [`OutputPoint`]). Each key's inputs are
/// read once for all the outputs when they fit half the memory budget; a key that does not fit
/// is read once per output and named in the reports. Each output's bytes are those of its graph
/// merged alone. Returns a report per point.
pub fn merge_outputs(points: &[OutputPoint], progress: &dyn Progress) -> Result<Vec<MergeReport>> {
    check_points(points)?;
    let several = points.len() > 1;
    let mut outputs = Vec::new();
    for p in points {
        p.graph.validate()?;
        if several && (p.graph.output_stage().is_some() || !prepare::is_streamed(&p.graph)) {
            return Err(Error::Invalid(
                "not implemented: several outputs from one read of recipes with whole-model \
                 nodes (re-basin, exchange_ema, balance_attention), model-wide ranges (cosine_a/b without sim_min, sim_max) or \
                 an output stage (extract_lora); run each point alone"
                    .into(),
            ));
        }
        outputs.push(p.opts.output.as_path());
        outputs.extend(p.opts.report_json.as_deref());
    }
    let graph = &points[0].graph;
    let input_paths: Vec<&Path> = graph.models.iter().map(|m| m.path.as_path()).collect();
    crate::io::dest::check_outputs(&outputs, &input_paths, points[0].opts.overwrite)?;
    let mut points: Vec<OutputPoint> = points
        .iter()
        .map(|p| OutputPoint {
            graph: canonical_paths(&p.graph),
            opts: p.opts.clone(),
        })
        .collect();
    // Several points have no whole-model node (refused above): nothing to prepare.
    let prepared = prepare::prepare(&points[0].graph, &points[0].opts, progress)?;
    points[0] = OutputPoint {
        graph: prepared.graph.clone(),
        opts: prepared.opts.clone(),
    };
    let (graph, opts) = (&points[0].graph, &points[0].opts);
    let (models, rows, layouts, mut notes) = open_inputs(graph, &opts.output, &prepared.exchanged)?;
    notes.extend(prepared.notes.iter().cloned());
    let layout = graph_layout(graph, &layouts)?;
    let pool = thread_pool(opts.threads)?;
    let inputs = RunInputs {
        models: &models,
        rows: &rows,
        layouts: &layouts,
        layout,
        notes: &notes,
        prepared: &prepared.nodes,
    };
    let reports = pool.install(|| match opts.compute_dtype {
        ComputeDtype::F32 => run::<f32>(&points, &inputs, progress),
        ComputeDtype::F64 => run::<f64>(&points, &inputs, progress),
    })?;
    for (report, p) in reports.iter().zip(&points) {
        write_report_json(report, &p.opts, &input_paths)?;
    }
    Ok(reports)
}

/// Writes `report` as JSON to `opts.report_json`, when asked (by the rules of every output).
fn write_report_json(report: &MergeReport, opts: &MergeOptions, inputs: &[&Path]) -> Result<()> {
    if let Some(path) = &opts.report_json {
        let json = serde_json::to_string_pretty(report).map_err(|e| Error::Output {
            path: path.clone(),
            message: format!("cannot encode the report: {e}"),
        })?;
        crate::io::dest::write_atomic(path, json.as_bytes(), inputs, opts.overwrite)?;
    }
    Ok(())
}

/// A pool of `threads` workers (0: one per core).
pub(crate) fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start worker threads: {e}")))
}

/// `graph` with every model path that exists made canonical (the others are kept, for the error
/// that names them).
fn canonical_paths(graph: &Graph) -> Graph {
    let mut g = graph.clone();
    for m in &mut g.models {
        if let Ok(p) = std::fs::canonicalize(&m.path) {
            m.path = p;
        }
    }
    g
}
