//! mergekit's `nuslerp` (`merge_methods/nuslerp.py`): the spherical interpolation of two models
//! (or, with a base, of their task vectors, the base added back) at `t = w_1 / (w_0 + w_1)`
//! (0.5 when the weights sum to under 1e-6), per vector:
//!
//! `u = v / max(‖v‖, 1e-7)`, `cos θ = clamp(⟨u_0, u_1⟩, −1, 1)`, and
//! `(sin((1−t)θ) v_0 + sin(tθ) v_1) / sin θ`, or `(1−t) v_0 + t v_1` where `1 − cos²θ ≤ 1e-16`
//! (parallel or antiparallel).
//!
//! The vectors: the whole tensor (`nuslerp_flatten`, the default; one `Sums` pass), each row of
//! the last dimension (`nuslerp_flatten = false`; a row is merged at once), or each column along
//! the first dimension (`nuslerp_row_wise = true` as well, mergekit's transpose; one `Sums` pass
//! with three sums per column). Streams.

use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "nuslerp",
    origins: &[Origin::Mergekit],
    formula: "[base +] slerp(t, a - [base], b - [base]), t = w_b / (w_a + w_b), per tensor, \
              row or column",
    summary: "mergekit's NuSLERP: spherical interpolation of two models by their weights, or, \
              given three models, of the task vectors of the last two from the first (the base), \
              over the whole tensor, each row, or each column. A key a model lacks has no value \
              here.",
    slots: &[Slot {
        name: "models",
        kind: SlotKind::Many,
        doc: "the two models, or the base and the two models (mergekit's base_model)",
    }],
    params: &[
        ParamInfo::per_model(
            "weights",
            1.0,
            "one weight per model (mergekit's weight): t = w_b / (w_a + w_b); with a base, its \
             weight (the first) is not used",
        ),
        ParamInfo::flag(
            "nuslerp_flatten",
            true,
            "true: the whole tensor is one vector; false: vectors along a dimension",
        ),
        ParamInfo::flag(
            "nuslerp_row_wise",
            false,
            "without flatten: false interpolates each row of the last dimension, true each \
             column along the first dimension (mergekit's naming)",
        ),
    ],
};

/// Which vectors are interpolated.
#[derive(Clone, Copy, PartialEq)]
enum Vectors {
    Tensor,
    Rows,
    Columns,
}

pub(crate) struct Nuslerp {
    t: f64,
    with_base: bool,
    vectors: Vectors,
}

impl Nuslerp {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let weights = params.per_model("weights")?;
        // Three models: the first is the base.
        let with_base = weights.len() == 3;
        let flatten = params.boolean("nuslerp_flatten")?;
        let row_wise = params.boolean("nuslerp_row_wise")?;
        params.finish()?;
        let pair = &weights[usize::from(with_base)..];
        // Checked when the node is built with its models (counts known).
        if !weights.is_empty() && pair.len() != 2 {
            return Err(Error::method(
                "nuslerp",
                format!(
                    "it takes two models, or a base and two models; got {}",
                    weights.len()
                ),
            ));
        }
        let t = match pair {
            [w0, w1] if (w0 + w1).abs() >= 1e-6 => w1 / (w0 + w1),
            _ => 0.5,
        };
        let vectors = match (flatten, row_wise) {
            (true, _) => Vectors::Tensor,
            (false, false) => Vectors::Rows,
            (false, true) => Vectors::Columns,
        };
        Ok(Nuslerp {
            t,
            with_base,
            vectors,
        })
    }
}

impl<T: Real> Method<T> for Nuslerp {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::all_or_absent(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let numel = ctx.numel();
        let last = ctx.shape.last().copied().unwrap_or(1).max(1);
        let first = ctx.shape.first().copied().unwrap_or(1).max(1);
        Ok(Box::new(NuslerpKey {
            t: self.t,
            with_base: self.with_base,
            vectors: self.vectors,
            // Columns: elements `c, c + cols, ...` of the `[first, cols]` view.
            cols: if ctx.shape.len() > 1 {
                numel / first
            } else {
                1
            },
            row: if ctx.shape.len() > 1 {
                last
            } else {
                numel.max(1)
            },
            coefficients: Vec::new(),
        }))
    }
}

struct NuslerpKey {
    t: f64,
    with_base: bool,
    vectors: Vectors,
    cols: usize,
    row: usize,
    /// Per vector, the factors of `v_0` and `v_1` (tensor: one pair; columns: one per column).
    coefficients: Vec<(f64, f64)>,
}

/// The factors of `v_0` and `v_1` from `‖v_0‖²`, `‖v_1‖²` and `⟨v_0, v_1⟩`.
fn factors(t: f64, [n0, n1, dot]: [f64; 3]) -> (f64, f64) {
    let (n0, n1) = (n0.sqrt().max(1e-7), n1.sqrt().max(1e-7));
    let cos = (dot / (n0 * n1)).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16 {
        return (1.0 - t, t);
    }
    let theta = cos.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

/// The two vectors' values at element `i`: `(a, b)` or `(a − base, b − base)`.
#[inline(always)]
fn pair<T: Real>(with_base: bool, args: &[&[T]], i: usize) -> (T, T) {
    if with_base {
        (args[1][i] - args[0][i], args[2][i] - args[0][i])
    } else {
        (args[0][i], args[1][i])
    }
}

impl<T: Real> KeyMerge<T> for NuslerpKey {
    fn stat_passes(&self) -> usize {
        usize::from(self.vectors != Vectors::Rows)
    }
    fn unit(&self) -> Unit {
        match self.vectors {
            Vectors::Rows => Unit {
                len: self.row,
                bytes: 0,
                what: "a row",
            },
            _ => Unit::ELEMENT,
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let (with_base, cols) = (self.with_base, self.cols);
        let per = if self.vectors == Vectors::Columns {
            cols
        } else {
            1
        };
        let sums = passes.run(Sums::new(
            3 * per,
            move |range: Range<usize>, args: &[&[T]]| {
                let mut s = vec![0.0; 3 * per];
                for i in 0..range.len() {
                    let (a, b) = pair(with_base, args, i);
                    let (a, b) = (a.to_f64(), b.to_f64());
                    let c = if per > 1 { (range.start + i) % cols } else { 0 };
                    s[3 * c] += a * a;
                    s[3 * c + 1] += b * b;
                    s[3 * c + 2] += a * b;
                }
                s
            },
        ))?;
        self.coefficients = sums
            .total
            .chunks(3)
            .map(|s| factors(self.t, [s[0], s[1], s[2]]))
            .collect();
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let base = |i: usize| {
            if self.with_base {
                args[0][i]
            } else {
                T::ZERO
            }
        };
        let write = |i: usize, (f0, f1): (f64, f64), out: &mut [T]| {
            let (a, b) = pair(self.with_base, args, i);
            let v = T::from_f64(f0) * a + T::from_f64(f1) * b;
            out[i] = if self.with_base { base(i) + v } else { v };
        };
        match self.vectors {
            Vectors::Tensor => {
                for i in 0..out.len() {
                    write(i, self.coefficients[0], out);
                }
            }
            Vectors::Columns => {
                for i in 0..out.len() {
                    write(i, self.coefficients[(range.start + i) % self.cols], out);
                }
            }
            Vectors::Rows => {
                for r in (0..out.len()).step_by(self.row) {
                    let mut s = [0.0; 3];
                    for i in r..r + self.row {
                        let (a, b) = pair(self.with_base, args, i);
                        let (a, b) = (a.to_f64(), b.to_f64());
                        s[0] += a * a;
                        s[1] += b * b;
                        s[2] += a * b;
                    }
                    let f = factors(self.t, s);
                    for i in r..r + self.row {
                        write(i, f, out);
                    }
                }
            }
        }
    }
}
