//! Several points of one node computed together: the outputs of a parameter sweep of a recipe's
//! output node. The node's arguments are evaluated once per chunk for all the points, and a method
//! that can share more (decoded deltas, rank histograms, random draws, elections) between its
//! points does so in its own joint state (see [`crate::methods::merge_points`]).

use super::{KeyMerge, Passes, Unit};
use crate::error::Result;
use crate::real::Real;
use std::any::Any;
use std::ops::Range;

/// A key's state as [`Any`], so that a method can join the states of its points into one joint
/// state of its own type. Every key state has it.
pub trait AsAny: Any {
    /// The state, to look at its type.
    fn as_any(&self) -> &dyn Any;
    /// The state, to take it as its own type.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<X: Any> AsAny for X {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The merge of one key for every point of a node (see [`KeyMerge`], which this extends to
/// several outputs).
pub trait KeyMergePoints<T: Real>: Send + Sync {
    /// The number of points (outputs).
    fn points(&self) -> usize;
    /// The statistic passes [`KeyMergePoints::run_passes`] runs.
    fn stat_passes(&self) -> usize;
    /// Runs every point's statistic passes.
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()>;
    /// The elements computed together (a multiple of every point's unit).
    fn unit(&self) -> Unit;
    /// Each point's notes about this key.
    fn notes(&self) -> Vec<Vec<String>>;
    /// Computes each point's output for elements `range`, point `p` into `outs[p]`, from the
    /// arguments' chunks.
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], outs: &mut [&mut [T]]);
}

/// The points one after the other on the same arguments: what every method gets without a joint
/// state of its own (it still saves reading and decoding the inputs once per point).
pub struct Separately<T>(pub Vec<Box<dyn KeyMerge<T>>>);

impl<T: Real> KeyMergePoints<T> for Separately<T> {
    fn points(&self) -> usize {
        self.0.len()
    }
    fn stat_passes(&self) -> usize {
        self.0.iter().map(|s| s.stat_passes()).sum()
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        self.0.iter_mut().try_for_each(|s| s.run_passes(passes))
    }
    fn unit(&self) -> Unit {
        joint_unit(self.0.iter().map(|s| s.unit()))
    }
    fn notes(&self) -> Vec<Vec<String>> {
        self.0.iter().map(|s| s.notes()).collect()
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], outs: &mut [&mut [T]]) {
        for (s, out) in self.0.iter().zip(outs) {
            s.merge_chunk(range.clone(), args, out);
        }
    }
}

/// The unit of points computed together: the least common multiple of their lengths, with the
/// largest working memory (the points' units are worked on one at a time).
pub fn joint_unit(units: impl Iterator<Item = Unit>) -> Unit {
    units.fold(Unit::ELEMENT, |u, x| Unit {
        len: lcm(u.len, x.len),
        bytes: u.bytes.max(x.bytes),
        what: if x.bytes >= u.bytes { x.what } else { u.what },
    })
}

/// The least common multiple of `a` and `b` (both at least 1).
pub fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}
