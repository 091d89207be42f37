//! Whole-model methods (`methods::WHOLE_MODEL`: re-basin), prepared before the streamed pass:
//! their permutations come from whole models (weight matching reads `a` and `ref`; a node input
//! is merged once to a temporary file beside the output, which the streamed pass then reads
//! instead of computing the node again), and each such node then permutes its `a` key by key.

use super::stages::{materialise, Materialised};
use super::*;
use crate::layout::perms::perm_groups;
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
    pub(super) perms: BTreeMap<usize, Arc<Permutations>>,
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

/// Prepares the whole-model nodes of `graph` (none: the graph as it is).
pub(super) fn prepare(
    graph: &Graph,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<Prepared> {
    let mut out = Prepared {
        graph: graph.clone(),
        opts: opts.clone(),
        perms: BTreeMap::new(),
        notes: Vec::new(),
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
            crate::recipe::to_toml(graph, &settings),
        );
    }
    for n in whole {
        let node = &graph.nodes[n];
        let at = |e: String| Error::Invalid(format!("node `{}` ({}): {e}", node.name, node.method));
        let a = materialise(graph, node.slots[0][0], opts, progress)?;
        let a_file = ModelFile::open(&a.path)?;
        let layout = a_file
            .detected_layout()
            .ok_or_else(|| at("re-basin needs SD1 (ldm) or SDXL (sgm) checkpoints".into()))?;
        let a_shapes = shapes(&a_file);
        let groups =
            perm_groups(layout, |k| a_shapes.get(k).cloned()).map_err(|e| at(e.to_string()))?;
        let perms = if node.method == crate::methods::permute::RANDPERM.name {
            out.notes.push(format!(
                "node `{}` (randperm): {} groups permuted at random (seed {})",
                node.name,
                groups.len(),
                opts.seed
            ));
            Permutations::random(groups, opts.seed)
        } else {
            let r = materialise(graph, node.slots[1][0], opts, progress)?;
            let r_file = ModelFile::open(&r.path)?;
            let m = weight_matching(&a_file, &r_file, groups, opts.threads, progress)
                .map_err(|e| at(e.to_string()))?;
            out.notes.push(format!(
                "node `{}` (rebasin): {} of {} groups permuted; agreement with the reference {:.6e} -> {:.6e}",
                node.name,
                m.permutations.changed(),
                m.permutations.groups.len(),
                m.before,
                m.after
            ));
            // The reference is used up: the streamed pass reads only `a`.
            out.graph.nodes[n].slots[1].clear();
            m.permutations
        };
        // A node `a` was merged once: the streamed pass reads that file.
        if a.report.is_some() {
            out.graph.models.push(ModelInput {
                name: format!(
                    "{} (node `{}`, merged)",
                    node.name,
                    graph_name(graph, node.slots[0][0])
                ),
                path: a.path.clone(),
            });
            out.graph.nodes[n].slots[0] = vec![Ref::Model(out.graph.models.len() - 1)];
            out._temps.push(a);
        }
        out.perms.insert(n, Arc::new(perms));
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
