//! Temperature scaling, conformal prediction sets and selective-prediction metrics against their
//! references on identical arrays (fixtures from tools/make_calibration_fixtures.py): MAPIE 1.6.0
//! (LAC / APS / RAPS scores, quantiles, k and λ, sets: exact), torch-uncertainty 0.13.0 (AURC,
//! risk at coverage, FPR95, adaptive ECE: 1e-6; temperature: see below) and scipy (the f64 optimum
//! of the temperature NLL); plus properties that hold by construction.

use std::path::PathBuf;

use pvera::uncertainty::calibration_file::{
    parse_json_exact, rows_hash, CalibrationFile, CalibrationSplit, ModeCalibration,
};
use pvera::uncertainty::conformal::{
    aps_scores, calibrate, conformal_quantile, empirical_coverage, fit_aps, fit_lac, fit_raps, lac_scores,
    prediction_set, raps_penalties, set_summary, ConformalFit, ConformalOptions, ConformalScore, LastLabel, RapsSearch,
};
use pvera::uncertainty::selective::{adaptive_ece, fpr95, selective};
use pvera::uncertainty::temperature::{
    apply_temperature, apply_temperature_mc, fit_temperature, fit_temperature_mc, log_probabilities, temperature_nll,
    SampledLogits, TemperatureOptions,
};
use pvera::Error;
use serde_json::Value;

use crate::common::fixtures;

/// A fixture with every number correctly rounded (serde_json's default parser may be 1 ulp off,
/// and the conformal checks compare bits).
fn load(name: &str) -> Value {
    let p: PathBuf = fixtures().join("calibration").join(name);
    parse_json_exact(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

fn vec1(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(f).collect()
}

fn vec2(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(vec1).collect()
}

fn labels(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn sets(v: &Value) -> Vec<Vec<Vec<usize>>> {
    v.as_array().unwrap().iter().map(|a| a.as_array().unwrap().iter().map(labels).collect()).collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

// ---------------------------------------------------------------------------------------------
// temperature

#[test]
fn temperature_is_the_nll_optimum_and_at_least_as_good_as_torch_uncertainty() {
    let fx = load("temperature.json");
    let opts = TemperatureOptions::default();
    assert_eq!(vec1(&fx["bounds"]), vec![opts.min, opts.max]);
    for case in fx["mean"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let z = vec2(&case["logits"]);
        let y = labels(&case["labels"]);
        let fit = fit_temperature(&z, &y, opts).unwrap();
        let (t_opt, t_tu) = (f(&case["optimal_temperature"]), f(&case["tu_temperature"]));
        assert!((fit.nll_before - f(&case["nll_t1"])).abs() < 1e-12, "{name}: NLL at T = 1");
        if name == "anti_informative" {
            // the NLL keeps falling towards uniform probabilities; torch-uncertainty's LBFGS crossed
            // 1/T = 0 and returned a negative temperature
            assert!(t_tu < 0.0, "{name}: {t_tu}");
            assert!(fit.at_bound && fit.temperature == opts.max, "{name}: {fit:?}");
            continue;
        }
        assert!(!fit.at_bound, "{name}: {fit:?}");
        assert!(rel(fit.temperature, t_opt) < 1e-6, "{name}: T {} vs scipy's optimum {t_opt}", fit.temperature);
        assert!((fit.nll_after - f(&case["nll_optimal"])).abs() < 1e-12, "{name}: NLL at the optimum");
        // torch-uncertainty stops when the loss changes by < 1e-9: a few 1e-4 short, never better
        assert!((fit.temperature - t_tu).abs() < 1e-3, "{name}: T {} vs torch-uncertainty {t_tu}", fit.temperature);
        assert!(fit.nll_after <= temperature_nll(&z, &y, t_tu).unwrap() + 1e-12, "{name}");
        let p = apply_temperature(&z[..5], t_opt).unwrap();
        for (a, b) in p.iter().zip(vec2(&case["calibrated_probs_first_rows"])) {
            for (x, w) in a.iter().zip(&b) {
                assert!((x - w).abs() < 1e-12, "{name}: calibrated probability {x} vs {w}");
            }
        }
    }
}

fn sampled(case: &Value) -> (Vec<f64>, usize, usize, usize) {
    let s = case["logits"].as_array().unwrap();
    let rows: Vec<Vec<Vec<f64>>> = s.iter().map(vec2).collect();
    let (ns, n, c) = (rows.len(), rows[0].len(), rows[0][0].len());
    (rows.into_iter().flatten().flatten().collect(), ns, n, c)
}

#[test]
fn mc_temperature_is_the_optimum_of_the_averaged_predictive() {
    let fx = load("temperature.json");
    for case in fx["mc"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (flat, s, n, c) = sampled(case);
        assert_eq!(s, case["samples"].as_u64().unwrap() as usize);
        let z = SampledLogits::new(&flat, s, n, c).unwrap();
        let y = labels(&case["labels"]);
        let fit = fit_temperature_mc(&z, &y, TemperatureOptions::default()).unwrap();
        let t_opt = f(&case["optimal_temperature"]);
        assert!(rel(fit.temperature, t_opt) < 1e-6, "{name}: T {} vs scipy's optimum {t_opt}", fit.temperature);
        assert!((fit.nll_before - f(&case["nll_t1"])).abs() < 1e-12, "{name}");
        assert!((fit.nll_after - f(&case["nll_optimal"])).abs() < 1e-12, "{name}");
        assert_eq!((fit.samples, fit.examples), (s, n));
        let p = apply_temperature_mc(&z, t_opt).unwrap();
        for (a, b) in p.iter().zip(vec2(&case["calibrated_probs_first_rows"])) {
            for (x, w) in a.iter().zip(&b) {
                assert!((x - w).abs() < 1e-12, "{name}: calibrated probability {x} vs {w}");
            }
        }
        // the MC fit differs from fitting the mean-mode logits of the first sample (the test
        // would be void if the samples did not matter)
        let first: Vec<Vec<f64>> = (0..n).map(|i| z.row(0, i).to_vec()).collect();
        let t0 = fit_temperature(&first, &y, TemperatureOptions::default()).unwrap().temperature;
        assert!(rel(t0, fit.temperature) > 1e-3, "{name}: {t0} vs {}", fit.temperature);
    }
}

#[test]
fn mc_temperature_of_identical_samples_is_the_mean_mode_temperature() {
    // S copies of one logit vector: the average of identical softmaxes is that softmax, so the
    // log-space MC NLL must equal the mean-mode NLL at every T, and so must the fits.
    let fx = load("temperature.json");
    let case = &fx["mean"][0];
    let z = vec2(&case["logits"]);
    let y = labels(&case["labels"]);
    let flat: Vec<f64> = (0..4).flat_map(|_| z.iter().flatten().copied()).collect();
    let zs = SampledLogits::new(&flat, 4, z.len(), z[0].len()).unwrap();
    let a = fit_temperature(&z, &y, TemperatureOptions::default()).unwrap();
    let b = fit_temperature_mc(&zs, &y, TemperatureOptions::default()).unwrap();
    assert!(rel(a.temperature, b.temperature) < 1e-6 && (a.nll_after - b.nll_after).abs() < 1e-12, "{a:?} {b:?}");
}

#[test]
fn log_probabilities_fit_the_same_temperature_and_t1_is_the_identity() {
    let fx = load("temperature.json");
    for case in fx["mean"].as_array().unwrap().iter().filter(|c| c["name"] != "anti_informative") {
        let z = vec2(&case["logits"]);
        let y = labels(&case["labels"]);
        let p = apply_temperature(&z, 1.0).unwrap();
        let lp: Vec<Vec<f64>> = p.iter().map(|r| log_probabilities(r)).collect();
        let a = fit_temperature(&z, &y, TemperatureOptions::default()).unwrap();
        let b = fit_temperature(&lp, &y, TemperatureOptions::default()).unwrap();
        assert!(rel(a.temperature, b.temperature) < 1e-6, "{}: {} vs {}", case["name"], a.temperature, b.temperature);
        // T = 1 on log-probabilities returns the probabilities
        for (r, q) in apply_temperature(&lp, 1.0).unwrap().iter().zip(&p) {
            for (x, w) in r.iter().zip(q) {
                assert!((x - w).abs() < 1e-15);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// conformal

struct Case {
    name: String,
    seed: u64,
    probs_cal: Vec<Vec<f64>>,
    labels_cal: Vec<usize>,
    probs_test: Vec<Vec<f64>>,
    alphas: Vec<f64>,
    results: Vec<Value>,
}

fn conformal_cases() -> Vec<Case> {
    let fx = load("conformal.json");
    assert_eq!(f(&fx["epsilon"]), pvera::uncertainty::conformal::MAPIE_EPSILON);
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            seed: c["seed"].as_u64().unwrap(),
            probs_cal: vec2(&c["probs_cal"]),
            labels_cal: labels(&c["labels_cal"]),
            probs_test: vec2(&c["probs_test"]),
            alphas: vec1(&c["alphas"]),
            results: c["results"].as_array().unwrap().clone(),
        })
        .collect()
}

fn last_label(r: &Value) -> LastLabel {
    if r["include_last_label"].as_bool().unwrap() {
        LastLabel::Include
    } else {
        LastLabel::Exclude
    }
}

fn pick<T: Clone>(v: &[T], rows: &[usize]) -> Vec<T> {
    rows.iter().map(|&i| v[i].clone()).collect()
}

/// The fit pvera computes from the rows and uniforms MAPIE used, or the error it returns.
fn pvera_fit(case: &Case, r: &Value) -> pvera::Result<ConformalFit> {
    let ll = last_label(r);
    let score: ConformalScore = r["score"].as_str().unwrap().parse()?;
    let n = case.labels_cal.len();
    let cal_rows = r.get("cal_rows").map(labels).unwrap_or_else(|| (0..n).collect());
    let (pc, yc) = (pick(&case.probs_cal, &cal_rows), pick(&case.labels_cal, &cal_rows));
    match score {
        ConformalScore::Lac => fit_lac(&pc, &yc, &case.alphas),
        ConformalScore::Aps => {
            let u = r.get("u").map(vec1).unwrap_or_else(|| vec![0.0; pc.len()]);
            fit_aps(&pc, &yc, &case.alphas, &u, ll)
        }
        ConformalScore::Raps => {
            let Some(tune) = r.get("tune_rows").map(labels) else {
                // MAPIE failed before splitting: pvera's own split must fail as well
                return calibrate(
                    &case.probs_cal,
                    &case.labels_cal,
                    &case.alphas,
                    score,
                    &ConformalOptions { last_label: ll, seed: case.seed, ..Default::default() },
                );
            };
            let pens = raps_penalties(
                &pick(&case.probs_cal, &tune),
                &pick(&case.labels_cal, &tune),
                &case.alphas,
                ll,
                RapsSearch::Mapie,
            )?;
            fit_raps(&pc, &yc, &case.alphas, &vec1(&r["u"]), &pens, ll)
        }
    }
}

#[test]
fn conformal_scores_quantiles_and_sets_equal_mapie() {
    let mut checked = 0;
    for case in conformal_cases() {
        for r in &case.results {
            let what = format!("{} / {} / include_last_label={}", case.name, r["score"], r["include_last_label"]);
            if let Some(msg) = r.get("error") {
                let e = pvera_fit(&case, r).expect_err(&format!("{what}: MAPIE refused ({msg}), pvera did not"));
                let text = e.to_string();
                let msg = msg.as_str().unwrap();
                if msg.contains("binary target") {
                    assert!(text.contains("at least 3 classes") && text.contains("use lac"), "{what}: {text}");
                } else {
                    // too few rows for alpha (MAPIE's rule), or a tuning split too small to stratify
                    assert!(text.contains("too few for alpha"), "{what}: {text}");
                }
                continue;
            }
            let fit = pvera_fit(&case, r).unwrap_or_else(|e| panic!("{what}: {e}"));
            // conformity scores, bit for bit
            let cal_rows = labels(&r["cal_rows"]);
            let (pc, yc) = (pick(&case.probs_cal, &cal_rows), pick(&case.labels_cal, &cal_rows));
            let scores = match fit.score {
                ConformalScore::Lac => lac_scores(&pc, &yc).unwrap(),
                _ => aps_scores(&pc, &yc, &vec1(&r["u"])).unwrap(),
            };
            assert_eq!(scores, vec1(&r["scores"]), "{what}: conformity scores");
            let q: Vec<f64> = fit.thresholds.iter().map(|t| t.quantile).collect();
            assert_eq!(q, vec1(&r["quantiles"]), "{what}: quantiles");
            if fit.score == ConformalScore::Raps {
                let k: Vec<usize> = fit.thresholds.iter().map(|t| t.raps.unwrap().k_reg).collect();
                let l: Vec<f64> = fit.thresholds.iter().map(|t| t.raps.unwrap().lambda).collect();
                assert_eq!(k, labels(&r["k_star"]), "{what}: k_star");
                assert_eq!(l, vec1(&r["lambda_star"]), "{what}: lambda_star");
                let tune = labels(&r["tune_rows"]);
                let pens = raps_penalties(
                    &pick(&case.probs_cal, &tune),
                    &pick(&case.labels_cal, &tune),
                    &case.alphas,
                    fit.last_label,
                    RapsSearch::PenaltyFromK,
                )
                .unwrap();
                let l: Vec<f64> = pens.iter().map(|p| p.lambda).collect();
                assert_eq!(l, vec1(&r["lambda_star_penalty_from_k"]), "{what}: lambda with the paper's penalty");
            }
            let want = sets(&r["mapie_sets"]);
            for (a, (t, w)) in fit.thresholds.iter().zip(&want).enumerate() {
                let got: Vec<Vec<usize>> =
                    case.probs_test.iter().map(|p| prediction_set(p, fit.score, fit.last_label, t)).collect();
                assert_eq!(&got, w, "{what}: sets at alpha {}", case.alphas[a]);
                assert_eq!(fit.sets_at(&case.probs_test, a).unwrap(), got);
            }
            checked += 1;
        }
    }
    // 10 classes: lac + aps x2 + raps x2; ties: the same; tiny: lac + aps x2; binary: lac
    assert_eq!(checked, 14);
}

#[test]
fn ties_follow_the_stable_label_order() {
    // the ties case really has true labels tied with other labels (else the check is void), and
    // MAPIE's scores there were computed with a stable argsort
    let case = conformal_cases().into_iter().find(|c| c.name == "five_class_ties").unwrap();
    let tied =
        case.probs_cal.iter().zip(&case.labels_cal).filter(|(p, &y)| p.iter().filter(|&&v| v == p[y]).count() > 1);
    assert!(tied.count() > 20);
    let aps = case.results.iter().find(|r| r["score"] == "aps").unwrap();
    assert!(aps["argsort"].as_str().unwrap().starts_with("stable"));
}

fn options(seed: u64) -> ConformalOptions {
    ConformalOptions { seed, ..Default::default() }
}

#[test]
fn conformal_sets_cover_their_calibration_rows_and_nest_in_alpha() {
    // RAPS tunes on 20 of the 200 rows: MAPIE's rule allows alpha >= 0.05 there
    let alphas = [0.05, 0.1, 0.2, 0.3];
    for case in conformal_cases().into_iter().filter(|c| c.name == "ten_class" || c.name == "five_class_ties") {
        for score in ConformalScore::ALL {
            for seed in [0, 1, 2] {
                let fit = calibrate(&case.probs_cal, &case.labels_cal, &alphas, score, &options(seed)).unwrap();
                assert_eq!(fit.seed, Some(seed));
                // the rows that set the quantiles (RAPS keeps its tuning rows apart)
                let rows: Vec<usize> = (0..case.labels_cal.len()).filter(|i| !fit.tuning_rows.contains(i)).collect();
                assert_eq!(rows.len(), fit.n);
                let mut previous: Option<Vec<Vec<usize>>> = None;
                for (a, &alpha) in alphas.iter().enumerate() {
                    let s = fit.sets_at(&pick(&case.probs_cal, &rows), a).unwrap();
                    let cov = empirical_coverage(&s, &pick(&case.labels_cal, &rows)).unwrap();
                    assert!(cov >= 1.0 - alpha, "{} {score} seed {seed}: coverage {cov} < 1 - {alpha}", case.name);
                    // one score function for every alpha: a larger alpha gives a subset (RAPS's
                    // penalty changes with alpha, so its sets need not nest)
                    if score != ConformalScore::Raps {
                        if let Some(prev) = &previous {
                            for (big, small) in prev.iter().zip(&s) {
                                assert!(small.iter().all(|l| big.contains(l)), "{} {score}: not nested", case.name);
                            }
                        }
                    }
                    previous = Some(s);
                }
                // the test rows: coverage and size figures are consistent
                let s = fit.sets_at(&case.probs_test, 2).unwrap();
                let sum = set_summary(0.1, &s, &vec![0; s.len()]).unwrap();
                assert!(sum.mean_size >= sum.singletons && sum.empty <= 1.0);
            }
        }
    }
}

#[test]
fn randomisation_and_tuning_split_follow_the_seed() {
    let case = conformal_cases().into_iter().find(|c| c.name == "ten_class").unwrap();
    let fit = |score, seed| calibrate(&case.probs_cal, &case.labels_cal, &[0.1], score, &options(seed)).unwrap();
    assert_eq!(fit(ConformalScore::Aps, 4), fit(ConformalScore::Aps, 4));
    assert_ne!(fit(ConformalScore::Aps, 4).thresholds, fit(ConformalScore::Aps, 5).thresholds);
    let r = fit(ConformalScore::Raps, 4);
    assert_eq!(r.tuning_rows.len(), 20); // ceil(0.1 * 200)
    assert_eq!(r.n, 180);
    // without randomisation the APS quantile is one of the deterministic masses
    let det = calibrate(
        &case.probs_cal,
        &case.labels_cal,
        &[0.1],
        ConformalScore::Aps,
        &ConformalOptions { randomized: false, ..Default::default() },
    )
    .unwrap();
    let masses = aps_scores(&case.probs_cal, &case.labels_cal, &vec![0.0; 200]).unwrap();
    assert_eq!(det.thresholds[0].quantile, conformal_quantile(&masses, 0.1).unwrap());
    assert!(!det.randomized && fit(ConformalScore::Aps, 4).randomized);
}

// ---------------------------------------------------------------------------------------------
// selective prediction and OOD

#[test]
fn selective_metrics_equal_torch_uncertainty() {
    let fx = load("selective.json");
    let mut order_dependent = 0;
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let p = vec2(&case["probs"]);
        let y = labels(&case["labels"]);
        let s = selective(&p, &y).unwrap();
        let got = [
            ("aurc", s.aurc),
            ("risk_at_80", s.risk_at_80),
            ("risk_at_90", s.risk_at_90),
            ("ace_10", adaptive_ece(&p, &y, 10).unwrap().ace),
            ("ace_15", adaptive_ece(&p, &y, 15).unwrap().ace),
        ];
        assert_eq!(s.accuracy_at_80, 1.0 - s.risk_at_80);
        for (key, v) in got {
            let tu = f(&case["torch_uncertainty"][key]);
            if case["order_invariant"][key].as_bool().unwrap() {
                assert!((v - tu).abs() < 1e-6, "{name} {key}: {v} vs torch-uncertainty {tu}");
            } else {
                // torch-uncertainty's value depends on its unstable sort of tied confidences;
                // pvera keeps tied rows in input order
                let st = f(&case["stable_order"][key]);
                assert!((v - st).abs() < 1e-12, "{name} {key}: {v} vs the stable order's {st}");
                order_dependent += 1;
            }
        }
    }
    assert_eq!(order_dependent, 5, "only the ties case depends on the order of tied rows");
    for case in fx["fpr95"].as_array().unwrap() {
        let got = fpr95(&vec1(&case["id_scores"]), &vec1(&case["ood_scores"])).unwrap();
        let want = f(&case["fpr95"]);
        assert!((got - want).abs() < 1e-6, "{}: FPR95 {got} vs torch-uncertainty {want}", case["name"]);
    }
}

// ---------------------------------------------------------------------------------------------
// calibration.json

fn sample_file() -> CalibrationFile {
    let case = conformal_cases().into_iter().find(|c| c.name == "ten_class").unwrap();
    let lp: Vec<Vec<f64>> = case.probs_cal.iter().map(|r| log_probabilities(r)).collect();
    let temperature = fit_temperature(&lp, &case.labels_cal, TemperatureOptions::default()).unwrap();
    let scaled = apply_temperature(&lp, temperature.temperature).unwrap();
    let conformal = ConformalScore::ALL
        .iter()
        .map(|&s| calibrate(&scaled, &case.labels_cal, &[0.1, 0.05], s, &options(0)).unwrap())
        .collect();
    let split = CalibrationSplit::new("data.jsonl", (100..300).collect(), "test");
    let mean = ModeCalibration { samples: 1, temperature, conformal_on_scaled: true, conformal, conformal_raw: vec![] };
    CalibrationFile::new("sha256:aaaa", 0, split, mean, None)
}

#[test]
fn calibration_file_round_trips_and_refuses_a_stale_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calibration.json");
    let file = sample_file();
    file.write(&path).unwrap();
    let back = CalibrationFile::read(&path).unwrap();
    assert_eq!(back, file);
    assert_eq!(back.n, 200);
    assert_eq!(back.split.rows_hash, rows_hash(&(100..300).collect::<Vec<_>>()));
    assert_ne!(rows_hash(&[1, 2]), rows_hash(&[2, 1]));
    assert!(back.mean.conformal(ConformalScore::Raps).unwrap().thresholds[1].raps.is_some());
    assert!(CalibrationFile::read_beside(dir.path()).unwrap().is_some());
    assert!(CalibrationFile::read_beside(&dir.path().join("nothing")).unwrap().is_none());

    back.check_adapter_hash("sha256:aaaa", &path).unwrap();
    let e = back.check_adapter_hash("sha256:bbbb", &path).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::StaleCalibration { .. }), "{e:?}");
    assert!(msg.contains("sha256:aaaa") && msg.contains("sha256:bbbb") && msg.contains("pvera calibrate"), "{msg}");
    assert!(msg.contains(&path.display().to_string()) && msg.contains("--no-calibration"), "{msg}");

    // damaged, from the future, nonsense values
    std::fs::write(&path, "{\"format_version\": 1,").unwrap();
    let e = CalibrationFile::read(&path).unwrap_err();
    assert!(matches!(e, Error::ConfigParse { .. }) && e.to_string().contains("pvera calibrate"), "{e}");
    let mut future = file.clone();
    future.format_version = 99;
    std::fs::write(&path, future.to_json().unwrap()).unwrap();
    let e = CalibrationFile::read(&path).unwrap_err();
    assert!(e.to_string().contains("format 99") && e.to_string().contains(&path.display().to_string()), "{e}");
    let mut bad = file.clone();
    bad.mean.temperature.temperature = -1.0;
    assert!(bad.write(&path).is_err());
}
