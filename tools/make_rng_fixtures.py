#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0"]
# ///
"""Write the bit-exact torch RNG fixture used by `crates/pvera/src/rng.rs`.

Usage:
    python3 tools/make_rng_fixtures.py            # writes the fixture
    uv run tools/make_rng_fixtures.py             # same, in a throwaway env

Output: `crates/pvera/tests/fixtures/rng/torch_rng.json`.

The script runs torch twice, each time in a fresh subprocess:
  * `avx2`    -- the CPU's native capability (AVX2 or AVX512; both run torch's
                 AVX2 kernel build, which contracts into FMA),
  * `default` -- under `ATEN_CPU_CAPABILITY=default` (the non-FMA, libm kernel).
When the native capability is AVX512 it also runs `ATEN_CPU_CAPABILITY=avx2`
and asserts that every record is identical to the native run.

Every case seeds one generator, applies a list of operations to it in order,
and records each operation's output plus the generator state afterwards:
  * `out`: `{"dtype", "numel", "sha256"}` (sha256 over the little-endian
    bytes) plus either all bit patterns (`bits`, numel <= 64) or the first and
    last 8 (`head`, `tail`).  f32 bits are u32 integers, f64/u64 are u64.
  * `<param>_bits`: the f64 bit pattern of each float parameter (`from`,
    `to`, `mean`, `std`, `p`), so readers need not parse decimals exactly.
  * `state_after`: sha256 of `Generator.get_state()` (5056 bytes) and the
    decoded `left`, `next` and cached normal samples (bit patterns or null).

Generators are `torch.Generator().manual_seed(seed)` (`"generator":
"explicit"`), or the default generator after `torch.manual_seed(seed)`
(`"generator": "default"`, used for the real `F.dropout` / `nn.Dropout`).
The dropout input is `x[i] = float32(((i % 17) - 8) * 0.5)`.

Nothing here needs numpy; tensor bytes are read with ctypes.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "crates" / "pvera" / "tests" / "fixtures" / "rng" / "torch_rng.json"

U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF
FULL_MAX = 64  # store every bit pattern up to this many elements
EDGE = 8  # otherwise store this many leading and trailing bit patterns
STATE_SIZE = 5056  # sizeof(CPUGeneratorImplState) in torch 2.x


# ----------------------------------------------------------------------------
# worker: runs inside a subprocess with a fixed ATEN_CPU_CAPABILITY
# ----------------------------------------------------------------------------


def worker() -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)

    def raw(t: "torch.Tensor") -> bytes:
        t = t.contiguous()
        n = t.numel() * t.element_size()
        return ctypes.string_at(t.data_ptr(), n) if n else b""

    def bits(t: "torch.Tensor") -> list[int]:
        t = t.contiguous().reshape(-1)
        if t.dtype == torch.float32:
            return [v & U32 for v in t.view(torch.int32).tolist()]
        if t.dtype in (torch.float64, torch.int64):
            return [v & U64 for v in t.view(torch.int64).tolist()]
        raise TypeError(t.dtype)

    def enc(t: "torch.Tensor", kind: str) -> dict:
        flat = t.contiguous().reshape(-1)
        rec = {"dtype": kind, "numel": flat.numel(), "sha256": hashlib.sha256(raw(flat)).hexdigest()}
        if flat.numel() <= FULL_MAX:
            rec["bits"] = bits(flat)
        else:
            rec["head"] = bits(flat[:EDGE])
            rec["tail"] = bits(flat[-EDGE:])
        return rec

    def state(g: "torch.Generator") -> dict:
        b = raw(g.get_state())
        assert len(b) == STATE_SIZE, len(b)
        seed, left, seeded, nxt = struct.unpack_from("<QiiQ", b, 0)
        off = 24 + 624 * 8
        _nx, ny, _rho, nvalid = struct.unpack_from("<dddi", b, off)
        fval = struct.unpack_from("<I", b, off + 32)[0]
        fvalid = b[off + 36]
        return {
            "sha256": hashlib.sha256(b).hexdigest(),
            "initial_seed": seed,
            "left": left,
            "next": nxt,
            "double_normal": struct.unpack("<Q", struct.pack("<d", ny))[0] if nvalid else None,
            "float_normal": fval if fvalid else None,
        }

    def dropout_input(n: int) -> "torch.Tensor":
        return torch.tensor([((i % 17) - 8) * 0.5 for i in range(n)], dtype=torch.float32)

    def run_op(g, op: dict, default_gen: bool) -> tuple[dict, "torch.Tensor"]:
        kind = op["op"]
        gen = None if default_gen else g
        extra: dict = {}
        if kind == "random64":
            t = torch.empty(op["n"], dtype=torch.int64).random_(-(2**63), None, generator=gen)
            rec = enc(t, "u64")
        elif kind == "kaiming":
            t = torch.empty(op["rows"], op["cols"], dtype=torch.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
                torch.nn.init.kaiming_uniform_(t, generator=gen)
            rec = enc(t, "f32")
        elif kind == "randn":
            t = torch.randn(op["n"], generator=gen)
            rec = enc(t, "f32")
        elif kind == "randn_f64":
            t = torch.randn(op["n"], generator=gen, dtype=torch.float64)
            rec = enc(t, "f64")
        elif kind == "rand":
            t = torch.rand(op["n"], generator=gen)
            rec = enc(t, "f32")
        elif kind in ("uniform_f32", "uniform_f64"):
            dt = torch.float32 if kind == "uniform_f32" else torch.float64
            t = torch.empty(op["n"], dtype=dt).uniform_(op["from"], op["to"], generator=gen)
            rec = enc(t, kind[-3:])
            lo = torch.tensor(op["from"], dtype=dt)
            hi = torch.tensor(op["to"], dtype=dt)
            extra["count_eq_from"] = int((t == lo).sum())
            if bool(lo < hi):
                assert int((t == hi).sum()) == 0, "uniform_ returned its upper bound"
        elif kind in ("normal_f32", "normal_f64"):
            dt = torch.float32 if kind == "normal_f32" else torch.float64
            t = torch.empty(op["n"], dtype=dt).normal_(op["mean"], op["std"], generator=gen)
            rec = enc(t, kind[-3:])
        elif kind == "bernoulli_f32":
            t = torch.empty(op["n"], dtype=torch.float32).bernoulli_(op["p"], generator=gen)
            rec = enc(t, "f32")
        elif kind == "dropout_f32":
            x = dropout_input(op["n"])
            p = op["p"]
            if default_gen:
                t = F.dropout(x, p, training=True)
            elif p == 0.0:
                t = x.clone()
            elif p == 1.0:
                t = x * torch.zeros((), dtype=torch.float32)
            else:
                # aten/src/ATen/native/Dropout.cpp `_dropout_impl`, with a generator
                noise = torch.empty_like(x).bernoulli_(1 - p, generator=g)
                noise.div_(1 - p)
                t = x * noise
            rec = enc(t, "f32")
        elif kind == "dropout_module_f32":
            assert default_gen
            m = torch.nn.Dropout(op["p"]).train()
            t = m(dropout_input(op["n"]))
            rec = enc(t, "f32")
        else:
            raise ValueError(kind)
        # exact float parameters (JSON readers may round decimal text differently)
        params = {f"{k}_bits": struct.unpack("<Q", struct.pack("<d", float(op[k])))[0]
                  for k in ("from", "to", "mean", "std", "p") if k in op}
        return {**op, **params, "out": rec, **extra}, t

    cases: list[dict] = []

    def case(name: str, seed: int, ops: list[dict], generator: str = "explicit") -> list:
        default_gen = generator == "default"
        if default_gen:
            torch.manual_seed(seed)
            g = torch.default_generator
        else:
            g = torch.Generator().manual_seed(seed)
        recs, tensors = [], []
        for op in ops:
            rec, t = run_op(g, op, default_gen)
            recs.append(rec)
            tensors.append(t)
        cases.append({"name": name, "seed": seed, "generator": generator, "ops": recs, "state_after": state(g)})
        return tensors

    def same(a, b) -> bool:
        return a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)

    # --- engine ------------------------------------------------------------
    for s in [0, 1, 5, 42, 2**31, 2**32 + 5, 2**63 - 1, 2**64 - 1, -1, -(2**63), 123456789, 67280421310721]:
        case(f"engine seed={s}", s, [{"op": "random64", "n": 8}])
    case("engine seed=0 across two regenerations", 0, [{"op": "random64", "n": 700}])

    # --- kaiming_uniform_ (PVeRA projections: A then B from one generator) ---
    r, dim = 4, 20
    pv = [{"op": "kaiming", "rows": 2 * r, "cols": dim}, {"op": "kaiming", "rows": dim, "cols": r}]
    pv_out = {}
    for s in [0, 1, 42, 2**32 + 5, 2**64 - 1, -1, 123456789]:
        pv_out[s] = case(f"pvera key={s} r=4 20x20", s, pv)
    a, b = pv_out[0]
    # the PVeRA example of docs/torch-rng.md §5 comes from the FMA (AVX2) kernel
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert same(a[0, :4], torch.tensor([-0.0041007004, 0.29382226, -0.4508004, -0.40309042])), a[0, :4]
        assert same(b[0, :4], torch.tensor([-0.23590457, -0.24046974, -1.0990248, -1.0574912])), b[0, :4]
    assert same(pv_out[2**32 + 5][0], case("pvera key=5 r=4 20x20", 5, pv)[0])
    case("kaiming seed=0 (16,50) then (100,8)", 0,
         [{"op": "kaiming", "rows": 16, "cols": 50}, {"op": "kaiming", "rows": 100, "cols": 8}])
    case("kaiming seed=42 (128,768) then (768,64)", 42,
         [{"op": "kaiming", "rows": 128, "cols": 768}, {"op": "kaiming", "rows": 768, "cols": 64}])
    for s in [0, 42]:
        case(f"kaiming seed={s} 1x1 twice", s,
             [{"op": "kaiming", "rows": 1, "cols": 1}, {"op": "kaiming", "rows": 1, "cols": 1}])
    z = case("kaiming zero-element tensors consume nothing", 0,
             [{"op": "kaiming", "rows": 0, "cols": 5}, pv[0], {"op": "kaiming", "rows": 5, "cols": 0}, pv[1]])
    assert same(z[1], pv_out[0][0]) and same(z[3], pv_out[0][1])
    case("kaiming seed=0 (512,4096) then (4096,256)", 0,
         [{"op": "kaiming", "rows": 512, "cols": 4096}, {"op": "kaiming", "rows": 4096, "cols": 256}])

    # --- randn ---------------------------------------------------------------
    for n in [1, 2, 7, 15, 16, 17, 31, 32, 33, 100, 1000]:
        case(f"randn seed=0 n={n}", 0, [{"op": "randn", "n": n}])
    for s in [42, 123456789]:
        for n in [15, 16, 17, 33]:
            case(f"randn seed={s} n={n}", s, [{"op": "randn", "n": n}])
    case("randn seed=1 n=262144", 1, [{"op": "randn", "n": 262144}])
    r11 = case("randn(1) twice", 0, [{"op": "randn", "n": 1}, {"op": "randn", "n": 1}])
    r2 = torch.randn(2, generator=torch.Generator().manual_seed(0))
    assert same(torch.cat(r11), r2)
    r111 = case("randn(1) three times seed=7", 7, [{"op": "randn", "n": 1}] * 3)
    assert same(torch.cat(r111), torch.randn(3, generator=torch.Generator().manual_seed(7)))
    case("mixed randn(7) rand(5) randn(1) randn(33) randn(1)", 0,
         [{"op": "randn", "n": 7}, {"op": "rand", "n": 5}, {"op": "randn", "n": 1},
          {"op": "randn", "n": 33}, {"op": "randn", "n": 1}])
    case("mixed cache across f64, kaiming, bernoulli", 42,
         [{"op": "randn", "n": 3}, {"op": "randn_f64", "n": 16}, {"op": "randn", "n": 1},
          {"op": "kaiming", "rows": 4, "cols": 4}, {"op": "randn_f64", "n": 3},
          {"op": "bernoulli_f32", "n": 10, "p": 0.5}, {"op": "randn", "n": 1}])
    for n in [1, 7, 15, 16, 17, 33, 100]:
        case(f"randn_f64 seed=0 n={n}", 0, [{"op": "randn_f64", "n": n}])

    # --- normal_(mean, std) ----------------------------------------------------
    for n, mean, std in [(10, 0.5, 2.0), (15, -1.25, 0.75), (16, 0.5, 2.0), (37, -1.25, 0.75),
                         (1000, 3.0, 0.1), (20, 0.0, 0.0)]:
        case(f"normal_f32 n={n} mean={mean} std={std}", 3, [{"op": "normal_f32", "n": n, "mean": mean, "std": std}])
    for n, mean, std in [(10, 0.5, 2.0), (15, -1.25, 0.75), (37, -1.25, 0.75), (1000, 3.0, 0.1)]:
        case(f"normal_f64 n={n} mean={mean} std={std}", 3, [{"op": "normal_f64", "n": n, "mean": mean, "std": std}])

    # scalar path (n < 16) with an inexact `z * std + mean`: pins whether it is fused
    for s in range(10, 18):
        case(f"normal_f64 seed={s} n=15 mean=1/3 std=0.1", s,
             [{"op": "normal_f64", "n": 15, "mean": 1 / 3, "std": 0.1}])
        case(f"normal_f32 seed={s} n=15 mean=1/3 std=0.1", s,
             [{"op": "normal_f32", "n": 15, "mean": 1 / 3, "std": 0.1}])

    # --- uniform_ ----------------------------------------------------------------
    u = case("uniform_f32 [1000,1001) 2^20 draws (clamp)", 0,
             [{"op": "uniform_f32", "n": 1 << 20, "from": 1000.0, "to": 1001.0}])
    assert int((u[0] == 1000.0).sum()) > 0
    bound = 0.34641016151377546
    for s, lo, hi in [(1, -3.0, 5.0), (1, -bound, bound), (2, 0.0, 1.0), (3, 1e-3, 2.5), (4, -1e6, -999999.5),
                      (5, 0.1, 0.1)]:
        case(f"uniform_f32 seed={s} [{lo},{hi})", s, [{"op": "uniform_f32", "n": 5000, "from": lo, "to": hi}])
    case("rand seed=2 n=1000", 2, [{"op": "rand", "n": 1000}])
    for s, lo, hi, n in [(0, 0.0, 1.0, 3000), (1, -2.0, 3.0, 3000), (0, 1000.0, 1001.0, 1 << 16)]:
        case(f"uniform_f64 seed={s} [{lo},{hi})", s, [{"op": "uniform_f64", "n": n, "from": lo, "to": hi}])

    # --- bernoulli_ and dropout --------------------------------------------------------
    for p in [0.3, 0.5, 0.9, 0.0, 1.0]:
        case(f"bernoulli_f32 seed=0 p={p}", 0, [{"op": "bernoulli_f32", "n": 1000, "p": p}])
    for s in [0, 42]:
        for p in [0.1, 0.5, 0.9, 0.0, 1.0]:
            mine = case(f"dropout_f32 seed={s} p={p} (bernoulli_ recipe, explicit generator)", s,
                        [{"op": "dropout_f32", "n": 1000, "p": p}])
            real = case(f"F.dropout seed={s} p={p} (after torch.manual_seed)", s,
                        [{"op": "dropout_f32", "n": 1000, "p": p}], generator="default")
            assert same(mine[0], real[0]), f"dropout recipe != F.dropout (seed {s}, p {p})"
            assert cases[-1]["state_after"]["sha256"] == cases[-2]["state_after"]["sha256"]
        case(f"nn.Dropout(0.25) seed={s} (after torch.manual_seed)", s,
             [{"op": "dropout_module_f32", "n": 1000, "p": 0.25}], generator="default")

    return {
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cases": cases,
    }


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------


def run_worker(capability: str | None) -> dict:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, __file__, "--worker"], env=env, check=True,
                          stdout=subprocess.PIPE)
    return json.loads(proc.stdout)


def main() -> None:
    if sys.argv[1:] == ["--worker"]:
        json.dump(worker(), sys.stdout)
        return
    native = run_worker(None)
    if native["cpu_capability"] not in ("AVX2", "AVX512"):
        sys.exit(f"native capability is {native['cpu_capability']}: the AVX2 kernel needs an AVX2/AVX512 CPU")
    checked = [native["cpu_capability"]]
    if native["cpu_capability"] == "AVX512":
        forced = run_worker("avx2")
        assert forced["cpu_capability"] == "AVX2", forced["cpu_capability"]
        assert forced["cases"] == native["cases"], "AVX2 and AVX512 capabilities disagree"
        checked.append("AVX2")
    default = run_worker("default")
    assert default["cpu_capability"] == "DEFAULT", default["cpu_capability"]
    assert default["torch_version"] == native["torch_version"]

    doc = {
        "generator": "tools/make_rng_fixtures.py",
        "torch_version": native["torch_version"],
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "dropout_input": "x[i] = float32(((i % 17) - 8) * 0.5)",
        "kernels": {
            "avx2": {
                "cpu_capability": native["cpu_capability"],
                "capabilities_checked_identical": checked,
                "cases": native["cases"],
            },
            "default": {
                "cpu_capability": default["cpu_capability"],
                "env": {"ATEN_CPU_CAPABILITY": "default"},
                "cases": default["cases"],
            },
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # one line per integer list keeps the file small and diffs readable
    text = re.sub(r"\[\s+([-0-9,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  json.dumps(doc, indent=1)) + "\n"
    OUT.write_text(text)
    n_cases = sum(len(k["cases"]) for k in doc["kernels"].values())
    print(f"wrote {OUT} ({len(text)} bytes, {n_cases} cases, torch {doc['torch_version']}, "
          f"capabilities {checked} + DEFAULT)")


if __name__ == "__main__":
    main()
