# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "peft==0.21.2", "transformers", "safetensors", "numpy"]
# ///
"""Side-by-side benchmark: `pvera bench` against PyTorch + PEFT on the same model, inputs, r,
targets, batch and thread count, in alternating rounds (pvera, PEFT, pvera, PEFT, ...).

    cargo build --release -p pvera-cli
    python3 tools/bench_peft.py --preset minilm --rounds 3 --threads 2
    python3 tools/bench_peft.py --preset dinov2s --rounds 3 --threads 2
    python3 tools/bench_peft.py --preset tiny --rounds 1            # smoke run on a test fixture

Prints one table (median over rounds of each round's median) with the ratio PEFT/pvera
(> 1: pvera faster / smaller) and writes the raw figures to `<out>/results.json`.

Measured per round, each side in its own process:
- eval forward, mean path, unmerged;  eval forward, merged;
- training step on a fresh adapter: forward (sampling), cross-entropy, backward, AdamW;
- MC prediction, 16 samples (pvera: one batch of S x inputs; PEFT: 16 forward passes, the
  way PEFT offers it: `sample_at_inference` on, a loop);
- cold start: process start -> import / load model + adapter -> one prediction (1 example) -> exit;
- peak RSS (`wait4` of each process): cold start and the whole bench process.
The fp32 GEMM peak is measured on both sides (candle and torch, square `--gemm-size`).

The PEFT worker mode (`--worker`, `--cold`) is what this script runs in its subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / ".cache" / "assets"

PRESETS = {
    "minilm": dict(model=ASSETS / "minilm", kind="text", batch=16, seq=128, r=256, targets="query,value",
                   pooling="mean", reps=3),
    "dinov2s": dict(model=ASSETS / "dinov2s", kind="image", batch=8, image=224, r=256, targets="q_proj,v_proj",
                    pooling="cls-mean-patch", reps=3),
    "tiny": dict(model=ROOT / "crates/pvera/tests/fixtures/models/bert_tiny/model", kind="text", batch=4, seq=16,
                 r=16, targets="query,value", pooling="mean", reps=3),
}

ROWS = [
    ("eval", "eval forward (mean, unmerged)"),
    ("merged", "eval forward (merged)"),
    ("train", "training step (sample, loss, backward, AdamW)"),
    ("mc", "MC prediction, 16 samples"),
    ("cold", "cold start to first prediction"),
]


# ---------------------------------------------------------------- PEFT side (worker processes)

def _torch_setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    return torch


def _load_inputs(path: Path):
    from safetensors.torch import load_file

    t = load_file(str(path))
    labels = t.pop("labels")
    return t, labels


def _classifier(torch, base, width: int, num_labels: int, pooling: str):
    nn = torch.nn

    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.classifier = nn.Linear(width, num_labels)

        def forward(self, **inputs):
            h = self.base(**inputs).last_hidden_state
            if pooling == "mean":
                m = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            elif pooling == "cls-mean-patch":
                pooled = torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1)
            else:
                pooled = h[:, 0]
            return self.classifier(pooled)

    return Clf()


def _load_base(model_dir: Path):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(model_dir)
    # pvera's models have no dropout: train both sides on the same computation.
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    base = AutoModel.from_pretrained(model_dir, config=cfg)
    return base, cfg


def _peft_inference(torch, a):
    from peft import PeftModel

    base, cfg = _load_base(Path(a.model))
    width = cfg.hidden_size * (2 if a.pooling == "cls-mean-patch" else 1)
    torch.manual_seed(0)
    clf = _classifier(torch, base, width, 2, a.pooling)
    pm = PeftModel.from_pretrained(clf, a.adapter, adapter_name="default", is_trainable=False)
    pm.eval()
    return pm, cfg


def _set_sampling(pm, on: bool):
    for m in pm.modules():
        if hasattr(m, "sample_at_inference") and isinstance(m.sample_at_inference, dict):
            for k in m.sample_at_inference:
                m.sample_at_inference[k] = on


def _timed(fn, warmup: int, reps: int):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def worker(a) -> None:
    torch = _torch_setup(a.threads)
    import torch.nn.functional as F
    from peft import PveraConfig, get_peft_model

    inputs, labels = _load_inputs(Path(a.inputs))
    res = {}
    what = a.what.split(",")
    pm, cfg = _peft_inference(torch, a)
    with torch.inference_mode():
        if "eval" in what:
            res["eval"] = _timed(lambda: pm(**inputs), a.warmup, a.reps)
        if "merged" in what:
            pm.merge_adapter()
            res["merged"] = _timed(lambda: pm(**inputs), a.warmup, a.reps)
            pm.unmerge_adapter()
        if "mc" in what:
            _set_sampling(pm, True)

            def mc():
                probs = [torch.softmax(pm(**inputs), dim=-1) for _ in range(a.mc_samples)]
                return torch.stack(probs).mean(0)

            res["mc"] = _timed(mc, a.warmup, a.reps)
            _set_sampling(pm, False)
    del pm
    if "train" in what:
        base, cfg = _load_base(Path(a.model))
        width = cfg.hidden_size * (2 if a.pooling == "cls-mean-patch" else 1)
        torch.manual_seed(0)
        clf = _classifier(torch, base, width, 2, a.pooling)
        pcfg = PveraConfig(r=a.r, target_modules=a.targets.split(","), modules_to_save=["classifier"])
        tm = get_peft_model(clf, pcfg)
        tm.train()
        opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)

        def step():
            logits = tm(**inputs)
            loss = F.cross_entropy(logits, labels.long())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        res["train"] = _timed(step, a.warmup, a.reps)
    if "gemm" in what:
        n = a.gemm_size
        x = torch.randn(n, n)
        y = torch.randn(n, n)
        res["gemm"] = _timed(lambda: x @ y, max(a.warmup, 1), max(a.reps, 3))
    Path(a.json).write_text(json.dumps({"times_ms": res, "threads": torch.get_num_threads()}, indent=2) + "\n")


def cold(a) -> None:
    torch = _torch_setup(a.threads)
    inputs, _ = _load_inputs(Path(a.inputs))
    one = {k: v[:1] for k, v in inputs.items()}
    pm, _ = _peft_inference(torch, a)
    with torch.inference_mode():
        p = torch.softmax(pm(**one), dim=-1)
    print("cold prediction:", p.flatten().tolist())


# ---------------------------------------------------------------- driver

def prepare(p: dict, out: Path, threads: int) -> tuple[Path, Path]:
    """PEFT writes the adapter (r, targets; small random λ_b so the adapter path is not zero) and
    the inputs file both sides read."""
    torch = _torch_setup(threads)
    from peft import PveraConfig, get_peft_model
    from safetensors.torch import save_file

    adapter = out / "adapter"
    inputs = out / "inputs.safetensors"
    base, cfg = _load_base(Path(p["model"]))
    g = torch.Generator().manual_seed(0)
    if p["kind"] == "text":
        b, s = p["batch"], p["seq"]
        ids = torch.randint(1000 if cfg.vocab_size > 2000 else 1, cfg.vocab_size, (b, s), generator=g)
        ids[:, 0] = 101 if cfg.vocab_size > 2000 else 1
        t = {"input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long)}
    else:
        b = p["batch"]
        t = {"pixel_values": torch.randn(b, 3, p["image"], p["image"], generator=g)}
    t["labels"] = torch.arange(b) % 2
    save_file({k: v.contiguous() for k, v in t.items()}, str(inputs))
    pm = get_peft_model(base, PveraConfig(r=p["r"], target_modules=p["targets"].split(",")))
    with torch.no_grad():
        for n, prm in pm.named_parameters():
            if "pvera_lambda_b" in n:
                prm.copy_(0.01 * torch.randn(prm.shape, generator=g))
    pm.save_pretrained(str(adapter))
    return adapter, inputs


def run_measured(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """Runs `cmd`; returns wall seconds, peak RSS (bytes) of that process, and stdout."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = "", ""
    # wait4 gives this child's own rusage (ru_maxrss in KiB on Linux).
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{err}\n{out}")
    return wall, ru.ru_maxrss * 1024, out


def med(v):
    return statistics.median(v) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="minilm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mc-samples", type=int, default=16)
    ap.add_argument("--mc-batch", type=int, default=None,
                    help="pvera: Monte Carlo samples per batched forward (default: what `pvera predict` does)")
    ap.add_argument("--gemm-size", type=int, default=2048)
    ap.add_argument("--what", default="eval,merged,train,mc,gemm")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--pvera", default=str(Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "pvera"))
    ap.add_argument("--out", default=None, help="work directory (default: .cache/bench/<preset>)")
    # worker modes
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--pooling", help=argparse.SUPPRESS)
    ap.add_argument("--r", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--targets", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.cold:
        return cold(a)
    if a.prepare:
        prepare(PRESETS[a.prepare], Path(a.out), a.threads)
        return None

    p = PRESETS[a.preset]
    reps = a.reps or p["reps"]
    out = Path(a.out or ROOT / ".cache" / "bench" / a.preset)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(a.pvera).exists():
        raise SystemExit(f"{a.pvera} not found: cargo build --release -p pvera-cli (or pass --pvera)")
    # The driver never imports torch: a forked child inherits the parent's RSS high-water mark,
    # so the PEFT side prepares the adapter and inputs in its own process.
    adapter, inputs = out / "adapter", out / "inputs.safetensors"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--prepare", a.preset, "--out", str(out),
                    "--threads", str(a.threads)], check=True, stdout=subprocess.DEVNULL)
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(a.threads)
    env["OMP_NUM_THREADS"] = str(a.threads)
    env["MKL_NUM_THREADS"] = str(a.threads)
    common = ["--model", str(p["model"]), "--adapter", str(adapter), "--inputs", str(inputs), "--pooling", p["pooling"]]
    pv_cmd = [a.pvera, "bench", *common, "--r", str(p["r"]), "--target-modules", p["targets"], "--what", a.what,
              "--reps", str(reps), "--warmup", str(a.warmup), "--mc-samples", str(a.mc_samples),
              *(["--mc-batch", str(a.mc_batch)] if a.mc_batch else []), "--gemm-size", str(a.gemm_size), "--threads", str(a.threads)]
    py_cmd = [sys.executable, str(Path(__file__).resolve()), *common, "--r", str(p["r"]), "--targets", p["targets"],
              "--what", a.what, "--reps", str(reps), "--warmup", str(a.warmup), "--mc-samples", str(a.mc_samples),
              "--gemm-size", str(a.gemm_size), "--threads", str(a.threads)]

    runs = {"pvera": [], "peft": []}
    loads = []
    for rnd in range(a.rounds):
        loads.append(os.getloadavg()[0])
        for side in ("pvera", "peft"):
            j = out / f"{side}_{rnd}.json"
            cmd = (pv_cmd if side == "pvera" else py_cmd + ["--worker"]) + ["--json", str(j)]
            wall, rss, _ = run_measured(cmd, env)
            r = json.loads(j.read_text())
            r["rss_bench"] = rss
            if not a.no_cold:
                ccmd = [a.pvera, "bench", *common, "--cold", "--threads", str(a.threads)] if side == "pvera" \
                    else py_cmd + ["--cold"]
                cw, crss, _ = run_measured(ccmd, env)
                r["cold_ms"] = cw * 1e3
                r["rss_cold"] = crss
            runs[side].append(r)
            print(f"round {rnd + 1}/{a.rounds} {side}: done ({wall:.1f} s)", file=sys.stderr, flush=True)
    loads.append(os.getloadavg()[0])

    def per_round(side, key):
        vals = []
        for r in runs[side]:
            if key == "cold":
                if "cold_ms" in r:
                    vals.append(r["cold_ms"])
            elif key in r["times_ms"]:
                vals.append(med(r["times_ms"][key]))
        return vals

    flops = json.loads((out / "pvera_0.json").read_text())
    fb, fu = flops["flops_forward_base"], flops["flops_forward_unmerged"]
    gemm_pv = med(per_round("pvera", "gemm"))
    gemm_pt = med(per_round("peft", "gemm"))
    peak = 2 * a.gemm_size ** 3 / 1e6  # MFLOP -> GFLOP/s when divided by ms
    gemm_pv_gf = peak / gemm_pv if gemm_pv == gemm_pv else float("nan")
    gemm_pt_gf = peak / gemm_pt if gemm_pt == gemm_pt else float("nan")
    flop_of = {"eval": fu, "merged": fb, "mc": a.mc_samples * fu}

    lines = []
    lines.append(f"preset {a.preset}: {p['model'].name}, batch {p['batch']}"
                 + (f"x{p['seq']}" if p["kind"] == "text" else f", {p['image']}x{p['image']}")
                 + f", r={p['r']}, targets {p['targets']}, threads {a.threads}, {a.rounds} rounds x {reps} reps"
                 + f"; load avg (1 min) during rounds: {', '.join(f'{x:.2f}' for x in loads)}")
    lines.append("")
    lines.append("| measurement | pvera ms | PEFT ms | PEFT/pvera | pvera GFLOP/s (% of candle GEMM peak) | PEFT GFLOP/s (% of torch GEMM peak) |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for key, label in ROWS:
        pv, pt = med(per_round("pvera", key)), med(per_round("peft", key))
        ratio = pt / pv if pv and pv == pv and pt == pt else float("nan")
        summary[key] = {"pvera_ms": pv, "peft_ms": pt, "ratio": ratio}
        if key in flop_of:
            f = flop_of[key]
            gpv = f / pv / 1e6
            gpt = f / pt / 1e6
            gf = f"{gpv:.1f} ({100 * gpv / gemm_pv_gf:.0f} %) | {gpt:.1f} ({100 * gpt / gemm_pt_gf:.0f} %)"
        else:
            gf = "- | -"
        lines.append(f"| {label} | {pv:.1f} | {pt:.1f} | {ratio:.2f}x | {gf} |")
    for key, label in (("rss_cold", "peak RSS, cold start (MiB)"), ("rss_bench", "peak RSS, whole bench process (MiB)")):
        pv = med([r[key] for r in runs["pvera"] if key in r]) / 2**20
        pt = med([r[key] for r in runs["peft"] if key in r]) / 2**20
        summary[key] = {"pvera_mib": pv, "peft_mib": pt, "ratio": pv / pt if pt else float("nan")}
        lines.append(f"| {label} | {pv:.0f} | {pt:.0f} | pvera/PEFT {pv / pt:.2f}x | - | - |")
    lines.append(f"| fp32 GEMM {a.gemm_size}^3 (peak) | {gemm_pv:.1f} | {gemm_pt:.1f} | {gemm_pt / gemm_pv:.2f}x | "
                 f"{gemm_pv_gf:.1f} | {gemm_pt_gf:.1f} |")
    lines.append("")
    lines.append(f"forward FLOPs per pass: base {fb / 1e9:.2f} GFLOP, with the unmerged adapter {fu / 1e9:.2f} GFLOP")
    text = "\n".join(lines)
    print(text)
    (out / "results.json").write_text(json.dumps({"preset": a.preset, "loads": loads, "runs": runs,
                                                  "summary": summary, "table": text}, indent=2) + "\n")


if __name__ == "__main__":
    main()
