// cuda_emu.h -- the CUDA C++ device API, just enough of it to compile fastconv's kernels with g++
// and run them on the CPU (DESIGN.md section 7). Used by tests only; see fastconv/emu/__init__.py.
//
// Model: blocks run one after another on the calling OS thread; the threads of a block are
// cooperative fibers (ucontext) that run to their next barrier (__syncthreads or a warp
// intrinsic) in a shuffled order. The scheduler lives in emu_runtime.h, which the generated
// translation unit includes after the kernel source. Everything here is honest about the GPU
// rules: exchanges between threads happen only at barriers, shared memory starts as garbage.
//
// Compile: g++ -std=c++17 -x c++ -include cuda_emu.h kernel.cu ... plus emu_runtime.h and the
// launch wrappers that fastconv.emu generates. `extern __shared__ T name[];` is rewritten by
// the Python front end (C++ has no way to give a declaration a launch-sized buffer).
#pragma once
#if !defined(__cplusplus) || __cplusplus < 201703L
#error "cuda_emu.h needs C++17 (g++ -std=c++17)"
#endif
#if defined(__CUDA_ARCH__) || defined(__NVCC__)
#error "cuda_emu.h is for the host compiler only; nvcc/NVRTC compile the kernels natively"
#endif

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

// What the kernel source may test for. __CUDA_ARCH__ comes from the module's -arch option (or
// $FASTCONV_EMU_ARCH; fastconv.emu passes FASTCONV_EMU_ARCH). Inline PTX does not exist here: code
// that needs tensor cores or cp.async goes through kernels/tc.cuh, which calls the harness's
// warp-collective implementations below when FASTCONV_CUDA_EMU is defined.
#define FASTCONV_CUDA_EMU 1
#define __CUDACC__ 1
#define __CUDACC_RTC__ 1
#ifndef FASTCONV_EMU_ARCH
#define FASTCONV_EMU_ARCH 800
#endif
#define __CUDA_ARCH__ FASTCONV_EMU_ARCH

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)  // the front end parses the bound from the source and enforces it
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __managed__ _Pragma("GCC error \"__managed__ is not supported by fastconv.emu\"")
// __shared__: one object per kernel, reused by every block (blocks run sequentially), so a
// function-static works. The section (gathered with the template statics by emu.ld) lets the
// runtime fill all of it with 0xFF before each block; "used" keeps GCC from treating the static
// as private to the function, so it is reloaded after every barrier call.
#define __shared__ static __attribute__((section("emu_shared"), used))

// The 16-bit float types are defined by the stand-in <cuda_fp16.h>/<cuda_bf16.h> (include/);
// declared here so the launch wrappers can recognise them as kernel parameter types.
struct __half;
struct __nv_bfloat16;

// ---- vector types and launch geometry -----------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
#define EMU_VEC2(T, N, A) struct __attribute__((aligned(A))) N { T x, y; }; \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define EMU_VEC3(T, N) struct N { T x, y, z; }; inline N make_##N(T x, T y, T z) { return N{x, y, z}; }
#define EMU_VEC4(T, N, A) struct __attribute__((aligned(A))) N { T x, y, z, w; }; \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
EMU_VEC2(float, float2, 8) EMU_VEC3(float, float3) EMU_VEC4(float, float4, 16)
EMU_VEC2(int, int2, 8) EMU_VEC3(int, int3) EMU_VEC4(int, int4, 16)
EMU_VEC2(unsigned, uint2, 8) EMU_VEC4(unsigned, uint4, 16)
EMU_VEC2(double, double2, 16)
EMU_VEC4(unsigned char, uchar4, 4) EMU_VEC4(signed char, char4, 4)
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4

namespace emu {
// The running fiber's coordinates. The scheduler rewrites g_threadIdx before every switch into a
// fiber; globals with external linkage must be reloaded by the compiler after the (opaque)
// swapcontext inside every barrier, so a kernel always sees its own threadIdx.
inline uint3 g_threadIdx, g_blockIdx;
inline dim3 g_blockDim, g_gridDim;
inline unsigned char* g_dyn_smem;  // this launch's `extern __shared__` buffer (ends at a guard page)

// `extern __shared__ T name[];` at file or namespace scope becomes a DynShared<T> (see
// fastconv.emu.preprocess): it finds this launch's buffer at every use.
template <class T> struct DynShared {
  T* get() const { return reinterpret_cast<T*>(g_dyn_smem); }
  T& operator[](long long i) const { return get()[i]; }
  operator T*() const { return get(); }
  template <class U, class = std::enable_if_t<!std::is_same_v<U, T>>> explicit operator U*() const {
    return reinterpret_cast<U*>(g_dyn_smem);
  }
  T* operator+(long long i) const { return get() + i; }
};

// Implemented in emu_runtime.h.
enum WarpOp : int { W_SYNC, W_IDX, W_DOWN, W_UP, W_XOR, W_BALLOT, W_ANY, W_ALL, W_MMA, W_LDSM };
int block_barrier(int pred, const char* file, int line);  // returns the count of nonzero preds
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t val, int arg, int width, const char* file, int line);
[[noreturn]] void trap(const char* what, const char* file, int line);

// ---- tensor cores and async copies (emu_tc.h): warp-collective, PTX ISA fragment layouts --------
// Reached through kernels/tc.cuh, whose GPU branch is the inline PTX of the same instruction.
enum MmaKind : int { MMA_M16N8K8_TF32 = 1, MMA_M16N8K16_F16 = 2, MMA_M16N8K16_BF16 = 3 };
struct MmaArgs { float* d; const uint32_t* a; const uint32_t* b; const float* c; };
struct LdsmArgs { uint32_t* r; const void* addr; };
// mma.sync.aligned.<kind>.row.col.f32.<t>.<t>.f32 d, a, b, c: every lane of the warp must call it.
void mma_sync(MmaKind kind, float* d, const uint32_t* a, const uint32_t* b, const float* c, const char* file, int line);
// ldmatrix.sync.aligned.m8n8.x<num>[.trans].shared.b16 {r...}, [addr].
void ldmatrix(int num, bool trans, uint32_t* r, const void* smem_row, const char* file, int line);
// cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size: bytes past src_size are zeros.
// The destination reads as NaN (0xFF bytes) until the issuing thread's cp.async.wait_group
// completes the copy: reading it earlier is the bug a GPU would show only sometimes.
void cp_async(void* dst, const void* src, int cp_size, int src_size, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int n, const char* file, int line);  // all but the n most recent committed groups
uint32_t tf32_round(float x);                     // cvt.rna.tf32.f32

template <class T> inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp shuffle of a type wider than 8 bytes");
  uint64_t b = 0; std::memcpy(&b, &v, sizeof(T)); return b;
}
template <class T> inline T from_bits(uint64_t b) { T v; std::memcpy(&v, &b, sizeof(T)); return v; }
}  // namespace emu

#define threadIdx (static_cast<const uint3&>(::emu::g_threadIdx))
#define blockIdx (static_cast<const uint3&>(::emu::g_blockIdx))
#define blockDim (static_cast<const dim3&>(::emu::g_blockDim))
#define gridDim (static_cast<const dim3&>(::emu::g_gridDim))
#define warpSize 32

// ---- barriers and warp intrinsics (all go through the scheduler) --------------------------------
// __builtin_FILE/LINE default arguments name the caller's line, so reports say which barrier.
inline void __syncthreads(const char* f = __builtin_FILE(), int l = __builtin_LINE()) { ::emu::block_barrier(0, f, l); }
inline int __syncthreads_count(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return ::emu::block_barrier(p != 0, f, l);
}
inline int __syncthreads_or(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return ::emu::block_barrier(p != 0, f, l) != 0;
}
inline int __syncthreads_and(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return ::emu::block_barrier(p == 0, f, l) == 0;  // counts the zeros
}
inline void __syncwarp(unsigned m = 0xffffffffu, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  ::emu::warp_op(::emu::W_SYNC, m, 0, 0, 32, f, l);
}
#define EMU_SHFL(NAME, OP)                                                                          \
  template <class T> inline T NAME(unsigned m, T v, int a, int w = 32, const char* f = __builtin_FILE(), \
                                   int l = __builtin_LINE()) {                                      \
    return ::emu::from_bits<T>(::emu::warp_op(OP, m, ::emu::to_bits(v), a, w, f, l));             \
  }
EMU_SHFL(__shfl_sync, ::emu::W_IDX)
EMU_SHFL(__shfl_down_sync, ::emu::W_DOWN)
EMU_SHFL(__shfl_up_sync, ::emu::W_UP)
EMU_SHFL(__shfl_xor_sync, ::emu::W_XOR)
#undef EMU_SHFL
inline unsigned __ballot_sync(unsigned m, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return (unsigned)::emu::warp_op(::emu::W_BALLOT, m, p != 0, 0, 32, f, l);
}
inline int __any_sync(unsigned m, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return (int)::emu::warp_op(::emu::W_ANY, m, p != 0, 0, 32, f, l);
}
inline int __all_sync(unsigned m, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return (int)::emu::warp_op(::emu::W_ALL, m, p != 0, 0, 32, f, l);
}
// Pre-Volta forms without a mask are gone from CUDA 13; __activemask has no fiber meaning.
template <class... A> void __shfl(A...) = delete;
template <class... A> void __shfl_down(A...) = delete;
template <class... A> void __shfl_up(A...) = delete;
template <class... A> void __shfl_xor(A...) = delete;
template <class... A> unsigned __activemask(A...) = delete;
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap(const char* f = __builtin_FILE(), int l = __builtin_LINE()) { ::emu::trap("__trap()", f, l); }

// ---- atomics: fibers switch only at barriers, so a plain read-modify-write is atomic ------------
#define EMU_ATOMIC(NAME, T, EXPR) inline T NAME(T* p, T v) { T o = *p; *p = (EXPR); return o; }
EMU_ATOMIC(atomicAdd, int, o + v) EMU_ATOMIC(atomicAdd, unsigned, o + v)
EMU_ATOMIC(atomicAdd, unsigned long long, o + v) EMU_ATOMIC(atomicAdd, float, o + v)
EMU_ATOMIC(atomicAdd, double, o + v)
EMU_ATOMIC(atomicSub, int, o - v) EMU_ATOMIC(atomicSub, unsigned, o - v)
EMU_ATOMIC(atomicMax, int, o < v ? v : o) EMU_ATOMIC(atomicMax, unsigned, o < v ? v : o)
EMU_ATOMIC(atomicMax, unsigned long long, o < v ? v : o) EMU_ATOMIC(atomicMax, long long, o < v ? v : o)
EMU_ATOMIC(atomicMin, int, v < o ? v : o) EMU_ATOMIC(atomicMin, unsigned, v < o ? v : o)
EMU_ATOMIC(atomicMin, unsigned long long, v < o ? v : o) EMU_ATOMIC(atomicMin, long long, v < o ? v : o)
EMU_ATOMIC(atomicExch, int, v) EMU_ATOMIC(atomicExch, unsigned, v)
EMU_ATOMIC(atomicExch, unsigned long long, v) EMU_ATOMIC(atomicExch, float, v)
EMU_ATOMIC(atomicAnd, int, o & v) EMU_ATOMIC(atomicAnd, unsigned, o & v)
EMU_ATOMIC(atomicOr, int, o | v) EMU_ATOMIC(atomicOr, unsigned, o | v)
EMU_ATOMIC(atomicXor, int, o ^ v) EMU_ATOMIC(atomicXor, unsigned, o ^ v)
#undef EMU_ATOMIC
#define EMU_CAS(T) inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }
EMU_CAS(int) EMU_CAS(unsigned) EMU_CAS(unsigned long long)
#undef EMU_CAS

// ---- math and bit intrinsics ---------------------------------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __saturatef(float x) { return x != x ? 0.f : x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
using std::isfinite;
using std::isinf;
using std::isnan;
// CUDA's global min/max overloads (host C++ only has std::min, which also rejects mixed types).
#define EMU_MINMAX(T) inline T min(T a, T b) { return b < a ? b : a; } inline T max(T a, T b) { return a < b ? b : a; }
EMU_MINMAX(int) EMU_MINMAX(unsigned) EMU_MINMAX(long long) EMU_MINMAX(unsigned long long)
EMU_MINMAX(long) EMU_MINMAX(unsigned long)
#undef EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
#ifndef CUDART_INF_F
#define CUDART_INF_F __builtin_huge_valf()
#define CUDART_NAN_F __builtin_nanf("")
#define CUDART_INF __builtin_huge_val()
#endif

// ---- float <-> f16 / bf16 bits (cvt.rn: round to nearest even; NaN -> canonical 0x7fff) -------------
namespace emu {
inline uint16_t float_to_half_bits(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  uint16_t s = (uint16_t)(u >> 16 & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                 // NaN
  if (a >= 0x477ff000u) return s | 0x7c00u;            // >= 65520 rounds to Inf
  if (a < 0x38800000u) {                               // below 2^-14: subnormal, quantum 2^-24
    float q = std::fabs(f) * 0x1p24f;                  // exact scaling
    return s | (uint16_t)std::nearbyint(q);            // ties to even; 0x400 is the smallest normal
  }
  uint32_t r = ((a >> 23) - 112) << 10 | (a >> 13 & 0x3ffu), rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry moves into the exponent
  return s | (uint16_t)r;
}
inline float half_bits_to_float(uint16_t h) {
  uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = h >> 10 & 0x1fu, m = h & 0x3ffu, u;
  if (e == 0x1f) u = s | 0x7f800000u | m << 13;
  else if (e) u = s | (e + 112) << 23 | m << 13;
  else { float v = (float)m * 0x1p-24f; std::memcpy(&u, &v, 4); u |= s; }
  float f; std::memcpy(&f, &u, 4); return f;
}
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  u += 0x7fffu + (u >> 16 & 1u);
  return (uint16_t)(u >> 16);
}
inline float bf16_bits_to_float(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
}  // namespace emu
