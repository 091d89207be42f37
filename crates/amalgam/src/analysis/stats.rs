//! The distances and cosines of a pool, from sums of inner products.
//!
//! For each key the driver computes, in f64, the inner products of the points' differences from a
//! reference point `r` (the base when there is one, else the first model that has the key):
//! `C_ij = ⟨x_i − r, x_j − r⟩`, with `⟨r, x_i − r⟩` and `‖r‖²`. Every figure follows, without the
//! cancellation that raw inner products suffer when models differ by little:
//!
//! - `‖x_i − x_j‖² = C_ii + C_jj − 2 C_ij`;
//! - raw `⟨x_i, x_j⟩ = C_ij + ⟨r, x_i − r⟩ + ⟨r, x_j − r⟩ + ‖r‖²`;
//! - with a base, the task vectors `τ_i = x_i − base` have `⟨τ_i, τ_j⟩ = C_ij`;
//! - the pool mean `x̄` of the models having the key (`k` of them): `‖x_i − x̄‖² = C_ii − 2/k Σ_j C_ij
//!   + 1/k² Σ_jl C_jl`.
//!
//! A group (a block, a component, the whole model) sums these over its keys, so its distance is
//! the L2 distance of the concatenated tensors, and its cosine the cosine of the concatenated
//! vectors. A pair's figures are over the keys both have: a model lacking a key (a pruned VAE)
//! is compared with the others on the keys it has.

use serde::Serialize;

/// The sums of one group of keys over `p` points (the models, then the base when there is one).
#[derive(Clone, Debug)]
pub(crate) struct GroupSums {
    p: usize,
    /// `Σ ‖x_i − x_j‖²` over the keys both have (row-major `p × p`).
    d2: Vec<f64>,
    /// `Σ ⟨x_i, x_j⟩`.
    dot: Vec<f64>,
    /// `Σ ⟨τ_i, τ_j⟩`, with a base.
    task: Vec<f64>,
    /// `Σ ‖x_i‖²` over the keys `i` and `j` both have (row `i`, column `j`).
    dot_own: Vec<f64>,
    /// `Σ ‖τ_i‖²` over the keys `i` and `j` both have.
    task_own: Vec<f64>,
    /// `Σ ‖x_i − x̄‖²` per model.
    to_mean_d2: Vec<f64>,
    /// `Σ ⟨v_i, v̄⟩` per model, `v` the task vectors with a base, the weights without.
    to_mean_dot: Vec<f64>,
    /// `Σ ‖v̄‖²` per model, over the keys it has.
    mean_norm2: Vec<f64>,
    /// The keys `i` and `j` both have (row-major `p × p`; the diagonal: the keys `i` has).
    shared: Vec<usize>,
    /// Keys summed.
    keys: usize,
    /// Elements per point summed.
    elements: u64,
}

/// One key's inner products: what the driver computes from the points' values.
#[derive(Clone, Debug)]
pub(crate) struct KeySums {
    /// The points having the key (indices into the pool: models, then the base).
    pub present: Vec<usize>,
    /// `C` over `present` (row-major).
    pub centred: Vec<f64>,
    /// `⟨r, x_i − r⟩` over `present`.
    pub ref_dot: Vec<f64>,
    /// `‖r‖²`.
    pub ref_norm2: f64,
    /// The key's elements.
    pub elements: u64,
}

impl GroupSums {
    pub(crate) fn new(p: usize) -> Self {
        GroupSums {
            p,
            d2: vec![0.0; p * p],
            dot: vec![0.0; p * p],
            task: vec![0.0; p * p],
            dot_own: vec![0.0; p * p],
            task_own: vec![0.0; p * p],
            to_mean_d2: vec![0.0; p],
            to_mean_dot: vec![0.0; p],
            mean_norm2: vec![0.0; p],
            shared: vec![0; p * p],
            keys: 0,
            elements: 0,
        }
    }

    /// Adds one key. `base` is the base's point index, when the pool has a base (the reference
    /// of every key then).
    pub(crate) fn add(&mut self, k: &KeySums, base: Option<usize>) {
        let s = &k.present;
        let m = s.len();
        let c = |a: usize, b: usize| k.centred[a * m + b];
        let p = self.p;
        for (a, &i) in s.iter().enumerate() {
            for (b, &j) in s.iter().enumerate() {
                self.d2[i * p + j] += (c(a, a) + c(b, b) - 2.0 * c(a, b)).max(0.0);
                self.dot[i * p + j] += c(a, b) + k.ref_dot[a] + k.ref_dot[b] + k.ref_norm2;
                self.dot_own[i * p + j] += c(a, a) + 2.0 * k.ref_dot[a] + k.ref_norm2;
                self.shared[i * p + j] += 1;
                if base.is_some() {
                    self.task[i * p + j] += c(a, b);
                    self.task_own[i * p + j] += c(a, a);
                }
            }
        }
        // The pool mean of the models present (the base is not a model of the pool).
        let models: Vec<usize> = (0..m).filter(|&a| Some(s[a]) != base).collect();
        let kf = models.len() as f64;
        if kf > 0.0 {
            let v = |a: usize, b: usize| match base {
                Some(_) => c(a, b),
                None => c(a, b) + k.ref_dot[a] + k.ref_dot[b] + k.ref_norm2,
            };
            let total_c: f64 = models
                .iter()
                .flat_map(|&a| models.iter().map(move |&b| (a, b)))
                .map(|(a, b)| c(a, b))
                .sum();
            let total_v: f64 = models
                .iter()
                .flat_map(|&a| models.iter().map(move |&b| (a, b)))
                .map(|(a, b)| v(a, b))
                .sum();
            for &a in &models {
                let row_c: f64 = models.iter().map(|&b| c(a, b)).sum();
                let row_v: f64 = models.iter().map(|&b| v(a, b)).sum();
                self.to_mean_d2[s[a]] +=
                    (c(a, a) - 2.0 * row_c / kf + total_c / (kf * kf)).max(0.0);
                self.to_mean_dot[s[a]] += row_v / kf;
                self.mean_norm2[s[a]] += total_v / (kf * kf);
            }
        }
        self.keys += 1;
        self.elements += k.elements;
    }

    /// Adds another group's sums (a key's into its block's, say).
    pub(crate) fn merge(&mut self, o: &GroupSums) {
        let add = |a: &mut Vec<f64>, b: &Vec<f64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.d2, &o.d2);
        add(&mut self.dot, &o.dot);
        add(&mut self.task, &o.task);
        add(&mut self.dot_own, &o.dot_own);
        add(&mut self.task_own, &o.task_own);
        add(&mut self.to_mean_d2, &o.to_mean_d2);
        add(&mut self.to_mean_dot, &o.to_mean_dot);
        add(&mut self.mean_norm2, &o.mean_norm2);
        self.shared
            .iter_mut()
            .zip(&o.shared)
            .for_each(|(a, b)| *a += b);
        self.keys += o.keys;
        self.elements += o.elements;
    }

    /// The cosine of `i` and `j` from their inner products `dot` and norms `own` over the keys
    /// both have.
    fn cos(&self, dot: &[f64], own: &[f64], i: usize, j: usize) -> f64 {
        let p = self.p;
        if self.shared[i * p + j] == 0 {
            return f64::NAN;
        }
        dot[i * p + j] / (own[i * p + j] * own[j * p + i]).sqrt()
    }

    /// `√v` for a pair with keys in common, NaN (no value, `null` in JSON) for one without.
    fn root(&self, i: usize, j: usize, v: f64) -> f64 {
        if self.shared[i * self.p + j] == 0 {
            f64::NAN
        } else {
            v.sqrt()
        }
    }

    /// The inner products and norms cosines are taken of: task vectors with a base, weights
    /// without.
    fn vectors(&self, base: Option<usize>) -> (&[f64], &[f64]) {
        match base {
            Some(_) => (&self.task, &self.task_own),
            None => (&self.dot, &self.dot_own),
        }
    }

    /// The figures of each of the group's `n` models (`base`: the base's point index).
    pub(crate) fn model_stats(&self, n: usize, base: Option<usize>) -> Vec<ModelStats> {
        let p = self.p;
        let (_, own) = self.vectors(base);
        (0..n)
            .map(|i| ModelStats {
                dist_base: base.map(|b| self.root(i, b, self.d2[i * p + b])),
                cos_base: base.map(|b| self.cos(&self.dot, &self.dot_own, i, b)),
                dist_mean: self.root(i, i, self.to_mean_d2[i]),
                cos_mean: self.to_mean_dot[i] / (own[i * p + i] * self.mean_norm2[i]).sqrt(),
            })
            .collect()
    }

    /// The figures of the group's `n` models, with their pairwise matrices.
    pub(crate) fn stats(&self, n: usize, base: Option<usize>) -> GroupStats {
        let p = self.p;
        let (dot, own) = self.vectors(base);
        let models = self.model_stats(n, base);
        let square = |f: &dyn Fn(usize, usize) -> f64| -> Vec<Vec<f64>> {
            (0..n).map(|i| (0..n).map(|j| f(i, j)).collect()).collect()
        };
        GroupStats {
            keys: self.keys,
            elements: self.elements,
            models,
            l2: square(&|i, j| self.root(i, j, self.d2[i * p + j])),
            cos: square(&|i, j| self.cos(dot, own, i, j)),
        }
    }
}

/// One model's figures in a group of keys.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelStats {
    /// `‖x − base‖`: the L2 norm of its task vector (with a base). The figures of a model
    /// without keys in the group (a pruned VAE) are NaN, `null` in JSON.
    pub dist_base: Option<f64>,
    /// The cosine of its weights and the base's (with a base; supermerger's cosine).
    pub cos_base: Option<f64>,
    /// `‖x − x̄‖`, the L2 distance to the pool mean.
    pub dist_mean: f64,
    /// The cosine of its task vector and the pool's mean task vector (with a base), or of its
    /// weights and the pool mean's (without).
    pub cos_mean: f64,
}

/// The figures of a group of keys (one key, a block, a component or the whole model).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GroupStats {
    /// Keys summed.
    pub keys: usize,
    /// Elements of one model summed.
    pub elements: u64,
    /// Per model, in pool order.
    pub models: Vec<ModelStats>,
    /// Pairwise L2 distances `‖x_i − x_j‖` (N × N).
    pub l2: Vec<Vec<f64>>,
    /// Pairwise cosines: of the task vectors with a base, of the weights without (N × N).
    pub cos: Vec<Vec<f64>>,
}
