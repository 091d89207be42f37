//! `rebasin_merge` and `basin_sum`: the SD driver's walk from `a` to `b`, replayed key by key
//! from the prepared permutations of its steps (see [`crate::rebasin::driver`]); `basin_sum`
//! mixes the walk's end back with the plain weighted sum.

use crate::error::Result;
use crate::method::*;
use crate::methods::svd::shared::{Source, WholeMatrix};
use crate::real::Real;
use crate::rebasin::driver::{replay, step_weight, walks};
use crate::rebasin::Permutations;
use std::ops::Range;
use std::sync::Arc;

pub(crate) struct Walk {
    info: &'static MethodInfo,
    steps: Arc<Vec<Arc<Permutations>>>,
    alpha: f64,
    basin_sum: bool,
}

impl Walk {
    pub(crate) fn new(
        info: &'static MethodInfo,
        steps: Vec<Arc<Permutations>>,
        alpha: f64,
        basin_sum: bool,
    ) -> Self {
        Walk {
            info,
            steps: Arc::new(steps),
            alpha,
            basin_sum,
        }
    }
}

impl<T: Real> Method<T> for Walk {
    fn info(&self) -> &'static MethodInfo {
        self.info
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::first_or_absent(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(WalkKey {
            steps: self.steps.clone(),
            alpha: self.alpha,
            basin_sum: self.basin_sum,
            touched: self.steps.first().is_some_and(|s| s.touches(ctx.key)),
            weights: (0..self.steps.len())
                .map(|x| step_weight(self.alpha, self.steps.len(), x))
                .collect(),
            walks: walks(ctx.key),
            key: ctx.key.to_string(),
            shape: ctx.shape.to_vec(),
            out: Vec::new(),
        }))
    }
}

struct WalkKey {
    steps: Arc<Vec<Arc<Permutations>>>,
    alpha: f64,
    basin_sum: bool,
    /// Some group acts on the key: it is gathered whole.
    touched: bool,
    /// The walk changes the key (else it stays `a`'s).
    walks: bool,
    /// The weight of `b` at each step.
    weights: Vec<f64>,
    key: String,
    shape: Vec<usize>,
    /// After the passes, for a touched key: the result.
    out: Vec<f64>,
}

impl WalkKey {
    /// The result at one element from the walk's end `theta`, `a` and `b`.
    fn finish(&self, theta: f64, a: f64, b: f64) -> f64 {
        if self.basin_sum {
            let al = self.alpha;
            al * (al * a + (1.0 - al) * b) + (1.0 - al) * theta
        } else {
            theta
        }
    }
}

impl<T: Real> KeyMerge<T> for WalkKey {
    fn stat_passes(&self) -> usize {
        if self.touched {
            2
        } else {
            0
        }
    }
    fn unit(&self) -> Unit {
        if self.touched {
            Unit {
                len: 1,
                bytes: 24 * self.shape.iter().product::<usize>() as u64,
                what: "a key of the re-basin driver, whole",
            }
        } else {
            Unit::ELEMENT
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        if !self.touched {
            return Ok(());
        }
        let a = passes.run(WholeMatrix::new(Source::Arg(0)))?.sum;
        let b = passes.run(WholeMatrix::new(Source::Arg(1)))?.sum;
        let mut theta = a.clone();
        replay(
            &self.steps,
            self.alpha,
            &self.key,
            &self.shape,
            &mut theta,
            &b,
        );
        self.out = (0..a.len())
            .map(|i| self.finish(theta[i], a[i], b[i]))
            .collect();
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        if self.touched {
            for (o, &v) in out.iter_mut().zip(&self.out[range]) {
                *o = T::from_f64(v);
            }
            return;
        }
        // No group: the walk is element by element (its permutations do not move the key).
        let b = args.get(1);
        for (i, o) in out.iter_mut().enumerate() {
            let a = args[0][i].to_f64();
            let bv = b.map_or(a, |b| b[i].to_f64());
            let mut theta = a;
            if self.walks {
                for &w in &self.weights {
                    theta = (1.0 - w) * theta + w * bv;
                }
            }
            *o = T::from_f64(self.finish(theta, a, bv));
        }
    }
}
