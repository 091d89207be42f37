//! Reproducible random masks from a counter-based stream.
//!
//! Each element of a mask gets one 16-bit uniform draw: draw `i` of model `t` in key `K` is the
//! low (`i` even) or high (`i` odd) half of word `i / 2` of the ChaCha8 stream keyed by (seed, K)
//! with stream number `t`. Any run of elements can be generated on its own (the generator seeks
//! to the run's first word), so masks do not depend on the chunk size, the thread count or the
//! order keys are processed in. 16 bits resolve a keep probability to 2^-16 (1.5e-5), far finer
//! than any drop rate in use, at half the generator work of 32-bit draws. Noise (supermerger's
//! "plus random") takes one 64-bit word per element instead ([`normals`]), seekable the same way.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The key of the ChaCha8 stream of one tensor: the seed and a 64-bit FNV-1a hash of its name.
fn key_seed(seed: u64, key: &str) -> [u8; 32] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&seed.to_le_bytes());
    k[8..16].copy_from_slice(&h.to_le_bytes());
    k[16..24].copy_from_slice(&(key.len() as u64).to_le_bytes());
    k[24..32].copy_from_slice(b"amalgMSK");
    k
}

/// The draws of model `model` in key `key`, from element `start` on.
pub struct Stream {
    rng: ChaCha8Rng,
    /// The high half of a word whose low half was the last draw handed out.
    pending: Option<u16>,
}

impl Stream {
    /// The stream of `(seed, key, model)` from element `start` on.
    pub fn new(seed: u64, key: &str, model: u64, start: usize) -> Self {
        let mut rng = ChaCha8Rng::from_seed(key_seed(seed, key));
        rng.set_stream(model);
        rng.set_word_pos((start / 2) as u128);
        let pending = (start % 2 == 1).then(|| (rng.next_u32() >> 16) as u16);
        Stream { rng, pending }
    }
    /// The draws of the next `out.len()` elements.
    pub fn fill(&mut self, mut out: &mut [u16]) {
        if out.is_empty() {
            return;
        }
        if let Some(high) = self.pending.take() {
            out[0] = high;
            out = &mut out[1..];
        }
        let pairs = out.len() / 2 * 2;
        // Whole words, a block at a time: draw 2j is the low half of word j, little-endian.
        self.rng
            .fill_bytes(bytemuck::cast_slice_mut(&mut out[..pairs]));
        if cfg!(target_endian = "big") {
            out[..pairs].iter_mut().for_each(|w| *w = u16::from_le(*w));
        }
        if pairs < out.len() {
            let w = self.rng.next_u32();
            out[pairs] = w as u16;
            self.pending = Some((w >> 16) as u16);
        }
    }
}

/// The draws of elements `start..start + out.len()` of model `model` in key `key`.
pub fn draws(seed: u64, key: &str, model: u64, start: usize, out: &mut [u16]) {
    Stream::new(seed, key, model, start).fill(out)
}

/// Uniform values in `[-1, 1)` (53 bits each, one 64-bit word of the stream of `(seed, key,
/// stream)` per value, from value 0): the test matrices of randomized SVDs. Plain arithmetic on
/// the words, so every platform gets the same values.
pub fn uniform_signed(seed: u64, key: &str, stream: u64, out: &mut [f64]) {
    let mut rng = ChaCha8Rng::from_seed(key_seed(seed, key));
    rng.set_stream(stream);
    for x in out {
        *x = (rng.next_u64() >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0;
    }
}

/// Standard normal values of elements `start..start + out.len()` of the stream of `(seed, key,
/// stream)`: element `i` takes 64-bit word `i` (so any run can be drawn on its own) and turns its
/// halves into `u1 ∈ (0, 1)` (high, offset by half a step) and `u2 ∈ [0, 1)` (low) by the
/// Box–Muller transform, `√(−2 ln u1) · cos(2π u2)`. Plain arithmetic on the words: every
/// platform gets the same values (to the libm's `ln`, `cos`); tails are cut at about 6.7σ.
pub fn normals(seed: u64, key: &str, stream: u64, start: usize, out: &mut [f64]) {
    let mut rng = ChaCha8Rng::from_seed(key_seed(seed, key));
    rng.set_stream(stream);
    rng.set_word_pos(2 * start as u128);
    let step = 1.0 / (1u64 << 32) as f64;
    for x in out {
        let w = rng.next_u64();
        let u1 = ((w >> 32) as f64 + 0.5) * step;
        let u2 = (w as u32) as f64 * step;
        *x = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    }
}

/// A uniformly random permutation of `0..n` (Fisher–Yates over the stream of `(seed, key,
/// stream)`; index `i` takes a draw from `0..=i` by a 64-bit multiply-shift).
pub fn permutation(seed: u64, key: &str, stream: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::from_seed(key_seed(seed, key));
    rng.set_stream(stream);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        p.swap(i, j);
    }
    p
}

/// The draw threshold of a Bernoulli trial that succeeds with probability `q`: a draw `d`
/// succeeds when `d < threshold(q)` (exact to 2^-16; q ≥ 1 always, q ≤ 0 never).
#[inline]
pub fn threshold(q: f64) -> u32 {
    if q <= 0.0 {
        0
    } else if q >= 1.0 {
        1 << 16
    } else {
        (q * 65_536.0).round() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_reproduce_the_whole_stream() {
        let mut whole = vec![0u16; 10_000];
        draws(7, "a.weight", 3, 0, &mut whole);
        let mut parts = Vec::new();
        // Odd and even starts and lengths, and several fills of one stream.
        for (s, e) in [
            (0, 1),
            (1, 4097),
            (4097, 9000),
            (9000, 9001),
            (9001, 10_000),
        ] {
            let mut p = vec![0u16; e - s];
            draws(7, "a.weight", 3, s, &mut p);
            parts.extend(p);
        }
        assert_eq!(whole, parts);
        let mut stream = Stream::new(7, "a.weight", 3, 3);
        let mut a = vec![0u16; 5];
        let mut b = vec![0u16; 8];
        stream.fill(&mut a);
        stream.fill(&mut b);
        assert_eq!([a, b].concat(), whole[3..16]);
        // Different key, model or seed: a different stream.
        let mut other = vec![0u16; 16];
        draws(7, "b.weight", 3, 0, &mut other);
        assert_ne!(other, whole[..16]);
        draws(7, "a.weight", 4, 0, &mut other);
        assert_ne!(other, whole[..16]);
        draws(8, "a.weight", 3, 0, &mut other);
        assert_ne!(other, whole[..16]);
    }

    #[test]
    fn draws_are_the_halves_of_the_stream_words() {
        let mut d = vec![0u16; 10];
        draws(3, "k", 1, 4, &mut d);
        let mut r = ChaCha8Rng::from_seed(key_seed(3, "k"));
        r.set_stream(1);
        r.set_word_pos(2);
        let halves: Vec<u16> = (0..5)
            .flat_map(|_| {
                let w = r.next_u32();
                [w as u16, (w >> 16) as u16]
            })
            .collect();
        assert_eq!(d, halves);
    }

    #[test]
    fn normals_reproduce_by_runs_and_are_standard() {
        let n = 100_000;
        let mut whole = vec![0.0; n];
        normals(5, "k", 0, 0, &mut whole);
        let mut part = vec![0.0; 7];
        normals(5, "k", 0, 1001, &mut part);
        assert_eq!(part, whole[1001..1008]);
        let mean = whole.iter().sum::<f64>() / n as f64;
        let var = whole.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = whole.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / var / var;
        // Standard errors: 1/√n, √(2/n), √(24/n).
        assert!(mean.abs() < 5.0 / (n as f64).sqrt(), "mean {mean}");
        assert!(
            (var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
            "variance {var}"
        );
        assert!(
            (kurt - 3.0).abs() < 5.0 * (24.0 / n as f64).sqrt(),
            "kurtosis {kurt}"
        );
        let within = whole.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
        assert!((within - 0.682_689).abs() < 0.01, "P(|z| < 1) = {within}");
    }

    #[test]
    fn keep_rate_is_within_binomial_bounds() {
        let n = 200_000;
        let mut w = vec![0u16; n];
        draws(114514, "k", 0, 0, &mut w);
        for q in [0.1, 0.5, 0.9] {
            let t = threshold(q);
            let kept = w.iter().filter(|&&x| (x as u32) < t).count() as f64;
            let sd = (n as f64 * q * (1.0 - q)).sqrt();
            assert!((kept - n as f64 * q).abs() < 5.0 * sd, "q {q}: kept {kept}");
        }
        assert_eq!(threshold(1.0), 1 << 16);
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(0.9), 58_982);
    }
}
