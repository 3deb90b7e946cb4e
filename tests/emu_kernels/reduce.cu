// Sum reduction: grid-stride loads, warp sums with __shfl_down_sync, per-warp partials in dynamic
// shared memory, then one atomicAdd per block. Also a shuffle/ballot self-check kernel.
extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ out, int n) {
  extern __shared__ float partial[];  // one float per warp, sized by the launch
  float v = 0.0f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
  for (int off = warpSize / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + warpSize - 1) / warpSize;
    v = lane < nwarps ? partial[lane] : 0.0f;
    for (int off = warpSize / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) atomicAdd(out, v);
  }
}

// out[t] for t < blockDim.x: xor-butterfly sum of lane ids (every lane: 496), broadcast of lane 3,
// ballot of odd lanes, and an integer atomicAdd/atomicMax/atomicCAS counter.
extern "C" __global__ void warp_ops(int* __restrict__ out, int* __restrict__ counters) {
  const int t = threadIdx.x, lane = t % 32;
  int s = lane;
  for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
  const int b = __shfl_sync(0xffffffffu, lane * 10, 3);
  const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
  out[4 * t + 0] = s;
  out[4 * t + 1] = b;
  out[4 * t + 2] = (int)odd;
  out[4 * t + 3] = __syncthreads_count(lane < 4);
  atomicAdd(&counters[0], 1);
  atomicMax(&counters[1], t);
  atomicCAS(&counters[2], 0, 7);
  atomicAdd((unsigned long long*)&counters[4], 1ull);
  atomicAdd((double*)&counters[6], 0.5);
}
