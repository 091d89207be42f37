//! Whole-model methods (`methods::WHOLE_MODEL`: re-basin, MergeMany), prepared before the
//! streamed pass: their permutations come from whole models (weight matching reads `a` and
//! `ref`, MergeMany every model; a node input is merged once to a temporary file beside the
//! output, which the streamed pass then reads instead of computing the node again), and each
//! such node then permutes its inputs key by key (and averages them, for MergeMany).

use super::stages::{materialise, Materialised};
use super::*;
use crate::layout::perms::perm_groups;
use crate::rebasin::driver::walk_permutations;
use crate::rebasin::merge_many::merge_many;
use crate::rebasin::{weight_matching, Permutations};
use crate::recipe::graph::ModelInput;
use std::sync::Arc;

/// The graph the streamed pass runs, with what its whole-model nodes need.
pub(super) struct Prepared {
    /// The graph: a re-basin node reads its materialised input as a model and no longer its
    /// reference (used up by the matching).
    pub(super) graph: Graph,
    /// The options: the recipe recorded is the original graph's.
    pub(super) opts: MergeOptions,
    /// Per prepared node, its permutations.
    pub(super) perms: BTreeMap<usize, Vec<Arc<Permutations>>>,
    /// What the preparation found, for the report.
    pub(super) notes: Vec<String>,
    /// Temporary files the graph reads; removed when this is dropped.
    _temps: Vec<Materialised>,
}

/// The shapes of the keys of a model file.
fn shapes(m: &ModelFile) -> BTreeMap<String, Vec<usize>> {
    m.tensors()
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect()
}

/// Whether `graph` has no whole-model node (its presets expanded): the streamed pass alone
/// computes it.
pub(super) fn is_streamed(graph: &Graph) -> bool {
    let g = crate::methods::rebasin::expand_presets(graph);
    !g.nodes
        .iter()
        .any(|n| methods::is_whole_model(n.method) || super::ranges::needs_range(n))
}

/// Prepares the whole-model nodes of `graph` (none: the graph as it is).
pub(super) fn prepare(
    graph: &Graph,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<Prepared> {
    // Presets (`fermat`) become their recipes; the recipe recorded is the one given.
    let original = graph;
    let expanded = crate::methods::rebasin::expand_presets(graph);
    // Model-wide ranges (supermerger's cosine modes) become their nodes' parameters.
    let (expanded, range_notes) = super::ranges::with_ranges(&expanded, opts, progress)?;
    let graph = &expanded;
    let mut out = Prepared {
        graph: graph.clone(),
        opts: opts.clone(),
        perms: BTreeMap::new(),
        notes: range_notes,
        _temps: Vec::new(),
    };
    let whole: Vec<usize> = (0..graph.nodes.len())
        .filter(|&n| methods::is_whole_model(graph.nodes[n].method))
        .collect();
    if whole.is_empty() {
        return Ok(out);
    }
    if !out.opts.metadata.contains_key("amalgam_recipe") {
        let settings = crate::recipe::RecipeSettings::of(opts);
        out.opts.metadata.insert(
            "amalgam_recipe".into(),
            crate::recipe::to_toml(original, &settings),
        );
    }
    if !out.opts.metadata.contains_key("mecha_recipe") {
        // sd-mecha's form of the recipe given (the prepared graph has none).
        let layouts: Vec<Option<Layout>> = original
            .models
            .iter()
            .map(|m| {
                ModelFile::open(&m.path)
                    .ok()
                    .and_then(|f| f.detected_layout())
            })
            .collect();
        let arch = layouts.iter().flatten().next().map(|l| l.arch());
        if let Some(text) = crate::recipe::mecha::to_mecha(original, &layouts, arch, opts.seed) {
            out.opts.metadata.insert("mecha_recipe".into(), text);
        }
    }
    for n in whole {
        let node = &graph.nodes[n];
        let at = |e: String| Error::Invalid(format!("node `{}` ({}): {e}", node.name, node.method));
        // Every input whole, as files (node inputs merged once). A node merged for one input is
        // read from its file by the next ones (215c's `amp` is built on `x`).
        let mut work = graph.clone();
        let mut inputs: Vec<Materialised> = Vec::new();
        for r in node.flat_args() {
            let m = materialise(&work, r, opts, progress)?;
            if let (Ref::Node(done), Some(merged)) = (r, &m.report) {
                let read: Vec<&str> = merged.models.iter().map(|(n, _)| n.as_str()).collect();
                out.notes.push(format!(
                    "node `{}` merged once to a temporary f32 file of {} (from {})",
                    graph.nodes[done].name,
                    crate::size::format_bytes(merged.bytes_written),
                    read.join(", ")
                ));
                work.models.push(ModelInput {
                    name: format!("{} (merged)", graph.nodes[done].name),
                    path: m.path.clone(),
                });
                let file = Ref::Model(work.models.len() - 1);
                for other in &mut work.nodes {
                    for slot in &mut other.slots {
                        slot.iter_mut().filter(|x| **x == r).for_each(|x| *x = file);
                    }
                }
            }
            inputs.push(m);
        }
        let files: Vec<ModelFile> = inputs
            .iter()
            .map(|m| ModelFile::open(&m.path))
            .collect::<Result<_>>()?;
        let layout = files[0]
            .detected_layout()
            .ok_or_else(|| at("re-basin needs SD1 (ldm) or SDXL (sgm) checkpoints".into()))?;
        let first = shapes(&files[0]);
        let groups =
            perm_groups(layout, |k| first.get(k).cloned()).map_err(|e| at(e.to_string()))?;
        let count = groups.len();
        // The permutations, and how many inputs the streamed pass still reads.
        let (perms, keep): (Vec<Permutations>, usize) = match node.method {
            "randperm" => {
                out.notes.push(format!(
                    "node `{}` (randperm): {count} groups permuted at random (seed {})",
                    node.name, opts.seed
                ));
                (vec![Permutations::random(groups, opts.seed)], 1)
            }
            "rebasin" => {
                let m = weight_matching(&files[0], &files[1], groups, opts.threads, progress)
                    .map_err(|e| at(e.to_string()))?;
                out.notes.push(format!(
                    "node `{}` (rebasin): {} of {count} groups permuted; agreement with the reference {:.6e} -> {:.6e}",
                    node.name,
                    m.permutations.changed(),
                    m.before,
                    m.after
                ));
                (vec![m.permutations], 1)
            }
            "rebasin_merge" | "basin_sum" => {
                let mut params = crate::method::Params::new(node.method, node.params.clone())
                    .bind(methods::info(node.method)?, &node.counts());
                let alpha = params.number("alpha")?;
                let iterations = params.count("iterations")?;
                params.finish()?;
                let steps = walk_permutations(
                    &files[0],
                    &files[1],
                    groups,
                    alpha,
                    iterations,
                    opts.threads,
                    progress,
                )
                .map_err(|e| at(e.to_string()))?;
                let changed: Vec<String> = steps.iter().map(|p| p.changed().to_string()).collect();
                out.notes.push(format!(
                    "node `{}` ({}): {iterations} steps to alpha {alpha}; groups permuted per step: {}",
                    node.name,
                    node.method,
                    changed.join(", ")
                ));
                (steps, 2)
            }
            _ => {
                let mut params = crate::method::Params::new(node.method, node.params.clone())
                    .bind(methods::info(node.method)?, &node.counts());
                let max_rounds = params.count("max_rounds")?;
                params.finish()?;
                let refs: Vec<&ModelFile> = files.iter().collect();
                let m = merge_many(&refs, groups, max_rounds, opts.threads, progress)
                    .map_err(|e| at(e.to_string()))?;
                let changed: usize = m.permutations.iter().map(Permutations::changed).sum();
                out.notes.push(format!(
                    "node `{}` (merge_many): {changed} group permutations of {} models changed in at most {} rounds; agreement with the others' mean {:.6e} -> {:.6e}",
                    node.name,
                    files.len(),
                    m.rounds,
                    m.before,
                    m.after
                ));
                let n = m.permutations.len();
                (m.permutations, n)
            }
        };
        // The streamed pass reads the permuted inputs only (a re-basin reference is used up),
        // node inputs from their merged files.
        let mut slot_refs = Vec::new();
        for (i, m) in inputs.into_iter().enumerate().take(keep) {
            if m.report.is_some() {
                let r = node.flat_args()[i];
                out.graph.models.push(ModelInput {
                    name: format!("{} (node `{}`, merged)", node.name, graph_name(graph, r)),
                    path: m.path.clone(),
                });
                slot_refs.push(Ref::Model(out.graph.models.len() - 1));
                out._temps.push(m);
            } else {
                slot_refs.push(node.flat_args()[i]);
            }
        }
        let slots = &mut out.graph.nodes[n].slots;
        let mut refs = slot_refs.into_iter();
        for slot in slots.iter_mut() {
            let len = slot.len();
            *slot = refs.by_ref().take(len).collect();
        }
        out.perms
            .insert(n, perms.into_iter().map(Arc::new).collect());
    }
    Ok(out)
}

/// The recipe name of `r`.
fn graph_name(graph: &Graph, r: Ref) -> &str {
    match r {
        Ref::Model(m) => &graph.models[m].name,
        Ref::Node(n) => &graph.nodes[n].name,
    }
}
