//! Classical multidimensional scaling: points in the plane whose distances approximate a
//! distance matrix.

use faer::Mat;

/// The 2-D classical MDS of the `n × n` distance matrix `d`: with `B = −½ J D⁽²⁾ J` (`J` the
/// centring matrix, `D⁽²⁾` the squared distances), the coordinates are the two leading
/// eigenvectors of `B` scaled by the square roots of their eigenvalues. Also the share of
/// `B`'s positive eigenvalues the two hold (1 when the points lie in a plane).
///
/// Each axis's sign is fixed so that its largest coordinate in absolute value is positive, so the
/// map does not flip between runs. Fewer than two positive eigenvalues give zeros on that axis.
pub fn classical_mds(d: &[Vec<f64>]) -> (Vec<[f64; 2]>, f64) {
    let n = d.len();
    if n == 0 {
        return (Vec::new(), 1.0);
    }
    let sq = Mat::from_fn(n, n, |i, j| d[i][j] * d[i][j]);
    let row: Vec<f64> = (0..n)
        .map(|i| (0..n).map(|j| sq[(i, j)]).sum::<f64>() / n as f64)
        .collect();
    let all = row.iter().sum::<f64>() / n as f64;
    let b = Mat::from_fn(n, n, |i, j| -0.5 * (sq[(i, j)] - row[i] - row[j] + all));
    let Ok(evd) = b.self_adjoint_eigen(faer::Side::Lower) else {
        return (vec![[0.0; 2]; n], 0.0);
    };
    // Eigenvalues come in ascending order.
    let values: Vec<f64> = (0..n).map(|i| evd.S()[i]).collect();
    let positive: f64 = values.iter().filter(|&&v| v > 0.0).sum();
    let mut points = vec![[0.0; 2]; n];
    let mut held = 0.0;
    for (axis, col) in (0..n).rev().take(2).enumerate() {
        let lambda = values[col];
        if lambda <= positive * 1e-12 || lambda <= 0.0 {
            continue;
        }
        held += lambda;
        let u = evd.U().col(col);
        let big = (0..n)
            .max_by(|&a, &b| u[a].abs().total_cmp(&u[b].abs()))
            .unwrap_or(0);
        let sign = if u[big] < 0.0 { -1.0 } else { 1.0 };
        for (i, p) in points.iter_mut().enumerate() {
            p[axis] = sign * u[i] * lambda.sqrt();
        }
    }
    let explained = if positive > 0.0 { held / positive } else { 1.0 };
    (points, explained)
}
