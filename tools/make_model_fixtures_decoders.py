# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "transformers==5.24.0", "peft==0.21.2", "safetensors"]
# ///
"""Decoder-family fixtures for `pvera` (LLaMA and GPT-2), made by transformers 5.24 + PEFT 0.21.2.

    python3 tools/make_model_fixtures_decoders.py [--out DIR] [--only CASE ...]

Writes one directory per case under `crates/pvera/tests/fixtures/models/` (or `--out`):

    <case>/model/            tiny random checkpoint from transformers `save_pretrained` (single file or sharded)
    <case>/adapter/          PEFT `save_pretrained` of a PVeRA adapter trained on the case's model class
    <case>/adapter_<x>/      further adapters (e.g. `adapter_task`: trained on the task class holding the same
                             weights; `adapter_base`: trained on the base class inside the task checkpoint)
    <case>/io.safetensors    inputs (`input_ids`, `attention_mask`, int64) and outputs `<check>.last_hidden_state`
                             / `<check>.logits` in the model dtype; see case.json `outputs` for how each was made
    <case>/case.json         model class, dtype, config, adapters (+ PveraConfig kwargs, class trained on),
                             outputs and their recipes, versions

No real LLaMA / GPT-2 weights exist offline: every checkpoint is a tiny random model. Weights are redrawn from a
seeded generator after construction (matrices N(0, 0.1), embeddings N(0, 0.5), norm weights 1 + N(0, 0.2), biases
N(0, 0.1)) so that norms, biases and heads all matter. Adapters use r=4, init_weights=False (lambda_d ~ randn);
lambda_b (ones under init_weights=False) is then redrawn as 1 + N(0, 0.5) before saving so every output row of
every adapted layer carries its own scale.

Deterministic: the script re-executes itself with PYTHONHASHSEED=0 (PEFT keeps a list `target_modules` as a set
and writes it in hash order), every random draw comes from a seeded generator, PEFT's README.md is removed.
Outputs use transformers' default attention (sdpa): fully masked query rows (left padding) give a zero attention
output, as torch's CPU sdpa does.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "crates" / "pvera" / "tests" / "fixtures" / "models"

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import peft  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel, PveraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLASSES = {
    "LlamaModel": LlamaModel,
    "LlamaForCausalLM": LlamaForCausalLM,
    "GPT2Model": GPT2Model,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}
# class -> (family, attribute holding the base model or None, has an LM head)
CLASS_INFO = {
    "LlamaModel": ("llama", None, False),
    "LlamaForCausalLM": ("llama", "model", True),
    "GPT2Model": ("gpt2", None, False),
    "GPT2LMHeadModel": ("gpt2", "transformer", True),
}
# the other class holding the same base model: base <-> task
PARTNER = {
    "LlamaModel": "LlamaForCausalLM",
    "LlamaForCausalLM": "LlamaModel",
    "GPT2Model": "GPT2LMHeadModel",
    "GPT2LMHeadModel": "GPT2Model",
}
INPUT_SEED = 4321


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def llama_config(**over) -> LlamaConfig:
    kw = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(over)
    return LlamaConfig(**kw)


def gpt2_config(**over) -> GPT2Config:
    kw = dict(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=16,
        n_inner=64,
        bos_token_id=99,
        eos_token_id=99,
        pad_token_id=0,
    )
    kw.update(over)
    return GPT2Config(**kw)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from a seeded generator (named_parameters order, tied weights once)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            leaf = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in owner or owner.startswith("ln_"):
                v = 1.0 + 0.2 * noise if leaf == "weight" else 0.1 * noise
            elif leaf == "bias":
                v = 0.1 * noise
            elif owner in ("embed_tokens", "wte", "wpe"):
                v = 0.5 * noise
            else:
                v = 0.1 * noise
            p.copy_(v.to(p.dtype))


def build_model(cls_name: str, config, seed: int, dtype: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = CLASSES[cls_name](config)
    randomize(m, seed)
    return m.to(DTYPES[dtype]).eval()


def partner_model(model: torch.nn.Module, cls_name: str, seed: int) -> torch.nn.Module:
    """The other class (base <-> task) holding exactly `model`'s base weights (task head: random, seed+1)."""
    other = PARTNER[cls_name]
    _, attr, _ = CLASS_INFO[cls_name]
    _, other_attr, _ = CLASS_INFO[other]
    dtype = next(model.parameters()).dtype
    if attr is None:  # model is the base class: build the task class around a copy
        torch.manual_seed(seed + 1)
        task = CLASSES[other](copy.deepcopy(model.config))
        randomize(task, seed + 1)
        task = task.to(dtype)
        getattr(task, other_attr).load_state_dict(model.state_dict(), strict=True)
        if task.config.tie_word_embeddings:
            task.tie_weights()
        return task.eval()
    return copy.deepcopy(getattr(model, attr)).eval()


def make_inputs() -> dict[str, torch.Tensor]:
    """(3, 8) ids in [3, 100); row 0 unpadded, row 1 right-padded (last 3 masked), row 2 left-padded (first 2
    masked). Masked positions hold the pad id 0."""
    g = torch.Generator().manual_seed(INPUT_SEED)
    ids = torch.randint(3, 100, (3, 8), generator=g, dtype=torch.int64)
    mask = torch.ones(3, 8, dtype=torch.int64)
    mask[1, 5:] = 0
    mask[2, :2] = 0
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    return {"input_ids": ids, "attention_mask": mask}


def run(model, cls_name: str, io: dict) -> dict[str, torch.Tensor]:
    """last_hidden_state as the base model returns it (task class: the inner base model, which PEFT has
    injected in place) and, for LM classes, logits from the full forward."""
    core = model.base_model.model if isinstance(model, PeftModel) else model
    _, attr, lm = CLASS_INFO[cls_name]
    base = core if attr is None else getattr(core, attr)
    with torch.no_grad():
        out = {"last_hidden_state": base(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state}
        if lm:
            out["logits"] = core(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).logits
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def pvera_layers(peft_model):
    from peft.tuners.pvera.layer import PveraLayer

    return [(n, m) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PveraLayer)]


# --------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------

CASES: list[dict] = []


def case(name, *, cls, config, adapters, dtype="float32", seed=0, shard=None, sampling=None, grads=False, notes=""):
    CASES.append(
        dict(name=name, cls=cls, config=config, adapters=adapters, dtype=dtype, seed=seed, shard=shard,
             sampling=sampling, grads=grads, notes=notes)
    )


def adapter(dir, trained_on, check, **cfg):
    base = dict(r=4, init_weights=False)
    base.update(cfg)
    return dict(dir=dir, trained_on=trained_on, check=check, config=base)


# ---- LLaMA
case(
    "llama_base",
    cls="LlamaModel",
    config=("llama", {}),
    seed=10,
    adapters=[
        adapter("adapter", "LlamaModel", "eval"),
        adapter("adapter_task", "LlamaForCausalLM", "eval_task", task_type="CAUSAL_LM"),
    ],
    notes="LlamaModel checkpoint (keys `layers.N...`), default targets q_proj/v_proj (GQA: v_proj 32->16). "
    "adapter_task was trained on a LlamaForCausalLM holding the same base weights (keys "
    "`base_model.model.model.layers.N...`); eval_task is that PEFT model's inner LlamaModel output.",
)
case(
    "llama_causal",
    cls="LlamaForCausalLM",
    config=("llama", {}),
    seed=11,
    adapters=[
        adapter("adapter", "LlamaForCausalLM", "eval", task_type="CAUSAL_LM"),
        adapter("adapter_base", "LlamaModel", "eval_base"),
    ],
    notes="LlamaForCausalLM checkpoint with its own lm_head (tie_word_embeddings=false). adapter_base was "
    "trained on the LlamaModel inside (keys `base_model.model.layers.N...`); eval_base.logits = the unadapted "
    "lm_head applied to eval_base.last_hidden_state.",
)
case(
    "llama_causal_all_linear",
    cls="LlamaForCausalLM",
    config=("llama", {"tie_word_embeddings": True}),
    seed=12,
    grads=True,
    adapters=[adapter("adapter", "LlamaForCausalLM", "eval", task_type="CAUSAL_LM", target_modules="all-linear")],
    notes="tie_word_embeddings=true (no lm_head.weight in the file; logits use embed_tokens.weight); "
    "all-linear = every q/k/v/o/gate/up/down projection, lm_head excluded by PEFT.",
)
case(
    "llama_causal_layers",
    cls="LlamaForCausalLM",
    config=(
        "llama",
        {
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    seed=13,
    adapters=[
        adapter(
            "adapter",
            "LlamaForCausalLM",
            "eval",
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj", "down_proj"],
            layers_to_transform=[1],
            layers_pattern="layers",
        )
    ],
    notes="layers_to_transform=[1], layers_pattern='layers': only model.layers.1 adapted; attention_bias and "
    "mlp_bias true; llama3 rope scaling (theta 5e5, factor 8, original context 16 so all three frequency bands "
    "occur with head_dim 8).",
)
case(
    "llama_sampled",
    cls="LlamaModel",
    config=("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}),
    seed=14,
    adapters=[adapter("adapter", "LlamaModel", "eval", generator_seed=42, sample_at_inference=True)],
    sampling={"calls": 3},
    notes="generator_seed=42, sample_at_inference=True: sampled_<i> are the first three model.eval() calls after "
    "PeftModel.from_pretrained (fresh per-layer generators, calls in order); eval/merged use the mean path "
    "(every layer's sample_at_inference flag set False afterwards).",
)
case(
    "llama_bf16",
    cls="LlamaForCausalLM",
    config=("llama", {}),
    dtype="bfloat16",
    seed=15,
    adapters=[adapter("adapter", "LlamaForCausalLM", "eval", task_type="CAUSAL_LM")],
    notes="weights stored in bfloat16; transformers and PEFT run in bfloat16 (adapter path in f32).",
)
case(
    "llama_sharded",
    cls="LlamaForCausalLM",
    config=("llama", {}),
    seed=16,
    shard="40KB",
    adapters=[adapter("adapter", "LlamaForCausalLM", "eval", task_type="CAUSAL_LM")],
    notes="save_pretrained(max_shard_size='40KB'): model.safetensors.index.json + several shards.",
)

# ---- GPT-2
case(
    "gpt2_base",
    cls="GPT2Model",
    config=("gpt2", {}),
    seed=20,
    adapters=[
        adapter("adapter", "GPT2Model", "eval"),
        adapter("adapter_task", "GPT2LMHeadModel", "eval_task", task_type="CAUSAL_LM"),
    ],
    notes="GPT2Model checkpoint (keys `h.N...`), default target c_attn (Conv1D: PEFT sets fan_in_fan_out=true "
    "in the saved config). adapter_task was trained on a GPT2LMHeadModel around the same weights (keys "
    "`base_model.model.transformer.h.N...`).",
)
case(
    "gpt2_lm",
    cls="GPT2LMHeadModel",
    config=("gpt2", {}),
    seed=21,
    adapters=[
        adapter("adapter", "GPT2LMHeadModel", "eval", task_type="CAUSAL_LM"),
        adapter("adapter_base", "GPT2Model", "eval_base"),
    ],
    notes="GPT2LMHeadModel checkpoint (`transformer.` prefix, lm_head tied to wte: no lm_head.weight stored). "
    "adapter_base was trained on the GPT2Model inside (keys `base_model.model.h.N...`).",
)
case(
    "gpt2_lm_all_linear",
    cls="GPT2LMHeadModel",
    config=("gpt2", {"scale_attn_by_inverse_layer_idx": True, "activation_function": "gelu"}),
    seed=22,
    grads=True,
    adapters=[adapter("adapter", "GPT2LMHeadModel", "eval", task_type="CAUSAL_LM", target_modules="all-linear")],
    notes="all-linear: c_attn, attn.c_proj, c_fc, mlp.c_proj (lm_head excluded); scale_attn_by_inverse_layer_idx "
    "and exact gelu for coverage.",
)
case(
    "gpt2_sampled",
    cls="GPT2Model",
    config=("gpt2", {}),
    seed=23,
    adapters=[adapter("adapter", "GPT2Model", "eval", generator_seed=7, sample_at_inference=True)],
    sampling={"calls": 3},
    notes="generator_seed=7, sample_at_inference=True; see llama_sampled.",
)
case(
    "gpt2_f16",
    cls="GPT2LMHeadModel",
    config=("gpt2", {}),
    dtype="float16",
    seed=24,
    shard="40KB",
    adapters=[adapter("adapter", "GPT2LMHeadModel", "eval", task_type="CAUSAL_LM")],
    notes="weights stored in float16 and sharded (max_shard_size='40KB').",
)


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def clean_adapter_dir(d: Path) -> None:
    readme = d / "README.md"
    if readme.exists():
        readme.unlink()


def randomize_lambdas(pm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in pvera_layers(pm):
            for a in sorted(layer.pvera_lambda_b.keys()):
                lb = layer.pvera_lambda_b[a]
                lb.copy_(1.0 + 0.5 * torch.randn(lb.shape, generator=g, dtype=torch.float32).to(lb.dtype))


def make_case(c: dict, out_root: Path) -> None:
    d = out_root / c["name"]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    family, over = c["config"]
    config = llama_config(**over) if family == "llama" else gpt2_config(**over)
    dtype = DTYPES[c["dtype"]]
    model = build_model(c["cls"], config, c["seed"], c["dtype"])
    save_kw = {"max_shard_size": c["shard"]} if c["shard"] else {}
    model.save_pretrained(d / "model", **save_kw)

    def fresh() -> torch.nn.Module:
        return CLASSES[c["cls"]].from_pretrained(d / "model", dtype=dtype).eval()

    io = make_inputs()
    tensors: dict[str, torch.Tensor] = dict(io)
    outputs: dict[str, str] = {}

    def put(check: str, res: dict, how: str) -> None:
        for k, v in res.items():
            tensors[f"{check}.{k}"] = v
            outputs[f"{check}.{k}"] = how

    put("base", run(fresh(), c["cls"], io), f"{c['cls']}.from_pretrained(model, dtype={c['dtype']}), no adapter")

    adapters_meta = []
    for i, a in enumerate(c["adapters"]):
        cfg_kw = dict(a["config"])
        # train: get_peft_model on the class the adapter is for, around this checkpoint's weights
        trained_cls = a["trained_on"]
        if trained_cls == c["cls"]:
            host = fresh()
        else:
            host = partner_model(fresh(), c["cls"], c["seed"])
        # PEFT records name_or_path in adapter_config.json: keep it machine-independent
        host.name_or_path = "../model"
        host.config._name_or_path = "../model"
        torch.manual_seed(100 + i)
        pm = get_peft_model(host, PveraConfig(**cfg_kw))
        randomize_lambdas(pm, 200 + i)
        pm.save_pretrained(d / a["dir"])
        clean_adapter_dir(d / a["dir"])
        saved = json.loads((d / a["dir"] / "adapter_config.json").read_text())
        adapters_meta.append(
            {
                "dir": a["dir"],
                "trained_on": trained_cls,
                "check": a["check"],
                "config_kwargs": cfg_kw,
                "saved_target_modules": saved.get("target_modules"),
                "saved_fan_in_fan_out": saved.get("fan_in_fan_out"),
            }
        )

        # evaluate: PeftModel.from_pretrained on a freshly loaded host of the trained class
        host = fresh() if trained_cls == c["cls"] else partner_model(fresh(), c["cls"], c["seed"])
        pm = PeftModel.from_pretrained(host, d / a["dir"])
        pm.eval()
        if c["sampling"] and a["check"] == "eval":
            torch.manual_seed(0)
            for s in range(c["sampling"]["calls"]):
                put(
                    f"sampled_{s}",
                    run(pm, trained_cls, io),
                    f"sampled call #{s}: PeftModel.from_pretrained(model, {a['dir']}), model.eval(), calls in "
                    f"order with fresh per-layer generators (generator_seed={cfg_kw['generator_seed']})",
                )
            for _, layer in pvera_layers(pm):
                for name in list(layer.sample_at_inference):
                    layer.sample_at_inference[name] = False
        res = run(pm, trained_cls, io)
        how = f"PeftModel.from_pretrained({trained_cls} with this checkpoint's base weights, {a['dir']}), eval"
        if trained_cls != c["cls"] and CLASS_INFO[c["cls"]][2] and not CLASS_INFO[trained_cls][2]:
            # the checkpoint has an LM head the adapter never saw: logits = unadapted head on the hidden state
            head_model = fresh()
            with torch.no_grad():
                res["logits"] = head_model.lm_head(res["last_hidden_state"]).contiguous()
            how += "; logits = this checkpoint's (unadapted) lm_head on last_hidden_state"
        if not CLASS_INFO[c["cls"]][2]:
            res.pop("logits", None)
        put(a["check"], res, how)
        if a["check"] == "eval":
            merged = pm.merge_and_unload()
            put("merged", run(merged, trained_cls, io), "the eval model after merge_and_unload()")

    if c["grads"]:
        # gradients of the mean path: PeftModel.from_pretrained(is_trainable=True), eval(),
        # loss = mean(logits.float() ** 2), backward; stored as grad.<adapter file key>
        a = c["adapters"][0]
        pm = PeftModel.from_pretrained(fresh(), d / a["dir"], is_trainable=True)
        pm.eval()
        out = pm.base_model.model(input_ids=io["input_ids"], attention_mask=io["attention_mask"])
        loss = out.logits.float().pow(2).mean()
        loss.backward()
        for path, layer in pvera_layers(pm):
            for kind in ("b", "d"):
                g = getattr(layer, f"pvera_lambda_{kind}")["default"].grad
                tensors[f"grad.base_model.model.{path}.pvera_lambda_{kind}"] = g.detach().clone().contiguous()
        tensors["grad.loss"] = loss.detach().reshape(1).clone()
        outputs["grad.<key>"] = (
            "PeftModel.from_pretrained(model, adapter, is_trainable=True), eval(); loss = mean(logits.float()**2) "
            "on the inputs; backward; gradient of every lambda (key as in adapter_model.safetensors); grad.loss "
            "is the loss"
        )

    save_file(tensors, str(d / "io.safetensors"))
    meta = {
        "case": c["name"],
        "family": family,
        "model_class": c["cls"],
        "dtype": c["dtype"],
        "seed": c["seed"],
        "sharded": c["shard"],
        "config_overrides": over,
        "adapters": adapters_meta,
        "sampling": c["sampling"],
        "inputs": {
            "input_ids": "int64 (3, 8); row 0 unpadded, row 1 right-padded (mask 0 at 5..8), row 2 left-padded "
            "(mask 0 at 0..2); pad id 0",
            "attention_mask": "int64 (3, 8), 1 = attend",
        },
        "outputs": outputs,
        "attention": "transformers default (sdpa); fully masked query rows give zero attention output",
        "notes": c["notes"],
        "versions": versions(),
        "generator": "tools/make_model_fixtures_decoders.py",
    }
    (d / "case.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for c in CASES:
        if args.only and c["name"] not in args.only:
            continue
        make_case(c, args.out)
        size = sum(f.stat().st_size for f in (args.out / c["name"]).rglob("*") if f.is_file())
        print(f"{c['name']}: {size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
