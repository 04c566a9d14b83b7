# SPDX-License-Identifier: Apache-2.0
"""Update size after a weight swap under each optimizer-state policy (docs/optim.md).

Runs real ``torch.optim.Adam`` / ``SGD`` on N coordinates under stationary gradients
N(mean, 1) until steady state, applies a policy (hotweights.optim, plus the rejected variants),
and prints the mean |update| k steps later relative to steady state, measured in the same run
with the same gradient draws under ``preserve`` (the baseline). The last rows scale the gradient
x10 after the swap (an objective shift) and stay normalised by the unscaled steady state.

A second table checks ``opt-check``'s model (gradients drawn from the state's own moments, no
knowledge of the true distribution) against the true-distribution numbers.

    python benchmarks/optim_update_ratio.py [--n 20000] [--warm 5000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hotweights import optim

KS = (1, 10, 50, 300, 1000)



def adam_rows(a: float):
    ap = lambda pol, **kw: (lambda o, ps: optim.apply_policy(o, ps, pol, a, **kw))  # noqa: E731
    return [
        ("preserve", None, 1.0),
        ("reset", ap("reset"), 1.0),
        ("reset + warm-up 100", ap("reset", warmup_steps=100), 1.0),
        ("zero m,v, keep step (3DGS)", optim._zero_moments_keep_step, 1.0),
        (f"m*={a}, v*={a} (rejected)", lambda o, ps: optim._attenuate_both_moments(o, ps, a, 1), 1.0),
        (f"m*={a}, v*={a}^2 (rejected)", lambda o, ps: optim._attenuate_both_moments(o, ps, a, 2), 1.0),
        (f"attenuate: m*={a}, v kept", ap("attenuate"), 1.0),
        ("reset_step (Adam-Rel)", ap("reset_step"), 1.0),
        ("grad x10: preserve", None, 10.0),
        ("grad x10: reset_step", ap("reset_step"), 10.0),
        ("grad x10: reset", ap("reset"), 10.0),
        ("grad x10: attenuate", ap("attenuate"), 10.0),
    ]


def sgd_rows(a: float):
    ap = lambda pol: (lambda o, ps: optim.apply_policy(o, ps, pol, a))  # noqa: E731
    return [
        ("preserve", None, 1.0),
        ("reset", ap("reset"), 1.0),
        (f"attenuate: buf*={a}", ap("attenuate"), 1.0),
        ("reset_step (= preserve)", ap("reset_step"), 1.0),
    ]


def steady(make, n, mean, warm, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = make([p])
    for _ in range(warm):
        p.grad = mean + torch.randn(n, generator=gen, dtype=torch.float64)
        opt.step()
    return p, opt


def curve(make, n, mean, warm, fn, scale, horizon, seed):
    """Mean |update| at k = 1..horizon after `fn` is applied at steady state."""
    p, opt = steady(make, n, mean, warm, seed)
    if fn is not None:
        fn(opt, [p])
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(horizon):
        with torch.no_grad():
            p.zero_()
        p.grad = scale * (mean + torch.randn(n, generator=gen, dtype=torch.float64))
        opt.step()
        out.append(float(p.detach().abs().mean()))
    return out


def table(title, rows, make, args, horizon):
    base = curve(make, args.n, args.mean, args.warm, None, 1.0, horizon, args.seed)
    ks = [k for k in KS if k <= horizon]
    print(f"\n{title}\n{'policy at swap':<30}" + "".join(f"{'k=' + str(k):>8}" for k in ks) + f"{'peak':>14}")
    results = {}
    for name, fn, scale in rows:
        c = base if (fn is None and scale == 1.0) else curve(make, args.n, args.mean, args.warm, fn, scale, horizon, args.seed)
        r = [x / b for x, b in zip(c, base)]
        peak = max(range(horizon), key=lambda i: r[i])
        results[name] = {"ratio": {str(k): r[k - 1] for k in ks}, "peak": r[peak], "peak_step": peak + 1}
        print(f"{name:<30}" + "".join(f"{r[k - 1]:8.2f}" for k in ks) + f"{r[peak]:8.2f} @{peak + 1:<4}")
    return results


def model_check(args, a, true):
    """opt-check's state-derived gradient model vs the true distribution (Adam rows)."""
    _, opt = steady(lambda ps: torch.optim.Adam(ps, lr=1.0), args.n, args.mean, args.warm, args.seed)
    fns = {
        f"attenuate: m*={a}, v kept": lambda o, ps: optim.apply_policy(o, ps, "attenuate", a),
        f"m*={a}, v*={a} (rejected)": lambda o, ps: optim._attenuate_both_moments(o, ps, a, 1),
        "reset": lambda o, ps: optim.apply_policy(o, ps, "reset"),
        "reset_step (Adam-Rel)": lambda o, ps: optim.apply_policy(o, ps, "reset_step"),
    }
    ks = [k for k in (1, 10, 50, 300) if k <= args.horizon]
    r = optim.update_size_ratios(opt.state_dict(), fns, steps=max(ks), sample=args.n, seed=args.seed)
    print("\nopt-check's model (gradients drawn from the state's own moments) vs the true distribution")
    print(f"{'policy':<30}" + "".join(f"{'k=' + str(k) + ' true/model':>18}" for k in ks))
    out = {}
    for name, v in r.items():
        t = true[name]["ratio"]
        print(f"{name:<30}" + "".join(f"{t[str(k)]:>12.2f} /{v[k - 1]:5.2f}" for k in ks))
        out[name] = {str(k): v[k - 1] for k in ks}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="coordinates")
    ap.add_argument("--warm", type=int, default=5000, help="steps to steady state before the swap")
    ap.add_argument("--mean", type=float, default=0.1, help="gradient mean (std 1: the SNR)")
    ap.add_argument("--attenuation", type=float, default=0.5)
    ap.add_argument("--horizon", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args()
    t0 = time.time()
    device = f"cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    print(f"device: {device}; {args.n} coordinates, gradients N({args.mean}, 1), {args.warm} warm-up steps; "
          "ratio = mean |update| / steady-state mean |update| (preserve, same draws)")
    adam = table("Adam (betas 0.9, 0.999; eps 1e-8)", adam_rows(args.attenuation),
                 lambda ps: torch.optim.Adam(ps, lr=1.0), args, args.horizon)
    sgd = table("SGD (momentum 0.9)", sgd_rows(args.attenuation),
                lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9), args, min(args.horizon, 50))
    check = model_check(args, args.attenuation, adam)
    print(f"\n({time.time() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "args": vars(args), "adam": adam, "sgd": sgd, "opt_check_model": check}, f, indent=2)


if __name__ == "__main__":
    main()
