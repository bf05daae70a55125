//! Exact log-density, score and most responsible component of a 2D Gaussian mixture diffused
//! by isotropic Gaussian noise: p(x; sigma) = sum_k phi_k N(x; mu_k, Sigma_k + sigma^2 I).
//! Closed-form 2x2 algebra in float64, one fused pass per point, threads across points.

use rayon::prelude::*;

use crate::error::{invalid, Error, Result};

/// A mixture of 2D Gaussians with normalised weights.
#[derive(Debug, Clone)]
pub struct Mixture2D {
    /// phi_k / (2 pi), the Gaussian normaliser without the determinant.
    norm: Vec<f64>,
    mu: Vec<[f64; 2]>,
    /// Covariances as (a, b, c) for [[a, b], [b, c]].
    cov: Vec<[f64; 3]>,
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

/// exp(x) underflows to 0 in float64 below this, so such terms add exactly nothing.
const EXP_UNDERFLOW: f64 = -745.2;

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
        let mut covs = Vec::with_capacity(k);
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
            covs.push([a, 0.5 * (b + b2), d]);
        }
        Ok(Self {
            norm: phi
                .iter()
                .map(|p| p / total / (2.0 * std::f64::consts::PI))
                .collect(),
            mu: mu.chunks_exact(2).map(|m| [m[0], m[1]]).collect(),
            cov: covs,
        })
    }

    /// Number of components.
    pub fn len(&self) -> usize {
        self.mu.len()
    }

    /// Whether the mixture has no components (never true for a constructed mixture).
    pub fn is_empty(&self) -> bool {
        self.mu.is_empty()
    }

    /// Evaluates log-density, score and most responsible component at `x` ([N, 2] row-major)
    /// with per-point noise levels `sigma` ([N], >= 0).
    pub fn eval(&self, x: &[f64], sigma: &[f64]) -> Result<Evaluation> {
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
            .for_each(|(chunk, ((logp, score), argmax))| {
                let start = chunk * CHUNK;
                for i in 0..logp.len() {
                    let p = start + i;
                    let (lp, sc, am) = self.eval_point([x[2 * p], x[2 * p + 1]], sigma[p]);
                    logp[i] = lp;
                    score[2 * i] = sc[0];
                    score[2 * i + 1] = sc[1];
                    argmax[i] = am;
                }
            });
        Ok(out)
    }

    fn eval_point(&self, x: [f64; 2], sigma: f64) -> (f64, [f64; 2], u32) {
        let s2 = sigma * sigma;
        // One pass with a running maximum `m` of the Gaussian exponents (online log-sum-exp):
        // accumulators hold sums scaled by exp(-m) and are rescaled when `m` grows. The
        // normalisers phi_k / (2 pi sqrt(det_k)) vary little across components, so scaling by the
        // exponent alone keeps every sum in range.
        let mut m = f64::NEG_INFINITY;
        let (mut sum, mut z0, mut z1) = (0.0, 0.0, 0.0);
        let mut best = (0u32, 0.0);
        for k in 0..self.mu.len() {
            let [a, b, c] = self.cov[k];
            let (a, c) = (a + s2, c + s2);
            let inv_det = 1.0 / (a * c - b * b);
            let d0 = self.mu[k][0] - x[0];
            let d1 = self.mu[k][1] - x[1];
            // (Sigma_k + s2 I)^-1 (mu_k - x): the component's score.
            let g0 = (c * d0 - b * d1) * inv_det;
            let g1 = (a * d1 - b * d0) * inv_det;
            let e = -0.5 * (d0 * g0 + d1 * g1);
            if e > m {
                let r = (m - e).exp();
                sum *= r;
                z0 *= r;
                z1 *= r;
                best.1 *= r;
                m = e;
            }
            let rel = e - m;
            if rel < EXP_UNDERFLOW {
                continue;
            }
            let w = self.norm[k] * inv_det.sqrt() * rel.exp();
            if w > best.1 {
                best = (k as u32, w);
            }
            sum += w;
            z0 += w * g0;
            z1 += w * g1;
        }
        (m + sum.ln(), [z0 / sum, z1 / sum], best.0)
    }
}

#[cfg(test)]
mod tests {
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
    }
}
