// SPDX-License-Identifier: Apache-2.0
// See Note [Shared-memory lifetime] in shm.h.
#include "core/shm.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <random>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <atomic>

#include "core/checksum.h"
#include "core/common.h"

namespace hw {

namespace {

constexpr char kRegionMagic[8] = {'H', 'W', 'S', 'H', 'M', 'R', '1', '\0'};
constexpr char kHandleMagic[8] = {'H', 'W', 'S', 'H', 'M', 'H', '1', '\0'};
constexpr uint32_t kKindCpuMemfd = 1;

struct RegionHeader {
  char magic[8];
  unsigned char id[16];
  uint64_t size;
  std::atomic<uint64_t> generation;
};
static_assert(sizeof(RegionHeader) <= kShmHeaderBytes, "region header must fit its page");

// Wire layout of a handle; every field is fixed-width and little-endian (x86-64/aarch64).
struct HandleWire {
  char magic[8];
  uint32_t version;
  uint32_t kind;
  uint64_t boot_id;
  int32_t pid;
  int32_t fd;
  uint64_t size;
  uint64_t data_offset;
  uint64_t generation;
  unsigned char id[16];
  char name[16];
  uint64_t crc;  // hw64 digest of the bytes before it
};
static_assert(sizeof(HandleWire) == kShmHandleBytes, "handle layout changed: bump version");

std::string errno_text(int e) { return std::string(std::strerror(e)); }

}  // namespace

uint64_t boot_id_hash() {
  // plain read(2), no iostreams (see core/common.h)
  const int fd = ::open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[64];
  const ssize_t n = ::read(fd, buf, sizeof buf);
  ::close(fd);
  size_t len = n > 0 ? static_cast<size_t>(n) : 0;
  while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == ' ')) --len;  // as `f >> s` read it
  if (len == 0) return 0;
  return hw_digest(buf, len);
}

std::unique_ptr<ShmRegion> ShmRegion::create(size_t size, const std::string& name) {
  HW_CHECK_ARG(size > 0 && size <= static_cast<size_t>(PTRDIFF_MAX) - kShmHeaderBytes,
               "ShmRegion.create: size=", size, ", expected > 0 and below 2^63 bytes");
  std::unique_ptr<ShmRegion> r(new ShmRegion());
  r->name_ = name.substr(0, 15);
  const std::string memfd_name = "hotweights:" + r->name_;
  r->fd_ = memfd_create(memfd_name.c_str(), MFD_CLOEXEC);
  HW_CHECK(r->fd_ >= 0, "ShmRegion.create: memfd_create failed: ", errno_text(errno));
  const size_t total = kShmHeaderBytes + size;
  HW_CHECK(ftruncate(r->fd_, static_cast<off_t>(total)) == 0, "ShmRegion.create: ftruncate(",
           total, ") failed: ", errno_text(errno));
  r->base_ = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd_, 0);
  if (r->base_ == MAP_FAILED) {
    r->base_ = nullptr;
    throw std::runtime_error(str("ShmRegion.create: mmap of ", total, " bytes failed: ",
                                 errno_text(errno)));
  }
  r->data_ = static_cast<char*>(r->base_) + kShmHeaderBytes;
  r->size_ = size;
  r->owner_ = true;
  std::random_device rd;
  for (auto& b : r->id_) b = static_cast<unsigned char>(rd());
  auto* h = new (r->base_) RegionHeader();
  std::memcpy(h->magic, kRegionMagic, 8);
  std::memcpy(h->id, r->id_, 16);
  h->size = size;
  h->generation.store(1);
  r->generation_ = 1;
  return r;
}

std::string ShmRegion::handle() const {
  HW_CHECK(owner_, "ShmRegion.handle: only the owner exports a region (", name_, ")");
  HandleWire w{};
  std::memcpy(w.magic, kHandleMagic, 8);
  w.version = kShmHandleVersion;
  w.kind = kKindCpuMemfd;
  w.boot_id = boot_id_hash();
  w.pid = static_cast<int32_t>(getpid());
  w.fd = fd_;
  w.size = size_;
  w.data_offset = kShmHeaderBytes;
  w.generation = static_cast<RegionHeader*>(base_)->generation.load();
  std::memcpy(w.id, id_, 16);
  std::strncpy(w.name, name_.c_str(), sizeof(w.name) - 1);
  w.crc = hw_digest(&w, offsetof(HandleWire, crc));
  return std::string(reinterpret_cast<const char*>(&w), sizeof(w));
}

std::unique_ptr<ShmRegion> ShmRegion::import(const std::string& bytes) {
  HW_CHECK_ARG(bytes.size() == kShmHandleBytes, "shared-memory handle: ", bytes.size(),
               " bytes, expected ", kShmHandleBytes, " (truncated or not a handle)");
  HandleWire w;
  std::memcpy(&w, bytes.data(), sizeof(w));
  HW_CHECK_ARG(std::memcmp(w.magic, kHandleMagic, 8) == 0,
               "shared-memory handle: bad magic (not a hotweights handle)");
  HW_CHECK_ARG(w.version == kShmHandleVersion, "shared-memory handle: version ", w.version,
               ", this build reads version ", kShmHandleVersion);
  HW_CHECK_ARG(w.crc == hw_digest(&w, offsetof(HandleWire, crc)),
               "shared-memory handle: checksum mismatch (corrupted handle)");
  HW_CHECK_ARG(w.kind == kKindCpuMemfd, "shared-memory handle: kind ", w.kind,
               ", expected ", kKindCpuMemfd, " (CPU memfd)");
  const uint64_t boot = boot_id_hash();
  HW_CHECK_ARG(w.boot_id == boot, "shared-memory handle: foreign handle from another machine"
               " (boot id differs); shared memory only works within one host");
  HW_CHECK_ARG(w.data_offset == kShmHeaderBytes, "shared-memory handle: data_offset ",
               w.data_offset, ", expected ", kShmHeaderBytes);
  const std::string path = str("/proc/", w.pid, "/fd/", w.fd);
  std::unique_ptr<ShmRegion> r(new ShmRegion());
  r->name_ = std::string(w.name, strnlen(w.name, sizeof(w.name)));
  r->fd_ = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (r->fd_ < 0) {
    const int e = errno;
    if (e == ENOENT)
      throw std::runtime_error(str("stale shared-memory handle '", r->name_, "': owner pid ",
                                   w.pid, " or its descriptor ", w.fd, " is gone"));
    throw std::runtime_error(str("cannot open shared-memory region '", r->name_, "' at ", path,
                                 ": ", errno_text(e),
                                 " (publisher and subscribers must run as the same user)"));
  }
  struct stat st;
  HW_CHECK(fstat(r->fd_, &st) == 0, "fstat ", path, ": ", errno_text(errno));
  HW_CHECK(w.size <= static_cast<size_t>(PTRDIFF_MAX) - kShmHeaderBytes, "shared-memory handle '",
           r->name_, "' claims ", w.size, " bytes");
  const size_t total = kShmHeaderBytes + w.size;
  HW_CHECK(static_cast<size_t>(st.st_size) == total, "stale shared-memory handle '", r->name_,
           "': ", path, " has ", st.st_size, " bytes, the handle says ", total);
  r->base_ = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd_, 0);
  if (r->base_ == MAP_FAILED) {
    r->base_ = nullptr;
    throw std::runtime_error(str("mmap of shared-memory region '", r->name_, "' failed: ",
                                 errno_text(errno)));
  }
  auto* h = static_cast<RegionHeader*>(r->base_);
  HW_CHECK(std::memcmp(h->magic, kRegionMagic, 8) == 0 && std::memcmp(h->id, w.id, 16) == 0 &&
               h->size == w.size,
           "stale shared-memory handle '", r->name_, "': ", path,
           " is not the region the handle describes (owner restarted?)");
  HW_CHECK(h->generation.load() == w.generation, "stale shared-memory handle '", r->name_,
           "': generation ", w.generation, ", region is at generation ", h->generation.load());
  // The mapping keeps the memory alive; an importer needs no descriptor after mmap.
  ::close(r->fd_);
  r->fd_ = -1;
  r->data_ = static_cast<char*>(r->base_) + kShmHeaderBytes;
  r->size_ = w.size;
  r->generation_ = w.generation;
  std::memcpy(r->id_, w.id, 16);
  return r;
}

ShmRegion::~ShmRegion() {
  if (base_) munmap(base_, kShmHeaderBytes + size_);
  if (fd_ >= 0) ::close(fd_);
}

bool ShmRegion::stale() const {
  return static_cast<RegionHeader*>(base_)->generation.load() != generation_;
}

void ShmRegion::bump_generation() {
  HW_CHECK(owner_, "ShmRegion.bump_generation: only the owner may reset a region");
  generation_ = static_cast<RegionHeader*>(base_)->generation.fetch_add(1) + 1;
}

std::string ShmRegion::id_hex() const {
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (auto b : id_) {
    s += hex[b >> 4];
    s += hex[b & 15];
  }
  return s;
}

}  // namespace hw
