//! Smoke test of `pvera bench` on the tiny BERT fixture (benchmarks themselves are not tests).

use std::path::PathBuf;
use std::process::Command;

fn tiny_bert() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pvera/tests/fixtures/models/bert_tiny")
}

#[test]
fn bench_runs_every_measurement_on_a_fixture_and_writes_json() {
    let dir = tiny_bert();
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_pvera"))
        .args(["bench", "--model"])
        .arg(dir.join("model"))
        .args(["--batch", "2", "--seq", "8", "--r", "4", "--reps", "2", "--warmup", "0"])
        .args(["--mc-samples", "3", "--mc-batch", "2", "--gemm-size", "64", "--threads", "1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for row in ["eval forward (mean, unmerged)", "eval forward (merged)", "training step", "MC prediction, 3 samples", "fp32 GEMM"] {
        assert!(stdout.contains(row), "missing {row:?} in\n{stdout}");
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in ["eval", "merged", "train", "mc", "gemm"] {
        let times = v["times_ms"][key].as_array().unwrap_or_else(|| panic!("no {key} in {v}"));
        assert!(times.len() >= 2 && times.iter().all(|t| t.as_f64().unwrap() > 0.0), "{key}: {times:?}");
    }
    // 2 examples x 8 tokens through 2 layers of width 32: a positive, adapter-inclusive count.
    assert!(v["flops_forward_unmerged"].as_f64().unwrap() > v["flops_forward_base"].as_f64().unwrap());
    assert_eq!(v["threads"], 1);
}

#[test]
fn bench_cold_start_loads_the_fixture_adapter_and_predicts_once() {
    let dir = tiny_bert();
    let out = Command::new(env!("CARGO_BIN_EXE_pvera"))
        .args(["bench", "--cold", "--model"])
        .arg(dir.join("model"))
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .args(["--batch", "2", "--seq", "8"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let probs: Vec<f64> = stdout
        .trim()
        .strip_prefix("cold prediction: [")
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or_else(|| panic!("unexpected output {stdout:?}"))
        .split(',')
        .map(|x| x.trim().parse().unwrap())
        .collect();
    assert_eq!(probs.len(), 2, "one example, two labels");
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{probs:?}");
}

#[test]
fn bench_refuses_an_unknown_measurement() {
    let dir = tiny_bert();
    let out = Command::new(env!("CARGO_BIN_EXE_pvera"))
        .args(["bench", "--what", "eval,speed", "--batch", "1", "--seq", "4", "--model"])
        .arg(dir.join("model"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--what \"speed\""));
}
