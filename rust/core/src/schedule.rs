//! EDM time-step discretisation (Karras et al. 2022, Eq. 5) and the step plan of the
//! Heun sampler with stochastic churn and a guidance interval.

use crate::error::{invalid, Result};

/// Largest number of sampling steps a [`Schedule`] accepts. Far beyond any useful sampler (EDM
/// uses 18 to 64 steps); it bounds the plan at a few tens of MB, so that a huge count is
/// refused with an error instead of an allocation that aborts the process.
pub const MAX_STEPS: usize = 1_000_000;

/// What [`Schedule::validate`] requires of `steps` (kept in step with [`MAX_STEPS`]).
pub const STEPS_REQUIREMENT: &str = "in [1, 1000000]";

/// Parameters of the EDM sigma schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Number of sampling steps (denoiser evaluations are `2 * steps - 1`), 1 to [`MAX_STEPS`].
    pub steps: usize,
    /// Smallest non-zero noise level.
    pub sigma_min: f64,
    /// Noise level of the first step.
    pub sigma_max: f64,
    /// Warp exponent; larger values spend more steps at low noise.
    pub rho: f64,
}

/// Stochastic churn (EDM Algorithm 2): `S_churn`, `S_min`, `S_max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    /// Total churn `S_churn` (0 disables it).
    pub amount: f64,
    /// Churn is applied only where `min <= t_cur <= max`.
    pub min: f64,
    /// Upper bound of the churn range (may be infinite).
    pub max: f64,
}

impl Churn {
    /// No churn: the deterministic sampler.
    pub const NONE: Churn = Churn {
        amount: 0.0,
        min: 0.0,
        max: f64::INFINITY,
    };
}

/// Guidance interval in sigma units with inclusive bounds (Kynkaanniemi et al. 2024).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    /// Guidance at every noise level.
    pub const ALWAYS: Interval = Interval {
        lo: 0.0,
        hi: f64::INFINITY,
    };

    /// Whether a denoiser evaluation at noise level `sigma` is guided.
    pub fn contains(&self, sigma: f64) -> bool {
        self.lo <= sigma && sigma <= self.hi
    }
}

/// What one sampler step does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// Step index, 0-based.
    pub index: usize,
    /// Noise level at the start of the step.
    pub t_cur: f64,
    /// Noise level after churn (`t_cur` when no churn is applied); the first evaluation is here.
    pub t_hat: f64,
    /// Noise level at the end of the step (0 after the last one).
    pub t_next: f64,
    /// Churn factor gamma; `t_hat = t_cur * (1 + gamma)`.
    pub gamma: f64,
    /// Whether a Heun correction (second evaluation at `t_next`) follows the Euler step.
    pub second_order: bool,
    /// Whether the evaluation at `t_hat` is guided.
    pub guided: bool,
    /// Whether the correction evaluation at `t_next` is guided (false without a correction).
    pub guided_next: bool,
}

impl Schedule {
    /// Checks every parameter; the error names the first bad one. `steps` must be in
    /// `1..=MAX_STEPS`.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(invalid("steps", self.steps, STEPS_REQUIREMENT));
        }
        if !(self.sigma_min.is_finite() && self.sigma_min > 0.0) {
            return Err(invalid("sigma_min", self.sigma_min, "finite and > 0"));
        }
        if !self.sigma_max.is_finite() {
            return Err(invalid("sigma_max", self.sigma_max, "finite"));
        }
        if self.sigma_max <= self.sigma_min {
            return Err(invalid(
                "sigma_max",
                self.sigma_max,
                "greater than sigma_min",
            ));
        }
        if !(self.rho.is_finite() && self.rho > 0.0) {
            return Err(invalid("rho", self.rho, "finite and > 0"));
        }
        Ok(())
    }

    /// The noise levels `sigma_0 > ... > sigma_{steps-1} > sigma_steps = 0` (length `steps + 1`).
    ///
    /// `sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho`; the endpoints are
    /// set exactly so that round-off never moves them.
    pub fn sigmas(&self) -> Result<Vec<f64>> {
        self.validate()?;
        let n = self.steps;
        let inv_rho = 1.0 / self.rho;
        let a = self.sigma_max.powf(inv_rho);
        let b = self.sigma_min.powf(inv_rho);
        let mut out = Vec::with_capacity(n + 1);
        out.push(self.sigma_max);
        if n > 1 {
            for i in 1..n - 1 {
                let frac = i as f64 / (n - 1) as f64;
                out.push((a + frac * (b - a)).powf(self.rho));
            }
            out.push(self.sigma_min);
        }
        out.push(0.0);
        Ok(out)
    }

    /// The plan of every step: churned noise level, whether a correction follows, and
    /// which evaluations are guided. Heun on every step but the last (Euler).
    pub fn plan(&self, churn: Churn, interval: Interval) -> Result<Vec<Step>> {
        validate_churn(&churn)?;
        validate_interval(&interval)?;
        let sigmas = self.sigmas()?;
        let max_gamma = std::f64::consts::SQRT_2 - 1.0;
        let n = self.steps;
        Ok((0..n)
            .map(|i| {
                let t_cur = sigmas[i];
                let t_next = sigmas[i + 1];
                let gamma = if churn.amount > 0.0 && churn.min <= t_cur && t_cur <= churn.max {
                    (churn.amount / n as f64).min(max_gamma)
                } else {
                    0.0
                };
                let t_hat = t_cur + gamma * t_cur;
                let second_order = i + 1 < n;
                Step {
                    index: i,
                    t_cur,
                    t_hat,
                    t_next,
                    gamma,
                    second_order,
                    guided: interval.contains(t_hat),
                    guided_next: second_order && interval.contains(t_next),
                }
            })
            .collect())
    }
}

fn validate_churn(churn: &Churn) -> Result<()> {
    if !(churn.amount.is_finite() && churn.amount >= 0.0) {
        return Err(invalid("churn", churn.amount, "finite and >= 0"));
    }
    if churn.min.is_nan() || churn.min < 0.0 {
        return Err(invalid("churn_range[0]", churn.min, ">= 0"));
    }
    if churn.max.is_nan() || churn.max < churn.min {
        return Err(invalid("churn_range[1]", churn.max, ">= churn_range[0]"));
    }
    Ok(())
}

fn validate_interval(interval: &Interval) -> Result<()> {
    if interval.lo.is_nan() || interval.lo < 0.0 || interval.lo == f64::INFINITY {
        return Err(invalid("interval[0]", interval.lo, "finite and >= 0"));
    }
    if interval.hi.is_nan() || interval.hi < interval.lo {
        return Err(invalid("interval[1]", interval.hi, ">= interval[0]"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sched(steps: usize) -> Schedule {
        Schedule {
            steps,
            sigma_min: 0.002,
            sigma_max: 80.0,
            rho: 7.0,
        }
    }

    #[test]
    fn matches_closed_form() {
        let s = sched(32).sigmas().unwrap();
        assert_eq!(s.len(), 33);
        // sigma_16 of the default EDM schedule, computed independently.
        let a: f64 = 80f64.powf(1.0 / 7.0);
        let b: f64 = 0.002f64.powf(1.0 / 7.0);
        let want = (a + 16.0 / 31.0 * (b - a)).powf(7.0);
        assert!((s[16] - want).abs() <= 1e-12 * want);
    }

    #[test]
    fn single_step_is_one_euler_step() {
        let plan = sched(1).plan(Churn::NONE, Interval::ALWAYS).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].t_cur, 80.0);
        assert_eq!(plan[0].t_next, 0.0);
        assert!(!plan[0].second_order);
    }

    #[test]
    fn rejects_bad_parameters() {
        let bad = [
            (
                Schedule {
                    steps: 0,
                    ..sched(1)
                },
                "steps",
            ),
            (
                Schedule {
                    sigma_min: 0.0,
                    ..sched(4)
                },
                "sigma_min",
            ),
            (
                Schedule {
                    sigma_min: f64::NAN,
                    ..sched(4)
                },
                "sigma_min",
            ),
            (
                Schedule {
                    sigma_max: 0.001,
                    ..sched(4)
                },
                "sigma_max",
            ),
            (
                Schedule {
                    sigma_max: f64::INFINITY,
                    ..sched(4)
                },
                "sigma_max",
            ),
            (
                Schedule {
                    rho: -1.0,
                    ..sched(4)
                },
                "rho",
            ),
        ];
        for (s, name) in bad {
            match s.sigmas() {
                Err(crate::Error::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
                other => panic!("expected error for {name}, got {other:?}"),
            }
        }
        let inverted = Interval { lo: 2.0, hi: 1.0 };
        assert!(sched(4).plan(Churn::NONE, inverted).is_err());
        let churn = Churn {
            amount: -1.0,
            ..Churn::NONE
        };
        assert!(sched(4).plan(churn, Interval::ALWAYS).is_err());
    }

    #[test]
    fn huge_step_counts_are_refused_before_allocating() {
        assert_eq!(STEPS_REQUIREMENT, format!("in [1, {MAX_STEPS}]"));
        for steps in [MAX_STEPS + 1, 1_000_000_000_000, usize::MAX] {
            let err = sched(steps)
                .plan(Churn::NONE, Interval::ALWAYS)
                .unwrap_err();
            assert_eq!(
                err,
                crate::Error::InvalidParameter {
                    name: "steps",
                    value: steps.to_string(),
                    requirement: STEPS_REQUIREMENT,
                }
            );
            assert!(sched(steps).sigmas().is_err());
        }
        assert_eq!(sched(MAX_STEPS).sigmas().unwrap().len(), MAX_STEPS + 1);
    }

    proptest! {
        #[test]
        fn sigmas_strictly_decrease_with_exact_endpoints(
            steps in 1usize..200,
            log_min in -8.0f64..0.0,
            log_span in 0.01f64..10.0,
            rho in 0.1f64..20.0,
        ) {
            let sigma_min = log_min.exp();
            let sigma_max = (log_min + log_span).exp();
            let s = Schedule { steps, sigma_min, sigma_max, rho }.sigmas().unwrap();
            prop_assert_eq!(s.len(), steps + 1);
            prop_assert_eq!(s[0], sigma_max);
            prop_assert_eq!(s[steps], 0.0);
            if steps > 1 { prop_assert_eq!(s[steps - 1], sigma_min); }
            for w in s.windows(2) { prop_assert!(w[0] > w[1], "{:?}", s); }
        }

        #[test]
        fn plan_follows_schedule(
            steps in 1usize..100,
            churn in 0.0f64..100.0,
            cmin in 0.0f64..10.0,
            cspan in 0.0f64..100.0,
            lo in 0.0f64..10.0,
            span in 0.0f64..100.0,
        ) {
            let s = sched(steps);
            let sig = s.sigmas().unwrap();
            let churn = Churn { amount: churn, min: cmin, max: cmin + cspan };
            let iv = Interval { lo, hi: lo + span };
            let plan = s.plan(churn, iv).unwrap();
            prop_assert_eq!(plan.len(), steps);
            for (i, st) in plan.iter().enumerate() {
                prop_assert_eq!(st.index, i);
                prop_assert_eq!(st.t_cur, sig[i]);
                prop_assert_eq!(st.t_next, sig[i + 1]);
                prop_assert!(st.t_hat >= st.t_cur);
                prop_assert!(st.t_hat <= st.t_cur * std::f64::consts::SQRT_2 * (1.0 + 1e-15));
                let in_range = churn.min <= st.t_cur && st.t_cur <= churn.max;
                prop_assert_eq!(st.gamma > 0.0, churn.amount > 0.0 && in_range);
                prop_assert_eq!(st.second_order, i + 1 < steps);
                prop_assert_eq!(st.guided, iv.lo <= st.t_hat && st.t_hat <= iv.hi);
                prop_assert_eq!(st.guided_next, st.second_order && iv.lo <= st.t_next && st.t_next <= iv.hi);
            }
        }
    }
}
