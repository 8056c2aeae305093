// Host shim (see cuda_runtime.h): __half as GCC's _Float16, conversions round to nearest even.
#pragma once
#include "cuda_runtime.h"

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return __half{_Float16(f)}; }
