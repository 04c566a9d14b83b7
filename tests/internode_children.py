# SPDX-License-Identifier: Apache-2.0
"""Subscriber processes on simulated nodes for the inter-node fault test (spawned)."""

from __future__ import annotations

import os
import time


def subscriber(i: int, endpoint: str, env: dict, q, stop, mid) -> None:
    os.environ.update(env)
    import torch

    import hotweights
    from hotweights.manifest import Manifest

    torch.set_num_threads(1)
    torch.manual_seed(500 + i)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    h = m.register_hotweights(name="net", endpoint=endpoint, commit="manual")

    def hold(version, bucket):
        if version == int(env["KILL_IN_VERSION"]):
            mid.set()          # the parent kills us: a relay dying mid-version
            time.sleep(3600)

    h._sub.before_relay = hold
    nack_in = int(env.get("NACK_RELAYED_IN_VERSION", "0"))
    times = int(env.get("NACK_RELAYED_TIMES", "1"))
    if nack_in:  # refuse relayed buckets of that version, ``times`` times (bad reads)
        from hotweights import replicate

        sub, take, done = h._sub, h._sub._take, []

        def nack_once(version, plan, hd, b, needed, shadows):
            if version == nack_in and needed and hd["payload"].get("relayed") and len(done) < times:
                done.append(b)
                q.put(("nacked", i, version, b))
                return replicate._done((False, f"injected: bucket {b} read wrong", None))
            return take(version, plan, hd, b, needed, shadows)

        sub._take = nack_once
    q.put(("ready", i, h.client_id, os.getpid()))
    want = None  # after a version this subscriber refused: the one after it
    try:
        while not stop.is_set():
            try:
                v = h.wait(want, timeout=0.5)
            except TimeoutError:
                continue
            except hotweights.UpdateError as e:
                q.put(("refused", i, str(e)))
                want = (want or (h.version or 0) + 1) + 1
                continue
            want = None
            q.put(("applied", i, v, Manifest.from_state_dict(m).digest, h._sub._relay is not None))
    except Exception as e:
        q.put(("error", i, f"{type(e).__name__}: {e}"))
    finally:
        h.close()
