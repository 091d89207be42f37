//! Output stages: a recipe whose output node writes another kind of file than a checkpoint
//! (`extract_lora`: a LoRA of a model against a base). A stage needs whole models: an input that
//! is a node is first merged, once, to a temporary f32 file beside the output ([`Materialised`],
//! removed when done, failed or cancelled); the stage then reads it like a model file.

use super::*;
use crate::lora::extract::{extract_lora, rank_params, ExtractOptions};
use std::path::PathBuf;

/// A model file a stage reads: an input, or a node's result written to a temporary file that is
/// removed when this is dropped.
pub(super) struct Materialised {
    pub(super) path: PathBuf,
    temporary: bool,
    /// The merge that wrote the temporary file.
    pub(super) report: Option<MergeReport>,
}

impl Drop for Materialised {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `r` as a model file: the input's path, or the node's result merged (with `opts`' compute
/// dtype, seed and budget) into a temporary f32 safetensors file beside `opts.output`.
pub(super) fn materialise(
    graph: &Graph,
    r: Ref,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<Materialised> {
    let n = match r {
        Ref::Model(m) => {
            return Ok(Materialised {
                path: graph.models[m].path.clone(),
                temporary: false,
                report: None,
            })
        }
        Ref::Node(n) => n,
    };
    let path = crate::io::dest::temp_name(
        &opts.output,
        &format!("node-{}.safetensors", graph.nodes[n].name),
    );
    let mut sub = opts.clone();
    sub.output = path.clone();
    sub.output_dtype = crate::io::dtype::OutputDtype::F32;
    sub.overwrite = false;
    sub.report_json = None;
    sub.resume = false;
    sub.keep_partial = false;
    sub.output_layout = None;
    sub.metadata = BTreeMap::new();
    // Owned from here: removed on any error below.
    let mut done = Materialised {
        path,
        temporary: true,
        report: None,
    };
    done.report = Some(merge(&graph.with_output(r), &sub, progress)?);
    Ok(done)
}

/// Runs the output stage node `n` of `graph` (see [`Graph::output_stage`]).
pub(super) fn run_stage(
    graph: &Graph,
    n: usize,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let start = Instant::now();
    let node = &graph.nodes[n];
    if let Some(l) = opts.output_layout {
        return Err(Error::Invalid(format!(
            "node `{}` writes a LoRA with kohya's module names: the output layout {l} does not apply",
            node.name
        )));
    }
    let input_paths: Vec<&Path> = graph.models.iter().map(|m| m.path.as_path()).collect();
    let mut outputs = vec![opts.output.as_path()];
    outputs.extend(opts.report_json.as_deref());
    crate::io::dest::check_outputs(&outputs, &input_paths, opts.overwrite)?;
    let (rank, rule) = rank_params(Params::new(node.method, node.params.clone()))
        .map_err(|e| Error::Invalid(format!("node `{}`: {e}", node.name)))?;
    let (model_ref, base_ref) = (node.slots[0][0], node.slots[1][0]);
    let model = materialise(graph, model_ref, opts, progress)?;
    let base = materialise(graph, base_ref, opts, progress)?;
    let mut metadata = opts.metadata.clone();
    if !metadata.contains_key("amalgam_recipe") {
        let settings = crate::recipe::RecipeSettings::of(opts);
        metadata.insert(
            "amalgam_recipe".into(),
            crate::recipe::to_toml(graph, &settings),
        );
    }
    let lora = extract_lora(
        &ExtractOptions {
            rule,
            dtype: opts.output_dtype,
            threads: opts.threads,
            overwrite: opts.overwrite,
            metadata,
            cancel: opts.cancel.clone(),
            ..ExtractOptions::new(&model.path, &base.path, &opts.output, rank)
        },
        progress,
    )
    .map_err(|e| match e {
        Error::Cancelled => e,
        e => Error::Invalid(format!("node `{}`: {e}", node.name)),
    })?;
    let mut report = model
        .report
        .clone()
        .unwrap_or_else(|| MergeReport::new(graph));
    for (m, r) in [(&model, model_ref), (&base, base_ref)] {
        if let (Some(merged), Ref::Node(i)) = (&m.report, r) {
            report.notes.push(format!(
                "node `{}` was merged to a temporary f32 file of {} beside the output, removed after the extraction",
                graph.nodes[i].name,
                crate::size::format_bytes(merged.bytes_written)
            ));
        }
    }
    report.output = Some(opts.output.clone());
    report.lora = Some(lora);
    report.elapsed = start.elapsed();
    report.peak_rss_bytes = crate::report::peak_rss_bytes();
    write_report_json(&report, opts, &input_paths)?;
    Ok(report)
}
