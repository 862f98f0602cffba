//! ViT and DINOv2 against transformers 5.24 + PEFT 0.21.2 on the tiny fixtures of
//! `tools/make_model_fixtures_vision.py` (see each case's `case.json`).
//!
//! Adapters come in two naming schemes: `adapter*/` as PEFT saves them under transformers 5
//! (run-time names, `layers.N.attention.q_proj`), `adapter*_v4/` the same tensors under the
//! checkpoint names the models are built with (`encoder.layer.N.attention.attention.query`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint;
use pvera::config::TargetModules;
use pvera::models::dinov2;
use pvera::models::interpolate::interpolate_bicubic;
use pvera::models::loader::ModelDir;
use pvera::models::vit;
use pvera::models::{AnyModel, ModelInputs, ModelOutputs};
use pvera::{Error, PeftModel, PveraConfig, Registry, RunState};
use serde_json::Value;

use crate::common::{excess, max_abs_diff};

const VIT_CASES: &[&str] = &["vit_base", "vit_task", "vit_bf16"];
const DINO_CASES: &[&str] = &["dinov2_base", "dinov2_task", "dinov2_bf16", "dinov2_swiglu"];
const SIZES: &[(&str, &str)] =
    &[("", "pixel_values"), ("_interp", "pixel_values_interp"), ("_odd", "pixel_values_odd")];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

struct VCase {
    name: String,
    dir: PathBuf,
    meta: Value,
    io: BTreeMap<String, Tensor>,
}

impl VCase {
    fn load(name: &str) -> VCase {
        let dir = root().join(name);
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let (io, _) = checkpoint::read_safetensors(&dir.join("io.safetensors"), &Device::Cpu).unwrap();
        VCase { name: name.into(), dir, meta, io: io.into_iter().map(|(k, v)| (k, v.tensor)).collect() }
    }
    fn t(&self, k: &str) -> &Tensor {
        self.io.get(k).unwrap_or_else(|| panic!("{}: io.safetensors has no {k}", self.name))
    }
    fn has(&self, k: &str) -> bool {
        self.io.contains_key(k)
    }
    fn dtype(&self) -> DType {
        match self.meta["dtype"].as_str().unwrap() {
            "float32" => DType::F32,
            "bfloat16" => DType::BF16,
            d => panic!("{d}"),
        }
    }
    fn inputs(&self, key: &str) -> ModelInputs {
        ModelInputs { pixel_values: Some(self.t(key).clone()), ..Default::default() }
    }
}

fn load_model(dir: &Path, dtype: Option<DType>) -> (AnyModel, Registry, pvera::ModelInfo) {
    let md = ModelDir::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    AnyModel::load(&md, dtype, &Device::Cpu, Arc::new(RunState::new(0)))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[allow(clippy::result_large_err)]
fn load_peft(case: &VCase, adapter: &str) -> pvera::Result<PeftModel<AnyModel>> {
    let (m, reg, info) = load_model(&case.dir.join("model"), None);
    PeftModel::from_pretrained(m, reg, info, &case.dir.join(adapter), "default", false)
}

/// (atol, rtol) for outputs in `dtype`: f32 to 1e-5 + 1e-5 relative. bf16 is looser: one
/// rounding of a value of a few units is 2^-8 relative, and two implementations round
/// intermediates at different places over two layers (torch's own SDPA and eager attention
/// differ by 4e-2 on these cases); the bf16 cases also check that Rust is as close to the f32
/// result of the same weights as torch is.
fn tols(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-5, 1e-5),
        _ => (1e-1, 3e-2),
    }
}

/// Compares one output; returns the max abs diff and pushes a failure when out of tolerance.
fn check(case: &str, key: &str, got: &Tensor, want: &Tensor, dtype: DType, failures: &mut Vec<String>) -> f32 {
    if got.dims() != want.dims() {
        failures.push(format!("{case}: {key}: shape {:?}, expected {:?}", got.dims(), want.dims()));
        return f32::INFINITY;
    }
    let (atol, rtol) = tols(dtype);
    let (ex, maxd) = excess(got, want, atol, rtol);
    if ex > 0.0 {
        failures.push(format!("{case}: {key}: max abs diff {maxd:.3e} exceeds {atol:e} + {rtol:e}*|y|"));
    }
    maxd
}

fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
}

fn report(failures: Vec<String>) {
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// Runs every input size the case has outputs for, comparing `<tag><size>.*`.
fn compare_outputs(
    case: &VCase,
    tag: &str,
    forward: &dyn Fn(&ModelInputs) -> ModelOutputs,
    failures: &mut Vec<String>,
    rows: &mut Vec<String>,
) {
    let mut worst = 0f32;
    let mut n = 0;
    let mut accuracy = Vec::new();
    for (size, input) in SIZES {
        let k = format!("{tag}{size}.last_hidden_state");
        if !case.has(&k) {
            continue;
        }
        let out = forward(&case.inputs(input));
        worst = worst.max(check(&case.name, &k, &out.last_hidden_state, case.t(&k), case.dtype(), failures));
        n += 1;
        // half precision: as close to the f32 computation of the same weights as torch is
        let kr = format!("f32{k}");
        if case.has(&kr) {
            let e_rust = max_abs_diff(&out.last_hidden_state, case.t(&kr));
            let e_torch = max_abs_diff(case.t(&k), case.t(&kr));
            let (m_rust, m_torch) =
                (mean_abs_diff(&out.last_hidden_state, case.t(&kr)), mean_abs_diff(case.t(&k), case.t(&kr)));
            accuracy.push(format!(
                "{k}: max/mean |rust - f32| {e_rust:.2e}/{m_rust:.2e}, |torch - f32| {e_torch:.2e}/{m_torch:.2e}"
            ));
            if e_rust > 2.0 * e_torch + 1e-2 || m_rust > 1.25 * m_torch + 1e-3 {
                failures.push(format!(
                    "{}: {k}: rust is further from the f32 result (max {e_rust:.3e}, mean {m_rust:.3e}) than torch \
                     (max {e_torch:.3e}, mean {m_torch:.3e})",
                    case.name
                ));
            }
        }
        let kp = format!("{tag}{size}.pooler_output");
        if case.has(&kp) {
            match &out.pooler_output {
                Some(p) => worst = worst.max(check(&case.name, &kp, p, case.t(&kp), case.dtype(), failures)),
                None => failures.push(format!("{}: {kp}: the model returned no pooler_output", case.name)),
            }
        }
    }
    assert!(n > 0, "{}: no {tag}.* outputs", case.name);
    rows.push(format!(
        "{:<14} {:<9} {tag:<8} max |rust - torch| {worst:.3e}{}",
        case.name,
        format!("{:?}", case.dtype()),
        if accuracy.is_empty() { String::new() } else { format!("  [{}]", accuracy.join("; ")) }
    ));
}

// ---------------------------------------------------------------------------------------------
// Base models
// ---------------------------------------------------------------------------------------------

#[test]
fn vision_base_models_match_transformers() {
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for name in VIT_CASES.iter().chain(DINO_CASES) {
        let case = VCase::load(name);
        let (m, _, _) = load_model(&case.dir.join("model"), None);
        compare_outputs(&case, "base", &|x| m.forward(x).unwrap(), &mut failures, &mut rows);
    }
    eprintln!("{}", rows.join("\n"));
    report(failures);
}

#[test]
fn vision_models_read_the_checkpoint_scheme_and_report_the_v5_scheme() {
    for name in VIT_CASES.iter().chain(DINO_CASES) {
        let case = VCase::load(name);
        let md = ModelDir::open(&case.dir.join("model")).unwrap();
        let (_, reg, info) = load_model(&case.dir.join("model"), None);
        let family = case.meta["family"].as_str().unwrap();
        assert_eq!(info.class_name, case.meta["base_model_class"].as_str().unwrap());
        assert_eq!(info.task_prefixes, vec![family.to_string()]);
        assert_eq!(info.output_embedding, None);
        assert_eq!(info.alt_schemes.len(), 1);
        assert_eq!(info.alt_schemes[0].name, "transformers-v5");
        let prefix = case.meta["task_prefix"].as_str().map(|p| format!("{p}.")).unwrap_or_default();
        // Every linear site is a module of the checkpoint, under its checkpoint name.
        for l in reg.sites() {
            let p = l.site().path();
            assert!(md.names.contains(&format!("{prefix}{p}.weight")), "{name}: site {p} is not a checkpoint module");
            let v5 = (info.alt_schemes[0].map)(p);
            if p.ends_with("mlp.weights_in") {
                assert_eq!(v5, None);
            } else {
                assert!(v5.is_some(), "{name}: {p} has no transformers-5 name");
            }
        }
        // Every checkpoint tensor of the base model is read (DINOv2's mask_token included).
        let read: BTreeSet<String> = reg.params().iter().map(|p| format!("{prefix}{}", p.name)).collect();
        let want: BTreeSet<String> =
            md.names.iter().filter(|n| n.starts_with(&prefix) && !n.starts_with("classifier.")).cloned().collect();
        assert_eq!(read, want, "{name}");
        let layers = case.meta["config"]["num_hidden_layers"].as_u64().unwrap() as usize;
        let pooler = usize::from(name == &"vit_base" || name == &"vit_bf16");
        assert_eq!(reg.sites().len(), layers * 6 + pooler, "{name}");
    }
}

#[test]
fn vision_v5_site_names_are_the_modules_transformers_runs() {
    // The run-time names of the targeted modules are the keys of the transformers-5 adapters.
    for name in ["vit_base", "dinov2_base", "dinov2_swiglu"] {
        let case = VCase::load(name);
        let (_, reg, info) = load_model(&case.dir.join("model"), None);
        let v5: BTreeSet<String> =
            reg.sites().iter().filter_map(|l| (info.alt_schemes[0].map)(l.site().path())).collect();
        let (tensors, _) =
            checkpoint::read_safetensors(&case.dir.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
        for k in tensors.keys() {
            if let Some(m) = k.strip_prefix("base_model.model.").and_then(|k| k.strip_suffix(".pvera_lambda_b")) {
                assert!(v5.contains(m), "{name}: adapter module {m} is not a transformers-5 site name");
            }
        }
    }
}

#[test]
fn vision_sharded_checkpoints_load() {
    for (sharded, single) in [("vit_sharded", "vit_base"), ("dinov2_sharded", "dinov2_base")] {
        let dir = root().join(sharded).join("model");
        assert!(dir.join("model.safetensors.index.json").is_file());
        let md = ModelDir::open(&dir).unwrap();
        assert!(md.weights.len() > 1, "{sharded}: expected several shards");
        let case = VCase::load(single);
        let (a, _, _) = load_model(&dir, None);
        let (b, _, _) = load_model(&case.dir.join("model"), None);
        let mut failures = Vec::new();
        for (size, input) in SIZES {
            let x = case.inputs(input);
            let ya = a.forward(&x).unwrap().last_hidden_state;
            let yb = b.forward(&x).unwrap().last_hidden_state;
            assert_eq!(max_abs_diff(&ya, &yb), 0.0, "{sharded}{size}");
            check(
                sharded,
                &format!("base{size}"),
                &ya,
                case.t(&format!("base{size}.last_hidden_state")),
                DType::F32,
                &mut failures,
            );
        }
        report(failures);
    }
}

#[test]
fn vision_task_checkpoints_load_into_the_base_model() {
    for name in ["vit_task", "dinov2_task"] {
        let case = VCase::load(name);
        let md = ModelDir::open(&case.dir.join("model")).unwrap();
        let family = case.meta["family"].as_str().unwrap();
        assert_eq!(md.detect_prefix("embeddings.patch_embeddings.projection.weight").as_deref(), Some(family));
        let (m, reg, _) = load_model(&case.dir.join("model"), None);
        assert!(
            reg.sites().iter().all(|l| !l.site().path().starts_with(family)),
            "{name}: paths start at the base model"
        );
        if let AnyModel::Vit(v) = &m {
            assert!(!v.has_pooler(), "ViTForImageClassification has no pooler");
        }
        let y = m.forward(&case.inputs("pixel_values")).unwrap();
        let mut failures = Vec::new();
        check(name, "base", &y.last_hidden_state, case.t("base.last_hidden_state"), DType::F32, &mut failures);
        report(failures);
    }
}

#[test]
fn vision_half_precision_weights_load() {
    // f16: the f32 checkpoints loaded as f16, against the f32 reference (loosely).
    for name in ["vit_base", "dinov2_base"] {
        let case = VCase::load(name);
        let (m, reg, _) = load_model(&case.dir.join("model"), Some(DType::F16));
        assert_eq!(reg.dtype(), DType::F16);
        for (size, input) in SIZES {
            let y = m.forward(&case.inputs(input)).unwrap().last_hidden_state;
            assert_eq!(y.dtype(), DType::F16);
            let (ex, maxd) = excess(&y, case.t(&format!("base{size}.last_hidden_state")), 3e-2, 2e-2);
            assert!(ex == 0.0, "{name}{size}: f16 max abs diff {maxd}");
        }
    }
    // bf16 files load in their stored dtype.
    for name in ["vit_bf16", "dinov2_bf16"] {
        let case = VCase::load(name);
        let (m, reg, _) = load_model(&case.dir.join("model"), None);
        assert_eq!(reg.dtype(), DType::BF16);
        let y = m.forward(&case.inputs("pixel_values")).unwrap().last_hidden_state;
        assert_eq!(y.dtype(), DType::BF16);
    }
}

// ---------------------------------------------------------------------------------------------
// Adapters
// ---------------------------------------------------------------------------------------------

fn adapter_outputs_match(cases: &[&str], adapter: &str) {
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for name in cases {
        let case = VCase::load(name);
        let pm = match load_peft(&case, adapter) {
            Ok(pm) => pm,
            Err(e) => {
                failures.push(format!("{name}: loading {adapter}: {e}"));
                continue;
            }
        };
        compare_outputs(&case, "eval", &|x| pm.model().forward(x).unwrap(), &mut failures, &mut rows);
        // disabled adapters give the base model
        let mut pm = pm;
        pm.set_adapters_disabled(true).unwrap();
        compare_outputs(&case, "base", &|x| pm.model().forward(x).unwrap(), &mut failures, &mut rows);
    }
    eprintln!("{adapter}:\n{}", rows.join("\n"));
    report(failures);
}

#[test]
fn vision_checkpoint_scheme_adapters_match_peft() {
    adapter_outputs_match(&["vit_base", "vit_bf16", "dinov2_base", "dinov2_bf16", "dinov2_swiglu"], "adapter_v4");
}

/// Adapters saved by PEFT under transformers 5: module names in the transformers-5 scheme
/// (needs `PeftModel` to use `ModelInfo::alt_schemes`).
#[test]
fn vision_transformers5_adapters_match_peft() {
    adapter_outputs_match(&["vit_base", "vit_bf16", "dinov2_base", "dinov2_bf16", "dinov2_swiglu"], "adapter");
}

/// Adapters trained on ViTForImageClassification / Dinov2ForImageClassification (keys under
/// `vit.` / `dinov2.`, `classifier` in modules_to_save) loaded into the base model (needs
/// `PeftModel` to use `ModelInfo::task_prefixes`).
#[test]
fn vision_task_adapters_load_into_the_base_model() {
    adapter_outputs_match(&["vit_task", "dinov2_task"], "adapter_v4");
    adapter_outputs_match(&["vit_task", "dinov2_task"], "adapter");
}

#[test]
fn vision_merged_matches_peft() {
    let mut failures = Vec::new();
    for name in ["vit_base", "dinov2_base"] {
        let case = VCase::load(name);
        let mut pm = load_peft(&case, "adapter_v4").unwrap();
        pm.merge_adapter(None, true).unwrap();
        for (size, input) in SIZES {
            let k = format!("merged{size}.last_hidden_state");
            if case.has(&k) {
                let y = pm.model().forward(&case.inputs(input)).unwrap().last_hidden_state;
                check(name, &k, &y, case.t(&k), DType::F32, &mut failures);
            }
        }
        pm.unmerge_adapter().unwrap();
        let y = pm.model().forward(&case.inputs("pixel_values")).unwrap().last_hidden_state;
        check(name, "eval after unmerge", &y, case.t("eval.last_hidden_state"), DType::F32, &mut failures);
        let (m, _) = pm.merge_and_unload(false, None).unwrap();
        let y = m.forward(&case.inputs("pixel_values_interp")).unwrap().last_hidden_state;
        check(name, "merge_and_unload", &y, case.t("merged_interp.last_hidden_state"), DType::F32, &mut failures);
    }
    report(failures);
}

fn sampling_matches(adapter: &str) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in ["vit_base", "dinov2_base"] {
        let case = VCase::load(name);
        let s = &case.meta["sampling"];
        let pm = match load_peft(&case, adapter) {
            Ok(pm) => pm,
            Err(e) => {
                failures.push(format!("{name}: loading {adapter}: {e}"));
                continue;
            }
        };
        let calls = s["calls"].as_array().unwrap();
        let inputs = s["inputs"].as_array().unwrap();
        for (call, input) in calls.iter().zip(inputs) {
            let k = format!("{}.last_hidden_state", call.as_str().unwrap());
            let y = pm.model().forward(&case.inputs(input.as_str().unwrap())).unwrap().last_hidden_state;
            check(name, &k, &y, case.t(&k), DType::F32, &mut failures);
            checked += 1;
        }
    }
    assert!(failures.len() + checked >= 6);
    report(failures);
}

#[test]
fn vision_seeded_sampling_matches_peft_checkpoint_scheme() {
    sampling_matches("adapter_sampled_v4");
}

/// The same sampled calls with the adapter as PEFT saved it under transformers 5.
#[test]
fn vision_seeded_sampling_matches_peft_transformers5_scheme() {
    sampling_matches("adapter_sampled");
}

#[test]
fn dinov2_default_targets_are_query_and_value() {
    // PEFT's table says ["query", "value"] for dinov2; under transformers 5 that matches nothing
    // in PEFT (spec 9.8). Here the sites carry the checkpoint names, so the defaults work.
    let case = VCase::load("dinov2_base");
    let (m, reg, info) = load_model(&case.dir.join("model"), None);
    let cfg = PveraConfig { r: 4, target_modules: None, ..Default::default() };
    let pm = PeftModel::new(m, reg, info, cfg, "default").unwrap();
    let mut targets = pm.adapter("default").unwrap().targets.clone();
    targets.sort();
    let mut want: Vec<String> =
        (0..2).flat_map(|i| ["query", "value"].map(|q| format!("encoder.layer.{i}.attention.attention.{q}"))).collect();
    want.sort();
    assert_eq!(targets, want);
}

/// Targets spelled in the transformers-5 scheme select the same layers (needs `PeftModel` to
/// match targets through `ModelInfo::alt_schemes`).
#[test]
fn dinov2_transformers5_target_names_select_the_same_layers() {
    let case = VCase::load("dinov2_base");
    let mut want: Vec<String> =
        (0..2).flat_map(|i| ["query", "value"].map(|q| format!("encoder.layer.{i}.attention.attention.{q}"))).collect();
    want.sort();
    let (m, reg, info) = load_model(&case.dir.join("model"), None);
    let cfg =
        PveraConfig { r: 4, target_modules: Some(TargetModules::list(["q_proj", "v_proj"])), ..Default::default() };
    match PeftModel::new(m, reg, info, cfg, "default") {
        Ok(pm) => {
            let mut t = pm.adapter("default").unwrap().targets.clone();
            t.sort();
            assert_eq!(t, want);
        }
        Err(e) => panic!("q_proj/v_proj (transformers-5 names) should target the same layers: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Weight files in the transformers-5 scheme
// ---------------------------------------------------------------------------------------------

/// Writes `case/model` with every tensor renamed to the transformers-5 scheme (SwiGLU
/// `weights_in` split into `gate_proj` / `up_proj`).
fn write_v5_copy(case: &VCase, out: &Path) {
    let src = case.dir.join("model");
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(src.join("config.json"), out.join("config.json")).unwrap();
    let family = case.meta["family"].as_str().unwrap();
    let map: fn(&str) -> Option<String> = if family == "vit" { vit::v5_name } else { dinov2::v5_name };
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out_t: std::collections::HashMap<String, Tensor> = Default::default();
    for (k, t) in tensors {
        if let Some(m) = k.strip_suffix(".weight").or_else(|| k.strip_suffix(".bias")) {
            let param = &k[m.len() + 1..];
            if let Some(head) = m.strip_suffix(".mlp.weights_in") {
                let half = t.dim(0).unwrap() / 2;
                out_t.insert(format!("{head}.mlp.gate_proj.{param}"), t.narrow(0, 0, half).unwrap());
                out_t.insert(format!("{head}.mlp.up_proj.{param}"), t.narrow(0, half, half).unwrap());
                continue;
            }
            if let Some(n) = map(m) {
                out_t.insert(format!("{n}.{param}"), t);
                continue;
            }
        }
        // norms of ViT layers move with their layer: encoder.layer.N.x -> layers.N.x
        let k = match (family, k.strip_prefix("encoder.layer.")) {
            ("vit", Some(rest)) => format!("layers.{rest}"),
            _ => k,
        };
        out_t.insert(k, t);
    }
    candle_core::safetensors::save(&out_t, out.join("model.safetensors")).unwrap();
}

#[test]
fn vision_weight_files_in_the_transformers5_scheme_load() {
    for name in ["vit_base", "dinov2_base", "dinov2_swiglu"] {
        let case = VCase::load(name);
        let tmp = tempfile::tempdir().unwrap();
        write_v5_copy(&case, tmp.path());
        let md = ModelDir::open(tmp.path()).unwrap();
        assert!(
            !md.names.iter().any(|n| n.contains("attention.attention")),
            "{name}: copy still in the checkpoint scheme"
        );
        let (a, reg_a, _) = load_model(tmp.path(), None);
        let (b, reg_b, _) = load_model(&case.dir.join("model"), None);
        let paths = |r: &Registry| r.sites().iter().map(|l| l.site().path().to_string()).collect::<Vec<_>>();
        assert_eq!(paths(&reg_a), paths(&reg_b), "{name}: sites keep the checkpoint names");
        for (_, input) in SIZES {
            let x = case.inputs(input);
            let d = max_abs_diff(&a.forward(&x).unwrap().last_hidden_state, &b.forward(&x).unwrap().last_hidden_state);
            assert_eq!(d, 0.0, "{name} {input}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bicubic interpolation and the DINOv2-S layout
// ---------------------------------------------------------------------------------------------

#[test]
fn bicubic_interpolation_matches_torch() {
    let case = VCase::load("dinov2_bicubic");
    let cases = case.meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    let mut worst_f32 = 0f32;
    for c in cases {
        let i = c["index"].as_u64().unwrap();
        let out: Vec<usize> = c["out"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let y = interpolate_bicubic(case.t(&format!("in_{i}")), out[0], out[1]).unwrap();
        let d = max_abs_diff(&y, case.t(&format!("out_{i}")));
        worst_f32 = worst_f32.max(d);
        // torch's CPU kernel on FMA builds (AVX2 / AVX-512), which made the fixture: bit for bit
        assert!(d <= 1e-6, "case {i} {c}: f32 max abs diff {d}");
        let yb = interpolate_bicubic(case.t(&format!("in_bf16_{i}")), out[0], out[1]).unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
        let want = case.t(&format!("out_bf16_{i}"));
        assert!(crate::common::bits_equal(&yb, want), "case {i}: bf16 max abs diff {}", max_abs_diff(&yb, want));
    }
    let exact = cases.iter().all(|c| {
        let i = c["index"].as_u64().unwrap();
        let out: Vec<usize> = c["out"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let y = interpolate_bicubic(case.t(&format!("in_{i}")), out[0], out[1]).unwrap();
        crate::common::bits_equal(&y, case.t(&format!("out_{i}")))
    });
    eprintln!("bicubic: worst f32 diff {worst_f32:e}, bit-exact: {exact}");
    assert!(exact, "the f32 kernel should reproduce torch's rounding exactly");
}

#[test]
fn dinov2_s_sized_checkpoint_loads_and_runs() {
    let layout = root().join("dinov2_s_layout");
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(layout.join("case.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(layout.join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut tensors: std::collections::HashMap<String, Tensor> = Default::default();
    let keys = meta["keys"].as_array().unwrap();
    for (i, kv) in keys.iter().enumerate() {
        let name = kv[0].as_str().unwrap().to_string();
        let shape: Vec<usize> = kv[1].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let t = if name.ends_with("lambda1") || (name.contains("norm") && name.ends_with("weight")) {
            Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()
        } else {
            let scale = if name.ends_with("bias") { 0.0 } else { 0.02 + (i % 7) as f64 * 1e-3 };
            (Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap() * scale).unwrap()
        };
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors")).unwrap();
    let md = ModelDir::open(tmp.path()).unwrap();
    let (m, reg, info) = load_model(tmp.path(), None);
    assert_eq!(info.class_name, "Dinov2Model");
    assert_eq!(reg.sites().len(), 12 * 6);
    let read: BTreeSet<&str> = reg.params().iter().map(|p| p.name.as_str()).collect();
    let want: BTreeSet<&str> = md.names.iter().map(String::as_str).collect();
    assert_eq!(read, want, "every DINOv2-S tensor is read under its checkpoint name");
    for (h, w, seq) in [(224, 224, 257), (518, 518, 1370), (70, 98, 36)] {
        let x = Tensor::randn(0f32, 1f32, (1, 3, h, w), &Device::Cpu).unwrap();
        let out = m.forward(&ModelInputs { pixel_values: Some(x), ..Default::default() }).unwrap();
        assert_eq!(out.last_hidden_state.dims(), &[1, seq, 384], "{h}x{w}");
        let v: Vec<f32> = out.last_hidden_state.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|a| a.is_finite()));
        assert_eq!(out.pooler_output.unwrap().dims(), &[1, 384]);
    }
    // PEFT's default dinov2 targets on the real layout: 12 layers x (query, value)
    let cfg = PveraConfig { r: 4, target_modules: None, ..Default::default() };
    let pm = PeftModel::new(m, reg, info, cfg, "default").unwrap();
    assert_eq!(pm.adapter("default").unwrap().targets.len(), 24);
}

// ---------------------------------------------------------------------------------------------
// Bad inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn vision_bad_inputs_are_named() {
    for name in ["vit_base", "dinov2_base"] {
        let case = VCase::load(name);
        let (m, _, _) = load_model(&case.dir.join("model"), None);
        let e = m.forward(&ModelInputs::default()).unwrap_err();
        assert!(matches!(&e, Error::MissingTensor { key, .. } if key == "pixel_values"), "{e}");
        for shape in [vec![1usize, 4, 32, 32], vec![3, 32, 32], vec![1, 3, 4, 32]] {
            let x = Tensor::zeros(shape.clone(), DType::F32, &Device::Cpu).unwrap();
            let e = m.forward(&ModelInputs { pixel_values: Some(x), ..Default::default() }).unwrap_err();
            assert!(matches!(&e, Error::ShapeMismatch { key, .. } if key == "pixel_values"), "{shape:?}: {e}");
        }
        let x = Tensor::zeros((1, 3, 32, 32), DType::U32, &Device::Cpu).unwrap();
        let e = m.forward(&ModelInputs { pixel_values: Some(x), ..Default::default() }).unwrap_err();
        assert!(matches!(&e, Error::DtypeMismatch { .. }), "{e}");
    }
    // a config without the fields a model needs names the file and the field
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("dinov2_base/model");
    std::fs::copy(src.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("patch_size");
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let md = ModelDir::open(tmp.path()).unwrap();
    let e = AnyModel::load(&md, None, &Device::Cpu, Arc::new(RunState::new(0))).unwrap_err();
    assert!(matches!(&e, Error::ConfigParse { reason, .. } if reason.contains("patch_size")), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Saving back
// ---------------------------------------------------------------------------------------------

#[test]
fn vision_adapters_save_back_in_their_own_scheme() {
    // Loaded and saved again, every adapter file keeps its keys (scheme, task prefix) and
    // values bit for bit, so PEFT loads it as before; a task adapter's `classifier`
    // (modules_to_save of a head the base model lacks) is reported as unused and written back.
    let mut failures = Vec::new();
    for (name, adapter) in [
        ("vit_base", "adapter"),
        ("vit_base", "adapter_v4"),
        ("vit_task", "adapter"),
        ("vit_task", "adapter_v4"),
        ("dinov2_base", "adapter"),
        ("dinov2_base", "adapter_sampled"),
        ("dinov2_task", "adapter"),
        ("dinov2_swiglu", "adapter"),
        ("dinov2_bf16", "adapter_v4"),
    ] {
        let case = VCase::load(name);
        let mut pm = load_peft(&case, adapter).unwrap_or_else(|e| panic!("{name}/{adapter}: {e}"));
        let warnings = pm.take_warnings();
        let task = case.meta["task_prefix"].is_string();
        if task {
            assert!(warnings.iter().any(|w| w.contains("classifier")), "{name}/{adapter}: {warnings:?}");
        }
        let tmp = tempfile::tempdir().unwrap();
        pm.save_pretrained(tmp.path(), None).unwrap();
        let file = "adapter_model.safetensors";
        let (orig, _) = checkpoint::read_safetensors(&case.dir.join(adapter).join(file), &Device::Cpu).unwrap();
        let (back, _) = checkpoint::read_safetensors(&tmp.path().join(file), &Device::Cpu).unwrap();
        let ko: Vec<&String> = orig.keys().collect();
        let kb: Vec<&String> = back.keys().collect();
        if ko != kb {
            failures.push(format!("{name}/{adapter}: keys {kb:?}, expected {ko:?}"));
            continue;
        }
        for k in ko {
            if !crate::common::bits_equal(&orig[k].tensor, &back[k].tensor) {
                failures.push(format!("{name}/{adapter}: {k} changed"));
            }
        }
        let cfg = |d: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap()).unwrap()
        };
        let (co, cb) = (cfg(&case.dir.join(adapter)), cfg(tmp.path()));
        let set = |v: &Value| -> BTreeSet<String> {
            v["target_modules"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
        };
        if set(&co) != set(&cb) || co["modules_to_save"] != cb["modules_to_save"] {
            failures.push(format!(
                "{name}/{adapter}: saved targets {} / modules_to_save {}, expected {} / {}",
                cb["target_modules"], cb["modules_to_save"], co["target_modules"], co["modules_to_save"]
            ));
        }
    }
    report(failures);
}
