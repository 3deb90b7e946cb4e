// emu_half.h -- __half and __nv_bfloat16 for fastconv's CPU harness (what <cuda_fp16.h> and
// <cuda_bf16.h> give a kernel; the stand-ins in include/ include this file).
// Conversions from float round to nearest even (cvt.rn.f16.f32 / cvt.rn.bf16.f32), NaN becomes the
// canonical 0x7fff as on the GPU, overflow gives +-Inf; to float they are exact. Arithmetic on
// the 16-bit types is done in float and rounded once, which equals the correctly rounded result
// (float has more than twice the precision plus two bits).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

// The bit-level conversions (emu::float_to_half_bits & co) are in cuda_emu.h.

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

#define EMU_HALF_TYPE(T, RAW, TO, FROM)                                                                   \
  struct __attribute__((aligned(2))) T {                                                                  \
    unsigned short __x;                                                                                   \
    T() = default;                                                                                        \
    T(const RAW& r) : __x(r.x) {}                                                                         \
    T(float f) : __x(::emu::TO(f)) {}                                                                     \
    T(double f) : __x(::emu::TO((float)f)) {}                                                             \
    T(int i) : __x(::emu::TO((float)i)) {}                                                                \
    T(unsigned i) : __x(::emu::TO((float)i)) {}                                                           \
    T(long long i) : __x(::emu::TO((float)i)) {}                                                          \
    T(unsigned long long i) : __x(::emu::TO((float)i)) {}                                                 \
    T(short i) : __x(::emu::TO((float)i)) {}                                                              \
    T(unsigned short i) : __x(::emu::TO((float)i)) {}                                                     \
    operator float() const { return ::emu::FROM(__x); }                                                   \
    operator RAW() const { return RAW{__x}; }                                                             \
    T& operator=(float f) { __x = ::emu::TO(f); return *this; }                                           \
    T& operator=(double f) { __x = ::emu::TO((float)f); return *this; }                                   \
  };                                                                                                      \
  inline T operator+(const T& a, const T& b) { return T((float)a + (float)b); }                           \
  inline T operator-(const T& a, const T& b) { return T((float)a - (float)b); }                           \
  inline T operator*(const T& a, const T& b) { return T((float)a * (float)b); }                           \
  inline T operator/(const T& a, const T& b) { return T((float)a / (float)b); }                           \
  inline T operator-(const T& a) { T r; r.__x = a.__x ^ 0x8000u; return r; }                              \
  inline T operator+(const T& a) { return a; }                                                            \
  inline T& operator+=(T& a, const T& b) { return a = a + b; }                                            \
  inline T& operator-=(T& a, const T& b) { return a = a - b; }                                            \
  inline T& operator*=(T& a, const T& b) { return a = a * b; }                                            \
  inline T& operator/=(T& a, const T& b) { return a = a / b; }                                            \
  inline bool operator==(const T& a, const T& b) { return (float)a == (float)b; }                         \
  inline bool operator!=(const T& a, const T& b) { return (float)a != (float)b; }                         \
  inline bool operator<(const T& a, const T& b) { return (float)a < (float)b; }                           \
  inline bool operator<=(const T& a, const T& b) { return (float)a <= (float)b; }                         \
  inline bool operator>(const T& a, const T& b) { return (float)a > (float)b; }                           \
  inline bool operator>=(const T& a, const T& b) { return (float)a >= (float)b; }
EMU_HALF_TYPE(__half, __half_raw, float_to_half_bits, half_bits_to_float)
EMU_HALF_TYPE(__nv_bfloat16, __nv_bfloat16_raw, float_to_bf16_bits, bf16_bits_to_float)
#undef EMU_HALF_TYPE
struct __attribute__((aligned(4))) __half2 {
  __half x, y;
  __half2() = default;
  __half2(const __half& a, const __half& b) : x(a), y(b) {}
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  __nv_bfloat162(const __nv_bfloat16& a, const __nv_bfloat16& b) : x(a), y(b) {}
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

// ---- conversions ---------------------------------------------------------------------------------
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return (float)h; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float2half2_rn(float a) { return __half2(__half(a), __half(a)); }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 h) { return make_float2((float)h.x, (float)h.y); }
inline float __low2float(__half2 h) { return (float)h.x; }
inline float __high2float(__half2 h) { return (float)h.y; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline __half __short_as_half(short u) { return __half(__half_raw{(unsigned short)u}); }
inline __half __int2half_rn(int i) { return __half(i); }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b)); }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return make_float2((float)h.x, (float)h.y); }
inline float __low2float(__nv_bfloat162 h) { return (float)h.x; }
inline float __high2float(__nv_bfloat162 h) { return (float)h.y; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16(__nv_bfloat16_raw{u}); }
inline __nv_bfloat16 __short_as_bfloat16(short u) { return __nv_bfloat16(__nv_bfloat16_raw{(unsigned short)u}); }

// ---- arithmetic intrinsics (float compute, one rounding) -------------------------------------------
#define EMU_HALF_OPS(T)                                                                                   \
  inline T __hadd(T a, T b) { return a + b; }                                                             \
  inline T __hsub(T a, T b) { return a - b; }                                                             \
  inline T __hmul(T a, T b) { return a * b; }                                                             \
  inline T __hdiv(T a, T b) { return a / b; }                                                             \
  inline T __hneg(T a) { return -a; }                                                                     \
  inline T __hfma(T a, T b, T c) { return T(std::fma((float)a, (float)b, (float)c)); }                    \
  inline T __habs(T a) { T r = a; r.__x &= 0x7fffu; return r; }                                           \
  inline bool __hisnan(T a) { return std::isnan((float)a); }                                              \
  inline int __hisinf(T a) { float f = a; return std::isinf(f) ? (f < 0 ? -1 : 1) : 0; }                 \
  inline T __hmax(T a, T b) { return T(std::fmax((float)a, (float)b)); }                                  \
  inline T __hmin(T a, T b) { return T(std::fmin((float)a, (float)b)); }                                  \
  inline bool __heq(T a, T b) { return a == b; }                                                          \
  inline bool __hne(T a, T b) { return a != b; }                                                          \
  inline bool __hlt(T a, T b) { return a < b; }                                                           \
  inline bool __hle(T a, T b) { return a <= b; }                                                          \
  inline bool __hgt(T a, T b) { return a > b; }                                                           \
  inline bool __hge(T a, T b) { return a >= b; }
EMU_HALF_OPS(__half)
EMU_HALF_OPS(__nv_bfloat16)
#undef EMU_HALF_OPS
#define EMU_HALF2_OPS(T2)                                                                                 \
  inline T2 __hadd2(T2 a, T2 b) { return T2(a.x + b.x, a.y + b.y); }                                      \
  inline T2 __hsub2(T2 a, T2 b) { return T2(a.x - b.x, a.y - b.y); }                                      \
  inline T2 __hmul2(T2 a, T2 b) { return T2(a.x * b.x, a.y * b.y); }                                      \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return T2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }
EMU_HALF2_OPS(__half2)
EMU_HALF2_OPS(__nv_bfloat162)
#undef EMU_HALF2_OPS
