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
        let (a, b) = pvera::projection::generate_raw(0, 4, 20, 20, pvera::TorchKernel::Default);
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
