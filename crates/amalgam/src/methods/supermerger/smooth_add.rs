//! supermerger's "smoothAdd" (and "smoothAdd MT", the same per key on several threads): an
//! add-difference whose difference is smoothed first,
//!
//! `a + α · gaussian(median(b − c))`,
//!
//! `median` scipy's `median_filter(size=3)` (the median of the 3×3×… neighbourhood over every
//! dimension) and `gaussian` scipy's `gaussian_filter(sigma=1)` (separable, radius 4: `truncate =
//! 4`), both over the whole N-d tensor with scipy's default `reflect` edges (`d c b a | a b c d |
//! d c b a`, repeated for dimensions shorter than the radius). The filters mix neighbours along
//! every dimension, so the method needs the whole tensor: one statistic pass gathers `b − c` in
//! f64 and the filters run on it (a whole-tensor unit of two f64 copies, the filter's input and
//! output: the engine refuses a key where they exceed a quarter of the memory budget, naming it;
//! at the default 2 GiB, keys up to 33M elements, so SD1's token embedding, 38M, needs
//! `--memory-budget 3GiB`). supermerger filters in float32;
//! here in f64. A key b or c lacks is taken from a.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "smooth_add",
    origins: &[Origin::Supermerger],
    formula: "a + alpha * gaussian_filter(median_filter(b - c, size 3), sigma 1), over the whole \
              tensor",
    summary: "supermerger's smoothAdd: add-difference with the difference median- then \
              Gaussian-filtered over every dimension. Needs each tensor whole.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model the difference is added to",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the fine-tune",
        },
        Slot {
            name: "c",
            kind: SlotKind::One,
            doc: "b's base",
        },
    ],
    params: &[ParamInfo::number(
        "alpha",
        0.5,
        "strength of the smoothed difference (supermerger's alpha)",
    )],
};

/// The Gaussian's radius: scipy's `int(truncate · sigma + 0.5)` with truncate 4, sigma 1.
const RADIUS: usize = 4;

pub(crate) struct SmoothAdd {
    alpha: f64,
}

impl SmoothAdd {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        params.finish()?;
        Ok(SmoothAdd { alpha })
    }
}

impl<T: Real> Method<T> for SmoothAdd {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(SmoothKey {
            alpha: self.alpha,
            shape: ctx.shape.to_vec(),
            numel: ctx.numel(),
            smoothed: Vec::new(),
        }))
    }
}

struct SmoothKey {
    alpha: f64,
    shape: Vec<usize>,
    numel: usize,
    /// After the pass: the filtered difference.
    smoothed: Vec<f64>,
}

/// The pass gathering `b − c` whole, in f64.
struct Difference(Vec<f64>);

impl<T: Real> Pass<T> for Difference {
    type Block = Vec<f64>;
    fn block_bytes(&self, len: usize) -> usize {
        len * 8
    }
    fn block(&self, _range: Range<usize>, args: &[&[T]]) -> Vec<f64> {
        args[1]
            .iter()
            .zip(args[2])
            .map(|(&b, &c)| (b - c).to_f64())
            .collect()
    }
    fn fold(&mut self, block: Vec<f64>) {
        self.0.extend(block);
    }
}

/// scipy's `reflect` extension: index `i` (possibly outside `0..n`) of a line of length `n`.
fn reflect(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period) as usize;
    if m < n {
        m
    } else {
        2 * n - 1 - m
    }
}

/// Strides of a row-major `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// scipy's `median_filter(x, size=3)` over every dimension of `shape`.
fn median3(x: &[f64], shape: &[usize]) -> Vec<f64> {
    let nd = shape.len();
    let st = strides(shape);
    let count = 3usize.pow(nd as u32);
    let mut window = vec![0.0; count];
    let mut coord = vec![0usize; nd];
    let mut out = vec![0.0; x.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let mut r = i;
        for d in 0..nd {
            coord[d] = r / st[d];
            r %= st[d];
        }
        for (w, slot) in window.iter_mut().enumerate() {
            // Offsets −1, 0, 1 per dimension, the last dimension fastest.
            let (mut idx, mut code) = (0, w);
            for d in (0..nd).rev() {
                let off = (code % 3) as isize - 1;
                code /= 3;
                idx += reflect(coord[d] as isize + off, shape[d]) * st[d];
            }
            *slot = x[idx];
        }
        let (_, m, _) = window.select_nth_unstable_by(count / 2, f64::total_cmp);
        *o = *m;
    }
    out
}

/// scipy's `gaussian_filter(x, sigma=1)` over every dimension of `shape`, in place: one 1-D
/// correlation per dimension, in order.
fn gaussian(x: &mut Vec<f64>, shape: &[usize]) {
    let taps: Vec<f64> = (-(RADIUS as isize)..=RADIUS as isize)
        .map(|k| (-0.5 * (k * k) as f64).exp())
        .collect();
    let total: f64 = taps.iter().sum();
    let taps: Vec<f64> = taps.iter().map(|t| t / total).collect();
    let st = strides(shape);
    let mut tmp = vec![0.0; x.len()];
    for (d, &n) in shape.iter().enumerate() {
        for (i, o) in tmp.iter_mut().enumerate() {
            let c = (i / st[d] % n) as isize;
            let line = i - c as usize * st[d];
            *o = taps
                .iter()
                .enumerate()
                .map(|(k, w)| w * x[line + reflect(c + k as isize - RADIUS as isize, n) * st[d]])
                .sum();
        }
        std::mem::swap(x, &mut tmp);
    }
}

impl<T: Real> KeyMerge<T> for SmoothKey {
    fn stat_passes(&self) -> usize {
        1
    }
    fn unit(&self) -> Unit {
        Unit {
            len: 1,
            bytes: 2 * 8 * self.numel as u64,
            what: "smooth_add's filters over the whole tensor",
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let diff = passes.run(Difference(Vec::with_capacity(self.numel)))?.0;
        // A 0-d key is one element: its neighbourhood is itself.
        let shape = if self.shape.is_empty() {
            vec![1]
        } else {
            self.shape.clone()
        };
        let mut smoothed = median3(&diff, &shape);
        drop(diff);
        gaussian(&mut smoothed, &shape);
        self.smoothed = smoothed;
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let alpha = T::from_f64(self.alpha);
        for ((o, &a), &f) in out.iter_mut().zip(args[0]).zip(&self.smoothed[range]) {
            *o = a + alpha * T::from_f64(f);
        }
    }
}
