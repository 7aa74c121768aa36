// The element kernels of the op contract, written once over a SIMD layer (simd_*.h) and compiled once
// per instruction set by kernels_{avx512,avx2,scalar}.cpp, which include the system headers, pick the
// target and the layer, then include this file. Everything lives in an anonymous namespace so the
// per-ISA copies never meet at link time; each translation unit exports one KernelTable.
//
// Numerics (docs/design.md §4-5, tsam_fast/backends/reference.py):
//  * the noise is Philox4x32-10 (key = seed, counter = global index // 4), Triton's uint->uniform and
//    Box-Muller, all four outputs used; the generator is built from exactly-rounded operations only
//    (add, mul, fma, sqrt, conversions), so every ISA produces bit-identical normals. log/sin/cos are
//    Cephes' single-precision minimax polynomials after an exact-first-step Cody-Waite reduction.
//  * element ops do the reference's fp32 operations in the reference's order, each rounded once (the
//    build uses -ffp-contract=off so no multiply-add is fused behind our back), so with the same noise
//    they are bit-identical to the reference; the result is rounded once to the buffer dtype.
//  * reductions accumulate (double)x*x in 8 fixed interleaved double partials: the order depends only
//    on the segment, never on the thread count.

namespace {

#if defined(TSAM_ISA_AVX512)
#include "simd_avx512.h"
#elif defined(TSAM_ISA_AVX2)
#include "simd_avx2.h"
#else
#include "simd_scalar.h"
#endif

// ---- constants (docs/design.md §4; the float ones rounded from double exactly as torch rounds python floats)
constexpr uint32_t PHILOX_KEY_A = 0x9E3779B9u, PHILOX_KEY_B = 0xBB67AE85u;
constexpr uint32_t PHILOX_ROUND_A = 0xD2511F53u, PHILOX_ROUND_B = 0xCD9E8D57u;
constexpr int PHILOX_ROUNDS = 10;
constexpr float UNIFORM_SCALE = static_cast<float>(4.6566127342e-10);
constexpr float TWO_PI = static_cast<float>(6.283185307179586);
constexpr float MIN_UNIFORM = static_cast<float>(1.0e-7);
constexpr float PIO2_1 = static_cast<float>(1.5707963267948966);
constexpr float PIO2_2 = static_cast<float>(1.5707963267948966 - static_cast<double>(PIO2_1));
constexpr float PIO2_3 = static_cast<float>(1.5707963267948966 - static_cast<double>(PIO2_1) - static_cast<double>(PIO2_2));
constexpr float TWO_OVER_PI = static_cast<float>(0.6366197723675814);

// Elements per inner block: the block's noise and fp32 conversions stay in L1.
constexpr int64_t BLK = 1024;
// Noise scratch: a block may start 3 elements into its first counter and round up to W counters.
constexpr int64_t XI_CAP = BLK + 4 * W + 8;

struct Keys {
  uint32_t k0[PHILOX_ROUNDS], k1[PHILOX_ROUNDS];
  explicit Keys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < PHILOX_ROUNDS; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += PHILOX_KEY_A;
      b += PHILOX_KEY_B;
    }
  }
};

// Philox4x32-10 on W counters (c0 low word, c1 high word, c2 = c3 = 0), round structure of Triton's
// philox_impl.
inline void philox(const Keys& key, vi& c0, vi& c1, vi& c2, vi& c3) {
  for (int r = 0; r < PHILOX_ROUNDS; ++r) {
    vi hi_b, lo_b, hi_a, lo_a;
    mulhilo(c2, PHILOX_ROUND_B, hi_b, lo_b);
    mulhilo(c0, PHILOX_ROUND_A, hi_a, lo_a);
    c0 = i_xor3(hi_b, c1, i_set1(key.k0[r]));
    c2 = i_xor3(hi_a, c3, i_set1(key.k1[r]));
    c1 = lo_b;
    c3 = lo_a;
  }
}

// The W 64-bit counters base + counter_offsets() as (low, high) words; a carry out of the low word is
// propagated per lane (counters may straddle 2^32).
inline void counters(uint64_t base, vi& lo, vi& hi) {
  const vi off = counter_offsets();
  lo = i_add(i_set1(static_cast<uint32_t>(base)), off);
  const vi h = i_set1(static_cast<uint32_t>(base >> 32));
  hi = i_select(i_ltu(lo, off), i_add(h, i_set1(1)), h);
}

// The Philox words of the W counters base + counter_offsets() (a layer may provide a faster schedule).
inline void philox_at(const Keys& key, uint64_t base, vi& x0, vi& x1, vi& x2, vi& x3) {
#ifdef TSAM_HAVE_PHILOX_BLOCK
  philox_block(key, base, PHILOX_ROUND_A, PHILOX_ROUND_B, PHILOX_ROUNDS, x0, x1, x2, x3);
#else
  x2 = i_set1(0);
  x3 = i_set1(0);
  counters(base, x0, x1);
  philox(key, x0, x1, x2, x3);
#endif
}

// Triton's uint_to_uniform_float: bitcast to int32, x < 0 -> ~x (= x ^ (x >> 31)), times the scale.
inline vf to_uniform(vi w) { return f_mul(f_from_i32(i_xor(w, i_srai31(w))), f_set1(UNIFORM_SCALE)); }

// round-half-even to an integer-valued float for 0 <= x < 2^22 (the 1.5*2^23 trick: exact adds).
inline vf round_even(vf x) {
  const vf magic = f_set1(12582912.0f);
  return f_sub(f_add(x, magic), magic);
}

// ln(u) for normal positive u (Cephes logf): u = m 2^e with m in [sqrt(1/2), sqrt(2)), f = m - 1 exact,
// ln u = f - f^2/2 + f^3 P(f) + e ln 2 (ln 2 split in two for an exact e*ln2_hi). ~1 ulp.
inline vf vlog(vf u) {
  const vi bits = f_bits(u);
  vf e = f_from_i32(i_sub(i_srli<23>(bits), i_set1(127)));
  vf m = i_bits(i_or(i_and(bits, i_set1(0x007FFFFFu)), i_set1(0x3F800000u)));
  const vm big = f_gt(m, f_set1(1.41421356237f));
  m = f_select(big, f_mul(m, f_set1(0.5f)), m);
  e = f_select(big, f_add(e, f_set1(1.0f)), e);
  const vf f = f_sub(m, f_set1(1.0f));
  const vf z = f_mul(f, f);
  vf p = f_set1(7.0376836292E-2f);
  p = f_fma(p, f, f_set1(-1.1514610310E-1f));
  p = f_fma(p, f, f_set1(1.1676998740E-1f));
  p = f_fma(p, f, f_set1(-1.2420140846E-1f));
  p = f_fma(p, f, f_set1(1.4249322787E-1f));
  p = f_fma(p, f, f_set1(-1.6668057665E-1f));
  p = f_fma(p, f, f_set1(2.0000714765E-1f));
  p = f_fma(p, f, f_set1(-2.4999993993E-1f));
  p = f_fma(p, f, f_set1(3.3333331174E-1f));
  vf y = f_mul(f_mul(f, z), p);
  y = f_fma(e, f_set1(-2.12194440e-4f), y);
  y = f_fma(f_set1(-0.5f), z, y);
  return f_fma(e, f_set1(0.693359375f), f_add(f, y));
}

// sin and cos of th in [0, 2pi] (Cephes sinf/cosf on [-pi/4, pi/4]): k = round(th * 2/pi) in 0..4, then
// x = th - k pi/2 with pi/2 = PIO2_1 + PIO2_2 + PIO2_3 (fp32 parts). th - k*PIO2_1 is exact (th and k*PIO2_1
// are within a factor 2 and share the ulp grid), so x keeps ~1 ulp even next to a zero of sin/cos (th is
// an fp32 number, at least ~4e-8 from any k pi/2 for k <= 4); the quadrant k mod 4 swaps and negates.
inline void vsincos(vf th, vf& s_out, vf& c_out) {
  const vf k = round_even(f_mul(th, f_set1(TWO_OVER_PI)));
  vf x = f_fma(f_sub(f_set1(0.0f), k), f_set1(PIO2_1), th);
  x = f_fma(f_sub(f_set1(0.0f), k), f_set1(PIO2_2), x);
  x = f_fma(f_sub(f_set1(0.0f), k), f_set1(PIO2_3), x);
  const vf z = f_mul(x, x);
  vf ps = f_fma(f_set1(-1.9515295891E-4f), z, f_set1(8.3321608736E-3f));
  ps = f_fma(ps, z, f_set1(-1.6666654611E-1f));
  const vf s = f_fma(f_mul(x, z), ps, x);
  vf pc = f_fma(f_set1(2.443315711809948E-5f), z, f_set1(-1.388731625493765E-3f));
  pc = f_fma(pc, z, f_set1(4.166664568298827E-2f));
  const vf c = f_fma(z, f_fma(z, pc, f_set1(-0.5f)), f_set1(1.0f));
  const vi q = f_to_i32(k);
  const vm odd = i_nonzero(i_and(q, i_set1(1)));
  const vi sin_sign = i_slli<30>(i_and(q, i_set1(2)));
  const vi cos_sign = i_slli<30>(i_and(i_add(q, i_set1(1)), i_set1(2)));
  s_out = i_bits(i_xor(f_bits(f_select(odd, c, s)), sin_sign));
  c_out = i_bits(i_xor(f_bits(f_select(odd, s, c)), cos_sign));
}

// (u1, u2) -> sqrt(-2 ln max(u1, 1e-7)) * (cos, sin)(2 pi u2), in the reference's operation order.
inline void box_muller(vf u1, vf u2, vf& n1, vf& n2) {
  const vf r = f_sqrt(f_mul(vlog(f_max(u1, f_set1(MIN_UNIFORM))), f_set1(-2.0f)));
  vf s, c;
  vsincos(f_mul(u2, f_set1(TWO_PI)), s, c);
  n1 = f_mul(r, c);
  n2 = f_mul(r, s);
}

// 4*W*nvec normals of counters c0 .. c0 + W*nvec - 1, in element order (Triton's randn4x).
inline void normals_by_counter(const Keys& key, uint64_t c0, int64_t nvec, float* out) {
  for (int64_t v = 0; v < nvec; ++v) {
    vi x0, x1, x2, x3;
    philox_at(key, c0 + static_cast<uint64_t>(v) * W, x0, x1, x2, x3);
    vf n1, n2, n3, n4;
    box_muller(to_uniform(x0), to_uniform(x1), n1, n2);
    box_muller(to_uniform(x2), to_uniform(x3), n3, n4);
    store_interleaved(out + 4 * W * v, n1, n2, n3, n4);
  }
}

// The normals of global elements g .. g+m-1 (m <= BLK), generated into scratch (XI_CAP floats):
// returns the pointer to the first one.
inline const float* normals_block(const Keys& key, uint64_t g, int64_t m, float* scratch) {
  const uint64_t c0 = g >> 2;
  const int64_t skip = static_cast<int64_t>(g & 3);
  const int64_t ncounters = (skip + m + 3) >> 2;
  normals_by_counter(key, c0, (ncounters + W - 1) / W, scratch);
  return scratch + skip;
}

void philox_words_impl(uint64_t seed, uint64_t c0, int64_t ncounters, uint32_t* out) {
  const Keys key(seed);
  alignas(64) float scratch[4 * W];
  for (int64_t c = 0; c < ncounters; c += W) {
    vi x0, x1, x2, x3;
    philox_at(key, c0 + static_cast<uint64_t>(c), x0, x1, x2, x3);
    // the words travel through the float transpose as bit patterns (shuffles never alter bits)
    store_interleaved(scratch, i_bits(x0), i_bits(x1), i_bits(x2), i_bits(x3));
    const int64_t take = std::min<int64_t>(W, ncounters - c);
    std::memcpy(out + 4 * c, scratch, static_cast<size_t>(4 * take) * sizeof(uint32_t));
  }
}

// ---- storage dtypes <-> fp32 ---------------------------------------------------------------------
struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

// bf16 -> fp32 is exact (the high half); fp32 -> bf16 rounds to nearest even, NaN -> quiet NaN
// (c10::BFloat16's round_to_nearest_even). Plain integer loops: the compiler vectorizes them.
inline void to_f32(const bf16_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}
inline void from_f32(const float* src, bf16_t* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = s[i];
    const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
    const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    d[i] = static_cast<uint16_t>(nan ? 0x7FC0u : r);
  }
}
inline void to_f32(const f16_t* src, float* dst, int64_t n) {
  half_to_float_n(reinterpret_cast<const uint16_t*>(src), dst, n);
}
inline void from_f32(const float* src, f16_t* dst, int64_t n) {
  float_to_half_n(src, reinterpret_cast<uint16_t*>(dst), n);
}

// An fp32 view of a block of a buffer: the buffer itself for fp32, else a converted copy in `tmp`.
template <typename T>
inline const float* load_block(const T* src, int64_t m, float* tmp) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_f32(src, tmp, m);
    return tmp;
  }
}
// Where to compute a block's fp32 result: the buffer itself for fp32, else `tmp` (then store_block).
template <typename T>
inline float* out_block(T* dst, float* tmp) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return tmp;
  }
}
template <typename T>
inline void store_block(T* dst, const float* tmp, int64_t m) {
  if constexpr (!std::is_same_v<T, float>) from_f32(tmp, dst, m);
}

// ---- reductions -------------------------------------------------------------------------------
// Add (double)x[i]^2 (times (double)s[i]^2 when s) into 8 interleaved double partials.
inline void add_squares(const float* x, const float* s, int64_t m, double* acc) {
  int64_t i = 0;
  if (s == nullptr) {
    for (; i + 8 <= m; i += 8)
      for (int l = 0; l < 8; ++l) {
        const double v = x[i + l];
        acc[l] += v * v;
      }
    for (; i < m; ++i) {
      const double v = x[i];
      acc[i & 7] += v * v;
    }
  } else {
    for (; i + 8 <= m; i += 8)
      for (int l = 0; l < 8; ++l) {
        const double v = static_cast<double>(x[i + l]) * static_cast<double>(s[i + l]);
        acc[l] += v * v;
      }
    for (; i < m; ++i) {
      const double v = static_cast<double>(x[i]) * static_cast<double>(s[i]);
      acc[i & 7] += v * v;
    }
  }
}
inline double sum8(const double* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

double noise_sqnorm_impl(uint64_t seed, uint64_t g0, int64_t n) {
  const Keys key(seed);
  alignas(64) float scratch[XI_CAP];
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t p = 0; p < n; p += BLK) {
    const int64_t m = std::min(BLK, n - p);
    add_squares(normals_block(key, g0 + p, m, scratch), nullptr, m, acc);
  }
  return sum8(acc);
}

template <typename T>
double sqnorm_t(const T* x, const T* s, int64_t n) {
  alignas(64) float tx[BLK], ts[BLK];
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t p = 0; p < n; p += BLK) {
    const int64_t m = std::min(BLK, n - p);
    add_squares(load_block(x + p, m, tx), s ? load_block(s + p, m, ts) : nullptr, m, acc);
  }
  return sum8(acc);
}

// ---- element kernels --------------------------------------------------------------------------
// theta <- theta0 + coef * xi (theta0 <- theta first when save_backup).
template <typename T>
void perturb_t(T* theta, T* theta0, int64_t n, Noise noise, float coef, bool save_backup) {
  if (!noise.on) {
    if (save_backup) std::memcpy(theta0, theta, static_cast<size_t>(n) * sizeof(T));
    else std::memcpy(theta, theta0, static_cast<size_t>(n) * sizeof(T));
    return;
  }
  const Keys key(noise.seed);
  alignas(64) float scratch[XI_CAP], t0[BLK], to[BLK];
  for (int64_t p = 0; p < n; p += BLK) {
    const int64_t m = std::min(BLK, n - p);
    const float* xi = normals_block(key, noise.g0 + p, m, scratch);
    if (save_backup) std::memcpy(theta0 + p, theta + p, static_cast<size_t>(m) * sizeof(T));
    const float* base = load_block(theta0 + p, m, t0);
    float* out = out_block(theta + p, to);
    for (int64_t i = 0; i < m; ++i) out[i] = base[i] + coef * xi[i];
    store_block(theta + p, to, m);
  }
}

void fill_noise_impl(float* out, int64_t n, Noise noise, float coef) {
  const Keys key(noise.seed);
  alignas(64) float scratch[XI_CAP];
  for (int64_t p = 0; p < n; p += BLK) {
    const int64_t m = std::min(BLK, n - p);
    const float* xi = normals_block(key, noise.g0 + p, m, scratch);
    float* o = out + p;
    for (int64_t i = 0; i < m; ++i) o[i] = coef * xi[i];
  }
}

template <typename T>
void leapfrog_t(T* theta, const T* grad, float kick, float drift, float* momentum, const T* precond, int64_t n) {
  alignas(64) float tt[BLK], tg[BLK], tp[BLK];
  for (int64_t p = 0; p < n; p += BLK) {
    const int64_t m = std::min(BLK, n - p);
    const float* g = load_block(grad + p, m, tg);
    const float* th = load_block(theta + p, m, tt);
    float* out = out_block(theta + p, tt);  // in place: element i is read before it is written
    if (momentum != nullptr) {
      float* v = momentum + p;
      for (int64_t i = 0; i < m; ++i) {
        const float vi_ = v[i] + kick * g[i];
        v[i] = vi_;
        out[i] = th[i] + drift * vi_;
      }
    } else if (precond != nullptr) {
      const float* pc = load_block(precond + p, m, tp);
      for (int64_t i = 0; i < m; ++i) out[i] = th[i] + drift * ((kick * g[i]) * (pc[i] * pc[i]));
    } else {
      for (int64_t i = 0; i < m; ++i) out[i] = th[i] + drift * (kick * g[i]);
    }
    store_block(theta + p, tt, m);
  }
}

template <typename T>
void tilt_accumulate_t(float* acc, const T* grad, float a, float b, bool first, T* theta, const T* theta0,
                       int64_t n, Noise noise, float coef) {
  alignas(64) float scratch[XI_CAP], tg[BLK], t0[BLK], to[BLK];
  const Keys key(noise.on ? noise.seed : 0);
  for (int64_t p = 0; p < n; p += BLK) {
    const int64_t m = std::min(BLK, n - p);
    const float* g = load_block(grad + p, m, tg);
    float* A = acc + p;
    if (first) {
      for (int64_t i = 0; i < m; ++i) A[i] = b * g[i];
    } else {
      for (int64_t i = 0; i < m; ++i) A[i] = a * A[i] + b * g[i];
    }
    if (!noise.on) {
      std::memcpy(theta + p, theta0 + p, static_cast<size_t>(m) * sizeof(T));
      continue;
    }
    const float* xi = normals_block(key, noise.g0 + p, m, scratch);
    const float* base = load_block(theta0 + p, m, t0);
    float* out = out_block(theta + p, to);
    for (int64_t i = 0; i < m; ++i) out[i] = base[i] + coef * xi[i];
    store_block(theta + p, to, m);
  }
}

template <typename T>
void finalize_t(const float* acc, T* grad, float a, float b, float inv_z, bool first, T* theta, const T* theta0,
                int64_t n) {
  alignas(64) float tg[BLK];
  for (int64_t p = 0; p < n; p += BLK) {
    const int64_t m = std::min(BLK, n - p);
    const float* g = load_block(grad + p, m, tg);
    float* out = out_block(grad + p, tg);  // in place, element-wise
    const float* A = acc + p;
    if (first) {
      for (int64_t i = 0; i < m; ++i) out[i] = (b * g[i]) * inv_z;
    } else {
      for (int64_t i = 0; i < m; ++i) out[i] = (a * A[i] + b * g[i]) * inv_z;
    }
    store_block(grad + p, tg, m);
    std::memcpy(theta + p, theta0 + p, static_cast<size_t>(m) * sizeof(T));
  }
}

// ---- dtype dispatch -------------------------------------------------------------------------------
#define TSAM_DISPATCH(dt, T, ...)                  \
  switch (dt) {                                    \
    case DType::F32: {                             \
      using T = float;                             \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
    case DType::BF16: {                            \
      using T = bf16_t;                            \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
    case DType::F16: {                             \
      using T = f16_t;                             \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
  }

double sqnorm_impl(DType dt, const void* x, const void* s, int64_t n) {
  double r = 0;
  TSAM_DISPATCH(dt, T, r = sqnorm_t(static_cast<const T*>(x), static_cast<const T*>(s), n));
  return r;
}
void perturb_impl(DType dt, void* theta, void* theta0, int64_t n, Noise noise, float coef, bool save_backup) {
  TSAM_DISPATCH(dt, T, perturb_t(static_cast<T*>(theta), static_cast<T*>(theta0), n, noise, coef, save_backup));
}
void leapfrog_impl(DType dt, void* theta, const void* grad, float kick, float drift, float* momentum,
                   const void* precond, int64_t n) {
  TSAM_DISPATCH(dt, T, leapfrog_t(static_cast<T*>(theta), static_cast<const T*>(grad), kick, drift, momentum,
                                  static_cast<const T*>(precond), n));
}
void tilt_accumulate_impl(DType dt, float* acc, const void* grad, float a, float b, bool first, void* theta,
                          const void* theta0, int64_t n, Noise noise, float coef) {
  TSAM_DISPATCH(dt, T, tilt_accumulate_t(acc, static_cast<const T*>(grad), a, b, first, static_cast<T*>(theta),
                                         static_cast<const T*>(theta0), n, noise, coef));
}
void finalize_impl(DType dt, const float* acc, void* grad, float a, float b, float inv_z, bool first, void* theta,
                   const void* theta0, int64_t n) {
  TSAM_DISPATCH(dt, T, finalize_t(acc, static_cast<T*>(grad), a, b, inv_z, first, static_cast<T*>(theta),
                                  static_cast<const T*>(theta0), n));
}
#undef TSAM_DISPATCH

}  // namespace

// Exported by each translation unit under its own name (TSAM_TABLE), e.g. kTableAVX512.
extern const KernelTable TSAM_TABLE = {
    TSAM_ISA_NAME, philox_words_impl, noise_sqnorm_impl, sqnorm_impl, perturb_impl,
    fill_noise_impl, leapfrog_impl, tilt_accumulate_impl, finalize_impl,
};
