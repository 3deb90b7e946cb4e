// Tiled shared-memory matmul C[M,N] = A[M,K] @ B[K,N], row-major float32, TILE x TILE blocks.
// MISSING_SYNC=1 deletes the barrier after the tile loads (a planted bug for the harness tests).
#ifndef TILE
#define TILE 8
#endif
#ifndef MISSING_SYNC
#define MISSING_SYNC 0
#endif

extern "C" __global__ void __launch_bounds__(TILE * TILE)
matmul(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C, int M, int N, int K) {
  __shared__ float As[TILE][TILE];
  __shared__ float Bs[TILE][TILE];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
  float acc = 0.0f;
  for (int k0 = 0; k0 < K; k0 += TILE) {
    As[ty][tx] = (row < M && k0 + tx < K) ? A[row * K + k0 + tx] : 0.0f;
    Bs[ty][tx] = (k0 + ty < K && col < N) ? B[(k0 + ty) * N + col] : 0.0f;
#if !MISSING_SYNC
    __syncthreads();
#endif
    for (int k = 0; k < TILE; ++k) acc = __fmaf_rn(As[ty][k], Bs[k][tx], acc);
    __syncthreads();
  }
  if (row < M && col < N) C[row * N + col] = acc;
}
