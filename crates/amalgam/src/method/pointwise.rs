//! Methods whose output at an element depends only on the arguments at that element (add,
//! subtract, weighted sum, ...). Such a method is its declaration, its parameters read once, what
//! a key some arguments lack becomes, and its formula over one chunk; [`PointwiseMethod`] makes
//! it a [`Method`].

use super::*;
use std::sync::Arc;

/// A formula applied element by element.
pub(crate) trait Pointwise: Sized + Send + Sync + 'static {
    /// The method's declaration.
    const INFO: &'static MethodInfo;
    /// Reads the parameters (the rest are refused after).
    fn read(params: &mut Params) -> Result<Self>;
    /// What a key that not every argument has becomes (`present` per slot).
    fn on_missing(&self, present: &[bool]) -> OnMissing;
    /// The formula: `out[i]` from `args[s][i]` (in slot order).
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]);
}

/// The first argument where it has the key; otherwise the key is left out.
pub(crate) fn keep_first(present: &[bool]) -> OnMissing {
    if present[0] {
        OnMissing::PassThrough(0)
    } else {
        OnMissing::Absent
    }
}

/// A [`Pointwise`] formula as a [`Method`].
pub(crate) struct PointwiseMethod<P>(Arc<P>);

impl<P: Pointwise> PointwiseMethod<P> {
    /// Reads the formula's parameters.
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let formula = P::read(&mut params)?;
        params.finish()?;
        Ok(PointwiseMethod(Arc::new(formula)))
    }
}

impl<T: Real, P: Pointwise> Method<T> for PointwiseMethod<P> {
    fn info(&self) -> &'static MethodInfo {
        P::INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        self.0.on_missing(present)
    }
    fn begin_key(&self, _ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(PointwiseKey(self.0.clone())))
    }
}

struct PointwiseKey<P>(Arc<P>);

impl<T: Real, P: Pointwise> KeyMerge<T> for PointwiseKey<P> {
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        self.0.merge(args, out)
    }
}
