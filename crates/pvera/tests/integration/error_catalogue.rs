//! One test per row of `docs/ERRORS.md`: every bad-input class of issue 7 ends in the typed
//! `pvera::Error` variant the table names, with a message that names the file (or key) and says
//! how to fix it. Run with `--nocapture` to print the messages the table quotes
//! (`CATALOGUE <row>: <Variant>: <message>`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint::{self, PROJ_A_KEY, PROJ_B_KEY};
use pvera::data::images::decode_image_bytes;
use pvera::data::text::{Columns, LabelMap, Padding, TextClassification, TextTokenizer, TokenizeOptions};
use pvera::models::loader::ModelDir;
use pvera::models::{AnyModel, ModelInputs};
use pvera::{Error, PeftModel, RunState};
use serde_json::Value;

use crate::common::*;

/// Prints the row's message and checks that it mentions every `needle` (file, key, fix).
fn row(name: &str, e: &Error, needles: &[&str]) {
    let msg = e.to_string();
    let variant = format!("{e:?}").split([' ', '(', '{']).next().unwrap().to_string();
    eprintln!("CATALOGUE {name}: {variant}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{name}: message does not contain {n:?}: {msg}");
    }
}

fn mlp_adapter() -> std::path::PathBuf {
    fixtures().join("peft/mlp_list/adapter")
}

/// A copy of the `mlp_list` adapter with its tensors and config edited.
fn edited(
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
    cfg_edit: impl FnOnce(&mut Value),
) -> tempfile::TempDir {
    let src = mlp_adapter();
    let tmp = tempfile::tempdir().unwrap();
    let (ts, _) = checkpoint::read_safetensors(&src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut ts: BTreeMap<String, Tensor> = ts.into_iter().map(|(k, v)| (k, v.tensor)).collect();
    edit(&mut ts);
    let bytes = checkpoint::serialize_safetensors(&ts, Some(checkpoint::pt_metadata())).unwrap();
    std::fs::write(tmp.path().join("adapter_model.safetensors"), bytes).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    cfg_edit(&mut cfg);
    std::fs::write(tmp.path().join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    tmp
}

/// A copy of the `mlp_list` adapter whose config file has the text `cfg`.
fn with_config_text(cfg: &str) -> tempfile::TempDir {
    let d = edited(|_| {}, |_| {});
    std::fs::write(d.path().join("adapter_config.json"), cfg).unwrap();
    d
}

/// A copy of the `mlp_list` adapter whose weights file is `f(original bytes)`.
fn with_weights(f: impl FnOnce(Vec<u8>) -> Vec<u8>) -> tempfile::TempDir {
    let d = edited(|_| {}, |_| {});
    let p = d.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, f(bytes)).unwrap();
    d
}

/// Rewrites the JSON header of a safetensors file with `edit`.
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

fn load(dir: &Path) -> Result<PeftModel<TestModel>, Error> {
    let (m, reg, info) = build_base_from(&fixtures().join("peft/mlp_list/base_model.safetensors"), DType::F32, false);
    PeftModel::from_pretrained(m, reg, info, dir, "default", false)
}

fn cfg_path(d: &tempfile::TempDir) -> String {
    d.path().join("adapter_config.json").display().to_string()
}

fn weights_path(d: &tempfile::TempDir) -> String {
    d.path().join("adapter_model.safetensors").display().to_string()
}

// --- adapter_config.json -------------------------------------------------------------------

#[test]
fn config_malformed_json() {
    let d = with_config_text("{\"peft_type\": \"PVERA\", \"r\": 8,, }");
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::ConfigParse { .. }), "{e:?}");
    row("config_malformed_json", &e, &[&cfg_path(&d), "line 1"]);
}

#[test]
fn config_truncated() {
    let good = std::fs::read_to_string(mlp_adapter().join("adapter_config.json")).unwrap();
    let d = with_config_text(&good[..good.len() / 2]);
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::ConfigParse { .. }), "{e:?}");
    row("config_truncated", &e, &[&cfg_path(&d)]);
}

#[test]
fn config_wrong_peft_type() {
    let d = edited(|_| {}, |c| c["peft_type"] = "LORA".into());
    let e = load(d.path()).unwrap_err();
    assert!(matches!(&e, Error::WrongPeftType { found, .. } if found == "LORA"), "{e:?}");
    row("config_wrong_peft_type", &e, &[&cfg_path(&d), "\"LORA\"", "expected \"PVERA\"", "another PEFT method"]);
}

#[test]
fn config_wrong_field_type() {
    let d = edited(|_| {}, |c| c["r"] = "8".into());
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::ConfigParse { .. }), "{e:?}");
    row("config_wrong_field_type", &e, &[&cfg_path(&d), "`r`"]);
}

#[test]
fn config_unknown_bias() {
    let d = edited(|_| {}, |c| c["bias"] = "some".into());
    let e = load(d.path()).unwrap_err();
    assert!(matches!(&e, Error::InvalidConfig { field, .. } if field == "bias"), "{e:?}");
    row("config_unknown_bias", &e, &[&cfg_path(&d), "`bias`", "\"some\"", "accepted values are"]);
}

#[test]
fn config_r_not_positive() {
    for r in [0, -3] {
        let d = edited(|_| {}, |c| c["r"] = r.into());
        let e = load(d.path()).unwrap_err();
        assert!(matches!(&e, Error::InvalidConfig { field, .. } if field == "r"), "{e:?}");
        row("config_r_not_positive", &e, &["`r`", "positive integer", &format!("{r}"), &cfg_path(&d)]);
    }
}

// --- adapter_model.safetensors -------------------------------------------------------------

#[test]
fn safetensors_bad_header_length() {
    let d = with_weights(|mut b| {
        b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        b
    });
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }), "{e:?}");
    row("safetensors_bad_header_length", &e, &[&weights_path(&d), "not a valid safetensors file", "truncated", "save_pretrained"]);
}

#[test]
fn safetensors_truncated() {
    let d = with_weights(|b| b[..b.len() - 10].to_vec());
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }), "{e:?}");
    row("safetensors_truncated", &e, &[&weights_path(&d), "not a valid safetensors file", "download it again"]);
}

#[test]
fn safetensors_offsets_past_the_end() {
    let d = with_weights(|b| {
        edit_header(b, |h| {
            h[PROJ_A_KEY]["data_offsets"] = serde_json::json!([0, 1u64 << 40]);
        })
    });
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }), "{e:?}");
    row("safetensors_offsets_past_the_end", &e, &[&weights_path(&d), "invalid offset", "base_model.pvera_A", "download it again"]);
}

#[test]
fn safetensors_overlapping_ranges() {
    let d = with_weights(|b| {
        edit_header(b, |h| {
            let a = h[PROJ_A_KEY]["data_offsets"].clone();
            h[PROJ_B_KEY]["data_offsets"] = a;
            h[PROJ_B_KEY]["shape"] = h[PROJ_A_KEY]["shape"].clone();
        })
    });
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }), "{e:?}");
    row("safetensors_overlapping_ranges", &e, &[&weights_path(&d), "invalid offset for tensor `base_model.pvera_", "download it again"]);
}

#[test]
fn safetensors_unsupported_dtype() {
    // I32 has F32's size, so the header stays consistent; pvera reads no I32 tensors.
    let d = with_weights(|b| edit_header(b, |h| h["base_model.model.lin0.pvera_lambda_b"]["dtype"] = "I32".into()));
    let e = load(d.path()).unwrap_err();
    assert!(matches!(&e, Error::DtypeMismatch { key, .. } if key == "base_model.model.lin0.pvera_lambda_b"), "{e:?}");
    row("safetensors_unsupported_dtype", &e, &[&weights_path(&d), "lin0.pvera_lambda_b", "I32", "expected one of"]);
}

#[test]
fn safetensors_integer_lambda_is_cast_like_torch() {
    // A dtype pvera reads but not a float: cast to the layer's dtype, as torch's
    // `load_state_dict` (`param.copy_(input)`) does in PEFT. Not an error; the values are kept.
    let d = edited(
        |t| {
            t.insert("base_model.model.lin0.pvera_lambda_b".into(), Tensor::ones(20, DType::I64, &Device::Cpu).unwrap());
        },
        |_| {},
    );
    let pm = load(d.path()).unwrap();
    let (ts, _) = checkpoint::read_safetensors(&d.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ts["base_model.model.lin0.pvera_lambda_b"].file_dtype, "I64");
    drop(pm);
}

#[test]
fn safetensors_non_finite_values() {
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let d = edited(
            |t| {
                let mut x = vec![0.1f32; 20];
                x[3] = v;
                t.insert("base_model.model.lin0.pvera_lambda_b".into(), Tensor::new(x, &Device::Cpu).unwrap());
            },
            |_| {},
        );
        let e = load(d.path()).unwrap_err();
        assert!(matches!(&e, Error::NonFinite { count: 1, .. }), "{e:?}");
        row("safetensors_non_finite_values", &e, &[&weights_path(&d), "lin0.pvera_lambda_b", "earlier checkpoint"]);
    }
}

#[test]
fn safetensors_missing_lambda() {
    let d = edited(|t| drop(t.remove("base_model.model.lin3.pvera_lambda_d")), |_| {});
    let e = load(d.path()).unwrap_err();
    assert!(matches!(&e, Error::MissingTensor { key, .. } if key.contains("lin3.pvera_lambda_d")), "{e:?}");
    row("safetensors_missing_lambda", &e, &[&weights_path(&d), "lin3.pvera_lambda_d", "model family"]);
}

#[test]
fn safetensors_missing_projections() {
    let d = edited(
        |t| {
            t.remove(PROJ_A_KEY);
            t.remove(PROJ_B_KEY);
        },
        |_| {},
    );
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    row("safetensors_missing_projections", &e, &[&weights_path(&d), "pvera_A", "save_projection"]);
}

#[test]
fn safetensors_shape_does_not_fit() {
    let d = edited(
        |t| {
            t.insert("base_model.model.lin0.pvera_lambda_b".into(), Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap());
        },
        |_| {},
    );
    let e = load(d.path()).unwrap_err();
    assert!(matches!(&e, Error::ShapeMismatch { key, .. } if key == "base_model.model.lin0.pvera_lambda_b"), "{e:?}");
    row("safetensors_shape_does_not_fit", &e, &[&weights_path(&d), "lin0.pvera_lambda_b", "[7]", "[20]"]);
}

#[test]
fn adapter_for_another_model_or_naming_scheme() {
    let d = edited(
        |t| {
            for p in ["lin0", "lin1", "lin2", "lin3"] {
                for s in ["b", "d"] {
                    if let Some(v) = t.remove(&format!("base_model.model.{p}.pvera_lambda_{s}")) {
                        t.insert(format!("base_model.model.encoder.layer.0.attention.{p}.pvera_lambda_{s}"), v);
                    }
                }
            }
        },
        |_| {},
    );
    let e = load(d.path()).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. } | Error::UnexpectedTensors { .. }), "{e:?}");
    row("adapter_for_another_model_or_naming_scheme", &e, &[&weights_path(&d), "naming scheme"]);
    // Only extra λ for modules the model lacks: also refused, naming them.
    let d = edited(
        |t| {
            let v = t["base_model.model.lin0.pvera_lambda_b"].clone();
            t.insert("base_model.model.encoder.layer.0.attention.query.pvera_lambda_b".into(), v);
        },
        |_| {},
    );
    let e = load(d.path()).unwrap_err();
    assert!(matches!(&e, Error::UnexpectedTensors { count: 1, .. }), "{e:?}");
    row("adapter_for_another_model_or_naming_scheme", &e, &[&weights_path(&d), "encoder.layer.0.attention.query", "naming scheme"]);
}

// --- model directories ---------------------------------------------------------------------

#[test]
fn model_dir_without_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let e = ModelDir::open(tmp.path()).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    row("model_dir_without_config_json", &e, &["config.json", "save_pretrained"]);
}

/// What anyhow's `{:#}` (the CLI's error line) prints: the error, then each `source()`.
fn chain_text(e: &Error) -> String {
    let mut out = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(&format!(": {s}"));
        src = s.source();
    }
    out
}

/// issue 16 row 9: an error's text is printed once, not again as its source.
#[test]
fn error_chains_do_not_repeat_the_message() {
    let tmp = tempfile::tempdir().unwrap();
    let os = std::io::Error::from(std::io::ErrorKind::NotFound).to_string();
    let missing = ModelDir::open(tmp.path()).unwrap_err();
    let hub = pvera::models::loader::resolve_model_dir(Path::new("pvera-test-org/no-such-model")).unwrap_err();
    let plain = Error::io(tmp.path().join("x"), std::io::Error::from(std::io::ErrorKind::NotFound));
    let candle = Error::from(candle_core::Error::Msg("shape mismatch in matmul".into()));
    for (e, once) in [(&missing, "a model directory needs config.json"), (&hub, "not in the local hub cache"), (&plain, os.as_str()), (&candle, "shape mismatch in matmul")] {
        let text = chain_text(e);
        assert_eq!(text.matches(once).count(), 1, "{text}");
    }
}

#[test]
fn model_dir_unknown_model_type() {
    let src = fixtures().join("models/bert_tiny/model");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "mamba".into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let md = ModelDir::open(tmp.path()).unwrap();
    let e = AnyModel::load(&md, None, &Device::Cpu, Arc::new(RunState::new(0))).unwrap_err();
    assert!(matches!(e, Error::UnsupportedModel { .. }), "{e:?}");
    row("model_dir_unknown_model_type", &e, &["config.json", "\"mamba\"", "supported: "]);
    // No model_type at all.
    cfg.as_object_mut().unwrap().remove("model_type");
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let e = ModelDir::open(tmp.path()).unwrap_err();
    assert!(matches!(e, Error::ConfigParse { .. }), "{e:?}");
    row("model_dir_unknown_model_type", &e, &["config.json", "model_type"]);
}

// --- inputs --------------------------------------------------------------------------------

#[test]
fn inputs_wrong_name_dtype_or_shape() {
    let md = ModelDir::open(&fixtures().join("models/bert_tiny/model")).unwrap();
    let (m, _, _) = AnyModel::load(&md, None, &Device::Cpu, Arc::new(RunState::new(0))).unwrap();
    // Missing (the CLI reports an unknown name such as `inputs_ids` first, exit 7): every family
    // reports a missing input as `MissingTensor` naming it (vision: `pixel_values`, see
    // models_vision::vision_bad_inputs_are_named).
    let e = m.forward(&ModelInputs::default()).unwrap_err();
    assert!(matches!(&e, Error::MissingTensor { key, .. } if key == "input_ids"), "{e:?}");
    row("inputs_wrong_name", &e, &["`input_ids`", "token ids"]);
    for family in ["llama_base", "gpt2_base"] {
        let md = ModelDir::open(&fixtures().join("models").join(family).join("model")).unwrap();
        let (dm, _, _) = AnyModel::load(&md, None, &Device::Cpu, Arc::new(RunState::new(0))).unwrap();
        let e = dm.forward(&ModelInputs::default()).unwrap_err();
        assert!(matches!(&e, Error::MissingTensor { key, .. } if key == "input_ids"), "{family}: {e:?}");
    }
    let ids = Tensor::zeros((2, 4), DType::I64, &Device::Cpu).unwrap();
    let e = m
        .forward(&ModelInputs { input_ids: Some(ids.to_dtype(DType::F32).unwrap()), ..Default::default() })
        .unwrap_err();
    assert!(matches!(&e, Error::DtypeMismatch { key, .. } if key == "input_ids"), "{e:?}");
    row("inputs_wrong_dtype", &e, &["input_ids", "F32"]);
    let e = m
        .forward(&ModelInputs {
            input_ids: Some(ids.clone()),
            attention_mask: Some(Tensor::zeros((2, 5), DType::I64, &Device::Cpu).unwrap()),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(&e, Error::ShapeMismatch { key, .. } if key == "attention_mask"), "{e:?}");
    row("inputs_wrong_shape", &e, &["attention_mask", "[2, 5]"]);
}

// --- data sets -----------------------------------------------------------------------------

#[test]
fn data_unreadable_image() {
    let e = decode_image_bytes(b"\x89PNG\r\n\x1a\nnot really", "train/cat/0001.png").unwrap_err();
    assert!(matches!(e, Error::Data(_)), "{e:?}");
    row("data_unreadable_image", &e, &["train/cat/0001.png", "cannot decode image", "replace or remove it"]);
}

fn tokenizer() -> TextTokenizer {
    let opts = TokenizeOptions { max_length: Some(16), padding: Padding::Longest, ..Default::default() };
    TextTokenizer::from_file(&fixtures().join("data/tokenizer.json"), &opts).unwrap()
}

#[test]
fn data_empty_text() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("train.jsonl");
    std::fs::write(&p, "{\"text\": \"hi\", \"label\": 1}\n{\"text\": \"  \", \"label\": 0}\n").unwrap();
    let e = TextClassification::from_file(&p, &Columns::default(), &tokenizer(), None, &Device::Cpu).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::Data(_)), "{e:?}");
    row("data_empty_text", &e, &["train.jsonl:2", "empty text", "fill it in or remove the record"]);
}

#[test]
fn data_unknown_label() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("eval.jsonl");
    std::fs::write(&p, "{\"text\": \"free cash\", \"label\": \"spam\"}\n{\"text\": \"hello\", \"label\": \"eggs\"}\n").unwrap();
    let map = LabelMap::new(vec!["ham".into(), "spam".into()]).unwrap();
    let e = TextClassification::from_file(&p, &Columns::default(), &tokenizer(), Some(map), &Device::Cpu)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, Error::Data(_)), "{e:?}");
    row("data_unknown_label", &e, &["eval.jsonl:2", "unknown label \"eggs\"", "known labels", "fix the label"]);
}
