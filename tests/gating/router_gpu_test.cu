// SPDX-License-Identifier: Apache-2.0
// The CUDA router (gating/kernels/router.cuh, slots.cuh) against the host backend
// (gating/router.hpp), output by output, on fresh random inputs with every output poisoned
// first. Selection is discontinuous, so the inputs make the logits exact on both backends:
// x on ±j/8 (j = 1..8) and W_gate on ±m/2^(6+s) (m = 1..64, s growing with H so that the
// logits stay O(1)). Every product and partial sum is then a float, in float, half and
// bfloat16 alike, whatever order cuBLAS sums in. Experts, slots, loads, capacity and drops
// must then match exactly; scores, weights, losses and gradients to 1e-5 relative to their
// row (or tensor) scale, except dx and dW_gate in half/bfloat16 (1e-2). Skipped (exit 77)
// without a CUDA device.

#include "../support/expect.hpp"
#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/core.hpp>
#include <moe/core/blas.hpp>
#include <moe/gating.hpp>
#include <moe/gating/kernels/router.cuh>
#include <moe/gating/kernels/slots.cuh>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace moe;
using test::host_tensor;

/// The test's stream and cuBLAS handle; outlives every buffer of a case.
struct cuda_context {
  cudaStream_t stream{};
  blas_handle blas;

  cuda_context() { MOE_CUDA_TRY(cudaStreamCreate(&stream)); }
  cuda_context(cuda_context const&) = delete;
  cuda_context& operator=(cuda_context const&) = delete;
  ~cuda_context() {
    MOE_CUDA_TRY_LOG(cudaStreamSynchronize(stream));
    MOE_CUDA_TRY_LOG(cudaStreamDestroy(stream));
  }
  [[nodiscard]] cuda_backend backend() const { return {stream, blas.get()}; }
};

/// `count` elements of T in device memory.
template <class T>
struct device_array {
  device_buffer<> buffer;
  index_t count;

  device_array(index_t n, cudaStream_t stream)
      : buffer(std::max<std::size_t>(static_cast<std::size_t>(n) * sizeof(T), 1), stream),
        count(n) {}
  /// A copy of `host`.
  device_array(std::vector<T> const& host, cudaStream_t stream)
      : device_array(static_cast<index_t>(host.size()), stream) {
    MOE_CUDA_TRY(cudaMemcpyAsync(data(), host.data(), host.size() * sizeof(T),
                                 cudaMemcpyHostToDevice, stream));
  }
  [[nodiscard]] T* data() const { return reinterpret_cast<T*>(buffer.view().data()); }
  template <class... Extents>
  [[nodiscard]] auto view(Extents... extents) const {
    return make_view(data(), extents...);
  }
  template <class... Extents>
  [[nodiscard]] auto cview(Extents... extents) const {
    return make_view(static_cast<T const*>(data()), extents...);
  }
};

/// Copies `count` elements from device memory; waits for the stream.
template <class T>
std::vector<T> download(T const* data, index_t count, cudaStream_t stream) {
  std::vector<T> host(static_cast<std::size_t>(count));
  if (count > 0)
    MOE_CUDA_TRY(cudaMemcpyAsync(host.data(), data, host.size() * sizeof(T), cudaMemcpyDeviceToHost,
                                 stream));
  MOE_CUDA_TRY(cudaStreamSynchronize(stream));
  return host;
}

template <class T, class E, class L, class A>
std::vector<std::remove_cv_t<T>> download(mdspan_of<T, E, L, A> const& view, cudaStream_t stream) {
  return download(static_cast<std::remove_cv_t<T> const*>(view.data_handle()), element_count(view),
                  stream);
}

void poison(void* data, std::size_t bytes, cudaStream_t stream) {
  MOE_CUDA_TRY(cudaMemsetAsync(data, 0xff, bytes, stream));
}

bool all_poisoned(std::vector<std::byte> const& bytes) {
  return std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0xff}; });
}

template <class T, class E, class L, class A>
std::vector<double> to_doubles(mdspan_of<T, E, L, A> const& view) {
  std::vector<double> out(static_cast<std::size_t>(element_count(view)));
  for (std::size_t i = 0; i < out.size(); ++i)
    out[i] = static_cast<double>(to_accumulate(view.data_handle()[i]));
  return out;
}

/// The elements of a host view, as they are.
template <class T, class E, class L, class A>
std::vector<std::remove_cv_t<T>> host_copy(mdspan_of<T, E, L, A> const& view) {
  return {view.data_handle(), view.data_handle() + element_count(view)};
}

template <class T>
std::vector<double> to_doubles(std::vector<T> const& v) {
  return to_doubles(make_view(v.data(), static_cast<index_t>(v.size())));
}

/// Checks |device − host| ≤ tol · scale element by element, scale being the largest |host|
/// of the element's row of `columns`, floored at 1e-3 of the whole tensor's (a row that
/// cancels to nearly nothing is judged against the tensor). Reports the worst element once.
void check_close(char const* what, std::vector<double> const& device,
                 std::vector<double> const& host, index_t columns, double tol) {
  REQUIRE(device.size() == host.size());
  double tensor_scale = 0;
  for (double h : host) tensor_scale = std::max(tensor_scale, std::abs(h));
  double worst = 0;  // error / allowed; > 1 fails; NaN fails
  std::size_t worst_at = 0;
  bool failed = false;
  auto const cols = static_cast<std::size_t>(std::max<index_t>(columns, 1));
  for (std::size_t row = 0; row * cols < host.size(); ++row) {
    double scale = 0;
    for (std::size_t c = 0; c < cols; ++c) scale = std::max(scale, std::abs(host[row * cols + c]));
    scale = std::max({scale, 1e-3 * tensor_scale, 1e-30});
    for (std::size_t c = 0; c < cols; ++c) {
      std::size_t const i = row * cols + c;
      double const ratio = std::abs(device[i] - host[i]) / (tol * scale);
      if (!(ratio <= 1)) failed = true;
      if (!(ratio <= worst)) {
        worst = ratio;
        worst_at = i;
      }
    }
  }
  CHECK_MESSAGE(!failed, std::string(what)
                             << ": worst element " << worst_at << " (row " << worst_at / cols
                             << "): device " << device[worst_at] << ", host " << host[worst_at]
                             << ", error/allowed " << worst);
}

template <class D, class H>
void check_equal(char const* what, std::vector<D> const& device, std::vector<H> const& host) {
  REQUIRE(device.size() == host.size());
  auto const [d, h] = std::mismatch(device.begin(), device.end(), host.begin(),
                                    [](D a, H b) { return static_cast<H>(a) == b; });
  CHECK_MESSAGE(d == device.end(), std::string(what)
                                       << ": first difference at " << (d - device.begin())
                                       << ": device " << (d == device.end() ? 0 : *d) << ", host "
                                       << (h == host.end() ? 0 : *h));
}

/// ±j/8, j = 1..8: every x is exact in half and bfloat16.
template <class T>
void fill_x(host_tensor<T>& x, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> j(1, 8), sign(0, 1);
  for (auto& v : x.data)
    v = from_accumulate<T>(static_cast<float>(sign(rng) ? j(rng) : -j(rng)) / 8.0f);
}

/// ±m/2^(6+s), m = 1..64, s = max(0, ⌊log2(H)/2⌋ − 1): the logits stay O(1) for large H,
/// and Σ_h |x·w| ≤ H/2^s needs at most 21 bits above the grid's 2^-(9+s): exact in float.
template <class T>
void fill_w(host_tensor<T>& w, index_t hidden, std::mt19937_64& rng) {
  int const s =
      std::max(0, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(hidden)) - 1) / 2 - 1);
  float const unit = std::ldexp(1.0f, -(6 + s));
  std::uniform_int_distribution<int> m(1, 64), sign(0, 1);
  for (auto& v : w.data)
    v = from_accumulate<T>(static_cast<float>(sign(rng) ? m(rng) : -m(rng)) * unit);
}

struct case_config {
  index_t tokens, experts, hidden;
  int k;
  float factor = 1.25f;
  index_t alignment = 1;
  gating::renormalize normalize = gating::renormalize::none;
  float aux_coef = 0.5f;
  float z_coef = 0.25f;
  float scaling = 1.0f;
  bool training = true;
  float eval_factor = 1.0f;
};

char const* name_of(gating::renormalize n) {
  switch (n) {
    case gating::renormalize::none:
      return "none";
    case gating::renormalize::before_drops:
      return "before_drops";
    case gating::renormalize::after_drops:
      return "after_drops";
  }
  return "?";
}

/// Routes one random problem forward and backward on both backends and compares every
/// output. G is the gate, T the element type of x and W_gate.
template <class G, class T>
void compare_with_host(cuda_context& cuda, G const& gate, case_config const& c) {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed << ", dtype " << std::string(dtype_traits<T>::name) << ", T " << c.tokens
               << ", E " << c.experts << ", H " << c.hidden << ", k " << c.k << ", static k "
               << gating::detail::static_k_of<G> << ", f " << c.factor << ", alignment "
               << c.alignment << ", normalize " << std::string(name_of(c.normalize)) << ", α "
               << c.scaling << ", training " << c.training);
  std::mt19937_64 rng(seed);
  index_t const T_ = c.tokens, E = c.experts, H = c.hidden;
  int const k = c.k;
  gating::gate_args const args{.tokens = T_,
                               .experts = E,
                               .k = gating::static_k_gate<G> ? 0 : k,
                               .capacity_factor = c.factor,
                               .capacity_alignment = c.alignment,
                               .normalize = c.normalize,
                               .aux_loss_coef = c.aux_coef,
                               .z_loss_coef = c.z_coef,
                               .training = c.training,
                               .eval_capacity_factor = c.eval_factor,
                               .scaling_factor = c.scaling};
  REQUIRE(gate.k(args) == k);

  host_tensor<T> x(T_ * H), w(H * E), dx0(T_ * H);
  fill_x(x, rng);
  fill_w(w, H, rng);
  dx0.randomize(rng);
  host_tensor<float> d_weight(T_ * k);
  d_weight.randomize(rng);

  // --- host reference ---
  workspace_carver host_counter;
  (void)gating::carve_host_routing(host_counter, T_, T_, E, k);
  host_buffer host_memory(host_counter.bytes());
  workspace_carver host_carver(host_memory.view());
  gating::host_routing hr = gating::carve_host_routing(host_carver, T_, T_, E, k);
  gating::routing_summary const expected =
      gating::route(host, gate, args, x.cview(T_, H), w.cview(H, E), hr);

  host_tensor<double> x_d(T_ * H), d_weight_d(T_ * k), d_logits_h(T_ * E), dx_h(T_ * H);
  for (std::size_t i = 0; i < x.data.size(); ++i) x_d.data[i] = to_accumulate(x.data[i]);
  for (std::size_t i = 0; i < d_weight.data.size(); ++i) d_weight_d.data[i] = d_weight.data[i];
  for (std::size_t i = 0; i < dx0.data.size(); ++i) dx_h.data[i] = to_accumulate(dx0.data[i]);
  host_tensor<T> d_w_gate_h(H * E);
  gating::route_backward(host, gate, args, hr, d_weight_d.cview(T_, k), x_d.cview(T_, H),
                         w.cview(H, E), d_logits_h.view(T_, E), dx_h.view(T_, H),
                         d_w_gate_h.view(H, E));

  // --- device ---
  cudaStream_t const stream = cuda.stream;
  device_array const x_dev(x.data, stream);
  device_array const w_dev(w.data, stream);
  workspace_carver counter;
  (void)gating::carve_device_routing(counter, T_, T_, E, k);
  device_buffer<> routing_memory(counter.bytes(), stream);
  poison(routing_memory.view().data(), routing_memory.size(), stream);
  workspace_carver carver(routing_memory.view());
  gating::device_routing r = gating::carve_device_routing(carver, T_, T_, E, k);
  device_buffer<> scratch(gating::route_workspace_bytes(gate, args), stream);
  poison(scratch.view().data(), scratch.size(), stream);

  gating::route(cuda.backend(), gate, args, x_dev.cview(T_, H), w_dev.cview(H, E), r,
                scratch.view());
  gating::routing_summary const summary = gating::read_summary(cuda.backend(), r);

  // Logits are exact on both sides, by construction of the inputs.
  check_equal("logits", download(r.logits, stream), host_copy(hr.logits));
  check_close("scores", to_doubles(download(r.scores, stream)), to_doubles(hr.scores), E, 1e-5);
  check_equal("expert", download(r.expert, stream), host_copy(hr.expert));
  check_equal("slot", download(r.slot, stream), host_copy(hr.slot));
  check_equal("load", download(r.load, stream), host_copy(hr.load));
  auto const weight = to_doubles(download(r.weight, stream));
  check_close("weight", weight, to_doubles(hr.weight), k, 1e-5);
  for (index_t i = 0; i < T_ * k; ++i)  // dropped weights are exactly zero, kept ones not
    if ((hr.weight.data_handle()[i] == 0) != (weight[static_cast<std::size_t>(i)] == 0)) {
      FAIL_CHECK("weight " << i << " is zero on one backend only");
      break;
    }
  check_close("mean_score", to_doubles(download(r.mean_score, stream)),
              std::vector<double>(hr.mean_score.begin(), hr.mean_score.end()), E, 1e-5);
  check_close("first_choice", to_doubles(download(r.first_choice, stream)),
              std::vector<double>(hr.first_choice.begin(), hr.first_choice.end()), E, 1e-5);

  CHECK(summary.tokens == expected.tokens);
  CHECK(summary.capacity == expected.capacity);
  CHECK(summary.dropped == expected.dropped);
  CHECK(summary.max_load == expected.max_load);
  check_close("aux_loss", {summary.aux_loss}, {expected.aux_loss}, 1, 1e-5);
  check_close("z_loss", {summary.z_loss}, {expected.z_loss}, 1, 1e-5);

  // --- backward ---
  device_array const d_weight_dev(d_weight.data, stream);
  device_array const dx_dev(dx0.data, stream);
  device_array<float> d_logits_dev(T_ * E, stream);
  device_array<T> d_w_gate_dev(H * E, stream);
  poison(d_logits_dev.data(), static_cast<std::size_t>(T_ * E) * sizeof(float), stream);
  poison(d_w_gate_dev.data(), static_cast<std::size_t>(H * E) * sizeof(T), stream);
  device_buffer<> backward_scratch(gating::route_backward_workspace_bytes<T>(gate, args), stream);
  gating::route_backward(cuda.backend(), gate, args, std::as_const(r), d_weight_dev.cview(T_, k),
                         x_dev.cview(T_, H), w_dev.cview(H, E), d_logits_dev.view(T_, E),
                         dx_dev.view(T_, H), d_w_gate_dev.view(H, E), backward_scratch.view());

  double const gemm_tol = dtype_of<T> == dtype::f32 ? 1e-5 : 1e-2;
  // d_logits against the tensor's scale: where the renormalisation's gradient cancels (all
  // selected kept, weights summing to one), a row holds only what float leaves of O(α · dw)
  // terms, and its own scale says nothing of the error.
  check_close("d_logits", to_doubles(download(d_logits_dev.data(), T_ * E, stream)),
              d_logits_h.data, T_ * E, 1e-5);
  // GEMM outputs against the tensor's scale: a half/bfloat16 element is one rounding away.
  check_close("dx", to_doubles(download(dx_dev.data(), T_ * H, stream)), dx_h.data, T_ * H,
              gemm_tol);
  check_close("d_w_gate", to_doubles(download(d_w_gate_dev.data(), H * E, stream)),
              to_doubles(d_w_gate_h.data), H * E, gemm_tol);
}

/// Runs `body(T{})` for float, __half and __nv_bfloat16 (STYLE §17: a loop, not
/// TEST_CASE_TEMPLATE).
template <class Body>
void for_each_dtype(Body&& body) {
  body(float{});
  body(__half{});
  body(__nv_bfloat16{});
}

/// Routes with the gate that `k` and `use_static` ask for: top_k<2>/top_k<8> when static,
/// top_any otherwise.
template <class T>
void compare_any_gate(cuda_context& cuda, case_config const& c, bool use_static) {
  if (use_static && c.k == 2)
    compare_with_host<gating::top_k<2>, T>(cuda, gating::top_k<2>{}, c);
  else if (use_static && c.k == 8)
    compare_with_host<gating::top_k<8>, T>(cuda, gating::top_k<8>{}, c);
  else
    compare_with_host<gating::top_any<>, T>(cuda, gating::top_any<>{}, c);
}

}  // namespace

TEST_CASE("CUDA route and route_backward match the host over (T, E, k) at H = 8") {
  cuda_context cuda;
  // The options cycle from case to case, so that every capacity rule and renormalisation
  // meets several shapes: f = 0.5 overflows (drops), 0 is dynamic, −1.5 dynamic capped.
  float const factors[] = {1.25f, 0.5f, 0.0f, -1.5f, 2.0f};
  gating::renormalize const modes[] = {gating::renormalize::none, gating::renormalize::before_drops,
                                       gating::renormalize::after_drops};
  index_t const alignments[] = {1, 4};
  int index = 0;
  for (index_t tokens : {1, 7, 128, 4096})
    for (index_t experts : {1, 8, 64, 256})
      for (int k : {1, 2, 8}) {
        if (k > experts) continue;
        for_each_dtype([&](auto element) {
          using T = decltype(element);
          case_config const c{.tokens = tokens,
                              .experts = experts,
                              .hidden = 8,
                              .k = k,
                              .factor = factors[index % 5],
                              .alignment = alignments[index / 5 % 2],
                              .normalize = modes[index / 2 % 3]};
          compare_any_gate<T>(cuda, c, index % 2 == 0);
          ++index;
        });
      }
}

TEST_CASE("CUDA route and route_backward match the host at H = 1000 and 4096") {
  cuda_context cuda;
  struct shape {
    index_t tokens, experts, hidden;
    int k;
    float factor;
    gating::renormalize normalize;
  };
  shape const shapes[] = {
      {128, 64, 1000, 8, 0.5f, gating::renormalize::after_drops},
      {4096, 8, 1000, 2, 1.25f, gating::renormalize::before_drops},
      {7, 256, 4096, 8, 0.0f, gating::renormalize::none},
      {4096, 8, 4096, 2, 0.5f, gating::renormalize::after_drops},
  };
  for (shape const& s : shapes)
    for_each_dtype([&](auto element) {
      using T = decltype(element);
      compare_any_gate<T>(cuda,
                          {.tokens = s.tokens,
                           .experts = s.experts,
                           .hidden = s.hidden,
                           .k = s.k,
                           .factor = s.factor,
                           .normalize = s.normalize},
                          true);
    });
}

TEST_CASE("CUDA route handles many experts, E not a multiple of 32, and k = 32") {
  cuda_context cuda;
  // E = 33: one lane owns two experts; E = 3000 and 4099: lanes loop ~100 times.
  compare_with_host<gating::top_any<>, float>(cuda, gating::top_any<>{},
                                              {.tokens = 100, .experts = 33, .hidden = 8, .k = 32});
  compare_with_host<gating::top_any<>, __nv_bfloat16>(
      cuda, gating::top_any<>{},
      {.tokens = 64,
       .experts = 3000,
       .hidden = 8,
       .k = 32,
       .factor = 0.0f,
       .normalize = gating::renormalize::before_drops});
  compare_with_host<gating::top_k<8>, __half>(
      cuda, gating::top_k<8>{},
      {.tokens = 300, .experts = 4099, .hidden = 8, .k = 8, .factor = 0.5f});
  compare_with_host<gating::top_any<>, float>(cuda, gating::top_any<>{},
                                              {.tokens = 5, .experts = 40, .hidden = 8, .k = 31});
}

TEST_CASE("CUDA route matches the host under token-major priority") {
  cuda_context cuda;
  using gate_t = gating::top_any<gating::softmax, gating::token_major>;
  for (float factor : {0.5f, 0.0f})
    compare_with_host<gate_t, float>(cuda, gate_t{},
                                     {.tokens = 1000,
                                      .experts = 16,
                                      .hidden = 8,
                                      .k = 4,
                                      .factor = factor,
                                      .normalize = gating::renormalize::after_drops});
}

TEST_CASE("CUDA route matches the host under other capacity rules, scaling and evaluation") {
  cuda_context cuda;
  case_config const c{.tokens = 500,
                      .experts = 16,
                      .hidden = 8,
                      .k = 2,
                      .factor = 1.0f,
                      .normalize = gating::renormalize::before_drops,
                      .scaling = 2.5f};
  for (gating::renormalize mode : {gating::renormalize::before_drops,
                                   gating::renormalize::after_drops, gating::renormalize::none}) {
    case_config scaled = c;
    scaled.normalize = mode;
    compare_with_host<gating::top_k<2>, float>(cuda, gating::top_k<2>{}, scaled);
  }
  using gshard_t = gating::with<gating::top_k<2>, gating::gshard_capacity>;
  compare_with_host<gshard_t, __nv_bfloat16>(cuda, gshard_t{}, c);
  using megatron_t = gating::with<gating::top_any<>, gating::megatron_capacity>;
  compare_with_host<megatron_t, float>(
      cuda, megatron_t{}, {.tokens = 300, .experts = 8, .hidden = 8, .k = 8, .factor = 0.5f});
  using fixed_t = gating::with<gating::top_k<8>, gating::deepspeed_capacity,
                               gating::fixed_renormalization<gating::renormalize::after_drops>>;
  compare_with_host<fixed_t, __half>(
      cuda, fixed_t{}, {.tokens = 128, .experts = 64, .hidden = 8, .k = 8, .factor = 0.25f});
  using dropless_t = gating::with<gating::top_k<2>, gating::dropless>;
  compare_with_host<dropless_t, float>(cuda, dropless_t{}, c);
  // Evaluation: the evaluation factor, which overflows here.
  case_config eval = c;
  eval.training = false;
  eval.eval_factor = 0.5f;
  compare_with_host<gating::top_k<2>, float>(cuda, gating::top_k<2>{}, eval);
}

TEST_CASE("CUDA route is deterministic: two calls give the same bytes") {
  cuda_context cuda;
  cudaStream_t const stream = cuda.stream;
  index_t const T_ = 4096, E = 64, H = 64;
  int const k = 2;
  gating::top_k<2> const gate;
  gating::gate_args const args{.tokens = T_,
                               .experts = E,
                               .capacity_factor = 0.5f,
                               .normalize = gating::renormalize::after_drops,
                               .aux_loss_coef = 0.5f,
                               .z_loss_coef = 0.25f};
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  host_tensor<__nv_bfloat16> x(T_ * H), w(H * E);
  x.randomize(rng);  // not dyadic: determinism must not depend on exact sums
  w.randomize(rng);
  device_array const x_dev(x.data, stream);
  device_array const w_dev(w.data, stream);
  workspace_carver counter;
  (void)gating::carve_device_routing(counter, T_, T_, E, k);
  device_buffer<> scratch(gating::route_workspace_bytes(gate, args), stream);
  std::vector<std::byte> first;
  for (int run = 0; run < 2; ++run) {
    device_buffer<> memory(counter.bytes(), stream);
    poison(memory.view().data(), memory.size(), stream);
    workspace_carver carver(memory.view());
    gating::device_routing r = gating::carve_device_routing(carver, T_, T_, E, k);
    gating::route(cuda.backend(), gate, args, x_dev.cview(T_, H), w_dev.cview(H, E), r,
                  scratch.view());
    auto bytes = download(memory.view().data(), static_cast<index_t>(memory.size()), stream);
    if (run == 0)
      first = std::move(bytes);
    else
      CHECK(bytes == first);
  }
}

TEST_CASE("CUDA assign_slots matches the host on skewed loads") {
  cuda_context cuda;
  cudaStream_t const stream = cuda.stream;
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (auto [tokens, experts, k, factor] : {std::tuple{index_t{1000}, index_t{5}, 3, 0.5f},
                                            std::tuple{index_t{70000}, index_t{300}, 4, 0.0f},
                                            std::tuple{index_t{1}, index_t{1}, 1, -1.5f},
                                            std::tuple{index_t{3}, index_t{2}, 2, 1.0f}}) {
    INFO("T " << tokens << ", E " << experts << ", k " << k << ", f " << factor);
    // Half of the assignments go to expert 0: one long segment, many short ones.
    std::uniform_int_distribution<std::int32_t> any(0, static_cast<std::int32_t>(experts - 1));
    std::bernoulli_distribution skew(0.5);
    std::vector<std::int32_t> expert(static_cast<std::size_t>(tokens * k));
    for (auto& e : expert) e = skew(rng) ? 0 : any(rng);
    std::vector<std::int64_t> slot(expert.size()), load(static_cast<std::size_t>(experts));
    gating::assign_slots(gating::choice_major{}, make_view(expert.data(), tokens, k),
                         make_view(slot.data(), tokens, k), make_view(load.data(), experts));
    gating::capacity_args const cap{
        .tokens = tokens, .experts = experts, .k = k, .factor = factor, .alignment = 2};
    std::int64_t const max_load = *std::max_element(load.begin(), load.end());
    std::int64_t const capacity = gating::resolve_capacity(cap, max_load);
    std::int64_t const dropped =
        std::count_if(slot.begin(), slot.end(), [&](std::int64_t s) { return s >= capacity; });

    workspace_carver counter;
    (void)gating::carve_device_routing(counter, tokens, tokens, experts, k);
    device_buffer<> memory(counter.bytes(), stream);
    poison(memory.view().data(), memory.size(), stream);
    workspace_carver carver(memory.view());
    gating::device_routing r = gating::carve_device_routing(carver, tokens, tokens, experts, k);
    MOE_CUDA_TRY(cudaMemcpyAsync(r.expert.data_handle(), expert.data(),
                                 expert.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice,
                                 stream));
    device_buffer<> scratch(gating::slots_workspace_bytes(tokens, k, experts), stream);
    gating::assign_slots(cuda.backend(), gating::choice_major{}, cap, r, scratch.view());
    check_equal("slot", download(r.slot, stream), slot);
    check_equal("load", download(r.load, stream), load);
    auto const scalars = download(r.scalars, 1, stream).front();
    CHECK(scalars.capacity == capacity);
    CHECK(scalars.max_load == max_load);
    CHECK(scalars.dropped == dropped);
  }
}

TEST_CASE("CUDA route and route_backward reject bad arguments and write nothing") {
  cuda_context cuda;
  cudaStream_t const stream = cuda.stream;
  index_t const T_ = 16, E = 8, H = 32;
  int const k = 2;
  gating::top_any<> const gate;
  gating::gate_args const args{.tokens = T_, .experts = E, .k = k};
  std::mt19937_64 rng(1);
  host_tensor<float> x(T_ * H), w(H * (E + 1)), d_weight(T_ * k);
  x.randomize(rng);
  w.randomize(rng);
  d_weight.randomize(rng);
  device_array const x_dev(x.data, stream);
  device_array const w_dev(w.data, stream);
  device_array const d_weight_dev(d_weight.data, stream);

  workspace_carver counter;
  (void)gating::carve_device_routing(counter, T_, T_, E, k);
  device_buffer<> memory(counter.bytes(), stream);
  poison(memory.view().data(), memory.size(), stream);
  workspace_carver carver(memory.view());
  gating::device_routing r = gating::carve_device_routing(carver, T_, T_, E, k);
  std::size_t const scratch_bytes = gating::route_workspace_bytes(gate, args);
  device_buffer<> scratch(scratch_bytes, stream);
  poison(scratch.view().data(), scratch.size(), stream);
  auto const x_view = x_dev.cview(T_, H);
  auto const w_view = w_dev.cview(H, E);

  auto route_with = [&](cuda_backend backend, gating::gate_args const& a, auto w_gate,
                        gating::device_routing routing, workspace s) {
    return [=]() mutable { gating::route(backend, gate, a, x_view, w_gate, routing, s); };
  };
  gating::gate_args too_many = args;
  too_many.k = 9;  // k > E
  test::expect_rejected(route_with(cuda.backend(), too_many, w_view, r, scratch.view()), "k");
  test::expect_rejected(route_with(cuda.backend(), args, w_dev.cview(H, E + 1), r, scratch.view()),
                        "w_gate");
  gating::device_routing short_r = r;
  short_r.logits = make_view(r.logits.data_handle(), T_ - 1, E);
  test::expect_rejected(route_with(cuda.backend(), args, w_view, short_r, scratch.view()),
                        "r.logits");
  test::expect_rejected(
      route_with(cuda.backend(), args, w_view, r, scratch.view().first(scratch_bytes - 1)),
      "scratch");
  test::expect_rejected(route_with({stream, nullptr}, args, w_view, r, scratch.view()), "blas");
  gating::gate_args grouped = args;
  grouped.groups = 2;  // no CUDA path yet
  test::expect_rejected(route_with(cuda.backend(), grouped, w_view, r, scratch.view()), "groups");
  CHECK(all_poisoned(download(memory.view().data(), static_cast<index_t>(memory.size()), stream)));
  CHECK(
      all_poisoned(download(scratch.view().data(), static_cast<index_t>(scratch.size()), stream)));

  // Backward: the outputs stay poisoned too.
  device_array<float> d_logits(T_ * E, stream);
  device_array<float> dx(T_ * H, stream), d_w_gate(H * E, stream);
  for (auto const* a : {&d_logits, &dx, &d_w_gate})
    poison(a->data(), static_cast<std::size_t>(a->count) * sizeof(float), stream);
  auto backward_with = [&](gating::gate_args const& a, matrix_view<float const> dw,
                           cuda_backend backend) {
    return [=, &r, &d_logits, &dx, &d_w_gate] {
      gating::route_backward(backend, gate, a, std::as_const(r), dw, x_view, w_view,
                             d_logits.view(T_, E), dx.view(T_, H), d_w_gate.view(H, E),
                             workspace{});
    };
  };
  test::expect_rejected(backward_with(args, d_weight_dev.cview(T_, k + 1), cuda.backend()),
                        "d_weight");
  test::expect_rejected(backward_with(too_many, d_weight_dev.cview(T_, k), cuda.backend()), "k");
  test::expect_rejected(backward_with(args, d_weight_dev.cview(T_, k), {stream, nullptr}), "blas");
  CHECK(all_poisoned(download(reinterpret_cast<std::byte const*>(d_logits.data()),
                              T_ * E * static_cast<index_t>(sizeof(float)), stream)));
  CHECK(all_poisoned(download(reinterpret_cast<std::byte const*>(dx.data()),
                              T_ * H * static_cast<index_t>(sizeof(float)), stream)));
  CHECK(all_poisoned(download(reinterpret_cast<std::byte const*>(d_w_gate.data()),
                              H * E * static_cast<index_t>(sizeof(float)), stream)));

  // half needs scratch for d_logits in half: none given is rejected.
  host_tensor<__half> xh(T_ * H), wh(H * E);
  xh.randomize(rng);
  wh.randomize(rng);
  device_array const xh_dev(xh.data, stream);
  device_array const wh_dev(wh.data, stream);
  device_array<__half> dxh(T_ * H, stream), dwh(H * E, stream);
  test::expect_rejected(
      [&] {
        gating::route_backward(cuda.backend(), gate, args, std::as_const(r),
                               d_weight_dev.cview(T_, k), xh_dev.cview(T_, H), wh_dev.cview(H, E),
                               d_logits.view(T_, E), dxh.view(T_, H), dwh.view(H, E), workspace{});
      },
      "scratch");
}
