#pragma once
// Runtime flags to compile-time constants (host code), in the spirit of FlashAttention's
// BOOL_SWITCH: bool_switch(b, [&](auto B) { kernel<decltype(B)::value>(...); }) instantiates the
// body for true and false and calls the one that b selects; int_switch<N> does the same for
// 0 .. N-1. Nest them for several flags.
#include <type_traits>
#include <utility>

#include <c10/util/Exception.h>

namespace natasha {

template <typename F>
void bool_switch(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

namespace detail {
template <int I, int N, typename F>
void int_switch(int v, F&& f) {
  if constexpr (I < N) {
    if (v == I) f(std::integral_constant<int, I>{});
    else int_switch<I + 1, N>(v, std::forward<F>(f));
  } else {
    TORCH_CHECK(false, "int_switch: value ", v, " out of range [0, ", N, ")");
  }
}
}  // namespace detail

template <int N, typename F>
void int_switch(int v, F&& f) {
  detail::int_switch<0, N>(v, std::forward<F>(f));
}

}  // namespace natasha
