//! Bad adapter files end in clear, typed errors (or explicit warnings), never a panic, and a
//! failed save never destroys the adapter already on disk.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint::{self, PROJ_A_KEY, PROJ_B_KEY};
use pvera::{Error, PeftModel, PveraConfig};

use crate::common::*;

fn mlp() -> (TestModel, pvera::Registry, pvera::ModelInfo) {
    build_base_from(&fixtures().join("peft/mlp_list/base_model.safetensors"), DType::F32, false)
}

/// A copy of the `mlp_list` PEFT adapter in a temp dir, with `edit` applied to its tensors and
/// `cfg_edit` to its config JSON.
fn edited(
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
    cfg_edit: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let src = fixtures().join("peft/mlp_list/adapter");
    let tmp = tempfile::tempdir().unwrap();
    let (ts, _) = checkpoint::read_safetensors(&src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut ts: BTreeMap<String, Tensor> = ts.into_iter().map(|(k, v)| (k, v.tensor)).collect();
    edit(&mut ts);
    let bytes = checkpoint::serialize_safetensors(&ts, Some(checkpoint::pt_metadata())).unwrap();
    std::fs::write(tmp.path().join("adapter_model.safetensors"), bytes).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    cfg_edit(&mut cfg);
    std::fs::write(tmp.path().join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    tmp
}

fn load(dir: &Path) -> Result<PeftModel<TestModel>, Error> {
    let (m, reg, info) = mlp();
    PeftModel::from_pretrained(m, reg, info, dir, "default", false)
}

#[test]
fn missing_projection_a_with_save_projection_is_peft_error() {
    let d = edited(|t| {
        t.remove(PROJ_A_KEY);
        t.remove(PROJ_B_KEY);
    }, |_| {});
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    assert!(e.to_string().contains("Specified to load pvera_A and pvera_B from state dictionary however they were not present"), "{e}");
}

#[test]
fn missing_b_is_checked_against_regenerated_projections() {
    // A equals the PRNG one: warn and use the regenerated B (PEFT silently does the same).
    let d = edited(|t| {
        t.remove(PROJ_B_KEY);
    }, |_| {});
    let mut pm = load(d.path()).unwrap();
    assert!(pm.take_warnings().iter().any(|w| w.contains("pvera_B is missing")));
    // A perturbed: B cannot be trusted: error (PEFT would load silently).
    let d = edited(|t| {
        t.remove(PROJ_B_KEY);
        let a = t.get_mut(PROJ_A_KEY).unwrap();
        *a = (&*a * 2.0).unwrap();
    }, |_| {});
    let e = load(d.path()).unwrap_err().to_string();
    assert!(e.contains("cannot be recovered"), "{e}");
}

#[test]
fn projections_present_but_save_projection_false_are_used_with_a_warning() {
    let d = edited(|t| {
        let a = t.get_mut(PROJ_A_KEY).unwrap();
        *a = (&*a + 0.5).unwrap();
    }, |c| c["save_projection"] = serde_json::json!(false));
    let mut pm = load(d.path()).unwrap();
    let w = pm.take_warnings();
    assert!(w.iter().any(|w| w.contains("PEFT would ignore them")), "{w:?}");
    let (ts, _) = checkpoint::read_safetensors(&d.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(bits_equal(pm.adapter("default").unwrap().projections.a(), &ts[PROJ_A_KEY].tensor));
}

#[test]
fn shape_mismatches_name_the_key_and_the_expectation() {
    let d = edited(|t| {
        t.insert("base_model.model.lin0.pvera_lambda_b".into(), Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap());
    }, |_| {});
    match load(d.path()).unwrap_err() {
        Error::ShapeMismatch { key, got, expected, .. } => {
            assert_eq!(key, "base_model.model.lin0.pvera_lambda_b");
            assert_eq!(got, vec![7]);
            assert_eq!(expected, "[20]");
        }
        e => panic!("{e:?}"),
    }
    let d = edited(|t| {
        t.insert(PROJ_A_KEY.into(), Tensor::zeros((8, 7), DType::F32, &Device::Cpu).unwrap());
    }, |_| {});
    let e = load(d.path()).unwrap_err();
    assert!(matches!(&e, Error::ShapeMismatch { key, .. } if key == PROJ_A_KEY), "{e:?}");
}

#[test]
fn missing_and_foreign_lambdas_are_errors() {
    let d = edited(|t| {
        t.remove("base_model.model.lin3.pvera_lambda_d");
    }, |_| {});
    let e = load(d.path()).unwrap_err();
    assert!(matches!(&e, Error::MissingTensor { key, .. } if key.contains("lin3.pvera_lambda_d")), "{e:?}");

    let d = edited(|t| {
        let lb = t.remove("base_model.model.lin0.pvera_lambda_b").unwrap();
        let ld = t.remove("base_model.model.lin0.pvera_lambda_d").unwrap();
        t.insert("base_model.model.encoder.layer.0.attention.attention.query.pvera_lambda_b".into(), lb);
        t.insert("base_model.model.encoder.layer.0.attention.attention.query.pvera_lambda_d".into(), ld);
    }, |_| {});
    assert!(load(d.path()).is_err());
}

#[test]
fn non_finite_lambdas_are_refused() {
    let d = edited(|t| {
        t.insert("base_model.model.lin0.pvera_lambda_b".into(), Tensor::full(f32::NAN, 20, &Device::Cpu).unwrap());
    }, |_| {});
    let e = load(d.path()).unwrap_err();
    assert!(matches!(&e, Error::NonFinite { count: 20, .. }), "{e:?}");
}

#[test]
fn corrupt_safetensors_and_configs_give_typed_errors() {
    let d = edited(|_| {}, |_| {});
    let p = d.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    // Truncated.
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(load(d.path()).unwrap_err(), Error::Safetensors { .. }));
    // Header length past the end.
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    assert!(matches!(load(d.path()).unwrap_err(), Error::Safetensors { .. }));
    // Empty file.
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(load(d.path()).unwrap_err(), Error::Safetensors { .. }));
    std::fs::write(&p, &bytes).unwrap();
    // Config: malformed JSON.
    let c = d.path().join("adapter_config.json");
    let good = std::fs::read_to_string(&c).unwrap();
    std::fs::write(&c, &good[..good.len() / 2]).unwrap();
    assert!(matches!(load(d.path()).unwrap_err(), Error::ConfigParse { .. }));
    std::fs::write(&c, good).unwrap();
    assert!(load(d.path()).is_ok());
    // Missing directory.
    assert!(matches!(load(&d.path().join("nope")).unwrap_err(), Error::Io { .. }));
}

#[test]
fn failed_save_keeps_the_previous_adapter() {
    let (m, reg, info) = mlp();
    let pm = PeftModel::from_pretrained(m, reg, info, &fixtures().join("peft/mlp_list/adapter"), "default", false).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path(), None).unwrap();
    let before = std::fs::read(tmp.path().join("adapter_model.safetensors")).unwrap();
    // Make the weights file's directory entry un-replaceable: a directory with the temp name's
    // parent made read-only simulates a failing disk.
    let sub = tmp.path().join("ro");
    std::fs::create_dir(&sub).unwrap();
    std::fs::copy(tmp.path().join("adapter_model.safetensors"), sub.join("adapter_model.safetensors")).unwrap();
    std::fs::copy(tmp.path().join("adapter_config.json"), sub.join("adapter_config.json")).unwrap();
    // Writing to a path whose parent is a file fails before touching the good copy.
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    assert!(pm.save_pretrained(&blocker.join("inner"), None).is_err());
    assert_eq!(std::fs::read(tmp.path().join("adapter_model.safetensors")).unwrap(), before);
    // No temp files are left behind after a successful save.
    pm.save_pretrained(tmp.path(), None).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn no_target_matched_names_the_known_layers() {
    let (m, reg, info) = mlp();
    let cfg = PveraConfig {
        target_modules: Some(pvera::config::TargetModules::List(vec!["proj".into()])),
        r: 4,
        ..Default::default()
    };
    let e = PeftModel::new(m, reg, info, cfg, "default").unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, Error::NoTargetMatched { .. }));
    assert!(s.contains("No layers types compatible with PVeRA were found") && s.contains("lin0"), "{s}");
    // Custom models have no default targets.
    let (m, reg, info) = mlp();
    let e = PeftModel::new(m, reg, info, PveraConfig { r: 4, ..Default::default() }, "default").unwrap_err();
    assert!(e.to_string().contains("Please specify `target_modules`"), "{e}");
}
