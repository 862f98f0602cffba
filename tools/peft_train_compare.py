#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "torch==2.15.0",
#   "peft==0.21.2",
#   "transformers==5.24.0",
#   "safetensors>=0.4",
#   "numpy>=1.24",
#   "pillow==13.0.0",
# ]
# ///
"""The `pvera train` classification run, done with PyTorch + PEFT: same split, same head, same recipe.

    # text: all-MiniLM-L6-v2 on SpamAssassin (the main job of tools/main_job.sh)
    python3 tools/peft_train_compare.py --task text-classification --model .cache/assets/minilm \
        --data .cache/assets/spamassassin/mails.jsonl --output /work/runs/peft-spam-minilm \
        --r 256 --target-modules query,value --pooling mean --train-size 1000 --max-length 64 \
        --batch-size 16 --epochs 1 --lr 2e-2 --weight-decay 0.01 --seed 0 --threads 2 --eval-held-out 300

    # images: DINOv2-S on Fashion-MNIST, 1,000 training images (800 train + 200 validation)
    python3 tools/peft_train_compare.py --task image-classification --model .cache/assets/dinov2s \
        --data .cache/assets/fashion-mnist --output /work/runs/peft-fmnist-dinov2s \
        --target-modules query,value --pooling cls-mean-patch --train-size 1000 ... --eval-held-out 500

The flags mean what they mean for `pvera train` (same names, same defaults). What "the same run" means here,
each point taken from the Rust sources (crates/pvera-cli/src/train.rs, crates/pvera/src/{data,train,models}):

* Data. Text: CSV/JSONL `text`,`label`; the label ids are the sorted distinct labels (numeric order when all are
  integers). Tokenised with the model's tokenizer.json (transformers' fast tokenizer), truncated to --max-length
  (special tokens included), padded to the longest sequence of each batch; input_ids, attention_mask,
  token_type_ids. Images: the Fashion-MNIST IDX train split (or any IDX images file / class-folder tree), 28x28 grey
  -> RGB, preprocessed with transformers' PIL `BitImageProcessor`: the model directory's preprocessor_config.json
  when it has one, otherwise facebook/dinov2-small's (shortest edge 256 bicubic, centre crop 224, 1/255, ImageNet
  mean/std), exactly what `pvera train` falls back to for a dinov2 model without that file.
* Split (`--train-size N`, VTAB-1k style): perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)),
  stratified by class: N examples drawn per class in permutation order, counts proportional to the class sizes
  (largest remainder, ties to the lower class id); N // 5 of them (again stratified) are the validation set, the rest
  the training set; the examples never drawn, in permutation order, are the held-out pool (--eval-held-out K takes
  its first K). Without --train-size: --val-fraction, same rule.
* Shuffling: epoch e (0-based) visits the training examples in the order
  torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + e)); batches of --batch-size, the last one
  smaller.
* Model: the transformers backbone (BertModel / Dinov2Model) in float32 with every base-model dropout set to 0
  (pvera's models run the base network without dropout; only PVeRA samples in training), and a `classifier`
  nn.Linear(pooled width, classes) initialised as pvera does: g = torch.Generator().manual_seed(seed),
  weight.uniform_(-1/sqrt(in), 1/sqrt(in), generator=g), then the bias the same way. Pooling: mean (over the
  attention mask), cls, or cls-mean-patch = concat(h[:, 0], mean(h[:, 1:])) (Dinov2ForImageClassification).
* Adapter: PveraConfig(r, target_modules, modules_to_save=["classifier"], d_initial, pvera_dropout,
  projection_prng_key, save_projection, bias) via get_peft_model, or with `--method vera` (as `pvera train
  --method vera`) VeraConfig with the same fields (vera_dropout); under transformers 5, DINOv2's `query` / `value`
  are called `q_proj` / `v_proj` (pvera accepts both names; the same Linear layers).
  torch.manual_seed(seed) after get_peft_model (pvera seeds its global generator, which draws PVeRA's
  reparametrisation noise, when training starts).
* Optimisation: loss = mean cross-entropy (+ --kl-weight x mean KL of the PVeRA latents, 0 by default);
  torch.optim.AdamW(all trainable parameters, lr, betas (0.9, 0.999), eps 1e-8, weight_decay) with
  transformers' get_{linear,cosine,constant}_schedule_with_warmup (warm-up ceil(ratio x steps)), one optimizer step
  per batch, optional clipping (--max-grad-norm).
* Per epoch: validation in eval mode (no sampling: the mean path); the best epoch is the lowest validation loss;
  best/ (save_pretrained) is written when it improves, last/ every epoch.
* Evaluation: the best adapter, eval mode, on the held-out examples (--eval-held-out K) or --eval-data, in batches
  of --batch-size: accuracy and mean cross-entropy.

Output: <output>/metrics.json (config, versions, per-epoch figures, evaluation, wall times: load, train (epochs with
their validation and checkpoints, pvera's `seconds`), eval, total, and the 1/5/15-minute load average before and
after), best/ and last/ PEFT adapter directories, labels.json. Prints the same kind of lines as `pvera train`.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
DINOV2_PREPROCESS = dict(
    do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
)
VIT_PREPROCESS = dict(
    do_resize=True, size={"height": 224, "width": 224}, resample=2, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# ------------------------------------------------------------------------------------------------
# Splits (crates/pvera/src/data/split.rs)
# ------------------------------------------------------------------------------------------------

def randperm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def allocate(sizes: list[int], total: int) -> list[int]:
    """Proportional allocation by largest remainder, ties to the lower class id, capped by the class sizes."""
    n = sum(sizes)
    total = min(total, n)
    if total == 0:
        return [0] * len(sizes)
    out = [s * total // n for s in sizes]
    rem = sorted((((s * total) % n, c) for c, s in enumerate(sizes)), key=lambda x: (-x[0], x[1]))
    left = total - sum(out)
    while left > 0:
        for _, c in rem:
            if left == 0:
                break
            if out[c] < sizes[c]:
                out[c] += 1
                left -= 1
    return out


def take_per_class(perm: list[int], labels: list[int], counts: list[int]) -> tuple[list[int], list[int]]:
    taken = [0] * len(counts)
    picked, other = [], []
    for i in perm:
        c = labels[i]
        if taken[c] < counts[c]:
            taken[c] += 1
            picked.append(i)
        else:
            other.append(i)
    return picked, other


def class_sizes(labels: list[int]) -> list[int]:
    sizes = [0] * (max(labels) + 1)
    for c in labels:
        sizes[c] += 1
    return sizes


def train_size_subset(n: int, k: int, seed: int, labels: list[int]):
    n_val = max(k // 5, 1)
    perm = randperm(n, seed)
    subset_counts = allocate(class_sizes(labels), k)
    subset, rest = take_per_class(perm, labels, subset_counts)
    val, train = take_per_class(subset, labels, allocate(subset_counts, n_val))
    return train, val, rest


def train_val_split(n: int, fraction: float, seed: int, labels: list[int]):
    k = max(int(math.floor(n * fraction)), 1)
    perm = randperm(n, seed)
    val, train = take_per_class(perm, labels, allocate(class_sizes(labels), k))
    return train, val, []


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def canonical_label(x) -> str:
    s = str(x)
    try:
        return str(int(s.strip()))
    except ValueError:
        return s


def label_order(raw: list[str]) -> list[str]:
    names = sorted(set(raw))
    try:
        return [str(v) for v in sorted(int(s) for s in names)]
    except ValueError:
        return names


class TextData:
    def __init__(self, path: Path, model_dir: Path, max_length: int | None, names: list[str] | None = None):
        from transformers import AutoTokenizer

        texts, labels = [], []
        if path.suffix == ".csv":
            import csv

            with open(path, newline="", encoding="utf-8-sig") as f:
                for row in csv.DictReader(f):
                    texts.append(row["text"])
                    labels.append(canonical_label(row["label"]))
        else:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        o = json.loads(line)
                        texts.append(o["text"])
                        labels.append(canonical_label(o["label"]))
        self.names = names if names is not None else label_order(labels)
        ids = {n: i for i, n in enumerate(self.names)}
        self.texts = texts
        self.labels = [ids[x] for x in labels]
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        # pvera: --max-length, else the truncation length stored in tokenizer.json, else 512.
        stored = (self.tok.backend_tokenizer.truncation or {}).get("max_length") if hasattr(self.tok, "backend_tokenizer") else None
        self.max_length = max_length or stored or 512

    def __len__(self):
        return len(self.texts)

    def batch(self, idx: list[int]):
        enc = self.tok([self.texts[i] for i in idx], truncation=True, max_length=self.max_length,
                       padding="longest", return_tensors="pt")
        return dict(enc), torch.tensor([self.labels[i] for i in idx])

    def describe(self, i: int) -> str:
        s = " ".join(self.texts[i].split())
        return s[:60] + ("…" if len(s) > 60 else "")


def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class ImageData:
    def __init__(self, path: Path, model_dir: Path):
        from PIL import Image  # noqa: F401
        from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        cfg = json.loads((model_dir / "config.json").read_text())
        pre = model_dir / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            cls = ViTImageProcessorPil if p.get("image_processor_type", "").startswith("ViT") else BitImageProcessorPil
            self.processor = cls.from_pretrained(model_dir)
        elif cfg.get("model_type") == "vit":
            self.processor = ViTImageProcessorPil(**VIT_PREPROCESS)
        else:
            self.processor = BitImageProcessorPil(**DINOV2_PREPROCESS)
        if path.is_file():
            images_file = path
        else:
            images_file = next(p for p in (path / "train-images-idx3-ubyte.gz", path / "train-images-idx3-ubyte")
                               if p.is_file())
        labels_file = Path(str(images_file).replace("-images-idx3-ubyte", "-labels-idx1-ubyte"))
        self.images = read_idx(images_file)
        self.labels = read_idx(labels_file).astype(np.int64).tolist()
        k = max(self.labels) + 1
        fashion = "fashion" in str(images_file).lower()
        self.names = FASHION_MNIST_CLASSES[:k] if fashion and k <= 10 else [str(i) for i in range(k)]

    def __len__(self):
        return len(self.labels)

    def batch(self, idx: list[int]):
        from PIL import Image

        imgs = [Image.fromarray(self.images[i], mode="L") for i in idx]
        px = self.processor(images=imgs, return_tensors="pt")["pixel_values"]
        return {"pixel_values": px}, torch.tensor([self.labels[i] for i in idx])

    def describe(self, i: int) -> str:
        return f"#{i}"


# ------------------------------------------------------------------------------------------------
# Model (crates/pvera/src/models/heads.rs)
# ------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, hidden: int, num_labels: int, pooling: str, seed: int):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        width = 2 * hidden if pooling == "cls-mean-patch" else hidden
        self.classifier = nn.Linear(width, num_labels)
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(width)
        with torch.no_grad():
            self.classifier.weight.uniform_(-bound, bound, generator=g)
            self.classifier.bias.uniform_(-bound, bound, generator=g)

    def forward(self, **inputs):
        out = self.backbone(**inputs)
        h = out.last_hidden_state.float()
        if self.pooling == "cls":
            pooled = h[:, 0]
        elif self.pooling == "pooler":
            pooled = out.pooler_output.float()
        elif self.pooling == "mean":
            m = inputs.get("attention_mask")
            if m is None:
                pooled = h.mean(1)
            else:
                m = m.to(h.dtype).unsqueeze(-1)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        elif self.pooling == "cls-mean-patch":
            pooled = torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=1)
        else:
            raise SystemExit(f"--pooling {self.pooling!r}: expected cls, pooler, mean or cls-mean-patch")
        return self.classifier(pooled)


def load_backbone(model_dir: Path):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(model_dir)
    # pvera runs the frozen network without dropout / drop path (its models implement the eval-mode forward).
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate", "classifier_dropout"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0 if k != "classifier_dropout" else None)
    model = AutoModel.from_pretrained(model_dir, config=cfg, dtype=torch.float32)
    return model, cfg


def target_modules(spec: str | None, backbone: nn.Module):
    if spec is None:
        return None
    if spec.strip().lower() == "all-linear":
        return "all-linear"
    names = [x.strip() for x in spec.split(",") if x.strip()]
    if len(names) == 1 and any(c in names[0] for c in "^$*+?()[]|\\"):
        return spec
    # transformers 5 renamed the ViT / DINOv2 attention projections (attention.attention.query -> attention.q_proj).
    leaves = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    alias = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    return [alias[n] if n not in leaves and alias.get(n) in leaves else n for n in names]


# ------------------------------------------------------------------------------------------------
# Training (crates/pvera/src/train/trainer.rs)
# ------------------------------------------------------------------------------------------------

def evaluate(model, data, idx: list[int], batch_size: int):
    model.eval()
    loss_sum, correct, preds = 0.0, 0, []
    with torch.no_grad():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s: s + batch_size]
            x, y = data.batch(chunk)
            logits = model(**x)
            loss_sum += F.cross_entropy(logits, y).item() * len(chunk)
            p = logits.softmax(-1)
            pm, arg = p.max(-1)
            correct += int((arg == y).sum())
            preds += [(i, int(t), int(a), float(q)) for i, t, a, q in zip(chunk, y, arg, pm)]
    n = max(len(idx), 1)
    return loss_sum / n, correct / n, correct, preds


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--task", choices=["text-classification", "image-classification"], required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--method", default="pvera", choices=["pvera", "vera"])
    ap.add_argument("--r", type=int, default=256)
    ap.add_argument("--target-modules")
    ap.add_argument("--d-initial", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--projection-prng-key", type=int, default=0)
    ap.add_argument("--save-projection", default="true", choices=["true", "false"])
    ap.add_argument("--modules-to-save")
    ap.add_argument("--bias", default="none")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--kl-weight", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--train-size", type=int)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--pooling")
    ap.add_argument("--warmup-ratio", type=float, default=0.0)
    ap.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    ap.add_argument("--max-grad-norm", type=float)
    ap.add_argument("--eval-held-out", type=int)
    ap.add_argument("--eval-data", type=Path)
    ap.add_argument("--show-predictions", type=int, default=5)
    args = ap.parse_args()
    if args.kl_weight != 0.0:
        raise SystemExit("--kl-weight: PEFT does not expose the KL term of the PVeRA latent; use 0")

    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    load_before = loadavg()
    started = time.perf_counter()
    from peft import PveraConfig, VeraConfig, get_peft_model
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, \
        get_linear_schedule_with_warmup
    import peft
    import transformers

    args.output.mkdir(parents=True, exist_ok=True)
    text = args.task == "text-classification"
    data = TextData(args.data, args.model, args.max_length) if text else ImageData(args.data, args.model)
    n = len(data)
    if args.train_size:
        train, val, rest = train_size_subset(n, args.train_size, args.seed, data.labels)
    elif args.val_fraction == 0.0:
        train, val, rest = list(range(n)), [], []
    else:
        train, val, rest = train_val_split(n, args.val_fraction, args.seed, data.labels)
    print(f"data: {args.data} ({n} examples, {len(data.names)} classes: {', '.join(data.names)}); "
          f"train {len(train)} / validation {len(val)}" + (f" / unused {len(rest)}" if rest else ""))
    (args.output / "labels.json").write_text(json.dumps(data.names, indent=2) + "\n")

    backbone, cfg = load_backbone(args.model)
    pooling = args.pooling or {"vit": "cls", "dinov2": "cls-mean-patch"}.get(cfg.model_type, "mean")
    model = Classifier(backbone, cfg.hidden_size, len(data.names), pooling, args.seed)
    modules_to_save = [x for x in (args.modules_to_save or "classifier").split(",") if x]
    common = dict(
        r=args.r, target_modules=target_modules(args.target_modules, backbone), d_initial=args.d_initial,
        projection_prng_key=args.projection_prng_key,
        save_projection=args.save_projection == "true", modules_to_save=modules_to_save or None, bias=args.bias,
    )
    if args.method == "vera":
        pcfg = VeraConfig(vera_dropout=args.dropout, **common)
    else:
        pcfg = PveraConfig(pvera_dropout=args.dropout, **common)
    pm = get_peft_model(model, pcfg)
    pm.peft_config["default"].base_model_name_or_path = str(args.model)
    torch.manual_seed(args.seed)
    params = [p for p in pm.parameters() if p.requires_grad]
    n_train_params, n_all = pm.get_nb_trainable_parameters()  # PEFT's print_trainable_parameters figures
    print(f"trainable params: {n_train_params:,} || all params: {n_all:,} || "
          f"trainable%: {100 * n_train_params / n_all:.4f}")

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = math.ceil(args.warmup_ratio * total)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    sched = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}.get(args.schedule)
    sched = sched(opt, warmup, total) if sched else get_constant_schedule_with_warmup(opt, warmup)
    print(f"training: {args.epochs} epoch(s) x {steps_per_epoch} step(s) = {total} optimizer steps")
    t_load = time.perf_counter() - started

    t_train0 = time.perf_counter()
    history, best_loss, best_epoch, best_state = [], None, None, None
    for epoch in range(args.epochs):
        e0 = time.perf_counter()
        pm.train()
        order = randperm(len(train), args.seed + epoch)
        idx = [train[i] for i in order]
        loss_sum, correct, seen, lr_used = 0.0, 0, 0, args.lr
        for s in range(0, len(idx), args.batch_size):
            chunk = idx[s: s + args.batch_size]
            x, y = data.batch(chunk)
            logits = pm(**x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            if args.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            lr_used = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if not math.isfinite(loss.item()):
                raise SystemExit(f"non-finite training loss in epoch {epoch + 1}")
            loss_sum += loss.item() * len(chunk)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(chunk)
            step = s // args.batch_size + 1
            if step % 10 == 0 or step == steps_per_epoch:
                el = time.perf_counter() - e0
                print(f"  epoch {epoch + 1} step {step}/{steps_per_epoch} loss {loss_sum / seen:.4f} "
                      f"acc {correct / seen:.3f} {seen / el:.1f} ex/s lr {lr_used:.2e}", flush=True)
        t_epoch_train = time.perf_counter() - e0
        val_loss, val_acc, _, _ = evaluate(pm, data, val, args.batch_size) if val else (None, None, 0, [])
        monitored = val_loss if val else loss_sum / seen
        improved = best_loss is None or monitored < best_loss
        if improved:
            best_loss, best_epoch, best_state = monitored, epoch + 1, trainable_state(pm)
            pm.save_pretrained(args.output / "best")
        pm.save_pretrained(args.output / "last")
        m = dict(epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch, train_loss=loss_sum / seen,
                 train_accuracy=correct / seen, train_examples=seen, val_loss=val_loss, val_accuracy=val_acc,
                 val_examples=len(val), lr=lr_used, seconds=time.perf_counter() - e0,
                 examples_per_sec=seen / t_epoch_train, is_best=improved)
        history.append(m)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.4f} | "
              f"val loss {fmt(val_loss)} acc {fmt(val_acc)} | {m['seconds']:.1f}s, {m['examples_per_sec']:.1f} ex/s"
              + ("  *best" if improved else ""), flush=True)
    t_train = time.perf_counter() - t_train0

    eval_json, t_eval = None, 0.0
    eval_set = None
    if args.eval_data is not None:
        ed = TextData(args.eval_data, args.model, args.max_length, names=data.names) if text \
            else ImageData(args.eval_data, args.model)
        eval_set = (ed, list(range(len(ed))), str(args.eval_data))
    elif args.eval_held_out:
        ids = rest[: args.eval_held_out]
        eval_set = (data, ids, f"{len(ids)} held-out examples of {args.data}")
    if eval_set is not None:
        ed, ids, what = eval_set
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if name in best_state:
                    p.copy_(best_state[name])
        t0 = time.perf_counter()
        loss, acc, correct, preds = evaluate(pm, ed, ids, args.batch_size)
        t_eval = time.perf_counter() - t0
        print(f"eval (best adapter, epoch {best_epoch}): {what}: accuracy {acc:.4f} ({correct}/{len(ids)}), "
              f"loss {loss:.4f}, {t_eval:.1f}s")
        if args.show_predictions:
            print("predictions:")
            for i, y, p, q in preds[: args.show_predictions]:
                print(f"  [{'ok' if y == p else 'XX'}] true {ed.names[y]:<8} predicted {ed.names[p]:<8} p={q:.3f}  "
                      f"{ed.describe(i)}")
        eval_json = dict(data=what, examples=len(ids), correct=correct, accuracy=acc, loss=loss, best_epoch=best_epoch)

    total_s = time.perf_counter() - started
    out = dict(
        tool="tools/peft_train_compare.py", argv=sys.argv[1:], args={k: str(v) for k, v in vars(args).items()},
        method={"pvera": "PVeRA", "vera": "VeRA"}[args.method],
        trainable_params=n_train_params, total_steps=total, epochs=history, best_epoch=best_epoch,
        best_loss=best_loss, eval=eval_json,
        seconds=dict(load=t_load, train=t_train, eval=t_eval, total=total_s,
                     process=time.perf_counter() - T_PROCESS),
        split=dict(train=len(train), val=len(val), unused=len(rest)),
        loadavg_before=load_before, loadavg_after=loadavg(),
        versions=dict(torch=torch.__version__, peft=peft.__version__, transformers=transformers.__version__,
                      python=platform.python_version(), threads=torch.get_num_threads(), cpu=platform.processor()),
    )
    (args.output / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"done in {total_s:.1f}s (load {t_load:.1f}s, train {t_train:.1f}s, eval {t_eval:.1f}s): "
          f"best epoch {best_epoch}; metrics.json in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
