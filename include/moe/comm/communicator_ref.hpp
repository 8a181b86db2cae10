// SPDX-License-Identifier: Apache-2.0
#pragma once
// A borrowed reference to any `comm::communicator`, so that a layer can hold "the caller's
// communicator" without becoming a template over its type. One indirect call per message;
// messages are few and large next to it.

#include <moe/comm/concepts.hpp>
#include <moe/core/config.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <type_traits>

namespace moe::comm {

/// Refers to a communicator that the caller owns and keeps alive; models `communicator`.
class communicator_ref {
 public:
  template <communicator C>
  requires(!std::is_same_v<std::remove_cvref_t<C>, communicator_ref>) communicator_ref(C& comm)
  noexcept  // NOLINT: implicit, as a reference binds
      : object_(std::addressof(comm)), calls_(&calls_for<C>) {}

  [[nodiscard]] int rank() const { return calls_->rank(object_); }
  [[nodiscard]] int size() const { return calls_->size(object_); }
  [[nodiscard]] comm::topology topology() const { return calls_->topology(object_); }
  void group_start() const { calls_->group_start(object_); }
  void group_end() const { calls_->group_end(object_); }
  void send(void const* src, std::size_t bytes, int peer, cudaStream_t stream) const {
    calls_->send(object_, src, bytes, peer, stream);
  }
  void recv(void* dst, std::size_t bytes, int peer, cudaStream_t stream) const {
    calls_->recv(object_, dst, bytes, peer, stream);
  }

 private:
  struct call_table {
    int (*rank)(void*);
    int (*size)(void*);
    comm::topology (*topology)(void*);
    void (*group_start)(void*);
    void (*group_end)(void*);
    void (*send)(void*, void const*, std::size_t, int, cudaStream_t);
    void (*recv)(void*, void*, std::size_t, int, cudaStream_t);
  };

  template <class C>
  static constexpr call_table calls_for{
      [](void* c) { return static_cast<int>(static_cast<C*>(c)->rank()); },
      [](void* c) { return static_cast<int>(static_cast<C*>(c)->size()); },
      [](void* c) { return static_cast<C*>(c)->topology(); },
      [](void* c) { static_cast<C*>(c)->group_start(); },
      [](void* c) { static_cast<C*>(c)->group_end(); },
      [](void* c, void const* src, std::size_t bytes, int peer, cudaStream_t s) {
        static_cast<C*>(c)->send(src, bytes, peer, s);
      },
      [](void* c, void* dst, std::size_t bytes, int peer, cudaStream_t s) {
        static_cast<C*>(c)->recv(dst, bytes, peer, s);
      }};

  void* object_;
  call_table const* calls_;
};
static_assert(communicator<communicator_ref>);

}  // namespace moe::comm
