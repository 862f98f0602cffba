#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = []
# ///
"""PVeRA against VeRA on the README's two real tasks: the same recipe and budget, several seeds (docs/pvera-vs-vera.md).

    python3 tools/pvera_vs_vera.py run   --task spam   [--seeds 0,1,2] [--methods pvera,vera] [--out DIR] [--bin PATH]
    python3 tools/pvera_vs_vera.py run   --task fmnist [...]
    python3 tools/pvera_vs_vera.py table [--out DIR]

`run` trains one adapter per (method, seed) with `pvera train --method M --seed S --projection-prng-key S` (so the
seed moves the split, the shuffling, the head initialisation and the shared projections), then evaluates its best
adapter on held-out examples the split left unused with `pvera eval --held-out-of` (PVeRA: mean mode and 16 Monte
Carlo samples; VeRA: mean mode, the only one it has). Runs are sequential, under `nice -n 10`, with $PVERA_THREADS threads (default 1: on a shared, loaded 2-core machine
one thread per run wasted less time waiting at thread barriers than 2); a run whose
`metrics.json` and `eval/eval.json` exist is skipped, so an interrupted study resumes. Each run appends its flags, wall
times and the 1-minute load average before / after to `<out>/runs.jsonl`.

`table` prints, per task and method, held-out accuracy and NLL (mean ± sample standard deviation over the seeds),
ECE, the Monte Carlo figures for PVeRA, trainable parameters (the adapter's λ's, and PEFT's count with the head), and
wall times; then the paired difference PVeRA − VeRA per seed.

Assets: `python3 tools/fetch_assets.py --only minilm,spamassassin,dinov2s,fashion-mnist`; binary:
`cargo build --release -p pvera-cli`.
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

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("PVERA_ASSETS", REPO / ".cache" / "assets"))

# The recipes: the README's two real tasks, one budget for both methods.
TASKS = {
    "spam": {
        "train": [
            "--model", "{assets}/minilm", "--data", "{assets}/spamassassin/mails.jsonl",
            "--task", "text-classification", "--r", "256", "--target-modules", "query,value", "--pooling", "mean",
            "--train-size", "1000", "--max-length", "64", "--batch-size", "16", "--epochs", "3", "--lr", "2e-2",
            "--weight-decay", "0.01", "--eval-held-out", "300",
        ],
        "eval": ["--model", "{assets}/minilm", "--data", "{assets}/spamassassin/mails.jsonl", "--limit", "300"],
    },
    "fmnist": {
        "train": [
            "--model", "{assets}/dinov2s", "--data", "{assets}/fashion-mnist", "--task", "image-classification",
            "--r", "256", "--target-modules", "query,value", "--pooling", "cls-mean-patch", "--train-size", "500",
            "--batch-size", "16", "--epochs", "2", "--lr", "1e-2", "--warmup-ratio", "0.1", "--weight-decay", "0.01",
            "--eval-held-out", "100",
        ],
        # 100 held-out images: Monte Carlo with 16 samples on DINOv2-S costs seconds per image on one core
        "eval": ["--model", "{assets}/dinov2s", "--data", "{assets}/fashion-mnist", "--limit", "100"],
    },
}
THREADS = os.environ.get("PVERA_THREADS", "1")
MC_SAMPLES = "16"


def loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def fill(args: list[str]) -> list[str]:
    return [a.replace("{assets}", str(ASSETS)) for a in args]


def timed(cmd: list[str]) -> tuple[float, float, float]:
    before, t0 = loadavg(), time.perf_counter()
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(["nice", "-n", "10", *cmd], check=True)
    return time.perf_counter() - t0, before, loadavg()


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = TASKS[args.task]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            d = out / f"{args.task}-{method}-s{seed}"
            if (d / "metrics.json").is_file() and (d / "eval" / "eval.json").is_file():
                print(f"skip {d.name}: done")
                continue
            train = [args.bin, "train", "--method", method, "--seed", str(seed), "--projection-prng-key", str(seed),
                     "--threads", THREADS, "--output", str(d), "--overwrite", *fill(task["train"])]
            t_train, l0, l1 = timed(train)
            ev = [args.bin, "eval", "--adapter", str(d / "best"), "--held-out-of", str(d), "--seed", str(seed),
                  "--threads", THREADS, "--output", str(d / "eval"), *fill(task["eval"])]
            if method == "pvera":
                ev += ["--samples", MC_SAMPLES]
            t_eval, l2, l3 = timed(ev)
            row = {"task": args.task, "method": method, "seed": seed, "dir": str(d), "train_cmd": train,
                   "eval_cmd": ev, "train_process_s": t_train, "eval_process_s": t_eval,
                   "load_before_train": l0, "load_after_train": l1, "load_before_eval": l2, "load_after_eval": l3}
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


def lambda_params(adapter: Path) -> int:
    """Values of the adapter's λ tensors (read from the safetensors header)."""
    raw = adapter.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    total = 0
    for k, v in header.items():
        if "_lambda_" in k:
            c = 1
            for s in v["shape"]:
                c *= s
            total += c
    return total


def ms(xs: list[float], digits: int = 4) -> str:
    if not xs:
        return "-"
    m = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def table(args) -> int:
    out = Path(args.out)
    rows = {}
    loads = {}
    if (out / "runs.jsonl").is_file():
        for line in (out / "runs.jsonl").read_text().splitlines():
            r = json.loads(line)
            loads[(r["task"], r["method"], r["seed"])] = r
    for d in sorted(out.iterdir()):
        if not (d / "metrics.json").is_file() or not (d / "eval" / "eval.json").is_file():
            continue
        task, method, seed = d.name.rsplit("-", 2)
        m = json.loads((d / "metrics.json").read_text())
        e = json.loads((d / "eval" / "eval.json").read_text())
        rows.setdefault((task, method), []).append({
            "seed": int(seed[1:]),
            "acc": e["mean_mode"]["accuracy"], "nll": e["mean_mode"]["nll"], "ece": e["mean_mode"]["ece"],
            "brier": e["mean_mode"]["brier"],
            "mc_acc": (e.get("monte_carlo") or {}).get("accuracy"), "mc_nll": (e.get("monte_carlo") or {}).get("nll"),
            "mc_ece": (e.get("monte_carlo") or {}).get("ece"),
            "mi": (e.get("monte_carlo_extra") or {}).get("mean_mutual_information"),
            "width": (e.get("monte_carlo_extra") or {}).get("mean_interval_width"),
            "train_acc_heldout": (m.get("eval") or {}).get("accuracy"),
            "val_acc": max((x.get("val_accuracy") or 0) for x in m["epochs"]),
            "trainable": m["trainable"], "lambdas": lambda_params(d / "best" / "adapter_model.safetensors"),
            "train_s": m["seconds"], "wall_s": m["wall_seconds"], "eval_s": e["seconds"], "n": e["examples"],
            "load": loads.get((task, method, int(seed[1:])), {}),
        })
    print("| task | method | seeds | held-out accuracy | NLL | ECE | Brier | MC accuracy | MC NLL | MC ECE | λ values "
          "| trainable (with head) | train s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (task, method), rs in sorted(rows.items()):
        rs.sort(key=lambda r: r["seed"])
        g = lambda k: [r[k] for r in rs if r[k] is not None]  # noqa: E731
        trainable = rs[0]["trainable"].split("||")[0].replace("trainable params:", "").strip()
        print(f"| {task} | {method} | {','.join(str(r['seed']) for r in rs)} | {ms(g('acc'))} | {ms(g('nll'))} | "
              f"{ms(g('ece'))} | {ms(g('brier'))} | {ms(g('mc_acc'))} | {ms(g('mc_nll'))} | {ms(g('mc_ece'))} | "
              f"{rs[0]['lambdas']:,} | {trainable} | {ms(g('train_s'), 0)} | {ms(g('eval_s'), 0)} |")
    print()
    print("| task | seed | accuracy PVeRA − VeRA | NLL PVeRA − VeRA | PVeRA MC NLL − VeRA NLL | load before/after train |")
    print("|---|---|---|---|---|---|")
    for task in sorted({t for t, _ in rows}):
        p = {r["seed"]: r for r in rows.get((task, "pvera"), [])}
        v = {r["seed"]: r for r in rows.get((task, "vera"), [])}
        da, dn = [], []
        for s in sorted(set(p) & set(v)):
            a = p[s]["acc"] - v[s]["acc"]
            n = p[s]["nll"] - v[s]["nll"]
            da.append(a)
            dn.append(n)
            mc = "-" if p[s]["mc_nll"] is None else f"{p[s]['mc_nll'] - v[s]['nll']:+.4f}"
            lp, lv = p[s]["load"], v[s]["load"]
            load = (f"{lp.get('load_before_train', '?')}→{lp.get('load_after_train', '?')} / "
                    f"{lv.get('load_before_train', '?')}→{lv.get('load_after_train', '?')}")
            print(f"| {task} | {s} | {a:+.4f} | {n:+.4f} | {mc} | {load} |")
        if da:
            print(f"| {task} | mean ± sd | {ms(da)} | {ms(dn)} | | |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--task", choices=sorted(TASKS), required=True)
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--methods", default="pvera,vera")
    r.add_argument("--out", default=str(REPO / ".cache" / "runs" / "pvera-vs-vera"))
    r.add_argument("--bin", default=str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "pvera"))
    t = sub.add_parser("table")
    t.add_argument("--out", default=str(REPO / ".cache" / "runs" / "pvera-vs-vera"))
    args = ap.parse_args(argv)
    return run(args) if args.cmd == "run" else table(args)


if __name__ == "__main__":
    sys.exit(main())
