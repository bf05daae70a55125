// Fused guided sampler step (EDM Heun, Karras et al. 2022, Alg. 2, with guidance
// D = D_guide + w (D_main - D_guide); without a guide D = D_main).
//
//   guided_euler: d = (x_hat - D) / t_hat;            x_next = x_hat + (t_next - t_hat) d
//                 writes x_next and d (float32, for the correction)
//   guided_heun:  d' = (x_next - D') / t_next;         x_out = x_hat + (t_next - t_hat) (d + d') / 2
//
// One pass over the inputs without intermediate tensors. Inputs float32, float16 or bfloat16
// (all of one type), float32 arithmetic. With `vec` set (every pointer 16-byte aligned) the
// body uses 16-byte loads and stores, the float32 slopes included; the tail and unaligned
// inputs go element by element. Any n.
#include "common.cuh"

// alignas(16): without it the struct is only as aligned as T and the compiler splits every
// "vector" access into element loads.
template <typename T> struct alignas(16) Vec16 { T v[16 / sizeof(T)]; };
// The float32 slopes of one vector group (V = 4 or 8 of them: one or two 16-byte accesses).
template <int V> struct alignas(16) Slopes { float v[V]; };

// The arithmetic of one element, shared by the vector and the scalar paths.
__device__ __forceinline__ float guided_value(float m, float g, bool has_guide, float w) {
    return has_guide ? g + w * (m - g) : m;
}

// dt = t_next - t_hat is passed in, computed in double precision on the host: the difference of
// the two float32 times loses digits when the step is small relative to t.
__device__ __forceinline__ float euler_elem(float x, float D, float t_hat, float dt, float* d) {
    *d = (x - D) / t_hat;
    return x + dt * *d;
}

__device__ __forceinline__ float heun_elem(float x_hat, float x_next, float d_cur, float D, float t_next, float dt) {
    float d2 = (x_next - D) / t_next;
    return x_hat + dt * (0.5f * d_cur + 0.5f * d2);
}

// Grid-stride loop over n elements: with `vec` set, `group(g)` takes elements [g V, g V + V)
// with 16-byte accesses; `element(i)` takes the rest (or everything) one at a time.
template <int V, typename Group, typename Element>
__device__ __forceinline__ void grid_stride(long long n, int vec, Group group, Element element) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long done = 0;
    if (vec) {
        const long long groups = n / V;
        for (long long g = start; g < groups; g += stride) group(g);
        done = groups * V;
    }
    for (long long i = done + start; i < n; i += stride) element(i);
}

template <typename T>
__device__ void euler(const T* x_hat, const T* dm, const T* dg, T* x_next, float* d_out, long long n, float w,
                      float t_hat, float dt, int vec) {
    constexpr int V = 16 / sizeof(T);
    const bool has_guide = dg != nullptr;
    grid_stride<V>(
        n, vec,
        [&](long long g) {
            Vec16<T> xv = reinterpret_cast<const Vec16<T>*>(x_hat)[g];
            Vec16<T> mv = reinterpret_cast<const Vec16<T>*>(dm)[g];
            Vec16<T> gv = has_guide ? reinterpret_cast<const Vec16<T>*>(dg)[g] : mv;
            Vec16<T> out;
            Slopes<V> dv;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float D = guided_value(to_float(mv.v[k]), to_float(gv.v[k]), has_guide, w);
                out.v[k] = from_float<T>(euler_elem(to_float(xv.v[k]), D, t_hat, dt, &dv.v[k]));
            }
            reinterpret_cast<Vec16<T>*>(x_next)[g] = out;
            reinterpret_cast<Slopes<V>*>(d_out)[g] = dv;
        },
        [&](long long i) {
            float D = guided_value(to_float(dm[i]), has_guide ? to_float(dg[i]) : 0.f, has_guide, w);
            x_next[i] = from_float<T>(euler_elem(to_float(x_hat[i]), D, t_hat, dt, &d_out[i]));
        });
}

template <typename T>
__device__ void heun(const T* x_hat, const T* x_next, const float* d_cur, const T* dm, const T* dg, T* x_out,
                     long long n, float w, float t_next, float dt, int vec) {
    constexpr int V = 16 / sizeof(T);
    const bool has_guide = dg != nullptr;
    grid_stride<V>(
        n, vec,
        [&](long long g) {
            Slopes<V> cv = reinterpret_cast<const Slopes<V>*>(d_cur)[g];
            Vec16<T> hv = reinterpret_cast<const Vec16<T>*>(x_hat)[g];
            Vec16<T> nv = reinterpret_cast<const Vec16<T>*>(x_next)[g];
            Vec16<T> mv = reinterpret_cast<const Vec16<T>*>(dm)[g];
            Vec16<T> gv = has_guide ? reinterpret_cast<const Vec16<T>*>(dg)[g] : mv;
            Vec16<T> out;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float D = guided_value(to_float(mv.v[k]), to_float(gv.v[k]), has_guide, w);
                out.v[k] = from_float<T>(heun_elem(to_float(hv.v[k]), to_float(nv.v[k]), cv.v[k], D, t_next, dt));
            }
            reinterpret_cast<Vec16<T>*>(x_out)[g] = out;
        },
        [&](long long i) {
            float D = guided_value(to_float(dm[i]), has_guide ? to_float(dg[i]) : 0.f, has_guide, w);
            x_out[i] = from_float<T>(heun_elem(to_float(x_hat[i]), to_float(x_next[i]), d_cur[i], D, t_next, dt));
        });
}

#define ENTRY(NAME, T)                                                                                     \
    extern "C" __global__ void guided_euler_##NAME(const T* x_hat, const T* dm, const T* dg, T* x_next,  \
                                                   float* d_out, long long n, float w, float t_hat,       \
                                                   float dt, int vec) {                                   \
        euler<T>(x_hat, dm, dg, x_next, d_out, n, w, t_hat, dt, vec);                                     \
    }                                                                                                      \
    extern "C" __global__ void guided_heun_##NAME(const T* x_hat, const T* x_next, const float* d_cur,    \
                                                  const T* dm, const T* dg, T* x_out, long long n, float w, \
                                                  float t_next, float dt, int vec) {                      \
        heun<T>(x_hat, x_next, d_cur, dm, dg, x_out, n, w, t_next, dt, vec);                              \
    }

ENTRY(f32, float)
ENTRY(f16, half_t)
ENTRY(bf16, bf16_t)
