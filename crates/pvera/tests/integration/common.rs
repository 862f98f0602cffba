//! Fixture loading shared by the integration tests.
//!
//! Fixtures are written by `tools/make_fixtures.py` (PyTorch + PEFT); see `case.json` in each
//! case directory for how every tensor was produced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint;
use pvera::models::mlp::{Conv1dStack, Mlp};
use pvera::{Builder, ModelInfo, PeftModel, Registry, RunState};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn peft_cases() -> Vec<String> {
    let out = cases_in(&fixtures().join("peft"));
    assert!(out.len() >= 10, "expected the PEFT fixture cases, found {out:?}");
    out
}

/// The case directories (with a `case.json`) under `root`, sorted.
pub fn cases_in(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e} (run the fixture generator in tools/)", root.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("case.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub meta: Value,
    pub io: BTreeMap<String, Tensor>,
}

impl Case {
    pub fn load(name: &str) -> Case {
        Case::load_from(&fixtures().join("peft"), name)
    }
    /// A case of the make_fixtures.py layout under another root (e.g. `fixtures/vera/mlp`).
    pub fn load_from(root: &Path, name: &str) -> Case {
        let dir = root.join(name);
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let (io, _) = checkpoint::read_safetensors(&dir.join("io.safetensors"), &Device::Cpu).unwrap();
        let io = io.into_iter().map(|(k, v)| (k, v.tensor)).collect();
        Case { name: name.to_string(), dir, meta, io }
    }
    pub fn t(&self, key: &str) -> &Tensor {
        self.io.get(key).unwrap_or_else(|| panic!("{}: io.safetensors has no {key}", self.name))
    }
    pub fn has(&self, key: &str) -> bool {
        self.io.contains_key(key)
    }
    pub fn dtype(&self) -> DType {
        match self.meta["dtype"].as_str().unwrap() {
            "float32" => DType::F32,
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            other => panic!("unknown dtype {other}"),
        }
    }
    pub fn adapters(&self) -> Vec<(String, PathBuf)> {
        self.meta["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (a["name"].as_str().unwrap().to_string(), self.dir.join(a["dir"].as_str().unwrap()))
            })
            .collect()
    }
    pub fn active(&self) -> Vec<String> {
        self.meta["active"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    }
    pub fn is_conv(&self) -> bool {
        self.meta["model"] == "conv1d"
    }
}

/// The test models behind one type.
#[derive(Clone)]
pub enum TestModel {
    Mlp(Mlp),
    Conv(Conv1dStack),
}

impl TestModel {
    pub fn forward(&self, x: &Tensor) -> pvera::Result<Tensor> {
        match self {
            TestModel::Mlp(m) => m.forward(x),
            TestModel::Conv(m) => m.forward(x),
        }
    }
}

/// Builds the case's base model from `base_model.safetensors` through the builder.
pub fn build_base(case: &Case) -> (TestModel, Registry, ModelInfo) {
    build_base_from(&case.dir.join("base_model.safetensors"), case.dtype(), case.is_conv())
}

pub fn build_base_from(path: &Path, dtype: DType, conv: bool) -> (TestModel, Registry, ModelInfo) {
    let bytes = std::fs::read(path).unwrap();
    let state = Arc::new(RunState::new(0));
    let vb = Builder::from_safetensors_bytes(bytes, dtype, &Device::Cpu, state).unwrap();
    if conv {
        let m = Conv1dStack::new(&vb).unwrap();
        (TestModel::Conv(m), vb.finish().unwrap(), Conv1dStack::info())
    } else {
        let m = Mlp::new(&vb, true).unwrap();
        (TestModel::Mlp(m), vb.finish().unwrap(), Mlp::info())
    }
}

/// Loads every adapter of the case as PEFT's `from_pretrained` + `load_adapter` would, and
/// activates the case's active adapters.
pub fn load_case_model(case: &Case) -> PeftModel<TestModel> {
    let (model, reg, info) = build_base(case);
    let adapters = case.adapters();
    let (first, first_dir) = &adapters[0];
    let mut pm = PeftModel::from_pretrained(model, reg, info, first_dir, first, false)
        .unwrap_or_else(|e| panic!("{}: from_pretrained failed: {e}", case.name));
    for (name, dir) in &adapters[1..] {
        pm.load_adapter(dir, name, false)
            .unwrap_or_else(|e| panic!("{}: load_adapter {name} failed: {e}", case.name));
    }
    let active = case.active();
    let active: Vec<&str> = active.iter().map(String::as_str).collect();
    pm.set_adapter(&active).unwrap();
    pm
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter().zip(&b).map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() }).fold(0.0, f32::max)
}

pub fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        return false;
    }
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Tolerance for comparing model outputs in a dtype with PyTorch's.
pub fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 2e-6,
        DType::F16 => 4e-3,
        DType::BF16 => 3e-2,
        _ => 0.0,
    }
}

/// Largest violation of `|a - b| <= atol + rtol * |b|` (0 when all close) and the max abs diff.
pub fn excess(a: &Tensor, b: &Tensor, atol: f32, rtol: f32) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f32;
    let mut maxd = 0f32;
    for (x, y) in a.iter().zip(&b) {
        let d = if x == y { 0.0 } else { (x - y).abs() };
        maxd = maxd.max(d);
        worst = worst.max(d - (atol + rtol * y.abs()));
    }
    (worst.max(0.0), maxd)
}

/// Model outputs compared with PyTorch's: absolute `tol(dtype)` plus a relative part of one
/// part in 10^6 (f32 GEMMs sum in another order than MKL; a few ulp at |y| ~ 8).
pub fn output_mismatch(a: &Tensor, b: &Tensor, dtype: DType) -> Option<String> {
    let rtol = match dtype {
        DType::F32 => 1e-6,
        DType::F16 => 1e-3,
        _ => 8e-3,
    };
    let (ex, maxd) = excess(a, b, tol(dtype), rtol);
    (ex > 0.0).then(|| format!("max abs diff {maxd} exceeds {} + {rtol}*|y|", tol(dtype)))
}
