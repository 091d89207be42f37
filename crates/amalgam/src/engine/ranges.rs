//! Model-wide statistics some streamed methods need before merging: supermerger's cosine modes
//! (`cosine_a`, `cosine_b`) normalise each column's similarity by the least and greatest of the
//! whole model's (see `methods::supermerger::cosine`). For each such node without `sim_min` and
//! `sim_max`, its two inputs are read once, every key in chunks (node inputs merged once to a
//! temporary file), holding one similarity per column; the range found becomes the node's
//! `sim_min` and `sim_max`, and the streamed pass merges with it.

use super::stages::materialise;
use super::*;
use crate::method::ParamValue;
use crate::methods::supermerger::cosine::{
    add_column_sums, columns, merges_key, similarities, trimmed_range,
};

/// The methods whose nodes need a model-wide range.
const RANGED: &[&str] = &["cosine_a", "cosine_b"];

/// Whether node `n` of `graph` still needs its range computed.
pub(super) fn needs_range(node: &crate::recipe::graph::Node) -> bool {
    RANGED.contains(&node.method)
        && !(node.params.contains_key("sim_min") && node.params.contains_key("sim_max"))
}

/// Elements read at a time.
const CHUNK: usize = 1 << 20;

/// `graph` with the range of every node that needs one given as its parameters, and a note per
/// node.
pub(super) fn with_ranges(
    graph: &Graph,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<(Graph, Vec<String>)> {
    let mut g = graph.clone();
    let mut notes = Vec::new();
    // In order: a node's inputs come before it, so they have their range when merged here.
    for n in 0..g.nodes.len() {
        if !needs_range(&g.nodes[n]) {
            continue;
        }
        let node = &g.nodes[n];
        let a_mode = node.method == "cosine_a";
        let at = |e: String| Error::Invalid(format!("node `{}` ({}): {e}", node.name, node.method));
        let args = node.flat_args();
        let inputs = [
            materialise(&g, args[0], opts, progress)?,
            materialise(&g, args[1], opts, progress)?,
        ];
        let (a, b) = (
            ModelFile::open(&inputs[0].path)?,
            ModelFile::open(&inputs[1].path)?,
        );
        let mut sims = Vec::new();
        let mut keys = 0usize;
        let (mut xa, mut xb) = (vec![0f64; 0], vec![0f64; 0]);
        let mut scratch = Vec::new();
        for (key, ta) in a.tensors() {
            let Some(tb) = b.tensor(key) else { continue };
            if !merges_key(key)
                || ta.shape != tb.shape
                || ta.float_dtype().is_none()
                || tb.float_dtype().is_none()
            {
                continue;
            }
            let (numel, m) = (ta.numel(), columns(&ta.shape));
            let mut sums = vec![0.0; 3 * m];
            let mut start = 0;
            while start < numel {
                let len = CHUNK.min(numel - start);
                xa.resize(len, 0.0);
                xb.resize(len, 0.0);
                a.read_chunk(key, start, &mut xa, &mut scratch)?;
                b.read_chunk(key, start, &mut xb, &mut scratch)?;
                add_column_sums(&mut sums, m, start..start + len, &xa, &xb);
                start += len;
            }
            sims.extend(similarities(&sums, a_mode).0);
            keys += 1;
        }
        let columns_seen = sims.len();
        if keys == 0 {
            notes.push(format!(
                "node `{}` ({}): no key outside the VAE in both models: every key is its a",
                node.name, node.method
            ));
            continue;
        }
        let (lo, hi) = trimmed_range(sims).ok_or_else(|| {
            at("every column similarity is NaN (zero tensors): no range to normalise by".into())
        })?;
        notes.push(format!(
            "node `{}` ({}): similarities of {columns_seen} columns in {keys} keys range over \
             [{lo:.6}, {hi:.6}] (1% trimmed at each end): its sim_min and sim_max",
            node.name, node.method
        ));
        let params = &mut g.nodes[n].params;
        params.insert("sim_min".into(), ParamValue::Number(lo));
        params.insert("sim_max".into(), ParamValue::Number(hi));
    }
    Ok((g, notes))
}
