// The kernels for any CPU (no SIMD assumptions beyond the compiler's baseline); the fallback of ops.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernel_api.h"

#define TSAM_ISA_NAME "scalar"
#define TSAM_TABLE kTableScalar
namespace tsam_fast {
#include "kernels.h"
}  // namespace tsam_fast
