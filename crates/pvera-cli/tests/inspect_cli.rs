//! `pvera inspect` validates: one bad adapter per class of `docs/ERRORS.md` (rows 1-16), each
//! listed with its class and message and ending in the catalogue's exit code; warnings keep exit 0.
//! The bad adapters are copies of committed fixtures, corrupted here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint::{self, PROJ_A_KEY, PROJ_B_KEY};
use serde_json::{json, Value};

const LIN0_B: &str = "base_model.model.lin0.pvera_lambda_b";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pvera/tests/fixtures")
}

/// Exit code, stdout, stderr.
fn pvera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pvera")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A corrupted copy of a fixture adapter directory.
struct Bad(tempfile::TempDir);

impl Bad {
    fn of(src: &Path) -> Bad {
        let d = tempfile::tempdir().unwrap();
        for f in [checkpoint::CONFIG_NAME, checkpoint::WEIGHTS_NAME] {
            std::fs::copy(src.join(f), d.path().join(f)).unwrap();
        }
        Bad(d)
    }
    fn mlp() -> Bad {
        Bad::of(&fixtures().join("peft/mlp_list/adapter"))
    }
    fn dir(&self) -> &str {
        self.0.path().to_str().unwrap()
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    fn config_text(self, text: &str) -> Bad {
        std::fs::write(self.file(checkpoint::CONFIG_NAME), text).unwrap();
        self
    }
    fn config(self, edit: impl FnOnce(&mut Value)) -> Bad {
        let p = self.file(checkpoint::CONFIG_NAME);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        self
    }
    fn weights_bytes(self, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) -> Bad {
        let p = self.file(checkpoint::WEIGHTS_NAME);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, edit(b)).unwrap();
        self
    }
    fn tensors(self, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> Bad {
        let p = self.file(checkpoint::WEIGHTS_NAME);
        let (ts, _) = checkpoint::read_safetensors(&p, &Device::Cpu).unwrap();
        let mut ts: BTreeMap<String, Tensor> = ts.into_iter().map(|(k, v)| (k, v.tensor)).collect();
        edit(&mut ts);
        std::fs::write(&p, checkpoint::serialize_safetensors(&ts, Some(checkpoint::pt_metadata())).unwrap()).unwrap();
        self
    }
}

/// The JSON header of a safetensors file, edited.
fn edit_header(bytes: Vec<u8>, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut h);
    let mut hj = serde_json::to_vec(&Value::Object(h)).unwrap();
    while hj.len() % 8 != 0 {
        hj.push(b' ');
    }
    let mut out = (hj.len() as u64).to_le_bytes().to_vec();
    out.extend(hj);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// Runs `pvera inspect DIR [extra] --json`, checks the exit code and that the first error has
/// `class` and a message containing every needle; returns the problems. The human output of the
/// same run must list the same first problem and end in the same code.
fn expect(dir: &str, extra: &[&str], code: i32, class: &str, needles: &[&str]) -> Vec<Value> {
    let mut args = vec!["inspect", dir];
    args.extend_from_slice(extra);
    let (human_code, out, err) = pvera(&args);
    assert_eq!(human_code, code, "{args:?}\nstdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains(&format!("error [{class}, exit {code}]: ")), "{out}");
    assert!(err.contains("the adapter would not load"), "{err}");
    args.push("--json");
    let (json_code, out, err) = pvera(&args);
    assert_eq!(json_code, code, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["would_load"], false);
    let problems = v["problems"].as_array().unwrap().clone();
    let first = problems.iter().find(|p| p["severity"] == "error").unwrap();
    assert_eq!(first["class"], class, "{problems:#?}");
    assert_eq!(first["exit_code"], code, "{problems:#?}");
    let msg = first["message"].as_str().unwrap();
    for n in needles {
        assert!(msg.contains(n), "{class}: {msg:?} does not contain {n:?}");
    }
    problems
}

// --- adapter_config.json: exit 4 ---------------------------------------------------------------

#[test]
fn row_01_malformed_config() {
    let d = Bad::mlp().config_text("{\"peft_type\": \"PVERA\", \"r\": 8,, }");
    expect(d.dir(), &[], 4, "ConfigParse", &["adapter_config.json", "line 1"]);
}

#[test]
fn row_02_truncated_config() {
    let good = std::fs::read_to_string(fixtures().join("peft/mlp_list/adapter/adapter_config.json")).unwrap();
    let d = Bad::mlp().config_text(&good[..good.len() / 2]);
    expect(d.dir(), &[], 4, "ConfigParse", &["adapter_config.json", "truncated"]);
}

#[test]
fn row_03_wrong_peft_type() {
    let d = Bad::mlp().config(|c| c["peft_type"] = "LORA".into());
    expect(d.dir(), &[], 4, "WrongPeftType", &["\"LORA\"", "expected \"PVERA\""]);
}

#[test]
fn row_04_field_of_the_wrong_type() {
    let d = Bad::mlp().config(|c| c["r"] = "8".into());
    expect(d.dir(), &[], 4, "ConfigParse", &["field `r`", "without quotes"]);
}

#[test]
fn row_05_unknown_bias() {
    let d = Bad::mlp().config(|c| c["bias"] = "some".into());
    expect(d.dir(), &[], 4, "InvalidConfig", &["`bias`", "\"some\"", "accepted values are"]);
}

#[test]
fn row_06_r_not_positive() {
    let d = Bad::mlp().config(|c| c["r"] = 0.into());
    let problems = expect(d.dir(), &[], 4, "InvalidConfig", &["`r` should be a positive integer value but the value passed is 0"]);
    assert_eq!(problems.len(), 1, "{problems:#?}");
}

// --- adapter_model.safetensors: exit 5 ---------------------------------------------------------

#[test]
fn row_07_bad_header_length() {
    let d = Bad::mlp().weights_bytes(|mut b| {
        b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        b
    });
    expect(d.dir(), &[], 5, "Safetensors", &["not a valid safetensors file", "save_pretrained"]);
}

#[test]
fn row_08_truncated_safetensors() {
    let d = Bad::mlp().weights_bytes(|b| b[..b.len() - 10].to_vec());
    expect(d.dir(), &[], 5, "Safetensors", &["not a valid safetensors file", "download it again"]);
}

#[test]
fn row_09_offsets_past_the_end() {
    let d = Bad::mlp().weights_bytes(|b| edit_header(b, |h| h[PROJ_A_KEY]["data_offsets"] = json!([0, 1u64 << 40])));
    expect(d.dir(), &[], 5, "Safetensors", &["invalid offset", "base_model.pvera_A"]);
}

#[test]
fn row_10_overlapping_ranges() {
    let d = Bad::mlp().weights_bytes(|b| {
        edit_header(b, |h| {
            h[PROJ_B_KEY]["data_offsets"] = h[PROJ_A_KEY]["data_offsets"].clone();
            h[PROJ_B_KEY]["shape"] = h[PROJ_A_KEY]["shape"].clone();
        })
    });
    expect(d.dir(), &[], 5, "Safetensors", &["invalid offset for tensor `base_model.pvera_"]);
}

#[test]
fn row_11_wrong_dtype() {
    // I32 has F32's size, so the header stays consistent; the other tensors are still checked.
    let d = Bad::mlp().weights_bytes(|b| edit_header(b, |h| h[LIN0_B]["dtype"] = "I32".into()));
    let problems = expect(d.dir(), &[], 5, "DtypeMismatch", &["lin0.pvera_lambda_b", "I32", "expected one of"]);
    assert_eq!(problems.len(), 1, "{problems:#?}");
}

#[test]
fn row_12_non_finite_values() {
    let d = Bad::mlp().tensors(|t| {
        let mut v = vec![0.1f32; 20];
        v[3] = f32::NAN;
        v[4] = f32::NEG_INFINITY;
        t.insert(LIN0_B.into(), Tensor::new(v, &Device::Cpu).unwrap());
    });
    expect(d.dir(), &[], 5, "NonFinite", &["lin0.pvera_lambda_b", "2 non-finite value(s)", "earlier checkpoint"]);
}

#[test]
fn row_13_missing_lambda() {
    let d = Bad::mlp().tensors(|t| drop(t.remove("base_model.model.lin3.pvera_lambda_d")));
    expect(d.dir(), &[], 5, "MissingTensor", &["lin3.pvera_lambda_d", "half-initialised"]);
}

#[test]
fn row_14_missing_projections() {
    let d = Bad::mlp().tensors(|t| {
        t.remove(PROJ_A_KEY);
        t.remove(PROJ_B_KEY);
    });
    expect(d.dir(), &[], 5, "MissingTensor", &["base_model.pvera_A", "Specified to load pvera_A and pvera_B", "save_projection"]);
    // Left out on purpose (save_projection=false): fine, regenerated on load.
    let d = d.config(|c| c["save_projection"] = false.into());
    let (code, out, err) = pvera(&["inspect", d.dir()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("problems: none"), "{out}");
}

#[test]
fn row_14_missing_b_with_a_regenerable_is_a_warning() {
    let d = Bad::mlp().tensors(|t| drop(t.remove(PROJ_B_KEY)));
    let (code, out, err) = pvera(&["inspect", d.dir()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("warning [RegeneratedProjectionB]: "), "{out}");
    assert!(out.contains("pvera_B is missing"), "{out}");
    // A changed too: B cannot be recovered, an error.
    let d = d.tensors(|t| {
        let a = t.get_mut(PROJ_A_KEY).unwrap();
        *a = (&*a * 2.0).unwrap();
    });
    expect(d.dir(), &[], 5, "MissingTensor", &["base_model.pvera_B", "cannot be recovered"]);
}

#[test]
fn row_15_wrong_shapes() {
    // λ_d of another rank than the config's r = 4.
    let d = Bad::mlp().tensors(|t| {
        t.insert("base_model.model.lin0.pvera_lambda_d".into(), Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap());
    });
    expect(d.dir(), &[], 5, "ShapeMismatch", &["lin0.pvera_lambda_d", "[6]", "expected [8]", "r=4"]);
    // λ_b longer than the projections allow.
    let d = Bad::mlp().tensors(|t| drop(t.insert(LIN0_B.into(), Tensor::zeros(25, DType::F32, &Device::Cpu).unwrap())));
    expect(d.dir(), &[], 5, "ShapeMismatch", &["lin0.pvera_lambda_b", "[25]", "at most [20]"]);
    // Several wrong shapes: all listed.
    let d = d.tensors(|t| drop(t.insert("base_model.model.lin3.pvera_lambda_d".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())));
    let problems = expect(d.dir(), &[], 5, "ShapeMismatch", &[]);
    let shape_errors = problems.iter().filter(|p| p["class"] == "ShapeMismatch").count();
    assert_eq!(shape_errors, 2, "{problems:#?}");
}

#[test]
fn row_15_16_with_model_the_full_load_finds_what_only_the_model_knows() {
    let model = fixtures().join("models/bert_tiny/model");
    let model = model.to_str().unwrap();
    let adapter = fixtures().join("models/bert_tiny/adapter");
    let (code, out, err) = pvera(&["inspect", adapter.to_str().unwrap(), "--model", model]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("problems: none"), "{out}");
    // Row 16, targets the model lacks: a warning without the model, exit 4 with it.
    let d = Bad::of(&adapter).config(|c| c["target_modules"] = json!(["q_lin", "v_lin"]));
    let (code, out, _) = pvera(&["inspect", d.dir()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning [UntargetedLambdas]"), "{out}");
    expect(d.dir(), &["--model", model], 4, "NoTargetMatched", &["q_lin", "matched none of the model's linear layers"]);
    // Row 16, λ's for a module this model does not have: exit 5 with the model.
    let d = Bad::of(&adapter).tensors(|t| {
        let v = t["base_model.model.encoder.layer.0.attention.self.query.pvera_lambda_b"].clone();
        t.insert("base_model.model.encoder.layer.7.attention.self.query.pvera_lambda_b".into(), v);
        let v = t["base_model.model.encoder.layer.0.attention.self.query.pvera_lambda_d"].clone();
        t.insert("base_model.model.encoder.layer.7.attention.self.query.pvera_lambda_d".into(), v);
    });
    let (code, out, _) = pvera(&["inspect", d.dir()]);
    assert_eq!(code, 0, "{out}");
    expect(d.dir(), &["--model", model], 5, "UnexpectedTensors", &["encoder.layer.7.attention.self.query", "naming scheme"]);
    // Row 15, λ_b shorter than its layer (B shortened alike, so the file is consistent).
    let d = Bad::of(&adapter).tensors(|t| {
        for (k, v) in t.iter_mut() {
            if k.ends_with("pvera_lambda_b") || k == PROJ_B_KEY {
                *v = v.narrow(0, 0, 31).unwrap();
            }
        }
    });
    assert_eq!(pvera(&["inspect", d.dir()]).0, 0);
    expect(d.dir(), &["--model", model], 5, "ShapeMismatch", &["base_model.pvera_B", "[31, 4]", "expected [32, 4]"]);
}

#[test]
fn foreign_tensors_are_a_warning() {
    let d = Bad::mlp().tensors(|t| drop(t.insert("optimizer.exp_avg".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())));
    let (code, out, err) = pvera(&["inspect", d.dir(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["would_load"], true);
    assert_eq!(v["problems"][0]["severity"], "warning");
    assert_eq!(v["problems"][0]["class"], "ForeignTensors");
    assert_eq!(v["problems"][0]["exit_code"], 0);
    assert!(v["problems"][0]["message"].as_str().unwrap().contains("optimizer.exp_avg"));
}

// --- everything at once, good adapters, JSON ---------------------------------------------------

#[test]
fn several_problems_are_all_listed_and_the_first_decides_the_exit_code() {
    // The issue's examples in one adapter: r = 0, a NaN λ, a λ of the wrong length, no pvera_B.
    let d = Bad::mlp()
        .tensors(|t| {
            let mut v = vec![0.1f32; 2];
            v[0] = f32::NAN;
            t.insert("base_model.model.lin3.pvera_lambda_b".into(), Tensor::new(v, &Device::Cpu).unwrap());
            t.insert(LIN0_B.into(), Tensor::zeros(25, DType::F32, &Device::Cpu).unwrap());
            t.remove(PROJ_B_KEY);
        })
        .config(|c| c["r"] = 0.into());
    let problems = expect(d.dir(), &[], 4, "InvalidConfig", &["`r`"]);
    let classes: Vec<&str> = problems.iter().map(|p| p["class"].as_str().unwrap()).collect();
    assert_eq!(classes, ["InvalidConfig", "NonFinite"], "{problems:#?}");
    // With r fixed the tensor problems remain: exit 5.
    let d = d.config(|c| c["r"] = 4.into());
    let problems = expect(d.dir(), &[], 5, "NonFinite", &["lin3.pvera_lambda_b"]);
    let classes: Vec<&str> = problems.iter().map(|p| p["class"].as_str().unwrap()).collect();
    assert!(classes.contains(&"NonFinite"), "{problems:#?}");
    assert!(problems.iter().any(|p| p["message"].as_str().unwrap().contains("pvera_B")), "{problems:#?}");
}

#[test]
fn good_adapters_exit_0_without_problems() {
    for case in ["peft/mlp_list/adapter", "peft/mlp_modules_to_save/adapter", "peft/mlp_bias_all/adapter", "models/bert_seq_cls/adapter"] {
        let dir = fixtures().join(case);
        let (code, out, err) = pvera(&["inspect", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{case}: {out}{err}");
        assert!(out.contains("problems: none"), "{case}: {out}");
        assert!(!err.contains("error"), "{case}: {err}");
        let (code, out, _) = pvera(&["inspect", dir.to_str().unwrap(), "--json"]);
        assert_eq!(code, 0);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["problems"], json!([]), "{case}");
        assert_eq!(v["would_load"], true);
    }
}

#[test]
fn errors_take_precedence_over_the_verify_projections_exit_code() {
    // Projections drawn with the two-rounding kernel: a note, exit 0; --verify-projections: 3.
    let d = Bad::mlp().tensors(|t| {
        let (a, b) = pvera::projection::generate_raw(pvera::Method::Pvera, 0, 4, 20, 20, pvera::TorchKernel::Default);
        t.insert(PROJ_A_KEY.into(), Tensor::from_vec(a, (8, 20), &Device::Cpu).unwrap());
        t.insert(PROJ_B_KEY.into(), Tensor::from_vec(b, (20, 4), &Device::Cpu).unwrap());
    });
    let (code, out, _) = pvera(&["inspect", d.dir()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("info [ProjectionsNotFromKey]"), "{out}");
    let (code, out, _) = pvera(&["inspect", d.dir(), "--verify-projections"]);
    assert_eq!(code, 3, "{out}");
    // The same with a broken λ: the adapter would not load, so its error code wins.
    let d = d.tensors(|t| drop(t.remove("base_model.model.lin3.pvera_lambda_b")));
    expect(d.dir(), &["--verify-projections"], 5, "MissingTensor", &["lin3.pvera_lambda_b"]);
}

#[test]
fn named_sub_adapters_are_checked_too() {
    let tmp = tempfile::tempdir().unwrap();
    let good = fixtures().join("peft/mlp_list/adapter");
    for sub in ["", "other"] {
        let d = tmp.path().join(sub);
        std::fs::create_dir_all(&d).unwrap();
        for f in [checkpoint::CONFIG_NAME, checkpoint::WEIGHTS_NAME] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
    }
    let other = tmp.path().join("other").join(checkpoint::CONFIG_NAME);
    let text = std::fs::read_to_string(&other).unwrap().replace("\"r\": 4", "\"r\": -1");
    std::fs::write(&other, text).unwrap();
    let (code, out, err) = pvera(&["inspect", tmp.path().to_str().unwrap(), "--json"]);
    assert_eq!(code, 4, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let adapters = v["adapters"].as_array().unwrap();
    assert_eq!(adapters[0]["problems"], json!([]));
    assert_eq!(adapters[1]["problems"][0]["class"], "InvalidConfig");
    assert!(err.contains("other"), "{err}");
}
