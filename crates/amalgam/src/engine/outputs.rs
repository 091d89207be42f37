//! The outputs of one run: one file (and its journal) per output, a merge's one or a sweep's
//! several, written from the same reads of the inputs.

use super::*;
use crate::resume::{Journal, KeyRecord};

/// One output of a run: the graph that computes it and its options (its file, seed, metadata).
/// The outputs of one run share their models and every other option.
#[derive(Clone, Debug)]
pub struct OutputPoint {
    /// The recipe of this output.
    pub graph: Graph,
    /// Its options; `output`, `seed` and `metadata` may differ between the points of a run.
    pub opts: MergeOptions,
}

/// Refuses points that cannot run together: other models, other shared options, one file twice.
pub(super) fn check_points(points: &[OutputPoint]) -> Result<()> {
    let Some(first) = points.first() else {
        return Err(Error::Invalid("a run needs at least one output".into()));
    };
    let (g, o) = (&first.graph, &first.opts);
    let paths = |g: &Graph| -> Vec<std::path::PathBuf> {
        g.models.iter().map(|m| m.path.clone()).collect()
    };
    for p in &points[1..] {
        let same_models = paths(&p.graph) == paths(g);
        let q = &p.opts;
        let same_options = (q.output_dtype, q.compute_dtype, q.memory_budget, q.threads)
            == (o.output_dtype, o.compute_dtype, o.memory_budget, o.threads)
            && (q.output_layout, q.non_finite, q.chunk_override)
                == (o.output_layout, o.non_finite, o.chunk_override)
            && (q.overwrite, q.keep_partial) == (o.overwrite, o.keep_partial);
        if !same_models || !same_options {
            return Err(Error::Invalid(format!(
                "the outputs {} and {} cannot be written in one run: they must read the same \
                 models with the same dtype, budget, threads and layout",
                o.output.display(),
                q.output.display()
            )));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in points {
        if !seen.insert(p.opts.output.clone()) {
            return Err(Error::Invalid(format!(
                "two outputs of one run are the same file: {}",
                p.opts.output.display()
            )));
        }
    }
    Ok(())
}

/// The node whose points the outputs are, when they can be computed together: the output node,
/// when the points' graphs differ in its parameters only and they run with one seed (a sweep
/// of a merge's parameters). `None` for one output, or for points that differ elsewhere (they
/// are then computed one after the other, from inputs read once).
pub(super) fn swept_node(points: &[OutputPoint]) -> Option<usize> {
    let (first, rest) = points.split_first()?;
    let Ref::Node(node) = first.graph.output else {
        return None;
    };
    let without = |g: &Graph| {
        let mut g = g.clone();
        g.nodes[node].params.clear();
        g
    };
    let shape = without(&first.graph);
    (!rest.is_empty()
        && rest.iter().all(|p| {
            p.opts.seed == first.opts.seed
                && p.graph.output == first.graph.output
                && p.graph.nodes.len() == first.graph.nodes.len()
                && without(&p.graph) == shape
        }))
    .then_some(node)
}

/// Every output's file and journal.
pub(super) struct Outputs {
    files: Vec<OutputFile>,
    journals: Vec<Journal>,
}

impl Outputs {
    /// Opens every output (see [`crate::resume::open`]); the keys done are those of a resumed
    /// single output (several outputs start afresh).
    pub(super) fn open(
        points: &[OutputPoint],
        tensors: &[OutputTensor],
        metadata: Vec<HashMap<String, String>>,
        key_tensors: &[Vec<usize>],
        progress: &dyn Progress,
    ) -> Result<(Outputs, Vec<(usize, KeyRecord)>)> {
        let (mut files, mut journals, mut done) = (Vec::new(), Vec::new(), Vec::new());
        let several = points.len() > 1;
        for (p, meta) in points.iter().zip(metadata) {
            let mut opts = p.opts.clone();
            opts.resume &= !several;
            let opened =
                crate::resume::open(&p.graph, &opts, tensors, meta, key_tensors, progress)?;
            files.push(opened.out);
            journals.push(opened.journal);
            done = opened.done;
        }
        Ok((Outputs { files, journals }, done))
    }
    /// The number of outputs.
    pub(super) fn len(&self) -> usize {
        self.files.len()
    }
    /// Output `k`'s file.
    pub(super) fn file(&self, k: usize) -> &OutputFile {
        &self.files[k]
    }
    /// Output `k` wrote `bytes` of key `key`, `non_finite` of them NaN or Inf.
    pub(super) fn wrote(&self, k: usize, key: usize, bytes: u64, non_finite: u64) -> Result<()> {
        self.journals[k].wrote(key, bytes, non_finite)
    }
    /// Key `key` is not to be recorded as done until released (it is computed again).
    pub(super) fn hold(&self, key: usize) {
        self.journals.iter().for_each(|j| j.hold(key))
    }
    pub(super) fn release(&self, key: usize) {
        self.journals.iter().for_each(|j| j.release(key))
    }
    pub(super) fn restart(&self, key: usize) {
        self.journals.iter().for_each(|j| j.restart(key))
    }
    /// Each output's notes of key `key`.
    pub(super) fn set_notes(&self, key: usize, notes: &[Vec<String>]) {
        for (j, n) in self.journals.iter().zip(notes) {
            j.set_notes(key, n)
        }
    }
    pub(super) fn set_inputs_non_finite(&self, key: usize, found: &[InputNonFinite]) {
        self.journals
            .iter()
            .for_each(|j| j.set_inputs_non_finite(key, found))
    }
    /// The NaN or Inf values output `k` wrote for key `key`.
    pub(super) fn output_non_finite(&self, k: usize, key: usize) -> u64 {
        self.journals[k].output_non_finite(key)
    }
    /// Puts every output in place; their paths.
    pub(super) fn commit(self) -> Result<Vec<std::path::PathBuf>> {
        self.journals
            .into_iter()
            .zip(self.files)
            .map(|(j, f)| j.commit(f))
            .collect()
    }
}

/// The metadata of an output: the caller's, and the recipe that made it (unless the caller
/// recorded its own) with the settings it ran with, so that running it again gives the same
/// bytes; also in sd-mecha's format where it can express it, so that sd-mecha and ComfyUI-mecha
/// users can read where the model came from.
pub(super) fn output_metadata(
    graph: &Graph,
    opts: &MergeOptions,
    inputs: &RunInputs,
) -> HashMap<String, String> {
    let mut metadata: HashMap<String, String> = opts.metadata.clone().into_iter().collect();
    if !metadata.contains_key("amalgam_recipe") {
        let settings = crate::recipe::RecipeSettings::of(opts);
        metadata.insert(
            "amalgam_recipe".into(),
            crate::recipe::to_toml(graph, &settings),
        );
    }
    if !metadata.contains_key("mecha_recipe") {
        let arch = inputs.layout.map(|l| l.arch());
        if let Some(text) = crate::recipe::mecha::to_mecha(graph, inputs.layouts, arch, opts.seed) {
            metadata.insert("mecha_recipe".into(), text);
        }
    }
    metadata.insert("amalgam_version".into(), crate::VERSION.into());
    metadata.insert("format".into(), "pt".into());
    metadata
}
