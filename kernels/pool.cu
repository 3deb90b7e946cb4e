// pool.cu -- pooling kernels: max/min with indices, their scatter/gather companions, average,
// adaptive average and adaptive max, max_unpool, each forward and backward, on (N, C, D, H, W).
//
// Semantics are torch's CPU kernels exactly (see fastconv/cpu/pool.py): the window is visited in
// (d, h, w) order; max pooling takes `v > best || isnan(v)` from best = -inf with the first
// in-bounds element as the initial index, so ties keep the first element and the last NaN of a
// window wins; min pooling is -max_pool(-x) (values and indices); avg pooling uses torch's divisor
// rule and adds in torch's order; indices are int64 offsets into one input plane.
//
// Kernels: __global__ templates over the element type, instantiated at the end of the file.
// Launch: FC_PLANE_LOOP, grid plane_grid(N*C, plane) (fastconv/cuda/launch.py), 256 threads.
// Every backward pass is a gather (each input element sums the outputs that read it, in torch's
// order): deterministic and free of float atomics. max_unpool resolves duplicate indices with an
// integer atomicMax on the writer's position (later writers win, as in torch): deterministic.
// Invalid indices set *err and are skipped; the host turns *err into a device-side assert
// (torch._assert_async), never a host sync.
#include "common.cuh"

__device__ __forceinline__ int fc_first_valid(int start, int dil) {  // torch: while (s < 0) s += dil
  return start < 0 ? start + ((-start + dil - 1) / dil) * dil : start;
}
__device__ __forceinline__ int fc_adaptive_start(int i, int in, int out) { return (int)(((i64)i * in) / out); }
__device__ __forceinline__ int fc_adaptive_end(int i, int in, int out) {
  return (int)((((i64)i + 1) * in + out - 1) / out);
}

// ---------------------------------------------------------------------------------------------
// max / min pooling
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) max_pool_forward(const T* __restrict__ x, T* __restrict__ y, i64* __restrict__ ind,
                                                 int minimum, POOL_PARAMS) {
  const int in_plane = D * H * W, out_plane = OD * OH * OW;
  typedef fc_acc<T> A;  // compare in float for 16-bit inputs
  const A inf = fc_inf<A>();
  FC_PLANE_LOOP(P, out_plane, p, s) {
    int od, oh, ow;
    fc_unflatten3(s, OH, OW, od, oh, ow);
    const int ds = od * sd - pd, hs = oh * sh - ph, ws = ow * sw - pw;
    const int d0 = fc_first_valid(ds, dd), h0 = fc_first_valid(hs, dh), w0 = fc_first_valid(ws, dw);
    const int d1 = min(ds + (kd - 1) * dd + 1, D), h1 = min(hs + (kh - 1) * dh + 1, H);
    const int w1 = min(ws + (kw - 1) * dw + 1, W);
    const T* xp = x + (i64)p * in_plane;
    A best = minimum ? inf : -inf;
    int bi = (d0 < d1 && h0 < h1 && w0 < w1) ? (d0 * H + h0) * W + w0 : -1;  // -1: empty window
    for (int id = d0; id < d1; id += dd)
      for (int ih = h0; ih < h1; ih += dh)
        for (int iw = w0; iw < w1; iw += dw) {
          const int i = (id * H + ih) * W + iw;
          const A v = fc_load(xp[i]);
          if ((minimum ? v < best : v > best) || fc_isnan(v)) {
            best = v;
            bi = i;
          }
        }
    const i64 o = (i64)p * out_plane + s;
    y[o] = fc_store<T>(best);
    ind[o] = bi;
  }
}

// The backward of max pooling is a scatter-add gx[p][ind[p][o]] += gy[p][o]. Both forms below are
// gathers -- one thread per input element, adding the outputs that picked it in increasing output
// order (torch's CPU summation order) -- so they are parallel over every element, deterministic and
// free of float atomics, whatever the number of planes.
//
// max_pool_backward_window: the pooling window is known (max_pool): input i looks only at the
// outputs whose window can contain it (at most kd*kh*kw of them) and adds those whose stored index
// is i. No workspace, one launch.
template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) max_pool_backward_window(const T* __restrict__ gy, const i64* __restrict__ ind,
                                                         T* __restrict__ gx, int* __restrict__ err, POOL_PARAMS) {
  const int in_plane = D * H * W, out_plane = OD * OH * OW;
  FC_PLANE_LOOP(P, in_plane, p, s) {
    int id, ih, iw;
    fc_unflatten3(s, H, W, id, ih, iw);
    const T* g = gy + (i64)p * out_plane;
    const i64* idx = ind + (i64)p * out_plane;
    fc_acc<T> acc = 0;
    // Taps in decreasing order visit the outputs in increasing order: o = (i + pad - k * dil) / stride.
    for (int td = kd - 1; td >= 0; --td) {
      const int nd = id + pd - td * dd;
      if (nd < 0 || nd % sd) continue;
      const int od = nd / sd;
      if (od >= OD) continue;
      for (int th = kh - 1; th >= 0; --th) {
        const int nh = ih + ph - th * dh;
        if (nh < 0 || nh % sh) continue;
        const int oh = nh / sh;
        if (oh >= OH) continue;
        for (int tw = kw - 1; tw >= 0; --tw) {
          const int nw = iw + pw - tw * dw;
          if (nw < 0 || nw % sw) continue;
          const int ow = nw / sw;
          if (ow >= OW) continue;
          const int o = (od * OH + oh) * OW + ow;
          const i64 i = idx[o];
          if (i == s) acc += fc_load(g[o]);
          else if (i != -1 && (i < 0 || i >= in_plane)) *err = 1;
        }
      }
    }
    gx[(i64)p * in_plane + s] = fc_store<T>(acc);
  }
}

// max_pool_backward for any indices (adaptive max pooling, the gradient of max_unpool's gradient):
// 1. max_pool_backward_claims: for every output o, first[p][ind[o]] = min o, count[p][ind[o]] += 1
//    (integer atomics: the result does not depend on their order). first = INT_MAX, count = 0 on
//    entry.
// 2. max_pool_backward_gather: input i adds gy[o] for o = first, first + 1, ... with ind[o] == i
//    until count of them are found. With max pooling the outputs that pick one input lie within a
//    window's reach of each other, so the scan is short.
extern "C" __global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) max_pool_backward_claims(const i64* __restrict__ ind, int* __restrict__ first,
                                                         int* __restrict__ count, int* __restrict__ err, int P,
                                                         int in_plane, int out_plane) {
  FC_PLANE_LOOP(P, out_plane, p, s) {
    const i64 i = ind[(i64)p * out_plane + s];
    if (i == -1) continue;  // empty-window guard
    if (i < 0 || i >= in_plane) { *err = 1; continue; }
    atomicMin(first + (i64)p * in_plane + i, s);
    atomicAdd(count + (i64)p * in_plane + i, 1);
  }
}

template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) max_pool_backward_gather(const T* __restrict__ gy, const i64* __restrict__ ind,
                                                         const int* __restrict__ first,
                                                         const int* __restrict__ count, T* __restrict__ gx, int P,
                                                         int in_plane, int out_plane) {
  FC_PLANE_LOOP(P, in_plane, p, s) {
    const i64 e = (i64)p * in_plane + s;
    const int n = count[e];
    const T* g = gy + (i64)p * out_plane;
    const i64* idx = ind + (i64)p * out_plane;
    fc_acc<T> acc = 0;
    for (int o = first[e], found = 0; found < n && o < out_plane; ++o)
      if (idx[o] == s) {
        acc += fc_load(g[o]);
        ++found;
      }
    gx[e] = fc_store<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// max_unpool: owner[p][i] = 1 + the last input position of plane p whose index is i (int64
// atomicMax, deterministic); then y = x[owner - 1] or 0. owner must be zero.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) max_unpool_owner(const i64* __restrict__ ind, i64* __restrict__ owner,
                                                 int* __restrict__ err, int P, int in_plane, int out_plane) {
  FC_PLANE_LOOP(P, in_plane, p, s) {
    const i64 i = ind[(i64)p * in_plane + s];
    if (i < 0 || i >= out_plane) { *err = 1; continue; }
    atomicMax(owner + (i64)p * out_plane + i, (i64)s + 1);
  }
}

template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) max_unpool_gather(const T* __restrict__ x, const i64* __restrict__ owner,
                                                  T* __restrict__ y, int P, int in_plane, int out_plane) {
  FC_PLANE_LOOP(P, out_plane, p, s) {
    const i64 o = owner[(i64)p * out_plane + s];
    y[(i64)p * out_plane + s] = o ? x[(i64)p * in_plane + o - 1] : fc_store<T>(0);
  }
}

// Gradient of max_unpool (and the derivative of the max-pool scatter): gx[p][s] = gy[p][ind[p][s]].
template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) max_unpool_backward(const T* __restrict__ gy, const i64* __restrict__ ind,
                                                    T* __restrict__ gx, int* __restrict__ err, int P,
                                                    int in_plane, int out_plane) {
  FC_PLANE_LOOP(P, in_plane, p, s) {
    const i64 o = (i64)p * in_plane + s;
    const i64 i = ind[o];
    if (i < 0 || i >= out_plane) {
      *err = 1;
      gx[o] = fc_store<T>(0);
      continue;
    }
    gx[o] = gy[(i64)p * out_plane + i];
  }
}

// ---------------------------------------------------------------------------------------------
// average pooling (dilation 1; dd/dh/dw are ignored)
// ---------------------------------------------------------------------------------------------
struct AvgWindow {
  int start, end, pool;  // clipped start, clipped end, size within input + padding
};
__device__ __forceinline__ AvgWindow fc_avg_window(int o, int k, int s, int p, int size) {
  int start = o * s - p;
  int end = min(start + k, size + p);
  const int pool = end - start;
  start = max(start, 0);
  end = min(end, size);
  return AvgWindow{start, end, pool};
}
__device__ __forceinline__ int fc_avg_divisor(const AvgWindow& a, const AvgWindow& b, const AvgWindow& c,
                                              int count_include_pad, int divisor_override) {
  if (divisor_override) return divisor_override;
  if (count_include_pad) return a.pool * b.pool * c.pool;
  return (a.end - a.start) * (b.end - b.start) * (c.end - c.start);
}

template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) avg_pool_forward(const T* __restrict__ x, T* __restrict__ y, int count_include_pad,
                                                 int divisor_override, POOL_PARAMS) {
  const int in_plane = D * H * W, out_plane = OD * OH * OW;
  FC_PLANE_LOOP(P, out_plane, p, s) {
    int od, oh, ow;
    fc_unflatten3(s, OH, OW, od, oh, ow);
    const AvgWindow a = fc_avg_window(od, kd, sd, pd, D), b = fc_avg_window(oh, kh, sh, ph, H);
    const AvgWindow c = fc_avg_window(ow, kw, sw, pw, W);
    fc_acc<T> out = 0;
    if (a.start < a.end && b.start < b.end && c.start < c.end) {
      const T* xp = x + (i64)p * in_plane;
      fc_acc<T> acc = 0;
      for (int id = a.start; id < a.end; ++id)
        for (int ih = b.start; ih < b.end; ++ih)
          for (int iw = c.start; iw < c.end; ++iw) acc += fc_load(xp[(id * H + ih) * W + iw]);
      out = acc / (fc_acc<T>)fc_avg_divisor(a, b, c, count_include_pad, divisor_override);
    }
    y[(i64)p * out_plane + s] = fc_store<T>(out);
  }
}

// The adjoint as a gather: input element i sums gy[o] / divisor(o) over the outputs o whose window
// holds it, in (od, oh, ow) order (torch adds in that order too).
__device__ __forceinline__ void fc_avg_out_range(int i, int k, int s, int p, int out, int& lo, int& hi) {
  // o * s - p <= i < o * s - p + k
  const int t = i + p - k + 1;
  lo = t <= 0 ? 0 : (t + s - 1) / s;
  hi = min((i + p) / s + 1, out);  // i + p >= 0 always
}

template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) avg_pool_backward(const T* __restrict__ gy, T* __restrict__ gx, int count_include_pad,
                                                  int divisor_override, POOL_PARAMS) {
  const int in_plane = D * H * W, out_plane = OD * OH * OW;
  FC_PLANE_LOOP(P, in_plane, p, s) {
    int id, ih, iw;
    fc_unflatten3(s, H, W, id, ih, iw);
    int d_lo, d_hi, h_lo, h_hi, w_lo, w_hi;
    fc_avg_out_range(id, kd, sd, pd, OD, d_lo, d_hi);
    fc_avg_out_range(ih, kh, sh, ph, OH, h_lo, h_hi);
    fc_avg_out_range(iw, kw, sw, pw, OW, w_lo, w_hi);
    const T* g = gy + (i64)p * out_plane;
    fc_acc<T> acc = 0;
    for (int od = d_lo; od < d_hi; ++od) {
      const AvgWindow a = fc_avg_window(od, kd, sd, pd, D);
      for (int oh = h_lo; oh < h_hi; ++oh) {
        const AvgWindow b = fc_avg_window(oh, kh, sh, ph, H);
        for (int ow = w_lo; ow < w_hi; ++ow) {
          const AvgWindow c = fc_avg_window(ow, kw, sw, pw, W);
          acc += fc_load(g[(od * OH + oh) * OW + ow]) / (fc_acc<T>)fc_avg_divisor(a, b, c, count_include_pad, divisor_override);
        }
      }
    }
    gx[(i64)p * in_plane + s] = fc_store<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// adaptive pooling: window [floor(o * In / Out), ceil((o + 1) * In / Out))
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) adaptive_avg_pool_forward(const T* __restrict__ x, T* __restrict__ y, int P, int D,
                                                          int H, int W, int OD, int OH, int OW) {
  const int in_plane = D * H * W, out_plane = OD * OH * OW;
  FC_PLANE_LOOP(P, out_plane, p, s) {
    int od, oh, ow;
    fc_unflatten3(s, OH, OW, od, oh, ow);
    const int d0 = fc_adaptive_start(od, D, OD), d1 = fc_adaptive_end(od, D, OD);
    const int h0 = fc_adaptive_start(oh, H, OH), h1 = fc_adaptive_end(oh, H, OH);
    const int w0 = fc_adaptive_start(ow, W, OW), w1 = fc_adaptive_end(ow, W, OW);
    const T* xp = x + (i64)p * in_plane;
    fc_acc<T> acc = 0;
    for (int id = d0; id < d1; ++id)
      for (int ih = h0; ih < h1; ++ih)
        for (int iw = w0; iw < w1; ++iw) acc += fc_load(xp[(id * H + ih) * W + iw]);
    typedef fc_acc<T> A;
    y[(i64)p * out_plane + s] = fc_store<T>(acc / (A)(d1 - d0) / (A)(h1 - h0) / (A)(w1 - w0));
  }
}

// Outputs o whose adaptive window holds input i: [floor(i * Out / In), ceil((i + 1) * Out / In)).
__device__ __forceinline__ void fc_adaptive_out_range(int i, int in, int out, int& lo, int& hi) {
  lo = (int)(((i64)i * out) / in);
  hi = min((int)((((i64)i + 1) * out + in - 1) / in), out);
}

template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) adaptive_avg_pool_backward(const T* __restrict__ gy, T* __restrict__ gx, int P, int D,
                                                           int H, int W, int OD, int OH, int OW) {
  const int in_plane = D * H * W, out_plane = OD * OH * OW;
  FC_PLANE_LOOP(P, in_plane, p, s) {
    int id, ih, iw;
    fc_unflatten3(s, H, W, id, ih, iw);
    int d_lo, d_hi, h_lo, h_hi, w_lo, w_hi;
    fc_adaptive_out_range(id, D, OD, d_lo, d_hi);
    fc_adaptive_out_range(ih, H, OH, h_lo, h_hi);
    fc_adaptive_out_range(iw, W, OW, w_lo, w_hi);
    const T* g = gy + (i64)p * out_plane;
    fc_acc<T> acc = 0;
    for (int od = d_lo; od < d_hi; ++od) {
      const int nd = fc_adaptive_end(od, D, OD) - fc_adaptive_start(od, D, OD);
      if (id < fc_adaptive_start(od, D, OD) || id >= fc_adaptive_end(od, D, OD)) continue;
      for (int oh = h_lo; oh < h_hi; ++oh) {
        const int nh = fc_adaptive_end(oh, H, OH) - fc_adaptive_start(oh, H, OH);
        if (ih < fc_adaptive_start(oh, H, OH) || ih >= fc_adaptive_end(oh, H, OH)) continue;
        for (int ow = w_lo; ow < w_hi; ++ow) {
          const int nw = fc_adaptive_end(ow, W, OW) - fc_adaptive_start(ow, W, OW);
          if (iw < fc_adaptive_start(ow, W, OW) || iw >= fc_adaptive_end(ow, W, OW)) continue;
          acc += fc_load(g[(od * OH + oh) * OW + ow]) / (fc_acc<T>)nd / (fc_acc<T>)nh / (fc_acc<T>)nw;
        }
      }
    }
    gx[(i64)p * in_plane + s] = fc_store<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(FC_BOUNDS(FC_BLOCK)) adaptive_max_pool_forward(const T* __restrict__ x, T* __restrict__ y,
                                                          i64* __restrict__ ind, int P, int D, int H, int W, int OD,
                                                          int OH, int OW) {
  const int in_plane = D * H * W, out_plane = OD * OH * OW;
  FC_PLANE_LOOP(P, out_plane, p, s) {
    int od, oh, ow;
    fc_unflatten3(s, OH, OW, od, oh, ow);
    const int d0 = fc_adaptive_start(od, D, OD), d1 = fc_adaptive_end(od, D, OD);
    const int h0 = fc_adaptive_start(oh, H, OH), h1 = fc_adaptive_end(oh, H, OH);
    const int w0 = fc_adaptive_start(ow, W, OW), w1 = fc_adaptive_end(ow, W, OW);
    const T* xp = x + (i64)p * in_plane;
    fc_acc<T> best = -fc_inf<fc_acc<T>>();
    int bi = (d0 * H + h0) * W + w0;
    for (int id = d0; id < d1; ++id)
      for (int ih = h0; ih < h1; ++ih)
        for (int iw = w0; iw < w1; ++iw) {
          const int i = (id * H + ih) * W + iw;
          const fc_acc<T> v = fc_load(xp[i]);
          if (v > best || fc_isnan(v)) {
            best = v;
            bi = i;
          }
        }
    y[(i64)p * out_plane + s] = fc_store<T>(best);
    ind[(i64)p * out_plane + s] = bi;
  }
}

// ---------------------------------------------------------------------------------------------
// instantiations launched by name (fastconv/cuda/pool.py): float, double, and the 16-bit floats
// (read and written as 16 bits, computed in float)
// ---------------------------------------------------------------------------------------------
FC_INSTANTIATE(max_pool_forward<float>)
FC_INSTANTIATE(max_pool_forward<double>)
FC_INSTANTIATE(max_pool_forward<__half>)
FC_INSTANTIATE(max_pool_forward<__nv_bfloat16>)
FC_INSTANTIATE(max_pool_backward_window<float>)
FC_INSTANTIATE(max_pool_backward_window<double>)
FC_INSTANTIATE(max_pool_backward_window<__half>)
FC_INSTANTIATE(max_pool_backward_window<__nv_bfloat16>)
FC_INSTANTIATE(max_pool_backward_gather<float>)
FC_INSTANTIATE(max_pool_backward_gather<double>)
FC_INSTANTIATE(max_pool_backward_gather<__half>)
FC_INSTANTIATE(max_pool_backward_gather<__nv_bfloat16>)
FC_INSTANTIATE(max_unpool_gather<float>)
FC_INSTANTIATE(max_unpool_gather<double>)
FC_INSTANTIATE(max_unpool_gather<__half>)
FC_INSTANTIATE(max_unpool_gather<__nv_bfloat16>)
FC_INSTANTIATE(max_unpool_backward<float>)
FC_INSTANTIATE(max_unpool_backward<double>)
FC_INSTANTIATE(max_unpool_backward<__half>)
FC_INSTANTIATE(max_unpool_backward<__nv_bfloat16>)
FC_INSTANTIATE(avg_pool_forward<float>)
FC_INSTANTIATE(avg_pool_forward<double>)
FC_INSTANTIATE(avg_pool_forward<__half>)
FC_INSTANTIATE(avg_pool_forward<__nv_bfloat16>)
FC_INSTANTIATE(avg_pool_backward<float>)
FC_INSTANTIATE(avg_pool_backward<double>)
FC_INSTANTIATE(avg_pool_backward<__half>)
FC_INSTANTIATE(avg_pool_backward<__nv_bfloat16>)
FC_INSTANTIATE(adaptive_avg_pool_forward<float>)
FC_INSTANTIATE(adaptive_avg_pool_forward<double>)
FC_INSTANTIATE(adaptive_avg_pool_forward<__half>)
FC_INSTANTIATE(adaptive_avg_pool_forward<__nv_bfloat16>)
FC_INSTANTIATE(adaptive_avg_pool_backward<float>)
FC_INSTANTIATE(adaptive_avg_pool_backward<double>)
FC_INSTANTIATE(adaptive_avg_pool_backward<__half>)
FC_INSTANTIATE(adaptive_avg_pool_backward<__nv_bfloat16>)
FC_INSTANTIATE(adaptive_max_pool_forward<float>)
FC_INSTANTIATE(adaptive_max_pool_forward<double>)
FC_INSTANTIATE(adaptive_max_pool_forward<__half>)
FC_INSTANTIATE(adaptive_max_pool_forward<__nv_bfloat16>)
