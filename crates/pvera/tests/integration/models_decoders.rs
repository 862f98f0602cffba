//! LLaMA and GPT-2 against transformers 5.24 + PEFT 0.21.2, on the tiny random checkpoints of
//! `tools/make_model_fixtures_decoders.py` (`tests/fixtures/models/{llama_*,gpt2_*}`; each
//! `case.json` says how every stored output was made).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint;
use pvera::models::loader::ModelDir;
use pvera::models::{AnyModel, ModelInputs, ModelOutputs};
use pvera::{Error, ModelInfo, PeftModel, Registry, RunState, Sampling};
use serde_json::Value;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

fn cases() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(models_dir())
        .expect("tests/fixtures/models exists (run tools/make_model_fixtures_decoders.py)")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("llama_") || n.starts_with("gpt2_"))
        .filter(|n| models_dir().join(n).join("case.json").is_file())
        .collect();
    out.sort();
    assert!(out.len() >= 12, "expected the decoder fixture cases, found {out:?}");
    out
}

struct Case {
    name: String,
    dir: PathBuf,
    meta: Value,
    io: BTreeMap<String, Tensor>,
}

impl Case {
    fn load(name: &str) -> Case {
        let dir = models_dir().join(name);
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let (io, _) = checkpoint::read_safetensors(&dir.join("io.safetensors"), &Device::Cpu).unwrap();
        let io = io.into_iter().map(|(k, v)| (k, v.tensor)).collect();
        Case { name: name.to_string(), dir, meta, io }
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
    fn class(&self) -> &str {
        self.meta["model_class"].as_str().unwrap()
    }
    fn inputs(&self) -> ModelInputs {
        ModelInputs {
            input_ids: Some(self.t("input_ids").clone()),
            attention_mask: Some(self.t("attention_mask").clone()),
            ..Default::default()
        }
    }
    /// (dir, trained_on, check) per adapter.
    fn adapters(&self) -> Vec<(PathBuf, String, String)> {
        self.meta["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    self.dir.join(a["dir"].as_str().unwrap()),
                    a["trained_on"].as_str().unwrap().to_string(),
                    a["check"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
    /// (atol, rtol) for this dtype. Half precision: transformers itself moves by ~2e-2 (bf16)
    /// between computing these weights in bf16 and in f32, and outputs reach |15| (ulp 1e-2 in f16).
    fn tol(&self) -> (f32, f32) {
        match self.dtype() {
            DType::F32 => (1e-5, 1e-5),
            DType::F16 => (3e-2, 1e-2),
            _ => (8e-2, 3e-2),
        }
    }
}

fn load(case: &Case, dtype: Option<DType>) -> (AnyModel, Registry, ModelInfo) {
    let dir = ModelDir::open(&case.dir.join("model")).unwrap();
    AnyModel::load(&dir, dtype, &Device::Cpu, Arc::new(RunState::new(0)))
        .unwrap_or_else(|e| panic!("{}: load failed: {e}", case.name))
}

#[allow(clippy::result_large_err)]
fn peft(case: &Case, adapter: &Path) -> pvera::Result<PeftModel<AnyModel>> {
    let (m, r, i) = load(case, None);
    PeftModel::from_pretrained(m, r, i, adapter, "default", false)
}

/// max |a - b| and whether every element is within atol + rtol * |b|.
fn compare(a: &Tensor, b: &Tensor, atol: f32, rtol: f32) -> (f32, bool) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f32;
    let mut ok = true;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        if !d.is_finite() {
            return (f32::INFINITY, false);
        }
        worst = worst.max(d);
        ok &= d <= atol + rtol * y.abs();
    }
    (worst, ok)
}

/// Compares `out` with `<check>.last_hidden_state` / `<check>.logits`; returns the worst diff.
fn check_outputs(case: &Case, check: &str, out: &ModelOutputs) -> f32 {
    let (atol, rtol) = case.tol();
    let mut worst = 0f32;
    let key = format!("{check}.last_hidden_state");
    let (d, ok) = compare(&out.last_hidden_state, case.t(&key), atol, rtol);
    assert!(ok, "{}: {key}: max |rust - transformers| = {d:e} (atol {atol:e}, rtol {rtol:e})", case.name);
    worst = worst.max(d);
    let key = format!("{check}.logits");
    match (&out.logits, case.has(&key)) {
        (Some(l), true) => {
            let (d, ok) = compare(l, case.t(&key), atol, rtol);
            assert!(ok, "{}: {key}: max |rust - transformers| = {d:e}", case.name);
            worst = worst.max(d);
        }
        (None, false) => {}
        (got, want) => panic!("{}: {key}: logits present in rust: {}, in transformers: {want}", case.name, got.is_some()),
    }
    assert_eq!(out.last_hidden_state.dtype(), case.dtype(), "{}: output dtype", case.name);
    worst
}

#[test]
fn decoder_base_models_match_transformers() {
    let mut rows = Vec::new();
    for name in cases() {
        let case = Case::load(&name);
        let (m, reg, info) = load(&case, None);
        assert_eq!(info.class_name, case.class(), "{name}: class name");
        assert_eq!(reg.dtype(), case.dtype(), "{name}: weights load in the stored dtype");
        let out = m.forward(&case.inputs()).unwrap();
        let d = check_outputs(&case, "base", &out);
        rows.push(format!("{name:<26} base {d:.3e}"));
    }
    eprintln!("{}", rows.join("\n"));
}

#[test]
fn decoder_adapters_match_peft() {
    let mut rows = Vec::new();
    for name in cases() {
        let case = Case::load(&name);
        for (dir, trained_on, check) in case.adapters() {
            if trained_on != case.class() {
                continue; // cross-class adapters: see decoder_task_class_adapters_load
            }
            let mut pm = peft(&case, &dir).unwrap_or_else(|e| panic!("{name}: from_pretrained: {e}"));
            pm.state().set_sampling(Sampling::Never).unwrap();
            let eval = check_outputs(&case, &check, &pm.model().forward(&case.inputs()).unwrap());
            pm.merge_adapter(None, false).unwrap();
            let merged = check_outputs(&case, "merged", &pm.model().forward(&case.inputs()).unwrap());
            pm.unmerge_adapter().unwrap();
            let again = check_outputs(&case, &check, &pm.model().forward(&case.inputs()).unwrap());
            let (m, _) = pm.merge_and_unload(false, None).unwrap();
            let unloaded = check_outputs(&case, "merged", &m.forward(&case.inputs()).unwrap());
            rows.push(format!(
                "{name:<26} {check:<10} eval {eval:.3e} merged {merged:.3e} unmerged {again:.3e} merge_and_unload {unloaded:.3e}"
            ));
        }
    }
    eprintln!("{}", rows.join("\n"));
    assert!(rows.len() >= 12, "{rows:?}");
}

#[test]
fn decoder_seeded_sampling_matches_peft() {
    let mut n = 0;
    for name in cases() {
        let case = Case::load(&name);
        if case.meta["sampling"].is_null() {
            continue;
        }
        let calls = case.meta["sampling"]["calls"].as_u64().unwrap();
        let (dir, _, check) = case.adapters().into_iter().find(|a| a.2 == "eval").unwrap();
        let pm = peft(&case, &dir).unwrap();
        let mut worst = 0f32;
        for i in 0..calls {
            let out = pm.model().forward(&case.inputs()).unwrap();
            worst = worst.max(check_outputs(&case, &format!("sampled_{i}"), &out));
            n += 1;
        }
        pm.state().set_sampling(Sampling::Never).unwrap();
        let eval = check_outputs(&case, &check, &pm.model().forward(&case.inputs()).unwrap());
        eprintln!("{name:<26} sampled {worst:.3e} eval {eval:.3e}");
    }
    assert!(n >= 6, "only {n} sampled outputs checked");
}

/// Adapters trained on the other class (LlamaForCausalLM adapter on a LlamaModel checkpoint and
/// back; GPT2LMHeadModel <-> GPT2Model). Needs PeftModel's task_prefixes support.
#[test]
fn decoder_task_class_adapters_load() {
    let mut rows = Vec::new();
    for name in cases() {
        let case = Case::load(&name);
        for (dir, trained_on, check) in case.adapters() {
            if trained_on == case.class() {
                continue;
            }
            let pm = peft(&case, &dir)
                .unwrap_or_else(|e| panic!("{name}: adapter trained on {trained_on} ({}): {e}", dir.display()));
            let d = check_outputs(&case, &check, &pm.model().forward(&case.inputs()).unwrap());
            rows.push(format!("{name:<26} {check:<10} {d:.3e}"));
        }
    }
    eprintln!("{}", rows.join("\n"));
    assert_eq!(rows.len(), 4, "{rows:?}");
}

#[test]
fn decoder_site_paths_are_peft_module_names() {
    // Every λ key PEFT wrote names a site of the model built from the same checkpoint, and the
    // adapter Rust saves back carries exactly PEFT's keys.
    for name in cases() {
        let case = Case::load(&name);
        for (dir, trained_on, _) in case.adapters() {
            let (peft_tensors, _) = checkpoint::read_safetensors(&dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
            let pm = peft(&case, &dir).unwrap();
            if trained_on == case.class() {
                for k in peft_tensors.keys() {
                    if let Some(path) = k.strip_prefix("base_model.model.").and_then(|k| k.strip_suffix(".pvera_lambda_b")) {
                        assert!(pm.registry().site(path).is_some(), "{name}: PEFT key {k} has no site {path}");
                    }
                }
            }
            // saved back in the adapter's own naming (cross-class adapters keep their class's names)
            let tmp = tempfile::tempdir().unwrap();
            pm.save_pretrained(tmp.path(), None).unwrap();
            let (ours, _) = checkpoint::read_safetensors(&tmp.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
            let a: Vec<&String> = peft_tensors.keys().collect();
            let b: Vec<&String> = ours.keys().collect();
            assert_eq!(a, b, "{name}: saved keys");
            let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
            let fan = pm.peft_config("default").unwrap().fan_in_fan_out;
            assert_eq!(Value::Bool(fan), cfg["fan_in_fan_out"], "{name}: fan_in_fan_out");
        }
    }
}

#[test]
fn decoder_model_info_and_layout() {
    let info_of = |name: &str| {
        let c = Case::load(name);
        let (_, reg, info) = load(&c, None);
        let sites: Vec<String> = reg.sites().iter().map(|l| l.site().path().to_string()).collect();
        (info, sites)
    };
    let (info, sites) = info_of("llama_base");
    assert_eq!(info.class_name, "LlamaModel");
    assert_eq!(info.output_embedding, None);
    assert_eq!(info.task_prefixes, vec!["model".to_string()]);
    assert_eq!(sites.len(), 14);
    assert_eq!(sites[0], "layers.0.self_attn.q_proj");
    assert_eq!(sites[6], "layers.0.mlp.down_proj");

    let (info, sites) = info_of("llama_causal");
    assert_eq!(info.class_name, "LlamaForCausalLM");
    assert_eq!(info.output_embedding.as_deref(), Some("lm_head"));
    assert_eq!(sites.len(), 15);
    assert_eq!(sites[0], "model.layers.0.self_attn.q_proj");
    assert_eq!(sites.last().map(String::as_str), Some("lm_head"));

    // tied: no lm_head weight in the file, logits from embed_tokens
    let (info, sites) = info_of("llama_causal_all_linear");
    assert_eq!(info.output_embedding.as_deref(), Some("lm_head"));
    assert_eq!(sites.len(), 14);

    let (info, sites) = info_of("gpt2_base");
    assert_eq!(info.class_name, "GPT2Model");
    assert_eq!(info.output_embedding, None);
    assert_eq!(info.task_prefixes, vec!["transformer".to_string()]);
    assert_eq!(sites, ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.attn.c_attn", "h.1.attn.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]);

    let (info, sites) = info_of("gpt2_lm");
    assert_eq!(info.class_name, "GPT2LMHeadModel");
    assert_eq!(info.output_embedding.as_deref(), Some("lm_head"));
    assert_eq!(sites[0], "transformer.h.0.attn.c_attn");
    assert_eq!(sites.len(), 8);
}

#[test]
fn decoder_all_linear_excludes_lm_head_and_layers_filter() {
    let c = Case::load("llama_causal_all_linear");
    let pm = peft(&c, &c.dir.join("adapter")).unwrap();
    let targets = &pm.adapter("default").unwrap().targets;
    assert_eq!(targets.len(), 14);
    assert!(!targets.iter().any(|t| t == "lm_head"));

    let c = Case::load("llama_causal_layers");
    let pm = peft(&c, &c.dir.join("adapter")).unwrap();
    let targets = &pm.adapter("default").unwrap().targets;
    assert_eq!(
        targets,
        &["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    );

    let c = Case::load("gpt2_lm_all_linear");
    let pm = peft(&c, &c.dir.join("adapter")).unwrap();
    let targets = &pm.adapter("default").unwrap().targets;
    assert_eq!(targets.len(), 8);
    assert!(pm.peft_config("default").unwrap().fan_in_fan_out);
}

#[test]
fn decoder_sharded_checkpoints_open() {
    for (name, shards) in [("llama_sharded", 3), ("gpt2_f16", 2)] {
        let dir = ModelDir::open(&models_dir().join(name).join("model")).unwrap();
        assert!(dir.weights.len() >= shards, "{name}: {} weight files", dir.weights.len());
    }
}

#[test]
fn decoder_dtype_override() {
    // f32 checkpoints load in bf16 / f16 on request and stay close to the f32 reference.
    for (name, dtype, tol) in [("llama_causal", DType::BF16, 0.15f32), ("gpt2_lm", DType::F16, 0.05)] {
        let case = Case::load(name);
        let (m, reg, _) = load(&case, Some(dtype));
        assert_eq!(reg.dtype(), dtype);
        let out = m.forward(&case.inputs()).unwrap();
        assert_eq!(out.last_hidden_state.dtype(), dtype);
        let (d, _) = compare(&out.last_hidden_state, case.t("base.last_hidden_state"), 0.0, 0.0);
        assert!(d < tol, "{name} as {dtype:?}: max diff {d}");
    }
}

#[test]
fn decoder_bad_inputs_are_named() {
    let case = Case::load("llama_causal");
    let (m, _, _) = load(&case, None);
    let err = |inputs: ModelInputs| m.forward(&inputs).unwrap_err();
    let e = err(ModelInputs::default());
    assert!(matches!(&e, Error::MissingTensor { key, .. } if key == "input_ids"), "{e}");
    let ids = Tensor::new(&[[1i64, 2, 300]], &Device::Cpu).unwrap();
    let e = err(ModelInputs { input_ids: Some(ids), ..Default::default() });
    assert!(e.to_string().contains("300") && e.to_string().contains("vocab"), "{e}");
    let ids = Tensor::new(&[[1i64, 2, 3]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1i64, 1]], &Device::Cpu).unwrap();
    let e = err(ModelInputs { input_ids: Some(ids.clone()), attention_mask: Some(mask), ..Default::default() });
    assert!(matches!(&e, Error::ShapeMismatch { key, .. } if key == "attention_mask"), "{e}");
    let e = err(ModelInputs { input_ids: Some(ids.to_dtype(DType::F32).unwrap()), ..Default::default() });
    assert!(matches!(&e, Error::DtypeMismatch { key, .. } if key == "input_ids"), "{e}");

    // GPT-2: sequences longer than n_positions
    let case = Case::load("gpt2_lm");
    let (m, _, _) = load(&case, None);
    let ids = Tensor::zeros((1, 17), DType::I64, &Device::Cpu).unwrap();
    let e = m.forward(&ModelInputs { input_ids: Some(ids), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("n_positions"), "{e}");
}

#[test]
fn decoder_config_errors_are_clear() {
    let src = models_dir().join("llama_base").join("model");
    let edit = |f: &dyn Fn(&mut Value)| -> String {
        let tmp = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
        }
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        f(&mut cfg);
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        let dir = ModelDir::open(tmp.path()).unwrap();
        match AnyModel::load(&dir, None, &Device::Cpu, Arc::new(RunState::new(0))) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    };
    let e = edit(&|c| c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    assert!(e.contains("yarn") && e.contains("config.json"), "{e}");
    let e = edit(&|c| {
        c.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    assert!(e.contains("num_hidden_layers"), "{e}");
    let e = edit(&|c| c["num_key_value_heads"] = 3.into());
    assert!(e.contains("num_key_value_heads"), "{e}");
    let e = edit(&|c| c["hidden_act"] = "swiglu_magic".into());
    assert!(e.contains("swiglu_magic"), "{e}");
    // transformers-4 style config: top-level rope_theta, rope_scaling null
    let e = edit(&|c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_theta"] = 10000.0.into();
        c["rope_scaling"] = Value::Null;
    });
    assert_eq!(e, "ok");
    // wrong layer count: the missing tensor is named
    let e = edit(&|c| c["num_hidden_layers"] = 3.into());
    assert!(e.contains("layers.2."), "{e}");
}

#[test]
fn decoder_gradients_match_torch() {
    // The whole model backpropagates (norms, rotary, GQA, masks, tied heads, Conv1D): the
    // gradient of mean(logits²) w.r.t. every λ equals torch's.
    for (name, sites) in [("llama_causal_all_linear", 14), ("gpt2_lm_all_linear", 8)] {
        let case = Case::load(name);
        let (m, r, i) = load(&case, None);
        let pm = PeftModel::from_pretrained(m, r, i, &case.dir.join("adapter"), "default", true).unwrap();
        pm.eval().unwrap();
        let out = pm.model().forward(&case.inputs()).unwrap();
        let loss = out.logits.unwrap().to_dtype(DType::F32).unwrap().sqr().unwrap().mean_all().unwrap();
        let (d, ok) = compare(&loss.reshape(1).unwrap(), case.t("grad.loss"), 1e-6, 1e-5);
        assert!(ok, "{name}: loss differs by {d}");
        let grads = loss.backward().unwrap();
        let vars = pm.trainable_vars().unwrap();
        assert_eq!(vars.len(), 2 * sites, "{name}: λ_b and λ_d of every adapted site");
        let mut worst = 0f32;
        for v in &vars {
            let g = grads.get(v.var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {}", v.name));
            let want = case.t(&format!("grad.{}", v.name));
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let (d, ok) = compare(g, want, 1e-4 * scale.max(1e-6), 1e-3);
            assert!(ok, "{name}: grad {}: max diff {d:e} (scale {scale:e})", v.name);
            worst = worst.max(d / scale.max(1e-12));
        }
        eprintln!("{name:<26} {} λ gradients, worst |diff| / max|grad| = {worst:.3e}", vars.len());
    }
}

#[test]
fn decoder_layer_filters_on_base_checkpoints() {
    // PEFT (checked with peft 0.21.2): layers_pattern matches at the start of a LlamaModel /
    // GPT2Model module name too: LlamaModel + [q_proj, o_proj], layers_to_transform=[1],
    // layers_pattern="layers" -> layers.1.self_attn.{q,o}_proj; GPT2Model + [c_proj], "h" ->
    // h.1.attn.c_proj, h.1.mlp.c_proj (fan_in_fan_out switched on).
    use pvera::config::{LayersPattern, LayersToTransform, TargetModules};
    use pvera::PveraConfig;
    for (name, targets, pattern, want) in [
        ("llama_base", vec!["q_proj", "o_proj"], "layers", vec!["layers.1.self_attn.q_proj", "layers.1.self_attn.o_proj"]),
        ("gpt2_base", vec!["c_proj"], "h", vec!["h.1.attn.c_proj", "h.1.mlp.c_proj"]),
    ] {
        let case = Case::load(name);
        let (m, r, i) = load(&case, None);
        let cfg = PveraConfig {
            r: 4,
            target_modules: Some(TargetModules::List(targets.iter().map(|s| s.to_string()).collect())),
            layers_to_transform: Some(LayersToTransform::Many(vec![1])),
            layers_pattern: Some(LayersPattern::One(pattern.to_string())),
            ..Default::default()
        };
        let pm = PeftModel::new(m, r, i, cfg, "default").unwrap();
        assert_eq!(pm.adapter("default").unwrap().targets, want, "{name}");
        assert_eq!(pm.peft_config("default").unwrap().fan_in_fan_out, name.starts_with("gpt2"));
    }
}

/// issue 16 row 9: a layer filter that keeps none of the targeted modules names
/// `layers_to_transform` and the layers that exist, not "target_modules matched none".
#[test]
fn a_layer_filter_that_keeps_nothing_names_layers_to_transform() {
    use pvera::config::{LayersPattern, LayersToTransform, TargetModules};
    use pvera::PveraConfig;
    let case = Case::load("llama_base");
    for (filter, pattern, want) in [
        (LayersToTransform::One(99), None, "99 selects no layer: the modules that target_modules matches are in layers 0, 1"),
        (LayersToTransform::Many(vec![5, 7]), Some("layers"), "[5, 7] selects no layer: the modules that target_modules matches are in layers 0, 1 under layers_pattern [\"layers\"]"),
        (LayersToTransform::One(1), Some("blocks"), "1 selects no layer: none of the modules that target_modules matches has a layer index under layers_pattern [\"blocks\"]"),
    ] {
        let (m, r, i) = load(&case, None);
        let cfg = PveraConfig {
            r: 4,
            target_modules: Some(TargetModules::List(vec!["q_proj".into()])),
            layers_to_transform: Some(filter),
            layers_pattern: pattern.map(|p| LayersPattern::One(p.into())),
            ..Default::default()
        };
        let err = PeftModel::new(m, r, i, cfg, "default").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(&err, Error::InvalidConfig { field, .. } if field == "layers_to_transform"), "{msg}");
        assert!(msg.contains(want), "{msg}");
    }
}

#[test]
fn decoder_missing_untied_lm_head_is_an_error() {
    let src = models_dir().join("llama_causal").join("model");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    // the weights without lm_head.weight
    let (t, _) = checkpoint::read_safetensors(&src.join("model.safetensors"), &Device::Cpu).unwrap();
    let t: std::collections::HashMap<String, Tensor> =
        t.into_iter().filter(|(k, _)| k != "lm_head.weight").map(|(k, v)| (k, v.tensor)).collect();
    candle_core::safetensors::save(&t, tmp.path().join("model.safetensors")).unwrap();
    let dir = ModelDir::open(tmp.path()).unwrap();
    let e = AnyModel::load(&dir, None, &Device::Cpu, Arc::new(RunState::new(0))).unwrap_err();
    assert!(matches!(&e, Error::MissingTensor { key, .. } if key == "lm_head.weight"), "{e}");
    assert!(e.to_string().contains("tie_word_embeddings"), "{e}");
}

#[test]
fn decoder_rope_frequencies_match_transformers() {
    // LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=...)).inv_freq
    // with transformers 5.24.
    use pvera::models::llama::LlamaConfig;
    let cases: [(Value, [f32; 8]); 3] = [
        (
            serde_json::json!({"rope_type": "linear", "factor": 2.5, "rope_theta": 5000.0}),
            [0.4, 0.13793954, 0.047568284, 0.016403867, 0.005656854, 0.0019507594, 0.0006727171, 0.0002319857],
        ),
        (
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16, "rope_theta": 500000.0}),
            [0.57605636, 0.024240345, 0.004700754, 0.0009115831, 0.00017677668, 3.428102e-5, 6.64787e-6, 1.2891732e-6],
        ),
        // transformers-4 form: "rope_scaling" with "type"
        (
            serde_json::json!({"type": "linear", "factor": 2.5}),
            [0.4, 0.13793954, 0.047568284, 0.016403867, 0.005656854, 0.0019507594, 0.0006727171, 0.0002319857],
        ),
    ];
    let src = models_dir().join("llama_base").join("model");
    for (i, (rope, want)) in cases.iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        cfg["hidden_size"] = 64.into();
        cfg.as_object_mut().unwrap().remove("head_dim");
        if i == 2 {
            cfg.as_object_mut().unwrap().remove("rope_parameters");
            cfg["rope_scaling"] = rope.clone();
            cfg["rope_theta"] = 5000.0.into();
        } else {
            cfg["rope_parameters"] = rope.clone();
        }
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        let dir = ModelDir::open(tmp.path()).unwrap();
        let got = LlamaConfig::from_dir(&dir).unwrap().inv_freq();
        assert_eq!(got.len(), 8);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 2e-6 * w.abs(), "case {i}: {got:?} vs {want:?}");
        }
    }
}
