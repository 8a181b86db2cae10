// SPDX-License-Identifier: Apache-2.0
// The cuBLAS entry points the library calls, on the emulated device: column-major GEMMs
// with transposes, leading dimensions, strides and batches, float accumulation, and the
// result rounded once to the output type. beta == 0 does not read C, as in cuBLAS. Each
// call is stream-ordered on the handle's stream and counts as one library call.

#include "state.hpp"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <vector>

struct cublasContext {
  cudaStream_t stream = nullptr;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};

namespace moe::emulation {
namespace {

float load(void const* base, cudaDataType_t type, std::size_t index) {
  switch (type) {
    case CUDA_R_32F:
      return static_cast<float const*>(base)[index];
    case CUDA_R_16F:
      return __half2float(static_cast<__half const*>(base)[index]);
    case CUDA_R_16BF:
      return __bfloat162float(static_cast<__nv_bfloat16 const*>(base)[index]);
    default:
      return 0.0f;
  }
}

void store(void* base, cudaDataType_t type, std::size_t index, float value) {
  switch (type) {
    case CUDA_R_32F:
      static_cast<float*>(base)[index] = value;
      break;
    case CUDA_R_16F:
      static_cast<__half*>(base)[index] = __float2half_rn(value);
      break;
    case CUDA_R_16BF:
      static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(value);
      break;
    default:
      break;
  }
}

bool supported(cudaDataType_t type) {
  return type == CUDA_R_32F || type == CUDA_R_16F || type == CUDA_R_16BF;
}

struct gemm_call {
  cublasOperation_t trans_a, trans_b;
  int m, n, k;
  float alpha, beta;
  void const* a;
  cudaDataType_t type_a;
  int lda;
  long long stride_a;
  void const* b;
  cudaDataType_t type_b;
  int ldb;
  long long stride_b;
  void* c;
  cudaDataType_t type_c;
  int ldc;
  long long stride_c;
  int batch;
};

cublasStatus_t check(gemm_call const& g) {
  if (g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (!supported(g.type_a) || !supported(g.type_b) || !supported(g.type_c))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  int const rows_a = g.trans_a == CUBLAS_OP_N ? g.m : g.k;
  int const rows_b = g.trans_b == CUBLAS_OP_N ? g.k : g.n;
  if (g.lda < std::max(1, rows_a) || g.ldb < std::max(1, rows_b) || g.ldc < std::max(1, g.m))
    return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

/// op(X) as float, `rows` rows of `depth` contiguous elements: the dot products of the
/// product then read memory in order.
std::vector<float> rows_of(void const* base, cudaDataType_t type, std::size_t offset,
                           bool transposed, int rows, int depth, int ld) {
  std::vector<float> out(static_cast<std::size_t>(rows) * static_cast<std::size_t>(depth));
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < depth; ++p) {
      std::size_t const at = transposed
                                 ? static_cast<std::size_t>(p) + static_cast<std::size_t>(r) * ld
                                 : static_cast<std::size_t>(r) + static_cast<std::size_t>(p) * ld;
      out[static_cast<std::size_t>(r) * depth + p] = load(base, type, offset + at);
    }
  return out;
}

void run(gemm_call const& g) {
  std::size_t const depth = static_cast<std::size_t>(g.k);
  for (int batch = 0; batch < g.batch; ++batch) {
    // Row i of op(A) is column i of A when A is not transposed (column-major storage).
    std::vector<float> const a =
        rows_of(g.a, g.type_a, static_cast<std::size_t>(batch * g.stride_a),
                g.trans_a != CUBLAS_OP_N, g.m, g.k, g.lda);
    std::vector<float> const b =
        rows_of(g.b, g.type_b, static_cast<std::size_t>(batch * g.stride_b),
                g.trans_b == CUBLAS_OP_N, g.n, g.k, g.ldb);
    std::size_t const base_c = static_cast<std::size_t>(batch * g.stride_c);
    for (int j = 0; j < g.n; ++j)
      for (int i = 0; i < g.m; ++i) {
        float const* row = a.data() + static_cast<std::size_t>(i) * depth;
        float const* column = b.data() + static_cast<std::size_t>(j) * depth;
        float sum = 0.0f;
        for (std::size_t p = 0; p < depth; ++p) sum += row[p] * column[p];
        std::size_t const out =
            base_c + static_cast<std::size_t>(i) + static_cast<std::size_t>(j) * g.ldc;
        float const previous = g.beta == 0.0f ? 0.0f : g.beta * load(g.c, g.type_c, out);
        store(g.c, g.type_c, out, g.alpha * sum + previous);
      }
  }
}

cublasStatus_t enqueue_gemm(cublasHandle_t handle, gemm_call const& g) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (cublasStatus_t const s = check(g); s != CUBLAS_STATUS_SUCCESS) return s;
  if (g.m == 0 || g.n == 0 || g.batch == 0) return CUBLAS_STATUS_SUCCESS;
  cudaError_t const e = enqueue(handle->stream, work_kind::library, "cublasGemm", [g] { run(g); });
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

float scalar(void const* pointer, cudaDataType_t) {
  return *static_cast<float const*>(pointer);
}

}  // namespace
}  // namespace moe::emulation

using namespace moe::emulation;

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  *handle = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  handle->workspace = nullptr;  // as cuBLAS: a new stream drops the user's workspace
  handle->workspace_bytes = 0;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *stream = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace, std::size_t bytes) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->workspace = workspace;
  handle->workspace_bytes = bytes;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t trans_a,
                            cublasOperation_t trans_b, int m, int n, int k, void const* alpha,
                            void const* a, cudaDataType_t type_a, int lda, void const* b,
                            cudaDataType_t type_b, int ldb, void const* beta, void* c,
                            cudaDataType_t type_c, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algorithm) {
  return cublasGemmStridedBatchedEx(handle, trans_a, trans_b, m, n, k, alpha, a, type_a, lda, 0, b,
                                    type_b, ldb, 0, beta, c, type_c, ldc, 0, 1, compute, algorithm);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t trans_a,
                                          cublasOperation_t trans_b, int m, int n, int k,
                                          void const* alpha, void const* a, cudaDataType_t type_a,
                                          int lda, long long stride_a, void const* b,
                                          cudaDataType_t type_b, int ldb, long long stride_b,
                                          void const* beta, void* c, cudaDataType_t type_c, int ldc,
                                          long long stride_c, int batch,
                                          cublasComputeType_t compute, cublasGemmAlgo_t) {
  if (compute != CUBLAS_COMPUTE_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  return enqueue_gemm(handle, {trans_a,
                               trans_b,
                               m,
                               n,
                               k,
                               scalar(alpha, type_c),
                               scalar(beta, type_c),
                               a,
                               type_a,
                               lda,
                               stride_a,
                               b,
                               type_b,
                               ldb,
                               stride_b,
                               c,
                               type_c,
                               ldc,
                               stride_c,
                               batch});
}

cublasStatus_t cublasSaxpy_v2(cublasHandle_t handle, int n, float const* alpha, float const* x,
                              int incx, float* y, int incy) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (n <= 0) return CUBLAS_STATUS_SUCCESS;
  float const a = *alpha;
  cudaError_t const e = enqueue(handle->stream, work_kind::library, "cublasSaxpy", [=] {
    for (int i = 0; i < n; ++i)
      y[static_cast<std::size_t>(i) * incy] += a * x[static_cast<std::size_t>(i) * incx];
  });
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // extern "C"
