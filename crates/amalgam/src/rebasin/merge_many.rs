//! MergeMany (Git Re-Basin's N-model weight matching, Ainsworth et al. 2022): every model's
//! units matched to the mean of the others, in turn, until no permutation changes; the merge is
//! then the mean of the permuted models. Per group (groups do not interact):
//!
//! ```text
//! repeat:  for t = 1..N−1:  M = mean_{s≠t} P_s(θ_s)    P_t = argmax_P ⟨M, P(θ_t)⟩
//! ```
//!
//! The first model keeps its order (`P_0` = identity: the result is in its unit order, where the
//! paper leaves the frame free), and every other model starts matched to it (pairwise weight
//! matching): matched at once to the mean of models still in their own orders, a model is pulled
//! towards several unit orders and the rounds can stall between them (seen on three permuted
//! copies). The order is fixed, so the result is deterministic.

use super::{cross, group_rows, key_sets, lap, objective, read_set, Permutations};
use crate::error::{Error, Result};
use crate::io::input::ModelFile;
use crate::layout::perms::PermGroup;
use rayon::prelude::*;

/// What MergeMany found.
#[derive(Clone, Debug)]
pub struct ManyMatching {
    /// Per model, its permutations (the first model's are the identity).
    pub permutations: Vec<Permutations>,
    /// The most rounds any group took (each round matches every model once).
    pub rounds: usize,
    /// Σ over groups and models of `⟨mean of the others, the model⟩`, before and after.
    pub before: f64,
    /// After the matching.
    pub after: f64,
}

/// MergeMany of `models` over `groups`, at most `max_rounds` rounds per group.
pub fn merge_many(
    models: &[&ModelFile],
    groups: Vec<PermGroup>,
    max_rounds: usize,
    threads: usize,
    progress: &dyn crate::Progress,
) -> Result<ManyMatching> {
    if models.len() < 2 {
        return Err(Error::Invalid("MergeMany needs at least two models".into()));
    }
    let sets = key_sets(&groups);
    let pool = crate::engine::thread_pool(threads)?;
    progress.start(sets.len() as u64, sets.len());
    let done = std::sync::atomic::AtomicUsize::new(0);
    type Found = (usize, Vec<Vec<usize>>, usize, f64, f64);
    let solved: Vec<Vec<Found>> = pool.install(|| {
        sets.par_iter()
            .map(|set| {
                let tensors = read_set(models, &groups, set)?;
                let out = set
                    .iter()
                    .map(|&g| {
                        let group = &groups[g];
                        let rows: Vec<(Vec<f64>, usize)> = (0..models.len())
                            .map(|t| group_rows(&tensors, group, t))
                            .collect();
                        let (perms, rounds, before, after) =
                            solve_group(group.width, &rows, max_rounds);
                        (g, perms, rounds, before, after)
                    })
                    .collect::<Vec<_>>();
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress.advance(1, n, &groups[set[0]].name);
                Ok(out)
            })
            .collect::<Result<_>>()
    })?;
    progress.finish();
    let n = models.len();
    let mut per_model: Vec<Vec<Vec<usize>>> = (0..n)
        .map(|_| groups.iter().map(|g| (0..g.width).collect()).collect())
        .collect();
    let (mut rounds, mut before, mut after) = (0, 0.0, 0.0);
    for (g, perms, r, b, a) in solved.into_iter().flatten() {
        for (t, p) in perms.into_iter().enumerate() {
            per_model[t][g] = p;
        }
        rounds = rounds.max(r);
        before += b;
        after += a;
    }
    Ok(ManyMatching {
        permutations: per_model
            .into_iter()
            .map(|perms| Permutations::new(groups.clone(), perms))
            .collect(),
        rounds,
        before,
        after,
    })
}

/// One group: each model's permutation, the rounds taken, and the objective before and after.
fn solve_group(
    n: usize,
    rows: &[(Vec<f64>, usize)],
    max_rounds: usize,
) -> (Vec<Vec<usize>>, usize, f64, f64) {
    let models = rows.len();
    let c = rows[0].1;
    // Start from each model matched to the first (the frame): matched to the mean of models
    // still in their own orders, a model would be pulled towards several patterns at once.
    let identity: Vec<usize> = (0..n).collect();
    let mut perms: Vec<Vec<usize>> = vec![identity.clone(); models];
    for t in 1..models {
        let a = cross(&rows[0].0, &rows[t].0, n, c);
        let p = lap::maximize(&a, n);
        if objective(&a, &p) > objective(&a, &identity) {
            perms[t] = p;
        }
    }
    // Σ_t P_t(θ_t), kept up to date.
    let mut sum = vec![0.0; n * c];
    let permuted = |t: usize, p: &[usize], out: &mut [f64], sign: f64| {
        for i in 0..n {
            let from = &rows[t].0[p[i] * c..(p[i] + 1) * c];
            for (o, &x) in out[i * c..(i + 1) * c].iter_mut().zip(from) {
                *o += sign * x;
            }
        }
    };
    for (t, p) in perms.iter().enumerate() {
        permuted(t, p, &mut sum, 1.0);
    }
    let total = |perms: &[Vec<usize>], sum: &[f64]| -> f64 {
        (0..models)
            .map(|t| {
                let mut others = sum.to_vec();
                permuted(t, &perms[t], &mut others, -1.0);
                let a = cross(&others, &rows[t].0, n, c);
                objective(&a, &perms[t])
            })
            .sum::<f64>()
            / (models - 1) as f64
    };
    // The agreement of the models as they come (every permutation the identity).
    let mut plain = vec![0.0; n * c];
    for t in 0..models {
        permuted(t, &identity, &mut plain, 1.0);
    }
    let before = total(&vec![identity.clone(); models], &plain);
    let mut rounds = 0;
    for _ in 0..max_rounds.max(1) {
        rounds += 1;
        let mut changed = false;
        for t in 1..models {
            let mut others = sum.clone();
            permuted(t, &perms[t], &mut others, -1.0);
            let a = cross(&others, &rows[t].0, n, c);
            let p = lap::maximize(&a, n);
            if objective(&a, &p) > objective(&a, &perms[t]) {
                permuted(t, &perms[t], &mut sum, -1.0);
                permuted(t, &p, &mut sum, 1.0);
                perms[t] = p;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let after = total(&perms, &sum);
    (perms, rounds, before, after)
}
