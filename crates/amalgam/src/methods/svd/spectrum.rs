//! The matrix view of a key, its thin SVD (faer, sequential, so the result does not depend on
//! the thread count) and the mean of its spectrum.

use crate::error::{Error, Result};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
use faer::{Mat, MatRef, Par};

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

/// The bytes [`thin_svd`] and [`scaled_polar`] of a `rows × cols` matrix take, with the matrix
/// itself: the matrix and the product (`2·m·n`), U and V (`(m + n)·r`), and the SVD's scratch.
pub fn svd_bytes(rows: usize, cols: usize) -> u64 {
    let r = rows.min(cols);
    let thin = ComputeSvdVectors::Thin;
    let scratch = svd_scratch::<f64>(rows, cols, thin, thin, Par::Seq, Default::default());
    (8 * (2 * rows * cols + (rows + cols) * r + r)) as u64 + scratch.size_bytes() as u64
}

/// `U diag(s) Vᵀ`, row-major.
pub fn reconstruct(u: &Mat<f64>, s: &[f64], v: &Mat<f64>) -> Vec<f64> {
    let mut us = u.clone();
    for (j, &sj) in s.iter().enumerate() {
        for x in us.col_mut(j).iter_mut() {
            *x *= sj;
        }
    }
    let (rows, cols) = (u.nrows(), v.nrows());
    let mut out = vec![0.0; rows * cols];
    let dst = faer::MatMut::from_row_major_slice_mut(&mut out, rows, cols);
    faer::linalg::matmul::matmul(
        dst,
        faer::Accum::Replace,
        us.as_ref(),
        v.transpose(),
        1.0,
        Par::Seq,
    );
    out
}
