//! sd-mecha's `crossover` (1.1.8, `merge_methods/crossover.py`): a and b mixed in the frequency
//! domain. The n-dimensional spectra of both (the whole tensor, every dimension) are mixed as
//! `(1 − f)·A + f·B` by a filter `f` over the normalised frequency radius
//! `r = √(mean_d g_d²)` (`g_d = |k_d| / (n_d / 2)`, the last dimension's frequencies over its
//! half spectrum): `tilt = 0` takes b's frequencies above `1 − alpha` (b gives the high
//! frequencies), `tilt = 2` below, and other tilts a linear ramp (the cut tilted by
//! `tilt · 90°`; `tilt = 1` is `lerp(a, b, alpha)`). The result is the inverse transform's
//! real part (the mixed spectrum stays Hermitian, so this is sd-mecha's `irfftn`).
//!
//! As sd-mecha: `alpha = 0` gives a, `alpha = 1` b, `tilt = 1`, 0-d keys and a key where a and b
//! are `allclose` give `lerp(a, b, alpha)`. The spectra are computed in f64 (an FFT of any
//! length, `fft.rs`); sd-mecha builds the filter in float32 (torch's default dtype), so a
//! tilted filter agrees with it to float32's rounding of the filter. Needs the whole tensor:
//! the key declares its unit.

use super::fft::{fftn, C};
use super::{whole_unit, Gather};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "crossover",
    origins: &[Origin::SdMecha],
    formula: "irfftn((1 - f) * rfftn(a) + f * rfftn(b)), f a filter over the frequency radius \
              (alpha: the cut; tilt: its slope)",
    summary: "sd-mecha's crossover: mixes a and b in the frequency domain of the whole tensor, b \
              giving the frequencies above the cut 1 - alpha (tilt 0), below it (tilt 2) or a \
              ramp (other tilts; tilt 1 is a weighted sum). Needs the whole tensor. A key a or b \
              lacks is taken from a.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model giving the low frequencies (tilt 0)",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the model giving the high frequencies (tilt 0)",
        },
    ],
    params: &[
        ParamInfo::number_in(
            "alpha",
            0.5,
            Domain::UnitInterval,
            "the share of the spectrum from b: 0 gives a, 1 gives b",
        ),
        ParamInfo::number(
            "tilt",
            0.0,
            "the cut's tilt: 0 a sharp cut (b above), 0.5 a 45-degree ramp, 1 a weighted sum, 2 \
             a sharp cut the other way (b below); taken modulo 4",
        ),
    ],
};

pub(crate) struct Crossover {
    alpha: f64,
    tilt: f64,
}

impl Crossover {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        let tilt = params.number("tilt")?;
        params.finish()?;
        Ok(Crossover { alpha, tilt })
    }
}

/// What one key gets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Argument `i` unchanged.
    Copy(usize),
    /// `lerp(a, b, alpha)`, element by element.
    Lerp,
    /// The filter in the frequency domain (or `lerp` where a and b are allclose).
    Spectral,
}

impl<T: Real> Method<T> for Crossover {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let mode = if self.alpha == 0.0 {
            Mode::Copy(0)
        } else if self.alpha == 1.0 {
            Mode::Copy(1)
        } else if self.tilt == 1.0 || ctx.shape.is_empty() || ctx.numel() == 0 {
            Mode::Lerp
        } else {
            Mode::Spectral
        };
        Ok(Box::new(CrossoverKey {
            mode,
            alpha: self.alpha,
            tilt: self.tilt,
            shape: ctx.shape.to_vec(),
            result: None,
        }))
    }
}

struct CrossoverKey {
    mode: Mode,
    alpha: f64,
    tilt: f64,
    shape: Vec<usize>,
    /// After the pass (spectral keys whose a and b are not allclose): the result.
    result: Option<Vec<f64>>,
}

/// `torch.lerp(a, b, w)`.
fn lerp<T: Real>(a: T, b: T, w: T) -> T {
    if w.abs() < T::from_f64(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::ONE - w)
    }
}

/// `torch.allclose(a, b)` (rtol 1e-5, atol 1e-8; NaN is not close).
fn allclose(a: &[f64], b: &[f64]) -> bool {
    a.iter()
        .zip(b)
        .all(|(&x, &y)| x == y || (x - y).abs() <= 1e-8 + 1e-5 * y.abs())
}

/// sd-mecha's `create_filter` over the half spectrum of `shape` (the last dimension `n / 2 + 1`
/// long), at half-spectrum index `idx`.
pub struct Filter {
    /// Per dimension, the normalised frequency of each index.
    gradients: Vec<Vec<f64>>,
    alpha: f64,
    inverted: bool,
    shape: Shape,
}

#[derive(Clone, Copy)]
enum Shape {
    Cut,
    ReverseCut,
    Ramp { cot: f64, rising: bool },
}

impl Filter {
    /// The filter of a real tensor of `shape` (its rfftn's shape is derived here).
    pub fn new(shape: &[usize], alpha: f64, tilt: f64) -> Filter {
        let d = shape.len();
        let gradients = shape
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                if i == d - 1 {
                    let s = n / 2 + 1;
                    if s == 1 {
                        vec![0.0]
                    } else {
                        (0..s).map(|j| j as f64 / (s - 1) as f64).collect()
                    }
                } else if n == 1 {
                    vec![0.0]
                } else {
                    let half = (n / 2) as f64;
                    (0..n)
                        .map(|k| {
                            let f = if k < n - n / 2 { k } else { n - k };
                            f as f64 / half
                        })
                        .collect()
                }
            })
            .collect();
        // tilt modulo 4, as sd-mecha: tilt − floor(tilt // 4 · 4).
        let tilt = tilt - ((tilt / 4.0).floor() * 4.0).floor();
        let (alpha, inverted) = if tilt > 2.0 {
            (1.0 - alpha, true)
        } else {
            (alpha, false)
        };
        let shape = if tilt < 1e-10 || (tilt - 4.0).abs() < 1e-10 {
            Shape::Cut
        } else if (tilt - 2.0).abs() < 1e-10 {
            Shape::ReverseCut
        } else {
            let cot = 1.0 / (std::f64::consts::PI * tilt / 2.0).tan();
            Shape::Ramp {
                cot,
                rising: tilt <= 1.0 || (2.0 < tilt && tilt <= 3.0),
            }
        };
        Filter {
            gradients,
            alpha,
            inverted,
            shape,
        }
    }

    /// The filter's value at half-spectrum index `idx` (one index per dimension).
    pub fn at(&self, idx: &[usize]) -> f64 {
        let d = self.gradients.len();
        let mesh = if d > 1 {
            let s: f64 = idx
                .iter()
                .zip(&self.gradients)
                .map(|(&k, g)| g[k] * g[k])
                .sum();
            (s / d as f64).sqrt()
        } else {
            self.gradients[0][idx[0]]
        };
        let a = self.alpha;
        let f = match self.shape {
            Shape::Cut => f64::from(u8::from(mesh > 1.0 - a)),
            Shape::ReverseCut => f64::from(u8::from(mesh < 1.0 - a)),
            Shape::Ramp { cot, rising } => {
                let f = if rising {
                    mesh * cot + a * cot + a - cot
                } else {
                    mesh * cot - a * cot + a
                };
                f.clamp(0.0, 1.0)
            }
        };
        if self.inverted {
            1.0 - f
        } else {
            f
        }
    }
}

/// sd-mecha's crossover of `a` and `b` (row-major, of `shape`, not allclose) by the filter.
pub fn spectral(a: &[f64], b: &[f64], shape: &[usize], alpha: f64, tilt: f64) -> Vec<f64> {
    let filter = Filter::new(shape, alpha, tilt);
    let to_c = |x: &[f64]| -> Vec<C> { x.iter().map(|&re| C { re, im: 0.0 }).collect() };
    let (mut fa, mut fb) = (to_c(a), to_c(b));
    fftn(&mut fa, shape, false);
    fftn(&mut fb, shape, false);
    let d = shape.len();
    let last = shape[d - 1];
    let mut idx = vec![0usize; d];
    let mut half = vec![0usize; d];
    for (x, y) in fa.iter_mut().zip(&fb) {
        // The full spectrum's index on the half spectrum: k and n − k of the last dimension are
        // conjugates there, and the filter is even in the other dimensions.
        half.copy_from_slice(&idx);
        half[d - 1] = idx[d - 1].min(last - idx[d - 1]);
        let f = filter.at(&half);
        *x = C {
            re: (1.0 - f) * x.re + f * y.re,
            im: (1.0 - f) * x.im + f * y.im,
        };
        // Next index, row-major.
        for k in (0..d).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    drop(fb);
    fftn(&mut fa, shape, true);
    fa.into_iter().map(|c| c.re).collect()
}

impl<T: Real> KeyMerge<T> for CrossoverKey {
    fn stat_passes(&self) -> usize {
        usize::from(self.mode == Mode::Spectral)
    }
    fn unit(&self) -> Unit {
        match self.mode {
            // a and b gathered, their two spectra, the result.
            Mode::Spectral => whole_unit(
                self.shape.iter().product(),
                8 * 2 + 16 * 2 + 8,
                "the whole tensor of crossover and its spectra",
            ),
            _ => Unit::ELEMENT,
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        if self.mode != Mode::Spectral {
            return Ok(());
        }
        let g = passes.run(Gather::new(2))?.args;
        if !allclose(&g[0], &g[1]) {
            self.result = Some(spectral(&g[0], &g[1], &self.shape, self.alpha, self.tilt));
        }
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        match (self.mode, &self.result) {
            (Mode::Copy(i), _) => out.copy_from_slice(&args[i][..out.len()]),
            (Mode::Spectral, Some(r)) => {
                for (o, &v) in out.iter_mut().zip(&r[range]) {
                    *o = T::from_f64(v);
                }
            }
            _ => {
                let w = T::from_f64(self.alpha);
                for ((o, &a), &b) in out.iter_mut().zip(args[0]).zip(args[1]) {
                    *o = lerp(a, b, w);
                }
            }
        }
    }
}
