//! mergekit's SCE, Select–Calculate–Erase (`merge_methods/sce.py`, FuseChat, arXiv 2408.07990).
//! With task vectors `τ_t = θ_t − θ_0`:
//!
//! 1. select (`select_topk < 1`): keep, for every model, the elements whose variance over the
//!    models (population variance) is among the `⌊nonzero · select_topk⌋` largest, `nonzero` the
//!    count of elements of non-zero variance (equal variances at the threshold are all kept;
//!    mergekit's `topk` picks among them in an unspecified order);
//! 2. calculate: `c_t = mean(τ_t²)` over the tensor, normalised to sum 1 (uniform when the sum
//!    is below 1e-6);
//! 3. erase: the TIES mass election (sign of `Σ τ_t`, a zero sum counting as +), entries of the
//!    other sign (and zeros) dropped;
//!
//! `θ = θ_0 + Σ_t c_t m_t τ_t / max(Σ_t c_t m_t, 1e-6)`. Without selection one `Sums` pass takes
//! the `c_t` and the output streams; the selection needs the whole tensor (the k-th largest
//! variance), so with `select_topk < 1` each key is merged whole, in the memory of the tensor of
//! every model.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "sce",
    origins: &[Origin::Mergekit],
    formula: "base + sum_t c_t m_t tau_t / max(sum_t c_t m_t, 1e-6), tau_t = models[t] - base \
              (masked to the top select_topk by variance over models), c_t ~ mean(tau_t^2), \
              m_t the TIES mass-election mask",
    summary: "mergekit's SCE (FuseChat): keeps the elements whose deltas vary most across the \
              models, weights each model by its mean squared delta, and averages the deltas of \
              the elected sign. With select_topk < 1 each key is merged whole. A fine-tune \
              lacking a key is left out of it; a key the base lacks is left to the key policy.",
    slots: Slot::BASE_AND_MODELS,
    params: &[
        ParamInfo::number_in(
            "select_topk",
            1.0,
            Domain::UnitInterval,
            "fraction of the elements of non-zero variance kept (1: all, no selection)",
        ),
        ParamInfo::flag(
            "int8_mask",
            false,
            "mergekit's int8_mask: accepted and changes nothing (the masks are exact in any \
             dtype)",
        ),
    ],
};

pub(crate) struct Sce {
    select_topk: f64,
}

impl Sce {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let select_topk = params.number("select_topk")?;
        params.boolean("int8_mask")?;
        params.finish()?;
        Ok(Sce { select_topk })
    }
}

impl<T: Real> Method<T> for Sce {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::base_and_models(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let n = ctx.present.len() - 1;
        let numel = ctx.numel();
        Ok(Box::new(SceKey {
            select_topk: self.select_topk,
            whole: self.select_topk < 1.0,
            numel,
            n,
            c: Vec::new(),
        }))
    }
}

struct SceKey {
    select_topk: f64,
    /// The selection: the key is merged whole.
    whole: bool,
    numel: usize,
    n: usize,
    /// Per model, its normalised weight `c_t` (streamed case).
    c: Vec<f64>,
}

/// The normalised weights from the per-model sums of `τ²` over `numel` elements.
fn weights(sq: &[f64], numel: usize) -> Vec<f64> {
    let c: Vec<f64> = sq.iter().map(|s| s / numel as f64).collect();
    let sum: f64 = c.iter().sum();
    if sum.abs() < 1e-6 {
        vec![1.0 / c.len() as f64; c.len()]
    } else {
        c.iter().map(|x| x / sum).collect()
    }
}

/// The output at one element from the models' (selected) deltas `tau(t)`.
#[inline(always)]
fn erase_and_fuse<T: Real>(n: usize, c: &[T], tau: impl Fn(usize) -> T) -> T {
    let mut total = T::ZERO;
    for t in 0..n {
        total += tau(t);
    }
    // mergekit: the sign of the sum, a zero sum counting as +.
    let up = total >= T::ZERO;
    let (mut num, mut den) = (T::ZERO, T::ZERO);
    for (t, &ct) in c.iter().enumerate().take(n) {
        let v = tau(t);
        if (up && v > T::ZERO) || (!up && v < T::ZERO) {
            num += ct * v;
            den += ct;
        }
    }
    let floor = T::from_f64(1e-6);
    num / if den < floor { floor } else { den }
}

impl<T: Real> KeyMerge<T> for SceKey {
    fn stat_passes(&self) -> usize {
        usize::from(!self.whole)
    }
    fn unit(&self) -> Unit {
        if self.whole {
            Unit {
                len: self.numel.max(1),
                bytes: (self.numel * ((self.n + 1) * std::mem::size_of::<T>() + 16)) as u64,
                what: "SCE's selection (the tensor of every model, with select_topk < 1)",
            }
        } else {
            Unit::ELEMENT
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        if self.whole {
            return Ok(());
        }
        let n = self.n;
        let sums = passes.run(Sums::new(n, move |range: Range<usize>, args: &[&[T]]| {
            let mut sq = vec![0.0; n];
            for (t, x) in args[1..].iter().enumerate() {
                for i in 0..range.len() {
                    let v = (x[i] - args[0][i]).to_f64();
                    sq[t] += v * v;
                }
            }
            sq
        }))?;
        self.c = weights(&sums.total, self.numel);
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let (base, models) = (args[0], &args[1..]);
        let n = models.len();
        if !self.whole {
            let c: Vec<T> = self.c.iter().map(|&c| T::from_f64(c)).collect();
            for (i, o) in out.iter_mut().enumerate() {
                let b = base[i];
                *o = b + erase_and_fuse(n, &c, |t| models[t][i] - b);
            }
            return;
        }
        // The whole tensor: variances, the k-th largest, the mask, the weights, the output.
        let len = range.len();
        let nf = T::from_f64(n as f64);
        let var: Vec<T> = (0..len)
            .map(|i| {
                let mut mean = T::ZERO;
                for x in models {
                    mean += x[i] - base[i];
                }
                let mean = mean / nf;
                let mut v = T::ZERO;
                for x in models {
                    let d = x[i] - base[i] - mean;
                    v += d * d;
                }
                v / nf
            })
            .collect();
        let nonzero = var.iter().filter(|v| **v != T::ZERO).count();
        let k = (nonzero as f64 * self.select_topk).floor() as usize;
        let keep: Vec<bool> = if k == 0 {
            vec![false; len]
        } else {
            let mut sorted: Vec<f64> = var.iter().map(|v| v.to_f64()).collect();
            let (_, kth, _) = sorted.select_nth_unstable_by(len - k, |a, b| a.total_cmp(b));
            let threshold = *kth;
            var.iter().map(|v| v.to_f64() >= threshold).collect()
        };
        let tau = |t: usize, i: usize| {
            if keep[i] {
                models[t][i] - base[i]
            } else {
                T::ZERO
            }
        };
        let sq: Vec<f64> = (0..n)
            .map(|t| {
                (0..len)
                    .map(|i| {
                        let v = tau(t, i).to_f64();
                        v * v
                    })
                    .sum()
            })
            .collect();
        let c: Vec<T> = weights(&sq, len).into_iter().map(T::from_f64).collect();
        for (i, o) in out.iter_mut().enumerate() {
            *o = base[i] + erase_and_fuse(n, &c, |t| tau(t, i));
        }
    }
}
