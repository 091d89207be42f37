//! Reproducible random masks from a counter-based stream.
//!
//! The random number used for element `i` of model `t` in key `K` is word `i` of the ChaCha8
//! stream keyed by (seed, K) with stream number `t`. Any chunk of elements can be generated on
//! its own (the generator seeks to the chunk's first word), so masks do not depend on the chunk
//! size, the thread count or the order keys are processed in.

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

/// The random words of model `model` in key `key`, from element `start` on.
pub struct Stream(ChaCha8Rng);

impl Stream {
    pub fn new(seed: u64, key: &str, model: u64, start: usize) -> Self {
        let mut r = ChaCha8Rng::from_seed(key_seed(seed, key));
        r.set_stream(model);
        r.set_word_pos(start as u128);
        Stream(r)
    }
    /// The words of the next `out.len()` elements.
    pub fn fill(&mut self, out: &mut [u32]) {
        // The bytes of consecutive words, little-endian: the same words as `next_u32` calls,
        // generated a block at a time.
        self.0.fill_bytes(bytemuck::cast_slice_mut(out));
        if cfg!(target_endian = "big") {
            out.iter_mut().for_each(|w| *w = u32::from_le(*w));
        }
    }
}

/// The random words of elements `start..start + out.len()` of model `model` in key `key`.
pub fn words(seed: u64, key: &str, model: u64, start: usize, out: &mut [u32]) {
    Stream::new(seed, key, model, start).fill(out)
}

/// The word threshold of a Bernoulli draw that succeeds with probability `q`: a draw `w`
/// succeeds when `w < threshold(q)` (exact to 2^-32; q ≥ 1 always, q ≤ 0 never).
pub fn threshold(q: f64) -> u64 {
    if q <= 0.0 {
        0
    } else if q >= 1.0 {
        1 << 32
    } else {
        (q * 4_294_967_296.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_reproduce_the_whole_stream() {
        let mut whole = vec![0u32; 10_000];
        words(7, "a.weight", 3, 0, &mut whole);
        let mut parts = Vec::new();
        for (s, e) in [(0, 1), (1, 4097), (4097, 9000), (9000, 10_000)] {
            let mut p = vec![0u32; e - s];
            words(7, "a.weight", 3, s, &mut p);
            parts.extend(p);
        }
        assert_eq!(whole, parts);
        // Different key, model or seed: a different stream.
        let mut other = vec![0u32; 16];
        words(7, "b.weight", 3, 0, &mut other);
        assert_ne!(other, whole[..16]);
        words(7, "a.weight", 4, 0, &mut other);
        assert_ne!(other, whole[..16]);
        words(8, "a.weight", 3, 0, &mut other);
        assert_ne!(other, whole[..16]);
    }

    #[test]
    fn filled_words_are_the_stream_words() {
        let mut a = Stream::new(3, "k", 1, 5);
        let mut filled = vec![0u32; 100];
        a.fill(&mut filled[..37]);
        a.fill(&mut filled[37..]);
        let mut r = ChaCha8Rng::from_seed(key_seed(3, "k"));
        r.set_stream(1);
        r.set_word_pos(5);
        let one_by_one: Vec<u32> = (0..100).map(|_| r.next_u32()).collect();
        assert_eq!(filled, one_by_one);
    }

    #[test]
    fn keep_rate_is_within_binomial_bounds() {
        let n = 200_000;
        let mut w = vec![0u32; n];
        words(114514, "k", 0, 0, &mut w);
        for q in [0.1, 0.5, 0.9] {
            let t = threshold(q);
            let kept = w.iter().filter(|&&x| (x as u64) < t).count() as f64;
            let sd = (n as f64 * q * (1.0 - q)).sqrt();
            assert!((kept - n as f64 * q).abs() < 5.0 * sd, "q {q}: kept {kept}");
        }
        assert_eq!(threshold(1.0), 1 << 32);
        assert_eq!(threshold(0.0), 0);
    }
}
