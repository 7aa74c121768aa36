// SIMD layer, AVX2 + FMA + F16C: 8 lanes. Same contract as simd_avx512.h (see there).

using vf = __m256;
using vi = __m256i;
using vm = __m256i;  // all-ones / all-zeros lanes
constexpr int W = 8;

inline vi i_set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline vi i_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline vi i_sub(vi a, vi b) { return _mm256_sub_epi32(a, b); }
inline vi i_and(vi a, vi b) { return _mm256_and_si256(a, b); }
inline vi i_or(vi a, vi b) { return _mm256_or_si256(a, b); }
inline vi i_xor(vi a, vi b) { return _mm256_xor_si256(a, b); }
inline vi i_xor3(vi a, vi b, vi c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
template <int N> inline vi i_srli(vi a) { return _mm256_srli_epi32(a, N); }
template <int N> inline vi i_slli(vi a) { return _mm256_slli_epi32(a, N); }
inline vi i_srai31(vi a) { return _mm256_srai_epi32(a, 31); }
inline vm i_ltu(vi a, vi b) {  // unsigned a < b via the signed compare of sign-flipped values
  const vi s = i_set1(0x80000000u);
  return _mm256_cmpgt_epi32(i_xor(b, s), i_xor(a, s));
}
inline vm i_nonzero(vi a) { return i_xor(_mm256_cmpeq_epi32(a, _mm256_setzero_si256()), i_set1(0xFFFFFFFFu)); }
inline vi i_select(vm m, vi a, vi b) { return _mm256_blendv_epi8(b, a, m); }

inline void mulhilo(vi x, uint32_t m, vi& hi, vi& lo) {
  const vi mv = i_set1(m);
  const vi even = _mm256_mul_epu32(x, mv);
  const vi odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), mv);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Lane j = 4L + q handles counter base + 2q + L (see simd_avx512.h).
inline vi counter_offsets() { return _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); }

inline vf f_set1(float x) { return _mm256_set1_ps(x); }
inline vf f_add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf f_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf f_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf f_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf f_sqrt(vf a) { return _mm256_sqrt_ps(a); }
inline vf f_max(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vm f_gt(vf a, vf b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
inline vf f_select(vm m, vf a, vf b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
inline vf f_from_i32(vi a) { return _mm256_cvtepi32_ps(a); }
inline vi f_to_i32(vf a) { return _mm256_cvttps_epi32(a); }
inline vi f_bits(vf a) { return _mm256_castps_si256(a); }
inline vf i_bits(vi a) { return _mm256_castsi256_ps(a); }

inline void store_interleaved(float* out, vf a, vf b, vf c, vf d) {
  const __m256d lo_ab = _mm256_castps_pd(_mm256_unpacklo_ps(a, b)), hi_ab = _mm256_castps_pd(_mm256_unpackhi_ps(a, b));
  const __m256d lo_cd = _mm256_castps_pd(_mm256_unpacklo_ps(c, d)), hi_cd = _mm256_castps_pd(_mm256_unpackhi_ps(c, d));
  _mm256_storeu_ps(out, _mm256_castpd_ps(_mm256_unpacklo_pd(lo_ab, lo_cd)));
  _mm256_storeu_ps(out + 8, _mm256_castpd_ps(_mm256_unpackhi_pd(lo_ab, lo_cd)));
  _mm256_storeu_ps(out + 16, _mm256_castpd_ps(_mm256_unpacklo_pd(hi_ab, hi_cd)));
  _mm256_storeu_ps(out + 24, _mm256_castpd_ps(_mm256_unpackhi_pd(hi_ab, hi_cd)));
}

inline void half_to_float_n(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
inline void float_to_half_n(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
