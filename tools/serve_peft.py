# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "transformers==5.24.0", "peft==0.21.2", "fastapi==0.165.0", "uvicorn==0.55.0"]
# ///
"""The server a PEFT user would write: the comparison point of `pvera serve` in BENCHMARKS.md ("Serving").

    python3 tools/serve_peft.py --model .cache/assets/minilm --adapter spam=.cache/runs/spamassassin-minilm/best \
        [--adapter NAME=DIR ...] [--adapter-dir ROOT --adapters-from-dir N] [--port 8081] [--threads 2]

FastAPI + uvicorn (one process), transformers' BertModel with PEFT 0.21.2's PeftModel: the first adapter through
`PeftModel.from_pretrained`, the others through `load_adapter`; each request sets its adapter with `set_adapter` and
runs one forward under a lock (the model is shared state), as PEFT's documentation shows multi-adapter inference.
The classifier is the adapter's `classifier` (modules_to_save) on the pooling of its `pvera_task.json` (mean for
the main job), the same model `pvera serve` runs. No dynamic batching: one forward per request, what a plain
FastAPI endpoint does.

Routes (the request and answer shapes of `pvera serve`'s /predict, i.e. text-embeddings-inference's):
    POST /predict {"inputs": "text" | ["text"] | [["a"], ["b"]], "adapter": NAME, "truncate": bool}
        -> [{"score", "label"}] sorted high to low (a list of such lists for a batch)
    GET /health
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--adapter", action="append", default=[], help="NAME=DIR (repeatable; the first is the default)")
    ap.add_argument("--adapter-dir", type=Path, help="load every adapter folder under ROOT (sorted), named by folder")
    ap.add_argument("--adapters-from-dir", type=int, default=0, help="at most N adapters from --adapter-dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t_start = time.time()
    import torch
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse
    from peft import PeftModel
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    import uvicorn

    torch.set_num_threads(args.threads)
    specs = [tuple(a.split("=", 1)) for a in args.adapter]
    if args.adapter_dir:
        dirs = sorted(p.parent for p in args.adapter_dir.glob("*/adapter_config.json"))
        if args.adapters_from_dir:
            dirs = dirs[: args.adapters_from_dir]
        specs += [(d.name, str(d)) for d in dirs]
    if not specs:
        raise SystemExit("serve_peft.py: pass --adapter NAME=DIR (or --adapter-dir)")

    cfg = AutoConfig.from_pretrained(args.model)
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        setattr(cfg, k, 0.0)
    model = AutoModel.from_pretrained(args.model, config=cfg, dtype=torch.float32)
    tasks = {}
    for name, d in specs:
        meta = json.loads((Path(d) / "pvera_task.json").read_text())
        tasks[name] = meta
    first = tasks[specs[0][0]]
    # The head the adapters carry (modules_to_save=["classifier"]), attached where their keys say:
    # base_model.model.classifier.
    model.classifier = torch.nn.Linear(cfg.hidden_size, len(first["labels"]))
    pm = PeftModel.from_pretrained(model, specs[0][1], adapter_name=specs[0][0])
    for name, d in specs[1:]:
        pm.load_adapter(d, adapter_name=name)
    pm.eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    lock = threading.Lock()
    print(f"serve_peft: {len(specs)} adapter(s) loaded in {time.time() - t_start:.1f}s", flush=True)

    def classify(texts: list[str], adapter: str, truncate: bool) -> list[list[dict]]:
        meta = tasks[adapter]
        max_len = meta.get("max_length") or 512
        enc = tok(texts, padding=True, truncation=truncate, max_length=max_len, return_tensors="pt")
        if enc["input_ids"].shape[1] > max_len:
            raise ValueError(f"an input has more than {max_len} tokens; send truncate=true")
        with lock, torch.inference_mode():
            pm.set_adapter(adapter)
            out = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     token_type_ids=enc.get("token_type_ids"))
            h = out.last_hidden_state
            m = enc["attention_mask"].to(h.dtype).unsqueeze(-1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            probs = torch.softmax(pm.base_model.model.classifier(pooled), dim=-1)
        labels = meta["labels"]
        return [sorted(({"score": float(p), "label": labels[i]} for i, p in enumerate(row)), key=lambda x: -x["score"])
                for row in probs.tolist()]

    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: dict = Body(...)):
        inputs = body.get("inputs")
        adapter = body.get("adapter") or specs[0][0]
        if adapter not in tasks:
            return JSONResponse({"error": f"no adapter {adapter!r}", "error_type": "not_found"}, status_code=404)
        single = isinstance(inputs, str) or (isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], str))
        texts = [inputs] if isinstance(inputs, str) else [x if isinstance(x, str) else x[0] for x in inputs or []]
        if not texts:
            return JSONResponse({"error": "no inputs", "error_type": "validation"}, status_code=422)
        try:
            res = classify(texts, adapter, bool(body.get("truncate", False)))
        except ValueError as e:
            return JSONResponse({"error": str(e), "error_type": "validation"}, status_code=413)
        return res[0] if single else res

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
