// CPU codec throughput against memcpy of the same FP16 bytes, on one pinned core, in one run.
//
// For each token count: a llama3-8b-shaped KV in a vLLM NHD paged pool (shuffled blocks) is
// scored (key_norm), planned (3-tier), packed into a warm staging buffer and unpacked (every
// checksum verified) into a vLLM HND pool with another block size. memcpy copies the same
// number of bytes between the two pools' regions. Each step runs --reps times; medians are
// reported, as GB/s of FP16 KV bytes and as a ratio to memcpy.
//
// With --score-threads, scoring also runs on that many threads (not pinned), next to a plain
// read of the same pool bytes on as many threads: the memory floor that scoring can reach.
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "client/kvgen/host_pool.h"
#include "client/kvgen/model_shapes.h"
#include "client/kvgen/synthetic.h"
#include "kernels/api/codec.h"
#include "kernels/cpu/cpu_codec.h"

namespace spectrumkv {
namespace {

using Clock = std::chrono::steady_clock;

template <typename F>
double MedianSeconds(int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto a = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Reads every byte of the regions on `threads` threads (each a contiguous share), summing
// 64-bit words so that the reads cannot be elided.
void ReadPool(std::span<const MemoryRegion> regions, uint32_t threads) {
  std::vector<std::thread> pool;
  std::vector<uint64_t> sums(threads);
  for (uint32_t i = 0; i < threads; ++i) {
    pool.emplace_back([&, i] {
      uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (const MemoryRegion& r : regions) {
        const auto* w = static_cast<const uint64_t*>(r.base);
        const uint64_t words = r.size_bytes / 8;
        const uint64_t end = words * (i + 1) / threads;
        uint64_t j = words * i / threads;
        for (; j + 4 <= end; j += 4) {
          s0 += w[j];
          s1 += w[j + 1];
          s2 += w[j + 2];
          s3 += w[j + 3];
        }
        for (; j < end; ++j) s0 += w[j];
      }
      sums[i] = s0 + s1 + s2 + s3;
    });
  }
  for (std::thread& t : pool) t.join();
  volatile uint64_t sink = 0;
  for (uint64_t s : sums) sink = sink + s;
}

int Run(int argc, char** argv) {
  std::vector<uint32_t> token_counts = {4096, 16384};
  std::vector<double> budgets = {0.5, 0.3};
  std::vector<uint32_t> score_threads;
  std::string model = "llama3-8b", backend = "best";
  int reps = 5, core = 1;
  CLI::App app{"CPU codec throughput vs memcpy (docs/BENCHMARKS.md)"};
  app.add_option("--tokens", token_counts, "Token counts")->capture_default_str();
  app.add_option("--budgets", budgets, "3-tier element budgets")->capture_default_str();
  app.add_option("--model", model, "KV shape")->capture_default_str();
  app.add_option("--reps", reps, "Repetitions per measurement (median)")->capture_default_str();
  app.add_option("--core", core, "CPU core to pin to (-1: no pinning)")->capture_default_str();
  app.add_option("--backend", backend, "best or scalar")->capture_default_str();
  app.add_option("--score-threads", score_threads,
                 "Also score (and read the pool) on each of these thread counts, unpinned");
  CLI11_PARSE(app, argc, argv);

  cpu_set_t all_cpus;
  if (sched_getaffinity(0, sizeof(all_cpus), &all_cpus) != 0) std::perror("sched_getaffinity");
  if (core >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(core, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) std::perror("sched_setaffinity");
  }
  const ModelShape shape = *kvgen::LookupModelShape(model);
  std::unique_ptr<CpuCodec> codec =
      backend == "scalar" ? std::make_unique<CpuCodec>(ScalarRowKernels()) : CpuCodec::CreateBest();
  std::printf("# backend %s, model %s, pinned core %d, median of %d\n",
              std::string(codec->name()).c_str(), model.c_str(), core, reps);
  std::printf("%-7s %-6s %-9s %9s %9s %8s\n", "tokens", "budget", "step", "ms", "GB/s", "x memcpy");
  for (uint32_t n : token_counts) {
    kvgen::PoolSpec src_spec{kvgen::PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16,
                             kvgen::BlocksFor(n, 16)};
    kvgen::PoolSpec dst_spec{kvgen::PoolLayoutKind::kVllmHnd, shape, DType::kFloat16, 32,
                             kvgen::BlocksFor(n, 32)};
    auto src_pool = *kvgen::HostPool::Create(src_spec);
    auto dst_pool = *kvgen::HostPool::Create(dst_spec);
    const auto src_table = kvgen::ShuffledBlockTable(src_spec.num_blocks, 16, n, 1);
    const auto dst_table = kvgen::ShuffledBlockTable(dst_spec.num_blocks, 32, n, 2);
    const KvBuffer src = src_pool->View(src_table, n);
    const KvBuffer dst = dst_pool->View(dst_table, n);
    kvgen::FillSynthetic(src, kvgen::SyntheticOptions{});
    const double fp16 = double(n) * double(shape.Fp16BytesPerToken());

    // memcpy of the same bytes between the same two pools (region by region).
    const double t_copy = MedianSeconds(reps, [&] {
      const auto& s = src_pool->regions();
      const auto& d = dst_pool->regions();
      for (size_t r = 0; r < s.size(); ++r) std::memcpy(d[r].base, s[r].base, s[r].size_bytes);
    });
    auto row = [&](const char* b, const char* step, double t) {
      std::printf("%-7u %-6s %-9s %9.1f %9.2f %8.2f\n", n, b, step, t * 1e3, fp16 / t / 1e9,
                  t_copy / t);
    };
    row("-", "memcpy", t_copy);
    std::vector<float> scores(n);
    const double t_score = MedianSeconds(reps, [&] {
      if (!codec->Score(src, ScoreOptions{}, scores).ok()) std::abort();
    });
    row("-", "score", t_score);
    for (uint32_t k : score_threads) {
      cpu_set_t pinned;
      sched_getaffinity(0, sizeof(pinned), &pinned);
      sched_setaffinity(0, sizeof(all_cpus), &all_cpus);  // threads inherit the caller's mask
      codec->set_score_threads(k);
      const double t_k = MedianSeconds(reps, [&] {
        if (!codec->Score(src, ScoreOptions{}, scores).ok()) std::abort();
      });
      codec->set_score_threads(1);
      const double t_read = MedianSeconds(reps, [&] { ReadPool(src_pool->regions(), k); });
      sched_setaffinity(0, sizeof(pinned), &pinned);
      const std::string label = "x" + std::to_string(k);
      row(label.c_str(), "score", t_k);
      row(label.c_str(), "read", t_read);
    }
    for (double b : budgets) {
      PlanOptions o;
      o.budget = b;
      const TierPlan plan = *PlanTiers(shape, DType::kFloat16, n, scores, o);
      std::vector<uint8_t> payload(plan.layout.total_bytes, 0);  // warm staging buffer
      const double t_pack = MedianSeconds(reps, [&] {
        if (!PackPayloadInto(*codec, src, plan, payload).ok()) std::abort();
      });
      const double t_unpack = MedianSeconds(reps, [&] {
        if (!UnpackPayload(*codec, payload, dst, payload.size()).ok()) std::abort();
      });
      const std::string bs = std::to_string(b).substr(0, 4);
      row(bs.c_str(), "pack", t_pack);
      row(bs.c_str(), "unpack", t_unpack);
    }
  }
  return 0;
}

}  // namespace
}  // namespace spectrumkv

int main(int argc, char** argv) { return spectrumkv::Run(argc, argv); }
