// conv_tc.cu -- tensor-core implicit-GEMM convolution (algorithm "implicit-gemm-tc"), sm_80+.
//
// Activations are channels-last, (N, D, H, W, C) ("NDHWC"; a 2-D conv has D = 1), so the reduction
// runs along the channels and a 16-byte chunk of 8 halves (4 floats) is 8 (4) consecutive channels of
// one pixel: one cp.async, coalesced across the threads that load neighbouring chunks.
// fastconv/cuda/conv_tc.py permutes the tensors (free when they are channels_last already) and the
// weights (small) into the layouts named below.
//
//   forward      A[m][k] = x[n, od*s-p+kd*d, ..., grp*Cg + c]       m = (n, od, oh, ow), k = (tap, c)
//                B[n][k] = w2[grp*Kg + n][tap][c]                    w2: (K, KD, KH, KW, Cg)
//                y[m][grp*Kg + n]                                    y: (N, OD, OH, OW, K)
//   grad_input   A[m][k] = gy at the output position input m feeds through tap, or 0 (stride gaps)
//                         m = (n, id, ih, iw), k = (tap, kk)
//                B[c][k] = w3[grp*Cg + c][tap][kk]                   w3: (C, KD, KH, KW, K/groups)
//                gx[m][grp*Cg + c]                                   gx: (N, D, H, W, C)
//   grad_weight  A[j][m] = gy[j][grp*Kg + m]                         j = (n, od, oh, ow): the reduction
//                B[j][q] = x at the input position j reads through tap, q = (tap, c)
//                partial[split][grp*Kg + m][q], float32; tc_wgrad_reduce adds the splits in a fixed
//                order (deterministic, no atomics) and writes (K, Cg, KD, KH, KW) in the input dtype.
//
// Data types (KIND): f16 and bf16 with float32 accumulation (mma.sync m16n8k16), float32 as TF32
// (cvt.rna.tf32.f32 on the fragments, mma.sync m16n8k8), float32 accumulation and output; results are
// rounded once to the input dtype.
//
// Tiling: 128 x 128 block tile, 256 threads = 8 warps in 2 (M) x 4 (N), each warp 64 x 32 (4 x 4 mma
// tiles, 64 float accumulators per thread). A stage holds a K-step of 64 bytes per row (32 halves or
// 16 floats); TC_STAGES stages in dynamic shared memory, filled by cp.async (one commit group per
// stage) while the tensor cores work on the oldest: one __syncthreads per K-step.
//   forward / grad_input: both tiles K-major ([row][k], rows of 64 + 16 bytes: the 16-byte pad makes
//     the 8 row addresses of an ldmatrix fall in 8 different 4-bank groups), fragments by ldmatrix.x4
//     (for TF32 an 8x8 b16 matrix is 8 rows of 4 floats: the same instruction loads tf32 fragments).
//   grad_weight: the reduction runs over pixels and the contiguous axis of both tensors is the channel,
//     so both tiles are MN-major ([k][row], rows of 128 + 8 elements); 16-bit fragments by
//     ldmatrix.x4.trans, TF32 fragments by scalar shared loads (ldmatrix transposes 16-bit elements only).
// VEC (the *_vec entry points) needs the channel counts the chunks run along to be multiples of 8
// halves / 4 floats and 16-byte aligned tensors (the host checks): 16-byte cp.async with zero-fill
// (src-size 0) for padding, the image border and the tile edges. Otherwise every element is loaded on
// its own (zero outside), stored to shared memory directly: odd channel counts, any stride, padding,
// dilation and groups.
#include "common.cuh"
#include "tc.cuh"

#define TC_BM 128       // block tile rows (GEMM M)
#define TC_BN 128       // block tile columns (GEMM N)
#define TC_THREADS 256  // 8 warps: 2 x 4, each a 64 x 32 warp tile
#define TC_KBYTES 64    // K-step of one stage in bytes (32 halves, 16 floats)
#ifndef TC_STAGES
#define TC_STAGES 3     // cp.async pipeline depth (fastconv/cuda/conv_tc.py STAGES)
#endif
static_assert(TC_STAGES >= 2, "the pipeline needs at least two stages");
static_assert(TC_THREADS == 256 && TC_BM == 128 && TC_BN == 128,
              "the thread -> chunk and warp -> tile maps below are written for these numbers");

enum { TC_F16 = 0, TC_BF16 = 1, TC_TF32 = 2 };

template <int KIND> struct TcCfg {
  typedef unsigned short T;                      // f16 / bf16 as raw bits (NVRTC has no cuda_fp16.h)
};
template <> struct TcCfg<TC_TF32> { typedef float T; };

template <int KIND> struct TcDims {
  typedef typename TcCfg<KIND>::T T;
  static constexpr int VEC = 16 / (int)sizeof(T);           // elements per 16-byte chunk
  static constexpr int BK = TC_KBYTES / (int)sizeof(T);     // elements of a stage along K
  static constexpr int MK = KIND == TC_TF32 ? 8 : 16;       // k of one mma
  static constexpr int KROW = BK + VEC;                      // K-major row (80 bytes)
  static constexpr int MROW_A = TC_BM + 8, MROW_B = TC_BN + 8;  // MN-major rows
  static constexpr int A_K = TC_BM * KROW, B_K = TC_BN * KROW;  // elements of a stage, K-major
  static constexpr int A_MN = BK * MROW_A, B_MN = BK * MROW_B;  // ... MN-major
};

extern __shared__ uint4 tc_smem[];  // uint4: 16-byte aligned (cp.async, ldmatrix)

template <int KIND> __device__ __forceinline__ float tc_to_float(typename TcCfg<KIND>::T v) {
  if constexpr (KIND == TC_F16) return float_from_f16_bits(v);
  else if constexpr (KIND == TC_BF16) return float_from_bf16_bits(v);
  else return v;
}
template <int KIND> __device__ __forceinline__ typename TcCfg<KIND>::T tc_from_float(float v) {
  if constexpr (KIND == TC_F16) return f16_bits_from_float(v);
  else if constexpr (KIND == TC_BF16) return bf16_bits_from_float(v);
  else return v;
}
template <int KIND> __device__ __forceinline__ void tc_mma(float d[4], const unsigned a[4], const unsigned b[2]) {
  if constexpr (KIND == TC_F16) mma_m16n8k16_f16(d, a, b, d);
  else if constexpr (KIND == TC_BF16) mma_m16n8k16_bf16(d, a, b, d);
  else mma_m16n8k8_tf32(d, a, b, d);
}

// One 16-byte chunk of shared memory from VEC elements whose addresses `ptr_of(e)` gives (nullptr:
// zero). VEC: the chunk is contiguous in global memory, one cp.async (zero-fill when absent);
// otherwise element by element, plain loads and shared stores (visible after the stage's barrier).
template <bool VEC, int N, typename T, class F>
__device__ __forceinline__ void tc_fill(T* dst, const F& ptr_of, const T* dummy) {
  if constexpr (VEC) {
    const T* p = ptr_of(0);
    cp_async_16_zfill(dst, p ? p : dummy, p ? 16 : 0);
  } else {
#pragma unroll 1  // not unrolled: the index maths of 8 elements at once would cost registers the accumulators need
    for (int e = 0; e < N; ++e) {
      const T* p = ptr_of(e);
      dst[e] = p ? *p : T(0);
    }
  }
}

// The main loop shared by the three passes. Op supplies the operand addresses:
//   K-major (KMAJOR):  op.a_ptr(i, k) for the thread's A row i (0, 1: rows tid/4 and tid/4 + 64 of the
//                      tile, set up by the op), op.b_ptr(i, k) likewise;
//   MN-major:          op.a_ptr(k, m), op.b_ptr(k, n) for absolute GEMM coordinates;
// each returns nullptr for a zero (outside the tensor, the padding, the GEMM).
template <int KIND, bool KMAJOR, bool VEC, class Op>
__device__ __forceinline__ void tc_mainloop(const Op& op, i64 m0, i64 n0, i64 kbeg, i64 kend,
                                            float (&acc)[4][4][4]) {
  typedef TcDims<KIND> D;
  typedef typename D::T T;
  constexpr int ASTAGE = KMAJOR ? D::A_K : D::A_MN, BSTAGE = KMAJOR ? D::B_K : D::B_MN;
  T* const As = reinterpret_cast<T*>((uint4*)tc_smem);
  T* const Bs = As + TC_STAGES * ASTAGE;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
  const int KT = (int)((kend - kbeg + D::BK - 1) / D::BK);

  auto load = [&](int slot, i64 k0) {
    T* a = As + slot * ASTAGE;
    T* b = Bs + slot * BSTAGE;
    if constexpr (KMAJOR && VEC) {  // chunk tid + 256 i: row tid / 4 + 64 i, k (tid % 4) * VEC
      const int r = tid >> 2, kc = (tid & 3) * D::VEC;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        tc_fill<VEC, D::VEC>(a + (r + 64 * i) * D::KROW + kc, [&](int e) { return op.a_ptr(i, k0 + kc + e); }, op.a_base());
        tc_fill<VEC, D::VEC>(b + (r + 64 * i) * D::KROW + kc, [&](int e) { return op.b_ptr(i, k0 + kc + e); }, op.b_base());
      }
    } else if constexpr (KMAJOR) {  // the same chunks, each element's address from scratch: no per-row
      const int r = tid >> 2, kc = (tid & 3) * D::VEC;  // state lives across the loop (registers)
#pragma unroll 1
      for (int i = 0; i < 2; ++i) {
        tc_fill<VEC, D::VEC>(a + (r + 64 * i) * D::KROW + kc, [&](int e) { return op.a_ptr_at(m0 + r + 64 * i, k0 + kc + e); }, op.a_base());
        tc_fill<VEC, D::VEC>(b + (r + 64 * i) * D::KROW + kc, [&](int e) { return op.b_ptr_at(n0 + r + 64 * i, k0 + kc + e); }, op.b_base());
      }
    } else {                 // chunk tid + 256 i: k-row tid / CPR + i * 256 / CPR, column (tid % CPR) * VEC
      constexpr int CPR = TC_BM / D::VEC, STEP = TC_THREADS / CPR;
      static_assert(2 * STEP == D::BK && TC_BM == TC_BN, "two chunks per thread cover a stage");
      const int kr = tid / CPR, col = (tid % CPR) * D::VEC;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = kr + i * STEP;
        tc_fill<VEC, D::VEC>(a + row * D::MROW_A + col, [&](int e) { return op.a_ptr(k0 + row, m0 + col + e); }, op.a_base());
        tc_fill<VEC, D::VEC>(b + row * D::MROW_B + col, [&](int e) { return op.b_ptr(k0 + row, n0 + col + e); }, op.b_base());
      }
    }
  };

#pragma unroll 1
  for (int s = 0; s < TC_STAGES - 1; ++s) {
    if (s < KT) load(s, kbeg + (i64)s * D::BK);
    cp_async_commit();
  }
#pragma unroll 1
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<TC_STAGES - 2>();  // stage kt has landed (this thread's copies) ...
    __syncthreads();                 // ... everyone's; and every warp is done with stage kt - 1
    const int next = kt + TC_STAGES - 1;
    if (next < KT) load(next % TC_STAGES, kbeg + (i64)next * D::BK);  // refills stage kt - 1's slot
    cp_async_commit();
    const int slot = kt % TC_STAGES;
    const T* a = As + slot * ASTAGE;
    const T* b = Bs + slot * BSTAGE;
#pragma unroll
    for (int ks = 0; ks < D::BK / D::MK; ++ks) {
      unsigned bf[4][2];
      if constexpr (KMAJOR) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {  // matrices: (n 0-7, k lo) (n 0-7, k hi) (n 8-15, k lo) (n 8-15, k hi)
          unsigned r[4];
          ldmatrix_x4(r, b + (wn * 32 + p * 16 + (lane & 7) + (lane >> 4) * 8) * D::KROW + ks * D::MK +
                             ((lane >> 3) & 1) * (D::MK / 2));
          bf[2 * p][0] = r[0]; bf[2 * p][1] = r[1]; bf[2 * p + 1][0] = r[2]; bf[2 * p + 1][1] = r[3];
        }
      } else if constexpr (KIND != TC_TF32) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {  // transposed: (k lo, n 0-7) (k hi, n 0-7) (k lo, n 8-15) (k hi, n 8-15)
          unsigned r[4];
          ldmatrix_x4_trans(r, b + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * D::MROW_B + wn * 32 + p * 16 +
                                   (lane >> 4) * 8);
          bf[2 * p][0] = r[0]; bf[2 * p][1] = r[1]; bf[2 * p + 1][0] = r[2]; bf[2 * p + 1][1] = r[3];
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {  // b0 (k = t, n = g), b1 (k = t + 4, n = g)
          const int n = wn * 32 + nt * 8 + g;
          bf[nt][0] = __float_as_uint(b[(ks * 8 + t) * D::MROW_B + n]);
          bf[nt][1] = __float_as_uint(b[(ks * 8 + t + 4) * D::MROW_B + n]);
        }
      }
      if constexpr (KIND == TC_TF32) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r) bf[nt][r] = tf32_from_float(__uint_as_float(bf[nt][r]));
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        unsigned af[4];
        if constexpr (KMAJOR) {  // matrices: (m 0-7, k lo) (m 8-15, k lo) (m 0-7, k hi) (m 8-15, k hi)
          ldmatrix_x4(af, a + (wm * 64 + mt * 16 + (lane & 15)) * D::KROW + ks * D::MK + (lane >> 4) * (D::MK / 2));
        } else if constexpr (KIND != TC_TF32) {  // transposed, the same four matrices
          ldmatrix_x4_trans(af, a + (ks * 16 + (lane & 7) + (lane >> 4) * 8) * D::MROW_A + wm * 64 + mt * 16 +
                                    ((lane >> 3) & 1) * 8);
        } else {  // a0 (g, t) a1 (g + 8, t) a2 (g, t + 4) a3 (g + 8, t + 4)
          const int m = wm * 64 + mt * 16 + g;
          af[0] = __float_as_uint(a[(ks * 8 + t) * D::MROW_A + m]);
          af[1] = __float_as_uint(a[(ks * 8 + t) * D::MROW_A + m + 8]);
          af[2] = __float_as_uint(a[(ks * 8 + t + 4) * D::MROW_A + m]);
          af[3] = __float_as_uint(a[(ks * 8 + t + 4) * D::MROW_A + m + 8]);
        }
        if constexpr (KIND == TC_TF32) {
#pragma unroll
          for (int r = 0; r < 4; ++r) af[r] = tf32_from_float(__uint_as_float(af[r]));
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) tc_mma<KIND>(acc[mt][nt], af, bf[nt]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending here; leave none behind
}

// Calls store(m, n, value) for each accumulator of this thread inside the GEMM (m < M, n < N).
template <class Store>
__device__ __forceinline__ void tc_epilogue(i64 m0, i64 n0, i64 M, i64 N, const float (&acc)[4][4][4],
                                            const Store& store) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {  // c_r at (g + 8 (r >> 1), 2 t + (r & 1))
        const i64 m = m0 + wm * 64 + mt * 16 + g + 8 * (r >> 1);
        const i64 n = n0 + wn * 32 + nt * 8 + 2 * t + (r & 1);
        if (m < M && n < N) store(m, n, acc[mt][nt][r]);
      }
}

__device__ __forceinline__ void tc_tap(int tap, const ConvGeom& g, int& kd, int& kh, int& kw) {
  kw = tap % g.KW;
  tap /= g.KW;
  kh = tap % g.KH;
  kd = tap / g.KH;
}

// ------------------------------------------------------------------------------------------ forward
template <typename T>
struct TcForwardOp {
  const T* x; const T* w; ConvGeom g; int grp, Cg, Kg, Kred;
  bool rok[2]; i64 rpix[2]; int rd[2], rh[2], rw[2];   // A rows: image start (pixels), window origin
  const T* wrow[2];                                    // B rows (nullptr: past K/groups)
  __device__ __forceinline__ void set_rows(i64 m_first, int n_first) {
    const i64 M = (i64)g.N * g.OD * g.OH * g.OW;
    const int plane = g.OD * g.OH * g.OW;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const i64 m = m_first + 64 * i;
      rok[i] = m < M;
      const i64 n = rok[i] ? m / plane : 0;
      int s = rok[i] ? (int)(m - n * plane) : 0, od, oh, ow;
      fc_unflatten3(s, g.OH, g.OW, od, oh, ow);
      rpix[i] = n * g.D * g.H * g.W;
      rd[i] = od * g.sd - g.pd; rh[i] = oh * g.sh - g.ph; rw[i] = ow * g.sw - g.pw;
      const int col = n_first + 64 * i;
      wrow[i] = col < Kg ? w + (i64)(grp * Kg + col) * Kred : nullptr;
    }
  }
  __device__ __forceinline__ const T* a_base() const { return x; }
  __device__ __forceinline__ const T* b_base() const { return w; }
  __device__ __forceinline__ const T* a_ptr(int i, i64 k) const {
    if (!rok[i] || k >= Kred) return nullptr;
    const int tap = (int)k / Cg, c = (int)k - tap * Cg;
    int kd, kh, kw;
    tc_tap(tap, g, kd, kh, kw);
    const int id = rd[i] + kd * g.dd, ih = rh[i] + kh * g.dh, iw = rw[i] + kw * g.dw;
    if ((unsigned)id >= (unsigned)g.D || (unsigned)ih >= (unsigned)g.H || (unsigned)iw >= (unsigned)g.W) return nullptr;
    return x + (rpix[i] + ((i64)id * g.H + ih) * g.W + iw) * g.C + grp * Cg + c;
  }
  __device__ __forceinline__ const T* b_ptr(int i, i64 k) const {
    return wrow[i] && k < Kred ? wrow[i] + k : nullptr;
  }
  // The same addresses from (m, k) alone (the element-wise loaders).
  __device__ __forceinline__ const T* a_ptr_at(i64 m, i64 k) const {
    const int plane = g.OD * g.OH * g.OW;
    if (m >= (i64)g.N * plane || k >= Kred) return nullptr;
    const i64 n = m / plane;
    int od, oh, ow, kd, kh, kw;
    fc_unflatten3((int)(m - n * plane), g.OH, g.OW, od, oh, ow);
    const int tap = (int)k / Cg, c = (int)k - tap * Cg;
    tc_tap(tap, g, kd, kh, kw);
    const int id = od * g.sd - g.pd + kd * g.dd, ih = oh * g.sh - g.ph + kh * g.dh, iw = ow * g.sw - g.pw + kw * g.dw;
    if ((unsigned)id >= (unsigned)g.D || (unsigned)ih >= (unsigned)g.H || (unsigned)iw >= (unsigned)g.W) return nullptr;
    return x + (((n * g.D + id) * g.H + ih) * g.W + iw) * g.C + grp * Cg + c;
  }
  __device__ __forceinline__ const T* b_ptr_at(i64 n, i64 k) const {
    return n < Kg && k < Kred ? w + (grp * Kg + n) * Kred + k : nullptr;
  }
};

// grid = (ceil(N*OD*OH*OW / 128), ceil(K/groups / 128), groups), 256 threads, dynamic shared memory
// TC_STAGES * 2 * 128 * 80 bytes.
template <int KIND, bool VEC>
__device__ __forceinline__ void tc_forward(const typename TcCfg<KIND>::T* __restrict__ x,
                                           const typename TcCfg<KIND>::T* __restrict__ w,
                                           const typename TcCfg<KIND>::T* __restrict__ bias,
                                           typename TcCfg<KIND>::T* __restrict__ y, int has_bias, const ConvGeom g) {
  typedef typename TcCfg<KIND>::T T;
  FC_REQUIRE_BLOCK(TC_THREADS);
  TcForwardOp<T> op;
  op.x = x; op.w = w; op.g = g; op.grp = blockIdx.z;
  op.Cg = g.C / g.groups; op.Kg = g.K / g.groups; op.Kred = op.Cg * g.KD * g.KH * g.KW;
  const i64 m0 = (i64)blockIdx.x * TC_BM, n0 = (i64)blockIdx.y * TC_BN;
  op.set_rows(m0 + (threadIdx.x >> 2), (int)n0 + (threadIdx.x >> 2));
  float acc[4][4][4];
  tc_mainloop<KIND, true, VEC>(op, m0, n0, 0, op.Kred, acc);
  const i64 M = (i64)g.N * g.OD * g.OH * g.OW;
  const int kofs = op.grp * op.Kg;
  tc_epilogue(m0, n0, M, op.Kg, acc, [&](i64 m, i64 n, float v) {
    if (has_bias) v += tc_to_float<KIND>(bias[kofs + n]);
    y[m * g.K + kofs + n] = tc_from_float<KIND>(v);
  });
}

// ------------------------------------------------------------------------------------ input gradient
template <typename T>
struct TcGradInputOp {
  const T* gy; const T* w; ConvGeom g; int grp, Cg, Kg, Kred;
  bool rok[2]; int rn[2], rd[2], rh[2], rw[2];   // A rows: image, input position + padding (ints: registers)
  const T* wrow[2];
  __device__ __forceinline__ void set_rows(i64 m_first, int n_first) {
    const i64 M = (i64)g.N * g.D * g.H * g.W;
    const int plane = g.D * g.H * g.W;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const i64 m = m_first + 64 * i;
      rok[i] = m < M;
      const i64 n = rok[i] ? m / plane : 0;
      const int s = rok[i] ? (int)(m - n * plane) : 0;
      fc_unflatten3(s, g.H, g.W, rd[i], rh[i], rw[i]);
      rd[i] += g.pd; rh[i] += g.ph; rw[i] += g.pw;
      rn[i] = (int)n;
      const int col = n_first + 64 * i;
      wrow[i] = col < Cg ? w + (i64)(grp * Cg + col) * Kred : nullptr;
    }
  }
  __device__ __forceinline__ const T* a_base() const { return gy; }
  __device__ __forceinline__ const T* b_base() const { return w; }
  __device__ __forceinline__ const T* a_ptr(int i, i64 k) const {
    if (!rok[i] || k >= Kred) return nullptr;
    const int tap = (int)k / Kg, kk = (int)k - tap * Kg;
    int kd, kh, kw;
    tc_tap(tap, g, kd, kh, kw);
    const int td = rd[i] - kd * g.dd, th = rh[i] - kh * g.dh, tw = rw[i] - kw * g.dw;
    if (td < 0 || th < 0 || tw < 0 || td % g.sd || th % g.sh || tw % g.sw) return nullptr;
    const int od = td / g.sd, oh = th / g.sh, ow = tw / g.sw;
    if (od >= g.OD || oh >= g.OH || ow >= g.OW) return nullptr;
    return gy + ((((i64)rn[i] * g.OD + od) * g.OH + oh) * g.OW + ow) * g.K + grp * Kg + kk;
  }
  __device__ __forceinline__ const T* b_ptr(int i, i64 k) const {
    return wrow[i] && k < Kred ? wrow[i] + k : nullptr;
  }
  __device__ __forceinline__ const T* a_ptr_at(i64 m, i64 k) const {
    const int plane = g.D * g.H * g.W;
    if (m >= (i64)g.N * plane || k >= Kred) return nullptr;
    const i64 n = m / plane;
    int id, ih, iw, kd, kh, kw;
    fc_unflatten3((int)(m - n * plane), g.H, g.W, id, ih, iw);
    const int tap = (int)k / Kg, kk = (int)k - tap * Kg;
    tc_tap(tap, g, kd, kh, kw);
    const int td = id + g.pd - kd * g.dd, th = ih + g.ph - kh * g.dh, tw = iw + g.pw - kw * g.dw;
    if (td < 0 || th < 0 || tw < 0 || td % g.sd || th % g.sh || tw % g.sw) return nullptr;
    const int od = td / g.sd, oh = th / g.sh, ow = tw / g.sw;
    if (od >= g.OD || oh >= g.OH || ow >= g.OW) return nullptr;
    return gy + (((n * g.OD + od) * g.OH + oh) * g.OW + ow) * g.K + grp * Kg + kk;
  }
  __device__ __forceinline__ const T* b_ptr_at(i64 c, i64 k) const {
    return c < Cg && k < Kred ? w + (grp * Cg + c) * Kred + k : nullptr;
  }
};

// grid = (ceil(N*D*H*W / 128), ceil(C/groups / 128), groups)
template <int KIND, bool VEC>
__device__ __forceinline__ void tc_grad_input(const typename TcCfg<KIND>::T* __restrict__ gy,
                                              const typename TcCfg<KIND>::T* __restrict__ w,
                                              typename TcCfg<KIND>::T* __restrict__ gx, const ConvGeom g) {
  typedef typename TcCfg<KIND>::T T;
  FC_REQUIRE_BLOCK(TC_THREADS);
  TcGradInputOp<T> op;
  op.gy = gy; op.w = w; op.g = g; op.grp = blockIdx.z;
  op.Cg = g.C / g.groups; op.Kg = g.K / g.groups; op.Kred = op.Kg * g.KD * g.KH * g.KW;
  const i64 m0 = (i64)blockIdx.x * TC_BM, n0 = (i64)blockIdx.y * TC_BN;
  op.set_rows(m0 + (threadIdx.x >> 2), (int)n0 + (threadIdx.x >> 2));
  float acc[4][4][4];
  tc_mainloop<KIND, true, VEC>(op, m0, n0, 0, op.Kred, acc);
  const i64 M = (i64)g.N * g.D * g.H * g.W;
  const int cofs = op.grp * op.Cg;
  tc_epilogue(m0, n0, M, op.Cg, acc, [&](i64 m, i64 n, float v) { gx[m * g.C + cofs + n] = tc_from_float<KIND>(v); });
}

// ------------------------------------------------------------------------------------ weight gradient
template <typename T>
struct TcGradWeightOp {
  const T* gy; const T* x; ConvGeom g; int grp, Cg, Kg, cols; i64 kend;
  __device__ __forceinline__ const T* a_base() const { return gy; }
  __device__ __forceinline__ const T* b_base() const { return x; }
  __device__ __forceinline__ const T* a_ptr(i64 j, i64 m) const {
    return j < kend && m < Kg ? gy + j * g.K + grp * Kg + m : nullptr;
  }
  __device__ __forceinline__ const T* b_ptr(i64 j, i64 q) const {
    if (j >= kend || q >= cols) return nullptr;
    const int tap = (int)q / Cg, c = (int)q - tap * Cg;
    int kd, kh, kw;
    tc_tap(tap, g, kd, kh, kw);
    const int plane = g.OD * g.OH * g.OW;
    const i64 n = j / plane;
    int od, oh, ow;
    fc_unflatten3((int)(j - n * plane), g.OH, g.OW, od, oh, ow);
    const int id = od * g.sd - g.pd + kd * g.dd, ih = oh * g.sh - g.ph + kh * g.dh, iw = ow * g.sw - g.pw + kw * g.dw;
    if ((unsigned)id >= (unsigned)g.D || (unsigned)ih >= (unsigned)g.H || (unsigned)iw >= (unsigned)g.W) return nullptr;
    return x + (((n * g.D + id) * g.H + ih) * g.W + iw) * g.C + grp * Cg + c;
  }
};

// grid = (ceil(K/groups / 128), ceil(taps*C/groups / 128), groups * splits); split s of group grp
// reduces j in [s * chunk, min((s + 1) * chunk, N*OD*OH*OW)) (chunk a multiple of the K-step) into
// partial[s][grp*Kg + m][q] (float32, q = (tap, c)).
template <int KIND, bool VEC>
__device__ __forceinline__ void tc_grad_weight(const typename TcCfg<KIND>::T* __restrict__ gy,
                                               const typename TcCfg<KIND>::T* __restrict__ x,
                                               float* __restrict__ partial, int splits, i64 chunk, const ConvGeom g) {
  typedef typename TcCfg<KIND>::T T;
  FC_REQUIRE_BLOCK(TC_THREADS);
  TcGradWeightOp<T> op;
  op.gy = gy; op.x = x; op.g = g; op.grp = blockIdx.z / splits;
  op.Cg = g.C / g.groups; op.Kg = g.K / g.groups; op.cols = op.Cg * g.KD * g.KH * g.KW;
  const int split = blockIdx.z % splits;
  const i64 reduce = (i64)g.N * g.OD * g.OH * g.OW;
  const i64 kbeg = split * chunk;
  op.kend = kbeg + chunk < reduce ? kbeg + chunk : reduce;
  const i64 m0 = (i64)blockIdx.x * TC_BM, n0 = (i64)blockIdx.y * TC_BN;
  float acc[4][4][4];
  tc_mainloop<KIND, false, VEC>(op, m0, n0, kbeg, op.kend, acc);
  float* out = partial + ((i64)split * g.K + (i64)op.grp * op.Kg) * op.cols;
  tc_epilogue(m0, n0, op.Kg, op.cols, acc, [&](i64 m, i64 q, float v) { out[m * op.cols + q] = v; });
}

// gw[k][c][tap] = sum over s (in increasing order) of partial[s][k][tap][c], rounded once to T.
template <int KIND>
__device__ __forceinline__ void tc_wgrad_reduce(const float* __restrict__ partial, typename TcCfg<KIND>::T* __restrict__ gw,
                                                int splits, int K, int Cg, int taps) {
  const i64 per_k = (i64)Cg * taps, count = (i64)K * per_k;
  for (i64 i = fc_thread_start(); i < count; i += fc_thread_step()) {
    const i64 k = i / per_k;
    const int r = (int)(i - k * per_k), c = r / taps, tap = r - c * taps;
    const i64 src = k * per_k + (i64)tap * Cg + c;
    float s = partial[src];
    for (int sp = 1; sp < splits; ++sp) s += partial[(i64)sp * count + src];
    gw[i] = tc_from_float<KIND>(s);
  }
}

// --------------------------------------------------------------------------------- entry points
// f16 / bf16 tensors are passed as raw 16-bit words (unsigned short), float32 as float (TF32 math).
// Every kernel asks for 2 blocks per SM: ptxas keeps them at 128 registers or fewer without spilling
// (16 warps per SM, 2 x 60 KiB of shared memory; tests/test_cuda_compile.py checks sm_80 and sm_90,
// CMakeLists.txt every architecture).
typedef unsigned short u16;

extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_forward_f16(const u16* x, const u16* w, const u16* bias, u16* y, int has_bias, CONV_PARAMS) {
  tc_forward<TC_F16, false>(x, w, bias, y, has_bias, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_forward_f16_vec(const u16* x, const u16* w, const u16* bias, u16* y, int has_bias, CONV_PARAMS) {
  tc_forward<TC_F16, true>(x, w, bias, y, has_bias, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_forward_bf16(const u16* x, const u16* w, const u16* bias, u16* y, int has_bias, CONV_PARAMS) {
  tc_forward<TC_BF16, false>(x, w, bias, y, has_bias, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_forward_bf16_vec(const u16* x, const u16* w, const u16* bias, u16* y, int has_bias, CONV_PARAMS) {
  tc_forward<TC_BF16, true>(x, w, bias, y, has_bias, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_forward_tf32(const float* x, const float* w, const float* bias, float* y, int has_bias, CONV_PARAMS) {
  tc_forward<TC_TF32, false>(x, w, bias, y, has_bias, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_forward_tf32_vec(const float* x, const float* w, const float* bias, float* y, int has_bias, CONV_PARAMS) {
  tc_forward<TC_TF32, true>(x, w, bias, y, has_bias, CONV_GEOM);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_input_f16(const u16* gy, const u16* w, u16* gx, CONV_PARAMS) {
  tc_grad_input<TC_F16, false>(gy, w, gx, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_input_f16_vec(const u16* gy, const u16* w, u16* gx, CONV_PARAMS) {
  tc_grad_input<TC_F16, true>(gy, w, gx, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_input_bf16(const u16* gy, const u16* w, u16* gx, CONV_PARAMS) {
  tc_grad_input<TC_BF16, false>(gy, w, gx, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_input_bf16_vec(const u16* gy, const u16* w, u16* gx, CONV_PARAMS) {
  tc_grad_input<TC_BF16, true>(gy, w, gx, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_input_tf32(const float* gy, const float* w, float* gx, CONV_PARAMS) {
  tc_grad_input<TC_TF32, false>(gy, w, gx, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_input_tf32_vec(const float* gy, const float* w, float* gx, CONV_PARAMS) {
  tc_grad_input<TC_TF32, true>(gy, w, gx, CONV_GEOM);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_weight_f16(const u16* gy, const u16* x, float* partial, int splits, i64 chunk, CONV_PARAMS) {
  tc_grad_weight<TC_F16, false>(gy, x, partial, splits, chunk, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_weight_f16_vec(const u16* gy, const u16* x, float* partial, int splits, i64 chunk, CONV_PARAMS) {
  tc_grad_weight<TC_F16, true>(gy, x, partial, splits, chunk, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_weight_bf16(const u16* gy, const u16* x, float* partial, int splits, i64 chunk, CONV_PARAMS) {
  tc_grad_weight<TC_BF16, false>(gy, x, partial, splits, chunk, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_weight_bf16_vec(const u16* gy, const u16* x, float* partial, int splits, i64 chunk, CONV_PARAMS) {
  tc_grad_weight<TC_BF16, true>(gy, x, partial, splits, chunk, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_weight_tf32(const float* gy, const float* x, float* partial, int splits, i64 chunk, CONV_PARAMS) {
  tc_grad_weight<TC_TF32, false>(gy, x, partial, splits, chunk, CONV_GEOM);
}
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_grad_weight_tf32_vec(const float* gy, const float* x, float* partial, int splits, i64 chunk, CONV_PARAMS) {
  tc_grad_weight<TC_TF32, true>(gy, x, partial, splits, chunk, CONV_GEOM);
}

extern "C" __global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK))
tc_wgrad_reduce_f16(const float* partial, u16* gw, int splits, int K, int Cg, int taps) {
  tc_wgrad_reduce<TC_F16>(partial, gw, splits, K, Cg, taps);
}
extern "C" __global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK))
tc_wgrad_reduce_bf16(const float* partial, u16* gw, int splits, int K, int Cg, int taps) {
  tc_wgrad_reduce<TC_BF16>(partial, gw, splits, K, Cg, taps);
}
extern "C" __global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK))
tc_wgrad_reduce_tf32(const float* partial, float* gw, int splits, int K, int Cg, int taps) {
  tc_wgrad_reduce<TC_TF32>(partial, gw, splits, K, Cg, taps);
}
