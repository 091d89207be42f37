//! sd-mecha's region copies (1.1.8, `merge_methods/slicing.py` and the `copy_region` wrapper in
//! `wrappers.py`):
//!
//! - `tensor_sum(a, b)`: a with the rows (along dim 0) of a region taken from b. The region is
//!   `[round(offset·n), round((offset + width)·n))` of the `n` rows; past the end it wraps
//!   around (then b with a's rows outside the wrapped region). A 0-d key is b when `width > 0.5`,
//!   else a. Element by element: streams.
//! - `top_k_tensor_sum(a, b)`: a's values redistributed in the order of b's: the element of b of
//!   rank `r` (stable) gets the `r`-th smallest value of a, where that value's magnitude is in the
//!   region of a's sorted magnitudes (the k-th magnitudes from `round(offset·n)` to
//!   `round((offset + width)·n)`, taken in float32 as sd-mecha does); elsewhere a's own value.
//!   Needs the whole tensor (a sort): the key declares its unit.
//! - `copy_region(a, b, c)`: sd-mecha's wrapper: either of the above on the differences from c,
//!   `c + f(a − c, b − c)` (`top_k` picks which). Without c it is `tensor_sum` or
//!   `top_k_tensor_sum` (with this method's default width, 1).
//!
//! `ratio_to_region` is sd-mecha's: a negative width moves the offset back, the width is capped at
//! 1, the offset wraps into [0, 1), and the ends are rounded half to even (Python's `round`).

use super::{whole_unit, Gather};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

const A: Slot = Slot {
    name: "a",
    kind: SlotKind::One,
    doc: "the model the region is copied into",
};
const B: Slot = Slot {
    name: "b",
    kind: SlotKind::One,
    doc: "the model the region is copied from",
};
const WIDTH_DOC: &str = "the region's width, a fraction of the rows (of the sorted magnitudes \
                         for top_k); negative: the region ends at offset";
const OFFSET_DOC: &str = "where the region starts, a fraction (wraps around)";

/// `tensor_sum`'s declaration.
pub static TENSOR_SUM: MethodInfo = MethodInfo {
    name: "tensor_sum",
    origins: &[Origin::SdMecha],
    formula: "a with rows [round(offset n), round((offset + width) n)) of dim 0 from b (wrapping \
              around)",
    summary: "sd-mecha's tensor_sum: copies a slice of rows (along dim 0) from b into a; 0-d keys \
              are b when width > 0.5. A key a or b lacks is taken from a.",
    slots: &[A, B],
    params: &[
        ParamInfo::number("width", 0.5, WIDTH_DOC),
        ParamInfo::number("offset", 0.0, OFFSET_DOC),
    ],
};

/// `top_k_tensor_sum`'s declaration.
pub static TOP_K_TENSOR_SUM: MethodInfo = MethodInfo {
    name: "top_k_tensor_sum",
    origins: &[Origin::SdMecha],
    formula: "a's sorted values placed in b's rank order where their magnitude is in the region \
              of a's sorted magnitudes; a elsewhere",
    summary: "sd-mecha's top_k_tensor_sum: redistributes a's values (those whose magnitude ranks \
              in the region) in the order of b's values. Needs the whole tensor (a sort). A key \
              a or b lacks is taken from a.",
    slots: &[A, B],
    params: &[
        ParamInfo::number("width", 1.0, WIDTH_DOC),
        ParamInfo::number("offset", 0.0, OFFSET_DOC),
    ],
};

/// `copy_region`'s declaration.
pub static COPY_REGION: MethodInfo = MethodInfo {
    name: "copy_region",
    origins: &[Origin::SdMecha],
    formula: "c + tensor_sum(a - c, b - c), or c + top_k_tensor_sum(a - c, b - c) with top_k",
    summary: "sd-mecha's copy_region wrapper with its c: tensor_sum (or top_k_tensor_sum) of a's \
              and b's differences from c, added to c (without c, use tensor_sum or \
              top_k_tensor_sum). A key a, b or c lacks is taken from a.",
    slots: &[
        A,
        B,
        Slot {
            name: "c",
            kind: SlotKind::One,
            doc: "the model a and b are taken as differences from",
        },
    ],
    params: &[
        ParamInfo::number("width", 1.0, WIDTH_DOC),
        ParamInfo::number("offset", 0.0, OFFSET_DOC),
        ParamInfo::flag(
            "top_k",
            false,
            "false: tensor_sum (rows); true: top_k_tensor_sum (sorted values)",
        ),
    ],
};

/// sd-mecha's `ratio_to_region`: the region `[start, end)` of `n` items and whether it is
/// inverted (wrapped around: everything outside `[start, end)`).
pub fn ratio_to_region(mut width: f64, mut offset: f64, n: usize) -> (usize, usize, bool) {
    if width < 0.0 {
        offset += width;
        width = -width;
    }
    width = width.min(1.0);
    if offset < 0.0 {
        offset = 1.0 + offset - offset.trunc();
    }
    offset %= 1.0;
    let n = n as f64;
    let (start, end, inverted) = if width + offset <= 1.0 {
        (offset * n, (width + offset) * n, false)
    } else {
        ((width + offset - 1.0) * n, offset * n, true)
    };
    let round = |x: f64| x.round_ties_even().max(0.0) as usize;
    (round(start), round(end), inverted)
}

/// `tensor_sum`, `top_k_tensor_sum` or `copy_region`.
pub(crate) struct Slicing {
    info: &'static MethodInfo,
    width: f64,
    offset: f64,
    top_k: bool,
    /// The inputs are differences from a third (`copy_region`).
    with_c: bool,
}

impl Slicing {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let info = params.info().expect("bound");
        let width = params.number("width")?;
        let offset = params.number("offset")?;
        let with_c = info.name == COPY_REGION.name;
        let top_k = if with_c {
            params.boolean("top_k")?
        } else {
            info.name == TOP_K_TENSOR_SUM.name
        };
        params.finish()?;
        Ok(Slicing {
            info,
            width,
            offset,
            top_k,
            with_c,
        })
    }
}

impl<T: Real> Method<T> for Slicing {
    fn info(&self) -> &'static MethodInfo {
        self.info
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let numel = ctx.numel();
        if self.top_k {
            return Ok(Box::new(TopKKey {
                numel,
                width: self.width,
                offset: self.offset,
                with_c: self.with_c,
                result: Vec::new(),
            }));
        }
        let rows = match ctx.shape.first() {
            // 0-d: the whole of b when width > 0.5, as sd-mecha.
            None => {
                let b = self.width > 0.5;
                return Ok(Box::new(RowsKey {
                    row_len: 1,
                    region: (0, usize::from(b)),
                    inverted: false,
                    with_c: self.with_c,
                }));
            }
            Some(&rows) => rows,
        };
        let (start, end, inverted) = ratio_to_region(self.width, self.offset, rows);
        Ok(Box::new(RowsKey {
            row_len: (numel / rows.max(1)).max(1),
            region: (start, end),
            inverted,
            with_c: self.with_c,
        }))
    }
}

/// `tensor_sum` of one key: rows in the region from b.
struct RowsKey {
    row_len: usize,
    region: (usize, usize),
    inverted: bool,
    with_c: bool,
}

impl<T: Real> KeyMerge<T> for RowsKey {
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let (start, end) = self.region;
        for (i, (o, idx)) in out.iter_mut().zip(range).enumerate() {
            let row = idx / self.row_len;
            let from_b = (start <= row && row < end) != self.inverted;
            let src = args[usize::from(from_b)][i];
            *o = if self.with_c {
                let c = args[2][i];
                c + (src - c)
            } else {
                src
            };
        }
    }
}

/// `top_k_tensor_sum` of one key, computed whole.
struct TopKKey {
    numel: usize,
    width: f64,
    offset: f64,
    with_c: bool,
    /// After the pass: the result (of the differences from c with `with_c`).
    result: Vec<f64>,
}

/// Ascending, NaN last (torch's sort).
fn ascending(x: &f64, y: &f64) -> std::cmp::Ordering {
    x.partial_cmp(y)
        .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
}

/// sd-mecha's `top_k_tensor_sum` of flat `a` and `b`.
pub fn top_k(a: &[f64], b: &[f64], width: f64, offset: f64) -> Vec<f64> {
    let n = a.len();
    let mut dist = a.to_vec();
    dist.sort_by(ascending);
    // The stable rank of each element of b.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| ascending(&b[i], &b[j]));
    let mut rank = vec![0usize; n];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    drop(order);
    let (start, end, inverted) = ratio_to_region(width, offset, n);
    // `kthvalue(|a|.float(), k)`: the k-th smallest magnitude in float32; -1 for k = 0.
    let mut mags: Vec<f32> = a.iter().map(|&x| x.abs() as f32).collect();
    mags.sort_by(|x, y| ascending(&(*x as f64), &(*y as f64)));
    let kth = |k: usize| {
        if k == 0 {
            -1.0
        } else {
            mags[k - 1] as f64
        }
    };
    let (lo, hi) = (kth(start), kth(end));
    drop(mags);
    let keep = |j: usize| {
        let m = dist[j].abs();
        (lo <= m && m <= hi) != inverted
    };
    (0..n)
        .map(|i| {
            let r = rank[i];
            if keep(r) {
                dist[r]
            } else {
                a[i]
            }
        })
        .collect()
}

impl<T: Real> KeyMerge<T> for TopKKey {
    fn stat_passes(&self) -> usize {
        1
    }
    fn unit(&self) -> Unit {
        // The gathered arguments (up to 3), the sorted copy, ranks, order, magnitudes, result.
        whole_unit(
            self.numel,
            8 * 3 + 8 + 8 + 8 + 4 + 8,
            "the whole tensor of top_k_tensor_sum (a sort)",
        )
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let n_args = if self.with_c { 3 } else { 2 };
        let mut g = passes.run(Gather::new(n_args))?.args;
        if self.with_c {
            let c = g.pop().expect("three arguments");
            // The differences in the compute type, as sd-mecha's `subtract`.
            for x in g.iter_mut() {
                for (v, &c) in x.iter_mut().zip(&c) {
                    *v = (T::from_f64(*v) - T::from_f64(c)).to_f64();
                }
            }
        }
        self.result = top_k(&g[0], &g[1], self.width, self.offset);
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        for (i, (o, &r)) in out.iter_mut().zip(&self.result[range]).enumerate() {
            *o = if self.with_c {
                args[2][i] + T::from_f64(r)
            } else {
                T::from_f64(r)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_follow_sd_mecha() {
        assert_eq!(ratio_to_region(0.5, 0.0, 10), (0, 5, false));
        assert_eq!(ratio_to_region(0.5, 0.75, 10), (2, 8, true));
        assert_eq!(ratio_to_region(-0.25, 0.5, 8), (2, 4, false));
        assert_eq!(ratio_to_region(0.5, -0.25, 8), (2, 6, true));
        // Python's round: halves to even.
        assert_eq!(ratio_to_region(0.25, 0.0, 10), (0, 2, false));
        assert_eq!(ratio_to_region(2.0, 0.0, 4), (0, 4, false));
    }

    #[test]
    fn top_k_full_width_is_a_sorted_in_b_order() {
        let a = [3.0, -1.0, 2.0, 0.5];
        let b = [10.0, 30.0, 20.0, 40.0];
        assert_eq!(top_k(&a, &b, 1.0, 0.0), vec![-1.0, 2.0, 0.5, 3.0]);
        // Width 0: nothing moves.
        assert_eq!(top_k(&a, &b, 0.0, 0.0), a.to_vec());
    }
}
