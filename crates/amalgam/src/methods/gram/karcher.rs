//! Karcher (Riemannian) mean on the sphere (mergekit `karcher`, spec §11): the tensors' directions
//! `u_t = x_t / ‖x_t‖` are averaged on the unit sphere by iterating log and exp maps, and the
//! result is scaled by the mean norm.
//!
//! Every quantity the iteration needs is an inner product of the directions, so one statistic
//! pass computes the Gram matrix of the tensors; the iteration then runs on coefficients
//! (`u = Σ α_t u_t`) and a final pass writes `Σ β_t x_t`.

use super::geometric_median::{GramCombination, GramKind};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "karcher",
    origins: &[Origin::Mergekit],
    formula: "mean_t ||models[t]|| * KarcherMean_t(models[t] / ||models[t]||)",
    summary: "Spherical average of N tensors (each whole tensor one point), scaled by their mean \
              norm. A model lacking a key is left out of that key.",
    slots: &[Slot {
        name: "models",
        kind: SlotKind::Many,
        doc: "the models to average",
    }],
    params: &[
        ParamInfo::count("max_iter", 10, "most iterations"),
        ParamInfo::number_in(
            "tol",
            1e-5,
            Domain::Positive,
            "norms, angles and steps below this count as zero",
        ),
    ],
};

pub(crate) struct Karcher {
    max_iter: usize,
    tol: f64,
}

impl Karcher {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let max_iter = params.count("max_iter")?;
        let tol = params.number("tol")?;
        params.finish()?;
        Ok(Karcher { max_iter, tol })
    }
}

/// The coefficients `β` of the Karcher mean `Σ β_t x_t` of `n` tensors with Gram matrix `gram`.
pub fn karcher_coefficients(gram: &[f64], n: usize, max_iter: usize, tol: f64) -> Vec<f64> {
    let norms: Vec<f64> = (0..n).map(|t| gram[t * n + t].max(0.0).sqrt()).collect();
    let scale = norms.iter().sum::<f64>() / n as f64;
    let valid: Vec<usize> = (0..n).filter(|&t| norms[t] > tol).collect();
    let mut beta = vec![0.0; n];
    if valid.is_empty() {
        return beta;
    }
    let m = valid.len();
    let a = 1.0 / m as f64;
    // Inner products of the unit directions of the valid tensors.
    let mut h = vec![0.0; m * m];
    for (i, &s) in valid.iter().enumerate() {
        for (j, &t) in valid.iter().enumerate() {
            h[i * m + j] = gram[s * n + t] / (norms[s] * norms[t]);
        }
    }
    let hv = |v: &[f64]| -> Vec<f64> {
        (0..m)
            .map(|s| (0..m).map(|t| h[s * m + t] * v[t]).sum())
            .collect()
    };
    let norm = |v: &[f64]| -> f64 {
        v.iter()
            .zip(hv(v))
            .map(|(x, y)| x * y)
            .sum::<f64>()
            .max(0.0)
            .sqrt()
    };
    let mut alpha = vec![a; m];
    let start = norm(&alpha);
    if start < tol {
        alpha = vec![0.0; m];
        alpha[0] = 1.0;
    } else {
        alpha.iter_mut().for_each(|x| *x /= start);
    }
    for _ in 0..max_iter {
        let c: Vec<f64> = hv(&alpha).into_iter().map(|x| x.clamp(-1.0, 1.0)).collect();
        // Tangent T = Σ a·(φ/sin φ)·(u_t − c_t u), as coefficients over the directions.
        let mut tangent = vec![0.0; m];
        let mut along_u = 0.0;
        for t in 0..m {
            let phi = c[t].acos();
            if phi >= tol {
                let k = a * phi / phi.sin();
                tangent[t] += k;
                along_u += k * c[t];
            }
        }
        tangent
            .iter_mut()
            .zip(&alpha)
            .for_each(|(x, &u)| *x -= along_u * u);
        let step = norm(&tangent);
        if step < tol {
            break;
        }
        let (sin, cos) = step.sin_cos();
        alpha = alpha
            .iter()
            .zip(&tangent)
            .map(|(&u, &t)| cos * u + sin * t / step)
            .collect();
        let len = norm(&alpha);
        alpha.iter_mut().for_each(|x| *x /= len);
    }
    for (i, &t) in valid.iter().enumerate() {
        beta[t] = scale * alpha[i] / norms[t];
    }
    beta
}

impl<T: Real> Method<T> for Karcher {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, _present: &[bool]) -> OnMissing {
        OnMissing::MergePresent
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let (max_iter, tol) = (self.max_iter, self.tol);
        Ok(Box::new(GramCombination::new(
            ctx.present.len(),
            GramKind::Raw,
            move |gram, n| karcher_coefficients(gram, n, max_iter, tol),
        )))
    }
}
