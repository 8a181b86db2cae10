// SPDX-License-Identifier: Apache-2.0
// The CUDA runtime API on the emulated device: errors, streams and events with CUDA's
// ordering, stream capture into graphs and their replay, copies and memsets, allocation,
// and the device queries of one H100.
//
// Ordering: under `eager` streams each operation runs when issued. Under `lazy` streams an
// operation waits in its stream's queue until something needs it (a synchronisation, a
// blocking copy, a wait on an event that it precedes), so the relative order of streams is
// only what their events impose, and a missing cudaStreamWaitEvent gives a wrong result.

#include "streams.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <set>

namespace moe::emulation {

// --- schedule, lock, errors, counters ------------------------------------------------------

namespace {
schedule& schedule_in_force() {
  static schedule s = [] {
    schedule result;
    auto const read = [](char const* name) -> std::string {
      char const* value = std::getenv(name);
      return value != nullptr ? value : "";
    };
    std::string const blocks = read("MOE_EMULATION_BLOCKS");
    if (blocks == "reversed")
      result.blocks = block_order::reversed;
    else if (blocks == "shuffled")
      result.blocks = block_order::shuffled;
    else if (!blocks.empty() && blocks != "in_order") {
      std::fprintf(stderr,
                   "moe emulation: MOE_EMULATION_BLOCKS=%s is not one of in_order, "
                   "reversed, shuffled\n",
                   blocks.c_str());
      std::exit(2);
    }
    std::string const streams = read("MOE_EMULATION_STREAMS");
    if (streams == "lazy")
      result.lazy_streams = true;
    else if (!streams.empty() && streams != "eager") {
      std::fprintf(stderr, "moe emulation: MOE_EMULATION_STREAMS=%s is not eager or lazy\n",
                   streams.c_str());
      std::exit(2);
    }
    std::string const seed = read("MOE_EMULATION_SEED");
    result.seed = seed.empty() ? 0 : std::strtoull(seed.c_str(), nullptr, 10);
    return result;
  }();
  return s;
}
}  // namespace

schedule const& current_schedule() {
  return schedule_in_force();
}

void set_schedule(schedule const& s) {
  std::lock_guard lock(device_mutex());
  schedule_in_force() = s;
}

namespace {
std::vector<std::string>& excluded() {
  static std::vector<std::string> list;
  return list;
}
}  // namespace

void exclude(char const* reason, char const* file, int line) {
  std::lock_guard lock(device_mutex());
  excluded().push_back(std::string(file) + ":" + std::to_string(line) + ": " + reason);
}

std::vector<std::string> exclusions() {
  std::lock_guard lock(device_mutex());
  return excluded();
}

std::string describe_schedule() {
  schedule const& s = current_schedule();
  char const* const blocks = s.blocks == block_order::in_order   ? "in order"
                             : s.blocks == block_order::reversed ? "reversed"
                                                                 : "shuffled";
  return std::string("blocks and threads ") + blocks + ", " + (s.lazy_streams ? "lazy" : "eager") +
         " streams, seed " + std::to_string(s.seed);
}

std::recursive_mutex& device_mutex() {
  static std::recursive_mutex m;
  return m;
}

namespace {

cudaError_t sticky = cudaSuccess;
thread_local cudaError_t last_error = cudaSuccess;
counters totals;
std::map<void const*, int> dynamic_shared_limits;  // cudaFuncSetAttribute
std::set<capture*> active_captures;

constexpr std::size_t default_dynamic_shared = 48 * 1024;
constexpr std::size_t max_dynamic_shared = 227 * 1024;  // H100, per block, opted in

CUstream_st legacy_stream_object;

}  // namespace

void set_sticky_error(cudaError_t error, std::string const& message) {
  if (sticky == cudaSuccess) {
    sticky = error;
    std::fprintf(stderr, "moe emulation: %s\n", message.c_str());
  }
}

cudaError_t sticky_error() {
  return sticky;
}

counters& mutable_counters() {
  return totals;
}

counters read_counters() {
  std::lock_guard lock(device_mutex());
  return totals;
}

void reset_counters() {
  std::lock_guard lock(device_mutex());
  totals = {};
}

cudaError_t fail(cudaError_t error) {
  last_error = error;
  return error;
}

bool flip_sort_buffers() {
  std::lock_guard lock(device_mutex());
  static std::uint64_t sorts = 0;
  if (current_schedule().blocks == block_order::in_order) return false;
  return (garbage_word(++sorts) & 1u) != 0;
}

// --- streams -------------------------------------------------------------------------------

namespace {

bool is_legacy(cudaStream_t stream) {
  return stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread;
}

CUstream_st* resolve(cudaStream_t stream) {
  return is_legacy(stream) ? &legacy_stream_object : stream;
}

std::set<CUstream_st*>& all_streams() {
  static std::set<CUstream_st*> streams;
  return streams;
}

void drain(CUstream_st* stream);

/// Runs the front operation of `stream`; a wait first runs its producer far enough.
void release(CUevent_st* event) {
  if (--event->queued == 0 && event->destroyed) delete event;
}

void run_front(CUstream_st* stream) {
  operation op = std::move(stream->queue.front());
  stream->queue.pop_front();
  switch (op.what) {
    case operation::type::wait:
      while (op.event->completed < op.sequence && op.producer != nullptr &&
             !op.producer->queue.empty())
        run_front(op.producer);
      release(op.event);
      break;
    case operation::type::record:
      op.event->completed = std::max(op.event->completed, op.sequence);
      op.event->time = std::chrono::steady_clock::now();
      release(op.event);
      break;
    case operation::type::work:
      if (sticky != cudaSuccess) break;
      {
        device_section section;
        op.run();
      }
      break;
  }
}

void drain(CUstream_st* stream) {
  while (!stream->queue.empty()) run_front(stream);
}

void drain_all() {
  std::vector<CUstream_st*> streams(all_streams().begin(), all_streams().end());
  if (current_schedule().blocks == block_order::reversed)
    std::reverse(streams.begin(), streams.end());
  for (CUstream_st* s : streams) drain(s);
  drain(&legacy_stream_object);
}

/// The legacy stream waits for every blocking stream, and they for it.
void drain_blocking() {
  for (CUstream_st* s : all_streams())
    if (s->blocking) drain(s);
}

void push(CUstream_st* stream, operation op, bool legacy) {
  if (legacy) drain_blocking();
  stream->queue.push_back(std::move(op));
  if (legacy || !current_schedule().lazy_streams) drain(stream);
}

cudaGraphNodeType node_type(operation const& op) {
  switch (op.kind) {
    case work_kind::memcpy:
      return cudaGraphNodeTypeMemcpy;
    case work_kind::memset:
      return cudaGraphNodeTypeMemset;
    case work_kind::host:
      return cudaGraphNodeTypeHost;
    default:
      return cudaGraphNodeTypeKernel;
  }
}

/// The capture that recorded `event`, if it is still going on.
capture* live_capture_of(CUevent_st const* event) {
  return event->captured_by != nullptr && active_captures.count(event->captured_by) != 0
             ? event->captured_by
             : nullptr;
}

/// A call that synchronises with the host ends every capture it would break: in global
/// mode any capture in the process, in thread-local mode those of this thread.
bool breaks_capture(CUstream_st* only = nullptr) {
  bool broken = false;
  for (capture* c : active_captures) {
    bool const affected = (only != nullptr && only->capturing == c) ||
                          (only == nullptr && (c->mode == cudaStreamCaptureModeGlobal ||
                                               (c->mode == cudaStreamCaptureModeThreadLocal &&
                                                c->thread == std::this_thread::get_id())));
    if (affected) {
      c->invalidated = true;
      broken = true;
    }
  }
  return broken;
}

/// Common entry of every call: the sticky error first.
#define MOE_EMULATION_ENTER()                         \
  std::lock_guard moe_emulation_lock(device_mutex()); \
  if (sticky != cudaSuccess) return sticky

}  // namespace

cudaError_t enqueue(cudaStream_t handle, work_kind kind, std::string name,
                    std::function<void()> work) {
  MOE_EMULATION_ENTER();
  CUstream_st* stream = resolve(handle);
  operation op;
  op.kind = kind;
  op.name = std::move(name);
  op.run = std::move(work);
  if (stream->capturing != nullptr) {
    if (stream->capturing->invalidated) return fail(cudaErrorStreamCaptureInvalidated);
    auto node = std::make_unique<CUgraphNode_st>();
    node->type = node_type(op);
    node->operation = std::move(op);
    stream->capturing->graph->nodes.push_back(std::move(node));
    ++stream->captured;
    return cudaSuccess;
  }
  if (is_legacy(handle)) ++totals.legacy_stream_operations;
  if (kind == work_kind::kernel) ++totals.kernel_launches;
  if (kind == work_kind::library) ++totals.library_calls;
  push(stream, std::move(op), is_legacy(handle));
  return sticky != cudaSuccess ? sticky : cudaSuccess;
}

namespace detail {

cudaError_t launch(void const* function, char const* name, dim3 grid, dim3 block,
                   std::size_t shared_bytes, cudaStream_t stream,
                   std::function<void()> thread_body) {
  {
    MOE_EMULATION_ENTER();
    std::size_t const threads = std::size_t{block.x} * block.y * block.z;
    bool const valid_shape = grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u &&
                             grid.y <= 65535 && grid.z <= 65535 && threads >= 1 &&
                             threads <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64;
    if (!valid_shape) {
      std::fprintf(stderr,
                   "moe emulation: %s: invalid launch grid (%u, %u, %u) block (%u, %u, %u)\n", name,
                   grid.x, grid.y, grid.z, block.x, block.y, block.z);
      return fail(cudaErrorInvalidConfiguration);
    }
    auto const limit = dynamic_shared_limits.find(function);
    std::size_t const allowed = limit != dynamic_shared_limits.end()
                                    ? static_cast<std::size_t>(limit->second)
                                    : default_dynamic_shared;
    if (shared_bytes > allowed) {
      std::fprintf(stderr,
                   "moe emulation: %s: %zu bytes of dynamic shared memory exceed the "
                   "%zu allowed (cudaFuncAttributeMaxDynamicSharedMemorySize)\n",
                   name, shared_bytes, allowed);
      return fail(cudaErrorInvalidValue);
    }
  }
  return enqueue(stream, work_kind::kernel, name, [=, body = std::move(thread_body)] {
    run_grid(name, grid, block, shared_bytes, body);
  });
}

}  // namespace detail
}  // namespace moe::emulation

using namespace moe::emulation;

// --- errors ----------------------------------------------------------------------------------

extern "C" {

cudaError_t cudaGetLastError() {
  std::lock_guard lock(device_mutex());
  if (sticky != cudaSuccess) return sticky;
  return std::exchange(last_error, cudaSuccess);
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard lock(device_mutex());
  return sticky != cudaSuccess ? sticky : last_error;
}

char const* cudaGetErrorName(cudaError_t error) {
  switch (error) {
#define MOE_EMULATION_NAME(e) \
  case e:                     \
    return #e;
    MOE_EMULATION_NAME(cudaSuccess)
    MOE_EMULATION_NAME(cudaErrorInvalidValue)
    MOE_EMULATION_NAME(cudaErrorMemoryAllocation)
    MOE_EMULATION_NAME(cudaErrorInvalidConfiguration)
    MOE_EMULATION_NAME(cudaErrorInvalidDevice)
    MOE_EMULATION_NAME(cudaErrorInvalidResourceHandle)
    MOE_EMULATION_NAME(cudaErrorNotReady)
    MOE_EMULATION_NAME(cudaErrorLaunchFailure)
    MOE_EMULATION_NAME(cudaErrorStreamCaptureUnsupported)
    MOE_EMULATION_NAME(cudaErrorStreamCaptureInvalidated)
    MOE_EMULATION_NAME(cudaErrorStreamCaptureUnjoined)
    MOE_EMULATION_NAME(cudaErrorStreamCaptureWrongThread)
    MOE_EMULATION_NAME(cudaErrorIllegalState)
    MOE_EMULATION_NAME(cudaErrorNoDevice)
#undef MOE_EMULATION_NAME
    default:
      return "cudaErrorUnknown";
  }
}

char const* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (the emulated device faulted: see its message above)";
    case cudaErrorStreamCaptureUnsupported:
      return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
      return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureUnjoined:
      return "capture was not joined back into the origin stream";
    default:
      return cudaGetErrorName(error);
  }
}

// --- device queries (one H100 SXM) --------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice);
}

cudaError_t cudaDeviceSynchronize() {
  MOE_EMULATION_ENTER();
  ++totals.host_synchronizations;
  if (breaks_capture()) return fail(cudaErrorStreamCaptureUnsupported);
  drain_all();
  return sticky;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "moe emulated H100 (host CPU)");
  prop->totalGlobalMem = std::size_t{80} << 30;
  prop->sharedMemPerBlock = 48 * 1024;
  prop->sharedMemPerBlockOptin = 227 * 1024;
  prop->sharedMemPerMultiprocessor = 228 * 1024;
  prop->regsPerBlock = 65536;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = 1024;
  prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 2147483647;
  prop->maxGridSize[1] = 65535;
  prop->maxGridSize[2] = 65535;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 132;
  prop->l2CacheSize = 50 * 1024 * 1024;
  prop->maxThreadsPerMultiProcessor = 2048;
  prop->memoryBusWidth = 5120;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  switch (attribute) {
    case cudaDevAttrL2CacheSize:
      *value = 50 * 1024 * 1024;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = 132;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = 227 * 1024;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = 48 * 1024;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrWarpSize:
      *value = 32;
      return cudaSuccess;
    default:
      return fail(cudaErrorInvalidValue);
  }
}

cudaError_t cudaFuncSetAttribute(void const* function, cudaFuncAttribute attribute, int value) {
  std::lock_guard lock(device_mutex());
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<std::size_t>(value) > max_dynamic_shared)
    return fail(cudaErrorInvalidValue);
  dynamic_shared_limits[function] = value;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

// --- memory ------------------------------------------------------------------------------

cudaError_t cudaMalloc(void** pointer, std::size_t bytes) {
  MOE_EMULATION_ENTER();
  if (pointer == nullptr) return fail(cudaErrorInvalidValue);
  if (breaks_capture()) return fail(cudaErrorStreamCaptureUnsupported);
  ++totals.device_allocations;
  *pointer = allocate_device(bytes);
  return *pointer != nullptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFree(void* pointer) {
  MOE_EMULATION_ENTER();
  if (pointer == nullptr) return cudaSuccess;
  if (breaks_capture()) return fail(cudaErrorStreamCaptureUnsupported);
  // cudaFree waits for the device to finish with the memory.
  ++totals.host_synchronizations;
  ++totals.device_frees;
  drain_all();
  return free_device(pointer) ? cudaSuccess : fail(cudaErrorInvalidValue);
}

cudaError_t cudaMallocAsync(void** pointer, std::size_t bytes, cudaStream_t stream) {
  MOE_EMULATION_ENTER();
  if (pointer == nullptr) return fail(cudaErrorInvalidValue);
  (void)stream;
  ++totals.device_allocations;
  *pointer = allocate_device(bytes);
  return *pointer != nullptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFreeAsync(void* pointer, cudaStream_t stream) {
  {
    MOE_EMULATION_ENTER();
    if (pointer != nullptr && !is_device_range(pointer, 1)) return fail(cudaErrorInvalidValue);
    ++totals.device_frees;
  }
  return enqueue(stream, work_kind::memset, "cudaFreeAsync", [pointer] { free_device(pointer); });
}

cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total_bytes) {
  std::lock_guard lock(device_mutex());
  std::size_t const total = std::size_t{80} << 30;
  *total_bytes = total;
  *free_bytes = total - std::min(total, device_bytes_in_use());
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, void const* pointer) {
  std::lock_guard lock(device_mutex());
  *attributes = cudaPointerAttributes{};
  if (is_device_range(pointer, 1)) {
    attributes->type = cudaMemoryTypeDevice;
    attributes->devicePointer = const_cast<void*>(pointer);
  } else {
    attributes->type = cudaMemoryTypeUnregistered;
    attributes->hostPointer = const_cast<void*>(pointer);
  }
  attributes->device = 0;
  return cudaSuccess;
}

}  // extern "C"

// --- copies and memsets ----------------------------------------------------------------------

namespace {

/// Checks both ends of a copy of `bytes` against `kind`; cudaSuccess when they fit.
cudaError_t check_copy(void* destination, void const* source, std::size_t bytes,
                       cudaMemcpyKind& kind) {
  if (bytes == 0) return cudaSuccess;
  if (destination == nullptr || source == nullptr) return cudaErrorInvalidValue;
  bool const device_destination = is_device_range(destination, bytes);
  bool const device_source = is_device_range(source, bytes);
  if (kind == cudaMemcpyDefault)
    kind = device_source ? (device_destination ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost)
                         : (device_destination ? cudaMemcpyHostToDevice : cudaMemcpyHostToHost);
  bool const wants_device_source =
      kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  bool const wants_device_destination =
      kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  if (wants_device_source != device_source || wants_device_destination != device_destination) {
    std::fprintf(stderr,
                 "moe emulation: a copy of %zu bytes from %p to %p does not match its "
                 "kind %d (each device end must lie inside one allocation)\n",
                 bytes, source, static_cast<void*>(destination), static_cast<int>(kind));
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t copy_async(void* destination, void const* source, std::size_t bytes,
                       cudaMemcpyKind kind, cudaStream_t stream, bool blocking) {
  {
    MOE_EMULATION_ENTER();
    if (cudaError_t const e = check_copy(destination, source, bytes, kind); e != cudaSuccess)
      return fail(e);
    if (blocking) {
      ++totals.host_synchronizations;
      if (breaks_capture()) return fail(cudaErrorStreamCaptureUnsupported);
    }
    if (bytes == 0) return cudaSuccess;
    ++totals.copies;
    totals.bytes_copied += static_cast<std::int64_t>(bytes);
    if (kind == cudaMemcpyDeviceToHost) ++totals.device_to_host_copies;
  }
  std::function<void()> work = [=] { std::memcpy(destination, source, bytes); };
  CUstream_st* target = resolve(stream);
  if (kind == cudaMemcpyHostToDevice && target->capturing == nullptr) {
    // Pageable memory: the source is staged when the call returns, as CUDA does.
    auto staged = std::make_shared<std::vector<unsigned char>>(
        static_cast<unsigned char const*>(source),
        static_cast<unsigned char const*>(source) + bytes);
    work = [=] { std::memcpy(destination, staged->data(), bytes); };
  }
  std::lock_guard lock(device_mutex());
  cudaError_t const e = enqueue(stream, work_kind::memcpy, "memcpy", std::move(work));
  if (e == cudaSuccess && target->capturing != nullptr) {
    operation& op = target->capturing->graph->nodes.back()->operation;
    op.destination = destination;
    op.source = source;
    op.bytes = bytes;
    op.direction = kind;
  }
  if (e == cudaSuccess && blocking) drain_all();
  return e != cudaSuccess ? e : sticky;
}

cudaError_t memset_async(void* destination, int value, std::size_t bytes, cudaStream_t stream,
                         bool blocking) {
  {
    MOE_EMULATION_ENTER();
    if (bytes == 0) return cudaSuccess;
    if (!is_device_range(destination, bytes)) {
      std::fprintf(stderr,
                   "moe emulation: cudaMemset of %zu bytes at %p is outside any device "
                   "allocation\n",
                   bytes, destination);
      return fail(cudaErrorInvalidValue);
    }
    if (blocking) {
      ++totals.host_synchronizations;
      if (breaks_capture()) return fail(cudaErrorStreamCaptureUnsupported);
    }
  }
  std::lock_guard lock(device_mutex());
  cudaError_t const e =
      enqueue(stream, work_kind::memset, "memset", [=] { std::memset(destination, value, bytes); });
  if (e == cudaSuccess && blocking) drain_all();
  return e != cudaSuccess ? e : sticky;
}

}  // namespace

extern "C" {

cudaError_t cudaMemcpy(void* destination, void const* source, std::size_t bytes,
                       cudaMemcpyKind kind) {
  return copy_async(destination, source, bytes, kind, nullptr, true);
}

cudaError_t cudaMemcpyAsync(void* destination, void const* source, std::size_t bytes,
                            cudaMemcpyKind kind, cudaStream_t stream) {
  return copy_async(destination, source, bytes, kind, stream, false);
}

cudaError_t cudaMemcpy2DAsync(void* destination, std::size_t destination_pitch, void const* source,
                              std::size_t source_pitch, std::size_t width, std::size_t height,
                              cudaMemcpyKind kind, cudaStream_t stream) {
  if (width > destination_pitch || width > source_pitch) return fail(cudaErrorInvalidValue);
  for (std::size_t row = 0; row < height; ++row) {
    cudaError_t const e = copy_async(static_cast<char*>(destination) + row * destination_pitch,
                                     static_cast<char const*>(source) + row * source_pitch, width,
                                     kind, stream, false);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t cudaMemset(void* destination, int value, std::size_t bytes) {
  return memset_async(destination, value, bytes, nullptr, true);
}

cudaError_t cudaMemsetAsync(void* destination, int value, std::size_t bytes, cudaStream_t stream) {
  return memset_async(destination, value, bytes, stream, false);
}

cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t function, void* data) {
  return enqueue(stream, work_kind::host, "host function", [=] { function(data); });
}

// --- streams -----------------------------------------------------------------------------------

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  MOE_EMULATION_ENTER();
  auto* s = new CUstream_st;
  s->blocking = (flags & cudaStreamNonBlocking) == 0;
  all_streams().insert(s);
  *stream = s;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  return cudaStreamCreateWithFlags(stream, cudaStreamDefault);
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  MOE_EMULATION_ENTER();
  if (is_legacy(stream) || all_streams().count(stream) == 0)
    return fail(cudaErrorInvalidResourceHandle);
  drain(stream);  // pending work still runs, as CUDA lets it
  all_streams().erase(stream);
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t handle) {
  MOE_EMULATION_ENTER();
  ++totals.host_synchronizations;
  CUstream_st* stream = resolve(handle);
  if (stream->capturing != nullptr) {
    stream->capturing->invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  if (breaks_capture()) return fail(cudaErrorStreamCaptureUnsupported);
  if (is_legacy(handle)) drain_blocking();
  drain(stream);
  return sticky;
}

cudaError_t cudaStreamQuery(cudaStream_t handle) {
  MOE_EMULATION_ENTER();
  CUstream_st* stream = resolve(handle);
  if (stream->capturing != nullptr) {
    stream->capturing->invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  // Lazy streams run the work now: a query loop would otherwise never end.
  drain(stream);
  return sticky;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t handle, cudaEvent_t event, unsigned) {
  MOE_EMULATION_ENTER();
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  CUstream_st* stream = resolve(handle);
  if (capture* c = live_capture_of(event); c != nullptr) {
    if (stream->capturing == nullptr) {  // the stream joins the capture (a fork)
      stream->capturing = c;
      stream->captured = 0;
      stream->joined = 0;
      c->streams.push_back(stream);
    }
    if (event->stream != nullptr)
      event->stream->joined = std::max(event->stream->joined, event->captured_position);
    return cudaSuccess;
  }
  if (stream->capturing != nullptr) return cudaSuccess;  // an event outside the graph
  if (event->recorded == 0) return cudaSuccess;          // never recorded: no wait
  operation op;
  op.what = operation::type::wait;
  op.event = event;
  op.sequence = event->recorded;
  op.producer = event->stream;
  ++event->queued;
  push(stream, std::move(op), is_legacy(handle));
  return sticky;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t handle, cudaStreamCaptureMode mode) {
  MOE_EMULATION_ENTER();
  if (is_legacy(handle)) return fail(cudaErrorStreamCaptureUnsupported);
  if (handle->capturing != nullptr) return fail(cudaErrorIllegalState);
  auto* c = new capture;
  c->origin = handle;
  c->mode = mode;
  c->thread = std::this_thread::get_id();
  c->streams.push_back(handle);
  handle->capturing = c;
  handle->captured = 0;
  handle->joined = 0;
  active_captures.insert(c);
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t handle, cudaGraph_t* graph) {
  MOE_EMULATION_ENTER();
  if (is_legacy(handle) || handle->capturing == nullptr || handle->capturing->origin != handle)
    return fail(cudaErrorIllegalState);
  std::unique_ptr<capture> c(handle->capturing);
  active_captures.erase(c.get());
  bool unjoined = false;
  for (CUstream_st* s : c->streams) {
    if (s != handle && s->joined < s->captured) unjoined = true;
    s->capturing = nullptr;
  }
  *graph = nullptr;
  if (c->invalidated) return fail(cudaErrorStreamCaptureInvalidated);
  if (unjoined) return fail(cudaErrorStreamCaptureUnjoined);
  *graph = c->graph.release();
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t handle, cudaStreamCaptureStatus* status) {
  std::lock_guard lock(device_mutex());
  CUstream_st* stream = resolve(handle);
  *status = stream->capturing == nullptr     ? cudaStreamCaptureStatusNone
            : stream->capturing->invalidated ? cudaStreamCaptureStatusInvalidated
                                             : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

// --- events --------------------------------------------------------------------------------------

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
  MOE_EMULATION_ENTER();
  auto* e = new CUevent_st;
  e->flags = flags;
  *event = e;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  return cudaEventCreateWithFlags(event, cudaEventDefault);
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard lock(device_mutex());
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  // As in CUDA, queued records and waits still complete: the event lives until they run.
  event->destroyed = true;
  if (event->queued == 0) delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t handle) {
  MOE_EMULATION_ENTER();
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  CUstream_st* stream = resolve(handle);
  if (stream->capturing != nullptr) {
    event->captured_by = stream->capturing;
    event->captured_position = stream->captured;
    event->stream = stream;
    return cudaSuccess;
  }
  event->captured_by = nullptr;
  event->stream = stream;
  operation op;
  op.what = operation::type::record;
  op.event = event;
  op.sequence = ++event->recorded;
  ++event->queued;
  push(stream, std::move(op), is_legacy(handle));
  return sticky;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  MOE_EMULATION_ENTER();
  ++totals.host_synchronizations;
  if (live_capture_of(event) != nullptr) return fail(cudaErrorStreamCaptureUnsupported);
  if (breaks_capture()) return fail(cudaErrorStreamCaptureUnsupported);
  while (event->completed < event->recorded && event->stream != nullptr &&
         !event->stream->queue.empty())
    run_front(event->stream);
  return sticky;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  MOE_EMULATION_ENTER();
  while (event->completed < event->recorded && event->stream != nullptr &&
         !event->stream->queue.empty())
    run_front(event->stream);
  return sticky;
}

cudaError_t cudaEventElapsedTime(float* milliseconds, cudaEvent_t start, cudaEvent_t end) {
  MOE_EMULATION_ENTER();
  if ((start->flags & cudaEventDisableTiming) || (end->flags & cudaEventDisableTiming))
    return fail(cudaErrorInvalidResourceHandle);
  if (start->completed == 0 || end->completed == 0 || start->completed < start->recorded ||
      end->completed < end->recorded)
    return fail(cudaErrorNotReady);
  *milliseconds = std::chrono::duration<float, std::milli>(end->time - start->time).count();
  return cudaSuccess;
}

// --- graphs --------------------------------------------------------------------------------------

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}

cudaError_t cudaGraphGetNodes(cudaGraph_t graph, cudaGraphNode_t* nodes, std::size_t* count) {
  if (graph == nullptr || count == nullptr) return fail(cudaErrorInvalidValue);
  if (nodes == nullptr) {
    *count = graph->nodes.size();
    return cudaSuccess;
  }
  std::size_t const n = std::min(*count, graph->nodes.size());
  for (std::size_t i = 0; i < n; ++i) nodes[i] = graph->nodes[i].get();
  *count = n;
  return cudaSuccess;
}

cudaError_t cudaGraphNodeGetType(cudaGraphNode_t node, cudaGraphNodeType* type) {
  if (node == nullptr) return fail(cudaErrorInvalidValue);
  *type = node->type;
  return cudaSuccess;
}

cudaError_t cudaGraphMemcpyNodeGetParams(cudaGraphNode_t node, cudaMemcpy3DParms* parameters) {
  if (node == nullptr || node->type != cudaGraphNodeTypeMemcpy) return fail(cudaErrorInvalidValue);
  operation const& op = node->operation;
  *parameters = cudaMemcpy3DParms{};
  parameters->srcPtr = make_cudaPitchedPtr(const_cast<void*>(op.source), op.bytes, op.bytes, 1);
  parameters->dstPtr = make_cudaPitchedPtr(op.destination, op.bytes, op.bytes, 1);
  parameters->extent = make_cudaExtent(op.bytes, 1, 1);
  parameters->kind = op.direction;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  if (graph == nullptr || exec == nullptr) return fail(cudaErrorInvalidValue);
  auto* e = new CUgraphExec_st;
  for (auto const& node : graph->nodes) e->operations.push_back(node->operation);
  *exec = e;
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;  // a queued replay holds copies of its operations
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  if (exec == nullptr) return fail(cudaErrorInvalidValue);
  std::lock_guard lock(device_mutex());
  // Capture order is a topological order of the graph: replay it on the stream.
  for (operation const& op : exec->operations) {
    if (cudaError_t const e = enqueue(stream, op.kind, op.name, op.run); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // extern "C"
