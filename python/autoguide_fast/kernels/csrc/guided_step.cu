// Fused guided sampler step (EDM Heun, Karras et al. 2022, Alg. 2, with guidance
// D = D_guide + w (D_main - D_guide); without a guide D = D_main).
//
//   guided_euler: d = (x_hat - D) / t_hat;            x_next = x_hat + (t_next - t_hat) d
//                 writes x_next and d (float32, for the correction)
//   guided_heun:  d' = (x_next - D') / t_next;         x_out = x_hat + (t_next - t_hat) (d + d') / 2
//
// One pass over the inputs without intermediate tensors. Inputs float32, float16 or bfloat16
// (all of one type), float32 arithmetic. With `vec` set (every pointer 16-byte aligned) the
// body uses 16-byte loads; the tail and unaligned inputs go element by element. Any n.
#include "common.cuh"

template <typename T> struct Vec16 { T v[16 / sizeof(T)]; };

template <typename T>
__device__ __forceinline__ float guided(const T* dm, const T* dg, long long i, float w) {
    float m = to_float(dm[i]);
    if (dg == nullptr) return m;
    float g = to_float(dg[i]);
    return g + w * (m - g);
}

template <typename T>
__device__ __forceinline__ void euler_one(const T* x_hat, const T* dm, const T* dg, T* x_next, float* d_out,
                                          long long i, float w, float t_hat, float t_next) {
    float x = to_float(x_hat[i]);
    float d = (x - guided(dm, dg, i, w)) / t_hat;
    x_next[i] = from_float<T>(x + (t_next - t_hat) * d);
    d_out[i] = d;
}

template <typename T>
__device__ __forceinline__ void heun_one(const T* x_hat, const T* x_next, const float* d_cur, const T* dm,
                                         const T* dg, T* x_out, long long i, float w, float t_hat, float t_next) {
    float xn = to_float(x_next[i]);
    float d2 = (xn - guided(dm, dg, i, w)) / t_next;
    x_out[i] = from_float<T>(to_float(x_hat[i]) + (t_next - t_hat) * (0.5f * d_cur[i] + 0.5f * d2));
}

template <typename T>
__device__ void euler(const T* x_hat, const T* dm, const T* dg, T* x_next, float* d_out, long long n, float w,
                      float t_hat, float t_next, int vec) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long done = 0;
    if (vec) {
        const int V = 16 / sizeof(T);
        long long groups = n / V;
        for (long long g = start; g < groups; g += stride) {
            Vec16<T> xv = reinterpret_cast<const Vec16<T>*>(x_hat)[g];
            Vec16<T> mv = reinterpret_cast<const Vec16<T>*>(dm)[g];
            Vec16<T> gv;
            if (dg != nullptr) gv = reinterpret_cast<const Vec16<T>*>(dg)[g];
            Vec16<T> out;
            float d[16 / sizeof(T)];
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float m = to_float(mv.v[k]);
                float D = dg == nullptr ? m : to_float(gv.v[k]) + w * (m - to_float(gv.v[k]));
                float x = to_float(xv.v[k]);
                d[k] = (x - D) / t_hat;
                out.v[k] = from_float<T>(x + (t_next - t_hat) * d[k]);
            }
            reinterpret_cast<Vec16<T>*>(x_next)[g] = out;
#pragma unroll
            for (int k = 0; k < V; ++k) d_out[g * V + k] = d[k];
        }
        done = groups * V;
    }
    for (long long i = done + start; i < n; i += stride) euler_one(x_hat, dm, dg, x_next, d_out, i, w, t_hat, t_next);
}

template <typename T>
__device__ void heun(const T* x_hat, const T* x_next, const float* d_cur, const T* dm, const T* dg, T* x_out,
                     long long n, float w, float t_hat, float t_next, int vec) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long done = 0;
    if (vec) {
        const int V = 16 / sizeof(T);
        long long groups = n / V;
        for (long long g = start; g < groups; g += stride) {
            Vec16<T> hv = reinterpret_cast<const Vec16<T>*>(x_hat)[g];
            Vec16<T> nv = reinterpret_cast<const Vec16<T>*>(x_next)[g];
            Vec16<T> mv = reinterpret_cast<const Vec16<T>*>(dm)[g];
            Vec16<T> gv;
            if (dg != nullptr) gv = reinterpret_cast<const Vec16<T>*>(dg)[g];
            Vec16<T> out;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float m = to_float(mv.v[k]);
                float D = dg == nullptr ? m : to_float(gv.v[k]) + w * (m - to_float(gv.v[k]));
                float d2 = (to_float(nv.v[k]) - D) / t_next;
                out.v[k] = from_float<T>(to_float(hv.v[k]) + (t_next - t_hat) * (0.5f * d_cur[g * V + k] + 0.5f * d2));
            }
            reinterpret_cast<Vec16<T>*>(x_out)[g] = out;
        }
        done = groups * V;
    }
    for (long long i = done + start; i < n; i += stride)
        heun_one(x_hat, x_next, d_cur, dm, dg, x_out, i, w, t_hat, t_next);
}

#define ENTRY(NAME, T)                                                                                     \
    extern "C" __global__ void guided_euler_##NAME(const T* x_hat, const T* dm, const T* dg, T* x_next,  \
                                                   float* d_out, long long n, float w, float t_hat,       \
                                                   float t_next, int vec) {                               \
        euler<T>(x_hat, dm, dg, x_next, d_out, n, w, t_hat, t_next, vec);                                 \
    }                                                                                                      \
    extern "C" __global__ void guided_heun_##NAME(const T* x_hat, const T* x_next, const float* d_cur,    \
                                                  const T* dm, const T* dg, T* x_out, long long n, float w, \
                                                  float t_hat, float t_next, int vec) {                   \
        heun<T>(x_hat, x_next, d_cur, dm, dg, x_out, n, w, t_hat, t_next, vec);                           \
    }

ENTRY(f32, float)
ENTRY(f16, half_t)
ENTRY(bf16, bf16_t)
