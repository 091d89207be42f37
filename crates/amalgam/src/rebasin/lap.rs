//! The linear assignment problem: the permutation `π` maximising `Σᵢ A[i, π(i)]` of a square
//! matrix, exactly, by shortest augmenting paths (Jonker and Volgenant's scheme: column
//! reduction, then one Dijkstra search per row left free, with dual potentials keeping the
//! reduced costs non-negative). `O(n³)` at worst; near-diagonal problems (models that already
//! agree) need few searches. Ties go to the lowest index, so the result is deterministic.

/// The assignment `π` (row → column) maximising `Σᵢ a[i·n + π(i)]` of the row-major `n × n` `a`.
/// Non-finite entries are treated as the worst possible.
pub fn maximize(a: &[f64], n: usize) -> Vec<usize> {
    assert_eq!(a.len(), n * n);
    // Minimise the cost c = max(a) − a (non-negative).
    let top = a
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::MIN, f64::max);
    let worst = a
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::MAX, f64::min);
    let span = if top >= worst { top - worst } else { 0.0 };
    let cost = |i: usize, j: usize| {
        let x = a[i * n + j];
        if x.is_finite() {
            top - x
        } else {
            2.0 * span + 1.0
        }
    };
    const FREE: usize = usize::MAX;
    let mut col_of_row = vec![FREE; n];
    let mut row_of_col = vec![FREE; n];
    let mut u = vec![0.0; n];
    let mut v = vec![0.0; n];
    // Column reduction: v[j] = the column's least cost; its row takes it when free.
    for j in 0..n {
        let (mut best, mut at) = (f64::INFINITY, 0);
        for i in 0..n {
            let c = cost(i, j);
            if c < best {
                best = c;
                at = i;
            }
        }
        v[j] = best;
        if col_of_row[at] == FREE {
            col_of_row[at] = j;
            row_of_col[j] = at;
        }
    }
    let mut dist = vec![0.0; n];
    let mut pred = vec![0usize; n];
    let mut done = vec![false; n];
    let mut scanned: Vec<usize> = Vec::with_capacity(n);
    for r in 0..n {
        if col_of_row[r] != FREE {
            continue;
        }
        for j in 0..n {
            dist[j] = cost(r, j) - u[r] - v[j];
            pred[j] = r;
            done[j] = false;
        }
        scanned.clear();
        let sink = loop {
            // The closest column not yet final (lowest index on ties).
            let mut j = FREE;
            for k in 0..n {
                if !done[k] && (j == FREE || dist[k] < dist[j]) {
                    j = k;
                }
            }
            done[j] = true;
            let i = row_of_col[j];
            if i == FREE {
                break j;
            }
            scanned.push(j);
            let base = dist[j] - u[i];
            for k in 0..n {
                if !done[k] {
                    let d = base + cost(i, k) - v[k];
                    if d < dist[k] {
                        dist[k] = d;
                        pred[k] = i;
                    }
                }
            }
        };
        // Potentials: reduced costs stay non-negative and the path becomes tight.
        let delta = dist[sink];
        u[r] += delta;
        for &j in &scanned {
            let shift = delta - dist[j];
            v[j] -= shift;
            u[row_of_col[j]] += shift;
        }
        // Augment along the path back to r.
        let mut j = sink;
        loop {
            let i = pred[j];
            let prev = col_of_row[i];
            col_of_row[i] = j;
            row_of_col[j] = i;
            if i == r {
                break;
            }
            j = prev;
        }
    }
    col_of_row
}

#[cfg(test)]
mod tests {
    use super::maximize;

    fn total(a: &[f64], n: usize, p: &[usize]) -> f64 {
        (0..n).map(|i| a[i * n + p[i]]).sum()
    }

    /// Every permutation of 0..n (n ≤ 7).
    fn all_perms(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![Vec::new()];
        }
        let mut out = Vec::new();
        for p in all_perms(n - 1) {
            for at in 0..n {
                let mut q = p.clone();
                q.insert(at, n - 1);
                out.push(q);
            }
        }
        out
    }

    #[test]
    fn optimal_against_brute_force() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        for n in 1..=7 {
            for round in 0..20 {
                // Some rounds with ties (small integers).
                let a: Vec<f64> = (0..n * n)
                    .map(|_| {
                        let x = next();
                        if round % 3 == 0 {
                            (x * 6.0).round()
                        } else {
                            x
                        }
                    })
                    .collect();
                let p = maximize(&a, n);
                let mut seen = p.clone();
                seen.sort();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "a permutation");
                let best = all_perms(n)
                    .iter()
                    .map(|q| total(&a, n, q))
                    .fold(f64::MIN, f64::max);
                assert!(
                    (total(&a, n, &p) - best).abs() < 1e-12,
                    "n {n} round {round}"
                );
            }
        }
    }

    #[test]
    fn a_planted_permutation_is_found() {
        let n = 300;
        let planted: Vec<usize> = (0..n).map(|i| (i * 7 + 3) % n).collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = ((i * 31 + j * 17) % 13) as f64 * 0.01;
            }
            a[i * n + planted[i]] = 1.0;
        }
        assert_eq!(maximize(&a, n), planted);
    }
}
