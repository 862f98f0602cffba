# /// script
# requires-python = ">=3.10"
# dependencies = ["numpy>=1.24", "safetensors>=0.4"]
# ///
"""N different adapters from one trained adapter, for the many-adapter serving measurements (BENCHMARKS.md,
"Serving"): adapter i has the source's λ's times (1 + 0.1·ε) and its classifier head plus 0.01·ε, ε standard
normal from numpy's PCG64 seeded with i (deterministic). Every file keeps its own copy of pvera_A / pvera_B, as
PEFT saves them (save_projection=true); the config, pvera_task.json and labels.json are copied.

    python3 tools/make_adapter_variants.py SRC_ADAPTER_DIR OUT_ROOT --count 1000
    -> OUT_ROOT/a0000 ... OUT_ROOT/a0999
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=100)
    args = ap.parse_args()
    tensors = load_file(args.src / "adapter_model.safetensors")
    for i in range(args.count):
        d = args.out / f"a{i:04d}"
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.Generator(np.random.PCG64(i))
        out = {}
        for k in sorted(tensors):
            t = tensors[k]
            if "pvera_lambda" in k:
                t = (t * (1 + 0.1 * rng.standard_normal(t.shape))).astype(t.dtype)
            elif "classifier" in k:
                t = (t + 0.01 * rng.standard_normal(t.shape)).astype(t.dtype)
            out[k] = np.ascontiguousarray(t)
        save_file(out, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        for f in ("adapter_config.json", "pvera_task.json", "labels.json"):
            if (args.src / f).exists():
                shutil.copy(args.src / f, d / f)
    print(f"wrote {args.count} adapters under {args.out}")


if __name__ == "__main__":
    main()
