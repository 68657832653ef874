// Error handling shared by every kernel entry point.
//
// Kernels never crash on bad input: they validate what they are given and throw
// jmp_ext::InvalidInput, which the bindings turn into a Python ValueError whose message names
// the problem. Internal failures (a CUDA launch error, an allocation failure) are
// jmp_ext::Error, a RuntimeError in Python.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace jmp_ext {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct InvalidInput : Error {
  using Error::Error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace detail

}  // namespace jmp_ext

// JMP_CHECK(cond, "message parts", value, ...): throw InvalidInput when cond is false.
#define JMP_CHECK(cond, ...)                                                  \
  do {                                                                        \
    if (!(cond)) {                                                            \
      throw ::jmp_ext::InvalidInput(::jmp_ext::detail::concat(__VA_ARGS__)); \
    }                                                                         \
  } while (0)
