#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "pillow==13.0.0",
#   "numpy==2.4.6",
#   "tokenizers==0.23.3",
#   "transformers==5.24.0",
#   "torch==2.15.0",
# ]
# ///
"""Write the tiny data fixtures used by `crates/pvera/tests/integration/data.rs`.

Usage:
    python3 tools/make_data_fixtures.py        # with the pinned packages installed
    uv run tools/make_data_fixtures.py         # same, in a throwaway env

Output, under `crates/pvera/tests/fixtures/data/` (a few KB in all):
  images/<class>/...   tiny PNG / JPEG images in class folders (RGB, grey, RGBA, palette,
                       a nested sub-folder, a non-image file that must be ignored)
  fashion-mnist-tiny/  an IDX pair, gzip (train-*) and raw (t10k-*), 28x28 grey
  tokenizer.json       a BERT-style WordPiece tokenizer built with `tokenizers`
  tokenizer_bpe.json   a GPT-2 style byte-level BPE (no pad token) trained on lm.txt
  text/                train.csv (quoted commas, quotes, newlines), train.jsonl (int labels),
                       lm.txt (plain text for causal LM)
  expected.json        what transformers / PIL / torch produce for all of it:
    * images: PIL's decoded pixels (sha256; base64 for the JPEGs, whose decoders may differ),
      and the PIL-backend image processors' outputs (`BitImageProcessorPil` with DINOv2's config,
      `ViTImageProcessorPil`, and small configs with every Pillow filter): shape, sha256 of the
      little-endian f32 bytes, sum, first values.
    * idx: labels and the DINOv2-preprocessed first image (sha256).
    * text: `PreTrainedTokenizerFast(...)(texts, padding=True, truncation=True, max_length=16)`
      (and padding="max_length"), labels ids by the sorted-label rule.
    * lm: run_clm's group_texts blocks (block 8, with and without keep_linebreaks, per-1000-line
      groups) for both tokenizers.
    * randperm: `torch.randperm(n, generator=torch.Generator().manual_seed(s))`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import PreTrainedTokenizerFast
from transformers.image_transforms import convert_to_rgb
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "crates/pvera/tests/fixtures/data"

DINOV2 = dict(
    do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    do_convert_rgb=True,
)
VIT = dict(
    do_resize=True, size={"height": 224, "width": 224}, resample=2, do_rescale=True,
    rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    do_convert_rgb=True,
)
# More configurations (Bit = shortest edge + crop, ViT = exact size), every Pillow filter.
SMALL = {
    "bicubic_se9_crop7": ("bit", dict(DINOV2, size={"shortest_edge": 9}, crop_size={"height": 7, "width": 7})),
    "bicubic_se40_crop36x5": ("bit", dict(DINOV2, size={"shortest_edge": 40}, crop_size={"height": 36, "width": 5})),
    "bicubic_se512_crop448": ("bit", dict(DINOV2, size={"shortest_edge": 512}, crop_size={"height": 448, "width": 448})),
    "bilinear_5x6": ("vit", dict(VIT, size={"height": 5, "width": 6})),
    "lanczos_6x4": ("vit", dict(VIT, size={"height": 6, "width": 4}, resample=1)),
    "box_7x3": ("vit", dict(VIT, size={"height": 7, "width": 3}, resample=4)),
    "hamming_4x9": ("vit", dict(VIT, size={"height": 4, "width": 9}, resample=5)),
    "bicubic_up_33x31_pad_crop40": ("bit", dict(DINOV2, size={"shortest_edge": 31}, crop_size={"height": 40, "width": 38})),
    # Pillow 13 runs the vertical pass first when the height shrinks by > 2x the width's shrink.
    "bicubic_vertical_first_14x6": ("vit", dict(VIT, size={"height": 6, "width": 14}, resample=3)),
    "norescale_nonorm_bilinear_3x3": ("vit", dict(VIT, size={"height": 3, "width": 3}, do_rescale=False, do_normalize=False)),
}


def processor(kind: str, cfg: dict):
    return (BitImageProcessorPil if kind == "bit" else ViTImageProcessorPil)(**cfg)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def f32_record(arr: np.ndarray, full: bool) -> dict:
    arr = np.ascontiguousarray(arr, dtype="<f4")
    rec = {
        "shape": list(arr.shape),
        "sha256": sha(arr.tobytes()),
        "sum": float(arr.astype(np.float64).sum()),
        "head": [float(x) for x in arr.reshape(-1)[:3]],
    }
    if full:
        rec["values"] = [float(x) for x in arr.reshape(-1)]
    return rec


def smooth(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Gradients plus a little noise: resampling filters have something to do."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for k in range(c):
        base = 127 + 100 * np.sin(x / (2.5 + k) + k) * np.cos(y / (3.5 + k))
        chans.append(base + rs.normal(0, 18, size=(h, w)))
    a = np.stack(chans, -1).clip(0, 255).round().astype(np.uint8)
    return a[..., 0] if c == 1 else a


def make_images(expected: dict) -> None:
    root = OUT / "images"
    specs = [
        # (relative path, PIL mode, width, height, save kwargs)
        ("bird/rgb_24x18.png", "RGB", 24, 18, {}),
        ("bird/rgb_17x29.jpg", "RGB", 17, 29, {"quality": 90}),
        ("cat/grey_28x28.png", "L", 28, 28, {}),
        ("cat/grey_20x13.jpg", "L", 20, 13, {"quality": 85}),
        ("cat/notes.txt", None, 0, 0, {}),
        ("dog/nested/rgba_16x16.png", "RGBA", 16, 16, {}),
        ("dog/palette_21x11.png", "P", 21, 11, {}),
        ("dog/trns_grey_15x9.png", "L", 15, 9, {"transparency": 140}),
    ]
    out = {}
    for i, (rel, mode, w, h, kw) in enumerate(specs):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode is None:
            path.write_text("not an image: ImageFolder must skip this file\n")
            continue
        if mode == "L":
            im = Image.fromarray(smooth(h, w, 1, i), "L")
        elif mode == "RGB":
            im = Image.fromarray(smooth(h, w, 3, i), "RGB")
        elif mode == "RGBA":
            rgb = smooth(h, w, 3, i)
            alpha = (np.arange(h * w).reshape(h, w) * 7 % 256).astype(np.uint8)
            im = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
        else:  # palette
            im = Image.fromarray(smooth(h, w, 3, i), "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT)
        im.save(path, **kw)

        # Everything below starts from the file, as a user's script would.
        loaded = Image.open(path)
        # transformers' convert_to_rgb: transparency is composited onto white.
        rgb = convert_to_rgb(loaded, return_numpy=True)
        rec = {"mode": loaded.mode, "width": loaded.width, "height": loaded.height,
               "rgb_sha256": sha(rgb.tobytes())}
        if path.suffix == ".jpg":
            rec["rgb_base64"] = base64.b64encode(rgb.tobytes()).decode()
        rec["dinov2"] = f32_record(processor("bit", DINOV2)(loaded, return_tensors="np")["pixel_values"][0], False)
        rec["vit"] = f32_record(processor("vit", VIT)(loaded, return_tensors="np")["pixel_values"][0], False)
        rec["small"] = {
            name: f32_record(processor(kind, cfg)(loaded, return_tensors="np")["pixel_values"][0], False)
            for name, (kind, cfg) in SMALL.items()
        }
        out[rel] = rec
    expected["images"] = out
    expected["image_classes"] = ["bird", "cat", "dog"]
    ptype = {"bit": "BitImageProcessor", "vit": "ViTImageProcessor"}
    expected["configs"] = {name: dict(cfg, image_processor_type=ptype[kind]) for name, (kind, cfg) in SMALL.items()}
    expected["configs"]["dinov2"] = dict(DINOV2, image_processor_type="BitImageProcessor")
    expected["configs"]["vit"] = dict(VIT, image_processor_type="ViTImageProcessor")


def idx_bytes(arr: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def make_idx(expected: dict) -> None:
    d = OUT / "fashion-mnist-tiny"
    d.mkdir(parents=True, exist_ok=True)
    train_x = np.stack([smooth(28, 28, 1, 100 + i) for i in range(5)])
    train_y = np.array([9, 0, 3, 3, 7], dtype=np.uint8)
    test_x = np.stack([smooth(28, 28, 1, 200 + i) for i in range(3)])
    test_y = np.array([1, 2, 8], dtype=np.uint8)
    # mtime=0: reproducible gzip bytes.
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(train_x), mtime=0))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(train_y), mtime=0))
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(test_x))
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(test_y))
    first = Image.fromarray(train_x[0], "L")
    expected["idx"] = {
        "train_labels": train_y.tolist(),
        "t10k_labels": test_y.tolist(),
        "train_pixel_sha256": sha(train_x.tobytes()),
        "train0_dinov2": f32_record(processor("bit", DINOV2)(first, return_tensors="np")["pixel_values"][0], False),
        "train0_vit": f32_record(processor("vit", VIT)(first, return_tensors="np")["pixel_values"][0], False),
    }


WORDS = (
    "the a an and or of to in is it this that for on with as free win money now click here offer "
    "meeting tomorrow lunch report project team please see attached call me later thanks hello "
    "prize cash urgent account verify password limited time only deal ##s ##ing ##ed ##er ##ly "
    "un ##believ ##able , . ! ? ' \" - : $ 1 2 3 0"
).split()


def make_tokenizer(expected: dict) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    path = OUT / "tokenizer.json"
    tok.save(str(path))
    return path


ROWS = [
    ("Win FREE money now, click here!", "spam"),
    ("Meeting tomorrow: please see the attached report.", "ham"),
    ('He said "hello, team" and left', "ham"),
    ("Urgent: verify your account password\nor lose it, limited time only", "spam"),
    ("Thanks for lunch", "ham"),
    ("Cash prize!!! Call me now. Unbelievable deal, only $1", "spam"),
    ("project report, project report, project report, project report, project report", "ham"),
]
JSONL_LABELS = [1, 0, 0, 1, 0, 1, 0]


def make_text(expected: dict, tok_path: Path) -> None:
    d = OUT / "text"
    d.mkdir(parents=True, exist_ok=True)
    import csv

    with open(d / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(["id", "text", "label"])
        for i, (t, l) in enumerate(ROWS):
            w.writerow([i, t, l])
    with open(d / "train.jsonl", "w", encoding="utf-8") as f:
        for (t, _), l in zip(ROWS, JSONL_LABELS):
            f.write(json.dumps({"text": t, "label": l, "extra": True}) + "\n")
    lm = (
        "the team report is attached\n"
        "\n"
        "click here for free money, win cash now\r\n"
        "hello team, please call me later\n"
        "meeting tomorrow for lunch\n"
    )
    (d / "lm.txt").write_bytes(lm.encode())

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    texts = [t for t, _ in ROWS]
    longest = fast(texts, padding=True, truncation=True, max_length=16, return_token_type_ids=True)
    fixed = fast(texts[:3], padding="max_length", truncation=True, max_length=16, return_token_type_ids=True)
    labels = sorted({l for _, l in ROWS})
    expected["text"] = {
        "label_names": labels,
        "csv_label_ids": [labels.index(l) for _, l in ROWS],
        "jsonl_label_names": [str(x) for x in sorted(set(JSONL_LABELS))],
        "jsonl_label_ids": JSONL_LABELS,
        "csv_lines": None,  # filled below
        "max_length": 16,
        "longest": {k: list(map(list, v)) for k, v in longest.items()},
        "fixed_first3": {k: list(map(list, v)) for k, v in fixed.items()},
    }
    # 1-based line where each CSV record starts (record 4 spans two lines).
    lines, line = [], 2
    for t, _ in ROWS:
        lines.append(line)
        line += 1 + t.count("\n")
    expected["text"]["csv_lines"] = lines

    # run_clm: datasets' text loader (universal newlines, keep_linebreaks=True), tokenizer(line),
    # group_texts per map batch of 1000 lines.
    with open(d / "lm.txt", encoding="utf-8") as f:  # universal newlines, like datasets
        raw_lines = io.StringIO(f.read()).readlines()
    block = 8
    ids = [fast(line)["input_ids"] for line in raw_lines]
    concat = [t for seq in ids for t in seq]
    total = len(concat) // block * block
    expected["lm"] = {
        "block_size": block,
        "num_lines": len(raw_lines),
        "blocks": [concat[i: i + block] for i in range(0, total, block)],
        "blocks_no_linebreaks": None,
    }
    ids2 = [fast(line.rstrip("\n"))["input_ids"] for line in raw_lines]
    concat2 = [t for seq in ids2 for t in seq]
    total2 = len(concat2) // block * block
    expected["lm"]["blocks_no_linebreaks"] = [concat2[i: i + block] for i in range(0, total2, block)]

    # A GPT-2 style byte-level BPE (no special tokens, no pad token): line breaks become tokens,
    # so keep_linebreaks matters.
    from tokenizers import models, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator([lm] * 3, trainer=trainer)
    bpe_path = OUT / "tokenizer_bpe.json"
    bpe.save(str(bpe_path))
    gpt = PreTrainedTokenizerFast(tokenizer_file=str(bpe_path), eos_token="<|endoftext|>")
    for key, lines in (("bpe_blocks", raw_lines), ("bpe_blocks_no_linebreaks", [l.rstrip("\n") for l in raw_lines])):
        cat = [t for line in lines for t in gpt(line)["input_ids"]]
        expected["lm"][key] = [cat[i: i + block] for i in range(0, len(cat) // block * block, block)]


def make_randperm(expected: dict) -> None:
    cases = []
    for n, seed in [(10, 0), (10, 42), (1000, 1234), (7, 2**40 + 3), (2, 5)]:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g).tolist()
        if n <= 50:
            cases.append({"n": n, "seed": seed, "perm": perm})
        else:  # long ones: the head and a position-weighted checksum
            cases.append({"n": n, "seed": seed, "head": perm[:16],
                          "checksum": sum((i + 1) * p for i, p in enumerate(perm))})
    # random_split with integer lengths uses the same permutation.
    g = torch.Generator().manual_seed(7)
    tr, va = torch.utils.data.random_split(range(50), [40, 10], generator=g)
    expected["randperm"] = cases
    expected["random_split_50_40_10_seed7"] = {"train": list(tr.indices), "val": list(va.indices)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    expected: dict = {"generated_by": "tools/make_data_fixtures.py",
                      "versions": {"pillow": Image.__version__, "torch": torch.__version__}}
    import transformers
    expected["versions"]["transformers"] = transformers.__version__
    make_images(expected)
    make_idx(expected)
    tok = make_tokenizer(expected)
    make_text(expected, tok)
    make_randperm(expected)
    (OUT / "expected.json").write_text(json.dumps(expected, sort_keys=True, separators=(",", ":")) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT.relative_to(ROOT)} ({total} bytes)")


if __name__ == "__main__":
    main()
