//! Exact log-density, score and most responsible component of a 2D Gaussian mixture diffused
//! by isotropic Gaussian noise: p(x; sigma) = sum_k phi_k N(x; mu_k, Sigma_k + sigma^2 I).
//! Closed-form 2x2 algebra in float64; per point two branch-free passes over the components
//! (laid out as structure-of-arrays so the compiler vectorises them), threads across points.

use rayon::prelude::*;

use crate::error::{invalid, two_per_point, Error, Result};

mod single;
pub use single::Mixture2DF32;

/// A mixture of 2D Gaussians with normalised weights, stored one array per quantity.
#[derive(Debug, Clone)]
pub struct Mixture2D {
    /// phi_k / (2 pi), the Gaussian normaliser without the determinant.
    norm: Vec<f64>,
    mu0: Vec<f64>,
    mu1: Vec<f64>,
    /// Covariance [[a, b], [b, c]] per component.
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
}

/// Per-point results of [`Mixture2D::eval`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    /// log p(x; sigma), length N.
    pub logp: Vec<f64>,
    /// grad_x log p(x; sigma), length 2N (row-major [N, 2]).
    pub score: Vec<f64>,
    /// Index of the component with the largest posterior responsibility, length N.
    pub argmax: Vec<u32>,
}

/// Per-thread buffers of one point's per-component terms.
#[derive(Default)]
struct Scratch {
    exponent: Vec<f64>,
    scale: Vec<f64>,
    g0: Vec<f64>,
    g1: Vec<f64>,
}

/// exp(x) for x <= 0 to about 1 ulp, inlined so that loops over it vectorise: x = n ln2 + r with
/// |r| <= ln2 / 2, a degree-12 Taylor polynomial for e^r (truncation < 2e-16), and 2^n from the
/// exponent bits. Below -600 it returns 0: such a weight is negligible next to the largest one
/// (which is 1), and flushing it avoids slow subnormal arithmetic downstream.
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    // ln 2 split into a high part with trailing zero bits and the remainder (fdlibm).
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    // Adding 1.5 * 2^52 rounds to an integer held in the low mantissa bits (no libm call).
    const SHIFTER: f64 = 6_755_399_441_055_744.0;
    let x = x.max(-708.0);
    let t = x * std::f64::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Horner, coefficients 1/j! from j = 12 down to 0.
    let mut p = 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
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
        .wrapping_add(1023))
        << 52;
    let y = p * f64::from_bits(two_n);
    if x < -600.0 {
        0.0
    } else {
        y
    }
}

const LANES: usize = 8;

/// Maximum of `v` (`lowest` when empty) in `N` independent lanes, so that it vectorises in
/// float64 and float32 alike; no NaN is ever stored here.
#[inline(always)]
fn lane_max<T: Copy + PartialOrd, const N: usize>(v: &[T], lowest: T) -> T {
    let mut acc = [lowest; N];
    let chunks = v.chunks_exact(N);
    let tail = chunks
        .remainder()
        .iter()
        .fold(lowest, |a, &x| if x > a { x } else { a });
    for c in chunks {
        for l in 0..N {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |a, &x| if x > a { x } else { a })
}

/// `sum_j a_j b_j` (or `sum_j a_j` without `b`) in independent lanes, so that it vectorises.
#[inline(always)]
fn lane_dot(a: &[f64], b: Option<&[f64]>) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut tail = 0.0;
    match b {
        Some(b) => {
            let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
            tail += ca
                .remainder()
                .iter()
                .zip(cb.remainder())
                .map(|(x, y)| x * y)
                .sum::<f64>();
            for (x, y) in ca.zip(cb) {
                for l in 0..LANES {
                    acc[l] += x[l] * y[l];
                }
            }
        }
        None => {
            let ca = a.chunks_exact(LANES);
            tail += ca.remainder().iter().sum::<f64>();
            for x in ca {
                for l in 0..LANES {
                    acc[l] += x[l];
                }
            }
        }
    }
    acc.iter().sum::<f64>() + tail
}

impl Mixture2D {
    /// `phi`: K non-negative weights (normalised here), `mu`: 2K means, `cov`: 4K row-major
    /// symmetric positive-definite 2x2 covariances.
    pub fn new(phi: &[f64], mu: &[f64], cov: &[f64]) -> Result<Self> {
        let k = phi.len();
        if k == 0 {
            return Err(invalid("phi", "[]", "a non-empty list of weights"));
        }
        if mu.len() != 2 * k {
            return Err(Error::ShapeMismatch {
                what: "mu (2 values per component)",
                expected: 2 * k,
                got: mu.len(),
            });
        }
        if cov.len() != 4 * k {
            return Err(Error::ShapeMismatch {
                what: "Sigma (4 values per component)",
                expected: 4 * k,
                got: cov.len(),
            });
        }
        if let Some(bad) = phi.iter().find(|p| !(p.is_finite() && **p >= 0.0)) {
            return Err(invalid("phi", bad, "finite and >= 0"));
        }
        let total: f64 = phi.iter().sum();
        if total <= 0.0 {
            return Err(invalid("phi", total, "weights with a positive sum"));
        }
        if let Some(bad) = mu.iter().find(|m| !m.is_finite()) {
            return Err(invalid("mu", bad, "finite"));
        }
        for c in cov.chunks_exact(4) {
            let (a, b, b2, d) = (c[0], c[1], c[2], c[3]);
            let sym = (b - b2).abs() <= 1e-6 * (a.abs() + d.abs());
            if !(sym && a > 0.0 && d > 0.0 && a * d - b * b > 0.0 && a.is_finite() && d.is_finite())
            {
                return Err(invalid(
                    "Sigma",
                    format!("{c:?}"),
                    "symmetric positive definite",
                ));
            }
        }
        let two_pi = 2.0 * std::f64::consts::PI;
        Ok(Self {
            norm: phi.iter().map(|p| p / total / two_pi).collect(),
            mu0: mu.iter().step_by(2).copied().collect(),
            mu1: mu.iter().skip(1).step_by(2).copied().collect(),
            a: cov.iter().step_by(4).copied().collect(),
            b: cov.chunks_exact(4).map(|c| 0.5 * (c[1] + c[2])).collect(),
            c: cov.iter().skip(3).step_by(4).copied().collect(),
        })
    }

    /// Number of components.
    pub fn len(&self) -> usize {
        self.norm.len()
    }

    /// Whether the mixture has no components (never true for a constructed mixture).
    pub fn is_empty(&self) -> bool {
        self.norm.is_empty()
    }

    /// Evaluates log-density, score and most responsible component at `x` ([N, 2] row-major)
    /// with per-point noise levels `sigma` ([N], >= 0).
    pub fn eval(&self, x: &[f64], sigma: &[f64]) -> Result<Evaluation> {
        let n = sigma.len();
        two_per_point("x (2 values per point)", x, n)?;
        if let Some(bad) = sigma.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            return Err(invalid("sigma", bad, "finite and >= 0"));
        }
        if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
            return Err(invalid("x", bad, "finite"));
        }
        let mut out = Evaluation {
            logp: vec![0.0; n],
            score: vec![0.0; 2 * n],
            argmax: vec![0; n],
        };
        const CHUNK: usize = 32;
        out.logp
            .par_chunks_mut(CHUNK)
            .zip(out.score.par_chunks_mut(2 * CHUNK))
            .zip(out.argmax.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each_init(
                Scratch::default,
                |scratch, (chunk, ((logp, score), argmax))| {
                    let start = chunk * CHUNK;
                    for i in 0..logp.len() {
                        let p = start + i;
                        let (lp, sc, am) =
                            self.eval_point([x[2 * p], x[2 * p + 1]], sigma[p], scratch);
                        logp[i] = lp;
                        score[2 * i] = sc[0];
                        score[2 * i + 1] = sc[1];
                        argmax[i] = am;
                    }
                },
            );
        Ok(out)
    }

    fn eval_point(&self, x: [f64; 2], sigma: f64, s: &mut Scratch) -> (f64, [f64; 2], u32) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { self.eval_point_avx2(x, sigma, s) };
        }
        self.eval_point_impl(x, sigma, s)
    }

    /// The same code compiled for 4-lane float64 vectors. Rust does not contract `a * b + c`
    /// into FMAs, so results are bit-identical to the baseline build.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn eval_point_avx2(&self, x: [f64; 2], sigma: f64, s: &mut Scratch) -> (f64, [f64; 2], u32) {
        self.eval_point_impl(x, sigma, s)
    }

    #[inline(always)]
    fn eval_point_impl(&self, x: [f64; 2], sigma: f64, s: &mut Scratch) -> (f64, [f64; 2], u32) {
        let k = self.len();
        let s2 = sigma * sigma;
        for buf in [&mut s.exponent, &mut s.scale, &mut s.g0, &mut s.g1] {
            buf.resize(k, 0.0);
        }
        // Pass 1: per component the Gaussian exponent, the normaliser and the component score
        // g = (Sigma_k + s2 I)^-1 (mu_k - x).
        let (mu0, mu1, ca, cb, cc, norm) = (
            &self.mu0[..k],
            &self.mu1[..k],
            &self.a[..k],
            &self.b[..k],
            &self.c[..k],
            &self.norm[..k],
        );
        let (ex, sc, g0s, g1s) = (
            &mut s.exponent[..k],
            &mut s.scale[..k],
            &mut s.g0[..k],
            &mut s.g1[..k],
        );
        for j in 0..k {
            let (a, b, c) = (ca[j] + s2, cb[j], cc[j] + s2);
            let inv_det = 1.0 / (a * c - b * b);
            let d0 = mu0[j] - x[0];
            let d1 = mu1[j] - x[1];
            let g0 = (c * d0 - b * d1) * inv_det;
            let g1 = (a * d1 - b * d0) * inv_det;
            ex[j] = -0.5 * (d0 * g0 + d1 * g1);
            sc[j] = norm[j] * inv_det.sqrt();
            g0s[j] = g0;
            g1s[j] = g1;
        }
        // Scaling every weight by exp(-max exponent) keeps the sums in range: the normalisers
        // vary little across components compared with the exponents.
        let m = lane_max::<f64, LANES>(ex, f64::NEG_INFINITY);
        // Pass 2: weights w_j = scale_j exp(e_j - m), stored in place of the exponents.
        for (e, &scale) in ex.iter_mut().zip(sc.iter()) {
            *e = scale * exp_nonpositive(*e - m);
        }
        let (sum, z0, z1) = (
            lane_dot(ex, None),
            lane_dot(ex, Some(g0s)),
            lane_dot(ex, Some(g1s)),
        );
        let mut best = (0usize, f64::NEG_INFINITY);
        for (j, &w) in ex.iter().enumerate() {
            if w > best.1 {
                best = (j, w);
            }
        }
        (m + sum.ln(), [z0 / sum, z1 / sum], best.0 as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::single::exp_nonpositive_f32;
    use super::*;

    const LOG_2PI: f64 = 1.837_877_066_409_345_5;

    fn two_components() -> Mixture2D {
        Mixture2D::new(
            &[1.0, 3.0],
            &[0.0, 0.0, 1.0, -1.0],
            &[0.5, 0.1, 0.1, 0.3, 0.2, 0.0, 0.0, 0.4],
        )
        .unwrap()
    }

    #[test]
    fn single_gaussian_closed_form() {
        let m = Mixture2D::new(&[2.0], &[0.5, -0.5], &[1.0, 0.0, 0.0, 4.0]).unwrap();
        let e = m.eval(&[1.5, 1.5], &[0.0]).unwrap();
        let want = -LOG_2PI - 0.5 * 4f64.ln() - 0.5 * (1.0 + 4.0 / 4.0);
        assert!((e.logp[0] - want).abs() < 1e-12);
        assert!((e.score[0] + 1.0).abs() < 1e-12 && (e.score[1] + 0.5).abs() < 1e-12);
    }

    #[test]
    fn score_is_gradient_of_logp() {
        let m = two_components();
        let (x, s, h) = ([0.3, -0.2], 0.4, 1e-6);
        let e = m.eval(&x, &[s]).unwrap();
        for d in 0..2 {
            let mut xp = x;
            let mut xm = x;
            xp[d] += h;
            xm[d] -= h;
            let fd = (m.eval(&xp, &[s]).unwrap().logp[0] - m.eval(&xm, &[s]).unwrap().logp[0])
                / (2.0 * h);
            assert!((fd - e.score[d]).abs() < 1e-6, "{fd} vs {}", e.score[d]);
        }
    }

    #[test]
    fn inline_exp_matches_std() {
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            let x = -(i as f64) * 0.003_7;
            let (ours, want) = (exp_nonpositive(x), x.exp());
            if x > -600.0 {
                worst = worst.max((ours - want).abs() / want);
            }
        }
        assert!(worst < 1e-15, "{worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1e4), 0.0);
    }

    #[test]
    fn inline_exp_f32_matches_std() {
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            let x = -(i as f32) * 0.000_43;
            let (ours, want) = (exp_nonpositive_f32(x), f64::from(x).exp());
            if x > -87.0 {
                worst = worst.max((f64::from(ours) - want).abs() / want);
            }
        }
        assert!(worst < 3e-7, "{worst}");
        assert_eq!(exp_nonpositive_f32(0.0), 1.0);
        assert_eq!(exp_nonpositive_f32(-1e4), 0.0);
    }

    #[test]
    fn float32_score_matches_float64() {
        let m = two_components();
        let m32 = Mixture2DF32::new(&m);
        let (x, sigma) = ([0.3, -0.2, 0.9, -0.8, 5.0, 5.0], [0.4, 0.05, 0.0]);
        let want = m.eval(&x, &sigma).unwrap().score;
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let s32: Vec<f32> = sigma.iter().map(|&v| v as f32).collect();
        let got = m32.score(&x32, &s32).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{g} vs {w}"
            );
        }
        assert!(m32.score(&[0.0, 0.0], &[-1.0]).is_err());
        assert!(m32.score(&[0.0], &[1.0]).is_err());
        assert!(m32.score(&[f32::NAN, 0.0], &[1.0]).is_err());
    }

    #[test]
    fn far_points_stay_finite() {
        let e = two_components().eval(&[1e3, -1e3], &[0.0]).unwrap();
        assert!(e.logp[0].is_finite() && e.score.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(Mixture2D::new(&[1.0], &[0.0], &[1.0, 0.0, 0.0, 1.0]).is_err());
        assert!(Mixture2D::new(&[1.0], &[0.0, 0.0], &[1.0, 2.0, 2.0, 1.0]).is_err());
        assert!(Mixture2D::new(&[-1.0], &[0.0, 0.0], &[1.0, 0.0, 0.0, 1.0]).is_err());
        assert!(two_components().eval(&[0.0, 0.0], &[-1.0]).is_err());
        assert!(two_components().eval(&[0.0], &[1.0]).is_err());
        assert!(two_components().eval(&[f64::NAN, 0.0], &[1.0]).is_err());
    }
}
