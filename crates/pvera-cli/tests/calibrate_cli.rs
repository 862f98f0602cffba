//! `pvera calibrate` and calibrated `predict` / `eval` end to end on the tiny BERT fixture: the
//! recorded split, the file predict and eval read, a stale adapter refused, `--no-calibration`,
//! coverage / score choice, abstentions, the eval figures against the library functions on the
//! per-example arrays, and the reliability PNG.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{pvera, s, show, tiny_bert, train_tiny_bert, TinyBert};

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", show(o)))
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// 60 short mails, spam and ham alternating, so a run that trains on 12 leaves 48 unused.
fn write_mails(path: &Path) {
    let spam = ["win free money now", "click here for a free prize", "cheap prize win win", "free money click now", "claim your cash reward"];
    let ham = ["meeting tomorrow at noon", "see the attached report", "lunch with the team", "notes from the meeting", "agenda for monday"];
    let mut text = String::new();
    for i in 0..60 {
        let (t, l) = if i % 2 == 0 { (spam[i / 2 % 5], "spam") } else { (ham[i / 2 % 5], "ham") };
        text.push_str(&(serde_json::json!({"text": format!("{t} {i}"), "label": l}).to_string() + "\n"));
    }
    std::fs::write(path, text).unwrap();
}

/// A trained run on the 60 mails (12 trained / validated, 48 unused) with a calibration drawn from
/// its unused mails (24 calibration rows, 24 test rows, 4 MC samples).
struct Calibrated {
    t: TinyBert,
    best: PathBuf,
    cal: serde_json::Value,
}

fn calibrated() -> Calibrated {
    let t = tiny_bert();
    write_mails(&t.data);
    let o = train_tiny_bert(
        &t,
        &["--epochs", "2", "--batch-size", "4", "--lr", "5e-2", "--d-initial", "1.0", "--train-size", "12", "--threads", "1"],
    );
    assert!(o.status.success(), "{}", show(&o));
    let best = t.out.join("best");
    let o = pvera(&[
        "calibrate", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&best), "--data", s(&t.data),
        "--held-out-of", s(&t.out), "--calibration-size", "24", "--samples", "4", "--threads", "1",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("skipped aps") && err.contains("skipped raps") && err.contains("binary"), "{}", show(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("T = ") && stdout.contains("lac") && stdout.contains("test rows: 24"), "{stdout}");
    let cal = read_json(&best.join("calibration.json"));
    Calibrated { t, best, cal }
}

fn predict(c: &Calibrated, extra: &[&str]) -> Output {
    let mut a = vec![
        "predict", "--model", s(&c.t.model), "--tokenizer", s(&c.t.tok), "--adapter", s(&c.best), "--samples", "4",
        "--threads", "1", "--json",
    ];
    a.extend_from_slice(extra);
    a.extend_from_slice(&["free money prize", "notes from lunch", "win the meeting"]);
    pvera(&a)
}

#[test]
fn calibrate_records_the_split_and_predict_uses_the_file() {
    let c = calibrated();
    let (cal, t) = (&c.cal, &c.t);
    // the recorded split: 24 + 24 of the run's 48 unused mails, disjoint, with the data's fingerprint
    let split = read_json(&t.out.join("split.json"));
    let unused = ids(&split["unused"]);
    let (rows, test) = (ids(&cal["split"]["rows"]), ids(&cal["split"]["test_rows"]));
    assert_eq!((unused.len(), rows.len(), test.len(), cal["n"].as_u64()), (48, 24, 24, Some(24)));
    let mut all: Vec<usize> = rows.iter().chain(&test).copied().collect();
    all.sort_unstable();
    let mut u = unused.clone();
    u.sort_unstable();
    assert_eq!(all, u, "calibration + test rows are exactly the unused mails");
    assert_eq!(cal["split"]["data_sha256"], split["data_sha256"]);
    assert!(cal["adapter_hash"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(cal["mc"]["samples"], 4);
    for mode in ["mean", "mc"] {
        let scores: Vec<&str> = cal[mode]["conformal"].as_array().unwrap().iter().map(|f| f["score"].as_str().unwrap()).collect();
        assert_eq!(scores, ["lac"], "binary task: LAC only");
        assert!(cal[mode]["temperature"]["temperature"].as_f64().unwrap() > 0.0);
    }

    // predict: calibrated fields, sets of label names, abstain = the set is not one label
    let o = predict(&c, &[]);
    assert!(o.status.success(), "{}", show(&o));
    let j = json(&o);
    assert_eq!(j["calibration"]["coverage"], 0.9);
    assert_eq!(j["calibration"]["score"], "lac");
    for p in j["predictions"].as_array().unwrap() {
        let set: Vec<&str> = p["prediction_set"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        assert!(set.iter().all(|l| ["ham", "spam"].contains(l)), "{p}");
        assert_eq!(p["abstain"].as_bool().unwrap(), set.len() != 1, "{p}");
        assert_eq!(p["score"], "lac");
        assert_eq!(p["coverage"], 0.9);
        assert_eq!(p["temperature"], cal["mc"]["temperature"]["temperature"]);
        let cp: f64 = p["calibrated_probs"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
        assert!((cp - 1.0).abs() < 1e-9, "{p}");
        for k in ["predicted", "mean_probs", "interval", "mutual_information"] {
            assert!(!p[k].is_null(), "the existing keys stay: {k}");
        }
    }
    // --coverage 0.95 picks alpha 0.05; LAC sets are nested, so never smaller
    let j95 = json(&predict(&c, &["--coverage", "0.95"]));
    assert_eq!(j95["calibration"]["alpha"], 0.05);
    for (a, b) in j["predictions"].as_array().unwrap().iter().zip(j95["predictions"].as_array().unwrap()) {
        assert!(b["prediction_set"].as_array().unwrap().len() >= a["prediction_set"].as_array().unwrap().len());
        assert_eq!(b["coverage"], 0.95);
    }
    // a coverage that was not fitted, a score that was not fitted: exit 2 naming what was
    let o = predict(&c, &["--coverage", "0.8"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("0.9, 0.95"), "{}", show(&o));
    let o = predict(&c, &["--score", "aps"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("fitted: lac"), "{}", show(&o));
    // --abstain-below 1: nothing is that sure
    let ja = json(&predict(&c, &["--abstain-below", "1"]));
    assert!(ja["predictions"].as_array().unwrap().iter().all(|p| p["abstain"] == true));
    // --no-calibration: the calibration fields are null, the rest is unchanged
    let jn = json(&predict(&c, &["--no-calibration"]));
    assert!(jn["calibration"].is_null());
    for (a, b) in j["predictions"].as_array().unwrap().iter().zip(jn["predictions"].as_array().unwrap()) {
        for k in ["calibrated_probs", "prediction_set", "abstain", "temperature", "coverage", "score"] {
            assert!(b[k].is_null(), "{k}: {b}");
        }
        assert_eq!(a["mean_probs"], b["mean_probs"]);
    }
    let o = pvera(&[
        "predict", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&c.best), "--no-calibration",
        "--coverage", "0.9", "x",
    ]);
    assert_eq!(o.status.code(), Some(2), "--no-calibration conflicts with --coverage: {}", show(&o));
    // the table form shows the set and the abstention
    let o = pvera(&["predict", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&c.best), "--samples", "4", "win now"]);
    assert!(o.status.success(), "{}", show(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("abstain") && table.contains("calibrated by") && table.contains("cal p"), "{table}");
}

#[test]
fn eval_uses_the_test_rows_and_reports_figures_equal_to_the_library() {
    let c = calibrated();
    let t = &c.t;
    let ev = t.tmp.path().join("ev");
    let o = pvera(&[
        "eval", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&c.best), "--data", s(&t.data),
        "--held-out-of", s(&t.out), "--samples", "4", "--bins", "5", "--threads", "1", "--output", s(&ev),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for k in ["Monte Carlo + T", "mean mode + T", "AURC", "aECE", "acc@80", "conformal sets", "abstain"] {
        assert!(stdout.contains(k), "{k}: {stdout}");
    }
    let r = read_json(&ev.join("eval.json"));
    // exactly the recorded test rows, in their order
    let rows: Vec<usize> = r["per_example"].as_array().unwrap().iter().map(|e| e["index"].as_u64().unwrap() as usize).collect();
    assert_eq!(rows, ids(&c.cal["split"]["test_rows"]));
    assert_eq!(r["calibration"]["n"], 24);
    assert!(r["calibration_note"].is_null());

    // the figures equal the library's functions on the per-example arrays
    use pvera::uncertainty::selective::{adaptive_ece_from, aurc, risk_at_coverage};
    let ex = r["per_example"].as_array().unwrap();
    let labels: Vec<u64> = ex.iter().map(|e| e["label"].as_u64().unwrap()).collect();
    let check = |fig: &serde_json::Value, conf_key: &str, pred_key: &str| {
        let conf: Vec<f64> = ex.iter().map(|e| e[conf_key].as_f64().unwrap()).collect();
        let ok: Vec<bool> = ex.iter().zip(&labels).map(|(e, &y)| e[pred_key].as_u64().unwrap() == y).collect();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(fig["selective"]["aurc"].as_f64().unwrap(), aurc(&conf, &ok).unwrap()), "{fig}");
        for (key, cov) in [("risk_at_80", 0.8), ("risk_at_90", 0.9)] {
            assert!(close(fig["selective"][key].as_f64().unwrap(), risk_at_coverage(&conf, &ok, cov).unwrap()), "{key}");
        }
        assert!(close(fig["adaptive_ece"].as_f64().unwrap(), adaptive_ece_from(&conf, &ok, 5).unwrap().ace));
    };
    check(&r["figures"]["before"]["mean_mode"], "mean_mode_probability", "mean_mode_predicted");
    check(&r["figures"]["before"]["monte_carlo"], "probability", "predicted");
    check(&r["figures"]["after"]["monte_carlo"], "calibrated_probability", "calibrated_predicted");
    // the temperature-scaled mean mode keeps its argmax: accuracy unchanged
    assert_eq!(r["figures"]["after"]["mean_mode"]["calibration"]["accuracy"], r["figures"]["before"]["mean_mode"]["calibration"]["accuracy"]);

    // conformal coverage and size of the chosen sets (MC mode, LAC, alpha 0.1) from the per-example sets
    let mc = r["conformal"]["monte_carlo"].as_array().unwrap();
    assert_eq!(mc.len(), 2, "LAC at two alphas");
    let f = mc.iter().find(|f| f["alpha"] == 0.1 && f["score"] == "lac").unwrap();
    let sets: Vec<Vec<u64>> = ex.iter().map(|e| e["prediction_set"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()).collect();
    let covered = sets.iter().zip(&labels).filter(|(s, y)| s.contains(y)).count() as f64 / sets.len() as f64;
    let size = sets.iter().map(Vec::len).sum::<usize>() as f64 / sets.len() as f64;
    assert_eq!(f["after"]["coverage"].as_f64().unwrap(), covered);
    assert_eq!(f["after"]["mean_size"].as_f64().unwrap(), size);
    assert!(f["before"]["coverage"].as_f64().is_some());
    let abstained = ex.iter().filter(|e| e["abstain"] == true).count();
    assert_eq!(r["abstained"].as_u64().unwrap() as usize, abstained);
    assert_eq!(abstained, sets.iter().filter(|s| s.len() != 1).count());

    // reliability diagram: SVG with four curves and a PNG that decodes
    let svg = std::fs::read_to_string(ev.join("reliability.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 4);
    let png = image::open(ev.join("reliability.png")).unwrap().to_rgb8();
    assert_eq!((png.width(), png.height()), (1120, 1120));
    assert!(png.pixels().any(|p| p.0 == [0x1f, 0x77, 0xb4]), "the mean-mode curve is drawn");

    // without calibration: before figures only, and it says so
    let ev2 = t.tmp.path().join("ev2");
    let o = pvera(&[
        "eval", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&c.best), "--data", s(&t.data),
        "--held-out-of", s(&t.out), "--samples", "4", "--threads", "1", "--no-calibration", "--output", s(&ev2),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let r2 = read_json(&ev2.join("eval.json"));
    assert!(r2["figures"]["after"].is_null() && r2["conformal"].is_null() && r2["calibration"].is_null());
    assert!(r2["calibration_note"].as_str().unwrap().contains("pvera calibrate"));
    assert_eq!(r2["examples"], 48, "all unused mails without a calibration to keep apart");
}

#[test]
fn a_stale_or_damaged_calibration_is_refused_with_the_fix() {
    let c = calibrated();
    let t = &c.t;
    // one λ byte changes (the last bytes of the file are tensor data)
    let w = c.best.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x01;
    std::fs::write(&w, &bytes).unwrap();
    let o = predict(&c, &[]);
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("calibration.json") && err.contains("pvera calibrate") && err.contains("--no-calibration"), "{err}");
    assert!(err.contains(c.cal["adapter_hash"].as_str().unwrap()), "{err}");
    let ev = t.tmp.path().join("ev");
    let o = pvera(&[
        "eval", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&c.best), "--data", s(&t.data),
        "--samples", "4", "--output", s(&ev),
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    // --no-calibration predicts anyway
    let o = predict(&c, &["--no-calibration"]);
    assert!(o.status.success(), "{}", show(&o));
    // re-calibrating fixes it
    let o = pvera(&[
        "calibrate", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&c.best), "--data", s(&t.data),
        "--held-out-of", s(&t.out), "--calibration-size", "24", "--samples", "4", "--threads", "1", "--json",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(json(&o)["split"]["rows"], c.cal["split"]["rows"], "same seed, same rows");
    assert!(predict(&c, &[]).status.success());
    // damaged file: exit 4 naming it
    std::fs::write(c.best.join("calibration.json"), "{\"format_version\": 1,").unwrap();
    let o = predict(&c, &[]);
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&c.best.join("calibration.json").display().to_string()), "{}", show(&o));
}

#[test]
fn calibrate_flag_errors_and_the_assumed_split() {
    let c = calibrated();
    let t = &c.t;
    let base = |extra: &[&str]| {
        let mut a = vec!["calibrate", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&c.best), "--data", s(&t.data), "--threads", "1", "--samples", "2"];
        a.extend_from_slice(extra);
        pvera(&a)
    };
    // eval --held-out-of another run (another seed, another split) than the calibration's
    let other = t.tmp.path().join("other");
    let o = pvera(&[
        "train", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--data", s(&t.data), "--task", "text-classification",
        "--output", s(&other), "--r", "8", "--target-modules", "query,value", "--epochs", "1", "--train-size", "12",
        "--seed", "3", "--threads", "1",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let o = pvera(&[
        "eval", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&c.best), "--data", s(&t.data),
        "--held-out-of", s(&other), "--samples", "2", "--output", s(&t.tmp.path().join("e0")),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("calibrated against another training run"), "{}", show(&o));
    // APS asked for on a binary task
    let o = base(&["--held-out-of", s(&t.out), "--score", "lac,aps"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("binary"), "{}", show(&o));
    for bad in [&["--alpha", "1.5"][..], &["--alpha", "0.1,0.1"], &["--score", "top"], &["--calibration-size", "0"]] {
        let o = base(bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", show(&o));
    }
    // nothing left to test on
    let o = base(&["--held-out-of", s(&t.out), "--calibration-size", "48"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least one must stay for testing"), "{}", show(&o));
    // too few rows for alpha 0.05
    let o = base(&["--held-out-of", s(&t.out), "--calibration-size", "12"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("too few"), "{}", show(&o));
    // a file on its own: every row, with the assumption said and recorded
    let o = base(&["--alpha", "0.1"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("assumed disjoint"), "{}", show(&o));
    let cal = read_json(&c.best.join("calibration.json"));
    assert_eq!(cal["n"], 60);
    assert!(cal["split"]["description"].as_str().unwrap().contains("assumed"));
    assert!(cal["split"].get("test_rows").is_none());
    // an eval of that very file then has no row left to use
    let o = pvera(&[
        "eval", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&c.best), "--data", s(&t.data),
        "--samples", "2", "--output", s(&t.tmp.path().join("e")),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("without the 60 calibration row(s)"), "{}", show(&o));
    // --coverage without any calibration.json
    std::fs::remove_file(c.best.join("calibration.json")).unwrap();
    let o = predict(&c, &["--coverage", "0.9"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("run `pvera calibrate`"), "{}", show(&o));
}
