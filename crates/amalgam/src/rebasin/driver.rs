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
//! permutations of every step are kept; the streamed pass replays the walk key by key. The
//! matching itself walks the groups' cost matrices, not the tensors (see [`walk_group`]).

use super::{cross, group_rows, key_sets, lap, objective, read_set, Permutations, SetTensors};
use crate::error::{Error, Result};
use crate::io::input::ModelFile;
use crate::layout::perms::PermGroup;
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
    let pool = crate::engine::thread_pool(threads)?;
    progress.start(sets.len() as u64, sets.len());
    let done = std::sync::atomic::AtomicUsize::new(0);
    // Per set: per group, its permutation at each step.
    type Steps = Vec<(usize, Vec<Vec<usize>>)>;
    let solved: Vec<Steps> = pool.install(|| {
        sets.par_iter()
            .map(|set| {
                let t = read_set(&[a, b], &groups, set)?;
                let steps = set
                    .iter()
                    .map(|&g| walk_group(&t, &groups[g], alpha, iterations))
                    .collect::<Vec<_>>();
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress.advance(1, n, &groups[set[0]].name);
                Ok(set.iter().copied().zip(steps).collect())
            })
            .collect::<Result<_>>()
    })?;
    progress.finish();
    let mut perms: Vec<Vec<Vec<usize>>> = (0..iterations)
        .map(|_| groups.iter().map(|g| (0..g.width).collect()).collect())
        .collect();
    for (g, steps) in solved.into_iter().flatten() {
        for (x, p) in steps.into_iter().enumerate() {
            perms[x][g] = p;
        }
    }
    Ok(perms
        .into_iter()
        .map(|p| Permutations::new(groups.clone(), p))
        .collect())
}

/// One group's permutation at each step of the walk. The walk is linear in `θ`, so its cost
/// matrix `C[i, k] = ⟨A_i, θ_k⟩` walks too, with no tensor touched: `C ← (1 − w)C + w·⟨A, B⟩`
/// for the windows on walked keys (the others keep `⟨A, A⟩`), and a permutation `P` of `θ`'s
/// units permutes `C`'s columns. Two cross products per group, whatever the number of steps.
fn walk_group(t: &SetTensors, group: &PermGroup, alpha: f64, iterations: usize) -> Vec<Vec<usize>> {
    let n = group.width;
    let part = |walked: bool, model: usize| {
        let windows: Vec<_> = group
            .windows
            .iter()
            .filter(|w| walks(w.key) == walked)
            .cloned()
            .collect();
        let sub = PermGroup {
            name: group.name.clone(),
            width: n,
            windows,
        };
        (!sub.windows.is_empty()).then(|| group_rows(t, &sub, model))
    };
    let zero = || vec![0.0; n * n];
    // Walked windows: ⟨A, θ⟩ starts at ⟨A, A⟩ and moves towards ⟨A, B⟩.
    let (mut walked, towards) = match (part(true, 0), part(true, 1)) {
        (Some((ra, c)), Some((rb, _))) => (cross(&ra, &ra, n, c), cross(&ra, &rb, n, c)),
        _ => (zero(), zero()),
    };
    let mut fixed = part(false, 0).map_or_else(zero, |(ra, c)| cross(&ra, &ra, n, c));
    let identity: Vec<usize> = (0..n).collect();
    let mut steps = Vec::with_capacity(iterations);
    for x in 0..iterations {
        let w = step_weight(alpha, iterations, x);
        for (c, &to) in walked.iter_mut().zip(&towards) {
            *c = (1.0 - w) * *c + w * to;
        }
        let cost: Vec<f64> = walked.iter().zip(&fixed).map(|(a, b)| a + b).collect();
        let p = lap::maximize(&cost, n);
        let p = if objective(&cost, &p) > objective(&cost, &identity) {
            p
        } else {
            identity.clone()
        };
        if p != identity {
            for c in [&mut walked, &mut fixed] {
                let old = c.clone();
                for i in 0..n {
                    for k in 0..n {
                        c[i * n + k] = old[i * n + p[k]];
                    }
                }
            }
        }
        steps.push(p);
    }
    steps
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
