//! `truncate_kronecker` (sd-mecha 1.1.8, `merge_methods/kronecker.py`): each key of two or more
//! dimensions `[m, n, rest…]` replaced by its best approximation `w1 ⊗ w2` as one Kronecker
//! product, `w1` of `[m1, n1]` and `w2` of `[m2, n2, rest…]` (`m = m1·m2`, `n = n1·n2`): the
//! rank-1 SVD of the rearranged matrix `R[(i1, j1), (i2, j2, e)] = a[i1·m2 + i2, j1·n2 + j2, e]`
//! (Van Loan and Pitsianis), `w1 = √σ·u`, `w2 = √σ·v`. The other keys are unchanged.
//!
//! The factor shapes are sd-mecha's `kron_dims_from_ratio`: among the divisor pairs, the one
//! whose `log(m1·n1) − log √(mn)` is nearest `(2·ratio − 1)` times the largest such offset, ties
//! to the most balanced. The SVD is exact, or randomized (sd-mecha's default
//! `use_approximate_basis`) with a test matrix seeded by (seed, key).

use super::spectrum::{polar_bytes, randomized_svd, thin_svd};
use crate::error::Result;
use crate::method::*;
use crate::methods::mecha::{whole_unit, Gather};
use crate::real::Real;
use std::ops::Range;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "truncate_kronecker",
    origins: &[Origin::SdMecha],
    formula: "w1 kron w2, the best single Kronecker product (rank-1 SVD of a rearranged), keys of \
              2 or more dimensions; a (the others)",
    summary: "sd-mecha's truncate_kronecker: each matrix's nearest single Kronecker product, the \
              factor shapes set by kronecker_ratio. Needs each key whole.",
    slots: &[Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "the model (or delta) to approximate",
    }],
    params: &[
        ParamInfo::number(
            "kronecker_ratio",
            0.5,
            "the first factor's size: 0 the smallest (m1 n1 = 1), 1 the largest, 0.5 about \
             sqrt(numel)",
        ),
        ParamInfo::choice(
            "svd",
            &["randomized", "exact"],
            "randomized",
            "`randomized`: the leading triplet from Halko's range finder with a test matrix \
             seeded by (seed, key) and `power_iterations` (sd-mecha's default \
             use_approximate_basis, there unseeded); `exact`: a full thin SVD",
        ),
        ParamInfo::count(
            "power_iterations",
            2,
            "power iterations of the randomized range finder (sd-mecha's approximate_basis_iters)",
        ),
    ],
};

/// Extra columns of the randomized range finder's test matrix beyond the rank.
const OVERSAMPLING: usize = 10;

pub(crate) struct TruncateKronecker {
    ratio: f64,
    randomized: bool,
    power_iterations: usize,
}

impl TruncateKronecker {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let ratio = params.number("kronecker_ratio")?;
        let randomized = params.choice("svd")? == "randomized";
        let power_iterations = params.count("power_iterations")?;
        params.finish()?;
        Ok(TruncateKronecker {
            ratio,
            randomized,
            power_iterations,
        })
    }
}

fn divisors(n: usize) -> Vec<usize> {
    let mut ds = Vec::new();
    let mut d = 1;
    while d * d <= n {
        if n % d == 0 {
            ds.push(d);
            if d != n / d {
                ds.push(n / d);
            }
        }
        d += 1;
    }
    ds.sort_unstable();
    ds
}

/// sd-mecha's `kron_dims_from_ratio`: `(m1, m2, n1, n2)` for a key of `shape` (2 or more
/// dimensions, none 0).
pub fn kron_dims(shape: &[usize], ratio: f64) -> (usize, usize, usize, usize) {
    let (m, n) = (shape[0], shape[1]);
    let numel: usize = shape.iter().product();
    let log_sqrt_numel = 0.5 * (numel as f64).ln();
    let mut candidates = Vec::new();
    let (mut s_min, mut s_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for m1 in divisors(m) {
        let m2 = m / m1;
        for n1 in divisors(n) {
            let n2 = n / n1;
            let s = ((m1 * n1) as f64).ln() - log_sqrt_numel;
            let bal = (m1 as f64 / m2 as f64).ln().abs() + (n1 as f64 / n2 as f64).ln().abs();
            candidates.push((s, bal, (m1, m2, n1, n2)));
            s_min = s_min.min(s);
            s_max = s_max.max(s);
        }
    }
    let s_range = s_min.abs().max(s_max.abs());
    let key = |c: &(f64, f64, (usize, usize, usize, usize)), target: Option<f64>| match target {
        Some(t) => ((c.0 - t).abs(), c.1),
        None => (c.1, 0.0),
    };
    let target = (s_range != 0.0).then_some((2.0 * ratio - 1.0) * s_range);
    // The first of the least keys (Python's `min` and the strict `<` of sd-mecha's loop).
    let mut best = &candidates[0];
    for c in &candidates[1..] {
        if key(c, target) < key(best, target) {
            best = c;
        }
    }
    best.2
}

impl<T: Real> Method<T> for TruncateKronecker {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let dims =
            (ctx.shape.len() >= 2 && ctx.numel() > 0).then(|| kron_dims(ctx.shape, self.ratio));
        Ok(Box::new(KronKey {
            shape: ctx.shape.to_vec(),
            dims,
            randomized: self.randomized.then_some((ctx.seed, self.power_iterations)),
            key: ctx.key.to_string(),
            result: Vec::new(),
        }))
    }
}

struct KronKey {
    shape: Vec<usize>,
    /// `(m1, m2, n1, n2)`; `None` for the keys passed through.
    dims: Option<(usize, usize, usize, usize)>,
    randomized: Option<(u64, usize)>,
    key: String,
    /// After the pass: `w1 ⊗ w2`, row-major in the key's shape.
    result: Vec<f64>,
}

impl KronKey {
    /// The rearranged matrix's shape and, for each of its entries in row-major order, the index
    /// of the key's element it holds.
    fn rearranged(&self) -> ((usize, usize), impl Iterator<Item = usize> + '_) {
        let (m1, m2, n1, n2) = self.dims.expect("a key approximated");
        let n = self.shape[1];
        let p: usize = self.shape[2..].iter().product();
        let rows = m1 * n1;
        let cols = m2 * n2 * p;
        let at = move |(r, c): (usize, usize)| {
            let (i1, j1) = (r / n1, r % n1);
            let (i2, rest) = (c / (n2 * p), c % (n2 * p));
            let (j2, e) = (rest / p, rest % p);
            ((i1 * m2 + i2) * n + (j1 * n2 + j2)) * p + e
        };
        (
            (rows, cols),
            (0..rows).flat_map(move |r| (0..cols).map(move |c| at((r, c)))),
        )
    }
}

impl<T: Real> KeyMerge<T> for KronKey {
    fn stat_passes(&self) -> usize {
        usize::from(self.dims.is_some())
    }
    fn unit(&self) -> Unit {
        match self.dims {
            Some((m1, m2, n1, n2)) => {
                let numel: usize = self.shape.iter().product();
                let p = numel / (m1 * m2 * n1 * n2);
                let mut u = whole_unit(
                    numel,
                    8 * 2,
                    "the whole key of truncate_kronecker and its SVD",
                );
                u.bytes += polar_bytes(m1 * n1, m2 * n2 * p);
                u
            }
            None => Unit::ELEMENT,
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        if self.dims.is_none() {
            return Ok(());
        }
        let a = passes
            .run(Gather::new(1))?
            .args
            .pop()
            .expect("one argument");
        let ((rows, cols), order) = self.rearranged();
        let order: Vec<usize> = order.collect();
        let r: Vec<f64> = order.iter().map(|&i| a[i]).collect();
        drop(a);
        let (u, sigma, v) = match self.randomized {
            Some(how) => randomized_svd(&r, (rows, cols), 1 + OVERSAMPLING, how, &self.key)?,
            None => thin_svd(&r, rows, cols, &self.key)?,
        };
        drop(r);
        let s = sigma.first().copied().unwrap_or(0.0).sqrt();
        let w1: Vec<f64> = (0..rows).map(|i| u[(i, 0)] * s).collect();
        let w2: Vec<f64> = (0..cols).map(|j| s * v[(j, 0)]).collect();
        let mut result = vec![0.0; rows * cols];
        for (k, &i) in order.iter().enumerate() {
            result[i] = w1[k / cols] * w2[k % cols];
        }
        self.result = result;
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        if self.dims.is_none() {
            out.copy_from_slice(&args[0][..out.len()]);
            return;
        }
        for (o, &v) in out.iter_mut().zip(&self.result[range]) {
            *o = T::from_f64(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_shapes_follow_the_ratio() {
        // A square 4x4: 0.5 balances (2x2 ⊗ 2x2), 0 and 1 the extremes.
        assert_eq!(kron_dims(&[4, 4], 0.5), (2, 2, 2, 2));
        assert_eq!(kron_dims(&[4, 4], 0.0), (1, 4, 1, 4));
        assert_eq!(kron_dims(&[4, 4], 1.0), (4, 1, 4, 1));
    }
}
