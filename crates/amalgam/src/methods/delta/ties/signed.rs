//! The election and the sign-filtered fuse, a block of elements at a time.

use super::*;

/// Per element of a block, what an election and a sign-filtered fuse need: the sums and counts of
/// the positive and of the negative entries, and (for `mass`) the sum of all of them in model
/// order.
pub(super) struct Signed<T> {
    pub(super) pos: [T; W],
    pub(super) neg: [T; W],
    pub(super) npos: [T; W],
    pub(super) nneg: [T; W],
    pub(super) total: [T; W],
}

impl<T: Real> Signed<T> {
    pub(super) fn new() -> Self {
        Signed {
            pos: [T::ZERO; W],
            neg: [T::ZERO; W],
            npos: [T::ZERO; W],
            nneg: [T::ZERO; W],
            total: [T::ZERO; W],
        }
    }

    pub(super) fn clear(&mut self, len: usize) {
        for a in [
            &mut self.pos,
            &mut self.neg,
            &mut self.npos,
            &mut self.nneg,
            &mut self.total,
        ] {
            a[..len].fill(T::ZERO);
        }
    }

    /// Adds one model's (weighted) deltas `v`; its weight `w` is what its entries count.
    #[inline(always)]
    pub(super) fn add(&mut self, v: &[T], w: T, mass: bool) {
        self.add_with(v.len(), w, mass, |i| v[i]);
    }

    /// Adds the `len` deltas `delta(i)` of a model of weight `w`.
    #[inline(always)]
    pub(super) fn add_with(&mut self, len: usize, w: T, mass: bool, delta: impl Fn(usize) -> T) {
        let (pos, neg) = (&mut self.pos[..len], &mut self.neg[..len]);
        let (npos, nneg) = (&mut self.npos[..len], &mut self.nneg[..len]);
        let total = &mut self.total[..len];
        for i in 0..len {
            let acc = (
                &mut pos[i],
                &mut neg[i],
                &mut npos[i],
                &mut nneg[i],
                &mut total[i],
            );
            add_one(delta(i), w, mass, acc);
        }
    }

    /// Elects the sign of each element and fuses the entries of that sign into `o`.
    #[inline(always)]
    pub(super) fn fuse(&self, len: usize, config: Config, inv_n: T, o: &mut [T]) {
        let o = &mut o[..len];
        let sums = |i: usize| {
            [
                self.pos[i],
                self.neg[i],
                self.npos[i],
                self.nneg[i],
                self.total[i],
            ]
        };
        match config.agreement {
            None => {
                for (i, o) in o.iter_mut().enumerate() {
                    *o = fuse_one(sums(i), config, inv_n);
                }
            }
            Some(agreement) => {
                for (i, o) in o.iter_mut().enumerate() {
                    let s = sums(i);
                    let agreed =
                        agreeing(s, config, agreement) * inv_n >= T::from_f64(agreement.min);
                    *o = if agreed {
                        fuse_one(s, config, inv_n)
                    } else {
                        T::ZERO
                    };
                }
            }
        }
    }
}

/// Adds one delta `v` to the sums and counts of its sign `(pos, neg, npos, nneg, total)`; it
/// counts as its model's weight `w` (1 unweighted).
#[inline(always)]
pub(super) fn add_one<T: Real>(
    v: T,
    w: T,
    mass: bool,
    (pos, neg, npos, nneg, total): (&mut T, &mut T, &mut T, &mut T, &mut T),
) {
    let (p, m) = (v > T::ZERO, v < T::ZERO);
    // Selects rather than branches, so that the loop vectorises.
    *pos += if p { v } else { T::ZERO };
    *npos += if p { w } else { T::ZERO };
    *neg += if m { v } else { T::ZERO };
    *nneg += if m { w } else { T::ZERO };
    if mass {
        *total += v;
    }
}

/// The models that count towards the election's agreement, from the sums and counts
/// `[pos, neg, npos, nneg, total]`.
#[inline(always)]
fn agreeing<T: Real>([_, _, npos, nneg, total]: [T; 5], config: Config, agreement: Agreement) -> T {
    match agreement.count {
        AgreementCount::Participating => npos + nneg,
        AgreementCount::Elected => {
            let vote = if config.election == Election::Mass {
                total
            } else {
                npos - nneg
            };
            if vote > T::ZERO || (config.sign_tie == SignTie::Positive && vote == T::ZERO) {
                npos
            } else if vote < T::ZERO {
                nneg
            } else {
                T::ZERO
            }
        }
    }
}

/// The elected sign's fused value from the sums and counts `[pos, neg, npos, nneg, total]` (the
/// counts are sums of weights).
#[inline(always)]
pub(super) fn fuse_one<T: Real>(
    [pos, neg, npos, nneg, total]: [T; 5],
    config: Config,
    inv_n: T,
) -> T {
    let positive_tie = config.sign_tie == SignTie::Positive;
    let mass = config.election == Election::Mass;
    // 0/1 factors rather than selects or branches: the elected sign of random data is
    // unpredictable, and the compiler turns selects of loads into branches.
    let one = |c: bool| if c { T::ONE } else { T::ZERO };
    let vote = if mass { total } else { npos - nneg };
    let up = one(vote > T::ZERO || (positive_tie && vote == T::ZERO));
    let down = one(vote < T::ZERO);
    let sum = up * pos + down * neg;
    let count = up * npos + down * nneg;
    match config.fuse {
        // No entry of the elected sign: the sum is 0 too.
        Fuse::DisjointMean => sum / (count + one(count == T::ZERO)),
        Fuse::Mean => sum * inv_n,
        _ => sum,
    }
}

/// Elements of a run whose sums and counts [`Signed::add_inputs`] holds in registers.
pub(super) const LANES: usize = 8;

impl<T: Real> Signed<T> {
    /// Sets the sums and counts of the deltas `x_t − base` of every model, elements
    /// `at..at + len` (`len ≤ W`), straight from the inputs: `LANES` elements at a time, held in
    /// registers while every model is added, so each input element is loaded once and each sum
    /// stored once. Adds in model order like [`Signed::add`], to the same bits.
    pub(super) fn add_inputs(
        &mut self,
        base: &[T],
        models: &[&[T]],
        at: usize,
        len: usize,
        mass: bool,
    ) {
        let main = len / LANES * LANES;
        for i in (0..main).step_by(LANES) {
            let b: &[T; LANES] = base[at + i..at + i + LANES].try_into().expect("a run");
            let mut acc = [[T::ZERO; LANES]; 5];
            for x in models {
                let x: &[T; LANES] = x[at + i..at + i + LANES].try_into().expect("a run");
                let [pos, neg, npos, nneg, total] = &mut acc;
                for j in 0..LANES {
                    let sums = (
                        &mut pos[j],
                        &mut neg[j],
                        &mut npos[j],
                        &mut nneg[j],
                        &mut total[j],
                    );
                    add_one(x[j] - b[j], T::ONE, mass, sums);
                }
            }
            let run = i..i + LANES;
            self.pos[run.clone()].copy_from_slice(&acc[0]);
            self.neg[run.clone()].copy_from_slice(&acc[1]);
            self.npos[run.clone()].copy_from_slice(&acc[2]);
            self.nneg[run.clone()].copy_from_slice(&acc[3]);
            self.total[run].copy_from_slice(&acc[4]);
        }
        for j in main..len {
            let mut acc = [T::ZERO; 5];
            for x in models {
                let [pos, neg, npos, nneg, total] = &mut acc;
                add_one(
                    x[at + j] - base[at + j],
                    T::ONE,
                    mass,
                    (pos, neg, npos, nneg, total),
                );
            }
            let [pos, neg, npos, nneg, total] = acc;
            (self.pos[j], self.neg[j], self.npos[j], self.nneg[j]) = (pos, neg, npos, nneg);
            self.total[j] = total;
        }
    }
}
