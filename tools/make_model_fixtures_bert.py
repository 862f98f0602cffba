# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "transformers==5.24.0", "peft==0.21.2", "safetensors"]
# ///
"""BERT / RoBERTa fixtures for `pvera::models::bert`, made by transformers 5.24 + PEFT 0.21.2 (torch 2.15).

    python3 tools/make_model_fixtures_bert.py [--out DIR] [--only CASE ...]

Writes `crates/pvera/tests/fixtures/models/<case>/` for every case in CASES:

    model/            a tiny random checkpoint written by transformers' save_pretrained
    adapter*/         PEFT adapter directories written by PeftModel.save_pretrained (README.md removed)
    io.safetensors    inputs by transformers names (input_ids, attention_mask, token_type_ids: int64) and the
                      outputs `<what>.last_hidden_state` / `<what>.pooler_output` (see case.json "outputs")
    case.json         model class, config, adapters (dir + PveraConfig kwargs), what every output is, versions

Models are built in memory from a config (never from a path, so no local path leaks into adapter_config.json),
with every parameter redrawn from a seeded generator (LayerNorm gains 1 + 0.1 N(0,1), biases 0.1 N(0,1),
embeddings N(0,1), linear weights N(0,1)/sqrt(in)) so that no tensor is trivially zero or one. All models run
with attn_implementation="eager" (the additive mask with the dtype's minimum, as transformers' eager path);
the case records how far the default (sdpa) result is from it. Deterministic: seeded everything, one thread,
PYTHONHASHSEED=0 (PEFT writes set-valued target_modules in hash order); a rerun is byte-identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "crates" / "pvera" / "tests" / "fixtures" / "models"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SEQ = 8
BATCH = 3

BERT_CONFIG = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=24,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
)
ROBERTA_CONFIG = dict(BERT_CONFIG, max_position_embeddings=SEQ + 4, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)


def pv(**kw):
    """PveraConfig kwargs: r=4, init_weights=False (lambda_d ~ randn) unless given."""
    return dict(dict(r=4, init_weights=False), **kw)


# Each case: a model, its checkpoint dtype / sharding, adapters and which outputs to make.
CASES = [
    dict(
        name="bert_tiny",
        model_type="bert",
        cls="BertModel",
        seed=1,
        dtype="float32",
        adapters=[("adapter", pv()), ("adapter_all_linear", pv(target_modules="all-linear"))],
        with_token_types=True,
        ids_only=True,
        bf16=True,
        notes="BertModel with pooler; default targets (query, value) and all-linear (13 layers, pooler included). "
        "Batch of 3: row 0 full, row 1 right-padded (3 pads), row 2 left-padded (2 pads); token_type_ids with two "
        "segments. ids_only.* is the base model called with input_ids alone (token_type_ids default zeros, no mask). "
        "bf16_*: the saved f32 checkpoint loaded with dtype=torch.bfloat16 (adapter lambdas stay f32, PEFT's "
        "autocast_adapter_dtype).",
    ),
    dict(
        name="bert_seq_cls",
        model_type="bert",
        cls="BertForSequenceClassification",
        seed=2,
        dtype="float32",
        adapters=[("adapter", pv(task_type="SEQ_CLS"))],
        with_token_types=True,
        notes="Checkpoint saved from BertForSequenceClassification (num_labels=3): keys bert.* plus classifier.*. "
        "Adapter made with get_peft_model(task model, PveraConfig(task_type='SEQ_CLS')): PEFT adds classifier/score "
        "to modules_to_save, so the file has base_model.model.bert.encoder...pvera_lambda_* and "
        "base_model.model.classifier.{weight,bias}. Outputs are the inner BertModel's (model.bert(...)), i.e. "
        "what a BertModel loaded from this checkpoint with this adapter must return; the classifier is unused "
        "there. task_eval.logits is the task model's classification output, for reference only.",
    ),
    dict(
        name="bert_roberta_tiny",
        model_type="roberta",
        cls="RobertaModel",
        seed=3,
        dtype="float32",
        adapters=[("adapter", pv())],
        with_token_types=False,
        ids_only=True,
        notes="RobertaModel (pad_token_id=1, type_vocab_size=1, max_position_embeddings=SEQ+4): position ids start "
        "at padding_idx+1 and padded tokens keep padding_idx, computed from input_ids. No token_type_ids in the "
        "inputs (default zeros). Left padding in row 2 shifts its positions.",
    ),
    dict(
        name="bert_f16",
        model_type="bert",
        cls="BertModel",
        seed=4,
        dtype="float16",
        adapters=[("adapter", pv())],
        with_token_types=True,
        f32_ref=True,
        notes="Checkpoint stored in float16 (model.half().save_pretrained); outputs computed by torch in float16 on "
        "the CPU; adapter lambdas f32 (PEFT's autocast_adapter_dtype), adapter path in f32, output cast to f16. "
        "f32_*: the same f16 weights loaded with dtype=float32 (the accuracy reference for both implementations).",
    ),
    dict(
        name="bert_sharded",
        model_type="bert",
        cls="BertModel",
        seed=5,
        dtype="float32",
        shard="30KB",
        adapters=[("adapter", pv(target_modules=["query", "key", "value", "dense"]))],
        with_token_types=True,
        notes="Checkpoint saved with max_shard_size='30KB' (model-0000N-of-0000M.safetensors + index). "
        "Targets query/key/value/dense (dense matches attention.output.dense, intermediate.dense, output.dense and "
        "pooler.dense).",
    ),
    dict(
        name="bert_sampled",
        model_type="bert",
        cls="BertModel",
        seed=6,
        dtype="float32",
        adapters=[("adapter", pv(generator_seed=42, sample_at_inference=True))],
        with_token_types=True,
        sampled=3,
        notes="generator_seed=42, sample_at_inference=True: each adapted layer owns torch.Generator().manual_seed(42). "
        "sampled_<i>: fresh model (PeftModel.from_pretrained, eval), calls in order i=0,1,2 on the same inputs, "
        "first thing after loading. eval.*: the mean path (sample_at_inference switched off in every layer).",
    ),
    dict(
        name="bert_modules_to_save",
        model_type="bert",
        cls="BertModel",
        seed=7,
        dtype="float32",
        adapters=[("adapter", pv(modules_to_save=["pooler.dense"]))],
        with_token_types=True,
        perturb_modules_to_save=True,
        unload=True,
        notes="modules_to_save=['pooler.dense']: after get_peft_model, the copy modules_to_save['default'] of "
        "pooler.dense is moved away from the base (weight += 0.5 N(0,1)/sqrt(in), bias += 0.5 N(0,1), "
        "Generator().manual_seed(77)), as training would, so the file's base_model.model.pooler.dense.{weight,bias} "
        "differ from the checkpoint's. merge_and_unload.*: PeftModel.from_pretrained(...).merge_and_unload() "
        "(PEFT replaces the ModulesToSaveWrapper by the trained copy); unload.*: .unload() of a fresh load (the "
        "copy kept, the lambdas dropped); base_pooler_on_merged.pooler_output: tanh(base pooler.dense(merged "
        "hidden[:, 0])), what a merge that dropped the copy would give.",
    ),
]


def versions() -> dict:
    import peft
    import safetensors
    import transformers

    return {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "generator": "tools/make_model_fixtures_bert.py",
    }


def hf_config(c: dict):
    from transformers import BertConfig, RobertaConfig

    if c["model_type"] == "roberta":
        cfg = RobertaConfig(**ROBERTA_CONFIG)
    else:
        cfg = BertConfig(**BERT_CONFIG)
    if c["cls"] == "BertForSequenceClassification":
        cfg.num_labels = 3
    cfg._attn_implementation = "eager"
    return cfg


def model_class(name: str):
    import transformers

    return getattr(transformers, name)


def build_model(c: dict):
    """Construct from config under torch.manual_seed(seed), then redraw every parameter from a seeded generator."""
    torch.manual_seed(c["seed"])
    m = model_class(c["cls"])(hf_config(c))
    g = torch.Generator().manual_seed(1000 + c["seed"])
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("LayerNorm.weight"):
                new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                new = 0.1 * torch.randn(p.shape, generator=g)
            elif "embeddings" in name:
                new = torch.randn(p.shape, generator=g)
            else:
                new = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            p.copy_(new)
    m.eval()
    return m


def make_inputs(c: dict) -> dict[str, torch.Tensor]:
    cfg = hf_config(c)
    pad = cfg.pad_token_id
    g = torch.Generator().manual_seed(4321 + c["seed"])
    low = 3  # never a special id (0..2), so RoBERTa's pad id 1 appears only where padded
    ids = torch.randint(low, cfg.vocab_size, (BATCH, SEQ), generator=g, dtype=torch.int64)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    ids[1, SEQ - 3 :] = pad
    mask[1, SEQ - 3 :] = 0
    ids[2, :2] = pad
    mask[2, :2] = 0
    io = {"input_ids": ids, "attention_mask": mask}
    if c["with_token_types"]:
        tt = torch.zeros(BATCH, SEQ, dtype=torch.int64)
        tt[0, SEQ // 2 :] = 1
        tt[1, 2 : SEQ - 3] = 1
        tt[2, 5:] = 1
        io["token_type_ids"] = tt
    return io


def base_of(model):
    """The BertModel / RobertaModel inside a (PEFT-wrapped) model."""
    inner = model
    if hasattr(inner, "base_model") and hasattr(inner, "peft_config"):
        inner = inner.base_model.model
    for attr in ("bert", "roberta"):
        if hasattr(inner, attr) and not isinstance(inner, (model_class("BertModel"), model_class("RobertaModel"))):
            return getattr(inner, attr)
    return inner


def run(model, io: dict[str, torch.Tensor], prefix: str, keys=("input_ids", "attention_mask", "token_type_ids")):
    kw = {k: io[k] for k in keys if k in io}
    with torch.no_grad():
        out = base_of(model)(**kw)
    res = {f"{prefix}.last_hidden_state": out.last_hidden_state}
    if out.pooler_output is not None:
        res[f"{prefix}.pooler_output"] = out.pooler_output
    return res


def peft_layers(pm):
    from peft.tuners.pvera.layer import PveraLayer

    return [m for _, m in pm.named_modules() if isinstance(m, PveraLayer)]


def load_adapter_model(c: dict, d: Path, adapter_dir: str, dtype):
    """A fresh copy of the saved checkpoint in `dtype`, with the saved adapter, as a user would load it."""
    from peft import PeftModel

    m = model_class(c["cls"]).from_pretrained(str(d / "model"), dtype=dtype, attn_implementation="eager")
    m.eval()
    pm = PeftModel.from_pretrained(m, str(d / adapter_dir), is_trainable=False)
    pm.eval()
    return pm


def write_case(root: Path, c: dict) -> dict:
    from peft import PveraConfig, get_peft_model

    d = root / c["name"]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    dtype = DTYPES[c["dtype"]]

    model = build_model(c).to(dtype)
    save_kw = {"max_shard_size": c["shard"]} if c.get("shard") else {}
    model.save_pretrained(str(d / "model"), **save_kw)
    io = make_inputs(c)
    outputs: dict[str, torch.Tensor] = {}
    descr: dict[str, str] = {}
    outputs.update(run(model, io, "base"))
    descr["base"] = "the base model (no adapter) on all inputs"
    if c.get("ids_only"):
        outputs.update(run(model, io, "ids_only", keys=("input_ids",)))
        descr["ids_only"] = "the base model called with input_ids alone (default token_type_ids, no attention_mask)"
    # sdpa (transformers' default) vs the eager reference, informational
    sdpa = model_class(c["cls"]).from_pretrained(str(d / "model"), dtype=dtype, attn_implementation="sdpa").eval()
    sdpa_diff = float((run(sdpa, io, "x")["x.last_hidden_state"].float() - outputs["base.last_hidden_state"].float()).abs().max())

    adapters_meta = []
    for i, (adir, kwargs) in enumerate(c["adapters"]):
        torch.manual_seed(100 * c["seed"] + i)  # lambda_d ~ randn from the global generator
        fresh = build_model(c).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(fresh, PveraConfig(**copy.deepcopy(kwargs)))
        if c.get("perturb_modules_to_save"):
            perturb_modules_to_save(pm)
        pm.save_pretrained(str(d / adir))
        (d / adir / "README.md").unlink(missing_ok=True)
        saved_cfg = json.loads((d / adir / "adapter_config.json").read_text())
        adapters_meta.append({"dir": adir, "config": kwargs, "saved_target_modules": saved_cfg.get("target_modules")})
        suffix = "" if adir == "adapter" else "_" + adir[len("adapter_") :]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = load_adapter_model(c, d, adir, dtype)
            n = c.get("sampled", 0)
            if n:
                torch.manual_seed(0)
                for s in range(n):
                    outputs.update(run(pm, io, f"sampled_{s}{suffix}"))
                    descr[f"sampled_{s}{suffix}"] = (
                        f"sampled call #{s} (eval, sample_at_inference=True, fresh generators seeded "
                        f"{kwargs['generator_seed']}), {adir}"
                    )
                for layer in peft_layers(pm):
                    for a in list(layer.sample_at_inference):
                        layer.sample_at_inference[a] = False
            outputs.update(run(pm, io, f"eval{suffix}"))
            descr[f"eval{suffix}"] = f"PeftModel.from_pretrained(model, {adir!r}), eval, mean path"
            if c["cls"] == "BertForSequenceClassification":
                kw = {k: io[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in io}
                with torch.no_grad():
                    outputs[f"task_eval{suffix}.logits"] = pm(**kw).logits
                descr[f"task_eval{suffix}"] = "the task model's logits (classifier from modules_to_save), reference only"
            pm.base_model.merge_adapter()
            outputs.update(run(pm, io, f"merged{suffix}"))
            descr[f"merged{suffix}"] = f"after merge_adapter(), {adir}"
            pm.base_model.unmerge_adapter()
            again = run(pm, io, "again")
            assert torch.allclose(again["again.last_hidden_state"].float(), outputs[f"eval{suffix}.last_hidden_state"].float(), atol=1e-2)
            if c.get("bf16"):
                pmb = load_adapter_model(c, d, adir, torch.bfloat16)
                outputs.update(run(pmb, io, f"bf16_eval{suffix}"))
                descr[f"bf16_eval{suffix}"] = f"checkpoint loaded with dtype=bfloat16, {adir}, eval"
                if i == 0:
                    with pmb.disable_adapter():
                        outputs.update(run(pmb, io, "bf16_base"))
                    descr["bf16_base"] = "checkpoint loaded with dtype=bfloat16, adapters disabled"
            if c.get("unload"):
                merged = load_adapter_model(c, d, adir, dtype).merge_and_unload()
                outputs.update(run(merged, io, f"merge_and_unload{suffix}"))
                descr[f"merge_and_unload{suffix}"] = f"PeftModel.from_pretrained(model, {adir!r}).merge_and_unload()"
                with torch.no_grad():
                    h0 = outputs[f"merge_and_unload{suffix}.last_hidden_state"][:, 0]
                    outputs[f"base_pooler_on_merged{suffix}.pooler_output"] = torch.tanh(model.pooler.dense(h0))
                descr[f"base_pooler_on_merged{suffix}"] = "the base pooler on the merged hidden states (copy dropped)"
                unloaded = load_adapter_model(c, d, adir, dtype).unload()
                outputs.update(run(unloaded, io, f"unload{suffix}"))
                descr[f"unload{suffix}"] = f"PeftModel.from_pretrained(model, {adir!r}).unload()"
            if c.get("f32_ref"):
                pmf = load_adapter_model(c, d, adir, torch.float32)
                outputs.update(run(pmf, io, f"f32_eval{suffix}"))
                descr[f"f32_eval{suffix}"] = f"checkpoint loaded with dtype=float32, {adir}, eval"
                if i == 0:
                    with pmf.disable_adapter():
                        outputs.update(run(pmf, io, "f32_base"))
                    descr["f32_base"] = "checkpoint loaded with dtype=float32, adapters disabled"

    sanity(c, outputs)
    tensors = {**io, **{k: v.detach().clone().contiguous() for k, v in outputs.items()}}
    from safetensors.torch import save_file

    save_file(tensors, str(d / "io.safetensors"))

    files = sorted(str(p.relative_to(d / "model")) for p in (d / "model").iterdir())
    meta = {
        "model_class": c["cls"],
        "model_type": c["model_type"],
        "dtype": c["dtype"],
        "model_dir": "model",
        "model_files": files,
        "config": BERT_CONFIG if c["model_type"] == "bert" else ROBERTA_CONFIG,
        "attn_implementation": "eager",
        "sdpa_vs_eager_max_abs_diff": sdpa_diff,
        "adapters": adapters_meta,
        "inputs": {
            "input_ids": f"int64 ({BATCH}, {SEQ}): torch.randint(3, vocab, generator=Generator().manual_seed("
            f"{4321 + c['seed']})); row 1 last 3 and row 2 first 2 set to pad_token_id",
            "attention_mask": "int64, 0 exactly at the padded positions",
            **(
                {"token_type_ids": "int64: row 0 [0]*4+[1]*4, row 1 ones at 2..5, row 2 ones from 5"}
                if c["with_token_types"]
                else {}
            ),
        },
        "outputs": descr,
        "output_fields": "last_hidden_state (batch, seq, hidden) and pooler_output (batch, hidden) of the base "
        "BertModel/RobertaModel, in the model dtype",
        "recipe": f"torch.manual_seed({c['seed']}); m = {c['cls']}(config); every parameter redrawn from "
        f"Generator().manual_seed({1000 + c['seed']}) (see build_model); adapter i: torch.manual_seed(100*seed+i); "
        "get_peft_model(fresh copy, PveraConfig(**config)).save_pretrained; outputs from a fresh "
        "from_pretrained(model) + PeftModel.from_pretrained(adapter), eval, eager attention, no_grad, 1 thread",
        "notes": c["notes"],
        "versions": versions(),
    }
    (d / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def perturb_modules_to_save(pm) -> None:
    """Moves every modules_to_save copy away from the base module, as training would."""
    from peft.utils.other import ModulesToSaveWrapper

    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for _, m in sorted(pm.named_modules(), key=lambda kv: kv[0]):
            if isinstance(m, ModulesToSaveWrapper):
                for p in m.modules_to_save["default"].parameters():
                    scale = 0.5 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.5
                    p.add_(scale * torch.randn(p.shape, generator=g))


def sanity(c: dict, out: dict[str, torch.Tensor]) -> None:
    """Checks that must hold, or the fixture would not test what it claims."""
    base = out["base.last_hidden_state"].float()
    for k, v in out.items():
        assert torch.isfinite(v.float()).all(), (c["name"], k)
        if k.startswith(("eval", "sampled")) and k.endswith("last_hidden_state"):
            assert (v.float() - base).abs().max() > 1e-3, (c["name"], k, "adapter has no effect")
        if k.startswith("merged") and k.endswith("last_hidden_state"):
            e = out[k.replace("merged", "eval", 1)].float()
            tol = 1e-4 if c["dtype"] == "float32" else 5e-2
            assert (v.float() - e).abs().max() < tol, (c["name"], k)
    if c.get("sampled"):
        assert (out["sampled_0.last_hidden_state"] - out["sampled_1.last_hidden_state"]).abs().max() > 1e-4
    if c.get("unload"):
        for f in ("last_hidden_state", "pooler_output"):
            assert (out[f"merge_and_unload.{f}"] - out[f"eval.{f}"]).abs().max() < 1e-4, (c["name"], f)
        dropped = (out["base_pooler_on_merged.pooler_output"] - out["merge_and_unload.pooler_output"]).abs().max()
        assert dropped > 0.1, (c["name"], "the trained copy does not change pooler_output", float(dropped))
        assert (out["unload.last_hidden_state"] - base).abs().max() < 1e-6, (c["name"], "unload keeps the lambdas")
        assert (out["unload.pooler_output"] - out["base.pooler_output"]).abs().max() > 0.1, (c["name"], "unload copy")
    if "ids_only.last_hidden_state" in out:
        assert (out["ids_only.last_hidden_state"] - base).abs().max() > 1e-3


def main(argv=None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    for c in CASES:
        if args.only and c["name"] not in args.only:
            continue
        write_case(args.out, c)
        print(f"wrote {c['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
