# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "transformers>=5"]
# ///
"""Golden values for the `pvera::train` module, produced by PyTorch and transformers.

    python3 tools/make_train_fixtures.py            # writes the fixture
    uv run tools/make_train_fixtures.py             # same, in a throwaway env

Output: `crates/pvera/tests/fixtures/train/torch_train.json` with

* `adamw`: cases of `torch.optim.AdamW` (single-tensor CPU path, the default on CPU) driven by fixed gradients.
  Every case lists its hyper-parameters, the initial parameters, and per step: the learning rate set in the
  param group, the micro-batch gradients of each parameter (`null` where a parameter got no gradient), the
  gradient accumulation (`p.grad` is the sum of `g_i / k` over the k micro-batches, as `(loss / k).backward()`
  would leave it), the `max_norm` given to `torch.nn.utils.clip_grad_norm_` (or null), the norm it returned,
  and every parameter after `optimizer.step()`. At the end: the optimizer state (`step`, `exp_avg`,
  `exp_avg_sq`) of every parameter. f32 values are stored as their IEEE bit patterns (u32).
* `schedules`: `transformers.get_{constant,linear,cosine}_schedule_with_warmup` on an SGD optimizer with base lr
  0.3: the lr in the param group before each optimizer step (steps 0..total+2) and `lr_lambda(step)`, as f64
  bit patterns (u64) and readable values.
* `randperm`: `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` for a few (n, seed), the order
  `pvera::train::shuffled_indices(n, seed, epoch)` reproduces with seed + epoch.
"""

from __future__ import annotations

import json
import platform
import struct
import zlib
from pathlib import Path

import torch
import transformers
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "crates" / "pvera" / "tests" / "fixtures" / "train" / "torch_train.json"


def f32_bits(t: torch.Tensor) -> list[int]:
    t = t.detach().to(torch.float32).contiguous().flatten()
    return [v & 0xFFFFFFFF for v in t.view(torch.int32).tolist()]


def f64_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def adamw_case(name, *, lr, betas, eps, weight_decay, shapes, steps, accum, max_norm, grad_scale, missing, lrs=None):
    """`missing`: {param index: [steps without a gradient]}; `lrs`: per-step lr (default: `lr` every step)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    record = {
        "name": name,
        "lr": lr,
        "betas": list(betas),
        "eps": eps,
        "weight_decay": weight_decay,
        "shapes": [list(s) for s in shapes],
        "names": [f"p{i}" for i in range(len(shapes))],
        "initial": [f32_bits(p) for p in params],
        "steps": [],
    }
    for step in range(steps):
        step_lr = lrs[step] if lrs is not None else lr
        for group in opt.param_groups:
            group["lr"] = step_lr
        opt.zero_grad(set_to_none=True)
        micro = []
        for _ in range(accum):
            row = []
            for i, p in enumerate(params):
                gi = torch.randn(p.shape, generator=g) * grad_scale
                if step in missing.get(i, []):
                    row.append(None)
                    continue
                row.append(f32_bits(gi))
                scaled = gi / accum
                if p.grad is None:
                    p.grad = scaled.clone()
                else:
                    p.grad += scaled
            micro.append(row)
        norm = None
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
            norm = f32_bits(norm)[0]
        opt.step()
        record["steps"].append(
            {"lr": step_lr, "micro_grads": micro, "max_norm": max_norm, "norm_bits": norm,
             "params": [f32_bits(p) for p in params]}
        )
    state = []
    for p in params:
        s = opt.state.get(p, {})
        if not s:
            state.append(None)
            continue
        state.append({"step": int(s["step"].item()), "exp_avg": f32_bits(s["exp_avg"]),
                      "exp_avg_sq": f32_bits(s["exp_avg_sq"])})
    record["state"] = state
    return record


def schedules():
    out = []
    makers = {
        "constant": lambda o, w, t: get_constant_schedule_with_warmup(o, w),
        "linear": lambda o, w, t: get_linear_schedule_with_warmup(o, w, t),
        "cosine": lambda o, w, t: get_cosine_schedule_with_warmup(o, w, t),
    }
    for kind, make in makers.items():
        for warmup, total in [(0, 10), (3, 10), (5, 5), (4, 13), (10, 7), (1, 1), (0, 1), (7, 100)]:
            p = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.SGD([p], lr=0.3)
            sched = make(opt, warmup, total)
            lrs, factors = [], []
            for step in range(total + 3):
                lrs.append(opt.param_groups[0]["lr"])
                factors.append(sched.lr_lambdas[0](step))
                opt.step()
                sched.step()
            out.append({
                "kind": kind, "warmup": warmup, "total": total, "base_lr": 0.3,
                "lr": lrs, "lr_bits": [f64_bits(x) for x in lrs],
                "factor": factors, "factor_bits": [f64_bits(float(x)) for x in factors],
            })
    return out


def randperms():
    out = []
    for n, seed in [(10, 0), (17, 42), (1, 5), (0, 3), (2, 1), (100, 2**40 + 7), (1000, 12345)]:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        out.append({"n": n, "seed": seed, "perm": perm})
    return out


def main():
    torch.set_num_threads(1)
    adamw = [
        adamw_case("default_clip", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                   shapes=[(7,), (3, 5)], steps=6, accum=1, max_norm=1.0, grad_scale=3.0, missing={}),
        adamw_case("big_lr_no_wd_missing_grads", lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0,
                   shapes=[(4,), (2, 3), (5,)], steps=5, accum=1, max_norm=None, grad_scale=1.0,
                   missing={2: [0, 3]}),
        adamw_case("accum3_schedule_clip", lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                   shapes=[(6,), (8,)], steps=5, accum=3, max_norm=0.5, grad_scale=0.7, missing={},
                   lrs=[0.0, 0.005, 0.01, 0.0075, 0.0025]),
        adamw_case("tiny_grads_clip_inactive", lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                   shapes=[(10,)], steps=4, accum=2, max_norm=100.0, grad_scale=1e-4, missing={}),
    ]
    doc = {
        "generator": "tools/make_train_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "adamw": adamw,
        "schedules": schedules(),
        "randperm": randperms(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
