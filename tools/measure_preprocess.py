#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "pillow==13.0.0",
#   "numpy==2.4.6",
#   "transformers==5.24.0",
#   "torch==2.15.0",
#   "torchvision==0.29.2",
# ]
# ///
"""Measure pvera's image preprocessing against transformers' image processors.

Usage:
    python3 tools/measure_preprocess.py [IMAGE ...] [--idx DIR/SPLIT:N] [--cargo-target DIR]

Runs the ignored Rust test `data::preprocess_dump_for_measurement` (which decodes each image
with the `image` crate and preprocesses it with `pvera::data::images::ImagePreprocess`) and
compares its f32 outputs with, for both DINOv2's config (`BitImageProcessor`: shortest edge 256
bicubic, crop 224, ImageNet mean/std) and ViT's (`ViTImageProcessor`: 224x224 bilinear, 0.5/0.5):

  * pil: transformers' PIL backend (`*ImageProcessorPil`), the reference pvera ports;
  * tv:  transformers' default torchvision backend (`*ImageProcessor`, the "fast" one).

Inputs: the fixture images, any IMAGE files given (e.g. real photos), and the first N images of
an IDX split (`--idx /usr/share/datasets/fashion-mnist/train:200`). Differences are in normalised
units (1 grey level = 1/255/std, about 0.017 for ImageNet std, 0.0078 for ViT's 0.5).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.models.bit.image_processing_bit import BitImageProcessor
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from transformers.models.vit.image_processing_vit import ViTImageProcessor

ROOT = Path(__file__).resolve().parents[1]
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
PROCESSORS = {
    "dinov2": {"pil": BitImageProcessorPil(**DINOV2), "tv": BitImageProcessor(**DINOV2)},
    "vit": {"pil": ViTImageProcessorPil(**VIT), "tv": ViTImageProcessor(**VIT)},
}


def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="*", type=Path)
    ap.add_argument("--idx", action="append", default=[], help="DIR/SPLIT:N, e.g. /usr/share/datasets/fashion-mnist/train:200")
    ap.add_argument("--cargo-target", default=os.environ.get("CARGO_TARGET_DIR"))
    args = ap.parse_args()

    fixtures = sorted(p for p in (ROOT / "crates/pvera/tests/fixtures/data/images").rglob("*")
                      if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    work = Path(tempfile.mkdtemp(prefix="pvera-measure-"))
    jobs, items = [], []  # items: (group, label, PIL image, job indices)
    for group, paths in (("fixture", fixtures), ("given", args.images)):
        for p in paths:
            idxs = []
            for cfg in PROCESSORS:
                out = work / f"{len(jobs)}.f32"
                jobs.append({"path": str(p.resolve()), "config": cfg, "out": str(out)})
                idxs.append(len(jobs) - 1)
            items.append((group, p.name, Image.open(p), idxs))
    for spec in args.idx:
        stem, n = spec.rsplit(":", 1)
        d, split = stem.rsplit("/", 1)
        cands = [Path(d) / f"{split}-images-idx3-ubyte{ext}" for ext in (".gz", "")]
        arr = read_idx(next(c for c in cands if c.exists()))
        for i in range(int(n)):
            idxs = []
            for cfg in PROCESSORS:
                out = work / f"{len(jobs)}.f32"
                jobs.append({"idx": stem, "index": i, "config": cfg, "out": str(out)})
                idxs.append(len(jobs) - 1)
            items.append((f"idx:{Path(d).name}", f"{split}[{i}]", Image.fromarray(arr[i], "L"), idxs))
    (work / "jobs.json").write_text(json.dumps(jobs))

    env = dict(os.environ, PVERA_PREPROCESS_JOBS=str(work / "jobs.json"))
    if args.cargo_target:
        env["CARGO_TARGET_DIR"] = args.cargo_target
    subprocess.run(
        ["cargo", "test", "-q", "-p", "pvera", "--test", "integration", "preprocess_dump_for_measurement",
         "--", "--ignored"],
        cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
    )

    stats: dict = {}
    print(f"{'input':<28} {'config':<7} {'backend':<4} {'max|d|':>9} {'mean|d|':>10} {'exact':>7}")
    for group, label, img, idxs in items:
        for cfg, j in zip(PROCESSORS, idxs):
            ours = np.fromfile(jobs[j]["out"], dtype="<f4")
            for backend, proc in PROCESSORS[cfg].items():
                ref = np.asarray(proc(img, return_tensors="np")["pixel_values"][0], dtype=np.float32).reshape(-1)
                d = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
                row = (float(d.max()), float(d.mean()), float((d == 0).mean()))
                stats.setdefault((group, cfg, backend), []).append(row)
                if not group.startswith("idx") or len(stats[(group, cfg, backend)]) <= 2:
                    print(f"{group + ':' + label:<28.28} {cfg:<7} {backend:<4} {row[0]:9.2e} {row[1]:10.2e} {row[2]:7.1%}")
    print("\nsummary (max over inputs of max|d|, mean of mean|d|, mean exact fraction):")
    for (group, cfg, backend), rows in sorted(stats.items()):
        a = np.array(rows)
        print(f"  {group:<22} {cfg:<7} {backend:<4} n={len(rows):<4} max {a[:, 0].max():.2e}  "
              f"mean {a[:, 1].mean():.2e}  exact {a[:, 2].mean():.1%}")


if __name__ == "__main__":
    main()
