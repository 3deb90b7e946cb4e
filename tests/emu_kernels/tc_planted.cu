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
