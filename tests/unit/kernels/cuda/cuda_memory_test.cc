// The CUDA memory services behind the daemon's GPU pools (kernels/cuda/cuda_memory.h): importing
// another process's allocation through its IPC handle (range, device and handle checks; reads,
// writes the exporter sees, two imports of one allocation), device payload buffers and copies
// from several threads, pinned host memory, and the registry's wrappers. CUDA refuses to import a
// process's own allocation, so a helper process (cuda_ipc_exporter) owns the memory. They skip
// where no GPU exists.
#include "kernels/cuda/cuda_memory.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/cuda/device.h"
#include "kernels/registry/codec_registry.h"
#include "tests/testing/cuda_ipc_exporter.h"
#include "tests/testing/subprocess.h"

namespace spectrumkv::cuda {
namespace {

using spectrumkv::testing::IpcChecksum;
using spectrumkv::testing::IpcPattern;

std::string ExporterBinary() {
  const char* env = std::getenv("SPECTRUMKV_IPC_EXPORTER_BIN");
  return env != nullptr ? env : SPECTRUMKV_IPC_EXPORTER_BIN;
}

class CudaMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const absl::Status device = CheckDevice(0);
    if (!device.ok()) GTEST_SKIP() << "no CUDA device: " << device;
  }
};

// A cuda_ipc_exporter process and what it reported.
class Exporter {
 public:
  Exporter(uint64_t bytes, uint64_t seed) : bytes_(bytes), seed_(seed) {
    dir_ = absl::StrFormat("/tmp/skv-ipc-%d-%u", getpid(), seed);
    std::filesystem::create_directories(dir_);
  }
  ~Exporter() { std::filesystem::remove_all(dir_); }

  // Starts it and waits for its handle.
  void Start() {
    ASSERT_TRUE(process_.Start({ExporterBinary(), std::to_string(bytes_), std::to_string(seed_),
                                dir_ + "/info", dir_ + "/checksum"},
                               dir_ + "/log"));
    for (int i = 0; i < 600 && !std::filesystem::exists(dir_ + "/info"); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    std::ifstream info(dir_ + "/info");
    std::string hex;
    ASSERT_TRUE(info >> hex >> offset_ >> allocation_bytes_) << Log();
    ASSERT_EQ(hex.size(), 2 * kIpcHandleBytes);
    for (size_t i = 0; i < kIpcHandleBytes; ++i) {
      handle_ += static_cast<char>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
    }
  }
  // Stops it; the checksum of its buffer as it was then.
  uint64_t StopAndChecksum() {
    const std::optional<int> code = process_.Stop(SIGTERM, 30);
    EXPECT_EQ(code, 0) << Log();
    uint64_t sum = 0;
    std::ifstream(dir_ + "/checksum") >> sum;
    return sum;
  }
  std::string Log() const {
    std::ifstream f(dir_ + "/log");
    return std::string(std::istreambuf_iterator<char>(f), {});
  }

  const std::string& handle() const { return handle_; }
  uint64_t offset() const { return offset_; }
  uint64_t allocation_bytes() const { return allocation_bytes_; }

 private:
  uint64_t bytes_, seed_;
  std::string dir_;
  spectrumkv::testing::Subprocess process_;
  std::string handle_;
  uint64_t offset_ = 0, allocation_bytes_ = 0;
};

TEST_F(CudaMemoryTest, ImportsAnotherProcesssAllocation) {
  const uint64_t bytes = (3 << 20) + 1000, seed = 41;
  Exporter exporter(bytes, seed);
  exporter.Start();
  if (HasFatalFailure()) return;
  EXPECT_EQ(exporter.offset(), 0u) << "a cudaMalloc buffer starts its allocation";
  ASSERT_GE(exporter.allocation_bytes(), bytes);
  auto memory = CudaDeviceMemory::Create(0);
  ASSERT_TRUE(memory.ok()) << memory.status();

  // A window of the allocation reads what the exporter wrote.
  const uint64_t at = 4096, size = 65536;
  auto window = CudaIpcMemory::Open(exporter.handle(), 0, at, size);
  ASSERT_TRUE(window.ok()) << window.status();
  EXPECT_EQ((*window)->size(), size);
  // The mapping may be rounded up to the driver's granularity; it covers the allocation.
  const uint64_t end = (*window)->allocation_bytes();
  EXPECT_GE(end, exporter.allocation_bytes());
  std::vector<uint8_t> got(size);
  ASSERT_TRUE((*memory)->CopyToHost(got.data(), (*window)->data(), size).ok());
  for (uint64_t i = 0; i < size; ++i) {
    ASSERT_EQ(got[i], IpcPattern(seed, at + i)) << "byte " << at + i;
  }

  // The same allocation imported again (two regions of one allocation, as a frontend may
  // register them): both stay usable while either is open.
  auto whole = CudaIpcMemory::Open(exporter.handle(), 0, 0, end);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ((*whole)->data() + at, (*window)->data());
  std::vector<uint8_t> first(256);
  ASSERT_TRUE((*memory)->CopyToHost(first.data(), (*whole)->data(), first.size()).ok());
  for (uint64_t i = 0; i < first.size(); ++i) ASSERT_EQ(first[i], IpcPattern(seed, i));

  // Writes through the import reach the exporter's memory.
  std::vector<uint8_t> update(size);
  for (uint64_t i = 0; i < size; ++i) update[i] = IpcPattern(seed + 1, i);
  ASSERT_TRUE((*memory)->CopyToDevice((*window)->data(), update.data(), size).ok());
  whole->reset();
  ASSERT_TRUE((*memory)->CopyToHost(got.data(), (*window)->data(), size).ok());
  EXPECT_EQ(got, update) << "closing one import must leave the other mapped";
  window->reset();

  // Ranges outside the allocation, empty ranges and bad handles are refused.
  EXPECT_EQ(CudaIpcMemory::Open(exporter.handle(), 0, end - 10, 11).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaIpcMemory::Open(exporter.handle(), 0, ~uint64_t{0} - 5, 10).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaIpcMemory::Open(exporter.handle(), 0, 0, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(CudaIpcMemory::Open(exporter.handle(), 0, end - 10, 10).ok());
  EXPECT_EQ(CudaIpcMemory::Open(exporter.handle().substr(1), 0, 0, 16).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaIpcMemory::Open(exporter.handle(), 99, 0, 16).status().code(),
            absl::StatusCode::kUnavailable);
  std::string garbage(kIpcHandleBytes, '\0');
  std::mt19937_64 rng(7);
  for (char& c : garbage) c = static_cast<char>(rng());
  const auto bad = CudaIpcMemory::Open(garbage, 0, 0, 16);
  EXPECT_FALSE(bad.ok()) << "a random handle must not open";

  // The registry's wrapper reaches the same code.
  auto via_registry = ImportCudaIpcMemory(exporter.handle(), 0, at, size);
  ASSERT_TRUE(via_registry.ok()) << via_registry.status();
  EXPECT_EQ((*via_registry)->size(), size);
  via_registry->reset();

  std::vector<uint8_t> expect(bytes);
  for (uint64_t i = 0; i < bytes; ++i) expect[i] = IpcPattern(seed, i);
  std::memcpy(expect.data() + at, update.data(), size);
  EXPECT_EQ(exporter.StopAndChecksum(), IpcChecksum(expect));
}

TEST_F(CudaMemoryTest, OwnAllocationCannotBeImported) {
  auto buffer = DeviceBuffer::Allocate(1 << 20);
  ASSERT_TRUE(buffer.ok());
  auto exported = ExportIpcHandle(buffer->data() + 512);
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->offset_bytes, 512u);
  EXPECT_GE(exported->allocation_bytes, uint64_t{1} << 20);
  const auto own = CudaIpcMemory::Open(exported->handle, 0, 0, 16);
  EXPECT_FALSE(own.ok()) << "CUDA refuses to import a process's own allocation";
  std::printf("opening an own handle: %s\n", own.status().ToString().c_str());
  std::vector<uint8_t> host(64);
  EXPECT_EQ(ExportIpcHandle(host.data()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaMemoryTest, PayloadBuffersAndCopiesFromSeveralThreads) {
  auto memory = CudaDeviceMemory::Create(0);
  ASSERT_TRUE(memory.ok()) << memory.status();
  EXPECT_EQ((*memory)->Allocate(0).status().code(), absl::StatusCode::kInvalidArgument);
  // Pinned host memory, as the daemon pins its staging arena.
  const uint64_t arena_bytes = 16 << 20;
  void* arena =
      mmap(nullptr, arena_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(arena, MAP_FAILED);
  auto pinned = PinHostMemory(arena, arena_bytes);
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      auto* host = static_cast<uint8_t*>(arena) + w * (arena_bytes / 4);
      std::vector<uint8_t> back(arena_bytes / 4);
      for (int round = 0; round < 10; ++round) {
        const uint64_t bytes = (1 << 20) + 16 * round + w;
        auto buffer = (*memory)->Allocate(bytes);
        if (!buffer.ok() || reinterpret_cast<uintptr_t>((*buffer)->data()) % 16 != 0) {
          ++failures;
          return;
        }
        for (uint64_t i = 0; i < bytes; ++i) host[i] = IpcPattern(w * 100 + round, i);
        if (!(*memory)->CopyToDevice((*buffer)->data(), host, bytes).ok() ||
            !(*memory)->CopyToHost(back.data(), (*buffer)->data(), bytes).ok() ||
            std::memcmp(back.data(), host, bytes) != 0) {
          ++failures;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures, 0);
  pinned->reset();
  munmap(arena, arena_bytes);
}

}  // namespace
}  // namespace spectrumkv::cuda
