//! The SD re-basin driver (ogkalu2's `SD_rebasin_merge.py`, spec §15.2): `θ` walks from `A`
//! towards `B` in `iterations` steps, and after each step its units are permuted back towards
//! `A`'s order:
//!
//! ```text
//! θ₀ = A;  θ ← (1 − a_x)·θ + a_x·B,  θ ← P_x(θ),  P_x = argmax_P ⟨A, P(θ)⟩   (x = 0 … iterations−1)
//! a_0 = s,  a_x = 1 − (1 − s(x+1))/(1 − s·x),  s = α/iterations
//! ```
//!
//! so that the share of `B` is `s·(x+1)` after step `x` and `α` at the end. The driver's second
//! matching (towards `B`) only changed six "special keys" (the VAE's `norm_out`, the UNet's
//! `out.0`), which no permutation group touches here: it is a no-op and left out. The
//! permutations of every step are kept; the streamed pass replays the walk key by key.

use super::{cross, group_rows, key_sets, lap, objective, read_set, Permutations};
use crate::error::{Error, Result};
use crate::io::input::ModelFile;
use crate::layout::perms::{permute_key, PermGroup};
use rayon::prelude::*;

/// The weight of `B` in step `x` of `iterations` towards the share `alpha`.
pub fn step_weight(alpha: f64, iterations: usize, x: usize) -> f64 {
    let s = alpha / iterations as f64;
    if x == 0 {
        s
    } else {
        1.0 - (1.0 - s * (x + 1) as f64) / (1.0 - s * x as f64)
    }
}

/// Whether the driver walks key `key` towards `B` (ogkalu2's keys containing `model`, less
/// those with `model_` (EMA), SDXL's CLIP-G and `position_ids`, as the spec lists); the others
/// stay `A`'s.
pub fn walks(key: &str) -> bool {
    key.contains("model")
        && !key.contains("model_")
        && !key.starts_with("conditioner.embedders.1.model")
        && !key.ends_with("position_ids")
}

/// The permutations of every step of the walk from `a` to `b`.
pub fn walk_permutations(
    a: &ModelFile,
    b: &ModelFile,
    groups: Vec<PermGroup>,
    alpha: f64,
    iterations: usize,
    threads: usize,
    progress: &dyn crate::Progress,
) -> Result<Vec<Permutations>> {
    if iterations == 0 {
        return Err(Error::Invalid(
            "the driver needs at least one iteration".into(),
        ));
    }
    let sets = key_sets(&groups);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start worker threads: {e}")))?;
    progress.start(sets.len() as u64, sets.len());
    let done = std::sync::atomic::AtomicUsize::new(0);
    // Per set: per step, (group, permutation).
    type Steps = Vec<Vec<(usize, Vec<usize>)>>;
    let solved: Vec<Steps> = pool.install(|| {
        sets.par_iter()
            .map(|set| {
                // θ in slot 0 (it starts as A), B in slot 1, A in slot 2.
                let mut t = read_set(&[a, b, a], &groups, set)?;
                let mut steps = Vec::with_capacity(iterations);
                for x in 0..iterations {
                    let w = step_weight(alpha, iterations, x);
                    for (key, (_, values)) in t.iter_mut() {
                        if walks(key) {
                            let (theta, rest) = values.split_at_mut(1);
                            for (o, &v) in theta[0].iter_mut().zip(&rest[0]) {
                                *o = (1.0 - w) * *o + w * v;
                            }
                        }
                    }
                    let mut step = Vec::with_capacity(set.len());
                    for &g in set {
                        let group = &groups[g];
                        let n = group.width;
                        let (rt, c) = group_rows(&t, group, 0);
                        let (ra, _) = group_rows(&t, group, 2);
                        let cost = cross(&ra, &rt, n, c);
                        let identity: Vec<usize> = (0..n).collect();
                        let p = lap::maximize(&cost, n);
                        let p = if objective(&cost, &p) > objective(&cost, &identity) {
                            p
                        } else {
                            identity
                        };
                        for w in &group.windows {
                            let (shape, values) = t.get_mut(w.key).expect("read");
                            let shape = shape.clone();
                            permute_key(group, &p, w.key, &shape, &mut values[0]);
                        }
                        step.push((g, p));
                    }
                    steps.push(step);
                }
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress.advance(1, n, &groups[set[0]].name);
                Ok(steps)
            })
            .collect::<Result<_>>()
    })?;
    progress.finish();
    let mut perms: Vec<Vec<Vec<usize>>> = (0..iterations)
        .map(|_| groups.iter().map(|g| (0..g.width).collect()).collect())
        .collect();
    for steps in solved {
        for (x, step) in steps.into_iter().enumerate() {
            for (g, p) in step {
                perms[x][g] = p;
            }
        }
    }
    Ok(perms
        .into_iter()
        .map(|p| Permutations::new(groups.clone(), p))
        .collect())
}

/// The walk of one key, replayed: `θ` from `a` towards `b` with the steps' permutations
/// (`a` is `θ` on return).
pub fn replay(
    steps: &[std::sync::Arc<Permutations>],
    alpha: f64,
    key: &str,
    shape: &[usize],
    a: &mut [f64],
    b: &[f64],
) {
    let iterations = steps.len();
    for (x, p) in steps.iter().enumerate() {
        let w = step_weight(alpha, iterations, x);
        if walks(key) {
            for (o, &v) in a.iter_mut().zip(b) {
                *o = (1.0 - w) * *o + w * v;
            }
        }
        p.apply(key, shape, a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_reaches_alpha_with_shares_growing_evenly() {
        for (alpha, iterations) in [(0.5, 10), (0.3, 4), (1.0, 5), (0.5, 1)] {
            // θ = 0 (A) walked towards 1 (B): after step x, B's share is s·(x + 1).
            let mut theta = 0.0;
            for x in 0..iterations {
                let w = step_weight(alpha, iterations, x);
                theta = (1.0 - w) * theta + w;
                let want = alpha * (x + 1) as f64 / iterations as f64;
                assert!((theta - want).abs() < 1e-12, "{alpha} {iterations} {x}");
            }
        }
    }

    #[test]
    fn the_keys_walked_are_the_spec_s() {
        assert!(walks(
            "model.diffusion_model.input_blocks.1.1.proj_in.weight"
        ));
        assert!(walks("first_stage_model.decoder.norm_out.weight"));
        assert!(walks(
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"
        ));
        assert!(walks(
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        ));
        assert!(!walks(
            "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"
        ));
        assert!(!walks("model_ema.decay"));
        assert!(!walks(
            "cond_stage_model.transformer.text_model.embeddings.position_ids"
        ));
        assert!(!walks("alphas_cumprod"));
    }
}
