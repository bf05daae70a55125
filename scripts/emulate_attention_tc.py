"""Lane-level numpy mirror of python/autoguide_fast/kernels/csrc/mp_attention_tc.cu (float16).

Every lane's fragment loads, the mma.m16n8k16 operand layouts (PTX ISA), the shuffles of the
online softmax and the output indexing are reproduced step by step, so that the kernel's index
bookkeeping can be checked on a machine without a GPU against float64 attention. It checks the
algorithm as written here, not the compiled kernel: keep the two in step when either changes.
Usage: python scripts/emulate_attention_tc.py (about a minute)."""

import math

import numpy as np

TC_Q, TC_PAD, THREADS = 64, 8, 128
KT_OF = {32: 64, 64: 64, 128: 32}
LOG2E = 1.4426950408889634


def f16(x):  # round to half, keep as float32
    return np.float32(np.float16(x))


def mma(c, a, b0, b1):
    """c: [32][4] float, a: [32][4] pairs (lo, hi), b0/b1: [32] pairs. Emulates m16n8k16 row.col."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i, (r, cc) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[r, cc], A[r, cc + 1] = a[lane][i]
        B[2 * t, g], B[2 * t + 1, g] = b0[lane]
        B[2 * t + 8, g], B[2 * t + 9, g] = b1[lane]
    Cm = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e, (r, cc) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            c[lane][e] += Cm[r, cc]


def load_normalized(base, which, L, p0, eps, extra, D, R, transposed, ld, dst):
    P = THREADS // R
    part = np.zeros(THREADS)
    for tid in range(THREADS):
        pt, p = tid // R, p0 + tid % R
        ss = 0.0
        if p < L:
            for c in range(pt, D, P):
                v = base[c * 3 + which, p]
                ss += v * v
        part[tid] = ss
    scale = np.zeros(R)
    for tid in range(R):
        s = sum(part[k * R + tid] for k in range(P))
        scale[tid] = extra / (eps + math.sqrt(s) / math.sqrt(D))
    for idx in range(R * D):
        r, c, pp = idx % R, idx // R, p0 + idx % R
        v = base[c * 3 + which, pp] * scale[r] if pp < L else 0.0
        if transposed:
            dst[c * ld + r] = f16(v)
        else:
            dst[r * ld + c] = f16(v)


def pair(arr, i):
    return (arr[i], arr[i + 1])


def attention_tc(qkv, heads, eps=1e-4):
    N, C3, H, W = qkv.shape
    L = H * W
    D = C3 // 3 // heads
    KT = KT_OF[D]
    QS, KS, VS = D + TC_PAD, D + TC_PAD, KT + TC_PAD
    x = qkv.reshape(N, heads, D * 3, L)  # [D, 3, L] flattened as (c*3 + which, p)
    y = np.full((N, heads * D, L), np.nan)
    for n in range(N):
        for head in range(heads):
            base = x[n, head]
            for bx in range((L + TC_Q - 1) // TC_Q):
                q0 = bx * TC_Q
                q_s = np.zeros(TC_Q * QS)
                k_s = np.zeros(KT * KS)
                vt_s = np.zeros(D * VS)
                load_normalized(base, 0, L, q0, eps, LOG2E / math.sqrt(D), D, TC_Q, False, QS, q_s)
                states = []
                for warp in range(4):
                    r0 = warp * 16
                    qa = {kk: [[None] * 4 for _ in range(32)] for kk in range(D // 16)}
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        for kk in range(D // 16):
                            a = (r0 + g) * QS + kk * 16 + 2 * t
                            b = (r0 + g + 8) * QS + kk * 16 + 2 * t
                            qa[kk][lane] = [pair(q_s, a), pair(q_s, b), pair(q_s, a + 8), pair(q_s, b + 8)]
                    o = np.zeros((32, D // 8, 4))
                    m_run = np.full((32, 2), -np.inf)
                    l_run = np.zeros((32, 2))
                    states.append((o, m_run, l_run, qa, r0))
                for k0 in range(0, L, KT):
                    load_normalized(base, 1, L, k0, eps, 1.0, D, KT, False, KS, k_s)
                    load_normalized(base, 2, L, k0, eps, 1.0, D, KT, True, VS, vt_s)
                    for o, m_run, l_run, qa, _ in states:
                        s = np.zeros((KT // 8, 32, 4))
                        for j in range(KT // 8):
                            for kk in range(D // 16):
                                b0 = []
                                b1 = []
                                for lane in range(32):
                                    g, t = lane // 4, lane % 4
                                    kb = (j * 8 + g) * KS + 2 * t
                                    b0.append(pair(k_s, kb + kk * 16))
                                    b1.append(pair(k_s, kb + kk * 16 + 8))
                                mma(s[j], qa[kk], b0, b1)
                        for lane in range(32):
                            g, t = lane // 4, lane % 4
                            if k0 + KT > L:
                                for j in range(KT // 8):
                                    for e in range(4):
                                        if k0 + j * 8 + 2 * t + (e & 1) >= L:
                                            s[j][lane][e] = -np.inf
                        mx = m_run.copy()
                        for lane in range(32):
                            for j in range(KT // 8):
                                mx[lane, 0] = max(mx[lane, 0], s[j][lane][0], s[j][lane][1])
                                mx[lane, 1] = max(mx[lane, 1], s[j][lane][2], s[j][lane][3])
                        for r in range(2):  # shuffle xor 1 then 2
                            for m in (1, 2):
                                mx[:, r] = np.maximum(mx[:, r], mx[np.arange(32) ^ m, r])
                        alpha = np.exp2(m_run - mx)
                        rs = np.zeros((32, 2))
                        for lane in range(32):
                            for j in range(KT // 8):
                                s[j][lane][0:2] = np.exp2(s[j][lane][0:2] - mx[lane, 0])
                                s[j][lane][2:4] = np.exp2(s[j][lane][2:4] - mx[lane, 1])
                                rs[lane, 0] += s[j][lane][0] + s[j][lane][1]
                                rs[lane, 1] += s[j][lane][2] + s[j][lane][3]
                        for m in (1, 2):
                            rs = rs + rs[np.arange(32) ^ m]
                        l_run[:] = l_run * alpha + rs
                        m_run[:] = mx
                        o[:, :, 0:2] *= alpha[:, None, 0:1]
                        o[:, :, 2:4] *= alpha[:, None, 1:2]
                        for kt in range(KT // 16):
                            pa = [
                                [
                                    (f16(s[2 * kt][l][0]), f16(s[2 * kt][l][1])),
                                    (f16(s[2 * kt][l][2]), f16(s[2 * kt][l][3])),
                                    (f16(s[2 * kt + 1][l][0]), f16(s[2 * kt + 1][l][1])),
                                    (f16(s[2 * kt + 1][l][2]), f16(s[2 * kt + 1][l][3])),
                                ]
                                for l in range(32)
                            ]
                            for j in range(D // 8):
                                b0 = []
                                b1 = []
                                for lane in range(32):
                                    g, t = lane // 4, lane % 4
                                    vb = (j * 8 + g) * VS + kt * 16 + 2 * t
                                    b0.append(pair(vt_s, vb))
                                    b1.append(pair(vt_s, vb + 8))
                                oj = o[:, j, :]
                                mma(oj, pa, b0, b1)
                for o, _, l_run, _, r0 in states:
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        for r in range(2):
                            p = q0 + r0 + g + 8 * r
                            if p < L:
                                for j in range(D // 8):
                                    c = j * 8 + 2 * t
                                    y[n, head * D + c, p] = f16(o[lane, j, 2 * r] / l_run[lane, r])
                                    y[n, head * D + c + 1, p] = f16(o[lane, j, 2 * r + 1] / l_run[lane, r])
    return y.reshape(N, heads * D, H, W)


def attention64(qkv, heads):
    """The package's float64 attention (the yardstick of the kernel tests), on a numpy array."""
    import torch

    from autoguide_fast.kernels.reference import mp_attention_float64

    return mp_attention_float64(torch.from_numpy(qkv), heads).numpy()


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    for heads, d, hw in [(2, 32, (7, 9)), (1, 64, (1, 70)), (1, 128, (5, 7)), (1, 32, (9, 9))]:
        qkv = rng.standard_normal((1, 3 * heads * d, *hw)).astype(np.float16).astype(np.float64)
        got, want = attention_tc(qkv, heads), attention64(qkv, heads)
        err = np.abs(got - want).max()
        print(f"heads {heads} d {d} {hw}: max abs err {err:.2e} (max |y| {np.abs(want).max():.2f})")
        assert not np.isnan(got).any() and err < 4e-3
