# /// script
# requires-python = ">=3.10,<3.14"
# dependencies = ["numpy==2.4.6", "scipy==1.17.1", "scikit-learn==1.9.1", "torch==2.15.0", "mapie==1.6.0",
#                 "torch-uncertainty==0.13.0", "torchmetrics==1.9.0", "lightning==2.6.6", "torchvision==0.29.2",
#                 "matplotlib==3.11.2", "seaborn==0.13.2", "einops==0.8.2"]
# ///
"""Golden values for `pvera::uncertainty::{temperature, conformal, selective}` from the references themselves:
torch-uncertainty 0.13.0 (TemperatureScaler, AURC, RiskAtxCov, FPR95, AdaptiveCalibrationError), MAPIE 1.6.0
(SplitConformalClassifier with LAC / APS / RAPS on a prefit classifier that returns fixed probabilities) and scipy
(the exact f64 optimum of the temperature NLL, mean mode and Monte Carlo).

    python3 tools/make_calibration_fixtures.py [--out DIR]

Writes to `crates/pvera/tests/fixtures/calibration/` (or `--out`); every float is written with `repr` (exact
float64 round trip). Seeded, single-threaded torch: a rerun writes the same bytes.

    temperature.json - `mean`: logits (n x C), labels, torch-uncertainty's fitted T (LBFGS on the inverse
                       temperature, its defaults), scipy's f64 optimum of mean NLL(softmax(z / T)), the NLL at
                       T = 1 and at the optimum, and the calibrated probabilities of the first rows. Cases: 10
                       classes over- and under-confident, binary, tiny n, and logits worse than uniform
                       (`anti_informative`: the optimum is T = infinity; torch-uncertainty returns a negative T).
                     - `mc`: sampled logits (S x n x C), labels, scipy's f64 optimum of the NLL of
                       mean_s softmax(z_s / T), and the NLL at T = 1 and at the optimum.
    conformal.json   - per case (10 classes; 5 classes with exact ties, true labels tied included; tiny n;
                       an alpha too small for n; binary): calibration and test probabilities and labels, the
                       alphas as MAPIE holds them, and per score (lac, aps, raps) and include_last_label (true /
                       false): the calibration rows MAPIE scored, in its order (RAPS keeps 90 % of them; the
                       other `tune_rows` choose k and lambda), the uniforms it drew (RandomState(seed)), its
                       conformity scores, quantiles, k_star / lambda_star and the test prediction sets; or
                       MAPIE's error (binary targets, alphas too small for n). numpy's default argsort is not
                       stable, so where rows hold tied probabilities MAPIE runs with a stable argsort (recorded
                       in `argsort`). RAPS also records `lambda_star_penalty_from_k`: the lambda its search
                       would pick with the paper's penalty (MAPIE 1.6.0 penalises the search's sets from rank
                       lambda instead of k_star).
    selective.json   - probabilities and labels with AURC, risk at 80 % / 90 % coverage, adaptive ECE (10 and
                       15 bins); in-distribution and OOD scores with FPR95. Tie cases record whether the
                       torch-uncertainty value is invariant to the order of the rows (torch's sort is not
                       stable); where it is not, the value with a stable order is the one to match.

Every MAPIE value, and every torch-uncertainty selective value that does not depend on the order of tied rows, is
also recomputed here by a plain numpy transcription of the conventions pvera implements
(docs/uncertainty-methods.md); the script stops if the two disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import scipy.optimize
import scipy.special
import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

EPS = 1e-8  # mapie._machine_precision.EPSILON


def softmax(z: np.ndarray) -> np.ndarray:
    return scipy.special.softmax(z, axis=-1)


def f32_probs(z: np.ndarray) -> np.ndarray:
    """Softmax in float32 cast to float64: what pvera gets from a model."""
    return torch.softmax(torch.tensor(z, dtype=torch.float32), dim=-1).double().numpy()


def make_logits(rs: np.random.RandomState, n: int, c: int, scale: float, signal: float, flip: float):
    """Logits whose argmax is the label with probability about 1 - flip; `scale` sets (over)confidence."""
    labels = rs.randint(0, c, size=n)
    hint = labels.copy()
    wrong = rs.rand(n) < flip
    hint[wrong] = rs.randint(0, c, size=wrong.sum())
    z = rs.randn(n, c)
    z[np.arange(n), hint] += signal
    # four decimals: short in the JSON, and the fixture's numbers are exactly the ones used here
    return np.round(scale * z, 4), labels


# ---------------------------------------------------------------------------------------------------------------
# temperature


def mean_nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    s = z / t
    return float(np.mean(scipy.special.logsumexp(s, axis=1) - s[np.arange(len(y)), y]))


def mc_nll(zs: np.ndarray, y: np.ndarray, t: float) -> float:
    p = softmax(zs / t).mean(axis=0)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def optimum(f, lo=1e-2, hi=1e2) -> float:
    """Global minimum of f(T) on [lo, hi]: a fine grid in log T, then a bounded Brent search around the best
    grid point to ~1e-13 in log T."""
    grid = np.linspace(math.log(lo), math.log(hi), 801)
    vals = [f(math.exp(g)) for g in grid]
    i = int(np.argmin(vals))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    r = scipy.optimize.minimize_scalar(lambda g: f(math.exp(g)), bounds=(a, b), method="bounded",
                                       options={"xatol": 1e-13, "maxiter": 500})
    return math.exp(float(r.x))


def tu_temperature(z: np.ndarray, y: np.ndarray) -> float:
    from torch.utils.data import DataLoader, TensorDataset
    from torch_uncertainty.post_processing import TemperatureScaler

    ts = TemperatureScaler(model=None)  # init_temperature=1, lr=0.1, max_iter=100 (its defaults)
    data = TensorDataset(torch.tensor(z, dtype=torch.float64), torch.tensor(y, dtype=torch.int64))
    ts.fit(DataLoader(data, batch_size=len(y)), progress=False)
    return float(ts.temperature[0].item())


def temperature_cases() -> dict:
    rs = np.random.RandomState(20260)
    mean = []
    for name, n, c, scale, signal, flip in [
        ("ten_class_overconfident", 200, 10, 3.0, 2.5, 0.3),
        ("ten_class_underconfident", 200, 10, 0.4, 3.0, 0.1),
        ("binary", 200, 2, 2.5, 1.5, 0.2),
        ("tiny", 8, 3, 2.0, 2.0, 0.2),
        ("anti_informative", 40, 4, 1.0, -1.5, 0.0),
    ]:
        z, y = make_logits(rs, n, c, scale, signal, flip)
        t_tu = tu_temperature(z, y)
        t_opt = optimum(lambda t: mean_nll(z, y, t))
        if name == "anti_informative":
            # the labels are the least likely classes: the NLL falls all the way to T = infinity (uniform
            # probabilities); torch-uncertainty's unconstrained LBFGS crosses 1/T = 0 to a negative T.
            assert t_tu < 0 and t_opt > 0.999 * 1e2, (t_tu, t_opt)
        else:
            # the NLL is convex in 1/T: its derivative in beta = 1/T vanishes at the optimum
            p = softmax(z / t_opt)
            grad = float(np.mean((p * z).sum(1) - z[np.arange(n), y]))
            assert abs(grad) < 1e-7, (name, grad)
            # torch-uncertainty's LBFGS stops once the loss changes by less than 1e-9 (torch's
            # tolerance_change default): a few 1e-4 short of the optimum, never below its NLL
            assert abs(t_tu - t_opt) < 1e-3, f"{name}: torch-uncertainty T {t_tu} vs scipy optimum {t_opt}"
            assert mean_nll(z, y, t_opt) <= mean_nll(z, y, t_tu) + 1e-15, name
        mean.append({
            "name": name, "logits": z.tolist(), "labels": y.tolist(),
            "tu_temperature": t_tu, "optimal_temperature": t_opt,
            "nll_t1": mean_nll(z, y, 1.0), "nll_optimal": mean_nll(z, y, t_opt),
            "calibrated_probs_first_rows": softmax(z[:5] / t_opt).tolist(),
        })
    mc = []
    for name, s, n, c, scale, signal, flip, noise in [
        ("mc_ten_class", 8, 80, 10, 2.5, 2.5, 0.3, 0.8),
        ("mc_binary", 6, 120, 2, 2.0, 1.5, 0.2, 1.0),
    ]:
        z, y = make_logits(rs, n, c, scale, signal, flip)
        zs = np.round(z[None] + noise * scale * rs.randn(s, n, c), 4)
        t_opt = optimum(lambda t: mc_nll(zs, y, t))
        mc.append({
            "name": name, "samples": s, "logits": zs.tolist(), "labels": y.tolist(),
            "optimal_temperature": t_opt, "nll_t1": mc_nll(zs, y, 1.0), "nll_optimal": mc_nll(zs, y, t_opt),
            "calibrated_probs_first_rows": softmax(zs[:, :5] / t_opt).mean(axis=0).tolist(),
        })
    return {"bounds": [1e-2, 1e2], "mean": mean, "mc": mc}


# ---------------------------------------------------------------------------------------------------------------
# conformal (MAPIE)


def mapie_run(probs_cal, y_cal, probs_test, confidence_levels, score, seed, include_last_label):
    from sklearn.base import BaseEstimator, ClassifierMixin
    from mapie.classification import SplitConformalClassifier

    table = np.concatenate([probs_cal, probs_test])

    class FixedProba(ClassifierMixin, BaseEstimator):
        """A prefit classifier whose predict_proba(X) returns the rows of `table` that X's column indexes."""

        def __init__(self):
            self.classes_ = np.arange(table.shape[1])

        def fit(self, X, y):
            return self

        def predict_proba(self, X):
            return table[np.asarray(X)[:, 0].astype(int)]

        def predict(self, X):
            return np.argmax(self.predict_proba(X), axis=1)

    n = len(y_cal)
    x_cal = np.arange(n).reshape(-1, 1)
    x_test = np.arange(n, len(table)).reshape(-1, 1)
    scc = SplitConformalClassifier(estimator=FixedProba(), confidence_level=confidence_levels,
                                   conformity_score=score, prefit=True, random_state=seed)
    scc.conformalize(x_cal, y_cal)
    _, sets = scc.predict_set(x_test, conformity_score_params={"include_last_label": include_last_label})
    cs = scc._mapie_classifier.conformity_score_function_
    return scc, cs, sets


@contextlib.contextmanager
def stable_argsort():
    orig = np.argsort
    np.argsort = functools.partial(orig, kind="stable")
    try:
        yield
    finally:
        np.argsort = orig


def tie_order_free(*arrays) -> bool:
    """True when no row of any array has two equal probabilities (then no label order depends on how ties
    are sorted)."""
    return all(len(np.unique(row)) == len(row) for a in arrays for row in a)


def order_desc(p):
    """MAPIE's label order, `np.flip(np.argsort(p))`, with a stable argsort: decreasing probability, ties by
    decreasing label id."""
    return np.argsort(p, kind="stable")[::-1]


def quantile_lower(scores, alpha):
    """MAPIE's _compute_classification_quantile for one alpha: the ceil((n + 1)(1 - alpha))-th smallest."""
    n = len(scores)
    k = int(np.ceil((n + 1) * (1 - alpha)))
    return np.sort(np.asarray(scores, dtype=float))[k - 1] if k <= n else None


def sorted_cumsum(p, lam=0.0, k=0.0):
    o = order_desc(p)
    c = np.cumsum(p[o])
    c = c + lam * np.maximum(0, np.arange(1, len(p) + 1) - k)
    out = np.empty_like(c)
    out[o] = c
    return out, o


def true_cumsum_and_rank(p, y):
    c, o = sorted_cumsum(p)
    rank = int(np.where(o == y)[0][0])  # 0-based position
    return c[y], rank


def set_from_cumsum(p, c, q, include_last):
    if include_last:
        ok = np.where(c - q >= -EPS)[0]
        last = ok[np.argmin((c - q)[ok])] if len(ok) else 0
    else:
        mt = max(q, c.min())
        ok = np.where(c - mt <= EPS)[0]
        last = ok[np.argmax((c - mt)[ok])]
    pl = p[last]
    if pl <= EPS:
        pl = p[p >= EPS].min()
    return [int(j) for j in np.where(p - pl >= -EPS)[0]]


def replica(score, probs_cal, y_cal, u, probs_tune, y_tune, probs_test, alphas, include_last, search_k_is_lambda):
    """pvera's transcription of MAPIE 1.6.0 (stable label order)."""
    out = {}
    if score == "lac":
        s = 1 - probs_cal[np.arange(len(y_cal)), y_cal]
        qs = [quantile_lower(s, a) for a in alphas]
        out["scores"] = s
        out["quantiles"] = qs
        out["sets"] = [[[int(j) for j in np.where((1 - p) - q <= EPS)[0]] for p in probs_test] for q in qs]
        return out
    cum = [true_cumsum_and_rank(p, y) for p, y in zip(probs_cal, y_cal)]
    s = np.array([c - ui * p[y] for (c, _), ui, p, y in zip(cum, u, probs_cal, y_cal)])
    out["scores"] = s
    if score == "aps":
        qs = [quantile_lower(s, a) for a in alphas]
        out["quantiles"] = qs
        out["sets"] = [[set_from_cumsum(p, sorted_cumsum(p)[0], q, include_last) for p in probs_test] for q in qs]
        return out
    # raps
    pos = [true_cumsum_and_rank(p, y)[1] for p, y in zip(probs_tune, y_tune)]
    ks = [int(quantile_lower(pos, a)) + 1 for a in alphas]
    tune_cum = [true_cumsum_and_rank(p, y) for p, y in zip(probs_tune, y_tune)]
    lams = []
    for a, k in zip(alphas, ks):
        best, lam_star = np.finfo(np.float64).max, 0.0
        for lam in [0.001, 0.01, 0.1, 0.2, 0.5]:
            reg = [c + max(lam * ((r + 1) - k), 0) for c, r in tune_cum]
            q = quantile_lower(reg, a)
            kk = lam if search_k_is_lambda else k
            sizes = [len(set_from_cumsum(p, sorted_cumsum(p, lam, kk)[0], q, include_last)) for p in probs_tune]
            size = np.mean(sizes)
            if size < best - EPS:
                best, lam_star = size, lam
        lams.append(lam_star)
    regs = [[si + max(lam * ((r + 1) - k), 0) for si, (_, r) in zip(s, cum)] for lam, k in zip(lams, ks)]
    qs = [quantile_lower(r, a) for r, a in zip(regs, alphas)]
    out.update(k_star=ks, lambda_star=lams, quantiles=qs)
    out["sets"] = [[set_from_cumsum(p, sorted_cumsum(p, lam, k)[0], q, include_last) for p in probs_test]
                   for q, lam, k in zip(qs, lams, ks)]
    return out


def conformal_case(name, probs_cal, y_cal, probs_test, confidence_levels, seed):
    from mapie.utils import _transform_confidence_level_to_alpha_list

    alphas = _transform_confidence_level_to_alpha_list(confidence_levels)
    case = {"name": name, "seed": seed, "probs_cal": probs_cal.tolist(), "labels_cal": y_cal.tolist(),
            "probs_test": probs_test.tolist(), "alphas": alphas, "results": []}
    n = len(y_cal)
    for score in ["lac", "aps", "raps"]:
        for include_last in ([True] if score == "lac" else [True, False]):
            res = {"score": score, "include_last_label": include_last, "argsort": "numpy default"}
            try:
                scc, cs, sets = mapie_run(probs_cal, y_cal, probs_test, confidence_levels, score, seed, include_last)
                if score != "lac" and not tie_order_free(probs_cal, probs_test):
                    # numpy's default argsort is not stable (x86-simd-sort on AVX2 / AVX-512 CPUs for 4 or
                    # more elements), so MAPIE's order among tied labels depends on the CPU. Run MAPIE with
                    # a stable argsort: the order pvera uses.
                    with stable_argsort():
                        scc, cs, sets = mapie_run(probs_cal, y_cal, probs_test, confidence_levels, score, seed,
                                                  include_last)
                    res["argsort"] = "stable (numpy.argsort patched to kind='stable' while MAPIE runs)"
            except ValueError as e:
                res["error"] = str(e)
                case["results"].append(res)
                continue
            scores = np.asarray(scc.conformity_scores, dtype=float).ravel()
            res["mapie_sets"] = [[[int(j) for j in np.where(sets[i, :, a])[0]] for i in range(len(probs_test))]
                                 for a in range(len(alphas))]
            res["quantiles"] = [float(q) for q in np.ravel(cs.quantiles_)]
            if score == "raps":
                tune_rows = [int(v) for v in np.asarray(cs.X_raps)[:, 0]]
                # the rows MAPIE scored, in its order: the same StratifiedShuffleSplit it ran
                from sklearn.model_selection import StratifiedShuffleSplit
                tr, va = next(StratifiedShuffleSplit(n_splits=1, test_size=cs.size_raps, random_state=seed)
                              .split(np.arange(n).reshape(-1, 1), y_cal))
                assert [int(v) for v in va] == tune_rows
                cal_rows = [int(v) for v in tr]
                res["tune_rows"] = tune_rows
                res["k_star"] = [int(v) for v in np.ravel(cs.k_star)]
                res["lambda_star"] = [float(v) for v in np.ravel(cs.lambda_star)]
            else:
                cal_rows = list(range(n))
            res["cal_rows"] = cal_rows
            res["scores"] = scores.tolist()
            pc, yc = probs_cal[cal_rows], y_cal[cal_rows]
            u = np.random.RandomState(seed).uniform(size=len(cal_rows)) if score != "lac" else None
            if u is not None:
                res["u"] = u.tolist()
            pt = probs_cal[res.get("tune_rows", [])] if score == "raps" else None
            yt = y_cal[res.get("tune_rows", [])] if score == "raps" else None
            rep = replica(score, pc, yc, u, pt, yt, probs_test, alphas, include_last, search_k_is_lambda=True)
            assert np.array_equal(rep["scores"], scores), (name, score, "scores")
            assert [float(q) for q in rep["quantiles"]] == res["quantiles"], (name, score, rep["quantiles"], res["quantiles"])
            assert rep["sets"] == res["mapie_sets"], (name, score, include_last, "sets")
            if score == "raps":
                assert rep["k_star"] == res["k_star"] and rep["lambda_star"] == res["lambda_star"], (name, rep, res)
                # what the lambda search would pick with the penalty from rank k_star (the paper's RAPS)
                fixed = replica(score, pc, yc, u, pt, yt, probs_test, alphas, include_last, search_k_is_lambda=False)
                res["lambda_star_penalty_from_k"] = [float(v) for v in fixed["lambda_star"]]
            case["results"].append(res)
    return case


def conformal_cases() -> dict:
    rs = np.random.RandomState(1414)
    cases = []
    # 10 classes, f32 softmax outputs as pvera produces them
    z, y = make_logits(rs, 240, 10, 1.6, 2.0, 0.25)
    p = f32_probs(z)
    cases.append(conformal_case("ten_class", p[:200], y[:200], p[200:], [0.95, 0.9, 0.8], seed=7))
    # 5 classes with exact ties inside rows (probabilities in multiples of 1/20), true labels tied included
    n, c = 240, 5
    raw = rs.dirichlet(np.ones(c) * 0.8, size=n)
    q = np.floor(raw * 20)
    for row in q:
        row[np.argmax(row)] += 20 - row.sum()
    pq = q / 20.0
    yq = np.array([rs.choice(c, p=row) for row in pq])
    cases.append(conformal_case("five_class_ties", pq[:200], yq[:200], pq[200:], [0.9, 0.8], seed=3))
    # tiny n: 10 calibration rows, 4 classes; 0.05 is too small an alpha for 10 rows (MAPIE refuses)
    z, y = make_logits(rs, 16, 4, 1.2, 1.5, 0.3)
    p = f32_probs(z)
    cases.append(conformal_case("tiny", p[:10], y[:10], p[10:], [0.9, 0.8, 0.5], seed=11))
    cases.append(conformal_case("tiny_alpha_too_small", p[:10], y[:10], p[10:], [0.95], seed=11))
    # binary: MAPIE allows LAC only
    z, y = make_logits(rs, 130, 2, 1.5, 1.2, 0.2)
    p = f32_probs(z)
    cases.append(conformal_case("binary", p[:100], y[:100], p[100:], [0.9, 0.8], seed=5))
    return {"epsilon": EPS, "cases": cases}


# ---------------------------------------------------------------------------------------------------------------
# selective prediction and OOD (torch-uncertainty)


def tu_selective(probs: np.ndarray, labels: np.ndarray) -> dict:
    from torch_uncertainty.metrics.classification import AURC, AdaptiveCalibrationError
    from torch_uncertainty.metrics.classification.risk_coverage import RiskAtxCov

    p = torch.tensor(probs, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.int64)
    out = {}
    m = AURC()
    m.update(p, y)
    out["aurc"] = float(m.compute())
    for cov in [0.8, 0.9]:
        m = RiskAtxCov(cov_threshold=cov)
        m.update(p, y)
        out[f"risk_at_{int(cov * 100)}"] = float(m.compute())
    for bins in [10, 15]:
        m = AdaptiveCalibrationError(task="multiclass", num_bins=bins, norm="l1", num_classes=probs.shape[1])
        m.update(p, y)
        out[f"ace_{bins}"] = float(m.compute())
    return out


def stable_selective(probs: np.ndarray, labels: np.ndarray) -> dict:
    """The same quantities with a stable order of tied confidences (rows in input order), in float64."""
    n = len(labels)
    conf = probs.max(1)
    err = (probs.argmax(1) != labels).astype(float)
    o = np.argsort(-conf, kind="stable")
    r = np.cumsum(err[o]) / np.arange(1, n + 1)
    out = {"aurc": float(np.sum((r[1:] + r[:-1]) / 2 * (1 / n)) / (1 - 1 / n))}
    for cov in [0.8, 0.9]:
        out[f"risk_at_{int(cov * 100)}"] = float(r[math.ceil(n * cov) - 1])
    o = np.argsort(conf, kind="stable")
    acc = 1 - err[o]
    for bins in [10, 15]:
        ace = 0.0
        for chunk in np.array_split(np.arange(n), bins):
            if len(chunk):
                ace += abs(acc[chunk].mean() - conf[o][chunk].mean()) * len(chunk) / n
        out[f"ace_{bins}"] = float(ace)
    return out


def tu_fpr95(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    from torch_uncertainty.metrics.classification import FPR95

    m = FPR95(pos_label=1)
    m.update(torch.tensor(np.concatenate([id_scores, ood_scores]), dtype=torch.float64),
             torch.tensor([0] * len(id_scores) + [1] * len(ood_scores)))
    return float(m.compute())


def selective_cases() -> dict:
    rs = np.random.RandomState(8080)
    cases = []
    z, y = make_logits(rs, 200, 10, 1.5, 2.0, 0.3)
    cases.append(("ten_class", f32_probs(z), y))
    z, y = make_logits(rs, 157, 2, 1.5, 1.0, 0.25)
    cases.append(("binary", f32_probs(z), y))
    # confidences with ties across rows (probabilities in multiples of 1/10)
    raw = rs.dirichlet(np.ones(4), size=120)
    q = np.floor(raw * 10)
    for row in q:
        row[np.argmax(row)] += 10 - row.sum()
    pq = q / 10.0
    yq = np.array([rs.choice(4, p=row) for row in pq])
    cases.append(("ties", pq, yq))
    z, y = make_logits(rs, 23, 3, 1.0, 1.0, 0.3)
    cases.append(("small", f32_probs(z), y))
    out = []
    for name, p, y in cases:
        tu = tu_selective(p, y)
        st = stable_selective(p, y)
        # torch's sort is not stable: is the torch-uncertainty value the same for every order of the rows?
        invariant = {}
        for key in tu:
            vals = {tu[key]}
            for k in range(6):
                perm = np.random.RandomState(k).permutation(len(y))
                vals.add(tu_selective(p[perm], y[perm])[key])
            invariant[key] = max(vals) - min(vals) < 1e-9
            if invariant[key]:
                assert abs(tu[key] - st[key]) < 1e-6, (name, key, tu[key], st[key])
        out.append({"name": name, "probs": p.tolist(), "labels": y.tolist(), "torch_uncertainty": tu,
                    "order_invariant": invariant, "stable_order": st})
    fpr = []
    for name, n_id, n_ood, shift, quant in [("gaussian", 400, 150, 1.5, None), ("ties", 200, 80, 1.0, 4),
                                             ("exact_95", 50, 20, 2.0, None)]:
        a = rs.randn(n_id)
        b = rs.randn(n_ood) + shift
        if quant:
            a, b = np.round(a * quant) / quant, np.round(b * quant) / quant
        fpr.append({"name": name, "id_scores": a.tolist(), "ood_scores": b.tolist(), "fpr95": tu_fpr95(a, b)})
    return {"cases": out, "fpr95": fpr}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "crates/pvera/tests/fixtures/calibration"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in [("temperature", temperature_cases), ("conformal", conformal_cases),
                     ("selective", selective_cases)]:
        (out / f"{name}.json").write_text(json.dumps(fn(), indent=None, separators=(",", ":")) + "\n")
        print(f"wrote {out / name}.json")


if __name__ == "__main__":
    main()
