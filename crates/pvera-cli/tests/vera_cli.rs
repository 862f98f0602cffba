//! VeRA adapters through the binary (issue 17): `train --method vera` writes a PEFT VeRA adapter
//! that every command takes (inspect, infer, merge, predict, eval in mean mode), and the sampling
//! flags are refused by name (exit 2).

use std::path::Path;

mod common;
use common::{fixtures, pvera, s, show, tiny_bert, train_tiny_bert};

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn train_method_vera_and_every_command_on_its_adapter() {
    let t = tiny_bert();
    let o = train_tiny_bert(&t, &["--method", "vera", "--epochs", "2", "--batch-size", "3", "--lr", "1e-2", "--threads", "1"]);
    assert!(o.status.success(), "{}", show(&o));
    let best = t.out.join("best");
    let cfg = json(&best.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "VERA");
    assert_eq!(cfg["vera_dropout"], 0.0);
    assert!(cfg.get("sample_at_inference").is_none() && cfg.get("pvera_dropout").is_none(), "{cfg}");
    assert_eq!(json(&t.out.join("metrics.json"))["method"], "VeRA");
    let (ts, _) = pvera::checkpoint::read_safetensors(&best.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(ts.contains_key("base_model.vera_A") && ts.contains_key("base_model.vera_B"));
    assert_eq!(ts["base_model.vera_A"].tensor.dims(), [8, 32], "VeRA's A is (r, in)");
    let lambdas: Vec<&String> = ts.keys().filter(|k| k.contains("lambda")).collect();
    assert!(!lambdas.is_empty() && lambdas.iter().all(|k| k.contains(".vera_lambda_")), "{lambdas:?}");

    // inspect: clean, the projections are the key's.
    let o = pvera(&["inspect", s(&best), "--verify-projections", "--json"]);
    assert!(o.status.success(), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["method"], "VeRA");
    assert_eq!(v["verify_projections"]["identical"], true, "{v}");
    let o = pvera(&["inspect", s(&best), "--verify-projections"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("IDENTICAL"), "{}", show(&o));

    // predict: mean mode by default; every sampling flag refused by name.
    let base = ["predict", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&best)];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        pvera(&a)
    };
    let o = run(&["free money", "the meeting notes"]);
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("mean mode") && out.contains("2 input(s)"), "{out}");
    let o = run(&["--json", "free money"]);
    assert!(o.status.success(), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["samples"], 1);
    let o = run(&["--samples", "1", "free money"]);
    assert!(o.status.success(), "{}", show(&o));
    for (flags, named) in [
        (&["--samples", "4"][..], "--samples 4"),
        (&["--sequential"][..], "--sequential"),
        (&["--sample-from-config"][..], "--sample-from-config"),
        (&["--sample-modules", "query"][..], "--sample-modules"),
    ] {
        let mut a = flags.to_vec();
        a.push("free money");
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", show(&o));
        let e = stderr(&o);
        assert!(e.contains(named) && e.contains("VeRA"), "{flags:?}: {e}");
    }

    // eval: the mean-mode figures; the Monte Carlo ones null.
    let ev = t.tmp.path().join("ev");
    let ood = t.tmp.path().join("ood.txt");
    std::fs::write(&ood, "qwerty uiop\nasdf ghjkl\nzxcv bnm\n").unwrap();
    let o = pvera(&[
        "eval", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&best), "--data", s(&t.data),
        "--ood", s(&ood), "--bins", "5", "--output", s(&ev),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let r = json(&ev.join("eval.json"));
    assert_eq!(r["method"], "VeRA");
    assert_eq!(r["samples"], 1);
    assert!(r["monte_carlo"].is_null() && r["monte_carlo_extra"].is_null(), "{r}");
    assert!((0.0..=1.0).contains(&r["mean_mode"]["accuracy"].as_f64().unwrap()));
    assert_eq!(r["per_example"].as_array().unwrap().len(), 8);
    let auroc = r["ood"][0]["auroc"].as_object().unwrap();
    assert!(auroc.contains_key("mean_mode_msp") && auroc.keys().all(|k| k.starts_with("mean_mode")), "{auroc:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("mean mode only"), "{}", show(&o));
    assert!(ev.join("reliability.svg").is_file());
    let o = pvera(&[
        "eval", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&best), "--data", s(&t.data),
        "--samples", "8", "--output", s(&t.tmp.path().join("ev2")),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));

    // infer (mean), --sample refused; merge writes a model transformers loads.
    let inputs = t.tmp.path().join("inputs.safetensors");
    let dev = candle_core::Device::Cpu;
    let ids = candle_core::Tensor::new(&[[2i64, 10, 11, 12, 3]], &dev).unwrap();
    let map = std::collections::HashMap::from([("input_ids".to_string(), ids)]);
    candle_core::safetensors::save(&map, &inputs).unwrap();
    let y = t.tmp.path().join("y.safetensors");
    let o = pvera(&["infer", "--model", s(&t.model), "--adapter", s(&best), "--inputs", s(&inputs), "--output", s(&y)]);
    assert!(o.status.success() && y.is_file(), "{}", show(&o));
    let o = pvera(&["infer", "--model", s(&t.model), "--adapter", s(&best), "--inputs", s(&inputs), "--output", s(&y), "--sample"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(stderr(&o).contains("--sample") && stderr(&o).contains("VeRA"), "{}", show(&o));
    let merged = t.tmp.path().join("merged");
    let o = pvera(&["merge", "--model", s(&t.model), "--adapter", s(&best), "--output", s(&merged)]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(merged.join("model.safetensors").is_file());
}

#[test]
fn train_method_vera_refuses_the_kl_weight_by_name() {
    let t = tiny_bert();
    let o = train_tiny_bert(&t, &["--method", "vera", "--kl-weight", "0.1"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(stderr(&o).contains("--kl-weight") && stderr(&o).contains("VeRA"), "{}", show(&o));
    assert!(!t.out.exists(), "a run that cannot start writes nothing");
    let o = train_tiny_bert(&t, &["--method", "lora"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
}

/// PEFT's VeRA table has no DINOv2 entry: `train --method vera` writes query,value into the config.
#[test]
fn train_method_vera_on_dinov2_writes_its_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let model = fixtures().join("models/dinov2_task/model");
    let images = fixtures().join("data/images");
    let o = pvera(&[
        "train", "--method", "vera", "--model", s(&model), "--data", s(&images), "--task", "image-classification",
        "--output", s(&out), "--epochs", "1", "--batch-size", "4", "--r", "4", "--val-fraction", "0",
        "--threads", "1",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let cfg = json(&out.join("best/adapter_config.json"));
    assert_eq!(cfg["peft_type"], "VERA");
    assert_eq!(cfg["target_modules"], serde_json::json!(["query", "value"]));
}
