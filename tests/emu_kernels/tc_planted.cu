// Misuses of the tensor-core and async-copy instructions that the harness must refuse
// (fastconv.emu.AsyncCopyError), each a bug that is undefined behaviour on a GPU.
#include "tc.cuh"

// cp.async into global memory (the destination must be shared).
extern "C" __global__ void cp_async_to_global(float* __restrict__ dst, const float* __restrict__ src) {
  cp_async_16(dst + 4 * threadIdx.x, src + 4 * threadIdx.x);
  cp_async_wait_all();
}

// A 16-byte cp.async from an address that is only 4-byte aligned.
extern "C" __global__ void cp_async_misaligned(float* __restrict__ out, const float* __restrict__ src) {
  __shared__ __align__(16) float s[32 * 4 + 4];
  cp_async_16(&s[4 * threadIdx.x], src + 4 * threadIdx.x + 1);
  cp_async_wait_all();
  out[threadIdx.x] = s[4 * threadIdx.x];
}

// ldmatrix from global memory.
extern "C" __global__ void ldmatrix_from_global(const unsigned short* __restrict__ m, unsigned* __restrict__ out) {
  unsigned r[1];
  ldmatrix_x1(r, m + 8 * (threadIdx.x % 8));
  out[threadIdx.x] = r[0];
}

// mma.sync by a block of 16 threads: half a warp.
extern "C" __global__ void mma_half_warp(float* __restrict__ out) {
  unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0}, d[4];
  mma_m16n8k16_f16(d, a, b, c);
  out[threadIdx.x] = d[0];
}

// Lanes of one warp disagree on the instruction: half issue f16, half bf16.
extern "C" __global__ void mma_mixed_kinds(float* __restrict__ out) {
  unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0}, d[4];
  if (threadIdx.x < 16) mma_m16n8k16_f16(d, a, b, c);
  else mma_m16n8k16_bf16(d, a, b, c);
  out[threadIdx.x] = d[0];
}

// cp.async group accounting (not a misuse): group 0 = a zero-filling 16-byte copy of src_bytes,
// group 1 = an 8-byte copy. After wait_group 1 only group 0 is guaranteed complete; the harness
// keeps group 1 poisoned (NaN) until wait_group 0. out[t] = {4 floats after wait 1: group 0,
// 2 floats after wait 1: group 1, 2 floats after wait 0: group 1}.
extern "C" __global__ void cp_async_groups(const float* __restrict__ src, float* __restrict__ out, int src_bytes) {
  __shared__ __align__(16) float s0[32 * 4];
  __shared__ __align__(16) float s1[32 * 2];
  const int t = threadIdx.x;
  cp_async_16_zfill(&s0[4 * t], src + 4 * t, src_bytes);
  cp_async_commit();
  cp_async_8(&s1[2 * t], src + 128 + 2 * t);
  cp_async_commit();
  cp_async_wait<1>();
  for (int i = 0; i < 4; ++i) out[8 * t + i] = s0[4 * t + i];
  for (int i = 0; i < 2; ++i) out[8 * t + 4 + i] = s1[2 * t + i];
  cp_async_wait<0>();
  for (int i = 0; i < 2; ++i) out[8 * t + 6 + i] = s1[2 * t + i];
}
