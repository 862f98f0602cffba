//! Calibrated prediction (`pvera::predictor::calibrated`) on synthetic predictions: the fitted
//! `calibration.json` equals the library's temperature and conformal functions on the same
//! arrays, the calibrator's probabilities, sets and abstentions equal them too, coverage / score
//! choice, the adapter hash and stale / damaged files, and the evaluation figures of `pvera eval`
//! against the functions they are made of.

use std::path::Path;

use pvera::predictor::calibrated::{
    adapter_hash, evaluation_rows, fit_calibration, held_out_split, FitOptions,
};
use pvera::predictor::{CalibrationChoice, Calibrator};
use pvera::uncertainty::calibration_file::{CalibrationFile, CalibrationSplit, CALIBRATION_FILE};
use pvera::uncertainty::conformal::{calibrate, prediction_set, set_summary, ConformalOptions, ConformalScore};
use pvera::uncertainty::evaluation::{auroc_table, figures, fpr95_table, ood_figures, set_figures, ModeScores};
use pvera::uncertainty::selective::{adaptive_ece, fpr95, selective};
use pvera::uncertainty::temperature::{
    apply_temperature, apply_temperature_mc, fit_temperature, fit_temperature_mc, log_probabilities, SampledLogits,
    TemperatureOptions,
};
use pvera::uncertainty::{calibration, Prediction};
use pvera::{Error, TorchGenerator};

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// `n` sampled predictions over `c` classes with `s` samples each, overconfident (logits scaled
/// by 3) and right about 70 % of the time; labels alongside. Deterministic in `seed`.
fn synthetic(n: usize, c: usize, s: usize, seed: u64) -> (Vec<Prediction>, Vec<usize>) {
    let mut g = TorchGenerator::new(seed);
    let mut preds = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let mut u = vec![0.0; 2 + c * (s + 1)];
        g.uniform_f64(&mut u, 0.0, 1.0);
        let y = ((u[0] * c as f64) as usize).min(c - 1);
        let right = u[1] < 0.7;
        let base: Vec<f64> = (0..c)
            .map(|k| 3.0 * (u[2 + k] * 2.0 + if (right && k == y) || (!right && k == (y + 1) % c) { 2.0 } else { 0.0 }))
            .collect();
        let mean = softmax(&base);
        let samples: Vec<Vec<f64>> = (0..s)
            .map(|j| {
                let z: Vec<f64> = (0..c).map(|k| base[k] + 2.0 * (u[2 + c * (j + 1) + k] - 0.5)).collect();
                softmax(&z)
            })
            .collect();
        preds.push(if s == 0 { Prediction::mean_only(mean) } else { Prediction::sampled(mean, samples, 0.95).unwrap() });
        labels.push(y);
    }
    (preds, labels)
}

fn split(n: usize) -> CalibrationSplit {
    CalibrationSplit::new("data.jsonl", (1000..1000 + n).collect(), "synthetic").with_data_sha256("abc")
}

/// Sample-major `S x N x C` log-probabilities of sampled predictions.
fn sample_logits(preds: &[Prediction]) -> Vec<f64> {
    let s = preds[0].samples.len();
    (0..s).flat_map(|k| preds.iter().flat_map(move |p| log_probabilities(&p.samples[k]))).collect()
}

#[test]
fn fitted_file_equals_the_library_functions_on_the_same_arrays() {
    let (preds, labels) = synthetic(300, 4, 8, 1);
    let opts = FitOptions { seed: 5, ..FitOptions::default() };
    let fitted = fit_calibration(&preds, &labels, "sha256:x", split(300), &opts).unwrap();
    assert!(fitted.notes.is_empty(), "{:?}", fitted.notes);
    let f = &fitted.file;
    assert_eq!((f.n, f.seed, f.adapter_hash.as_str()), (300, 5, "sha256:x"));
    let copts = ConformalOptions { seed: 5, ..ConformalOptions::default() };

    // mean mode: T on ln p, thresholds on softmax(ln p / T) and on p
    let lp: Vec<Vec<f64>> = preds.iter().map(|p| log_probabilities(&p.mean_mode)).collect();
    let t = fit_temperature(&lp, &labels, TemperatureOptions::default()).unwrap();
    assert_eq!(f.mean.temperature, t);
    assert!(t.temperature > 1.0, "the synthetic logits are overconfident: T {}", t.temperature);
    let scaled = apply_temperature(&lp, t.temperature).unwrap();
    let raw: Vec<Vec<f64>> = preds.iter().map(|p| p.mean_mode.clone()).collect();
    assert_eq!(f.mean.conformal.iter().map(|c| c.score).collect::<Vec<_>>(), ConformalScore::ALL.to_vec());
    for (i, &score) in ConformalScore::ALL.iter().enumerate() {
        assert_eq!(f.mean.conformal[i], calibrate(&scaled, &labels, &[0.1, 0.05], score, &copts).unwrap());
        assert_eq!(f.mean.conformal_raw[i], calibrate(&raw, &labels, &[0.1, 0.05], score, &copts).unwrap());
    }

    // Monte Carlo: T on the averaged tempered samples
    let mc = f.mc.as_ref().unwrap();
    assert_eq!(mc.samples, 8);
    let flat = sample_logits(&preds);
    let sl = SampledLogits::new(&flat, 8, 300, 4).unwrap();
    let tm = fit_temperature_mc(&sl, &labels, TemperatureOptions::default()).unwrap();
    assert_eq!(mc.temperature, tm);
    let scaled_mc = apply_temperature_mc(&sl, tm.temperature).unwrap();
    let raw_mc: Vec<Vec<f64>> = preds.iter().map(|p| p.probs().to_vec()).collect();
    for (i, &score) in ConformalScore::ALL.iter().enumerate() {
        assert_eq!(mc.conformal[i], calibrate(&scaled_mc, &labels, &[0.1, 0.05], score, &copts).unwrap());
        assert_eq!(mc.conformal_raw[i], calibrate(&raw_mc, &labels, &[0.1, 0.05], score, &copts).unwrap());
    }

    // mean-mode-only predictions fit no Monte Carlo part
    let mean_only: Vec<Prediction> = preds.iter().map(|p| Prediction::mean_only(p.mean_mode.clone())).collect();
    let m = fit_calibration(&mean_only, &labels, "sha256:x", split(300), &opts).unwrap();
    assert!(m.file.mc.is_none());
    assert_eq!(m.file.mean, f.mean);
}

#[test]
fn binary_tasks_fit_lac_only_and_raps_needs_its_tuning_rows() {
    let (preds, labels) = synthetic(60, 2, 4, 2);
    let f = fit_calibration(&preds, &labels, "h", split(60), &FitOptions::default()).unwrap();
    assert_eq!(f.file.mean.conformal.len(), 1);
    assert_eq!(f.file.mean.conformal[0].score, ConformalScore::Lac);
    assert_eq!(f.notes.len(), 2, "{:?}", f.notes);
    assert!(f.notes.iter().all(|n| n.contains("binary") && n.contains("skipped")), "{:?}", f.notes);
    // asked for explicitly: an error naming the score and the fix
    let opts = FitOptions { scores: vec![ConformalScore::Lac, ConformalScore::Aps], scores_given: true, ..FitOptions::default() };
    let e = fit_calibration(&preds, &labels, "h", split(60), &opts).unwrap_err();
    assert!(matches!(e, Error::Request(_)) && e.to_string().contains("aps") && e.to_string().contains("use lac"), "{e}");
    // every calibration row right: the NLL falls as T -> 0, the fit stops at the bound and says so
    let sure: Vec<Prediction> = (0..40).map(|i| Prediction::mean_only(if i % 2 == 0 { vec![0.8, 0.2] } else { vec![0.3, 0.7] })).collect();
    let y: Vec<usize> = (0..40).map(|i| i % 2).collect();
    let f = fit_calibration(&sure, &y, "h", split(40), &FitOptions::default()).unwrap();
    assert!(f.file.mean.temperature.at_bound && f.file.mean.temperature.temperature == 0.01);
    assert!(f.notes.iter().any(|n| n.contains("lower bound")), "{:?}", f.notes);
    // 4 classes, 150 rows: RAPS's 15 tuning rows cannot do alpha 0.05; skipped, LAC and APS kept
    let (preds, labels) = synthetic(150, 4, 0, 3);
    let f = fit_calibration(&preds, &labels, "h", split(150), &FitOptions::default()).unwrap();
    let scores: Vec<ConformalScore> = f.file.mean.conformal.iter().map(|c| c.score).collect();
    assert_eq!(scores, vec![ConformalScore::Lac, ConformalScore::Aps]);
    assert!(f.notes[0].contains("raps") && f.notes[0].contains("tuning"), "{:?}", f.notes);
}

fn calibrator(file: &CalibrationFile, choice: &CalibrationChoice) -> pvera::Result<Calibrator> {
    Calibrator::new(file.clone(), "ad/calibration.json".into(), choice)
}

#[test]
fn calibrator_probabilities_sets_and_abstentions_equal_the_library_functions() {
    let (preds, labels) = synthetic(300, 4, 8, 4);
    let file = fit_calibration(&preds, &labels, "h", split(300), &FitOptions::default()).unwrap().file;
    let (test, test_labels) = synthetic(200, 4, 8, 40);

    // defaults: the first score (LAC) and the first alpha (0.1)
    let cal = calibrator(&file, &CalibrationChoice::default()).unwrap();
    assert_eq!((cal.score(), cal.alpha()), (ConformalScore::Lac, 0.1));
    let mc = file.mc.as_ref().unwrap();
    for p in &test {
        let c = cal.calibrate(p).unwrap();
        let flat: Vec<f64> = p.samples.iter().flat_map(|s| log_probabilities(s)).collect();
        let want = apply_temperature_mc(&SampledLogits::new(&flat, 8, 1, 4).unwrap(), mc.temperature.temperature).unwrap();
        assert_eq!(c.probs, want[0]);
        assert_eq!(c.temperature, mc.temperature.temperature);
        let fit = &mc.conformal[0];
        assert_eq!(c.prediction_set, prediction_set(&c.probs, fit.score, fit.last_label, &fit.thresholds[0]));
        assert_eq!(c.abstain, c.prediction_set.len() != 1);
        assert!((c.coverage - 0.9).abs() < 1e-15);
        // mean mode and the tempered copy
        let m = cal.mean_probs(p).unwrap();
        assert_eq!(m, apply_temperature(&[log_probabilities(&p.mean_mode)], file.mean.temperature.temperature).unwrap()[0]);
        let t = cal.temper(p, 0.95).unwrap();
        assert_eq!(t.mean_mode, m);
        for (a, b) in t.probs().iter().zip(&c.probs) {
            assert!((a - b).abs() < 1e-12, "tempered samples average to the calibrated MC probabilities");
        }
    }
    // mean-mode predictions use the mean-mode part
    let p = Prediction::mean_only(test[0].mean_mode.clone());
    assert_eq!(cal.calibrate(&p).unwrap().temperature, file.mean.temperature.temperature);

    // empirical coverage over the test rows is about 1 - alpha (synthetic rows are exchangeable)
    let mut cp = test.clone();
    cal.apply(&mut cp).unwrap();
    let sets: Vec<Vec<usize>> = cp.iter().map(|p| p.calibrated.as_ref().unwrap().prediction_set.clone()).collect();
    let cov = set_summary(0.1, &sets, &test_labels).unwrap().coverage;
    assert!((0.83..=0.97).contains(&cov), "coverage {cov}");

    // coverage 0.95 picks alpha 0.05: sets at least as large (LAC sets are nested)
    let c95 = calibrator(&file, &CalibrationChoice { coverage: Some(0.95), ..Default::default() }).unwrap();
    assert_eq!(c95.alpha(), 0.05);
    for p in &test {
        let (a, b) = (cal.calibrate(p).unwrap().prediction_set, c95.calibrate(p).unwrap().prediction_set);
        assert!(a.iter().all(|x| b.contains(x)), "{a:?} vs {b:?}");
    }
    // a coverage or a score that was not fitted: an error listing what was
    let e = calibrator(&file, &CalibrationChoice { coverage: Some(0.8), ..Default::default() }).unwrap_err();
    assert!(matches!(e, Error::Request(_)) && e.to_string().contains("0.9, 0.95") && e.to_string().contains("--alpha 0.2"), "{e}");
    let aps = calibrator(&file, &CalibrationChoice { score: Some(ConformalScore::Aps), ..Default::default() }).unwrap();
    assert_eq!(aps.score(), ConformalScore::Aps);
    assert!(!aps.calibrate(&test[0]).unwrap().prediction_set.is_empty(), "APS sets are never empty");
    let mut lac_only = file.clone();
    lac_only.mean.conformal.truncate(1);
    let e = calibrator(&lac_only, &CalibrationChoice { score: Some(ConformalScore::Raps), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("fitted: lac"), "{e}");

    // abstain below a confidence: every prediction whose calibrated confidence is under it
    let ab = calibrator(&file, &CalibrationChoice { abstain_below: Some(0.9), ..Default::default() }).unwrap();
    for p in &test {
        let c = ab.calibrate(p).unwrap();
        assert_eq!(c.abstain, c.prediction_set.len() != 1 || c.confidence() < 0.9);
        assert_eq!(c.abstain_below, Some(0.9));
    }
    assert!(calibrator(&file, &CalibrationChoice { abstain_below: Some(1.5), ..Default::default() }).is_err());

    // a file without the Monte Carlo part cannot calibrate sampled predictions
    let mut mean_only = file.clone();
    mean_only.mc = None;
    let e = calibrator(&mean_only, &CalibrationChoice::default()).unwrap().calibrate(&test[0]).unwrap_err();
    assert!(matches!(e, Error::Request(_)) && e.to_string().contains("--samples"), "{e}");
}

fn fake_adapter(dir: &Path) {
    std::fs::write(dir.join("adapter_config.json"), b"{\"peft_type\": \"PVERA\"}").unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), [7u8; 64]).unwrap();
}

#[test]
fn adapter_hash_refuses_a_stale_or_damaged_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fake_adapter(dir);
    let h = adapter_hash(dir).unwrap();
    assert!(h.starts_with("sha256:") && h.len() == 7 + 64, "{h}");
    assert_eq!(adapter_hash(dir).unwrap(), h);
    // none yet
    assert!(Calibrator::load(dir, &CalibrationChoice::default()).unwrap().is_none());
    let (preds, labels) = synthetic(60, 2, 4, 5);
    let file = fit_calibration(&preds, &labels, &h, split(60), &FitOptions::default()).unwrap().file;
    let path = dir.join(CALIBRATION_FILE);
    file.write(&path).unwrap();
    let cal = Calibrator::load(dir, &CalibrationChoice::default()).unwrap().unwrap();
    assert_eq!(cal.file(), &file, "thresholds round-trip bit for bit");
    // one byte of the weights changes: refused, naming the file, both hashes and the fix
    let mut w = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    w[40] ^= 1;
    std::fs::write(dir.join("adapter_model.safetensors"), &w).unwrap();
    let e = Calibrator::load(dir, &CalibrationChoice::default()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(&e, Error::StaleCalibration { path: p, .. } if p == &path), "{e:?}");
    assert!(msg.contains(&h) && msg.contains("pvera calibrate") && msg.contains("--no-calibration"), "{msg}");
    // the config too
    w[40] ^= 1;
    std::fs::write(dir.join("adapter_model.safetensors"), &w).unwrap();
    assert!(Calibrator::load(dir, &CalibrationChoice::default()).is_ok());
    std::fs::write(dir.join("adapter_config.json"), b"{\"peft_type\": \"PVERA\", \"r\": 8}").unwrap();
    assert!(matches!(Calibrator::load(dir, &CalibrationChoice::default()), Err(Error::StaleCalibration { .. })));
    // damaged: a parse error naming the file and the fix
    std::fs::write(&path, "{\"format_version\": 1, \"mean\": ").unwrap();
    let e = Calibrator::load(dir, &CalibrationChoice::default()).unwrap_err();
    assert!(matches!(e, Error::ConfigParse { .. }), "{e:?}");
    assert!(e.to_string().contains(&path.display().to_string()) && e.to_string().contains("--no-calibration"), "{e}");
    // no adapter files: an I/O error naming the missing file
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(adapter_hash(empty.path()), Err(Error::Io { .. })));
}

#[test]
fn splits_keep_calibration_and_test_rows_apart() {
    let unused: Vec<usize> = (0..40).map(|i| i * 3).collect();
    let (cal, test) = held_out_split(&unused, 25, 9).unwrap();
    let (preds, labels) = synthetic(25, 2, 0, 6);
    let s = CalibrationSplit::new("d", cal.clone(), "x").with_data_sha256("same").with_test_rows(test.clone());
    let file = fit_calibration(&preds, &labels, "h", s, &FitOptions::default()).unwrap().file;
    assert_eq!(file.split.test_rows, test);
    assert!(file.split.test_rows_hash.is_some());
    // an evaluation of the same data leaves the calibration rows out, another data set keeps all
    let all: Vec<usize> = (0..120).collect();
    let (kept, removed) = evaluation_rows(&file, "same", all.clone());
    assert_eq!((kept.len(), removed), (95, 25));
    assert!(kept.iter().all(|r| !cal.contains(r)));
    assert_eq!(evaluation_rows(&file, "other", all.clone()), (all, 0));
    // a file whose test rows overlap its calibration rows is refused
    let mut bad = file.clone();
    bad.split.test_rows.push(cal[0]);
    assert!(bad.validate().is_err());
}

#[test]
fn evaluation_figures_equal_the_functions_they_are_made_of() {
    let (preds, labels) = synthetic(120, 4, 6, 7);
    let (ood, _) = synthetic(50, 4, 6, 70);
    let f = figures(&preds, &labels, 10).unwrap();
    let mean: Vec<Vec<f64>> = preds.iter().map(|p| p.mean_mode.clone()).collect();
    let mcp: Vec<Vec<f64>> = preds.iter().map(|p| p.probs().to_vec()).collect();
    for (got, probs) in [(&f.mean_mode, &mean), (f.monte_carlo.as_ref().unwrap(), &mcp)] {
        // (empty bins hold NaN, which never equals itself: compare as JSON, NaN -> null)
        let json = |c: &pvera::uncertainty::Calibration| serde_json::to_value(c).unwrap();
        assert_eq!(json(&got.calibration), json(&calibration(probs, &labels, 10).unwrap()));
        assert_eq!(got.adaptive_ece, adaptive_ece(probs, &labels, 10).unwrap().ace);
        assert_eq!(got.selective, selective(probs, &labels).unwrap());
        let (conf, ok) = pvera::uncertainty::selective::confidences_and_correct(probs, &labels).unwrap();
        let score = |want: bool| conf.iter().zip(&ok).filter(|(_, &o)| o == want).map(|(c, _)| 1.0 - c).collect::<Vec<_>>();
        assert_eq!(got.error_auroc.unwrap(), pvera::uncertainty::auroc(&score(true), &score(false)).unwrap());
    }
    let o = ood_figures(&preds, &ood).unwrap();
    let (i, x): (Vec<ModeScores>, Vec<ModeScores>) =
        (preds.iter().map(ModeScores::of).collect(), ood.iter().map(ModeScores::of).collect());
    assert_eq!(o.auroc, auroc_table(&x, &i).unwrap());
    assert_eq!(o.fpr95, fpr95_table(&x, &i).unwrap());
    let msp = |s: &[ModeScores]| s.iter().map(|v| v.mc.unwrap().msp).collect::<Vec<_>>();
    assert_eq!(o.fpr95["mc_msp"], fpr95(&msp(&i), &msp(&x)).unwrap());
    assert_eq!(o.fpr95.len(), 5);

    // conformal coverage / size: set_summary of the fit's own sets
    let file = fit_calibration(&preds, &labels, "h", split(120), &FitOptions::default()).unwrap().file;
    let cal = calibrator(&file, &CalibrationChoice::default()).unwrap();
    let tempered: Vec<Prediction> = preds.iter().map(|p| cal.temper(p, 0.95).unwrap()).collect();
    let tm: Vec<Vec<f64>> = tempered.iter().map(|p| p.mean_mode.clone()).collect();
    let sf = set_figures(&mean, &tm, &labels, &file.mean.conformal, &file.mean.conformal_raw).unwrap();
    assert_eq!(sf.len(), file.mean.conformal.len() * 2);
    for s in &sf {
        let fit = file.mean.conformal.iter().find(|c| c.score == s.score).unwrap();
        let k = fit.alpha_index(s.alpha).unwrap();
        assert_eq!(s.after, set_summary(s.alpha, &fit.sets_at(&tm, k).unwrap(), &labels).unwrap());
        let raw = file.mean.conformal_raw.iter().find(|c| c.score == s.score).unwrap();
        assert_eq!(s.before.as_ref().unwrap(), &set_summary(s.alpha, &raw.sets_at(&mean, k).unwrap(), &labels).unwrap());
        // on the calibration rows themselves, split conformal covers at least 1 - alpha (RAPS
        // fits its quantile on 90 % of them)
        if s.score != ConformalScore::Raps {
            assert!(s.after.coverage >= 1.0 - s.alpha - 1e-12, "{s:?}");
        }
    }
}
