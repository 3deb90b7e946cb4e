// conv.cu -- convolution forward, input gradient and weight gradient on 5-D tensors.
//
// Three algorithms (fastconv/cuda/conv.py registers them):
//
// cuda-direct     one thread per output element (forward), per input element (input gradient,
//                 a gather over the taps that reach it: no scatter, no atomics), one block per
//                 weight element (weight gradient: a fixed-order block reduction over N*OD*OH*OW,
//                 deterministic). The flat index has W fastest, so a warp reads and writes
//                 consecutive addresses along W.
// implicit-gemm   the convolution as a GEMM whose operand tiles are built from the tensors on the
//                 fly (no im2col buffer): 64x64 block tile, K-step 8, 256 threads each owning a
//                 4x4 register tile, double-buffered shared memory (the next K-step is loaded into
//                 registers while the current one is multiplied: one barrier per K-step).
//                   forward      M = N*OD*OH*OW, N = K/groups, K = C/groups*KD*KH*KW
//                   grad_input   the same GEMM over the transposed convolution:
//                                M = N*D*H*W, N = C/groups, K = K/groups*KD*KH*KW; a tap that does
//                                not land on a strided output position contributes a zero.
//                   grad_weight  M = K/groups, N = C/groups*KD*KH*KW, K = N*OD*OH*OW, the
//                                reduction split over S blocks (gridDim.z = groups*S), each
//                                writing its partial sum; conv_reduce_splits adds the S partials
//                                in a fixed order (deterministic, no float atomics).
// cuda-depthwise  groups == C (channel multiplier m = K/C): forward and input gradient specialised
//                 (no channel loop, the group arithmetic folded away), weight gradient as the
//                 direct block reduction (its reduction is already one channel wide).
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// cuda-direct and cuda-depthwise. Launch: grid (ceil(plane / 256), min(planes, 65535)), 256 threads
// (FC_PLANE_LOOP); the weight gradient: one 256-thread block per weight element.
// DEPTHWISE: groups == C and output channel k reads input channel k / m only (m = K / C).
// ---------------------------------------------------------------------------------------------
template <typename T, bool DEPTHWISE>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) conv_direct_forward(const T* __restrict__ x, const T* __restrict__ w,
                                                    const T* __restrict__ bias, T* __restrict__ y,
                                                    int has_bias, CONV_PARAMS) {
  const ConvGeom g = CONV_GEOM;
  const int Cg = DEPTHWISE ? 1 : g.C / g.groups;
  const int Kg = DEPTHWISE ? g.K / g.C : g.K / g.groups;  // output channels per input group
  const int taps = g.KD * g.KH * g.KW;
  const i64 in_plane = (i64)g.D * g.H * g.W;
  const int out_plane = g.OD * g.OH * g.OW;
  FC_PLANE_LOOP(g.N * g.K, out_plane, nk, s) {
    const int n = nk / g.K, k = nk % g.K;
    int od, oh, ow;
    fc_unflatten3(s, g.OH, g.OW, od, oh, ow);
    const int id0 = od * g.sd - g.pd, ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
    const T* xn = x + ((i64)n * g.C + (k / Kg) * Cg) * in_plane;
    const T* wk = w + (i64)k * Cg * taps;
    fc_acc<T> acc = 0;  // float for 16-bit inputs
    for (int c = 0; c < Cg; ++c) {
      const T* xc = xn + c * in_plane;
      const T* wc = wk + c * taps;
      for (int kd = 0; kd < g.KD; ++kd) {
        const int id = id0 + kd * g.dd;
        if (id < 0 || id >= g.D) continue;
        for (int kh = 0; kh < g.KH; ++kh) {
          const int ih = ih0 + kh * g.dh;
          if (ih < 0 || ih >= g.H) continue;
          const T* xrow = xc + ((i64)id * g.H + ih) * g.W;
          const T* wrow = wc + (kd * g.KH + kh) * g.KW;
          for (int kw = 0; kw < g.KW; ++kw) {
            const int iw = iw0 + kw * g.dw;
            if (iw >= 0 && iw < g.W) acc += fc_load(xrow[iw]) * fc_load(wrow[kw]);
          }
        }
      }
    }
    y[(i64)nk * out_plane + s] = fc_store<T>(has_bias ? acc + fc_load(bias[k]) : acc);
  }
}

// Input gradient as a gather: input element (n, c, id, ih, iw) sums over the output elements and
// taps that read it (no scatter, no atomics).
template <typename T, bool DEPTHWISE>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) conv_direct_grad_input(const T* __restrict__ gy, const T* __restrict__ w,
                                                       T* __restrict__ gx, CONV_PARAMS) {
  const ConvGeom g = CONV_GEOM;
  const int Cg = DEPTHWISE ? 1 : g.C / g.groups;
  const int Kg = DEPTHWISE ? g.K / g.C : g.K / g.groups;
  const int taps = g.KD * g.KH * g.KW;
  const i64 out_plane = (i64)g.OD * g.OH * g.OW;
  const int in_plane = g.D * g.H * g.W;
  FC_PLANE_LOOP(g.N * g.C, in_plane, nc, s) {
    const int n = nc / g.C, c = nc % g.C;
    int id, ih, iw;
    fc_unflatten3(s, g.H, g.W, id, ih, iw);
    const int grp = c / Cg, cc = c % Cg;
    fc_acc<T> acc = 0;
    for (int kk = 0; kk < Kg; ++kk) {
      const int k = grp * Kg + kk;
      const T* gk = gy + ((i64)n * g.K + k) * out_plane;
      const T* wk = w + ((i64)k * Cg + cc) * taps;
      for (int kd = 0; kd < g.KD; ++kd) {
        const int td = id + g.pd - kd * g.dd;
        if (td < 0 || td % g.sd) continue;
        const int od = td / g.sd;
        if (od >= g.OD) continue;
        for (int kh = 0; kh < g.KH; ++kh) {
          const int th = ih + g.ph - kh * g.dh;
          if (th < 0 || th % g.sh) continue;
          const int oh = th / g.sh;
          if (oh >= g.OH) continue;
          for (int kw = 0; kw < g.KW; ++kw) {
            const int tw = iw + g.pw - kw * g.dw;
            if (tw < 0 || tw % g.sw) continue;
            const int ow = tw / g.sw;
            if (ow >= g.OW) continue;
            acc += fc_load(gk[((i64)od * g.OH + oh) * g.OW + ow]) * fc_load(wk[(kd * g.KH + kh) * g.KW + kw]);
          }
        }
      }
    }
    gx[(i64)nc * in_plane + s] = fc_store<T>(acc);
  }
}

// Weight gradient: one block (FC_BLOCK threads) per weight element, reducing over N*OD*OH*OW with
// a fixed-order tree in shared memory: deterministic. grid = (min(weights, 2**31 - 1)).
template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) conv_direct_grad_weight(const T* __restrict__ gy, const T* __restrict__ x,
                                                        T* __restrict__ gw, CONV_PARAMS) {
  const ConvGeom g = CONV_GEOM;
  typedef fc_acc<T> A;             // float for 16-bit inputs
  __shared__ A partial[FC_BLOCK];  // the tree below needs exactly FC_BLOCK threads
  FC_REQUIRE_BLOCK(FC_BLOCK);
  const int Cg = g.C / g.groups, Kg = g.K / g.groups;
  const int taps = g.KD * g.KH * g.KW;
  const int n_weights = g.K * Cg * taps;
  const int out_plane = g.OD * g.OH * g.OW;
  const i64 in_plane = (i64)g.D * g.H * g.W;
  // 64-bit counter: widx + gridDim.x must not wrap when n_weights is close to 2**31.
  for (i64 widx_wide = blockIdx.x; widx_wide < n_weights; widx_wide += gridDim.x) {  // uniform per block
    const int widx = (int)widx_wide;
    const int t = widx % taps, kc = widx / taps;
    const int cc = kc % Cg, k = kc / Cg;
    int kd, kh, kw;
    fc_unflatten3(t, g.KH, g.KW, kd, kh, kw);
    const int c = (k / Kg) * Cg + cc;
    const int offd = kd * g.dd - g.pd, offh = kh * g.dh - g.ph, offw = kw * g.dw - g.pw;
    A acc = 0;
    for (int n = 0; n < g.N; ++n) {
      const T* gk = gy + ((i64)n * g.K + k) * out_plane;
      const T* xc = x + ((i64)n * g.C + c) * in_plane;
      for (i64 o_wide = threadIdx.x; o_wide < out_plane; o_wide += blockDim.x) {  // no wrap near 2**31
        const int o = (int)o_wide;
        int od, oh, ow;
        fc_unflatten3(o, g.OH, g.OW, od, oh, ow);
        const int id = od * g.sd + offd, ih = oh * g.sh + offh, iw = ow * g.sw + offw;
        if (id < 0 || id >= g.D || ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
        acc += fc_load(gk[o]) * fc_load(xc[((i64)id * g.H + ih) * g.W + iw]);
      }
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int h = FC_BLOCK / 2; h > 0; h >>= 1) {  // fixed tree: the same sum on every run
      if ((int)threadIdx.x < h) partial[threadIdx.x] += partial[threadIdx.x + h];
      __syncthreads();
    }
    if (threadIdx.x == 0) gw[widx] = fc_store<T>(partial[0]);
    __syncthreads();  // partial[0] is read before the next weight element overwrites it
  }
}

// ---------------------------------------------------------------------------------------------
// implicit-gemm
// ---------------------------------------------------------------------------------------------
#define IG_BM 64       // block tile rows (GEMM M)
#define IG_BN 64       // block tile columns (GEMM N)
#define IG_BK 8        // K-step
#define IG_THREADS 256 // 16 x 16 threads, each a 4 x 4 register tile
#define IG_TM 4
#define IG_TN 4
// The thread -> tile maps below are written for these numbers; change them together.
static_assert(IG_THREADS == 16 * 16, "compute map: thread (t % 16, t / 16)");
static_assert(IG_TM * 16 == IG_BM && IG_TN * 16 == IG_BN, "each thread owns IG_TM x IG_TN of the tile");
static_assert(IG_BM == IG_BN, "load map: thread t loads row t % IG_BM of A and column t % IG_BM of B");
static_assert(IG_THREADS / IG_BM * 2 == IG_BK && IG_THREADS % IG_BM == 0,
              "load map: lk = t / IG_BM plus 0 and IG_THREADS / IG_BM covers the K-step");

// The main loop, shared by the three passes. `Op` builds operand elements on the fly:
//   op.set_row(m) / op.set_col(n) once per thread (the rows/cols this thread loads),
//   op.a(k) -> A[m][k] and op.b(k) -> B[k][n] (zero outside the matrix or the padding).
// Loading: thread t loads A[m0 + t % 64][k0 + t / 64 + 4 j] and B[k0 + t / 64 + 4 j][n0 + t % 64]
// (j = 0, 1), so consecutive threads read consecutive rows (along W for the input tensor).
// Computing: thread (tx, ty) = (t % 16, t / 16) owns rows m0 + tx + 16 i and columns n0 + ty + 16 j.
// T is the accumulation type (fc_acc of the element type: the operands are converted on loading).
template <typename T, class Op>
__device__ __forceinline__ void igemm_mainloop(Op& op, i64 m0, int n0, i64 kbeg, i64 kend,
                                               T (&acc)[IG_TM][IG_TN]) {
  __shared__ T As[2][IG_BK][IG_BM];
  __shared__ T Bs[2][IG_BK][IG_BN];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int lrow = tid % IG_BM, lk = tid / IG_BM;  // lk < 4: 4 j below is IG_THREADS / IG_BM j
  FC_REQUIRE_BLOCK(IG_THREADS);
  op.set_row(m0 + lrow);
  op.set_col(n0 + lrow);
#pragma unroll
  for (int i = 0; i < IG_TM; ++i)
#pragma unroll
    for (int j = 0; j < IG_TN; ++j) acc[i][j] = T(0);
  if (kbeg >= kend) return;  // the same for the whole block: no thread is left at a barrier

  T ra[2], rb[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const i64 k = kbeg + lk + 4 * j;
    ra[j] = k < kend ? op.a(k) : T(0);
    rb[j] = k < kend ? op.b(k) : T(0);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    As[0][lk + 4 * j][lrow] = ra[j];
    Bs[0][lk + 4 * j][lrow] = rb[j];
  }
  __syncthreads();
  int buf = 0;
  for (i64 k0 = kbeg; k0 < kend; k0 += IG_BK) {
    const bool more = k0 + IG_BK < kend;
    if (more) {  // next K-step into registers while this one is multiplied
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const i64 k = k0 + IG_BK + lk + 4 * j;
        ra[j] = k < kend ? op.a(k) : T(0);
        rb[j] = k < kend ? op.b(k) : T(0);
      }
    }
#pragma unroll
    for (int kk = 0; kk < IG_BK; ++kk) {
      T a[IG_TM], b[IG_TN];
#pragma unroll
      for (int i = 0; i < IG_TM; ++i) a[i] = As[buf][kk][tx + 16 * i];
#pragma unroll
      for (int j = 0; j < IG_TN; ++j) b[j] = Bs[buf][kk][ty + 16 * j];
#pragma unroll
      for (int i = 0; i < IG_TM; ++i)
#pragma unroll
        for (int j = 0; j < IG_TN; ++j) acc[i][j] += a[i] * b[j];
    }
    if (more) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        As[buf ^ 1][lk + 4 * j][lrow] = ra[j];
        Bs[buf ^ 1][lk + 4 * j][lrow] = rb[j];
      }
    }
    __syncthreads();  // tile-loop barrier: the other buffer is full, this one free to overwrite
    buf ^= 1;
  }
}

// Forward: A[m][k] = x at output position m, reduction index k = (c, kd, kh, kw); B[k][n] = w[n][k].
template <typename T>
struct IgForwardOp {
  const T* x; const T* w; ConvGeom g; int grp, Cg, Kg, taps;
  // row state
  bool row_ok; const T* xb; int id0, ih0, iw0;
  // column state
  bool col_ok; const T* wb;
  __device__ __forceinline__ void set_row(i64 m) {
    const i64 M = (i64)g.N * g.OD * g.OH * g.OW;
    row_ok = m < M;
    i64 n; int unused, od, oh, ow;
    fc_unflatten(row_ok ? m : 0, 1, g.OD, g.OH, g.OW, n, unused, od, oh, ow);
    id0 = od * g.sd - g.pd; ih0 = oh * g.sh - g.ph; iw0 = ow * g.sw - g.pw;
    xb = x + (n * g.C + (i64)grp * Cg) * ((i64)g.D * g.H * g.W);
  }
  __device__ __forceinline__ void set_col(int n) {
    col_ok = n < Kg;
    wb = w + (i64)(grp * Kg + (col_ok ? n : 0)) * Cg * taps;
  }
  __device__ __forceinline__ fc_acc<T> a(i64 k) const {
    if (!row_ok) return 0;
    const int c = (int)(k / taps), t = (int)(k % taps);
    const int kw = t % g.KW, kh = (t / g.KW) % g.KH, kd = t / (g.KW * g.KH);
    const int id = id0 + kd * g.dd, ih = ih0 + kh * g.dh, iw = iw0 + kw * g.dw;
    if (id < 0 || id >= g.D || ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return 0;
    return fc_load(xb[(i64)c * g.D * g.H * g.W + ((i64)id * g.H + ih) * g.W + iw]);
  }
  __device__ __forceinline__ fc_acc<T> b(i64 k) const { return col_ok ? fc_load(wb[k]) : fc_acc<T>(0); }
};

// Input gradient: A[m][k] = gy at the output position that input position m feeds through tap
// t (k = (kk, t), kk the output channel within the group), or 0; B[k][n] = w[kk][n][t].
template <typename T>
struct IgGradInputOp {
  const T* gy; const T* w; ConvGeom g; int grp, Cg, Kg, taps;
  bool row_ok; const T* gb; int id, ih, iw;
  bool col_ok; int c;
  __device__ __forceinline__ void set_row(i64 m) {
    const i64 M = (i64)g.N * g.D * g.H * g.W;
    row_ok = m < M;
    i64 n; int unused;
    fc_unflatten(row_ok ? m : 0, 1, g.D, g.H, g.W, n, unused, id, ih, iw);
    gb = gy + (n * g.K + (i64)grp * Kg) * ((i64)g.OD * g.OH * g.OW);
  }
  __device__ __forceinline__ void set_col(int n) { col_ok = n < Cg; c = col_ok ? n : 0; }
  __device__ __forceinline__ fc_acc<T> a(i64 k) const {
    if (!row_ok) return 0;
    const int kk = (int)(k / taps), t = (int)(k % taps);
    const int kw = t % g.KW, kh = (t / g.KW) % g.KH, kd = t / (g.KW * g.KH);
    const int td = id + g.pd - kd * g.dd, th = ih + g.ph - kh * g.dh, tw = iw + g.pw - kw * g.dw;
    if (td < 0 || th < 0 || tw < 0 || td % g.sd || th % g.sh || tw % g.sw) return 0;
    const int od = td / g.sd, oh = th / g.sh, ow = tw / g.sw;
    if (od >= g.OD || oh >= g.OH || ow >= g.OW) return 0;
    return fc_load(gb[(i64)kk * g.OD * g.OH * g.OW + ((i64)od * g.OH + oh) * g.OW + ow]);
  }
  __device__ __forceinline__ fc_acc<T> b(i64 k) const {
    if (!col_ok) return 0;
    const int kk = (int)(k / taps), t = (int)(k % taps);
    return fc_load(w[(((i64)grp * Kg + kk) * Cg + c) * taps + t]);
  }
};

// Weight gradient: A[m][j] = gy[n][k = m][o] with j = (n, o); B[j][q] = x at the input position
// output position o reads through tap t, channel c (q = (c, t)).
template <typename T>
struct IgGradWeightOp {
  const T* gy; const T* x; ConvGeom g; int grp, Cg, Kg, taps;
  bool row_ok; const T* gb;
  bool col_ok; const T* xb; int offd, offh, offw;
  __device__ __forceinline__ void set_row(i64 m) {
    row_ok = m < Kg;
    gb = gy + ((i64)grp * Kg + (row_ok ? m : 0)) * ((i64)g.OD * g.OH * g.OW);
  }
  __device__ __forceinline__ void set_col(int q) {
    col_ok = q < Cg * taps;
    const int qq = col_ok ? q : 0;
    const int c = qq / taps, t = qq % taps;
    const int kw = t % g.KW, kh = (t / g.KW) % g.KH, kd = t / (g.KW * g.KH);
    offd = kd * g.dd - g.pd; offh = kh * g.dh - g.ph; offw = kw * g.dw - g.pw;
    xb = x + ((i64)grp * Cg + c) * ((i64)g.D * g.H * g.W);
  }
  __device__ __forceinline__ fc_acc<T> a(i64 j) const {
    if (!row_ok) return 0;
    const int out_plane = g.OD * g.OH * g.OW;
    const i64 n = j / out_plane;
    return fc_load(gb[n * g.K * out_plane + (int)(j - n * out_plane)]);
  }
  __device__ __forceinline__ fc_acc<T> b(i64 j) const {
    if (!col_ok) return 0;
    i64 n; int unused, od, oh, ow;
    fc_unflatten(j, 1, g.OD, g.OH, g.OW, n, unused, od, oh, ow);
    const int id = od * g.sd + offd, ih = oh * g.sh + offh, iw = ow * g.sw + offw;
    if (id < 0 || id >= g.D || ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return 0;
    return fc_load(xb[n * g.C * ((i64)g.D * g.H * g.W) + ((i64)id * g.H + ih) * g.W + iw]);
  }
};

// grid = (ceil(M / 64), ceil(K/groups / 64), groups)
template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(IG_THREADS)) igemm_forward(const T* __restrict__ x, const T* __restrict__ w,
                                              const T* __restrict__ bias, T* __restrict__ y, int has_bias,
                                              CONV_PARAMS) {
  const ConvGeom g = CONV_GEOM;
  IgForwardOp<T> op;
  op.x = x; op.w = w; op.g = g; op.grp = blockIdx.z;
  op.Cg = g.C / g.groups; op.Kg = g.K / g.groups; op.taps = g.KD * g.KH * g.KW;
  const i64 m0 = (i64)blockIdx.x * IG_BM;
  const int n0 = blockIdx.y * IG_BN;
  fc_acc<T> acc[IG_TM][IG_TN];
  igemm_mainloop<fc_acc<T>>(op, m0, n0, 0, (i64)op.Cg * op.taps, acc);
  const i64 out_plane = (i64)g.OD * g.OH * g.OW;
  const i64 M = (i64)g.N * out_plane;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < IG_TM; ++i) {
    const i64 m = m0 + tx + 16 * i;
    if (m >= M) continue;
    const i64 n = m / out_plane, o = m % out_plane;
#pragma unroll
    for (int j = 0; j < IG_TN; ++j) {
      const int col = n0 + ty + 16 * j;
      if (col >= op.Kg) continue;
      const int k = op.grp * op.Kg + col;
      y[(n * g.K + k) * out_plane + o] = fc_store<T>(has_bias ? acc[i][j] + fc_load(bias[k]) : acc[i][j]);
    }
  }
}

// grid = (ceil(N*D*H*W / 64), ceil(C/groups / 64), groups)
template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(IG_THREADS)) igemm_grad_input(const T* __restrict__ gy, const T* __restrict__ w,
                                                 T* __restrict__ gx, CONV_PARAMS) {
  const ConvGeom g = CONV_GEOM;
  IgGradInputOp<T> op;
  op.gy = gy; op.w = w; op.g = g; op.grp = blockIdx.z;
  op.Cg = g.C / g.groups; op.Kg = g.K / g.groups; op.taps = g.KD * g.KH * g.KW;
  const i64 m0 = (i64)blockIdx.x * IG_BM;
  const int n0 = blockIdx.y * IG_BN;
  fc_acc<T> acc[IG_TM][IG_TN];
  igemm_mainloop<fc_acc<T>>(op, m0, n0, 0, (i64)op.Kg * op.taps, acc);
  const i64 in_plane = (i64)g.D * g.H * g.W;
  const i64 M = (i64)g.N * in_plane;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < IG_TM; ++i) {
    const i64 m = m0 + tx + 16 * i;
    if (m >= M) continue;
    const i64 n = m / in_plane, s = m % in_plane;
#pragma unroll
    for (int j = 0; j < IG_TN; ++j) {
      const int col = n0 + ty + 16 * j;
      if (col >= op.Cg) continue;
      gx[(n * g.C + (i64)op.grp * op.Cg + col) * in_plane + s] = fc_store<T>(acc[i][j]);
    }
  }
}

// grid = (ceil(K/groups / 64), ceil(C/groups*taps / 64), groups * splits); split s of group grp
// reduces j in [s * chunk, min((s + 1) * chunk, N*OD*OH*OW)) and writes
// partial[s][grp*Kg + m][q] (partial has splits * K * C/groups * taps elements; with one split it
// is the weight gradient itself).
template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(IG_THREADS)) igemm_grad_weight(const T* __restrict__ gy, const T* __restrict__ x,
                                                  fc_acc<T>* __restrict__ partial, int splits, i64 chunk,
                                                  CONV_PARAMS) {
  const ConvGeom g = CONV_GEOM;
  IgGradWeightOp<T> op;
  op.gy = gy; op.x = x; op.g = g; op.grp = blockIdx.z / splits;
  op.Cg = g.C / g.groups; op.Kg = g.K / g.groups; op.taps = g.KD * g.KH * g.KW;
  const int split = blockIdx.z % splits;
  const i64 reduce = (i64)g.N * g.OD * g.OH * g.OW;
  const i64 kbeg = split * chunk;
  const i64 kend = kbeg + chunk < reduce ? kbeg + chunk : reduce;
  const i64 m0 = (i64)blockIdx.x * IG_BM;
  const int n0 = blockIdx.y * IG_BN;
  fc_acc<T> acc[IG_TM][IG_TN];
  igemm_mainloop<fc_acc<T>>(op, m0, n0, kbeg, kend, acc);
  const int cols = op.Cg * op.taps;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  fc_acc<T>* out = partial + (i64)split * g.K * cols;
#pragma unroll
  for (int i = 0; i < IG_TM; ++i) {
    const i64 m = m0 + tx + 16 * i;
    if (m >= op.Kg) continue;
#pragma unroll
    for (int j = 0; j < IG_TN; ++j) {
      const int q = n0 + ty + 16 * j;
      if (q >= cols) continue;
      out[((i64)op.grp * op.Kg + m) * cols + q] = acc[i][j];
    }
  }
}

// gw[i] = sum over s of partial[s][i], s in increasing order (deterministic second pass).
template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) conv_reduce_splits(const fc_acc<T>* __restrict__ partial, T* __restrict__ gw,
                                                   int splits, i64 count) {
  for (i64 i = fc_thread_start(); i < count; i += fc_thread_step()) {
    fc_acc<T> s = partial[i];
    for (int k = 1; k < splits; ++k) s += partial[(i64)k * count + i];
    gw[i] = fc_store<T>(s);
  }
}

// ---------------------------------------------------------------------------------------------
// instantiations launched by name (fastconv/cuda/conv.py); cuda-depthwise is conv_direct_*<T, true>.
// The 16-bit floats are read and written as 16 bits and accumulated in float; the implicit GEMM's
// weight gradient then always writes float partial sums (partial is fc_acc<T>) reduced by
// conv_reduce_splits, so the gradient is rounded once.
// ---------------------------------------------------------------------------------------------
FC_INSTANTIATE(conv_direct_forward<float, false>)
FC_INSTANTIATE(conv_direct_grad_input<float, false>)
FC_INSTANTIATE(conv_direct_forward<float, true>)
FC_INSTANTIATE(conv_direct_grad_input<float, true>)
FC_INSTANTIATE(conv_direct_grad_weight<float>)
FC_INSTANTIATE(igemm_forward<float>)
FC_INSTANTIATE(igemm_grad_input<float>)
FC_INSTANTIATE(igemm_grad_weight<float>)
FC_INSTANTIATE(conv_reduce_splits<float>)
FC_INSTANTIATE(conv_direct_forward<double, false>)
FC_INSTANTIATE(conv_direct_grad_input<double, false>)
FC_INSTANTIATE(conv_direct_forward<double, true>)
FC_INSTANTIATE(conv_direct_grad_input<double, true>)
FC_INSTANTIATE(conv_direct_grad_weight<double>)
FC_INSTANTIATE(igemm_forward<double>)
FC_INSTANTIATE(igemm_grad_input<double>)
FC_INSTANTIATE(igemm_grad_weight<double>)
FC_INSTANTIATE(conv_reduce_splits<double>)
FC_INSTANTIATE(conv_direct_forward<__half, false>)
FC_INSTANTIATE(conv_direct_grad_input<__half, false>)
FC_INSTANTIATE(conv_direct_forward<__half, true>)
FC_INSTANTIATE(conv_direct_grad_input<__half, true>)
FC_INSTANTIATE(conv_direct_grad_weight<__half>)
FC_INSTANTIATE(igemm_forward<__half>)
FC_INSTANTIATE(igemm_grad_input<__half>)
FC_INSTANTIATE(igemm_grad_weight<__half>)
FC_INSTANTIATE(conv_reduce_splits<__half>)
FC_INSTANTIATE(conv_direct_forward<__nv_bfloat16, false>)
FC_INSTANTIATE(conv_direct_grad_input<__nv_bfloat16, false>)
FC_INSTANTIATE(conv_direct_forward<__nv_bfloat16, true>)
FC_INSTANTIATE(conv_direct_grad_input<__nv_bfloat16, true>)
FC_INSTANTIATE(conv_direct_grad_weight<__nv_bfloat16>)
FC_INSTANTIATE(igemm_forward<__nv_bfloat16>)
FC_INSTANTIATE(igemm_grad_input<__nv_bfloat16>)
FC_INSTANTIATE(igemm_grad_weight<__nv_bfloat16>)
FC_INSTANTIATE(conv_reduce_splits<__nv_bfloat16>)
