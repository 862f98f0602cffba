//! `pvera train` end to end on the committed tiny fixtures (no network).

use std::path::Path;

mod common;
use common::{fixtures, pvera, s, show, spam_jsonl, tiny_bert, train_tiny_bert};

fn check_outputs(out: &Path, epochs: usize) {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["epochs"].as_array().unwrap().len(), epochs, "{m}");
    assert!(m["epochs"][0]["train_loss"].as_f64().unwrap().is_finite());
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), epochs + 1);
    assert!(lines[0].starts_with("epoch,step,train_loss"));
    assert_eq!(lines[1].split(',').count(), lines[0].split(',').count());
    let svg = std::fs::read_to_string(out.join("training_curve.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("<polyline"));
    for d in ["best", "last"] {
        assert!(out.join(d).join("adapter_config.json").is_file(), "{d}");
        assert!(out.join(d).join("adapter_model.safetensors").is_file(), "{d}");
    }
}

#[test]
fn text_classification_on_tiny_bert() {
    let t = tiny_bert();
    let (tmp, data, out, model) = (&t.tmp, &t.data, &t.out, &t.model);
    let o = train_tiny_bert(&t, &["--epochs", "2", "--batch-size", "3", "--lr", "1e-2", "--eval-data", s(data), "--threads", "1"]);
    assert!(o.status.success(), "{}", show(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("trainable params:"), "{stdout}");
    assert!(stdout.contains("eval (best adapter"), "{stdout}");
    assert!(stdout.contains("predictions:"), "{stdout}");
    check_outputs(&out, 2);
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let acc = m["eval"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));

    // best/ is a PEFT adapter the other commands read.
    let best = out.join("best");
    let o = pvera(&["inspect", s(&best), "--verify-projections"]);
    assert!(o.status.success(), "{}", show(&o));
    let inputs = tmp.path().join("inputs.safetensors");
    let dev = candle_core::Device::Cpu;
    let ids = candle_core::Tensor::new(&[[2i64, 10, 11, 12, 3]], &dev).unwrap();
    let mask = candle_core::Tensor::new(&[[1i64, 1, 1, 1, 1]], &dev).unwrap();
    let map = std::collections::HashMap::from([("input_ids".to_string(), ids), ("attention_mask".to_string(), mask)]);
    candle_core::safetensors::save(&map, &inputs).unwrap();
    let y = tmp.path().join("y.safetensors");
    let o = pvera(&["infer", "--model", s(&model), "--adapter", s(&best), "--inputs", s(&inputs), "--output", s(&y)]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(y.is_file());

    // Resume: one more epoch from last/.
    let last = out.join("last");
    let o = train_tiny_bert(&t, &["--epochs", "3", "--batch-size", "3", "--lr", "1e-2", "--resume", s(&last)]);
    assert!(o.status.success(), "{}", show(&o));
    check_outputs(&out, 3);
}

#[test]
fn causal_lm_on_tiny_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let model = fixtures().join("models/llama_causal/model");
    let tok = fixtures().join("data/tokenizer.json"); // 73 tokens < the fixture's vocabulary of 100
    let text = tmp.path().join("lm.txt");
    let base = std::fs::read_to_string(fixtures().join("data/text/lm.txt")).unwrap();
    std::fs::write(&text, base.repeat(4)).unwrap();
    let o = pvera(&[
        "train", "--model", s(&model), "--tokenizer", s(&tok), "--data", s(&text), "--task", "causal-lm",
        "--output", s(&out), "--epochs", "2", "--batch-size", "2", "--r", "8", "--max-length", "8",
        "--eval-data", s(&text),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("perplexity"));
    check_outputs(&out, 2);
}

#[test]
fn image_classification_on_tiny_vit_and_dinov2() {
    for m in ["vit_task", "dinov2_task"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let model = fixtures().join("models").join(m).join("model");
        let images = fixtures().join("data/images");
        let o = pvera(&[
            "train", "--model", s(&model), "--data", s(&images), "--task", "image-classification", "--output",
            s(&out), "--epochs", "2", "--batch-size", "2", "--r", "8", "--val-fraction", "0.3", "--target-modules",
            "query,value", "--eval-data",
            s(&images),
        ]);
        assert!(o.status.success(), "{m}: {}", show(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("3 classes: bird, cat, dog"), "{stdout}");
        assert!(stdout.contains(".png") || stdout.contains(".jpg"), "{stdout}");
        check_outputs(&out, 2);
    }
}

#[test]
fn bad_flags_and_data_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = spam_jsonl(tmp.path());
    let out = tmp.path().join("out");
    let bert = fixtures().join("models/bert_tiny/model");
    let tok = fixtures().join("data/tokenizer.json");
    let base = |extra: &[&str]| {
        let mut v = vec!["train", "--model", s(&bert), "--tokenizer", s(&tok), "--data", s(&data), "--output", s(&out)];
        v.extend_from_slice(extra);
        pvera(&v)
    };
    // Unknown task value: clap, exit 2.
    let o = base(&["--task", "translation"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    // Task that does not fit the model.
    let o = base(&["--task", "causal-lm"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("llama or gpt2"), "{}", show(&o));
    // Bad schedule and pooling.
    let o = base(&["--task", "text-classification", "--schedule", "triangle"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let o = base(&["--task", "text-classification", "--pooling", "max"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    // --train-size larger than the data.
    let o = base(&["--task", "text-classification", "--train-size", "1000"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("only 8"), "{}", show(&o));
    // Missing data file: file system error.
    let o = pvera(&[
        "train", "--model", s(&bert), "--tokenizer", s(&tok), "--data", "/nonexistent/x.jsonl", "--task",
        "text-classification", "--output", s(&out),
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", show(&o));
    // Invalid adapter option: a bad flag value (2, naming the flag), not a bad adapter_config.json
    // file (4) (issue 16 row 10).
    let o = base(&["--task", "text-classification", "--bias", "some"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--bias"), "{}", show(&o));
    // Non-finite loss: exit 8 with the library's message.
    let o = base(&["--task", "text-classification", "--lr", "1e30", "--epochs", "3", "--r", "8"]);
    assert_eq!(o.status.code(), Some(8), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("non-finite") && err.contains("training stopped in epoch 1"), "{}", show(&o));
}
