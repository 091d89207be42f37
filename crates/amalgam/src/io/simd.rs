//! f16 <-> f32 conversion at full speed on every build.
//!
//! `half`'s slice conversions detect F16C at run time but, in a build for the baseline x86-64
//! target, still convert through a non-inlined call per 8 elements (about 1.8 Gelem/s here, 3.7x
//! slower than F16C inline; see shared/spec/rust-ecosystem.md §2c). On x86-64 CPUs with F16C and
//! AVX this module converts 8 elements per instruction, picked once at run time; everywhere else
//! it calls `half`. Both round to nearest even, so the bytes are the same either way.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// `dst[i] = src[i] as f32`.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU supports F16C and AVX (checked above).
        unsafe { x86::f16_to_f32(src, dst) };
        return;
    }
    src.convert_to_f32_slice(dst)
}

/// `dst[i] = f16::from_f32(src[i])` (round to nearest even).
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU supports F16C and AVX (checked above).
        unsafe { x86::f32_to_f16(src, dst) };
        return;
    }
    dst.convert_from_f32_slice(src)
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 no, 2 yes
    match STATE.load(Ordering::Relaxed) {
        2 => true,
        1 => false,
        _ => {
            let yes = std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("avx");
            STATE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        let n = src.len() / 8 * 8;
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= len for both slices; unaligned loads and stores.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in n..src.len() {
            dst[j] = src[j].to_f32();
        }
    }

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
        let n = src.len() / 8 * 8;
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= len for both slices; unaligned loads and stores.
            unsafe {
                let x = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
            i += 8;
        }
        for j in n..src.len() {
            dst[j] = f16::from_f32(src[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_half_on_every_f16() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut fast = vec![0f32; all.len()];
        f16_to_f32(&all, &mut fast);
        for (h, f) in all.iter().zip(&fast) {
            let r = h.to_f32();
            assert!(
                r.to_bits() == f.to_bits() || (r.is_nan() && f.is_nan()),
                "{h:?}"
            );
        }
        // Round trip, plus values between f16 steps (ties to even) and out of range.
        let mut probe: Vec<f32> = fast.iter().copied().filter(|x| !x.is_nan()).collect();
        probe.extend((0..100_000).map(|i| (i as f32 - 50_000.0) * 1.234_567e-3));
        probe.extend([65504.0, 65520.0, 1e6, -1e6, 1e-8, 5.96e-8, 2.98e-8]);
        let mut back = vec![f16::ZERO; probe.len()];
        f32_to_f16(&probe, &mut back);
        for (x, h) in probe.iter().zip(&back) {
            assert_eq!(h.to_bits(), f16::from_f32(*x).to_bits(), "{x}");
        }
    }
}
