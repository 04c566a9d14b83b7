# SPDX-License-Identifier: Apache-2.0
"""``hotweights demo``: a local hot swap on CPU with nothing else running.

An embedded coordinator, a publisher ("the trainer") and subscriber processes ("inference
replicas") holding a small transformer language model. The subscribers generate text in a loop
(``commit="on_forward"``: a committed version is applied before the next forward). The publisher
publishes a few versions (a full one, partial fine-tunes, a full change); for each it prints the
bytes moved, the time from publish to commit, the largest commit pause, and whether every
subscriber switched cleanly: its weights hash to the published manifest and its logits on a probe
prompt equal the publisher's bit for bit.

Every process exports Prometheus metrics (docs/metrics.md): the publisher and the embedded
coordinator on ``--metrics-port`` (rank 0), subscriber i on ``--metrics-port`` + i + 1;
``--hold`` keeps everything running after the last version so that Prometheus can scrape it.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

import torch

__all__ = ["TinyLM", "main", "add_cli", "DEMO_METRICS_PORT"]

DEMO_METRICS_PORT = 9465  # base port: publisher + coordinator; subscriber i: + i + 1


class Block(torch.nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(torch.nn.Module):
    """A byte-level causal transformer (vocabulary 256)."""

    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4, ctx: int = 128, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 256)
        self.ctx = ctx

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens[:, -self.ctx:]
        n = t.shape[1]
        x = self.embed(t) + self.pos[:n]
        mask = torch.full((n, n), float("-inf")).triu(1)
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.norm(x))


PROBE = torch.tensor([list(b"hot weights, hot swap: ")])


def _probe_bytes(model: torch.nn.Module) -> bytes:
    with torch.no_grad():
        return model(PROBE).numpy().tobytes()


def _subscriber(i: int, endpoint: str, swap: str, size: dict, q, stop, metrics_port: int) -> None:
    """An inference replica: generates continuously; reports each applied version."""
    import hotweights  # noqa: F401  (installs Module.register_hotweights)
    from hotweights import metrics, ops

    torch.set_num_threads(1)
    if metrics_port:
        try:
            metrics.start_exporter(metrics_port + i + 1, rank=i + 1, source="demo subscriber")
        except metrics.MetricsError as e:
            q.put(("error", i, str(e)))
            return
    model = TinyLM(**size, seed=100 + i).eval()
    h = model.register_hotweights(name="demo-lm", endpoint=endpoint, commit="on_forward", swap=swap)
    reported = None
    tokens = PROBE.clone()
    q.put(("ready", i))
    try:
        while not stop.is_set():
            with torch.no_grad():
                nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)  # the pre-hook applies versions
            tokens = torch.cat([tokens, nxt], 1)[:, -model.ctx:]
            if h.version != reported and h.last_commit is not None:
                reported = h.version
                sums = {k: ops.checksum(t) for k, t in model.state_dict().items()}
                q.put(("applied", i, h.version, h.last_commit.timings["pause_s"], sums,
                       _probe_bytes(model), swap))
    except Exception as e:
        q.put(("error", i, f"{type(e).__name__}: {e}"))
    finally:
        h.close()


def _bar(done: int, total: int, width: int = 28) -> str:
    frac = done / total if total else 1.0
    return "[" + "#" * int(frac * width) + "." * (width - int(frac * width)) + f"] {frac:4.0%}"


def main(versions: int = 4, subscribers: int = 2, size: str = "small", timeout: float = 60.0,
         metrics_port: int = DEMO_METRICS_PORT, hold: float = 0.0) -> int:
    """Runs the demo; returns 0 when every version switched cleanly on every subscriber.
    ``metrics_port`` 0 turns the exporters off; ``hold`` (s) keeps the processes running after
    the last version."""
    import hotweights  # noqa: F401  (installs Module.register_hotweights)
    from hotweights import metrics
    from hotweights.coordinator import start_embedded

    torch.set_num_threads(1)
    sizes = {"small": dict(d=256, layers=4, heads=4), "medium": dict(d=512, layers=8, heads=8)}
    if size not in sizes:
        raise ValueError(f"demo: size={size!r}, expected one of {', '.join(sizes)}")
    if not 1 <= subscribers <= 8:
        raise ValueError(f"demo: subscribers={subscribers}, expected 1..8")
    if metrics_port and not 1 <= metrics_port <= 65535 - subscribers:
        raise ValueError(f"demo: metrics_port={metrics_port}, expected 0 (off) or a port in "
                         f"1..{65535 - subscribers}")
    if hold < 0:
        raise ValueError(f"demo: hold={hold}, expected seconds >= 0")
    t_start = time.monotonic()
    scrape = None
    if metrics_port and metrics.start_exporter(metrics_port, rank=0, source="demo publisher"):
        scrape = metrics.exporter_url()
    coord = start_embedded()
    trainer = TinyLM(**sizes[size], seed=0)
    n_params = sum(p.numel() for p in trainer.parameters())
    print(f"hotweights demo: TinyLM {size} ({n_params / 1e6:.2f} M parameters, "
          f"{n_params * 4 / 2**20:.1f} MiB fp32), coordinator {coord.endpoint} (embedded)")
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    swaps = ["storage", "inplace"]
    sub_port = metrics_port if scrape else 0  # off when the publisher's exporter is off
    procs = [ctx.Process(target=_subscriber,
                         args=(i, coord.endpoint, swaps[i % 2], sizes[size], q, stop, sub_port),
                         daemon=True) for i in range(subscribers)]
    for p in procs:
        p.start()
    pub = hotweights.Publisher(trainer, name="demo-lm", endpoint=coord.endpoint,
                               bucket_bytes=1 << 20, slots=4, serve_late=False)
    ok = True
    try:
        ready = 0
        while ready < subscribers:
            msg = q.get(timeout=timeout)
            if msg[0] == "error":
                raise RuntimeError(f"subscriber {msg[1]}: {msg[2]}")
            ready += msg[0] == "ready"
        print(f"{subscribers} subscriber processes generating text (swap: "
              f"{', '.join(swaps[i % 2] for i in range(subscribers))})")
        if scrape:
            host = scrape.split("//")[1].split(":")[0]
            print(f"Prometheus metrics: {scrape} (publisher, coordinator; rank 0), subscribers "
                  f"on {', '.join(f'{host}:{metrics_port + i + 1}' for i in range(subscribers))}"
                  f" (ranks 1-{subscribers}); Grafana: dashboards/hotweights.json")
        print()
        steps = _version_steps(versions)
        header = f"{'ver':>3}  {'what':<26} {'tensors':>7} {'moved MiB':>9} {'publish->commit':>15} {'max pause':>9}  clean switch"
        print(header)
        print("-" * len(header))
        tty = sys.stdout.isatty()
        for k, (what, change) in enumerate(steps):
            change(trainer)

            def show(done, total, k=k, what=what):  # redraws in place on a terminal only
                sys.stdout.write(f"\r{k + 1:>3}  {what:<26} {_bar(done, total)}")
                sys.stdout.flush()

            if tty:
                show(0, 1)
            r = pub.publish(what, progress=show if tty else None)
            expect_sums = {name: hotweights.ops.checksum(t) for name, t in trainer.state_dict().items()}
            expect_probe = _probe_bytes(trainer)
            pauses, clean = [], []
            seen = set()
            deadline = time.monotonic() + timeout
            while len(seen) < subscribers:
                msg = q.get(timeout=max(0.1, deadline - time.monotonic()))
                if msg[0] == "error":
                    raise RuntimeError(f"subscriber {msg[1]}: {msg[2]}")
                if msg[0] != "applied" or msg[2] != r.version:
                    continue
                _, i, _v, pause, sums, probe, _swap = msg
                seen.add(i)
                pauses.append(pause)
                clean.append(sums == expect_sums and probe == expect_probe)
            ok &= all(clean)
            mark = "yes, all " + str(subscribers) if all(clean) else f"NO ({clean.count(False)} differ)"
            sys.stdout.write(f"{chr(13) if tty else ''}{r.version:>3}  {what:<26} {r.tensors:>7} {r.bytes / 2**20:>9.2f} "
                             f"{r.timings['total_s'] * 1e3:>12.1f} ms {max(pauses) * 1e3:>6.2f} ms  {mark}\n")
        if hold > 0:
            print(f"\nholding {hold:.0f} s (subscribers keep generating; scrape the metrics now)")
            time.sleep(hold)
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        pub.close()
        coord.stop()
        metrics.stop_exporter()
    print(f"\n{'every version switched cleanly' if ok else 'SOME VERSIONS DID NOT SWITCH CLEANLY'}: "
          f"outputs equal the publisher's bit for bit after each commit; "
          f"total {time.monotonic() - t_start:.1f} s")
    return 0 if ok else 1


def _version_steps(n: int):
    """What changes in each version: a full first publish, then partial fine-tunes."""

    def nothing(m):
        pass

    def tune(pattern):
        def f(m):
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if pattern(name):
                        p.add_(torch.randn_like(p) * 0.02)
        return f

    def last_mlp(m):
        tune(lambda n: n.startswith(f"blocks.{len(m.blocks) - 1}.mlp."))(m)

    steps = [("initial weights (full)", nothing),
             ("fine-tune last block MLP", last_mlp),
             ("new output head", tune(lambda n: n.startswith("head."))),
             ("full training step", tune(lambda n: True))]
    while len(steps) < n:
        steps.append((f"training step {len(steps)}", tune(lambda n: True)))
    return steps[:n]


def add_cli(sub) -> None:
    """``hotweights demo``."""
    p = sub.add_parser("demo", help="local hot-swap demo: embedded coordinator, a publisher and "
                       "subscriber processes with a small transformer on CPU")
    p.add_argument("--versions", type=int, default=4)
    p.add_argument("--subscribers", type=int, default=2)
    p.add_argument("--size", default="small", choices=["small", "medium"])
    p.add_argument("--metrics-port", type=int, default=DEMO_METRICS_PORT,
                   help=f"Prometheus base port (default {DEMO_METRICS_PORT}: publisher and "
                   "coordinator; subscriber i on base + i + 1; 0 = off)")
    p.add_argument("--hold", type=float, default=0.0,
                   help="seconds to keep running after the last version (to scrape metrics)")
    p.set_defaults(fn=lambda a: main(a.versions, a.subscribers, a.size,
                                     metrics_port=a.metrics_port, hold=a.hold))
