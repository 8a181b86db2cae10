// SPDX-License-Identifier: Apache-2.0
#pragma once
// A CUDA graph captured from the work a step enqueues, for the tests that check that a call
// is capturable and that its replay does what the eager call does.

#include <moe/core/error.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>
#include <vector>

namespace moe::test {

/// The graph of what `step` enqueues on `stream` while captured in `mode`; owns the graph
/// and its executable. A step that throws ends the capture, and the exception propagates.
class captured_graph {
 public:
  template <class Step>
  captured_graph(cudaStream_t stream, cudaStreamCaptureMode mode, Step&& step) {
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    MOE_CUDA_TRY(cudaStreamBeginCapture(stream, mode));
    try {
      std::forward<Step>(step)();
    } catch (...) {
      (void)cudaStreamEndCapture(stream, &graph_);
      (void)cudaGetLastError();
      throw;
    }
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    MOE_CUDA_TRY(cudaStreamIsCapturing(stream, &status));
    still_capturing_ = status == cudaStreamCaptureStatusActive;
    ended_ = cudaStreamEndCapture(stream, &graph_);
    (void)cudaGetLastError();
  }
  captured_graph(captured_graph const&) = delete;
  captured_graph& operator=(captured_graph const&) = delete;
  ~captured_graph() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) (void)cudaGraphDestroy(graph_);
  }

  /// Whether the capture was still active when the step returned: a synchronising call in
  /// the step invalidates it.
  [[nodiscard]] bool still_capturing() const noexcept { return still_capturing_; }
  /// What ending the capture returned, and whether it gave a graph.
  [[nodiscard]] cudaError_t ended() const noexcept { return ended_; }
  [[nodiscard]] bool ok() const noexcept { return ended_ == cudaSuccess && graph_ != nullptr; }

  /// The graph's nodes.
  [[nodiscard]] std::vector<cudaGraphNode_t> nodes() const {
    std::size_t count = 0;
    MOE_CUDA_TRY(cudaGraphGetNodes(graph_, nullptr, &count));
    std::vector<cudaGraphNode_t> all(count);
    MOE_CUDA_TRY(cudaGraphGetNodes(graph_, all.data(), &count));
    return all;
  }

  /// Launches the graph on `stream` (instantiated on first use) and waits for it.
  void replay(cudaStream_t stream) {
    if (exec_ == nullptr) MOE_CUDA_TRY(cudaGraphInstantiate(&exec_, graph_, 0));
    MOE_CUDA_TRY(cudaGraphLaunch(exec_, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
  }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  cudaError_t ended_ = cudaSuccess;
  bool still_capturing_ = false;
};

}  // namespace moe::test
