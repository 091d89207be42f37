//! Git Re-Basin weight matching (Ainsworth et al. 2022, Alg. 2; spec §15) over the permutation
//! groups of [`crate::layout::perms`]: for each group `p` of width `n`, with `a` and the reference
//! seen through the group's windows as `n` rows each,
//!
//! ```text
//! A_p[i, j] = Σ_windows ⟨ref_i, a_j⟩        π_p = argmax_π Σ_i A_p[i, π(i)]   (exact, [`lap`])
//! ```
//!
//! and `a` is permuted so that its unit `π(i)` takes place `i`. amalgam's groups act on one axis
//! of each key (none touches the residual stream), so they do not interact: one assignment per
//! group is the coordinate-descent optimum, and groups are solved in any order with the same
//! result. Groups sharing keys (the heads of one attention) are read together, one set of keys
//! at a time per thread: memory is the largest set's tensors in f64 for both models.

pub mod driver;
pub mod lap;
pub mod merge_many;

use crate::error::{Error, Result};
use crate::io::input::ModelFile;
use crate::layout::perms::{permute_key, PermGroup};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// A permutation of every group, applied to whole tensors.
#[derive(Clone, Debug)]
pub struct Permutations {
    /// The groups.
    pub groups: Vec<PermGroup>,
    /// One permutation per group: window index `i` takes index `perms[g][i]`.
    pub perms: Vec<Vec<usize>>,
    /// Per key, the groups with a window on it whose permutation is not the identity.
    by_key: BTreeMap<&'static str, Vec<usize>>,
    /// Keys some group has a window on (permuted or not).
    touched: std::collections::BTreeSet<&'static str>,
}

impl Permutations {
    /// `perms` of `groups` (one each, of the group's width).
    pub fn new(groups: Vec<PermGroup>, perms: Vec<Vec<usize>>) -> Self {
        assert_eq!(groups.len(), perms.len());
        let mut by_key: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
        let mut touched = std::collections::BTreeSet::new();
        for (g, group) in groups.iter().enumerate() {
            let moves = perms[g].iter().enumerate().any(|(i, &j)| i != j);
            for w in &group.windows {
                touched.insert(w.key);
                if moves {
                    let list = by_key.entry(w.key).or_default();
                    if list.last() != Some(&g) {
                        list.push(g);
                    }
                }
            }
        }
        Permutations {
            groups,
            perms,
            by_key,
            touched,
        }
    }

    /// Random permutations: group `g`'s from the counter-based stream keyed by (seed, its name).
    pub fn random(groups: Vec<PermGroup>, seed: u64) -> Self {
        let perms = groups
            .iter()
            .map(|g| crate::rng::permutation(seed, &g.name, 0, g.width))
            .collect();
        Self::new(groups, perms)
    }

    /// Whether some group has a window on key `key` (whether or not its permutation moves it).
    pub fn touches(&self, key: &str) -> bool {
        self.touched.contains(key)
    }

    /// Permutes the row-major tensor `data` of key `key` and shape `shape` in place.
    pub fn apply(&self, key: &str, shape: &[usize], data: &mut [f64]) {
        for &g in self.by_key.get(key).into_iter().flatten() {
            permute_key(&self.groups[g], &self.perms[g], key, shape, data);
        }
    }

    /// How many groups are not the identity.
    pub fn changed(&self) -> usize {
        self.perms
            .iter()
            .filter(|p| p.iter().enumerate().any(|(i, &j)| i != j))
            .count()
    }
}

/// What weight matching found.
#[derive(Clone, Debug)]
pub struct Matching {
    /// The permutations of `a` towards the reference.
    pub permutations: Permutations,
    /// `Σ_p ⟨A_p, I⟩`: the models' agreement as they are.
    pub before: f64,
    /// `Σ_p ⟨A_p, P_π⟩`: after the permutations (at least `before`).
    pub after: f64,
}

/// One group solved: its index, its permutation, the objective before and after.
struct Solved {
    group: usize,
    perm: Vec<usize>,
    before: f64,
    after: f64,
}

/// The rows of the window of `group` on `key` (an `n × rest` matrix, row-major).
fn window_rows(
    data: &[f64],
    shape: &[usize],
    axis: usize,
    offset: usize,
    width: usize,
) -> Vec<f64> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let len = shape[axis];
    let mut rows = vec![0.0; width * outer * inner];
    for i in 0..width {
        for o in 0..outer {
            let from = (o * len + offset + i) * inner;
            let to = (i * outer + o) * inner;
            rows[to..to + inner].copy_from_slice(&data[from..from + inner]);
        }
    }
    rows
}

/// Sets of groups that share keys (union over keys), each sorted, in order of their first group.
pub(crate) fn key_sets(groups: &[PermGroup]) -> Vec<Vec<usize>> {
    let mut parent: Vec<usize> = (0..groups.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    let mut owner: BTreeMap<&str, usize> = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        for w in &group.windows {
            match owner.get(w.key) {
                Some(&h) => {
                    let (a, b) = (root(&mut parent, g), root(&mut parent, h));
                    parent[a.max(b)] = a.min(b);
                }
                None => {
                    owner.insert(w.key, g);
                }
            }
        }
    }
    let mut sets: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for g in 0..groups.len() {
        let r = root(&mut parent, g);
        sets.entry(r).or_default().push(g);
    }
    sets.into_values().collect()
}

/// Weight matching of `a` to `reference` over `groups` (which must not interact: every key's
/// windows on one axis), with `threads` workers (0: one per core); the result does not depend
/// on the thread count.
pub fn weight_matching(
    a: &ModelFile,
    reference: &ModelFile,
    groups: Vec<PermGroup>,
    threads: usize,
    progress: &dyn crate::Progress,
) -> Result<Matching> {
    let mut axis_of: BTreeMap<&str, usize> = BTreeMap::new();
    for g in &groups {
        for w in &g.windows {
            if *axis_of.entry(w.key).or_insert(w.axis) != w.axis {
                return Err(Error::Invalid(format!(
                    "`{}` is permuted on two axes: groups that interact are not supported",
                    w.key
                )));
            }
        }
    }
    let sets = key_sets(&groups);
    // Progress: the bytes of `a`'s keys each set reads.
    let set_bytes = |set: &[usize]| -> u64 {
        let keys: std::collections::BTreeSet<&str> = set
            .iter()
            .flat_map(|&g| groups[g].windows.iter().map(|w| w.key))
            .collect();
        keys.iter()
            .filter_map(|k| a.tensor(k))
            .map(|t| (t.numel() * t.dtype.bitsize() / 8) as u64)
            .sum()
    };
    progress.start(sets.iter().map(|s| set_bytes(s)).sum(), sets.len());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let pool = crate::engine::thread_pool(threads)?;
    let solved: Vec<Vec<Solved>> = pool.install(|| {
        sets.par_iter()
            .map(|set| {
                let solved = solve_set(a, reference, &groups, set)?;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let first = groups[set[0]].name.as_str();
                progress.advance(set_bytes(set), n, first);
                Ok(solved)
            })
            .collect::<Result<_>>()
    })?;
    progress.finish();
    let mut perms: Vec<Vec<usize>> = groups.iter().map(|g| (0..g.width).collect()).collect();
    let (mut before, mut after) = (0.0, 0.0);
    for s in solved.into_iter().flatten() {
        perms[s.group] = s.perm;
        before += s.before;
        after += s.after;
    }
    Ok(Matching {
        permutations: Permutations::new(groups, perms),
        before,
        after,
    })
}

/// The keys of one key set: each key's shape and its values in every model (in model order).
pub(crate) type SetTensors = BTreeMap<&'static str, (Vec<usize>, Vec<Vec<f64>>)>;

/// Reads the keys of the groups `set` from every model, checking that they agree in shape.
pub(crate) fn read_set(
    models: &[&ModelFile],
    groups: &[PermGroup],
    set: &[usize],
) -> Result<SetTensors> {
    let mut tensors = SetTensors::new();
    for &g in set {
        for w in &groups[g].windows {
            if tensors.contains_key(w.key) {
                continue;
            }
            let shape = models[0]
                .tensor(w.key)
                .map(|t| t.shape.clone())
                .ok_or_else(|| Error::Invalid(format!("the model lacks `{}`", w.key)))?;
            let mut values = Vec::with_capacity(models.len());
            for m in models {
                if m.tensor(w.key).map(|t| &t.shape) != Some(&shape) {
                    return Err(Error::Invalid(format!(
                        "`{}` has another shape (or none) in {}",
                        w.key,
                        m.path().display()
                    )));
                }
                values.push(m.read_tensor::<f64>(w.key)?);
            }
            tensors.insert(w.key, (shape, values));
        }
    }
    Ok(tensors)
}

/// Group `group`'s units in model `t`: `width` rows, its windows' rows side by side; and the
/// row length.
pub(crate) fn group_rows(tensors: &SetTensors, group: &PermGroup, t: usize) -> (Vec<f64>, usize) {
    let n = group.width;
    let parts: Vec<Vec<f64>> = group
        .windows
        .iter()
        .map(|w| {
            let (shape, values) = &tensors[w.key];
            window_rows(&values[t], shape, w.axis, w.offset, n)
        })
        .collect();
    let cols: usize = parts.iter().map(|p| p.len() / n).sum();
    let mut rows = Vec::with_capacity(n * cols);
    for i in 0..n {
        for p in &parts {
            let c = p.len() / n;
            rows.extend_from_slice(&p[i * c..(i + 1) * c]);
        }
    }
    (rows, cols)
}

/// `A[i, k] = ⟨x_i, y_k⟩` of two row-major `n × c` matrices (faer, sequential).
pub(crate) fn cross(x: &[f64], y: &[f64], n: usize, c: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    let mx = faer::MatRef::from_row_major_slice(x, n, c);
    let my = faer::MatRef::from_row_major_slice(y, n, c);
    let mut m = faer::MatMut::from_row_major_slice_mut(&mut out, n, n);
    faer::linalg::matmul::matmul(
        m.as_mut(),
        faer::Accum::Replace,
        mx,
        my.transpose(),
        1.0,
        faer::Par::Seq,
    );
    out
}

/// `Σ_i a[i, p(i)]`.
pub(crate) fn objective(a: &[f64], p: &[usize]) -> f64 {
    let n = p.len();
    (0..n).map(|i| a[i * n + p[i]]).sum()
}

/// Solves the groups of one key set.
fn solve_set(
    a: &ModelFile,
    reference: &ModelFile,
    groups: &[PermGroup],
    set: &[usize],
) -> Result<Vec<Solved>> {
    let tensors = read_set(&[a, reference], groups, set)?;
    let mut out = Vec::with_capacity(set.len());
    for &g in set {
        let group = &groups[g];
        let n = group.width;
        let (ra, c) = group_rows(&tensors, group, 0);
        let (rr, _) = group_rows(&tensors, group, 1);
        let cost = cross(&rr, &ra, n, c);
        let identity: Vec<usize> = (0..n).collect();
        let perm = lap::maximize(&cost, n);
        let (before, after) = (objective(&cost, &identity), objective(&cost, &perm));
        // Keep the identity unless the assignment is strictly better (ties stay put).
        out.push(if after > before {
            Solved {
                group: g,
                perm,
                before,
                after,
            }
        } else {
            Solved {
                group: g,
                perm: identity,
                before,
                after: before,
            }
        });
    }
    Ok(out)
}
