// SPDX-License-Identifier: Apache-2.0
#pragma once
// What a layer takes and tells: its run-time arguments, the views of its parameters, and
// the statistics of a forward call.

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/args.hpp>

#include <cstdint>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace moe {

/// The run-time arguments of a layer: the gate's (gating/args.hpp says what each does; its
/// `tokens` is the most one call routes, which the workspace is sized for, and `experts`
/// counts the experts over all ranks), and the experts' shape.
///
///   moe::layer_args args{.gate = {.tokens = T, .experts = 8, .capacity_factor = 1.25f},
///                        .hidden = 4096, .ffn = 14336};
///
/// A dropless layout (`layout::ragged`) has no capacity: the gate's `capacity_factor`,
/// `eval_capacity_factor` and `capacity_alignment` do not matter to it (they are still
/// checked to be finite and at least 1), and it never rejects a factor for giving capacity 0.
/// `gate.expert_bias` is host memory on the host backend, device memory on the CUDA one.
///
/// Limits (`layer::can_implement` rejects what exceeds them, naming the argument): every
/// array the layer lays out holds at most `max_array_elements` (2^52) elements, so that its
/// workspace in bytes, and every index into it, fits int64. That bounds each of tokens,
/// hidden, ffn, experts, min_capacity and both alignments by 2^52, and the products T·H,
/// T·E, T·2F (the widths of the arrays per token), E·H·F (the expert weights) and the expert
/// batch's rows times those widths. The rows are E·C with the capacity layout, so the
/// capacity factor (finite, any magnitude) and capacity_alignment must give a capacity C
/// whose E·C rows fit; with the ragged layout they are T·k + E·(expert_row_alignment − 1),
/// and with expert parallelism over W ranks, W·T·min(k, E/W) + E/W·(expert_row_alignment − 1)
/// (checked when the layer is built on its communicator).
struct layer_args {
  gating::gate_args gate{};  ///< T, E, k, capacity, losses, noise, groups, bias
  index_t hidden = 0;        ///< H
  index_t ffn = 0;           ///< F: inner width of an expert
  /// `layout::ragged`: each expert's rows padded to a multiple of this (16, 32, 128: GEMM
  /// tiles). A layout that drops tokens sizes its rows by the capacity and takes only 1.
  index_t expert_row_alignment = 1;
};

/// Views of a layer's parameters (T const) or of their gradients (T). `layer.parameter_shapes()`
/// lists every tensor with its axes and PyTorch layout; moe::host_parameters owns them.
template <class T, class Expert>
struct layer_params {
  matrix_view<T> gate_weight;                  // (hidden, experts)
  typename Expert::template params<T> expert;  // the expert's own views

  /// Writable views are also read-only ones (forward takes either).
  operator read_only_target<T, layer_params<T const, Expert>>()
          const requires std::is_convertible_v < typename Expert::template params<T>,
  typename Expert::template params < T const >> {
    return layer_params<T const, Expert>{gate_weight, expert};
  }
};

/// What one forward call decided, read back with `layer::stats`, in host memory on either
/// backend. Printable: `std::cout << stats` (or `to_string(stats)`) gives one line. An empty
/// call (no tokens) reports no load, no drops and losses of 0 (a mean over no token is 0).
struct layer_stats {
  index_t tokens = 0;
  /// C of the call; with a dropless layout, the largest per-expert load (nothing is dropped).
  index_t capacity = 0;
  index_t expert_rows = 0;  ///< rows of the expert batch, padding included (E·C for capacity)
  index_t dropped = 0;      ///< assignments that found no slot; 0 with a dropless layout
  /// 2nd choices that GShard's random routing left out (not counted in `dropped`).
  index_t unrouted = 0;
  double aux_loss = 0;  ///< the gate's aux loss, `aux_loss_name`, before its coefficient
  char const* aux_loss_name = "aux_loss";  ///< "gshard_aux", "switch_aux", "sequence_aux"
  double z_loss = 0;                       ///< z_loss, before its coefficient
  double loss = 0;                         ///< aux_loss_coef · aux_loss + z_loss_coef · z_loss
  std::vector<std::int64_t> load;          ///< (experts) assignments per expert, before drops
  std::vector<std::int64_t> dropped_per_expert;  ///< (experts) of those, how many were dropped
};

/// One line: "tokens 128, capacity 64, dropped 3, switch_aux 1.012, z_loss 0, loss 0.0101,
/// load [40 30 ...], dropped per expert [0 3 ...]" (unrouted and expert rows when they say
/// something).
inline std::ostream& operator<<(std::ostream& out, layer_stats const& s) {
  auto list = [&](std::vector<std::int64_t> const& v) {
    out << "[";
    for (std::size_t e = 0; e < v.size(); ++e) out << (e ? " " : "") << v[e];
    out << "]";
  };
  out << "tokens " << s.tokens << ", capacity " << s.capacity << ", expert rows " << s.expert_rows
      << ", dropped " << s.dropped;
  if (s.unrouted > 0) out << ", unrouted " << s.unrouted;
  out << ", " << s.aux_loss_name << " " << s.aux_loss << ", z_loss " << s.z_loss << ", loss "
      << s.loss << ", load ";
  list(s.load);
  out << ", dropped per expert ";
  list(s.dropped_per_expert);
  return out;
}

[[nodiscard]] inline std::string to_string(layer_stats const& s) {
  std::ostringstream out;
  out << s;
  return out.str();
}

}  // namespace moe
