// tc.cuh -- tensor-core MMA, ldmatrix and cp.async for fastconv's kernels (sm_80 and newer).
//
// One kernel-side API for two machines:
//   * on a GPU (nvcc / NVRTC) each function is the inline PTX of one instruction;
//   * on the CPU harness (fastconv.emu defines FASTCONV_CUDA_EMU) each calls the harness's
//     warp-collective implementation, which gathers the fragments of all 32 lanes in the PTX ISA
//     layout (see fastconv/emu/emu_tc.h), and defers cp.async copies to the wait, poisoning the
//     destination until then.
// Needs no other header, so NVRTC compiles it with no CUDA include path (NVRTC alone cannot find
// <cuda_fp16.h>): kernels can keep f16/bf16 data as unsigned short and convert with
// f16_bits_from_float & co (round to nearest even, NaN -> 0x7fff). Fragments are 32-bit words:
// a .tf32 element per word, or two .f16/.bf16 elements per word (the lower-numbered in the low half).
//
// Fragment layouts (g = lane / 4, t = lane % 4):
//   mma_m16n8k8_tf32    A[16x8] row-major:  a0 (g,t)   a1 (g+8,t)   a2 (g,t+4)   a3 (g+8,t+4)
//                       B[8x8]  (k, n):     b0 (t,g)   b1 (t+4,g)
//   mma_m16n8k16_f16/bf16  A[16x16]: word r = (g + 8*(r&1), 2t + 8*(r>>1) + {0,1})
//                          B[16x8]:  word r = (k = 2t + 8r + {0,1}, n = g)
//   C/D[16x8] float:    c_i (g + 8*(i>>1), 2t + (i&1))
//   ldmatrix_xN: lanes 8m..8m+7 give the 8 row addresses (16 bytes each, 16-byte aligned, shared
//     memory) of matrix m; word m of lane l then holds row l/4, columns 2(l%4)+{0,1} (.trans: the
//     transposed matrix, i.e. column l/4, rows 2(l%4)+{0,1}).
#pragma once

#if defined(FASTCONV_CUDA_EMU)
// ------------------------------------------------------------------ the CPU harness ------------
#if __CUDA_ARCH__ < 800
#define FC_TC_NEEDS_SM80(what) ::emu::trap(what " needs sm_80 or newer (compile with -arch=sm_80)", f, l)
#else
#define FC_TC_NEEDS_SM80(what) (void)0
#endif
#define FC_TC_LOC const char* f = __builtin_FILE(), int l = __builtin_LINE()

__device__ __forceinline__ unsigned tf32_from_float(float x) { return ::emu::tf32_round(x); }
__device__ __forceinline__ unsigned short f16_bits_from_float(float x) { return ::emu::float_to_half_bits(x); }
__device__ __forceinline__ float float_from_f16_bits(unsigned short h) { return ::emu::half_bits_to_float(h); }
__device__ __forceinline__ unsigned short bf16_bits_from_float(float x) { return ::emu::float_to_bf16_bits(x); }
__device__ __forceinline__ float float_from_bf16_bits(unsigned short h) { return ::emu::bf16_bits_to_float(h); }
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
  return (unsigned)::emu::float_to_half_bits(lo) | (unsigned)::emu::float_to_half_bits(hi) << 16;
}
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  return (unsigned)::emu::float_to_bf16_bits(lo) | (unsigned)::emu::float_to_bf16_bits(hi) << 16;
}
__device__ __forceinline__ void mma_m16n8k8_tf32(float d[4], const unsigned a[4], const unsigned b[2], const float c[4], FC_TC_LOC) {
  FC_TC_NEEDS_SM80("mma.sync .tf32");
  ::emu::mma_sync(::emu::MMA_M16N8K8_TF32, d, a, b, c, f, l);
}
__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4], FC_TC_LOC) {
  FC_TC_NEEDS_SM80("mma.sync m16n8k16 .f16");
  ::emu::mma_sync(::emu::MMA_M16N8K16_F16, d, a, b, c, f, l);
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4], FC_TC_LOC) {
  FC_TC_NEEDS_SM80("mma.sync .bf16");
  ::emu::mma_sync(::emu::MMA_M16N8K16_BF16, d, a, b, c, f, l);
}
#define FC_TC_LDSM(NAME, N, TRANS)                                                                  \
  __device__ __forceinline__ void NAME(unsigned r[N], const void* smem_row, FC_TC_LOC) {           \
    ::emu::ldmatrix(N, TRANS, r, smem_row, f, l);                                                   \
  }
FC_TC_LDSM(ldmatrix_x1, 1, false) FC_TC_LDSM(ldmatrix_x2, 2, false) FC_TC_LDSM(ldmatrix_x4, 4, false)
FC_TC_LDSM(ldmatrix_x1_trans, 1, true) FC_TC_LDSM(ldmatrix_x2_trans, 2, true) FC_TC_LDSM(ldmatrix_x4_trans, 4, true)
#undef FC_TC_LDSM
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, FC_TC_LOC) {
  FC_TC_NEEDS_SM80("cp.async");
  ::emu::cp_async(smem, gmem, 4, 4, f, l);
}
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem, FC_TC_LOC) {
  FC_TC_NEEDS_SM80("cp.async");
  ::emu::cp_async(smem, gmem, 8, 8, f, l);
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, FC_TC_LOC) {
  FC_TC_NEEDS_SM80("cp.async");
  ::emu::cp_async(smem, gmem, 16, 16, f, l);
}
// Copies src_bytes (0..16) and zero-fills the rest: src_bytes = 0 writes 16 zeros (padding).
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, int src_bytes, FC_TC_LOC) {
  FC_TC_NEEDS_SM80("cp.async");
  ::emu::cp_async(smem, gmem, 16, src_bytes, f, l);
}
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait(FC_TC_LOC) { ::emu::cp_async_wait(N, f, l); }
__device__ __forceinline__ void cp_async_wait_all(FC_TC_LOC) {
  ::emu::cp_async_commit();
  ::emu::cp_async_wait(0, f, l);
}
#undef FC_TC_LOC
#undef FC_TC_NEEDS_SM80

#else
// ------------------------------------------------------------------ a GPU: inline PTX ----------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FC_TC_SM80(...) __trap()   // compiled for an older arch: kernels using this must not launch
#else
#define FC_TC_SM80(...) __VA_ARGS__
#endif

__device__ __forceinline__ unsigned fc_smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ unsigned tf32_from_float(float x) {
  unsigned r = 0;
  FC_TC_SM80(asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x)));
  return r;
}
__device__ __forceinline__ unsigned short f16_bits_from_float(float x) {
  unsigned short r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float float_from_f16_bits(unsigned short h) {
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
  return r;
}
__device__ __forceinline__ unsigned short bf16_bits_from_float(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  unsigned u = __float_as_uint(x);   // the same rounding by hand (no cvt.rn.bf16.f32 before sm_80)
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return (unsigned short)((u + 0x7fffu + (u >> 16 & 1u)) >> 16);
#else
  unsigned short r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
#endif
}
__device__ __forceinline__ float float_from_bf16_bits(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
  unsigned r = 0;   // cvt.rn.f16x2.f32 d, a, b puts a in the upper half
  FC_TC_SM80(asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)));
  return r;
}
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  unsigned r = 0;
  FC_TC_SM80(asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)));
  return r;
}
#define FC_TC_MMA(NAME, SHAPE, T)                                                                        \
  __device__ __forceinline__ void NAME(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) { \
    FC_TC_SM80(asm volatile("mma.sync.aligned." SHAPE ".row.col.f32." T "." T ".f32 "                   \
                            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"                 \
                            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                             \
                            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),          \
                              "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3])));                              \
  }
FC_TC_MMA(mma_m16n8k8_tf32, "m16n8k8", "tf32")
FC_TC_MMA(mma_m16n8k16_f16, "m16n8k16", "f16")
FC_TC_MMA(mma_m16n8k16_bf16, "m16n8k16", "bf16")
#undef FC_TC_MMA
__device__ __forceinline__ void ldmatrix_x1(unsigned r[1], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(fc_smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(unsigned r[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(fc_smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(fc_smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(unsigned r[1], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(fc_smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned r[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(fc_smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(fc_smem_addr(p)));
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  FC_TC_SM80(asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(fc_smem_addr(smem)), "l"(gmem) : "memory"));
}
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem) {
  FC_TC_SM80(asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(fc_smem_addr(smem)), "l"(gmem) : "memory"));
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  FC_TC_SM80(asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(fc_smem_addr(smem)), "l"(gmem) : "memory"));
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, int src_bytes) {
  FC_TC_SM80(asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                          :: "r"(fc_smem_addr(smem)), "l"(gmem), "r"(src_bytes) : "memory"));
}
__device__ __forceinline__ void cp_async_commit() { FC_TC_SM80(asm volatile("cp.async.commit_group;" ::: "memory")); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  FC_TC_SM80(asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"));
}
__device__ __forceinline__ void cp_async_wait_all() { FC_TC_SM80(asm volatile("cp.async.wait_all;" ::: "memory")); }
#undef FC_TC_SM80
#endif
