//! Uncertainty from PVeRA's learned latent distribution: Monte Carlo prediction, per-input
//! statistics and intervals, calibration over a labelled set, and out-of-distribution scores.
//!
//! - [`mc`]: [`mc_predict`] runs `S` sampled passes as one larger batch (chunked to a row
//!   budget), seeded, with the mean-mode prediction alongside.
//! - [`stats`]: per input, mean probabilities, modal class and vote share, the Student-t interval
//!   of PEFT's example, predictive / expected entropy, mutual information, variances.
//! - [`calibration`]: accuracy, NLL, Brier, ECE / MCE, reliability diagram (SVG).
//! - [`ood`]: MSP / entropy / mutual-information scores and AUROC against a second set.
//!
//! Which layers sample is chosen per run ([`McConfig::sampling`]: every adapted layer, or those
//! whose `sample_at_inference` is on), per adapter and per layer at run time
//! ([`PeftModel::set_sample_at_inference`](crate::PeftModel::set_sample_at_inference)), and from
//! the config's per-module `sample_at_inference` dict (which works here as documented; PEFT
//! 0.21.2 only tests the dict for truthiness, docs/peft-behaviour.md §4).

pub mod calibration;
pub mod mc;
pub mod ood;
pub mod stats;

pub use calibration::{calibration, reliability_svg, Calibration, ReliabilityBin};
pub use mc::{mc_predict, McConfig, McInput, McMode, McOutput};
pub use ood::{auroc, OodScores};
pub use stats::{input_stats, mean_confidence_interval, t_quantile, InputStats};

use crate::error::Result;

/// Statistics of every input of a Monte Carlo output at `confidence`.
pub fn output_stats(out: &McOutput, confidence: f64) -> Result<Vec<InputStats>> {
    (0..out.inputs).map(|b| input_stats(&out.input_samples(b), confidence)).collect()
}
