// Conversions between the protobuf LayoutDescriptor and the codec's KvLayout, shared by the
// daemon and the client. LayoutFromProto checks only what the conversion needs (the dtype, the
// number of placements); ValidateLayout (kernels/api/layout.h) checks the rest.
#ifndef SPECTRUMKV_PROTO_LAYOUT_CONVERT_H_
#define SPECTRUMKV_PROTO_LAYOUT_CONVERT_H_

#include "absl/status/statusor.h"
#include "kernels/api/layout.h"
#include "spectrumkv/v1/kv_transfer.pb.h"

namespace spectrumkv {

absl::StatusOr<KvLayout> LayoutFromProto(const v1::LayoutDescriptor& p);
v1::LayoutDescriptor LayoutToProto(const KvLayout& layout);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_PROTO_LAYOUT_CONVERT_H_
