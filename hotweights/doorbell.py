# SPDX-License-Identifier: Apache-2.0
"""Same-node doorbell: a ring's per-bucket control in shared memory.

Note [Doorbell]
~~~~~~~~~~~~~~~
Through the coordinator a ring bucket costs four requests and two long-poll wake-ups: the
publisher posts the handle, the subscriber's long poll returns it, the subscriber acks, the
publisher's long poll returns the release; Python and ZeroMQ on every hop, and with the
embedded coordinator all of it shares the publisher's GIL (1.2-3 ms per bucket measured).
For subscribers on the publisher's node the bytes are already in shared (host or device)
memory, so the control can be too. Each publisher session creates one small host region next
to its ring (CPU or CUDA):

- a **post record** per slot (seqlock: the sequence number is zeroed, the fields written,
  then the new sequence number stored; a reader checks it before and after): version,
  bucket, attempt, bytes used, digest, handle id, and the mask of the lanes it is for;
- a **lane** per same-node subscriber (64 at most), claimed with a compare-and-swap of the
  subscriber's pid, named by a hash of its client id, given back on close (the lane of a
  process that died is taken over when no lane is free);
- an **ack word** per slot and lane: the sequence number of the post that lane has verified;
- two futex words, ``posted`` and ``acked``, bumped and woken by each post and by the last
  answer to each post (or a nack): one publisher wake-up per bucket, not one per subscriber.

A bucket that every consumer can take from the doorbell (all on this node, each with a
lane, no relay) is posted only there, and answered only there: no coordinator request, no
long-poll wake-up, no Python on the coordinator's side, for any bucket but the version's last
(whose release through the coordinator still tells the publisher that the version committed:
the last ack carries the last precommit). Everything else - a bucket for a remote node's
relay, for a subscriber that has not mapped the ring yet (it claims its lane when it first
does), for one of 65 or more - is posted to the coordinator as before (and rung too, for
the consumers that have a lane, with a flag saying the coordinator has it: those ack it
there). What the coordinator's handle records did for doorbell-only buckets the publisher
does itself (``Publisher._doorbell_loop``): a nack (the ack word's high bit) re-sends the
bucket; a consumer that died or refused the version stops holding a slot once the
coordinator says so (asked when a post stays unanswered for DOORBELL_STUCK_S); one that
stays silent past the lease (``handle_ttl``) gets the bucket again; when the version
aborts, whatever is left is freed, and a committed version's posts stay until answered,
given up on or expired (a subscriber outside a quorum smaller than "all" may still read
them), as the coordinator does with its handles. A failing pass of that thread is logged and
the next one goes on. A settled post is withdrawn (its sequence number zeroed) before its
slot can be refilled. A subscriber sleeps on ``posted`` while the version it receives is the one the
publisher streams (or, announced before the version existed, is about to stream) through
its ring (``ring_version``, ``ring_next``); it asks the coordinator for handles, without
waiting, every DOORBELL_POLL_S (a handle only the coordinator has: posted before its lane was
claimed, say), and about the version's state every DOORBELL_STATE_S when nothing comes (the
publisher also rings when a version is decided). Versions, votes, liveness and commit stay with the coordinator.

The region is an anonymous memfd (Note [Shared-memory lifetime], csrc/core/shm.h): nothing
is left behind when the processes go, however they go.
"""

from __future__ import annotations

import hashlib
import os

import msgpack
import numpy as np

from . import _C
from . import config as _config

__all__ = ["Doorbell", "DoorbellError", "LANES", "NACK"]

_MAGIC = 0x6877_6462_656C_6C31  # "hwdbell1"
_HANDLE_MAGIC = "hotweights.doorbell"
LANES = 64  # the post record's lane mask is one u64

# header words (byte offsets)
_H_MAGIC, _H_SLOTS, _H_LANES, _H_RING_VERSION, _H_SEQ, _H_RING_NEXT = 0, 8, 16, 24, 32, 40
_H_POSTED, _H_ACKED = 64, 128  # u32 futex words, each on its own cache line
_HEADER = 256
_LANE = 64      # pid u64, ready u64, id hash 16 bytes
# seq, version, bucket, attempt, used, digest, mask, slot (u64), hid (16 bytes), flags (u64)
_RECORD = 128
_R_SEQ, _R_VERSION, _R_BUCKET, _R_ATTEMPT, _R_USED, _R_DIGEST, _R_MASK, _R_SLOT = range(8)
_R_HID = 64  # byte offset of the handle id in a record
_R_FLAGS = 10  # word index: _F_COORD when the coordinator has the handle too
_F_COORD = 1
NACK = 1 << 63  # an ack word of seq | NACK: the lane's check of post seq failed


class DoorbellError(ValueError):
    """A doorbell handle is foreign, truncated or describes another layout."""


def _id_hash(client_id: str) -> bytes:
    return hashlib.blake2b(client_id.encode(), digest_size=16).digest()


def _layout(slots: int) -> tuple[int, int, int]:
    lanes_at = _HEADER
    records_at = lanes_at + LANES * _LANE
    acks_at = records_at + slots * _RECORD
    return records_at, acks_at, acks_at + slots * LANES * 8


class Doorbell:
    """One publisher session's doorbell (see Note [Doorbell]). ``Doorbell.create(slots)`` in
    the publisher, ``Doorbell.open(handle)`` in each subscriber process."""

    def __init__(self, region, slots: int, owner: bool, spin_s: float | None = None):
        self._r = region
        self.slots = slots
        self.owner = owner
        self._records_at, self._acks_at, size = _layout(slots)
        if region.size < size:
            raise DoorbellError(f"doorbell region holds {region.size} bytes, {slots} slots "
                                f"need {size}")
        words = np.frombuffer(region, dtype=np.uint64)
        self._lanes = words[_HEADER // 8:self._records_at // 8].reshape(LANES, _LANE // 8)
        self._records = words[self._records_at // 8:self._acks_at // 8].reshape(slots, _RECORD // 8)
        self._acks = words[self._acks_at // 8:size // 8].reshape(slots, LANES)
        self._hids = np.frombuffer(region, dtype=np.uint8)[
            self._records_at:self._acks_at].reshape(slots, _RECORD)[:, _R_HID:_R_HID + 16]
        self.lane: int | None = None  # a subscriber's, once claimed
        self._pid = os.getpid()
        # poll this long before a futex sleep (HOTWEIGHTS_SPIN_US of the caller's config)
        self._spin_s = _config.get().spin_s if spin_s is None else float(spin_s)

    # ------------------------------------------------------------------ both ends

    @classmethod
    def create(cls, slots: int, spin_s: float | None = None) -> "Doorbell":
        if not isinstance(slots, int) or not 1 <= slots <= 1024:
            raise ValueError(f"Doorbell: slots={slots!r}, expected 1..1024 (a ring's slots)")
        region = _C.ShmRegion.create(_layout(slots)[2], "doorbell")
        db = cls(region, slots, owner=True, spin_s=spin_s)
        region.store64(_H_SLOTS, slots)
        region.store64(_H_LANES, LANES)
        region.store64(_H_MAGIC, _MAGIC)
        return db

    @classmethod
    def open(cls, handle: bytes, spin_s: float | None = None) -> "Doorbell":
        try:
            info = msgpack.unpackb(bytes(handle), raw=False)
        except Exception as e:
            raise DoorbellError(f"doorbell handle is not valid msgpack ({e})") from None
        if not isinstance(info, dict) or info.get("magic") != _HANDLE_MAGIC:
            raise DoorbellError("not a hotweights doorbell handle")
        if not isinstance(info.get("raw"), bytes) or not isinstance(info.get("slots"), int):
            raise DoorbellError("doorbell handle lacks its region or slot count")
        try:
            region = _C.ShmRegion.import_handle(info["raw"])
        except ValueError as e:
            raise DoorbellError(str(e)) from None
        got = (region.load64(_H_MAGIC), region.load64(_H_SLOTS), region.load64(_H_LANES))
        if got != (_MAGIC, info["slots"], LANES):
            raise DoorbellError(f"doorbell region's header (magic {got[0]:#x}, {got[1]} slots, "
                                f"{got[2]} lanes) does not match its handle (magic {_MAGIC:#x}, "
                                f"{info['slots']} slots, {LANES} lanes)")
        return cls(region, info["slots"], owner=False, spin_s=spin_s)

    def handle(self) -> bytes:
        return msgpack.packb({"magic": _HANDLE_MAGIC, "slots": self.slots,
                              "raw": self._r.handle()})

    def posted_count(self) -> int:
        return self._r.load32(_H_POSTED)

    def acked_count(self) -> int:
        return self._r.load32(_H_ACKED)

    def wait_posted(self, seen: int, timeout_s: float) -> bool:
        """Sleeps until a post after ``seen`` (a posted_count()) or the timeout; True if rung."""
        return self._r.wait32(_H_POSTED, seen & 0xFFFFFFFF, max(0.0, timeout_s), self._spin_s)

    def wait_acked(self, seen: int, timeout_s: float) -> bool:
        return self._r.wait32(_H_ACKED, seen & 0xFFFFFFFF, max(0.0, timeout_s), self._spin_s)

    def ring_version(self) -> int:
        """The version the publisher streams through its ring now (0: none)."""
        return self._r.load64(_H_RING_VERSION)

    def ring_next(self) -> bool:
        """Whether the publisher's newest publish streams through its ring (set before the
        version exists: a subscriber that sees the version event sees this too)."""
        return self._r.load64(_H_RING_NEXT) == 1

    # ------------------------------------------------------------------ publisher

    def announce(self, ring: bool) -> None:
        """Before a publish: whether the version about to be made streams through the ring."""
        self._r.store64(_H_RING_NEXT, 1 if ring else 0)

    def set_ring_version(self, version: int) -> None:
        """The version now streaming through the ring; wakes the subscribers waiting for it."""
        self._r.store64(_H_RING_VERSION, int(version))
        self.ring()

    def ring(self) -> None:
        """Wakes the subscribers waiting on ``posted`` (a version was decided: they go and ask
        the coordinator)."""
        self._r.add32(_H_POSTED, 1)
        self._r.wake32(_H_POSTED)

    def next_seq(self) -> int:
        """A new post's sequence number (never 0); taken before the handle goes to the
        coordinator, which carries it in the payload."""
        return self._r.add64(_H_SEQ, 1) + 1

    def lanes_of(self, client_ids) -> tuple[int, np.ndarray, bool]:
        """(mask, lane indices, all): the claimed lanes of these clients, and whether every
        one of them has a lane."""
        ready = np.flatnonzero(self._lanes[:, 1] == 1)
        by_hash = {self._lane_hash(int(i)): int(i) for i in ready}
        lanes = [by_hash.get(_id_hash(c)) for c in client_ids]
        have = np.array([x for x in lanes if x is not None], np.int64)
        mask = 0
        for x in have.tolist():
            mask |= 1 << x
        return mask, have, len(have) == len(lanes)

    def _lane_hash(self, lane: int) -> bytes:
        return self._lanes[lane, 2:4].tobytes()

    def post(self, slot: int, seq: int, *, version: int, bucket: int, attempt: int, used: int,
             digest: int, mask: int, handle_id: str, coordinated: bool) -> None:
        """Publishes a slot's post record and rings (the slot's bytes are complete).
        ``coordinated``: the handle was posted to the coordinator too (its takers ack it
        there); else it lives only here and is acked only here."""
        rec = self._records[slot]
        self._r.store64(self._records_at + slot * _RECORD, 0)  # seqlock: being written
        rec[1:8] = (version, bucket, attempt, used, digest, mask, slot)
        rec[_R_FLAGS] = _F_COORD if coordinated else 0
        self._hids[slot] = np.frombuffer(bytes.fromhex(handle_id)[:16].ljust(16, b"\0"), np.uint8)
        self._r.store64(self._records_at + slot * _RECORD, seq)
        self._r.add32(_H_POSTED, 1)
        self._r.wake32(_H_POSTED)

    def clear(self, slot: int, seq: int) -> None:
        """Withdraws post ``seq`` of ``slot`` (settled: the slot is about to be reused), so a
        late taker does not read a slot being refilled."""
        off = self._records_at + slot * _RECORD
        if self._r.load64(off) == seq:
            self._r.store64(off, 0)

    def answers(self, slot: int, lanes: np.ndarray) -> np.ndarray:
        """The ack words of ``lanes`` for ``slot``: a post's seq (verified), seq | NACK
        (failed), anything else: not answered yet."""
        self._r.load32(_H_ACKED)  # a full barrier before the plain reads below
        return self._acks[slot, lanes].copy()

    # ------------------------------------------------------------------ subscriber

    def claim(self, client_id: str) -> int | None:
        """Takes a free lane (or one whose process died) for this client; None when all 64
        are held by live processes."""
        if self.lane is not None:
            return self.lane
        base = _HEADER
        for attempt in range(2):
            for i in range(LANES):
                off = base + i * _LANE
                holder = self._r.load64(off)
                if holder != 0 and (attempt == 0 or _alive(int(holder))):
                    continue
                if not self._r.cas64(off, holder, self._pid):
                    continue
                self._r.store64(off + 8, 0)  # not ready while the name is written
                self._lanes[i, 2:4] = np.frombuffer(_id_hash(client_id), np.uint64)
                self._acks[:, i] = 0
                self._r.store64(off + 8, 1)
                self.lane = i
                return i
        return None

    def release(self) -> None:
        """Gives the lane back (on close)."""
        if self.lane is None:
            return
        off = _HEADER + self.lane * _LANE
        self._r.store64(off + 8, 0)
        self._r.cas64(off, self._pid, 0)
        self.lane = None

    def take(self, version: int, skip) -> list[dict]:
        """This lane's posts of ``version`` whose handle ids are not in ``skip``, oldest
        first, as (handle id, payload fields, seq) dicts; posts being rewritten are left for
        the next look."""
        if self.lane is None:
            return []
        bit = np.uint64(1 << self.lane)
        recs = self._records
        cand = np.flatnonzero((recs[:, _R_VERSION] == version) & ((recs[:, _R_MASK] & bit) != 0)
                              & (recs[:, _R_SEQ] != 0))
        out = []
        for s in cand.tolist():
            seq = self._r.load64(self._records_at + s * _RECORD)
            if seq == 0:
                continue
            fields = recs[s].copy()
            hid = self._hids[s].tobytes().hex()
            if self._r.load64(self._records_at + s * _RECORD) != seq:
                continue  # rewritten while read
            if (fields[_R_VERSION] != version or not int(fields[_R_MASK]) & int(bit)
                    or hid in skip):
                continue  # (rewritten for another version or lane between scan and copy)
            out.append({"seq": seq, "slot": int(fields[_R_SLOT]), "bucket": int(fields[_R_BUCKET]),
                        "attempt": int(fields[_R_ATTEMPT]), "used": int(fields[_R_USED]),
                        "digest": int(fields[_R_DIGEST]), "handle_id": hid,
                        "coordinated": bool(int(fields[_R_FLAGS]) & _F_COORD)})
        out.sort(key=lambda r: r["seq"])
        return out

    def ack(self, slot: int, seq: int, ok: bool = True) -> bool:
        """Answers post ``seq`` of ``slot`` for this lane (verified, or not: ``ok`` False)
        and rings the publisher when this was the post's last answer (or a nack); returns
        whether it rang. Two lanes answering at once cannot both miss each other: each
        answer is stored with a full barrier before the other lanes' words are read (the
        store-buffer litmus), so at least one of them rings."""
        if self.lane is None or not 0 <= slot < self.slots:
            return False
        self._r.store64(self._acks_at + (slot * LANES + self.lane) * 8, seq if ok else seq | NACK)
        if ok and self._r.load64(self._records_at + slot * _RECORD) == seq:
            mask = int(self._records[slot, _R_MASK])
            if self._r.load64(self._records_at + slot * _RECORD) == seq:  # (mask of that post)
                words = self._acks[slot]
                mask &= ~(1 << self.lane)
                while mask:
                    lane = (mask & -mask).bit_length() - 1
                    mask &= mask - 1
                    if int(words[lane]) not in (seq, seq | NACK):
                        return False  # another lane still reads it: its answer rings
        self._r.add32(_H_ACKED, 1)
        self._r.wake32(_H_ACKED)
        return True

    def close(self) -> None:
        """Releases the lane and drops the mapping (the memory goes with the last one)."""
        if self._r is None:
            return
        if not self.owner:
            self.release()
        self._lanes = self._records = self._acks = self._hids = None
        self._r = None

    def __repr__(self) -> str:
        return f"Doorbell({self.slots} slots, lane={self.lane}, owner={self.owner})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

