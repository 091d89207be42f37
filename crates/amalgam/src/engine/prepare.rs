//! Whole-model methods (`methods::WHOLE_MODEL`), prepared before the streamed pass from whole
//! inputs (a node input is merged once to a temporary file beside the output, which the
//! streamed pass then reads instead of computing the node again):
//!
//! - re-basin and MergeMany: their permutations come from whole models (weight matching reads
//!   `a` and `ref`, MergeMany every model), and each such node then permutes its inputs key by
//!   key (and averages them, for MergeMany);
//! - `exchange_ema`: the node becomes its input read under exchanged key names;
//! - `balance_attention`: the node reads its input's attention layers from the file.

use super::stages::{materialise, Materialised};
use super::*;
use crate::layout::perms::perm_groups;
use crate::methods::structural::balance_attention::Balancer;
use crate::methods::PreparedNode;
use crate::rebasin::driver::walk_permutations;
use crate::rebasin::merge_many::merge_many;
use crate::rebasin::{weight_matching, Permutations};
use crate::recipe::graph::ModelInput;
use std::collections::BTreeSet;
use std::sync::Arc;

/// The graph the streamed pass runs, with what its whole-model nodes need.
pub(super) struct Prepared {
    /// The graph: a re-basin node reads its materialised input as a model and no longer its
    /// reference (used up by the matching).
    pub(super) graph: Graph,
    /// The options: the recipe recorded is the original graph's.
    pub(super) opts: MergeOptions,
    /// Per prepared node, what it was prepared with.
    pub(super) nodes: BTreeMap<usize, PreparedNode>,
    /// The models read with their weights and EMA copies exchanged (`exchange_ema`).
    pub(super) exchanged: BTreeSet<usize>,
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
        nodes: BTreeMap::new(),
        exchanged: BTreeSet::new(),
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
    exchange_ema(&mut out, opts, progress)?;
    let graph = &out.graph.clone();
    let whole: Vec<usize> = (0..graph.nodes.len())
        .filter(|&n| methods::is_whole_model(graph.nodes[n].method))
        .collect();
    for n in whole {
        let node = &graph.nodes[n];
        let at = |e: String| Error::Invalid(format!("node `{}` ({}): {e}", node.name, node.method));
        if let Some(m) = node.flat_args().iter().find_map(|r| match r {
            Ref::Model(m) if out.exchanged.contains(m) => Some(*m),
            _ => None,
        }) {
            return Err(at(format!(
                "not implemented: `{}` (an exchange_ema result) as the input of a whole-model \
                 node; merge it to a file first and give that file",
                graph.models[m].name
            )));
        }
        let inputs = whole_inputs(graph, node, opts, progress, &mut out.notes)?;
        let files: Vec<ModelFile> = inputs
            .iter()
            .map(|m| ModelFile::open(&m.path))
            .collect::<Result<_>>()?;
        if node.method == crate::methods::structural::balance_attention::INFO.name {
            let file = files.into_iter().next().expect("one input");
            let params = Params::new(node.method, node.params.clone());
            let balancer = Balancer::new(file, params).map_err(|e| at(e.to_string()))?;
            out.notes.push(format!(
                "node `{}` (balance_attention): {} attention layers",
                node.name,
                balancer.layer_count()
            ));
            read_inputs(&mut out, graph, n, inputs, 1);
            out.nodes
                .insert(n, PreparedNode::Balance(Arc::new(balancer)));
            continue;
        }
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
        read_inputs(&mut out, graph, n, inputs, keep);
        out.nodes.insert(
            n,
            PreparedNode::Permutations(perms.into_iter().map(Arc::new).collect()),
        );
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

/// Every input of whole-model node `node` as a file: node inputs merged once (a node merged for
/// one input is read from its file by the next ones: 215c's `amp` is built on `x`).
fn whole_inputs(
    graph: &Graph,
    node: &crate::recipe::graph::Node,
    opts: &MergeOptions,
    progress: &dyn Progress,
    notes: &mut Vec<String>,
) -> Result<Vec<Materialised>> {
    let mut work = graph.clone();
    let mut inputs: Vec<Materialised> = Vec::new();
    for r in node.flat_args() {
        let m = materialise(&work, r, opts, progress)?;
        if let (Ref::Node(done), Some(merged)) = (r, &m.report) {
            let read: Vec<&str> = merged.models.iter().map(|(n, _)| n.as_str()).collect();
            notes.push(format!(
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
    Ok(inputs)
}

/// Node `n` of `graph` reads the first `keep` of its `inputs` in the streamed pass: a node
/// input from its merged file (kept until the run ends), a model as it is.
fn read_inputs(
    out: &mut Prepared,
    graph: &Graph,
    n: usize,
    inputs: Vec<Materialised>,
    keep: usize,
) {
    let node = &graph.nodes[n];
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
}

/// Every `exchange_ema` node of `out.graph` replaced by its input read under exchanged names: a
/// model input is read again as a new input (no copy), a node input is merged once to a
/// temporary file first.
fn exchange_ema(out: &mut Prepared, opts: &MergeOptions, progress: &dyn Progress) -> Result<()> {
    let name = crate::methods::structural::exchange_ema::INFO.name;
    while let Some(n) = out.graph.nodes.iter().position(|x| x.method == name) {
        let graph = out.graph.clone();
        let node = &graph.nodes[n];
        let r = node.flat_args()[0];
        let m = materialise(&graph, r, opts, progress)?;
        let source = match &m.report {
            Some(merged) => format!(
                "node `{}` merged once to a temporary f32 file of {}",
                graph_name(&graph, r),
                crate::size::format_bytes(merged.bytes_written)
            ),
            None => format!("`{}`", graph_name(&graph, r)),
        };
        out.notes.push(format!(
            "node `{}` (exchange_ema): {source}, read with its weights and EMA copies exchanged",
            node.name
        ));
        out.graph.models.push(ModelInput {
            name: format!("{} (EMA exchanged)", node.name),
            path: m.path.clone(),
        });
        let model = Ref::Model(out.graph.models.len() - 1);
        out.exchanged.insert(out.graph.models.len() - 1);
        if m.report.is_some() {
            out._temps.push(m);
        }
        let g = &mut out.graph;
        let to_model = |x: &mut Ref| {
            if *x == Ref::Node(n) {
                *x = model
            }
        };
        g.nodes
            .iter_mut()
            .flat_map(|x| x.slots.iter_mut().flatten())
            .for_each(to_model);
        to_model(&mut g.output);
        g.components.values_mut().for_each(to_model);
        // The node is no longer read: dropped, the others renumbered.
        out.graph = g.with_output(g.output);
    }
    Ok(())
}
