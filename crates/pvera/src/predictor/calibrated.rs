//! Calibrated prediction: fitting `calibration.json` from a predictor's outputs on labelled
//! calibration rows ([`fit_calibration`]), and applying it to predictions ([`Calibrator`]) —
//! temperature-scaled probabilities, a conformal prediction set at the chosen coverage and an
//! abstention flag per input. `pvera calibrate`, `pvera predict`, `pvera eval` and the server all
//! go through here; the maths is in [`crate::uncertainty`] (`temperature`, `conformal`,
//! `calibration_file`; conventions in docs/uncertainty-methods.md).
//!
//! - The file belongs to one adapter: [`adapter_hash`] (SHA-256 over `adapter_config.json` and
//!   `adapter_model.safetensors`) is recorded when fitting and checked when reading
//!   ([`Calibrator::load`]); a changed adapter is [`Error::StaleCalibration`].
//! - Per prediction mode (mean mode; Monte Carlo with `S` samples): `T` minimises the NLL of the
//!   mode's own prediction (mean mode: `softmax(ln p / T)`; Monte Carlo: the average of
//!   `softmax(ln p_s / T)` over the samples); the conformal thresholds are fitted on the
//!   temperature-scaled probabilities of the same rows (what users see), and also on the unscaled
//!   ones (`conformal_raw`, for before / after comparisons).
//! - Binary tasks: APS and RAPS are refused for two classes (as MAPIE does); when the scores were
//!   defaulted they are skipped with a note, when asked for explicitly it is an error. RAPS also
//!   needs enough tuning rows for every `α`; the same rule applies.
//! - Splits: [`held_out_split`] cuts a training run's unused examples into a calibration part and
//!   a test part (seeded `randperm`), both recorded in the file; [`evaluation_rows`] keeps an
//!   evaluation of the same data away from the calibration rows.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::checkpoint::{CONFIG_NAME, WEIGHTS_NAME};
use crate::error::{Error, Result};
use crate::uncertainty::calibration_file::{CalibrationFile, CalibrationSplit, ModeCalibration, CALIBRATION_FILE};
use crate::uncertainty::conformal::{self, prediction_set, ConformalFit, ConformalOptions, ConformalScore};
use crate::uncertainty::prediction::{Calibrated, Prediction};
use crate::uncertainty::stats::input_stats;
use crate::uncertainty::temperature::{
    apply_temperature, apply_temperature_mc, fit_temperature_mc, log_probabilities, SampledLogits,
    TemperatureOptions,
};

/// `"sha256:<hex>"` of an adapter directory: SHA-256 over, for `adapter_config.json` then
/// `adapter_model.safetensors`, the file name, its length (u64 little-endian) and its bytes.
/// Any change to the config or to a λ byte changes it.
pub fn adapter_hash(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for name in [CONFIG_NAME, WEIGHTS_NAME] {
        let path = dir.join(name);
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(len.to_le_bytes());
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = f.read(&mut buf).map_err(|e| Error::io(&path, e))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
        }
    }
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cuts a training run's unused examples into `calibration` calibration rows and the rest as
/// test rows: `randperm(unused.len(), seed)` order, the first `calibration` positions calibrate.
/// Both parts keep that (random) order, so the first `k` test rows are a random subset.
pub fn held_out_split(unused: &[usize], calibration: usize, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if calibration == 0 {
        return Err(Error::Request("calibration size 0: calibrate on at least 1 row (e.g. 500)".into()));
    }
    if calibration >= unused.len() {
        return Err(Error::Request(format!(
            "calibration size {calibration}: the run left {} example(s) unused and at least one must stay for testing; \
             use a calibration size below {}",
            unused.len(),
            unused.len()
        )));
    }
    let perm = crate::data::split::randperm(unused.len(), seed);
    let rows: Vec<usize> = perm.iter().map(|&i| unused[i]).collect();
    let (cal, test) = rows.split_at(calibration);
    Ok((cal.to_vec(), test.to_vec()))
}

/// The rows an evaluation of a data set may use, given the calibration in force: when
/// `calibration` was fitted on the same data (same fingerprint), its calibration rows are
/// removed from `candidates`. Returns the rows (in `candidates`' order) and how many were removed.
pub fn evaluation_rows(calibration: &CalibrationFile, data_sha256: &str, candidates: Vec<usize>) -> (Vec<usize>, usize) {
    if calibration.split.data_sha256.as_deref() != Some(data_sha256) {
        return (candidates, 0);
    }
    let cal: HashSet<usize> = calibration.split.rows.iter().copied().collect();
    let before = candidates.len();
    let kept: Vec<usize> = candidates.into_iter().filter(|r| !cal.contains(r)).collect();
    let removed = before - kept.len();
    (kept, removed)
}

/// What to fit.
#[derive(Clone, Debug, PartialEq)]
pub struct FitOptions {
    /// Miscoverage levels (e.g. `[0.1, 0.05]`); the first is the default at prediction time.
    pub alphas: Vec<f64>,
    /// Conformity scores, in order (the first is the default at prediction time).
    pub scores: Vec<ConformalScore>,
    /// The scores were asked for explicitly: one that cannot be fitted is an error instead of a
    /// note.
    pub scores_given: bool,
    /// Seed of the APS / RAPS randomisation and of RAPS's tuning split.
    pub seed: u64,
    /// Temperature search interval.
    pub temperature: TemperatureOptions,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            alphas: vec![0.1, 0.05],
            scores: ConformalScore::ALL.to_vec(),
            scores_given: false,
            seed: 0,
            temperature: TemperatureOptions::default(),
        }
    }
}

/// A fitted calibration and what fitting had to leave out.
#[derive(Clone, Debug, PartialEq)]
pub struct Fitted {
    /// The file to write.
    pub file: CalibrationFile,
    /// Scores skipped (binary task, too few rows for RAPS's tuning part), one line each.
    pub notes: Vec<String>,
}

/// Why `score` cannot be fitted on `n` rows of `classes` classes at these `alphas`, if it cannot.
fn unfit_reason(score: ConformalScore, classes: usize, n: usize, alphas: &[f64]) -> Option<String> {
    if score != ConformalScore::Lac && classes < 3 {
        return Some(format!(
            "{score}: needs 3 or more classes (MAPIE refuses APS and RAPS for binary tasks); this task has {classes}, \
             use lac"
        ));
    }
    let rule = |a: f64| f64::max(1.0 / a, 1.0 / (1.0 - a));
    let parts: Vec<(usize, &str)> = if score == ConformalScore::Raps {
        let tune = (conformal::RAPS_TUNING_FRACTION * n as f64).ceil() as usize;
        vec![(tune, "RAPS tuning rows"), (n - tune.min(n), "RAPS quantile rows")]
    } else {
        vec![(n, "calibration rows")]
    };
    for a in alphas {
        for (m, what) in &parts {
            if (*m as f64) < rule(*a) {
                return Some(format!(
                    "{score}: {m} {what} are too few for alpha {a} (split-conformal needs at least {} (MAPIE's rule){}); \
                     calibrate on more rows or use a larger alpha",
                    rule(*a).ceil(),
                    if score == ConformalScore::Raps { "; RAPS tunes k and lambda on 10 % of the rows" } else { "" }
                ));
            }
        }
    }
    None
}

/// The scores [`fit_calibration`] will fit on `n` rows of `classes` classes, and a note for each
/// defaulted score it has to skip; an [`Error::Request`] when a score asked for explicitly cannot
/// be fitted, or none can. Lets a front end fail before predicting the calibration rows.
pub fn plan_scores(classes: usize, n: usize, opts: &FitOptions) -> Result<(Vec<ConformalScore>, Vec<String>)> {
    if opts.alphas.is_empty() || opts.scores.is_empty() {
        return Err(Error::Request("calibration needs at least one alpha and one conformity score (e.g. 0.1 and lac)".into()));
    }
    if let Some(a) = opts.alphas.iter().find(|a| !(**a > 0.0 && **a < 1.0)) {
        return Err(Error::Request(format!("alpha {a}: a miscoverage level must be in (0, 1), e.g. 0.1")));
    }
    let mut scores = Vec::new();
    let mut notes = Vec::new();
    for &score in &opts.scores {
        if scores.contains(&score) {
            continue;
        }
        match unfit_reason(score, classes, n, &opts.alphas) {
            None => scores.push(score),
            Some(why) if opts.scores_given => return Err(Error::Request(format!("--score {why}"))),
            Some(why) => notes.push(format!("skipped {why}")),
        }
    }
    if scores.is_empty() {
        return Err(Error::Request(format!("no conformity score can be fitted here: {}", notes.join("; "))));
    }
    Ok((scores, notes))
}

/// Fits one mode: temperature on `logits` (`S x N x C` log-probabilities), conformal thresholds on
/// the scaled and on the unscaled probabilities.
fn fit_mode(
    logits: &SampledLogits<'_>,
    raw: &[Vec<f64>],
    labels: &[usize],
    scores: &[ConformalScore],
    opts: &FitOptions,
) -> Result<ModeCalibration> {
    let temperature = fit_temperature_mc(logits, labels, opts.temperature)?;
    let scaled = apply_temperature_mc(logits, temperature.temperature)?;
    let copts = ConformalOptions { seed: opts.seed, ..ConformalOptions::default() };
    let fit_all = |probs: &[Vec<f64>]| -> Result<Vec<ConformalFit>> {
        scores.iter().map(|&s| conformal::calibrate(probs, labels, &opts.alphas, s, &copts)).collect()
    };
    Ok(ModeCalibration {
        samples: logits.samples(),
        temperature,
        conformal_on_scaled: true,
        conformal: fit_all(&scaled)?,
        conformal_raw: fit_all(raw)?,
    })
}

/// Fits `calibration.json` on predictions of labelled calibration rows: the mean mode always,
/// Monte Carlo when the predictions were sampled (all or none). `split` records the rows
/// (`split.rows.len()` must equal the number of predictions).
pub fn fit_calibration(
    preds: &[Prediction],
    labels: &[usize],
    adapter_hash: &str,
    split: CalibrationSplit,
    opts: &FitOptions,
) -> Result<Fitted> {
    let n = preds.len();
    if n == 0 || labels.len() != n || split.rows.len() != n {
        return Err(Error::Model(format!(
            "fit_calibration: {n} prediction(s), {} label(s), {} split row(s); expected the same non-zero number",
            labels.len(),
            split.rows.len()
        )));
    }
    let classes = preds[0].mean_mode.len();
    let sampled = preds.iter().filter(|p| !p.samples.is_empty()).count();
    if sampled != 0 && sampled != n {
        return Err(Error::Model(format!("fit_calibration: {sampled} of {n} predictions were sampled; expected all or none")));
    }
    let s = if sampled == 0 { 0 } else { preds[0].samples.len() };
    if let Some(k) = preds.iter().position(|p| p.mean_mode.len() != classes || (s > 0 && p.samples.len() != s)) {
        return Err(Error::Model(format!("fit_calibration: prediction {k} has another shape than prediction 0")));
    }
    let (scores, notes) = plan_scores(classes, n, opts)?;

    // mean mode: ln p are logits up to a per-row constant (docs/uncertainty-methods.md)
    let mean_lp: Vec<f64> = preds.iter().flat_map(|p| log_probabilities(&p.mean_mode)).collect();
    let mean_raw: Vec<Vec<f64>> = preds.iter().map(|p| p.mean_mode.clone()).collect();
    let mean = fit_mode(&SampledLogits::new(&mean_lp, 1, n, classes)?, &mean_raw, labels, &scores, opts)?;
    let mc = if s > 0 {
        // sample-major S x N x C
        let mut lp = Vec::with_capacity(s * n * classes);
        for k in 0..s {
            for p in preds {
                lp.extend(log_probabilities(&p.samples[k]));
            }
        }
        let raw: Vec<Vec<f64>> = preds.iter().map(|p| p.probs().to_vec()).collect();
        Some(fit_mode(&SampledLogits::new(&lp, s, n, classes)?, &raw, labels, &scores, opts)?)
    } else {
        None
    };
    let mut notes = notes;
    for (name, m) in [("mean-mode", Some(&mean)), ("Monte Carlo", mc.as_ref())] {
        let Some(m) = m else { continue };
        let t = &m.temperature;
        if t.at_bound && t.temperature <= opts.temperature.min * (1.0 + 1e-9) {
            notes.push(format!(
                "the {name} temperature stopped at its lower bound T = {}: the NLL of these rows keeps falling as the \
                 probabilities sharpen{}; such a fit rarely carries over to new rows (one confident mistake costs about \
                 margin / T nats), so compare eval's NLL after temperature scaling with the NLL before it",
                t.temperature,
                if m.samples > 1 { " (each sample scored almost as a one-hot vote)" } else { "" }
            ));
        } else if t.at_bound {
            notes.push(format!(
                "the {name} temperature stopped at its upper bound T = {}: the probabilities carry almost no signal on \
                 these rows",
                t.temperature
            ));
        }
    }
    let file = CalibrationFile::new(adapter_hash, opts.seed, split, mean, mc);
    file.validate()?;
    Ok(Fitted { file, notes })
}

/// Which fitted threshold a [`Calibrator`] applies, and when it abstains.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CalibrationChoice {
    /// Coverage `1 − α` of the sets; `None`: the first fitted `α`.
    pub coverage: Option<f64>,
    /// Conformity score; `None`: the first fitted one.
    pub score: Option<ConformalScore>,
    /// Abstain when the calibrated confidence is under this (in addition to non-singleton sets).
    pub abstain_below: Option<f64>,
}

/// A loaded, checked `calibration.json` and the threshold chosen from it.
#[derive(Clone, Debug)]
pub struct Calibrator {
    file: CalibrationFile,
    path: PathBuf,
    score: ConformalScore,
    alpha: f64,
    abstain_below: Option<f64>,
}

impl Calibrator {
    /// Reads `adapter_dir/calibration.json` if it exists, checks it belongs to the adapter in
    /// that folder ([`Error::StaleCalibration`] otherwise) and resolves `choice` against it.
    pub fn load(adapter_dir: &Path, choice: &CalibrationChoice) -> Result<Option<Calibrator>> {
        let path = adapter_dir.join(CALIBRATION_FILE);
        let Some(file) = CalibrationFile::read_beside(adapter_dir)? else { return Ok(None) };
        file.check_adapter_hash(&adapter_hash(adapter_dir)?, &path)?;
        Calibrator::new(file, path, choice).map(Some)
    }

    /// A calibrator of an already checked file (`path` names it in messages).
    pub fn new(file: CalibrationFile, path: PathBuf, choice: &CalibrationChoice) -> Result<Calibrator> {
        file.validate()?;
        let fitted: Vec<ConformalScore> = file.mean.conformal.iter().map(|f| f.score).collect();
        let score = match choice.score {
            Some(s) if fitted.contains(&s) => s,
            Some(s) => {
                return Err(Error::Request(format!(
                    "conformity score {s} is not in {} (fitted: {}); pick one of those, or re-run `pvera calibrate \
                     --score {s}`",
                    path.display(),
                    names(&fitted)
                )))
            }
            None => *fitted.first().ok_or_else(|| {
                Error::config("mean.conformal", format!("{} holds no conformal fit; re-run `pvera calibrate`", path.display()))
            })?,
        };
        let fit = file.mean.conformal(score).ok_or_else(|| Error::Model(format!("score {score} vanished")))?;
        let alphas: Vec<f64> = fit.thresholds.iter().map(|t| t.alpha).collect();
        let alpha = match choice.coverage {
            Some(c) if !(c > 0.0 && c < 1.0) => {
                return Err(Error::Request(format!("coverage {c}: expected a level strictly between 0 and 1, e.g. 0.9")))
            }
            Some(c) => {
                let a = 1.0 - c;
                match alphas.iter().find(|&&x| (x - a).abs() < 1e-9) {
                    Some(&x) => x,
                    None => {
                        return Err(Error::Request(format!(
                            "coverage {c} (alpha {a:.4}) was not fitted in {}; fitted coverages: {}. Pick one, or re-run \
                             `pvera calibrate --alpha {}`",
                            path.display(),
                            alphas.iter().map(|x| format!("{}", round_level(1.0 - x))).collect::<Vec<_>>().join(", "),
                            round_level(a)
                        )))
                    }
                }
            }
            None => *alphas.first().ok_or_else(|| {
                Error::config("mean.conformal", format!("{}: a conformal fit without thresholds; re-run `pvera calibrate`", path.display()))
            })?,
        };
        if let Some(t) = choice.abstain_below {
            if !(t > 0.0 && t <= 1.0) {
                return Err(Error::Request(format!("abstain threshold {t}: expected a probability in (0, 1], e.g. 0.8")));
            }
        }
        Ok(Calibrator { file, path, score, alpha, abstain_below: choice.abstain_below })
    }

    /// The file's contents.
    pub fn file(&self) -> &CalibrationFile {
        &self.file
    }

    /// Where the file was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The chosen conformity score.
    pub fn score(&self) -> ConformalScore {
        self.score
    }

    /// The chosen miscoverage level `α`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The calibration of mean mode (`sampled = false`) or Monte Carlo mode; an
    /// [`Error::Request`] when the file has no Monte Carlo part.
    pub fn mode(&self, sampled: bool) -> Result<&ModeCalibration> {
        self.file.mode(sampled).ok_or_else(|| {
            Error::Request(format!(
                "{} was fitted in mean mode only (pvera calibrate --samples 1), but these predictions are Monte Carlo \
                 predictions; re-run `pvera calibrate` with --samples 16 (or as many as you predict with), or turn \
                 calibration off (`--no-calibration`)",
                self.path.display()
            ))
        })
    }

    /// Notes on how a prediction setting departs from the fit (a different number of samples),
    /// one line each.
    pub fn notes_for(&self, samples: usize) -> Vec<String> {
        match (&self.file.mc, samples) {
            (Some(m), s) if s >= 2 && s != m.samples => vec![format!(
                "{}: the Monte Carlo calibration was fitted with {} samples but predictions use {s}; the temperature and \
                 thresholds still apply, but the conformal guarantee holds exactly only for {} samples",
                self.path.display(),
                m.samples,
                m.samples
            )],
            _ => Vec::new(),
        }
    }

    fn check_classes(&self, m: &ModeCalibration, c: usize) -> Result<()> {
        match m.conformal.first() {
            Some(f) if f.classes != c => Err(Error::Request(format!(
                "{} was fitted for {} classes but the adapter predicts {c}; re-run `pvera calibrate`",
                self.path.display(),
                f.classes
            ))),
            _ => Ok(()),
        }
    }

    /// Temperature-scaled probabilities of mean mode: `softmax(ln p / T_mean)`.
    pub fn mean_probs(&self, p: &Prediction) -> Result<Vec<f64>> {
        let m = self.mode(false)?;
        self.check_classes(m, p.mean_mode.len())?;
        Ok(apply_temperature(&[log_probabilities(&p.mean_mode)], m.temperature.temperature)?.remove(0))
    }

    /// Temperature-scaled probabilities of every sample, `softmax(ln p_s / T_mc)`.
    fn tempered_samples(&self, p: &Prediction) -> Result<Vec<Vec<f64>>> {
        let m = self.mode(true)?;
        let c = p.mean_mode.len();
        self.check_classes(m, c)?;
        p.samples
            .iter()
            .map(|s| Ok(apply_temperature(&[log_probabilities(s)], m.temperature.temperature)?.remove(0)))
            .collect()
    }

    /// Temperature-scaled Monte Carlo probabilities `(1/S) Σ_s softmax(ln p_s / T_mc)`.
    pub fn mc_probs(&self, p: &Prediction) -> Result<Vec<f64>> {
        let m = self.mode(true)?;
        let (s, c) = (p.samples.len(), p.mean_mode.len());
        if s == 0 {
            return Err(Error::Model("mc_probs: the prediction was not sampled".into()));
        }
        self.check_classes(m, c)?;
        let lp: Vec<f64> = p.samples.iter().flat_map(|x| log_probabilities(x)).collect();
        Ok(apply_temperature_mc(&SampledLogits::new(&lp, s, 1, c)?, m.temperature.temperature)?.remove(0))
    }

    /// The calibrated view of a prediction: the temperature-scaled probabilities of the mode it
    /// reports, its conformal set at the chosen score and `α`, and whether to abstain.
    pub fn calibrate(&self, p: &Prediction) -> Result<Calibrated> {
        let sampled = !p.samples.is_empty();
        let m = self.mode(sampled)?;
        let probs = if sampled { self.mc_probs(p)? } else { self.mean_probs(p)? };
        let fit = m.conformal(self.score).ok_or_else(|| {
            Error::config(
                "conformal",
                format!(
                    "{}: score {} is fitted in mean mode but not in {} mode; re-run `pvera calibrate`",
                    self.path.display(),
                    self.score,
                    if sampled { "Monte Carlo" } else { "mean" }
                ),
            )
        })?;
        let t = fit.alpha_index(self.alpha).map(|i| &fit.thresholds[i]).ok_or_else(|| {
            Error::config("conformal", format!("{}: alpha {} is not fitted for every mode; re-run `pvera calibrate`", self.path.display(), self.alpha))
        })?;
        let set_probs: &[f64] = if m.conformal_on_scaled { &probs } else { p.probs() };
        let prediction_set = prediction_set(set_probs, self.score, fit.last_label, t);
        let confidence = probs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let abstain = prediction_set.len() != 1 || self.abstain_below.is_some_and(|b| confidence < b);
        Ok(Calibrated {
            probs,
            temperature: m.temperature.temperature,
            prediction_set,
            coverage: 1.0 - self.alpha,
            score: self.score,
            abstain,
            abstain_below: self.abstain_below,
        })
    }

    /// Sets [`Prediction::calibrated`] on every prediction.
    pub fn apply(&self, preds: &mut [Prediction]) -> Result<()> {
        for p in preds.iter_mut() {
            p.calibrated = Some(self.calibrate(p)?);
        }
        Ok(())
    }

    /// A copy of a prediction with the temperatures applied to both modes: mean mode
    /// `softmax(ln p / T_mean)`; every sample `softmax(ln p_s / T_mc)` with its statistics
    /// recomputed at `confidence` (their mean is [`Self::mc_probs`]). What an evaluation "after
    /// temperature scaling" measures, with the same functions as before it.
    pub fn temper(&self, p: &Prediction, confidence: f64) -> Result<Prediction> {
        let mean_mode = self.mean_probs(p)?;
        if p.samples.is_empty() {
            return Ok(Prediction::mean_only(mean_mode));
        }
        let samples = self.tempered_samples(p)?;
        let mc = Some(input_stats(&samples, confidence)?);
        Ok(Prediction { mean_mode, mc, samples, calibrated: None })
    }
}

fn names(s: &[ConformalScore]) -> String {
    s.iter().map(|x| x.name()).collect::<Vec<_>>().join(", ")
}

/// A level such as `0.9` printed without float noise (`1 − 0.1 = 0.9`, not `0.8999999999999999`).
fn round_level(x: f64) -> f64 {
    (x * 1e9).round() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_split_is_seeded_disjoint_and_complete() {
        let unused: Vec<usize> = (100..150).collect();
        let (a, b) = held_out_split(&unused, 20, 7).unwrap();
        assert_eq!((a.len(), b.len()), (20, 30));
        let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, unused);
        assert_eq!(held_out_split(&unused, 20, 7).unwrap(), (a.clone(), b));
        assert_ne!(held_out_split(&unused, 20, 8).unwrap().0, a);
        assert!(held_out_split(&unused, 50, 0).is_err());
        assert!(held_out_split(&unused, 0, 0).is_err());
    }

    #[test]
    fn unfit_reasons() {
        assert!(unfit_reason(ConformalScore::Lac, 2, 100, &[0.1]).is_none());
        assert!(unfit_reason(ConformalScore::Aps, 2, 100, &[0.1]).unwrap().contains("binary"));
        assert!(unfit_reason(ConformalScore::Aps, 3, 19, &[0.05]).is_some());
        assert!(unfit_reason(ConformalScore::Aps, 3, 20, &[0.05]).is_none());
        // RAPS: 10 % of 150 = 15 tuning rows < 20
        assert!(unfit_reason(ConformalScore::Raps, 3, 150, &[0.05]).unwrap().contains("tuning"));
        assert!(unfit_reason(ConformalScore::Raps, 3, 200, &[0.05]).is_none());
    }

    #[test]
    fn round_level_drops_float_noise() {
        assert_eq!(format!("{}", round_level(1.0 - 0.1)), "0.9");
    }
}
