//! Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
//! Diffusion Models", Section 3 and Appendix C). An EMA profile with exponent `gamma` weighs
//! the training history as `t^gamma`; its relative standard deviation is `std`.

use crate::error::{invalid, Error, Result};

/// Exponent at which the relative std of the profile peaks: the positive root of
/// `2 g^2 + 6 g + 2 = 0`, i.e. `(sqrt(5) - 3) / 2`. Larger exponents give smaller stds.
const EXP_AT_STD_MAX: f64 = -0.381_966_011_250_105_1;

/// The largest relative std a power-function profile can have (about 0.3003).
pub fn std_max() -> f64 {
    std_of(EXP_AT_STD_MAX)
}

fn std_of(exp: f64) -> f64 {
    // Eq. 123: std = sqrt((g+1) / ((g+2)^2 (g+3))).
    ((exp + 1.0) / ((exp + 2.0).powi(2) * (exp + 3.0))).sqrt()
}

/// Relative std of the profile with exponent `exp` (Eq. 123). `exp` must be finite and > -1.
pub fn exp_to_std(exp: f64) -> Result<f64> {
    if !(exp.is_finite() && exp > -1.0) {
        return Err(invalid("exp", exp, "finite and > -1"));
    }
    Ok(std_of(exp))
}

/// Exponent of the profile with relative std `std` (Eq. 126, Algorithm 2): the largest real
/// root of `g^3 + 7 g^2 + (16 - t) g + (12 - t)` with `t = std^-2`.
pub fn std_to_exp(std: f64) -> Result<f64> {
    let limit = std_max();
    if !(std.is_finite() && std > 0.0 && std < limit) {
        return Err(Error::InvalidParameter {
            name: "std",
            value: std.to_string(),
            requirement: "finite and in (0, 0.3003) (the range of power-function EMA profiles)",
        });
    }
    let t = std.powi(-2);
    let p = |g: f64| ((g + 7.0) * g + (16.0 - t)) * g + (12.0 - t);
    let dp = |g: f64| (3.0 * g + 14.0) * g + (16.0 - t);
    // Newton from Cauchy's upper bound on the roots: p is convex right of -7/3 and the wanted
    // root is the rightmost one, so the iterates decrease monotonically onto it.
    let mut g = 1.0 + 7f64.max((16.0 - t).abs()).max((12.0 - t).abs());
    for _ in 0..500 {
        let step = p(g) / dp(g);
        let next = g - step;
        if next.partial_cmp(&g) != Some(std::cmp::Ordering::Less)
            || step.abs() <= 4.0 * f64::EPSILON * g.abs().max(1.0)
        {
            return Ok(if next.is_finite() && next < g {
                next
            } else {
                g
            });
        }
        g = next;
    }
    Err(Error::NoConvergence {
        what: "std_to_exp",
        value: std.to_string(),
    })
}

/// Per-update EMA decay that tracks the profile of relative std `std` (Eq. 127):
/// `beta = (1 - t_delta / t_next)^(g + 1)`. `t_next` is the training time after the update
/// (in images or steps), `t_delta` the time the update covers.
pub fn power_function_beta(std: f64, t_next: f64, t_delta: f64) -> Result<f64> {
    let exp = std_to_exp(std)?;
    if !(t_next.is_finite() && t_next > 0.0) {
        return Err(invalid("t_next", t_next, "finite and > 0"));
    }
    if !(t_delta.is_finite() && t_delta >= 0.0 && t_delta <= t_next) {
        return Err(invalid("t_delta", t_delta, "finite and in [0, t_next]"));
    }
    Ok((1.0 - t_delta / t_next).powf(exp + 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn std_max_is_the_peak() {
        let m = std_max();
        assert!((m - 0.300_283).abs() < 1e-5, "{m}");
        for d in [1e-3, 1e-2, 1e-1] {
            assert!(std_of(EXP_AT_STD_MAX + d) < m);
            assert!(std_of(EXP_AT_STD_MAX - d) < m);
        }
    }

    #[test]
    fn rejects_out_of_range() {
        for s in [0.0, -0.1, 0.31, f64::NAN, f64::INFINITY] {
            assert!(std_to_exp(s).is_err(), "{s}");
        }
        assert!(exp_to_std(-1.0).is_err());
        assert!(power_function_beta(0.05, 0.0, 1.0).is_err());
        assert!(power_function_beta(0.05, 10.0, 11.0).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(exp in -0.38f64..1e4) {
            let std = exp_to_std(exp).unwrap();
            let back = std_to_exp(std).unwrap();
            prop_assert!((back - exp).abs() <= 1e-9 * exp.abs().max(1.0), "{exp} -> {std} -> {back}");
        }

        #[test]
        fn beta_in_unit_interval(std in 0.001f64..0.3, t in 1.0f64..1e9, frac in 0.0f64..1.0) {
            let b = power_function_beta(std, t, t * frac).unwrap();
            prop_assert!((0.0..=1.0).contains(&b));
        }
    }
}
