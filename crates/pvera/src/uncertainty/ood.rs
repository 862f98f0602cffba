//! Out-of-distribution detection scores and their AUROC.
//!
//! Every score is oriented so that **higher means more likely out of distribution**:
//! `1 − max softmax probability` (Hendrycks & Gimpel 2017), predictive entropy, and mutual
//! information (the epistemic part, which needs Monte Carlo samples). AUROC treats the OOD set
//! as the positive class: the probability that a random OOD input scores above a random
//! in-distribution one, ties counted one half (the Mann-Whitney U statistic; equal to
//! `sklearn.metrics.roc_auc_score`).

use crate::error::{Error, Result};
use crate::uncertainty::stats::InputStats;

/// The OOD scores of one input.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct OodScores {
    /// `1 − max_c mean_probs[c]`.
    pub msp: f64,
    /// Predictive entropy (nats).
    pub entropy: f64,
    /// Mutual information (nats).
    pub mutual_information: f64,
}

impl OodScores {
    /// Scores of one input from its statistics.
    pub fn from_stats(s: &InputStats) -> Self {
        let max = s.mean_probs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        OodScores { msp: 1.0 - max, entropy: s.predictive_entropy, mutual_information: s.mutual_information }
    }
}

/// AUROC of `ood` (positives) against `in_dist` (negatives) for scores where higher means
/// more likely OOD. Uses average ranks, O(n log n).
pub fn auroc(in_dist: &[f64], ood: &[f64]) -> Result<f64> {
    if in_dist.is_empty() || ood.is_empty() {
        return Err(Error::Model(format!(
            "AUROC needs scores of both sets ({} in-distribution, {} OOD)",
            in_dist.len(),
            ood.len()
        )));
    }
    if in_dist.iter().chain(ood).any(|v| v.is_nan()) {
        return Err(Error::NonFinite { what: "OOD scores".into(), count: 1, hint: " (NaN score)".into() });
    }
    let mut all: Vec<(f64, bool)> = in_dist.iter().map(|&v| (v, false)).chain(ood.iter().map(|&v| (v, true))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += all[i..=j].iter().filter(|x| x.1).count() as f64 * avg_rank;
        i = j + 1;
    }
    let (np, nn) = (ood.len() as f64, in_dist.len() as f64);
    Ok((rank_sum_pos - np * (np + 1.0) / 2.0) / (np * nn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_sets_give_one_and_ties_one_half() {
        assert_eq!(auroc(&[0.1, 0.2], &[0.3, 0.9]).unwrap(), 1.0);
        assert_eq!(auroc(&[0.3, 0.9], &[0.1, 0.2]).unwrap(), 0.0);
        assert_eq!(auroc(&[0.5, 0.5], &[0.5]).unwrap(), 0.5);
        // one pair of four is inverted.
        assert_eq!(auroc(&[0.1, 0.4], &[0.3, 0.9]).unwrap(), 0.75);
        assert!(auroc(&[], &[1.0]).is_err());
        assert!(auroc(&[f64::NAN], &[1.0]).is_err());
    }
}
