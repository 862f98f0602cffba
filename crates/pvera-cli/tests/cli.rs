//! The `pvera` binary's public contract: output, JSON and exit codes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use pvera::checkpoint;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pvera/tests/fixtures/peft").join(case)
}

fn pvera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pvera")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_with(src: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let (ts, _) = checkpoint::read_safetensors(&src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut ts: BTreeMap<String, Tensor> = ts.into_iter().map(|(k, v)| (k, v.tensor)).collect();
    edit(&mut ts);
    let bytes = checkpoint::serialize_safetensors(&ts, Some(checkpoint::pt_metadata())).unwrap();
    std::fs::write(tmp.path().join("adapter_model.safetensors"), bytes).unwrap();
    std::fs::copy(src.join("adapter_config.json"), tmp.path().join("adapter_config.json")).unwrap();
    tmp
}

#[test]
fn inspect_prints_config_tensors_and_counts() {
    let dir = fixture("mlp_list/adapter");
    let (code, out, err) = pvera(&["inspect", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("base_model.model.lin0.pvera_lambda_b"), "{out}");
    assert!(out.contains("base_model.pvera_A"));
    assert!(out.contains("\"PVERA\""));
    // λ_b (20 + 2) + λ_d (8 + 8) = 38 trainable parameters.
    assert!(out.contains("trainable params: 38"), "{out}");
    let (code, out, _) = pvera(&["inspect", dir.to_str().unwrap(), "--base-params", "1102"]);
    assert_eq!(code, 0);
    assert!(out.contains("trainable params: 38 || all params: 1,140 || trainable%: 3.3333"), "{out}");
}

#[test]
fn inspect_json_is_machine_readable_and_lists_named_adapters() {
    let dir = fixture("mlp_two_adapters/adapter");
    let (code, out, err) = pvera(&["inspect", dir.to_str().unwrap(), "--json", "--verify-projections"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let adapters = v["adapters"].as_array().unwrap();
    assert_eq!(adapters.len(), 2, "default and other/");
    for a in adapters {
        assert_eq!(a["verify_projections"]["identical"], true);
        assert_eq!(a["config"]["r"], 4);
    }
}

#[test]
fn verify_projections_exit_codes() {
    // PEFT-written projections regenerate bit for bit.
    let (code, out, _) = pvera(&["inspect", fixture("mlp_key_nonzero/adapter").to_str().unwrap(), "--verify-projections"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("IDENTICAL"), "{out}");
    // One flipped bit: exit 3, with the count.
    let tmp = copy_with(&fixture("mlp_list/adapter"), |t| {
        let a = t.get_mut("base_model.pvera_A").unwrap();
        let mut v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        v[5] = f32::from_bits(v[5].to_bits() ^ 1);
        *a = Tensor::from_vec(v, a.dims(), &Device::Cpu).unwrap();
    });
    let (code, out, _) = pvera(&["inspect", tmp.path().to_str().unwrap(), "--verify-projections"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("DIFFERENT: 1 of 240 elements differ"), "{out}");
    // Projections drawn with torch's two-rounding (no-AVX2) kernel are recognised as such.
    let tmp = copy_with(&fixture("mlp_list/adapter"), |t| {
        let (a, b) = pvera::projection::generate_raw(pvera::Method::Pvera, 0, 4, 20, 20, pvera::TorchKernel::Default);
        t.insert("base_model.pvera_A".into(), Tensor::from_vec(a, (8, 20), &Device::Cpu).unwrap());
        t.insert("base_model.pvera_B".into(), Tensor::from_vec(b, (20, 4), &Device::Cpu).unwrap());
    });
    let (code, out, _) = pvera(&["inspect", tmp.path().to_str().unwrap(), "--verify-projections"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("two-rounding"), "{out}");
    // Nothing stored: nothing to compare.
    let (code, out, _) = pvera(&["inspect", fixture("mlp_no_projection/adapter").to_str().unwrap(), "--verify-projections"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to compare"), "{out}");
}

#[test]
fn bad_input_maps_to_distinct_exit_codes() {
    let (code, _, err) = pvera(&["inspect", "/nonexistent/adapter"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("/nonexistent/adapter"), "{err}");
    let tmp = copy_with(&fixture("mlp_list/adapter"), |_| {});
    std::fs::write(tmp.path().join("adapter_config.json"), "{\"r\": 4, \"peft_type\": \"LORA\"}").unwrap();
    let (code, _, err) = pvera(&["inspect", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 4, "{err}");
    let tmp = copy_with(&fixture("mlp_list/adapter"), |_| {});
    std::fs::write(tmp.path().join("adapter_model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let (code, _, err) = pvera(&["inspect", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 5, "{err}");
    let (code, _, _) = pvera(&["inspect"]);
    assert_eq!(code, 2);
}

fn model_case(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pvera/tests/fixtures/models").join(case)
}

/// Writes the text inputs of a model fixture to a standalone inputs file.
fn text_inputs(case: &Path, dir: &Path) -> PathBuf {
    let (io, _) = checkpoint::read_safetensors(&case.join("io.safetensors"), &Device::Cpu).unwrap();
    let mut ts = BTreeMap::new();
    for k in ["input_ids", "attention_mask", "token_type_ids"] {
        if let Some(t) = io.get(k) {
            ts.insert(k.to_string(), t.tensor.clone());
        }
    }
    let p = dir.join("inputs.safetensors");
    std::fs::write(&p, checkpoint::serialize_safetensors(&ts, None).unwrap()).unwrap();
    p
}

fn read_out(p: &Path) -> BTreeMap<String, Tensor> {
    checkpoint::read_safetensors(p, &Device::Cpu).unwrap().0.into_iter().map(|(k, v)| (k, v.tensor)).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn infer_reproduces_transformers_and_peft_and_merge_writes_a_loadable_model() {
    let case = model_case("bert_tiny");
    let (io, _) = checkpoint::read_safetensors(&case.join("io.safetensors"), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = text_inputs(&case, tmp.path());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = s(&case.join("model"));
    let adapter = s(&case.join("adapter"));
    // Base model, adapter (mean path), adapter merged.
    for (extra, want) in [
        (vec![], "base.last_hidden_state"),
        (vec!["--adapter", adapter.as_str()], "eval.last_hidden_state"),
        (vec!["--adapter", adapter.as_str(), "--merge"], "merged.last_hidden_state"),
    ] {
        let out = tmp.path().join("out.safetensors");
        let mut args = vec!["infer", "--model", model.as_str(), "--inputs", inputs.to_str().unwrap(), "--output", out.to_str().unwrap()];
        args.extend(extra.iter().copied());
        let (code, _, err) = pvera(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let got = read_out(&out);
        let d = max_diff(&got["last_hidden_state"], &io[want].tensor);
        assert!(d < 1e-5, "{want}: max abs diff {d}");
        assert!(got.contains_key("pooler_output"));
    }
    // pvera merge writes a model dir that infers like the unmerged adapter.
    let merged = tmp.path().join("merged");
    let (code, _, err) = pvera(&["merge", "--model", &model, "--adapter", &adapter, "--output", merged.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(merged.join("config.json").is_file());
    let out = tmp.path().join("out_merged.safetensors");
    let (code, _, err) = pvera(&["infer", "--model", merged.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let d = max_diff(&read_out(&out)["last_hidden_state"], &io["eval.last_hidden_state"].tensor);
    assert!(d < 1e-5, "merged model dir: max abs diff {d}");
}

#[test]
fn infer_names_the_bad_input_tensor() {
    let case = model_case("bert_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let model = case.join("model");
    let run = |ts: BTreeMap<String, Tensor>| {
        let p = tmp.path().join("bad.safetensors");
        std::fs::write(&p, checkpoint::serialize_safetensors(&ts, None).unwrap()).unwrap();
        pvera(&["infer", "--model", model.to_str().unwrap(), "--inputs", p.to_str().unwrap(), "--output", tmp.path().join("o.safetensors").to_str().unwrap()])
    };
    let ids = Tensor::zeros((2, 4), candle_core::DType::I64, &Device::Cpu).unwrap();
    let (code, _, err) = run(BTreeMap::from([("inputs_ids".to_string(), ids.clone())]));
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("inputs_ids"), "{err}");
    let (code, _, err) = run(BTreeMap::from([("input_ids".to_string(), ids.to_dtype(candle_core::DType::F32).unwrap())]));
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("dtype"), "{err}");
    let (code, _, err) = run(BTreeMap::from([
        ("input_ids".to_string(), ids.clone()),
        ("attention_mask".to_string(), Tensor::zeros((2, 5), candle_core::DType::I64, &Device::Cpu).unwrap()),
    ]));
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("attention_mask"), "{err}");
    // A model directory without config.json.
    let (code, _, err) = pvera(&["infer", "--model", tmp.path().to_str().unwrap(), "--inputs", "x", "--output", "y"]);
    assert_ne!(code, 0);
    assert!(err.contains("config.json"), "{err}");
}
