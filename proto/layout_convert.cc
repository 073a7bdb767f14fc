#include "proto/layout_convert.h"

namespace spectrumkv {

absl::StatusOr<KvLayout> LayoutFromProto(const v1::LayoutDescriptor& p) {
  KvLayout l;
  l.shape = ModelShape{p.num_layers(), p.num_kv_heads(), p.head_dim()};
  switch (p.dtype()) {
    case v1::DTYPE_FP16:
      l.dtype = DType::kFloat16;
      break;
    case v1::DTYPE_BF16:
      l.dtype = DType::kBFloat16;
      break;
    default:
      return absl::InvalidArgumentError("layout.dtype: must be DTYPE_FP16 or DTYPE_BF16");
  }
  l.block_size = p.block_size();
  l.num_blocks = p.num_blocks();
  if (p.keys_size() > 1024 || p.values_size() > 1024) {
    return absl::InvalidArgumentError("layout.keys: more than 1024 placements");
  }
  auto convert = [](const v1::TensorPlacement& t) {
    return TensorPlacement{t.region(), t.offset_bytes(), t.block_stride_bytes(),
                           t.token_stride_bytes(), t.head_stride_bytes()};
  };
  for (const auto& t : p.keys()) l.keys.push_back(convert(t));
  for (const auto& t : p.values()) l.values.push_back(convert(t));
  return l;
}

v1::LayoutDescriptor LayoutToProto(const KvLayout& l) {
  v1::LayoutDescriptor p;
  p.set_num_layers(l.shape.num_layers);
  p.set_num_kv_heads(l.shape.num_kv_heads);
  p.set_head_dim(l.shape.head_dim);
  p.set_dtype(l.dtype == DType::kFloat16 ? v1::DTYPE_FP16 : v1::DTYPE_BF16);
  p.set_block_size(l.block_size);
  p.set_num_blocks(l.num_blocks);
  auto convert = [](const TensorPlacement& t, v1::TensorPlacement* o) {
    o->set_region(t.region);
    o->set_offset_bytes(t.offset_bytes);
    o->set_block_stride_bytes(t.block_stride_bytes);
    o->set_token_stride_bytes(t.token_stride_bytes);
    o->set_head_stride_bytes(t.head_stride_bytes);
  };
  for (const auto& t : l.keys) convert(t, p.add_keys());
  for (const auto& t : l.values) convert(t, p.add_values());
  return p;
}

}  // namespace spectrumkv
