//! Split-conformal prediction sets for classification, exactly as MAPIE 1.6.0's
//! `SplitConformalClassifier` (prefit) computes them: LAC, APS and RAPS conformity scores, the
//! finite-sample quantile and the prediction sets. Pure functions over probability rows; every
//! comparison, sum and tolerance follows MAPIE's numpy code operation by operation, so thresholds
//! and sets are bit-identical (tests against MAPIE's own output:
//! `crates/pvera/tests/integration/conformal.rs`). Definitions, conventions and where pvera departs
//! from MAPIE: docs/uncertainty-methods.md.
//!
//! - Label order (APS / RAPS): decreasing probability, ties by decreasing label id — MAPIE's
//!   `np.flip(np.argsort(p))` with a stable argsort. (numpy's default argsort is not stable on
//!   AVX2 / AVX-512 CPUs, so MAPIE's own order among tied labels depends on the machine.)
//! - Scores: LAC `1 − p_y`; APS `Σ_{j ≤ rank(y)} p_(j) − u·p_y` with `u ~ U[0, 1)` per row (MAPIE
//!   always randomises the calibration score; `u = 0` gives the deterministic, conservative
//!   score); RAPS the APS score `+ max(λ·(rank(y) − k), 0)` (rank 1-based).
//! - Quantile: the `⌈(n + 1)(1 − α)⌉`-th smallest of the `n` scores (numpy `method="lower"`);
//!   refused, as MAPIE does, unless `n ≥ max(1/α, 1/(1 − α))`.
//! - Sets: LAC `{c : (1 − p_c) − q ≤ 1e-8}`; APS / RAPS: the labels up to the first whose
//!   cumulative (RAPS: penalised) mass reaches `q` (`LastLabel::Include`, MAPIE's default) or the
//!   last that stays below it (`Exclude`), then every label at least as probable as that one.
//! - RAPS `k` and `λ`: chosen on a tuning part of the calibration set that the quantile does not
//!   use, as MAPIE does: `k = ` the `α`-quantile of the true label's 0-based rank `+ 1`, `λ` the
//!   first of `0.001, 0.01, 0.1, 0.2, 0.5` with the smallest mean set size. MAPIE 1.6.0 penalises
//!   the sets of that search from rank `λ` instead of `k` (a slip in `RAPSConformityScore.
//!   _add_regularization`); [`RapsSearch::Mapie`] reproduces it, [`RapsSearch::PenaltyFromK`]
//!   searches with the paper's penalty. Either way the tuning rows are disjoint from the quantile
//!   rows, so coverage holds; only the set sizes change. `k` and `λ` can also be given directly.

use crate::data::split::{train_val_split, ValSize};
use crate::error::{Error, Result};
use crate::rng::TorchGenerator;

/// MAPIE's `EPSILON` (`mapie._machine_precision`), the tolerance of every comparison.
pub const MAPIE_EPSILON: f64 = 1e-8;
/// The λ values MAPIE's RAPS search tries, in order (from the RAPS paper).
pub const RAPS_LAMBDAS: [f64; 5] = [0.001, 0.01, 0.1, 0.2, 0.5];
/// Share of the calibration rows that tune RAPS's `k` and `λ`. MAPIE's `size_raps` defaults to
/// 0.2 but `set_external_attributes` resets it to `None`, so scikit-learn's
/// `StratifiedShuffleSplit` default of 10 % applies; so here.
pub const RAPS_TUNING_FRACTION: f64 = 0.1;

/// A conformity score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConformalScore {
    /// Least ambiguous set-valued classifier (Sadinle et al. 2019): `1 − p_y`.
    Lac,
    /// Adaptive prediction sets (Romano et al. 2020): cumulative mass up to the true label.
    Aps,
    /// Regularised APS (Angelopoulos et al. 2021): APS plus a rank penalty.
    Raps,
}

impl ConformalScore {
    /// Every score, in the order MAPIE documents them.
    pub const ALL: [ConformalScore; 3] = [ConformalScore::Lac, ConformalScore::Aps, ConformalScore::Raps];

    /// The name used in flags and files (`lac`, `aps`, `raps`).
    pub fn name(self) -> &'static str {
        match self {
            ConformalScore::Lac => "lac",
            ConformalScore::Aps => "aps",
            ConformalScore::Raps => "raps",
        }
    }
}

impl std::fmt::Display for ConformalScore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ConformalScore {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lac" => Ok(ConformalScore::Lac),
            "aps" => Ok(ConformalScore::Aps),
            "raps" => Ok(ConformalScore::Raps),
            other => Err(Error::config("score", format!("unknown conformity score {other:?}; use lac, aps or raps"))),
        }
    }
}

/// What APS / RAPS do with the label whose cumulative mass crosses the quantile (MAPIE's
/// `include_last_label`; the randomised variant is not implemented).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LastLabel {
    /// Keep it (`include_last_label=True`, MAPIE's default): coverage `≥ 1 − α`, never empty.
    #[default]
    Include,
    /// Drop it unless it is the most probable label (`include_last_label=False`).
    Exclude,
}

/// How RAPS's λ search penalises the tuning sets (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RapsSearch {
    /// As MAPIE 1.6.0: the search's sets are penalised from rank λ (its slip).
    #[default]
    Mapie,
    /// The paper's penalty from rank `k` in the search too.
    PenaltyFromK,
}

/// RAPS's rank penalty `λ·max(rank − k, 0)`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RapsPenalty {
    /// `k_reg`: ranks above it are penalised (1-based).
    pub k_reg: usize,
    /// `λ`, the penalty per rank.
    pub lambda: f64,
}

/// The threshold of one miscoverage level.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConformalThreshold {
    /// Miscoverage `α` (target coverage `1 − α`).
    pub alpha: f64,
    /// The conformal quantile `q̂` of the (RAPS: penalised) scores.
    pub quantile: f64,
    /// RAPS's penalty at this `α`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raps: Option<RapsPenalty>,
}

/// Fitted conformal thresholds of one score for several `α`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConformalFit {
    /// The conformity score.
    pub score: ConformalScore,
    /// APS / RAPS last-label rule.
    pub last_label: LastLabel,
    /// Classes of the probability rows.
    pub classes: usize,
    /// Calibration rows whose scores set the quantiles.
    pub n: usize,
    /// One threshold per `α`, in the order asked.
    pub thresholds: Vec<ConformalThreshold>,
    /// RAPS: the calibration rows (indices into the arrays given to [`calibrate`]) that chose
    /// `k` and `λ`; empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tuning_rows: Vec<usize>,
    /// Whether the APS / RAPS calibration scores were randomised (`u ~ U[0, 1)`).
    pub randomized: bool,
    /// Seed of the randomisation and of RAPS's tuning split, when [`calibrate`] drew them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Options of [`calibrate`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConformalOptions {
    /// APS / RAPS last-label rule.
    pub last_label: LastLabel,
    /// Seed of the uniforms and of RAPS's tuning split (seeded [`TorchGenerator`]s).
    pub seed: u64,
    /// Randomise the APS / RAPS calibration scores, as MAPIE always does.
    pub randomized: bool,
    /// RAPS: share of the calibration rows that tune `k` and `λ`.
    pub raps_tuning_fraction: f64,
    /// RAPS: the λ search's penalty.
    pub raps_search: RapsSearch,
}

impl Default for ConformalOptions {
    fn default() -> Self {
        ConformalOptions {
            last_label: LastLabel::Include,
            seed: 0,
            randomized: true,
            raps_tuning_fraction: RAPS_TUNING_FRACTION,
            raps_search: RapsSearch::Mapie,
        }
    }
}

/// Checks probability rows the way MAPIE's `check_proba_normalized` does (every row sums to 1
/// within `1e-5`), plus equal widths of at least 2, finite, non-negative values; returns `C`.
pub fn check_probabilities(probs: &[Vec<f64>], what: &str) -> Result<usize> {
    let c = probs.first().map_or(0, Vec::len);
    if probs.is_empty() || c < 2 {
        return Err(Error::Model(format!(
            "{what}: {} row(s) of {c} class probabilities; need at least one row of at least 2",
            probs.len()
        )));
    }
    for (i, p) in probs.iter().enumerate() {
        check_row(p, c, i, what)?;
    }
    Ok(c)
}

/// One row of [`check_probabilities`].
fn check_row(p: &[f64], classes: usize, i: usize, what: &str) -> Result<()> {
    if p.len() != classes {
        return Err(Error::Model(format!("{what}: row {i} has {} probabilities, expected {classes}", p.len())));
    }
    if let Some(v) = p.iter().find(|v| !v.is_finite() || **v < 0.0) {
        return Err(Error::NonFinite {
            what: format!("{what}: row {i}"),
            count: p.iter().filter(|v| !v.is_finite() || **v < 0.0).count(),
            hint: format!(" or negative value (first bad value {v}); pass softmax probabilities"),
        });
    }
    let s: f64 = p.iter().sum();
    if (s - 1.0).abs() > 1e-5 {
        return Err(Error::Model(format!(
            "{what}: row {i} sums to {s}, expected 1 within 1e-5 (MAPIE's check); pass softmax probabilities, not \
             logits or scores"
        )));
    }
    Ok(())
}

fn check_labels(labels: &[usize], rows: usize, classes: usize, what: &str) -> Result<()> {
    if labels.len() != rows {
        return Err(Error::Model(format!("{what}: {rows} probability row(s) but {} label(s)", labels.len())));
    }
    if let Some((i, &y)) = labels.iter().enumerate().find(|(_, &y)| y >= classes) {
        return Err(Error::Data(format!(
            "{what}: example {i} has label {y} but there are {classes} classes; the labels and the model's class \
             list disagree"
        )));
    }
    Ok(())
}

/// Checks `0 < α < 1` and MAPIE's sample-size rule `n ≥ max(1/α, 1/(1 − α))` (which guarantees
/// `⌈(n + 1)(1 − α)⌉ ≤ n`).
pub fn check_alpha(alpha: f64, n: usize, what: &str) -> Result<()> {
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(Error::config("alpha", format!("got {alpha}; a miscoverage level must be in (0, 1), e.g. 0.1")));
    }
    if (n as f64) < f64::max(1.0 / alpha, 1.0 / (1.0 - alpha)) {
        let need = f64::max(1.0 / alpha, 1.0 / (1.0 - alpha)).ceil();
        return Err(Error::Data(format!(
            "{what}: {n} row(s) are too few for alpha = {alpha}: split-conformal needs n >= max(1/alpha, \
             1/(1 - alpha)) = {need} (MAPIE's rule); use more calibration rows or a larger alpha"
        )));
    }
    Ok(())
}

/// MAPIE's label order of one row: decreasing probability, ties by decreasing label id.
pub fn label_order(p: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(b.cmp(&a)));
    idx
}

/// Cumulative mass in [`label_order`], at each label's own position; `penalty = Some((k, λ))`
/// adds `λ·max(0, rank − k)` (rank 1-based) after the sum, as MAPIE does.
fn cumulative(p: &[f64], penalty: Option<(f64, f64)>) -> Vec<f64> {
    let order = label_order(p);
    let mut out = vec![0.0; p.len()];
    let mut acc = 0.0;
    for (j, &label) in order.iter().enumerate() {
        acc += p[label];
        out[label] = match penalty {
            Some((k, lambda)) => acc + lambda * f64::max(0.0, (j + 1) as f64 - k),
            None => acc,
        };
    }
    out
}

/// The true label's cumulative mass (APS's deterministic score) and its 1-based rank.
pub fn true_label_mass_and_rank(p: &[f64], y: usize) -> (f64, usize) {
    let order = label_order(p);
    let mut acc = 0.0;
    for (j, &label) in order.iter().enumerate() {
        acc += p[label];
        if label == y {
            return (acc, j + 1);
        }
    }
    (acc, p.len())
}

/// LAC scores `1 − p_y`.
pub fn lac_scores(probs: &[Vec<f64>], labels: &[usize]) -> Result<Vec<f64>> {
    let c = check_probabilities(probs, "LAC scores")?;
    check_labels(labels, probs.len(), c, "LAC scores")?;
    Ok(probs.iter().zip(labels).map(|(p, &y)| 1.0 - p[y]).collect())
}

/// APS scores `mass(y) − u·p_y` (MAPIE's randomised score; all-zero `u` gives the deterministic one).
pub fn aps_scores(probs: &[Vec<f64>], labels: &[usize], u: &[f64]) -> Result<Vec<f64>> {
    let c = check_probabilities(probs, "APS scores")?;
    check_labels(labels, probs.len(), c, "APS scores")?;
    check_uniforms(u, probs.len())?;
    Ok(probs.iter().zip(labels).zip(u).map(|((p, &y), &u)| true_label_mass_and_rank(p, y).0 - u * p[y]).collect())
}

fn check_uniforms(u: &[f64], n: usize) -> Result<()> {
    if u.len() != n {
        return Err(Error::Model(format!("APS / RAPS scores: {n} row(s) but {} uniform(s)", u.len())));
    }
    if let Some(v) = u.iter().find(|v| !(**v >= 0.0 && **v < 1.0)) {
        return Err(Error::Model(format!("APS / RAPS scores: uniform {v} is outside [0, 1)")));
    }
    Ok(())
}

/// The `⌈(n + 1)(1 − α)⌉`-th smallest value (MAPIE's `_compute_classification_quantile`: numpy's
/// `quantile(scores, ⌈(n + 1)(1 − α)⌉ / n, method="lower")`), after [`check_alpha`].
pub fn conformal_quantile(scores: &[f64], alpha: f64) -> Result<f64> {
    check_alpha(alpha, scores.len(), "conformal quantile")?;
    if let Some(v) = scores.iter().find(|v| v.is_nan()) {
        return Err(Error::NonFinite { what: "conformity scores".into(), count: 1, hint: format!(" ({v})") });
    }
    let n = scores.len();
    let k = ((n + 1) as f64 * (1.0 - alpha)).ceil() as usize;
    let mut s = scores.to_vec();
    s.sort_by(f64::total_cmp);
    Ok(s[k.clamp(1, n) - 1])
}

/// The index of the label after which APS / RAPS stop (MAPIE's `get_last_index_included`), or
/// `None` when no cumulative mass reaches `q` (see [`prediction_set`]).
fn last_included(cum: &[f64], q: f64, last_label: LastLabel) -> Option<usize> {
    match last_label {
        LastLabel::Include => {
            // masked argmin of cum − q over the entries not below −ε; first index on ties
            let mut best: Option<(usize, f64)> = None;
            for (i, &c) in cum.iter().enumerate() {
                let d = c - q;
                if d >= -MAPIE_EPSILON && best.is_none_or(|(_, b)| d < b) {
                    best = Some((i, d));
                }
            }
            best.map(|b| b.0)
        }
        LastLabel::Exclude => {
            // masked argmax of cum − max(q, min cum) over the entries not above ε
            let min = cum.iter().copied().fold(f64::INFINITY, f64::min);
            let mt = f64::max(q, min);
            let mut best: Option<(usize, f64)> = None;
            for (i, &c) in cum.iter().enumerate() {
                let d = c - mt;
                if d <= MAPIE_EPSILON && best.is_none_or(|(_, b)| d > b) {
                    best = Some((i, d));
                }
            }
            best.map(|b| b.0)
        }
    }
}

/// The APS / RAPS set of one row given its cumulative masses.
fn cumulative_set(p: &[f64], cum: &[f64], q: f64, last_label: LastLabel) -> Vec<usize> {
    let Some(last) = last_included(cum, q, last_label) else {
        // q above every cumulative mass: every label (MAPIE's masked argmin falls back to label 0)
        return (0..p.len()).collect();
    };
    let mut p_last = p[last];
    if p_last <= MAPIE_EPSILON {
        // MAPIE replaces a (near-)zero last probability by the smallest one not below ε
        p_last = p.iter().copied().filter(|&v| v >= MAPIE_EPSILON).fold(f64::INFINITY, f64::min);
    }
    (0..p.len()).filter(|&c| p[c] - p_last >= -MAPIE_EPSILON).collect()
}

/// The prediction set (sorted label ids) of one probability row at one threshold.
pub fn prediction_set(
    p: &[f64],
    score: ConformalScore,
    last_label: LastLabel,
    threshold: &ConformalThreshold,
) -> Vec<usize> {
    let q = threshold.quantile;
    match score {
        ConformalScore::Lac => (0..p.len()).filter(|&c| (1.0 - p[c]) - q <= MAPIE_EPSILON).collect(),
        ConformalScore::Aps => cumulative_set(p, &cumulative(p, None), q, last_label),
        ConformalScore::Raps => {
            let pen = threshold.raps.map(|r| (r.k_reg as f64, r.lambda));
            cumulative_set(p, &cumulative(p, pen), q, last_label)
        }
    }
}

fn check_alphas(alphas: &[f64], n: usize, what: &str) -> Result<()> {
    if alphas.is_empty() {
        return Err(Error::config("alpha", "no miscoverage level given; pass e.g. 0.1"));
    }
    alphas.iter().try_for_each(|&a| check_alpha(a, n, what))
}

fn needs_three_classes(score: ConformalScore, classes: usize) -> Result<()> {
    if classes < 3 {
        return Err(Error::config(
            "score",
            format!(
                "{score} needs at least 3 classes, the model has {classes}; use lac for a binary task (MAPIE 1.6.0 \
                 accepts only 'lac' for binary targets)"
            ),
        ));
    }
    Ok(())
}

/// One threshold per `α` from unpenalised scores (LAC, APS).
fn quantiles(scores: &[f64], alphas: &[f64], what: &str) -> Result<Vec<ConformalThreshold>> {
    check_alphas(alphas, scores.len(), what)?;
    alphas
        .iter()
        .map(|&alpha| Ok(ConformalThreshold { alpha, quantile: conformal_quantile(scores, alpha)?, raps: None }))
        .collect()
}

impl ConformalFit {
    fn new(
        score: ConformalScore,
        last_label: LastLabel,
        classes: usize,
        thresholds: Vec<ConformalThreshold>,
        n: usize,
        u: &[f64],
    ) -> Self {
        ConformalFit {
            score,
            last_label,
            classes,
            n,
            thresholds,
            tuning_rows: Vec::new(),
            randomized: u.iter().any(|&v| v != 0.0),
            seed: None,
        }
    }
}

/// LAC thresholds on calibration rows.
pub fn fit_lac(probs: &[Vec<f64>], labels: &[usize], alphas: &[f64]) -> Result<ConformalFit> {
    let scores = lac_scores(probs, labels)?;
    let thresholds = quantiles(&scores, alphas, "LAC calibration set")?;
    Ok(ConformalFit::new(ConformalScore::Lac, LastLabel::Include, probs[0].len(), thresholds, probs.len(), &[]))
}

/// APS thresholds on calibration rows with the given uniforms (one per row; zeros for the
/// deterministic score).
pub fn fit_aps(
    probs: &[Vec<f64>],
    labels: &[usize],
    alphas: &[f64],
    u: &[f64],
    last_label: LastLabel,
) -> Result<ConformalFit> {
    let scores = aps_scores(probs, labels, u)?;
    needs_three_classes(ConformalScore::Aps, probs[0].len())?;
    let thresholds = quantiles(&scores, alphas, "APS calibration set")?;
    Ok(ConformalFit::new(ConformalScore::Aps, last_label, probs[0].len(), thresholds, probs.len(), u))
}

/// RAPS's `k` and `λ` per `α`, chosen on tuning rows as MAPIE does (see the module docs).
pub fn raps_penalties(
    probs: &[Vec<f64>],
    labels: &[usize],
    alphas: &[f64],
    last_label: LastLabel,
    search: RapsSearch,
) -> Result<Vec<RapsPenalty>> {
    let c = check_probabilities(probs, "RAPS tuning rows")?;
    check_labels(labels, probs.len(), c, "RAPS tuning rows")?;
    needs_three_classes(ConformalScore::Raps, c)?;
    check_alphas(alphas, probs.len(), "RAPS tuning rows")?;
    let mass_rank: Vec<(f64, usize)> = probs.iter().zip(labels).map(|(p, &y)| true_label_mass_and_rank(p, y)).collect();
    let positions: Vec<f64> = mass_rank.iter().map(|&(_, r)| (r - 1) as f64).collect();
    alphas
        .iter()
        .map(|&alpha| {
            let k_reg = conformal_quantile(&positions, alpha)? as usize + 1;
            let (mut best, mut lambda_star) = (f64::MAX, 0.0);
            for lambda in RAPS_LAMBDAS {
                let reg: Vec<f64> =
                    mass_rank.iter().map(|&(m, r)| m + f64::max(lambda * (r as f64 - k_reg as f64), 0.0)).collect();
                let q = conformal_quantile(&reg, alpha)?;
                let k_pen = match search {
                    RapsSearch::Mapie => lambda,
                    RapsSearch::PenaltyFromK => k_reg as f64,
                };
                let total: usize = probs
                    .iter()
                    .map(|p| cumulative_set(p, &cumulative(p, Some((k_pen, lambda))), q, last_label).len())
                    .sum();
                let size = total as f64 / probs.len() as f64;
                if size < best - MAPIE_EPSILON {
                    best = size;
                    lambda_star = lambda;
                }
            }
            Ok(RapsPenalty { k_reg, lambda: lambda_star })
        })
        .collect()
}

/// RAPS thresholds on calibration rows with given uniforms and one penalty per `α` (from
/// [`raps_penalties`] on disjoint tuning rows, or chosen by the caller).
pub fn fit_raps(
    probs: &[Vec<f64>],
    labels: &[usize],
    alphas: &[f64],
    u: &[f64],
    penalties: &[RapsPenalty],
    last_label: LastLabel,
) -> Result<ConformalFit> {
    let c = check_probabilities(probs, "RAPS calibration set")?;
    check_labels(labels, probs.len(), c, "RAPS calibration set")?;
    check_uniforms(u, probs.len())?;
    needs_three_classes(ConformalScore::Raps, c)?;
    check_alphas(alphas, probs.len(), "RAPS calibration set")?;
    if penalties.len() != alphas.len() {
        return Err(Error::Model(format!("RAPS: {} alpha(s) but {} penalties", alphas.len(), penalties.len())));
    }
    if let Some(bad) = penalties.iter().find(|r| r.k_reg == 0 || !(r.lambda >= 0.0 && r.lambda.is_finite())) {
        return Err(Error::config(
            "raps",
            format!("k_reg {} / lambda {}: need k_reg >= 1 and lambda >= 0", bad.k_reg, bad.lambda),
        ));
    }
    let base: Vec<(f64, usize)> = probs
        .iter()
        .zip(labels)
        .zip(u)
        .map(|((p, &y), &u)| {
            let (m, r) = true_label_mass_and_rank(p, y);
            (m - u * p[y], r)
        })
        .collect();
    let thresholds = alphas
        .iter()
        .zip(penalties)
        .map(|(&alpha, &pen)| {
            let reg: Vec<f64> =
                base.iter().map(|&(s, r)| s + f64::max(pen.lambda * (r as f64 - pen.k_reg as f64), 0.0)).collect();
            Ok(ConformalThreshold { alpha, quantile: conformal_quantile(&reg, alpha)?, raps: Some(pen) })
        })
        .collect::<Result<_>>()?;
    Ok(ConformalFit::new(ConformalScore::Raps, last_label, c, thresholds, probs.len(), u))
}

/// Fits `score` on calibration rows, drawing what MAPIE draws from seeded generators: RAPS's
/// tuning rows (a stratified split, [`train_val_split`] with `opts.seed`: `⌈fraction·n⌉` rows tune
/// `k` and `λ`, the others set the quantile) and the uniforms of the APS / RAPS scores
/// (`uniform_(0, 1)` of a [`TorchGenerator`] seeded with `opts.seed + 1`, one per quantile row in
/// order).
pub fn calibrate(
    probs: &[Vec<f64>],
    labels: &[usize],
    alphas: &[f64],
    score: ConformalScore,
    opts: &ConformalOptions,
) -> Result<ConformalFit> {
    let c = check_probabilities(probs, "calibration set")?;
    check_labels(labels, probs.len(), c, "calibration set")?;
    let uniforms = |n: usize| {
        let mut u = vec![0.0; n];
        if opts.randomized {
            TorchGenerator::new(opts.seed.wrapping_add(1)).uniform_f64(&mut u, 0.0, 1.0);
        }
        u
    };
    let mut fit = match score {
        ConformalScore::Lac => fit_lac(probs, labels, alphas)?,
        ConformalScore::Aps => fit_aps(probs, labels, alphas, &uniforms(probs.len()), opts.last_label)?,
        ConformalScore::Raps => {
            needs_three_classes(score, c)?;
            let f = opts.raps_tuning_fraction;
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::config("raps tuning fraction", format!("got {f}; use a share in (0, 1), e.g. 0.1")));
            }
            let n = probs.len();
            let n_tune = (f * n as f64).ceil() as usize;
            let strata: Vec<u32> = labels.iter().map(|&y| y as u32).collect();
            let split = train_val_split(n, ValSize::Count(n_tune), opts.seed, Some(&strata))?;
            let pick = |rows: &[usize]| -> (Vec<Vec<f64>>, Vec<usize>) {
                (rows.iter().map(|&i| probs[i].clone()).collect(), rows.iter().map(|&i| labels[i]).collect())
            };
            let (tp, tl) = pick(&split.val);
            let (cp, cl) = pick(&split.train);
            let pens = raps_penalties(&tp, &tl, alphas, opts.last_label, opts.raps_search)?;
            let mut fit = fit_raps(&cp, &cl, alphas, &uniforms(cp.len()), &pens, opts.last_label)?;
            fit.tuning_rows = split.val;
            fit
        }
    };
    fit.randomized = opts.randomized && score != ConformalScore::Lac;
    fit.seed = Some(opts.seed);
    Ok(fit)
}

impl ConformalFit {
    /// The sets of one probability row, one per threshold (in the order of `thresholds`).
    pub fn sets(&self, p: &[f64]) -> Result<Vec<Vec<usize>>> {
        check_row(p, self.classes, 0, "conformal sets")?;
        Ok(self.thresholds.iter().map(|t| prediction_set(p, self.score, self.last_label, t)).collect())
    }

    /// The sets of many rows at threshold `index`.
    pub fn sets_at(&self, probs: &[Vec<f64>], index: usize) -> Result<Vec<Vec<usize>>> {
        let t = self.thresholds.get(index).ok_or_else(|| {
            Error::Model(format!("conformal threshold {index} asked, {} fitted", self.thresholds.len()))
        })?;
        probs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                check_row(p, self.classes, i, "conformal sets")?;
                Ok(prediction_set(p, self.score, self.last_label, t))
            })
            .collect()
    }

    /// The index of the threshold fitted for `alpha`, if any.
    pub fn alpha_index(&self, alpha: f64) -> Option<usize> {
        self.thresholds.iter().position(|t| (t.alpha - alpha).abs() < 1e-12)
    }
}

/// Share of rows whose set holds the label.
pub fn empirical_coverage(sets: &[Vec<usize>], labels: &[usize]) -> Result<f64> {
    if sets.len() != labels.len() || sets.is_empty() {
        return Err(Error::Model(format!("coverage: {} set(s) for {} label(s)", sets.len(), labels.len())));
    }
    Ok(sets.iter().zip(labels).filter(|(s, y)| s.contains(y)).count() as f64 / sets.len() as f64)
}

/// Mean number of labels per set.
pub fn mean_set_size(sets: &[Vec<usize>]) -> f64 {
    if sets.is_empty() {
        return f64::NAN;
    }
    sets.iter().map(Vec::len).sum::<usize>() as f64 / sets.len() as f64
}

/// Coverage and size figures of the sets of one score at one `α`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SetSummary {
    /// Miscoverage level.
    pub alpha: f64,
    /// Share of rows whose set holds the label (target `≥ 1 − α`).
    pub coverage: f64,
    /// Mean set size.
    pub mean_size: f64,
    /// Share of empty sets (LAC can return them).
    pub empty: f64,
    /// Share of single-label sets.
    pub singletons: f64,
}

/// [`SetSummary`] of one `α`'s sets.
pub fn set_summary(alpha: f64, sets: &[Vec<usize>], labels: &[usize]) -> Result<SetSummary> {
    let coverage = empirical_coverage(sets, labels)?;
    let n = sets.len() as f64;
    Ok(SetSummary {
        alpha,
        coverage,
        mean_size: mean_set_size(sets),
        empty: sets.iter().filter(|s| s.is_empty()).count() as f64 / n,
        singletons: sets.iter().filter(|s| s.len() == 1).count() as f64 / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_breaks_ties_by_decreasing_label() {
        assert_eq!(label_order(&[0.2, 0.4, 0.2, 0.2]), vec![1, 3, 2, 0]);
        let p = [0.2, 0.4, 0.2, 0.2];
        let ((m2, r2), (m0, r0)) = (true_label_mass_and_rank(&p, 2), true_label_mass_and_rank(&p, 0));
        assert_eq!((r2, r0), (3, 4));
        assert!((m2 - 0.8).abs() < 1e-15 && (m0 - 1.0).abs() < 1e-15);
    }

    #[test]
    fn quantile_is_the_finite_sample_order_statistic() {
        let s: Vec<f64> = (1..=10).map(|v| v as f64).collect();
        // ceil(11 * 0.9) = 10 -> the largest; ceil(11 * 0.5) = 6
        assert_eq!(conformal_quantile(&s, 0.1).unwrap(), 10.0);
        assert_eq!(conformal_quantile(&s, 0.5).unwrap(), 6.0);
        assert!(conformal_quantile(&s, 0.05).is_err());
        assert!(conformal_quantile(&s, 0.0).is_err());
        assert!(conformal_quantile(&s, 1.0).is_err());
    }

    #[test]
    fn include_and_exclude_last_label() {
        let p = [0.5, 0.3, 0.15, 0.05];
        let t = ConformalThreshold { alpha: 0.1, quantile: 0.7, raps: None };
        assert_eq!(prediction_set(&p, ConformalScore::Aps, LastLabel::Include, &t), vec![0, 1]);
        assert_eq!(prediction_set(&p, ConformalScore::Aps, LastLabel::Exclude, &t), vec![0]);
        // q below the top mass: the top label either way
        let t = ConformalThreshold { alpha: 0.1, quantile: 0.2, raps: None };
        assert_eq!(prediction_set(&p, ConformalScore::Aps, LastLabel::Exclude, &t), vec![0]);
        // LAC: 1 - p <= q
        let t = ConformalThreshold { alpha: 0.1, quantile: 0.7, raps: None };
        assert_eq!(prediction_set(&p, ConformalScore::Lac, LastLabel::Include, &t), vec![0, 1]);
        let t = ConformalThreshold { alpha: 0.1, quantile: 0.4, raps: None };
        assert!(prediction_set(&p, ConformalScore::Lac, LastLabel::Include, &t).is_empty());
    }

    #[test]
    fn binary_aps_is_refused_and_bad_rows_are_errors() {
        let p = vec![vec![0.6, 0.4]; 20];
        let y = vec![0; 20];
        assert!(fit_aps(&p, &y, &[0.1], &[0.0; 20], LastLabel::Include).is_err());
        assert!(fit_lac(&p, &y, &[0.1]).is_ok());
        assert!(fit_lac(&vec![vec![0.6, 0.6]; 20], &y, &[0.1]).is_err());
        assert!(fit_lac(&p, &vec![2; 20], &[0.1]).is_err());
        assert!("RAPS".parse::<ConformalScore>().unwrap() == ConformalScore::Raps);
        assert!("top_k".parse::<ConformalScore>().is_err());
    }
}
