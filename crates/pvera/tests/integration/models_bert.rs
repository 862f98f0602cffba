//! BERT / RoBERTa against transformers 5.24 + PEFT 0.21.2 (fixtures:
//! `tools/make_model_fixtures_bert.py`, one directory per case under `fixtures/models/bert_*`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint;
use pvera::models::loader::ModelDir;
use pvera::models::{AnyModel, ModelInputs, ModelOutputs};
use pvera::{Error, ModelInfo, PeftModel, PveraConfig, Registry, RunState, Sampling};
use serde_json::Value;

use crate::common::{excess, fixtures};

struct BertCase {
    name: String,
    dir: PathBuf,
    meta: Value,
    io: BTreeMap<String, Tensor>,
}

impl BertCase {
    fn load(name: &str) -> BertCase {
        let dir = fixtures().join("models").join(name);
        let meta: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("case.json"))
                .unwrap_or_else(|e| panic!("{name}: case.json ({e}); run tools/make_model_fixtures_bert.py")),
        )
        .unwrap();
        let (io, _) = checkpoint::read_safetensors(&dir.join("io.safetensors"), &Device::Cpu).unwrap();
        let io = io.into_iter().map(|(k, v)| (k, v.tensor)).collect();
        BertCase { name: name.into(), dir, meta, io }
    }
    fn t(&self, key: &str) -> &Tensor {
        self.io.get(key).unwrap_or_else(|| panic!("{}: io.safetensors has no {key}", self.name))
    }
    fn has(&self, key: &str) -> bool {
        self.io.contains_key(key)
    }
    fn dtype(&self) -> DType {
        match self.meta["dtype"].as_str().unwrap() {
            "float32" => DType::F32,
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            other => panic!("unknown dtype {other}"),
        }
    }
    fn inputs(&self) -> ModelInputs {
        ModelInputs {
            input_ids: Some(self.t("input_ids").clone()),
            attention_mask: Some(self.t("attention_mask").clone()),
            token_type_ids: self.io.get("token_type_ids").cloned(),
            pixel_values: None,
        }
    }
    fn model_dir(&self) -> PathBuf {
        self.dir.join("model")
    }
    /// Base model in `dtype` (None: as stored).
    fn model(&self, dtype: Option<DType>) -> (AnyModel, Registry, ModelInfo) {
        load_model(&self.model_dir(), dtype)
    }
    fn peft(&self, adapter: &str, dtype: Option<DType>) -> PeftModel<AnyModel> {
        let (m, reg, info) = self.model(dtype);
        PeftModel::from_pretrained(m, reg, info, &self.dir.join(adapter), "default", false)
            .unwrap_or_else(|e| panic!("{}: from_pretrained({adapter}) failed: {e}", self.name))
    }
}

fn load_model(dir: &Path, dtype: Option<DType>) -> (AnyModel, Registry, ModelInfo) {
    let md = ModelDir::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    AnyModel::load(&md, dtype, &Device::Cpu, Arc::new(RunState::new(0)))
        .unwrap_or_else(|e| panic!("{}: AnyModel::load: {e}", dir.display()))
}

/// (atol, rtol) for f32 outputs, as the brief asks: 1e-5 + 1e-5 |y|.
const F32_TOL: (f32, f32) = (1e-5, 1e-5);

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    excess(a, b, 0.0, 0.0).1
}

fn fields(out: &ModelOutputs) -> [(&'static str, Option<&Tensor>); 2] {
    [("last_hidden_state", Some(&out.last_hidden_state)), ("pooler_output", out.pooler_output.as_ref())]
}

/// Compares every field `<what>.<field>` that the case stores with `out`. f32: within
/// [`F32_TOL`]. f16 / bf16: transformers' half-precision result is itself only as close to the
/// exact result as rounding allows, so `exact` names the f32 computation over the same weights and
/// the check is that we are as accurate as transformers (`|ours - exact| <= 1.5 |torch - exact|`
/// plus a few ulp) and close to transformers' half result (`<= max(ulp tol, 2.5 |torch - exact|)`).
fn compare(case: &BertCase, what: &str, exact: Option<&str>, out: &ModelOutputs, dtype: DType, failures: &mut Vec<String>) -> f32 {
    let mut worst = 0f32;
    let mut seen = 0;
    for (field, ours) in fields(out) {
        let key = format!("{what}.{field}");
        if !case.has(&key) {
            if ours.is_some() && field == "pooler_output" {
                failures.push(format!("{}: we produce {key} but transformers has none", case.name));
            }
            continue;
        }
        seen += 1;
        let Some(ours) = ours else {
            failures.push(format!("{}: no {field} produced; transformers has {key}", case.name));
            continue;
        };
        let want = case.t(&key);
        if ours.dims() != want.dims() {
            failures.push(format!("{}: {key} shape {:?}, expected {:?}", case.name, ours.dims(), want.dims()));
            continue;
        }
        if ours.dtype() != want.dtype() || ours.dtype() != dtype {
            failures.push(format!("{}: {key} dtype {:?}, expected {:?}", case.name, ours.dtype(), want.dtype()));
        }
        let d = max_diff(ours, want);
        worst = worst.max(d);
        if dtype == DType::F32 {
            let (ex, _) = excess(ours, want, F32_TOL.0, F32_TOL.1);
            eprintln!("{:<18} {key:<38} max |rust - transformers| = {d:.3e}", case.name);
            if ex > 0.0 {
                failures.push(format!("{}: {key}: max abs diff {d} exceeds {} + {}*|y|", case.name, F32_TOL.0, F32_TOL.1));
            }
            continue;
        }
        let exact_key = format!("{}.{field}", exact.expect("half-precision checks need an f32 reference"));
        let exact = case.t(&exact_key);
        let e_ours = max_diff(ours, exact);
        let e_torch = max_diff(want, exact);
        let ulp = if dtype == DType::F16 { 4e-3 } else { 3e-2 };
        eprintln!(
            "{:<18} {key:<38} max |rust - transformers| = {d:.3e}; vs f32 ({exact_key}): rust {e_ours:.3e}, transformers {e_torch:.3e}",
            case.name
        );
        if e_ours > 1.5 * e_torch + ulp {
            failures.push(format!(
                "{}: {key}: less accurate than transformers: |rust - f32| = {e_ours}, |transformers - f32| = {e_torch}",
                case.name
            ));
        }
        if d > ulp.max(2.5 * e_torch) {
            failures.push(format!("{}: {key}: max abs diff {d} to transformers' {dtype:?} result", case.name));
        }
    }
    assert!(seen > 0, "{}: no output {what}.* in io.safetensors", case.name);
    worst
}

fn report(failures: Vec<String>) {
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

fn fwd(pm: &PeftModel<AnyModel>, inputs: &ModelInputs) -> ModelOutputs {
    pm.model().forward(inputs).unwrap()
}

const BASE_CASES: &[&str] = &["bert_tiny", "bert_seq_cls", "bert_roberta_tiny", "bert_f16", "bert_sharded", "bert_sampled"];

#[test]
fn base_models_match_transformers() {
    let mut failures = Vec::new();
    for name in BASE_CASES {
        let case = BertCase::load(name);
        let (m, _, _) = case.model(None);
        let out = m.forward(&case.inputs()).unwrap();
        let exact = (case.dtype() != DType::F32).then_some("f32_base");
        compare(&case, "base", exact, &out, case.dtype(), &mut failures);
        assert_eq!(out.last_hidden_state.dtype(), case.dtype(), "{name}: output in the model dtype");
    }
    report(failures);
}

#[test]
fn input_ids_alone_default_token_types_and_no_mask() {
    let mut failures = Vec::new();
    for name in ["bert_tiny", "bert_roberta_tiny"] {
        let case = BertCase::load(name);
        let (m, _, _) = case.model(None);
        let inputs = ModelInputs { input_ids: Some(case.t("input_ids").clone()), ..Default::default() };
        let out = m.forward(&inputs).unwrap();
        compare(&case, "ids_only", None, &out, case.dtype(), &mut failures);
    }
    report(failures);
}

#[test]
fn explicit_zero_token_types_and_all_ones_mask_equal_the_defaults() {
    let case = BertCase::load("bert_tiny");
    let (m, _, _) = case.model(None);
    let ids = case.t("input_ids").clone();
    let plain = m.forward(&ModelInputs { input_ids: Some(ids.clone()), ..Default::default() }).unwrap();
    let explicit = m
        .forward(&ModelInputs {
            input_ids: Some(ids.clone()),
            attention_mask: Some(ids.ones_like().unwrap()),
            token_type_ids: Some(ids.zeros_like().unwrap()),
            pixel_values: None,
        })
        .unwrap();
    let (_, d) = excess(&plain.last_hidden_state, &explicit.last_hidden_state, 0.0, 0.0);
    assert_eq!(d, 0.0);
    // u32 ids and a float mask give the same result as int64
    let ids32 = ids.to_dtype(DType::U32).unwrap();
    let maskf = case.t("attention_mask").to_dtype(DType::F32).unwrap();
    let a = m.forward(&case.inputs()).unwrap();
    let b = m
        .forward(&ModelInputs {
            input_ids: Some(ids32),
            attention_mask: Some(maskf),
            token_type_ids: Some(case.t("token_type_ids").to_dtype(DType::U32).unwrap()),
            pixel_values: None,
        })
        .unwrap();
    let (_, d) = excess(&a.last_hidden_state, &b.last_hidden_state, 0.0, 0.0);
    assert_eq!(d, 0.0);
}

/// Eval (mean path), merged, and eval again after unmerging, for every adapter of the cases whose
/// adapters are trained on the base class.
#[test]
fn adapters_match_peft_eval_and_merged() {
    let mut failures = Vec::new();
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("bert_tiny", &[("adapter", ""), ("adapter_all_linear", "_all_linear")]),
        ("bert_roberta_tiny", &[("adapter", "")]),
        ("bert_f16", &[("adapter", "")]),
        ("bert_sharded", &[("adapter", "")]),
    ];
    for (name, adapters) in cases {
        let case = BertCase::load(name);
        let inputs = case.inputs();
        for (adapter, suffix) in *adapters {
            let mut pm = case.peft(adapter, None);
            let w = pm.take_warnings();
            assert!(w.iter().all(|w| !w.contains("ignored")), "{name}: unexpected warnings {w:?}");
            let half = case.dtype() != DType::F32;
            let exact_eval = format!("f32_eval{suffix}");
            let exact_eval = half.then_some(exact_eval.as_str());
            let exact_base = half.then_some("f32_base");
            let dt = case.dtype();
            compare(&case, &format!("eval{suffix}"), exact_eval, &fwd(&pm, &inputs), dt, &mut failures);
            let disabled = pm.with_adapters_disabled(|m| m.model().forward(&inputs).unwrap()).unwrap();
            compare(&case, "base", exact_base, &disabled, dt, &mut failures);
            pm.merge_adapter(None, true).unwrap();
            compare(&case, &format!("merged{suffix}"), exact_eval, &fwd(&pm, &inputs), dt, &mut failures);
            pm.unmerge_adapter().unwrap();
            compare(&case, &format!("eval{suffix}"), exact_eval, &fwd(&pm, &inputs), dt, &mut failures);
        }
    }
    report(failures);
}

/// issue 16 row 1: `modules_to_save` copies travel into the merged model, as PEFT's
/// `merge_and_unload()` / `unload()` replace the wrapper by the trained copy; `pvera merge` writes
/// the registry's base tensors, so the registry must hold the copy's values.
#[test]
fn merge_and_unload_carries_modules_to_save_copies_like_peft() {
    let case = BertCase::load("bert_modules_to_save");
    let inputs = case.inputs();
    let mut failures = Vec::new();
    let pm = case.peft("adapter", None);
    assert_eq!(pm.adapter("default").unwrap().modules_to_save, vec!["pooler.dense".to_string()]);
    compare(&case, "eval", None, &fwd(&pm, &inputs), DType::F32, &mut failures);
    let (m, reg) = pm.merge_and_unload(true, None).unwrap();
    compare(&case, "merge_and_unload", None, &m.forward(&inputs).unwrap(), DType::F32, &mut failures);
    // The registry's pooler is the adapter's trained copy, bit for bit.
    let (file, _) = checkpoint::read_safetensors(&case.dir.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    let site = reg.site("pooler.dense").unwrap();
    for (got, param) in [(site.weight().unwrap(), "weight"), (site.bias().unwrap().unwrap(), "bias")] {
        let want = &file[&checkpoint::module_param_key("pooler.dense", param)].tensor;
        assert_eq!(max_diff(&got, want), 0.0, "pooler.dense.{param} is not the trained copy");
    }
    let (m, _) = case.peft("adapter", None).unload().unwrap();
    compare(&case, "unload", None, &m.forward(&inputs).unwrap(), DType::F32, &mut failures);
    report(failures);
}

/// A `modules_to_save` entry naming a module pvera cannot copy (here the whole `pooler`, not its
/// linear layer): the trained values stay unused, so unloading refuses instead of silently
/// writing the base values.
#[test]
fn unloading_refuses_modules_to_save_values_it_cannot_apply() {
    let case = BertCase::load("bert_modules_to_save");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(case.dir.join("adapter").join(f), tmp.path().join(f)).unwrap();
    }
    let cfg_path = tmp.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace("\"pooler.dense\"", "\"pooler\"");
    std::fs::write(&cfg_path, text).unwrap();
    let load = || {
        let (m, reg, info) = case.model(None);
        PeftModel::from_pretrained(m, reg, info, tmp.path(), "default", false).unwrap()
    };
    let mut pm = load();
    assert!(pm.take_warnings().iter().any(|w| w.contains("\"pooler\"")), "the unused entry is reported on load");
    assert_eq!(
        pm.unapplied_module_tensors(),
        vec![checkpoint::module_param_key("pooler.dense", "bias"), checkpoint::module_param_key("pooler.dense", "weight")]
    );
    for err in [pm.merge_and_unload(true, None).unwrap_err(), load().unload().unwrap_err()] {
        let msg = err.to_string();
        assert!(matches!(err, Error::Adapter(_)), "{msg}");
        assert!(msg.contains("pooler.dense.weight") && msg.contains("modules_to_save"), "{msg}");
    }
}

#[test]
fn all_linear_targets_every_linear_layer_with_transformers_names() {
    let case = BertCase::load("bert_tiny");
    let pm = case.peft("adapter_all_linear", None);
    let mut targets = pm.adapter("default").unwrap().targets.clone();
    targets.sort();
    let mut want: Vec<String> = case.meta["adapters"][1]["saved_target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    want.sort();
    assert_eq!(targets, want);
    // A fresh all-linear adapter resolves to the same 13 layers PEFT chose (pooler included).
    let (m, reg, info) = case.model(None);
    let cfg = PveraConfig {
        target_modules: Some(pvera::config::TargetModules::AllLinear),
        r: 4,
        ..Default::default()
    };
    let pm2 = PeftModel::new(m, reg, info, cfg, "default").unwrap();
    let mut t2 = pm2.adapter("default").unwrap().targets.clone();
    t2.sort();
    assert_eq!(t2, want);
}

#[test]
fn bf16_weights_match_transformers_bf16() {
    let mut failures = Vec::new();
    let case = BertCase::load("bert_tiny");
    let inputs = case.inputs();
    for (adapter, suffix) in [("adapter", ""), ("adapter_all_linear", "_all_linear")] {
        let mut pm = case.peft(adapter, Some(DType::BF16));
        let exact = format!("eval{suffix}");
        compare(&case, &format!("bf16_eval{suffix}"), Some(&exact), &fwd(&pm, &inputs), DType::BF16, &mut failures);
        if suffix.is_empty() {
            let base = pm.with_adapters_disabled(|m| m.model().forward(&inputs).unwrap()).unwrap();
            compare(&case, "bf16_base", Some("base"), &base, DType::BF16, &mut failures);
        }
    }
    report(failures);
}

#[test]
fn f16_checkpoint_keeps_its_dtype_and_can_be_loaded_as_f32() {
    let case = BertCase::load("bert_f16");
    let md = ModelDir::open(&case.model_dir()).unwrap();
    assert_eq!(md.stored_dtype, DType::F16);
    let (_, reg, _) = case.model(None);
    assert_eq!(reg.dtype(), DType::F16);
    // The same weights upcast to f32 stay close to the f16 reference.
    let (m, _, _) = case.model(Some(DType::F32));
    let out = m.forward(&case.inputs()).unwrap();
    assert_eq!(out.last_hidden_state.dtype(), DType::F32);
    let (ex, d) = excess(&out.last_hidden_state, case.t("base.last_hidden_state"), 2e-2, 1e-2);
    assert_eq!(ex, 0.0, "f32 compute of f16 weights differs by {d}");
}

#[test]
fn sharded_checkpoint_loads_every_shard() {
    let case = BertCase::load("bert_sharded");
    let md = ModelDir::open(&case.model_dir()).unwrap();
    assert!(md.weights.len() >= 2, "expected several shards, got {:?}", md.weights);
    let (_, reg, _) = case.model(None);
    let n_tensors = md.names.len();
    assert_eq!(reg.params().len(), n_tensors, "every stored tensor is used once");
}

#[test]
fn seeded_sampling_matches_peft() {
    let mut failures = Vec::new();
    let case = BertCase::load("bert_sampled");
    let inputs = case.inputs();
    let pm = case.peft("adapter", None);
    let mut n = 0;
    while case.has(&format!("sampled_{n}.last_hidden_state")) {
        compare(&case, &format!("sampled_{n}"), None, &fwd(&pm, &inputs), DType::F32, &mut failures);
        n += 1;
    }
    assert!(n >= 2, "expected sampled calls, found {n}");
    pm.state().set_sampling(Sampling::Never).unwrap();
    compare(&case, "eval", None, &fwd(&pm, &inputs), DType::F32, &mut failures);
    report(failures);
}

/// A checkpoint saved from `BertForSequenceClassification` (weights `bert.*` + `classifier.*`)
/// loads into the base model, and the SEQ_CLS adapter trained on the task class (keys
/// `base_model.model.bert.encoder...`, `modules_to_save = [classifier, score]`) loads with a
/// warning about the unused classifier.
#[test]
fn task_class_checkpoint_and_seq_cls_adapter_load_into_the_base_model() {
    let mut failures = Vec::new();
    let case = BertCase::load("bert_seq_cls");
    let md = ModelDir::open(&case.model_dir()).unwrap();
    assert_eq!(md.detect_prefix("embeddings.word_embeddings.weight").as_deref(), Some("bert"));
    let inputs = case.inputs();
    let (m, reg, info) = case.model(None);
    assert!(reg.sites().iter().all(|l| !l.site().path().starts_with("bert.")), "module paths start at the base model");
    compare(&case, "base", None, &m.forward(&inputs).unwrap(), DType::F32, &mut failures);

    let mut pm = match PeftModel::from_pretrained(m, reg, info, &case.dir.join("adapter"), "default", false) {
        Ok(pm) => pm,
        Err(e) => panic!("bert_seq_cls: the SEQ_CLS adapter does not load into BertModel: {e}"),
    };
    let warnings = pm.take_warnings();
    assert!(
        warnings.iter().any(|w| w.contains("classifier")),
        "expected a warning about the unused classifier, got {warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("not used") && w.contains("base_model.model.classifier.weight")),
        "expected the classifier tensors to be reported as unused, got {warnings:?}"
    );
    compare(&case, "eval", None, &fwd(&pm, &inputs), DType::F32, &mut failures);
    pm.merge_adapter(None, true).unwrap();
    compare(&case, "merged", None, &fwd(&pm, &inputs), DType::F32, &mut failures);
    pm.unmerge_adapter().unwrap();

    // Saved back, the λ's keep the task class's names (PEFT can load them into the task class).
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path(), None).unwrap();
    let (saved, _) = checkpoint::read_safetensors(&tmp.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (orig, _) =
        checkpoint::read_safetensors(&case.dir.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    for (k, v) in &orig {
        if k.contains("pvera_lambda") {
            let s = saved.get(k).unwrap_or_else(|| panic!("saved adapter lacks {k}; has {:?}", saved.keys()));
            assert_eq!(max_diff(&s.tensor, &v.tensor), 0.0, "{k}");
        }
    }
    assert!(saved.keys().all(|k| !k.starts_with("base_model.model.encoder")), "{:?}", saved.keys());
    report(failures);
}

#[test]
fn info_and_module_paths_are_transformers_names() {
    let tiny = BertCase::load("bert_tiny");
    let md = ModelDir::open(&tiny.model_dir()).unwrap();
    let (_, reg, info) = AnyModel::load(&md, None, &Device::Cpu, Arc::new(RunState::new(0))).unwrap();
    assert_eq!(info.model_type, "bert");
    assert_eq!(info.class_name, "BertModel");
    assert_eq!(info.task_prefixes, vec!["bert".to_string()]);
    assert!(info.alt_schemes.is_empty() && info.output_embedding.is_none() && info.classifier.is_none());
    let paths: Vec<&str> = reg.sites().iter().map(|l| l.site().path()).collect();
    assert_eq!(paths.len(), 2 * 6 + 1);
    for p in [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.1.output.dense",
        "pooler.dense",
    ] {
        assert!(paths.contains(&p), "no site {p}: {paths:?}");
    }
    // every stored tensor is read, under its own name
    let mut params: Vec<String> = reg.params().iter().map(|p| p.name.clone()).collect();
    params.sort();
    let stored: Vec<String> = md.names.iter().cloned().collect();
    assert_eq!(params, stored);

    let rob = BertCase::load("bert_roberta_tiny");
    let (_, _, info) = rob.model(None);
    assert_eq!(info.model_type, "roberta");
    assert_eq!(info.class_name, "RobertaModel");
    assert_eq!(info.task_prefixes, vec!["roberta".to_string()]);
}

// --------------------------------------------------------------------------------------------------
// MiniLM-shaped checkpoint (all-MiniLM-L6-v2's layout; the real-weight check is run separately)
// --------------------------------------------------------------------------------------------------

/// all-MiniLM-L6-v2's config.json, with a small vocabulary to keep the test light.
const MINILM_CONFIG: &str = r#"{
  "_name_or_path": "nreimers/MiniLM-L6-H384-uncased",
  "architectures": ["BertModel"],
  "attention_probs_dropout_prob": 0.1,
  "gradient_checkpointing": false,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "hidden_size": 384,
  "initializer_range": 0.02,
  "intermediate_size": 1536,
  "layer_norm_eps": 1e-12,
  "max_position_embeddings": 512,
  "model_type": "bert",
  "num_attention_heads": 12,
  "num_hidden_layers": 6,
  "pad_token_id": 0,
  "position_embedding_type": "absolute",
  "transformers_version": "4.8.2",
  "type_vocab_size": 2,
  "use_cache": true,
  "vocab_size": 500
}"#;

fn minilm_tensors() -> BTreeMap<String, Vec<usize>> {
    let (h, i, v) = (384usize, 1536usize, 500usize);
    let mut t = BTreeMap::new();
    t.insert("embeddings.word_embeddings.weight".to_string(), vec![v, h]);
    t.insert("embeddings.position_embeddings.weight".to_string(), vec![512, h]);
    t.insert("embeddings.token_type_embeddings.weight".to_string(), vec![2, h]);
    t.insert("embeddings.LayerNorm.weight".to_string(), vec![h]);
    t.insert("embeddings.LayerNorm.bias".to_string(), vec![h]);
    for l in 0..6 {
        let p = format!("encoder.layer.{l}");
        for m in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"] {
            t.insert(format!("{p}.{m}.weight"), vec![h, h]);
            t.insert(format!("{p}.{m}.bias"), vec![h]);
        }
        t.insert(format!("{p}.intermediate.dense.weight"), vec![i, h]);
        t.insert(format!("{p}.intermediate.dense.bias"), vec![i]);
        t.insert(format!("{p}.output.dense.weight"), vec![h, i]);
        t.insert(format!("{p}.output.dense.bias"), vec![h]);
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            t.insert(format!("{p}.{n}.weight"), vec![h]);
            t.insert(format!("{p}.{n}.bias"), vec![h]);
        }
    }
    t.insert("pooler.dense.weight".to_string(), vec![h, h]);
    t.insert("pooler.dense.bias".to_string(), vec![h]);
    t
}

fn write_minilm(dir: &Path) {
    std::fs::write(dir.join("config.json"), MINILM_CONFIG).unwrap();
    let mut g = pvera::TorchGenerator::new(7);
    let mut map = std::collections::HashMap::new();
    for (name, shape) in minilm_tensors() {
        let n: usize = shape.iter().product();
        let mut v = g.randn_f32(n);
        let scale = if name.contains("LayerNorm.weight") {
            v.iter_mut().for_each(|x| *x = 1.0 + 0.1 * *x);
            1.0
        } else if name.ends_with("bias") {
            0.1
        } else if name.contains("embeddings") {
            1.0
        } else {
            1.0 / (shape[1] as f32).sqrt()
        };
        v.iter_mut().for_each(|x| *x *= scale);
        map.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    // transformers 4.x checkpoints also carry the (then persistent) position_ids buffer.
    let pos: Vec<i64> = (0..512).collect();
    map.insert("embeddings.position_ids".into(), Tensor::from_vec(pos, (1, 512), &Device::Cpu).unwrap());
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
}

#[test]
fn minilm_shaped_checkpoint_loads_with_pooler_and_takes_a_default_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    write_minilm(tmp.path());
    let md = ModelDir::open(tmp.path()).unwrap();
    assert_eq!(md.detect_prefix("embeddings.word_embeddings.weight"), None);
    let (m, reg, info) = AnyModel::load(&md, None, &Device::Cpu, Arc::new(RunState::new(0))).unwrap();
    assert_eq!((info.model_type.as_str(), info.class_name.as_str()), ("bert", "BertModel"));
    assert_eq!(reg.sites().len(), 6 * 6 + 1);
    let AnyModel::Bert(bert) = &m else { panic!("not a BERT") };
    assert!(bert.has_pooler());
    assert_eq!(bert.config().head_dim(), 32);
    assert_eq!(reg.params().len(), minilm_tensors().len());

    // batch 2, seq 128 padded as the MiniLM tokenizer does
    let (b, s) = (2usize, 128usize);
    let ids: Vec<i64> = (0..b * s).map(|k| if k % s < 20 + 30 * (k / s) { (k % 497 + 3) as i64 } else { 0 }).collect();
    let mask: Vec<i64> = ids.iter().map(|&x| i64::from(x != 0)).collect();
    let inputs = ModelInputs {
        input_ids: Some(Tensor::from_vec(ids, (b, s), &Device::Cpu).unwrap()),
        attention_mask: Some(Tensor::from_vec(mask, (b, s), &Device::Cpu).unwrap()),
        ..Default::default()
    };
    let out = m.forward(&inputs).unwrap();
    assert_eq!(out.last_hidden_state.dims(), &[b, s, 384]);
    assert_eq!(out.pooler_output.as_ref().unwrap().dims(), &[b, 384]);
    let v = out.last_hidden_state.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));

    // PEFT's default targets for bert: query and value in each of the 6 layers
    let cfg = PveraConfig { r: 4, init_weights: false, ..Default::default() };
    let pm = PeftModel::new(m, reg, info, cfg, "default").unwrap();
    let targets = &pm.adapter("default").unwrap().targets;
    assert_eq!(targets.len(), 12);
    assert!(targets.iter().all(|t| t.ends_with(".attention.self.query") || t.ends_with(".attention.self.value")));
    let y = pm.model().forward(&inputs).unwrap();
    let (_, d) = excess(&y.last_hidden_state, &out.last_hidden_state, 0.0, 0.0);
    assert!(d > 0.0, "the adapter changes the output");
}

// --------------------------------------------------------------------------------------------------
// Bad inputs and configs
// --------------------------------------------------------------------------------------------------

fn err_text(r: pvera::Result<ModelOutputs>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_named() {
    let case = BertCase::load("bert_tiny");
    let (m, _, _) = case.model(None);
    let ids = case.t("input_ids").clone();
    let e = err_text(m.forward(&ModelInputs::default()));
    assert!(e.contains("input_ids"), "{e}");
    let e = err_text(m.forward(&ModelInputs { input_ids: Some(ids.flatten_all().unwrap()), ..Default::default() }));
    assert!(e.contains("input_ids") && e.contains("(batch, seq)"), "{e}");
    let too_big = Tensor::full(1000i64, ids.dims(), &Device::Cpu).unwrap();
    let e = err_text(m.forward(&ModelInputs { input_ids: Some(too_big), ..Default::default() }));
    assert!(e.contains("vocab_size"), "{e}");
    let e = err_text(m.forward(&ModelInputs {
        input_ids: Some(ids.clone()),
        token_type_ids: Some(Tensor::full(2i64, ids.dims(), &Device::Cpu).unwrap()),
        ..Default::default()
    }));
    assert!(e.contains("token_type_ids") && e.contains("type_vocab_size"), "{e}");
    let e = err_text(m.forward(&ModelInputs {
        input_ids: Some(ids.clone()),
        attention_mask: Some(ids.narrow(1, 0, 3).unwrap()),
        ..Default::default()
    }));
    assert!(e.contains("attention_mask"), "{e}");
    let long = Tensor::ones((1, 25), DType::I64, &Device::Cpu).unwrap();
    let e = err_text(m.forward(&ModelInputs { input_ids: Some(long), ..Default::default() }));
    assert!(e.contains("max_position_embeddings"), "{e}");
    let float_ids = ids.to_dtype(DType::F32).unwrap();
    let e = err_text(m.forward(&ModelInputs { input_ids: Some(float_ids), ..Default::default() }));
    assert!(e.contains("input_ids"), "{e}");
}

#[test]
fn bad_configs_and_checkpoints_are_refused_clearly() {
    let case = BertCase::load("bert_tiny");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(case.model_dir().join("config.json")).unwrap()).unwrap();
    let try_cfg = |edit: &dyn Fn(&mut Value)| -> String {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg.clone();
        edit(&mut c);
        std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
        std::fs::copy(case.model_dir().join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
        let md = ModelDir::open(tmp.path()).unwrap();
        match AnyModel::load(&md, None, &Device::Cpu, Arc::new(RunState::new(0))) {
            Ok(_) => panic!("expected an error"),
            Err(e) => {
                if let Error::ConfigParse { .. } | Error::MissingTensor { .. } | Error::Model(_) = e {
                } else {
                    panic!("unexpected error kind: {e:?}");
                }
                e.to_string()
            }
        }
    };
    let e = try_cfg(&|c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    assert!(e.contains("hidden_size") && e.contains("config.json"), "{e}");
    let e = try_cfg(&|c| c["position_embedding_type"] = "relative_key".into());
    assert!(e.contains("relative_key"), "{e}");
    let e = try_cfg(&|c| c["hidden_act"] = "quick_gelu_unknown".into());
    assert!(e.contains("hidden_act"), "{e}");
    let e = try_cfg(&|c| c["num_attention_heads"] = 5.into());
    assert!(e.contains("num_attention_heads"), "{e}");
    let e = try_cfg(&|c| c["is_decoder"] = true.into());
    assert!(e.contains("is_decoder"), "{e}");
    // the weights disagree with the config
    let e = try_cfg(&|c| c["intermediate_size"] = 40.into());
    assert!(e.contains("intermediate.dense.weight"), "{e}");
    let e = try_cfg(&|c| c["num_hidden_layers"] = 3.into());
    assert!(e.contains("encoder.layer.2"), "{e}");
}

#[test]
fn gradients_reach_every_lambda_through_the_encoder_and_pooler() {
    let case = BertCase::load("bert_tiny");
    let (m, reg, info) = case.model(None);
    let mut pm =
        PeftModel::from_pretrained(m, reg, info, &case.dir.join("adapter_all_linear"), "default", true).unwrap();
    let _ = pm.take_warnings();
    pm.train().unwrap();
    let out = pm.model().forward(&case.inputs()).unwrap();
    let loss = (out.last_hidden_state.sqr().unwrap().mean_all().unwrap()
        + out.pooler_output.unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let vars = pm.trainable_vars().unwrap();
    assert_eq!(vars.len(), 2 * 13);
    for v in &vars {
        let g = grads.get(v.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}", v.name));
        let n = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n.is_finite() && n > 0.0, "{}: gradient norm {n}", v.name);
    }
}
