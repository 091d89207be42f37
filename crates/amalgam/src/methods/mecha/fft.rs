//! A complex FFT in f64 of any length (radix 2; short other lengths summed directly; Bluestein's
//! chirp-z for the longer ones), and
//! its n-dimensional form over a row-major tensor: what `crossover` needs (no FFT crate is among
//! the project's dependencies).

use std::f64::consts::PI;

/// A complex number.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct C {
    /// Real part.
    pub re: f64,
    /// Imaginary part.
    pub im: f64,
}

impl C {
    fn new(re: f64, im: f64) -> C {
        C { re, im }
    }
    fn mul(self, o: C) -> C {
        C::new(
            self.re * o.re - self.im * o.im,
            self.re * o.im + self.im * o.re,
        )
    }
    fn conj(self) -> C {
        C::new(self.re, -self.im)
    }
    /// `e^{iθ}`.
    fn expi(theta: f64) -> C {
        let (s, c) = theta.sin_cos();
        C::new(c, s)
    }
}

/// A transform of one length, planned once: the radix-2 twiddles, or Bluestein's chirp and its
/// transformed filter.
pub struct Plan {
    n: usize,
    kind: Kind,
}

enum Kind {
    /// Length a power of two: `e^{-2πik/n}`, k < n/2.
    Radix2(Vec<C>),
    /// A short length of another kind (up to [`DIRECT_MAX`]): the DFT matrix's `n` roots
    /// `e^{-2πik/n}`, the sum taken directly (cheaper than Bluestein's padded transforms).
    Direct(Vec<C>),
    /// Any other length: the chirp `e^{-iπk²/n}`, the padded length's radix-2 twiddles and the
    /// transform of the conjugate chirp.
    Bluestein {
        chirp: Vec<C>,
        twiddles: Vec<C>,
        filter: Vec<C>,
    },
}

fn twiddles(m: usize) -> Vec<C> {
    (0..m / 2)
        .map(|k| C::expi(-2.0 * PI * k as f64 / m as f64))
        .collect()
}

/// In-place forward radix-2 FFT of a power-of-two length.
fn radix2(buf: &mut [C], tw: &[C]) {
    let n = buf.len();
    if n <= 1 {
        return;
    }
    let bits = n.trailing_zeros();
    for i in 0..n {
        let j = i.reverse_bits() >> (usize::BITS - bits);
        if i < j {
            buf.swap(i, j);
        }
    }
    let mut len = 2;
    while len <= n {
        let step = n / len;
        for start in (0..n).step_by(len) {
            for k in 0..len / 2 {
                let w = tw[k * step];
                let u = buf[start + k];
                let v = buf[start + k + len / 2].mul(w);
                buf[start + k] = C::new(u.re + v.re, u.im + v.im);
                buf[start + k + len / 2] = C::new(u.re - v.re, u.im - v.im);
            }
        }
        len *= 2;
    }
}

/// The longest length summed directly rather than by Bluestein's method.
const DIRECT_MAX: usize = 16;

impl Plan {
    /// The plan of length `n`.
    pub fn new(n: usize) -> Plan {
        if n.is_power_of_two() || n <= 1 {
            return Plan {
                n,
                kind: Kind::Radix2(twiddles(n.max(1))),
            };
        }
        if n <= DIRECT_MAX {
            let roots = (0..n)
                .map(|k| C::expi(-2.0 * PI * k as f64 / n as f64))
                .collect();
            return Plan {
                n,
                kind: Kind::Direct(roots),
            };
        }
        let m = (2 * n - 1).next_power_of_two();
        // k² mod 2n keeps the angle exact for large k.
        let chirp: Vec<C> = (0..n)
            .map(|k| {
                let k2 = (k as u128 * k as u128 % (2 * n) as u128) as f64;
                C::expi(-PI * k2 / n as f64)
            })
            .collect();
        let tw = twiddles(m);
        let mut filter = vec![C::default(); m];
        filter[0] = chirp[0].conj();
        for k in 1..n {
            filter[k] = chirp[k].conj();
            filter[m - k] = chirp[k].conj();
        }
        radix2(&mut filter, &tw);
        Plan {
            n,
            kind: Kind::Bluestein {
                chirp,
                twiddles: tw,
                filter,
            },
        }
    }

    /// The forward transform `X_k = Σ_j x_j e^{-2πijk/n}` of `buf` (length n) in place; `scratch`
    /// is reused between calls.
    pub fn forward(&self, buf: &mut [C], scratch: &mut Vec<C>) {
        debug_assert_eq!(buf.len(), self.n);
        match &self.kind {
            Kind::Radix2(tw) => radix2(buf, tw),
            Kind::Direct(roots) => {
                let n = self.n;
                scratch.clear();
                scratch.extend((0..n).map(|k| {
                    buf.iter().enumerate().fold(C::default(), |acc, (j, &x)| {
                        let p = x.mul(roots[j * k % n]);
                        C::new(acc.re + p.re, acc.im + p.im)
                    })
                }));
                buf.copy_from_slice(scratch);
            }
            Kind::Bluestein {
                chirp,
                twiddles,
                filter,
            } => {
                let m = filter.len();
                scratch.clear();
                scratch.resize(m, C::default());
                for (s, (x, w)) in scratch.iter_mut().zip(buf.iter().zip(chirp)) {
                    *s = x.mul(*w);
                }
                radix2(scratch, twiddles);
                for (s, f) in scratch.iter_mut().zip(filter) {
                    *s = s.mul(*f);
                }
                // The inverse by conjugation.
                scratch.iter_mut().for_each(|s| *s = s.conj());
                radix2(scratch, twiddles);
                let inv = 1.0 / m as f64;
                for (x, (s, w)) in buf.iter_mut().zip(scratch.iter().zip(chirp)) {
                    let s = C::new(s.re * inv, -s.im * inv);
                    *x = s.mul(*w);
                }
            }
        }
    }

    /// The inverse transform (with the `1/n`).
    pub fn inverse(&self, buf: &mut [C], scratch: &mut Vec<C>) {
        buf.iter_mut().for_each(|x| *x = x.conj());
        self.forward(buf, scratch);
        let inv = 1.0 / self.n as f64;
        buf.iter_mut()
            .for_each(|x| *x = C::new(x.re * inv, -x.im * inv));
    }
}

/// The n-dimensional transform of row-major `data` of `shape`, in place, axis by axis.
pub fn fftn(data: &mut [C], shape: &[usize], inverse: bool) {
    let numel: usize = shape.iter().product();
    debug_assert_eq!(data.len(), numel);
    if numel == 0 {
        return;
    }
    let mut stride = numel;
    let mut line = Vec::new();
    let mut scratch = Vec::new();
    for &len in shape {
        stride /= len;
        if len <= 1 {
            continue;
        }
        let plan = Plan::new(len);
        // Lines along this axis: outer blocks of len·stride, inner offsets < stride.
        for outer in (0..numel).step_by(len * stride) {
            for inner in 0..stride {
                let at = |k: usize| outer + inner + k * stride;
                line.clear();
                line.extend((0..len).map(|k| data[at(k)]));
                if inverse {
                    plan.inverse(&mut line, &mut scratch);
                } else {
                    plan.forward(&mut line, &mut scratch);
                }
                for (k, &v) in line.iter().enumerate() {
                    data[at(k)] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dft(x: &[C]) -> Vec<C> {
        let n = x.len();
        (0..n)
            .map(|k| {
                x.iter().enumerate().fold(C::default(), |acc, (j, &v)| {
                    let w = C::expi(-2.0 * PI * ((j * k) % n) as f64 / n as f64);
                    let p = v.mul(w);
                    C::new(acc.re + p.re, acc.im + p.im)
                })
            })
            .collect()
    }

    #[test]
    fn matches_the_dft_and_inverts() {
        for n in [1, 2, 3, 5, 6, 7, 8, 12, 17, 64, 77, 100] {
            let x: Vec<C> = (0..n)
                .map(|i| C::new((i as f64 * 0.7).sin(), (i as f64 * 1.3).cos() - 0.2))
                .collect();
            let want = dft(&x);
            let plan = Plan::new(n);
            let mut got = x.clone();
            let mut s = Vec::new();
            plan.forward(&mut got, &mut s);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g.re - w.re).abs() < 1e-10 && (g.im - w.im).abs() < 1e-10,
                    "n = {n}"
                );
            }
            plan.inverse(&mut got, &mut s);
            for (g, w) in got.iter().zip(&x) {
                assert!(
                    (g.re - w.re).abs() < 1e-12 && (g.im - w.im).abs() < 1e-12,
                    "n = {n}"
                );
            }
        }
    }
}
