//! A labelled evaluation of a classifier's predictions: calibration of the mean mode and of the
//! Monte Carlo mean, how well the uncertainty scores rank the mistakes (misclassification AUROC),
//! interval widths, vote unanimity, mutual information, and OOD AUROCs against other sets; the
//! selective figures (AURC, selective accuracy at 80 / 90 % coverage, adaptive ECE), FPR at 95 %
//! TPR per OOD set and conformal coverage / set size ([`figures`], [`ood_figures`],
//! [`set_figures`]). The maths of `pvera eval`, kept here so every front end reports the same
//! figures; "after temperature scaling" is the same functions on
//! [`Calibrator::temper`](crate::predictor::Calibrator::temper)ed predictions.

use std::collections::BTreeMap;

use serde::Serialize;

use super::calibration::{calibration, Calibration};
use super::conformal::{set_summary, ConformalFit, ConformalScore, SetSummary};
use super::ood::{auroc, OodScores};
use super::prediction::Prediction;
use super::selective::{adaptive_ece, confidences_and_correct, fpr95, selective, Selective};
use super::stats::entropy;
use crate::error::{Error, Result};

/// The uncertainty scores of one prediction in both modes (higher = more likely wrong / OOD).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModeScores {
    /// Mean mode: `1 − max p`, entropy (its mutual information is 0 by definition).
    pub mean_mode: OodScores,
    /// Monte Carlo: `1 − max p̄`, predictive entropy, mutual information.
    pub mc: Option<OodScores>,
}

impl ModeScores {
    /// The scores of a prediction.
    pub fn of(p: &Prediction) -> ModeScores {
        let max = p.mean_mode.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        ModeScores {
            mean_mode: OodScores { msp: 1.0 - max, entropy: entropy(&p.mean_mode), mutual_information: 0.0 },
            mc: p.mc.as_ref().map(OodScores::from_stats),
        }
    }
}

/// AUROCs of every score, positives (`pos`: mistakes or OOD inputs) against negatives, keyed
/// `mean_mode_msp`, `mean_mode_entropy`, `mc_msp`, `mc_entropy`, `mc_mutual_information` (the
/// Monte Carlo keys only when both sets were sampled).
pub fn auroc_table(pos: &[ModeScores], neg: &[ModeScores]) -> Result<BTreeMap<String, f64>> {
    score_table(pos, neg, auroc)
}

/// FPR at 95 % TPR of every score (positives `pos`, negatives `neg`), keyed as
/// [`auroc_table`].
pub fn fpr95_table(pos: &[ModeScores], neg: &[ModeScores]) -> Result<BTreeMap<String, f64>> {
    score_table(pos, neg, fpr95)
}

/// `metric(negatives, positives)` of every score, keyed as [`auroc_table`].
fn score_table(
    pos: &[ModeScores],
    neg: &[ModeScores],
    metric: fn(&[f64], &[f64]) -> Result<f64>,
) -> Result<BTreeMap<String, f64>> {
    type Get = fn(&ModeScores) -> Option<f64>;
    let rows: [(&str, Get); 5] = [
        ("mean_mode_msp", |s| Some(s.mean_mode.msp)),
        ("mean_mode_entropy", |s| Some(s.mean_mode.entropy)),
        ("mc_msp", |s| s.mc.map(|m| m.msp)),
        ("mc_entropy", |s| s.mc.map(|m| m.entropy)),
        ("mc_mutual_information", |s| s.mc.map(|m| m.mutual_information)),
    ];
    let mut out = BTreeMap::new();
    for (name, get) in rows {
        let p: Option<Vec<f64>> = pos.iter().map(get).collect();
        let n: Option<Vec<f64>> = neg.iter().map(get).collect();
        if let (Some(p), Some(n)) = (p, n) {
            out.insert(name.to_string(), metric(&n, &p)?);
        }
    }
    Ok(out)
}

/// Figures that only Monte Carlo predictions have.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct McExtra {
    /// Mean width of the Student-t interval of the modal class's probability.
    pub mean_interval_width: f64,
    /// Share of inputs whose samples all voted for one class.
    pub unanimous_vote_share: f64,
    /// Mean mutual information (nats).
    pub mean_mutual_information: f64,
    /// Misclassification-detection AUROCs (mistakes of the Monte Carlo prediction as positives);
    /// `None` when every prediction was right or every one wrong.
    pub error_detection_auroc: Option<BTreeMap<String, f64>>,
}

/// A labelled evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    /// Calibration of the mean mode.
    pub mean_mode: Calibration,
    /// Calibration of the Monte Carlo mean (when sampled).
    pub monte_carlo: Option<Calibration>,
    /// Monte Carlo figures (when sampled).
    pub monte_carlo_extra: Option<McExtra>,
}

/// Evaluates predictions against their labels with `bins` reliability bins. All predictions
/// must be of one kind: all sampled or none.
pub fn evaluate(preds: &[Prediction], labels: &[usize], bins: usize) -> Result<Evaluation> {
    if preds.len() != labels.len() {
        return Err(Error::Model(format!("evaluate: {} predictions but {} labels", preds.len(), labels.len())));
    }
    if preds.is_empty() {
        return Err(Error::Model("evaluate: no predictions".into()));
    }
    let sampled = preds.iter().filter(|p| p.mc.is_some()).count();
    if sampled != 0 && sampled != preds.len() {
        return Err(Error::Model(format!("evaluate: {sampled} of {} predictions were sampled; expected all or none", preds.len())));
    }
    let mean_probs: Vec<Vec<f64>> = preds.iter().map(|p| p.mean_mode.clone()).collect();
    let mean_mode = calibration(&mean_probs, labels, bins)?;
    if sampled == 0 {
        return Ok(Evaluation { mean_mode, monte_carlo: None, monte_carlo_extra: None });
    }
    let stats: Vec<_> = preds.iter().filter_map(|p| p.mc.as_ref()).collect();
    let mc_probs: Vec<Vec<f64>> = stats.iter().map(|s| s.mean_probs.clone()).collect();
    let monte_carlo = calibration(&mc_probs, labels, bins)?;
    let scores: Vec<ModeScores> = preds.iter().map(ModeScores::of).collect();
    let (mut wrong, mut right) = (Vec::new(), Vec::new());
    for ((sc, st), &y) in scores.iter().zip(&stats).zip(labels) {
        if st.predicted != y {
            wrong.push(*sc);
        } else {
            right.push(*sc);
        }
    }
    let error_detection_auroc =
        if wrong.is_empty() || right.is_empty() { None } else { Some(auroc_table(&wrong, &right)?) };
    let widths: Vec<f64> = stats.iter().filter_map(|s| s.interval.map(|(a, b)| b - a)).collect();
    let n = stats.len() as f64;
    let extra = McExtra {
        mean_interval_width: widths.iter().sum::<f64>() / widths.len().max(1) as f64,
        unanimous_vote_share: stats.iter().filter(|s| s.vote_share >= 1.0).count() as f64 / n,
        mean_mutual_information: stats.iter().map(|s| s.mutual_information).sum::<f64>() / n,
        error_detection_auroc,
    };
    Ok(Evaluation { mean_mode, monte_carlo: Some(monte_carlo), monte_carlo_extra: Some(extra) })
}

/// OOD AUROCs of an out-of-distribution set against the in-distribution predictions.
pub fn ood_auroc(in_dist: &[Prediction], ood: &[Prediction]) -> Result<BTreeMap<String, f64>> {
    let i: Vec<ModeScores> = in_dist.iter().map(ModeScores::of).collect();
    let o: Vec<ModeScores> = ood.iter().map(ModeScores::of).collect();
    auroc_table(&o, &i)
}

/// How well each uncertainty score separates an OOD set from the in-distribution predictions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OodFigures {
    /// AUROC per score (OOD = positive; 0.5 = chance).
    pub auroc: BTreeMap<String, f64>,
    /// False-positive rate at 95 % true-positive rate per score (lower is better).
    pub fpr95: BTreeMap<String, f64>,
}

/// [`OodFigures`] of an OOD set against the in-distribution predictions.
pub fn ood_figures(in_dist: &[Prediction], ood: &[Prediction]) -> Result<OodFigures> {
    let i: Vec<ModeScores> = in_dist.iter().map(ModeScores::of).collect();
    let o: Vec<ModeScores> = ood.iter().map(ModeScores::of).collect();
    Ok(OodFigures { auroc: auroc_table(&o, &i)?, fpr95: fpr95_table(&o, &i)? })
}

/// Calibration, adaptive ECE and selective-prediction figures of one mode's probabilities.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModeFigures {
    /// Accuracy, NLL, Brier, equal-width ECE / MCE and the reliability bins.
    pub calibration: Calibration,
    /// Equal-mass (adaptive) ECE with as many bins as `calibration`.
    pub adaptive_ece: f64,
    /// AURC and selective risk / accuracy at 80 % and 90 % coverage.
    pub selective: Selective,
    /// Misclassification AUROC of `1 − max p`: how well the mode's own confidence ranks its own
    /// mistakes above its right answers (`None` when every prediction is right or every one wrong).
    pub error_auroc: Option<f64>,
}

/// [`ModeFigures`] of probability rows against labels with `bins` bins.
pub fn mode_figures(probs: &[Vec<f64>], labels: &[usize], bins: usize) -> Result<ModeFigures> {
    let (conf, ok) = confidences_and_correct(probs, labels)?;
    let (mut wrong, mut right) = (Vec::new(), Vec::new());
    for (c, ok) in conf.iter().zip(&ok) {
        if *ok { right.push(1.0 - c) } else { wrong.push(1.0 - c) }
    }
    let error_auroc = if wrong.is_empty() || right.is_empty() { None } else { Some(auroc(&right, &wrong)?) };
    Ok(ModeFigures {
        calibration: calibration(probs, labels, bins)?,
        adaptive_ece: adaptive_ece(probs, labels, bins)?.ace,
        selective: selective(probs, labels)?,
        error_auroc,
    })
}

/// [`ModeFigures`] of both modes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figures {
    /// Mean mode.
    pub mean_mode: ModeFigures,
    /// Monte Carlo mean (when sampled).
    pub monte_carlo: Option<ModeFigures>,
}

/// [`Figures`] of predictions (all sampled or none) against labels.
pub fn figures(preds: &[Prediction], labels: &[usize], bins: usize) -> Result<Figures> {
    let mean: Vec<Vec<f64>> = preds.iter().map(|p| p.mean_mode.clone()).collect();
    let sampled = preds.iter().filter(|p| p.mc.is_some()).count();
    let monte_carlo = if sampled > 0 && sampled == preds.len() {
        let mc: Vec<Vec<f64>> = preds.iter().map(|p| p.probs().to_vec()).collect();
        Some(mode_figures(&mc, labels, bins)?)
    } else {
        None
    };
    Ok(Figures { mean_mode: mode_figures(&mean, labels, bins)?, monte_carlo })
}

/// Coverage and size of the conformal sets of one score at one `α`, before temperature scaling
/// (thresholds fitted on unscaled probabilities, applied to unscaled ones) and after it (fitted
/// and applied on scaled ones).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SetFigures {
    /// The conformity score.
    pub score: ConformalScore,
    /// Miscoverage level (target coverage `1 − α`).
    pub alpha: f64,
    /// Unscaled (when fitted).
    pub before: Option<SetSummary>,
    /// Temperature-scaled.
    pub after: SetSummary,
}

/// [`SetFigures`] of every fitted score and `α`: `scaled` fits applied to `scaled_probs`, the
/// matching `raw` fit (same score) to `raw_probs`.
pub fn set_figures(
    raw_probs: &[Vec<f64>],
    scaled_probs: &[Vec<f64>],
    labels: &[usize],
    scaled: &[ConformalFit],
    raw: &[ConformalFit],
) -> Result<Vec<SetFigures>> {
    let mut out = Vec::new();
    for fit in scaled {
        let rawfit = raw.iter().find(|f| f.score == fit.score);
        for (k, t) in fit.thresholds.iter().enumerate() {
            let after = set_summary(t.alpha, &fit.sets_at(scaled_probs, k)?, labels)?;
            let before = match rawfit.and_then(|f| f.alpha_index(t.alpha).map(|i| (f, i))) {
                Some((f, i)) => Some(set_summary(t.alpha, &f.sets_at(raw_probs, i)?, labels)?),
                None => None,
            };
            out.push(SetFigures { score: fit.score, alpha: t.alpha, before, after });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(samples: &[[f64; 2]]) -> Prediction {
        let s: Vec<Vec<f64>> = samples.iter().map(|x| x.to_vec()).collect();
        let mean = vec![s.iter().map(|x| x[0]).sum::<f64>() / s.len() as f64, s.iter().map(|x| x[1]).sum::<f64>() / s.len() as f64];
        Prediction::sampled(mean, s, 0.95).unwrap()
    }

    #[test]
    fn mistakes_ranked_by_uncertainty_give_auroc_one() {
        // two confident right answers, one uncertain wrong one (label 0, predicted 1)
        let preds = vec![
            sampled(&[[0.95, 0.05], [0.97, 0.03]]),
            sampled(&[[0.05, 0.95], [0.02, 0.98]]),
            sampled(&[[0.3, 0.7], [0.6, 0.4], [0.3, 0.7]]),
        ];
        let e = evaluate(&preds, &[0, 1, 0], 10).unwrap();
        let ed = e.monte_carlo_extra.as_ref().unwrap().error_detection_auroc.as_ref().unwrap();
        assert_eq!(ed["mc_msp"], 1.0);
        assert_eq!(ed["mc_mutual_information"], 1.0);
        assert!((e.monte_carlo.as_ref().unwrap().accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.monte_carlo_extra.unwrap().unanimous_vote_share - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn mean_mode_only_has_no_monte_carlo_figures_and_mixed_kinds_are_refused() {
        let p = Prediction::mean_only(vec![0.8, 0.2]);
        let e = evaluate(&[p.clone(), p.clone()], &[0, 1], 5).unwrap();
        assert!(e.monte_carlo.is_none() && e.monte_carlo_extra.is_none());
        assert_eq!(e.mean_mode.accuracy, 0.5);
        assert!(evaluate(&[p, sampled(&[[0.5, 0.5], [0.4, 0.6]])], &[0, 1], 5).is_err());
    }
}
