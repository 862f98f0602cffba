//! Selective prediction and out-of-distribution metrics as torch-uncertainty 0.13.0 defines them
//! (`metrics.classification`: `AURC`, `RiskAtxCov`, `FPRx`, `AdaptiveCalibrationError`), checked
//! against it in `crates/pvera/tests/integration/conformal.rs`. Computed in f64 (torch-uncertainty
//! casts the adaptive ECE's confidences to f32 and returns FPR in f32: differences below `1e-6`).
//!
//! - Confidence = the largest probability, prediction = its class (first on ties), error = the
//!   prediction is not the label.
//! - Risk–coverage: rows sorted by decreasing confidence, `r_k` = error rate of the `k` most
//!   confident; `AURC = trapz(r, k/n) / (1 − 1/n)` (torch-uncertainty's normalisation, `n ≥ 2`);
//!   risk at coverage `c` = `r_{⌈n·c⌉}`, selective accuracy `= 1 − risk`.
//! - FPR at `x` recall: OOD inputs are the positives and scores are oriented "higher = more OOD";
//!   the threshold is the highest score (evaluated only after whole groups of tied scores) at
//!   which at least `x` of the OOD inputs score at or above it; FPR = share of in-distribution
//!   inputs at or above it.
//! - Adaptive (equal-mass) ECE: rows sorted by increasing confidence, cut into `b` consecutive
//!   bins whose sizes differ by at most one (`torch.tensor_split`: the first `n mod b` bins hold
//!   one more); `ACE = Σ_bins |B|/n · |acc(B) − conf(B)|`. Empty bins (`n < b`) are skipped
//!   (torch-uncertainty returns NaN there).
//!
//! Tied confidences keep their input order (a stable sort). torch's sort is not stable, so where
//! tied confidences mix right and wrong predictions across a cut, torch-uncertainty's AURC, risk
//! and ACE depend on its sort; FPR is tie-aware and does not.

use crate::error::{Error, Result};
use crate::uncertainty::stats::argmax;

fn check_pairs(confidences: &[f64], correct: &[bool], what: &str) -> Result<()> {
    if confidences.len() != correct.len() {
        return Err(Error::Model(format!(
            "{what}: {} confidence(s) but {} correctness flag(s)",
            confidences.len(),
            correct.len()
        )));
    }
    if confidences.is_empty() {
        return Err(Error::Data(format!("{what}: no examples")));
    }
    if let Some(v) = confidences.iter().find(|v| v.is_nan()) {
        return Err(Error::NonFinite {
            what: format!("{what}: confidences"),
            count: confidences.iter().filter(|v| v.is_nan()).count(),
            hint: format!(" ({v})"),
        });
    }
    Ok(())
}

/// Confidence (largest probability) and correctness of each row.
pub fn confidences_and_correct(probs: &[Vec<f64>], labels: &[usize]) -> Result<(Vec<f64>, Vec<bool>)> {
    if probs.len() != labels.len() {
        return Err(Error::Model(format!("{} probability row(s) but {} label(s)", probs.len(), labels.len())));
    }
    let mut conf = Vec::with_capacity(probs.len());
    let mut ok = Vec::with_capacity(probs.len());
    for (i, (p, &y)) in probs.iter().zip(labels).enumerate() {
        if y >= p.len() {
            return Err(Error::Data(format!(
                "example {i} has label {y} but only {} class probabilities; the labels and the model's class list \
                 disagree",
                p.len()
            )));
        }
        let k = argmax(p);
        conf.push(p[k]);
        ok.push(k == y);
    }
    Ok((conf, ok))
}

/// Error rate of the `k` most confident rows, `k = 1..=n` (the risk–coverage curve).
pub fn risk_coverage_curve(confidences: &[f64], correct: &[bool]) -> Result<Vec<f64>> {
    check_pairs(confidences, correct, "risk-coverage curve")?;
    let mut idx: Vec<usize> = (0..confidences.len()).collect();
    idx.sort_by(|&a, &b| confidences[b].total_cmp(&confidences[a]));
    let mut errors = 0usize;
    Ok(idx
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            errors += usize::from(!correct[i]);
            errors as f64 / (k + 1) as f64
        })
        .collect())
}

/// Area under the risk–coverage curve (torch-uncertainty's `AURC`; needs 2 rows).
pub fn aurc(confidences: &[f64], correct: &[bool]) -> Result<f64> {
    let r = risk_coverage_curve(confidences, correct)?;
    let n = r.len();
    if n < 2 {
        return Err(Error::Data("AURC needs at least 2 examples".into()));
    }
    let dx = 1.0 / n as f64;
    let area: f64 = r.windows(2).map(|w| (w[0] + w[1]) / 2.0 * dx).sum();
    Ok(area / (1.0 - 1.0 / n as f64))
}

/// Error rate among the `⌈n·coverage⌉` most confident rows (torch-uncertainty's `RiskAtxCov`).
pub fn risk_at_coverage(confidences: &[f64], correct: &[bool], coverage: f64) -> Result<f64> {
    if !(coverage > 0.0 && coverage <= 1.0) {
        return Err(Error::config("coverage", format!("got {coverage}; a coverage must be in (0, 1], e.g. 0.8")));
    }
    let r = risk_coverage_curve(confidences, correct)?;
    let k = (r.len() as f64 * coverage).ceil() as usize;
    Ok(r[k.clamp(1, r.len()) - 1])
}

/// Selective-prediction figures of one set of predictions.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Selective {
    /// Area under the risk–coverage curve (lower is better).
    pub aurc: f64,
    /// Error rate of the 80 % most confident predictions.
    pub risk_at_80: f64,
    /// Accuracy of the 80 % most confident predictions.
    pub accuracy_at_80: f64,
    /// Error rate of the 90 % most confident predictions.
    pub risk_at_90: f64,
    /// Accuracy of the 90 % most confident predictions.
    pub accuracy_at_90: f64,
}

/// AURC and selective risk / accuracy at 80 % and 90 % coverage of probabilities against labels.
pub fn selective(probs: &[Vec<f64>], labels: &[usize]) -> Result<Selective> {
    let (c, ok) = confidences_and_correct(probs, labels)?;
    let r80 = risk_at_coverage(&c, &ok, 0.8)?;
    let r90 = risk_at_coverage(&c, &ok, 0.9)?;
    Ok(Selective {
        aurc: aurc(&c, &ok)?,
        risk_at_80: r80,
        accuracy_at_80: 1.0 - r80,
        risk_at_90: r90,
        accuracy_at_90: 1.0 - r90,
    })
}

/// False-positive rate at `recall` (torch-uncertainty's `FPRx` with the OOD inputs as positives):
/// scores oriented "higher = more OOD" (as [`OodScores`](super::OodScores)).
pub fn fpr_at_recall(in_dist: &[f64], ood: &[f64], recall: f64) -> Result<f64> {
    if !(0.0..=1.0).contains(&recall) {
        return Err(Error::config("recall", format!("got {recall}; a recall level must be in [0, 1], e.g. 0.95")));
    }
    if in_dist.is_empty() || ood.is_empty() {
        return Err(Error::Data(format!(
            "FPR needs scores of both sets ({} in-distribution, {} OOD)",
            in_dist.len(),
            ood.len()
        )));
    }
    if in_dist.iter().chain(ood).any(|v| v.is_nan()) {
        return Err(Error::NonFinite { what: "OOD scores".into(), count: 1, hint: " (NaN score)".into() });
    }
    if recall == 0.0 {
        return Ok(0.0);
    }
    let mut all: Vec<(f64, bool)> = in_dist.iter().map(|&v| (v, false)).chain(ood.iter().map(|&v| (v, true))).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (np, nn) = (ood.len() as f64, in_dist.len() as f64);
    let mut tp = 0usize;
    for (i, &(v, pos)) in all.iter().enumerate() {
        tp += usize::from(pos);
        let group_end = i + 1 == all.len() || all[i + 1].0 != v;
        if group_end && tp as f64 / np >= recall {
            return Ok((i + 1 - tp) as f64 / nn);
        }
    }
    Ok(1.0)
}

/// FPR at 95 % recall of the OOD inputs (torch-uncertainty's `FPR95(pos_label=1)`).
pub fn fpr95(in_dist: &[f64], ood: &[f64]) -> Result<f64> {
    fpr_at_recall(in_dist, ood, 0.95)
}

/// One equal-mass bin.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdaptiveBin {
    /// Rows in the bin.
    pub count: usize,
    /// Smallest confidence in the bin.
    pub low: f64,
    /// Largest confidence in the bin.
    pub high: f64,
    /// Mean confidence.
    pub confidence: f64,
    /// Accuracy.
    pub accuracy: f64,
}

/// Adaptive (equal-mass) calibration error and its bins.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdaptiveCalibration {
    /// `Σ |B|/n · |acc(B) − conf(B)|`.
    pub ace: f64,
    /// The non-empty bins, by increasing confidence.
    pub bins: Vec<AdaptiveBin>,
}

/// Adaptive ECE of confidences and correctness flags with `n_bins` equal-mass bins.
pub fn adaptive_ece_from(confidences: &[f64], correct: &[bool], n_bins: usize) -> Result<AdaptiveCalibration> {
    check_pairs(confidences, correct, "adaptive ECE")?;
    if n_bins == 0 {
        return Err(Error::config("bins", "the adaptive ECE needs at least 1 bin; use e.g. 15"));
    }
    let n = confidences.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| confidences[a].total_cmp(&confidences[b]));
    let (base, extra) = (n / n_bins, n % n_bins);
    let mut start = 0;
    let mut bins = Vec::new();
    let mut ace = 0.0;
    for b in 0..n_bins {
        let len = base + usize::from(b < extra);
        if len == 0 {
            continue;
        }
        let rows = &idx[start..start + len];
        start += len;
        let conf = rows.iter().map(|&i| confidences[i]).sum::<f64>() / len as f64;
        let acc = rows.iter().filter(|&&i| correct[i]).count() as f64 / len as f64;
        ace += (acc - conf).abs() * len as f64 / n as f64;
        bins.push(AdaptiveBin {
            count: len,
            low: confidences[rows[0]],
            high: confidences[rows[len - 1]],
            confidence: conf,
            accuracy: acc,
        });
    }
    Ok(AdaptiveCalibration { ace, bins })
}

/// Adaptive ECE of probabilities against labels with `n_bins` equal-mass bins.
pub fn adaptive_ece(probs: &[Vec<f64>], labels: &[usize], n_bins: usize) -> Result<AdaptiveCalibration> {
    let (c, ok) = confidences_and_correct(probs, labels)?;
    adaptive_ece_from(&c, &ok, n_bins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn risk_coverage_by_hand() {
        // torch-uncertainty's AURC docstring example: probs [[0.7,0.3],[0.6,0.4],[0.8,0.2]], targets [0,1,0]
        let p = vec![vec![0.7, 0.3], vec![0.6, 0.4], vec![0.8, 0.2]];
        let s = selective(&p, &[0, 1, 0]).unwrap();
        // r = [0, 0, 1/3]; trapz = (0 + 0)/2/3 + (0 + 1/3)/2/3 = 1/18; / (1 - 1/3) = 1/12
        assert!((s.aurc - 1.0 / 12.0).abs() < 1e-15);
        // RiskAtxCov docstring: risk 0.25 at coverage 0.5
        let p = [[0.9, 0.1], [0.7, 0.3], [0.95, 0.05], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.85, 0.15], [0.2, 0.8]];
        let p: Vec<Vec<f64>> = p.iter().map(|r| r.to_vec()).collect();
        let (c, ok) = confidences_and_correct(&p, &[0, 1, 0, 1, 0, 1, 0, 1]).unwrap();
        assert_eq!(risk_at_coverage(&c, &ok, 0.5).unwrap(), 0.25);
    }

    #[test]
    fn fpr_examples() {
        // FPRx docstring: confidences [0.9,0.8,0.7,0.6,0.4,0.2,0.1], targets [1,0,1,0,0,1,0] -> 0.75
        let fpr = fpr95(&[0.8, 0.6, 0.4, 0.1], &[0.9, 0.7, 0.2]).unwrap();
        assert_eq!(fpr, 0.75);
        // a tie across the sets is counted as one threshold
        assert_eq!(fpr_at_recall(&[0.5, 0.1], &[0.5], 1.0).unwrap(), 0.5);
        assert!(fpr95(&[], &[1.0]).is_err());
    }

    #[test]
    fn adaptive_bins_split_like_tensor_split() {
        let c: Vec<f64> = (0..7).map(|v| v as f64 / 10.0).collect();
        let ok = vec![true; 7];
        let a = adaptive_ece_from(&c, &ok, 3).unwrap();
        assert_eq!(a.bins.iter().map(|b| b.count).collect::<Vec<_>>(), vec![3, 2, 2]);
        let a = adaptive_ece_from(&c[..2], &ok[..2], 5).unwrap();
        assert_eq!(a.bins.len(), 2);
    }
}
