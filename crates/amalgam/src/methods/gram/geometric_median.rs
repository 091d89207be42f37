//! Geometric median (Weiszfeld; sd-mecha `geometric_median`, spec §7):
//! `m* = argmin_m Σ_t ‖x_t − m‖`, each whole tensor one point.
//!
//! The reference keeps the N tensors in memory and makes 2 passes over them per iteration. Here one
//! statistic pass computes the N×N Gram matrix `G_st = ⟨x_s, x_t⟩` (in f64): every distance
//! `‖x_s − m‖` for `m = Σ c_t x_t` follows from it as `G_ss − 2 (Gc)_s + cᵀGc`, so the iterations run
//! on N×N numbers and one final pass writes `Σ c_t x_t`.
//!
//! Precision: a distance from the Gram matrix carries an absolute error of about `1e-8` times the
//! spread of the points, against exact distances in the reference. Results agree to ~1e-11
//! relative on points in general position; when the median falls (within ~1e-6) on one of the
//! points, the weights `1 / max(d, eps)` amplify that error and agreement drops to ~1e-8.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "geometric_median",
    origins: &[Origin::Paper, Origin::SdMecha],
    formula: "argmin_m sum_t ||models[t] - m||  (Weiszfeld; each whole tensor is one point)",
    summary: "Robust average: a minority of outlying models cannot drag it away. A model lacking \
              a key is left out of that key.",
    slots: &[Slot {
        name: "models",
        kind: SlotKind::Many,
        doc: "the points",
    }],
    params: &Weiszfeld::PARAMS,
};

/// Weiszfeld's stopping rule and guard, as sd-mecha has them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weiszfeld {
    /// The smallest distance a point's weight is taken from (`1 / max(d, eps)`).
    pub eps: f64,
    /// The most Weiszfeld iterations.
    pub maxiter: usize,
    /// The relative change of the mean distance that stops the iterations.
    pub ftol: f64,
}

impl Weiszfeld {
    /// sd-mecha's defaults, everywhere they are used (parameters, `.mecha` import and export).
    pub const DEFAULT: Weiszfeld = Weiszfeld {
        eps: 1e-6,
        maxiter: 100,
        ftol: 1e-20,
    };

    /// The parameters by name, as numbers.
    pub fn params(&self) -> [(&'static str, f64); 3] {
        [
            ("eps", self.eps),
            ("maxiter", self.maxiter as f64),
            ("ftol", self.ftol),
        ]
    }

    /// The parameters, declared once for every method that runs Weiszfeld's iteration.
    pub const PARAMS: [ParamInfo; 3] = [
        ParamInfo::number_in(
            "eps",
            Self::DEFAULT.eps,
            Domain::Positive,
            "geometric median: smallest distance",
        ),
        ParamInfo::count(
            "maxiter",
            Self::DEFAULT.maxiter,
            "geometric median: most iterations",
        ),
        ParamInfo::number_in(
            "ftol",
            Self::DEFAULT.ftol,
            Domain::NonNegative,
            "geometric median: relative objective change to stop at",
        ),
    ];

    /// Reads `eps`, `maxiter` and `ftol` from `params`.
    pub fn from_params(params: &mut Params) -> Result<Self> {
        Ok(Weiszfeld {
            eps: params.number("eps")?,
            maxiter: params.count("maxiter")?,
            ftol: params.number("ftol")?,
        })
    }

    /// The coefficients `c` (summing to 1) of the geometric median `Σ c_t x_t` of `n` points
    /// whose Gram matrix (row-major, `n × n`) is `gram`. Starts from the mean; each iteration
    /// reweights the points by `1 / max(‖x_t − m‖, eps)`; stops after `maxiter` iterations or when
    /// the mean distance changes by at most `ftol` times itself.
    pub fn coefficients(&self, gram: &[f64], n: usize) -> Vec<f64> {
        let distances = |c: &[f64]| -> Vec<f64> {
            let gc: Vec<f64> = (0..n)
                .map(|s| (0..n).map(|t| gram[s * n + t] * c[t]).sum())
                .collect();
            let cgc: f64 = (0..n).map(|s| c[s] * gc[s]).sum();
            (0..n)
                .map(|s| (gram[s * n + s] - 2.0 * gc[s] + cgc).max(0.0).sqrt())
                .collect()
        };
        let mean = |d: &[f64]| d.iter().sum::<f64>() / n as f64;
        let mut c = vec![1.0 / n as f64; n];
        let mut d = distances(&c);
        let mut f = mean(&d);
        for _ in 0..self.maxiter {
            let w: Vec<f64> = d.iter().map(|&x| 1.0 / x.max(self.eps)).collect();
            let total: f64 = w.iter().sum();
            c = w.iter().map(|&x| x / total).collect();
            d = distances(&c);
            let f_new = mean(&d);
            let done = (f - f_new).abs() <= self.ftol * f_new;
            f = f_new;
            if done {
                break;
            }
        }
        c
    }
}

/// Adds the Gram matrix of the block's points, centred on their mean, to `acc` (row-major
/// `n × n`). Distances do not change when every point is moved by the same vector, and centring
/// keeps `G_ss − 2 (Gc)_s + cᵀGc` from cancelling when the median comes close to a point.
pub(crate) fn add_gram<T: Real>(points: &[&[T]], acc: &mut [f64]) {
    add_gram_with(points, acc, &mut Vec::new());
}

/// Adds the plain (uncentred) Gram matrix `⟨x_s, x_t⟩` of the block's points to `acc`.
pub(crate) fn add_raw_gram<T: Real>(points: &[&[T]], acc: &mut [f64], buf: &mut Vec<f64>) {
    let n = points.len();
    let len = points.first().map_or(0, |p| p.len());
    buf.clear();
    buf.resize(n * len, 0.0);
    for (t, x) in points.iter().enumerate() {
        for (c, &v) in buf[t * len..(t + 1) * len].iter_mut().zip(x.iter()) {
            *c = v.to_f64();
        }
    }
    gram_of_rows(buf, n, len, acc);
}

/// `acc += X Xᵀ` for the `n × len` row-major matrix `X` (a matrix product, sequential, so the
/// result does not depend on the thread count).
pub(crate) fn gram_of_rows(rows: &[f64], n: usize, len: usize, acc: &mut [f64]) {
    if n == 0 || len == 0 {
        return;
    }
    let x = faer::MatRef::from_row_major_slice(rows, n, len);
    let g = faer::MatMut::from_row_major_slice_mut(acc, n, n);
    faer::linalg::matmul::matmul(g, faer::Accum::Add, x, x.transpose(), 1.0, faer::Par::Seq);
}

/// [`add_gram`] with a reusable buffer for the centred points.
pub(crate) fn add_gram_with<T: Real>(points: &[&[T]], acc: &mut [f64], centred: &mut Vec<f64>) {
    let n = points.len();
    if n == 0 {
        return;
    }
    let len = points[0].len();
    centred.clear();
    centred.resize(n * len, 0.0);
    let rest = centred.as_mut_slice();
    let mut m = vec![0f64; len];
    for x in points {
        for (a, &v) in m.iter_mut().zip(x.iter()) {
            *a += v.to_f64();
        }
    }
    let inv = 1.0 / n as f64;
    m.iter_mut().for_each(|a| *a *= inv);
    for (t, x) in points.iter().enumerate() {
        for ((c, &v), &a) in rest[t * len..(t + 1) * len]
            .iter_mut()
            .zip(x.iter())
            .zip(&m)
        {
            *c = v.to_f64() - a;
        }
    }
    gram_of_rows(rest, n, len, acc);
}

pub(crate) struct GeometricMedian {
    weiszfeld: Weiszfeld,
}

impl GeometricMedian {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let weiszfeld = Weiszfeld::from_params(&mut params)?;
        params.finish()?;
        Ok(GeometricMedian { weiszfeld })
    }
}

impl<T: Real> Method<T> for GeometricMedian {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, _present: &[bool]) -> OnMissing {
        OnMissing::MergePresent
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let weiszfeld = self.weiszfeld;
        Ok(Box::new(GramCombination::new(
            ctx.present.len(),
            GramKind::Centred,
            move |gram, n| weiszfeld.coefficients(gram, n),
        )))
    }
}

/// How a [`GramCombination`] measures its points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum GramKind {
    /// Inner products of the points themselves.
    Raw,
    /// Inner products after moving the points' mean to the origin (distances unchanged).
    Centred,
}

/// Coefficients from a Gram matrix of `n` points (row-major `n × n`).
type Solver = Box<dyn Fn(&[f64], usize) -> Vec<f64> + Send + Sync>;

/// The merge of methods whose output is a combination `Σ β_t x_t` of their inputs, with the
/// coefficients a function of the inputs' Gram matrix: one statistic pass, then one output pass.
pub(crate) struct GramCombination<T> {
    n: usize,
    kind: GramKind,
    solve: Solver,
    coefficients: Vec<T>,
}

impl<T: Real> GramCombination<T> {
    pub(crate) fn new(
        n: usize,
        kind: GramKind,
        solve: impl Fn(&[f64], usize) -> Vec<f64> + Send + Sync + 'static,
    ) -> Self {
        GramCombination {
            n,
            kind,
            solve: Box::new(solve),
            coefficients: Vec::new(),
        }
    }
}

impl<T: Real> KeyMerge<T> for GramCombination<T> {
    fn stat_passes(&self) -> usize {
        1
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let (n, kind) = (self.n, self.kind);
        let gram = passes.run(Sums::new(n * n, move |_, args: &[&[T]]| {
            let mut g = vec![0.0; n * n];
            match kind {
                GramKind::Raw => add_raw_gram(args, &mut g, &mut Vec::new()),
                GramKind::Centred => add_gram(args, &mut g),
            }
            g
        }))?;
        self.coefficients = (self.solve)(&gram.total, n)
            .into_iter()
            .map(T::from_f64)
            .collect();
        Ok(())
    }
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        out.fill(T::ZERO);
        for (x, &c) in args.iter().zip(&self.coefficients) {
            for (o, &v) in out.iter_mut().zip(x.iter()) {
                *o += c * v;
            }
        }
    }
}
