// The kernels compiled for AVX2 + FMA + F16C; chosen at run time (ops.cpp).
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
#pragma GCC target("avx2,fma,f16c")
#define TSAM_ISA_AVX2
#endif
#define TSAM_ISA_NAME "avx2"
#define TSAM_TABLE kTableAVX2
namespace tsam_fast {
#include "kernels.h"
}  // namespace tsam_fast
