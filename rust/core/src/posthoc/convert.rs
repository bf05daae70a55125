//! float16 / bfloat16 / float32 conversion of tensor bytes, vectorised: widening inputs to the
//! float32 the accumulation runs in, and rounding its sums once to the output dtype.

use safetensors::tensor::Dtype;

multiversioned! {["avx2"]
    /// bfloat16 bits to float32 (the upper half of the float's bits): a shift, which the
    /// compiler vectorises.
    fn bf16_to_f32(words: &[u16], out: &mut [f32]) {
        for (o, &w) in out.iter_mut().zip(words) {
            *o = f32::from_bits((w as u32) << 16);
        }
    }
}

/// float16 <-> float32 with F16C instructions, 8 lanes at a time, in loops the compiler can
/// unroll. The `half` crate's slice conversions issue the same instructions (so round the same
/// way) but make one call per 8 lanes, through a copy: a quarter of the CPU time of a float16
/// reconstruction went there. Tails go through `half`.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::{
        _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps, _mm_loadu_si128,
        _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };

    /// float16 bits to float32 (exact).
    #[target_feature(enable = "avx,f16c")]
    pub fn widen(words: &[u16], out: &mut [f32]) {
        let n = words.len().min(out.len());
        let body = n / 8 * 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= n, within both slices; the loads and stores are unaligned ones.
            unsafe {
                let h = _mm_loadu_si128(words.as_ptr().add(i).cast());
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for (o, &w) in out[body..n].iter_mut().zip(&words[body..n]) {
            *o = half::f16::from_bits(w).to_f32();
        }
    }

    /// float32 to float16 bits, rounded to nearest-even (overflow to infinity, NaN stays NaN).
    #[target_feature(enable = "avx,f16c")]
    pub fn narrow(x: &[f32], out: &mut [u16]) {
        let n = x.len().min(out.len());
        let body = n / 8 * 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= n, within both slices; the loads and stores are unaligned ones.
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), h);
            }
        }
        for (o, &v) in out[body..n].iter_mut().zip(&x[body..n]) {
            *o = half::f16::from_f32(v).to_bits();
        }
    }
}

/// float16 bits to float32: F16C where the CPU has it, else the `half` crate.
fn f16_to_f32(words: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX and F16C, checked just above.
        return unsafe { f16c::widen(words, out) };
    }
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    words
        .reinterpret_cast::<half::f16>()
        .convert_to_f32_slice(out)
}

/// Whether [`to_f32`] and [`from_f32`] handle `dtype` (F32, F16 or BF16): the dtypes a
/// reconstruction averages.
pub(super) fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Little-endian tensor bytes of `dtype` (F32, F16 or BF16) to float32. Half-precision slices
/// convert with vectorised code (float16 through the `half` crate, F16C on x86 when present).
pub(super) fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    // SAFETY: every bit pattern is a valid u16; only the aligned middle part is used, and only
    // when it covers the whole range.
    let (head, words, _) = unsafe { bytes.align_to::<u16>() };
    let aligned = head.is_empty() && words.len() == out.len();
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 if aligned => f16_to_f32(words, out),
        Dtype::BF16 if aligned => bf16_to_f32(words, out),
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => unreachable!("checked before streaming"),
    }
}

/// Element types without padding bytes.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for u16 {}

/// The little-endian bytes of `x` (safetensors byte order; the crate requires a little-endian
/// host).
fn le_bytes<T: Plain>(x: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding and u8 has alignment 1; the length covers exactly
    // `x`.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// float32 to float16 bits, rounded to nearest-even: F16C where the CPU has it, else the `half`
/// crate.
fn f32_to_f16(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX and F16C, checked just above.
        return unsafe { f16c::narrow(x, out) };
    }
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    out.reinterpret_cast_mut::<half::f16>()
        .convert_from_f32_slice(x)
}

multiversioned! {["avx2"]
    /// float32 to bfloat16 bits through the `half` crate, rounded to nearest-even.
    fn f32_to_bf16(x: &[f32], out: &mut [u16]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        out.reinterpret_cast_mut::<half::bf16>().convert_from_f32_slice(x)
    }
}

/// Whether every element of `bits` has an exponent field (`mask`) short of all ones, i.e. no
/// element is NaN or infinite. An OR over every element without an early exit, so that it
/// vectorises: a few percent of the pass that produced the values.
#[inline(always)]
fn exponents_finite(bits: impl Iterator<Item = u32>, mask: u32) -> bool {
    bits.fold(0u32, |any, b| any | u32::from(b & mask == mask)) == 0
}

/// The little-endian bytes of `x` rounded once to `dtype` (F32, F16 or BF16), to nearest-even as
/// `torch.Tensor.to(dtype)` rounds, and whether every value is finite in `dtype` (a float32
/// value beyond the range of float16 becomes infinite there); `words` (at least as long as `x`)
/// holds 16-bit results.
pub(super) fn from_f32<'a>(dtype: Dtype, x: &'a [f32], words: &'a mut [u16]) -> (&'a [u8], bool) {
    let words = &mut words[..x.len()];
    let mask = match dtype {
        Dtype::F32 => {
            let finite = exponents_finite(x.iter().map(|v| v.to_bits()), 0x7f80_0000);
            return (le_bytes(x), finite);
        }
        Dtype::F16 => {
            f32_to_f16(x, words);
            0x7c00
        }
        Dtype::BF16 => {
            f32_to_bf16(x, words);
            0x7f80
        }
        _ => unreachable!("checked before streaming"),
    };
    let finite = exponents_finite(words.iter().map(|&w| u32::from(w)), mask);
    (le_bytes(words), finite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_conversion() {
        let cases = [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x0001, 5.960_464_5e-8), // subnormal
            (0x7bff, 65504.0),
            (0x0000, 0.0),
            (0xfc00, f32::NEG_INFINITY),
        ];
        let mut bytes: Vec<u8> = cases.iter().flat_map(|(h, _)| h.to_le_bytes()).collect();
        for offset in [0, 1] {
            // Aligned (vectorised) and misaligned (element-wise) inputs give the same values.
            if offset == 1 {
                bytes.insert(0, 0xaa);
            }
            let mut out = vec![0.0f32; cases.len()];
            to_f32(Dtype::F16, &bytes[offset..], &mut out);
            for ((h, want), got) in cases.iter().zip(&out) {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
            }
        }
        let mut out = [0.0f32; 2];
        to_f32(Dtype::F16, &0x7e00u16.to_le_bytes().repeat(2), &mut out);
        assert!(out[0].is_nan());
        to_f32(Dtype::BF16, &[0x80, 0x3f, 0x00, 0xc0], &mut out);
        assert_eq!(out, [1.0, -2.0]);
        to_f32(Dtype::BF16, &[0xaa, 0x80, 0x3f, 0x00, 0xc0][1..], &mut out);
        assert_eq!(out, [1.0, -2.0]);
    }

    #[test]
    fn float16_conversions_match_the_half_crate() {
        // Every float16 value widened; random float32 values, and every midpoint between
        // neighbouring float16 values (ties), narrowed; lengths with and without a tail.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut wide = vec![0.0f32; all.len()];
        f16_to_f32(&all[3..], &mut wide[3..]);
        for (&h, w) in all.iter().zip(&wide).skip(3) {
            assert_eq!(
                w.to_bits(),
                half::f16::from_bits(h).to_f32().to_bits(),
                "{h:#x}"
            );
        }
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut x: Vec<f32> = (0..1 << 16)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                f32::from_bits((state >> 32) as u32)
            })
            .collect();
        x.extend((0..0x7bffu16).map(|h| {
            let (a, b) = (half::f16::from_bits(h), half::f16::from_bits(h + 1));
            ((a.to_f64() + b.to_f64()) / 2.0) as f32 // exact: float32 has 13 more bits
        }));
        x.extend([65520.0, 65519.99, f32::INFINITY, f32::NAN, -0.0, 1e-8, 3e-8]);
        let mut narrow = vec![0u16; x.len()];
        f32_to_f16(&x[1..], &mut narrow[1..]);
        for (&v, &h) in x.iter().zip(&narrow).skip(1) {
            assert_eq!(h, half::f16::from_f32(v).to_bits(), "{v:e}");
        }
    }
}
