# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "peft==0.21.2", "transformers==5.24.0", "safetensors>=0.4"]
# ///
"""Golden fixtures for pvera's VeRA adapters, produced by Hugging Face PEFT's own VeRA (peft 0.21.2, torch 2.15.0,
transformers 5.24.0).

    python3 tools/make_vera_fixtures.py [--out DIR] [--only PART ...]

Writes under `crates/pvera/tests/fixtures/vera/` (or `--out`), every tensor and file from PEFT itself:

    configs.json                  `VeraConfig(**kwargs).save_pretrained` text for many kwargs (every field PEFT writes),
                                  PeftModel.save_pretrained's text, and TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING
    projections.safetensors       vera_A / vera_B drawn by PEFT's `VeraModel._init_vera_A_vera_B` for several keys and
    projections.json              shapes (A (r, in_max) first, then B (out_max, r), one generator)
    mlp/<case>/                   the layout of tools/make_fixtures.py (case.json, base_model.safetensors, adapter/,
                                  io.safetensors), with VeRA adapters: projections, lambdas, delta weights, eval /
                                  base / merged / unmerged outputs and weights, a train-mode output with dropout, and
                                  the lambda gradients of one backward pass
    families/<case>/              a VeRA adapter on the tiny BERT / ViT / LLaMA / GPT-2 checkpoints already committed
                                  under fixtures/models (referenced, not copied): inputs, eval and merged outputs

Deterministic: torch's global generator is seeded before every step that draws from it, and the script re-executes
itself with PYTHONHASHSEED=0 (PEFT stores a list `target_modules` as a set, written in hash order).

`tools/check_in_peft.py` imports this module (`compute_outputs`, `run_grads`, `run_train`) to re-run MLP cases
written by the Rust side in PEFT (case.json `"method": "vera"`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (the MLP / Conv1D test models, inputs, set_active)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "crates" / "pvera" / "tests" / "fixtures" / "vera"
MODELS = REPO_ROOT / "crates" / "pvera" / "tests" / "fixtures" / "models"
GRAD_SEED = 4321  # generator of the fixed weights w of the gradient check's loss sum(w * y)


def written(config) -> str:
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        return (Path(d) / "adapter_config.json").read_text()


# --------------------------------------------------------------------------------------------------------------
# 1. configs
# --------------------------------------------------------------------------------------------------------------

CONFIGS = {
    "defaults": {},
    "list_targets": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
    "regex_target": {"r": 4, "target_modules": r".*\.(q|v)_proj"},
    "all_linear": {"target_modules": "all-linear"},
    "layers_int_pattern_str": {"target_modules": ["q_proj"], "layers_to_transform": 1, "layers_pattern": "layers"},
    "layers_list_pattern_list": {
        "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": [0, 2],
        "layers_pattern": ["h", "layers"],
    },
    "modules_to_save": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    "bias_all": {"target_modules": ["lin0"], "bias": "all"},
    "bias_vera_only": {"target_modules": ["lin0"], "bias": "vera_only"},
    "task_seq_cls": {"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    "key_big": {"target_modules": ["lin0"], "projection_prng_key": 2**64 - 1},
    "key_negative": {"target_modules": ["lin0"], "projection_prng_key": -7},
    "no_save_projection": {"target_modules": ["lin0"], "save_projection": False, "projection_prng_key": 42},
    "floats": {"target_modules": ["lin0"], "vera_dropout": 0.05, "d_initial": 1e-05},
    "floats_odd": {"target_modules": ["lin0"], "vera_dropout": 1 / 3, "d_initial": 123456789.125},
    "fan_in_fan_out_no_init": {"target_modules": ["c_attn"], "fan_in_fan_out": True, "init_weights": False},
    "every_field": {
        "r": 16,
        "target_modules": ["query", "value"],
        "projection_prng_key": 5,
        "save_projection": False,
        "vera_dropout": 0.1,
        "d_initial": 0.5,
        "fan_in_fan_out": True,
        "bias": "all",
        "modules_to_save": ["classifier", "pooler"],
        "init_weights": False,
        "layers_to_transform": [1, 3],
        "layers_pattern": "layer",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
        "revision": "v1",
        "inference_mode": True,
    },
}


def write_configs(out: Path) -> None:
    from peft import VeraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING as MAPPING

    files = {name: {"kwargs": kw, "text": written(VeraConfig(**copy.deepcopy(kw)))} for name, kw in CONFIGS.items()}
    torch.manual_seed(0)
    pm = get_peft_model(mf.MLP(), VeraConfig(r=4, target_modules=["lin0", "lin3"], modules_to_save=["lin1"]))
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        files["peft_model_mlp"] = {
            "kwargs": {"r": 4, "target_modules": ["lin0", "lin3"], "modules_to_save": ["lin1"]},
            "text": (Path(d) / "adapter_config.json").read_text(),
            "how": "get_peft_model(MLP(), VeraConfig(**kwargs)).save_pretrained(d)",
        }
    doc = {
        "how": "VeraConfig(**kwargs).save_pretrained(d); the text of d/adapter_config.json",
        "files": files,
        "default_targets": [[k, v] for k, v in MAPPING.items()],
        "layers_pattern_without_layers": repr_error(lambda: VeraConfig(target_modules=["q"], layers_pattern="h")),
    }
    (out / "configs.json").write_text(json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n")


def repr_error(f) -> str:
    try:
        f()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


# --------------------------------------------------------------------------------------------------------------
# 2. projections
# --------------------------------------------------------------------------------------------------------------

PROJECTIONS = [
    # (key, r, in_max, out_max)
    (0, 4, 20, 20),
    (0, 3, 10, 2),
    (42, 8, 32, 17),
    (123456789, 16, 64, 96),
    (2**32 + 5, 5, 7, 9),
    (2**64 - 1, 2, 3, 4),
]


def write_projections(out: Path) -> None:
    from peft import VeraConfig
    from peft.tuners.vera.model import VeraModel
    from safetensors.torch import save_file

    class Holder:
        """Just enough of a VeraModel for `_init_vera_A_vera_B` (PEFT's own code draws A then B)."""

        def __init__(self, in_max, out_max):
            self.dims = (out_max, in_max)

        def _find_dim(self, config):
            return self.dims

    tensors, rows = {}, []
    for i, (key, r, in_max, out_max) in enumerate(PROJECTIONS):
        h = Holder(in_max, out_max)
        VeraModel._init_vera_A_vera_B(h, VeraConfig(r=r, projection_prng_key=key), "default")
        tensors[f"A_{i}"] = h.vera_A["default"].contiguous()
        tensors[f"B_{i}"] = h.vera_B["default"].contiguous()
        assert tensors[f"A_{i}"].shape == (r, in_max) and tensors[f"B_{i}"].shape == (out_max, r)
        rows.append({"index": i, "projection_prng_key": key, "r": r, "in_max": in_max, "out_max": out_max})
    save_file(tensors, str(out / "projections.safetensors"))
    doc = {
        "how": "VeraModel._init_vera_A_vera_B with _find_dim -> (out_max, in_max): generator = "
        "torch.Generator().manual_seed(key); A_i = _kaiming_init((r, in_max)); B_i = _kaiming_init((out_max, r))",
        "cases": rows,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    (out / "projections.json").write_text(json.dumps(doc, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------------
# 3. MLP / Conv1D cases (the layout of make_fixtures.py)
# --------------------------------------------------------------------------------------------------------------


def vera_layers(peft_model):
    from peft.tuners.vera.layer import VeraLayer

    return [(n, m) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, VeraLayer)]


def run_train(peft_model, case: dict, io: dict) -> dict:
    """Train-mode outputs (VeRA samples nothing: only dropout differs from eval). torch.manual_seed(seed), then
    model.train() and model(input) under no_grad; the dropout masks come from torch's default generator."""
    t = case.get("train")
    if not t:
        return {}
    mf.set_active(peft_model, case["active"])
    torch.manual_seed(t["seed"])
    peft_model.train()
    with torch.no_grad():
        out = {"train_output": peft_model(io["input"])}
    peft_model.eval()
    return out


def run_grads(peft_model, case: dict, io: dict) -> dict:
    """One backward pass: active adapter's lambdas require grad, model.train() (no dropout in grad cases),
    loss = sum(grad_weights * model(input)) in f32; grad.lambda_<b|d>.<path>.<adapter> = the lambdas' .grad."""
    if not case.get("grads"):
        return {}
    mf.set_active(peft_model, case["active"])
    params = {}
    for path, layer in vera_layers(peft_model):
        for a in case["active"]:
            if a in layer.vera_lambda_d:
                params[f"grad.lambda_b.{path}.{a}"] = layer.vera_lambda_b[a]
                params[f"grad.lambda_d.{path}.{a}"] = layer.vera_lambda_d[a]
    before = {k: p.requires_grad for k, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    peft_model.train()
    y = peft_model(io["input"])
    (io["grad_weights"] * y.float()).sum().backward()
    out = {k: p.grad.detach().clone() for k, p in params.items()}
    for k, p in params.items():
        p.grad = None
        p.requires_grad_(before[k])
    peft_model.eval()
    return out


def compute_outputs(peft_model, case: dict, io: dict) -> dict:
    """Every deterministic check (see `check_descriptions`): after `run_grads` and `run_train`."""
    adapters = [a["name"] for a in case["adapters"]]
    active = case["active"]
    layers = vera_layers(peft_model)
    out = {}
    out.update(run_grads(peft_model, case, io))
    out.update(run_train(peft_model, case, io))
    peft_model.eval()
    mf.set_active(peft_model, active)
    with torch.no_grad():
        out["vera_A"] = peft_model.base_model.vera_A[adapters[0]]
        out["vera_B"] = peft_model.base_model.vera_B[adapters[0]]
        for path, layer in layers:
            for a in adapters:
                if a in layer.vera_lambda_d:
                    out[f"lambda_b.{path}.{a}"] = layer.vera_lambda_b[a]
                    out[f"lambda_d.{path}.{a}"] = layer.vera_lambda_d[a]
                    out[f"delta_weight.{path}.{a}"] = layer.get_delta_weight(a)
        out["eval_output"] = peft_model(io["input"])
        out["eval_output_b1"] = peft_model(io["input_b1"])
        if len(adapters) > 1:
            for a in adapters:
                mf.set_active(peft_model, [a])
                out[f"eval_output_{a}"] = peft_model(io["input"])
            mf.set_active(peft_model, active)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with peft_model.disable_adapter():
                out["base_output"] = peft_model(io["input"])
        peft_model.base_model.merge_adapter(safe_merge=True)
        for path, layer in layers:
            out[f"merged_weight.{path}"] = layer.get_base_layer().weight.detach().clone()
        out["merged_output"] = peft_model(io["input"])
        peft_model.base_model.unmerge_adapter()
        for path, layer in layers:
            out[f"unmerged_weight.{path}"] = layer.get_base_layer().weight.detach().clone()
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def check_descriptions(case: dict, names: list[str]) -> dict[str, str]:
    active = case["active"]
    d = {}
    for n in names:
        if n in ("vera_A", "vera_B"):
            d[n] = f"model-level projection base_model.{n}[first adapter], f32 (stored even if not saved)"
        elif n.startswith("grad."):
            d[n] = (
                f"run_grads: lambdas of {active} require grad, model.train(), loss = sum(grad_weights * "
                "model(input).float()), backward; the lambda's .grad (grad.lambda_<b|d>.<path>.<adapter>)"
            )
        elif n == "train_output":
            d[n] = f"run_train: torch.manual_seed({case['train']['seed']}); model.train(); model(input) (dropout masks "
            "from torch's default generator, one bernoulli_ per adapted layer in forward order)"
        elif n.startswith("lambda_"):
            d[n] = f"layer.vera_{n.split('.')[0]}[adapter] (lambda_<b|d>.<path>.<adapter>)"
        elif n.startswith("delta_weight."):
            d[n] = "layer.get_delta_weight(adapter) (delta_weight.<path>.<adapter>); (in, out) for Conv1D"
        elif n == "eval_output":
            d[n] = f"model.eval(), active {active}, model(input)"
        elif n == "eval_output_b1":
            d[n] = "as eval_output, model(input_b1)"
        elif n.startswith("eval_output_"):
            d[n] = f"as eval_output with only adapter {n[len('eval_output_'):]!r} active"
        elif n == "base_output":
            d[n] = "with model.disable_adapter(): model(input) (biases/modules_to_save as the adapter left them)"
        elif n.startswith("merged_weight."):
            d[n] = f"base layer weight after base_model.merge_adapter(safe_merge=True) with {active} active"
        elif n == "merged_output":
            d[n] = f"model(input) after base_model.merge_adapter(safe_merge=True) with {active} active (then unmerged)"
        elif n.startswith("unmerged_weight."):
            d[n] = "base layer weight after merge_adapter() then unmerge_adapter() (not bitwise the base weight)"
        else:
            raise KeyError(n)
    return d


CASES: list[dict] = []


def case(name, *, adapters, model="mlp", dtype="float32", active=None, perturb=None, train=None, grads=False, notes=""):
    CASES.append(
        {
            "name": name,
            "method": "vera",
            "model": model,
            "dtype": dtype,
            "adapters": [{"name": n, "config": c} for n, c in adapters],
            "active": active or [adapters[0][0]],
            "perturb": perturb,
            "train": train,
            "grads": grads,
            "notes": notes,
        }
    )


case(
    "mlp_list",
    adapters=[("default", dict(target_modules=["lin0", "lin3"], r=4, init_weights=False))],
    grads=True,
    notes="A is (r, 20) = (4, 20) (largest in: lin3), B is (20, r) (largest out: lin0); lin0 slices A[:, :10], lin3 "
    "slices B[:2]. init_weights=False: lambda_b = 1, lambda_d = torch.randn(r) from the global generator.",
)
case(
    "mlp_regex_odd_r",
    adapters=[("default", dict(target_modules="lin[12]", r=3, init_weights=False))],
    grads=True,
    notes="target_modules a str (re.fullmatch); r=3: A (3, 20), lambda_d 3 entries.",
)
case(
    "mlp_default_init",
    adapters=[("default", dict(target_modules=["lin1"]))],
    notes="Defaults: r=256, init_weights=True: lambda_d = d_initial = 0.1 (256 entries), lambda_b = 0, so "
    "eval_output == base_output and delta_weight == 0. A is (256, 20), B is (20, 256).",
)
case(
    "mlp_two_adapters",
    adapters=[
        ("default", dict(target_modules=["lin1", "lin2"], r=4, init_weights=False)),
        ("other", dict(target_modules=["lin1", "lin2"], r=4, init_weights=False)),
    ],
    active=["default", "other"],
    notes="Second adapter via add_adapter; it shares the first adapter's vera_A/vera_B. Both active: the deltas add.",
)
case(
    "mlp_no_projection",
    adapters=[
        ("first", dict(target_modules=["lin1", "lin2"], r=4, init_weights=False, save_projection=False)),
        ("second", dict(target_modules=["lin1", "lin2"], r=4, init_weights=False, save_projection=False)),
    ],
    active=["first", "second"],
    notes="save_projection=False: the files hold no vera_A/vera_B; the loader regenerates them from "
    "projection_prng_key=0. Saved to adapter/first/ and adapter/second/.",
)
case(
    "mlp_modules_to_save",
    adapters=[("default", dict(target_modules=["lin0"], modules_to_save=["lin1"], r=4, init_weights=False))],
    perturb="modules_to_save",
    grads=True,
    notes="lin1 is a modules_to_save copy (weight += 0.5, bias -= 0.25 after get_peft_model).",
)
case(
    "mlp_bias_vera_only",
    adapters=[("default", dict(target_modules=["lin1"], bias="vera_only", r=4, init_weights=False))],
    perturb="bias",
    notes="bias='vera_only': lin1's base_layer.bias is trained and saved (perturbed += 0.1 * randn).",
)
case(
    "mlp_dropout",
    adapters=[("default", dict(target_modules=["lin1", "lin2"], r=4, init_weights=False, vera_dropout=0.3))],
    train={"seed": 5},
    notes="vera_dropout=0.3: eval outputs ignore it; train_output is model.train() after torch.manual_seed(5), one "
    "dropout mask per adapted layer (lin1 then lin2) from torch's default generator.",
)
case(
    "mlp_key_nonzero",
    adapters=[("default", dict(target_modules=["lin0", "lin2"], r=5, init_weights=False, projection_prng_key=123))],
    notes="projection_prng_key=123, r=5: A (5, 20), B (20, 5).",
)
case(
    "mlp_bf16",
    dtype="bfloat16",
    adapters=[("default", dict(target_modules=["lin1", "lin2"], r=4, init_weights=False))],
    notes="MLP().to(bfloat16); lambdas and A/B stay f32 (autocast_adapter_dtype): the adapter runs in f32 and the "
    "sum is cast back to bf16. delta_weight is computed in f32 and cast to bf16 (cast_to_fp32 on CPU).",
)
case(
    "conv1d",
    model="conv1d",
    adapters=[("default", dict(target_modules=["conv1d_a", "conv1d_b"], r=4, init_weights=False))],
    grads=True,
    notes="transformers Conv1D layers (weight (in, out)); PEFT forces fan_in_fan_out=True. A (4, 16), B (16, 4).",
)


def write_mlp_case(root: Path, c: dict) -> None:
    from peft import VeraConfig, get_peft_model
    from safetensors.torch import save_file

    d = root / c["name"]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    base = mf.build_base(c["model"], c["dtype"])
    save_file({k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}, str(d / "base_model.safetensors"))

    torch.manual_seed(zlib.crc32(c["name"].encode()) & 0xFFFF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = c["adapters"][0]
        pm = get_peft_model(base, VeraConfig(**copy.deepcopy(first["config"])), adapter_name=first["name"])
        for a in c["adapters"][1:]:
            pm.add_adapter(a["name"], VeraConfig(**copy.deepcopy(a["config"])))
    mf.perturb(pm, c["perturb"])
    pm.save_pretrained(str(d / "adapter"))
    (d / "adapter" / "README.md").unlink(missing_ok=True)
    dirs = []
    for a in c["adapters"]:
        rel = "adapter" if a["name"] == "default" else f"adapter/{a['name']}"
        assert (d / rel / "adapter_config.json").is_file(), rel
        dirs.append(rel)

    io = mf.make_inputs(c["dtype"])
    if c["grads"]:
        io["grad_weights"] = torch.randn(5, 2 if c["model"] == "mlp" else 4, generator=torch.Generator().manual_seed(GRAD_SEED))
    # The checks run on a fresh load of the saved files, as check_in_peft.py and the Rust tests do.
    pm = reload(c, d, dirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = compute_outputs(pm, c, io)
    sanity(c, outputs)
    save_file({k: v.detach().clone().contiguous() for k, v in {**io, **outputs}.items()}, str(d / "io.safetensors"))
    meta = {
        "method": "vera",
        "model": c["model"],
        "dtype": c["dtype"],
        "adapters": [{"name": a["name"], "dir": r, "config": a["config"]} for a, r in zip(c["adapters"], dirs)],
        "active": c["active"],
        "checks": check_descriptions(c, list(outputs)),
        "sampling": None,
        "train": c["train"],
        "grads": c["grads"],
        "inputs": {
            "input": f"torch.randn(5, 10, generator=torch.Generator().manual_seed({mf.INPUT_SEED})), cast to {c['dtype']}",
            "input_b1": "torch.randn(1, 10) from the same generator, right after input",
            **({"grad_weights": f"torch.randn(5, out) from torch.Generator().manual_seed({GRAD_SEED})"} if c["grads"] else {}),
        },
        "notes": c["notes"],
        "recipe": f"torch.manual_seed(crc32(name) & 0xffff); get_peft_model(base, VeraConfig(**config)) (+ add_adapter); "
        f"perturb {c['perturb']}; save_pretrained('adapter'); fresh base + PeftModel.from_pretrained / load_adapter; "
        "make_vera_fixtures.compute_outputs",
    }
    (d / "case.json").write_text(json.dumps(meta, indent=2) + "\n")


def reload(c: dict, d: Path, dirs: list[str]):
    from peft import PeftModel

    base = mf.load_base(c["model"], c["dtype"], d / "base_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base, str(d / dirs[0]), adapter_name=c["adapters"][0]["name"])
        for a, rel in zip(c["adapters"][1:], dirs[1:]):
            pm.load_adapter(str(d / rel), adapter_name=a["name"])
    mf.set_active(pm, c["active"])
    return pm


def sanity(c: dict, out: dict) -> None:
    if c["name"] == "mlp_default_init":
        assert torch.equal(out["eval_output"], out["base_output"])
        return
    if c["dtype"] == "float32":
        assert (out["merged_output"] - out["eval_output"]).abs().max() < 1e-5, c["name"]
        if not c["perturb"]:
            assert not torch.allclose(out["eval_output"], out["base_output"]), c["name"]
    if c["train"]:
        assert not torch.allclose(out["train_output"], out["eval_output"]), "dropout changed nothing"
    for k, v in out.items():
        if k.startswith("grad."):
            assert v.abs().max() > 0, k


# --------------------------------------------------------------------------------------------------------------
# 4. model families (tiny checkpoints of fixtures/models)
# --------------------------------------------------------------------------------------------------------------

FAMILIES = [
    # (case, model fixture dir, VeraConfig kwargs, input names)
    ("bert", "bert_tiny", {"r": 4, "init_weights": False}, ["input_ids", "attention_mask", "token_type_ids"]),
    ("vit", "vit_base", {"r": 4, "init_weights": False, "target_modules": "QV"}, ["pixel_values"]),
    ("llama", "llama_base", {"r": 4, "init_weights": False}, ["input_ids", "attention_mask"]),
    ("gpt2", "gpt2_base", {"r": 4, "init_weights": False}, ["input_ids", "attention_mask"]),
    ("bert_all_linear", "bert_tiny", {"r": 4, "init_weights": False, "target_modules": "all-linear"},
     ["input_ids", "attention_mask", "token_type_ids"]),
]


def write_family(root: Path, name: str, model_case: str, kwargs: dict, inputs: list[str]) -> None:
    from peft import PeftModel, VeraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    d = root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model_dir = MODELS / model_case / "model"
    src_io = load_file(str(MODELS / model_case / "io.safetensors"))
    io = {k: src_io[k].clone() for k in inputs}
    kw = copy.deepcopy(kwargs)

    # The attention implementation the source fixture was made with (its case.json; default sdpa): they differ
    # at fully padded query positions, where pvera follows the source fixture.
    attn = json.loads((MODELS / model_case / "case.json").read_text()).get("attn_implementation", "sdpa")

    def fresh():
        return AutoModel.from_pretrained(str(model_dir), attn_implementation=attn).eval()

    if kw.get("target_modules") == "QV":
        names = [n for n, _ in fresh().named_modules()]
        kw["target_modules"] = ["q_proj", "v_proj"] if any(n.endswith("q_proj") for n in names) else ["query", "value"]
    torch.manual_seed(zlib.crc32(name.encode()) & 0xFFFF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(fresh(), VeraConfig(**kw))
    pm.save_pretrained(str(d / "adapter"))
    (d / "adapter" / "README.md").unlink(missing_ok=True)

    def fields(o) -> dict:
        out = {"last_hidden_state": o.last_hidden_state}
        if getattr(o, "pooler_output", None) is not None:
            out["pooler_output"] = o.pooler_output
        return out

    outputs = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = fresh()
        for k, v in fields(base(**io)).items():
            outputs[f"base.{k}"] = v
        pm = PeftModel.from_pretrained(fresh(), str(d / "adapter")).eval()
        for k, v in fields(pm(**io)).items():
            outputs[f"eval.{k}"] = v
        pm.base_model.merge_adapter()
        for k, v in fields(pm(**io)).items():
            outputs[f"merged.{k}"] = v
    assert (outputs["eval.last_hidden_state"] - outputs["base.last_hidden_state"]).abs().max() > 1e-4, name
    save_file({k: v.detach().clone().contiguous() for k, v in {**io, **outputs}.items()}, str(d / "io.safetensors"))
    saved = json.loads((d / "adapter" / "adapter_config.json").read_text())
    meta = {
        "method": "vera",
        "model_dir": f"../../../models/{model_case}/model",
        "model_class": type(base).__name__,
        "adapter": "adapter",
        "config": kw,
        "saved_target_modules": saved["target_modules"],
        "inputs": f"{inputs}, copied from fixtures/models/{model_case}/io.safetensors",
        "outputs": {
            "base.*": f"AutoModel.from_pretrained(model_dir, attn_implementation={attn!r}), no adapter",
            "eval.*": "PeftModel.from_pretrained(fresh model, 'adapter'), eval, no_grad",
            "merged.*": "the same after base_model.merge_adapter()",
        },
        "recipe": f"torch.manual_seed(crc32({name!r}) & 0xffff); get_peft_model(fresh model, VeraConfig(**config))"
        ".save_pretrained('adapter'); outputs from fresh loads, 1 thread",
    }
    (d / "case.json").write_text(json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    import platform

    import peft
    import safetensors
    import transformers

    return {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
        "generator": "tools/make_vera_fixtures.py",
    }


def main(argv=None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", help="parts: configs projections mlp families (default: all)")
    args = ap.parse_args(argv)
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        print("warning: not an AVX2 torch kernel build; projections will differ (docs/torch-rng.md §1)", file=sys.stderr)
    torch.set_num_threads(1)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.only or ["configs", "projections", "mlp", "families"])
    if "configs" in parts:
        write_configs(out)
        print("wrote configs.json")
    if "projections" in parts:
        write_projections(out)
        print("wrote projections")
    if "mlp" in parts:
        for c in CASES:
            write_mlp_case(out / "mlp", c)
            print(f"wrote mlp/{c['name']}")
    if "families" in parts:
        for f in FAMILIES:
            write_family(out / "families", *f)
            print(f"wrote families/{f[0]}")
    (out / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
