// The C++ CPU backend of tsam_fast: launchers and kernel registration (torch.ops.tsam_fast.*).
//
// Layers: kernels.h (one segment, one ISA) -> launchers here (checks, segments, threads, ISA choice)
// -> TORCH_LIBRARY_IMPL registration -> tsam_fast/backends/cpp.py (CppOps).
//
// The op contract's schemas are NOT declared here: they are defined once, from Python, by
// tsam_fast/backends/contract.py (docs/design.md §7), which cpp.py calls right after loading this
// library. The dispatcher accepts kernels registered before their schema and checks each kernel's C++
// signature against the schema when it is defined: a launcher below whose signature disagrees with the
// table makes that definition raise (the backend then reports itself unavailable with the reason).
// Only the diagnostics ops, which are not part of the contract, are declared here (a FRAGMENT).
//
// Multi-tensor apply: `theta` is a list of tensors (the parameters' own storages, each 1-D contiguous),
// whose concatenation is the flat index space of the other buffers. Every op cuts that space into
// fixed segments (at most kChunk elements, never across a tensor or a run) and runs ALL of them in one
// at::parallel_for: one parallel region per op, however many tensors (a region per tensor was measured
// 4-8x slower on 2 threads). Reductions sum per-segment double partials in segment order, so results
// never depend on the number of threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernel_api.h"

namespace tsam_fast {
namespace {

// Elements per segment: large enough to amortize the scheduling, small enough to balance 2..64 threads.
constexpr int64_t kChunk = 1 << 16;

// ---- ISA choice ---------------------------------------------------------------------------------
bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}
bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const KernelTable* table_named(const std::string& name) {
  if (name == "avx512") return cpu_has_avx512() ? &kTableAVX512 : nullptr;
  if (name == "avx2") return cpu_has_avx2() ? &kTableAVX2 : nullptr;
  if (name == "scalar") return &kTableScalar;
  return nullptr;
}

// The best table this CPU runs; TSAM_FAST_CPP_ISA=scalar|avx2|avx512 caps it (tests, debugging).
const KernelTable* best_table() {
  if (const char* env = std::getenv("TSAM_FAST_CPP_ISA")) {
    const KernelTable* t = table_named(env);
    TORCH_CHECK(t != nullptr, "TSAM_FAST_CPP_ISA=", env, " is not an instruction set this CPU runs ",
                "(expected scalar, avx2 or avx512)");
    return t;
  }
  if (cpu_has_avx512()) return &kTableAVX512;
  if (cpu_has_avx2()) return &kTableAVX2;
  return &kTableScalar;
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& K() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

// ---- argument checks ----------------------------------------------------------------------------
DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "tsam_fast: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DType::F32;
}

void check_buffer(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), "tsam_fast cpp backend: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "tsam_fast cpp backend: ", name, " must be contiguous (a flat buffer)");
  TORCH_CHECK(n < 0 || t.numel() == n, "tsam_fast cpp backend: ", name, " has ", t.numel(),
              " elements, expected ", n);
}

void check_f32(const at::Tensor& t, const char* name, int64_t n) {
  check_buffer(t, name, n);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "tsam_fast cpp backend: ", name, " must be float32, got ",
              t.scalar_type());
}

// A 0-dim (or 1-element) fp32 scalar tensor: reading it on the host is free on the CPU.
float scalar_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "tsam_fast cpp backend: ", name, " must be a one-element float32 CPU tensor, got ",
              t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
  return t.item<float>();
}

// ---- segments -----------------------------------------------------------------------------------
struct Segment {
  int64_t buf;    // first element in the flat space
  int64_t len;    // elements
  uint64_t glob;  // global index of the first element (noise counter space)
  bool noise;     // false: no noise here (seed=None, or a buffer gap outside every run: xi = 0)
  char* theta;    // ops over a theta list: the segment's first element in its tensor (else nullptr)
};

void push_split(std::vector<Segment>& out, int64_t buf, int64_t len, uint64_t glob, bool noise,
                char* theta = nullptr, int64_t elem = 0) {
  for (int64_t off = 0; off < len; off += kChunk)
    out.push_back({buf + off, std::min(kChunk, len - off), glob + static_cast<uint64_t>(off), noise,
                   theta ? theta + off * elem : nullptr});
}

// `runs` flattened: (buffer_offset, global_offset, length) triples, sorted, disjoint, inside [0, n).
std::vector<Segment> segments(int64_t n, c10::IntArrayRef runs, bool with_noise) {
  std::vector<Segment> out;
  if (!with_noise) {
    push_split(out, 0, n, 0, false);
    return out;
  }
  TORCH_CHECK(runs.size() % 3 == 0, "tsam_fast cpp backend: runs must be (buffer_offset, global_offset, length) "
              "triples, got ", runs.size(), " integers");
  int64_t pos = 0;
  for (size_t r = 0; r < runs.size(); r += 3) {
    const int64_t buf = runs[r], glob = runs[r + 1], len = runs[r + 2];
    TORCH_CHECK(buf >= pos && glob >= 0 && len >= 0 && buf + len <= n,
                "tsam_fast cpp backend: run (", buf, ", ", glob, ", ", len, ") is out of order, overlaps the "
                "previous one or leaves the buffer of ", n, " elements");
    if (buf > pos) push_split(out, pos, buf - pos, 0, false);
    push_split(out, buf, len, static_cast<uint64_t>(glob), true);
    pos = buf + len;
  }
  if (pos < n) push_split(out, pos, n - pos, 0, false);
  return out;
}

// The parameter list of an op: every tensor a contiguous CPU tensor of one dtype. Returns that dtype
// (F32 for an empty list) and the flat length.
DType check_list(at::TensorList theta, const char* name, int64_t* total) {
  int64_t n = 0;
  for (size_t i = 0; i < theta.size(); ++i) {
    const at::Tensor& t = theta[i];
    TORCH_CHECK(t.device().is_cpu(), "tsam_fast cpp backend: ", name, "[", i, "] must be a CPU tensor, got ",
                t.device());
    TORCH_CHECK(t.is_contiguous(), "tsam_fast cpp backend: ", name, "[", i, "] must be contiguous (a "
                "parameter's storage seen flat)");
    TORCH_CHECK(t.scalar_type() == theta[0].scalar_type(), "tsam_fast cpp backend: ", name, "[", i, "] is ",
                t.scalar_type(), ", ", name, "[0] is ", theta[0].scalar_type(), ": one dtype per list");
    n += t.numel();
  }
  *total = n;
  return theta.empty() ? DType::F32 : dtype_of(theta[0], name);
}

// Segments of an op over a theta list: each tensor cut at kChunk, with its noise run when `with_noise`
// (`runs`: one (offset, global offset, length) triple per tensor, in order; docs/design.md §7).
std::vector<Segment> list_segments(at::TensorList theta, c10::IntArrayRef runs, bool with_noise) {
  std::vector<Segment> out;
  TORCH_CHECK(!with_noise || runs.size() == 3 * theta.size(), "tsam_fast cpp backend: an op over ", theta.size(),
              " tensors takes one run per tensor (", 3 * theta.size(), " integers), got ", runs.size(), " integers");
  int64_t offset = 0;
  for (size_t i = 0; i < theta.size(); ++i) {
    const at::Tensor& t = theta[i];
    const int64_t n = t.numel();
    uint64_t glob = 0;
    if (with_noise) {
      TORCH_CHECK(runs[3 * i] == offset && runs[3 * i + 1] >= 0 && runs[3 * i + 2] == n,
                  "tsam_fast cpp backend: run ", i, " (", runs[3 * i], ", ", runs[3 * i + 1], ", ", runs[3 * i + 2],
                  ") is not tensor ", i, "'s (offset ", offset, ", length ", n, ")");
      glob = static_cast<uint64_t>(runs[3 * i + 1]);
    }
    if (n > 0) push_split(out, offset, n, glob, with_noise, static_cast<char*>(t.data_ptr()), t.element_size());
    offset += n;
  }
  return out;
}

template <typename F>
void for_segments(const std::vector<Segment>& segs, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(segs.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) f(segs[i]);
  });
}

template <typename F>
double reduce_segments(const std::vector<Segment>& segs, const F& f) {
  std::vector<double> parts(segs.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(segs.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) parts[i] = f(segs[i]);
  });
  double total = 0.0;  // in segment order: independent of the thread count
  for (double p : parts) total += p;
  return total;
}

inline char* at_elem(const at::Tensor& t, int64_t i) {
  return static_cast<char*>(t.data_ptr()) + i * static_cast<int64_t>(t.element_size());
}

at::Tensor f32_scalar(double v) { return at::scalar_tensor(static_cast<float>(v), at::TensorOptions().dtype(at::kFloat)); }

// ---- launchers (one per op of tsam_fast/backends/contract.py, with its schema's arguments) ----------
at::Tensor noise_sqnorm(c10::IntArrayRef runs, int64_t seed, c10::Device device) {
  TORCH_CHECK(device.is_cpu(), "tsam_fast cpp backend: noise_sqnorm runs on the CPU, got device ", device);
  int64_t end = 0;  // the runs' buffer extent: noise_sqnorm has no buffer of its own
  for (size_t r = 0; r + 2 < runs.size(); r += 3) end = std::max(end, runs[r] + runs[r + 2]);
  const auto segs = segments(end, runs, true);
  const KernelTable& k = K();
  const double total = reduce_segments(segs, [&](const Segment& s) {
    return s.noise ? k.noise_sqnorm(static_cast<uint64_t>(seed), s.glob, s.len) : 0.0;
  });
  return f32_scalar(total);
}

at::Tensor sqnorm(at::TensorList x, const std::optional<at::Tensor>& scale) {
  int64_t n = 0;
  const DType dt = check_list(x, "x", &n);
  if (scale) {
    check_buffer(*scale, "scale", n);
    TORCH_CHECK(x.empty() || scale->scalar_type() == x[0].scalar_type(), "tsam_fast cpp backend: scale is ",
                scale->scalar_type(), ", expected the parameter dtype ", x[0].scalar_type());
  }
  const auto segs = list_segments(x, {}, false);
  const KernelTable& k = K();
  const double total = reduce_segments(segs, [&](const Segment& s) {
    return k.sqnorm(dt, s.theta, scale ? at_elem(*scale, s.buf) : nullptr, s.len);
  });
  return f32_scalar(total);
}

// A flat buffer of the list's length and dtype (grad, theta0, precond).
void check_like_list(const at::Tensor& t, at::TensorList theta, int64_t n, const char* name) {
  check_buffer(t, name, n);
  TORCH_CHECK(theta.empty() || t.scalar_type() == theta[0].scalar_type(), "tsam_fast cpp backend: ", name, " is ",
              t.scalar_type(), ", expected the parameter dtype ", theta[0].scalar_type());
}

void perturb(at::TensorList theta, const at::Tensor& theta0, c10::IntArrayRef runs, std::optional<int64_t> seed,
             const at::Tensor& coef, bool save_backup) {
  int64_t n = 0;
  const DType dt = check_list(theta, "theta", &n);
  check_like_list(theta0, theta, n, "theta0");
  const float c = scalar_of(coef, "coef");
  const auto segs = list_segments(theta, runs, seed.has_value());
  const KernelTable& k = K();
  const uint64_t sd = seed ? static_cast<uint64_t>(*seed) : 0;
  for_segments(segs, [&](const Segment& s) {
    k.perturb(dt, s.theta, at_elem(theta0, s.buf), s.len, Noise{s.noise, sd, s.glob}, c, save_backup);
  });
}

void fill_noise(const at::Tensor& out, c10::IntArrayRef runs, int64_t seed, const at::Tensor& coef) {
  check_f32(out, "out", -1);
  const float c = scalar_of(coef, "coef");
  const auto segs = segments(out.numel(), runs, true);
  const KernelTable& k = K();
  for_segments(segs, [&](const Segment& s) {
    float* o = reinterpret_cast<float*>(at_elem(out, s.buf));
    if (s.noise) k.fill_noise(o, s.len, Noise{true, static_cast<uint64_t>(seed), s.glob}, c);
    else std::fill(o, o + s.len, 0.0f);
  });
}

void leapfrog(at::TensorList theta, const at::Tensor& grad, const at::Tensor& kick, const at::Tensor& drift,
              const std::optional<at::Tensor>& momentum, const std::optional<at::Tensor>& precond) {
  int64_t n = 0;
  const DType dt = check_list(theta, "theta", &n);
  check_like_list(grad, theta, n, "grad");
  TORCH_CHECK(!(momentum && precond), "tsam_fast cpp backend: leapfrog takes momentum (hmc) or precond "
              "(adaptive ascent), not both");
  if (momentum) check_f32(*momentum, "momentum", n);
  if (precond) check_like_list(*precond, theta, n, "precond");
  const float kk = scalar_of(kick, "kick"), dd = scalar_of(drift, "drift");
  const auto segs = list_segments(theta, {}, false);
  const KernelTable& k = K();
  for_segments(segs, [&](const Segment& s) {
    k.leapfrog(dt, s.theta, at_elem(grad, s.buf), kk, dd,
               momentum ? reinterpret_cast<float*>(at_elem(*momentum, s.buf)) : nullptr,
               precond ? at_elem(*precond, s.buf) : nullptr, s.len);
  });
}

// The buffers of the tilt update and of finalize: A (fp32), and g and theta0 like the theta list.
DType check_tilt_buffers(const at::Tensor& acc, const at::Tensor& grad, at::TensorList theta,
                         const at::Tensor& theta0) {
  int64_t n = 0;
  const DType dt = check_list(theta, "theta", &n);
  check_f32(acc, "acc", n);
  check_like_list(grad, theta, n, "grad");
  check_like_list(theta0, theta, n, "theta0");
  return dt;
}

void tilt_accumulate(const at::Tensor& acc, const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                     bool first, at::TensorList theta, const at::Tensor& theta0, c10::IntArrayRef runs,
                     std::optional<int64_t> seed, const at::Tensor& coef) {
  const DType dt = check_tilt_buffers(acc, grad, theta, theta0);
  const float av = scalar_of(a, "a"), bv = scalar_of(b, "b"), c = scalar_of(coef, "coef");
  const auto segs = list_segments(theta, runs, seed.has_value());
  const KernelTable& k = K();
  const uint64_t sd = seed ? static_cast<uint64_t>(*seed) : 0;
  for_segments(segs, [&](const Segment& s) {
    k.tilt_accumulate(dt, reinterpret_cast<float*>(at_elem(acc, s.buf)), at_elem(grad, s.buf), av, bv, first,
                      s.theta, at_elem(theta0, s.buf), s.len, Noise{s.noise, sd, s.glob}, c);
  });
}

void finalize(const at::Tensor& acc, const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& inv_z, bool first, at::TensorList theta, const at::Tensor& theta0) {
  const DType dt = check_tilt_buffers(acc, grad, theta, theta0);
  const float av = scalar_of(a, "a"), bv = scalar_of(b, "b"), iz = scalar_of(inv_z, "inv_z");
  const auto segs = list_segments(theta, {}, false);
  const KernelTable& k = K();
  for_segments(segs, [&](const Segment& s) {
    k.finalize(dt, reinterpret_cast<const float*>(at_elem(acc, s.buf)), at_elem(grad, s.buf), av, bv, iz, first,
               s.theta, at_elem(theta0, s.buf), s.len);
  });
}

// ---- test and diagnostics ops ---------------------------------------------------------------------
// The raw Philox words of counters counter .. counter+ncounters-1: int64 tensor [ncounters, 4] of uint32 values.
at::Tensor philox_words(int64_t seed, int64_t counter, int64_t ncounters) {
  TORCH_CHECK(ncounters >= 0 && counter >= 0, "tsam_fast: _philox_words needs counter, ncounters >= 0");
  std::vector<uint32_t> w(static_cast<size_t>(4 * ncounters));
  K().philox_words(static_cast<uint64_t>(seed), static_cast<uint64_t>(counter), ncounters, w.data());
  at::Tensor out = at::empty({ncounters, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t i = 0; i < w.size(); ++i) o[i] = w[i];
  return out;
}

std::string isa() { return K().isa; }

// Switch the kernels to another instruction set ("scalar", "avx2", "avx512", or "best"); returns the
// previous one. For tests that compare the ISA paths; not thread-safe against running ops.
std::string set_isa(const std::string& name) {
  const std::string prev = K().isa;
  const KernelTable* t = name == "best" ? best_table() : table_named(name);
  TORCH_CHECK(t != nullptr, "tsam_fast: instruction set '", name, "' is unknown or not supported by this CPU");
  g_table.store(t, std::memory_order_release);
  return prev;
}

// ---- gradient marks (tsam_fast/flat.py) ---------------------------------------------------------------
// One autograd hook per parameter that writes marks[slots[k]] when params[k]'s gradient is computed: 1 + the
// gradient's at::Layout (1 for strided; any other is refused, by name, in Python). A C++ hook runs without the
// GIL or a Python call: a Python hook costs 3-5 us per parameter per backward. The lambdas hold the marks
// tensor, so it outlives them; returns the hooks' handles for unmark_gradients.
std::vector<int64_t> mark_gradients(std::vector<at::Tensor> params, at::Tensor marks, std::vector<int64_t> slots) {
  TORCH_CHECK(marks.device().is_cpu() && marks.scalar_type() == at::kByte && marks.is_contiguous() &&
                  slots.size() == params.size(),
              "tsam_fast: _mark_gradients needs a contiguous uint8 CPU marks tensor and one slot per parameter");
  std::vector<int64_t> handles;
  handles.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    TORCH_CHECK(params[k].requires_grad(), "tsam_fast: _mark_gradients on a tensor that does not require grad");
    TORCH_CHECK(slots[k] >= 0 && slots[k] < marks.numel(), "tsam_fast: _mark_gradients slot out of range");
    at::Tensor keep = marks;
    const int64_t slot = slots[k];
    handles.push_back(params[k].register_hook([keep, slot](const at::TensorBase& grad) {
      keep.data_ptr<uint8_t>()[slot] = static_cast<uint8_t>(1 + static_cast<int>(grad.layout()));
    }));
  }
  return handles;
}

void unmark_gradients(std::vector<at::Tensor> params, std::vector<int64_t> handles) {
  TORCH_CHECK(params.size() == handles.size(), "tsam_fast: _unmark_gradients needs one handle per parameter");
  for (size_t i = 0; i < params.size(); ++i) params[i].remove_hook(static_cast<unsigned>(handles[i]));
}

}  // namespace

// The diagnostics and helper ops (not part of the op contract).
TORCH_LIBRARY_FRAGMENT(tsam_fast, m) {
  m.def("_philox_words(int seed, int counter, int ncounters) -> Tensor");
  m.def("_isa() -> str", &isa);
  m.def("_set_isa(str isa) -> str", &set_isa);
  m.def("_mark_gradients(Tensor[] params, Tensor marks, int[] slots) -> int[]", &mark_gradients);
  m.def("_unmark_gradients(Tensor[] params, int[] handles) -> ()", &unmark_gradients);
}

// The contract's kernels; their schemas come from contract.py (defined after this library is loaded).
TORCH_LIBRARY_IMPL(tsam_fast, CPU, m) {
  m.impl("sqnorm", &sqnorm);
  m.impl("perturb", &perturb);
  m.impl("fill_noise", &fill_noise);
  m.impl("leapfrog", &leapfrog);
  m.impl("tilt_accumulate", &tilt_accumulate);
  m.impl("finalize", &finalize);
}

// No tensor argument to dispatch on: these produce CPU tensors whatever the dispatch key (noise_sqnorm
// checks its device argument).
TORCH_LIBRARY_IMPL(tsam_fast, CompositeExplicitAutograd, m) {
  m.impl("noise_sqnorm", &noise_sqnorm);
  m.impl("_philox_words", &philox_words);
}

}  // namespace tsam_fast

// `import tsam_fast._C` loads the library (and with it the registrations above); the module is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tsam_fast C++ CPU operators (torch.ops.tsam_fast)",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
