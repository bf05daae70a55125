//! The float32 score of a [`Mixture2D`](super::Mixture2D) for training targets (single
//! precision, 16-lane vectors where the CPU has them).

use rayon::prelude::*;

use super::*;

/// A [`Mixture2D`] in float32 for bulk score evaluation (training targets): AVX-512 intrinsics
/// where the CPU has them, else the compiler's 8-lane vectors or scalars. Means are kept as a
/// float32 pair (hi + lo) so that `mu - x` is as accurate as in float64; everything else rounds
/// to float32. Relative score error about 1e-6, up to the covariances' condition number times
/// 6e-8 near thin components (tested against float64), far below the error of a trained model.
///
/// Points are scored in tiles of nearby points at similar noise levels: a tile leaves out the
/// components whose weight is below `exp(-PRUNE_NATS)` of the largest one at every point of the
/// tile (bounded from the tile's box and noise range), so a point at a small noise level costs
/// the few components near it rather than all of them.
#[derive(Debug, Clone)]
pub struct Mixture2DF32 {
    all: Components,
    /// Bounds of the components' weights (float64: no overflow for any finite float32 point).
    bounds: Bounds,
}

/// Components as structure-of-arrays (float32), all of them or those a tile keeps.
#[derive(Debug, Clone, Default)]
struct Components {
    norm: Vec<f32>,
    mu0: Vec<f32>,
    mu0_lo: Vec<f32>,
    mu1: Vec<f32>,
    mu1_lo: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    /// `det(Sigma) = a c - b^2` and `tr(Sigma) = a + c` (rounded from float64): `det(Sigma + s2 I)
    /// = det + s2 (tr + s2)`, a sum of non-negative terms (no cancellation for thin components).
    det: Vec<f32>,
    tr: Vec<f32>,
}

impl Components {
    fn clear(&mut self) {
        for v in self.arrays_mut() {
            v.clear();
        }
    }

    /// Components `idx` of `from`, array by array.
    fn gather_from(&mut self, from: &Components, idx: &[usize]) {
        for (to, from) in self.arrays_mut().into_iter().zip(from.arrays()) {
            to.extend(idx.iter().map(|&j| from[j]));
        }
    }

    fn arrays(&self) -> [&Vec<f32>; 10] {
        [
            &self.norm,
            &self.mu0,
            &self.mu0_lo,
            &self.mu1,
            &self.mu1_lo,
            &self.a,
            &self.b,
            &self.c,
            &self.det,
            &self.tr,
        ]
    }

    fn arrays_mut(&mut self) -> [&mut Vec<f32>; 10] {
        [
            &mut self.norm,
            &mut self.mu0,
            &mut self.mu0_lo,
            &mut self.mu1,
            &mut self.mu1_lo,
            &mut self.a,
            &mut self.b,
            &mut self.c,
            &mut self.det,
            &mut self.tr,
        ]
    }
}

/// Per component: log of the normaliser and, on a grid of noise variance levels `s2` (`LEVELS`
/// rows of K), `-log det(Sigma + s2 I) / 2` and the inverse extreme eigenvalues of `Sigma + s2 I`.
#[derive(Debug, Clone)]
struct Bounds {
    log_norm: Vec<f64>,
    mu0: Vec<f64>,
    mu1: Vec<f64>,
    levels: Vec<f64>,
    half_logdet: Vec<f64>,
    inv_lam_min: Vec<f64>,
    inv_lam_max: Vec<f64>,
}

/// A component is left out of a tile when its weight is below `exp(-PRUNE_NATS)` of the largest
/// at every point of the tile: all left-out weights together are then below 1016 e^-30 = 1e-10
/// of the total, far below float32's rounding (6e-8).
pub const PRUNE_NATS: f64 = 30.0;
/// Points per tile (they share one list of components).
const TILE: usize = 32;
/// Points per band of similar noise levels (ordered along a Z curve within the band): a sixteenth
/// of the points, from `MIN_BAND` to `MAX_BAND`. Larger bands make tiles smaller in space,
/// smaller bands make them narrower in noise level.
const MIN_BAND: usize = 1024;
/// Calls with fewer points score every point against every component, in tiles of consecutive
/// points (measured: 4,096 points of the recipe gain nothing from pruning, 64 x 4,096 gain 1.7x).
const MIN_TILED: usize = 16_384;
const MAX_BAND: usize = 16_384;
/// Noise variance levels of the log-determinant table: 0, then geometric from 1e-8 to 1e4.
const LEVELS: usize = 64;

/// How far (nats) a point's largest exponent may be from the previous point's for the one-pass
/// weights: they stay within e^20 of 1 for the largest ones, far from float32's range.
const REFERENCE_NATS: f32 = 20.0;

/// Per-thread buffers of one tile: the components it keeps and one point's per-component terms.
#[derive(Default)]
struct ScratchF32 {
    kept: Components,
    kept_idx: Vec<usize>,
    terms: Terms,
    bound: Vec<f64>,
}

#[derive(Default)]
struct Terms {
    /// The previous point's largest exponent in its tile (NaN at a tile's first point): the
    /// vector kernel weighs the next point's components relative to it in one pass.
    reference: f32,
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
        let all = Components {
            norm: hi(&m.norm),
            mu0: hi(&m.mu0),
            mu0_lo: lo(&m.mu0),
            mu1: hi(&m.mu1),
            mu1_lo: lo(&m.mu1),
            a: hi(&m.a),
            b: hi(&m.b),
            c: hi(&m.c),
            det: (0..m.len())
                .map(|j| (m.a[j] * m.c[j] - m.b[j] * m.b[j]) as f32)
                .collect(),
            tr: (0..m.len()).map(|j| (m.a[j] + m.c[j]) as f32).collect(),
        };
        let k = m.len();
        let (mut lam_min, mut lam_max) = (Vec::with_capacity(k), Vec::with_capacity(k));
        for j in 0..k {
            let (a, b, c) = (m.a[j], m.b[j], m.c[j]);
            let (mean, half) = (0.5 * (a + c), (0.25 * (a - c) * (a - c) + b * b).sqrt());
            // The smaller eigenvalue as det / larger (no cancellation), and never above the larger.
            let big = mean + half;
            lam_max.push(big);
            lam_min.push(((a * c - b * b) / big).min(big));
        }
        let ratio = (1e12f64).powf(1.0 / (LEVELS - 2) as f64);
        let levels: Vec<f64> = std::iter::once(0.0)
            .chain((0..LEVELS - 1).map(|i| 1e-8 * ratio.powi(i as i32)))
            .collect();
        let (mut half_logdet, mut inv_lam_min, mut inv_lam_max) = (vec![], vec![], vec![]);
        for &s2 in &levels {
            for j in 0..k {
                half_logdet.push(-0.5 * ((m.a[j] + s2) * (m.c[j] + s2) - m.b[j] * m.b[j]).ln());
                inv_lam_min.push(1.0 / (lam_min[j] + s2));
                inv_lam_max.push(1.0 / (lam_max[j] + s2));
            }
        }
        let bounds = Bounds {
            log_norm: m.norm.iter().map(|n| n.ln()).collect(),
            mu0: m.mu0.clone(),
            mu1: m.mu1.clone(),
            levels,
            half_logdet,
            inv_lam_min,
            inv_lam_max,
        };
        Self { all, bounds }
    }

    /// What [`Mixture2DF32::score`] requires of its inputs: 2 finite values per point, noise
    /// levels finite and >= 0.
    pub fn check(x: &[f32], sigma: &[f32]) -> Result<()> {
        two_per_point("x (2 values per point)", x, sigma.len())?;
        if let Some(bad) = sigma.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            return Err(invalid("sigma", bad, "finite and >= 0"));
        }
        if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
            return Err(invalid("x", bad, "finite"));
        }
        Ok(())
    }

    /// Score grad_x log p(x; sigma) at `x` ([N, 2] row-major) with per-point noise levels
    /// `sigma` ([N], >= 0): [N, 2] row-major.
    pub fn score(&self, x: &[f32], sigma: &[f32]) -> Result<Vec<f32>> {
        Self::check(x, sigma)?;
        let n = sigma.len();
        // Enough points make compact tiles; with fewer, every point takes every component.
        let prune = n >= MIN_TILED;
        let order: Vec<usize> = if prune {
            tile_order(x, sigma)
        } else {
            (0..n).collect()
        };
        let mut tiled = vec![[0.0f32; 2]; n];
        tiled
            .par_chunks_mut(TILE)
            .zip(order.par_chunks(TILE))
            .for_each_init(ScratchF32::default, |scratch, (out, idx)| {
                self.score_tile(x, sigma, idx, prune, out, scratch)
            });
        let mut score = vec![0.0f32; 2 * n];
        for (&p, s) in order.iter().zip(&tiled) {
            score[2 * p..2 * p + 2].copy_from_slice(s);
        }
        Ok(score)
    }

    /// Scores the tile of points `idx` into `out` (with `prune`, from the components that matter
    /// in the tile; else from all), with 16- or 8-lane vectors where the CPU has them.
    fn score_tile(
        &self,
        x: &[f32],
        sigma: &[f32],
        idx: &[usize],
        prune: bool,
        out: &mut [[f32; 2]],
        s: &mut ScratchF32,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F, checked just above.
                return unsafe { self.score_tile_avx512(x, sigma, idx, prune, out, s) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { self.score_tile_avx2(x, sigma, idx, prune, out, s) };
            }
        }
        self.score_tile_impl(x, sigma, idx, prune, out, s, score_point_impl)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn score_tile_avx512(
        &self,
        x: &[f32],
        sigma: &[f32],
        idx: &[usize],
        prune: bool,
        out: &mut [[f32; 2]],
        s: &mut ScratchF32,
    ) {
        self.score_tile_impl(x, sigma, idx, prune, out, s, |comps, p, sigma, terms| {
            // SAFETY: the CPU supports AVX-512F (this function's own requirement).
            unsafe { avx512::score_point(comps, p, sigma, terms) }
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn score_tile_avx2(
        &self,
        x: &[f32],
        sigma: &[f32],
        idx: &[usize],
        prune: bool,
        out: &mut [[f32; 2]],
        s: &mut ScratchF32,
    ) {
        self.score_tile_impl(x, sigma, idx, prune, out, s, score_point_impl)
    }

    /// Scores the tile `idx` with `point`, the kernel of one point (see [`score_point_impl`]).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn score_tile_impl(
        &self,
        x: &[f32],
        sigma: &[f32],
        idx: &[usize],
        prune: bool,
        out: &mut [[f32; 2]],
        s: &mut ScratchF32,
        mut point: impl FnMut(&Components, [f32; 2], f32, &mut Terms) -> [f32; 2],
    ) {
        let comps = if prune && self.keep_for_tile(x, sigma, idx, s) {
            &s.kept
        } else {
            &self.all
        };
        s.terms.reference = f32::NAN; // each tile on its own: results do not depend on the threads
        for (o, &p) in out.iter_mut().zip(idx) {
            *o = point(comps, [x[2 * p], x[2 * p + 1]], sigma[p], &mut s.terms);
        }
    }

    /// The components that matter anywhere in the tile of points `idx` (see [`PRUNE_NATS`]),
    /// into `s.kept`. A component's log-weight at a point is `log norm - log det(C) / 2 - q / 2`
    /// with `C = Sigma + sigma^2 I` and `q = d^T C^-1 d`, `|d|^2 / lam_max(C) <= q <= |d|^2 /
    /// lam_min(C)`: its largest value over the tile is bounded above from the nearest point of
    /// the tile's box and its smallest noise level, and the best component's value below from
    /// the farthest point and the largest noise level. False when every component is kept (all
    /// bounds within reach, or noise beyond the table): `s.kept` is then not filled.
    #[inline(always)]
    fn keep_for_tile(&self, x: &[f32], sigma: &[f32], idx: &[usize], s: &mut ScratchF32) -> bool {
        let bd = &self.bounds;
        let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
        let (mut s2lo, mut s2hi) = (f64::INFINITY, 0.0f64);
        for &p in idx {
            for d in 0..2 {
                lo[d] = lo[d].min(f64::from(x[2 * p + d]));
                hi[d] = hi[d].max(f64::from(x[2 * p + d]));
            }
            let s2 = f64::from(sigma[p]) * f64::from(sigma[p]);
            s2lo = s2lo.min(s2);
            s2hi = s2hi.max(s2);
        }
        // Table rows bounding -log det / 2 from above (level <= s2lo) and below (level >= s2hi).
        let row_lo = bd.levels.partition_point(|&l| l <= s2lo) - 1;
        let row_hi = bd.levels.partition_point(|&l| l < s2hi);
        let k = bd.log_norm.len();
        if row_hi == LEVELS {
            return false;
        }
        // Rows at or below s2lo bound a component's log-weight from above (smaller determinant,
        // larger 1 / lam_min); rows at or above s2hi from below.
        let (upper_det, lower_det) = (
            table_row(&bd.half_logdet, row_lo, k),
            table_row(&bd.half_logdet, row_hi, k),
        );
        let (inv_min, inv_max) = (
            table_row(&bd.inv_lam_min, row_lo, k),
            table_row(&bd.inv_lam_max, row_hi, k),
        );
        let (mu0, mu1, log_norm) = (&bd.mu0[..k], &bd.mu1[..k], &bd.log_norm[..k]);
        // Two branch-free passes (they vectorise): lower bounds, then upper bounds.
        s.bound.resize(k, 0.0);
        let bound = &mut s.bound[..k];
        for j in 0..k {
            let f0 = (mu0[j] - lo[0]).max(hi[0] - mu0[j]);
            let f1 = (mu1[j] - lo[1]).max(hi[1] - mu1[j]);
            bound[j] = log_norm[j] + lower_det[j] - 0.5 * (f0 * f0 + f1 * f1) * inv_min[j];
        }
        let floor = lane_max::<f64, 8>(bound, f64::NEG_INFINITY) - PRUNE_NATS;
        for j in 0..k {
            let n0 = (lo[0] - mu0[j]).max(mu0[j] - hi[0]).max(0.0);
            let n1 = (lo[1] - mu1[j]).max(mu1[j] - hi[1]).max(0.0);
            bound[j] = log_norm[j] + upper_det[j] - 0.5 * (n0 * n0 + n1 * n1) * inv_max[j];
        }
        // A component is left out where its bound is below the floor (a NaN bound, never
        // expected, keeps it). Where none is, the tile takes every component, without a copy.
        if !bound.iter().any(|&upper| upper < floor) {
            return false;
        }
        s.kept_idx.clear();
        s.kept_idx
            .extend((0..k).filter(|&j| bound[j] >= floor || bound[j].is_nan() || floor.is_nan()));
        s.kept.clear();
        s.kept.gather_from(&self.all, &s.kept_idx);
        true
    }
}

/// Row `r` of a table of rows of `k`.
fn table_row(t: &[f64], r: usize, k: usize) -> &[f64] {
    &t[r * k..(r + 1) * k]
}

/// The order in which points are scored: sorted by noise level into bands (see `MIN_BAND`),
/// each band along a Z curve over its bounding box, so that consecutive `TILE` points are close
/// in space and noise.
fn tile_order(x: &[f32], sigma: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = if u32::try_from(sigma.len()).is_ok() {
        // Keys (sigma's bits, index): for sigma >= 0 (-0 as +0) the bits order as the values.
        let mut keys: Vec<u64> = sigma
            .iter()
            .enumerate()
            .map(|(i, &s)| (u64::from((s + 0.0).to_bits()) << 32) | i as u64)
            .collect();
        keys.par_sort_unstable();
        keys.iter().map(|k| (k & 0xFFFF_FFFF) as usize).collect()
    } else {
        let mut order: Vec<usize> = (0..sigma.len()).collect();
        order.par_sort_unstable_by(|&i, &j| sigma[i].total_cmp(&sigma[j]).then(i.cmp(&j)));
        order
    };
    let band_size = (sigma.len() / 16).clamp(MIN_BAND, MAX_BAND);
    order.par_chunks_mut(band_size).for_each(|band| {
        let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
        for &p in band.iter() {
            for d in 0..2 {
                lo[d] = lo[d].min(x[2 * p + d]);
                hi[d] = hi[d].max(x[2 * p + d]);
            }
        }
        let cell = |p: usize, d: usize| {
            let span = f64::from(hi[d]) - f64::from(lo[d]);
            let t = if span > 0.0 {
                (f64::from(x[2 * p + d]) - f64::from(lo[d])) / span
            } else {
                0.0
            };
            (t * 65_535.0) as u32 // in [0, 65535]: the cast saturates
        };
        // Keys computed once per point, not once per comparison.
        let mut keyed: Vec<(u32, usize)> = band
            .iter()
            .map(|&p| (morton(cell(p, 0), cell(p, 1)), p))
            .collect();
        keyed.sort_unstable();
        for (slot, (_, p)) in band.iter_mut().zip(keyed) {
            *slot = p;
        }
    });
    order
}

/// Interleaves the bits of two 16-bit cell coordinates (Z-order key).
fn morton(a: u32, b: u32) -> u32 {
    let spread = |v: u32| {
        let mut v = v & 0xFFFF;
        v = (v | (v << 8)) & 0x00FF_00FF;
        v = (v | (v << 4)) & 0x0F0F_0F0F;
        v = (v | (v << 2)) & 0x3333_3333;
        (v | (v << 1)) & 0x5555_5555
    };
    spread(a) | (spread(b) << 1)
}

/// The float32 twin of [`Mixture2D::eval_point_impl`] (score only).
#[inline(always)]
fn score_point_impl(comps: &Components, x: [f32; 2], sigma: f32, s: &mut Terms) -> [f32; 2] {
    let k = comps.norm.len();
    let s2 = sigma * sigma;
    for buf in [&mut s.exponent, &mut s.scale, &mut s.g0, &mut s.g1] {
        buf.resize(k, 0.0);
    }
    let (mu0, mu0_lo, mu1, mu1_lo) = (
        &comps.mu0[..k],
        &comps.mu0_lo[..k],
        &comps.mu1[..k],
        &comps.mu1_lo[..k],
    );
    let (ca, cb, cc, norm, det, tr) = (
        &comps.a[..k],
        &comps.b[..k],
        &comps.c[..k],
        &comps.norm[..k],
        &comps.det[..k],
        &comps.tr[..k],
    );
    let (ex, sc, g0s, g1s) = (
        &mut s.exponent[..k],
        &mut s.scale[..k],
        &mut s.g0[..k],
        &mut s.g1[..k],
    );
    for j in 0..k {
        let (a, b, c) = (ca[j] + s2, cb[j], cc[j] + s2);
        let inv_det = 1.0 / (det[j] + s2 * (tr[j] + s2));
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

/// [`score_point_impl`] in AVX-512 intrinsics (1.4x the compiler's vectors of it, measured): one
/// pass writes the per-component terms (with `1 / sqrt(det)` from the 14-bit reciprocal square
/// root and a Newton step instead of a division and a square root), a second pass takes the
/// exponentials and their weighted sums in registers; the last partial vector is masked.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Components, Terms, REFERENCE_NATS};
    use crate::simd::exp_f32x16;

    const W: usize = 16;

    /// The score of one point from `comps` (as [`super::score_point_impl`]).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn score_point(
        comps: &Components,
        x: [f32; 2],
        sigma: f32,
        s: &mut Terms,
    ) -> [f32; 2] {
        let k = comps.norm.len();
        let padded = k.div_ceil(W) * W;
        for buf in [&mut s.exponent, &mut s.scale, &mut s.g0, &mut s.g1] {
            buf.resize(padded, 0.0);
        }
        let s2 = _mm512_set1_ps(sigma * sigma);
        let (x0, x1) = (_mm512_set1_ps(x[0]), _mm512_set1_ps(x[1]));
        let (half, three_halves) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.5));
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        // The terms of components j .. j + 16: exponent (-inf in masked-off lanes), scale and
        // gradient (0 there, so that no NaN reaches the sums).
        // `mask`: the lanes in bounds (all but in the last vector; constant there, so that the
        // full vectors' loads and moves compile unmasked).
        let terms = |j: usize, mask: __mmask16| {
            // SAFETY: lanes j .. min(j + 16, k) are in bounds of every array (length k); the
            // masked-off lanes are not read.
            let ld = |v: &[f32]| unsafe { _mm512_maskz_loadu_ps(mask, v.as_ptr().add(j)) };
            let a = _mm512_add_ps(ld(&comps.a), s2);
            let c = _mm512_add_ps(ld(&comps.c), s2);
            let b = ld(&comps.b);
            let det = _mm512_fmadd_ps(s2, _mm512_add_ps(ld(&comps.tr), s2), ld(&comps.det));
            // 1 / sqrt(det): 14 bits, then one Newton step (error ~ 3 (2^-14)^2 / 2 + rounding).
            let r0 = _mm512_rsqrt14_ps(det);
            let r = _mm512_mul_ps(
                r0,
                _mm512_fnmadd_ps(
                    _mm512_mul_ps(half, det),
                    _mm512_mul_ps(r0, r0),
                    three_halves,
                ),
            );
            let inv_det = _mm512_mul_ps(r, r);
            // mu - x, exact up to the final rounding (hi + lo parts of the mean).
            let d0 = _mm512_add_ps(_mm512_sub_ps(ld(&comps.mu0), x0), ld(&comps.mu0_lo));
            let d1 = _mm512_add_ps(_mm512_sub_ps(ld(&comps.mu1), x1), ld(&comps.mu1_lo));
            let g0 = _mm512_mul_ps(_mm512_fmsub_ps(c, d0, _mm512_mul_ps(b, d1)), inv_det);
            let g1 = _mm512_mul_ps(_mm512_fmsub_ps(a, d1, _mm512_mul_ps(b, d0)), inv_det);
            let e = _mm512_mul_ps(
                _mm512_set1_ps(-0.5),
                _mm512_fmadd_ps(d0, g0, _mm512_mul_ps(d1, g1)),
            );
            (
                _mm512_mask_mov_ps(neg_inf, mask, e),
                _mm512_maskz_mul_ps(mask, ld(&comps.norm), r),
                _mm512_maskz_mov_ps(mask, g0),
                _mm512_maskz_mov_ps(mask, g1),
            )
        };
        // The terms at j, with the mask written out as a constant for the full vectors (through
        // a closure the two calls were not specialised: 25% slower, measured).
        macro_rules! terms_at {
            ($j:expr) => {
                if $j + W <= k {
                    terms($j, 0xFFFF)
                } else {
                    terms($j, (1u16 << (k - $j)) - 1)
                }
            };
        }
        let zero = _mm512_setzero_ps();
        // One pass, weights relative to the previous point's largest exponent (`s.reference`):
        // kept where this point's own largest one is within REFERENCE_NATS of it.
        if s.reference.is_finite() {
            let reference = _mm512_set1_ps(s.reference);
            let (mut max, mut sum, mut z0, mut z1) = (neg_inf, zero, zero, zero);
            for j in (0..padded).step_by(W) {
                let (e, scale, g0, g1) = terms_at!(j);
                max = _mm512_max_ps(max, e);
                let w = _mm512_mul_ps(scale, exp_f32x16(_mm512_sub_ps(e, reference)));
                sum = _mm512_add_ps(sum, w);
                z0 = _mm512_fmadd_ps(w, g0, z0);
                z1 = _mm512_fmadd_ps(w, g1, z1);
            }
            let (m, sum) = (_mm512_reduce_max_ps(max), _mm512_reduce_add_ps(sum));
            if (m - s.reference).abs() <= REFERENCE_NATS && sum > 0.0 && sum.is_finite() {
                s.reference = m;
                return [
                    _mm512_reduce_add_ps(z0) / sum,
                    _mm512_reduce_add_ps(z1) / sum,
                ];
            }
        }
        // Two passes: the terms and the largest exponent, then the weights relative to it.
        let mut max = neg_inf;
        for j in (0..padded).step_by(W) {
            let (e, scale, g0, g1) = terms_at!(j);
            max = _mm512_max_ps(max, e);
            // SAFETY: the buffers hold `padded` values.
            unsafe {
                _mm512_storeu_ps(s.exponent.as_mut_ptr().add(j), e);
                _mm512_storeu_ps(s.scale.as_mut_ptr().add(j), scale);
                _mm512_storeu_ps(s.g0.as_mut_ptr().add(j), g0);
                _mm512_storeu_ps(s.g1.as_mut_ptr().add(j), g1);
            }
        }
        s.reference = _mm512_reduce_max_ps(max);
        let m = _mm512_set1_ps(s.reference);
        let (mut sum, mut z0, mut z1) = (zero, zero, zero);
        for j in (0..padded).step_by(W) {
            // SAFETY: the buffers hold `padded` values.
            let ld = |v: &[f32]| unsafe { _mm512_loadu_ps(v.as_ptr().add(j)) };
            let w = _mm512_mul_ps(ld(&s.scale), exp_f32x16(_mm512_sub_ps(ld(&s.exponent), m)));
            sum = _mm512_add_ps(sum, w);
            z0 = _mm512_fmadd_ps(w, ld(&s.g0), z0);
            z1 = _mm512_fmadd_ps(w, ld(&s.g1), z1);
        }
        let sum = _mm512_reduce_add_ps(sum);
        [
            _mm512_reduce_add_ps(z0) / sum,
            _mm512_reduce_add_ps(z1) / sum,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::uniform;

    /// The kernel of one point that `Mixture2DF32::score` uses on this CPU.
    fn kernel(comps: &Components, x: [f32; 2], sigma: f32, terms: &mut Terms) -> [f32; 2] {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { avx512::score_point(comps, x, sigma, terms) };
        }
        score_point_impl(comps, x, sigma, terms)
    }

    /// 400 small elongated components along a curve (like the toy's branches, condition numbers
    /// up to 1,000) and 20,000 points near the curve and anywhere, at noise levels 0 to 30.
    fn curved_mixture() -> (Mixture2D, Vec<f32>, Vec<f32>) {
        let mut st = 7u64;
        let k = 400;
        let (mut phi, mut mu, mut cov) = (vec![], vec![], vec![]);
        for j in 0..k {
            let t = j as f64 / k as f64 * 6.0;
            phi.push(0.1 + uniform(&mut st));
            mu.extend([t.cos() * (1.0 + 0.1 * t), t.sin() * (1.0 + 0.1 * t)]);
            let (l1, l2, th) = (
                1e-3 + 1e-2 * uniform(&mut st),
                1e-5 + 1e-4 * uniform(&mut st),
                3.0 * t,
            );
            let (c, s) = (th.cos(), th.sin());
            let (a, b, d) = (
                l1 * c * c + l2 * s * s,
                (l1 - l2) * c * s,
                l1 * s * s + l2 * c * c,
            );
            cov.extend([a, b, b, d]);
        }
        let m = Mixture2D::new(&phi, &mu, &cov).unwrap();
        let n = 20_000;
        let (mut x, mut sigma) = (vec![], vec![]);
        for i in 0..n {
            let j = (uniform(&mut st) * k as f64) as usize;
            let far = i % 10 == 0;
            let spread = if far { 2.0 } else { 0.05 };
            x.push(mu[2 * j] + spread * (uniform(&mut st) - 0.5));
            x.push(mu[2 * j + 1] + spread * (uniform(&mut st) - 0.5));
            sigma.push(match i % 7 {
                0 => 0.0,
                1 => 30.0 * uniform(&mut st),
                _ => (-7.0 + 6.0 * uniform(&mut st)).exp(),
            });
        }
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let s32: Vec<f32> = sigma.iter().map(|&v| v as f32).collect();
        (m, x32, s32)
    }

    #[test]
    fn float32_tiles_leave_out_only_negligible_components() {
        // One call of many tiles and bands (noise beyond the table included).
        let (m, x32, s32) = curved_mixture();
        let m32 = Mixture2DF32::new(&m);
        let n = s32.len();
        let got = m32.score(&x32, &s32).unwrap();
        // Against every component on the same float32 inputs (the kernel in its two-pass form,
        // per point): the tiles change the score only by the left-out weights (< 1e-10 of the
        // total) and by float32 rounding (the order of the sums, the one-pass weights), which is
        // at most twice the point's own float32 error against float64 (up to the covariances'
        // condition number times 6e-8 near thin components) plus a few ulps of the score's scale.
        let x64: Vec<f64> = x32.iter().map(|&v| f64::from(v)).collect();
        let s64: Vec<f64> = s32.iter().map(|&v| f64::from(v)).collect();
        let exact = m.eval(&x64, &s64).unwrap().score;
        let mut terms = Terms::default();
        let mut worst = 0.0f64;
        for p in 0..n {
            terms.reference = f32::NAN;
            let w = kernel(&m32.all, [x32[2 * p], x32[2 * p + 1]], s32[p], &mut terms);
            let scale = f64::from(w[0].hypot(w[1])).max(1.0);
            let diff = f64::from(got[2 * p] - w[0]).hypot(f64::from(got[2 * p + 1] - w[1]));
            let own = (f64::from(w[0]) - exact[2 * p]).hypot(f64::from(w[1]) - exact[2 * p + 1]);
            worst = worst.max((diff - 2.0 * own) / scale);
        }
        assert!(worst < 1e-5, "{worst}");
        // Points far off the mixture stay finite.
        let far = m32.score(&[1e3, -1e3, 1e6, 0.0], &[0.0, 1e-3]).unwrap();
        assert!(far.iter().all(|v| v.is_finite()), "{far:?}");
    }

    #[test]
    fn vector_kernel_is_as_accurate_as_the_portable_one() {
        // Both float32 kernels against float64 on the same float32 inputs. Their error comes from
        // the float32 rounding of C^-1 (mu - x) for thin components (relative error up to the
        // condition number times 6e-8) and differs point by point with the order of operations;
        // over 20,000 points the vector kernel's largest and mean errors are the portable one's
        // to within a quarter. The vector kernel runs as within a tile: from the second point on
        // in one pass, relative to the previous point's largest exponent.
        let (m, x32, s32) = curved_mixture();
        let m32 = Mixture2DF32::new(&m);
        let x64: Vec<f64> = x32.iter().map(|&v| f64::from(v)).collect();
        let s64: Vec<f64> = s32.iter().map(|&v| f64::from(v)).collect();
        let exact = m.eval(&x64, &s64).unwrap().score;
        let mut terms = Terms {
            reference: f32::NAN,
            ..Terms::default()
        };
        let (mut worst, mut total) = ([0.0f64; 2], [0.0f64; 2]);
        for p in 0..s32.len() {
            let (xp, sp) = ([x32[2 * p], x32[2 * p + 1]], s32[p]);
            let scale = exact[2 * p].hypot(exact[2 * p + 1]).max(1.0);
            for (i, got) in [
                kernel(&m32.all, xp, sp, &mut terms),
                score_point_impl(&m32.all, xp, sp, &mut terms),
            ]
            .iter()
            .enumerate()
            {
                let err = (f64::from(got[0]) - exact[2 * p])
                    .hypot(f64::from(got[1]) - exact[2 * p + 1])
                    / scale;
                worst[i] = worst[i].max(err);
                total[i] += err;
            }
        }
        assert!(worst[0] <= 1.25 * worst[1] && worst[1] < 1e-3, "{worst:?}");
        assert!(total[0] <= 1.25 * total[1], "{total:?}");
    }
}
