// SPDX-License-Identifier: Apache-2.0
// Cross-process atomics and futex waits on words of a shared-memory region: the primitives
// of the same-node doorbell (Note [Doorbell] in hotweights/doorbell.py). Every function takes
// a pointer into a MAP_SHARED mapping (a ShmRegion); the bindings check bounds and alignment.
#pragma once

#include <cstdint>

namespace hw {

// Loads and stores are full barriers (a fence on both sides): the doorbell's fields are
// written and read with plain accesses from Python (numpy) between them, and a seqlock
// needs those ordered against its counter on weakly ordered CPUs too (aarch64 hosts).
uint64_t atomic_load64(const void* p);
void atomic_store64(void* p, uint64_t v);
uint64_t atomic_add64(void* p, uint64_t v);  // returns the old value
bool atomic_cas64(void* p, uint64_t expected, uint64_t desired);
uint32_t atomic_load32(const void* p);
uint32_t atomic_add32(void* p, uint32_t v);  // returns the old value

/// Sleeps while the 32-bit word at p still holds `expected`, for at most timeout_s seconds
/// (futex, shared between processes). True when woken or the word had already changed,
/// false on timeout. Spurious wake-ups return true: callers re-read the word. With spin_s > 0
/// it first re-reads the word for up to that long (part of the timeout) before it sleeps: a
/// futex wake-up reaches a sleeping thread tens of microseconds late (more on a VM), longer
/// than a doorbell post takes to be answered on a host with cores to spare.
bool futex_wait32(void* p, uint32_t expected, double timeout_s, double spin_s = 0.0);
/// Wakes up to n waiters on the word at p; returns how many were woken.
int futex_wake32(void* p, int n);

}  // namespace hw
