// The interface between the op launchers (ops.cpp, which knows about tensors and threads) and the
// element kernels (kernels.h, compiled once per instruction set: kernels_{avx512,avx2,scalar}.cpp).
//
// Every kernel works on ONE segment of a flat buffer: raw pointers already offset to the segment,
// `n` elements, no threads, no torch headers (so the per-ISA translation units compile in seconds).
// The launcher splits the buffer into fixed-size segments and runs them in parallel.
#pragma once

#include <cstdint>

namespace tsam_fast {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// The normals of global elements g0, g0+1, ... of the noise stream `seed` (docs/design.md §4);
// `on == false` means "no noise" (seed=None): the kernels then never touch the generator.
struct Noise {
  bool on;
  uint64_t seed;
  uint64_t g0;
};

struct KernelTable {
  const char* isa;
  // Raw Philox4x32-10 words of counters c0 .. c0+ncounters-1 (4 words each, in counter order).
  void (*philox_words)(uint64_t seed, uint64_t c0, int64_t ncounters, uint32_t* out);
  // sum(xi^2) over the segment, in double.
  double (*noise_sqnorm)(uint64_t seed, uint64_t g0, int64_t n);
  // sum((scale*x)^2) in double; scale may be null.
  double (*sqnorm)(DType, const void* x, const void* scale, int64_t n);
  // [save_backup: theta0 <- theta]; theta <- theta0 + coef*xi  (theta <- theta0 without noise).
  void (*perturb)(DType, void* theta, void* theta0, int64_t n, Noise, float coef, bool save_backup);
  // out <- coef*xi (fp32).
  void (*fill_noise)(float* out, int64_t n, Noise, float coef);
  // momentum: v <- v + kick*g; theta <- theta + drift*v.
  // else:     theta <- theta + drift*((kick*g)*(p*p))  (p = precond, or the factor is left out).
  void (*leapfrog)(DType, void* theta, const void* grad, float kick, float drift, float* momentum,
                   const void* precond, int64_t n);
  // A <- a*A + b*g (b*g when first); theta <- theta0 + coef*xi.
  void (*tilt_accumulate)(DType, float* acc, const void* grad, float a, float b, bool first, void* theta,
                          const void* theta0, int64_t n, Noise, float coef);
  // grad <- (a*A + b*g)*inv_z ((b*g)*inv_z when first); theta <- theta0.
  void (*finalize)(DType, const float* acc, void* grad, float a, float b, float inv_z, bool first,
                   void* theta, const void* theta0, int64_t n);
};

extern const KernelTable kTableAVX512;
extern const KernelTable kTableAVX2;
extern const KernelTable kTableScalar;

}  // namespace tsam_fast
