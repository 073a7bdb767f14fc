#include "client/kvgen/npy.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

#include "client/kvgen/host_pool.h"
#include "gtest/gtest.h"
#include "tests/testing/kv_testing.h"

namespace spectrumkv::kvgen {
namespace {

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/" + name + std::to_string(::getpid());
}

TEST(NpyTest, RoundTripsThroughAPool) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    const ModelShape shape{3, 2, 16};
    auto src = testing::MakePool(PoolLayoutKind::kTrtllm, shape, dtype, 4, 11, 5);
    std::mt19937_64 rng(testing::FreshSeed());
    testing::FillRandom(src.View(), rng);
    DenseKv dense;
    CopyBufferToDense(src.View(), &dense);
    const std::string path = TempPath("kv.npy");
    ASSERT_TRUE(WriteNpy(path, dense).ok());
    auto read = ReadNpy(path, dtype == DType::kBFloat16);
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_EQ(read->shape, shape);
    EXPECT_EQ(read->num_tokens, 11u);
    EXPECT_EQ(read->data, dense.data);
    auto dst = testing::MakePool(PoolLayoutKind::kVllmNhd, shape, dtype, 8, 11, 6);
    CopyDenseToBuffer(*read, dst.View());
    DenseKv back;
    CopyBufferToDense(dst.View(), &back);
    EXPECT_EQ(back.data, dense.data);
    // The dtype must be stated: bf16 bits are not fp16.
    EXPECT_FALSE(ReadNpy(path, dtype != DType::kBFloat16).ok());
    std::remove(path.c_str());
  }
}

TEST(NpyTest, RejectsBadFiles) {
  EXPECT_EQ(ReadNpy("/nonexistent/kv.npy", false).status().code(), absl::StatusCode::kNotFound);
  const std::string path = TempPath("bad.npy");
  std::ofstream(path) << "not numpy";
  EXPECT_EQ(ReadNpy(path, false).status().code(), absl::StatusCode::kInvalidArgument);
  DenseKv kv;
  kv.shape = {1, 1, 8};
  kv.num_tokens = 4;
  kv.data.assign(64, 0);
  ASSERT_TRUE(WriteNpy(path, kv).ok());
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 2);
  EXPECT_EQ(ReadNpy(path, false).status().code(), absl::StatusCode::kDataLoss);
  std::remove(path.c_str());
}

TEST(HostPoolTest, ShuffledBlockTablesAreDistinctBlocks) {
  const auto table = ShuffledBlockTable(100, 16, 1000, 7);
  EXPECT_EQ(table.size(), 63u);
  std::vector<uint32_t> sorted = table;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::unique(sorted.begin(), sorted.end()), sorted.end());
  EXPECT_LT(sorted.back(), 100u);
  EXPECT_NE(table, ShuffledBlockTable(100, 16, 1000, 8));
}

}  // namespace
}  // namespace spectrumkv::kvgen
