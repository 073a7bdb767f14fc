#include "daemon/pools/pool_registry.h"

#include <unistd.h>

#include "absl/strings/str_format.h"
#include "client/kvgen/shm_pool.h"
#include "gtest/gtest.h"

namespace spectrumkv {
namespace {

using kvgen::PoolLayoutKind;

CudaIpcImporter NoGpu() {
  return [](const CudaIpcSpec&) -> absl::StatusOr<std::unique_ptr<ImportedMemory>> {
    return absl::UnavailableError("no GPU");
  };
}

class PoolRegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    kvgen::PoolSpec spec{PoolLayoutKind::kVllmNhd, {2, 2, 64}, DType::kFloat16, 16, 4};
    shm_ = std::move(*kvgen::ShmPool::Create(absl::StrFormat("skv-test-%d", getpid()), spec));
  }
  PoolSpec Spec(const std::string& id) {
    PoolSpec s;
    s.pool_id = id;
    s.layout = shm_->layout();
    for (size_t i = 0; i < shm_->names().size(); ++i) {
      s.regions.push_back(HostShmSpec{shm_->names()[i], 0, shm_->regions()[i].size_bytes});
    }
    return s;
  }
  std::unique_ptr<kvgen::ShmPool> shm_;
};

TEST_F(PoolRegistryTest, RegistersAndMapsSharedMemory) {
  PoolRegistry reg(4, NoGpu());
  auto pool = reg.Register(Spec("p0"));
  ASSERT_TRUE(pool.ok()) << pool.status();
  // The daemon's mapping sees what the frontend writes.
  static_cast<uint8_t*>(shm_->regions()[1].base)[100] = 0x5A;
  EXPECT_EQ(static_cast<uint8_t*>((*pool)->regions()[1].base)[100], 0x5A);
  EXPECT_EQ((*pool)->memory_kind(), MemoryKind::kHost);
  EXPECT_EQ(reg.Register(Spec("p0")).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(reg.List().size(), 1u);
  EXPECT_TRUE(reg.Unregister("p0").ok());
  EXPECT_EQ(reg.Get("p0").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(reg.Unregister("p0").code(), absl::StatusCode::kNotFound);
}

TEST_F(PoolRegistryTest, RejectsBadInput) {
  PoolRegistry reg(1, NoGpu());
  PoolSpec s = Spec("bad id!");
  EXPECT_EQ(reg.Register(s).status().code(), absl::StatusCode::kInvalidArgument);
  s = Spec("p");
  s.regions[0] = HostShmSpec{"/skv-no-such-object", 0, 4096};
  EXPECT_EQ(reg.Register(s).status().code(), absl::StatusCode::kInvalidArgument)
      << "the layout does not fit a 4096-byte region";
  s = Spec("p");
  std::get<HostShmSpec>(s.regions[0]).name = "/skv-no-such-object";
  EXPECT_EQ(reg.Register(s).status().code(), absl::StatusCode::kNotFound);
  s = Spec("p");
  std::get<HostShmSpec>(s.regions[0]).offset_bytes = 64;  // past the end of the object
  EXPECT_EQ(reg.Register(s).status().code(), absl::StatusCode::kInvalidArgument);
  s = Spec("p");
  s.layout.values[1].offset_bytes += 2;  // reaches past its region
  const absl::Status v = reg.Register(s).status();
  EXPECT_EQ(v.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(v.message().find("layout.values[1]"), std::string::npos) << v;
  s = Spec("p");
  s.regions.push_back(CudaIpcSpec{std::string(64, 'x'), 0, 0, 1});
  EXPECT_EQ(reg.Register(s).status().code(), absl::StatusCode::kInvalidArgument) << "mixed";
  s = Spec("p");
  for (auto& r : s.regions) {
    r = CudaIpcSpec{std::string(64, 'x'), 0, 0, std::get<HostShmSpec>(r).size_bytes};
  }
  EXPECT_EQ(reg.Register(s).status().code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(reg.Register(Spec("p1")).ok());
  EXPECT_EQ(reg.Register(Spec("p2")).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(PoolRegistryTest, UnregisterRefusedWhileInUse) {
  PoolRegistry reg(4, NoGpu());
  auto pool = *reg.Register(Spec("p0"));
  pool->active_transfers.fetch_add(1);
  EXPECT_EQ(reg.Unregister("p0").code(), absl::StatusCode::kFailedPrecondition);
  pool->active_transfers.fetch_sub(1);
  EXPECT_TRUE(reg.Unregister("p0").ok());
  // The mapping stays valid while someone holds the pool.
  static_cast<uint8_t*>(pool->regions()[0].base)[0] = 1;
}

}  // namespace
}  // namespace spectrumkv
