# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "transformers==5.24.0", "peft==0.21.2", "safetensors"]
# ///
"""Golden fixtures for the ViT and DINOv2 families of the `pvera` crate (transformers ViTModel / Dinov2Model + PEFT PVeRA).

    python3 tools/make_model_fixtures_vision.py [--out DIR] [--only CASE ...]

Writes one directory per case under `crates/pvera/tests/fixtures/models/` (or `--out`):

    <case>/model/            tiny random checkpoint from transformers `save_pretrained` (hidden 32, 2 layers, 4 heads,
                             image_size 32, patch 8); transformers 5.24 writes the CHECKPOINT naming scheme
                             (`encoder.layer.N.attention.attention.query`, ...) although its modules are named
                             `layers.N.attention.q_proj` (ViT) / `encoder.layer.N.attention.q_proj` (DINOv2) at run time
    <family>_sharded/model/  the weights of <family>_base saved with a small max_shard_size (model.safetensors.index.json)
    <case>/adapter*/         PEFT `save_pretrained` output (README.md removed); PEFT 0.21.2 under transformers 5 keys the
                             lambdas by the RUN-TIME module names (transformers-5 scheme); `adapter_v4/` holds the same
                             lambdas renamed to the checkpoint scheme, as an adapter saved with transformers 4 names them
    <case>/io.safetensors    inputs (`pixel_values*`, f32) and outputs `<what>.<field>` (see case.json "outputs")
    <case>/case.json         classes, configs, adapters, the meaning of every output, versions

and `dinov2_bicubic/` (torch's bicubic interpolate on odd sizes), `dinov2_s_layout/` (the config and tensor names/shapes
of a DINOv2-S sized Dinov2Model as save_pretrained writes them; no weights).

Deterministic: the global torch RNG is seeded before every step that consumes it, inputs come from their own
generator, one thread, and the script re-executes itself with PYTHONHASHSEED=0 (PEFT stores `target_modules` as a set
and writes it in hash order). A rerun writes byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "crates" / "pvera" / "tests" / "fixtures" / "models"
INPUT_SEED = 4321

VIT_CFG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
DINO_CFG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    mlp_ratio=2,
    image_size=32,
    patch_size=8,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
)
# DINOv2-S (facebook/dinov2-small): only the layout is recorded
DINO_S_CFG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    image_size=518,
    patch_size=14,
    layer_norm_eps=1e-6,
    layerscale_value=1.0,
    hidden_act="gelu",
)

INPUTS_DOC = {
    "pixel_values": "torch.randn(2, 3, 32, 32) (the configured image_size)",
    "pixel_values_interp": "torch.randn(1, 3, 40, 48): 5x6 patches, position embeddings interpolated from 4x4",
    "pixel_values_odd": "torch.randn(1, 3, 57, 21): 7x2 patches (the strided conv drops 1 row / 5 columns), "
    "position embeddings interpolated from 4x4",
}
INPUT_NAMES = {"": "pixel_values", "_interp": "pixel_values_interp", "_odd": "pixel_values_odd"}

# transformers-5 run-time module names -> checkpoint names (the inverse of the conversion_mapping.py renames)
V5_TO_CKPT = {
    "vit": [
        (r"(^|\.)layers\.(\d+)\.attention\.q_proj", r"\1encoder.layer.\2.attention.attention.query"),
        (r"(^|\.)layers\.(\d+)\.attention\.k_proj", r"\1encoder.layer.\2.attention.attention.key"),
        (r"(^|\.)layers\.(\d+)\.attention\.v_proj", r"\1encoder.layer.\2.attention.attention.value"),
        (r"(^|\.)layers\.(\d+)\.attention\.o_proj", r"\1encoder.layer.\2.attention.output.dense"),
        (r"(^|\.)layers\.(\d+)\.mlp\.fc1", r"\1encoder.layer.\2.intermediate.dense"),
        (r"(^|\.)layers\.(\d+)\.mlp\.fc2", r"\1encoder.layer.\2.output.dense"),
    ],
    "dinov2": [
        (r"\.attention\.q_proj", ".attention.attention.query"),
        (r"\.attention\.k_proj", ".attention.attention.key"),
        (r"\.attention\.v_proj", ".attention.attention.value"),
        (r"\.attention\.o_proj", ".attention.output.dense"),
        (r"\.mlp\.down_proj", ".mlp.weights_out"),
    ],
}


def versions() -> dict:
    import peft
    import safetensors
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
        "generator": "tools/make_model_fixtures_vision.py",
    }


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def model_class(family: str, task: bool):
    from transformers import Dinov2ForImageClassification, Dinov2Model, ViTForImageClassification, ViTModel

    return {
        ("vit", False): ViTModel,
        ("vit", True): ViTForImageClassification,
        ("dinov2", False): Dinov2Model,
        ("dinov2", True): Dinov2ForImageClassification,
    }[(family, task)]


def make_config(family: str, task: bool, extra: dict):
    from transformers import Dinov2Config, ViTConfig

    kw = dict(VIT_CFG if family == "vit" else DINO_CFG)
    kw.update(extra)
    if task:
        kw["num_labels"] = 3
    return (ViTConfig if family == "vit" else Dinov2Config)(**kw)


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Weights far from the tiny init so every part shows in the outputs: linear/conv ~ U(+-1/sqrt(fan_in)) (torch's
    default), biases ~ 0.1 N, norms 1 + 0.1 N / 0.1 N, cls/position embeddings ~ 0.5 N, layer scales ~ U(0.5, 1.5)."""
    for name, p in model.named_parameters():
        if name.endswith("lambda1"):
            p.copy_(0.5 + torch.rand_like(p))
        elif name.endswith(("cls_token", "position_embeddings", "mask_token")):
            p.copy_(0.5 * torch.randn_like(p))
        elif p.dim() == 1 and ("norm" in name.split(".")[-2] or "LayerNorm" in name):
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn_like(p))
        else:
            fan_in = p[0].numel()
            p.uniform_(-(fan_in**-0.5), fan_in**-0.5)


def build_model(family: str, task: bool, extra: dict, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    m = model_class(family, task)(make_config(family, task, extra))
    randomize(m)
    m = m.to(dtype).eval()
    m.config._name_or_path = "model"
    return m


def load_model(family: str, task: bool, d: Path):
    m = model_class(family, task).from_pretrained(str(d)).eval()
    m.config._name_or_path = "model"
    return m


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(INPUT_SEED)
    return {
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
        "pixel_values_interp": torch.randn(1, 3, 40, 48, generator=g),
        "pixel_values_odd": torch.randn(1, 3, 57, 21, generator=g),
    }


def call(model, family: str, x: torch.Tensor, native: bool):
    """The base model's forward (ViT needs interpolate_pos_encoding=True for other sizes; DINOv2 always interpolates)."""
    if family == "vit" and not native:
        return model(pixel_values=x, interpolate_pos_encoding=True)
    return model(pixel_values=x)


def base_of(model, family: str, task: bool):
    """The ViTModel / Dinov2Model inside (the task classes keep it under `vit` / `dinov2`)."""
    return getattr(model, family) if task else model


# --------------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------------


def save_adapter(base, cfg: dict, out: Path, seed: int) -> None:
    from peft import PveraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), PveraConfig(**copy.deepcopy(cfg)))
    if out.exists():
        shutil.rmtree(out)
    pm.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)


def rename_adapter_to_checkpoint(src: Path, dst: Path, family: str, targets_v4: list[str]) -> None:
    """An adapter as transformers 4 + PEFT would have saved it: the same tensors, keys in the checkpoint scheme."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    out = {}
    for k, v in tensors.items():
        nk = k
        for pat, rep in V5_TO_CKPT[family]:
            nk = re.sub(pat, rep, nk)
        out[nk] = v
    save_file(dict(sorted(out.items())), str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_modules"] = targets_v4
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def load_peft(family: str, task: bool, model_dir: Path, adapter_dir: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(load_model(family, task, model_dir), str(adapter_dir))
    return pm.eval()


# --------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------

CASES = [
    dict(
        name="vit_base",
        family="vit",
        dtype="float32",
        seed=11,
        sharded=True,
        adapter=dict(target_modules=["q_proj", "v_proj", "o_proj", "fc2", "pooler.dense"]),
        adapter_v4_targets=["query", "value", "output.dense", "pooler.dense"],
        sampled=dict(target_modules=["q_proj", "v_proj"], generator_seed=42, sample_at_inference=True),
        merged=True,
        notes="ViTModel (add_pooling_layer=True). The transformers-5 targets o_proj and fc2 are the checkpoint's "
        "attention.output.dense and encoder.layer.N.output.dense, both matched by 'output.dense' in adapter_v4.",
    ),
    dict(
        name="vit_task",
        family="vit",
        task=True,
        dtype="float32",
        seed=12,
        adapter=dict(target_modules=["q_proj", "v_proj", "fc1"], modules_to_save=["classifier"]),
        adapter_v4_targets=["query", "value", "intermediate.dense"],
        notes="ViTForImageClassification(num_labels=3): weights under `vit.` (no pooler) plus `classifier`; the adapter "
        "keys are base_model.model.vit.<module> and base_model.model.classifier.{weight,bias} (modules_to_save). "
        "*.last_hidden_state are model.vit(...).last_hidden_state (what a ViTModel built from these weights returns); "
        "eval.logits is the classifier head's output, for reference.",
    ),
    dict(
        name="vit_bf16",
        family="vit",
        dtype="bfloat16",
        seed=13,
        adapter=dict(target_modules=["q_proj", "v_proj", "fc1", "fc2"]),
        adapter_v4_targets=["query", "value", "intermediate.dense", "layer.0.output.dense", "layer.1.output.dense"],
        notes="bf16 weights (f32 randomised, then .to(bfloat16)); PEFT's lambdas and projections stay f32; outputs bf16. "
        "ViT interpolates the position embeddings in the model dtype (bf16 table and bf16 interpolation weights, f32 "
        "accumulation). adapter_v4 names fc2 'layer.N.output.dense' (a bare 'output.dense' would also match the "
        "checkpoint's attention.output.dense). f32base.* / f32eval.* are the same weights upcast to f32 (PEFT in f32): "
        "the accuracy reference for bf16.",
    ),
    dict(
        name="dinov2_base",
        family="dinov2",
        dtype="float32",
        seed=21,
        sharded=True,
        adapter=dict(target_modules=["q_proj", "v_proj", "o_proj", "fc1"]),
        adapter_v4_targets=["query", "value", "output.dense", "fc1"],
        sampled=dict(target_modules=["q_proj", "v_proj"], generator_seed=42, sample_at_inference=True),
        merged=True,
        notes="Dinov2Model; layer scales randomised. PEFT's default targets for dinov2 (['query', 'value']) match nothing "
        "under transformers 5 (spec 9.8), so the adapters name their targets explicitly.",
    ),
    dict(
        name="dinov2_task",
        family="dinov2",
        task=True,
        dtype="float32",
        seed=22,
        adapter=dict(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
        adapter_v4_targets=["query", "value"],
        notes="Dinov2ForImageClassification(num_labels=3): weights under `dinov2.` plus `classifier` (2*hidden -> 3). "
        "*.last_hidden_state are model.dinov2(...).last_hidden_state; eval.logits for reference.",
    ),
    dict(
        name="dinov2_bf16",
        family="dinov2",
        dtype="bfloat16",
        seed=23,
        adapter=dict(target_modules=["q_proj", "v_proj", "fc2"]),
        adapter_v4_targets=["query", "value", "fc2"],
        notes="bf16 weights; DINOv2 casts the position grid to f32 for the bicubic resize and back to bf16. "
        "f32base.* / f32eval.* are the same weights upcast to f32 (PEFT in f32): the accuracy reference for bf16.",
    ),
    dict(
        name="dinov2_swiglu",
        family="dinov2",
        dtype="float32",
        seed=24,
        extra=dict(use_swiglu_ffn=True),
        adapter=dict(target_modules=["q_proj", "v_proj", "down_proj"]),
        adapter_v4_targets=["query", "value", "weights_out"],
        notes="use_swiglu_ffn=True: transformers 5 runs gate_proj/up_proj/down_proj, save_pretrained writes "
        "mlp.weights_in (gate rows first, then up) and mlp.weights_out.",
    ),
]


def outputs_of(model, family: str, task: bool, io: dict, tag: str, sizes=("", "_interp", "_odd")) -> dict:
    """`<tag><size>.last_hidden_state` (+ pooler_output when the model returns one, + logits for task classes)."""
    out = {}
    with torch.no_grad():
        for size in sizes:
            x = io[INPUT_NAMES[size]]
            native = size == ""
            inner = call(base_of(model, family, task), family, x, native)
            out[f"{tag}{size}.last_hidden_state"] = inner.last_hidden_state
            if not task and family == "vit" and inner.pooler_output is not None:
                out[f"{tag}{size}.pooler_output"] = inner.pooler_output
            if task and native:
                out[f"{tag}.logits"] = call(model, family, x, True).logits
    return out


def describe(key: str, c: dict) -> str:
    tag, field = key.split(".", 1)
    m = re.match(r"^(base|eval|merged|f32base|f32eval|sampled_\d+)(_interp|_odd)?$", tag)
    assert m, key
    what, size = m.group(1), m.group(2) or ""
    inp = INPUT_NAMES[size]
    fwd = (
        f"model.{c['family']}(pixel_values={inp}{', interpolate_pos_encoding=True' if c['family'] == 'vit' and size else ''})"
        if c.get("task") and field != "logits"
        else f"model(pixel_values={inp}{', interpolate_pos_encoding=True' if c['family'] == 'vit' and size else ''})"
    )
    if what == "base":
        return f"{field} of the base model from model/ (no adapter): {fwd}, eval, no_grad"
    if what == "eval":
        return f"{field}: PeftModel.from_pretrained(<model/>, 'adapter').eval(); {fwd}"
    if what in ("f32base", "f32eval"):
        return (
            f"{field}: the bf16 weights of model/ loaded with dtype=torch.float32"
            + (", PeftModel.from_pretrained(., 'adapter')" if what == "f32eval" else ", no adapter")
            + f"; {fwd}"
        )
    if what == "merged":
        return f"{field}: same PeftModel after merge_adapter(); {fwd}; then unmerge_adapter()"
    i = int(what.split("_")[1])
    return (
        f"{field}: sampled call #{i}: fresh PeftModel.from_pretrained(<model/>, 'adapter_sampled').eval() "
        f"(sample_at_inference=True, generator_seed={c['sampled']['generator_seed']}); calls sampled_0, sampled_1, "
        f"sampled_2 run in that order with pixel_values, pixel_values_interp, pixel_values"
    )


def write_case(root: Path, c: dict) -> None:
    from safetensors.torch import save_file

    family, task = c["family"], c.get("task", False)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c["dtype"]]
    d = root / c["name"]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    m = build_model(family, task, c.get("extra", {}), c["seed"], dtype)
    m.save_pretrained(str(d / "model"))
    if c.get("sharded"):
        sd = root / f"{family}_sharded"
        if sd.exists():
            shutil.rmtree(sd)
        sd.mkdir(parents=True)
        m.save_pretrained(str(sd / "model"), max_shard_size="40KB")
        shard_meta = {
            "what": f"the weights of {c['name']}/model saved with save_pretrained(max_shard_size='40KB') "
            "(model.safetensors.index.json + shards); its outputs are those of "
            f"{c['name']}/io.safetensors (base.*, eval.* with {c['name']}/adapter)",
            "same_as": c["name"],
            "versions": versions(),
        }
        (sd / "case.json").write_text(json.dumps(shard_meta, indent=2, sort_keys=True) + "\n")
    adapters = []
    save_adapter(m, c["adapter"], d / "adapter", c["seed"] + 1000)
    adapters.append(("adapter", "transformers-5 scheme (as PEFT 0.21.2 saves it under transformers 5.24)"))
    rename_adapter_to_checkpoint(d / "adapter", d / "adapter_v4", family, c["adapter_v4_targets"])
    adapters.append(("adapter_v4", "the same tensors renamed to the checkpoint scheme (a transformers-4 era adapter)"))
    if c.get("sampled"):
        save_adapter(m, dict(c["sampled"]), d / "adapter_sampled", c["seed"] + 2000)
        adapters.append(("adapter_sampled", "transformers-5 scheme, generator_seed + sample_at_inference=True"))
        v4 = [{"q_proj": "query", "v_proj": "value"}[t] for t in c["sampled"]["target_modules"]]
        rename_adapter_to_checkpoint(d / "adapter_sampled", d / "adapter_sampled_v4", family, v4)
        adapters.append(("adapter_sampled_v4", "adapter_sampled renamed to the checkpoint scheme"))

    io = make_inputs()
    outputs = {}
    torch.manual_seed(0)
    base = load_model(family, task, d / "model")
    outputs.update(outputs_of(base, family, task, io, "base"))
    pm = load_peft(family, task, d / "model", d / "adapter")
    outputs.update(outputs_of(pm.base_model.model, family, task, io, "eval"))
    if dtype != torch.float32:
        from peft import PeftModel

        m32 = model_class(family, task).from_pretrained(str(d / "model"), dtype=torch.float32).eval()
        outputs.update(outputs_of(m32, family, task, io, "f32base"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p32 = PeftModel.from_pretrained(m32, str(d / "adapter")).eval()
        outputs.update(outputs_of(p32.base_model.model, family, task, io, "f32eval"))
    if c.get("merged"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.merge_adapter()
        outputs.update(outputs_of(pm.base_model.model, family, task, io, "merged", sizes=("", "_interp")))
        pm.unmerge_adapter()
    if c.get("sampled"):
        torch.manual_seed(0)
        ps = load_peft(family, task, d / "model", d / "adapter_sampled")
        with torch.no_grad():
            for i, (inp, native) in enumerate([("pixel_values", True), ("pixel_values_interp", False), ("pixel_values", True)]):
                outputs[f"sampled_{i}.last_hidden_state"] = call(ps.base_model.model, family, io[inp], native).last_hidden_state
    sanity(c, outputs)

    tensors = {**io, **{k: v.detach().contiguous() for k, v in outputs.items()}}
    save_file(dict(sorted(tensors.items())), str(d / "io.safetensors"), metadata={"format": "pt"})

    meta = {
        "family": family,
        "model_class": type(base).__name__,
        "base_model_class": "ViTModel" if family == "vit" else "Dinov2Model",
        "task_prefix": family if task else None,
        "dtype": c["dtype"],
        "attn_implementation": base.config._attn_implementation,
        "config": json.loads((d / "model" / "config.json").read_text()),
        "sharded_copy": f"../{family}_sharded/model" if c.get("sharded") else None,
        "adapters": [
            {"dir": a, "scheme": s, "config": json.loads((d / a / "adapter_config.json").read_text())} for a, s in adapters
        ],
        "inputs": {k: INPUTS_DOC[k] + f", torch.Generator().manual_seed({INPUT_SEED}) in this order" for k in io},
        "outputs": {k: describe(k, c) for k in sorted(outputs)},
        "sampling": (
            {
                "adapter": "adapter_sampled",
                "calls": ["sampled_0", "sampled_1", "sampled_2"],
                "inputs": ["pixel_values", "pixel_values_interp", "pixel_values"],
                "mode": "sample_at_inference",
                "generator_seed": c["sampled"]["generator_seed"],
            }
            if c.get("sampled")
            else None
        ),
        "recipe": (
            f"torch.manual_seed({c['seed']}); {type(base).__name__}(config) with {json.dumps(c.get('extra', {}))}; "
            f"randomize() (see the script); .to({c['dtype']}); save_pretrained('model'); torch.manual_seed({c['seed'] + 1000}); "
            f"get_peft_model(deepcopy(model), PveraConfig(r=4, init_weights=False, **{c['adapter']})).save_pretrained('adapter')"
        ),
        "notes": c["notes"],
        "versions": versions(),
    }
    (d / "case.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def sanity(c: dict, out: dict) -> None:
    f32 = c["dtype"] == "float32"
    for k in out:
        if k.startswith(("eval", "f32eval")) and k.endswith("last_hidden_state"):
            b = out[k.replace("eval", "base", 1)]  # f32eval -> f32base
            assert not torch.allclose(out[k].float(), b.float(), atol=1e-3), f"{c['name']}: adapter has no effect on {k}"
        if k.startswith("merged") and f32:
            e = out[k.replace("merged", "eval", 1)]
            assert (out[k] - e).abs().max() < 1e-4, k
        if k.startswith("sampled"):
            e = out["eval.last_hidden_state" if not k.startswith("sampled_1") else "eval_interp.last_hidden_state"]
            assert not torch.allclose(out[k], e), k
    assert not torch.equal(out["sampled_0.last_hidden_state"], out["sampled_2.last_hidden_state"]) if "sampled_0.last_hidden_state" in out else True


# --------------------------------------------------------------------------------------------------------------
# Bicubic and the DINOv2-S layout
# --------------------------------------------------------------------------------------------------------------

BICUBIC_CASES = [
    # (channels, in_h, in_w, out_h, out_w)
    (3, 4, 4, 5, 6),
    (2, 5, 7, 3, 11),
    (4, 37, 37, 16, 16),
    (2, 37, 37, 23, 41),
    (3, 4, 4, 7, 2),
    (2, 1, 1, 3, 3),
    (2, 2, 3, 1, 1),
    (2, 16, 16, 37, 37),
    (2, 6, 6, 6, 6),
    (1, 9, 13, 4, 29),
]


def write_bicubic(root: Path) -> None:
    from safetensors.torch import save_file

    d = root / "dinov2_bicubic"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(99)
    tensors, cases = {}, []
    for i, (ch, ih, iw, oh, ow) in enumerate(BICUBIC_CASES):
        x = torch.randn(1, ch, ih, iw, generator=g)
        tensors[f"in_{i}"] = x
        tensors[f"out_{i}"] = torch.nn.functional.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False)
        xb = x.to(torch.bfloat16)
        tensors[f"in_bf16_{i}"] = xb
        tensors[f"out_bf16_{i}"] = torch.nn.functional.interpolate(xb, size=(oh, ow), mode="bicubic", align_corners=False)
        cases.append({"index": i, "channels": ch, "in": [ih, iw], "out": [oh, ow]})
    save_file(dict(sorted(tensors.items())), str(d / "io.safetensors"), metadata={"format": "pt"})
    meta = {
        "what": "out_i = torch.nn.functional.interpolate(in_i, size=out, mode='bicubic', align_corners=False) on the CPU "
        "(f32); out_bf16_i the same on in_bf16_i = in_i.to(bfloat16). in_i = torch.randn(1, C, H, W) from "
        "torch.Generator().manual_seed(99), cases in order.",
        "cases": cases,
        "versions": versions(),
    }
    (d / "case.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_dinov2_s_layout(root: Path) -> None:
    import tempfile

    from safetensors import safe_open
    from transformers import Dinov2Config, Dinov2Model

    d = root / "dinov2_s_layout"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        m = Dinov2Model(Dinov2Config(**DINO_S_CFG))
        m.save_pretrained(tmp)
        with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
            keys = sorted([k, list(f.get_slice(k).get_shape())] for k in f.keys())
        shutil.copy(Path(tmp) / "config.json", d / "config.json")
    meta = {
        "what": "tensor names and shapes of Dinov2Model(Dinov2Config(**DINO_S_CFG)).save_pretrained (DINOv2-S: hidden 384, "
        "6 heads, 12 layers, image_size 518, patch 14, layer_norm_eps 1e-6); config.json is the one it writes",
        "config_kwargs": DINO_S_CFG,
        "keys": keys,
        "versions": versions(),
    }
    (d / "case.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output root (default {DEFAULT_OUT})")
    ap.add_argument("--only", nargs="*", help="write only these cases")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root: Path = args.out
    root.mkdir(parents=True, exist_ok=True)
    for c in CASES:
        if args.only and c["name"] not in args.only:
            continue
        c = {**c, "adapter": dict(r=4, init_weights=False, **c["adapter"])}
        if c.get("sampled"):
            c["sampled"] = dict(r=4, init_weights=False, **c["sampled"])
        write_case(root, c)
        print(f"wrote {c['name']}")
    if not args.only or "dinov2_bicubic" in args.only:
        write_bicubic(root)
        print("wrote dinov2_bicubic")
    if not args.only or "dinov2_s_layout" in args.only:
        write_dinov2_s_layout(root)
        print("wrote dinov2_s_layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
