// Fused magnitude-preserving self-attention (EDM2, Karras et al. 2024, Figure 21).
//
// Reads the qkv 1x1-convolution output in its own layout [N, 3C, H, W], viewed as
// [N, heads, D, 3, L] (D = C / heads, L = H * W). For every pixel and head, q, k and v are
// normalised to unit RMS over their D channels (x / (eps + |x| / sqrt(D))), then
// softmax(q k^T / sqrt(D)) v is computed with an online softmax over tiles of keys and written
// straight to [N, C, H, W]: no transposes, no normalised copies in global memory, no L x L
// matrix. float32 arithmetic for every input type; one block per (query tile, head, image).
#include "common.cuh"

template <int D> struct Tiles;
template <> struct Tiles<32> { static const int Q = 32, K = 32; };
template <> struct Tiles<64> { static const int Q = 32, K = 32; };
template <> struct Tiles<128> { static const int Q = 16, K = 16; };

static const int THREADS = 128;

template <int D, int ROWS>
__device__ __forceinline__ void normalize_rows(float (*rows)[D + 1], int first_thread, float eps, float extra) {
    int r = (int)threadIdx.x - first_thread;
    if (r >= 0 && r < ROWS) {
        float ss = 0.f;
        for (int c = 0; c < D; ++c) ss += rows[r][c] * rows[r][c];
        float scale = extra / (eps + sqrtf(ss) * rsqrtf((float)D));
        for (int c = 0; c < D; ++c) rows[r][c] *= scale;
    }
}

template <typename T, int D>
__device__ void attention(const T* __restrict__ qkv, T* __restrict__ y, int heads, int L, float eps) {
    const int QT = Tiles<D>::Q, KT = Tiles<D>::K;
    const int tid = threadIdx.x;
    const int q0 = blockIdx.x * QT, head = blockIdx.y, n = blockIdx.z;
    const long long C = (long long)heads * D;
    const T* base = qkv + ((long long)n * heads + head) * D * 3 * L;  // [D, 3, L] of this head

    __shared__ float q_s[QT][D + 1];
    __shared__ float k_s[KT][D + 1];
    __shared__ float v_s[KT][D + 1];
    __shared__ float acc_s[QT][D + 1];
    __shared__ float s_s[QT][KT + 1];
    __shared__ float m_s[QT], l_s[QT], alpha_s[QT];

    for (int idx = tid; idx < QT * D; idx += THREADS) {
        int qi = idx % QT, c = idx / QT, p = q0 + qi;
        q_s[qi][c] = p < L ? to_float(base[(long long)(c * 3 + 0) * L + p]) : 0.f;
        acc_s[qi][c] = 0.f;
    }
    if (tid < QT) {
        m_s[tid] = AG_NEG_INF;
        l_s[tid] = 0.f;
    }
    __syncthreads();
    normalize_rows<D, QT>(q_s, 0, eps, rsqrtf((float)D));  // folds in the 1/sqrt(D) score scale

    for (int k0 = 0; k0 < L; k0 += KT) {
        __syncthreads();
        for (int idx = tid; idx < KT * D; idx += THREADS) {
            int ki = idx % KT, c = idx / KT, p = k0 + ki;
            bool in = p < L;
            k_s[ki][c] = in ? to_float(base[(long long)(c * 3 + 1) * L + p]) : 0.f;
            v_s[ki][c] = in ? to_float(base[(long long)(c * 3 + 2) * L + p]) : 0.f;
        }
        __syncthreads();
        normalize_rows<D, KT>(k_s, 0, eps, 1.f);
        normalize_rows<D, KT>(v_s, KT, eps, 1.f);
        __syncthreads();

        // Scores of this tile.
        for (int idx = tid; idx < QT * KT; idx += THREADS) {
            int qi = idx / KT, ki = idx % KT;
            float s = 0.f;
#pragma unroll 8
            for (int c = 0; c < D; ++c) s += q_s[qi][c] * k_s[ki][c];
            s_s[qi][ki] = k0 + ki < L ? s : AG_NEG_INF;
        }
        __syncthreads();

        // Online softmax: new running maximum, rescaling factor, unnormalised probabilities.
        if (tid < QT) {
            float mx = m_s[tid];
            for (int ki = 0; ki < KT; ++ki) mx = fmaxf(mx, s_s[tid][ki]);
            float alpha = m_s[tid] == AG_NEG_INF ? 0.f : expf(m_s[tid] - mx);
            float sum = 0.f;
            for (int ki = 0; ki < KT; ++ki) {
                float e = s_s[tid][ki] == AG_NEG_INF ? 0.f : expf(s_s[tid][ki] - mx);
                s_s[tid][ki] = e;
                sum += e;
            }
            l_s[tid] = l_s[tid] * alpha + sum;
            m_s[tid] = mx;
            alpha_s[tid] = alpha;
        }
        __syncthreads();

        for (int idx = tid; idx < QT * D; idx += THREADS) {
            int qi = idx / D, c = idx % D;
            float a = acc_s[qi][c] * alpha_s[qi];
#pragma unroll 8
            for (int ki = 0; ki < KT; ++ki) a += s_s[qi][ki] * v_s[ki][c];
            acc_s[qi][c] = a;
        }
    }
    __syncthreads();
    for (int idx = tid; idx < QT * D; idx += THREADS) {
        int qi = idx % QT, c = idx / QT, p = q0 + qi;
        if (p < L) y[((long long)n * C + (long long)head * D + c) * L + p] = from_float<T>(acc_s[qi][c] / l_s[qi]);
    }
}

#define ENTRY(NAME, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                              \
        mp_attention_##NAME##_d##D(const T* qkv, T* y, int heads, int L, float eps) {                  \
        attention<T, D>(qkv, y, heads, L, eps);                                                         \
    }

ENTRY(f32, float, 32)
ENTRY(f32, float, 64)
ENTRY(f32, float, 128)
ENTRY(f16, half_t, 32)
ENTRY(f16, half_t, 64)
ENTRY(f16, half_t, 128)
ENTRY(bf16, bf16_t, 32)
ENTRY(bf16, bf16_t, 64)
ENTRY(bf16, bf16_t, 128)
