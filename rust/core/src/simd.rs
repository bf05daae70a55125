//! Vector helpers shared by the AVX-512 kernels (the toy mixture's score, the toy MLP).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// exp(x) on 16 float32 lanes to about 1 ulp: `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree-7
/// Taylor polynomial (truncation < 6e-9), `2^n` by `scalef`. At or below -87 (the smallest normal
/// float32 is e^-87.3), and for NaN, it returns 0; above 88 it returns e^88.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn exp_f32x16(x: __m512) -> __m512 {
    let floor = _mm512_set1_ps(-87.0);
    let x = _mm512_min_ps(_mm512_max_ps(x, floor), _mm512_set1_ps(88.0)); // NaN -> -87 -> 0
    let n =
        _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 5_040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_scalef_ps(p, n);
    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, floor), y)
}

/// A deterministic pseudo-random stream in [0, 1) for tests (splitmix64).
#[cfg(test)]
pub(crate) fn uniform(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_float64() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        // 2 ulp over [-86.9, 88] in steps, 0 at or below -87 and for NaN, e^88 above.
        let xs: Vec<f32> = (0..=17_490).map(|i| -86.9 + i as f32 * 0.01).collect();
        for chunk in xs.chunks_exact(16) {
            let mut out = [0.0f32; 16];
            // SAFETY: AVX-512F checked above; 16 values in and out.
            unsafe {
                _mm512_storeu_ps(
                    out.as_mut_ptr(),
                    exp_f32x16(_mm512_loadu_ps(chunk.as_ptr())),
                )
            };
            for (&x, &y) in chunk.iter().zip(&out) {
                let want = f64::from(x).exp();
                assert!(
                    (f64::from(y) - want).abs() <= 2.0 * f64::from(f32::EPSILON) * want,
                    "{x}: {y} vs {want}"
                );
            }
        }
        let special = [
            -87.0f32,
            -1e30,
            f32::NAN,
            89.0,
            1e30,
            0.0,
            -87.5,
            88.0,
            1.0,
            -1.0,
            2.0,
            3.0,
            4.0,
            5.0,
            6.0,
            7.0,
        ];
        let mut out = [0.0f32; 16];
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(
                out.as_mut_ptr(),
                exp_f32x16(_mm512_loadu_ps(special.as_ptr())),
            )
        };
        assert_eq!(&out[..3], &[0.0, 0.0, 0.0]);
        assert_eq!(out[3], out[7]);
        assert_eq!(out[4], out[7]);
        assert_eq!(out[5], 1.0);
        assert_eq!(out[6], 0.0);
    }
}
