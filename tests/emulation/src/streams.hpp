// SPDX-License-Identifier: Apache-2.0
#pragma once
// Streams, events and graphs of the emulated runtime. The runtime's opaque handle types
// (cudaStream_t is CUstream_st*, and so on) are defined here.

#include "state.hpp"

#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace moe::emulation {

struct capture;

/// One piece of stream-ordered work.
struct operation {
  enum class type : std::uint8_t { work, record, wait };
  type what = type::work;
  work_kind kind = work_kind::kernel;
  std::string name;
  std::function<void()> run;
  CUevent_st* event = nullptr;      // record and wait
  std::uint64_t sequence = 0;       // which record of `event`
  CUstream_st* producer = nullptr;  // wait: the stream whose record it waits for
  // A copy's operands, for cudaGraphMemcpyNodeGetParams.
  void* destination = nullptr;
  void const* source = nullptr;
  std::size_t bytes = 0;
  cudaMemcpyKind direction = cudaMemcpyDefault;
};

}  // namespace moe::emulation

struct CUstream_st {
  bool blocking = true;  // synchronises with the legacy stream
  std::deque<moe::emulation::operation> queue;
  moe::emulation::capture* capturing = nullptr;
  std::uint64_t captured = 0;  // operations captured from this stream
  std::uint64_t joined = 0;    // of those, how many another captured stream waited for
};

struct CUevent_st {
  unsigned flags = 0;
  std::uint64_t recorded = 0;     // records issued
  std::uint64_t completed = 0;    // records run
  CUstream_st* stream = nullptr;  // stream of the latest record
  std::chrono::steady_clock::time_point time{};
  moe::emulation::capture* captured_by = nullptr;  // a record made while capturing
  std::uint64_t captured_position = 0;             // the stream's `captured` at that record
  int queued = 0;                                  // queued records and waits that refer to it
  bool destroyed = false;  // cudaEventDestroy'd: freed when nothing queued refers to it
};

struct CUgraphNode_st {
  moe::emulation::operation operation;
  cudaGraphNodeType type = cudaGraphNodeTypeKernel;
};

struct CUgraph_st {
  std::vector<std::unique_ptr<CUgraphNode_st>> nodes;
};

struct CUgraphExec_st {
  std::vector<moe::emulation::operation> operations;
};

namespace moe::emulation {

struct capture {
  CUstream_st* origin = nullptr;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id thread;
  bool invalidated = false;
  std::unique_ptr<CUgraph_st> graph = std::make_unique<CUgraph_st>();
  std::vector<CUstream_st*> streams;
};

}  // namespace moe::emulation
