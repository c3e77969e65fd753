// What every mmfuse op source uses from torch, through the LibTorch stable ABI only: tensors as
// torch::stable::Tensor, allocation and the few ATen ops we call through the stable ops (or the
// dispatcher's boxed call), threads through the stable parallel_for, errors through
// MMFUSE_CHECK (std::runtime_error). The ops library is compiled with TORCH_TARGET_VERSION (setup.py: torch 2.11),
// under which ATen's and c10's headers refuse to be included, so nothing here can reach a C++
// symbol of torch; tools/check_abi.py checks the built library's undefined symbols to be sure.
//
// The pattern follows the stable-ABI guide of PyTorch ("LibTorch Stable ABI", docs.pytorch.org,
// cpp/stable) and the ports torchaudio and FlashAttention 3 made; the code is ours.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace mmfuse {

using Tensor = torch::stable::Tensor;
using Device = torch::stable::Device;
using ScalarType = torch::headeronly::ScalarType;
using DeviceType = torch::headeronly::DeviceType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;

namespace detail {
template <typename... Args>
[[noreturn]] inline void fail(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  throw std::runtime_error(out.str());
}
}  // namespace detail

// A failed check throws std::runtime_error, which Python sees as RuntimeError carrying the streamed
// message alone, as TORCH_CHECK's did (STD_TORCH_CHECK would prepend the C++ function, file and line).
#define MMFUSE_CHECK(cond, ...)                                            \
  do {                                                                     \
    if (__builtin_expect(!(cond), 0)) ::mmfuse::detail::fail(__VA_ARGS__); \
  } while (0)

namespace dtype {
constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kInt = ScalarType::Int;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kBool = ScalarType::Bool;
constexpr ScalarType kByte = ScalarType::Byte;
}  // namespace dtype

inline bool is_floating(ScalarType t) {
  return t == dtype::kFloat || t == dtype::kDouble || t == dtype::kHalf || t == dtype::kBFloat16;
}

// at::isFloatingType: the float8 types too
inline bool is_floating_type(ScalarType t) {
  switch (t) {
    case ScalarType::Float8_e5m2: case ScalarType::Float8_e4m3fn: case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fnuz: case ScalarType::Float8_e8m0fnu:
      return true;
    default:
      return is_floating(t);
  }
}

inline bool is_integral(ScalarType t, bool include_bool = false) {
  switch (t) {
    case ScalarType::Byte: case ScalarType::Char: case ScalarType::Short: case ScalarType::Int:
    case ScalarType::Long: case ScalarType::UInt16: case ScalarType::UInt32: case ScalarType::UInt64:
      return true;
    case ScalarType::Bool:
      return include_bool;
    default:
      return false;
  }
}

// "[2, 3, 4]", as at::IntArrayRef prints, for error messages.
inline std::string shape_str(IntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << "]";
  return out.str();
}
inline std::string shape(const Tensor& t) { return shape_str(t.sizes()); }

inline int64_t nbytes(const Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

// The element pointer of a tensor whose dtype the caller checked (mutable_data_ptr<T> checks it again).
template <typename T>
inline T* ptr(const Tensor& t) {
  return t.mutable_data_ptr<T>();
}

// ---- allocation: like at::empty/zeros/full with `like`'s device --------------------------------
inline Tensor empty(IntArrayRef sizes, ScalarType type, const Device& device) {
  return torch::stable::empty(sizes, type, std::nullopt, device);
}
// The outputs are allocated through the C shim aoti_torch_empty_strided, which calls
// at::empty_strided directly. torch::stable::new_empty/new_zeros/full (for a torch 2.10+ target)
// go through torch_call_dispatcher, which looks the op up by its name and boxes every argument,
// each call: about 1 us a tensor, most of what the stable ABI added to the smallest ops
// (benchmarks/call_overhead.py). Contiguous, on `like`'s device.
namespace detail {
constexpr size_t kMaxDims = 8;  // no mmfuse output has more
inline Tensor empty_on(const Tensor& like, IntArrayRef sizes, ScalarType type) {
  const size_t n = sizes.size();
  MMFUSE_CHECK(n <= kMaxDims, "mmfuse: an output of at most ", kMaxDims, " dimensions, got ", n);
  std::array<int64_t, kMaxDims> strides{};
  int64_t stride = 1;
  for (size_t i = n; i-- > 0;) {  // torch's contiguous strides: a size-0 or 1 dimension counts as 1
    strides[i] = stride;
    stride *= sizes[i] > 1 ? sizes[i] : 1;
  }
  int32_t device_type = 0, device_index = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  const int32_t shim_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(type));
  AtenTensorHandle out = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(n), sizes.data(), strides.data(),
                                                         shim_dtype, device_type, device_index, &out));
  return Tensor(out);
}
}  // namespace detail

inline Tensor empty_like_as(const Tensor& like, IntArrayRef sizes, std::optional<ScalarType> type = std::nullopt) {
  return detail::empty_on(like, sizes, type.value_or(like.scalar_type()));
}
inline Tensor zeros_like_as(const Tensor& like, IntArrayRef sizes, std::optional<ScalarType> type = std::nullopt) {
  if (!like.is_cpu()) return torch::stable::new_zeros(like, sizes, type);
  Tensor out = empty_like_as(like, sizes, type);
  if (out.numel() > 0) std::memset(out.data_ptr(), 0, static_cast<size_t>(out.numel()) * out.element_size());
  return out;
}
inline Tensor full_like_as(const Tensor& like, IntArrayRef sizes, double value, ScalarType type) {
  if (!like.is_cpu() || type != ScalarType::Long) return torch::stable::full(sizes, value, type, std::nullopt, like.device());
  Tensor out = empty_like_as(like, sizes, type);
  int64_t* data = out.numel() > 0 ? out.mutable_data_ptr<int64_t>() : nullptr;
  std::fill(data, data + out.numel(), static_cast<int64_t>(value));
  return out;
}
inline Tensor to_dtype(const Tensor& t, ScalarType type) {
  return t.scalar_type() == type ? t : torch::stable::to(t, type);
}
inline Tensor contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// ---- any other ATen op: the dispatcher's boxed call, by schema name ----------------------------
// call_op("aten::gelu", "", x, std::string("none")) runs aten::gelu(x, approximate="none") through
// torch_call_dispatcher (stable from torch 2.10) and returns its first output.
template <typename... Args>
inline Tensor call_op(const char* name, const char* overload, const Args&... args) {
  constexpr size_t n = sizeof...(Args) > 0 ? sizeof...(Args) : 1;
  std::array<StableIValue, n> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// ---- registration: MMFUSE_BOX(&fn) is the boxed kernel STABLE_TORCH_LIBRARY_IMPL's m.impl takes --------
// Like torch's TORCH_BOX (the arguments unboxed from the stable stack, the results boxed back), but a
// `str` argument is read from its string handle, which is then freed: torch 2.13's own unboxing of
// std::string (stableivalue_conversions.h) copies into a `new std::string` that it never deletes, a
// leak on every call of an op with a `str` argument.
namespace detail {
template <typename T>
struct Unbox {
  static T call(StableIValue v) { return torch::stable::detail::to<T>(v); }
};
template <>
struct Unbox<std::string> {
  static std::string call(StableIValue v) {
    StringHandle handle = torch::stable::detail::to<StringHandle>(v);
    size_t length = 0;
    const char* data = nullptr;
    STABLE_TORCH_ERROR_CODE_CHECK(torch_string_length(handle, &length));
    STABLE_TORCH_ERROR_CODE_CHECK(torch_string_c_str(handle, &data));
    std::string out(data, length);
    STABLE_TORCH_ERROR_CODE_CHECK(torch_delete_string(handle));
    return out;
  }
};
template <typename T>
using bare_t = std::remove_cv_t<std::remove_reference_t<T>>;
template <typename T>
struct is_tuple : std::false_type {};
template <typename... T>
struct is_tuple<std::tuple<T...>> : std::true_type {};

template <auto F>
struct Boxer;
template <typename R, typename... A, R (*F)(A...)>
struct Boxer<F> {
  template <size_t... I>
  static std::tuple<bare_t<A>...> unbox(StableIValue* stack, std::index_sequence<I...>) {
    return std::tuple<bare_t<A>...>(Unbox<bare_t<A>>::call(stack[I])...);
  }
  template <typename Tuple, size_t... I>
  static void box(StableIValue* stack, const Tuple& results, std::index_sequence<I...>) {
    ((stack[I] = torch::stable::detail::from(std::get<I>(results))), ...);
  }
  static void call(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
    constexpr size_t outputs = [] {
      if constexpr (is_tuple<R>::value) return std::tuple_size_v<R>;
      else return size_t(1);
    }();
    STD_TORCH_CHECK(num_args == sizeof...(A) && num_outputs == outputs, "mmfuse: the registered schema has ",
                    num_args, " arguments and ", num_outputs, " outputs, the kernel ", sizeof...(A), " and ", outputs);
    auto args = unbox(stack, std::index_sequence_for<A...>());
    R results = std::apply(F, args);
    if constexpr (is_tuple<R>::value) box(stack, results, std::make_index_sequence<outputs>());
    else stack[0] = torch::stable::detail::from(results);
  }
};
}  // namespace detail
#define MMFUSE_BOX(fn) (&::mmfuse::detail::Boxer<fn>::call)

// ---- threads ----------------------------------------------------------------------------------
// A range of one grain or less runs here, on the calling thread, as at::parallel_for runs it:
// the stable parallel_for is a call into torch's C shim through a type-erased callback (~0.1-0.2
// us), which the smallest ops would pay on every call.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  if (end - begin <= grain) {
    f(begin, end);
    return;
  }
  torch::stable::parallel_for(begin, end, grain, f);
}
inline int64_t num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

// ---- dtype dispatch: body runs with scalar_t bound to the tensor's element type -----------------
#define MMFUSE_DISPATCH_CASE(enum_value, type, ...) \
  case enum_value: {                                \
    using scalar_t = type;                          \
    __VA_ARGS__();                                  \
    break;                                          \
  }
#define MMFUSE_DISPATCH_DEFAULT(st, name) \
  default:                                \
    ::mmfuse::detail::fail(name, ": unsupported dtype ", st);

// float, double
#define MMFUSE_DISPATCH_FLOATING(TYPE, NAME, ...)                             \
  [&] {                                                                       \
    const ::mmfuse::ScalarType _st = (TYPE);                                  \
    switch (_st) {                                                            \
      MMFUSE_DISPATCH_CASE(::mmfuse::ScalarType::Float, float, __VA_ARGS__)   \
      MMFUSE_DISPATCH_CASE(::mmfuse::ScalarType::Double, double, __VA_ARGS__) \
      MMFUSE_DISPATCH_DEFAULT(_st, NAME)                                      \
    }                                                                         \
  }()

// float, double, float16, bfloat16
#define MMFUSE_DISPATCH_FLOATING_AND_HALF(TYPE, NAME, ...)                                   \
  [&] {                                                                                      \
    const ::mmfuse::ScalarType _st = (TYPE);                                                 \
    switch (_st) {                                                                           \
      MMFUSE_DISPATCH_CASE(::mmfuse::ScalarType::Float, float, __VA_ARGS__)                  \
      MMFUSE_DISPATCH_CASE(::mmfuse::ScalarType::Double, double, __VA_ARGS__)                \
      MMFUSE_DISPATCH_CASE(::mmfuse::ScalarType::Half, ::mmfuse::Half, __VA_ARGS__)          \
      MMFUSE_DISPATCH_CASE(::mmfuse::ScalarType::BFloat16, ::mmfuse::BFloat16, __VA_ARGS__)  \
      MMFUSE_DISPATCH_DEFAULT(_st, NAME)                                                     \
    }                                                                                        \
  }()

// the accumulation type of a storage type: float for the 16-bit floats, else itself
template <typename T>
struct opmath {
  using type = T;
};
template <>
struct opmath<Half> {
  using type = float;
};
template <>
struct opmath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename opmath<T>::type;

template <typename T>
constexpr ScalarType scalar_type_of();
template <>
constexpr ScalarType scalar_type_of<float>() { return ScalarType::Float; }
template <>
constexpr ScalarType scalar_type_of<double>() { return ScalarType::Double; }
template <>
constexpr ScalarType scalar_type_of<Half>() { return ScalarType::Half; }
template <>
constexpr ScalarType scalar_type_of<BFloat16>() { return ScalarType::BFloat16; }

// ---- added for cross_attention.cpp
// "cpu", "cuda:0", as c10::Device prints, for error messages.
inline std::string device_str(const Device& device) {
  static constexpr const char* kNames[] = {"cpu",  "cuda",   "mkldnn", "opengl", "opencl", "ideep", "hip",
                                           "fpga", "maia",   "xla",    "vulkan", "metal",  "xpu",   "mps",
                                           "meta", "hpu",    "ve",     "lazy",   "ipu",    "mtia",  "privateuseone"};
  const int type = static_cast<int>(device.type());
  std::string out = type >= 0 && type < static_cast<int>(sizeof(kNames) / sizeof(kNames[0]))
                        ? kNames[type]
                        : "device" + std::to_string(type);
  if (device.index() >= 0) out += ":" + std::to_string(static_cast<int>(device.index()));
  return out;
}

}  // namespace mmfuse
