//! VeRA adapters (issue 17) against PEFT 0.21.2's own VeRA: configs, projections, the MLP /
//! Conv1D cases (λ's, ΔW, eval / base / merged / unmerged outputs and weights, a train-mode output
//! with dropout, λ gradients of one backward pass), the tiny model families, and the seam with
//! PVeRA (sampling refused, both methods on one model). Fixtures: `tools/make_vera_fixtures.py`
//! under `fixtures/vera/`. Rust-written VeRA cases for the reverse check in PEFT
//! (`tools/check_in_peft.py`) come from `rust_written_vera_cases_load_back`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint;
use pvera::config::{Method, TargetModules};
use pvera::models::loader::ModelDir;
use pvera::models::{AnyModel, ModelInputs, ModelOutputs};
use pvera::uncertainty::{mc_predict, McConfig};
use pvera::validate::{self, Severity};
use pvera::{Error, PeftModel, Projections, PveraConfig, RunState, Sampling, TorchKernel};
use serde_json::Value;

use crate::common::*;

fn root() -> PathBuf {
    fixtures().join("vera")
}

fn vera_cases() -> Vec<String> {
    let out = cases_in(&root().join("mlp"));
    assert!(out.len() >= 10, "expected the VeRA fixture cases, found {out:?}");
    out
}

fn load(name: &str) -> Case {
    let c = Case::load_from(&root().join("mlp"), name);
    assert_eq!(c.meta["method"], "vera");
    c
}

fn report(failures: Vec<String>) {
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn vera(kw: impl FnOnce(&mut PveraConfig)) -> PveraConfig {
    let mut c = PveraConfig::for_method(Method::Vera);
    kw(&mut c);
    c
}

// ---- configs ------------------------------------------------------------------------------------

#[test]
fn peft_written_vera_configs_round_trip_byte_for_byte() {
    let doc = json(&root().join("configs.json"));
    let files = doc["files"].as_object().unwrap();
    assert!(files.len() >= 18, "{}", files.len());
    for (name, f) in files {
        let text = f["text"].as_str().unwrap();
        let cfg = PveraConfig::from_json_str(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.method, Method::Vera, "{name}");
        assert!(cfg.extra.is_empty(), "{name}: {:?}", cfg.extra);
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.to_json_string(), text, "{name}");
    }
    // Rust's defaults are PEFT's VeraConfig() byte for byte.
    assert_eq!(PveraConfig::for_method(Method::Vera).to_json_string(), files["defaults"]["text"].as_str().unwrap());
    // Every field, read as PEFT wrote it.
    let c = PveraConfig::from_json_str(files["every_field"]["text"].as_str().unwrap(), "every_field").unwrap();
    assert_eq!((c.r, c.projection_prng_key, c.save_projection), (16, 5, false));
    assert_eq!((c.dropout, c.d_initial, c.fan_in_fan_out, c.init_weights), (0.1, 0.5, true, false));
    assert_eq!(c.bias.as_str(), "all");
    assert_eq!(c.modules_to_save.as_deref(), Some(&["classifier".to_string(), "pooler".to_string()][..]));
    assert_eq!(c.task_type.as_deref(), Some("SEQ_CLS"));
    assert_eq!(c.revision.as_deref(), Some("v1"));
    assert!(c.inference_mode);
    let c = PveraConfig::from_json_str(files["bias_vera_only"]["text"].as_str().unwrap(), "b").unwrap();
    assert_eq!(c.bias.as_str(), "vera_only");
    let c = PveraConfig::from_json_str(files["key_big"]["text"].as_str().unwrap(), "k").unwrap();
    assert_eq!(c.projection_seed(), u64::MAX);
    // The file PeftModel.save_pretrained writes.
    let c = PveraConfig::from_json_str(files["peft_model_mlp"]["text"].as_str().unwrap(), "m").unwrap();
    assert!(c.inference_mode && c.auto_mapping.is_some());
}

#[test]
fn vera_configs_refuse_what_veraconfig_lacks_and_keep_unknown_keys() {
    let doc = json(&root().join("configs.json"));
    let text = doc["files"]["list_targets"]["text"].as_str().unwrap();
    // PVeRA's sampling fields are unknown keys of a VeraConfig: kept and written back, as extras.
    let with_sampling = text.replacen('{', "{\n  \"sample_at_inference\": true,", 1);
    let c = PveraConfig::from_json_str(&with_sampling, "x").unwrap();
    assert_eq!(c.sample_at_inference, pvera::config::SampleAtInference::All(false));
    assert_eq!(c.extra.get("sample_at_inference"), Some(&Value::Bool(true)));
    assert!(c.save_warnings().iter().any(|w| w.contains("VeraConfig") && w.contains("sample_at_inference")));
    assert!(c.to_json_string().contains("\"sample_at_inference\": true"));
    // Set in code, the sampling fields are refused for VeRA, naming the field.
    for (field, cfg) in [
        ("sample_at_inference", vera(|c| c.sample_at_inference = pvera::config::SampleAtInference::All(true))),
        ("generator_seed", vera(|c| c.generator_seed = Some(3))),
    ] {
        let e = cfg.validate().unwrap_err();
        assert!(matches!(&e, Error::InvalidConfig { field: f, .. } if f == field), "{e}");
        assert!(e.to_string().contains("VeRA"), "{e}");
    }
    // The dropout error names VeRA's field.
    let e = vera(|c| c.dropout = 1.5).validate().unwrap_err();
    assert!(matches!(&e, Error::InvalidConfig { field, .. } if field == "vera_dropout"), "{e}");
    // PEFT's own message for layers_pattern without layers_to_transform.
    let peft = doc["layers_pattern_without_layers"].as_str().unwrap();
    let e = vera(|c| c.layers_pattern = Some(pvera::config::LayersPattern::One("h".into()))).validate().unwrap_err();
    assert!(peft.trim_end().ends_with(pvera::config::LAYERS_PATTERN_WITHOUT_LAYERS_MESSAGE.trim_end()), "{peft}");
    assert!(e.to_string().contains(pvera::config::LAYERS_PATTERN_WITHOUT_LAYERS_MESSAGE.trim_end()), "{e}");
    // Another method's config is still refused, naming both accepted types.
    let lora = text.replace("\"VERA\"", "\"LORA\"");
    let e = PveraConfig::from_json_str(&lora, "lora").unwrap_err();
    assert!(matches!(e, Error::WrongPeftType { .. }) && e.to_string().contains("\"VERA\""), "{e}");
}

#[test]
fn the_vera_default_target_table_is_pefts() {
    let doc = json(&root().join("configs.json"));
    let mapping = doc["default_targets"].as_array().unwrap();
    assert_eq!(mapping.len(), 40);
    for pair in mapping {
        let name = pair[0].as_str().unwrap();
        let want = match &pair[1] {
            Value::Array(v) => TargetModules::list(v.iter().map(|s| s.as_str().unwrap().to_string())),
            Value::String(s) => TargetModules::Regex(s.clone()),
            other => panic!("{name}: {other}"),
        };
        assert_eq!(pvera::targets::default_target_modules(Method::Vera, name), Some(want), "{name}");
    }
    // PVeRA's extra entry is not VeRA's: a DINOv2 VeRA adapter needs explicit targets, as in PEFT.
    assert!(mapping.iter().all(|p| p[0] != "dinov2"));
    assert_eq!(pvera::targets::default_target_modules(Method::Vera, "dinov2"), None);
}

// ---- projections --------------------------------------------------------------------------------

#[test]
fn projections_from_the_key_are_peft_bit_for_bit() {
    let doc = json(&root().join("projections.json"));
    let (ts, _) = checkpoint::read_safetensors(&root().join("projections.safetensors"), &Device::Cpu).unwrap();
    let mut elements = 0;
    for c in doc["cases"].as_array().unwrap() {
        let i = c["index"].as_u64().unwrap();
        let key = c["projection_prng_key"].as_u64().unwrap();
        let dims = |k: &str| c[k].as_u64().unwrap() as usize;
        let (r, in_max, out_max) = (dims("r"), dims("in_max"), dims("out_max"));
        let p = Projections::generate(Method::Vera, key, r, in_max, out_max, TorchKernel::Avx2, &Device::Cpu).unwrap();
        assert_eq!(p.a().dims(), [r, in_max], "VeRA's A is (r, in)");
        assert!(bits_equal(p.a(), &ts[&format!("A_{i}")].tensor), "case {i}: A");
        assert!(bits_equal(p.b(), &ts[&format!("B_{i}")].tensor), "case {i}: B");
        elements += p.a().elem_count() + p.b().elem_count();
        // PVeRA draws A with 2r rows from the same stream: its first r rows are not VeRA's A
        // (B follows A, so B moves too), except that A's first r rows are the same draws.
        let pv = Projections::generate(Method::Pvera, key, r, in_max, out_max, TorchKernel::Avx2, &Device::Cpu).unwrap();
        assert!(bits_equal(&pv.a().narrow(0, 0, r).unwrap(), p.a()));
        assert!(!bits_equal(pv.b(), p.b()) || out_max * r == 0);
    }
    assert!(elements > 3000, "{elements}");
}

// ---- the MLP / Conv1D cases ---------------------------------------------------------------------

fn check_tensor(failures: &mut Vec<String>, what: String, got: &Tensor, want: &Tensor, tol: f32) {
    if got.dims() != want.dims() {
        failures.push(format!("{what}: shape {:?}, PEFT {:?}", got.dims(), want.dims()));
        return;
    }
    let d = max_abs_diff(got, want);
    if d > tol {
        failures.push(format!("{what}: max abs diff {d} > {tol}"));
    }
}

#[test]
fn projections_lambdas_and_delta_weights_match_peft() {
    let mut failures = Vec::new();
    for name in vera_cases() {
        let case = load(&name);
        let pm = load_case_model(&case);
        let first = &case.adapters()[0].0;
        let info = pm.adapter(first).unwrap();
        assert_eq!(info.config.method, Method::Vera);
        for (key, ours) in [("vera_A", info.projections.a()), ("vera_B", info.projections.b())] {
            if !bits_equal(ours, case.t(key)) {
                failures.push(format!("{name}: {key} not bit-equal (max {})", max_abs_diff(ours, case.t(key))));
            }
        }
        for (adapter, _) in case.adapters() {
            for path in &pm.adapter(&adapter).unwrap().targets {
                let site = pm.registry().site(path).unwrap();
                let (lb, ld) = site.with_slot(&adapter, |s| (s.lambda_b().as_tensor().clone(), s.lambda_d().as_tensor().clone())).unwrap();
                for (k, ours) in [(format!("lambda_b.{path}.{adapter}"), lb), (format!("lambda_d.{path}.{adapter}"), ld)] {
                    if !bits_equal(&ours, case.t(&k)) {
                        failures.push(format!("{name}: {k} not bit-equal"));
                    }
                }
                let k = format!("delta_weight.{path}.{adapter}");
                let dw = site.delta_weight(&adapter).unwrap();
                check_tensor(&mut failures, format!("{name}: {k}"), &dw, &case.t(&k).to_dtype(DType::F32).unwrap(), 1e-6f32.max(tol(case.dtype())));
            }
        }
    }
    report(failures);
}

#[test]
fn eval_base_merged_and_unmerged_match_peft() {
    let mut failures = Vec::new();
    for name in vera_cases() {
        let case = load(&name);
        let mut pm = load_case_model(&case);
        let tol = tol(case.dtype());
        let x = case.t("input").clone();
        for (input, key) in [("input", "eval_output"), ("input_b1", "eval_output_b1")] {
            let y = pm.model().forward(case.t(input)).unwrap();
            assert_eq!(y.dtype(), case.dtype(), "{name}");
            if let Some(m) = output_mismatch(&y, case.t(key), case.dtype()) {
                failures.push(format!("{name}: {key} {m}"));
            }
        }
        let adapters = case.adapters();
        if adapters.len() > 1 {
            for (a, _) in &adapters {
                pm.set_adapter(&[a.as_str()]).unwrap();
                let y = pm.model().forward(&x).unwrap();
                check_tensor(&mut failures, format!("{name}: eval_output_{a}"), &y, case.t(&format!("eval_output_{a}")), tol);
            }
            let active = case.active();
            pm.set_adapter(&active.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        }
        let y = pm.with_adapters_disabled(|m| m.model().forward(&x).unwrap()).unwrap();
        check_tensor(&mut failures, format!("{name}: base_output"), &y, case.t("base_output"), tol);
        pm.merge_adapter(None, true).unwrap();
        for lin in pm.registry().sites() {
            let k = format!("merged_weight.{}", lin.site().path());
            if case.has(&k) {
                check_tensor(&mut failures, format!("{name}: {k}"), &lin.site().weight().unwrap(), case.t(&k), tol.max(1e-6));
            }
        }
        let y = pm.model().forward(&x).unwrap();
        check_tensor(&mut failures, format!("{name}: merged_output"), &y, case.t("merged_output"), tol.max(5e-6));
        pm.unmerge_adapter().unwrap();
        for lin in pm.registry().sites() {
            let k = format!("unmerged_weight.{}", lin.site().path());
            if case.has(&k) {
                check_tensor(&mut failures, format!("{name}: {k}"), &lin.site().weight().unwrap(), case.t(&k), tol.max(1e-6));
            }
        }
        let y = pm.model().forward(&x).unwrap();
        check_tensor(&mut failures, format!("{name}: eval after unmerge"), &y, case.t("eval_output"), tol.max(5e-6));
    }
    report(failures);
}

#[test]
fn train_mode_with_dropout_matches_peft() {
    let mut checked = 0;
    for name in vera_cases() {
        let case = load(&name);
        let Some(seed) = case.meta["train"]["seed"].as_u64() else { continue };
        let pm = load_case_model(&case);
        pm.state().manual_seed(seed).unwrap();
        pm.train().unwrap();
        let y = pm.model().forward(case.t("input")).unwrap();
        let d = max_abs_diff(&y, case.t("train_output"));
        assert!(d < 2e-6, "{name}: train_output max abs diff {d}");
        // No KL term: VeRA has no latent.
        assert!(pm.state().drain_kl_mean().unwrap().is_none(), "{name}: a VeRA forward pushed a KL term");
        pm.eval().unwrap();
        let e = pm.model().forward(case.t("input")).unwrap();
        assert!(max_abs_diff(&e, case.t("eval_output")) < 2e-6 && max_abs_diff(&e, &y) > 1e-3, "{name}");
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn lambda_gradients_match_peft() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in vera_cases() {
        let case = load(&name);
        if !case.has("grad_weights") {
            continue;
        }
        let (model, reg, info) = build_base(&case);
        let (adapter, dir) = &case.adapters()[0];
        let pm = PeftModel::from_pretrained(model, reg, info, dir, adapter, true).unwrap();
        pm.train().unwrap();
        let y = pm.model().forward(case.t("input")).unwrap().to_dtype(DType::F32).unwrap();
        let loss = (y * case.t("grad_weights")).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for path in &pm.adapter(adapter).unwrap().targets {
            let site = pm.registry().site(path).unwrap();
            let (lb, ld) = site.with_slot(adapter, |s| (s.lambda_b().clone(), s.lambda_d().clone())).unwrap();
            for (which, var) in [("b", lb), ("d", ld)] {
                let k = format!("grad.lambda_{which}.{path}.{adapter}");
                let Some(g) = grads.get(var.as_tensor()) else {
                    failures.push(format!("{name}: {k}: no gradient"));
                    continue;
                };
                let want = case.t(&k);
                let (ex, maxd) = excess(g, want, 1e-6, 1e-5);
                checked += 1;
                if ex > 0.0 {
                    failures.push(format!("{name}: {k} max abs diff {maxd}"));
                }
            }
        }
    }
    assert!(checked >= 12, "{checked}");
    report(failures);
}

#[test]
fn peft_files_round_trip_through_rust_bit_for_bit() {
    let mut failures = Vec::new();
    for name in vera_cases() {
        let case = load(&name);
        let pm = load_case_model(&case);
        let tmp = tempfile::tempdir().unwrap();
        pm.save_pretrained(tmp.path(), None).unwrap();
        for (adapter, dir) in case.adapters() {
            let ours = checkpoint::adapter_dir(tmp.path(), &adapter);
            let (want, _) = checkpoint::read_safetensors(&dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
            let (got, _) = checkpoint::read_safetensors(&ours.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
            let (wk, gk): (Vec<_>, Vec<_>) = (want.keys().collect(), got.keys().collect());
            if wk != gk {
                failures.push(format!("{name}/{adapter}: keys differ:\n  peft {wk:?}\n  ours {gk:?}"));
                continue;
            }
            for (k, w) in &want {
                if w.file_dtype != got[k].file_dtype || !bits_equal(&w.tensor, &got[k].tensor) {
                    failures.push(format!("{name}/{adapter}: {k} differs"));
                }
            }
            let (a, b) = (json(&dir.join("adapter_config.json")), json(&ours.join("adapter_config.json")));
            for (k, v) in a.as_object().unwrap() {
                let (mut v, mut w) = (v.clone(), b[k].clone());
                if let (Some(x), Some(y)) = (v.as_array_mut(), w.as_array_mut()) {
                    x.sort_by_key(|e| e.to_string());
                    y.sort_by_key(|e| e.to_string());
                }
                if k != "peft_version" && k != "auto_mapping" && v != w {
                    failures.push(format!("{name}/{adapter}: config {k}: peft {v} ours {w}"));
                }
            }
            if a.as_object().unwrap().len() != b.as_object().unwrap().len() {
                failures.push(format!("{name}/{adapter}: other keys in the config: {b}"));
            }
        }
    }
    report(failures);
}

// ---- model families -----------------------------------------------------------------------------

fn family_inputs(io: &BTreeMap<String, Tensor>) -> ModelInputs {
    ModelInputs {
        input_ids: io.get("input_ids").cloned(),
        attention_mask: io.get("attention_mask").cloned(),
        token_type_ids: io.get("token_type_ids").cloned(),
        pixel_values: io.get("pixel_values").cloned(),
    }
}

fn family_fields(o: &ModelOutputs) -> Vec<(&'static str, Tensor)> {
    let mut v = vec![("last_hidden_state", o.last_hidden_state.clone())];
    if let Some(p) = &o.pooler_output {
        v.push(("pooler_output", p.clone()));
    }
    v
}

#[test]
fn model_families_match_peft_eval_and_merged() {
    let mut failures = Vec::new();
    let cases = cases_in(&root().join("families"));
    assert!(cases.len() >= 4, "{cases:?}");
    for name in cases {
        let dir = root().join("families").join(&name);
        let meta = json(&dir.join("case.json"));
        let (io, _) = checkpoint::read_safetensors(&dir.join("io.safetensors"), &Device::Cpu).unwrap();
        let io: BTreeMap<String, Tensor> = io.into_iter().map(|(k, v)| (k, v.tensor)).collect();
        let md = ModelDir::open(&dir.join(meta["model_dir"].as_str().unwrap())).unwrap();
        let (m, reg, info) = AnyModel::load(&md, None, &Device::Cpu, Arc::new(RunState::new(0))).unwrap();
        let mut pm = PeftModel::from_pretrained(m, reg, info, &dir.join("adapter"), "default", false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(pm.method("default").unwrap(), Method::Vera);
        let x = family_inputs(&io);
        for stage in ["eval", "merged"] {
            if stage == "merged" {
                pm.merge_adapter(None, true).unwrap();
            }
            let out = pm.model().forward(&x).unwrap();
            for (field, y) in family_fields(&out) {
                let key = format!("{stage}.{field}");
                let Some(want) = io.get(&key) else { continue };
                let (ex, maxd) = excess(&y, want, 1e-5, 1e-5);
                if ex > 0.0 {
                    failures.push(format!("{name}: {key} max abs diff {maxd}"));
                }
            }
        }
        // The adapter changes the output (the test could not pass on the base model).
        let d = max_abs_diff(&io["eval.last_hidden_state"], &io["base.last_hidden_state"]);
        assert!(d > 1e-4, "{name}: {d}");
    }
    report(failures);
}

// ---- the seam: no sampling, no KL; both methods on one model ------------------------------------

#[test]
fn sampling_is_refused_on_vera_adapters_and_ignored_by_their_layers() {
    let case = load("mlp_list");
    let pm = load_case_model(&case);
    let x = case.t("input").clone();
    // Monte Carlo on a VeRA adapter: a request error naming the adapter.
    let e = mc_predict(&pm, &x, &McConfig::default(), |x: &Tensor| pm.model().forward(x)).unwrap_err();
    assert!(matches!(&e, Error::Request(m) if m.contains("`default`") && m.contains("VeRA")), "{e}");
    // Switching sampling on for it: the same error; nothing changed.
    let e = pm.set_sample_at_inference("default", None, true).unwrap_err();
    assert!(matches!(e, Error::Request(_)), "{e}");
    assert!(pm.set_sample_at_inference("default", None, false).is_ok());
    // The run-wide override does not make a VeRA layer sample: eval and train give the mean path.
    pm.state().set_sampling(Sampling::Always).unwrap();
    let y = pm.model().forward(&x).unwrap();
    assert!(max_abs_diff(&y, case.t("eval_output")) < 2e-6);
    pm.train().unwrap();
    let y = pm.model().forward(&x).unwrap();
    assert!(max_abs_diff(&y, case.t("eval_output")) < 2e-6, "no dropout, no sampling: train = eval for VeRA");
    assert!(pm.state().drain_kl_mean().unwrap().is_none());
}

#[test]
fn a_kl_weight_is_refused_for_a_vera_adapter() {
    let case = load("mlp_list");
    let (model, reg, info) = build_base(&case);
    let (adapter, dir) = &case.adapters()[0];
    let mut pm = PeftModel::from_pretrained(model, reg, info, dir, adapter, true).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = pvera::train::TrainConfig { kl_weight: 0.5, output_dir: tmp.path().join("out"), ..Default::default() };
    let mut trainer = pvera::train::Trainer::new(cfg).unwrap();
    let mut data = ToyData(case.t("input").clone());
    let e = trainer.fit(&mut pm, &ToyObjective, &mut data, |_| {}).unwrap_err();
    assert!(matches!(&e, Error::InvalidConfig { field, .. } if field == "kl_weight"), "{e}");
}

/// One batch of inputs; the loss is the mean output (enough to reach the KL check).
struct ToyData(Tensor);
struct ToyObjective;

impl pvera::train::TrainData for ToyData {
    type Batch = Tensor;
    fn num_train_batches(&self) -> usize {
        1
    }
    fn train_batches(&mut self, _epoch: usize) -> pvera::Result<pvera::train::Batches<'_, Tensor>> {
        Ok(Box::new(std::iter::once(Ok(self.0.clone()))))
    }
    fn val_batches(&mut self) -> pvera::Result<pvera::train::Batches<'_, Tensor>> {
        Ok(Box::new(std::iter::empty()))
    }
}

impl pvera::train::Objective<TestModel> for ToyObjective {
    type Batch = Tensor;
    fn step(&self, model: &PeftModel<TestModel>, batch: &Tensor) -> pvera::Result<pvera::train::StepOutput> {
        let y = model.model().forward(batch)?;
        Ok(pvera::train::StepOutput { loss: y.mean_all()?, examples: batch.dims()[0], correct: None })
    }
}

/// A PVeRA and a VeRA adapter on one model: each has its own projections (the PVeRA key's A has
/// 2r rows, VeRA's r), each alone gives its PEFT output, and saving writes each in its own format.
#[test]
fn pvera_and_vera_adapters_share_a_model_not_projections() {
    let pv = Case::load("mlp_list"); // the PVeRA fixture (same MLP base, same targets)
    let ve = load("mlp_list");
    let (model, reg, info) = build_base(&ve);
    let mut pm = PeftModel::from_pretrained(model, reg, info, &ve.adapters()[0].1, "vera", false).unwrap();
    pm.load_adapter(&pv.adapters()[0].1, "pvera", false).unwrap();
    assert_eq!(pm.method("vera").unwrap(), Method::Vera);
    assert_eq!(pm.method("pvera").unwrap(), Method::Pvera);
    let (pa, va) = (pm.adapter("pvera").unwrap().projections.clone(), pm.adapter("vera").unwrap().projections.clone());
    assert!(!Arc::ptr_eq(&pa, &va));
    assert_eq!((pa.a().dims()[0], va.a().dims()[0]), (8, 4));
    for (name, case) in [("vera", &ve), ("pvera", &pv)] {
        pm.set_adapter(&[name]).unwrap();
        let y = pm.model().forward(case.t("input")).unwrap();
        assert!(max_abs_diff(&y, case.t("eval_output")) < 2e-6, "{name}");
    }
    // Both active: the deltas add, as two adapters of one method do.
    pm.set_adapter(&["vera", "pvera"]).unwrap();
    let both = pm.model().forward(ve.t("input")).unwrap();
    let base = pm.with_adapters_disabled(|m| m.model().forward(ve.t("input")).unwrap()).unwrap();
    let sum = ((ve.t("eval_output") + pv.t("eval_output")).unwrap() - &base).unwrap();
    // (log-softmax output: compare before the non-linearity is not possible, so check it moved)
    assert!(max_abs_diff(&both, &base) > 1e-3 && max_abs_diff(&both, &sum) < 10.0);
    // Monte Carlo with both active samples the PVeRA one only: allowed.
    assert!(mc_predict(&pm, ve.t("input"), &McConfig { samples: 2, ..Default::default() }, |x: &Tensor| pm.model().forward(x)).is_ok());
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path(), None).unwrap();
    let keys = |a: &str| {
        let (t, _) = checkpoint::read_safetensors(&tmp.path().join(a).join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        t.into_keys().collect::<Vec<_>>()
    };
    assert!(keys("vera").iter().all(|k| !k.contains("pvera")) && keys("vera").contains(&"base_model.vera_A".to_string()));
    assert!(keys("pvera").contains(&"base_model.pvera_A".to_string()));
    assert_eq!(PveraConfig::from_dir(&tmp.path().join("vera")).unwrap().method, Method::Vera);
}

/// Adapters of one method must agree on the key (PEFT's check); the other method's do not count.
#[test]
fn the_projection_key_check_is_per_method() {
    let case = load("mlp_list");
    let (model, reg, info) = build_base(&case);
    let mut pm = PeftModel::from_pretrained(model, reg, info, &case.adapters()[0].1, "v", false).unwrap();
    let t = Some(TargetModules::list(["lin1"]));
    let e = pm.add_adapter("v2", vera(|c| (c.r, c.target_modules, c.projection_prng_key) = (4, t.clone(), 9))).unwrap_err();
    assert!(e.to_string().starts_with("Vera PRNG initialisation key must be the same for all adapters"), "{e}");
    // A PVeRA adapter with another key and rank is fine: it has its own projections.
    pm.add_adapter("p", PveraConfig { r: 3, target_modules: t.clone(), projection_prng_key: 9, ..Default::default() }).unwrap();
    // Another VeRA rank is refused (shared projections), naming VeRA.
    let e = pm.add_adapter("v3", vera(|c| (c.r, c.target_modules) = (5, t.clone()))).unwrap_err();
    assert!(e.to_string().contains("VeRA"), "{e}");
}

// ---- validate / inspect ---------------------------------------------------------------------------

#[test]
fn every_vera_fixture_adapter_validates_clean() {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for name in vera_cases() {
        dirs.extend(load(&name).adapters().into_iter().map(|(_, d)| d));
    }
    for name in cases_in(&root().join("families")) {
        dirs.push(root().join("families").join(name).join("adapter"));
    }
    for d in dirs {
        let r = validate::validate_adapter_dir(&d);
        assert_eq!(r.method, Method::Vera, "{}", d.display());
        let errors: Vec<String> = r.problems.iter().filter(|p| p.severity() == Severity::Error).map(|p| p.message()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", d.display());
        // Stored projections are the key's (PEFT drew them on an AVX2 build; a bf16 model's
        // adapter stores them rounded to bf16).
        if let Some(c) = r.projections {
            assert!(c.differ_fma_kernel == 0 || c.rounded_to == Some("BF16"), "{}: {c:?}", d.display());
        }
        // Trainable values: every tensor but vera_A / vera_B.
        let lambdas: usize =
            r.tensors.iter().filter(|(k, _)| !k.ends_with("vera_A") && !k.ends_with("vera_B")).map(|(_, t)| t.tensor.elem_count()).sum();
        assert_eq!(r.trainable_params(), lambdas);
    }
}

/// Copies a fixture adapter, editing its tensors.
fn edited(src: &Path, dst: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("adapter_config.json"), dst.join("adapter_config.json")).unwrap();
    let (ts, _) = checkpoint::read_safetensors(&src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut ts: BTreeMap<String, Tensor> = ts.into_iter().map(|(k, v)| (k, v.tensor)).collect();
    edit(&mut ts);
    std::fs::write(dst.join("adapter_model.safetensors"), checkpoint::serialize_safetensors(&ts, Some(checkpoint::pt_metadata())).unwrap()).unwrap();
}

#[test]
fn validate_and_the_loader_agree_on_broken_vera_files() {
    let case = load("mlp_list");
    let src = &case.adapters()[0].1;
    let tmp = tempfile::tempdir().unwrap();
    let load = |d: &Path| {
        let (model, reg, info) = build_base(&case);
        PeftModel::from_pretrained(model, reg, info, d, "default", false).map(|_| ())
    };
    // λ_d of 2r values (a PVeRA length) in a VeRA file.
    let d = tmp.path().join("long_d");
    edited(src, &d, |t| {
        let k = checkpoint::lambda_d_key(Method::Vera, "lin0");
        t.insert(k, Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap());
    });
    let r = validate::validate_adapter_dir(&d);
    let e = r.first_error().unwrap();
    assert!(matches!(e, Error::ShapeMismatch { key, .. } if key.ends_with("lin0.vera_lambda_d")), "{e}");
    assert!(e.to_string().contains("λ_d holds r values"), "{e}");
    assert!(matches!(load(&d).unwrap_err(), Error::ShapeMismatch { .. }));
    // No vera_A under save_projection=true: PEFT's message with VeRA's names.
    let d = tmp.path().join("no_a");
    edited(src, &d, |t| {
        t.remove(checkpoint::VERA_PROJ_A_KEY);
        t.remove(checkpoint::VERA_PROJ_B_KEY);
    });
    let e = load(&d).unwrap_err();
    assert!(e.to_string().contains("Specified to load vera_A and vera_B from state dictionary"), "{e}");
    assert_eq!(validate::validate_adapter_dir(&d).first_error().map(|e| e.to_string()), Some(e.to_string()));
    // vera_B missing but vera_A the key's: the regenerated B, with the loader's warning in both.
    let d = tmp.path().join("no_b");
    edited(src, &d, |t| drop(t.remove(checkpoint::VERA_PROJ_B_KEY)));
    let r = validate::validate_adapter_dir(&d);
    assert!(r.would_load(), "{:?}", r.problems);
    assert!(r.problems.iter().any(|p| p.class() == validate::REGENERATED_B && p.message().contains("vera_B is missing")));
    let (model, reg, info) = build_base(&case);
    let pm = PeftModel::from_pretrained(model, reg, info, &d, "default", false).unwrap();
    assert!(max_abs_diff(&pm.model().forward(case.t("input")).unwrap(), case.t("eval_output")) < 2e-6);
    // PVeRA keys in a VeRA file are foreign tensors (kept, warned), not λ's.
    let d = tmp.path().join("foreign");
    edited(src, &d, |t| {
        t.insert(checkpoint::lambda_b_key(Method::Pvera, "lin0"), Tensor::zeros(20, DType::F32, &Device::Cpu).unwrap());
    });
    let r = validate::validate_adapter_dir(&d);
    assert!(r.would_load());
    assert!(r.problems.iter().any(|p| p.class() == validate::FOREIGN_TENSORS && p.message().contains("pvera_lambda_b")));
    // A file whose config cannot be read: the method is told by its keys.
    let d = tmp.path().join("bad_config");
    edited(src, &d, |_| {});
    std::fs::write(d.join("adapter_config.json"), "{not json").unwrap();
    assert_eq!(validate::validate_adapter_dir(&d).method, Method::Vera);
}

// ---- Rust-written adapters for PEFT ---------------------------------------------------------------

/// Writes VeRA case directories in make_fixtures.py's layout, every output computed by pvera, for
/// `python3 tools/check_in_peft.py DIR` to recompute in PEFT. Into `$PVERA_VERA_CASES_OUT` when set
/// (the reverse check), else a temporary directory; either way the written adapters reload in Rust
/// with the same outputs.
#[test]
fn rust_written_vera_cases_load_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var_os("PVERA_VERA_CASES_OUT").map(PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    let base_case = load("mlp_list");
    let conv_case = load("conv1d");
    let t = |v: &[&str]| Some(TargetModules::list(v.iter().map(|s| s.to_string())));
    let specs: Vec<(&str, &Case, Vec<(&str, PveraConfig)>, bool)> = vec![
        ("rust_vera_mlp", &base_case, vec![("default", vera(|c| (c.r, c.target_modules, c.init_weights) = (6, t(&["lin0", "lin1", "lin3"]), false)))], true),
        (
            "rust_vera_two",
            &base_case,
            vec![
                ("default", vera(|c| (c.r, c.target_modules, c.init_weights, c.projection_prng_key) = (3, t(&["lin1", "lin2"]), false, 77))),
                ("other", vera(|c| (c.r, c.target_modules, c.init_weights, c.projection_prng_key) = (3, t(&["lin2"]), false, 77))),
            ],
            false,
        ),
        ("rust_vera_no_projection", &base_case, vec![("default", vera(|c| (c.r, c.target_modules, c.init_weights, c.save_projection) = (4, t(&["lin0", "lin2"]), false, false)))], false),
        ("rust_vera_conv1d", &conv_case, vec![("default", vera(|c| (c.r, c.target_modules, c.init_weights) = (5, t(&["conv1d_a", "conv1d_b"]), false)))], true),
    ];
    for (name, src, adapters, grads) in specs {
        let dir = out.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.dir.join("base_model.safetensors"), dir.join("base_model.safetensors")).unwrap();
        let (model, reg, info) = build_base(src);
        reg.state().manual_seed(17).unwrap();
        let mut pm = PeftModel::new(model, reg, info, adapters[0].1.clone(), adapters[0].0).unwrap();
        for (a, cfg) in &adapters[1..] {
            pm.add_adapter(a, cfg.clone()).unwrap();
        }
        let names: Vec<&str> = adapters.iter().map(|a| a.0).collect();
        pm.set_adapter(&names).unwrap();
        pm.save_pretrained(&dir.join("adapter"), None).unwrap();
        let mut io: BTreeMap<String, Tensor> = BTreeMap::new();
        io.insert("input".into(), src.t("input").clone());
        io.insert("input_b1".into(), src.t("input_b1").clone());
        let x = src.t("input").clone();
        if grads {
            let w = src.t("grad_weights").clone();
            pm.train().unwrap();
            let loss = (pm.model().forward(&x).unwrap() * &w).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            for path in &pm.adapter("default").unwrap().targets.clone() {
                let site = pm.registry().site(path).unwrap();
                let (lb, ld) = site.with_slot("default", |s| (s.lambda_b().clone(), s.lambda_d().clone())).unwrap();
                io.insert(format!("grad.lambda_b.{path}.default"), g.get(lb.as_tensor()).unwrap().clone());
                io.insert(format!("grad.lambda_d.{path}.default"), g.get(ld.as_tensor()).unwrap().clone());
            }
            io.insert("grad_weights".into(), w);
            pm.eval().unwrap();
        }
        let info0 = pm.adapter(names[0]).unwrap().clone();
        io.insert("vera_A".into(), info0.projections.a().clone());
        io.insert("vera_B".into(), info0.projections.b().clone());
        for lin in pm.registry().sites() {
            let site = lin.site();
            for a in &names {
                if site.has_adapter(a).unwrap() {
                    let p = site.path();
                    let (lb, ld) = site.with_slot(a, |s| (s.lambda_b().as_detached_tensor(), s.lambda_d().as_detached_tensor())).unwrap();
                    io.insert(format!("lambda_b.{p}.{a}"), lb);
                    io.insert(format!("lambda_d.{p}.{a}"), ld);
                    io.insert(format!("delta_weight.{p}.{a}"), site.delta_weight(a).unwrap());
                }
            }
        }
        io.insert("eval_output".into(), pm.model().forward(&x).unwrap());
        io.insert("eval_output_b1".into(), pm.model().forward(src.t("input_b1")).unwrap());
        if names.len() > 1 {
            for a in &names {
                pm.set_adapter(&[a]).unwrap();
                io.insert(format!("eval_output_{a}"), pm.model().forward(&x).unwrap());
            }
            pm.set_adapter(&names).unwrap();
        }
        io.insert("base_output".into(), pm.with_adapters_disabled(|m| m.model().forward(&x).unwrap()).unwrap());
        pm.merge_adapter(None, true).unwrap();
        let targeted: Vec<String> = pm.registry().sites().iter().filter(|l| l.site().is_targeted().unwrap()).map(|l| l.site().path().to_string()).collect();
        for p in &targeted {
            io.insert(format!("merged_weight.{p}"), pm.registry().site(p).unwrap().weight().unwrap());
        }
        io.insert("merged_output".into(), pm.model().forward(&x).unwrap());
        pm.unmerge_adapter().unwrap();
        for p in &targeted {
            io.insert(format!("unmerged_weight.{p}"), pm.registry().site(p).unwrap().weight().unwrap());
        }
        let io: BTreeMap<String, Tensor> = io.into_iter().map(|(k, v)| (k, v.contiguous().unwrap())).collect();
        std::fs::write(dir.join("io.safetensors"), checkpoint::serialize_safetensors(&io, Some(checkpoint::pt_metadata())).unwrap()).unwrap();
        let checks: serde_json::Map<String, Value> = io
            .keys()
            .filter(|k| !matches!(k.as_str(), "input" | "input_b1" | "grad_weights"))
            .map(|k| (k.clone(), Value::String("computed by pvera (tests/integration/vera.rs)".into())))
            .collect();
        let meta = serde_json::json!({
            "method": "vera",
            "model": src.meta["model"],
            "dtype": "float32",
            "adapters": names.iter().map(|a| serde_json::json!({
                "name": a, "dir": if *a == "default" { "adapter".to_string() } else { format!("adapter/{a}") },
            })).collect::<Vec<_>>(),
            "active": names,
            "checks": checks,
            "sampling": null,
            "train": null,
            "grads": grads,
            "notes": "written by pvera: PeftModel::new with VeRA configs (init_weights=false, global generator seeded 17)",
        });
        std::fs::write(dir.join("case.json"), serde_json::to_string_pretty(&meta).unwrap()).unwrap();
        // What Rust wrote loads back in Rust with the same outputs.
        let case = Case::load_from(&out, name);
        let again = load_case_model(&case);
        let y = again.model().forward(case.t("input")).unwrap();
        // (the writer's adapters were trainable, so it ran the unmerged path; the reload merges)
        assert!(max_abs_diff(&y, case.t("eval_output")) < 2e-6, "{name}: reloaded output differs");
        assert_eq!(PveraConfig::from_dir(&dir.join("adapter")).unwrap().method, Method::Vera);
    }
}
