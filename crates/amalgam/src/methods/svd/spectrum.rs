//! The matrix view of a key, its singular values and polar factor `U Vᵀ` (faer, sequential, so the
//! result does not depend on the thread count), and the mean of its spectrum.

use crate::error::{Error, Result};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// How tensors of more than two dimensions are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HighDim {
    /// As vectors: like the 1-D keys (the paper).
    Vector,
    /// As the matrix `[out, rest]` (convolutions; the fork's `apply_high_dim`).
    Flatten,
}

/// Which mean of the singular values replaces them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpectrumMean {
    /// `(1/r) Σ σ_i` (the paper).
    Arithmetic,
    /// `exp((1/r) Σ ln σ_i)`, 0 when a singular value is 0 (the fork's `apply_exp`).
    Geometric,
}

/// The `[rows, cols]` a key of `shape` is treated as, or `None` when it is treated as a vector:
/// 2-D keys (except CLIP's `text_projection`, which the paper averages), and with
/// [`HighDim::Flatten`] the keys of more dimensions as `[shape[0], rest]`.
pub fn matrix_shape(key: &str, shape: &[usize], high_dim: HighDim) -> Option<(usize, usize)> {
    if key.ends_with("text_projection") || key.ends_with("text_projection.weight") {
        return None;
    }
    match shape.len() {
        2 if shape[0] > 0 && shape[1] > 0 => Some((shape[0], shape[1])),
        n if n > 2 && high_dim == HighDim::Flatten && shape.iter().all(|&d| d > 0) => {
            Some((shape[0], shape[1..].iter().product()))
        }
        _ => None,
    }
}

/// The thin SVD `A = U diag(σ) Vᵀ` of the row-major `rows × cols` matrix `a`: (U, σ, V).
pub fn thin_svd(
    a: &[f64],
    rows: usize,
    cols: usize,
    key: &str,
) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let a = MatRef::from_row_major_slice(a, rows, cols);
    let r = rows.min(cols);
    let mut u = Mat::zeros(rows, r);
    let mut v = Mat::zeros(cols, r);
    let mut s = Diag::zeros(r);
    let thin = ComputeSvdVectors::Thin;
    let mut mem = MemBuffer::new(svd_scratch::<f64>(
        rows,
        cols,
        thin,
        thin,
        Par::Seq,
        Default::default(),
    ));
    svd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| {
        Error::Invalid(format!(
            "`{key}`: the SVD of its {rows}x{cols} matrix failed: {e:?}"
        ))
    })?;
    let sigma = (0..r).map(|i| s[i]).collect();
    Ok((u, sigma, v))
}

/// The mean of the singular values `sigma` (all of them, zeros included).
pub fn spectrum_mean(sigma: &[f64], mean: SpectrumMean) -> f64 {
    if sigma.is_empty() {
        return 0.0;
    }
    let r = sigma.len() as f64;
    match mean {
        SpectrumMean::Arithmetic => sigma.iter().sum::<f64>() / r,
        SpectrumMean::Geometric if sigma.iter().any(|&s| s <= 0.0) => 0.0,
        SpectrumMean::Geometric => (sigma.iter().map(|s| s.ln()).sum::<f64>() / r).exp(),
    }
}

/// `scale · U Vᵀ`, row-major.
pub fn scaled_polar(u: &Mat<f64>, v: &Mat<f64>, scale: f64) -> Vec<f64> {
    let (rows, cols) = (u.nrows(), v.nrows());
    let mut out = vec![0.0; rows * cols];
    let dst = faer::MatMut::from_row_major_slice_mut(&mut out, rows, cols);
    faer::linalg::matmul::matmul(
        dst,
        faer::Accum::Replace,
        u.as_ref(),
        v.transpose(),
        scale,
        Par::Seq,
    );
    out
}

/// The bytes [`polar`] of a `rows × cols` matrix takes at most, with the matrix itself: the
/// matrix and the factor (`2·m·n`), and the larger of the SVD's (U, V, σ and its scratch) and the
/// Gram eigendecomposition's (three `k × k` matrices, `k = min(m, n)`, and its scratch).
pub fn polar_bytes(rows: usize, cols: usize) -> u64 {
    let k = rows.min(cols);
    let thin = ComputeSvdVectors::Thin;
    let svd = svd_scratch::<f64>(rows, cols, thin, thin, Par::Seq, Default::default()).size_bytes()
        + 8 * ((rows + cols) * k + k);
    let yes = ComputeEigenvectors::Yes;
    let gram = self_adjoint_evd_scratch::<f64>(k, yes, Par::Seq, Default::default()).size_bytes()
        + 8 * (3 * k * k + k);
    (8 * 2 * rows * cols + svd.max(gram)) as u64
}

/// How the singular values and the polar factor `U Vᵀ` of a matrix are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Factorization {
    /// From the eigendecomposition of the smaller Gram matrix (`AᵀA` or `AAᵀ`, in f64):
    /// `σ_i = √λ_i` and `U Vᵀ = A·W diag(1/σ) Wᵀ` (or `W diag(1/σ) Wᵀ·A`), when the matrix is well
    /// conditioned (`σ_min ≥` [`GRAM_MIN_RATIO`]`·σ_max`, so that the squared condition number
    /// costs at most about 8 of f64's 16 digits); an exact SVD otherwise (a rank-deficient or
    /// ill-conditioned matrix). About 5 to 10 times faster than the SVD for square matrices.
    Auto,
    /// An exact thin SVD for every matrix.
    Svd,
}

/// The smallest `σ_min / σ_max` for which [`Factorization::Auto`] keeps the Gram
/// eigendecomposition's result.
pub const GRAM_MIN_RATIO: f64 = 1e-4;

/// A matrix's singular values (the `min(rows, cols)` of them, in no particular order) and its
/// polar factor `U Vᵀ` (row-major, `rows × cols`).
pub struct Polar {
    /// The singular values.
    pub sigma: Vec<f64>,
    /// `U Vᵀ`, row-major.
    pub factor: Vec<f64>,
    /// Whether an exact SVD computed them (not the Gram eigendecomposition).
    pub exact: bool,
}

/// The singular values and polar factor `U Vᵀ` of the row-major `rows × cols` matrix `a`.
pub fn polar(a: &[f64], rows: usize, cols: usize, how: Factorization, key: &str) -> Result<Polar> {
    if how == Factorization::Auto {
        if let Some(p) = gram_polar(a, rows, cols, key)? {
            return Ok(p);
        }
    }
    let (u, sigma, v) = thin_svd(a, rows, cols, key)?;
    Ok(Polar {
        sigma,
        factor: scaled_polar(&u, &v, 1.0),
        exact: true,
    })
}

/// [`Factorization::Auto`]'s first try: the polar factor from the Gram matrix's
/// eigendecomposition, or `None` when the matrix is too ill-conditioned for it.
fn gram_polar(a: &[f64], rows: usize, cols: usize, key: &str) -> Result<Option<Polar>> {
    let m = MatRef::from_row_major_slice(a, rows, cols);
    let tall = rows >= cols;
    let k = rows.min(cols);
    // G = AᵀA (tall) or AAᵀ (wide): k × k.
    let (x, y) = if tall {
        (m.transpose(), m)
    } else {
        (m, m.transpose())
    };
    let mut g = Mat::<f64>::zeros(k, k);
    matmul(g.as_mut(), Accum::Replace, x, y, 1.0, Par::Seq);
    let mut w = Mat::<f64>::zeros(k, k);
    let mut lambda = Diag::<f64>::zeros(k);
    let yes = ComputeEigenvectors::Yes;
    let scratch = self_adjoint_evd_scratch::<f64>(k, yes, Par::Seq, Default::default());
    let mut mem = MemBuffer::new(scratch);
    let stack = MemStack::new(&mut mem);
    self_adjoint_evd(
        g.as_ref(),
        lambda.as_mut(),
        Some(w.as_mut()),
        Par::Seq,
        stack,
        Default::default(),
    )
    .map_err(|e| {
        Error::Invalid(format!(
            "`{key}`: the eigendecomposition of its {k}x{k} Gram matrix failed: {e:?}"
        ))
    })?;
    drop(g);
    let sigma: Vec<f64> = (0..k).map(|i| lambda[i].max(0.0).sqrt()).collect();
    let top = sigma.iter().copied().fold(0.0, f64::max);
    let bottom = sigma.iter().copied().fold(f64::INFINITY, f64::min);
    if top == 0.0 {
        // The zero matrix: every singular value is 0, and so is σ̄·U Vᵀ for any U, V.
        return Ok(Some(Polar {
            sigma,
            factor: vec![0.0; rows * cols],
            exact: false,
        }));
    }
    if bottom.is_nan() || bottom < GRAM_MIN_RATIO * top {
        return Ok(None);
    }
    // (AᵀA)^(-1/2) = W diag(1/σ) Wᵀ.
    let mut ws = w.clone();
    for (j, &s) in sigma.iter().enumerate() {
        ws.col_mut(j).iter_mut().for_each(|v| *v /= s);
    }
    let mut inv_root = Mat::<f64>::zeros(k, k);
    matmul(
        inv_root.as_mut(),
        Accum::Replace,
        ws.as_ref(),
        w.transpose(),
        1.0,
        Par::Seq,
    );
    drop((w, ws));
    let mut factor = vec![0.0; rows * cols];
    let dst = MatMut::from_row_major_slice_mut(&mut factor, rows, cols);
    if tall {
        matmul(dst, Accum::Replace, m, inv_root.as_ref(), 1.0, Par::Seq);
    } else {
        matmul(dst, Accum::Replace, inv_root.as_ref(), m, 1.0, Par::Seq);
    }
    Ok(Some(Polar {
        sigma,
        factor,
        exact: false,
    }))
}

/// `Y`'s orthonormal basis (its polar factor, row-major `rows × cols`).
fn basis(y: &Mat<f64>, key: &str) -> Result<Mat<f64>> {
    let (rows, cols) = (y.nrows(), y.ncols());
    let mut flat = vec![0.0; rows * cols];
    MatMut::from_row_major_slice_mut(&mut flat, rows, cols).copy_from(y);
    let q = polar(&flat, rows, cols, Factorization::Auto, key)?.factor;
    Ok(MatRef::from_row_major_slice(&q, rows, cols).to_owned())
}

/// The leading singular triplets of `a` (`rows × cols`, row-major) from a randomized range finder
/// with `l` columns (Halko, Martinsson, Tropp 2011, Alg. 4.4; torch's `svd_lowrank`): `Q` spans
/// `(AAᵀ)^q A Ω` (`Ω` uniform in [-1, 1), seeded by (seed, key), re-orthonormalised at each
/// power iteration), then the SVD of `QᵀA`: `l` triplets, the first ones accurate.
pub fn randomized_svd(
    a: &[f64],
    (rows, cols): (usize, usize),
    l: usize,
    (seed, iterations): (u64, usize),
    key: &str,
) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let a = MatRef::from_row_major_slice(a, rows, cols);
    let l = l.min(rows.min(cols)).max(1);
    let mut omega = vec![0.0; cols * l];
    crate::rng::uniform_signed(seed, key, 0, &mut omega);
    let omega = MatRef::from_row_major_slice(&omega, cols, l);
    let mut y = Mat::<f64>::zeros(rows, l);
    matmul(y.as_mut(), Accum::Replace, a, omega, 1.0, Par::Seq);
    let mut q = basis(&y, key)?;
    let mut z = Mat::<f64>::zeros(cols, l);
    for _ in 0..iterations {
        matmul(
            z.as_mut(),
            Accum::Replace,
            a.transpose(),
            q.as_ref(),
            1.0,
            Par::Seq,
        );
        let w = basis(&z, key)?;
        matmul(y.as_mut(), Accum::Replace, a, w.as_ref(), 1.0, Par::Seq);
        q = basis(&y, key)?;
    }
    // B = Qᵀ A (l × cols) = Ũ diag(σ) Vᵀ, U = Q Ũ.
    let mut b = vec![0.0; l * cols];
    let dst = MatMut::from_row_major_slice_mut(&mut b, l, cols);
    matmul(dst, Accum::Replace, q.transpose(), a, 1.0, Par::Seq);
    let (ub, sigma, v) = thin_svd(&b, l, cols, key)?;
    let mut u = Mat::<f64>::zeros(rows, ub.ncols());
    matmul(
        u.as_mut(),
        Accum::Replace,
        q.as_ref(),
        ub.as_ref(),
        1.0,
        Par::Seq,
    );
    Ok((u, sigma, v))
}

#[cfg(test)]
#[path = "spectrum_tests.rs"]
mod tests;
