//! Writes Rust-trained, Rust-saved adapters as case directories for `tools/check_in_peft.py`, the
//! reverse parity check (Rust -> PEFT):
//!
//! ```sh
//! cargo run --release -p pvera --example export_rust_cases -- /tmp/rust_cases
//! python3 tools/check_in_peft.py /tmp/rust_cases
//! ```
//!
//! For every PEFT fixture case: load the PEFT adapter(s) in Rust, train the active adapter(s) for
//! three AdamW steps (so the λ's are Rust-made values), save with `save_pretrained`, reload the saved
//! directory into a fresh Rust model, and record that model's outputs (sampled calls first, on
//! fresh generators, then eval / disabled / merged outputs, λ's, projections and ΔW) in the same
//! layout `tools/make_fixtures.py` writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use pvera::checkpoint;
use pvera::config::SampleAtInference;
use pvera::models::mlp::{Conv1dStack, Mlp};
use pvera::{Builder, PeftModel, RunState, Sampling};
use serde_json::{json, Value};

#[derive(Clone)]
enum M {
    Mlp(Mlp),
    Conv(Conv1dStack),
}

impl M {
    fn forward(&self, x: &Tensor) -> pvera::Result<Tensor> {
        match self {
            M::Mlp(m) => m.forward(x),
            M::Conv(m) => m.forward(x),
        }
    }
}

fn dtype_of(meta: &Value) -> DType {
    match meta["dtype"].as_str().unwrap_or("float32") {
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        _ => DType::F32,
    }
}

fn build(case_dir: &Path, meta: &Value) -> Result<(M, pvera::Registry, pvera::ModelInfo)> {
    let bytes = std::fs::read(case_dir.join("base_model.safetensors"))?;
    let state = Arc::new(RunState::new(0));
    let vb = Builder::from_safetensors_bytes(bytes, dtype_of(meta), &Device::Cpu, state)?;
    Ok(if meta["model"] == "conv1d" {
        (M::Conv(Conv1dStack::new(&vb)?), vb.finish()?, Conv1dStack::info())
    } else {
        (M::Mlp(Mlp::new(&vb, true)?), vb.finish()?, Mlp::info())
    })
}

fn load(case_dir: &Path, meta: &Value, trainable: bool) -> Result<PeftModel<M>> {
    let (m, reg, info) = build(case_dir, meta)?;
    let adapters = meta["adapters"].as_array().context("adapters")?;
    let name0 = adapters[0]["name"].as_str().unwrap_or("default");
    let dir0 = case_dir.join(adapters[0]["dir"].as_str().unwrap_or("adapter"));
    let mut pm = PeftModel::from_pretrained(m, reg, info, &dir0, name0, trainable)?;
    for a in &adapters[1..] {
        let n = a["name"].as_str().unwrap_or("");
        pm.load_adapter(&case_dir.join(a["dir"].as_str().unwrap_or("")), n, trainable)?;
    }
    let active: Vec<String> =
        meta["active"].as_array().context("active")?.iter().filter_map(|v| v.as_str().map(String::from)).collect();
    pm.set_adapter(&active.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(pm)
}

fn export(case_dir: &Path, out_root: &Path) -> Result<()> {
    let name = case_dir.file_name().context("case name")?.to_string_lossy().into_owned();
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(case_dir.join("case.json"))?)?;
    let (io, _) = checkpoint::read_safetensors(&case_dir.join("io.safetensors"), &Device::Cpu)?;
    let x = io["input"].tensor.clone();
    let x1 = io["input_b1"].tensor.clone();
    let out = out_root.join(&name);
    std::fs::create_dir_all(&out)?;
    std::fs::copy(case_dir.join("base_model.safetensors"), out.join("base_model.safetensors"))?;

    // 1. Train in Rust, save.
    let mut pm = load(case_dir, &meta, true)?;
    pm.train()?;
    pm.state().manual_seed(7)?;
    let vars: Vec<candle_core::Var> = pm.trainable_vars()?.into_iter().map(|v| v.var).collect();
    let params = candle_nn::ParamsAdamW { lr: 1e-2, ..Default::default() };
    let mut opt = candle_nn::AdamW::new(vars, params)?;
    for _ in 0..3 {
        let y = pm.model().forward(&x)?.to_dtype(DType::F32)?;
        let loss = y.sqr()?.mean_all()?;
        // With init_weights=false, λ_d ~ N(0, 1) can make exp(logvar / 2) overflow in a sampled
        // step (PEFT has the same hazard): skip such a step rather than write NaN λ's.
        if !loss.to_scalar::<f32>()?.is_finite() {
            pm.state().drain_kl()?;
            continue;
        }
        opt.backward_step(&loss)?;
        pm.state().drain_kl()?;
    }
    pm.eval()?;
    pm.save_pretrained(&out.join("adapter"), None)?;

    // 2. Reload the Rust-saved files into a fresh model and record its outputs.
    let adapters: Vec<Value> = meta["adapters"].as_array().context("adapters")?.clone();
    let mut fresh_meta = meta.clone();
    for (i, a) in adapters.iter().enumerate() {
        let n = a["name"].as_str().unwrap_or("default");
        let d = if n == "default" { "adapter".to_string() } else { format!("adapter/{n}") };
        fresh_meta["adapters"][i]["dir"] = json!(d);
    }
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut checks = serde_json::Map::new();
    tensors.insert("input".into(), x.clone());
    tensors.insert("input_b1".into(), x1.clone());
    let sampling = meta["sampling"].clone();
    if !sampling.is_null() {
        let pm = load(&out, &fresh_meta, false)?;
        let dict = pm.adapter_names().iter().any(|n| {
            matches!(pm.peft_config(n).map(|c| &c.sample_at_inference), Ok(SampleAtInference::PerModule(_)))
        });
        if sampling["mode"] == "train" {
            pm.train()?;
        } else if dict {
            pm.state().set_sampling(Sampling::Always)?; // PEFT's reading of a dict (spec §9.1)
        }
        let calls = sampling["calls"].as_array().context("calls")?;
        let inputs = sampling["inputs"].as_array().context("inputs")?;
        for (c, i) in calls.iter().zip(inputs) {
            let c = c.as_str().unwrap_or("");
            let y = pm.model().forward(&io[i.as_str().unwrap_or("input")].tensor)?;
            tensors.insert(c.to_string(), y);
            checks.insert(c.to_string(), json!("Rust sampled call, fresh generators"));
        }
        if let Some(pmod) = sampling.get("per_module").filter(|v| !v.is_null()) {
            let pm = load(&out, &fresh_meta, false)?; // fresh generators, documented per-module meaning
            for (c, i) in pmod["calls"].as_array().context("calls")?.iter().zip(pmod["inputs"].as_array().context("inputs")?) {
                let c = c.as_str().unwrap_or("");
                let y = pm.model().forward(&io[i.as_str().unwrap_or("input")].tensor)?;
                tensors.insert(c.to_string(), y);
                checks.insert(c.to_string(), json!("Rust per-module sampled call"));
            }
        }
    }
    let mut pm = load(&out, &fresh_meta, false)?;
    pm.state().set_sampling(Sampling::Never)?;
    tensors.insert("eval_output".into(), pm.model().forward(&x)?);
    tensors.insert("eval_output_b1".into(), pm.model().forward(&x1)?);
    checks.insert("eval_output".into(), json!("Rust eval output (mean path)"));
    checks.insert("eval_output_b1".into(), json!("Rust eval output (mean path), batch 1"));
    let first = adapters[0]["name"].as_str().unwrap_or("default").to_string();
    let proj = pm.adapter(&first)?.projections.clone();
    tensors.insert("pvera_A".into(), proj.a().clone());
    tensors.insert("pvera_B".into(), proj.b().clone());
    checks.insert("pvera_A".into(), json!("projection A used by Rust"));
    checks.insert("pvera_B".into(), json!("projection B used by Rust"));
    for a in pm.adapter_names() {
        for path in pm.adapter(&a)?.targets.clone() {
            let site = pm.registry().site(&path).context("site")?;
            let (lb, ld) = site.with_slot(&a, |s| (s.lambda_b().as_detached_tensor(), s.lambda_d().as_detached_tensor()))?;
            for (k, t) in [(format!("lambda_b.{path}.{a}"), lb), (format!("lambda_d.{path}.{a}"), ld)] {
                checks.insert(k.clone(), json!("Rust-trained λ"));
                tensors.insert(k, t);
            }
            let k = format!("delta_weight.{path}.{a}");
            tensors.insert(k.clone(), site.delta_weight(&a)?.to_dtype(DType::F32)?);
            checks.insert(k, json!("Rust ΔW"));
        }
    }
    let base = pm.with_adapters_disabled(|m| m.model().forward(&x))??;
    tensors.insert("base_output".into(), base);
    checks.insert("base_output".into(), json!("Rust output with adapters disabled"));
    pm.merge_adapter(None, true)?;
    tensors.insert("merged_output".into(), pm.model().forward(&x)?);
    checks.insert("merged_output".into(), json!("Rust output with active adapters merged"));
    pm.unmerge_adapter()?;

    fresh_meta["checks"] = Value::Object(checks);
    fresh_meta["notes"] = json!(format!("Rust-trained (3 AdamW steps) and Rust-saved adapter of fixture case {name}"));
    fresh_meta["recipe"] = json!("cargo run -p pvera --example export_rust_cases");
    std::fs::write(out.join("case.json"), serde_json::to_string_pretty(&fresh_meta)?)?;
    let bytes = checkpoint::serialize_safetensors(&tensors, Some(checkpoint::pt_metadata()))?;
    std::fs::write(out.join("io.safetensors"), bytes)?;
    Ok(())
}

fn main() -> Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/rust_cases".into()));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").is_file())
        .collect();
    cases.sort();
    for c in &cases {
        export(c, &out).with_context(|| format!("case {}", c.display()))?;
        println!("wrote {}", out.join(c.file_name().unwrap_or_default()).display());
    }
    Ok(())
}
