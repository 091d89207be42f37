//! supermerger's "cosineA" and "cosineB" (`precosine` + `cosine`), in weight space. Per column
//! `j` of a key (an index over every dim but the first; one for a vector), with `cos_j` torch's
//! `cosine_similarity` along dim 0 (eps 1e-8 on each norm), `â` the columns normalised
//! (`F.normalize`, eps 1e-12) and `g(x, y) = ⟨x, y⟩/(‖x‖ ‖y‖)` over the whole key:
//!
//! - cosineA: `s_j = (cos_j(â, b̂) + g(â, b̂))/2`, `k_j = clip((s_j − lo)/(hi − lo) − |α|, 0, 1)`;
//! - cosineB: `s_j = (cos_j(a, b) + g(a, b))/2`, `k_j = clip((s_j − lo)/(hi − lo) − α, 0, 1)`;
//!
//! and the key is `lerp(b, a, k_j)` (torch's `lerp`): a where the models are alike, b where they
//! differ. `lo` and `hi` are the least and greatest similarity of every column of the whole
//! model once the lowest and highest 1% are dropped ([`trimmed_range`]; cosineA ranks the plain
//! `cos_j(â, b̂)`, cosineB `s_j`), over every key but the VAE's (`first_stage_model`), which
//! supermerger leaves as a (and so does this). The engine
//! computes `lo` and `hi` from the whole models before merging (a pass over both models reading
//! every key in chunks, holding one similarity per column), unless `sim_min` and `sim_max` are
//! given. sd-mecha's `add_cosine_a/b` are the same merges without this normalisation (and, for A,
//! without the whole-key term). Per key: one `Sums` pass (3 sums per column), then the output.

use super::torch_lerp;
use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

const SLOTS: &[Slot] = &[
    Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "model A, whose structure is kept where the models are alike",
    },
    Slot {
        name: "b",
        kind: SlotKind::One,
        doc: "model B",
    },
];

const PARAMS: &[ParamInfo] = &[
    ParamInfo::number(
        "alpha",
        0.5,
        "subtracted from the normalised similarity: higher takes more of b",
    ),
    ParamInfo::optional(
        "sim_min",
        Domain::Any,
        "the model-wide least similarity lo (default: computed from the whole models, as \
         supermerger)",
    ),
    ParamInfo::optional(
        "sim_max",
        Domain::Any,
        "the model-wide greatest similarity hi (default: computed from the whole models)",
    ),
];

/// `cosine_a`'s declaration.
pub static COSINE_A: MethodInfo = MethodInfo {
    name: "cosine_a",
    origins: &[Origin::Supermerger],
    formula: "lerp(b, a, clip((s_j - lo)/(hi - lo) - |alpha|, 0, 1)), s_j = (cos_j(a/|a_j|, \
              b/|b_j|) + <a/|a_j|, b/|b_j|>/(|.| |.|))/2 along dim 0; lo, hi over the whole model",
    summary: "supermerger's cosineA: a where a and b are alike, b where they differ, by column \
              similarity normalised over the whole model (the model-wide range needs a pass over \
              both models first). VAE keys are a.",
    slots: SLOTS,
    params: PARAMS,
};

/// `cosine_b`'s declaration.
pub static COSINE_B: MethodInfo = MethodInfo {
    name: "cosine_b",
    origins: &[Origin::Supermerger],
    formula: "lerp(b, a, clip((s_j - lo)/(hi - lo) - alpha, 0, 1)), s_j = (cos_j(a, b) + <a, \
              b>/(|a| |b|))/2 along dim 0; lo, hi over the whole model",
    summary: "supermerger's cosineB: as cosine_a with the similarity of the columns themselves \
              (not normalised first). VAE keys are a.",
    slots: SLOTS,
    params: PARAMS,
};

/// Whether supermerger's cosine modes merge `key` (and count it in the model-wide range): every
/// key but the VAE's (supermerger: "skip VAE model parameters to get better results").
pub fn merges_key(key: &str) -> bool {
    !key.contains("first_stage_model")
}

/// The number of columns of a key of `shape` (elements over the first dim; 1 for a vector).
pub fn columns(shape: &[usize]) -> usize {
    match shape.first() {
        Some(&rows) if rows > 0 => (shape.iter().product::<usize>() / rows).max(1),
        _ => 1,
    }
}

/// Per-column `[‖a_j‖², ‖b_j‖², ⟨a_j, b_j⟩]` of elements `range` of a key with `m` columns,
/// added to `sums` (`3·m` values).
pub fn add_column_sums<T: Real>(sums: &mut [f64], m: usize, range: Range<usize>, a: &[T], b: &[T]) {
    for (i, idx) in range.enumerate() {
        let j = 3 * (idx % m);
        let (a, b) = (a[i].to_f64(), b[i].to_f64());
        sums[j] += a * a;
        sums[j + 1] += b * b;
        sums[j + 2] += a * b;
    }
}

/// The similarities of a key's columns from their sums: `ranked` (the values the model-wide
/// range is taken over) and `merged` (the values `k_j` is computed from).
pub fn similarities(sums: &[f64], a_mode: bool) -> (Vec<f64>, Vec<f64>) {
    let cos = |ab: f64, na: f64, nb: f64| ab / (na.max(1e-8) * nb.max(1e-8));
    if a_mode {
        // â = a / max(‖a_j‖, 1e-12): its column norms and products from the sums.
        let scaled: Vec<(f64, f64, f64)> = sums
            .chunks_exact(3)
            .map(|c| {
                let (na, nb) = (c[0].sqrt(), c[1].sqrt());
                let (sa, sb) = (1.0 / na.max(1e-12), 1.0 / nb.max(1e-12));
                (na * sa, nb * sb, c[2] * sa * sb)
            })
            .collect();
        let (mut aa, mut bb, mut ab) = (0.0, 0.0, 0.0);
        for &(na, nb, p) in &scaled {
            aa += na * na;
            bb += nb * nb;
            ab += p;
        }
        let global = ab / (aa.sqrt() * bb.sqrt());
        let ranked: Vec<f64> = scaled.iter().map(|&(na, nb, p)| cos(p, na, nb)).collect();
        let merged = ranked.iter().map(|s| (s + global) / 2.0).collect();
        (ranked, merged)
    } else {
        let (mut aa, mut bb, mut ab) = (0.0, 0.0, 0.0);
        for c in sums.chunks_exact(3) {
            aa += c[0];
            bb += c[1];
            ab += c[2];
        }
        let global = ab / (aa.sqrt() * bb.sqrt());
        let merged: Vec<f64> = sums
            .chunks_exact(3)
            .map(|c| (cos(c[2], c[0].sqrt(), c[1].sqrt()) + global) / 2.0)
            .collect();
        (merged.clone(), merged)
    }
}

/// numpy's `percentile(x, q, method='midpoint')` of sorted `x`.
fn percentile_midpoint(x: &[f64], q: f64) -> f64 {
    let at = q / 100.0 * (x.len() - 1) as f64;
    let (lo, hi) = (x[at.floor() as usize], x[at.ceil() as usize]);
    // numpy's lerp at t = 0.5.
    hi - (hi - lo) * 0.5
}

/// supermerger's range of the similarities `sims` (every column of the model): NaNs dropped,
/// then the values below the 1st percentile, then those above the 99th of the rest (numpy's
/// `midpoint` percentiles); the least and greatest left. `None` without a finite value.
pub fn trimmed_range(mut sims: Vec<f64>) -> Option<(f64, f64)> {
    sims.retain(|x| !x.is_nan());
    if sims.is_empty() {
        return None;
    }
    sims.sort_by(f64::total_cmp);
    let p1 = percentile_midpoint(&sims, 1.0);
    sims.retain(|&x| x >= p1);
    let p99 = percentile_midpoint(&sims, 99.0);
    sims.retain(|&x| x <= p99);
    Some((*sims.first()?, *sims.last()?))
}

/// `cosine_a` (`B = false`) or `cosine_b` (`B = true`).
pub(crate) struct Cosine<const B: bool> {
    alpha: f64,
    range: Option<(f64, f64)>,
}

impl<const B: bool> Cosine<B> {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        let lo = params.optional_number("sim_min")?;
        let hi = params.optional_number("sim_max")?;
        params.finish()?;
        let name = if B { COSINE_B.name } else { COSINE_A.name };
        let range = match (lo, hi) {
            (Some(lo), Some(hi)) => Some((lo, hi)),
            (None, None) => None,
            _ => {
                return Err(Error::method(
                    name,
                    "give both `sim_min` and `sim_max`, or neither (the engine computes them)",
                ))
            }
        };
        Ok(Cosine { alpha, range })
    }
}

impl<T: Real, const B: bool> Method<T> for Cosine<B> {
    fn info(&self) -> &'static MethodInfo {
        if B {
            &COSINE_B
        } else {
            &COSINE_A
        }
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let merged = merges_key(ctx.key);
        let range =
            match self.range {
                Some(range) => range,
                None if !merged => (0.0, 1.0),
                None => return Err(Error::method(
                    if B { COSINE_B.name } else { COSINE_A.name },
                    "`sim_min` and `sim_max` were neither given nor computed from the whole models",
                )),
            };
        Ok(Box::new(CosineKey::<T, B> {
            alpha: self.alpha,
            range,
            merged,
            columns: columns(ctx.shape),
            k: Vec::new(),
        }))
    }
}

struct CosineKey<T, const B: bool> {
    alpha: f64,
    range: (f64, f64),
    /// Whether the key is merged (else it is a).
    merged: bool,
    columns: usize,
    /// After the pass: the weight of a per column.
    k: Vec<T>,
}

impl<T: Real, const B: bool> KeyMerge<T> for CosineKey<T, B> {
    fn stat_passes(&self) -> usize {
        usize::from(self.merged)
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        if !self.merged {
            return Ok(());
        }
        let m = self.columns;
        let sums = passes.run(Sums::new(
            3 * m,
            move |range: Range<usize>, args: &[&[T]]| {
                let mut s = vec![0.0; 3 * m];
                add_column_sums(&mut s, m, range, args[0], args[1]);
                s
            },
        ))?;
        let (_, merged) = similarities(&sums.total, !B);
        let (lo, hi) = self.range;
        let shift = if B { self.alpha } else { self.alpha.abs() };
        self.k = merged
            .iter()
            .map(|&s| {
                let k = (s - lo) / (hi - lo) - shift;
                // torch's clip keeps NaN.
                T::from_f64(if k.is_nan() { k } else { k.clamp(0.0, 1.0) })
            })
            .collect();
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        if !self.merged {
            out.copy_from_slice(&args[0][..out.len()]);
            return;
        }
        for (i, (o, idx)) in out.iter_mut().zip(range).enumerate() {
            *o = torch_lerp(args[1][i], args[0][i], self.k[idx % self.columns]);
        }
    }
}
