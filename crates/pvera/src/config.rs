//! STUB: replaced by the helper's full PEFT-exact config.
#![allow(missing_docs, dead_code)]
use std::collections::BTreeMap;
use std::path::Path;
use crate::error::{Error, Result};
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules { List(Vec<String>), Regex(String), AllLinear }
#[derive(Clone, Debug, PartialEq)]
pub enum Bias { None, All, Only(String) }
#[derive(Clone, Debug, PartialEq)]
pub enum LayersToTransform { One(i64), Many(Vec<i64>) }
#[derive(Clone, Debug, PartialEq)]
pub enum LayersPattern { One(String), Many(Vec<String>) }
#[derive(Clone, Debug, PartialEq)]
pub enum SampleAtInference { All(bool), PerModule(BTreeMap<String, bool>) }
impl SampleAtInference {
    pub fn for_module(&self, path: &str) -> bool { match self { Self::All(b) => *b, Self::PerModule(m) => m.iter().any(|(k, v)| *v && (path == k || path.ends_with(&format!(".{k}")))) } }
    pub fn peft_reads_as(&self) -> bool { match self { Self::All(b) => *b, Self::PerModule(m) => !m.is_empty() } }
}
#[derive(Clone, Debug, PartialEq)]
pub struct PveraConfig {
    pub r: i64, pub target_modules: Option<TargetModules>, pub projection_prng_key: i128, pub save_projection: bool,
    pub pvera_dropout: f64, pub d_initial: f64, pub fan_in_fan_out: bool, pub bias: Bias,
    pub modules_to_save: Option<Vec<String>>, pub init_weights: bool, pub layers_to_transform: Option<LayersToTransform>,
    pub layers_pattern: Option<LayersPattern>, pub sample_at_inference: SampleAtInference, pub generator_seed: Option<i128>,
    pub base_model_name_or_path: Option<String>, pub revision: Option<String>, pub task_type: Option<String>,
    pub inference_mode: bool, pub auto_mapping: Option<serde_json::Value>, pub peft_version: Option<String>,
    pub extra: serde_json::Map<String, serde_json::Value>,
}
impl Default for PveraConfig { fn default() -> Self { Self { r: 256, target_modules: None, projection_prng_key: 0, save_projection: true, pvera_dropout: 0.0, d_initial: 0.1, fan_in_fan_out: false, bias: Bias::None, modules_to_save: None, init_weights: true, layers_to_transform: None, layers_pattern: None, sample_at_inference: SampleAtInference::All(false), generator_seed: None, base_model_name_or_path: None, revision: None, task_type: None, inference_mode: false, auto_mapping: None, peft_version: None, extra: Default::default() } } }
impl PveraConfig {
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::ConfigParse { path: source.into(), reason: e.to_string() })?;
        let mut c = Self::default();
        c.r = v["r"].as_i64().unwrap_or(256);
        c.projection_prng_key = v["projection_prng_key"].as_i64().unwrap_or(0) as i128;
        c.save_projection = v["save_projection"].as_bool().unwrap_or(true);
        c.d_initial = v["d_initial"].as_f64().unwrap_or(0.1);
        c.fan_in_fan_out = v["fan_in_fan_out"].as_bool().unwrap_or(false);
        c.init_weights = v["init_weights"].as_bool().unwrap_or(true);
        c.pvera_dropout = v["pvera_dropout"].as_f64().unwrap_or(0.0);
        c.generator_seed = v["generator_seed"].as_i64().map(|x| x as i128);
        c.sample_at_inference = match &v["sample_at_inference"] { serde_json::Value::Bool(b) => SampleAtInference::All(*b), serde_json::Value::Object(m) => SampleAtInference::PerModule(m.iter().map(|(k, v)| (k.clone(), v.as_bool().unwrap_or(false))).collect()), _ => SampleAtInference::All(false) };
        c.bias = match v["bias"].as_str().unwrap_or("none") { "none" => Bias::None, "all" => Bias::All, s => Bias::Only(s.into()) };
        c.modules_to_save = v["modules_to_save"].as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect());
        c.target_modules = match &v["target_modules"] { serde_json::Value::String(s) if s.eq_ignore_ascii_case("all-linear") => Some(TargetModules::AllLinear), serde_json::Value::String(s) => Some(TargetModules::Regex(s.clone())), serde_json::Value::Array(a) => Some(TargetModules::List(a.iter().filter_map(|s| s.as_str().map(String::from)).collect())), _ => None };
        c.inference_mode = v["inference_mode"].as_bool().unwrap_or(false);
        c.task_type = v["task_type"].as_str().map(String::from);
        Ok(c)
    }
    pub fn from_file(path: &Path) -> Result<Self> { let t = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?; Self::from_json_str(&t, &path.display().to_string()) }
    pub fn from_dir(dir: &Path) -> Result<Self> { Self::from_file(&dir.join("adapter_config.json")) }
    pub fn to_json_string(&self) -> String {
        let tm = match &self.target_modules { Some(TargetModules::List(l)) => serde_json::json!(l), Some(TargetModules::Regex(s)) => serde_json::json!(s), Some(TargetModules::AllLinear) => serde_json::json!("all-linear"), None => serde_json::Value::Null };
        let sai = match &self.sample_at_inference { SampleAtInference::All(b) => serde_json::json!(b), SampleAtInference::PerModule(m) => serde_json::json!(m) };
        let bias = match &self.bias { Bias::None => "none".to_string(), Bias::All => "all".into(), Bias::Only(s) => s.clone() };
        let v = serde_json::json!({"r": self.r, "target_modules": tm, "projection_prng_key": self.projection_prng_key as i64, "save_projection": self.save_projection, "pvera_dropout": self.pvera_dropout, "d_initial": self.d_initial, "fan_in_fan_out": self.fan_in_fan_out, "bias": bias, "modules_to_save": self.modules_to_save, "init_weights": self.init_weights, "sample_at_inference": sai, "generator_seed": self.generator_seed.map(|x| x as i64), "peft_type": "PVERA", "inference_mode": true, "task_type": self.task_type});
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }
    pub fn validate(&self) -> Result<()> { if self.r <= 0 { return Err(Error::config("r", format!("`r` should be a positive integer value but the value passed is {}", self.r))); } Ok(()) }
    pub fn projection_seed(&self) -> u64 { self.projection_prng_key as u64 }
    pub fn generator_seed_u64(&self) -> Option<u64> { self.generator_seed.map(|s| s as u64) }
    pub fn save_warnings(&self) -> Vec<String> { vec![] }
}
