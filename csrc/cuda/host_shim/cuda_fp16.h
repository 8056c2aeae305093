// Host emulation (see cuda_runtime.h): __half as GCC's _Float16, conversions round to nearest
// even.
#pragma once
#include "cuda_runtime.h"

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return __half{_Float16(f)}; }
inline __half __ushort_as_half(unsigned short bits) {
  __half h;
  std::memcpy(&h.v, &bits, 2);
  return h;
}
inline unsigned short __half_as_ushort(__half h) {
  unsigned short bits;
  std::memcpy(&bits, &h.v, 2);
  return bits;
}
