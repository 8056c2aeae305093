// Argument-error text in Python's spelling, shared by every op's checks: shapes as tuples
// "(2, 3)", "(5,)"; dtypes as "torch.float32" rather than c10's "Float".
#pragma once
#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>

namespace moe_route {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

inline std::string shape_str(const at::Tensor& t) { return shape_str(t.sizes()); }

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

}  // namespace moe_route
