// A tensor-core GEMM, C[M,N] (float32) = A[M,K] @ B[K,N], both row-major, as fastconv's implicit
// GEMM convolutions are built: a STAGES-deep cp.async pipeline of block tiles in shared memory,
// fragments loaded with ldmatrix, mma.sync with float32 accumulation. 128 threads (4 warps in 2x2)
// per 32x32 block tile; each warp owns a 16x16 piece (two m16n8 tiles).
//   gemm_f16 / gemm_bf16: 16-bit inputs, K-step 16; A by ldmatrix.x4, B by ldmatrix.x4.trans.
//   gemm_tf32: float32 inputs rounded by cvt.rna.tf32.f32, K-step 8; A by ldmatrix.x4 (a 8x8 b16
//     matrix is 8 rows of 4 tf32), B by scalar shared-memory loads.
// Needs K % BK == 0 and N % (16 bytes / element size) == 0; rows and columns past M and N are
// zero-filled (cp.async src-size 0) and not stored.
//
// Planted bugs (tests/test_emu_harness.py compiles them with -D...):
//   WRONG_LAYOUT  A fragment words 1 and 2 exchanged (rows 8-15 and columns 4-7 / 8-15 swap)
//   EARLY_READ    cp.async.wait_group STAGES-1: the stage about to be read may still be in flight
//   NO_BARRIER    no __syncthreads between the copies landing and the ldmatrix of the tile
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "tc.cuh"

#ifndef STAGES
#define STAGES 3
#endif
#define BM 32
#define BN 32

template <int BK, int PAD> struct Tiles {   // PAD keeps ldmatrix rows 16-byte aligned
  static constexpr int ak = BK + PAD, bn = BN + PAD;
};

__device__ __forceinline__ void wait_for_stage() {
#ifdef EARLY_READ
  cp_async_wait<STAGES - 1>();
#else
  cp_async_wait<STAGES - 2>();
#endif
#ifndef NO_BARRIER
  __syncthreads();
#endif
}

__device__ __forceinline__ void store_tile(float* C, int M, int N, int row0, int col0, const float (&acc)[2][4]) {
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  for (int j = 0; j < 2; ++j)
    for (int i = 0; i < 4; ++i) {
      const int r = row0 + g + 8 * (i >> 1), c = col0 + 8 * j + 2 * t + (i & 1);
      if (r < M && c < N) C[(long long)r * N + c] = acc[j][i];
    }
}

// 16-bit types: T is __half or __nv_bfloat16 seen as raw 16-bit words.
template <bool BF16>
__device__ void gemm_16bit(const unsigned short* __restrict__ A, const unsigned short* __restrict__ B, float* __restrict__ C,
                           int M, int N, int K) {
  constexpr int BK = 16, AK = BK + 8, BNP = BN + 8;
  __shared__ __align__(16) unsigned short As[STAGES][BM][AK];
  __shared__ __align__(16) unsigned short Bs[STAGES][BK][BNP];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wm = warp / 2, wn = warp % 2;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, KT = K / BK;
  auto load = [&](int slot, int kt) {
    if (tid < 64) {   // A: 32 rows x 2 chunks of 8
      const int r = tid / 2, kc = (tid % 2) * 8, gr = m0 + r;
      const unsigned short* src = A + (long long)(gr < M ? gr : 0) * K + kt * BK + kc;
      cp_async_16_zfill(&As[slot][r][kc], src, gr < M ? 16 : 0);
    } else {          // B: 16 rows x 4 chunks of 8
      const int r = (tid - 64) / 4, nc = ((tid - 64) % 4) * 8, gn = n0 + nc;
      const unsigned short* src = B + (long long)(kt * BK + r) * N + (gn < N ? gn : 0);
      cp_async_16_zfill(&Bs[slot][r][nc], src, gn < N ? 16 : 0);
    }
  };
  float acc[2][4] = {};
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    wait_for_stage();
    const int next = kt + STAGES - 1;
    if (next < KT) load(next % STAGES, next);  // the slot read in iteration kt-1: all warps are past it
    cp_async_commit();
    const int slot = kt % STAGES;
    unsigned a[4], b[4];
    ldmatrix_x4(a, &As[slot][wm * 16 + lane % 16][(lane / 16) * 8]);
#ifdef WRONG_LAYOUT
    const unsigned swap = a[1]; a[1] = a[2]; a[2] = swap;
#endif
    ldmatrix_x4_trans(b, &Bs[slot][lane % 16][wn * 16 + (lane / 16) * 8]);
    for (int j = 0; j < 2; ++j) {
      if (BF16) mma_m16n8k16_bf16(acc[j], a, b + 2 * j, acc[j]);
      else mma_m16n8k16_f16(acc[j], a, b + 2 * j, acc[j]);
    }
#ifndef NO_BARRIER
    __syncthreads();   // every warp is done with this slot before it is refilled
#endif
  }
  store_tile(C, M, N, m0 + wm * 16, n0 + wn * 16, acc);
}

extern "C" __global__ void __launch_bounds__(128) gemm_f16(const __half* A, const __half* B, float* C, int M, int N, int K) {
  gemm_16bit<false>(reinterpret_cast<const unsigned short*>(A), reinterpret_cast<const unsigned short*>(B), C, M, N, K);
}
extern "C" __global__ void __launch_bounds__(128) gemm_bf16(const __nv_bfloat16* A, const __nv_bfloat16* B, float* C, int M, int N, int K) {
  gemm_16bit<true>(reinterpret_cast<const unsigned short*>(A), reinterpret_cast<const unsigned short*>(B), C, M, N, K);
}

extern "C" __global__ void __launch_bounds__(128) gemm_tf32(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                                                            int M, int N, int K) {
  constexpr int BK = 8, AK = BK + 4, BNP = BN + 4;
  __shared__ __align__(16) float As[STAGES][BM][AK];
  __shared__ __align__(16) float Bs[STAGES][BK][BNP];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wm = warp / 2, wn = warp % 2;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, KT = K / BK;
  auto load = [&](int slot, int kt) {
    if (tid < 64) {   // A: 32 rows x 2 chunks of 4
      const int r = tid / 2, kc = (tid % 2) * 4, gr = m0 + r;
      cp_async_16_zfill(&As[slot][r][kc], A + (long long)(gr < M ? gr : 0) * K + kt * BK + kc, gr < M ? 16 : 0);
    } else {          // B: 8 rows x 8 chunks of 4
      const int r = (tid - 64) / 8, nc = ((tid - 64) % 8) * 4, gn = n0 + nc;
      cp_async_16_zfill(&Bs[slot][r][nc], B + (long long)(kt * BK + r) * N + (gn < N ? gn : 0), gn < N ? 16 : 0);
    }
  };
  float acc[2][4] = {};
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    wait_for_stage();
    const int next = kt + STAGES - 1;
    if (next < KT) load(next % STAGES, next);
    cp_async_commit();
    const int slot = kt % STAGES;
    unsigned a[4], b[2][2];
    ldmatrix_x4(a, &As[slot][wm * 16 + lane % 16][(lane / 16) * 4]);
#ifdef WRONG_LAYOUT
    const unsigned swap = a[1]; a[1] = a[2]; a[2] = swap;
#endif
    for (int i = 0; i < 4; ++i) a[i] = tf32_from_float(__uint_as_float(a[i]));
    for (int j = 0; j < 2; ++j) {
      const int n = wn * 16 + 8 * j + g;
      b[j][0] = tf32_from_float(Bs[slot][t][n]);
      b[j][1] = tf32_from_float(Bs[slot][t + 4][n]);
    }
    for (int j = 0; j < 2; ++j) mma_m16n8k8_tf32(acc[j], a, b[j], acc[j]);
#ifndef NO_BARRIER
    __syncthreads();
#endif
  }
  store_tile(C, M, N, m0 + wm * 16, n0 + wn * 16, acc);
}
