// CPU kernels of the flow ODE step (docs/spec.md §3): fused guidance + Euler update, Heun update.
//
// none / cfg / Heun: one pass, OpenMP over (sample, chunk) blocks. APG: OpenMP over groups;
// each thread reduces its group (|d|^2, <d, v_cond>, |v_cond|^2 with d the momentum-updated
// diff) and then runs the update over the same group while it is still in its cache, so
// memory is streamed once. Inner loops are branch-free over contiguous float data so the
// compiler vectorises them (float lane sums folded into double per block of kBlock).
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/csrc/autograd/python_variable.h>

#include "vft/alloc.h"
#include "vft/bind.h"
#include "vft/flow_math.h"
#include "vft/isa.h"

namespace vft {
namespace VFT_ISA_NS {  // one copy per ISA variant (vft/isa.h)
namespace flow_cpu {
namespace {

constexpr int64_t kBlock = 2048;
constexpr int kLanes = 16;  // accumulators of the APG reductions  // elements per vectorised block / per OpenMP work item
// Below this many elements a call runs on one thread: waking the OpenMP team costs more than
// the work (and on a busy machine a late thread stalls the whole step).
constexpr int64_t kParallelMin = 1 << 16;

struct Params {
  float scale, eta, threshold, momentum;
};

template <typename T>
inline float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// out[lo, hi) entries whose time index (dim 2) is < P are replaced by the prefix frames.
template <typename T>
void write_prefix(T* out, const T* prefix, int64_t lo, int64_t hi, flow::Prefix g) {
  for (int64_t pos = lo; pos < hi;) {
    const int64_t row = pos / g.inner;  // index over [B, C, T]
    const int64_t end = std::min(hi, (row + 1) * g.inner);
    if (row % g.T < g.P) {
      const T* src = prefix + flow::prefix_index(pos, row, g);
      std::copy(src, src + (end - pos), out + pos);
    }
    pos = end;
  }
}

template <typename T, flow::Mode kMode>
void elementwise(T* out, const T* x, const T* a, const T* b, const float* t, const float* tn, int64_t B,
                 int64_t S, float scale, const T* prefix, flow::Prefix geo) {
  const int64_t per_sample = (S + kBlock - 1) / kBlock;
  at::parallel_for(0, B * per_sample, std::max<int64_t>(1, kParallelMin / kBlock), [&](int64_t job_begin, int64_t job_end) {
    // A local copy: read through the lambda's capture, the scale was reloaded (broadcast from
    // memory) every iteration, as the stores to out might change it: an extra load per 8
    // elements at avx2 (avx-512 folds it into the multiply), ~4% of a 1-thread cfg step.
    const float sc = scale;
    for (int64_t job = job_begin; job < job_end; ++job) {
      const int64_t s = job / per_sample;
      const int64_t lo = s * S + (job % per_sample) * kBlock, hi = std::min(lo + kBlock, (s + 1) * S);
      const float dt = tn[s] - t[s];
#pragma GCC ivdep
      for (int64_t i = lo; i < hi; ++i) {
        float v;
        if constexpr (kMode == flow::kNone) {
          v = ld(a, i);
        } else if constexpr (kMode == flow::kCfg) {
          v = flow::cfg_velocity(ld(a, i), ld(b, i), sc);
        } else {
          v = flow::heun_velocity(ld(a, i), ld(b, i));
        }
        out[i] = static_cast<T>(flow::euler(ld(x, i), dt, v));
      }
      if (prefix != nullptr) write_prefix(out, prefix, lo, hi, geo);
    }
  });
}

template <typename T, typename M, bool kMom>
void apg(T* out, const T* x, const T* vc, const T* vu, M* state, const float* t, const float* tn, int64_t G,
         int64_t L, int64_t groups_per_sample, Params p, const T* prefix, flow::Prefix geo) {
  at::parallel_for(0, G, std::max<int64_t>(1, kParallelMin / std::max<int64_t>(L, 1)), [&](int64_t g_begin, int64_t g_end) {
    // Local copies of the pointers and parameters: read through the lambda's captures, they
    // made GCC vectorise the reduction with gathers (6-10x slower than contiguous loads).
    const T* cp = vc;
    const T* up = vu;
    const M* sp = state;
    const float mom = p.momentum;
    for (int64_t g = g_begin; g < g_end; ++g) {
      const int64_t base = g * L;
      double dd = 0, dv = 0, vv = 0;
      for (int64_t lo = base; lo < base + L; lo += kBlock) {
        const int64_t n = std::min(kBlock, base + L - lo);
        const T* __restrict c_ = cp + lo;
        const T* __restrict u_ = up + lo;
        const M* __restrict s_ = kMom ? sp + lo : nullptr;
        // Lane-wise partial sums (kLanes independent accumulators the compiler keeps in
        // vector registers), folded into double per block.
        float sdd[kLanes] = {}, sdv[kLanes] = {}, svv[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= n; i += kLanes) {
          for (int j = 0; j < kLanes; ++j) {
            const float c = ld(c_, i + j);
            const float d = kMom ? flow::apg_diff(c, ld(u_, i + j), mom, ld(s_, i + j)) : flow::apg_diff(c, ld(u_, i + j));
            sdd[j] += d * d;
            sdv[j] += d * c;
            svv[j] += c * c;
          }
        }
        for (; i < n; ++i) {
          const float c = ld(c_, i);
          const float d = kMom ? flow::apg_diff(c, ld(u_, i), mom, ld(s_, i)) : flow::apg_diff(c, ld(u_, i));
          sdd[0] += d * d;
          sdv[0] += d * c;
          svv[0] += c * c;
        }
        for (int j = 0; j < kLanes; ++j) {
          dd += sdd[j];
          dv += sdv[j];
          vv += svv[j];
        }
      }
      const flow::ApgCoeffs k = flow::apg_coeffs(static_cast<float>(dd), static_cast<float>(dv),
                                                 static_cast<float>(vv), p.scale, p.eta, p.threshold);
      const int64_t s = g / groups_per_sample;
      const float dt = tn[s] - t[s];
      T* o_ = out;  // out may alias x (an in-place step): reads of x[i] precede writes of out[i]
      const T* x_ = x;
      M* st = state;
#pragma GCC ivdep
      for (int64_t i = base; i < base + L; ++i) {
        const float c = ld(cp, i);
        float d;
        if constexpr (kMom) {
          d = flow::apg_diff(c, ld(up, i), mom, ld(st, i));
          st[i] = static_cast<M>(d);
        } else {
          d = flow::apg_diff(c, ld(up, i));
        }
        o_[i] = static_cast<T>(flow::euler(ld(x_, i), dt, flow::apg_velocity(c, d, k)));
      }
      if (prefix != nullptr) write_prefix(out, prefix, base, base + L, geo);
    }
  });
}

template <typename T>
const T* ptr_or_null(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
void run_apg(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& vc, const torch::Tensor& vu,
             const c10::optional<torch::Tensor>& momentum, const float* t, const float* tn, int64_t G, int64_t L,
             int64_t gps, Params p, const T* prefix, flow::Prefix geo) {
  if (!momentum.has_value()) {
    apg<T, float, false>(out.data_ptr<T>(), x.data_ptr<T>(), vc.data_ptr<T>(), vu.data_ptr<T>(), nullptr, t, tn, G,
                         L, gps, p, prefix, geo);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, momentum->scalar_type(), "flow_apg_momentum", [&] {
    apg<T, scalar_t, true>(out.data_ptr<T>(), x.data_ptr<T>(), vc.data_ptr<T>(), vu.data_ptr<T>(),
                           momentum->data_ptr<scalar_t>(), t, tn, G, L, gps, p, prefix, geo);
  });
}

[[maybe_unused]] void check_like(const char* name, const torch::Tensor& t, const torch::Tensor& x) {
  VFT_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  VFT_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
            t.scalar_type());
  VFT_CHECK_SAME_DEVICE(t, x, name);
  VFT_CHECK_CONTIGUOUS(t, name);
}

[[maybe_unused]] void check_times(const torch::Tensor& t, const torch::Tensor& x) {
  VFT_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == x.size(0) && t.is_contiguous() &&
                t.device() == x.device(),
            "t and t_next must be contiguous float32 tensors [B] = [", x.size(0), "] on x's device, got ",
            t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

}  // namespace

namespace {

// Sizes of a validated call: B samples, G groups of L (APG: all but the last reduce_ndim
// dims form the groups), and the prefix geometry.
flow::Geometry geometry(const torch::Tensor& x, int64_t reduce_ndim, int64_t prefix_len) {
  flow::Geometry geo;
  geo.B = x.size(0);
  geo.numel = x.numel();
  geo.L = 1;
  for (int64_t d = std::max<int64_t>(x.dim() - reduce_ndim, 1); d < x.dim(); ++d) geo.L *= x.size(d);
  geo.G = geo.L > 0 ? geo.numel / geo.L : 0;
  geo.prefix = {1, 0, 1};
  if (prefix_len > 0) {
    int64_t inner = 1;
    for (int64_t d = 3; d < x.dim(); ++d) inner *= x.size(d);
    geo.prefix = {x.size(2), prefix_len, inner};
  }
  return geo;
}

}  // namespace

}  // namespace flow_cpu
}  // namespace VFT_ISA_NS

#if VFT_ISA_PRIMARY
// The checks shared with the CUDA kernels (declared in flow_math.h), compiled once.
namespace flow_base = isa_baseline::flow_cpu;

flow::Mode flow_mode(const std::string& guidance) {
  if (guidance == "none") return flow::kNone;
  if (guidance == "cfg") return flow::kCfg;
  VFT_CHECK(guidance == "apg", "guidance must be 'none', 'cfg' or 'apg', got '", guidance, "'");
  return flow::kApg;
}

flow::Geometry flow_check(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& v_cond,
                        const c10::optional<torch::Tensor>& v_uncond, const torch::Tensor& t,
                        const torch::Tensor& t_next, flow::Mode mode, const c10::optional<torch::Tensor>& momentum,
                        int64_t reduce_ndim, const c10::optional<torch::Tensor>& prefix, int64_t prefix_len) {
  VFT_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
            "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  VFT_CHECK(x.is_contiguous(), "x must be contiguous");
  VFT_CHECK(x.dim() >= 1, "x must be [B, ...], got a 0-dim tensor");
  VFT_CHECK(mode != flow::kApg || (reduce_ndim >= 1 && x.dim() >= reduce_ndim + 1),
            "x must have at least reduce_ndim + 1 = ", reduce_ndim + 1, " dims, got ", x.dim());
  flow_base::check_like("out", out, x);
  flow_base::check_like("v_cond", v_cond, x);
  if (mode != flow::kNone) {
    VFT_CHECK(v_uncond.has_value(), "guidance needs v_uncond (or v2 for Heun)");
    flow_base::check_like("v_uncond", *v_uncond, x);
  }
  flow_base::check_times(t, x);
  flow_base::check_times(t_next, x);
  if (momentum.has_value()) {
    VFT_CHECK(mode == flow::kApg, "a momentum state is only used by guidance 'apg'");
    const auto mt = momentum->scalar_type();
    VFT_CHECK(momentum->sizes() == x.sizes() && momentum->is_contiguous() && momentum->device() == x.device() &&
                  (mt == at::kFloat || mt == at::kHalf || mt == at::kBFloat16),
              "momentum must be a contiguous float32/float16/bfloat16 tensor of x's shape ", x.sizes(), ", got ", mt,
              " ", momentum->sizes());
  }
  if (prefix_len > 0) {
    VFT_CHECK(x.dim() >= 3 && prefix_len <= x.size(2), "prefix_len ", prefix_len, " must be <= x.shape[2]");
    VFT_CHECK(prefix.has_value(), "prefix_len > 0 needs a prefix tensor");
    auto want = x.sizes().vec();
    want[2] = prefix_len;
    VFT_CHECK(prefix->sizes() == c10::IntArrayRef(want) && prefix->scalar_type() == x.scalar_type() &&
                  prefix->is_contiguous() && prefix->device() == x.device(),
              "prefix must be a contiguous ", x.scalar_type(), " tensor of shape ", c10::IntArrayRef(want), ", got ",
              prefix->scalar_type(), " ", prefix->sizes());
  }
  return flow_base::geometry(x, reduce_ndim, prefix_len);
}

#endif  // VFT_ISA_PRIMARY

namespace VFT_ISA_NS {
namespace flow_cpu {


namespace {

// The kernels of one validated CPU call; tp / tnp point at B float32 times each.
void run_step(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& v_cond,
              const c10::optional<torch::Tensor>& v_uncond, const float* tp, const float* tnp, flow::Mode mode,
              const Params& p, const c10::optional<torch::Tensor>& momentum, const flow::Geometry& geo,
              const c10::optional<torch::Tensor>& prefix) {
  if (geo.numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_step_cpu", [&] {
    const scalar_t* pre = ptr_or_null<scalar_t>(prefix);
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* a = v_cond.data_ptr<scalar_t>();
    const int64_t S = geo.numel / geo.B;
    if (mode == flow::kNone) {
      elementwise<scalar_t, flow::kNone>(o, xp, a, nullptr, tp, tnp, geo.B, S, p.scale, pre, geo.prefix);
    } else if (mode == flow::kCfg) {
      elementwise<scalar_t, flow::kCfg>(o, xp, a, v_uncond->data_ptr<scalar_t>(), tp, tnp, geo.B, S, p.scale, pre,
                                        geo.prefix);
    } else {
      run_apg<scalar_t>(out, x, v_cond, *v_uncond, momentum, tp, tnp, geo.G, geo.L, geo.G / geo.B, p, pre,
                        geo.prefix);
    }
  });
}

Params params(double scale, double apg_eta, double apg_norm_threshold, double apg_momentum) {
  return {static_cast<float>(scale), static_cast<float>(apg_eta), static_cast<float>(apg_norm_threshold),
          static_cast<float>(apg_momentum)};
}

}  // namespace

}  // namespace flow_cpu
}  // namespace VFT_ISA_NS

#if VFT_ISA_PRIMARY
Prepared flow_prepare(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& v_cond,
                      const c10::optional<torch::Tensor>& v_uncond, const torch::Tensor& t,
                      const torch::Tensor& t_next, const std::string& guidance, double apg_momentum,
                      c10::optional<torch::Tensor>& momentum, int64_t reduce_ndim,
                      c10::optional<torch::Tensor>& prefix, int64_t prefix_len) {
  const flow::Mode mode = flow_mode(guidance);
  if (mode != flow::kApg || apg_momentum == 0) momentum.reset();
  if (prefix_len == 0) prefix.reset();
  return {mode, flow_check(out, x, v_cond, v_uncond, t, t_next, mode, momentum, reduce_ndim, prefix, prefix_len)};
}

#endif  // VFT_ISA_PRIMARY

namespace VFT_ISA_NS {
namespace flow_cpu {


void flow_step_cpu(torch::Tensor out, torch::Tensor x, torch::Tensor v_cond, c10::optional<torch::Tensor> v_uncond,
                   torch::Tensor t, torch::Tensor t_next, const std::string& guidance, double scale, double apg_eta,
                   double apg_norm_threshold, double apg_momentum, c10::optional<torch::Tensor> momentum,
                   int64_t reduce_ndim, c10::optional<torch::Tensor> prefix, int64_t prefix_len) {
  const Prepared c = flow_prepare(out, x, v_cond, v_uncond, t, t_next, guidance, apg_momentum, momentum, reduce_ndim,
                                 prefix, prefix_len);
  VFT_CHECK(x.device().is_cpu(), "flow_step_cpu needs CPU tensors, got ", x.device());
  run_step(out, x, v_cond, v_uncond, t.data_ptr<float>(), t_next.data_ptr<float>(), c.mode,
           params(scale, apg_eta, apg_norm_threshold, apg_momentum), momentum, c.geo, prefix);
}

// ---------------------------------------------------------------------------------------
// The op layer's fast path (vft_kernels.ops.flow.flow_step): one C++ call that validates an
// ordinary eager CPU call and runs it, or returns None for anything else (a bad argument,
// autograd, strides, other devices or dtypes, float64 times, ...), which the Python layer
// then handles with its full checks and clear errors. It never raises for bad input.

namespace {

bool plain_float(const torch::Tensor& t) {
  const auto st = t.scalar_type();
  return t.device().is_cpu() && t.is_contiguous() && (st == at::kFloat || st == at::kHalf || st == at::kBFloat16);
}

bool like(const torch::Tensor& t, const torch::Tensor& x) {
  return t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == x.scalar_type() && t.sizes() == x.sizes();
}

bool needs_grad(const torch::Tensor& t) { return t.requires_grad(); }

// A time argument: a Python float / int (not bool) broadcast over B, or a contiguous float32
// CPU tensor [B]. Fills `buf` (float times) or points `ptr` at the tensor's data.
bool read_time(pybind11::handle h, int64_t B, std::vector<float>& buf, const float*& ptr, bool& grad) {
  if (THPVariable_Check(h.ptr())) {
    const torch::Tensor& t = THPVariable_Unpack(h.ptr());
    if (!(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == B &&
          t.is_contiguous()))
      return false;
    grad = grad || t.requires_grad();
    ptr = t.data_ptr<float>();
    return true;
  }
  if (PyBool_Check(h.ptr()) || !(PyFloat_Check(h.ptr()) || PyLong_Check(h.ptr()))) return false;
  const double v = PyFloat_AsDouble(h.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  buf.assign(static_cast<size_t>(B), static_cast<float>(v));
  ptr = buf.data();
  return true;
}

// Both times of a fast-path call, read with read_time; false (decline) unless every sample
// goes forward (t_next < t; NaN times decline too: the Python layer says which sample).
struct FastTimes {
  std::vector<float> tbuf, tnbuf;
  const float* t = nullptr;
  const float* tn = nullptr;
  bool grad = false;
  bool read(pybind11::handle t_in, pybind11::handle tn_in, int64_t B) {
    if (!read_time(t_in, B, tbuf, t, grad) || !read_time(tn_in, B, tnbuf, tn, grad)) return false;
    for (int64_t b = 0; b < B; ++b)
      if (!(tn[b] < t[b])) return false;
    return true;
  }
};

// The output of a fast-path call: out_in when it is usable (contiguous, x's dtype and
// shape on the CPU), a new tensor when it is None; false (decline) otherwise.
bool fast_out(const c10::optional<torch::Tensor>& out_in, const torch::Tensor& x, torch::Tensor& out) {
  if (!out_in.has_value()) {
    out = empty_output(x.sizes(), x.scalar_type());
    return true;
  }
  if (!like(*out_in, x)) return false;
  out = *out_in;
  return true;
}

}  // namespace

pybind11::object flow_step_fast(const torch::Tensor& x, const torch::Tensor& v_cond, pybind11::handle t,
                                pybind11::handle t_next, const c10::optional<torch::Tensor>& v_uncond_in,
                                const std::string& guidance, double scale, double apg_eta, double apg_norm_threshold,
                                double apg_momentum, const c10::optional<torch::Tensor>& momentum_in,
                                int64_t reduce_ndim, const c10::optional<torch::Tensor>& prefix_in, int64_t prefix_len,
                                const c10::optional<torch::Tensor>& out_in) {
  const pybind11::object none = pybind11::none();
  flow::Mode mode;
  if (guidance == "none") {
    mode = flow::kNone;
  } else if (guidance == "cfg") {
    mode = flow::kCfg;
  } else if (guidance == "apg") {
    mode = flow::kApg;
  } else {
    return none;
  }
  if (!plain_float(x) || x.dim() < reduce_ndim + 1 || reduce_ndim < 1 || apg_norm_threshold < 0 || prefix_len < 0)
    return none;
  if (!like(v_cond, x)) return none;
  c10::optional<torch::Tensor> v_uncond, momentum, prefix;
  if (mode != flow::kNone) {
    if (!v_uncond_in.has_value() || !like(*v_uncond_in, x)) return none;
    v_uncond = v_uncond_in;
  }
  if (mode == flow::kApg && apg_momentum != 0) {
    if (!momentum_in.has_value() || !plain_float(*momentum_in) || momentum_in->sizes() != x.sizes()) return none;
    momentum = momentum_in;
  }
  if (prefix_len > 0) {
    if (x.dim() < 3 || prefix_len > x.size(2) || !prefix_in.has_value()) return none;
    const torch::Tensor& pre = *prefix_in;
    if (!(pre.device().is_cpu() && pre.is_contiguous() && pre.scalar_type() == x.scalar_type() &&
          pre.dim() == x.dim()))
      return none;
    for (int64_t d = 0; d < x.dim(); ++d)
      if (pre.size(d) != (d == 2 ? prefix_len : x.size(d))) return none;
    prefix = prefix_in;
  }
  FastTimes times;
  if (!times.read(t, t_next, x.size(0))) return none;
  if (at::GradMode::is_enabled()) {
    const bool grad = times.grad || needs_grad(x) || needs_grad(v_cond) ||
                      (v_uncond.has_value() && needs_grad(*v_uncond)) || (prefix.has_value() && needs_grad(*prefix));
    if (grad) return none;
  }
  torch::Tensor out;
  if (!fast_out(out_in, x, out)) return none;
  const flow::Geometry geo = geometry(x, reduce_ndim, prefix.has_value() ? prefix_len : 0);
  {
    pybind11::gil_scoped_release release;
    run_step(out, x, v_cond, v_uncond, times.t, times.tn, mode, params(scale, apg_eta, apg_norm_threshold, apg_momentum),
             momentum, geo, prefix);
  }
  return pybind11::cast(out);
}

// The fast path of vft_kernels.flow_heun_step, on the same terms as flow_step_fast.
pybind11::object flow_heun_step_fast(const torch::Tensor& x, const torch::Tensor& v1, const torch::Tensor& v2,
                                     pybind11::handle t, pybind11::handle t_next,
                                     const c10::optional<torch::Tensor>& out_in) {
  const pybind11::object none = pybind11::none();
  if (!plain_float(x) || x.dim() < 1 || !like(v1, x) || !like(v2, x)) return none;
  const int64_t B = x.size(0);
  FastTimes times;
  if (!times.read(t, t_next, B)) return none;
  if (at::GradMode::is_enabled() && (times.grad || needs_grad(x) || needs_grad(v1) || needs_grad(v2))) return none;
  torch::Tensor out;
  if (!fast_out(out_in, x, out)) return none;
  const int64_t numel = x.numel();
  if (numel > 0) {
    pybind11::gil_scoped_release release;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_heun_step_fast", [&] {
      elementwise<scalar_t, flow::kHeun>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), v1.data_ptr<scalar_t>(),
                                         v2.data_ptr<scalar_t>(), times.t, times.tn, B, numel / B, 1.f, nullptr,
                                         flow::Prefix{1, 0, 1});
    });
  }
  return pybind11::cast(out);
}

void flow_heun_step_cpu(torch::Tensor out, torch::Tensor x, torch::Tensor v1, torch::Tensor v2, torch::Tensor t,
                        torch::Tensor t_next) {
  const flow::Geometry geo = flow_check(out, x, v1, v2, t, t_next, flow::kHeun, c10::nullopt, 0, c10::nullopt, 0);
  VFT_CHECK(x.device().is_cpu(), "flow_heun_step_cpu needs CPU tensors, got ", x.device());
  if (geo.numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_heun_step_cpu", [&] {
    elementwise<scalar_t, flow::kHeun>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), v1.data_ptr<scalar_t>(),
                                       v2.data_ptr<scalar_t>(), t.data_ptr<float>(), t_next.data_ptr<float>(),
                                       geo.B, geo.numel / geo.B, 1.f, nullptr, geo.prefix);
  });
}

}  // namespace flow_cpu
}  // namespace VFT_ISA_NS

#if VFT_ISA_PRIMARY
VFT_DECLARE_VARIANTS(flow_cpu, flow_step_cpu)
VFT_DECLARE_VARIANTS(flow_cpu, flow_step_fast)
VFT_DECLARE_VARIANTS(flow_cpu, flow_heun_step_fast)
VFT_DECLARE_VARIANTS(flow_cpu, flow_heun_step_cpu)

void bind_flow(pybind11::module_& m) {
  m.def("flow_step_cpu", VFT_DISPATCH(flow_cpu, flow_step_cpu),
        "Fused guidance + Euler step (docs/spec.md §3) on contiguous CPU tensors; writes out (may alias x) and "
        "updates momentum in place.",
        pybind11::arg("out"), pybind11::arg("x"), pybind11::arg("v_cond"), pybind11::arg("v_uncond"),
        pybind11::arg("t"), pybind11::arg("t_next"), pybind11::arg("guidance"), pybind11::arg("scale"),
        pybind11::arg("apg_eta"), pybind11::arg("apg_norm_threshold"), pybind11::arg("apg_momentum"),
        pybind11::arg("momentum"), pybind11::arg("reduce_ndim"), pybind11::arg("prefix"),
        pybind11::arg("prefix_len"));
  m.def("flow_step_fast", VFT_DISPATCH(flow_cpu, flow_step_fast),
        "The op layer's fast path of vft_kernels.flow_step for ordinary eager CPU calls: validates and runs the "
        "step, returning out (allocated when None), or returns None without running anything "
        "when the call needs the full Python path (any bad or unusual argument). Never raises for bad input.",
        pybind11::arg("x"), pybind11::arg("v_cond"), pybind11::arg("t"), pybind11::arg("t_next"),
        pybind11::arg("v_uncond"), pybind11::arg("guidance"), pybind11::arg("scale"), pybind11::arg("apg_eta"),
        pybind11::arg("apg_norm_threshold"), pybind11::arg("apg_momentum"), pybind11::arg("momentum"),
        pybind11::arg("reduce_ndim"), pybind11::arg("prefix"), pybind11::arg("prefix_len"), pybind11::arg("out"));
  m.def("flow_heun_step_fast", VFT_DISPATCH(flow_cpu, flow_heun_step_fast),
        "The op layer's fast path of vft_kernels.flow_heun_step (eager CPU calls): validates and runs the update, "
        "or returns None without running anything for whatever needs the Python path. Never raises for bad input.",
        pybind11::arg("x"), pybind11::arg("v1"), pybind11::arg("v2"), pybind11::arg("t"), pybind11::arg("t_next"),
        pybind11::arg("out"));
  m.def("flow_heun_step_cpu", VFT_DISPATCH(flow_cpu, flow_heun_step_cpu),
        "Heun update out = x + (t_next - t) (v1 + v2) / 2 on contiguous CPU tensors.", pybind11::arg("out"),
        pybind11::arg("x"), pybind11::arg("v1"), pybind11::arg("v2"), pybind11::arg("t"), pybind11::arg("t_next"));
#ifdef VFT_WITH_CUDA
  m.def("flow_step_cuda", &flow_step_cuda, "CUDA version of flow_step_cpu (two launches for apg, one otherwise).",
        pybind11::arg("out"), pybind11::arg("x"), pybind11::arg("v_cond"), pybind11::arg("v_uncond"),
        pybind11::arg("t"), pybind11::arg("t_next"), pybind11::arg("guidance"), pybind11::arg("scale"),
        pybind11::arg("apg_eta"), pybind11::arg("apg_norm_threshold"), pybind11::arg("apg_momentum"),
        pybind11::arg("momentum"), pybind11::arg("reduce_ndim"), pybind11::arg("prefix"),
        pybind11::arg("prefix_len"));
  m.def("flow_heun_step_cuda", &flow_heun_step_cuda, "CUDA version of flow_heun_step_cpu.", pybind11::arg("out"),
        pybind11::arg("x"), pybind11::arg("v1"), pybind11::arg("v2"), pybind11::arg("t"), pybind11::arg("t_next"));
#endif
}
#endif  // VFT_ISA_PRIMARY

}  // namespace vft
