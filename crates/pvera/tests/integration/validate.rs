//! `pvera::validate`: every load check that needs no model, with all problems listed, and the
//! same errors and warnings as the loader (`PeftModel::from_pretrained`) where the check is the
//! same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint::{self, PROJ_A_KEY, PROJ_B_KEY};
use pvera::models::loader::ModelDir;
use pvera::validate::{self, validate_adapter_dir, validate_with_model, AdapterReport, Problem, Severity};
use pvera::{Error, PeftModel};
use serde_json::Value;

use crate::common::*;

const LIN0_B: &str = "base_model.model.lin0.pvera_lambda_b";
const LIN0_D: &str = "base_model.model.lin0.pvera_lambda_d";
const LIN3_D: &str = "base_model.model.lin3.pvera_lambda_d";

/// A copy of a fixture adapter directory; `tensors` and `config` edit its two files.
struct Copy {
    dir: tempfile::TempDir,
}

impl Copy {
    fn of(src: &Path) -> Copy {
        let dir = tempfile::tempdir().unwrap();
        for f in [checkpoint::CONFIG_NAME, checkpoint::WEIGHTS_NAME] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        Copy { dir }
    }
    fn mlp() -> Copy {
        Copy::of(&fixtures().join("peft/mlp_list/adapter"))
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn weights(&self) -> PathBuf {
        self.path().join(checkpoint::WEIGHTS_NAME)
    }
    fn tensors(self, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> Copy {
        let (ts, _) = checkpoint::read_safetensors(&self.weights(), &Device::Cpu).unwrap();
        let mut ts: BTreeMap<String, Tensor> = ts.into_iter().map(|(k, v)| (k, v.tensor)).collect();
        edit(&mut ts);
        std::fs::write(self.weights(), checkpoint::serialize_safetensors(&ts, Some(checkpoint::pt_metadata())).unwrap())
            .unwrap();
        self
    }
    fn config(self, edit: impl FnOnce(&mut Value)) -> Copy {
        let p = self.path().join(checkpoint::CONFIG_NAME);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        self
    }
    fn report(&self) -> AdapterReport {
        validate_adapter_dir(self.path())
    }
    /// The loader's verdict on the MLP test model of `mlp_list`.
    fn load(&self) -> Result<Vec<String>, Error> {
        let (m, reg, info) = build_base_from(&fixtures().join("peft/mlp_list/base_model.safetensors"), DType::F32, false);
        let mut pm = PeftModel::from_pretrained(m, reg, info, self.path(), "default", false)?;
        Ok(pm.take_warnings())
    }
}

/// The file with `key`'s dtype renamed in the header (an F32 tensor; I32 keeps the sizes valid).
fn with_dtype(mut bytes: Vec<u8>, key: &str, dtype: &str) -> Vec<u8> {
    let entry = format!("\"{key}\":{{\"dtype\":\"F32\"");
    let at = bytes.windows(entry.len()).position(|w| w == entry.as_bytes()).unwrap() + entry.len() - 4;
    bytes[at..at + 3].copy_from_slice(dtype.as_bytes());
    bytes
}

fn f32s(v: Vec<f32>) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn summary(r: &AdapterReport) -> Vec<(Severity, &'static str, String)> {
    r.problems.iter().map(|p| (p.severity(), p.class(), p.message())).collect()
}

fn errors(r: &AdapterReport) -> Vec<&Error> {
    r.problems.iter().filter_map(|p| if let Problem::Error(e) = p { Some(e) } else { None }).collect()
}

/// Every adapter directory among the fixtures (PEFT-written, or written by pvera and read back by
/// PEFT), including the named sub-adapters.
fn fixture_adapters() -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                if p.join(checkpoint::CONFIG_NAME).is_file() && p.join(checkpoint::WEIGHTS_NAME).is_file() {
                    out.push(p.clone());
                }
                walk(&p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&fixtures(), &mut out);
    out.sort();
    out
}

#[test]
fn every_fixture_adapter_is_clean() {
    let dirs = fixture_adapters();
    assert!(dirs.len() >= 40, "expected the fixture adapters, found {}", dirs.len());
    let mut bad = Vec::new();
    for d in dirs {
        let r = validate_adapter_dir(&d);
        if !r.problems.is_empty() {
            bad.push(format!("{}: {:?}", d.display(), summary(&r)));
        }
        assert!(r.config.is_some() && !r.tensors.is_empty());
        // PEFT drew them on an AVX2 CPU; half-precision models store them rounded to their dtype.
        let name = d.display().to_string();
        let want = if name.contains("bf16") { Some("BF16") } else if name.contains("f16") || name.contains("fp16") { Some("F16") } else { None };
        match r.projections {
            Some(c) => assert_eq!((c.differ_fma_kernel == 0, c.rounded_to), (want.is_none(), want), "{name}"),
            None => assert!(name.contains("no_projection"), "{name}"),
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn missing_directory_config_and_weights_are_file_system_errors() {
    let r = validate_adapter_dir(Path::new("/nonexistent/adapter"));
    assert!(matches!(&errors(&r)[..], [Error::Io { .. }]), "{:?}", summary(&r));
    assert!(r.problems[0].message().contains("/nonexistent/adapter: adapter directory not found"));
    // An empty directory: both files named, config first (the loader reads it first).
    let tmp = tempfile::tempdir().unwrap();
    let r = validate_adapter_dir(tmp.path());
    let msgs: Vec<String> = r.problems.iter().map(Problem::message).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(msgs[0].contains("adapter_config.json") && msgs[1].contains("adapter_model.safetensors"), "{msgs:?}");
    assert!(!r.would_load());
}

#[test]
fn several_problems_are_listed_in_the_loaders_order() {
    // r = 0, a NaN in λ_b, a λ_d without λ_b and a stray tensor: all four reported; the first is
    // the config error the loader stops at.
    let c = Copy::mlp()
        .tensors(|t| {
            let mut v = vec![0.1f32; 20];
            v[2] = f32::NAN;
            t.insert(LIN0_B.into(), f32s(v));
            t.remove("base_model.model.lin3.pvera_lambda_b");
            t.insert("base_model.model.extra.running_mean".into(), f32s(vec![0.0; 3]));
        })
        .config(|c| c["r"] = 0.into());
    let r = c.report();
    let classes: Vec<&str> = r.problems.iter().map(Problem::class).collect();
    assert_eq!(classes, ["InvalidConfig", "MissingTensor", "NonFinite", "ForeignTensors"], "{:#?}", summary(&r));
    let loader = c.load().unwrap_err();
    assert_eq!(r.first_error().unwrap().to_string(), loader.to_string());
    assert!(r.problems[0].message().contains("`r` should be a positive integer value but the value passed is 0"));
    assert!(r.problems[0].message().contains(&c.path().join("adapter_config.json").display().to_string()));
    assert!(r.problems[1].message().contains("lin3.pvera_lambda_b"), "{}", r.problems[1].message());
    assert_eq!(r.problems[3].severity(), Severity::Warning);
}

#[test]
fn errors_equal_the_loaders_where_the_check_is_the_same() {
    let nan = Copy::mlp().tensors(|t| {
        t.insert(LIN0_B.into(), f32s([vec![f32::INFINITY], vec![0.0; 19]].concat()));
    });
    let no_projections = Copy::mlp().tensors(|t| {
        t.remove(PROJ_A_KEY);
        t.remove(PROJ_B_KEY);
    });
    let a_changed_no_b = Copy::mlp().tensors(|t| {
        t.remove(PROJ_B_KEY);
        let a = t.get_mut(PROJ_A_KEY).unwrap();
        *a = (&*a * 2.0).unwrap();
    });
    let bias = Copy::mlp().config(|c| c["bias"] = "some".into());
    let dtype = Copy::mlp();
    std::fs::write(dtype.weights(), with_dtype(std::fs::read(dtype.weights()).unwrap(), LIN0_B, "I32")).unwrap();
    for (name, c, class) in [
        ("non-finite", nan, "NonFinite"),
        ("no projections", no_projections, "MissingTensor"),
        ("A without B, A not regenerable", a_changed_no_b, "MissingTensor"),
        ("unknown bias", bias, "InvalidConfig"),
        ("unsupported dtype", dtype, "DtypeMismatch"),
    ] {
        let r = c.report();
        let e = c.load().unwrap_err();
        assert_eq!(errors(&r).len(), 1, "{name}: {:#?}", summary(&r));
        assert_eq!(r.problems[0].class(), class, "{name}");
        assert_eq!(r.problems[0].message(), e.to_string(), "{name}");
    }
}

#[test]
fn a_missing_b_with_the_regenerated_a_is_the_loaders_warning() {
    let c = Copy::mlp().tensors(|t| drop(t.remove(PROJ_B_KEY)));
    let r = c.report();
    assert!(r.would_load());
    assert_eq!(r.problems.len(), 1, "{:#?}", summary(&r));
    assert_eq!((r.problems[0].severity(), r.problems[0].class()), (Severity::Warning, validate::REGENERATED_B));
    let warnings = c.load().unwrap();
    assert!(warnings.contains(&r.problems[0].message()), "{warnings:?} vs {}", r.problems[0].message());
}

#[test]
fn save_projection_false_needs_no_projections_and_reports_stored_ones_peft_ignores() {
    let c = Copy::mlp()
        .tensors(|t| {
            t.remove(PROJ_A_KEY);
            t.remove(PROJ_B_KEY);
        })
        .config(|c| c["save_projection"] = false.into());
    assert!(c.report().problems.is_empty(), "{:#?}", summary(&c.report()));
    let c = Copy::mlp()
        .tensors(|t| {
            let a = t.get_mut(PROJ_A_KEY).unwrap();
            *a = (&*a + 0.5).unwrap();
        })
        .config(|c| c["save_projection"] = false.into());
    let r = c.report();
    assert_eq!(r.problems.len(), 1, "{:#?}", summary(&r));
    assert_eq!(r.problems[0].class(), validate::STORED_PROJECTIONS_IGNORED_BY_PEFT);
    assert!(c.load().unwrap().contains(&r.problems[0].message()));
}

#[test]
fn stored_projections_not_from_the_key_are_a_note() {
    // Torch's two-rounding kernel: a valid adapter, but save_projection=false would change it.
    let c = Copy::mlp().tensors(|t| {
        let (a, b) = pvera::projection::generate_raw(pvera::Method::Pvera, 0, 4, 20, 20, pvera::TorchKernel::Default);
        t.insert(PROJ_A_KEY.into(), Tensor::from_vec(a, (8, 20), &Device::Cpu).unwrap());
        t.insert(PROJ_B_KEY.into(), Tensor::from_vec(b, (20, 4), &Device::Cpu).unwrap());
    });
    let r = c.report();
    assert!(r.would_load());
    assert_eq!(r.problems.len(), 1);
    assert_eq!((r.problems[0].severity(), r.problems[0].class()), (Severity::Info, validate::PROJECTIONS_NOT_FROM_KEY));
    assert!(r.problems[0].message().contains("two-rounding"), "{}", r.problems[0].message());
    let cmp = r.projections.unwrap();
    assert_eq!(cmp.elements, 8 * 20 + 20 * 4);
    assert!(cmp.differ_fma_kernel > 0);
    assert_eq!(cmp.differ_two_rounding_kernel, 0);
    c.load().unwrap();
}

#[test]
fn shapes_are_checked_against_r_and_each_other() {
    let shape_keys = |r: &AdapterReport| -> Vec<(String, Vec<usize>, String)> {
        errors(r)
            .into_iter()
            .map(|e| match e {
                Error::ShapeMismatch { key, got, expected, .. } => (key.clone(), got.clone(), expected.clone()),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    // λ_d of the wrong length (r = 4: 8 values).
    let r = Copy::mlp().tensors(|t| drop(t.insert(LIN0_D.into(), f32s(vec![0.1; 6])))).report();
    assert_eq!(shape_keys(&r), [(LIN0_D.to_string(), vec![6], "[8]".to_string())]);
    assert!(r.problems[0].message().contains("r=4"), "{}", r.problems[0].message());
    // λ_b longer than B's rows.
    let r = Copy::mlp().tensors(|t| drop(t.insert(LIN0_B.into(), f32s(vec![0.1; 25])))).report();
    assert_eq!(shape_keys(&r), [(LIN0_B.to_string(), vec![25], "at most [20]".to_string())]);
    // The longest λ_b shorter than B's rows: some λ_b is too short (the model decides which).
    let r = Copy::mlp().tensors(|t| drop(t.insert(LIN0_B.into(), f32s(vec![0.1; 7])))).report();
    assert_eq!(shape_keys(&r), [(PROJ_B_KEY.to_string(), vec![20, 4], "[7, 4]".to_string())]);
    // A and B of another rank.
    let r = Copy::mlp()
        .tensors(|t| {
            t.insert(PROJ_A_KEY.into(), Tensor::zeros((6, 20), DType::F32, &Device::Cpu).unwrap());
            t.insert(PROJ_B_KEY.into(), Tensor::zeros((20, 3), DType::F32, &Device::Cpu).unwrap());
        })
        .report();
    assert_eq!(
        shape_keys(&r),
        [
            (PROJ_A_KEY.to_string(), vec![6, 20], "[8, 20]".to_string()),
            (PROJ_B_KEY.to_string(), vec![20, 3], "[20, 4]".to_string()),
        ]
    );
    // A 2-D λ_b.
    let r = Copy::mlp().tensors(|t| drop(t.insert(LIN0_B.into(), Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap()))).report();
    assert!(shape_keys(&r).iter().any(|(k, g, _)| k == LIN0_B && g == &[4, 5]), "{:#?}", summary(&r));
}

#[test]
fn lambda_pairs_must_be_complete() {
    let r = Copy::mlp().tensors(|t| drop(t.remove(LIN3_D))).report();
    assert!(matches!(&errors(&r)[..], [Error::MissingTensor { key, .. }] if key == LIN3_D), "{:#?}", summary(&r));
    // No λ at all.
    let r = Copy::mlp()
        .tensors(|t| t.retain(|k, _| checkpoint::parse_lambda_key(pvera::Method::Pvera, k).is_none()))
        .report();
    assert!(matches!(&errors(&r)[..], [Error::MissingTensor { .. }]), "{:#?}", summary(&r));
    assert!(r.problems[0].message().contains("no λ tensors at all"));
}

#[test]
fn foreign_untargeted_and_integer_tensors_are_warnings() {
    let c = Copy::mlp().tensors(|t| {
        // A λ for a module target_modules ["lin0", "lin3"] cannot select, an unknown tensor, and
        // an integer λ_b.
        t.insert("base_model.model.encoder.layer.0.attention.query.pvera_lambda_b".into(), f32s(vec![0.1; 20]));
        t.insert("base_model.model.encoder.layer.0.attention.query.pvera_lambda_d".into(), f32s(vec![0.1; 8]));
        t.insert("optimizer.step".into(), f32s(vec![3.0]));
        t.insert(LIN0_B.into(), Tensor::ones(20, DType::I64, &Device::Cpu).unwrap());
    });
    let r = c.report();
    assert!(r.would_load(), "{:#?}", summary(&r));
    let classes: Vec<&str> = r.problems.iter().map(Problem::class).collect();
    assert_eq!(classes, [validate::INTEGER_TENSORS, validate::FOREIGN_TENSORS, validate::UNTARGETED_LAMBDAS]);
    assert!(r.problems[1].message().contains("optimizer.step"));
    assert!(r.problems[2].message().contains("encoder.layer.0.attention.query.pvera_lambda_b"));
    // The loader refuses the untargeted λ's on this model: the warning points to --model.
    assert!(matches!(c.load().unwrap_err(), Error::UnexpectedTensors { .. }));
    // The loader keeps foreign tensors as they are, so NaN there is no error (for either).
    let c = Copy::mlp().tensors(|t| drop(t.insert("optimizer.exp_avg".into(), f32s(vec![f32::NAN; 3]))));
    let r = c.report();
    assert!(r.would_load(), "{:#?}", summary(&r));
    c.load().unwrap();
    // modules_to_save parameters and bias entries of the config are not foreign.
    for case in ["mlp_modules_to_save", "mlp_bias_all", "mlp_bias_pvera_only"] {
        let c = Copy::of(&fixtures().join("peft").join(case).join("adapter"));
        assert!(c.report().problems.is_empty(), "{case}");
        // Without the config entry that explains them, they are.
        let c = c.config(|c| {
            c["modules_to_save"] = Value::Null;
            c["bias"] = "none".into();
        });
        let r = c.report();
        assert_eq!(r.problems.iter().map(Problem::class).collect::<Vec<_>>(), [validate::FOREIGN_TENSORS], "{case}");
    }
}

#[test]
fn the_full_load_on_a_model_adds_what_only_the_model_knows() {
    let model = ModelDir::open(&fixtures().join("models/bert_tiny/model")).unwrap();
    let adapter = fixtures().join("models/bert_tiny/adapter");
    let r = validate_with_model(&adapter, &model).unwrap();
    assert!(r.problems.is_empty(), "{:#?}", summary(&r));
    // Targets the model lacks: clean without the model, NoTargetMatched with it.
    let c = Copy::of(&adapter).config(|c| c["target_modules"] = serde_json::json!(["q_lin", "v_lin"]));
    let without = c.report();
    assert!(without.would_load() && without.problems.iter().all(|p| p.severity() != Severity::Error));
    let r = validate_with_model(c.path(), &model).unwrap();
    assert!(matches!(r.first_error(), Some(Error::NoTargetMatched { .. })), "{:#?}", summary(&r));
    // Loading stops at the targets before it reads a tensor: its error comes first, the tensor
    // problem found without the model is still listed.
    let key = "base_model.model.encoder.layer.1.attention.self.value.pvera_lambda_d";
    let c = c.tensors(|t| drop(t.insert(key.into(), f32s(vec![f32::NAN; 8]))));
    let r = validate_with_model(c.path(), &model).unwrap();
    let classes: Vec<&str> = r.problems.iter().map(Problem::class).collect();
    assert_eq!(classes, ["NoTargetMatched", "NonFinite", validate::UNTARGETED_LAMBDAS], "{:#?}", summary(&r));
    // Every λ_b one shorter (B stays consistent with them): only the model sees they do not fit.
    let c = Copy::of(&adapter).tensors(|t| {
        for (k, v) in t.iter_mut() {
            if k.ends_with("pvera_lambda_b") {
                *v = v.narrow(0, 0, 31).unwrap();
            }
        }
        let b = t.get_mut(PROJ_B_KEY).unwrap();
        *b = b.narrow(0, 0, 31).unwrap();
    });
    assert!(!c.report().problems.iter().any(|p| p.class() == "ShapeMismatch"), "{:#?}", summary(&c.report()));
    let r = validate_with_model(c.path(), &model).unwrap();
    match r.first_error() {
        Some(Error::ShapeMismatch { key, got, .. }) => {
            assert_eq!(key, PROJ_B_KEY);
            assert_eq!(got, &[31, 4]);
        }
        other => panic!("{other:?}: {:#?}", summary(&r)),
    }
}
