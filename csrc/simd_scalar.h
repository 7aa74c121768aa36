// SIMD layer, portable scalar fallback: 1 lane. Same contract as simd_avx512.h (see there); std::fma is
// the exact fused multiply-add (in software on CPUs without FMA), so the generator is bit-identical.

using vf = float;
using vi = uint32_t;
using vm = bool;
constexpr int W = 1;

inline vi i_set1(uint32_t x) { return x; }
inline vi i_add(vi a, vi b) { return a + b; }
inline vi i_sub(vi a, vi b) { return a - b; }
inline vi i_and(vi a, vi b) { return a & b; }
inline vi i_or(vi a, vi b) { return a | b; }
inline vi i_xor(vi a, vi b) { return a ^ b; }
inline vi i_xor3(vi a, vi b, vi c) { return a ^ b ^ c; }
template <int N> inline vi i_srli(vi a) { return a >> N; }
template <int N> inline vi i_slli(vi a) { return a << N; }
inline vi i_srai31(vi a) { return static_cast<uint32_t>(static_cast<int32_t>(a) >> 31); }
inline vm i_ltu(vi a, vi b) { return a < b; }
inline vm i_nonzero(vi a) { return a != 0; }
inline vi i_select(vm m, vi a, vi b) { return m ? a : b; }

inline void mulhilo(vi x, uint32_t m, vi& hi, vi& lo) {
  const uint64_t p = static_cast<uint64_t>(x) * m;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

inline vi counter_offsets() { return 0; }

inline vf f_set1(float x) { return x; }
inline vf f_add(vf a, vf b) { return a + b; }
inline vf f_sub(vf a, vf b) { return a - b; }
inline vf f_mul(vf a, vf b) { return a * b; }
inline vf f_fma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline vf f_sqrt(vf a) { return std::sqrt(a); }
inline vf f_max(vf a, vf b) { return a > b ? a : b; }  // as maxps: the second operand unless a > b
inline vm f_gt(vf a, vf b) { return a > b; }
inline vf f_select(vm m, vf a, vf b) { return m ? a : b; }
inline vf f_from_i32(vi a) { return static_cast<float>(static_cast<int32_t>(a)); }
inline vi f_to_i32(vf a) { return static_cast<uint32_t>(static_cast<int32_t>(a)); }
inline vi f_bits(vf a) { return __builtin_bit_cast(uint32_t, a); }
inline vf i_bits(vi a) { return __builtin_bit_cast(float, a); }

inline void store_interleaved(float* out, vf a, vf b, vf c, vf d) {
  out[0] = a;
  out[1] = b;
  out[2] = c;
  out[3] = d;
}

// fp16 <-> fp32 without F16C: the branch-free conversions of the FP16 library (as c10::Half uses).
inline float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = i_bits((two_w >> 4) + (0xE0u << 23)) * exp_scale;
  const float denormalized = i_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? f_bits(denormalized) : f_bits(normalized));
  return i_bits(result);
}
inline uint16_t float_to_half(float f) {
  const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = i_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
inline void half_to_float_n(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}
inline void float_to_half_n(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}
