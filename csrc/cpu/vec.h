// The CPU kernels' vectors (GCC/Clang vector extensions) and their comparisons.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

namespace moe_route {
namespace {

// 8-lane vectors (GCC/Clang vector extensions): AVX2 or AVX-512VL in those variants, SSE pairs in
// the baseline, with identical results since every lane keeps its own order of operations.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));  // two f32x8: one AVX-512 register
typedef int32_t i32x16 __attribute__((vector_size(64)));

// Lane-wise comparisons (masks: all ones where true) and m ? a : b, for one float or a vector:
// by 16-byte pieces under MOE_ROUTE_SPLIT_CONDITIONS (isa.h; GCC's aarch64 build of gate.cpp
// had 3223 scalar compares before), the operators elsewhere. The bits are the same either way.
constexpr bool kPieces = MOE_ROUTE_SPLIT_CONDITIONS;
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
template <typename V> struct PieceOf;
template <> struct PieceOf<f32x8> { typedef f32x4 type; };
template <> struct PieceOf<f32x16> { typedef f32x4 type; };
template <> struct PieceOf<i32x8> { typedef i32x4 type; };
template <> struct PieceOf<i32x16> { typedef i32x4 type; };
template <typename V> using Piece = typename PieceOf<V>::type;

template <typename V>
MOE_ROUTE_INLINE Piece<V> piece(const V& v, int i) {
  Piece<V> out;
  std::memcpy(&out, reinterpret_cast<const char*>(&v) + sizeof out * i, sizeof out);
  return out;
}

// f of the arguments' 16-byte pieces, piece by piece (memcpy: GCC lowers a shuffle that takes
// a vector's upper half lane by lane too).
template <typename R, typename F, typename... V>
MOE_ROUTE_INLINE R by_pieces(F f, const V&... v) {
  R r;
  for (int i = 0; i < int(sizeof r / 16); ++i) {
    const Piece<R> out = f(piece(v, i)...);
    std::memcpy(reinterpret_cast<char*>(&r) + 16 * i, &out, 16);
  }
  return r;
}

template <typename V, typename Op>
MOE_ROUTE_INLINE auto compare(V a, V b, Op op) {
  if constexpr (kPieces && !std::is_arithmetic_v<V>)
    return by_pieces<decltype(op(a, b))>(op, a, b);
  else
    return op(a, b);
}
template <typename V> MOE_ROUTE_INLINE auto vgt(V a, V b) {
  return compare(a, b, [](auto x, auto y) { return x > y; });
}
template <typename V> MOE_ROUTE_INLINE auto vge(V a, V b) {
  return compare(a, b, [](auto x, auto y) { return x >= y; });
}
template <typename V> MOE_ROUTE_INLINE auto vlt(V a, V b) {
  return compare(a, b, [](auto x, auto y) { return x < y; });
}
template <typename V> MOE_ROUTE_INLINE auto vle(V a, V b) {
  return compare(a, b, [](auto x, auto y) { return x <= y; });
}
template <typename V> MOE_ROUTE_INLINE auto veq(V a, V b) {
  return compare(a, b, [](auto x, auto y) { return x == y; });
}
template <typename V> MOE_ROUTE_INLINE auto vne(V a, V b) {
  return compare(a, b, [](auto x, auto y) { return x != y; });
}
template <typename M, typename V>
MOE_ROUTE_INLINE V vsel(M m, V a, V b) {
  if constexpr (kPieces && !std::is_arithmetic_v<V>)
    return by_pieces<V>([](auto c, auto x, auto y) { return c ? x : y; }, m, a, b);
  else
    return m ? a : b;
}

}  // namespace
}  // namespace moe_route
