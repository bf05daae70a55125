//! The float32 score of a [`Mixture2D`](super::Mixture2D) for training targets (single
//! precision, 16-lane vectors where the CPU has them).

use rayon::prelude::*;

use super::*;

/// A [`Mixture2D`] in float32 for bulk score evaluation (training targets): 16-lane vectors where
/// the CPU has them. Means are kept as a float32 pair (hi + lo) so that `mu - x` is as accurate
/// as in float64; everything else rounds to float32. Relative score error about 1e-6 (tested
/// against float64), far below the error of a trained model.
#[derive(Debug, Clone)]
pub struct Mixture2DF32 {
    norm: Vec<f32>,
    mu0: Vec<f32>,
    mu0_lo: Vec<f32>,
    mu1: Vec<f32>,
    mu1_lo: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

/// Per-thread buffers of one point's per-component terms (float32).
#[derive(Default)]
struct ScratchF32 {
    exponent: Vec<f32>,
    scale: Vec<f32>,
    g0: Vec<f32>,
    g1: Vec<f32>,
}

/// exp(x) for x <= 0 in float32 to about 1 ulp, inlined so that loops over it vectorise:
/// x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial (truncation < 6e-9), 2^n from
/// the exponent bits. Below -87 it returns 0 (the smallest normal float32 is 2^-126 = e^-87.3).
#[inline(always)]
pub(super) fn exp_nonpositive_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 with 11 trailing zero bits (Cephes)
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let two_n = (t
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits())
        .wrapping_add(127))
        << 23;
    let y = p * f32::from_bits(two_n);
    if x <= -87.0 {
        0.0
    } else {
        y
    }
}

const LANES_F32: usize = 16;

/// `sum_j w_j (1, a_j, b_j)` in independent lanes, so that it vectorises.
#[inline(always)]
fn lane_sums_f32(w: &[f32], a: &[f32], b: &[f32]) -> (f32, f32, f32) {
    let mut acc = [[0.0f32; LANES_F32]; 3];
    let (cw, ca, cb) = (
        w.chunks_exact(LANES_F32),
        a.chunks_exact(LANES_F32),
        b.chunks_exact(LANES_F32),
    );
    let mut tail = (0.0f32, 0.0f32, 0.0f32);
    for ((x, y), z) in cw
        .remainder()
        .iter()
        .zip(ca.remainder())
        .zip(cb.remainder())
    {
        tail = (tail.0 + x, tail.1 + x * y, tail.2 + x * z);
    }
    for ((x, y), z) in cw.zip(ca).zip(cb) {
        for l in 0..LANES_F32 {
            acc[0][l] += x[l];
            acc[1][l] += x[l] * y[l];
            acc[2][l] += x[l] * z[l];
        }
    }
    let sum = |v: &[f32; LANES_F32]| v.iter().sum::<f32>();
    (
        sum(&acc[0]) + tail.0,
        sum(&acc[1]) + tail.1,
        sum(&acc[2]) + tail.2,
    )
}

impl Mixture2DF32 {
    /// The float32 form of `m`.
    pub fn new(m: &Mixture2D) -> Self {
        let hi = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let lo = |v: &[f64]| {
            v.iter()
                .map(|&x| (x - f64::from(x as f32)) as f32)
                .collect::<Vec<f32>>()
        };
        Self {
            norm: hi(&m.norm),
            mu0: hi(&m.mu0),
            mu0_lo: lo(&m.mu0),
            mu1: hi(&m.mu1),
            mu1_lo: lo(&m.mu1),
            a: hi(&m.a),
            b: hi(&m.b),
            c: hi(&m.c),
        }
    }

    /// Score grad_x log p(x; sigma) at `x` ([N, 2] row-major) with per-point noise levels
    /// `sigma` ([N], >= 0): [N, 2] row-major.
    pub fn score(&self, x: &[f32], sigma: &[f32]) -> Result<Vec<f32>> {
        let n = sigma.len();
        if x.len() != 2 * n {
            return Err(Error::ShapeMismatch {
                what: "x (2 values per point)",
                expected: 2 * n,
                got: x.len(),
            });
        }
        if let Some(bad) = sigma.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            return Err(invalid("sigma", bad, "finite and >= 0"));
        }
        if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
            return Err(invalid("x", bad, "finite"));
        }
        let mut score = vec![0.0f32; 2 * n];
        const CHUNK: usize = 64;
        score.par_chunks_mut(2 * CHUNK).enumerate().for_each_init(
            ScratchF32::default,
            |scratch, (chunk, out)| {
                let start = chunk * CHUNK;
                for (i, o) in out.chunks_exact_mut(2).enumerate() {
                    let p = start + i;
                    let sc = self.score_point([x[2 * p], x[2 * p + 1]], sigma[p], scratch);
                    o.copy_from_slice(&sc);
                }
            },
        );
        Ok(score)
    }

    fn score_point(&self, x: [f32; 2], sigma: f32, s: &mut ScratchF32) -> [f32; 2] {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F, checked just above.
                return unsafe { self.score_point_avx512(x, sigma, s) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { self.score_point_avx2(x, sigma, s) };
            }
        }
        self.score_point_impl(x, sigma, s)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn score_point_avx512(&self, x: [f32; 2], sigma: f32, s: &mut ScratchF32) -> [f32; 2] {
        self.score_point_impl(x, sigma, s)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn score_point_avx2(&self, x: [f32; 2], sigma: f32, s: &mut ScratchF32) -> [f32; 2] {
        self.score_point_impl(x, sigma, s)
    }

    /// The float32 twin of [`Mixture2D::eval_point_impl`] (score only).
    #[inline(always)]
    fn score_point_impl(&self, x: [f32; 2], sigma: f32, s: &mut ScratchF32) -> [f32; 2] {
        let k = self.norm.len();
        let s2 = sigma * sigma;
        for buf in [&mut s.exponent, &mut s.scale, &mut s.g0, &mut s.g1] {
            buf.resize(k, 0.0);
        }
        let (mu0, mu0_lo, mu1, mu1_lo) = (
            &self.mu0[..k],
            &self.mu0_lo[..k],
            &self.mu1[..k],
            &self.mu1_lo[..k],
        );
        let (ca, cb, cc, norm) = (&self.a[..k], &self.b[..k], &self.c[..k], &self.norm[..k]);
        let (ex, sc, g0s, g1s) = (
            &mut s.exponent[..k],
            &mut s.scale[..k],
            &mut s.g0[..k],
            &mut s.g1[..k],
        );
        for j in 0..k {
            let (a, b, c) = (ca[j] + s2, cb[j], cc[j] + s2);
            let inv_det = 1.0 / (a * c - b * b);
            // mu - x, exact up to the final rounding: the hi part cancels x exactly when close.
            let d0 = (mu0[j] - x[0]) + mu0_lo[j];
            let d1 = (mu1[j] - x[1]) + mu1_lo[j];
            let g0 = (c * d0 - b * d1) * inv_det;
            let g1 = (a * d1 - b * d0) * inv_det;
            ex[j] = -0.5 * (d0 * g0 + d1 * g1);
            sc[j] = norm[j] * inv_det.sqrt();
            g0s[j] = g0;
            g1s[j] = g1;
        }
        let m = lane_max::<f32, LANES_F32>(ex, f32::NEG_INFINITY);
        for (e, &scale) in ex.iter_mut().zip(sc.iter()) {
            *e = scale * exp_nonpositive_f32(*e - m);
        }
        let (sum, z0, z1) = lane_sums_f32(ex, g0s, g1s);
        [z0 / sum, z1 / sum]
    }
}
