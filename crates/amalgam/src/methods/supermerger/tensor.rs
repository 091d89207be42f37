//! supermerger's "tensor" and "tensor2" (`tensormerge`): no element is mixed; a slice of b's
//! tensor replaces a's. With `n` the length of the sliced dimension, `int` truncating and Python's
//! slice rules (negative bounds count from the end, bounds are clamped):
//!
//! - `α + β ≤ 1`: a, with the indices `[int(n·β), int(n·(α+β)))` taken from b;
//! - `α + β > 1`: b, with the indices `[int(n·(α+β−1)), int(n·β))` taken from a.
//!
//! "tensor" slices dim 0. "tensor2" slices dim 1 of keys of 2 to 4 dimensions (dim 0 of
//! vectors), with `n` the length of dim 1 when it exceeds 100 and otherwise, as supermerger does,
//! the length of dim 0 (its bounds then clamped to dim 1). A 0-d key is a; a key of more than 4
//! dimensions is a (`α + β ≤ 1`) or b (else), as supermerger leaves it. Element-wise once the
//! bounds are known: streams. A key b lacks is taken from a.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

const SLOTS: &[Slot] = &[
    Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "model A",
    },
    Slot {
        name: "b",
        kind: SlotKind::One,
        doc: "model B, whose slices are taken",
    },
];

const PARAMS: &[ParamInfo] = &[
    ParamInfo::number("alpha", 0.5, "fraction of the dimension taken from b"),
    ParamInfo::number(
        "beta",
        0.25,
        "where the slice taken from b starts, as a fraction",
    ),
];

/// `tensor_swap`'s declaration.
pub static TENSOR_SWAP: MethodInfo = MethodInfo {
    name: "tensor_swap",
    origins: &[Origin::Supermerger],
    formula: "a with rows [int(n beta), int(n (alpha+beta))) of b (alpha+beta <= 1); b with rows \
              [int(n (alpha+beta-1)), int(n beta)) of a (else); n = rows",
    summary: "supermerger's tensor: a slice of b's rows (dim 0) replaces a's, no values mixed. \
              A key b lacks is taken from a.",
    slots: SLOTS,
    params: PARAMS,
};

/// `tensor_swap_dim1`'s declaration.
pub static TENSOR_SWAP_DIM1: MethodInfo = MethodInfo {
    name: "tensor_swap_dim1",
    origins: &[Origin::Supermerger],
    formula: "as tensor_swap along dim 1 (dim 0 of vectors); n = dim 1's length if over 100, \
              else dim 0's",
    summary: "supermerger's tensor2: as tensor_swap, with slices of dim 1. A key b lacks is \
              taken from a.",
    slots: SLOTS,
    params: PARAMS,
};

/// `tensor_swap` (`DIM1 = false`) or `tensor_swap_dim1` (`DIM1 = true`).
pub(crate) struct TensorSwap<const DIM1: bool> {
    alpha: f64,
    beta: f64,
}

impl<const DIM1: bool> TensorSwap<DIM1> {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        let beta = params.number("beta")?;
        params.finish()?;
        Ok(TensorSwap { alpha, beta })
    }
}

/// Python's `x[start:stop]` on a dimension of length `len`, as indices.
fn py_slice(start: i64, stop: i64, len: usize) -> Range<usize> {
    let n = len as i64;
    let clamp = |i: i64| (if i < 0 { i + n } else { i }).clamp(0, n) as usize;
    let (s, e) = (clamp(start), clamp(stop));
    s..e.max(s)
}

impl<T: Real, const DIM1: bool> Method<T> for TensorSwap<DIM1> {
    fn info(&self) -> &'static MethodInfo {
        if DIM1 {
            &TENSOR_SWAP_DIM1
        } else {
            &TENSOR_SWAP
        }
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let shape = ctx.shape;
        let (alpha, beta) = (self.alpha, self.beta);
        let within = alpha + beta <= 1.0;
        // The sliced dimension, its stride and length, and the length the bounds scale.
        let sliced = if shape.is_empty() {
            None
        } else if !DIM1 || shape.len() == 1 {
            Some((0, shape[0]))
        } else {
            let n = if shape[1] > 100 { shape[1] } else { shape[0] };
            Some((1, n))
        };
        let plan = match sliced {
            None => Swap {
                base: 0,
                inner: 1,
                len: 1,
                range: 0..0,
            },
            Some(_) if shape.len() > 4 => Swap {
                base: usize::from(!within),
                inner: 1,
                len: 1,
                range: 0..0,
            },
            Some((dim, n)) => {
                let n = n as f64;
                let (start, stop) = if within {
                    (n * beta, n * (alpha + beta))
                } else {
                    (n * (alpha + beta - 1.0), n * beta)
                };
                let len = shape[dim];
                Swap {
                    base: usize::from(!within),
                    inner: shape[dim + 1..].iter().product(),
                    len,
                    range: py_slice(start as i64, stop as i64, len),
                }
            }
        };
        Ok(Box::new(plan))
    }
}

/// One key's plan: argument `base` (0: a, 1: b), with the indices `range` of the sliced
/// dimension (of length `len`, elements `inner` apart) from the other.
struct Swap {
    base: usize,
    inner: usize,
    len: usize,
    range: Range<usize>,
}

impl<T: Real> KeyMerge<T> for Swap {
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        for (i, (o, idx)) in out.iter_mut().zip(range).enumerate() {
            let at = idx / self.inner % self.len;
            let from = if self.range.contains(&at) {
                1 - self.base
            } else {
                self.base
            };
            *o = args[from][i];
        }
    }
}
