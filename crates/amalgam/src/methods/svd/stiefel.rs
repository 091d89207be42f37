//! Geodesics on the Stiefel manifold (orthonormal `n × p` frames, `n > p`), for `rotate`'s
//! fractional powers of a wide matrix's rotation, as sd-mecha computes them:
//!
//! - [`exp`]: `Exp_U(Δ) = U M₁₁ + Q M₂₁`, `M = exp([[A, −Rᵀ], [R, 0]])`, `A = UᵀΔ`,
//!   `QR = Δ − UA` (Edelman, Arias and Smith 1998);
//! - [`log`]: the tangent `Δ` at `U₀` with `Exp_U₀(Δ) = U₁`, by Zimmermann's algorithm (2017):
//!   complete `[M; N]` (`M = U₀ᵀU₁`, `QN = U₁ − U₀M`) to a rotation `V`, then rotate its last `k`
//!   columns by `exp(G)` until the lower-right block `C` of `log V` vanishes, `G` solving the
//!   Sylvester equation `S G + G S = C`, `S = L₂₁L₂₁ᵀ/12 − I/2`.
//!
//! The matrix exponential and logarithm are those of skew-symmetric and rotation matrices, in
//! real arithmetic from a symmetric eigendecomposition (`exp W = cos Θ + sinc Θ·W`, `Θ² = WᵀW`;
//! `log V = θ/sin θ (S)·K`, `S`, `K` the symmetric and skew parts of `V`). Everything is
//! sequential f64, so the result does not depend on the thread count.

use crate::error::{Error, Result};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::householder;
use faer::linalg::matmul::matmul;
use faer::linalg::qr::no_pivoting::factor::{qr_in_place, qr_in_place_scratch};
use faer::{Accum, Conj, Mat, MatRef, Par};

/// `a · b` (sequential).
pub(crate) fn mm(a: MatRef<f64>, b: MatRef<f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::Seq);
    out
}

/// The thin QR `x = Q R` with `R`'s diagonal non-negative: `Q` `n × m`, `R` `m × p`,
/// `m = min(n, p)`.
fn qr_pos(x: MatRef<f64>) -> (Mat<f64>, Mat<f64>) {
    let (n, p) = x.shape();
    let m = n.min(p);
    let mut qr = x.to_owned();
    let block = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(n, p);
    let mut coeff = Mat::zeros(block, m);
    let mut mem = MemBuffer::new(qr_in_place_scratch::<f64>(
        n,
        p,
        block,
        Par::Seq,
        Default::default(),
    ));
    qr_in_place(
        qr.as_mut(),
        coeff.as_mut(),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    );
    let mut r = Mat::from_fn(m, p, |i, j| if j >= i { qr[(i, j)] } else { 0.0 });
    let mut q = Mat::from_fn(n, m, |i, j| if i == j { 1.0 } else { 0.0 });
    let basis = qr.get(.., ..m);
    let mut mem = MemBuffer::new(
        householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
            n, block, m,
        ),
    );
    householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        basis,
        coeff.as_ref(),
        Conj::No,
        q.as_mut(),
        Par::Seq,
        MemStack::new(&mut mem),
    );
    for i in 0..m {
        if r[(i, i)] < 0.0 {
            r.row_mut(i).iter_mut().for_each(|x| *x = -*x);
            q.col_mut(i).iter_mut().for_each(|x| *x = -*x);
        }
    }
    (q, r)
}

/// The eigendecomposition `s = P diag(λ) Pᵀ` of the symmetric `s`: (λ, P).
pub(crate) fn sym_evd(s: MatRef<f64>, key: &str) -> Result<(Vec<f64>, Mat<f64>)> {
    let n = s.nrows();
    let mut p = Mat::zeros(n, n);
    let mut d = Diag::zeros(n);
    let yes = ComputeEigenvectors::Yes;
    let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<f64>(
        n,
        yes,
        Par::Seq,
        Default::default(),
    ));
    self_adjoint_evd(
        s,
        d.as_mut(),
        Some(p.as_mut()),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| Error::Invalid(format!("`{key}`: an eigendecomposition failed: {e:?}")))?;
    Ok(((0..n).map(|i| d[i]).collect(), p))
}

/// `P diag(f) Pᵀ`.
pub(crate) fn spectral(p: &Mat<f64>, f: impl Fn(usize) -> f64) -> Mat<f64> {
    let mut pf = p.clone();
    for i in 0..p.ncols() {
        let fi = f(i);
        pf.col_mut(i).iter_mut().for_each(|x| *x *= fi);
    }
    mm(pf.as_ref(), p.transpose())
}

/// `exp W` of the skew-symmetric part of `w`: `cos Θ + sinc Θ·W` with `Θ² = WᵀW`.
fn skew_exp(w: MatRef<f64>, key: &str) -> Result<Mat<f64>> {
    let n = w.nrows();
    let w = Mat::from_fn(n, n, |i, j| 0.5 * (w[(i, j)] - w[(j, i)]));
    let wtw = mm(w.transpose(), w.as_ref());
    let (mu, p) = sym_evd(wtw.as_ref(), key)?;
    let theta: Vec<f64> = mu.iter().map(|m| m.max(0.0).sqrt()).collect();
    let mut out = spectral(&p, |i| theta[i].cos());
    let sinc = spectral(&p, |i| {
        let t = theta[i];
        if t < 1e-8 {
            1.0 - t * t / 6.0
        } else {
            t.sin() / t
        }
    });
    matmul(
        out.as_mut(),
        Accum::Add,
        sinc.as_ref(),
        w.as_ref(),
        1.0,
        Par::Seq,
    );
    Ok(out)
}

/// The principal logarithm of the rotation `v` (`det v = +1`): `θ/sin θ (S)·K`, `S = (V + Vᵀ)/2 =
/// cos Θ`, `K = (V − Vᵀ)/2`. A rotation by π has no unique logarithm: an error naming the key.
fn rotation_log(v: MatRef<f64>, key: &str) -> Result<Mat<f64>> {
    let n = v.nrows();
    let s = Mat::from_fn(n, n, |i, j| 0.5 * (v[(i, j)] + v[(j, i)]));
    let k = Mat::from_fn(n, n, |i, j| 0.5 * (v[(i, j)] - v[(j, i)]));
    let (c, p) = sym_evd(s.as_ref(), key)?;
    let mut f = Vec::with_capacity(n);
    for &ci in &c {
        let theta = ci.clamp(-1.0, 1.0).acos();
        let sin = theta.sin();
        f.push(if theta < 1e-6 {
            1.0 + theta * theta / 6.0
        } else if sin > 1e-10 {
            theta / sin
        } else {
            return Err(Error::Invalid(format!(
                "`{key}`: rotate's Stiefel geodesic met a rotation by π, whose logarithm is \
                 not unique; use alignment -1, 0 or 1 for this key"
            )));
        });
    }
    Ok(mm(spectral(&p, |i| f[i]).as_ref(), k.as_ref()))
}

/// `G` with `S G + G S = C` (`S` symmetric): `G = P (PᵀCP ⊘ (λᵢ + λⱼ)) Pᵀ`.
fn symmetric_sylvester(s: MatRef<f64>, c: MatRef<f64>, key: &str) -> Result<Mat<f64>> {
    let (lambda, p) = sym_evd(s, key)?;
    let ct = mm(mm(p.transpose(), c).as_ref(), p.as_ref());
    let gt = Mat::from_fn(ct.nrows(), ct.ncols(), |i, j| {
        ct[(i, j)] / (lambda[i] + lambda[j])
    });
    Ok(mm(mm(p.as_ref(), gt.as_ref()).as_ref(), p.transpose()))
}

/// `Exp_U(Δ)` for the orthonormal `n × p` frame `u` (`n > p`) and the tangent `delta`.
pub(super) fn exp(u: MatRef<f64>, delta: MatRef<f64>, key: &str) -> Result<Mat<f64>> {
    let (n, p) = u.shape();
    let k = (n - p).min(p);
    let a = mm(u.transpose(), delta);
    let mut rest = delta.to_owned();
    matmul(rest.as_mut(), Accum::Add, u, a.as_ref(), -1.0, Par::Seq);
    let (q, r) = qr_pos(rest.as_ref());
    let w = Mat::from_fn(p + k, p + k, |i, j| match (i < p, j < p) {
        (true, true) => a[(i, j)],
        (true, false) => -r[(j - p, i)],
        (false, true) => r[(i - p, j)],
        (false, false) => 0.0,
    });
    let m = skew_exp(w.as_ref(), key)?;
    let mut out = mm(u, m.get(..p, ..p));
    matmul(
        out.as_mut(),
        Accum::Add,
        q.get(.., ..k),
        m.get(p.., ..p),
        1.0,
        Par::Seq,
    );
    Ok(out)
}

/// `Log_U₀(U₁)`: the tangent at the frame `u0` whose geodesic reaches `u1` (both `n × p`,
/// `n > p`), iterated until `‖C‖_F ≤ eps` or `max_iters` times (sd-mecha's `stiefel_eps`,
/// `stiefel_max_iters`). Returns the tangent and whether it converged.
pub(super) fn log(
    u0: MatRef<f64>,
    u1: MatRef<f64>,
    eps: f64,
    max_iters: usize,
    key: &str,
) -> Result<(Mat<f64>, bool)> {
    let (n, p) = u0.shape();
    let k = (n - p).min(p);
    let m = mm(u0.transpose(), u1);
    let mut rest = u1.to_owned();
    matmul(rest.as_mut(), Accum::Add, u0, m.as_ref(), -1.0, Par::Seq);
    let (q, nm) = qr_pos(rest.as_ref());
    let (q, nm) = (q.get(.., ..k).to_owned(), nm.get(..k, ..).to_owned());
    // V = [[M, ·], [N, ·]], completed by an orthonormal basis of [M; N]'s complement.
    let x = Mat::from_fn(
        p + k,
        p,
        |i, j| if i < p { m[(i, j)] } else { nm[(i - p, j)] },
    );
    let mut proj = Mat::from_fn(p + k, k, |i, j| if i == j + p { 1.0 } else { 0.0 });
    let xt_tail = x.get(p.., ..).transpose().to_owned();
    matmul(
        proj.as_mut(),
        Accum::Add,
        x.as_ref(),
        xt_tail.as_ref(),
        -1.0,
        Par::Seq,
    );
    let (ext, _) = qr_pos(proj.as_ref());
    let mut v = Mat::from_fn(p + k, p + k, |i, j| {
        if j < p {
            x[(i, j)]
        } else {
            ext[(i, j - p)]
        }
    });
    // Rotate the completion so that the lower-right block is diagonal (and Q, N with it).
    let lower: Vec<f64> = (0..k * k).map(|e| v[(p + e / k, p + e % k)]).collect();
    let (r, sigma, rhat) = super::spectrum::thin_svd(&lower, k, k, key)?;
    let q = mm(q.as_ref(), r.as_ref());
    let rn = mm(r.transpose(), nm.as_ref());
    let upper = mm(v.get(..p, p..), rhat.as_ref());
    for i in 0..k {
        for j in 0..p {
            v[(p + i, j)] = rn[(i, j)];
            v[(j, p + i)] = upper[(j, i)];
        }
        for j in 0..k {
            v[(p + i, p + j)] = if i == j { sigma[i] } else { 0.0 };
        }
    }
    if v.determinant() < 0.0 {
        v.col_mut(p + k - 1).iter_mut().for_each(|x| *x = -*x);
    }
    let mut converged = false;
    let mut l = rotation_log(v.as_ref(), key)?;
    for _ in 0..max_iters {
        l = rotation_log(v.as_ref(), key)?;
        let c = l.get(p.., p..);
        if c.norm_l2() <= eps {
            converged = true;
            break;
        }
        let l21 = l.get(p.., ..p);
        let l21_sq = mm(l21, l21.transpose());
        let s = Mat::from_fn(k, k, |i, j| {
            l21_sq[(i, j)] / 12.0 - if i == j { 0.5 } else { 0.0 }
        });
        let g = symmetric_sylvester(s.as_ref(), c, key)?;
        let turned = mm(v.get(.., p..), skew_exp(g.as_ref(), key)?.as_ref());
        v.get_mut(.., p..).copy_from(&turned);
    }
    let mut delta = mm(u0, l.get(..p, ..p));
    matmul(
        delta.as_mut(),
        Accum::Add,
        q.as_ref(),
        l.get(p.., ..p),
        1.0,
        Par::Seq,
    );
    Ok((delta, converged))
}
