# /// script
# requires-python = ">=3.10"
# dependencies = ["peft==0.21.2", "torch==2.15.0"]
# ///
"""Generate the PEFT-written config fixtures used by `crates/pvera/src/{config,targets}.rs` tests.

Usage (from the repository root):

    uv run tools/make_config_fixtures.py [OUT_DIR]

OUT_DIR defaults to `crates/pvera/tests/fixtures/configs`. Everything here is written by PEFT itself:

* `<name>.json`: a few real `adapter_config.json` files, copied verbatim.
* `all_written_configs.json`: `{name: exact file text}` for every combination below (the Rust tests
  re-serialise each one and require byte equality).
* `matching_cases.json`: `check_target_module_exists(config, key)` decisions for many (config, key) pairs,
  and Python `re` fullmatch/match decisions (or compile errors) for the regex translation.
* `compression_cases.json`: `_find_minimal_target_modules` and the >= 20 targets rule of `inject_adapter`.
* `default_targets.json`: `TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING` as `[name, targets]` pairs, in order.

Sets are written in hash order; the script re-executes itself with PYTHONHASHSEED=0 so that the output is
reproducible.
"""

import json
import os
import re
import sys
import tempfile
import warnings

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import peft  # noqa: E402
import torch  # noqa: E402
from peft import PveraConfig, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import (  # noqa: E402
    _find_minimal_target_modules,
    check_target_module_exists,
)
from peft.utils.constants import (  # noqa: E402
    MIN_TARGET_MODULES_FOR_OPTIMIZATION,
    TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING,
)

assert peft.__version__ == "0.21.2", peft.__version__

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join("crates", "pvera", "tests", "fixtures", "configs")
os.makedirs(OUT, exist_ok=True)
warnings.simplefilter("ignore")


def dump(name, obj):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=True)
        f.write("\n")


def written(config) -> str:
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        with open(os.path.join(d, "adapter_config.json")) as f:
            return f.read()


# --------------------------------------------------------------------------------------------------
# 1. config files written by PveraConfig.save_pretrained
# --------------------------------------------------------------------------------------------------
many_targets = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(5) for p in "qkvo"] + ["lm_head"]
COMBOS = {
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
    "layers_empty_list": {"target_modules": ["q_proj"], "layers_to_transform": []},
    "modules_to_save": {"target_modules": ["query", "value"], "modules_to_save": ["classifier", "score"]},
    "bias_all": {"target_modules": ["lin0"], "bias": "all"},
    "bias_pvera_only": {"target_modules": ["lin0"], "bias": "pvera_only"},
    "bias_lora_only": {"target_modules": ["lin0"], "bias": "lora_only"},
    "generator_seed": {"target_modules": ["lin0"], "generator_seed": 1234, "sample_at_inference": True},
    "generator_seed_negative": {"target_modules": ["lin0"], "generator_seed": -5},
    "task_seq_cls": {"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    "task_causal_lm": {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]},
    "key_negative": {"target_modules": ["lin0"], "projection_prng_key": -1},
    "key_min": {"target_modules": ["lin0"], "projection_prng_key": -(2**63)},
    "key_above_i64": {"target_modules": ["lin0"], "projection_prng_key": 2**63 + 5},
    "key_max": {"target_modules": ["lin0"], "projection_prng_key": 2**64 - 1},
    "no_save_projection": {"target_modules": ["lin0"], "save_projection": False, "projection_prng_key": 42},
    "floats": {"target_modules": ["lin0"], "pvera_dropout": 0.05, "d_initial": 1e-05},
    "floats_odd": {"target_modules": ["lin0"], "pvera_dropout": 1 / 3, "d_initial": 1e16},
    "floats_big": {"target_modules": ["lin0"], "pvera_dropout": 0.0001, "d_initial": 123456789.125},
    "d_initial_inf": {"target_modules": ["lin0"], "d_initial": float("inf")},
    "d_initial_nan": {"target_modules": ["lin0"], "d_initial": float("nan")},
    "fan_in_fan_out_no_init": {"target_modules": ["c_attn"], "fan_in_fan_out": True, "init_weights": False},
    "sample_dict": {"target_modules": ["lin0", "lin1"], "sample_at_inference": {"lin1": False}},
    "base_model_revision": {
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
        "revision": "main",
        "inference_mode": True,
    },
    "unicode_name": {"target_modules": ["q_proj"], "base_model_name_or_path": "modèle/模型-\U0001f600\"q\"\\\t\x7f"},
    "many_targets": {"target_modules": many_targets},
    "dotted_targets": {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [2]},
}

texts = {name: written(PveraConfig(**kwargs)) for name, kwargs in COMBOS.items()}


# a config written by PeftModel.save_pretrained (inference_mode true, auto_mapping filled in)
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 20)
        self.lin1 = torch.nn.Linear(20, 20)
        self.lin2 = torch.nn.Linear(20, 20)
        self.lin3 = torch.nn.Linear(20, 2)

    def forward(self, x):
        return self.lin3(self.lin2(self.lin1(self.lin0(x))))


model = get_peft_model(MLP(), PveraConfig(r=4, target_modules=["lin0", "lin3"], modules_to_save=["lin1"]))
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    with open(os.path.join(d, "adapter_config.json")) as f:
        texts["peft_model_mlp"] = f.read()

dump("all_written_configs.json", {"peft_version": peft.__version__, "files": texts})
for name in ["peft_model_mlp", "layers_list_pattern_list", "task_seq_cls", "key_above_i64", "unicode_name"]:
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        f.write(texts[name])

# --------------------------------------------------------------------------------------------------
# 2. matching decisions
# --------------------------------------------------------------------------------------------------
llama = ["", "model", "model.embed_tokens", "model.layers", "model.norm", "lm_head"]
for i in range(3):
    llama += [f"model.layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"]
    llama += [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
    llama += [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")]
KEYS = llama + [
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.attn.c_proj",
    "transformer.h.1.attn.c_attn",
    "transformer.h.2.mlp.c_fc",
    "transformer.wte",
    "model.layers.1.mlp.experts.0.up_proj",
    "model.layers.0.mlp.experts.1.up_proj",
    "model.layers.2.mlp.experts.2.down_proj",
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.1.attention.self.value",
    "bert.encoder.layer.0.attention.output.dense",
    "bert.pooler.dense",
    "classifier",
    "score",
    "lin0",
    "lin1",
    "lin1.sub",
    "sub.lin1",
    "mylin1",
    "b.x",
    "layers.0.q_proj",
    "layers.1.q_proj",
    "h.0.q_proj",
    "model.h.2.q_proj",
    "model.layers.12.self_attn.q_proj",
    "model.layers.\u0663.self_attn.q_proj",
    "model.layers.\U0001d7d9.self_attn.q_proj",
    "model.layers.99999999999999999999999.self_attn.q_proj",
    "a..0.q_proj",
    "x.language_model.layers.0.self_attn.q_proj",
    "language_model.layers.0.self_attn.v_proj",
    "model.visual.blocks.0.attn.q_proj",
    "all-linear",
    "q_proj",
]
MATCH_CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": "q_proj"},
    {"target_modules": r".*\.q_proj"},
    {"target_modules": ["q_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 1, "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 2], "layers_pattern": ["h", "layers"]},
    {"target_modules": ["q_proj"], "layers_to_transform": []},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": ""},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]},
    {"target_modules": ["lin1"], "modules_to_save": ["lin1"]},
    {"target_modules": ["query", "value", "classifier"], "modules_to_save": ["classifier"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [2]},
    {"target_modules": TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING["gemma4"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [3]},
    {"target_modules": ["q_proj"], "layers_to_transform": [3], "layers_pattern": "layers"},
    {"target_modules": ["lin0", "lin1", "mylin1"], "modules_to_save": ["lin.*"]},
    {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["self_attn"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers|h"},
    {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [0, 2], "layers_pattern": "h"},
    {"target_modules": ["q_proj"], "layers_to_transform": [0, 1], "layers_pattern": "la.ers"},
    {"target_modules": "(?i).*Q_PROJ"},
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "lin1"], "modules_to_save": []},
    {"target_modules": ["q_proj"], "layers_to_transform": [-1, 12]},
    {"target_modules": ["", "q_proj"]},
    {"target_modules": ["lin0", "lin1", "b.x"], "modules_to_save": ["lin0|lin1"]},
    {"target_modules": ["x"], "modules_to_save": ["lin0|b"]},
    {"target_modules": ["self_attn.q_proj", "dense"], "layers_to_transform": [0]},
    {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["transformer.h", "h"]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": ["h", "layers"]},
    {"target_modules": r"model\.layers\.[0-9]+\.(self_attn|mlp)\.(q|up)_proj"},
    {"target_modules": r"[^.]+\.layers\.\d\..*"},
    {"target_modules": r".*(attn|attention)\.[a-z_]+"},
    {"target_modules": ["q_proj", "c_attn"], "modules_to_save": ["h\\.0", "layers\\.[12]"]},
]
cases = []
for kwargs in MATCH_CONFIGS:
    config = PveraConfig(**kwargs)
    decisions = [bool(check_target_module_exists(config, key)) for key in KEYS]
    as_json = {"peft_type": "PVERA", **kwargs}
    if isinstance(as_json["target_modules"], list):
        as_json["target_modules"] = sorted(set(as_json["target_modules"]))
    cases.append({"config": as_json, "matched": [k for k, d in zip(KEYS, decisions) if d]})

# Python `re` itself, for the regex translation: fullmatch / match decisions, or the compile error.
REGEX_PATTERNS = [
    "a{", "a{}", "a{,2}", "a{2,}", "a{1,2}?", "x{2}", "{", "}", "]", "a]", "[]a]", "[^]a]", "[a-]", "[-a]",
    "[[]", "[a[]b]", "[a&&b]+", "[a--b]+", "[a~~b]+", r"[\d.]+", r"[^\d]+", r"\d+", r"\D+", r"a\Z", r"\Aab",
    "(?i)AB", "(?i:A)b", "(?s)a.b", "(?m)^a", "a|b|", "(a)(?P<n>b)", "(?P<n>a)(?P=n)", "(?=a)a", "(?<=a)b",
    "(?<n>a)", "a**", "a*+", "(?>a)", r"\1", r"(a)\1", r"\x41", r"\u0041", r"\101", r"\0", r"[\101-\103]+",
    r"\q", r"[\q]", r"[\A]", r"\<a\>", "<a>", "a#b", "a b", r"\-", r"\.", r"[\b]", r"a\b", r"\ba\b",
    "(?x)a b", r"(?a)\w", "(?u)a", "a(?#comment)b", "(?i)(?s)a.b", "a(?i)b", "*a", "a|*", "^*", "()", "(|a)",
    "[z-a]", r"[\d-z]", "a{3,1}", r"\N{LATIN SMALL LETTER A}", r"[\w-]+", r"[\w-a]", "\u0663", "[\u0660-\u0669]+",
    "\u00e9", "(?i)\u00c9", r"\s+", r"\w+", ".", ".*", "a.b", "a??b", "a???", "a{2}{3}", "(?:a*)*", "a{1}?",
    "(a|ab)(c|bcd)", "a)", "(a", "[a", "a\\", "\\", r"[\]]", r"[\\]", "[.]", "(?i-s:a.b)", "(?-i)a",
    "(?i)", "a{,}", "a{ 1}", "a{1,2", "[^a-c]+", r"\W+", "[a-c-e]+", "(?P<1>a)", "(?P<_x>a)", "\u00e9+",
    "a{99999999999}", "(((a)))", ".*\\.q_proj", "[^.]+", "x*y*z*",
]
REGEX_STRINGS = [
    "", "a", "b", "ab", "AB", "aa", "aaa", "a{", "a{}", "{", "}", "]", "a]", "[", "-", "&", "~", "a\nb", "A",
    "0", "12", "\u0663", "\U0001d7d9", "x.y", "model.layers.1.q_proj", "a b", "a#b", "\u00e9", "\u00c9", "<a>",
    "\b", "abc", "aac", "a.c", "a{1}", "aab", "abcd", "abbcd", "acd", "ba", "\\", "a\\", " ", "\t", "_",
    "xxyz", "A.B", "d", "a-", "-a",
]
regex_cases = []
for pat in REGEX_PATTERNS:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = re.compile(pat)
    except (re.error, OverflowError, ValueError) as exc:
        regex_cases.append({"pattern": pat, "error": str(exc)})
        continue
    regex_cases.append({
        "pattern": pat,
        "fullmatch": [s for s in REGEX_STRINGS if compiled.fullmatch(s)],
        "match": [s for s in REGEX_STRINGS if compiled.match(s)],
    })
dump("matching_cases.json", {"peft_version": peft.__version__, "keys": KEYS, "cases": cases,
                             "regex_strings": REGEX_STRINGS, "regex_cases": regex_cases})

# --------------------------------------------------------------------------------------------------
# 3. target compression
# --------------------------------------------------------------------------------------------------
def inject_rule(targets, all_keys):
    """What inject_adapter does with a list/set of >= MIN_TARGET_MODULES_FOR_OPTIMIZATION targets."""
    targets = set(targets)
    if len(targets) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        return None
    suffixes = tuple("." + s for s in targets)
    others = [n for n in all_keys if (n not in targets) and not n.endswith(suffixes)]
    new = _find_minimal_target_modules(targets, others)
    return sorted(new) if len(new) < len(targets) else None


llama_linear = [k for k in llama if k.endswith("_proj")]
enc_dec = ["", "encoder", "decoder", "pooler", "pooler.dense"]
for i in range(4):
    for part in ("encoder", "decoder"):
        enc_dec += [f"{part}.layer.{i}", f"{part}.layer.{i}.attn"]
        enc_dec += [f"{part}.layer.{i}.attn.{p}" for p in ("q", "k", "v", "dense")]
        enc_dec += [f"{part}.layer.{i}.ffn.dense", f"{part}.layer.{i}.ffn.out"]
COMPRESSION = [
    ("llama_all_linear", llama_linear, llama),
    ("enc_dec_dense_but_not_pooler", [k for k in enc_dec if k.endswith(("dense", ".q", ".v"))
                                      and not k.startswith("pooler")], enc_dec),
    ("encoder_only", [k for k in enc_dec if k.startswith("encoder.") and k.endswith((".q", ".k", ".v", ".out"))],
     enc_dec),
    ("decoder_q_only", [k for k in enc_dec if k.startswith("decoder.") and k.endswith(".q")] +
     [k for k in enc_dec if k.startswith("encoder.") and k.endswith((".k", ".v", ".out", ".dense"))], enc_dec),
    ("too_few", llama_linear[:19], llama),
    ("layer0_only", [k for k in enc_dec if ".layer.0." in k or ".layer.1." in k and k.count(".") == 3], enc_dec),
]
comp_cases = []
for name, targets, all_keys in COMPRESSION:
    others = [n for n in all_keys if n not in set(targets)]
    minimal = sorted(_find_minimal_target_modules(targets, others)) if targets else None
    comp_cases.append({
        "name": name,
        "targets": targets,
        "all_keys": all_keys,
        "minimal": minimal,
        "minimal_no_others": sorted(_find_minimal_target_modules(targets, [])) if targets else None,
        "inject": inject_rule(targets, all_keys),
    })
dump("compression_cases.json", {"peft_version": peft.__version__, "cases": comp_cases})

dump("default_targets.json", {"peft_version": peft.__version__,
                              "mapping": [[k, v] for k, v in TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING.items()]})
print(f"wrote fixtures to {OUT}")
