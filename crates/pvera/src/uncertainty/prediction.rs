//! One classified input: the mean-mode probabilities and, when the latent was sampled, the
//! Monte Carlo samples and their statistics; after [`calibrated`](crate::predictor::calibrated)
//! was applied, the calibrated probabilities, the conformal prediction set and the abstention
//! flag. The unit every evaluation in this module consumes and every front end (CLI, server)
//! renders.

use serde_json::{json, Map, Value};

use super::conformal::ConformalScore;
use super::stats::{argmax, entropy, input_stats, InputStats};
use crate::error::Result;

/// A classified input.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Class probabilities of the mean-mode forward (no sampling: `z = mu`).
    pub mean_mode: Vec<f64>,
    /// Monte Carlo statistics of `S ≥ 2` sampled forwards (`None` in mean mode only).
    pub mc: Option<InputStats>,
    /// The `S` sampled probability vectors (`S x C`; empty in mean mode only). Temperature
    /// scaling of the Monte Carlo prediction divides each sample's logits, so it needs them.
    pub samples: Vec<Vec<f64>>,
    /// The calibrated view (`None` until a calibration was applied).
    pub calibrated: Option<Calibrated>,
}

/// What `calibration.json` makes of one prediction: the temperature-scaled probabilities of the
/// mode the prediction reports (Monte Carlo when sampled, else mean mode), the conformal set at
/// the chosen coverage, and whether to abstain.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Calibrated {
    /// Temperature-scaled probabilities.
    pub probs: Vec<f64>,
    /// The temperature applied.
    pub temperature: f64,
    /// The conformal prediction set (class ids, ascending): holds the true class with
    /// probability at least `coverage` over exchangeable inputs.
    pub prediction_set: Vec<usize>,
    /// `1 − α` of the set.
    pub coverage: f64,
    /// The conformity score of the set.
    pub score: ConformalScore,
    /// The set is not a single label, or the calibrated confidence is under `abstain_below`.
    pub abstain: bool,
    /// The confidence threshold of `abstain` (`None`: sets only).
    pub abstain_below: Option<f64>,
}

impl Calibrated {
    /// The largest calibrated probability.
    pub fn confidence(&self) -> f64 {
        self.probs.get(argmax(&self.probs)).copied().unwrap_or(f64::NAN)
    }
}

impl Prediction {
    /// A mean-mode-only prediction.
    pub fn mean_only(mean_mode: Vec<f64>) -> Prediction {
        Prediction { mean_mode, mc: None, samples: Vec::new(), calibrated: None }
    }

    /// A sampled prediction: the mean mode, the `S` sampled probability vectors and their
    /// statistics at `confidence` ([`input_stats`]).
    pub fn sampled(mean_mode: Vec<f64>, samples: Vec<Vec<f64>>, confidence: f64) -> Result<Prediction> {
        let mc = Some(input_stats(&samples, confidence)?);
        Ok(Prediction { mean_mode, mc, samples, calibrated: None })
    }

    /// The probabilities the prediction reports: the Monte Carlo mean when sampled, else the
    /// mean mode's.
    pub fn probs(&self) -> &[f64] {
        self.mc.as_ref().map_or(&self.mean_mode, |s| &s.mean_probs)
    }

    /// The predicted class: argmax of [`Self::probs`].
    pub fn predicted(&self) -> usize {
        self.mc.as_ref().map_or_else(|| argmax(&self.mean_mode), |s| s.predicted)
    }

    /// The predicted class's probability.
    pub fn probability(&self) -> f64 {
        self.probs().get(self.predicted()).copied().unwrap_or(f64::NAN)
    }

    /// The per-input record of `pvera predict --json` and the server's `/classify`: the same keys
    /// in both, Monte Carlo fields `null` in mean mode only, calibration fields
    /// (`calibrated_probs`, `calibrated_probability`, `prediction_set`, `abstain`, `temperature`,
    /// `coverage`, `score`) `null` without a calibration. `input` names the input (a text, a file
    /// name, or `null`).
    pub fn to_json(&self, labels: &[String], input: Option<&str>) -> Value {
        let label = |i: usize| labels.get(i).cloned().unwrap_or_else(|| format!("LABEL_{i}"));
        let by_label = |p: &[f64]| -> Map<String, Value> { p.iter().enumerate().map(|(i, &v)| (label(i), json!(v))).collect() };
        let probs = self.probs();
        let predicted = self.predicted();
        let mm = argmax(&self.mean_mode);
        let st = self.mc.as_ref();
        let cal = self.calibrated.as_ref();
        json!({
            "input": input,
            "predicted": label(predicted),
            "predicted_id": predicted,
            "probability": probs.get(predicted),
            "modal_class": st.map(|s| label(s.modal_class)),
            "vote_share": st.map(|s| s.vote_share),
            "modal_probability_mean": st.map(|s| s.modal_prob_mean),
            "interval": st.and_then(|s| s.interval).map(|(a, b)| vec![a, b]),
            "confidence": st.map(|s| s.confidence),
            "sem": st.map(|s| s.sem),
            "predictive_entropy": st.map_or_else(|| entropy(&self.mean_mode), |s| s.predictive_entropy),
            "expected_entropy": st.map(|s| s.expected_entropy),
            "mutual_information": st.map(|s| s.mutual_information),
            "variance": st.map(|s| s.variance),
            "mean_probs": by_label(probs),
            "mean_mode": {"predicted": label(mm), "probability": self.mean_mode.get(mm), "probs": self.mean_mode},
            "samples": st.map_or(1, |s| s.samples),
            "calibrated_probs": cal.map(|c| by_label(&c.probs)),
            "calibrated_probability": cal.map(Calibrated::confidence),
            "prediction_set": cal.map(|c| c.prediction_set.iter().map(|&i| label(i)).collect::<Vec<_>>()),
            "abstain": cal.map(|c| c.abstain),
            "temperature": cal.map(|c| c.temperature),
            "coverage": cal.map(|c| c.coverage),
            "score": cal.map(|c| c.score.name()),
        })
    }
}
