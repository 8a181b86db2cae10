// SPDX-License-Identifier: Apache-2.0
#pragma once
// Containers that own a layer's parameters and their gradients, laid out from the layer
// itself (its `parameter_shapes`), so that a program never writes the extents twice:
//
//   moe::host_parameters<layer_t, float> w(layer);     // host memory
//   w.initialize(moe::initializer::torch_linear(), 42);
//   layer.forward(moe::host, x, w.params(), y, ws);
//   layer.backward(moe::host, dy, w.params(), dx, w.gradients(), ws);
//
//   moe::device_parameters<layer_t, __nv_bfloat16, float> d(layer, stream);  // device memory
//   d.copy_from(w_in_bf16);                            // the same layout: one copy each
//
// Each container holds two buffers, the values and the gradients, with every tensor carved
// in the order of `parameter_shapes` (absent biases take nothing). The buffers start zero,
// alignment padding included, so an update over a whole flat buffer is safe.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/parameter_shape.hpp>
#include <moe/core/resource.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/gating/philox.hpp>
#include <moe/layer/args.hpp>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace moe {

/// How `initialize` draws a layer's parameters. The draws come from Philox
/// (gating/philox.hpp) keyed by the seed, the tensor and the element's index in the whole
/// layer (all E experts): the values are the same on every platform and backend, and do not
/// depend on how many ranks the experts are split over.
struct initializer {
  enum class distribution : std::uint8_t { uniform, normal };
  distribution draw = distribution::uniform;
  /// uniform: b of U(−b, b); normal: the standard deviation. 0: 1/√fan_in (nn.Linear's b).
  double scale = 0;
  bool zero_biases = false;

  /// PyTorch's nn.Linear default: weights and biases U(−1/√fan_in, 1/√fan_in).
  static constexpr initializer torch_linear() noexcept { return {}; }
  /// N(0, std²) weights and zero biases: Megatron-Core's init_method_normal and Hugging
  /// Face's initializer_range (both 0.02 by default).
  static constexpr initializer normal(double std = 0.02) noexcept {
    return {distribution::normal, std, true};
  }
  /// U(−bound, bound) weights and zero biases.
  static constexpr initializer uniform(double bound) noexcept {
    return {distribution::uniform, bound, true};
  }
};

/// What a parameter container holds besides the weights.
struct parameter_options {
  /// The experts' optional biases (Mixtral's, DeepSeek's and Qwen's experts have none).
  bool biases = false;
  /// A buffer for the gradients; false for inference (then `gradients()` throws).
  bool gradients = true;
};

namespace detail {

/// What both containers share: the layer's tensors, which are present, and their carve.
template <class Layer>
class parameter_layout {
 public:
  using expert_type = typename Layer::expert_type;
  static_assert(expert::describes_parameters<expert_type>,
                "moe::host_parameters / device_parameters: the expert does not describe its "
                "parameters. Give it parameter_shapes(shape) and view_parameters<T>(shape, "
                "data), as expert/two_layer.hpp does.");

  parameter_layout(Layer const& layer, parameter_options options)
      : biases_(options.biases),
        gradients_(options.gradients),
        shapes_(layer.parameter_shapes()),
        expert_shape_(layer.expert_shape()),
        first_expert_(layer.first_expert()) {
    for (parameter_shape const& p : shapes_) present_.push_back(!p.bias || options.biases);
  }

  [[nodiscard]] std::vector<parameter_shape> const& shapes() const noexcept { return shapes_; }

  /// One pointer per tensor into `buffer` (null for an absent bias).
  template <class T>
  [[nodiscard]] std::vector<T*> carve(workspace buffer) const {
    workspace_carver carver(buffer);
    std::vector<T*> data;
    for (std::size_t i = 0; i < shapes_.size(); ++i)
      data.push_back(present_[i] ? carver.take<T>(shapes_[i].elements()) : nullptr);
    return data;
  }

  /// Whether the container holds gradients (parameter_options::gradients).
  [[nodiscard]] bool has_gradients() const noexcept { return gradients_; }
  [[nodiscard]] parameter_options options() const noexcept {
    return {.biases = biases_, .gradients = gradients_};
  }

  template <class T>
  [[nodiscard]] std::size_t bytes() const {
    workspace_carver counter;
    for (std::size_t i = 0; i < shapes_.size(); ++i)
      if (present_[i]) (void)counter.take<T>(shapes_[i].elements());
    return counter.bytes();
  }

  /// The layer's parameter views over one pointer per tensor.
  template <class T>
  [[nodiscard]] layer_params<T, expert_type> view(std::vector<T*> const& data) const {
    MOE_EXPECTS(!data.empty() && (data[0] != nullptr || shapes_[0].elements() == 0), "gradients",
                "this container was made without them (parameter_options::gradients = false)");
    return {make_view(data[0], shapes_[0].axes[0].extent, shapes_[0].axes[1].extent),
            expert_type::template view_parameters<T>(
                expert_shape_, span<T* const>(data.data() + 1, data.size() - 1))};
  }

  /// Draws every present tensor into `data` (host memory), as `init` says.
  template <class T>
  void initialize(std::vector<T*> const& data, initializer init, std::uint64_t seed) const {
    for (std::size_t i = 0; i < shapes_.size(); ++i) {
      if (!present_[i]) continue;
      parameter_shape const& p = shapes_[i];
      index_t const n = p.elements();
      // Tensor 0, the gate weight, is whole on every rank. The expert tensors are
      // expert-major: element 0 of this rank is global expert first_expert's, so the draws
      // follow the global index.
      index_t const offset = i == 0 ? 0 : first_expert_ * (n / expert_shape_.experts);
      double const scale =
          init.scale > 0 ? init.scale : 1 / std::sqrt(static_cast<double>(p.fan_in));
      for (index_t e = 0; e < n; ++e) {
        double v = 0;
        if (!(p.bias && init.zero_biases)) {
          auto const tensor = static_cast<std::uint32_t>(i);
          v = init.draw == initializer::distribution::normal
                  ? scale * gating::rng_normal(seed, offset + e, tensor,
                                               gating::rng_stream::parameter_init)
                  : scale * (2 * gating::rng_uniform(seed, offset + e, tensor,
                                                     gating::rng_stream::parameter_init) -
                             1);
        }
        data[i][e] = from_accumulate<T>(static_cast<accumulate_t<T>>(v));
      }
    }
  }

 private:
  bool biases_, gradients_;
  std::vector<parameter_shape> shapes_;
  std::vector<bool> present_;
  expert::expert_shape expert_shape_;
  index_t first_expert_;
};

/// What both containers are: a layout, two buffers (`Buffer`: host or device memory) and the
/// tensors carved from them, with the views over them.
template <class Layer, class T, class G, class Buffer>
class parameter_storage {
 public:
  using expert_type = typename Layer::expert_type;

  /// The parameters, as forward and backward take them.
  [[nodiscard]] layer_params<T const, expert_type> params() const {
    return layout_.view(std::vector<T const*>(values_.begin(), values_.end()));
  }
  /// The same, writable: to load a checkpoint or apply an update.
  [[nodiscard]] layer_params<T, expert_type> values() { return layout_.view(values_); }
  /// The gradients, as backward writes them.
  [[nodiscard]] layer_params<G, expert_type> gradients() { return layout_.view(gradients_); }

  /// Every tensor of the layer, present or not (`values(i)` is empty for an absent bias).
  [[nodiscard]] std::vector<parameter_shape> const& shapes() const noexcept {
    return layout_.shapes();
  }
  /// Tensor i's values and gradients, flat (row-major over its axes).
  [[nodiscard]] span<T> values(std::size_t tensor) noexcept { return flat(values_, tensor); }
  [[nodiscard]] span<T const> values(std::size_t tensor) const noexcept {
    return flat(values_, tensor);
  }
  [[nodiscard]] span<G> gradients(std::size_t tensor) noexcept { return flat(gradients_, tensor); }
  [[nodiscard]] span<G const> gradients(std::size_t tensor) const noexcept {
    return flat(gradients_, tensor);
  }
  /// Both buffers whole, padding included (zero): for updates over all parameters at once.
  [[nodiscard]] workspace values_bytes() noexcept { return values_buffer_.view(); }
  [[nodiscard]] workspace gradients_bytes() noexcept { return gradients_buffer_.view(); }
  [[nodiscard]] span<std::byte const> values_bytes() const noexcept {
    return values_buffer_.view();
  }
  [[nodiscard]] span<std::byte const> gradients_bytes() const noexcept {
    return gradients_buffer_.view();
  }
  /// What the container was made with: a second one with these has the same layout.
  [[nodiscard]] parameter_options options() const noexcept { return layout_.options(); }

 protected:
  /// `make(bytes)` gives a Buffer of that many bytes.
  template <class Make>
  parameter_storage(Layer const& layer, parameter_options options, Make&& make)
      : layout_(layer, options),
        values_buffer_(make(layout_.template bytes<T>())),
        gradients_buffer_(make(layout_.has_gradients() ? layout_.template bytes<G>() : 0)),
        values_(layout_.template carve<T>(values_buffer_.view())),
        gradients_(layout_.template carve<G>(gradients_buffer_.view())) {}

  parameter_layout<Layer> layout_;
  Buffer values_buffer_, gradients_buffer_;
  std::vector<T*> values_;
  std::vector<G*> gradients_;

 private:
  template <class U>
  span<U> flat(std::vector<U*> const& data, std::size_t tensor) const noexcept {
    if (data[tensor] == nullptr) return {};
    return {data[tensor], static_cast<std::size_t>(layout_.shapes()[tensor].elements())};
  }
};

}  // namespace detail

/// A layer's parameters (elements T) and their gradients (elements G: T, or float for
/// low-precision parameters on the CUDA backend) in host memory, laid out for `layer` (this
/// rank's experts with expert parallelism).
template <class Layer, class T, class G = T>
class host_parameters : public detail::parameter_storage<Layer, T, G, host_buffer> {
  using base = detail::parameter_storage<Layer, T, G, host_buffer>;

 public:
  explicit host_parameters(Layer const& layer, parameter_options options = {})
      : base(layer, options, [](std::size_t bytes) { return host_buffer(bytes); }) {
    zero(this->values_buffer_);
    zero(this->gradients_buffer_);
  }

  /// Draws every parameter as `init` says (initializer's comment: which values, and why they
  /// do not depend on the world size).
  void initialize(initializer init, std::uint64_t seed) {
    this->layout_.initialize(this->values_, init, seed);
  }

  void zero_gradients() noexcept { zero(this->gradients_buffer_); }

 private:
  static void zero(host_buffer const& b) noexcept {
    if (b.size() > 0) std::memset(b.view().data(), 0, b.size());
  }
};

/// The same in device memory, allocated from `resource` on the caller's stream (released on
/// it when the container dies), zeroed on the stream. T and G are device elements; the
/// views, flat spans and bytes are device memory.
template <class Layer, class T, class G = T, stream_ordered_resource Resource = async_resource>
class device_parameters : public detail::parameter_storage<Layer, T, G, device_buffer<Resource>> {
  using base = detail::parameter_storage<Layer, T, G, device_buffer<Resource>>;

 public:
  device_parameters(Layer const& layer, cudaStream_t stream, parameter_options options = {},
                    Resource resource = {})
      : base(layer, options,
             [&](std::size_t bytes) { return device_buffer<Resource>(bytes, stream, resource); }) {
    zero(this->values_buffer_);
    zero(this->gradients_buffer_);
  }

  [[nodiscard]] cudaStream_t stream() const noexcept { return this->values_buffer_.stream(); }

  /// Draws on the host, as host_parameters::initialize does (the same values for the same
  /// seed), then copies on the stream. The copy is from pageable memory: it returns once the
  /// values are staged, as cudaMemcpyAsync from pageable memory does.
  void initialize(initializer init, std::uint64_t seed) {
    host_buffer staging(this->values_buffer_.size());
    if (staging.size() > 0) std::memset(staging.view().data(), 0, staging.size());
    this->layout_.initialize(this->layout_.template carve<T>(staging.view()), init, seed);
    copy(this->values_buffer_.view(), staging.view(), cudaMemcpyHostToDevice);
  }

  /// Zeroes the gradients on the stream.
  void zero_gradients() { zero(this->gradients_buffer_); }

  /// Copies values and gradients from a host container of the same layer and options (the
  /// same layout), on the stream; returns once the host memory is staged.
  void copy_from(host_parameters<Layer, T, G> const& from) {
    copy(this->values_buffer_.view(), from.values_bytes(), cudaMemcpyHostToDevice);
    copy(this->gradients_buffer_.view(), from.gradients_bytes(), cudaMemcpyHostToDevice);
  }

  /// Copies values and gradients into a host container of the same layer and options, after
  /// the stream's work so far; returns when the copies are done.
  void copy_to(host_parameters<Layer, T, G>& to) const {
    copy(to.values_bytes(), this->values_buffer_.view(), cudaMemcpyDeviceToHost);
    copy(to.gradients_bytes(), this->gradients_buffer_.view(), cudaMemcpyDeviceToHost);
  }

 private:
  void zero(device_buffer<Resource> const& b) const {
    if (b.size() > 0) MOE_CUDA_TRY(cudaMemsetAsync(b.view().data(), 0, b.size(), stream()));
  }

  void copy(workspace to, span<std::byte const> from, cudaMemcpyKind kind) const {
    MOE_EXPECTS(to.size() == from.size(), "host parameters",
                "are laid out differently: build both containers from the same layer and "
                "options");
    if (to.empty()) return;
    MOE_CUDA_TRY(cudaMemcpyAsync(to.data(), from.data(), to.size(), kind, stream()));
    if (kind == cudaMemcpyDeviceToHost) MOE_CUDA_TRY(cudaStreamSynchronize(stream()));
  }
};

}  // namespace moe
