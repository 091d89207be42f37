//! LoRA extraction: a fine-tune's difference from its base, `Δ = tuned − base`, as a kohya LoRA
//! (LoCon for convolutions) of rank at most R per module:
//!
//! ```text
//! Δ as [out, rest] = U diag(σ) Vᵀ  →  lora_up = U_r·diag(√σ_r),  lora_down = diag(√σ_r)·V_rᵀ,  alpha = r
//! ```
//!
//! so that `lora_up · lora_down · alpha / r = U_r diag(σ_r) V_rᵀ`, the best rank-r approximation
//! of `Δ`. Module names are kohya's (`lora_unet_…`, `lora_te_…`, `lora_te1_…`, `lora_te2_…`), as
//! amalgam's own LoRA baking, ComfyUI and A1111 read them; a fused key (CLIP-G's `in_proj_weight`)
//! gives one module per part. Keys are done one at a time per thread, each with an exact SVD in
//! f64 (sequential: the same bytes for any thread count); the factors are kept until the file is
//! written, so memory is the output's size plus one key's working set per thread.

use super::{encoded, write_lora, Factors};
use crate::error::{Error, Result};
use crate::io::dtype::OutputDtype;
use crate::io::input::ModelFile;
use crate::layout::arch::Layout;
use crate::method::{Domain, MethodInfo, Origin, ParamInfo, Params, Slot, SlotKind};
use crate::methods::svd::spectrum::thin_svd;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;

/// The declaration of the recipe node: a recipe whose output node is `extract_lora` writes the
/// LoRA of its `model` (a model or any node) against `base`, instead of a checkpoint.
pub static INFO: MethodInfo = MethodInfo {
    name: "extract_lora",
    origins: &[Origin::Community],
    formula: "kohya LoRA of model - base: per module U_r diag(sqrt sigma_r), diag(sqrt sigma_r) \
              V_r^T, alpha = r",
    summary: "A recipe's output as a kohya LoRA (LoCon for convolutions) of its difference from \
              a base, rank at most `rank` per module; only as the recipe's output node (a node \
              `model` is merged to a temporary f32 file beside the output first). Each matrix \
              whole.",
    slots: &[
        Slot {
            name: "model",
            kind: SlotKind::One,
            doc: "the model extracted: a model or any node (the merge's result)",
        },
        Slot {
            name: "base",
            kind: SlotKind::One,
            doc: "the model the LoRA is applied to",
        },
    ],
    params: &[
        ParamInfo::count(
            "rank",
            64,
            "the largest rank of a module (alpha = rank, so the scale is 1)",
        ),
        ParamInfo::optional(
            "ratio",
            Domain::Fraction,
            "instead of every module at `rank`: round(ratio * min(out, in)), at most `rank`",
        ),
        ParamInfo::optional(
            "energy",
            Domain::Fraction,
            "instead: the smallest rank keeping this fraction of the module's delta energy \
             (sum of squared singular values), at most `rank`",
        ),
    ],
};

/// The largest rank and the rank rule of an `extract_lora` node's parameters.
pub(crate) fn rank_params(params: Params) -> Result<(usize, RankRule)> {
    let mut params = params.bind(&INFO, &[1, 1]);
    let rank = params.count("rank")?;
    let ratio = params.optional_number("ratio")?;
    let energy = params.optional_number("energy")?;
    params.finish()?;
    if rank == 0 {
        return Err(Error::method(
            INFO.name,
            "parameter `rank` must be at least 1",
        ));
    }
    match (ratio, energy) {
        (Some(_), Some(_)) => Err(Error::method(
            INFO.name,
            "give `ratio` or `energy`, not both",
        )),
        (Some(f), None) => Ok((rank, RankRule::Ratio(f))),
        (None, Some(f)) => Ok((rank, RankRule::Energy(f))),
        (None, None) => Ok((rank, RankRule::Fixed)),
    }
}

/// How the rank of each module is chosen (never above [`ExtractOptions::rank`]).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum RankRule {
    /// The maximum rank for every module.
    Fixed,
    /// `round(f·min(out, rest))`, at least 1.
    Ratio(f64),
    /// The smallest rank keeping this fraction of the delta's energy `‖Δ‖²_F = Σσ²`.
    Energy(f64),
}

/// What to extract and where.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// The fine-tuned model.
    pub tuned: PathBuf,
    /// Its base.
    pub base: PathBuf,
    /// The LoRA file written.
    pub output: PathBuf,
    /// The largest rank of a module.
    pub rank: usize,
    /// How each module's rank is chosen.
    pub rule: RankRule,
    /// The dtype of the factors.
    pub dtype: OutputDtype,
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Extra `__metadata__` entries (e.g. the recipe whose result is extracted).
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Stops the extraction between keys (nothing is written).
    pub cancel: crate::options::Cancel,
}

impl ExtractOptions {
    /// Extracting `tuned` against `base` into `output`, at most rank `rank` per module, every
    /// other option at its default (f16 factors, one thread per core).
    pub fn new(
        tuned: impl Into<PathBuf>,
        base: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
        rank: usize,
    ) -> Self {
        ExtractOptions {
            tuned: tuned.into(),
            base: base.into(),
            output: output.into(),
            rank,
            rule: RankRule::Fixed,
            dtype: OutputDtype::F16,
            threads: 0,
            overwrite: false,
            metadata: Default::default(),
            cancel: Default::default(),
        }
    }
}

/// One module extracted.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModuleReport {
    /// The kohya module name.
    pub module: String,
    /// The model key (original layout) it comes from.
    pub key: String,
    /// `[out, rest]` of the delta.
    pub shape: (usize, usize),
    /// Which row block of the key it is, of how many (`(0, 1)` but for fused keys).
    pub part: (usize, usize),
    /// The rank kept.
    pub rank: usize,
    /// The fraction of the delta's energy `Σσ²` kept (1 for a zero delta).
    pub energy: f64,
}

/// What an extraction did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExtractReport {
    /// The architecture of the models.
    pub layout: Option<String>,
    /// The modules written, by name.
    pub modules: Vec<ModuleReport>,
    /// Keys that can have a module but whose delta is zero (no module written).
    pub unchanged: Vec<String>,
    /// Keys without a LoRA module (biases, norms, embeddings, the VAE), changed by the fine-tune:
    /// a LoRA cannot carry them.
    pub not_carried: Vec<String>,
    /// The file written.
    pub output: PathBuf,
}

impl ExtractReport {
    /// The smallest energy fraction kept by any module, and its module.
    pub fn worst(&self) -> Option<&ModuleReport> {
        self.modules
            .iter()
            .min_by(|a, b| a.energy.total_cmp(&b.energy))
    }
}

impl std::fmt::Display for ExtractReport {
    /// The summary: modules, ranks, the energy kept (least and mean), what a LoRA cannot carry.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.modules.len();
        let ranks = self.modules.iter().map(|m| m.rank);
        let (lo, hi) = (ranks.clone().min().unwrap_or(0), ranks.max().unwrap_or(0));
        writeln!(
            f,
            "LoRA of {} modules ({}), rank {}",
            n,
            self.layout.as_deref().unwrap_or("unknown architecture"),
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}..{hi}")
            }
        )?;
        if let Some(w) = self.worst() {
            let mean = self.modules.iter().map(|m| m.energy).sum::<f64>() / n as f64;
            writeln!(
                f,
                "energy kept: mean {:.2} %, least {:.2} % ({}, rank {} of {})",
                100.0 * mean,
                100.0 * w.energy,
                w.module,
                w.rank,
                w.shape.0.min(w.shape.1)
            )?;
        }
        if !self.unchanged.is_empty() {
            writeln!(
                f,
                "{} keys unchanged by the fine-tune (no module)",
                self.unchanged.len()
            )?;
        }
        if !self.not_carried.is_empty() {
            writeln!(
                f,
                "{} changed keys a LoRA cannot carry (biases, norms, embeddings, VAE), e.g. `{}`",
                self.not_carried.len(),
                self.not_carried[0]
            )?;
        }
        write!(f, "wrote {}", self.output.display())
    }
}

/// The rank kept of a delta with singular values `sigma` (nonincreasing) under `rule`.
pub fn rank_for(sigma: &[f64], max: usize, rule: RankRule) -> usize {
    let full = sigma.len();
    let r = match rule {
        RankRule::Fixed => max,
        RankRule::Ratio(f) => ((full as f64 * f).round() as usize).max(1),
        RankRule::Energy(f) => {
            let total: f64 = sigma.iter().map(|s| s * s).sum();
            let mut kept = 0.0;
            let mut r = full;
            for (i, s) in sigma.iter().enumerate() {
                kept += s * s;
                if kept >= f * total {
                    r = i + 1;
                    break;
                }
            }
            r
        }
    };
    r.min(max).min(full)
}

/// The modules of one key: each one's report and factors.
type KeyModules = Vec<(ModuleReport, Factors)>;

/// The factors of the modules of one key (one per part of a fused key), or `None` when its
/// delta is zero.
fn extract_key(
    tuned: &ModelFile,
    base: &ModelFile,
    key: &str,
    modules: &[String],
    opts: &ExtractOptions,
) -> Result<Option<KeyModules>> {
    let shape = tuned.tensor(key).expect("listed").shape.clone();
    let mut delta = tuned.read_tensor::<f64>(key)?;
    for (d, b) in delta.iter_mut().zip(base.read_tensor::<f64>(key)?) {
        *d -= b;
    }
    if delta.iter().all(|&d| d == 0.0) {
        return Ok(None);
    }
    let rows = shape[0] / modules.len();
    let cols: usize = shape[1..].iter().product();
    let mut out = Vec::new();
    for (part, (values, module)) in delta.chunks_exact(rows * cols).zip(modules).enumerate() {
        let (u, sigma, v) = thin_svd(values, rows, cols, key)?;
        let r = rank_for(&sigma, opts.rank, opts.rule);
        let total: f64 = sigma.iter().map(|s| s * s).sum();
        let kept: f64 = sigma[..r].iter().map(|s| s * s).sum();
        let mut up = vec![0.0; rows * r];
        let mut down = vec![0.0; r * cols];
        for j in 0..r {
            let root = sigma[j].sqrt();
            for i in 0..rows {
                up[i * r + j] = u[(i, j)] * root;
            }
            for c in 0..cols {
                down[j * cols + c] = v[(c, j)] * root;
            }
        }
        out.push((
            ModuleReport {
                module: module.clone(),
                key: key.to_string(),
                shape: (rows, cols),
                part: (part, modules.len()),
                rank: r,
                energy: if total > 0.0 { kept / total } else { 1.0 },
            },
            Factors {
                module: module.clone(),
                out: rows,
                rank: r,
                rest: shape[1..].to_vec(),
                up: encoded(&up, opts.dtype),
                down: encoded(&down, opts.dtype),
            },
        ));
    }
    Ok(Some(out))
}

/// Extracts the LoRA of `opts.tuned` against `opts.base` and writes it to `opts.output`.
/// `progress` counts the bytes of the fine-tune's keys factored, key by key.
pub fn extract_lora(
    opts: &ExtractOptions,
    progress: &dyn crate::Progress,
) -> Result<ExtractReport> {
    if opts.rank == 0 {
        return Err(Error::Invalid("the LoRA rank must be at least 1".into()));
    }
    let inputs = [opts.tuned.as_path(), opts.base.as_path()];
    crate::io::dest::check_output(&opts.output, &inputs, opts.overwrite)?;
    let tuned = ModelFile::open(&opts.tuned)?;
    let base = ModelFile::open(&opts.base)?;
    let layout = tuned.detected_layout();
    let name = |l: Option<Layout>| {
        l.map_or("of an unknown architecture".to_string(), |l| {
            format!("`{}`", l.name())
        })
    };
    if base.detected_layout() != layout {
        return Err(Error::Invalid(format!(
            "{} is {} but its base {} is {}",
            opts.tuned.display(),
            name(layout),
            opts.base.display(),
            name(base.detected_layout())
        )));
    }
    let names = layout
        .map(crate::layout::lora::module_names)
        .unwrap_or_default();
    if names.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: LoRA extraction needs an SD1 (ldm) or SDXL (sgm) checkpoint; this one is {}",
            opts.tuned.display(),
            name(layout)
        )));
    }
    // The keys both models have with the same shape and a float dtype.
    let mut keys = Vec::new();
    let mut report = ExtractReport {
        layout: layout.map(|l| l.name().to_string()),
        output: opts.output.clone(),
        ..Default::default()
    };
    for (key, t) in tuned.tensors() {
        let Some(b) = base.tensor(key) else { continue };
        if b.shape != t.shape || t.float_dtype().is_none() || b.float_dtype().is_none() {
            continue;
        }
        match names.get(key) {
            Some(m) if t.shape.len() >= 2 && t.shape[0] % m.len() == 0 => keys.push((key, m)),
            _ => {
                if tuned.read_tensor::<f64>(key)? != base.read_tensor::<f64>(key)? {
                    report.not_carried.push(key.clone());
                }
            }
        }
    }
    let pool = crate::engine::thread_pool(opts.threads)?;
    let key_bytes = |k: &str| {
        tuned
            .tensor(k)
            .map_or(0, |t| t.numel() * t.dtype.bitsize() / 8) as u64
    };
    progress.start(keys.iter().map(|(k, _)| key_bytes(k)).sum(), keys.len());
    let done_keys = std::sync::atomic::AtomicUsize::new(0);
    let done: Vec<(String, Option<KeyModules>)> = pool.install(|| {
        keys.par_iter()
            .map(|(k, m)| {
                if opts.cancel.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                let f = extract_key(&tuned, &base, k, m, opts)?;
                let n = done_keys.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress.advance(key_bytes(k), n, k);
                Ok((k.to_string(), f))
            })
            .collect::<Result<_>>()
    })?;
    progress.finish();
    let mut factors = Vec::new();
    for (key, f) in done {
        match f {
            Some(f) => factors.extend(f),
            None => report.unchanged.push(key),
        }
    }
    factors.sort_by(|a, b| a.0.module.cmp(&b.0.module));
    let (modules, factors): (Vec<ModuleReport>, Vec<Factors>) = factors.into_iter().unzip();
    let mut metadata: HashMap<String, String> = opts.metadata.clone().into_iter().collect();
    metadata.insert(
        "amalgam_extract_lora".to_string(),
        format!(
            "{} - {}, rank <= {}, {:?}",
            opts.tuned.display(),
            opts.base.display(),
            opts.rank,
            opts.rule
        ),
    );
    if layout == Some(Layout::SdxlSgm) {
        metadata.insert(
            "ss_base_model_version".to_string(),
            "sdxl_base_v1-0".to_string(),
        );
    }
    write_lora(&opts.output, factors, opts.dtype, metadata, opts.overwrite)?;
    report.modules = modules;
    Ok(report)
}
