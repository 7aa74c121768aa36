// The kernels compiled for AVX-512 (F, DQ, BW, VL) + FMA + F16C; chosen at run time (ops.cpp).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernel_api.h"

// On other architectures this unit holds portable kernels under the same name; ops.cpp never
// selects it there (cpu_has_*() is false), it only keeps the link complete.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,bmi2")
#define TSAM_ISA_AVX512
#endif
#define TSAM_ISA_NAME "avx512"
#define TSAM_TABLE kTableAVX512
namespace tsam_fast {
#include "kernels.h"
}  // namespace tsam_fast
