//! Whole-model permutation methods (Git Re-Basin, spec §15): `rebasin(a, ref)`, `a` with its
//! hidden units permuted towards `ref` by weight matching; `randperm(a)`, `a` with every group
//! permuted at random (seeded): the same function, other weights; and `merge_many(models)`,
//! the mean of the models after MergeMany's matching.
//!
//! Both need the whole model before any key is merged: the engine prepares them (weight matching
//! reads `a` and `ref`, merging a node input once to a temporary file first; the random
//! permutations come from the seed), then each key is `a`'s, permuted where a group acts on it
//! (the key gathered whole) and passed through elsewhere.

use super::svd::shared::{computed_or, Source, WholeMatrix};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use crate::rebasin::Permutations;
use std::ops::Range;
use std::sync::Arc;

/// `rebasin`'s declaration.
pub static REBASIN: MethodInfo = MethodInfo {
    name: "rebasin",
    formula: "P(a): a's hidden units permuted, per group, by argmax_P <ref, P(a)> (weight \
              matching, an exact assignment per group)",
    summary: "Git Re-Basin weight matching (sd-mecha's rebasin semantics): a with the hidden \
              units of every attention head, feed-forward and embedding MLP permuted towards \
              ref; the same function as a. SD1 and SDXL. Whole models: a node input is merged \
              once to a temporary file.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model permuted",
        },
        Slot {
            name: "ref",
            kind: SlotKind::One,
            doc: "the model it is matched to",
        },
    ],
    params: &[],
};

/// `randperm`'s declaration.
pub static RANDPERM: MethodInfo = MethodInfo {
    name: "randperm",
    formula: "P(a): every permutation group of a permuted at random (seeded by the run's seed \
              and the group)",
    summary: "a with its hidden units permuted at random: the same function, other weights (for \
              testing re-basin). SD1 and SDXL.",
    slots: &[Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "the model permuted",
    }],
    params: &[],
};

/// `merge_many`'s declaration.
pub static MERGE_MANY: MethodInfo = MethodInfo {
    name: "merge_many",
    formula: "(1/N) sum_t P_t(theta_t), each P_t matching model t to the mean of the others \
              (MergeMany, repeated until no permutation changes; P_1 = identity)",
    summary: "Git Re-Basin's MergeMany: every model's hidden units matched to the mean of the \
              others in turn, then the permuted models averaged (in the first model's unit \
              order). SD1 and SDXL. Whole models: node inputs are merged once to temporary files.",
    slots: &[Slot {
        name: "models",
        kind: SlotKind::Many,
        doc: "the models matched and averaged",
    }],
    params: &[ParamInfo::count(
        "max_rounds",
        10,
        "the most rounds per group (a round matches every model once; it stops earlier when \
         none changes)",
    )],
};

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
        // A key some model lacks would be averaged without it, unpermuted: the first model's.
        if present[0] {
            OnMissing::PassThrough(0)
        } else {
            OnMissing::Absent
        }
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
