// SPDX-License-Identifier: Apache-2.0
#pragma once
// cuBLAS behind row-major operands. Every GEMM of the library (router logits, expert
// projections, their gradients) goes through `gemm` or `gemm_strided_batched` here, which
// map a row-major product onto cuBLAS's column-major one, accumulate in float
// (CUBLAS_COMPUTE_32F: no TF32 unless the caller's handle asks for it), check every status,
// and run on the caller's stream. The handle is borrowed; `blas_handle` owns one for
// callers that have none.
//
// CUDA graphs: before capturing, point the handle at the capturing stream (cublasSetStream)
// and then give it a workspace (cublasSetWorkspace; 32 MiB on Hopper). The wrappers set the
// stream only when it differs, because cublasSetStream drops that workspace.

#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <climits>
#include <string>
#include <type_traits>

namespace moe {

/// An owned cuBLAS handle. Creating one initialises cuBLAS on the current device (it needs
/// a GPU); create it once, outside timed or captured regions, and lend it to every call.
class blas_handle {
 public:
  blas_handle() { MOE_CUBLAS_TRY(cublasCreate(&handle_)); }
  blas_handle(blas_handle const&) = delete;
  blas_handle& operator=(blas_handle const&) = delete;
  ~blas_handle() {
    if (handle_) (void)cublasDestroy(handle_);
  }
  [[nodiscard]] cublasHandle_t get() const noexcept { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

/// The cudaDataType_t of a device element type.
template <element T>
inline constexpr cudaDataType_t cuda_data_type = [] {
  if constexpr (dtype_of<T> == dtype::f32)
    return CUDA_R_32F;
  else if constexpr (dtype_of<T> == dtype::f16)
    return CUDA_R_16F;
  else if constexpr (dtype_of<T> == dtype::bf16)
    return CUDA_R_16BF;
  else
    static_assert(dtype_traits<std::remove_cv_t<T>>::device_supported,
                  "moe: the CUDA backend takes float, __half or __nv_bfloat16 elements.");
}();

/// Whether an operand of a row-major GEMM is used as stored or transposed.
enum class transpose : bool { no = false, yes = true };

/// The shape of a row-major GEMM C (m, n) = alpha · op(A) (m, depth) · op(B) (depth, n) +
/// beta · C. Leading dimensions are row strides of the stored (untransposed) matrices.
struct gemm_shape {
  index_t m = 0, n = 0, depth = 0;
  transpose trans_a = transpose::no, trans_b = transpose::no;
  index_t lda = 0, ldb = 0, ldc = 0;
};

namespace detail {

inline int blas_int(index_t value, char const* what) {
  MOE_EXPECTS(value >= 0 && value <= INT_MAX, what,
              "is " + std::to_string(value) + ", beyond cuBLAS's 32-bit int");
  return static_cast<int>(value);
}

inline cublasOperation_t blas_op(transpose t) noexcept {
  return t == transpose::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
}

/// Points `handle` at `stream`, only when it is not there already: cublasSetStream also
/// resets the workspace a caller gave the handle with cublasSetWorkspace, which CUDA-graph
/// capture needs (so that cuBLAS does not allocate while captured).
inline void bind_stream(cublasHandle_t handle, cudaStream_t stream) {
  cudaStream_t current = nullptr;
  MOE_CUBLAS_TRY(cublasGetStream(handle, &current));
  if (current != stream) MOE_CUBLAS_TRY(cublasSetStream(handle, stream));
}

}  // namespace detail

/// Row-major C = alpha · op(A) · op(B) + beta · C on `stream`, float accumulation. Row-major
/// C = A·B is column-major Cᵀ = Bᵀ·Aᵀ, so B goes first. An empty product (m, n or depth 0)
/// scales C by beta as cuBLAS does.
/// @param[in]    a, b  device memory
/// @param[inout] c     device memory
template <element A, element B, element C>
void gemm(cublasHandle_t handle, cudaStream_t stream, gemm_shape const& s, float alpha, A const* a,
          B const* b, float beta, C* c) {
  static_assert(std::is_same_v<std::remove_cv_t<A>, std::remove_cv_t<B>>,
                "moe::gemm: cuBLAS multiplies operands of one type; convert one of them.");
  MOE_EXPECTS(handle != nullptr, "handle", "no cuBLAS handle: pass one (moe::blas_handle)");
  if (s.m == 0 || s.n == 0) return;
  detail::bind_stream(handle, stream);
  MOE_CUBLAS_TRY(cublasGemmEx(
      handle, detail::blas_op(s.trans_b), detail::blas_op(s.trans_a), detail::blas_int(s.n, "n"),
      detail::blas_int(s.m, "m"), detail::blas_int(s.depth, "depth"), &alpha, b, cuda_data_type<B>,
      detail::blas_int(s.ldb, "ldb"), a, cuda_data_type<A>, detail::blas_int(s.lda, "lda"), &beta,
      c, cuda_data_type<C>, detail::blas_int(s.ldc, "ldc"), CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
}

/// `batch` independent row-major GEMMs whose operands lie `stride_*` elements apart.
template <element A, element B, element C>
void gemm_strided_batched(cublasHandle_t handle, cudaStream_t stream, gemm_shape const& s,
                          index_t batch, float alpha, A const* a, index_t stride_a, B const* b,
                          index_t stride_b, float beta, C* c, index_t stride_c) {
  static_assert(std::is_same_v<std::remove_cv_t<A>, std::remove_cv_t<B>>,
                "moe::gemm_strided_batched: cuBLAS multiplies operands of one type.");
  MOE_EXPECTS(handle != nullptr, "handle", "no cuBLAS handle: pass one (moe::blas_handle)");
  if (s.m == 0 || s.n == 0 || batch == 0) return;
  detail::bind_stream(handle, stream);
  MOE_CUBLAS_TRY(cublasGemmStridedBatchedEx(
      handle, detail::blas_op(s.trans_b), detail::blas_op(s.trans_a), detail::blas_int(s.n, "n"),
      detail::blas_int(s.m, "m"), detail::blas_int(s.depth, "depth"), &alpha, b, cuda_data_type<B>,
      detail::blas_int(s.ldb, "ldb"), stride_b, a, cuda_data_type<A>,
      detail::blas_int(s.lda, "lda"), stride_a, &beta, c, cuda_data_type<C>,
      detail::blas_int(s.ldc, "ldc"), stride_c, detail::blas_int(batch, "batch"),
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace moe
