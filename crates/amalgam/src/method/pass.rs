//! Statistic passes: what a method computes over a key's whole tensor before its output.
//!
//! A pass is a value of the method's own type. The engine splits the tensor into blocks of
//! [`BLOCK`](crate::engine::BLOCK) elements (rounded up to whole [`Unit`](super::Unit)s), has
//! the pass compute one [`Pass::Block`] of statistics per block, in parallel, and hands the blocks
//! back to [`Pass::fold`] one at a time **in block order**, so that a floating-point sum folded
//! there is the same whatever the thread count, the chunk size or the memory budget. The engine
//! holds at most as many unfolded blocks as the memory budget allows for their declared
//! [`Pass::block_bytes`].
//!
//! A method runs its passes in [`KeyMerge::run_passes`](super::KeyMerge::run_passes), in plain
//! code: each pass may read what the previous ones found.
//!
//! ```text
//! let norms = passes.run(SquaredNorms::new(n))?;   // one block: Vec<f64>, folded by addition
//! self.scale = norms.total.iter().map(|s| 1.0 / s.sqrt()).collect();
//! ```

use crate::error::Result;
use crate::real::Real;
use std::any::Any;
use std::ops::Range;

/// One statistic pass over a key.
pub trait Pass<T: Real>: Send + Sync {
    /// The statistics of one block (a Gram matrix, a histogram, counts, keep bits...).
    type Block: Send + 'static;
    /// The most bytes one block's statistics of `len` elements take: the engine bounds the
    /// blocks it holds unfolded by it.
    fn block_bytes(&self, len: usize) -> usize;
    /// The statistics of elements `range` of the flattened tensor (whole units), from the
    /// arguments' values there (in [`KeyCtx::present`](super::KeyCtx::present) order, each
    /// `range.len()` long). Called in parallel.
    fn block(&self, range: Range<usize>, args: &[&[T]]) -> Self::Block;
    /// Folds the next block's statistics: called once per block, in block order, on one thread.
    fn fold(&mut self, block: Self::Block);
}

/// A [`Pass`] with its block type erased, as the engine drives it.
pub(crate) trait ErasedPass<T>: Send + Sync {
    fn block_bytes(&self, len: usize) -> usize;
    fn block(&self, range: Range<usize>, args: &[&[T]]) -> Box<dyn Any + Send>;
    fn fold(&mut self, block: Box<dyn Any + Send>);
}

impl<T: Real, P: Pass<T>> ErasedPass<T> for P {
    fn block_bytes(&self, len: usize) -> usize {
        Pass::block_bytes(self, len)
    }
    fn block(&self, range: Range<usize>, args: &[&[T]]) -> Box<dyn Any + Send> {
        Box::new(Pass::block(self, range, args))
    }
    fn fold(&mut self, block: Box<dyn Any + Send>) {
        // The engine folds a pass's own blocks only.
        let block = block.downcast::<P::Block>().expect("a block of this pass");
        Pass::fold(self, *block)
    }
}

/// Runs a key's statistic passes over its tensor (given to
/// [`KeyMerge::run_passes`](super::KeyMerge::run_passes) by the engine).
pub struct Passes<'a, T> {
    run: &'a mut (dyn FnMut(&mut dyn ErasedPass<T>) -> Result<()> + Send),
    ran: usize,
    allowance: u64,
}

impl<'a, T: Real> Passes<'a, T> {
    pub(crate) fn new(
        run: &'a mut (dyn FnMut(&mut dyn ErasedPass<T>) -> Result<()> + Send),
        allowance: u64,
    ) -> Self {
        Passes {
            run,
            ran: 0,
            allowance,
        }
    }
    /// The bytes the method may keep from its passes for its output (per-element state such as
    /// keep bits, so that the output does not compute them again): an eighth of the raw bytes of
    /// the key's inputs when the engine holds them in memory (within the budget it reserved for
    /// them), 0 when it streams them. What the method keeps must not change its output: it only
    /// saves recomputing it.
    pub fn allowance(&self) -> u64 {
        self.allowance
    }
    /// Runs `pass` over every block of the tensor and returns it with every block folded.
    pub fn run<P: Pass<T>>(&mut self, mut pass: P) -> Result<P> {
        (self.run)(&mut pass)?;
        self.ran += 1;
        Ok(pass)
    }
    /// The passes run so far.
    pub(crate) fn ran(&self) -> usize {
        self.ran
    }
}

/// Adds a block's sums into a running total, sized on first use (the fold of most passes).
pub fn accumulate(total: &mut Vec<f64>, block: Vec<f64>) {
    if total.is_empty() {
        *total = block;
    } else {
        total.iter_mut().zip(block).for_each(|(a, b)| *a += b);
    }
}

/// A pass whose block is a vector of sums (norms, dot products, a Gram matrix), folded by
/// addition in block order.
pub struct Sums<F> {
    /// The sums of every block folded so far.
    pub total: Vec<f64>,
    /// The length of one block's sums.
    len: usize,
    block: F,
}

impl<F> Sums<F> {
    /// A pass computing `len` sums per block with `block(range, args)`.
    pub fn new(len: usize, block: F) -> Self {
        Sums {
            total: Vec::new(),
            len,
            block,
        }
    }
}

impl<T: Real, F> Pass<T> for Sums<F>
where
    F: Fn(Range<usize>, &[&[T]]) -> Vec<f64> + Send + Sync,
{
    type Block = Vec<f64>;
    fn block_bytes(&self, _len: usize) -> usize {
        self.len * std::mem::size_of::<f64>()
    }
    fn block(&self, range: Range<usize>, args: &[&[T]]) -> Vec<f64> {
        (self.block)(range, args)
    }
    fn fold(&mut self, block: Vec<f64>) {
        accumulate(&mut self.total, block)
    }
}
