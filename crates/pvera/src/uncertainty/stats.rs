//! Per-input statistics of Monte Carlo class probabilities.
//!
//! Input: the `S` sampled probability vectors of one input (`S x C`, rows sum to 1). Entropies
//! are in nats. Definitions (the PEFT example `examples/pvera/confidence_interval_generation.py`
//! for the interval; Gal 2016 / Depeweg et al. 2018 for the decomposition):
//!
//! - `mean_probs = mean_s p_s`; `predicted = argmax(mean_probs)` (first index on ties).
//! - `modal_class`: the most frequent per-sample argmax; ties go to the smallest class id, as
//!   `torch.mode` does; `vote_share` = its votes / S.
//! - `interval`: Student-t interval of `p_s[modal_class]`: `m ± sem · t_{(1+c)/2}(S−1)` with
//!   `sem = std(ddof=1)/sqrt(S)`, clipped to `[0, 1]` — exactly the PEFT example's
//!   `mean_confidence_interval`. Needs `S >= 2`.
//! - `predictive_entropy = H[mean_probs]` (total uncertainty), `expected_entropy = mean_s H[p_s]`
//!   (aleatoric part), `mutual_information = predictive_entropy − expected_entropy` (epistemic
//!   part; clamped at 0 against rounding).
//! - `variance`: the sample variance (ddof = 1) of `p_s[modal_class]`; `class_variance` the same
//!   for every class.

use statrs::distribution::{ContinuousCDF, StudentsT};

use crate::error::{Error, Result};

/// Statistics of one input's Monte Carlo probabilities (see the module docs).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct InputStats {
    /// Number of samples.
    pub samples: usize,
    /// Mean over samples of the class probabilities.
    pub mean_probs: Vec<f64>,
    /// Argmax of `mean_probs`.
    pub predicted: usize,
    /// Most frequent per-sample argmax (smallest id on ties).
    pub modal_class: usize,
    /// Share of samples whose argmax is `modal_class`.
    pub vote_share: f64,
    /// Mean of `p_s[modal_class]`.
    pub modal_prob_mean: f64,
    /// Student-t interval `(low, high)` of `p_s[modal_class]` at `confidence`, clipped to [0, 1];
    /// `None` with a single sample.
    pub interval: Option<(f64, f64)>,
    /// The confidence level of `interval`.
    pub confidence: f64,
    /// Standard error of the mean of `p_s[modal_class]` (NaN with one sample).
    pub sem: f64,
    /// Entropy of `mean_probs` (nats).
    pub predictive_entropy: f64,
    /// Mean over samples of the entropy of `p_s` (nats).
    pub expected_entropy: f64,
    /// `predictive_entropy − expected_entropy`, at least 0 (nats).
    pub mutual_information: f64,
    /// Sample variance (ddof = 1) of `p_s[modal_class]` (0 with one sample).
    pub variance: f64,
    /// Sample variance (ddof = 1) of every class probability.
    pub class_variance: Vec<f64>,
}

/// Entropy in nats of a probability vector (`0 · ln 0 = 0`).
pub fn entropy(p: &[f64]) -> f64 {
    -p.iter().filter(|&&v| v > 0.0).map(|&v| v * v.ln()).sum::<f64>()
}

/// Index of the largest value (the first on ties; NaN never wins).
pub fn argmax(p: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in p.iter().enumerate() {
        if v > p[best] || p[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

/// The two-sided Student-t quantile `t_{(1+confidence)/2}(df)`.
pub fn t_quantile(confidence: f64, df: f64) -> Result<f64> {
    check_confidence(confidence)?;
    let t = StudentsT::new(0.0, 1.0, df).map_err(|e| {
        Error::config("samples", format!("a Student-t interval needs at least 2 samples (df = {df}): {e}"))
    })?;
    Ok(t.inverse_cdf((1.0 + confidence) / 2.0))
}

fn check_confidence(confidence: f64) -> Result<()> {
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(Error::config(
            "confidence",
            format!("{confidence} is not a level strictly between 0 and 1; use e.g. 0.95"),
        ));
    }
    Ok(())
}

/// Mean and Student-t interval `(mean, low, high)` of `values` at `confidence`, clipped to
/// `[0, 1]` as the PEFT example does; `None` for fewer than two values.
pub fn mean_confidence_interval(values: &[f64], confidence: f64) -> Result<Option<(f64, f64, f64)>> {
    check_confidence(confidence)?;
    let n = values.len();
    if n < 2 {
        return Ok(None);
    }
    let (m, var) = mean_var(values);
    let se = (var / n as f64).sqrt();
    let h = se * t_quantile(confidence, (n - 1) as f64)?;
    Ok(Some((m, (m - h).max(0.0), (m + h).min(1.0))))
}

/// Mean and sample variance (ddof = 1; 0 for one value).
fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let ss = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>();
    (m, ss / (n - 1.0))
}

/// Statistics of one input from its sampled probabilities `samples[s][c]`.
pub fn input_stats(samples: &[Vec<f64>], confidence: f64) -> Result<InputStats> {
    check_confidence(confidence)?;
    let s = samples.len();
    let Some(first) = samples.first() else {
        return Err(Error::config("samples", "no Monte Carlo samples; use --samples 2 or more"));
    };
    let c = first.len();
    if c == 0 || samples.iter().any(|p| p.len() != c) {
        return Err(Error::Model(format!(
            "Monte Carlo probabilities must all have the same, non-zero number of classes (got {:?})",
            samples.iter().map(Vec::len).collect::<Vec<_>>()
        )));
    }
    if let Some(bad) = samples.iter().flatten().find(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "Monte Carlo probabilities".into(),
            count: samples.iter().flatten().filter(|v| !v.is_finite()).count(),
            hint: format!(
                " (a sampled probability is {bad}: the sampled latent overflowed; check the adapter's λ_d for \
                 very large values)"
            ),
        });
    }
    let mut mean_probs = vec![0.0; c];
    let mut votes = vec![0usize; c];
    let mut expected_entropy = 0.0;
    for p in samples {
        for (m, v) in mean_probs.iter_mut().zip(p) {
            *m += v;
        }
        votes[argmax(p)] += 1;
        expected_entropy += entropy(p);
    }
    for m in &mut mean_probs {
        *m /= s as f64;
    }
    expected_entropy /= s as f64;
    // torch.mode: the smallest value among the most frequent.
    let mut modal_class = 0;
    for (k, &n) in votes.iter().enumerate() {
        if n > votes[modal_class] {
            modal_class = k;
        }
    }
    let top: Vec<f64> = samples.iter().map(|p| p[modal_class]).collect();
    let (modal_prob_mean, variance) = mean_var(&top);
    let interval = mean_confidence_interval(&top, confidence)?.map(|(_, lo, hi)| (lo, hi));
    let sem = if s >= 2 { (variance / s as f64).sqrt() } else { f64::NAN };
    let class_variance = (0..c).map(|k| mean_var(&samples.iter().map(|p| p[k]).collect::<Vec<_>>()).1).collect();
    let predictive_entropy = entropy(&mean_probs);
    Ok(InputStats {
        samples: s,
        predicted: argmax(&mean_probs),
        mean_probs,
        modal_class,
        vote_share: votes[modal_class] as f64 / s as f64,
        modal_prob_mean,
        interval,
        confidence,
        sem,
        predictive_entropy,
        expected_entropy,
        mutual_information: (predictive_entropy - expected_entropy).max(0.0),
        variance,
        class_variance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_and_argmax_basics() {
        assert!((entropy(&[0.5, 0.5]) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(entropy(&[1.0, 0.0]), 0.0);
        assert_eq!(argmax(&[0.2, 0.4, 0.4]), 1);
        assert_eq!(argmax(&[f64::NAN, 0.1]), 1);
    }

    #[test]
    fn identical_samples_have_no_epistemic_part() {
        let p = vec![vec![0.7, 0.2, 0.1]; 8];
        let st = input_stats(&p, 0.95).unwrap();
        assert!(st.mutual_information.abs() < 1e-12);
        let (lo, hi) = st.interval.unwrap();
        assert!((lo - 0.7).abs() < 1e-15 && (hi - 0.7).abs() < 1e-15, "({lo}, {hi})");
        assert!(st.variance < 1e-30);
        assert_eq!(st.vote_share, 1.0);
    }

    #[test]
    fn ties_in_votes_go_to_the_smallest_class() {
        let p = vec![vec![0.1, 0.9], vec![0.8, 0.2]];
        assert_eq!(input_stats(&p, 0.9).unwrap().modal_class, 0);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(input_stats(&[], 0.95).is_err());
        assert!(input_stats(&[vec![1.0]], 1.0).is_err());
        assert!(input_stats(&[vec![0.5, 0.5], vec![1.0]], 0.9).is_err());
        assert!(input_stats(&[vec![f64::NAN, 0.5]], 0.9).is_err());
        assert_eq!(input_stats(&[vec![0.4, 0.6]], 0.9).unwrap().interval, None);
    }
}
