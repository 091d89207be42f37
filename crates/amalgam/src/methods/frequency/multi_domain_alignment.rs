//! `multi_domain_alignment`, sd-optim's frequency-selective merge (spec §16.1, sd-optim
//! `ba47e65`), as shipped:
//!
//! ```text
//! B_f = irfft(|B̂|' ∠B̂)              |B̂|' = (1−β_dyn)|Â| + β_dyn|B̂| below the pass band's end, |B̂| above,
//!                                     times a quarter-cosine ramp from 1 to 0 across the transition band
//! β_dyn = cos(π/2·|κ(Â) − κ(B̂)|) · mean_f[cos(∠Â−∠B̂) + cos(∠Â−∠Ĉ) + cos(∠B̂−∠Ĉ)]/3
//! B* = fw·B_f + (1 − fw)·B
//! M_r = slerp(A_r, B*_r; α)           per row of the [out, rest] / [rest, last] view
//! θ_r = M_r + β·D_r·(B*_r − C_r)       D_r = (1 − ⟨A_r−C_r, B_r−C_r⟩/(max(‖A_r−C_r‖, ‖B_r−C_r‖)² + 1e-10))/2
//! ```
//!
//! `κ` is the spectral centroid `Σ_f (f/F)|X̂_f| / (Σ_f |X̂_f| + 1e-10)`; the pass band ends at
//! `⌊min(κ_a, κ_c)·F − g⌋` and the transition band at `⌊max(κ_a, κ_c)·F + g⌋`, `g =
//! ⌊centroid_margin_factor·F⌋`, clamped to `[0, F − g]` and `[g, F]`. The FFT is over the whole
//! flattened tensor (each third of a fused `in_proj_weight` / `in_proj_bias` on its own).
//!
//! As shipped, two stages have no effect and are reproduced as such: the cross-attention
//! importance (its guard tests a shape tuple holding −1, so the weights are 1) and the Gaussian
//! blur of `D` (it runs along a singleton axis: `kernel_size` changes nothing).

use crate::error::Result;
use crate::method::*;
use crate::methods::svd::shared::{computed_or, Source, WholeMatrix};
use crate::real::Real;
use realfft::num_complex::Complex;
use realfft::RealFftPlanner;
use std::f64::consts::FRAC_PI_2;
use std::ops::Range;

const FORMULA: &str =
    "slerp_rows(a, b*; alpha) + beta * D * (b* - c), b* = fw * B_f + (1 - fw) * b, \
     B_f = b with its low band's magnitude moved towards a's (FFT of the whole tensor), D the \
     per-row dissimilarity of a - c and b - c";

const SLOTS: &[Slot] = &[
    Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "the model interpolated from (its spectrum guides b's low band)",
    },
    Slot {
        name: "b",
        kind: SlotKind::One,
        doc: "the model interpolated towards",
    },
    Slot {
        name: "c",
        kind: SlotKind::One,
        doc: "the anchor (the base both were trained from)",
    },
];

/// The parameters with their declared defaults (sd-optim's code defaults, the wiki's "detail").
const PARAMS: [ParamInfo; 6] = [
    ParamInfo::number_in(
        "alpha",
        0.5,
        Domain::UnitInterval,
        "slerp position between a (0) and b* (1)",
    ),
    ParamInfo::number_in(
        "beta",
        0.5,
        Domain::UnitInterval,
        "strength of the anchor adjustment beta * D * (b* - c)",
    ),
    ParamInfo::number_in(
        "kernel_size",
        3.0,
        Domain::Positive,
        "the Gaussian blur of the dissimilarity: as shipped it runs along a singleton axis and \
         changes nothing (accepted for sd-optim's recipes)",
    ),
    ParamInfo::number_in(
        "centroid_margin_factor",
        0.08,
        Domain::UnitInterval,
        "the margin g = floor(factor * F) that widens the band between the two spectral \
         centroids",
    ),
    ParamInfo::number_in(
        "frequency_weight",
        0.4,
        Domain::UnitInterval,
        "weight of the frequency-aligned b in b*",
    ),
    ParamInfo::flag(
        "use_cross_attention",
        true,
        "the cross-attention importance weights: as shipped their guard never passes and the \
         weights are 1 either way (accepted for sd-optim's recipes)",
    ),
];

macro_rules! presets {
    ($($static:ident = $name:literal, $summary:literal, ($kernel:expr, $margin:expr, $weight:expr);)*) => {
        $(
            #[doc = concat!("`", $name, "`: ", $summary)]
            pub static $static: MethodInfo = MethodInfo {
                name: $name,
                origins: &[Origin::SdOptim],
                formula: FORMULA,
                summary: $summary,
                slots: SLOTS,
                params: &[
                    PARAMS[0],
                    PARAMS[1],
                    PARAMS[2].with_default(PresetDefault::Number($kernel)),
                    PARAMS[3].with_default(PresetDefault::Number($margin)),
                    PARAMS[4].with_default(PresetDefault::Number($weight)),
                    PARAMS[5],
                ],
            };
        )*
    };
}

presets! {
    INFO = "multi_domain_alignment", "sd-optim's multi-domain alignment: b's low frequencies moved towards a's, a per-row slerp from a, and an anchor term growing with how differently a and b moved from c. Needs each tensor whole (an FFT of it).", (3.0, 0.08, 0.4);
    CONSERVATIVE = "multi_domain_alignment_conservative", "The sd-optim wiki's \"conservative\" preset of multi_domain_alignment.", (3.0, 0.1, 0.3);
    DETAIL = "multi_domain_alignment_detail", "The sd-optim wiki's \"detail\" preset of multi_domain_alignment (its code defaults).", (3.0, 0.08, 0.4);
    SMOOTH = "multi_domain_alignment_smooth", "The sd-optim wiki's \"smooth\" preset of multi_domain_alignment.", (5.0, 0.15, 0.25);
}

/// The parameters of one node.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MultiDomainAlignment {
    alpha: f64,
    beta: f64,
    margin: f64,
    frequency_weight: f64,
}

impl MultiDomainAlignment {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        let beta = params.number("beta")?;
        params.number("kernel_size")?;
        let margin = params.number("centroid_margin_factor")?;
        let frequency_weight = params.number("frequency_weight")?;
        params.boolean("use_cross_attention")?;
        params.finish()?;
        Ok(MultiDomainAlignment {
            alpha,
            beta,
            margin,
            frequency_weight,
        })
    }

    /// The merge of one tensor of `shape` (`a`, `b`, `c` row-major, the same length).
    pub(crate) fn merge(&self, a: &[f64], b: &[f64], c: &[f64], shape: &[usize]) -> Vec<f64> {
        let cols = match shape.len() {
            0 => 1,
            4 => shape[1..].iter().product(),
            _ => shape[shape.len() - 1],
        };
        let mut b_star = frequency_aligned(a, b, c, self.margin);
        for (x, &y) in b_star.iter_mut().zip(b) {
            *x = self.frequency_weight * *x + (1.0 - self.frequency_weight) * y;
        }
        let mut out = vec![0.0; a.len()];
        if cols == 0 {
            return out;
        }
        for (r, o) in out.chunks_mut(cols).enumerate() {
            let row = r * cols..(r + 1) * cols;
            let (a, b, c, bs) = (
                &a[row.clone()],
                &b[row.clone()],
                &c[row.clone()],
                &b_star[row],
            );
            let d = dissimilarity(a, b, c);
            let (sa, sb) = slerp_weights(a, bs, self.alpha);
            for i in 0..cols {
                o[i] = sa * a[i] + sb * bs[i] + self.beta * d * (bs[i] - c[i]);
            }
        }
        out
    }
}

/// `B_f`: b's spectrum with its magnitude moved towards a's below the pass band's end and
/// ramped down across the transition band, b's phase kept, transformed back.
fn frequency_aligned(a: &[f64], b: &[f64], c: &[f64], margin_factor: f64) -> Vec<f64> {
    let n = a.len();
    if n == 0 {
        return Vec::new();
    }
    let mut planner = RealFftPlanner::<f64>::new();
    let forward = planner.plan_fft_forward(n);
    let spectrum = |x: &[f64]| {
        let mut input = x.to_vec();
        let mut out = forward.make_output_vec();
        forward.process(&mut input, &mut out).expect("lengths");
        out
    };
    let (fa, mut fb, fc) = (spectrum(a), spectrum(b), spectrum(c));
    let bins = fa.len();
    let f = bins as f64;
    let (ka, kb, kc) = (centroid(&fa), centroid(&fb), centroid(&fc));
    let coherence = fa
        .iter()
        .zip(&fb)
        .zip(&fc)
        .map(|((x, y), z)| {
            let (pa, pb, pc) = (x.arg(), y.arg(), z.arg());
            (pa - pb).cos() + (pa - pc).cos() + (pb - pc).cos()
        })
        .sum::<f64>()
        / f
        / 3.0;
    let beta = (FRAC_PI_2 * (ka - kb).abs()).cos() * coherence;
    // Python's int() truncates towards zero.
    let margin = (margin_factor * f).trunc() as i64;
    let pass_end = (ka.min(kc) * f - margin as f64).trunc() as i64;
    let stop_start = (ka.max(kc) * f + margin as f64).trunc() as i64;
    let pass_end = pass_end.min(bins as i64 - margin).max(0);
    let stop_start = stop_start.max(margin).min(bins as i64);
    let mut magnitude: Vec<f64> = fa
        .iter()
        .zip(&fb)
        .enumerate()
        .map(|(i, (x, y))| {
            if (i as i64) < pass_end {
                (1.0 - beta) * x.norm() + beta * y.norm()
            } else {
                y.norm()
            }
        })
        .collect();
    let width = stop_start - pass_end;
    if width > 0 {
        let (start, width) = (pass_end as usize, width as usize);
        for j in 0..width {
            let t = if width == 1 {
                0.0
            } else {
                FRAC_PI_2 * j as f64 / (width - 1) as f64
            };
            magnitude[start + j] *= t.cos();
        }
    }
    for (x, m) in fb.iter_mut().zip(magnitude) {
        *x = Complex::from_polar(m, x.arg());
    }
    // The inverse transform reads only the real parts of the first and (even n) last bins.
    fb[0].im = 0.0;
    if n % 2 == 0 {
        fb[bins - 1].im = 0.0;
    }
    let inverse = planner.plan_fft_inverse(n);
    let mut out = inverse.make_output_vec();
    inverse.process(&mut fb, &mut out).expect("lengths");
    out.iter_mut().for_each(|x| *x /= n as f64);
    out
}

/// The spectral centroid `Σ_f (f/F)|X_f| / (Σ_f |X_f| + 1e-10)`, in [0, 1].
fn centroid(x: &[Complex<f64>]) -> f64 {
    let f = x.len() as f64;
    let (weighted, total) = x.iter().enumerate().fold((0.0, 0.0), |(w, t), (i, v)| {
        (w + i as f64 / f * v.norm(), t + v.norm())
    });
    weighted / (total + 1e-10)
}

/// `(1 − cos)/2`, `cos = ⟨a−c, b−c⟩ / (max(‖a−c‖, ‖b−c‖)² + 1e-10)` of one row.
fn dissimilarity(a: &[f64], b: &[f64], c: &[f64]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
    for ((&x, &y), &z) in a.iter().zip(b).zip(c) {
        let (u, v) = (x - z, y - z);
        dot += u * v;
        na += u * u;
        nb += v * v;
    }
    let cos = dot / (na.max(nb) + 1e-10);
    (1.0 - if cos.is_nan() { 0.0 } else { cos }) / 2.0
}

/// The slerp weights `(s_a, s_b)` of rows `a`, `b` at `alpha`: the angle between the normalised
/// rows (norms at least 1e-12), linear weights below 1e-4 rad, `sin ω` at least 1e-6.
fn slerp_weights(a: &[f64], b: &[f64], alpha: f64) -> (f64, f64) {
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    let (na, nb) = (norm(a), norm(b));
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (x / na) * (y / nb)).sum();
    let omega = dot.clamp(-1.0, 1.0).acos();
    if omega < 1e-4 {
        return (1.0 - alpha, alpha);
    }
    let sin = omega.sin().max(1e-6);
    (
        ((1.0 - alpha) * omega).sin() / sin,
        (alpha * omega).sin() / sin,
    )
}

impl<T: Real> Method<T> for MultiDomainAlignment {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::first_or_absent(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(AlignKey {
            method: *self,
            shape: ctx.shape.to_vec(),
            fused: ctx.key.ends_with("in_proj_weight") || ctx.key.ends_with("in_proj_bias"),
            out: Vec::new(),
        }))
    }
}

struct AlignKey {
    method: MultiDomainAlignment,
    shape: Vec<usize>,
    /// A fused q/k/v projection: each third along dim 0 is merged on its own.
    fused: bool,
    /// After the passes: the output, row-major.
    out: Vec<f64>,
}

impl<T: Real> KeyMerge<T> for AlignKey {
    fn stat_passes(&self) -> usize {
        3
    }
    fn unit(&self) -> Unit {
        let len: usize = self.shape.iter().product();
        Unit {
            len: 1,
            // a, b, c, b*, the output, and three spectra of len/2 + 1 complex values.
            bytes: 64 * len as u64 + 64,
            what: "the whole tensors of multi_domain_alignment and their spectra",
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let a = passes.run(WholeMatrix::new(Source::Arg(0)))?.sum;
        let b = passes.run(WholeMatrix::new(Source::Arg(1)))?.sum;
        let c = passes.run(WholeMatrix::new(Source::Arg(2)))?.sum;
        let rows = self.shape.first().copied().unwrap_or(1);
        if self.fused && rows >= 3 && rows % 3 == 0 {
            let mut shape = self.shape.clone();
            shape[0] = rows / 3;
            let third = a.len() / 3;
            self.out = (0..3)
                .flat_map(|i| {
                    let r = i * third..(i + 1) * third;
                    self.method
                        .merge(&a[r.clone()], &b[r.clone()], &c[r], &shape)
                })
                .collect();
        } else {
            self.out = self.method.merge(&a, &b, &c, &self.shape);
        }
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        computed_or(Some(&self.out[range]), args[0], out)
    }
}
