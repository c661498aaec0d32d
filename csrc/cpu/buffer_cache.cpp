// See buffer_cache.h.
#include "cpu/buffer_cache.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace kdfast {
namespace {

constexpr size_t kMinBytes = size_t{16} << 20;
constexpr size_t kAlign = 64;

struct Cache {
  std::mutex mu;
  void* block = nullptr;
  size_t bytes = 0;
  std::atomic<bool> enabled{true};

  Cache() {
    const char* env = std::getenv("KDFAST_CPU_BUFFER_CACHE");
    if (env != nullptr && std::strcmp(env, "0") == 0) enabled = false;
  }
};

// Never destroyed: tensors freed during interpreter shutdown may still call give_back.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

void give_back(void* p, size_t bytes) {
  Cache& c = cache();
  void* drop = p;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.enabled) {  // keep the most recent block
      drop = c.block;
      c.block = p;
      c.bytes = bytes;
    }
  }
  std::free(drop);
}

// A cached block that fits `bytes` without wasting more than half of it (its
// size in *block_bytes), or nullptr.
void* take(size_t bytes, size_t* block_bytes) {
  Cache& c = cache();
  void* drop = nullptr;
  void* got = nullptr;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (!c.enabled || c.block == nullptr) return nullptr;
    if (c.bytes >= bytes && c.bytes / 2 <= bytes) {
      got = c.block;
      *block_bytes = c.bytes;
    } else {
      drop = c.block;  // the wrong size: give it back before allocating anew
    }
    c.block = nullptr;
    c.bytes = 0;
  }
  std::free(drop);
  return got;
}

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinBytes || !cache().enabled) return at::empty(sizes, options);
  // A reused block keeps its own (possibly larger) size, so it is cached again whole.
  size_t block_bytes = 0;
  void* p = take(bytes, &block_bytes);
  if (p == nullptr) {
    block_bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    p = std::aligned_alloc(kAlign, block_bytes);
    TORCH_CHECK(p != nullptr, "kdfast: out of memory allocating ", bytes, " bytes");
  }
  return at::from_blob(p, sizes, [block_bytes](void* q) { give_back(q, block_bytes); },
                       options.device(at::kCPU));
}

void buffer_cache_clear() {
  Cache& c = cache();
  void* drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    drop = c.block;
    c.block = nullptr;
    c.bytes = 0;
  }
  std::free(drop);
}

int64_t buffer_cache_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return static_cast<int64_t>(c.bytes);
}

bool buffer_cache_enable(bool on) {
  Cache& c = cache();
  bool was;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    was = c.enabled.exchange(on);
  }
  if (!on) buffer_cache_clear();
  return was;
}

namespace {
void clear_op() { buffer_cache_clear(); }
int64_t bytes_op() { return buffer_cache_bytes(); }
bool enable_op(bool on) { return buffer_cache_enable(on); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("cpu_buffer_cache_clear() -> ()", &clear_op);
  m.def("cpu_buffer_cache_bytes() -> int", &bytes_op);
  m.def("cpu_buffer_cache_enable(bool on) -> bool", &enable_op);
}

}  // namespace kdfast
