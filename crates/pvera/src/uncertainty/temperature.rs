//! Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar
//! `T > 0` divides the logits before the softmax, `p = softmax(z / T)`, fitted by minimising the
//! mean negative log-likelihood of the true class on a calibration set. It never changes the
//! argmax, only how confident the probabilities are (`T > 1` softens, `T < 1` sharpens).
//!
//! - Mean mode: one logit vector per input, `NLL(T) = mean_i [logsumexp(z_i / T) − z_{i,y_i} / T]`
//!   (convex in `1/T`).
//! - Monte Carlo mode: `S` sampled logit vectors per input ([`SampledLogits`]). `T` divides every
//!   sample's logits and the calibrated prediction is the average of the per-sample softmaxes,
//!   `p̄_i = (1/S) Σ_s softmax(z_{s,i} / T)`; `T` is fitted on the NLL of that average,
//!   `NLL(T) = −mean_i ln p̄_{i,y_i}` (computed in log space). This is the predictive that MC mode
//!   reports, so the fitted `T` calibrates exactly what the user sees; it is not convex in `1/T`
//!   in general.
//! - Log-probabilities are valid logits: `ln p = z − logsumexp(z)` differs from `z` by a per-row
//!   constant `c`, and `(z − c) / T = z / T − c / T` still differs by a per-row constant, which
//!   the softmax cancels. So `softmax(ln p / T) = softmax(z / T)` for every `T`: fitting and
//!   applying `T` on log-probabilities (e.g. from [`mc_predict`](super::mc_predict)'s
//!   probabilities through [`log_probabilities`]) gives the same temperature and the same
//!   calibrated probabilities as on the logits themselves, up to rounding and the floor of
//!   probabilities that are exactly 0.
//!
//! The fit searches `ln T` on `[ln min, ln max]` (default `[0.01, 100]`): an 81-point grid, then
//! golden-section refinement around the best grid point to `1e-12` in `ln T`. The result is the
//! optimum to about `1e-8` relative (the NLL is flat there; f64 rounding of the NLL limits it).
//! torch-uncertainty's `TemperatureScaler` (0.13.0) runs `torch.optim.LBFGS` (lr 0.1, at most 100
//! iterations) on `1/T` from 1 and stops once the loss changes by less than `1e-9` (torch's
//! `tolerance_change`), a few `1e-4` short of the optimum; unconstrained, it returns a negative `T`
//! when the logits are worse than uniform, where this fit returns the upper bound with
//! [`TemperatureFit::at_bound`] set. See docs/uncertainty-methods.md.

use crate::error::{Error, Result};

/// Search interval of the temperature.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TemperatureOptions {
    /// Smallest temperature considered (> 0).
    pub min: f64,
    /// Largest temperature considered (> `min`).
    pub max: f64,
}

impl Default for TemperatureOptions {
    fn default() -> Self {
        TemperatureOptions { min: 1e-2, max: 1e2 }
    }
}

/// A fitted temperature.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TemperatureFit {
    /// The temperature `T`.
    pub temperature: f64,
    /// Mean NLL at `T = 1` (nats).
    pub nll_before: f64,
    /// Mean NLL at the fitted `T` (nats).
    pub nll_after: f64,
    /// `T` is at a bound of the search interval: the NLL still falls beyond it (`T = max`: the
    /// logits carry no usable signal; `T = min`: the calibration set is separated perfectly).
    pub at_bound: bool,
    /// Logit vectors per input the fit used (1 in mean mode, `S` in Monte Carlo mode).
    pub samples: usize,
    /// Examples the fit used.
    pub examples: usize,
}

/// `S` sampled logit vectors of `N` inputs over `C` classes, sample-major (`S x N x C`, the layout
/// of [`McOutput::probs`](super::McOutput::probs)).
#[derive(Clone, Copy, Debug)]
pub struct SampledLogits<'a> {
    values: &'a [f64],
    samples: usize,
    inputs: usize,
    classes: usize,
}

impl<'a> SampledLogits<'a> {
    /// Checks the shape (`values.len() == samples * inputs * classes`, all positive, at least 2
    /// classes) and that every value is finite.
    pub fn new(values: &'a [f64], samples: usize, inputs: usize, classes: usize) -> Result<Self> {
        if samples == 0 || inputs == 0 || classes < 2 {
            return Err(Error::Model(format!(
                "sampled logits: {samples} sample(s) x {inputs} input(s) x {classes} class(es); need at least 1 \
                 sample, 1 input and 2 classes"
            )));
        }
        if values.len() != samples * inputs * classes {
            return Err(Error::Model(format!(
                "sampled logits: {} values for {samples} x {inputs} x {classes} = {}; pass S x N x C values, \
                 sample-major",
                values.len(),
                samples * inputs * classes
            )));
        }
        check_finite(values, "sampled logits")?;
        Ok(SampledLogits { values, samples, inputs, classes })
    }

    /// Samples `S`.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Inputs `N`.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Classes `C`.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Logits of sample `s` of input `i`.
    pub fn row(&self, s: usize, i: usize) -> &'a [f64] {
        let o = (s * self.inputs + i) * self.classes;
        &self.values[o..o + self.classes]
    }
}

/// `ln p` with `p` floored at the smallest normal f64 (`ln ≈ −708.4`), so a probability that
/// underflowed to 0 stays a finite logit. Works on any slice (one row or a whole `S x N x C` array).
pub fn log_probabilities(probs: &[f64]) -> Vec<f64> {
    probs.iter().map(|&p| p.max(f64::MIN_POSITIVE).ln()).collect()
}

/// `softmax(logits / t)` into `out` (max-subtracted).
pub fn softmax_with_temperature(logits: &[f64], t: f64, out: &mut [f64]) {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v / t));
    let mut sum = 0.0;
    for (o, &z) in out.iter_mut().zip(logits) {
        *o = (z / t - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// `logsumexp(logits / t)`.
fn logsumexp_t(logits: &[f64], t: f64) -> f64 {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v / t));
    max + logits.iter().map(|&z| (z / t - max).exp()).sum::<f64>().ln()
}

fn check_finite(values: &[f64], what: &str) -> Result<()> {
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(Error::NonFinite {
            what: what.to_string(),
            count: bad,
            hint: " (temperature scaling needs finite logits; floor zero probabilities with log_probabilities)".into(),
        });
    }
    Ok(())
}

fn check_temperature(t: f64) -> Result<()> {
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::config("temperature", format!("got {t}; a temperature must be finite and > 0")));
    }
    Ok(())
}

fn check_labels(labels: &[usize], inputs: usize, classes: usize) -> Result<()> {
    if labels.len() != inputs {
        return Err(Error::Model(format!("temperature scaling: {inputs} input(s) but {} label(s)", labels.len())));
    }
    if let Some((i, &y)) = labels.iter().enumerate().find(|(_, &y)| y >= classes) {
        return Err(Error::Data(format!(
            "temperature scaling: example {i} has label {y} but the model has {classes} classes; the labels \
             and the model's class list disagree"
        )));
    }
    Ok(())
}

/// Flattens mean-mode logits into a one-sample [`SampledLogits`] buffer.
fn flatten(logits: &[Vec<f64>]) -> Result<(Vec<f64>, usize)> {
    let classes = logits.first().map_or(0, Vec::len);
    if let Some((i, row)) = logits.iter().enumerate().find(|(_, r)| r.len() != classes) {
        return Err(Error::Model(format!(
            "logits: row {i} has {} values, row 0 has {classes}; every row needs one logit per class",
            row.len()
        )));
    }
    Ok((logits.concat(), classes))
}

/// Calibrated probabilities `softmax(z_i / T)` of mean-mode logits.
pub fn apply_temperature(logits: &[Vec<f64>], temperature: f64) -> Result<Vec<Vec<f64>>> {
    check_temperature(temperature)?;
    let (flat, classes) = flatten(logits)?;
    let s = SampledLogits::new(&flat, 1, logits.len(), classes)?;
    apply_temperature_mc(&s, temperature)
}

/// Calibrated Monte Carlo probabilities `p̄_i = (1/S) Σ_s softmax(z_{s,i} / T)` (`N x C`).
pub fn apply_temperature_mc(logits: &SampledLogits<'_>, temperature: f64) -> Result<Vec<Vec<f64>>> {
    check_temperature(temperature)?;
    let c = logits.classes;
    let mut buf = vec![0.0; c];
    Ok((0..logits.inputs)
        .map(|i| {
            let mut acc = vec![0.0; c];
            for s in 0..logits.samples {
                softmax_with_temperature(logits.row(s, i), temperature, &mut buf);
                for (a, b) in acc.iter_mut().zip(&buf) {
                    *a += b;
                }
            }
            acc.iter().map(|a| a / logits.samples as f64).collect()
        })
        .collect())
}

/// Mean NLL at temperature `t` (mean mode when `S = 1`), in log space.
fn nll(logits: &SampledLogits<'_>, labels: &[usize], t: f64) -> f64 {
    let s_count = logits.samples;
    let mut total = 0.0;
    let mut terms = vec![0.0; s_count];
    for (i, &y) in labels.iter().enumerate() {
        if s_count == 1 {
            let z = logits.row(0, i);
            total += logsumexp_t(z, t) - z[y] / t;
        } else {
            // ln p̄_y = logsumexp_s(z_{s,y} / t − logsumexp(z_s / t)) − ln S
            for (s, term) in terms.iter_mut().enumerate() {
                let z = logits.row(s, i);
                *term = z[y] / t - logsumexp_t(z, t);
            }
            let max = terms.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            let ln_mean = max + terms.iter().map(|&v| (v - max).exp()).sum::<f64>().ln() - (s_count as f64).ln();
            total -= ln_mean;
        }
    }
    total / labels.len() as f64
}

/// Mean NLL of `softmax(z / t)` against `labels` (nats).
pub fn temperature_nll(logits: &[Vec<f64>], labels: &[usize], t: f64) -> Result<f64> {
    check_temperature(t)?;
    let (flat, classes) = flatten(logits)?;
    let s = SampledLogits::new(&flat, 1, logits.len(), classes)?;
    check_labels(labels, s.inputs, classes)?;
    Ok(nll(&s, labels, t))
}

/// Mean NLL of the calibrated Monte Carlo average `p̄(t)` against `labels` (nats).
pub fn temperature_nll_mc(logits: &SampledLogits<'_>, labels: &[usize], t: f64) -> Result<f64> {
    check_temperature(t)?;
    check_labels(labels, logits.inputs, logits.classes)?;
    Ok(nll(logits, labels, t))
}

/// Fits `T` on mean-mode logits (see the module docs).
pub fn fit_temperature(logits: &[Vec<f64>], labels: &[usize], opts: TemperatureOptions) -> Result<TemperatureFit> {
    if logits.is_empty() {
        return Err(Error::Data("temperature scaling: the calibration set is empty".into()));
    }
    let (flat, classes) = flatten(logits)?;
    let s = SampledLogits::new(&flat, 1, logits.len(), classes)?;
    fit_temperature_mc(&s, labels, opts)
}

/// Fits `T` on the NLL of the averaged calibrated Monte Carlo probabilities (see the module docs).
pub fn fit_temperature_mc(
    logits: &SampledLogits<'_>,
    labels: &[usize],
    opts: TemperatureOptions,
) -> Result<TemperatureFit> {
    if !(opts.min.is_finite() && opts.max.is_finite() && opts.min > 0.0 && opts.max > opts.min) {
        return Err(Error::config(
            "temperature bounds",
            format!("got [{}, {}]; need 0 < min < max, finite (default [0.01, 100])", opts.min, opts.max),
        ));
    }
    check_labels(labels, logits.inputs, logits.classes)?;
    let f = |g: f64| nll(logits, labels, g.exp());
    let (lo, hi) = (opts.min.ln(), opts.max.ln());
    const GRID: usize = 81;
    let grid: Vec<f64> = (0..GRID).map(|k| lo + (hi - lo) * k as f64 / (GRID - 1) as f64).collect();
    let vals: Vec<f64> = grid.iter().map(|&g| f(g)).collect();
    let best = (0..GRID).fold(0, |b, k| if vals[k] < vals[b] { k } else { b });
    let (mut a, mut b) = (grid[best.saturating_sub(1)], grid[(best + 1).min(GRID - 1)]);
    // golden-section search on [a, b]
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut x1, mut x2) = (b - r * (b - a), a + r * (b - a));
    let (mut f1, mut f2) = (f(x1), f(x2));
    while b - a > 1e-12 {
        if f1 <= f2 {
            b = x2;
            x2 = x1;
            f2 = f1;
            x1 = b - r * (b - a);
            f1 = f(x1);
        } else {
            a = x1;
            x1 = x2;
            f1 = f2;
            x2 = a + r * (b - a);
            f2 = f(x2);
        }
    }
    // the best of the refined point and the bracket's grid ends (an optimum at a bound)
    let mut g = 0.5 * (a + b);
    let mut fg = f(g);
    for e in [grid[best.saturating_sub(1)], grid[best], grid[(best + 1).min(GRID - 1)]] {
        let fe = f(e);
        if fe < fg {
            g = e;
            fg = fe;
        }
    }
    let temperature = if (g - lo).abs() < 1e-9 {
        opts.min
    } else if (hi - g).abs() < 1e-9 {
        opts.max
    } else {
        g.exp()
    };
    Ok(TemperatureFit {
        temperature,
        at_bound: temperature == opts.min || temperature == opts.max,
        nll_before: nll(logits, labels, 1.0),
        nll_after: if temperature == g.exp() { fg } else { nll(logits, labels, temperature) },
        samples: logits.samples,
        examples: logits.inputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_one_leaves_softmax_unchanged_and_log_probs_are_logits() {
        let z = vec![vec![2.0, -1.0, 0.5], vec![0.1, 0.2, 0.3]];
        let p = apply_temperature(&z, 1.0).unwrap();
        for (row, pr) in z.iter().zip(&p) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            for (a, b) in e.iter().zip(pr) {
                assert!((a / s - b).abs() < 1e-15);
            }
        }
        // softmax(ln p / T) == softmax(z / T) for any T
        let lp: Vec<Vec<f64>> = p.iter().map(|r| log_probabilities(r)).collect();
        for t in [0.3, 1.0, 2.7] {
            let a = apply_temperature(&z, t).unwrap();
            let b = apply_temperature(&lp, t).unwrap();
            for (ra, rb) in a.iter().zip(&b) {
                for (x, y) in ra.iter().zip(rb) {
                    assert!((x - y).abs() < 1e-14, "{t}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let z = vec![vec![1.0, 0.0]];
        assert!(apply_temperature(&z, 0.0).is_err());
        assert!(apply_temperature(&z, f64::NAN).is_err());
        assert!(fit_temperature(&z, &[2], TemperatureOptions::default()).is_err());
        assert!(fit_temperature(&z, &[0, 1], TemperatureOptions::default()).is_err());
        assert!(fit_temperature(&[], &[], TemperatureOptions::default()).is_err());
        assert!(fit_temperature(&[vec![f64::INFINITY, 0.0]], &[0], TemperatureOptions::default()).is_err());
        assert!(fit_temperature(&z, &[0], TemperatureOptions { min: 2.0, max: 1.0 }).is_err());
        assert!(SampledLogits::new(&[0.0; 5], 1, 2, 2).is_err());
    }

    #[test]
    fn separable_data_hits_the_lower_bound() {
        let z = vec![vec![3.0, 0.0], vec![0.0, 3.0]];
        let fit = fit_temperature(&z, &[0, 1], TemperatureOptions::default()).unwrap();
        assert!(fit.at_bound && fit.temperature == 1e-2, "{fit:?}");
    }
}
