//! Opening the inputs: the key table, each input's layout, and the layout of the merge.

use super::*;

/// What `run` works on.
pub(super) struct RunInputs<'a> {
    pub(super) models: &'a [ModelFile],
    pub(super) rows: &'a [KeyRow],
    pub(super) layouts: &'a [Option<Layout>],
    /// The layout components are taken from.
    pub(super) layout: Option<Layout>,
    /// How inputs were read (other key formats, LoRA files), and what preparing whole-model
    /// nodes found.
    pub(super) notes: &'a [String],
    /// The permutations of the whole-model nodes, by node index.
    pub(super) prepared: &'a BTreeMap<usize, methods::PreparedNode>,
}

impl RunInputs<'_> {
    /// The bytes read so far: from the inputs' files, and by the prepared nodes themselves
    /// (`balance_attention`'s layers).
    pub(super) fn bytes_read(&self) -> u64 {
        self.models.iter().map(ModelFile::bytes_read).sum::<u64>()
            + self
                .prepared
                .values()
                .map(methods::PreparedNode::bytes_read)
                .sum::<u64>()
    }
}

/// The layout that decides the components of keys: the fallback model's, else the one most
/// inputs have (the first such in input order). Checks the recipe's component names against it.
pub(super) fn graph_layout(graph: &Graph, layouts: &[Option<Layout>]) -> Result<Option<Layout>> {
    // Files in another key format are read as the original layout.
    let layouts: Vec<Option<Layout>> = layouts
        .iter()
        .map(|l| l.map(|l| crate::layout::formats::canonical(l).unwrap_or(l)))
        .collect();
    let layouts = layouts.as_slice();
    let layout = match graph.fallback.and_then(|f| layouts[f]) {
        Some(l) => Some(l),
        None => {
            let mut best: Option<(Layout, usize)> = None;
            for l in layouts.iter().flatten() {
                let n = layouts.iter().filter(|x| **x == Some(*l)).count();
                if best.is_none_or(|(_, bn)| n > bn) {
                    best = Some((*l, n));
                }
            }
            best.map(|(l, _)| l)
        }
    };
    if graph.components.is_empty() {
        return Ok(layout);
    }
    let Some(layout) = layout else {
        return Err(Error::Invalid(format!(
            "the recipe routes components ({}) but no input has a known architecture",
            graph
                .components
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let known = layout.components();
    for c in graph.components.keys() {
        if !known.contains(&c.as_str()) {
            return Err(Error::Invalid(format!(
                "component `{c}` is not a component of {layout} (its components: {})",
                known.join(", ")
            )));
        }
    }
    Ok(Some(layout))
}

/// Opens every input, refusing an output path that is one of them, and builds the key table.
/// The inputs, the key table, and each input's detected layout.
pub(super) type Inputs = (
    Vec<ModelFile>,
    Vec<KeyRow>,
    Vec<Option<Layout>>,
    Vec<String>,
);

/// The models in `exchanged` are read with their weights and EMA copies exchanged (`exchange_ema`).
pub(super) fn open_inputs(
    graph: &Graph,
    output: &Path,
    exchanged: &std::collections::BTreeSet<usize>,
) -> Result<Inputs> {
    let out_id = file_identity(output);
    let paths: Vec<&Path> = graph.models.iter().map(|m| m.path.as_path()).collect();
    let mut table = KeyTable {
        rows: BTreeMap::new(),
        n: paths.len(),
        layouts: Vec::new(),
        notes: Vec::new(),
    };
    let mut models = Vec::with_capacity(graph.models.len());
    for (i, m) in graph.models.iter().enumerate() {
        if out_id.is_some() && file_identity(&m.path) == out_id {
            return Err(Error::Output {
                path: output.to_path_buf(),
                message: format!("is the input `{}`; refusing to overwrite an input", m.name),
            });
        }
        let mut model = ModelFile::open(&m.path)?;
        let layout = model.detected_layout();
        table.add(i, &model, layout, &paths, exchanged.contains(&i))?;
        model.forget_index();
        models.push(model);
    }
    Ok((
        models,
        table.rows.into_values().collect(),
        table.layouts,
        table.notes,
    ))
}

#[cfg(unix)]
pub(super) fn file_identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
pub(super) fn file_identity(p: &Path) -> Option<(u64, u64)> {
    use std::hash::{Hash, Hasher};
    let c = std::fs::canonicalize(p).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    c.hash(&mut h);
    Some((0, h.finish()))
}
