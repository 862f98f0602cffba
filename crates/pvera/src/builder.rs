//! The model builder and the site registry.
//!
//! Models are built through a [`Builder`] that mirrors the `VarBuilder` calls candle models make
//! (`pp`, `get`, `device`, `dtype`) and records what it hands out: every linear layer (module
//! path, in, out, Linear or Conv1D) and every other base tensor. The resulting [`Registry`] plays
//! the role of PyTorch's `named_modules()` / `named_parameters()` for [`crate::PeftModel`].
//!
//! Models never name PVeRA: they ask for `linear(...)` and get a [`Linear`] whose adapter slots
//! are filled later by injection.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::layer::{Linear, LinearKind, Site};
use crate::state::RunState;

/// What the registry knows about one base tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    /// Full name, e.g. `encoder.layer.0.output.LayerNorm.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Static facts about a model family that PEFT reads from the `transformers` model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelInfo {
    /// `config.model_type` (for the default target table), e.g. `bert`; `custom` for own models.
    pub model_type: String,
    /// Module path of `get_output_embeddings()` (e.g. `lm_head`), excluded from `all-linear`.
    pub output_embedding: Option<String>,
    /// The classification head's module path (`classifier` / `score`), excluded from
    /// `all-linear` for sequence-classification tasks.
    pub classifier: Option<String>,
    /// The class name PEFT records in `auto_mapping.base_model_class` when `task_type` is null.
    pub class_name: String,
    /// Prefixes under which transformers' task classes hold this base model (`bert`, `model`,
    /// ...): adapters trained on a task class name modules `<prefix>.<path>`.
    pub task_prefixes: Vec<String>,
    /// Other module naming schemes of the same model (e.g. transformers 5's `attention.q_proj`
    /// for checkpoints' `attention.attention.query`).
    pub alt_schemes: Vec<AltScheme>,
}

/// A second module naming scheme: maps a site path (the checkpoint's scheme) to the other
/// scheme's name, `None` when the module has no other name.
#[derive(Clone, Copy, Debug)]
pub struct AltScheme {
    /// Short name, e.g. `transformers-v5`.
    pub name: &'static str,
    /// Site path -> path in this scheme.
    pub map: fn(&str) -> Option<String>,
}

impl PartialEq for AltScheme {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for AltScheme {}

#[derive(Debug, Default)]
struct RegistryInner {
    sites: Vec<Linear>,
    params: Vec<ParamInfo>,
}

/// Everything a built model exposes to injection.
#[derive(Clone, Debug)]
pub struct Registry {
    sites: Vec<Linear>,
    params: Vec<ParamInfo>,
    state: Arc<RunState>,
    device: Device,
    dtype: DType,
}

impl Registry {
    /// Adds the sites and parameters of a second registry (e.g. a task head built with its own
    /// builder over the same run state).
    pub fn extend(&mut self, other: Registry) {
        self.sites.extend(other.sites);
        self.params.extend(other.params);
    }

    /// All linear sites in construction order.
    pub fn sites(&self) -> &[Linear] {
        &self.sites
    }
    /// The site at `path`.
    pub fn site(&self, path: &str) -> Option<&Arc<Site>> {
        self.sites.iter().map(|l| l.site()).find(|s| s.path() == path)
    }
    /// Every base tensor the model loaded (linear weights and biases included).
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }
    /// Total number of base parameters.
    pub fn base_param_count(&self) -> usize {
        self.params.iter().map(|p| p.shape.iter().product::<usize>()).sum()
    }
    /// The shared run state.
    pub fn state(&self) -> &Arc<RunState> {
        &self.state
    }
    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The model's base dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Builds models: a `VarBuilder` plus a registry of what was built.
#[derive(Clone)]
pub struct Builder<'a> {
    vb: VarBuilder<'a>,
    /// Module path (may differ from the weight-name prefix when the weights carry a task
    /// prefix such as `bert.`).
    path: String,
    inner: Arc<Mutex<RegistryInner>>,
    state: Arc<RunState>,
}

fn poisoned() -> Error {
    Error::Model("the builder registry lock was poisoned".into())
}

impl<'a> Builder<'a> {
    /// Wraps a candle `VarBuilder` (its dtype and device are the model's).
    pub fn new(vb: VarBuilder<'a>, state: Arc<RunState>) -> Self {
        let path = vb.prefix();
        Self { vb, path, inner: Arc::new(Mutex::new(RegistryInner::default())), state }
    }

    /// Like [`Builder::new`], but module paths start at the root even when `vb` reads weights
    /// under a prefix (task checkpoints: weights `bert.encoder...`, modules `encoder...`).
    pub fn new_rooted(vb: VarBuilder<'a>, state: Arc<RunState>) -> Self {
        Self { vb, path: String::new(), inner: Arc::new(Mutex::new(RegistryInner::default())), state }
    }

    /// Builder over safetensors bytes already in memory.
    pub fn from_safetensors_bytes(
        data: Vec<u8>,
        dtype: DType,
        device: &Device,
        state: Arc<RunState>,
    ) -> Result<Builder<'static>> {
        let vb = VarBuilder::from_buffered_safetensors(data, dtype, device)?;
        Ok(Builder::new(vb, state))
    }

    /// Builder over a map of named tensors.
    pub fn from_tensors(
        tensors: std::collections::HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        state: Arc<RunState>,
    ) -> Builder<'static> {
        Builder::new(VarBuilder::from_tensors(tensors, dtype, device), state)
    }

    /// A builder one module deeper (`vb.pp("encoder")`).
    pub fn pp(&self, name: impl ToString) -> Self {
        let name = name.to_string();
        let path = if self.path.is_empty() { name.clone() } else { format!("{}.{name}", self.path) };
        Self { vb: self.vb.pp(name), path, inner: self.inner.clone(), state: self.state.clone() }
    }
    /// The current module path.
    pub fn prefix(&self) -> String {
        self.path.clone()
    }
    /// The device.
    pub fn device(&self) -> &Device {
        self.vb.device()
    }
    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }
    /// The shared run state.
    pub fn state(&self) -> &Arc<RunState> {
        &self.state
    }
    /// True when the weights contain `name` under the current prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    fn full_name(&self, name: &str) -> String {
        if self.path.is_empty() { name.to_string() } else { format!("{}.{name}", self.path) }
    }

    /// A base tensor (frozen), recorded in the registry.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let full = self.full_name(name);
        let t = self.vb.get(shape.clone(), name).map_err(|e| missing(&full, &shape, e))?;
        self.inner.lock().map_err(|_| poisoned())?.params.push(ParamInfo {
            name: full,
            shape: shape.dims().to_vec(),
        });
        Ok(t)
    }

    /// A linear layer at the current path: weight (out, in), optional bias (out).
    pub fn linear(&self, in_features: usize, out_features: usize, bias: bool) -> Result<Linear> {
        self.site(in_features, out_features, bias, LinearKind::Linear)
    }

    /// A GPT-2 `Conv1D` at the current path: weight (in, out), bias (out).
    pub fn conv1d(&self, in_features: usize, out_features: usize, bias: bool) -> Result<Linear> {
        self.site(in_features, out_features, bias, LinearKind::Conv1D)
    }

    /// A linear layer that is not in the weights: a new task head. When the weights do contain
    /// `weight` (and `bias`) at this path they are used; otherwise they are initialised as
    /// `torch.nn.Linear` does (`kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in)) for
    /// the weight, the same bound for the bias) from `generator`.
    pub fn linear_or_init(
        &self,
        in_features: usize,
        out_features: usize,
        bias: bool,
        generator: &mut crate::rng::TorchGenerator,
    ) -> Result<Linear> {
        if self.vb.contains_tensor("weight") {
            return self.linear(in_features, out_features, bias);
        }
        let bound = 1.0 / (in_features as f64).sqrt();
        let mut w = vec![0f32; in_features * out_features];
        generator.uniform_f32(&mut w, -bound, bound);
        let w = Tensor::from_vec(w, (out_features, in_features), self.vb.device())?.to_dtype(self.vb.dtype())?;
        let b = if bias {
            let mut b = vec![0f32; out_features];
            generator.uniform_f32(&mut b, -bound, bound);
            Some(Tensor::from_vec(b, out_features, self.vb.device())?.to_dtype(self.vb.dtype())?)
        } else {
            None
        };
        {
            let mut g = self.inner.lock().map_err(|_| poisoned())?;
            g.params.push(ParamInfo { name: self.full_name("weight"), shape: vec![out_features, in_features] });
            if bias {
                g.params.push(ParamInfo { name: self.full_name("bias"), shape: vec![out_features] });
            }
        }
        let lin = Linear::new(self.prefix(), w, b, LinearKind::Linear, self.state.clone())?;
        self.inner.lock().map_err(|_| poisoned())?.sites.push(lin.clone());
        Ok(lin)
    }

    fn site(&self, in_f: usize, out_f: usize, bias: bool, kind: LinearKind) -> Result<Linear> {
        let w_shape = match kind {
            LinearKind::Linear => (out_f, in_f),
            LinearKind::Conv1D => (in_f, out_f),
        };
        let w = self.get(w_shape, "weight")?;
        let b = if bias { Some(self.get(out_f, "bias")?) } else { None };
        let lin = Linear::new(self.prefix(), w, b, kind, self.state.clone())?;
        self.inner.lock().map_err(|_| poisoned())?.sites.push(lin.clone());
        Ok(lin)
    }

    /// Finishes building: the registry of everything handed out.
    pub fn finish(&self) -> Result<Registry> {
        let g = self.inner.lock().map_err(|_| poisoned())?;
        Ok(Registry {
            sites: g.sites.clone(),
            params: g.params.clone(),
            state: self.state.clone(),
            device: self.vb.device().clone(),
            dtype: self.vb.dtype(),
        })
    }
}

fn missing(full: &str, shape: &Shape, e: candle_core::Error) -> Error {
    let msg = e.to_string();
    if msg.contains("shape mismatch") {
        Error::Model(format!("model weights: tensor `{full}`: expected shape {shape:?}: {msg}"))
    } else {
        Error::MissingTensor {
            file: "model weights".into(),
            key: full.to_string(),
            hint: format!(" (expected shape {:?}; {msg})", shape.dims()),
        }
    }
}
