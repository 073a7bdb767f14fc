#include "kernels/cuda/cuda_codec.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kernels/cuda/crc_tables.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/kernel_params.h"

namespace spectrumkv {
namespace {

using cuda_kernels::DevCall;
using cuda_kernels::DevCrcRange;
using cuda_kernels::DevLayer;
using cuda_kernels::DevPlacement;
using cuda_kernels::DevScoreCall;
using cuda_kernels::DevSegment;

constexpr uint64_t kAlign = 256;
constexpr uint64_t kMinRangeRows = 64;
constexpr uint64_t kMaxRangeRows = 4096;

uint64_t AlignUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// True if `p` is memory the device can access (device or managed allocations).
bool IsDeviceAccessible(const void* p) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error so it does not leak into a later call
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

absl::Status CheckDeviceKv(const KvBuffer& kv, const char* role) {
  if (kv.memory_kind != MemoryKind::kDevice) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: the cuda codec needs KV in device memory (memory_kind kDevice)", role));
  }
  for (size_t i = 0; i < kv.regions.size(); ++i) {
    if (kv.regions[i].size_bytes != 0 && !IsDeviceAccessible(kv.regions[i].base)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: regions[%u].base is not device memory", role, i));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckDevicePayload(const void* p, uint64_t size) {
  if (size == 0) return absl::OkStatus();
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    return absl::InvalidArgumentError("payload: the cuda codec needs a 16-byte aligned buffer");
  }
  if (!IsDeviceAccessible(p)) {
    return absl::InvalidArgumentError("payload: not device memory");
  }
  return absl::OkStatus();
}

// True if every row of every placement starts 16-byte aligned.
bool RowsAligned(const KvBuffer& kv) {
  const KvLayout& layout = *kv.layout;
  for (uint32_t l = 0; l < layout.shape.num_layers; ++l) {
    for (bool value : {false, true}) {
      const TensorPlacement& p = layout.Placement(l, value);
      const auto base = reinterpret_cast<uintptr_t>(kv.regions[p.region].base) + p.offset_bytes;
      if (base % 16 != 0 || p.block_stride_bytes % 16 != 0 || p.token_stride_bytes % 16 != 0 ||
          p.head_stride_bytes % 16 != 0) {
        return false;
      }
    }
  }
  return true;
}

DevPlacement ToDev(const KvBuffer& kv, uint32_t layer, bool value) {
  const TensorPlacement& p = kv.layout->Placement(layer, value);
  DevPlacement d;
  d.base = static_cast<uint8_t*>(kv.regions[p.region].base) + p.offset_bytes;
  d.block_stride = p.block_stride_bytes;
  d.token_stride = p.token_stride_bytes;
  d.head_stride = p.head_stride_bytes;
  return d;
}

// Plain data appended at 16-byte aligned offsets, copied to the device in one transfer.
class Blob {
 public:
  template <typename T>
  uint64_t Add(const T* items, size_t count) {
    const uint64_t at = AlignUp(bytes_.size(), 16);
    bytes_.resize(at + count * sizeof(T));
    if (count > 0) std::memcpy(bytes_.data() + at, items, count * sizeof(T));
    return at;
  }
  template <typename T>
  uint64_t Add(const std::vector<T>& v) {
    return Add(v.data(), v.size());
  }
  uint64_t size() const { return bytes_.size(); }
  const uint8_t* data() const { return bytes_.data(); }

 private:
  std::vector<uint8_t> bytes_;
};

// The per-call descriptors of a layer range of a payload.
struct Descriptors {
  std::vector<DevLayer> layers;
  std::vector<DevSegment> segments;
  uint64_t num_ranges = 0;
  uint64_t range_rows = 0;
  std::vector<DevSegment> kcn_segments;
  uint64_t kcn_items = 0;
  std::vector<uint32_t> lists;
  std::vector<DevCrcRange> crc_ranges;
  uint64_t crc_items = 0;
};

// lists_on_device: the token lists are built on the device (EnqueuePlan) with every map's lists
// in map order, FP16, INT8, INT4 each (the offsets follow from the layout's counts), and `tiers`
// is not read; d.lists stays empty.
Descriptors Describe(const WireLayout& wl, std::span<const uint8_t> tiers, bool lists_on_device,
                     const KvBuffer& kv, uint32_t first, uint32_t last, uint64_t target_ranges) {
  const PayloadDesc& desc = wl.desc;
  const uint32_t heads = desc.shape.num_kv_heads;
  Descriptors d;
  // Token lists of each map the range uses.
  std::vector<std::array<uint64_t, 3>> map_offsets(desc.num_maps());
  std::vector<bool> built(desc.num_maps(), false);
  uint64_t list_entries = 0;
  if (lists_on_device) {
    for (uint32_t m = 0; m < desc.num_maps(); ++m) {
      for (int k = 0; k < 3; ++k) {
        map_offsets[m][k] = list_entries;
        list_entries += wl.map_counts[m].n[k];
      }
    }
  }
  for (uint32_t l = first; l < last && !lists_on_device; ++l) {
    const uint32_t m = desc.MapForLayer(l);
    if (built[m]) continue;
    built[m] = true;
    const TierLists lists =
        BuildTierLists(tiers.subspan(uint64_t{m} * desc.num_tokens, desc.num_tokens));
    for (int k = 0; k < 3; ++k) {
      map_offsets[m][k] = d.lists.size();
      const std::vector<uint32_t>& v = lists.tokens[k];
      d.lists.insert(d.lists.end(), v.begin(), v.end());
    }
  }
  uint64_t total_rows = 0;
  for (uint32_t l = first; l < last; ++l) {
    const LayerSection& sec = wl.layers[l];
    DevLayer dl;
    dl.layer = l;
    for (int p = 0; p < 2; ++p) {
      dl.kv[p] = ToDev(kv, l, p == 1);
      const PartLayout& part = p == 0 ? sec.key : sec.value;
      dl.part[p].rows[0] = part.fp16_rows;
      dl.part[p].rows[1] = part.int8_rows;
      dl.part[p].rows[2] = part.int4_rows;
      dl.part[p].scales[1] = part.int8_scales;
      dl.part[p].scales[2] = part.int4_scales;
      dl.part[p].end = part.end;
    }
    dl.begin = sec.begin;
    dl.crc_offset = sec.crc_offset;
    dl.key_offsets = sec.key_offsets;
    dl.key_factors = sec.key_factors;
    for (int k = 0; k < 3; ++k) {
      dl.counts[k] = sec.counts.n[k];
      dl.list_offset[k] = map_offsets[desc.MapForLayer(l)][k];
      total_rows += 2 * uint64_t{dl.counts[k]} * heads;
    }
    dl.zero_crc = cuda_crc::ZeroCrc(sec.crc_offset - sec.begin);
    d.layers.push_back(dl);
  }
  uint64_t rows_per_range = (total_rows + target_ranges - 1) / std::max<uint64_t>(target_ranges, 1);
  rows_per_range =
      std::clamp(AlignUp(std::max<uint64_t>(rows_per_range, 1), 32), kMinRangeRows, kMaxRangeRows);
  d.range_rows = rows_per_range;
  for (uint32_t slot = 0; slot < d.layers.size(); ++slot) {
    const DevLayer& dl = d.layers[slot];
    for (uint8_t p = 0; p < 2; ++p) {
      for (uint8_t k = 0; k < 3; ++k) {
        const uint64_t rows = uint64_t{dl.counts[k]} * heads;
        if (rows == 0) continue;
        DevSegment s;
        s.slot = slot;
        s.part = p;
        s.kind = k;
        s.rows = rows;
        s.first_range = d.num_ranges;
        d.num_ranges += (rows + rows_per_range - 1) / rows_per_range;
        d.segments.push_back(s);
      }
    }
    if (dl.counts[2] > 0) {
      DevSegment s;
      s.slot = slot;
      s.kind = 2;
      s.rows = dl.counts[2];
      s.first_range = d.kcn_items;
      d.kcn_items += cuda_kernels::KcnItemsFor(dl.counts[2], heads);
      d.kcn_segments.push_back(s);
    }
    DevCrcRange r;
    r.begin = dl.begin;
    r.bytes = dl.crc_offset - dl.begin;
    r.after = 0;
    r.slot = slot;
    r.first_range = d.crc_items;
    d.crc_items +=
        (r.bytes + cuda_kernels::kVerifyChunkBytes - 1) / cuda_kernels::kVerifyChunkBytes;
    if (r.bytes > 0) d.crc_ranges.push_back(r);
  }
  return d;
}

int GridFor(uint64_t warps_of_work, int resident_blocks, int warps_per_block) {
  const uint64_t blocks = (warps_of_work + warps_per_block - 1) / warps_per_block;
  return static_cast<int>(std::clamp<uint64_t>(blocks, 1, static_cast<uint64_t>(resident_blocks)));
}

}  // namespace

// Growable device scratch and pinned staging. A call that chains stages (score, plan, pack) gives
// each stage its own arena so that a later stage's growth never frees an earlier stage's data.
struct CudaCodec::Arena {
  uint8_t* device = nullptr;
  uint64_t device_bytes = 0;
  uint8_t* pinned = nullptr;
  uint64_t pinned_bytes = 0;

  ~Arena() { Release(); }

  void Release() {
    if (device != nullptr) cudaFree(device);
    if (pinned != nullptr) cudaFreeHost(pinned);
    device = nullptr;
    pinned = nullptr;
    device_bytes = pinned_bytes = 0;
  }

  absl::Status Reserve(uint64_t device_need, uint64_t pinned_need, cudaStream_t stream) {
    SPECTRUMKV_RETURN_IF_ERROR(
        Grow(device_need, 1 << 20, stream, &device, &device_bytes,
             Kind{"cudaMalloc", [](void** p, size_t n) { return cudaMalloc(p, n); },
                  [](void* p) { return cudaFree(p); }}));
    return Grow(pinned_need, 1 << 16, stream, &pinned, &pinned_bytes,
                Kind{"cudaMallocHost", [](void** p, size_t n) { return cudaMallocHost(p, n); },
                     [](void* p) { return cudaFreeHost(p); }});
  }

 private:
  // How one of the two buffers is allocated and freed.
  struct Kind {
    const char* alloc_name;
    cudaError_t (*alloc)(void**, size_t);
    cudaError_t (*free)(void*);
  };

  // Replaces `*buffer` by one of at least `need` bytes (half again for headroom, rounded up to
  // `align`) once the stream is done with the old one; nothing if it is large enough.
  static absl::Status Grow(uint64_t need, uint64_t align, cudaStream_t stream, uint8_t** buffer,
                           uint64_t* bytes, const Kind& kind) {
    if (need <= *bytes) return absl::OkStatus();
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    if (*buffer != nullptr) {
      if (cudaError_t e = kind.free(*buffer); e != cudaSuccess) {
        return cuda::CudaStatus(e, "freeing a codec scratch buffer");
      }
    }
    *buffer = nullptr;
    *bytes = 0;
    const uint64_t want = AlignUp(need + need / 2, align);
    void* p = nullptr;
    if (cudaError_t e = kind.alloc(&p, want); e != cudaSuccess) {
      return cuda::CudaStatus(e, kind.alloc_name);
    }
    *buffer = static_cast<uint8_t*>(p);
    *bytes = want;
    return absl::OkStatus();
  }
};

// Per-call resources: a stream, events and the arenas of the score, plan and pack (or unpack)
// stages.
struct CudaCodec::Workspace {
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  Arena score;
  Arena plan;
  Arena main;  // pack and unpack

  ~Workspace() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    if (start != nullptr) cudaEventDestroy(start);
    if (stop != nullptr) cudaEventDestroy(stop);
    score.Release();
    plan.Release();
    main.Release();
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  absl::Status Init() {
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
    return absl::OkStatus();
  }

  // Milliseconds between the start and stop events (both recorded and complete).
  double ElapsedMs() const {
    float ms = 0.0f;
    if (cudaEventElapsedTime(&ms, start, stop) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0.0;
    }
    return ms;
  }
};

// Takes a workspace from the codec's pool for one call and gives it back, idle, afterwards.
class CudaCodec::WorkspaceLease {
 public:
  explicit WorkspaceLease(CudaCodec* codec) : codec_(codec) {}
  ~WorkspaceLease() {
    if (ws_ == nullptr) return;
    cudaStreamSynchronize(ws_->stream);  // idle even when the call failed part-way
    std::lock_guard<std::mutex> lock(codec_->mu_);
    codec_->free_workspaces_.push_back(std::move(ws_));
  }
  absl::StatusOr<Workspace*> Get() {
    {
      std::lock_guard<std::mutex> lock(codec_->mu_);
      if (!codec_->free_workspaces_.empty()) {
        ws_ = std::move(codec_->free_workspaces_.back());
        codec_->free_workspaces_.pop_back();
      }
    }
    if (ws_ == nullptr) {
      SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(codec_->device_));
      auto ws = std::make_unique<Workspace>();
      SPECTRUMKV_RETURN_IF_ERROR(ws->Init());
      ws_ = std::move(ws);
    }
    return ws_.get();
  }

 private:
  CudaCodec* codec_;
  std::unique_ptr<Workspace> ws_;
};

CudaCodec::CudaCodec(int device) : device_(device) {}

CudaCodec::~CudaCodec() {
  cudaSetDevice(device_);
  free_workspaces_.clear();
  for (auto& [dim, p] : dim_tables_) cudaFree(p);
  if (static_tables_ != nullptr) cudaFree(static_tables_);
}

absl::StatusOr<std::unique_ptr<CudaCodec>> CudaCodec::Create(int device) {
  int count = 0;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return absl::UnavailableError(
        absl::StrFormat("CUDA device %d does not exist (%d devices)", device, count));
  }
  std::unique_ptr<CudaCodec> codec(new CudaCodec(device));
  SPECTRUMKV_RETURN_IF_ERROR(codec->Init());
  return codec;
}

absl::Status CudaCodec::Init() {
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  cudaDeviceProp prop;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device_));
  if (prop.major < 8) {
    return absl::UnavailableError(
        absl::StrFormat("%s has compute capability %d.%d; the cuda codec is built for 8.0 and 9.0",
                        prop.name, prop.major, prop.minor));
  }
  multiprocessors_ = prop.multiProcessorCount;
  pack_blocks_per_sm_ = cuda_kernels::PackBlocksPerSm();
  unpack_blocks_per_sm_ = cuda_kernels::UnpackBlocksPerSm();
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  auto tables = std::make_unique<cuda_crc::StaticTables>();
  cuda_crc::BuildStaticTables(tables.get());
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&static_tables_, sizeof(cuda_crc::StaticTables)));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(
      static_tables_, tables.get(), sizeof(cuda_crc::StaticTables), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::StatusOr<const void*> CudaCodec::DimTablesFor(uint32_t head_dim) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = dim_tables_.find(head_dim);
  if (it != dim_tables_.end()) return it->second;
  auto tables = std::make_unique<cuda_crc::DimTables>();
  cuda_crc::BuildDimTables(head_dim, tables.get());
  void* p = nullptr;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, sizeof(cuda_crc::DimTables)));
  const cudaError_t e =
      cudaMemcpy(p, tables.get(), sizeof(cuda_crc::DimTables), cudaMemcpyHostToDevice);
  if (e != cudaSuccess) {
    cudaFree(p);
    return cuda::CudaStatus(e, "cudaMemcpy(dim tables)");
  }
  dim_tables_[head_dim] = p;
  return p;
}

void CudaCodec::RecordTiming(double device_ms, bool tensor_cores) {
  std::lock_guard<std::mutex> lock(mu_);
  last_device_ms_ = device_ms;
  last_tensor_cores_ = tensor_cores;
}

double CudaCodec::last_device_ms() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_device_ms_;
}

bool CudaCodec::last_attention_used_tensor_cores() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_tensor_cores_;
}

struct CudaCodec::PackEnqueued {
  uint64_t pinned_bad = 0;  // main arena offset of the bad-row report, valid after a sync
};

absl::StatusOr<CudaCodec::PackEnqueued> CudaCodec::EnqueuePack(
    Workspace& ws, const KvBuffer& src, const WireLayout& wl, std::span<const uint8_t> tiers,
    const uint32_t* device_lists, uint32_t first_layer, uint32_t last_layer,
    std::span<uint8_t> payload, bool record_start) {
  const PayloadDesc& desc = wl.desc;
  SPECTRUMKV_ASSIGN_OR_RETURN(const void* dim_tables, DimTablesFor(desc.shape.head_dim));
  const uint32_t heads = desc.shape.num_kv_heads, dim = desc.shape.head_dim;
  const bool kcn = desc.key_channel_norm();
  const uint64_t target_ranges = uint64_t{4} * multiprocessors_ * pack_blocks_per_sm_ * 8;
  const Descriptors d =
      Describe(wl, tiers, device_lists != nullptr, src, first_layer, last_layer, target_ranges);
  const uint32_t slots = static_cast<uint32_t>(d.layers.size());
  const uint64_t blocks_needed =
      (uint64_t{desc.num_tokens} + src.layout->block_size - 1) / src.layout->block_size;

  Blob blob;
  const uint64_t off_layers = blob.Add(d.layers);
  const uint64_t off_segments = blob.Add(d.segments);
  const uint64_t off_kcn_segments = blob.Add(d.kcn_segments);
  const uint64_t off_lists = blob.Add(d.lists);
  const uint64_t off_table = blob.Add(src.block_table.data(), blocks_needed);
  // Scratch after the blob: CRC registers and kcn statistics (zeroed together), kcn floats, the
  // bad-row report.
  const uint64_t hd_slots = uint64_t{slots} * heads * dim;
  const uint64_t off_crc = AlignUp(blob.size(), kAlign);
  const uint64_t off_lo = AlignUp(off_crc + 4 * uint64_t{slots}, kAlign);
  const uint64_t off_hi = AlignUp(off_lo + (kcn ? 4 * hd_slots : 0), kAlign);
  const uint64_t zero_end = off_hi + (kcn ? 4 * hd_slots : 0);
  const uint64_t off_m = AlignUp(zero_end, kAlign);
  const uint64_t off_inv = AlignUp(off_m + (kcn ? 4 * hd_slots : 0), kAlign);
  const uint64_t off_bad = AlignUp(off_inv + (kcn ? 4 * hd_slots : 0), kAlign);
  const uint64_t device_need = off_bad + 8;
  const uint64_t pinned_bad = AlignUp(blob.size(), 16);

  Arena& arena = ws.main;
  cudaStream_t stream = ws.stream;
  SPECTRUMKV_RETURN_IF_ERROR(arena.Reserve(device_need, pinned_bad + 8, stream));
  std::memcpy(arena.pinned, blob.data(), blob.size());
  uint8_t* dev = arena.device;

  if (record_start) SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.start, stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dev, arena.pinned, blob.size(), cudaMemcpyHostToDevice, stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dev + off_crc, 0, zero_end - off_crc, stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dev + off_bad, 0xFF, 8, stream));

  DevCall call;
  call.layers = reinterpret_cast<const DevLayer*>(dev + off_layers);
  call.num_slots = slots;
  call.segments = reinterpret_cast<const DevSegment*>(dev + off_segments);
  call.num_segments = static_cast<uint32_t>(d.segments.size());
  call.num_ranges = d.num_ranges;
  call.range_rows = d.range_rows;
  call.lists =
      device_lists != nullptr ? device_lists : reinterpret_cast<const uint32_t*>(dev + off_lists);
  call.block_table = reinterpret_cast<const uint32_t*>(dev + off_table);
  call.block_size = src.layout->block_size;
  call.heads = heads;
  call.head_dim = dim;
  call.payload = payload.data();
  call.bf16 = desc.dtype == DType::kBFloat16;
  call.kv_aligned = RowsAligned(src);
  call.kcn = kcn;
  call.crc = reinterpret_cast<uint32_t*>(dev + off_crc);
  call.kcn_offset = reinterpret_cast<const float*>(dev + off_m);
  call.kcn_inv_factor = reinterpret_cast<const float*>(dev + off_inv);
  call.bad_row = reinterpret_cast<unsigned long long*>(dev + off_bad);
  call.static_tables = static_cast<const cuda_crc::StaticTables*>(static_tables_);
  call.dim_tables = static_cast<const cuda_crc::DimTables*>(dim_tables);

  if (kcn) {
    auto* lo = reinterpret_cast<uint32_t*>(dev + off_lo);
    auto* hi = reinterpret_cast<uint32_t*>(dev + off_hi);
    if (d.kcn_items > 0) {
      DevCall stats = call;
      stats.segments = reinterpret_cast<const DevSegment*>(dev + off_kcn_segments);
      stats.num_segments = static_cast<uint32_t>(d.kcn_segments.size());
      SPECTRUMKV_CUDA_RETURN_IF_ERROR(
          cuda_kernels::LaunchKcnMinMax(stats, lo, hi, d.kcn_items, stream));
    }
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(
        cuda_kernels::LaunchKcnFactors(call, lo, hi, reinterpret_cast<float*>(dev + off_m),
                                       reinterpret_cast<float*>(dev + off_inv), stream));
  }
  const int grid = GridFor(d.num_ranges, multiprocessors_ * pack_blocks_per_sm_, 8);
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::LaunchPack(call, grid, stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::LaunchPackFinalize(call, stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(arena.pinned + pinned_bad, dev + off_bad, 8, cudaMemcpyDeviceToHost, stream));
  return PackEnqueued{pinned_bad};
}

namespace {

// The PackLayers error for a bad-row report read back from the device, or OK.
absl::Status BadRowStatus(const uint8_t* report) {
  uint64_t bad = 0;
  std::memcpy(&bad, report, 8);
  if (bad == cuda_kernels::kNoBadRow) return absl::OkStatus();
  const uint32_t layer = static_cast<uint32_t>(bad >> 56);
  const bool value = ((bad >> 55) & 1u) != 0;
  const uint32_t token = static_cast<uint32_t>((bad >> 30) & ((1u << 25) - 1));
  const uint32_t head = static_cast<uint32_t>(bad & ((1u << 30) - 1));
  return NonFiniteRowError(layer, value, token, head);
}

// This backend has no kernels for progressive payloads (docs/wire-format.md): refused whole.
absl::Status RefuseProgressive(const PayloadDesc& desc) {
  if (!desc.progressive()) return absl::OkStatus();
  return absl::UnimplementedError(
      "the cuda codec does not pack or unpack progressive payloads (quantizer progressive)");
}

}  // namespace

absl::Status CudaCodec::PackLayers(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                                   uint32_t last_layer, std::span<uint8_t> payload) {
  SPECTRUMKV_RETURN_IF_ERROR(RefuseProgressive(plan.desc));
  SPECTRUMKV_RETURN_IF_ERROR(CheckPackArgs(src, plan, first_layer, last_layer, payload));
  SPECTRUMKV_RETURN_IF_ERROR(CheckDeviceKv(src, "source"));
  SPECTRUMKV_RETURN_IF_ERROR(CheckDevicePayload(payload.data(), payload.size()));
  if (first_layer == last_layer) return absl::OkStatus();
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  WorkspaceLease lease(this);
  SPECTRUMKV_ASSIGN_OR_RETURN(Workspace * ws, lease.Get());
  SPECTRUMKV_ASSIGN_OR_RETURN(const PackEnqueued pack,
                              EnqueuePack(*ws, src, plan.layout, plan.tiers, nullptr, first_layer,
                                          last_layer, payload, /*record_start=*/true));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->stop, ws->stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ws->stream));
  RecordTiming(ws->ElapsedMs(), false);
  return BadRowStatus(ws->main.pinned + pack.pinned_bad);
}

absl::Status CudaCodec::UnpackLayers(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                                     const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                                     VerifyMode verify) {
  const WireLayout& wl = prelude.layout;
  const PayloadDesc& desc = wl.desc;
  SPECTRUMKV_RETURN_IF_ERROR(RefuseProgressive(desc));
  SPECTRUMKV_RETURN_IF_ERROR(CheckUnpackArgs(prelude, payload, dst, first_layer, last_layer));
  SPECTRUMKV_RETURN_IF_ERROR(CheckDeviceKv(dst, "destination"));
  SPECTRUMKV_RETURN_IF_ERROR(CheckDevicePayload(payload.data(), payload.size()));
  if (first_layer == last_layer) return absl::OkStatus();
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));

  const uint32_t heads = desc.shape.num_kv_heads, dim = desc.shape.head_dim;
  const bool check = verify == VerifyMode::kVerify;
  const uint64_t target_ranges = uint64_t{4} * multiprocessors_ * unpack_blocks_per_sm_ * 8;
  const Descriptors d =
      Describe(wl, prelude.tiers, false, dst, first_layer, last_layer, target_ranges);
  const uint32_t slots = static_cast<uint32_t>(d.layers.size());
  const uint64_t blocks_needed =
      (uint64_t{desc.num_tokens} + dst.layout->block_size - 1) / dst.layout->block_size;

  Blob blob;
  const uint64_t off_layers = blob.Add(d.layers);
  const uint64_t off_segments = blob.Add(d.segments);
  const uint64_t off_lists = blob.Add(d.lists);
  const uint64_t off_table = blob.Add(dst.block_table.data(), blocks_needed);
  const uint64_t off_ranges = blob.Add(d.crc_ranges);
  const uint64_t off_crc = AlignUp(blob.size(), kAlign);
  const uint64_t off_status = AlignUp(off_crc + 4 * uint64_t{slots}, kAlign);
  const uint64_t off_ok = AlignUp(off_status + 4 * uint64_t{slots}, kAlign);
  const uint64_t device_need = off_ok + 4 * uint64_t{slots};
  const uint64_t pinned_status = AlignUp(blob.size(), 16);

  WorkspaceLease lease(this);
  SPECTRUMKV_ASSIGN_OR_RETURN(Workspace * ws, lease.Get());
  SPECTRUMKV_RETURN_IF_ERROR(
      ws->main.Reserve(device_need, pinned_status + 4 * uint64_t{slots}, ws->stream));
  std::memcpy(ws->main.pinned, blob.data(), blob.size());
  uint8_t* dev = ws->main.device;
  cudaStream_t stream = ws->stream;

  DevCall call;
  call.layers = reinterpret_cast<const DevLayer*>(dev + off_layers);
  call.num_slots = slots;
  call.segments = reinterpret_cast<const DevSegment*>(dev + off_segments);
  call.num_segments = static_cast<uint32_t>(d.segments.size());
  call.num_ranges = d.num_ranges;
  call.range_rows = d.range_rows;
  call.lists = reinterpret_cast<const uint32_t*>(dev + off_lists);
  call.block_table = reinterpret_cast<const uint32_t*>(dev + off_table);
  call.block_size = dst.layout->block_size;
  call.heads = heads;
  call.head_dim = dim;
  // The kernels only read the payload on this path.
  call.payload = const_cast<uint8_t*>(payload.data());
  call.bf16 = desc.dtype == DType::kBFloat16;
  call.kv_aligned = RowsAligned(dst);
  call.kcn = desc.key_channel_norm();
  call.static_tables = static_cast<const cuda_crc::StaticTables*>(static_tables_);

  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->start, stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dev, ws->main.pinned, blob.size(), cudaMemcpyHostToDevice, stream));
  if (check) {
    auto* crc = reinterpret_cast<uint32_t*>(dev + off_crc);
    auto* status = reinterpret_cast<uint32_t*>(dev + off_status);
    auto* ok = reinterpret_cast<uint32_t*>(dev + off_ok);
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(crc, 0, 4 * uint64_t{slots}, stream));
    const int crc_grid = GridFor(d.crc_items, multiprocessors_ * 8, 8);
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::LaunchCrcRanges(
        call, reinterpret_cast<const DevCrcRange*>(dev + off_ranges),
        static_cast<uint32_t>(d.crc_ranges.size()), d.crc_items, crc, crc_grid, stream));
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::LaunchVerifyCheck(call, crc, status, ok, stream));
    call.write_ok = ok;
  }
  const int grid = GridFor(d.num_ranges, multiprocessors_ * unpack_blocks_per_sm_, 8);
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::LaunchUnpack(call, grid, stream));
  if (check) {
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws->main.pinned + pinned_status,
                                                    dev + off_status, 4 * uint64_t{slots},
                                                    cudaMemcpyDeviceToHost, stream));
  }
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->stop, stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  RecordTiming(ws->ElapsedMs(), false);

  if (check) {
    for (uint32_t slot = 0; slot < slots; ++slot) {
      uint32_t status = 0;
      std::memcpy(&status, ws->main.pinned + pinned_status + 4 * slot, 4);
      if (status == 1) continue;
      const uint32_t layer = first_layer + slot;
      return absl::DataLossError(status == 3
                                     ? absl::StrFormat("layer %u trailer padding not zero", layer)
                                     : absl::StrFormat("layer %u checksum mismatch", layer));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<const float*> CudaCodec::EnqueueScore(Workspace& ws, const KvBuffer& kv,
                                                     const ScoreOptions& options,
                                                     std::span<const float> host_scores,
                                                     bool record_start, bool* tensor_cores) {
  *tensor_cores = false;
  const uint32_t n = kv.num_tokens;
  Arena& arena = ws.score;
  cudaStream_t stream = ws.stream;
  if (!host_scores.empty()) {
    // External or positional: computed on the host, uploaded for ranking.
    SPECTRUMKV_RETURN_IF_ERROR(arena.Reserve(4 * uint64_t{n}, 4 * uint64_t{n}, stream));
    std::memcpy(arena.pinned, host_scores.data(), 4 * uint64_t{n});
    if (record_start) SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.start, stream));
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(arena.device, arena.pinned, 4 * uint64_t{n},
                                                    cudaMemcpyHostToDevice, stream));
    return reinterpret_cast<const float*>(arena.device);
  }
  const ModelShape& shape = kv.layout->shape;
  SPECTRUMKV_RETURN_IF_ERROR(CheckDeviceKv(kv, "kv"));

  auto call = std::make_unique<DevScoreCall>();
  call->block_size = kv.layout->block_size;
  call->layers = shape.num_layers;
  call->heads = shape.num_kv_heads;
  call->head_dim = shape.head_dim;
  call->tokens = n;
  call->bf16 = kv.layout->dtype == DType::kBFloat16;
  call->kv_aligned = RowsAligned(kv);
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    call->kv[2 * l] = ToDev(kv, l, false);
    call->kv[2 * l + 1] = ToDev(kv, l, true);
  }
  const uint64_t blocks_needed = (uint64_t{n} + call->block_size - 1) / call->block_size;
  const bool attention = options.mode == ScoringMode::kAttention;
  const bool pool = attention && options.pool_kernel > 1;
  const bool decay = attention && options.recency_decay > 0;
  // Device: [call][block table][scores][raw scores][decay factors][queries][attention scratch].
  const uint64_t off_table = AlignUp(sizeof(DevScoreCall), kAlign);
  const uint64_t off_scores = AlignUp(off_table + 4 * blocks_needed, kAlign);
  const uint64_t off_raw = AlignUp(off_scores + 4 * uint64_t{n}, kAlign);
  const uint64_t off_decay = AlignUp(off_raw + (pool || decay ? 4 * uint64_t{n} : 0), kAlign);
  const uint64_t off_queries = AlignUp(off_decay + (decay ? 4 * uint64_t{n} : 0), kAlign);
  cuda_kernels::AttentionArgs args;
  uint64_t off_scratch = off_queries, device_need = off_queries;
  if (attention) {
    args.layers = shape.num_layers;
    args.heads = shape.num_kv_heads;
    args.head_dim = shape.head_dim;
    args.tokens = n;
    args.bf16 = call->bf16;
    args.kv_aligned = call->kv_aligned;
    args.window = options.window;
    args.group = options.num_q_heads / shape.num_kv_heads;
    args.inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    args.num_sms = multiprocessors_;
    off_scratch = AlignUp(off_queries + 4 * uint64_t{options.window_queries.size()}, kAlign);
    device_need = off_scratch + cuda_kernels::AttentionScratchBytes(args);
  }
  const uint64_t pinned_call = 0;
  const uint64_t pinned_table = AlignUp(sizeof(DevScoreCall), 16);
  const uint64_t pinned_flag = AlignUp(pinned_table + 4 * blocks_needed, 16);
  const uint64_t pinned_decay = AlignUp(pinned_flag + 4, 16);
  const uint64_t pinned_need = pinned_decay + (decay ? 4 * uint64_t{n} : 0);

  SPECTRUMKV_RETURN_IF_ERROR(arena.Reserve(device_need, pinned_need, stream));
  std::memcpy(arena.pinned + pinned_call, call.get(), sizeof(DevScoreCall));
  std::memcpy(arena.pinned + pinned_table, kv.block_table.data(), 4 * blocks_needed);
  uint8_t* dev = arena.device;
  auto* dev_call = reinterpret_cast<DevScoreCall*>(dev);
  auto* dev_scores = reinterpret_cast<float*>(dev + off_scores);
  // The call refers to the table by device address: patch it in the staging copy.
  reinterpret_cast<DevScoreCall*>(arena.pinned + pinned_call)->block_table =
      reinterpret_cast<const uint32_t*>(dev + off_table);
  if (decay) {
    // The factors of PoolAndDecay, computed as the host computes them (bit-exact scores).
    auto* f = reinterpret_cast<float*>(arena.pinned + pinned_decay);
    for (uint32_t j = 0; j < n; ++j) {
      f[j] = static_cast<float>(std::exp(-options.recency_decay * double(n - 1 - j)));
    }
  }

  SPECTRUMKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dev, arena.pinned, sizeof(DevScoreCall), cudaMemcpyHostToDevice, stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev + off_table, arena.pinned + pinned_table,
                                                  4 * blocks_needed, cudaMemcpyHostToDevice,
                                                  stream));
  if (decay) {
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev + off_decay, arena.pinned + pinned_decay,
                                                    4 * uint64_t{n}, cudaMemcpyHostToDevice,
                                                    stream));
  }
  if (attention) {
    // The queries come from the caller's (pageable) memory.
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dev + off_queries, options.window_queries.data(),
                        4 * options.window_queries.size(), cudaMemcpyHostToDevice, stream));
    if (record_start) SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.start, stream));
    args.call = dev_call;
    args.queries = reinterpret_cast<const float*>(dev + off_queries);
    float* raw = pool || decay ? reinterpret_cast<float*>(dev + off_raw) : dev_scores;
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::RunAttention(
        args, dev + off_scratch, raw, reinterpret_cast<uint32_t*>(arena.pinned + pinned_flag),
        stream, tensor_cores));
    if (pool || decay) {
      SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::LaunchPoolAndDecay(
          raw, dev_scores, n, pool ? options.pool_kernel : 1,
          decay ? reinterpret_cast<const float*>(dev + off_decay) : nullptr, stream));
    }
  } else {
    if (record_start) SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.start, stream));
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(
        cuda_kernels::LaunchKeyNorm(dev_call, *call, dev_scores, stream));
  }
  return dev_scores;
}

absl::Status CudaCodec::Score(const KvBuffer& kv, const ScoreOptions& options,
                              std::span<float> scores) {
  SPECTRUMKV_ASSIGN_OR_RETURN(const bool complete, ScoreWithoutKv(kv, options, scores));
  if (complete) return absl::OkStatus();
  SPECTRUMKV_RETURN_IF_ERROR(CheckDeviceKv(kv, "kv"));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  const uint64_t bytes = 4 * uint64_t{kv.num_tokens};
  WorkspaceLease lease(this);
  SPECTRUMKV_ASSIGN_OR_RETURN(Workspace * ws, lease.Get());
  bool tensor = false;
  SPECTRUMKV_ASSIGN_OR_RETURN(const float* dev_scores,
                              EnqueueScore(*ws, kv, options, {}, /*record_start=*/true, &tensor));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->stop, ws->stream));
  SPECTRUMKV_RETURN_IF_ERROR(ws->plan.Reserve(0, bytes, ws->stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(ws->plan.pinned, dev_scores, bytes, cudaMemcpyDeviceToHost, ws->stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ws->stream));
  RecordTiming(ws->ElapsedMs(), tensor);
  std::memcpy(scores.data(), ws->plan.pinned, bytes);
  return absl::OkStatus();
}

// A device plan enqueued on a workspace's stream (plan arena): tier codes and, if asked, the
// token lists PackLayers reads.
struct CudaCodec::DevicePlan {
  const uint8_t* tiers = nullptr;  // [maps][tokens]
  const uint32_t* lists = nullptr;
  uint64_t pinned_tiers = 0;  // plan arena staging for the tier codes
};

absl::StatusOr<CudaCodec::DevicePlan> CudaCodec::EnqueuePlan(Workspace& ws,
                                                             const float* device_scores,
                                                             const PlanSkeleton& skeleton,
                                                             bool lists, uint8_t* payload) {
  const WireLayout& wl = skeleton.plan.layout;
  const uint32_t n = wl.desc.num_tokens, maps = wl.desc.num_maps();
  std::vector<cuda_kernels::DevRankSegment> segments;
  segments.reserve(uint64_t{maps} * kMaxRankSegments);
  for (const MapSegments& m : skeleton.segments) {
    for (const RankSegment& r : m) segments.push_back({r.end_rank, static_cast<uint32_t>(r.tier)});
  }
  std::vector<uint64_t> list_base;
  uint64_t list_entries = 0;
  for (uint32_t m = 0; m < maps; ++m) {
    for (int k = 0; k < 3; ++k) {
      list_base.push_back(list_entries);
      list_entries += wl.map_counts[m].n[k];
    }
  }
  const uint64_t tier_bytes = uint64_t{maps} * n;
  // Device: [segments][list bases][tiers][lists][maps CRC range][CRC register][plan scratch].
  Blob blob;
  const uint64_t off_segments = blob.Add(segments);
  const uint64_t off_list_base = blob.Add(list_base);
  DevCrcRange range;
  range.begin = wl.tier_maps_offset;
  range.bytes = wl.tier_maps_crc_offset - wl.tier_maps_offset;
  range.after = 0;
  range.slot = 0;
  range.first_range = 0;
  const uint64_t off_range = blob.Add(&range, 1);
  const uint64_t off_tiers = AlignUp(blob.size(), kAlign);
  const uint64_t off_lists = AlignUp(off_tiers + tier_bytes, kAlign);
  const uint64_t off_crc = AlignUp(off_lists + (lists ? 4 * list_entries : 0), kAlign);
  const uint64_t off_scratch = AlignUp(off_crc + 4, kAlign);
  const uint64_t device_need = off_scratch + cuda_kernels::PlanScratchBytes(n, maps);
  const uint64_t pinned_header = AlignUp(blob.size(), 16);
  const uint64_t pinned_tiers = AlignUp(pinned_header + kWireHeaderBytes, 16);
  const uint64_t pinned_need = pinned_tiers + tier_bytes;

  Arena& arena = ws.plan;
  cudaStream_t stream = ws.stream;
  SPECTRUMKV_RETURN_IF_ERROR(arena.Reserve(device_need, pinned_need, stream));
  uint8_t* dev = arena.device;
  std::memcpy(arena.pinned, blob.data(), blob.size());
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dev, arena.pinned, blob.size(), cudaMemcpyHostToDevice, stream));
  if (payload != nullptr) {
    // The prelude: zeroes (padding, trailer), the header, then the maps and their checksum.
    WritePreludeHeader(wl, std::span<uint8_t>(arena.pinned + pinned_header, kWireHeaderBytes));
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(payload, 0, wl.prelude_bytes, stream));
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        payload, arena.pinned + pinned_header, kWireHeaderBytes, cudaMemcpyHostToDevice, stream));
  }
  cuda_kernels::DevPlanArgs args;
  args.scores = device_scores;
  args.tokens = n;
  args.sinks = skeleton.sinks;
  args.maps = maps;
  args.segments = reinterpret_cast<const cuda_kernels::DevRankSegment*>(dev + off_segments);
  args.tiers = dev + off_tiers;
  if (lists) {
    args.lists = reinterpret_cast<uint32_t*>(dev + off_lists);
    args.list_base = reinterpret_cast<const uint64_t*>(dev + off_list_base);
  }
  if (payload != nullptr) {
    args.packed = payload + wl.tier_maps_offset;
    args.map_bytes = wl.tier_map_bytes;
  }
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::LaunchPlan(args, dev + off_scratch, stream));
  if (payload != nullptr && range.bytes > 0) {
    auto* crc = reinterpret_cast<uint32_t*>(dev + off_crc);
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(crc, 0, 4, stream));
    DevCall call;
    call.payload = payload;
    call.static_tables = static_cast<const cuda_crc::StaticTables*>(static_tables_);
    const uint64_t items =
        (range.bytes + cuda_kernels::kVerifyChunkBytes - 1) / cuda_kernels::kVerifyChunkBytes;
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::LaunchCrcRanges(
        call, reinterpret_cast<const DevCrcRange*>(dev + off_range), 1, items, crc,
        GridFor(items, multiprocessors_ * 8, 8), stream));
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cuda_kernels::LaunchStoreCrc(
        crc, cuda_crc::ZeroCrc(range.bytes), payload + wl.tier_maps_crc_offset, stream));
  }
  DevicePlan out;
  out.tiers = dev + off_tiers;
  out.lists = lists ? reinterpret_cast<const uint32_t*>(dev + off_lists) : nullptr;
  out.pinned_tiers = pinned_tiers;
  return out;
}

absl::StatusOr<TierPlan> CudaCodec::PlanOnDevice(std::span<const float> device_scores,
                                                 const ModelShape& shape, DType dtype,
                                                 const PlanOptions& options) {
  const uint32_t n = static_cast<uint32_t>(device_scores.size());
  SPECTRUMKV_ASSIGN_OR_RETURN(PlanSkeleton skeleton, PlanSkeletonFor(shape, dtype, n, options));
  if (!skeleton.ranked) return std::move(skeleton.plan);
  if (!IsDeviceAccessible(device_scores.data())) {
    return absl::InvalidArgumentError("device_scores: not device memory");
  }
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  WorkspaceLease lease(this);
  SPECTRUMKV_ASSIGN_OR_RETURN(Workspace * ws, lease.Get());
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->start, ws->stream));
  return PlanAndFetchTiers(*ws, device_scores.data(), std::move(skeleton), false);
}

absl::StatusOr<TierPlan> CudaCodec::PlanAndFetchTiers(Workspace& ws, const float* device_scores,
                                                      PlanSkeleton skeleton, bool tensor_cores) {
  SPECTRUMKV_ASSIGN_OR_RETURN(const DevicePlan dp,
                              EnqueuePlan(ws, device_scores, skeleton, false, nullptr));
  const uint64_t tier_bytes =
      uint64_t{skeleton.plan.desc.num_maps()} * skeleton.plan.desc.num_tokens;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws.plan.pinned + dp.pinned_tiers, dp.tiers,
                                                  tier_bytes, cudaMemcpyDeviceToHost, ws.stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.stop, ws.stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ws.stream));
  RecordTiming(ws.ElapsedMs(), tensor_cores);
  const uint8_t* t = ws.plan.pinned + dp.pinned_tiers;
  skeleton.plan.tiers.assign(t, t + tier_bytes);
  return std::move(skeleton.plan);
}

absl::StatusOr<TierPlan> CudaCodec::ScoreAndPlan(const KvBuffer& kv,
                                                 const ScoreOptions& score_options,
                                                 const PlanOptions& plan_options) {
  std::vector<float> host_scores(kv.num_tokens);
  SPECTRUMKV_ASSIGN_OR_RETURN(const bool complete, ScoreWithoutKv(kv, score_options, host_scores));
  if (!complete) SPECTRUMKV_RETURN_IF_ERROR(CheckDeviceKv(kv, "kv"));
  const KvLayout& layout = *kv.layout;
  SPECTRUMKV_ASSIGN_OR_RETURN(PlanSkeleton skeleton, PlanSkeletonFor(layout.shape, layout.dtype,
                                                                     kv.num_tokens, plan_options));
  // Tiers that no score can change need no scoring pass.
  if (!skeleton.ranked) return std::move(skeleton.plan);
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  WorkspaceLease lease(this);
  SPECTRUMKV_ASSIGN_OR_RETURN(Workspace * ws, lease.Get());
  bool tensor = false;
  SPECTRUMKV_ASSIGN_OR_RETURN(
      const float* dev_scores,
      EnqueueScore(*ws, kv, score_options,
                   complete ? std::span<const float>(host_scores) : std::span<const float>(),
                   /*record_start=*/true, &tensor));
  return PlanAndFetchTiers(*ws, dev_scores, std::move(skeleton), tensor);
}

absl::StatusOr<TierPlan> CudaCodec::ScorePlanPack(const KvBuffer& src,
                                                  const ScoreOptions& score_options,
                                                  const PlanOptions& plan_options,
                                                  std::span<uint8_t> payload) {
  std::vector<float> host_scores(src.num_tokens);
  SPECTRUMKV_ASSIGN_OR_RETURN(const bool complete, ScoreWithoutKv(src, score_options, host_scores));
  SPECTRUMKV_RETURN_IF_ERROR(CheckDeviceKv(src, "source"));
  const KvLayout& layout = *src.layout;
  SPECTRUMKV_ASSIGN_OR_RETURN(PlanSkeleton skeleton, PlanSkeletonFor(layout.shape, layout.dtype,
                                                                     src.num_tokens, plan_options));
  TierPlan& plan = skeleton.plan;
  const WireLayout& wl = plan.layout;
  const uint32_t layers = wl.desc.shape.num_layers;
  SPECTRUMKV_RETURN_IF_ERROR(RefuseProgressive(wl.desc));
  SPECTRUMKV_RETURN_IF_ERROR(CheckPackArgs(src, plan, 0, layers, payload));
  SPECTRUMKV_RETURN_IF_ERROR(CheckDevicePayload(payload.data(), payload.size()));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  if (!skeleton.ranked) {
    // Tiers known on the host (pdtrim, random_tier): the host prelude goes up, then the pack.
    std::vector<uint8_t> prelude(wl.prelude_bytes);
    WritePrelude(wl, plan.tiers, prelude);
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(payload.data(), prelude.data(), prelude.size(), cudaMemcpyHostToDevice));
    SPECTRUMKV_RETURN_IF_ERROR(PackLayers(src, plan, 0, layers, payload));
    return std::move(plan);
  }
  WorkspaceLease lease(this);
  SPECTRUMKV_ASSIGN_OR_RETURN(Workspace * ws, lease.Get());
  bool tensor = false;
  SPECTRUMKV_ASSIGN_OR_RETURN(
      const float* dev_scores,
      EnqueueScore(*ws, src, score_options,
                   complete ? std::span<const float>(host_scores) : std::span<const float>(),
                   /*record_start=*/true, &tensor));
  SPECTRUMKV_ASSIGN_OR_RETURN(const DevicePlan dp,
                              EnqueuePlan(*ws, dev_scores, skeleton, true, payload.data()));
  SPECTRUMKV_ASSIGN_OR_RETURN(const PackEnqueued pack,
                              EnqueuePack(*ws, src, wl, {}, dp.lists, 0, layers, payload,
                                          /*record_start=*/false));
  const uint64_t tier_bytes = uint64_t{wl.desc.num_maps()} * src.num_tokens;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws->plan.pinned + dp.pinned_tiers, dp.tiers,
                                                  tier_bytes, cudaMemcpyDeviceToHost, ws->stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->stop, ws->stream));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ws->stream));
  RecordTiming(ws->ElapsedMs(), tensor);
  SPECTRUMKV_RETURN_IF_ERROR(BadRowStatus(ws->main.pinned + pack.pinned_bad));
  const uint8_t* t = ws->plan.pinned + dp.pinned_tiers;
  plan.tiers.assign(t, t + tier_bytes);
  return std::move(plan);
}

}  // namespace spectrumkv
