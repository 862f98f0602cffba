#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "peft==0.21.2", "transformers>=5", "safetensors>=0.4", "numpy>=1.24"]
# ///
"""Real-model parity through the server: a PEFT classifier adapter on all-MiniLM-L6-v2, served by `pvera serve`.

    python3 tools/fetch_assets.py --only minilm          # once
    cargo build --release -p pvera-cli                   # target/release/pvera
    python3 tools/real_serve_check.py [--method vera|pvera] [--cache DIR] [--pvera PATH] [--tol 1e-4]

PEFT side (torch 2.15, peft 0.21.2, transformers 5): `BertForSequenceClassification` from the MiniLM checkpoint
(float32, eval, eager attention; its pooler comes from the checkpoint, the 3-label `classifier` is drawn from
torch.manual_seed(0) and its weight scaled by 40, so the probabilities are far from uniform), wrapped with `VeraConfig` (or `PveraConfig`) `task_type="SEQ_CLS"`, r 16 on query/value,
`init_weights=False` (λ_b = 1, λ_d ~ N(0, 1): the adapter moves the output), projection key 0; PEFT adds the
classifier to `modules_to_save`. `save_pretrained` writes the adapter (with the classifier) under
`<cache>/real_serve_check/<method>/adapter`. PEFT's class probabilities, softmax of the logits in eval mode (PVeRA:
the mean path, no sampling), for 6 texts of different lengths, each tokenised alone (no padding).

Server side: `pvera serve --model <minilm> --adapter clf=<adapter>` on 127.0.0.1 (a free port), one
`POST /classify` with the 6 texts (mean mode), then SIGTERM. pvera reads the task from the adapter itself
(`task_type` SEQ_CLS and `auto_mapping` BertForSequenceClassification: the pooler's output feeds the head). Every
probability must be within --tol of PEFT's. Prints a table and `N passed, M failed`; exit 0 when all passed, 1
otherwise, 3 when an asset or the binary is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("PVERA_ASSETS", REPO / ".cache" / "assets"))
DEFAULT_PVERA = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "pvera"
TEXTS = [
    "WIN a FREE cruise!!! Click here to claim your prize now",
    "Minutes of the Tuesday meeting are attached, see you at lunch",
    "ok",
    "Your account statement for November is ready; log in to view it, or reply to this message with questions "
    "about the charges listed there",
    "cheap meds",
    "Re: the build broke again after the merge, can you look at the failing test before the release?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peft_side(model_dir: Path, work: Path, method: str) -> list[list[float]]:
    import torch
    from peft import PveraConfig, VeraConfig, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=3, attn_implementation="eager")
    base.eval()
    with torch.no_grad():  # a head with large logits, so a wrong pooling or adapter shows in the probabilities
        base.classifier.weight.mul_(40.0)
    cls = {"vera": VeraConfig, "pvera": PveraConfig}[method]
    cfg = cls(task_type="SEQ_CLS", r=16, target_modules=["query", "value"], init_weights=False, projection_prng_key=0)
    torch.manual_seed(0)
    pm = get_peft_model(base, cfg)
    pm.eval()
    adapter = work / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    pm.save_pretrained(adapter)
    (adapter / "README.md").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    moved = 0.0
    with torch.no_grad():
        for t in TEXTS:
            enc = tok(t, return_tensors="pt")
            p = torch.softmax(pm(**enc).logits[0].double(), -1)
            with pm.disable_adapter():
                q = torch.softmax(pm(**enc).logits[0].double(), -1)
            moved = max(moved, float((p - q).abs().max()))
            out.append(p.tolist())
    print(f"PEFT: the adapter moves the probabilities by up to {moved:.3f} (so a server that ignored it would fail)")
    return out


def server_side(pvera: Path, model_dir: Path, adapter: Path, work: Path) -> list[list[float]]:
    port = free_port()
    log = open(work / "serve.log", "w")
    p = subprocess.Popen([str(pvera), "serve", "--model", str(model_dir), "--adapter", f"clf={adapter}", "--port", str(port),
                          "--threads", "2"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if p.poll() is not None or time.time() - t0 > 120:
                    raise SystemExit(f"pvera serve did not start; see {work / 'serve.log'}")
                time.sleep(0.2)
        req = urllib.request.Request(url + "/classify", data=json.dumps({"inputs": TEXTS}).encode(),
                                     headers={"Content-Type": "application/json"})
        body = json.loads(urllib.request.urlopen(req, timeout=120).read())
        return [r["mean_mode"]["probs"] for r in body["predictions"]]
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="vera", choices=["vera", "pvera"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--pvera", type=Path, default=DEFAULT_PVERA)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args(argv)
    model_dir = a.cache / "minilm"
    if not (model_dir / "model.safetensors").is_file():
        print(f"missing {model_dir}: python3 tools/fetch_assets.py --only minilm", file=sys.stderr)
        return 3
    if not a.pvera.is_file():
        print(f"missing {a.pvera}: cargo build --release -p pvera-cli", file=sys.stderr)
        return 3
    work = a.cache / "real_serve_check" / a.method
    work.mkdir(parents=True, exist_ok=True)
    want = peft_side(model_dir, work, a.method)
    got = server_side(a.pvera, model_dir, work / "adapter", work)
    rows, failed = [], 0
    for t, w, g in zip(TEXTS, want, got):
        d = max(abs(x - y) for x, y in zip(w, g))
        ok = d <= a.tol
        failed += not ok
        rows.append({"text": t[:40], "peft": [round(x, 6) for x in w], "serve": [round(x, 6) for x in g], "max_abs_diff": d, "ok": ok})
        print(f"{'PASS' if ok else 'FAIL'}  {d:.2e}  peft {[round(x, 4) for x in w]}  serve {[round(x, 4) for x in g]}  {t[:40]!r}")
    (work / "results.json").write_text(json.dumps({"method": a.method, "tol": a.tol, "rows": rows}, indent=1) + "\n")
    print(f"{len(rows) - failed} passed, {failed} failed ({a.method}, tolerance {a.tol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
