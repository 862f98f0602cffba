#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = ["numpy==2.4.6", "scipy==1.17.1", "matplotlib==3.11.2"]
# ///
"""Aggregate the runs of tools/uncertainty_study.sh into the tables and plots of docs/uncertainty-study.md.

    python3 tools/uncertainty_study_report.py [--study .cache/study] [--plots docs/uncertainty-study]

Reads, per run folder `<task>-kl<w>-s<seed>`: metrics.json (pvera train), best/calibration.json (pvera calibrate)
and eval/eval.json (pvera eval). Every figure comes from those files, i.e. from pvera's own library functions; this
script only averages over seeds (mean ± sample standard deviation, ddof 1), checks the goals of issue 14, and draws.

Prints markdown to stdout: per task and KL weight, the variants mean mode / mean + T / MC-16 / MC-16 + T with
accuracy, NLL, ECE (15 equal-width bins), adaptive ECE, AURC, misclassification AUROC (1 - max p of the variant
itself), OOD AUROC and FPR95 (max-probability score; MC also mutual information); conformal coverage and mean set
size per score and alpha; then the goal checks. The coverage goal comes with the probability that an exactly valid
split-conformal procedure lands in the window: with n calibration rows and k = ceil((n + 1)(1 - alpha)), the number of
covered test rows among m is Beta-Binomial(m, k, n + 1 - k) (continuous scores, exchangeable rows).

Writes (deterministic: fixed SVG hash salt, no dates) <plots>/<task>-variants.{svg,png} (NLL, ECE, OOD/error AUROC
per variant against the KL weight) and copies the seed-0, w = 0 reliability diagrams pvera eval drew.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

VARIANTS = [
    ("mean", "mean mode", "before", "mean_mode"),
    ("mean+T", "mean mode + T", "after", "mean_mode"),
    ("mc", "MC-16", "before", "monte_carlo"),
    ("mc+T", "MC-16 + T", "after", "monte_carlo"),
]
TASK_NAMES = {"spam": "SpamAssassin, all-MiniLM-L6-v2", "fmnist": "Fashion-MNIST, DINOv2-S"}
BLOCKS = {"spam": 6, "fmnist": 12}


def load(p: Path):
    return json.loads(p.read_text())


def runs(study: Path):
    out = []
    for d in sorted(study.iterdir()):
        if not d.is_dir() or "-kl" not in d.name:
            continue
        task, rest = d.name.split("-kl", 1)
        kl, seed = rest.rsplit("-s", 1)
        ev, cal, met = d / "eval/eval.json", d / "best/calibration.json", d / "metrics.json"
        if not (ev.is_file() and cal.is_file() and met.is_file()):
            continue
        out.append(dict(task=task, kl=kl, seed=int(seed), dir=d, eval=load(ev), cal=load(cal), metrics=load(met)))
    return out


def ms(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "–"
    m = float(np.mean(xs))
    if len(xs) == 1:
        return f"{m:.4f}"
    return f"{m:.4f} ± {float(np.std(xs, ddof=1)):.4f}"


def mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else float("nan")


def variant_figures(r, key):
    """(figures, ood list) of one variant of one run."""
    _, _, when, mode = next(v for v in VARIANTS if v[0] == key)
    f = r["eval"]["figures"][when][mode]
    ood = []
    for o in r["eval"]["ood"]:
        src = o if when == "before" else (o.get("after") or {})
        ood.append((o["data"], src.get("auroc", {}), src.get("fpr95", {})))
    return f, ood


def ood_name(spec: str) -> str:
    return "noise" if spec.startswith("noise") else "digits" if "digits" in spec else Path(spec).name


def coverage_window_probability(n_cal: int, m: int, alpha: float, width: float = 0.03) -> float:
    k = math.ceil((n_cal + 1) * (1 - alpha))
    dist = stats.betabinom(m, k, n_cal + 1 - k)
    lo, hi = math.ceil(m * (1 - alpha) - 1e-9), math.floor(m * (1 - alpha + width) + 1e-9)
    return float(dist.cdf(hi) - dist.cdf(lo - 1))


def kl_sort(k: str) -> float:
    return float(k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", type=Path, default=Path(".cache/study"))
    ap.add_argument("--plots", type=Path, default=Path("docs/uncertainty-study"))
    args = ap.parse_args(argv)
    rs = runs(args.study)
    if not rs:
        print(f"no finished runs under {args.study}", file=sys.stderr)
        return 1
    by = defaultdict(list)
    for r in rs:
        by[(r["task"], r["kl"])].append(r)
    out = []
    w = out.append
    for task in ["spam", "fmnist"]:
        kls = sorted({k for (t, k) in by if t == task}, key=kl_sort)
        if not kls:
            continue
        w(f"\n### {TASK_NAMES[task]}\n")
        one = by[(task, kls[0])][0]
        w(
            f"Test rows per run: {one['eval']['examples']}; calibration rows: {one['cal']['n']}; "
            f"Monte Carlo samples: {one['eval']['samples']}; OOD sets: "
            + (", ".join(f"{ood_name(o['data'])} ({o['inputs']})" for o in one["eval"]["ood"]) or "none")
            + ".\n"
        )
        oods = [ood_name(o["data"]) for o in one["eval"]["ood"]]
        head = "| KL weight w | seeds | variant | accuracy | NLL | ECE | adaptive ECE | AURC | error AUROC |"
        sep = "|---|---|---|---|---|---|---|---|---|"
        for o in oods:
            head += f" OOD AUROC {o} (MSP) | FPR95 {o} (MSP) |"
            sep += "---|---|"
        w(head)
        w(sep)
        for kl in kls:
            group = sorted(by[(task, kl)], key=lambda r: r["seed"])
            for key, name, when, mode in VARIANTS:
                cells = []
                figs = [variant_figures(r, key) for r in group]
                def get(*path):
                    return [_dig(x[0], *path) for x in figs]

                cells += [ms(get("calibration", "accuracy")), ms(get("calibration", "nll")),
                          ms(get("calibration", "ece")), ms(get("adaptive_ece")),
                          ms(get("selective", "aurc")), ms(get("error_auroc"))]
                score = "mean_mode_msp" if mode == "mean_mode" else "mc_msp"
                for i, _ in enumerate(oods):
                    cells.append(ms([x[1][i][1].get(score) for x in figs]))
                    cells.append(ms([x[1][i][2].get(score) for x in figs]))
                w(f"| {kl} | {len(group)} | {name} | " + " | ".join(cells) + " |")
        # MC-only figures
        w("")
        w("| KL weight w | train KL (last epoch) | T mean mode | T MC-16 | mean MI (nats) | unanimous votes | error AUROC MC MI |"
          + "".join(f" OOD AUROC {o} MC MI | OOD AUROC {o} MC entropy |" for o in oods))
        w("|---|---|---|---|---|---|---|" + "---|---|" * len(oods))
        for kl in kls:
            group = sorted(by[(task, kl)], key=lambda r: r["seed"])
            tkl = [r["metrics"]["epochs"][-1].get("train_kl") for r in group]
            tm = [r["cal"]["mean"]["temperature"]["temperature"] for r in group]
            tc = [r["cal"]["mc"]["temperature"]["temperature"] for r in group]
            mi = [r["eval"]["monte_carlo_extra"]["mean_mutual_information"] for r in group]
            un = [r["eval"]["monte_carlo_extra"]["unanimous_vote_share"] for r in group]
            ea = [(r["eval"]["monte_carlo_extra"]["error_detection_auroc"] or {}).get("mc_mutual_information") for r in group]
            row = f"| {kl} | {ms(tkl)} | {ms(tm)} | {ms(tc)} | {ms(mi)} | {ms(un)} | {ms(ea)} |"
            for i, _ in enumerate(oods):
                row += f" {ms([r['eval']['ood'][i]['auroc'].get('mc_mutual_information') for r in group])} |"
                row += f" {ms([r['eval']['ood'][i]['auroc'].get('mc_entropy') for r in group])} |"
            w(row)
        # conformal
        w("")
        w("| KL weight w | mode | score | alpha | coverage before T | size before T | coverage after T | size after T | runs in window (after T) |")
        w("|---|---|---|---|---|---|---|---|---|")
        for kl in kls:
            group = sorted(by[(task, kl)], key=lambda r: r["seed"])
            for mode, mname in [("mean_mode", "mean"), ("monte_carlo", "MC-16")]:
                keys = [(f["score"], f["alpha"]) for f in group[0]["eval"]["conformal"][mode]]
                for score, alpha in keys:
                    fs = [next(f for f in r["eval"]["conformal"][mode] if f["score"] == score and f["alpha"] == alpha) for r in group]
                    inwin = sum(1 for f in fs if 1 - alpha - 1e-12 <= f["after"]["coverage"] <= 1 - alpha + 0.03 + 1e-12)
                    w(f"| {kl} | {mname} | {score} | {alpha} | {ms([f['before']['coverage'] for f in fs if f['before']])} | "
                      f"{ms([f['before']['mean_size'] for f in fs if f['before']])} | {ms([f['after']['coverage'] for f in fs])} | "
                      f"{ms([f['after']['mean_size'] for f in fs])} | {inwin}/{len(fs)} |")
    out.append(goals(rs, by))
    print("\n".join(out))
    plots(rs, by, args.plots)
    return 0


def _dig(d, *path):
    for p in path:
        if d is None:
            return None
        d = d.get(p)
    return d


def goals(rs, by) -> str:
    out = ["\n### Goals\n"]
    w = out.append
    # 1. coverage
    total = inside = 0
    misses = []
    below = 0
    probs = {}
    for r in rs:
        m = r["eval"]["examples"]
        for mode in ["mean_mode", "monte_carlo"]:
            for f in r["eval"]["conformal"][mode]:
                a = f["alpha"]
                cov = f["after"]["coverage"]
                total += 1
                ok = 1 - a - 1e-12 <= cov <= 1 - a + 0.03 + 1e-12
                inside += ok
                n_q = r["cal"]["n"] - (math.ceil(0.1 * r["cal"]["n"]) if f["score"] == "raps" else 0)
                key = (r["task"], f["score"], a, n_q, m)
                probs[key] = coverage_window_probability(n_q, m, a)
                if not ok:
                    below += cov < 1 - a - 1e-12
                    misses.append(f"{r['task']} w={r['kl']} seed {r['seed']} {mode} {f['score']} alpha {a}: {cov:.4f}")
    w(f"1. Conformal coverage in [1 − α, 1 − α + 0.03] (sets after temperature scaling, both modes, every score, α, run): "
      f"{inside} of {total} ({100 * inside / max(total, 1):.0f} %).")
    w("   Probability that an exactly valid split-conformal procedure lands in that window (Beta-Binomial):")
    for (task, score, a, n_q, m), p in sorted(probs.items()):
        k = math.ceil((n_q + 1) * (1 - a))
        sd = math.sqrt(k * (n_q + 1 - k) / ((n_q + 1) ** 2 * (n_q + 2)) + a * (1 - a) / m)
        w(f"   - {task} {score} α = {a}: n = {n_q} quantile rows, {m} test rows: P(in window) = {p:.2f}; "
          f"standard deviation of the empirical coverage ≈ {sd:.3f}; expected coverage {k / (n_q + 1):.4f}")
    w(f"   Outside the window: {len(misses)} ({below} below 1 − α); " + ("; ".join(misses[:12]) + ("; …" if len(misses) > 12 else "")))
    # 2. temperature scaling cuts ECE by >= 30 % where ECE > 0.03
    cases = ok = 0
    fails = []
    for r in rs:
        for mode in ["mean_mode", "monte_carlo"]:
            b = r["eval"]["figures"]["before"][mode]["calibration"]["ece"]
            a = r["eval"]["figures"]["after"][mode]["calibration"]["ece"]
            if b > 0.03:
                cases += 1
                good = a <= 0.7 * b
                ok += good
                if not good:
                    fails.append(f"{r['task']} w={r['kl']} seed {r['seed']} {mode}: {b:.4f} → {a:.4f}")
    w(f"2. Temperature scaling cuts ECE by ≥ 30 % wherever ECE > 0.03: {ok} of {cases} cases"
      + (f"; not met: {'; '.join(fails)}" if fails else "") + ".")
    # 3. MC beats mean on NLL and OOD AUROC
    w("3. MC-16 vs mean mode per recipe (means over seeds; OOD AUROC of the max-probability score, also MC mutual information):")
    for (task, kl), group in sorted(by.items(), key=lambda x: (x[0][0], kl_sort(x[0][1]))):
        for when, tag in [("before", ""), ("after", " + T")]:
            nll_m = mean([r["eval"]["figures"][when]["mean_mode"]["calibration"]["nll"] for r in group])
            nll_c = mean([r["eval"]["figures"][when]["monte_carlo"]["calibration"]["nll"] for r in group])
            parts = [f"NLL {nll_m:.4f} vs {nll_c:.4f} ({'MC better' if nll_c < nll_m else 'mean better'})"]
            beats_all = nll_c < nll_m
            for i, o in enumerate(group[0]["eval"]["ood"]):
                src = lambda r: r["eval"]["ood"][i] if when == "before" else (r["eval"]["ood"][i].get("after") or {})
                am = mean([src(r)["auroc"]["mean_mode_msp"] for r in group])
                ac = mean([src(r)["auroc"]["mc_msp"] for r in group])
                ami = mean([src(r)["auroc"].get("mc_mutual_information") for r in group])
                parts.append(f"OOD {ood_name(o['data'])} {am:.4f} vs {ac:.4f} (MI {ami:.4f})")
                beats_all = beats_all and max(ac, ami) > am
            if not group[0]["eval"]["ood"]:
                parts.append("no OOD set")
                beats_all = False
            w(f"   - {task} w = {kl}{tag}: " + "; ".join(parts) + (" → MC beats mean on both" if beats_all else ""))
    return "\n".join(out)


def plots(rs, by, dest: Path):
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "pvera-uncertainty-study"
    matplotlib.rcParams["svg.fonttype"] = "none"
    import matplotlib.pyplot as plt

    dest.mkdir(parents=True, exist_ok=True)
    for task in ["spam", "fmnist"]:
        kls = sorted({k for (t, k) in by if t == task}, key=kl_sort)
        if not kls:
            continue
        has_ood = bool(by[(task, kls[0])][0]["eval"]["ood"])
        panels = [("NLL", lambda f, o: f["calibration"]["nll"]), ("ECE", lambda f, o: f["calibration"]["ece"]),
                  ("misclassification AUROC", lambda f, o: f["error_auroc"])]
        if has_ood:
            panels.append(("OOD AUROC, noise (MSP)", lambda f, o: _ood(o, "noise")))
            panels.append(("OOD AUROC, digits (MSP)", lambda f, o: _ood(o, "digits")))
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0))
        x = np.arange(len(kls))
        for ax, (title, get) in zip(axes, panels):
            for j, (key, name, when, mode) in enumerate(VARIANTS):
                vals = []
                for kl in kls:
                    group = by[(task, kl)]
                    v = []
                    for r in group:
                        f, ood = variant_figures(r, key)
                        score = "mean_mode_msp" if mode == "mean_mode" else "mc_msp"
                        v.append(get(f, [(ood_name(s), a.get(score)) for s, a, _ in ood]))
                    v = [y for y in v if y is not None]
                    vals.append((np.mean(v), np.std(v, ddof=1) if len(v) > 1 else 0.0))
                m = [a for a, _ in vals]
                e = [b for _, b in vals]
                ax.errorbar(x + (j - 1.5) * 0.08, m, yerr=e, marker="o", ms=3, capsize=2, lw=1, label=name)
            ax.set_title(title, fontsize=9)
            ax.set_xticks(x, [str(k) for k in kls], fontsize=8)
            ax.set_xlabel("KL weight w", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{TASK_NAMES[task]}: mean ± sd over seeds", fontsize=10)
        fig.tight_layout()
        fig.savefig(dest / f"{task}-variants.svg", metadata={"Date": None})
        fig.savefig(dest / f"{task}-variants.png", dpi=80, metadata={"Software": None})
        plt.close(fig)
        first = sorted(by[(task, kls[0])], key=lambda r: r["seed"])[0]
        for ext in ["svg", "png"]:
            shutil.copyfile(first["dir"] / f"eval/reliability.{ext}", dest / f"{task}-kl{kls[0]}-s{first['seed']}-reliability.{ext}")


def _ood(ood, name):
    for n, v in ood:
        if n == name:
            return v
    return None


if __name__ == "__main__":
    sys.exit(main())
