//! sd-mecha 1.1.8's element-wise and per-tensor methods, under the names sd-mecha users know
//! (issue #18): each follows sd-mecha's formula to the rounding, its NaN handling and epsilons
//! included, and is checked against sd-mecha itself (`tests/mecha_methods.rs`, fixtures made by
//! `tools/sd_mecha_methods_fixtures.py`).
//!
//! - [`powers`]: `geometric_sum`, `multiply_quotient` (principal complex powers, real part);
//! - [`masks`]: `train_difference_mask`, `add_opposite_mask`, `add_strict_opposite_mask`
//!   (per-element strengths, sd-mecha's `param` space);
//! - [`clamp`]: `clamp` of a model between the element-wise extremes of others;
//! - [`perpendicular`]: `perpendicular_component` and `add_perpendicular` (one `Sums` pass
//!   for `⟨a, b⟩` and `‖a‖²`, then the output);
//! - [`cosine`]: `add_cosine_a`, `add_cosine_b` (cosines along dim 0: one `Sums` pass with
//!   sums per column, then the output);
//! - [`slicing`]: `tensor_sum` (rows from b, streams), `top_k_tensor_sum` (a sort of the whole
//!   tensor) and the `copy_region` wrapper with its c;
//! - [`crossover`]: a and b mixed in the frequency domain of the whole tensor ([`fft`]: an FFT
//!   of any length in f64);
//! - [`logistics`]: `fallback` (each key from a, else from default).
//!
//! Methods that need the whole tensor gather it with the [`Gather`] pass and declare a
//! [`Unit`](crate::method::Unit) with the memory it takes ([`whole_unit`]): the engine refuses
//! a key whose unit does not fit a quarter of the memory budget, naming the key.
//!
//! Transcendental functions (`ln`, `exp`, `cos`) are evaluated in f64 and rounded to the
//! compute type.

pub mod clamp;
pub mod cosine;
pub mod crossover;
pub mod fft;
pub mod logistics;
pub mod masks;
pub mod perpendicular;
pub mod powers;
pub mod slicing;

/// A statistic pass that gathers every present argument of a key whole, in f64 (for the methods
/// that need the whole tensor: sorts, FFTs, SVDs). Its key declares a [`Unit`] with the bytes
/// this takes (see [`whole_unit`]), so the engine refuses a key that does not fit the budget.
pub(crate) struct Gather {
    /// After the pass: each argument's values, row-major.
    pub(crate) args: Vec<Vec<f64>>,
    n: usize,
}

impl Gather {
    /// Gathers `n` arguments.
    pub(crate) fn new(n: usize) -> Self {
        Gather {
            args: vec![Vec::new(); n],
            n,
        }
    }
}

impl<T: crate::real::Real> crate::method::Pass<T> for Gather {
    type Block = Vec<Vec<f64>>;
    fn block_bytes(&self, len: usize) -> usize {
        len * 8 * self.n
    }
    fn block(&self, _range: std::ops::Range<usize>, args: &[&[T]]) -> Vec<Vec<f64>> {
        args[..self.n]
            .iter()
            .map(|a| a.iter().map(|v| v.to_f64()).collect())
            .collect()
    }
    fn fold(&mut self, block: Vec<Vec<f64>>) {
        for (a, b) in self.args.iter_mut().zip(block) {
            a.extend(b);
        }
    }
}

/// The unit of a key computed whole: `per_element` bytes of working memory per element (the
/// gathered arguments included). Any chunks: the pass folds the tensor whole.
pub(crate) fn whole_unit(
    numel: usize,
    per_element: usize,
    what: &'static str,
) -> crate::method::Unit {
    crate::method::Unit {
        len: 1,
        bytes: (numel * per_element) as u64,
        what,
    }
}
