//! sd-mecha's cosine merges (1.1.8, `merge_methods/cosine.py`), in weight space: supermerger's
//! "cosineA/B" without their model-wide normalisation of the similarities (and, for A, without
//! the whole-key term); those are `supermerger::cosine`. Cosines are taken along dim 0: one per column `j` (an index over the other
//! dims; one for the whole tensor when it is 1-D), `cos_j = Σᵢ x_ij y_ij / (max(‖x_j‖, 1e-8) ·
//! max(‖y_j‖, 1e-8))` (`torch.nn.functional.cosine_similarity`, eps 1e-8):
//!
//! - `add_cosine_a`: `s_j = cos_j(â, b̂)` of the columns normalised first (`â = a / max(‖a_j‖,
//!   1e-12)`, `F.normalize`), so a zero column has similarity 0;
//! - `add_cosine_b`: `s_j = (cos_j(a, b) + ⟨a, b⟩ / (‖a‖ ‖b‖)) / 2`, the second term over the
//!   whole tensor (no epsilon: a zero tensor gives NaN, as in sd-mecha).
//!
//! Then `k_j = 1 − clamp(s_j − α, 0, 1)` and the result is `lerp(a, b, k_j)` along each column,
//! with torch's `lerp` (`a + k(b − a)` for `|k| < 0.5`, else `b − (b − a)(1 − k)`).
//!
//! One `Sums` pass (`‖a_j‖²`, `‖b_j‖²`, `⟨a_j, b_j⟩` per column: 3 sums per element of a row),
//! then an output pass: streams, with memory proportional to a row, not to the tensor.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

const SLOTS: &[Slot] = &[
    Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "the model where they are alike",
    },
    Slot {
        name: "b",
        kind: SlotKind::One,
        doc: "the model where they differ",
    },
];

const ALPHA: &[ParamInfo] = &[ParamInfo::number(
    "alpha",
    1.0,
    "similarity up to which b is taken whole (1: b everywhere)",
)];

/// `add_cosine_a`'s declaration.
pub static ADD_COSINE_A: MethodInfo = MethodInfo {
    name: "add_cosine_a",
    origins: &[Origin::SdMecha],
    formula: "lerp(a, b, 1 - clamp(cos_j(a/|a_j|, b/|b_j|) - alpha, 0, 1)), cosines along dim 0",
    summary:
        "sd-mecha's cosine A: per column (along dim 0), b where a and b are less similar than \
              alpha, moving to a as they become more similar. A key b lacks is taken from a.",
    slots: SLOTS,
    params: ALPHA,
};

/// `add_cosine_b`'s declaration.
pub static ADD_COSINE_B: MethodInfo = MethodInfo {
    name: "add_cosine_b",
    origins: &[Origin::SdMecha],
    formula: "lerp(a, b, 1 - clamp((cos_j(a, b) + <a, b>/(|a| |b|)) / 2 - alpha, 0, 1))",
    summary: "sd-mecha's cosine B: as cosine A, with the similarity of each column averaged with \
              that of the whole tensor. A key b lacks is taken from a.",
    slots: SLOTS,
    params: ALPHA,
};

/// `add_cosine_a` (`B = false`) or `add_cosine_b` (`B = true`).
pub(crate) struct AddCosine<const B: bool> {
    alpha: f64,
}

impl<const B: bool> AddCosine<B> {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        params.finish()?;
        Ok(AddCosine { alpha })
    }
}

impl<T: Real, const B: bool> Method<T> for AddCosine<B> {
    fn info(&self) -> &'static MethodInfo {
        if B {
            &ADD_COSINE_B
        } else {
            &ADD_COSINE_A
        }
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let numel = ctx.numel();
        let columns = match ctx.shape.first() {
            Some(&rows) if rows > 0 => numel / rows,
            _ => 1,
        };
        Ok(Box::new(CosineKey::<T, B> {
            alpha: self.alpha,
            columns: columns.max(1),
            k: Vec::new(),
        }))
    }
}

struct CosineKey<T, const B: bool> {
    alpha: f64,
    columns: usize,
    /// The weight of b per column.
    k: Vec<T>,
}

/// `torch.clamp(x, 0, 1)`, NaN kept.
fn clamp01(x: f64) -> f64 {
    if x.is_nan() {
        x
    } else {
        x.clamp(0.0, 1.0)
    }
}

impl<T: Real, const B: bool> KeyMerge<T> for CosineKey<T, B> {
    fn stat_passes(&self) -> usize {
        1
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let m = self.columns;
        let sums = passes.run(Sums::new(
            3 * m,
            move |range: Range<usize>, args: &[&[T]]| {
                let mut s = vec![0.0; 3 * m];
                for (i, idx) in range.enumerate() {
                    let j = 3 * (idx % m);
                    let (a, b) = (args[0][i].to_f64(), args[1][i].to_f64());
                    s[j] += a * a;
                    s[j + 1] += b * b;
                    s[j + 2] += a * b;
                }
                s
            },
        ))?;
        let t = &sums.total;
        let (mut aa, mut bb, mut ab) = (0.0, 0.0, 0.0);
        for c in t.chunks_exact(3) {
            aa += c[0];
            bb += c[1];
            ab += c[2];
        }
        let global = ab / (aa.sqrt() * bb.sqrt());
        self.k = t
            .chunks_exact(3)
            .map(|c| {
                let (na, nb) = (c[0].sqrt(), c[1].sqrt());
                let s = if B {
                    let cos = c[2] / (na.max(1e-8) * nb.max(1e-8));
                    (cos + global) / 2.0
                } else {
                    // â = a / max(‖a_j‖, 1e-12), whose norm is then ‖a_j‖ · that scale.
                    let (sa, sb) = (1.0 / na.max(1e-12), 1.0 / nb.max(1e-12));
                    c[2] * sa * sb / ((na * sa).max(1e-8) * (nb * sb).max(1e-8))
                };
                T::from_f64(1.0 - clamp01(s - self.alpha))
            })
            .collect();
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let half = T::from_f64(0.5);
        for (i, (o, idx)) in out.iter_mut().zip(range).enumerate() {
            let (a, b) = (args[0][i], args[1][i]);
            let k = self.k[idx % self.columns];
            // torch.lerp
            *o = if k.abs() < half {
                a + k * (b - a)
            } else {
                b - (b - a) * (T::ONE - k)
            };
        }
    }
}
