// Shared helpers for autoguide_fast kernels. NVRTC-friendly: no CUDA headers; half and
// bfloat16 travel as raw 16-bit words and are converted with PTX / bit arithmetic; all
// arithmetic is float32.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define AG_NEG_INF __int_as_float(0xff800000)

struct half_t { u16 bits; };
struct bf16_t { u16 bits; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_float(bf16_t v) { return __uint_as_float(((u32)v.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float f) {
    // Round to nearest even; NaN stays NaN.
    u32 u = __float_as_uint(f);
    bf16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (u16)((u >> 16) | 0x40);
    } else {
        b.bits = (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return b;
}
