//! `pvera predict` and `pvera eval` end to end on the committed tiny fixtures: train an adapter
//! with `pvera train`, then predict with Monte Carlo sampling and evaluate calibration / OOD.

use std::path::PathBuf;
use std::process::{Command, Output};

mod common;
use common::{fixtures, pvera, s, show, spam_jsonl, tiny_bert, train_tiny_bert};

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", show(o)))
}

/// Trains a tiny BERT text classifier; returns (tempdir, model, tokenizer, data, output dir).
fn trained_bert() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf, PathBuf) {
    let t = tiny_bert();
    // init_weights=false-like spread comes from training with a large lr; d_initial 1 makes the
    // latent's variance visible in a 2-epoch run.
    let o = train_tiny_bert(
        &t,
        &["--epochs", "2", "--batch-size", "3", "--lr", "5e-2", "--d-initial", "1.0", "--eval-data", s(&t.data), "--threads", "1"],
    );
    assert!(o.status.success(), "{}", show(&o));
    (t.tmp, t.model, t.tok, t.data, t.out)
}

#[test]
fn predict_text_is_reproducible_and_consistent() {
    let (_tmp, model, tok, _data, out) = trained_bert();
    let best = out.join("best");
    let base = ["predict", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&best), "--json"];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        a.extend_from_slice(&["free money prize", "notes from lunch"]);
        let o = pvera(&a);
        assert!(o.status.success(), "{}", show(&o));
        json(&o)
    };
    let a = run(&["--seed", "3"]);
    let b = run(&["--seed", "3"]);
    assert_eq!(a["predictions"], b["predictions"], "the same seed must reproduce the samples");
    let c = run(&["--seed", "4"]);
    assert_ne!(a["predictions"][0]["mean_probs"], c["predictions"][0]["mean_probs"], "another seed, other samples");
    let seq = run(&["--seed", "3", "--sequential"]);
    let preds = a["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    assert_eq!(a["labels"], serde_json::json!(["ham", "spam"]));
    for (p, q) in preds.iter().zip(seq["predictions"].as_array().unwrap()) {
        let iv: Vec<f64> = p["interval"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let m = p["modal_probability_mean"].as_f64().unwrap();
        assert!(0.0 <= iv[0] && iv[0] <= m && m <= iv[1] && iv[1] <= 1.0, "{p}");
        assert!(iv[1] - iv[0] > 0.0, "the latent is sampled, so the interval has a width: {p}");
        let (pe, ee, mi) = (
            p["predictive_entropy"].as_f64().unwrap(),
            p["expected_entropy"].as_f64().unwrap(),
            p["mutual_information"].as_f64().unwrap(),
        );
        assert!((pe - ee - mi).abs() < 1e-12 && mi >= 0.0, "{p}");
        let probs = p["mean_probs"].as_object().unwrap();
        let total: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        // sequential passes draw other noise here (no generator_seed) but from the same law
        assert_eq!(p["samples"], q["samples"]);
        // the mean mode does not depend on the sampling mode at all
        let (mp, mq) = (p["mean_mode"]["probs"].as_array().unwrap(), q["mean_mode"]["probs"].as_array().unwrap());
        for (x, y) in mp.iter().zip(mq) {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-6);
        }
    }
    // sampling in one module only: still an interval, and narrower spread than everywhere
    let one = run(&["--seed", "3", "--sample-modules", "encoder.layer.0.attention.self.value"]);
    let w = |j: &serde_json::Value| {
        let iv = j["predictions"][0]["interval"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
        iv[1] - iv[0]
    };
    assert!(w(&one) > 0.0 && w(&one) < w(&a), "one module {} vs all {}", w(&one), w(&a));
    let o = pvera(&[
        "predict", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&best), "--sample-modules", "nope", "x",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    // the table form names the columns and every input
    let o = pvera(&["predict", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&best), "win a prize"]);
    assert!(o.status.success(), "{}", show(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("interval") && t.contains("MI") && t.contains("win a prize"), "{t}");
}

#[test]
fn eval_reports_calibration_and_ood_and_agrees_with_train() {
    let (tmp, model, tok, data, out) = trained_bert();
    let ood = tmp.path().join("ood.txt");
    std::fs::write(&ood, "the cat sat on the mat\nquarterly tax forms attached\nhello\n").unwrap();
    let ev = tmp.path().join("eval");
    let o = pvera(&[
        "eval", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&out.join("best")), "--data", s(&data),
        "--ood", s(&ood), "--bins", "5", "--samples", "8", "--output", s(&ev),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("mean mode") && stdout.contains("Monte Carlo") && stdout.contains("OOD AUROC"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ev.join("eval.json")).unwrap()).unwrap();
    assert_eq!(r["examples"], 8);
    assert_eq!(r["mean_mode"]["bins"].as_array().unwrap().len(), 5);
    for k in ["mean_mode", "monte_carlo"] {
        for f in ["accuracy", "nll", "brier", "ece", "mce"] {
            assert!(r[k][f].as_f64().unwrap().is_finite(), "{k}.{f}: {r}");
        }
    }
    // pvera train evaluated the same best adapter on the same data in mean mode
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(r["mean_mode"]["accuracy"], m["eval"]["accuracy"], "eval vs train: {r} {m}");
    assert!((r["mean_mode"]["nll"].as_f64().unwrap() - m["eval"]["loss"].as_f64().unwrap()).abs() < 1e-5);
    let ood = &r["ood"][0];
    assert_eq!(ood["inputs"], 3);
    for k in ["mean_mode_msp", "mc_entropy", "mc_mutual_information"] {
        let v = ood["auroc"][k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k}: {v}");
    }
    let svg = std::fs::read_to_string(ev.join("reliability.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 2);
}

#[test]
fn image_predict_and_eval_with_noise_ood() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let model = fixtures().join("models/vit_task/model");
    let images = fixtures().join("data/images");
    let o = pvera(&[
        "train", "--model", s(&model), "--data", s(&images), "--task", "image-classification", "--output", s(&out),
        "--epochs", "1", "--batch-size", "2", "--r", "8", "--val-fraction", "0.3", "--target-modules", "query,value",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let best = out.join("best");
    let o = pvera(&["predict", "--model", s(&model), "--adapter", s(&best), "--json", "--samples", "4", s(&images.join("cat"))]);
    assert!(o.status.success(), "{}", show(&o));
    let j = json(&o);
    assert_eq!(j["predictions"].as_array().unwrap().len(), 2, "cat/ holds two images (and a notes.txt)");
    assert_eq!(j["labels"], serde_json::json!(["bird", "cat", "dog"]));
    let ev = tmp.path().join("ev");
    let o = pvera(&[
        "eval", "--model", s(&model), "--adapter", s(&best), "--data", s(&images), "--ood", "noise:3", "--samples", "4",
        "--output", s(&ev),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ev.join("eval.json")).unwrap()).unwrap();
    assert_eq!(r["ood"][0]["inputs"], 3);
}

#[test]
fn bad_predict_and_eval_input_gives_clear_errors() {
    let (tmp, model, tok, data, out) = trained_bert();
    let best = out.join("best");
    let code = |o: &Output| o.status.code().unwrap();
    // one sample cannot give an interval
    let o = pvera(&["predict", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&best), "--samples", "1", "x"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 2"), "{}", show(&o));
    // labels that do not fit the head
    let o = pvera(&["predict", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&best), "--labels", "a,b,c", "x"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 label names were given"), "{}", show(&o));
    // no adapter there
    let o = pvera(&["predict", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&tmp.path().join("nope")), "x"]);
    assert_eq!(code(&o), 6, "{}", show(&o));
    // an adapter without a trained head (and no label names): refused, never a random head
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("adapter_config.json")).unwrap()).unwrap();
    cfg["modules_to_save"] = serde_json::Value::Null;
    std::fs::write(bare.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(best.join("adapter_model.safetensors"), bare.join("adapter_model.safetensors")).unwrap();
    let o = pvera(&["predict", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&bare), "--labels", "ham,spam", "x"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("random head"), "{}", show(&o));
    // eval data with a label the adapter does not know
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"hi\", \"label\": \"eggs\"}\n").unwrap();
    let o = pvera(&["eval", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&best), "--data", s(&bad), "--output", s(&tmp.path().join("e"))]);
    assert_eq!(code(&o), 10, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("eggs"), "{}", show(&o));
    // --bins 0
    let o = pvera(&["eval", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&best), "--data", s(&data), "--bins", "0"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
}

#[test]
fn eval_held_out_of_uses_exactly_the_examples_training_left_unused() {
    let t = tiny_bert();
    let (tmp, data, out, model, tok) = (&t.tmp, &t.data, &t.out, &t.model, &t.tok);
    let o = train_tiny_bert(&t, &["--epochs", "1", "--batch-size", "2", "--train-size", "5", "--eval-held-out", "3", "--threads", "1"]);
    assert!(o.status.success(), "{}", show(&o));
    let split: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("split.json")).unwrap()).unwrap();
    assert_eq!(split["unused"].as_array().unwrap().len(), 3);
    let ev = tmp.path().join("ev");
    let o = pvera(&[
        "eval", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&out.join("best")), "--data", s(&data),
        "--held-out-of", s(&out), "--samples", "4", "--output", s(&ev),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ev.join("eval.json")).unwrap()).unwrap();
    let idx: Vec<&serde_json::Value> = r["per_example"].as_array().unwrap().iter().map(|e| &e["index"]).collect();
    assert_eq!(idx, split["unused"].as_array().unwrap().iter().collect::<Vec<_>>());
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(r["mean_mode"]["accuracy"], m["eval"]["accuracy"]);
    // another data file is refused
    let other = tmp.path().join("other.jsonl");
    std::fs::write(&other, "{\"text\": \"free prize\", \"label\": \"spam\"}\n{\"text\": \"a meeting\", \"label\": \"ham\"}\n").unwrap();
    let o = pvera(&[
        "eval", "--model", s(&model), "--tokenizer", s(&tok), "--adapter", s(&out.join("best")), "--data", s(&other),
        "--held-out-of", s(&out), "--output", s(&ev),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
}

#[test]
fn library_error_classes_map_to_their_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let bert = fixtures().join("models/bert_tiny/model");
    let inputs = tmp.path().join("in.safetensors");
    // a tiny valid inputs file is not needed: the model fails first
    std::fs::write(&inputs, b"").unwrap();
    // 9: unknown model_type
    let mamba = tmp.path().join("mamba");
    std::fs::create_dir_all(&mamba).unwrap();
    std::fs::copy(bert.join("model.safetensors"), mamba.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(bert.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "mamba".into();
    std::fs::write(mamba.join("config.json"), cfg.to_string()).unwrap();
    let o = pvera(&["infer", "--model", s(&mamba), "--inputs", s(&inputs), "--output", s(&tmp.path().join("o"))]);
    assert_eq!(o.status.code(), Some(9), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("\"mamba\""), "{}", show(&o));
    // 4: an adapter whose target_modules this model does not have (PEFT's test MLP adapter on BERT)
    let mlp = fixtures().join("peft/mlp_list/adapter");
    let o = pvera(&[
        "infer", "--model", s(&bert), "--adapter", s(&mlp), "--inputs", s(&inputs), "--output", s(&tmp.path().join("o")),
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    // 10: a data set record that cannot be used
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"ok\", \"label\": \"a\"}\n{\"text\": \" \", \"label\": \"b\"}\n").unwrap();
    let o = pvera(&[
        "train", "--model", s(&bert), "--tokenizer", s(&fixtures().join("data/tokenizer.json")), "--data", s(&data),
        "--task", "text-classification", "--output", s(&tmp.path().join("t")),
    ]);
    assert_eq!(o.status.code(), Some(10), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("d.jsonl:2"), "{}", show(&o));
}

#[test]
fn model_hub_ids_resolve_through_the_local_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let repo = cache.join("models--acme--tiny-bert");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let bert = fixtures().join("models/bert_tiny/model");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(bert.join(f), snap.join(f)).unwrap();
    }
    std::fs::copy(fixtures().join("data/tokenizer.json"), snap.join("tokenizer.json")).unwrap();
    let data = spam_jsonl(tmp.path());
    let run = |model: &str| {
        Command::new(env!("CARGO_BIN_EXE_pvera"))
            .env("HF_HUB_CACHE", &cache)
            .args([
                "train", "--model", model, "--data", s(&data), "--task", "text-classification", "--output",
                s(&tmp.path().join("out")), "--epochs", "1", "--r", "4", "--target-modules", "query,value",
                // the same output folder twice: the second run replaces the first (issue 16 row 6)
                "--overwrite",
            ])
            .output()
            .unwrap()
    };
    let o = run("acme/tiny-bert");
    assert!(o.status.success(), "{}", show(&o));
    let o = run(&format!("acme/tiny-bert@{commit}"));
    assert!(o.status.success(), "{}", show(&o));
    let o = run("acme/other-model");
    assert_eq!(o.status.code(), Some(6), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("local hub cache") && err.contains("hf download acme/other-model"), "{err}");
}
