//! The weighted-sum kernel of the reconstruction: every output's float32 accumulators gain a
//! group of inputs times their weights.

/// Inputs accumulated per pass over the accumulators.
pub(super) const GROUP: usize = 8;

/// `y[j][e] += sum_k w[k][j] * x[k][e]` for `G` inputs and `B` outputs of the same length:
/// each input element is loaded once for all `B` outputs, whose partial sums stay in
/// registers. Sums run over the inputs in order, so the result does not depend on `G`, `B`
/// or the instruction set.
#[inline(always)]
fn accumulate_block<const G: usize, const B: usize>(
    w: &[[f32; B]; G],
    x: &[&[f32]],
    y: &mut [&mut [f32]],
) {
    let len = y[0].len();
    let x: [&[f32]; G] = std::array::from_fn(|k| &x[k][..len]);
    let mut rows = y.iter_mut();
    let y: [&mut [f32]; B] = std::array::from_fn(|_| &mut rows.next().expect("B outputs")[..len]);
    for e in 0..len {
        let mut acc: [f32; B] = std::array::from_fn(|j| y[j][e]);
        for k in 0..G {
            let v = x[k][e];
            for j in 0..B {
                acc[j] += w[k][j] * v;
            }
        }
        for j in 0..B {
            y[j][e] = acc[j];
        }
    }
}

/// Largest of 8, 4, 2, 1 that is at most `n` (n >= 1).
fn block_size(n: usize) -> usize {
    [8, 4, 2, 1].into_iter().find(|&b| b <= n).unwrap_or(1)
}

macro_rules! dispatch_block {
    ($g:expr, $b:expr, $w:expr, $x:expr, $y:expr; $(($G:literal, $B:literal)),*) => {
        match ($g, $b) {
            $(($G, $B) => {
                let w: [[f32; $B]; $G] = std::array::from_fn(|k| std::array::from_fn(|j| $w(k, j)));
                accumulate_block::<$G, $B>(&w, $x, $y)
            })*
            (g, b) => unreachable!("blocks of 1, 2, 4 or 8, got {g} x {b}"),
        }
    };
}

/// `y[j] += sum_k w[k * m + j] * x[k]` for every output `j < m = y.len()` and input
/// `k < x.len()` (at most [`GROUP`]), in blocks of up to 8 x 8.
#[inline(always)]
fn accumulate_impl(w: &[f32], x: &[&[f32]], y: &mut [&mut [f32]]) {
    let m = y.len();
    let mut j0 = 0;
    while j0 < m {
        let b = block_size(m - j0);
        let mut k0 = 0;
        while k0 < x.len() {
            let g = block_size(x.len() - k0);
            let wk = |k: usize, j: usize| w[(k0 + k) * m + j0 + j];
            dispatch_block!(g, b, wk, &x[k0..k0 + g], &mut y[j0..j0 + b];
                (8, 8), (8, 4), (8, 2), (8, 1), (4, 8), (4, 4), (4, 2), (4, 1),
                (2, 8), (2, 4), (2, 2), (2, 1), (1, 8), (1, 4), (1, 2), (1, 1));
            k0 += g;
        }
        j0 += b;
    }
}

multiversioned! {["avx2"]
    /// `y[j] += sum_k w[k * m + j] * x[k]` (see [`accumulate_impl`]).
    pub(super) fn accumulate(w: &[f32], x: &[&[f32]], y: &mut [&mut [f32]]) {
        accumulate_impl(w, x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_accumulation_equals_the_sequential_sum_bitwise() {
        // Every block shape and remainder: m outputs and k inputs from 1 to 19, odd lengths.
        let mut state = 0x9e37_79b9_u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (m, k, len) in [
            (1, 1, 1),
            (3, 5, 17),
            (8, 8, 64),
            (9, 7, 33),
            (19, 19, 5),
            (16, 3, 8),
        ] {
            let w: Vec<f32> = (0..k * m).map(|_| rand()).collect();
            let x: Vec<Vec<f32>> = (0..k).map(|_| (0..len).map(|_| rand()).collect()).collect();
            let y0: Vec<Vec<f32>> = (0..m).map(|_| (0..len).map(|_| rand()).collect()).collect();
            let mut want = y0.clone();
            for (j, row) in want.iter_mut().enumerate() {
                for (e, v) in row.iter_mut().enumerate() {
                    for (i, xi) in x.iter().enumerate() {
                        *v += w[i * m + j] * xi[e];
                    }
                }
            }
            let mut got = y0.clone();
            let xs: Vec<&[f32]> = x.iter().map(|v| v.as_slice()).collect();
            for start in (0..k).step_by(GROUP) {
                let end = (start + GROUP).min(k);
                let mut ys: Vec<&mut [f32]> = got.iter_mut().map(|v| v.as_mut_slice()).collect();
                accumulate(&w[start * m..end * m], &xs[start..end], &mut ys);
            }
            for j in 0..m {
                for e in 0..len {
                    assert_eq!(
                        got[j][e].to_bits(),
                        want[j][e].to_bits(),
                        "m={m} k={k} j={j} e={e}"
                    );
                }
            }
        }
    }
}
