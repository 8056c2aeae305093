// The CPU kernels' vectors (GCC/Clang vector extensions), their comparisons and shuffles.
#pragma once

#include <algorithm>
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

// Four lanes of (a, b) (lanes 0-7 of a, 8-15 of b) as one 16-byte shuffle of the two pieces
// they come from (pieces 0-3: a's halves, then b's).
template <int L0, int L1, int L2, int L3, typename V>
MOE_ROUTE_INLINE Piece<V> shuffle_piece(const V& a, const V& b) {
  constexpr int first = std::min({L0 / 4, L1 / 4, L2 / 4, L3 / 4});
  constexpr int last = std::max({L0 / 4, L1 / 4, L2 / 4, L3 / 4});
  constexpr auto from_two = [](int l) { return l / 4 == first || l / 4 == last; };
  static_assert(from_two(L0) && from_two(L1) && from_two(L2) && from_two(L3),
                "a piece's lanes come from at most two pieces");
  constexpr auto at = [](int l) { return l % 4 + (l / 4 == first ? 0 : 4); };
  const Piece<V> x = first < 2 ? piece(a, first) : piece(b, first - 2);
  const Piece<V> y = last < 2 ? piece(a, last) : piece(b, last - 2);
  return __builtin_shufflevector(x, y, at(L0), at(L1), at(L2), at(L3));
}

// __builtin_shufflevector(a, b, I...) of two 8-lane vectors. Under MOE_ROUTE_SPLIT_CONDITIONS,
// where GCC builds a shuffle of 32-byte vectors lane by lane, each 16-byte piece of the result is
// one shuffle of the (at most two) pieces of a and b that its lanes come from.
template <int... I, typename V>
MOE_ROUTE_INLINE V shuffle(const V& a, const V& b) {
  static_assert(sizeof...(I) == 8 && sizeof(V) == 32, "8 lanes of 8-lane vectors");
  if constexpr (kPieces) {
    constexpr int lane[8] = {I...};
    V r;
    const Piece<V> lo = shuffle_piece<lane[0], lane[1], lane[2], lane[3]>(a, b);
    const Piece<V> hi = shuffle_piece<lane[4], lane[5], lane[6], lane[7]>(a, b);
    std::memcpy(&r, &lo, 16);
    std::memcpy(reinterpret_cast<char*>(&r) + 16, &hi, 16);
    return r;
  } else {
    return __builtin_shufflevector(a, b, I...);
  }
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
