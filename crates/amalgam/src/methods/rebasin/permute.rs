//! The mean of the inputs, each permuted by its prepared permutations (`rebasin`, `randperm`,
//! `merge_many`): a key some group acts on is gathered whole from every input; the others pass
//! through (one input) or are averaged.

use crate::error::Result;
use crate::method::*;
use crate::methods::svd::shared::{computed_or, Source, WholeMatrix};
use crate::real::Real;
use crate::rebasin::Permutations;
use std::ops::Range;
use std::sync::Arc;

/// The mean of the arguments, each permuted by its prepared permutations (one argument: it
/// permuted).
pub(crate) struct Permute {
    info: &'static MethodInfo,
    perms: Vec<Arc<Permutations>>,
}

impl Permute {
    pub(crate) fn new(info: &'static MethodInfo, perms: Vec<Arc<Permutations>>) -> Self {
        Permute { info, perms }
    }
}

impl<T: Real> Method<T> for Permute {
    fn info(&self) -> &'static MethodInfo {
        self.info
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        // A key some input lacks is the first input's, unpermuted (permuted keys are in every
        // model of a layout).
        OnMissing::first_or_absent(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let touched = self.perms[0].touches(ctx.key);
        Ok(Box::new(PermuteKey {
            perms: touched.then(|| self.perms.clone()),
            key: ctx.key.to_string(),
            shape: ctx.shape.to_vec(),
            out: Vec::new(),
        }))
    }
}

struct PermuteKey {
    /// For a key some group acts on: each argument's permutations.
    perms: Option<Vec<Arc<Permutations>>>,
    key: String,
    shape: Vec<usize>,
    /// After the passes: the mean of the permuted arguments.
    out: Vec<f64>,
}

impl<T: Real> KeyMerge<T> for PermuteKey {
    fn stat_passes(&self) -> usize {
        self.perms.as_ref().map_or(0, Vec::len)
    }
    fn unit(&self) -> Unit {
        match self.perms {
            Some(_) => Unit {
                len: 1,
                bytes: 16 * self.shape.iter().product::<usize>() as u64,
                what: "a permuted key, whole",
            },
            None => Unit::ELEMENT,
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let Some(perms) = &self.perms else {
            return Ok(());
        };
        for (t, p) in perms.iter().enumerate() {
            let mut data = passes.run(WholeMatrix::new(Source::Arg(t)))?.sum;
            p.apply(&self.key, &self.shape, &mut data);
            if t == 0 {
                self.out = data;
            } else {
                self.out.iter_mut().zip(&data).for_each(|(o, x)| *o += x);
            }
        }
        if perms.len() > 1 {
            let n = perms.len() as f64;
            self.out.iter_mut().for_each(|o| *o /= n);
        }
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        if self.perms.is_some() {
            return computed_or(Some(&self.out[range]), args[0], out);
        }
        if args.len() == 1 {
            return computed_or(None, args[0], out);
        }
        // Keys no group acts on: the plain mean, summed in f64 in model order.
        let n = args.len() as f64;
        for (i, o) in out.iter_mut().enumerate() {
            let s: f64 = args.iter().map(|a| a[i].to_f64()).sum();
            *o = T::from_f64(s / n);
        }
    }
}
