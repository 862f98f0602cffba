# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.15.0", "peft==0.21.2", "transformers>=5", "safetensors>=0.4", "numpy", "scipy",
#                 "scikit-learn", "torchmetrics"]
# ///
"""Golden values for `pvera::uncertainty`, from scipy / scikit-learn / torchmetrics and PEFT itself.

    python3 tools/make_uncertainty_fixtures.py [--out DIR]

Writes to `crates/pvera/tests/fixtures/uncertainty/` (or `--out`):

    stats.json      - `intervals`: sampled class probabilities (S x C, softmax of seeded random logits) with
                      what PEFT's examples/pvera/confidence_interval_generation.py computes from them: the
                      modal class (`argmax(-1).mode(0)`, torch), mean, `scipy.stats.sem`, the t quantile
                      `scipy.stats.t.ppf((1 + c) / 2, n - 1)` and the clipped interval; plus the predictive
                      entropy (`scipy.stats.entropy` of the mean), the expected entropy, the mutual
                      information and the ddof=1 variance of the top-class probability (numpy).
                    - `calibration`: probabilities and labels with accuracy, NLL (`sklearn.metrics.log_loss`),
                      multi-class Brier (numpy), ECE and MCE (`torchmetrics` multiclass_calibration_error,
                      norm l1 / max) for several bin counts.
                    - `auroc`: in-distribution and OOD scores (with ties) and `sklearn.metrics.roc_auc_score`.
    mc_peft/        - PEFT's own Monte Carlo passes: PEFT's test MLP (tools/make_fixtures.py) with PveraConfig(
                      target_modules=[lin1, lin2], r=8, init_weights=False, sample_at_inference=True), saved
                      base model and two adapters (`adapter_seeded`: generator_seed=7; `adapter_global`: no
                      generator_seed, noise from torch's global generator after torch.manual_seed(11)).
                      io.safetensors: inputs `x` (4 x 10; B*r = 32, a multiple of 16) and `x3` (3 x 10;
                      B*r = 24), and for each adapter and input the probabilities of 16 sequential passes
                      `exp(model(x))` on a freshly loaded model (`<adapter>_<input>`, 16 x B x 2), the
                      mean-mode probabilities (`<adapter>_<input>_mean`) and PEFT's interval of each input
                      (`<adapter>_<input>_interval`, B x 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import scipy.stats
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
DEFAULT_OUT = REPO_ROOT / "crates" / "pvera" / "tests" / "fixtures" / "uncertainty"


def peft_interval(data, confidence=0.95):
    """PEFT example's mean_confidence_interval, verbatim semantics."""
    a = 1.0 * np.array(data)
    n = len(a)
    m, se = np.mean(a), scipy.stats.sem(a)
    h = se * scipy.stats.t.ppf((1 + confidence) / 2.0, n - 1)
    return max(0, m - h), min(1, m + h)


def interval_cases() -> list[dict]:
    g = torch.Generator().manual_seed(2024)
    out = []
    shapes = [(2, 2, 0.95, 1.0), (3, 3, 0.9, 1.0), (5, 10, 0.99, 2.0), (16, 2, 0.95, 1.0), (16, 10, 0.8, 3.0),
              (50, 5, 0.95, 0.5), (16, 3, 0.95, 8.0), (7, 4, 0.999, 0.2)]
    for s, c, conf, scale in shapes:
        base = torch.randn(c, generator=g, dtype=torch.float64) * scale
        logits = base + torch.randn(s, c, generator=g, dtype=torch.float64) * (scale / 2)
        probs = torch.softmax(logits, -1)
        top = int(probs.argmax(-1).mode(0).values)
        vals = probs[:, top].numpy()
        lo, hi = peft_interval(vals, conf)
        mean = probs.mean(0).numpy()
        pe = float(scipy.stats.entropy(mean))
        ee = float(np.mean([scipy.stats.entropy(p) for p in probs.numpy()]))
        out.append({
            "samples": probs.tolist(),
            "confidence": conf,
            "modal_class": top,
            "mean": float(np.mean(vals)),
            "sem": float(scipy.stats.sem(vals)),
            "t": float(scipy.stats.t.ppf((1 + conf) / 2.0, s - 1)),
            "interval": [float(lo), float(hi)],
            "predictive_entropy": pe,
            "expected_entropy": ee,
            "mutual_information": pe - ee,
            "variance": float(np.var(vals, ddof=1)),
            "mean_probs": mean.tolist(),
        })
    return out


def calibration_cases() -> list[dict]:
    from sklearn.metrics import log_loss
    from torchmetrics.functional.classification import multiclass_calibration_error

    g = torch.Generator().manual_seed(7)
    out = []
    for n, c, temp in [(200, 2, 1.0), (300, 10, 2.0), (64, 3, 0.5)]:
        labels = torch.randint(0, c, (n,), generator=g)
        logits = torch.randn(n, c, generator=g, dtype=torch.float64)
        logits[torch.arange(n), labels] += 1.5  # better than chance, imperfectly calibrated
        probs = torch.softmax(logits * temp, -1)
        onehot = torch.nn.functional.one_hot(labels, c).double()
        case = {
            "probs": probs.tolist(),
            "labels": labels.tolist(),
            "accuracy": float((probs.argmax(-1) == labels).double().mean()),
            "nll": float(log_loss(labels.numpy(), probs.numpy(), labels=list(range(c)))),
            "brier": float(((probs - onehot) ** 2).sum(-1).mean()),
            "bins": {},
        }
        for b in (5, 10, 15):
            ece = multiclass_calibration_error(probs, labels, num_classes=c, n_bins=b, norm="l1")
            mce = multiclass_calibration_error(probs, labels, num_classes=c, n_bins=b, norm="max")
            case["bins"][str(b)] = {"ece": float(ece), "mce": float(mce)}
        out.append(case)
    return out


def auroc_cases() -> list[dict]:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    out = []
    for n_in, n_out, shift, decimals in [(100, 80, 0.5, 6), (50, 50, 1.5, 1), (30, 200, 0.0, 2)]:
        a = np.round(rng.normal(0, 1, n_in), decimals)
        b = np.round(rng.normal(shift, 1, n_out), decimals)
        y = np.r_[np.zeros(n_in), np.ones(n_out)]
        out.append({"in": a.tolist(), "ood": b.tolist(), "auroc": float(roc_auc_score(y, np.r_[a, b]))})
    return out


def mc_peft(out: Path) -> dict:
    from peft import PeftModel, PveraConfig, get_peft_model
    from safetensors.torch import save_file

    import make_fixtures as mf

    d = out / "mc_peft"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    base = mf.build_base("mlp", "float32")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(d / "base_model.safetensors"))
    g = torch.Generator().manual_seed(99)
    inputs = {"x": torch.randn(4, 10, generator=g), "x3": torch.randn(3, 10, generator=g)}
    io = dict(inputs)
    adapters = {"adapter_seeded": {"generator_seed": 7}, "adapter_global": {}}
    for name, extra in adapters.items():
        torch.manual_seed(3)
        cfg = PveraConfig(target_modules=["lin1", "lin2"], r=8, init_weights=False, sample_at_inference=True, **extra)
        pm = get_peft_model(mf.build_base("mlp", "float32"), cfg)
        pm.save_pretrained(str(d / name))
        readme = d / name / "README.md"
        if readme.exists():
            readme.unlink()
        for inp, x in inputs.items():
            # a fresh load for every input: fresh layer generators, as a fresh process would have
            m = PeftModel.from_pretrained(mf.build_base("mlp", "float32"), str(d / name))
            m.eval()
            torch.manual_seed(11)
            with torch.no_grad():
                passes = torch.stack([m(x).exp() for _ in range(16)])  # (16, B, 2)
                for layer in [mod for _, mod in mf.pvera_layers(m)]:
                    for a in list(layer.sample_at_inference):
                        layer.sample_at_inference[a] = False
                mean = m(x).exp()
            io[f"{name}_{inp}"] = passes
            io[f"{name}_{inp}_mean"] = mean
            iv = []
            for b in range(x.shape[0]):
                preds = passes[:, b, :]
                top = preds.argmax(-1).mode(0).values
                iv.append(peft_interval(preds[:, top].numpy(), 0.95))
            io[f"{name}_{inp}_interval"] = torch.tensor(iv, dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in io.items()}, str(d / "io.safetensors"))
    case = {
        "adapters": list(adapters),
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "passes": 16,
        "global_seed": 11,
        "recipe": "fresh PeftModel.from_pretrained per (adapter, input); eval(); torch.manual_seed(11); "
        "[model(x).exp() for _ in range(16)]; then mean path with every sample_at_inference flag off",
    }
    (d / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    return case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import peft
    import sklearn
    import torchmetrics

    stats = {
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "scipy": scipy.__version__,
                     "numpy": np.__version__, "sklearn": sklearn.__version__, "torchmetrics": torchmetrics.__version__},
        "intervals": interval_cases(),
        "calibration": calibration_cases(),
        "auroc": auroc_cases(),
    }
    (args.out / "stats.json").write_text(json.dumps(stats) + "\n")
    mc_peft(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    raise SystemExit(main())
