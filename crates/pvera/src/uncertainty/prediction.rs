//! One classified input: the mean-mode probabilities and, when the latent was sampled, the
//! Monte Carlo statistics. The unit every evaluation in this module consumes and every front end
//! (CLI, server) renders.

use serde_json::{json, Map, Value};

use super::stats::{argmax, entropy, InputStats};

/// A classified input.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Class probabilities of the mean-mode forward (no sampling: `z = mu`).
    pub mean_mode: Vec<f64>,
    /// Monte Carlo statistics of `S ≥ 2` sampled forwards (`None` in mean mode only).
    pub mc: Option<InputStats>,
}

impl Prediction {
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
    /// in both, Monte Carlo fields `null` in mean mode only. `input` names the input (a text, a
    /// file name, or `null`).
    pub fn to_json(&self, labels: &[String], input: Option<&str>) -> Value {
        let label = |i: usize| labels.get(i).cloned().unwrap_or_else(|| format!("LABEL_{i}"));
        let probs = self.probs();
        let predicted = self.predicted();
        let mean_probs: Map<String, Value> = probs.iter().enumerate().map(|(i, &p)| (label(i), json!(p))).collect();
        let mm = argmax(&self.mean_mode);
        let st = self.mc.as_ref();
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
            "mean_probs": mean_probs,
            "mean_mode": {"predicted": label(mm), "probability": self.mean_mode.get(mm), "probs": self.mean_mode},
            "samples": st.map_or(1, |s| s.samples),
        })
    }
}
