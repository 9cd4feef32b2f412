// Argument checks for the decode kernels, with messages joined without iostreams.
//
// TORCH_CHECK formats a message of several parts through std::ostringstream, in this extension's own
// code. On the GPU machines' image (torch 2.11.0+cu130 with its g++, 2026-11) that formatting crashed
// the process (SIGSEGV in std::ostream::_M_insert<long>, called from c10::str), so a rejected argument
// killed a server instead of raising an error. DECODE_CHECK joins the parts with std::to_string into one
// std::string, which TORCH_CHECK passes on untouched.
#pragma once
#include <torch/extension.h>

#include <string>
#include <type_traits>

namespace decode {

inline std::string message_part(const char* text) { return text; }
inline std::string message_part(const std::string& text) { return text; }
inline std::string message_part(at::ScalarType type) { return c10::toString(type); }
template <typename Number, typename = std::enable_if_t<std::is_arithmetic_v<Number>>>
std::string message_part(Number number) {
  return std::to_string(number);
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  return (std::string() + ... + message_part(parts));
}

}  // namespace decode

#define DECODE_CHECK(cond, ...) TORCH_CHECK(cond, ::decode::message(__VA_ARGS__))
