// SPDX-License-Identifier: Apache-2.0
// CPU shared-memory regions: the host analogue of a CUDA IPC allocation. One region is
// exported once as a small, versioned, self-validating handle (plain bytes) and mapped once
// by each importing process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace hw {

// Note [Shared-memory lifetime]
// A region is an anonymous memfd, never a name in /dev/shm: when the owner and every
// importer have unmapped it (or died, SIGKILL included) the kernel frees it, so nothing can
// leak. Importers reopen the owner's descriptor through /proc/<pid>/fd/<fd> (same user, or
// ptrace-read permission). The first page of the region holds a header (magic, a random
// 128-bit id, the size and a generation counter); an import checks the handle against it, so
// a handle whose owner died and whose pid/fd were reused, or whose region was reset
// (generation bumped), is refused as stale instead of mapping someone else's memory.
// The handle carries the machine's boot id: a handle from another machine is "foreign".
constexpr size_t kShmHeaderBytes = 4096;
constexpr uint32_t kShmHandleVersion = 1;
constexpr size_t kShmHandleBytes = 96;

class ShmRegion {
 public:
  /// Creates a region of `size` data bytes owned by this process.
  static std::unique_ptr<ShmRegion> create(size_t size, const std::string& name);
  /// Maps the region described by `handle` (bytes from handle()).
  static std::unique_ptr<ShmRegion> import(const std::string& handle);
  ~ShmRegion();
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  bool owner() const { return owner_; }
  const std::string& name() const { return name_; }
  std::string id_hex() const;
  /// Generation this mapping was made for (owner: the current one).
  uint64_t generation() const { return generation_; }
  /// True when the owner bumped the generation after this mapping was made.
  bool stale() const;
  /// Owner only: invalidates every handle exported so far.
  void bump_generation();
  /// Owner only: the exportable handle (kShmHandleBytes bytes).
  std::string handle() const;

 private:
  ShmRegion() = default;
  int fd_ = -1;
  void* base_ = nullptr;  // mapping start (header)
  void* data_ = nullptr;  // base_ + kShmHeaderBytes
  size_t size_ = 0;
  bool owner_ = false;
  uint64_t generation_ = 0;
  unsigned char id_[16] = {};
  std::string name_;
};

/// The machine's boot id folded to 64 bits (0 when it cannot be read).
uint64_t boot_id_hash();

}  // namespace hw
