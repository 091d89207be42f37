//! The drop's randomness: the draws of DARE and of DELLA with estimated ranks, and DELLA's exact
//! ranks and keep factors (which a sweep's points share, see `points.rs`).

use super::*;

/// Per model, the ordinal ranks of |δ| within their units and the draws of a range of elements
/// (see [`KeyPipeline::exact_ranks`]).
pub(super) struct ExactRanks {
    pub(super) ranks: Vec<u32>,
    pub(super) words: Vec<u16>,
}

impl<T: Real> KeyPipeline<T> {
    /// The DELLA factors of `range` with exact ranks: per model `t`, at `[t * len..(t + 1) * len]`,
    /// 0 for a dropped entry, else 1 (or `1 / q` with `per_element`). `range` spans whole units.
    /// `given`: the ranks and draws of `range`, when the pass has them already.
    pub(super) fn della_factors(
        &self,
        d: &DellaKey,
        range: &Range<usize>,
        args: &[&[T]],
        given: Option<&ExactRanks>,
    ) -> Vec<T> {
        let len = range.len();
        let mut factors = vec![T::ZERO; self.streams.len() * len];
        if len == 0 {
            return factors;
        }
        if !d.masks.is_empty() {
            for (f, bits) in factors.chunks_mut(len).zip(&d.masks) {
                for (i, f) in f.iter_mut().enumerate() {
                    let e = range.start + i;
                    *f = if bits[e / 64] >> (e % 64) & 1 == 1 {
                        T::ONE
                    } else {
                        T::ZERO
                    };
                }
            }
            return factors;
        }
        let computed;
        let ExactRanks { ranks, words } = match given {
            Some(g) => g,
            None => {
                computed = self.exact_ranks(d, range, args);
                &computed
            }
        };
        let per_element = self.config.rescale == Rescale::PerElement;
        for ((f, r), w) in factors
            .chunks_mut(d.unit)
            .zip(ranks.chunks(d.unit))
            .zip(words.chunks(d.unit))
        {
            for ((f, &r), &w) in f.iter_mut().zip(r).zip(w) {
                let q = d.config.keep(r as f64, d.unit);
                *f = if (w as u32) < rng::threshold(q) {
                    if per_element {
                        T::from_f64(1.0 / q)
                    } else {
                        T::ONE
                    }
                } else {
                    T::ZERO
                };
            }
        }
        factors
    }

    /// The ordinal ranks of |δ| within each unit of `range` and the draws of its elements, per
    /// model `t` at `[t * len..(t + 1) * len]`: what the exact DELLA factors of every drop
    /// setting are computed from. `range` spans whole units.
    pub(super) fn exact_ranks(
        &self,
        d: &DellaKey,
        range: &Range<usize>,
        args: &[&[T]],
    ) -> ExactRanks {
        let len = range.len();
        let n = self.streams.len();
        let mut ranks = vec![0u32; n * len];
        let mut words = vec![0u16; n * len];
        if len == 0 {
            return ExactRanks { ranks, words };
        }
        let buffers = || (RankScratch::default(), vec![T::ZERO; d.unit]);
        let rank_model = |(sort, deltas): &mut (RankScratch, Vec<T>),
                          (ranks, words): (&mut [u32], &mut [u16]),
                          x: &[T],
                          stream: u64| {
            for u in (0..len).step_by(d.unit) {
                let unit = u..u + d.unit;
                for ((o, &a), &b) in deltas
                    .iter_mut()
                    .zip(&x[unit.clone()])
                    .zip(&args[0][unit.clone()])
                {
                    *o = a - b;
                }
                ordinal_ranks(deltas, sort, &mut ranks[unit.clone()]);
                rng::draws(
                    self.seed,
                    &self.key,
                    stream,
                    range.start + u,
                    &mut words[unit],
                );
            }
        };
        let work = ranks
            .chunks_mut(len)
            .zip(words.chunks_mut(len))
            .zip(&args[1..])
            .zip(&self.streams);
        if n * len >= 1 << 16 {
            // Large units: the models are ranked in parallel, a sort buffer per worker.
            work.par_bridge()
                .for_each_init(buffers, |b, ((rw, x), &stream)| {
                    rank_model(b, rw, x, stream.into())
                });
        } else {
            let mut b = buffers();
            work.for_each(|((rw, x), &stream)| rank_model(&mut b, rw, x, stream.into()));
        }
        ExactRanks { ranks, words }
    }

    /// Whether the drop draws a random number per element and model as the stages run (DARE,
    /// or DELLA with estimated ranks; exact ranks draw in [`KeyPipeline::della_factors`]).
    pub(super) fn draws_randomly(&self) -> bool {
        match self.config.drop {
            Drop::None => false,
            Drop::Della(_) => !self.della.as_ref().is_some_and(|d| d.exact),
            _ => true,
        }
    }

    /// The draws of every model for elements `range` (per model, `range.len()` of them): those
    /// [`KeyPipeline::blocks`] would draw.
    pub(super) fn draws(&self, range: &Range<usize>) -> Vec<u16> {
        let mut words = vec![0u16; self.streams.len() * range.len()];
        for (w, &m) in words.chunks_mut(range.len().max(1)).zip(&self.streams) {
            rng::Stream::new(self.seed, &self.key, m.into(), range.start).fill(w);
        }
        words
    }
}
