//! Uncertainty from PVeRA's learned latent distribution: Monte Carlo prediction, per-input
//! statistics and intervals, calibration over a labelled set, and out-of-distribution scores.
//!
//! - [`mc`]: [`mc_predict`] runs `S` sampled passes as one larger batch (chunked to a row
//!   budget), seeded, with the mean-mode prediction alongside.
//! - [`stats`]: per input, mean probabilities, modal class and vote share, the Student-t interval
//!   of PEFT's example, predictive / expected entropy, mutual information, variances.
//! - [`calibration`]: accuracy, NLL, Brier, ECE / MCE, reliability diagram (SVG and PNG).
//! - [`raster`]: the small RGB canvas the PNG plots are drawn on.
//! - [`ood`]: MSP / entropy / mutual-information scores and AUROC against a second set.
//! - [`prediction`]: [`Prediction`], one classified input (mean mode + Monte Carlo samples and
//!   statistics, and the [`Calibrated`] view once a calibration was applied) and its JSON record.
//! - [`evaluation`]: a labelled evaluation (both modes' calibration, misclassification and OOD
//!   AUROCs, interval widths; AURC, selective accuracy, adaptive ECE, FPR95, conformal coverage
//!   and set size), the figures of `pvera eval`.
//! - [`temperature`]: temperature scaling of mean-mode and Monte Carlo logits (fit and apply).
//! - [`conformal`]: split-conformal LAC / APS / RAPS thresholds and prediction sets (MAPIE-exact),
//!   coverage and set size.
//! - [`selective`]: AURC, selective risk at a coverage, FPR at a recall, adaptive ECE
//!   (torch-uncertainty's definitions).
//! - [`calibration_file`]: `calibration.json` (temperatures and thresholds per mode, split, seed,
//!   adapter hash).
//!
//! Which layers sample is chosen per run ([`McConfig::sampling`]: every adapted layer, or those
//! whose `sample_at_inference` is on), per adapter and per layer at run time
//! ([`PeftModel::set_sample_at_inference`](crate::PeftModel::set_sample_at_inference)), and from
//! the config's per-module `sample_at_inference` dict (which works here as documented; PEFT
//! 0.21.2 only tests the dict for truthiness, docs/peft-behaviour.md §4).

pub mod calibration;
pub mod calibration_file;
pub mod conformal;
pub mod evaluation;
pub mod mc;
pub mod ood;
pub mod prediction;
pub mod raster;
pub mod selective;
pub mod stats;
pub mod temperature;

pub use calibration::{calibration, reliability_png, reliability_svg, Calibration, ReliabilityBin};
pub use calibration_file::{CalibrationFile, CalibrationSplit, ModeCalibration, CALIBRATION_FILE};
pub use conformal::{
    empirical_coverage, mean_set_size, set_summary, ConformalFit, ConformalOptions, ConformalScore, ConformalThreshold,
    LastLabel, SetSummary,
};
pub use evaluation::{
    evaluate, figures, ood_auroc, ood_figures, set_figures, Evaluation, Figures, McExtra, ModeFigures, ModeScores,
    OodFigures, SetFigures,
};
pub use mc::{input_noise_seed, mc_predict, mean_predict, McConfig, McInput, McMode, McNoise, McOutput};
pub use prediction::{Calibrated, Prediction};
pub use ood::{auroc, OodScores};
pub use selective::{adaptive_ece, fpr95, selective, AdaptiveCalibration, Selective};
pub use stats::{input_stats, mean_confidence_interval, t_quantile, InputStats};
pub use temperature::{
    apply_temperature, apply_temperature_mc, fit_temperature, fit_temperature_mc, SampledLogits, TemperatureFit,
    TemperatureOptions,
};

use crate::error::Result;

/// Statistics of every input of a Monte Carlo output at `confidence`.
pub fn output_stats(out: &McOutput, confidence: f64) -> Result<Vec<InputStats>> {
    (0..out.inputs).map(|b| input_stats(&out.input_samples(b), confidence)).collect()
}
