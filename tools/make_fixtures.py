# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "peft==0.21.2", "transformers>=5", "safetensors>=0.4"]
# ///
"""Golden fixtures for the `pvera` crate, produced by Hugging Face PEFT's PVeRA (peft 0.21.2, torch 2.15.0).

    python3 tools/make_fixtures.py [--out DIR] [--only CASE ...]

Writes one directory per case under `crates/pvera/tests/fixtures/peft/` (or `--out`), plus `versions.json`:

    <case>/case.json               model, dtype, adapters (+ the PveraConfig kwargs), active adapters, the list
                                   of stored checks with how each was made, sampling recipe, notes, recipe
    <case>/base_model.safetensors  the base model's own state_dict before get_peft_model, in the case dtype
    <case>/adapter/...             what `peft_model.save_pretrained("adapter")` wrote (README.md removed)
    <case>/io.safetensors          inputs and every check output (see `check_descriptions`)

Everything is deterministic: the global torch RNG is seeded before every step that consumes it, the inputs use
their own generator, and the script re-executes itself with PYTHONHASHSEED=0 because PEFT stores a list
`target_modules` as a `set` and writes it to adapter_config.json in hash order.

`tools/check_in_peft.py` imports this module (models, loading, the output recipes) to re-run cases written by
the Rust side in PEFT, so the recipes below are the single definition of what every stored output means.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import warnings
import zlib
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "crates" / "pvera" / "tests" / "fixtures" / "peft"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INPUT_SEED = 1234  # seed of the private generator that draws `input` and `input_b1`
IN_FEATURES = 10  # both models take 10 input features


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """PEFT's tests/test_pvera.py MLP, verbatim (10 -> 20 -> 20 -> 20 -> 2, ReLU, LogSoftmax)."""

    def __init__(self, bias=True):
        super().__init__()
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 20, bias=bias)  # lin1 and lin2 have same shape
        self.lin2 = nn.Linear(20, 20, bias=bias)
        self.lin3 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.lin0(X)
        X = self.relu(X)
        X = self.lin1(X)
        X = self.relu(X)
        X = self.lin2(X)
        X = self.relu(X)
        X = self.lin3(X)
        X = self.sm(X)
        return X


class Conv1DModel(nn.Module):
    """GPT-2 style: conv1d_a = Conv1D(nf=16, nx=10) (weight (10, 16)), ReLU, conv1d_b = Conv1D(nf=4, nx=16)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv1d_a = Conv1D(nf=16, nx=10)
        self.relu = nn.ReLU()
        self.conv1d_b = Conv1D(nf=4, nx=16)

    def forward(self, X):
        return self.conv1d_b(self.relu(self.conv1d_a(X)))


def build_base(model: str, dtype: str) -> nn.Module:
    """The seeded base model: torch.manual_seed(0), construct, (conv1d: random biases), .to(dtype)."""
    torch.manual_seed(0)
    if model == "mlp":
        m = MLP()
    elif model == "conv1d":
        m = Conv1DModel()  # Conv1D: weight ~ N(0, 0.02), bias = 0
        with torch.no_grad():
            m.conv1d_a.bias.copy_(0.1 * torch.randn(16))
            m.conv1d_b.bias.copy_(0.1 * torch.randn(4))
    else:
        raise ValueError(f"unknown model {model!r}")
    return m.to(DTYPES[dtype])


def load_base(model: str, dtype: str, path: Path) -> nn.Module:
    """Rebuild a base model from `base_model.safetensors` (strict: every key, exact shapes)."""
    from safetensors.torch import load_file

    m = build_base(model, dtype)
    m.load_state_dict(load_file(str(path)), strict=True)
    return m


def make_inputs(dtype: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(INPUT_SEED)
    x = torch.randn(5, IN_FEATURES, generator=g)
    x_b1 = torch.randn(1, IN_FEATURES, generator=g)
    return {"input": x.to(DTYPES[dtype]), "input_b1": x_b1.to(DTYPES[dtype])}


# --------------------------------------------------------------------------------------------------------------
# Recipes shared with check_in_peft.py
# --------------------------------------------------------------------------------------------------------------


def pvera_layers(peft_model) -> list[tuple[str, nn.Module]]:
    """(module path relative to the base model, layer) for every PVeRA layer, in named_modules() order."""
    from peft.tuners.pvera.layer import PveraLayer

    return [(n, m) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PveraLayer)]


def set_active(peft_model, active: list[str]) -> None:
    if len(active) == 1:
        peft_model.set_adapter(active[0])
    else:
        peft_model.base_model.set_adapter(list(active))


def run_sampling(peft_model, case: dict, io: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sampled calls. Must run on a model whose per-layer generators are fresh (nothing sampled yet).

    mode "train": peft_model.train(); mode "sample_at_inference": peft_model.eval() (the config samples).
    torch.manual_seed(0) first (only generator-less noise would use it). Calls run in order, under no_grad.
    Optional "per_module" block: every layer generator is re-seeded with its own initial_seed(), the
    sample_at_inference flag is set True only in the listed module paths (False elsewhere), then its calls run.
    """
    s = case.get("sampling")
    out: dict[str, torch.Tensor] = {}
    if not s:
        return out
    set_active(peft_model, case["active"])
    torch.manual_seed(0)
    if s["mode"] == "train":
        peft_model.train()
    elif s["mode"] == "sample_at_inference":
        peft_model.eval()
    else:
        raise ValueError(f"unknown sampling mode {s['mode']!r}")
    with torch.no_grad():
        for name, inp in zip(s["calls"], s["inputs"], strict=True):
            out[name] = peft_model(io[inp])
        pm = s.get("per_module")
        if pm:
            for path, layer in pvera_layers(peft_model):
                for a in list(layer.sample_at_inference):
                    g = layer.pvera_generator[a]
                    if g is not None:
                        g.manual_seed(g.initial_seed())
                    layer.sample_at_inference[a] = path in pm["sample_in"]
            for name, inp in zip(pm["calls"], pm["inputs"], strict=True):
                out[name] = peft_model(io[inp])
    return out


def compute_outputs(peft_model, case: dict, io: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every deterministic check, computed after `run_sampling` (see `check_descriptions` for the meaning).

    Leaves the model in eval mode, unmerged, with the case's active adapters.
    """
    adapters = [a["name"] for a in case["adapters"]]
    active = case["active"]
    layers = pvera_layers(peft_model)
    out: dict[str, torch.Tensor] = {}

    # mean path from here on: eval mode and every layer's sample_at_inference flag off
    peft_model.eval()
    for _, layer in layers:
        for a in list(layer.sample_at_inference):
            layer.sample_at_inference[a] = False
    set_active(peft_model, active)

    with torch.no_grad():
        out["pvera_A"] = peft_model.base_model.pvera_A[adapters[0]]
        out["pvera_B"] = peft_model.base_model.pvera_B[adapters[0]]
        for path, layer in layers:
            for a in adapters:
                if a in layer.pvera_lambda_d:
                    out[f"lambda_b.{path}.{a}"] = layer.pvera_lambda_b[a]
                    out[f"lambda_d.{path}.{a}"] = layer.pvera_lambda_d[a]
                    out[f"delta_weight.{path}.{a}"] = layer.get_delta_weight(a)

        out["eval_output"] = peft_model(io["input"])
        out["eval_output_b1"] = peft_model(io["input_b1"])
        for a in adapters:
            set_active(peft_model, [a])
            out[f"eval_output_{a}"] = peft_model(io["input"])
        set_active(peft_model, active)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bias != "none" warns that this is not the base model
            with peft_model.disable_adapter():
                out["base_output"] = peft_model(io["input"])

        peft_model.base_model.merge_adapter()
        for path, layer in layers:
            out[f"merged_weight.{path}"] = layer.get_base_layer().weight.detach().clone()
        out["merged_output"] = peft_model(io["input"])
        peft_model.base_model.unmerge_adapter()
        for path, layer in layers:
            out[f"unmerged_weight.{path}"] = layer.get_base_layer().weight.detach().clone()
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def check_descriptions(case: dict, names: list[str]) -> dict[str, str]:
    sampling = case.get("sampling") or {}
    per_module = sampling.get("per_module") or {}
    calls = dict(zip(sampling.get("calls", []), sampling.get("inputs", [])))
    pm_calls = dict(zip(per_module.get("calls", []), per_module.get("inputs", [])))
    active = case["active"]
    d = {}
    for n in names:
        if n in calls:
            i = sampling["calls"].index(n)
            how = "model.train()" if sampling["mode"] == "train" else "model.eval() (sample_at_inference)"
            d[n] = (
                f"sampled call #{i}: {how}, model({calls[n]}) with fresh generators (generator_seed="
                f"{sampling['generator_seed']}); calls run in list order, first thing after loading"
            )
        elif n in pm_calls:
            d[n] = (
                f"per-module sampling: after the sampled calls, each layer generator re-seeded with its seed and "
                f"sample_at_inference True only in {per_module['sample_in']}; model.eval(); model({pm_calls[n]})"
            )
        elif n == "pvera_A" or n == "pvera_B":
            d[n] = f"model-level projection base_model.{n}[first adapter], f32 (stored even if not saved)"
        elif n.startswith("lambda_"):
            d[n] = f"layer.pvera_{n.split('.')[0]}[adapter] (lambda_<b|d>.<path>.<adapter>)"
        elif n.startswith("delta_weight."):
            d[n] = "layer.get_delta_weight(adapter) (delta_weight.<path>.<adapter>); (in, out) for Conv1D"
        elif n == "eval_output":
            d[n] = f"model.eval(), active {active}, mean path (sample_at_inference flags off), model(input)"
        elif n == "eval_output_b1":
            d[n] = "as eval_output, model(input_b1)"
        elif n.startswith("eval_output_"):
            d[n] = f"as eval_output with only adapter {n[len('eval_output_'):]!r} active"
        elif n == "base_output":
            d[n] = "with model.disable_adapter(): model(input) (biases/modules_to_save as the adapter left them)"
        elif n.startswith("merged_weight."):
            d[n] = f"base layer weight after base_model.merge_adapter() with {active} active"
        elif n == "merged_output":
            d[n] = f"model(input) after base_model.merge_adapter() with {active} active (then unmerged)"
        elif n.startswith("unmerged_weight."):
            d[n] = (
                "base layer weight after merge_adapter() then unmerge_adapter() (W += delta; W -= delta in place: "
                "not bitwise the base weight, even in f32)"
            )
        else:
            raise KeyError(n)
    return d


# --------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------


def _cfg(**kw):
    return kw


def _train_calls(prefix="sampled"):
    inputs = ["input", "input", "input_b1", "input_b1"]
    return [f"{prefix}_{i}" for i in range(len(inputs))], inputs


CASES: list[dict] = []


def case(name, *, adapters, model="mlp", dtype="float32", active=None, perturb=None, sampling=None, notes=""):
    CASES.append(
        {
            "name": name,
            "model": model,
            "dtype": dtype,
            "adapters": [{"name": n, "config": c} for n, c in adapters],
            "active": active or [adapters[0][0]],
            "perturb": perturb,
            "sampling": sampling,
            "notes": notes,
        }
    )


case(
    "mlp_list",
    adapters=[("default", _cfg(target_modules=["lin0", "lin3"], r=4, init_weights=False))],
    notes="Different layer shapes: A is (2r, 20) = (8, 20) (largest in: lin3), B is (20, r) (largest out: lin0); "
    "lin0 slices A[:, :10], lin3 slices B[:2].",
)
case(
    "mlp_regex_odd_r",
    adapters=[("default", _cfg(target_modules="lin[12]", r=3, init_weights=False))],
    notes="target_modules is a str: re.fullmatch against the module path; saved as the same str. Odd r=3: "
    "A (6, 20), lambda_d has 6 entries, mu = first 3 columns.",
)
case(
    "mlp_default_init",
    adapters=[("default", _cfg(target_modules=["lin1"]))],
    notes="Defaults: r=256, init_weights=True, d_initial=0.1 -> lambda_d = 0.1 everywhere (all 512), "
    "lambda_b = 0, so eval_output == base_output and delta_weight == 0. A is (512, 20), B is (20, 256).",
)
case(
    "mlp_two_adapters",
    adapters=[
        ("default", _cfg(target_modules=["lin1", "lin2"], r=4, init_weights=False)),
        ("other", _cfg(target_modules=["lin1", "lin2"], r=4, init_weights=False)),
    ],
    active=["default", "other"],
    notes="Second adapter via peft_model.add_adapter('other', cfg); it reuses the first adapter's A/B. "
    "eval_output/merged_output with both active (base_model.set_adapter(['default','other'])): the deltas add. "
    "Saved to adapter/ and adapter/other/ (both files hold the same pvera_A/pvera_B).",
)
case(
    "mlp_no_projection",
    adapters=[
        ("first", _cfg(target_modules=["lin1", "lin2"], r=4, init_weights=False, save_projection=False)),
        ("second", _cfg(target_modules=["lin1", "lin2"], r=4, init_weights=False, save_projection=False)),
    ],
    active=["first", "second"],
    notes="save_projection=False: adapter files hold no pvera_A/pvera_B, the loader regenerates them from "
    "projection_prng_key=0 (kaiming_uniform_, A then B from one CPU generator). io.safetensors still has "
    "pvera_A/pvera_B. Non-default names: saved to adapter/first/ and adapter/second/ (nothing in adapter/ itself).",
)
case(
    "mlp_modules_to_save",
    adapters=[("default", _cfg(target_modules=["lin0"], modules_to_save=["lin1"], r=4, init_weights=False))],
    perturb="modules_to_save",
    notes="After get_peft_model: base_model.model.lin1.modules_to_save['default'].weight += 0.5 and .bias -= 0.25, "
    "so the saved base_model.model.lin1.{weight,bias} differ from base_model.safetensors. base_output uses the "
    "original lin1 (disable_adapter also disables the modules_to_save copy).",
)
case(
    "mlp_bias_all",
    adapters=[("default", _cfg(target_modules=["lin1"], bias="all", r=4, init_weights=False))],
    perturb="bias",
    notes="bias='all': every *.bias is trainable and saved (lin1's as base_model.model.lin1.base_layer.bias, others "
    "as base_model.model.linN.bias). After get_peft_model each trainable bias got += 0.1 * randn (seeded), so the "
    "saved biases differ from base_model.safetensors. base_output (disable_adapter) keeps the perturbed biases: "
    "PEFT only warns that it is not the base model.",
)
case(
    "mlp_bias_pvera_only",
    adapters=[("default", _cfg(target_modules=["lin1"], bias="pvera_only", r=4, init_weights=False))],
    perturb="bias",
    notes="bias='pvera_only': only base_model.model.lin1.base_layer.bias is trainable and saved; it got "
    "+= 0.1 * randn (seeded) after get_peft_model. base_output keeps the perturbed bias.",
)
_calls, _inputs = _train_calls()
case(
    "mlp_seeded_train",
    adapters=[("default", _cfg(target_modules=["lin1", "lin2"], r=4, init_weights=False, generator_seed=42))],
    sampling={"generator_seed": 42, "mode": "train", "calls": _calls, "inputs": _inputs},
    notes="model.train(); eps = torch.randn(mu.shape, generator=g) with one CPU generator per layer, all seeded "
    "42, so lin1 and lin2 (same shape) draw identical eps on every call. input: mu is (5, 4) = 20 values -> "
    "vectorised normal_fill (one block of 16 + a tail block of 16 fresh uniforms); input_b1: 4 values -> "
    "scalar double Box-Muller path (2 pairs, no spare left over). Generator states advance call to call.",
)
case(
    "mlp_seeded_train_odd_r",
    adapters=[("default", _cfg(target_modules=["lin1"], r=3, init_weights=False, generator_seed=42))],
    sampling={
        "generator_seed": 42,
        "mode": "train",
        "calls": ["sampled_0", "sampled_1", "sampled_2", "sampled_3"],
        "inputs": ["input_b1", "input_b1", "input", "input_b1"],
    },
    notes="Scalar randn path with the cached spare: r=3, input_b1 -> 3 values (2 pairs drawn, 1 spare cached); "
    "next input_b1 uses the spare then 1 pair (spare cached); input -> 15 values < 16, still the scalar path "
    "(spare + 7 pairs, nothing cached); last input_b1 starts fresh pairs.",
)
case(
    "mlp_seeded_inference",
    adapters=[
        (
            "default",
            _cfg(target_modules=["lin1", "lin2"], r=8, init_weights=False, generator_seed=7, sample_at_inference=True),
        )
    ],
    sampling={"generator_seed": 7, "mode": "sample_at_inference", "calls": _calls, "inputs": _inputs},
    notes="sample_at_inference=True, model.eval(): sampling in eval mode. input: mu (5, 8) = 40 values -> two "
    "blocks of 16 and a tail block (16 fresh uniforms for the last 16 positions); input_b1: 8 values -> scalar "
    "path. eval_output etc. are the mean path, made by setting every layer.sample_at_inference[a] = False.",
)
case(
    "mlp_sample_dict",
    adapters=[
        (
            "default",
            _cfg(
                target_modules=["lin1", "lin2"],
                r=4,
                init_weights=False,
                generator_seed=3,
                sample_at_inference={"lin1": True},
            ),
        )
    ],
    sampling={
        "generator_seed": 3,
        "mode": "sample_at_inference",
        "calls": ["peft_sampled_0", "peft_sampled_1"],
        "inputs": ["input", "input_b1"],
        "per_module": {
            "sample_in": ["lin1"],
            "calls": ["permodule_sampled_0", "permodule_sampled_1"],
            "inputs": ["input", "input_b1"],
        },
    },
    notes="PEFT 0.21.2 bug (spec 9.1): sample_at_inference is typed bool and a dict is only tested for truthiness, "
    "so {'lin1': True} samples in BOTH lin1 and lin2: peft_sampled_* are what PEFT computes (eval mode). "
    "permodule_sampled_* are the documented per-module meaning (sample only in lin1), made in PEFT by re-seeding "
    "every layer generator with 3 and setting lin2.sample_at_inference['default'] = False. The saved "
    "adapter_config.json keeps the dict.",
)
for _dt, _short in (("float16", "fp16"), ("bfloat16", "bf16")):
    case(
        f"mlp_{_short}",
        dtype=_dt,
        adapters=[("default", _cfg(target_modules=["lin1", "lin2"], r=4, init_weights=False))],
        notes=f"MLP().to({_dt}); inputs/outputs/base weights in {_dt}. autocast_adapter_dtype=True (default) keeps "
        f"lambda and A/B in f32: the adapter computes x.to(f32) and the f32 delta is added to the {_dt} base "
        f"output, then cast back. delta_weight is f32; merge is `W.data += delta` in place on the {_dt} weight, "
        f"computed in f32 and rounded once ((W.float() + delta).to({_dt}), not W + delta.to({_dt})); unmerge "
        f"likewise, so unmerged_weight is not exactly the base weight.",
    )
case(
    "conv1d",
    model="conv1d",
    adapters=[("default", _cfg(target_modules=["conv1d_a", "conv1d_b"], r=4, init_weights=False))],
    notes="transformers Conv1D layers (weight stored (in, out)). PEFT forces fan_in_fan_out=True with a warning, "
    "the saved config shows true. A is (8, 16) (largest in: conv1d_b), B is (16, 4) (largest out: conv1d_a). "
    "delta_weight and weights are (in, out).",
)
case(
    "mlp_dropout",
    adapters=[("default", _cfg(target_modules=["lin1", "lin2"], r=4, init_weights=False, pvera_dropout=0.1))],
    notes="pvera_dropout=0.1 round-trips through adapter_config.json; only eval outputs (dropout is off in eval).",
)
case(
    "mlp_key_nonzero",
    adapters=[("default", _cfg(target_modules=["lin0", "lin2"], r=5, init_weights=False, projection_prng_key=123))],
    notes="projection_prng_key=123, r=5: A (10, 20), B (20, 5) from torch.Generator().manual_seed(123).",
)
case(
    "mlp_all_linear",
    adapters=[("default", _cfg(target_modules="all-linear", r=2, init_weights=False))],
    notes="'all-linear' on a plain nn.Module (no output embeddings): all four Linear layers, lin3 included; the "
    "saved config lists the resolved names (order from a set; read it as a set).",
)


def recipe(c: dict) -> str:
    mk = "torch.manual_seed(0); m = MLP()" if c["model"] == "mlp" else (
        "torch.manual_seed(0); m = Conv1DModel(); m.conv1d_a.bias = 0.1*randn(16); m.conv1d_b.bias = 0.1*randn(4)"
    )
    if c["dtype"] != "float32":
        mk += f".to(torch.{c['dtype']})"
    first, rest = c["adapters"][0], c["adapters"][1:]
    s = f"{mk}; torch.manual_seed(<crc32(name) & 0xffff>); pm = get_peft_model(m, PveraConfig(**{first['config']!r})"
    s += ")" if first["name"] == "default" else f", adapter_name={first['name']!r})"
    for a in rest:
        s += f"; pm.add_adapter({a['name']!r}, PveraConfig(**{a['config']!r}))"
    if c["perturb"] == "modules_to_save":
        s += "; lin1.modules_to_save['default'].weight += 0.5; .bias -= 0.25"
    elif c["perturb"] == "bias":
        s += "; torch.manual_seed(99); for every trainable *.bias: p += 0.1*torch.randn_like(p)"
    s += "; pm.save_pretrained('adapter'); rm adapter/README.md"
    s += f"; inputs from torch.Generator().manual_seed({INPUT_SEED}): input = randn(5,10), input_b1 = randn(1,10)"
    if c["sampling"]:
        s += "; make_fixtures.run_sampling"
    s += "; make_fixtures.compute_outputs"
    return s


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def perturb(pm, kind: str | None) -> None:
    if kind is None:
        return
    with torch.no_grad():
        if kind == "modules_to_save":
            mod = pm.base_model.model.lin1.modules_to_save["default"]
            mod.weight += 0.5
            mod.bias -= 0.25
        elif kind == "bias":
            torch.manual_seed(99)
            n = 0
            for name, p in pm.named_parameters():
                if name.endswith(".bias") and p.requires_grad:
                    p += 0.1 * torch.randn_like(p)
                    n += 1
            assert n > 0, "no trainable bias found"
        else:
            raise ValueError(kind)


def write_case(root: Path, c: dict) -> None:
    from peft import PveraConfig, get_peft_model
    from safetensors.torch import save_file

    d = root / c["name"]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    base = build_base(c["model"], c["dtype"])
    save_file({k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}, str(d / "base_model.safetensors"))

    torch.manual_seed(zlib.crc32(c["name"].encode()) & 0xFFFF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = c["adapters"][0]
        pm = get_peft_model(base, PveraConfig(**copy.deepcopy(first["config"])), adapter_name=first["name"])
        for a in c["adapters"][1:]:
            pm.add_adapter(a["name"], PveraConfig(**copy.deepcopy(a["config"])))
    perturb(pm, c["perturb"])

    pm.save_pretrained(str(d / "adapter"))
    (d / "adapter" / "README.md").unlink(missing_ok=True)
    dirs = []
    for a in c["adapters"]:
        rel = "adapter" if a["name"] == "default" else f"adapter/{a['name']}"
        assert (d / rel / "adapter_config.json").is_file(), rel
        dirs.append(rel)

    io = make_inputs(c["dtype"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = run_sampling(pm, c, io)
        outputs.update(compute_outputs(pm, c, io))
    if len(c["adapters"]) == 1:
        outputs.pop(f"eval_output_{c['adapters'][0]['name']}")
    sanity(c, outputs, io)

    names = list(outputs)
    tensors = {**io, **outputs}
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(d / "io.safetensors"))

    sampling = None
    if c["sampling"]:
        sampling = copy.deepcopy(c["sampling"])
    meta = {
        "model": c["model"],
        "dtype": c["dtype"],
        "adapters": [{"name": a["name"], "dir": r, "config": a["config"]} for a, r in zip(c["adapters"], dirs)],
        "active": c["active"],
        "checks": check_descriptions(c, names),
        "sampling": sampling,
        "inputs": {
            "input": f"torch.randn(5, {IN_FEATURES}, generator=torch.Generator().manual_seed({INPUT_SEED})), "
            f"cast to {c['dtype']}",
            "input_b1": "torch.randn(1, 10) from the same generator, right after input",
        },
        "notes": c["notes"],
        "recipe": recipe(c),
    }
    (d / "case.json").write_text(json.dumps(meta, indent=2) + "\n")


def sanity(c: dict, out: dict[str, torch.Tensor], io) -> None:
    """Invariants that must hold in PEFT; a failure means a fixture would be misleading."""
    f32 = c["dtype"] == "float32"
    if c["name"] == "mlp_default_init":
        assert torch.equal(out["eval_output"], out["base_output"])
    if not f32:
        return
    assert (out["merged_output"] - out["eval_output"]).abs().max() < 1e-5, c["name"]
    if c["name"] != "mlp_default_init" and not c["perturb"]:
        assert not torch.allclose(out["eval_output"], out["base_output"]), c["name"]
    for k in out:
        if k.startswith("sampled_") or k.startswith("peft_sampled_"):
            assert not torch.allclose(out[k], out["eval_output" if out[k].shape[0] == 5 else "eval_output_b1"]), k


def versions(cases: list[str]) -> dict:
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
        "generator": "tools/make_fixtures.py",
        "cases": cases,
    }


def main(argv=None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        # adapter_config.json writes set-valued target_modules in hash order: pin it
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output root (default {DEFAULT_OUT})")
    ap.add_argument("--only", nargs="*", help="write only these cases")
    args = ap.parse_args(argv)

    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        print(
            f"warning: CPU capability {cap}: torch's uniform/kaiming/randn kernels differ from the AVX2 ones the "
            "committed fixtures were made with (see versions.json and docs/torch-rng.md §1)",
            file=sys.stderr,
        )
    torch.set_num_threads(1)
    root: Path = args.out
    root.mkdir(parents=True, exist_ok=True)
    names = [c["name"] for c in CASES]
    for c in CASES:
        if args.only and c["name"] not in args.only:
            continue
        write_case(root, c)
        print(f"wrote {c['name']}")
    (root / "versions.json").write_text(json.dumps(versions(names), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
