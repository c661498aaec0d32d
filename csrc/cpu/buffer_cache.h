// A one-block cache for large CPU output buffers (the kd_loss gradient).
//
// A fresh 477 MiB gradient costs ~70 ms of first-touch page faults on every
// training step on a 2-core Xeon (glibc maps and unmaps blocks this large on
// every allocation). When such a tensor dies its memory is kept, still
// mapped and touched, and the next request of a similar size reuses it: the
// same idea as PyTorch's CUDA caching allocator, for one block. Blocks under
// 16 MiB bypass it. KDFAST_CPU_BUFFER_CACHE=0 disables it; clear() gives the
// memory back.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace kdfast {

// Like at::empty(sizes, options) for a CPU tensor, served from the cache when possible.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);
// Frees the cached block (if any).
void buffer_cache_clear();
// Bytes held by the cache now.
int64_t buffer_cache_bytes();
// Turns the cache on or off (off also clears it). Returns the previous setting.
bool buffer_cache_enable(bool on);

}  // namespace kdfast
