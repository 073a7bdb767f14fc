// Walks one lane's rows of a range of a (layer, part, tier) array: row r of the array is head
// r % H of the token list[r / H], in the paged layout of `placement`. Rows advance by a constant
// step; the division by H is done once, then the (rank, head) pair is stepped.
#ifndef SPECTRUMKV_KERNELS_CUDA_ROW_CURSOR_CUH_
#define SPECTRUMKV_KERNELS_CUDA_ROW_CURSOR_CUH_

#include "kernels/cuda/device_common.cuh"

namespace spectrumkv::cuda_kernels {

class RowCursor {
 public:
  __device__ RowCursor(const DevPlacement& placement, const uint32_t* list,
                       const uint32_t* block_table, uint32_t block_size, uint32_t heads)
      : p_(placement), list_(list), table_(block_table), block_size_(block_size), heads_(heads) {}

  // Moves to array row `row` (rows only ever increase, by `step` after the first call).
  // Returns the row's first byte.
  __device__ __forceinline__ uint8_t* Seek(uint64_t row, uint32_t step) {
    if (!started_) {
      rank_ = row / heads_;
      head_ = static_cast<uint32_t>(row - rank_ * heads_);
      started_ = true;
    } else {
      head_ += step;
      while (head_ >= heads_) {
        head_ -= heads_;
        ++rank_;
      }
    }
    if (rank_ != cached_rank_) {
      token_ = list_[rank_];
      token_base_ = TokenBase(p_, table_, block_size_, token_);
      cached_rank_ = rank_;
    }
    return token_base_ + uint64_t{head_} * p_.head_stride;
  }

  __device__ uint32_t token() const { return token_; }
  __device__ uint32_t head() const { return head_; }

 private:
  DevPlacement p_;
  const uint32_t* list_;
  const uint32_t* table_;
  uint32_t block_size_;
  uint32_t heads_;
  bool started_ = false;
  uint64_t rank_ = 0;
  uint32_t head_ = 0;
  uint64_t cached_rank_ = ~uint64_t{0};
  uint32_t token_ = 0;
  uint8_t* token_base_ = nullptr;
};

}  // namespace spectrumkv::cuda_kernels

#endif  // SPECTRUMKV_KERNELS_CUDA_ROW_CURSOR_CUH_
