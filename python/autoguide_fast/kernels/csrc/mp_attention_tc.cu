// Fused magnitude-preserving self-attention on tensor cores (float16 / bfloat16 inputs, sm_80+).
//
// The same contract as mp_attention.cu: qkv [N, 3C, H, W] viewed as [N, heads, D, 3, L] is read in
// place; q, k and v are normalised per pixel and head in float32 (x / (eps + |x| / sqrt(D))),
// rounded to the input type, and softmax(q k^T / sqrt(D)) v is computed with an online softmax
// (flash-attention style) and written straight to [N, C, H, W].
//
// One block of 4 warps takes 64 queries of one head and image; each warp owns 16 query rows.
// Scores S = Q K^T and the update O += P V use mma.sync.m16n8k16 (float32 accumulation); the
// score accumulators of two adjacent 8-key tiles are, element for element, the A operand of the
// P V product, so probabilities never leave registers. Scores carry log2(e) / sqrt(D) (folded
// into q) so that the softmax uses exp2.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit A/B and float32 C), g = lane / 4,
// t = lane % 4: A (16 x 16, row-major) registers hold (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
// (g+8, 2t+8..); B (16 x 8, column-major) registers hold (k = 2t..2t+1, n = g) and (k = 2t+8.., g);
// C holds (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1). The low half of each 32-bit register is
// the element with the smaller k index.
#include "common.cuh"

static const int TC_THREADS = 128;  // 4 warps
static const int TC_Q = 64;         // queries per block, 16 per warp
static const int TC_PAD = 8;        // 16-bit elements of padding per shared-memory row
#define AG_LOG2E 1.4426950408889634f

template <int D> struct TcTiles;  // keys per tile (shared memory stays under the 48 KB static limit)
template <> struct TcTiles<32> { static const int K = 64; };
template <> struct TcTiles<64> { static const int K = 64; };
template <> struct TcTiles<128> { static const int K = 32; };

template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma16816<half_t>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<bf16_t>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two values as one 32-bit register of T pairs: `lo` in the low half.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)from_float<T>(lo).bits | ((u32)from_float<T>(hi).bits << 16);
}

__device__ __forceinline__ u32 load_pair(const u16* p) { return *reinterpret_cast<const u32*>(p); }

// 2^x with the hardware approximation (2 ulp; exactly 0 for -inf), as flash attention uses.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Rows p0 .. p0+R-1 (pixels) of q, k or v (`which` = 0, 1, 2) of one head, normalised over the
// D channels, times `extra`, rounded to T and stored at dst[r * ld + c], or dst[c * ld + r] when
// TRANSPOSED. Pixels at or beyond L are stored as zeros. Uses part_s[TC_THREADS], scale_s[R].
template <typename T, int D, int R, bool TRANSPOSED>
__device__ __forceinline__ void load_normalized(const T* __restrict__ base, int which, int L, int p0, float eps,
                                                float extra, u16* dst, int ld, float* part_s, float* scale_s) {
    const int P = TC_THREADS / R;  // threads per row for the sums of squares
    const int tid = threadIdx.x, row = tid % R, part = tid / R, p = p0 + row;
    float ss = 0.f;
    if (p < L) {
        for (int c = part; c < D; c += P) {
            float v = to_float(base[(long long)(c * 3 + which) * L + p]);
            ss += v * v;
        }
    }
    part_s[tid] = ss;
    __syncthreads();
    if (tid < R) {
        float s = 0.f;
        for (int k = 0; k < P; ++k) s += part_s[k * R + tid];
        scale_s[tid] = extra / (eps + sqrtf(s) * rsqrtf((float)D));
    }
    __syncthreads();
    for (int idx = tid; idx < R * D; idx += TC_THREADS) {
        int r = idx % R, c = idx / R, pp = p0 + r;
        float v = pp < L ? to_float(base[(long long)(c * 3 + which) * L + pp]) * scale_s[r] : 0.f;
        u16 bits = from_float<T>(v).bits;
        if (TRANSPOSED) {
            dst[c * ld + r] = bits;
        } else {
            dst[r * ld + c] = bits;
        }
    }
}

template <typename T, int D>
__device__ void attention_tc(const T* __restrict__ qkv, T* __restrict__ y, int heads, int L, float eps) {
    const int KT = TcTiles<D>::K;
    const int QS = D + TC_PAD, KS = D + TC_PAD, VS = KT + TC_PAD;  // row strides, 16-bit elements
    // Declared as 32-bit words so that the 32-bit fragment loads are aligned.
    __shared__ u32 q_w[TC_Q * QS / 2];
    __shared__ u32 k_w[KT * KS / 2];
    __shared__ u32 v_w[D * VS / 2];  // v transposed: [channel][key]
    __shared__ float part_s[TC_THREADS];
    __shared__ float scale_s[TC_Q];
    u16* q_s = reinterpret_cast<u16*>(q_w);
    u16* k_s = reinterpret_cast<u16*>(k_w);
    u16* vt_s = reinterpret_cast<u16*>(v_w);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int q0 = blockIdx.x * TC_Q, head = blockIdx.y, n = blockIdx.z;
    const T* base = qkv + ((long long)n * heads + head) * D * 3 * L;  // [D, 3, L] of this head

    load_normalized<T, D, TC_Q, false>(base, 0, L, q0, eps, rsqrtf((float)D) * AG_LOG2E, q_s, QS, part_s,
                                       scale_s);
    __syncthreads();
    const int r0 = warp * 16;  // this warp's first query row in the block
    u32 qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const u16* a = q_s + (r0 + g) * QS + kk * 16 + 2 * t;
        const u16* b = q_s + (r0 + g + 8) * QS + kk * 16 + 2 * t;
        qa[kk][0] = load_pair(a);
        qa[kk][1] = load_pair(b);
        qa[kk][2] = load_pair(a + 8);
        qa[kk][3] = load_pair(b + 8);
    }

    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_run[2] = {AG_NEG_INF, AG_NEG_INF}, l_run[2] = {0.f, 0.f};  // rows g and g + 8

    for (int k0 = 0; k0 < L; k0 += KT) {
        __syncthreads();  // every warp is done with the previous tile's k_s and vt_s
        load_normalized<T, D, KT, false>(base, 1, L, k0, eps, 1.f, k_s, KS, part_s, scale_s);
        load_normalized<T, D, KT, true>(base, 2, L, k0, eps, 1.f, vt_s, VS, part_s, scale_s);
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and KT keys, as KT / 8 tiles of 16 x 8.
        float s[KT / 8][4];
#pragma unroll
        for (int j = 0; j < KT / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            const u16* kb = k_s + (j * 8 + g) * KS + 2 * t;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) mma16816<T>(s[j], qa[kk], load_pair(kb + kk * 16), load_pair(kb + kk * 16 + 8));
        }
        // Keys beyond L do not exist.
        if (k0 + KT > L) {
#pragma unroll
            for (int j = 0; j < KT / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (k0 + j * 8 + 2 * t + (e & 1) >= L) s[j][e] = AG_NEG_INF;
                }
            }
        }
        // Online softmax. A row's scores are spread over the 4 lanes of its group (same g).
        float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
        for (int j = 0; j < KT / 8; ++j) {
            mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        }
        // Every tile holds at least one real key, so mx is finite; fast_exp2(-inf) = 0 on the first tile.
        float alpha[2] = {fast_exp2(m_run[0] - mx[0]), fast_exp2(m_run[1] - mx[1])};
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < KT / 8; ++j) {
            s[j][0] = fast_exp2(s[j][0] - mx[0]);
            s[j][1] = fast_exp2(s[j][1] - mx[0]);
            s[j][2] = fast_exp2(s[j][2] - mx[1]);
            s[j][3] = fast_exp2(s[j][3] - mx[1]);
            rs[0] += s[j][0] + s[j][1];
            rs[1] += s[j][2] + s[j][3];
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 1);
            rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 2);
            l_run[r] = l_run[r] * alpha[r] + rs[r];
            m_run[r] = mx[r];
        }
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
        }
        // O += P V, 16 keys at a time: score tiles 2 kt and 2 kt + 1 are the A fragment.
#pragma unroll
        for (int kt = 0; kt < KT / 16; ++kt) {
            u32 pa[4] = {pack2<T>(s[2 * kt][0], s[2 * kt][1]), pack2<T>(s[2 * kt][2], s[2 * kt][3]),
                         pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]), pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3])};
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                const u16* vb = vt_s + (j * 8 + g) * VS + kt * 16 + 2 * t;
                mma16816<T>(o[j], pa, load_pair(vb), load_pair(vb + 8));
            }
        }
    }

    // y[n, head * D + c, p] = O / l for rows g and g + 8 of this warp.
    const long long C = (long long)heads * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int p = q0 + r0 + g + 8 * r;
        if (p < L) {
            const float inv = 1.f / l_run[r];
            T* out = y + ((long long)n * C + (long long)head * D) * L + p;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                const int c = j * 8 + 2 * t;
                out[(long long)c * L] = from_float<T>(o[j][2 * r] * inv);
                out[(long long)(c + 1) * L] = from_float<T>(o[j][2 * r + 1] * inv);
            }
        }
    }
}

#define ENTRY(NAME, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                           \
        mp_attention_tc_##NAME##_d##D(const T* qkv, T* y, int heads, int L, float eps) {               \
        attention_tc<T, D>(qkv, y, heads, L, eps);                                                      \
    }

ENTRY(f16, half_t, 32)
ENTRY(f16, half_t, 64)
ENTRY(f16, half_t, 128)
ENTRY(bf16, bf16_t, 32)
ENTRY(bf16, bf16_t, 64)
ENTRY(bf16, bf16_t, 128)
