//! Whole-model permutation methods (Git Re-Basin, spec §15): `rebasin(a, ref)`, `a` with its
//! hidden units permuted towards `ref` by weight matching, and `randperm(a)`, `a` with every
//! group permuted at random (seeded): the same function, other weights.
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

/// `a` permuted by prepared permutations.
pub(crate) struct Permute {
    info: &'static MethodInfo,
    perms: Arc<Permutations>,
}

impl Permute {
    pub(crate) fn new(info: &'static MethodInfo, perms: Arc<Permutations>) -> Self {
        Permute { info, perms }
    }
}

impl<T: Real> Method<T> for Permute {
    fn info(&self) -> &'static MethodInfo {
        self.info
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        if present[0] {
            OnMissing::PassThrough(0)
        } else {
            OnMissing::Absent
        }
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let touched = self.perms.touches(ctx.key);
        Ok(Box::new(PermuteKey {
            perms: touched.then(|| self.perms.clone()),
            key: ctx.key.to_string(),
            shape: ctx.shape.to_vec(),
            out: Vec::new(),
        }))
    }
}

struct PermuteKey {
    /// For a key some group acts on.
    perms: Option<Arc<Permutations>>,
    key: String,
    shape: Vec<usize>,
    /// After the pass: the permuted tensor.
    out: Vec<f64>,
}

impl<T: Real> KeyMerge<T> for PermuteKey {
    fn stat_passes(&self) -> usize {
        usize::from(self.perms.is_some())
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
        if let Some(perms) = &self.perms {
            let mut data = passes.run(WholeMatrix::new(Source::Arg(0)))?.sum;
            perms.apply(&self.key, &self.shape, &mut data);
            self.out = data;
        }
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let computed = self.perms.as_ref().map(|_| &self.out[range]);
        computed_or(computed, args[0], out);
    }
}
