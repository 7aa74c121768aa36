// SIMD layer, AVX-512 (F, DQ, BW, VL): 16 lanes. Included by kernels.h inside its anonymous namespace,
// after <immintrin.h>, in a translation unit compiled for this target (kernels_avx512.cpp).
// Every function here is one exactly-rounded IEEE operation (or a pure bit operation), so the generator
// written on top of it gives bit-identical results on every ISA layer.

using vf = __m512;
using vi = __m512i;
using vm = __mmask16;
constexpr int W = 16;

inline vi i_set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline vi i_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline vi i_sub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
inline vi i_and(vi a, vi b) { return _mm512_and_si512(a, b); }
inline vi i_or(vi a, vi b) { return _mm512_or_si512(a, b); }
inline vi i_xor(vi a, vi b) { return _mm512_xor_si512(a, b); }
inline vi i_xor3(vi a, vi b, vi c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
template <int N> inline vi i_srli(vi a) { return _mm512_srli_epi32(a, N); }
template <int N> inline vi i_slli(vi a) { return _mm512_slli_epi32(a, N); }
inline vi i_srai31(vi a) { return _mm512_srai_epi32(a, 31); }
inline vm i_ltu(vi a, vi b) { return _mm512_cmplt_epu32_mask(a, b); }
inline vm i_nonzero(vi a) { return _mm512_test_epi32_mask(a, a); }
inline vi i_select(vm m, vi a, vi b) { return _mm512_mask_blend_epi32(m, b, a); }  // m ? a : b

// (hi, lo) 32-bit halves of x * m per lane: vpmuludq multiplies the even lanes; shift the odd ones down.
inline void mulhilo(vi x, uint32_t m, vi& hi, vi& lo) {
  const vi mv = i_set1(m);
  const vi even = _mm512_mul_epu32(x, mv);
  const vi odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), mv);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Lane j = 4L + q handles counter base + 4q + L: after the in-lane 4x4 transposes of store_interleaved,
// the four output vectors then hold counters (0..3), (4..7), ... in order (no cross-lane shuffles).
inline vi counter_offsets() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }

inline vf f_set1(float x) { return _mm512_set1_ps(x); }
inline vf f_add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf f_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf f_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf f_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf f_sqrt(vf a) { return _mm512_sqrt_ps(a); }
inline vf f_max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vm f_gt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline vf f_select(vm m, vf a, vf b) { return _mm512_mask_blend_ps(m, b, a); }
inline vf f_from_i32(vi a) { return _mm512_cvtepi32_ps(a); }
inline vi f_to_i32(vf a) { return _mm512_cvttps_epi32(a); }
inline vi f_bits(vf a) { return _mm512_castps_si512(a); }
inline vf i_bits(vi a) { return _mm512_castsi512_ps(a); }

// out[4c + i] = n_i of counter c for the W counters of counter_offsets().
inline void store_interleaved(float* out, vf a, vf b, vf c, vf d) {
  const __m512d lo_ab = _mm512_castps_pd(_mm512_unpacklo_ps(a, b)), hi_ab = _mm512_castps_pd(_mm512_unpackhi_ps(a, b));
  const __m512d lo_cd = _mm512_castps_pd(_mm512_unpacklo_ps(c, d)), hi_cd = _mm512_castps_pd(_mm512_unpackhi_ps(c, d));
  _mm512_storeu_ps(out, _mm512_castpd_ps(_mm512_unpacklo_pd(lo_ab, lo_cd)));
  _mm512_storeu_ps(out + 16, _mm512_castpd_ps(_mm512_unpackhi_pd(lo_ab, lo_cd)));
  _mm512_storeu_ps(out + 32, _mm512_castpd_ps(_mm512_unpacklo_pd(hi_ab, hi_cd)));
  _mm512_storeu_ps(out + 48, _mm512_castpd_ps(_mm512_unpackhi_pd(hi_ab, hi_cd)));
}

// fp16 <-> fp32 with the F16C instructions (round to nearest even, as c10::Half).
inline void half_to_float_n(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
inline void float_to_half_n(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// Philox4x32-10 of the W counters base + counter_offsets(), specialised for AVX-512: each 32-bit word
// lives in the low half of a 64-bit lane (8 counters per register, two registers), so one vpmuludq gives
// both halves of the 32x32-bit product and no blends are needed (the high halves of the lanes carry
// garbage that vpmuludq ignores). 12 instructions per round for 16 counters instead of 16. The result
// is packed back to 16 x 32-bit lanes in counter_offsets() order.
#define TSAM_HAVE_PHILOX_BLOCK 1
template <typename KeysT>
inline void philox_block(const KeysT& key, uint64_t base, uint32_t round_a, uint32_t round_b, int rounds,
                         vi& w0, vi& w1, vi& w2, vi& w3) {
  // 64-bit lane l of half h handles the counter that lands in 32-bit lane 8h + l after the final pack
  const __m512i off0 = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13);
  const __m512i off1 = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i b = _mm512_set1_epi64(static_cast<long long>(base));
  __m512i a0 = _mm512_add_epi64(b, off0), a1 = _mm512_add_epi64(b, off1);  // 64-bit adds: carries for free
  __m512i b0 = _mm512_srli_epi64(a0, 32), b1 = _mm512_srli_epi64(a1, 32);
  __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();
  __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
  const __m512i ma = _mm512_set1_epi64(round_a), mb = _mm512_set1_epi64(round_b);
  for (int r = 0; r < rounds; ++r) {
    const __m512i k0 = _mm512_set1_epi64(key.k0[r]), k1 = _mm512_set1_epi64(key.k1[r]);
    const __m512i pb0 = _mm512_mul_epu32(c0, mb), pb1 = _mm512_mul_epu32(c1, mb);
    const __m512i pa0 = _mm512_mul_epu32(a0, ma), pa1 = _mm512_mul_epu32(a1, ma);
    a0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb0, 32), b0, k0, 0x96);
    a1 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb1, 32), b1, k0, 0x96);
    c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa0, 32), d0, k1, 0x96);
    c1 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa1, 32), d1, k1, 0x96);
    b0 = pb0;
    b1 = pb1;
    d0 = pa0;
    d1 = pa1;
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  w0 = _mm512_permutex2var_epi32(a0, even, a1);
  w1 = _mm512_permutex2var_epi32(b0, even, b1);
  w2 = _mm512_permutex2var_epi32(c0, even, c1);
  w3 = _mm512_permutex2var_epi32(d0, even, d1);
}
