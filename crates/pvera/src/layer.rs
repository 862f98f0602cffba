//! The adaptable linear site and the PVeRA / VeRA math.
//!
//! Every linear layer a model asks the [`crate::builder::Builder`] for is a [`Linear`]: a cheap
//! handle (`Arc`) to a [`Site`] that holds the frozen base weight and a slot per adapter. The same
//! `Arc` sits in the model and in the builder's registry, so [`crate::PeftModel`] can add, merge,
//! switch and delete adapters without rebuilding the model.
//!
//! Forward (PEFT `tuners/pvera/layer.py:287-320`):
//! ```text
//! x' = dropout(x.to(f32))
//! h  = λ_d ⊙ (x' · A[:, :in]ᵀ)            (..., 2R)
//! mu, logvar = h[..., :R], h[..., R:]
//! z  = mu                                  eval, not sampling
//! z  = mu + ε ⊙ exp(0.5·logvar)            training or sampling; ε ~ N(0, 1), shape of mu
//! y  = base(x) + Σ_active λ_b ⊙ (z · B[:out, :]ᵀ)      then cast to x's dtype
//! ```
//!
//! VeRA (PEFT `tuners/vera/layer.py`) is the same path without the latent: `A` has `R` rows and
//! `λ_d` `R` entries, so `h = λ_d ⊙ (x' · A[:, :in]ᵀ)` *is* `mu` and `z = h`, in training too. An
//! adapter slot carries its [`Method`]; the one place the paths part is whether `z` is sampled
//! ([`samples`], [`Site::adapter_delta`]): a VeRA slot never samples, pushes no KL term and has no
//! noise path. ΔW, merging, the auto-merged weight and the mixed-adapter batch are shared, since the
//! mean path of PVeRA (`A[:R]`, `λ_d[:R]`) is VeRA's whole path.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{DType, Tensor, Var};

use crate::config::Method;
use crate::error::{Error, Result};
use crate::ops::matmul_const;
use crate::projection::Projections;
use crate::rng::TorchGenerator;
use crate::state::{ForwardView, KlTerm, Mode, RunState, Sampling};

/// How the base weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKind {
    /// `torch.nn.Linear`: weight (out, in), `y = x Wᵀ + b`.
    Linear,
    /// `transformers.pytorch_utils.Conv1D` (GPT-2): weight (in, out), `y = x W + b`; PEFT sets
    /// `fan_in_fan_out = true` for these layers.
    Conv1D,
}

impl LinearKind {
    /// PEFT's `fan_in_fan_out` for this kind.
    pub fn fan_in_fan_out(self) -> bool {
        matches!(self, LinearKind::Conv1D)
    }
}

/// One adapter's parameters and settings in one layer.
#[derive(Debug)]
pub struct AdapterSlot {
    method: Method,
    lambda_b: Var,
    lambda_d: Var,
    r: usize,
    dropout: f64,
    sample_at_inference: bool,
    /// Boxed: the generator's state is 2.5 KB, and slots of generator-less adapters (most served
    /// ones) should not carry it inline (one slot per adapted layer per adapter).
    generator: Option<Box<Mutex<TorchGenerator>>>,
    projections: Arc<Projections>,
    trainable: bool,
}

/// Settings for a new [`AdapterSlot`].
#[derive(Clone, Debug)]
pub struct SlotSpec {
    /// PVeRA or VeRA; must be the projections' method.
    pub method: Method,
    /// Rank r (λ_d has 2r entries; VeRA: r).
    pub r: usize,
    /// Dropout probability before A.
    pub dropout: f64,
    /// Sample the latent at inference in this layer (PVeRA only; must be false for VeRA).
    pub sample_at_inference: bool,
    /// Seed of this layer's own noise generator (PEFT's `generator_seed`), already mixed with the
    /// module path when the noise policy asks for independent noise.
    pub generator_seed: Option<u64>,
    /// `init_weights`: λ_d = d_initial, λ_b = 0 (true) or λ_b = 1, λ_d ~ N(0, 1) (false).
    pub init_weights: bool,
    /// Initial value of λ_d when `init_weights`.
    pub d_initial: f64,
    /// Whether the λ's are trainable (active and not inference mode).
    pub trainable: bool,
}

impl AdapterSlot {
    /// PVeRA or VeRA.
    pub fn method(&self) -> Method {
        self.method
    }
    /// λ_b (out).
    pub fn lambda_b(&self) -> &Var {
        &self.lambda_b
    }
    /// λ_d (2r; VeRA: r).
    pub fn lambda_d(&self) -> &Var {
        &self.lambda_d
    }
    /// The rank r.
    pub fn r(&self) -> usize {
        self.r
    }
    /// Dropout probability.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }
    /// Whether this layer samples at inference for this adapter (always false for VeRA).
    pub fn sample_at_inference(&self) -> bool {
        self.sample_at_inference
    }
    /// The projections this adapter uses.
    pub fn projections(&self) -> &Arc<Projections> {
        &self.projections
    }
    /// Whether the λ's are handed to an optimiser.
    pub fn trainable(&self) -> bool {
        self.trainable
    }
    /// (λ_b, λ_d) as the forward pass uses them: the variables when trainable and gradients are
    /// on (`track`, the run state's grad mode), detached otherwise (PEFT's `requires_grad=False`
    /// for inference adapters; torch's `no_grad`), so an inference forward builds no autograd
    /// graph and frees every intermediate as soon as it is used.
    fn lambdas(&self, track: bool) -> (Tensor, Tensor) {
        if self.trainable && track {
            (self.lambda_b.as_tensor().clone(), self.lambda_d.as_tensor().clone())
        } else {
            (self.lambda_b.as_detached_tensor(), self.lambda_d.as_detached_tensor())
        }
    }
    /// The initial seed of this layer's own generator, if any.
    pub fn generator_seed(&self) -> Option<u64> {
        self.generator.as_ref().and_then(|g| g.lock().ok().map(|g| g.initial_seed()))
    }
}

/// A per-adapter copy of a whole layer (PEFT's `ModulesToSaveWrapper` for a linear module).
#[derive(Debug)]
pub struct ModuleCopy {
    /// Trainable copy of the weight (same layout as the base weight).
    pub weight: Var,
    /// Trainable copy of the bias.
    pub bias: Option<Var>,
}

#[derive(Debug)]
struct SiteInner {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The base bias as a variable, when `bias != "none"` made it trainable.
    bias_var: Option<Var>,
    adapters: BTreeMap<String, AdapterSlot>,
    merged: Vec<String>,
    copies: BTreeMap<String, ModuleCopy>,
}

/// An adaptable linear layer: frozen base weight plus PVeRA / VeRA adapter slots.
#[derive(Debug)]
pub struct Site {
    path: String,
    in_features: usize,
    out_features: usize,
    kind: LinearKind,
    state: Arc<RunState>,
    inner: RwLock<SiteInner>,
    /// Eval-mode merged weight, rebuilt when its key no longer matches ([`RunState::set_auto_merge`]).
    auto: Mutex<Option<AutoMerged>>,
}

/// A cached `W + Σ ΔW` and everything it was computed from. It is used only while all of these
/// still match, so any change (new base weight, other active adapters, other projections, a λ
/// updated by an optimiser, `set_lambdas` or `Var::set`) rebuilds it.
#[derive(Debug)]
struct AutoMerged {
    weight_id: candle_core::TensorId,
    adapters: Vec<(String, usize, Vec<f32>, Vec<f32>)>,
    merged: Tensor,
}

/// The handle models hold for every linear layer; cheap to clone, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Linear(pub(crate) Arc<Site>);

fn poisoned() -> Error {
    Error::Model("a layer lock was poisoned by a panicking thread".into())
}

impl Linear {
    /// Wraps a base layer. `weight` is (out, in) for [`LinearKind::Linear`] and (in, out) for
    /// [`LinearKind::Conv1D`].
    pub fn new(
        path: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
        kind: LinearKind,
        state: Arc<RunState>,
    ) -> Result<Self> {
        let path = path.into();
        let (d0, d1) = weight.dims2().map_err(|_| Error::ShapeMismatch {
            file: "model".into(),
            key: format!("{path}.weight"),
            expected: "a 2-D weight".into(),
            got: weight.dims().to_vec(),
            hint: String::new(),
        })?;
        let (in_features, out_features) = match kind {
            LinearKind::Linear => (d1, d0),
            LinearKind::Conv1D => (d0, d1),
        };
        if let Some(b) = &bias {
            if b.dims() != [out_features] {
                return Err(Error::ShapeMismatch {
                    file: "model".into(),
                    key: format!("{path}.bias"),
                    expected: format!("[{out_features}]"),
                    got: b.dims().to_vec(),
                    hint: String::new(),
                });
            }
        }
        let weight = gemm_layout(weight, kind)?;
        Ok(Self(Arc::new(Site {
            path,
            in_features,
            out_features,
            kind,
            state,
            inner: RwLock::new(SiteInner {
                weight,
                bias,
                bias_var: None,
                adapters: BTreeMap::new(),
                merged: Vec::new(),
                copies: BTreeMap::new(),
            }),
            auto: Mutex::new(None),
        })))
    }

    /// The site behind this handle.
    pub fn site(&self) -> &Arc<Site> {
        &self.0
    }

    /// Forward pass (see the module docs).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(xs).map_err(candle_core::Error::wrap)
    }
}

impl Site {
    /// Module path, e.g. `encoder.layer.0.attention.self.query`.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    /// Linear or Conv1D.
    pub fn kind(&self) -> LinearKind {
        self.kind
    }
    /// The shared run state.
    pub fn state(&self) -> &Arc<RunState> {
        &self.state
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, SiteInner>> {
        self.inner.read().map_err(|_| poisoned())
    }
    fn write(&self) -> Result<RwLockWriteGuard<'_, SiteInner>> {
        self.inner.write().map_err(|_| poisoned())
    }

    /// The current base weight (merged adapters included).
    pub fn weight(&self) -> Result<Tensor> {
        // Contiguous in the logical layout (the stored one may be the transposed view).
        Ok(self.read()?.weight.contiguous()?)
    }
    /// The current base bias (the trainable one when `bias` made it trainable).
    pub fn bias(&self) -> Result<Option<Tensor>> {
        let g = self.read()?;
        Ok(match &g.bias_var {
            Some(v) => Some(v.as_tensor().clone()),
            None => g.bias.clone(),
        })
    }
    /// Replaces the base weight (same shape).
    pub fn set_weight(&self, w: Tensor) -> Result<()> {
        let mut g = self.write()?;
        if w.dims() != g.weight.dims() {
            return Err(Error::ShapeMismatch {
                file: "model".into(),
                key: format!("{}.weight", self.path),
                expected: format!("{:?}", g.weight.dims()),
                got: w.dims().to_vec(),
                hint: String::new(),
            });
        }
        g.weight = gemm_layout(w, self.kind)?;
        Ok(())
    }

    /// Makes the base bias trainable (PEFT `bias="all"` / `"*_only"`) and returns it.
    pub fn make_bias_trainable(&self) -> Result<Option<Var>> {
        let mut g = self.write()?;
        if let Some(v) = &g.bias_var {
            return Ok(Some(v.clone()));
        }
        let Some(b) = g.bias.clone() else { return Ok(None) };
        let v = Var::from_tensor(&b)?;
        g.bias_var = Some(v.clone());
        Ok(Some(v))
    }
    /// The trainable bias, if any.
    pub fn trainable_bias(&self) -> Result<Option<Var>> {
        Ok(self.read()?.bias_var.clone())
    }
    /// Freezes the bias again (keeping its current values).
    pub fn freeze_bias(&self) -> Result<()> {
        let mut g = self.write()?;
        if let Some(v) = g.bias_var.take() {
            g.bias = Some(v.as_detached_tensor());
        }
        Ok(())
    }

    /// Adds a per-adapter trainable copy of this layer (`modules_to_save`).
    pub fn add_module_copy(&self, adapter: &str) -> Result<()> {
        let mut g = self.write()?;
        let weight = Var::from_tensor(&g.weight.to_dtype(DType::F32)?.to_dtype(g.weight.dtype())?.contiguous()?)?;
        let bias = match &g.bias {
            Some(b) => Some(Var::from_tensor(b)?),
            None => None,
        };
        g.copies.insert(adapter.to_string(), ModuleCopy { weight, bias });
        Ok(())
    }
    /// The copy for `adapter`, if this layer is in `modules_to_save`.
    pub fn module_copy(&self, adapter: &str) -> Result<Option<(Var, Option<Var>)>> {
        Ok(self.read()?.copies.get(adapter).map(|c| (c.weight.clone(), c.bias.clone())))
    }
    /// Adapters that have a module copy here.
    pub fn module_copy_names(&self) -> Result<Vec<String>> {
        Ok(self.read()?.copies.keys().cloned().collect())
    }
    /// Removes a module copy.
    pub fn remove_module_copy(&self, adapter: &str) -> Result<()> {
        self.write()?.copies.remove(adapter);
        Ok(())
    }

    /// Names of the adapters attached to this layer.
    pub fn adapter_names(&self) -> Result<Vec<String>> {
        Ok(self.read()?.adapters.keys().cloned().collect())
    }
    /// True when `adapter` has λ's in this layer.
    pub fn has_adapter(&self, adapter: &str) -> Result<bool> {
        Ok(self.read()?.adapters.contains_key(adapter))
    }
    /// True if any adapter is attached (PEFT then names the base bias `base_layer.bias`).
    pub fn is_targeted(&self) -> Result<bool> {
        Ok(!self.read()?.adapters.is_empty())
    }
    /// Adapters currently merged into the weight, in merge order.
    pub fn merged_adapters(&self) -> Result<Vec<String>> {
        Ok(self.read()?.merged.clone())
    }

    /// Runs `f` on an adapter's slot.
    pub fn with_slot<T>(&self, adapter: &str, f: impl FnOnce(&AdapterSlot) -> T) -> Result<T> {
        let g = self.read()?;
        let slot = g.adapters.get(adapter).ok_or_else(|| Error::UnknownAdapter {
            name: adapter.to_string(),
            known: format!("{:?} in layer {}", g.adapters.keys().collect::<Vec<_>>(), self.path),
        })?;
        Ok(f(slot))
    }

    /// Attaches a new adapter, with PEFT's checks of the shared projections
    /// (`layer.py:113-151`) plus a stricter rank check: PEFT accepts `r < R` here and then fails
    /// in the forward pass with a size mismatch (docs/peft-behaviour.md §2); this refuses it up front,
    /// as it refuses projections of the other method and sampling on a VeRA slot.
    pub fn add_adapter(
        &self,
        name: &str,
        projections: Arc<Projections>,
        spec: &SlotSpec,
        global: &mut TorchGenerator,
    ) -> Result<()> {
        if spec.r == 0 {
            return Err(Error::config(
                "r",
                "`r` should be a positive integer value but the value passed is 0",
            ));
        }
        let method = spec.method;
        let (an, bn) = (crate::checkpoint::proj_a_name(method), crate::checkpoint::proj_b_name(method));
        if projections.method() != method {
            return Err(Error::Projection(format!(
                "adapter {name:?} is a {method} adapter but was given {} projections (layer {}); each method \
                 has its own shared projections",
                projections.method(),
                self.path
            )));
        }
        if !method.samples() && (spec.sample_at_inference || spec.generator_seed.is_some()) {
            return Err(Error::config(
                "sample_at_inference",
                format!("adapter {name:?} is a VeRA adapter: it has no latent to sample (layer {})", self.path),
            ));
        }
        if projections.in_max() < self.in_features {
            return Err(Error::Projection(format!(
                "{an} has a size of {} but {} or greater is required; this probably happened \
                 because an additional {method} adapter was added after the first one with \
                 incompatible shapes (layer {}).",
                projections.in_max(),
                self.in_features,
                self.path
            )));
        }
        if projections.out_max() < self.out_features {
            return Err(Error::Projection(format!(
                "{bn} has a size of {} but {} or greater is required; this probably happened \
                 because an additional {method} adapter was added after the first one with \
                 incompatible shapes (layer {}).",
                projections.out_max(),
                self.out_features,
                self.path
            )));
        }
        if projections.r() != spec.r {
            return Err(Error::Projection(format!(
                "adapter {name:?} has r={} but the shared projections have rank {} (set by the \
                 first adapter); all {method} adapters of a model must use the same r, since they \
                 share {an} and {bn} (PEFT accepts a lower r here and then fails in the \
                 forward pass)",
                spec.r,
                projections.r()
            )));
        }
        let device = projections.device().clone();
        let out = self.out_features;
        let rows = method.latent_rows(spec.r);
        // PEFT: λ_b = ones(out), λ_d = randn(2r) (VeRA: randn(r)) from the global generator,
        // overwritten when init_weights. We draw λ_d only when it is kept, so `init_weights=true`
        // consumes nothing.
        let (lb, ld) = if spec.init_weights {
            (vec![0f32; out], vec![spec.d_initial as f32; rows])
        } else {
            (vec![1f32; out], global.randn_f32(rows))
        };
        let lambda_b = Var::from_vec(lb, out, &device)?;
        let lambda_d = Var::from_vec(ld, rows, &device)?;
        let generator = spec.generator_seed.map(|s| Box::new(Mutex::new(TorchGenerator::new(s))));
        let slot = AdapterSlot {
            method,
            lambda_b,
            lambda_d,
            r: spec.r,
            dropout: spec.dropout,
            sample_at_inference: spec.sample_at_inference,
            generator,
            projections,
            trainable: spec.trainable,
        };
        self.write()?.adapters.insert(name.to_string(), slot);
        Ok(())
    }

    /// Removes an adapter. Refused while it is merged (as PEFT refuses deleting merged adapters).
    pub fn delete_adapter(&self, name: &str) -> Result<()> {
        let mut g = self.write()?;
        if g.merged.iter().any(|m| m == name) {
            return Err(Error::Adapter(format!(
                "cannot delete adapter {name:?} from {} while it is merged; unmerge first",
                self.path
            )));
        }
        g.adapters.remove(name);
        g.copies.remove(name);
        Ok(())
    }

    /// Sets λ_b and λ_d of an adapter from tensors (checkpoint load); shapes must match.
    pub fn set_lambdas(&self, adapter: &str, lambda_b: &Tensor, lambda_d: &Tensor) -> Result<()> {
        let g = self.read()?;
        let slot = g.adapters.get(adapter).ok_or_else(|| Error::UnknownAdapter {
            name: adapter.to_string(),
            known: format!("{:?}", g.adapters.keys().collect::<Vec<_>>()),
        })?;
        let device = slot.lambda_b.device().clone();
        slot.lambda_b.set(&lambda_b.to_dtype(DType::F32)?.to_device(&device)?.contiguous()?)?;
        slot.lambda_d.set(&lambda_d.to_dtype(DType::F32)?.to_device(&device)?.contiguous()?)?;
        Ok(())
    }

    /// Changes whether an adapter's λ's are trainable.
    pub fn set_trainable(&self, adapter: &str, trainable: bool) -> Result<()> {
        if let Some(slot) = self.write()?.adapters.get_mut(adapter) {
            slot.trainable = trainable;
        }
        Ok(())
    }

    /// Switches sampling at inference for one adapter in this layer (run time). Switching it on
    /// for a VeRA adapter is an [`Error::Request`]: it has no latent to sample.
    pub fn set_sample_at_inference(&self, adapter: &str, on: bool) -> Result<()> {
        let mut g = self.write()?;
        let known = format!("{:?}", g.adapters.keys().collect::<Vec<_>>());
        let slot = g.adapters.get_mut(adapter).ok_or_else(|| Error::UnknownAdapter {
            name: adapter.to_string(),
            known,
        })?;
        if on && !slot.method.samples() {
            return Err(vera_cannot_sample(adapter));
        }
        slot.sample_at_inference = on;
        Ok(())
    }

    /// Reseeds this layer's noise generator for an adapter (`None` removes it, so noise comes
    /// from the run state's global generator).
    pub fn set_generator_seed(&self, adapter: &str, seed: Option<u64>) -> Result<()> {
        let mut g = self.write()?;
        if let Some(slot) = g.adapters.get_mut(adapter) {
            slot.generator = seed.map(|s| Box::new(Mutex::new(TorchGenerator::new(s))));
        }
        Ok(())
    }

    /// The state of an adapter's own noise generator (torch's `get_state` layout), if it has one.
    pub fn generator_state(&self, adapter: &str) -> Result<Option<Vec<u8>>> {
        let g = self.read()?;
        match g.adapters.get(adapter).and_then(|s| s.generator.as_ref()) {
            Some(m) => Ok(Some(m.lock().map_err(|_| poisoned())?.get_state())),
            None => Ok(None),
        }
    }

    /// Restores a state from [`Site::generator_state`].
    pub fn set_generator_state(&self, adapter: &str, bytes: &[u8]) -> Result<()> {
        let g = self.read()?;
        if let Some(m) = g.adapters.get(adapter).and_then(|s| s.generator.as_ref()) {
            m.lock().map_err(|_| poisoned())?.set_state(bytes).map_err(|e| Error::Model(e.to_string()))?;
        }
        Ok(())
    }

    /// ΔW of one adapter (mean path only), in the base weight's layout ((out, in), or (in, out)
    /// for Conv1D), f32:
    /// `ΔW = (λ_b[:,None] ⊙ B[:out]) @ (λ_d[:R,None] ⊙ A[:R, :in])` (PEFT `layer.py:243-285`; for
    /// VeRA, whose A and λ_d have exactly R rows, this is its whole `get_delta_weight`).
    pub fn delta_weight(&self, adapter: &str) -> Result<Tensor> {
        let g = self.read()?;
        self.delta_weight_locked(&g, adapter)
    }

    fn delta_weight_locked(&self, g: &SiteInner, adapter: &str) -> Result<Tensor> {
        let slot = g.adapters.get(adapter).ok_or_else(|| Error::UnknownAdapter {
            name: adapter.to_string(),
            known: format!("{:?}", g.adapters.keys().collect::<Vec<_>>()),
        })?;
        let r = slot.r;
        let out = self.out_features;
        let p = &slot.projections;
        let b = p.b_slice(out)?; // (out, R)
        let a = p.a_slice(self.in_features)?.narrow(0, 0, r)?; // (R, in)
        let lb = slot.lambda_b.as_tensor().reshape((out, 1))?;
        let ld = slot.lambda_d.as_tensor().narrow(0, 0, r)?.reshape((r, 1))?;
        let dw = b.broadcast_mul(&lb)?.matmul(&a.broadcast_mul(&ld)?)?;
        Ok(match self.kind {
            LinearKind::Linear => dw,
            LinearKind::Conv1D => dw.t()?.contiguous()?,
        })
    }

    /// Merges adapters into the base weight (`None`: the active adapters). Already merged adapters
    /// are skipped. With `safe`, the result is checked for NaN/Inf first and the weight is left
    /// untouched if any appear. Returns the adapters merged by this call.
    pub fn merge(&self, adapters: Option<&[String]>, safe: bool) -> Result<Vec<String>> {
        let mut g = self.write()?;
        let wanted: Vec<String> = match adapters {
            Some(a) => a.to_vec(),
            None => self.state.active_adapters(),
        };
        let mut done = Vec::new();
        for name in wanted {
            if g.merged.contains(&name) || !g.adapters.contains_key(&name) {
                continue;
            }
            let dw = self.delta_weight_locked(&g, &name)?;
            let dtype = g.weight.dtype();
            let merged = (g.weight.to_dtype(DType::F32)? + dw)?;
            if safe {
                let bad = count_non_finite(&merged)?;
                if bad > 0 {
                    return Err(Error::NonFinite {
                        what: format!("merged weight of {} with adapter {name:?}", self.path),
                        count: bad,
                        hint: format!(
                            " (NaNs detected in the merged weights. The adapter {name} seems to be \
                             broken); the weight was left unchanged"
                        ),
                    });
                }
            }
            // Detached: merging happens under no_grad in PEFT; a weight that carried the λ's
            // graph made every later forward keep that whole graph alive.
            g.weight = gemm_layout(merged.to_dtype(dtype)?.detach(), self.kind)?;
            g.merged.push(name.clone());
            done.push(name);
        }
        Ok(done)
    }

    /// Unmerges every merged adapter, last merged first (LIFO). Returns how many were unmerged.
    pub fn unmerge(&self) -> Result<usize> {
        let mut g = self.write()?;
        let mut n = 0;
        while let Some(name) = g.merged.pop() {
            if g.adapters.contains_key(&name) {
                let dw = self.delta_weight_locked(&g, &name)?;
                let dtype = g.weight.dtype();
                g.weight = gemm_layout((g.weight.to_dtype(DType::F32)? - dw)?.to_dtype(dtype)?.detach(), self.kind)?;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Drops every adapter and module copy (after an optional merge), leaving a plain layer.
    /// When one of `active` has a module copy here (`modules_to_save`), the first such copy
    /// becomes the layer, the one the forward pass used: PEFT's unloading of a
    /// `ModulesToSaveWrapper` keeps `modules_to_save[active_adapter]`. Returns the adapter whose
    /// copy was kept.
    pub fn strip_adapters(&self, active: &[String]) -> Result<Option<String>> {
        let mut g = self.write()?;
        let kept = active.iter().find(|a| g.copies.contains_key(a.as_str())).cloned();
        if let Some(copy) = kept.as_deref().and_then(|a| g.copies.remove(a)) {
            g.weight = gemm_layout(copy.weight.as_detached_tensor(), self.kind)?;
            g.bias = copy.bias.map(|b| b.as_detached_tensor());
            g.bias_var = None;
        }
        g.adapters.clear();
        g.merged.clear();
        g.copies.clear();
        if let Some(v) = g.bias_var.take() {
            g.bias = Some(v.as_detached_tensor());
        }
        Ok(kept)
    }

    /// `x2 · Wᵀ + b` (Conv1D: `x2 · W + b`). `frozen`: the weight needs no gradient (the base
    /// weight, as opposed to a trainable `modules_to_save` copy), so the backward pass computes
    /// only the input gradient ([`crate::ops::matmul_const`]).
    fn base_forward(
        &self,
        x2: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        frozen: bool,
    ) -> Result<Tensor> {
        let x2 = if x2.dtype() != weight.dtype() { x2.to_dtype(weight.dtype())? } else { x2.clone() };
        let rhs = match self.kind {
            LinearKind::Linear => weight.t()?,
            LinearKind::Conv1D => weight.clone(),
        };
        if frozen {
            // Bias accumulated inside the GEMM where it applies (f32 CPU, frozen bias).
            let b = match bias {
                Some(b) if b.dtype() != x2.dtype() => Some(b.to_dtype(x2.dtype())?),
                Some(b) => Some(b.clone()),
                None => None,
            };
            return crate::ops::matmul_bias_const(&x2, &rhs, b.as_ref());
        }
        let y = x2.matmul(&rhs)?;
        Ok(match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    /// The forward pass (see the module docs). One of four paths, by the run state:
    /// adapters disabled ([`Site::forward_disabled`]); a `modules_to_save` copy of an active
    /// adapter replacing the layer; in eval mode, the cached merged weight
    /// ([`Site::forward_auto_merged`]); otherwise the base layer plus each active adapter's
    /// low-rank path ([`Site::forward_unmerged`], sampled or mean).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let lead = match dims.split_last() {
            Some((&last, lead)) if last == self.in_features => lead.to_vec(),
            _ => {
                return Err(Error::ShapeMismatch {
                    file: "input".into(),
                    key: self.path.clone(),
                    expected: format!("(..., {})", self.in_features),
                    got: dims.clone(),
                    hint: if dims.is_empty() {
                        String::new()
                    } else {
                        " (the last dimension must equal the layer's in_features)".into()
                    },
                })
            }
        };
        let n: usize = lead.iter().product();
        let x2 = x.reshape((n, self.in_features))?;
        let view = self.state.forward_view();
        let y = if view.disabled {
            self.forward_disabled(&x2, &view)?
        } else if let Some(rows) = view.rows.adapters.clone() {
            self.forward_mixed(&*self.read()?, &x2, &rows, &view)?
        } else {
            let g = self.read()?;
            // modules_to_save: the first active adapter with a copy replaces the whole layer.
            if let Some(copy) = view.active.iter().find_map(|a| g.copies.get(a)) {
                let track = view.grad_enabled;
                let bias = copy.bias.as_ref().map(|b| live(b, track));
                self.base_forward(&x2, &live(&copy.weight, track), bias.as_ref(), false)?
            } else if let Some(y) = self.forward_auto_merged(&g, &x2, &view)? {
                y
            } else {
                self.forward_unmerged(&g, x, &x2, &view)?
            }
        };
        finish(y, &lead, self.out_features, x.dtype())
    }

    /// Adapters disabled: the base layer alone (merged adapters are unmerged first, as PEFT does).
    fn forward_disabled(&self, x2: &Tensor, view: &ForwardView) -> Result<Tensor> {
        if !self.read()?.merged.is_empty() {
            self.unmerge()?;
        }
        let g = self.read()?;
        self.base_forward(x2, &g.weight, base_bias(&g, view.grad_enabled).as_ref(), true)
    }

    /// Eval mode with nothing to differentiate: one GEMM with the cached `W + Σ ΔW`, plus only the
    /// noise path of adapters that sample. `None` when this path does not apply (trainable λ's,
    /// merged adapters, auto-merge off, sampling adapters unless merged sampling is on, non-f32
    /// weights).
    fn forward_auto_merged(&self, g: &SiteInner, x2: &Tensor, view: &ForwardView) -> Result<Option<Tensor>> {
        let active = &view.active;
        let applies = g.merged.is_empty()
            && view.mode == Mode::Eval
            && view.auto_merge
            && active.iter().filter_map(|n| g.adapters.get(n)).all(|s| {
                // A trainable λ needs its gradient; sampling keeps PEFT's exact sums unless asked.
                !s.trainable && (view.merged_sampling || !samples(s, view))
            });
        if !applies {
            return Ok(None);
        }
        let Some(w) = self.auto_merged_weight(g, active)? else { return Ok(None) };
        let mut y = self.base_forward(x2, &w, base_bias(g, view.grad_enabled).as_ref(), true)?;
        let mut x32 = F32Input::new(x2);
        for name in active {
            let Some(slot) = g.adapters.get(name) else { continue };
            if samples(slot, view) {
                let noise = self.noise_delta(slot, name, x32.get()?, view)?;
                y = (y.to_dtype(DType::F32)? + noise)?;
            }
        }
        Ok(Some(y))
    }

    /// The base layer plus, unless adapters are merged into the weight, each active adapter's
    /// `λ_b ⊙ (z · Bᵀ)` (PEFT's unmerged forward).
    fn forward_unmerged(&self, g: &SiteInner, x: &Tensor, x2: &Tensor, view: &ForwardView) -> Result<Tensor> {
        let mut y = self.base_forward(x2, &g.weight, base_bias(g, view.grad_enabled).as_ref(), true)?;
        if !g.merged.is_empty() {
            return Ok(y);
        }
        let mut x32 = F32Input::new(x2);
        // The layer input names x·A for sites sharing it (not a Var: its values may change).
        let key = (!x.is_variable()).then(|| x.id());
        for name in &view.active {
            let Some(slot) = g.adapters.get(name) else { continue };
            let delta = self.adapter_delta(slot, name, x32.get()?, key, view)?;
            y = (y.to_dtype(DType::F32)? + delta)?;
        }
        Ok(y)
    }

    /// A batch whose rows go through different adapters ([`RowPlan::adapters`](crate::state::RowPlan)):
    /// the base layer once for all rows; rows whose adapter has a `modules_to_save` copy here take
    /// the copy's output instead; then, per group of adapters sharing one projection pair, one
    /// `x·Aᵀ` over the group's rows, each row scaled by its own adapter's λ_d, `z` (sampled per
    /// row where the adapter samples, from the row's own noise seed), one `z·Bᵀ`, each row scaled by
    /// its λ_b. Rows without an adapter (or whose adapter does not adapt this layer) keep the base
    /// output. The result equals running each adapter's rows alone (same noise per row); merged
    /// weights do not apply. Inference only.
    fn forward_mixed(&self, g: &SiteInner, x2: &Tensor, rows: &[Option<String>], view: &ForwardView) -> Result<Tensor> {
        if view.mode == Mode::Train {
            return Err(Error::Adapter(format!(
                "{}: a mixed-adapter batch (a row plan with adapters) is for inference; train one adapter at a time",
                self.path
            )));
        }
        if !g.merged.is_empty() {
            return Err(Error::Adapter(format!(
                "{}: adapters {:?} are merged into the weight; unmerge them before a mixed-adapter batch",
                self.path, g.merged
            )));
        }
        let n = x2.dims()[0];
        let b = rows.len();
        if b == 0 || n % b != 0 {
            return Err(Error::Model(format!(
                "{}: the row plan names {b} adapter(s) but the input has {n} row(s); give one adapter per batch row",
                self.path
            )));
        }
        let per = n / b;
        let dev = x2.device().clone();
        let token_rows = |batch_rows: &[usize]| -> Result<Tensor> {
            let idx: Vec<u32> = batch_rows.iter().flat_map(|&i| (i * per..(i + 1) * per).map(|t| t as u32)).collect();
            let len = idx.len();
            Ok(Tensor::from_vec(idx, len, &dev)?)
        };
        let mut y = self.base_forward(x2, &g.weight, base_bias(g, false).as_ref(), true)?.to_dtype(DType::F32)?;
        // modules_to_save copies replace the layer for their adapter's rows.
        let mut names: Vec<&String> = rows.iter().flatten().collect();
        names.sort();
        names.dedup();
        for name in &names {
            let Some(copy) = g.copies.get(*name) else { continue };
            let mine: Vec<usize> = (0..b).filter(|&i| rows[i].as_ref() == Some(*name)).collect();
            let idx = token_rows(&mine)?;
            let xs = x2.index_select(&idx, 0)?;
            let bias = copy.bias.as_ref().map(|v| live(v, false));
            let yc = self.base_forward(&xs, &live(&copy.weight, false), bias.as_ref(), false)?.to_dtype(DType::F32)?;
            let old = y.index_select(&idx, 0)?;
            y = y.index_add(&idx, &(yc - old)?, 0)?;
        }
        // Adapters with a slot here and no copy, grouped by their projections.
        let mut groups: Vec<(usize, Vec<&String>)> = Vec::new();
        for name in &names {
            if g.copies.contains_key(*name) {
                continue;
            }
            let Some(slot) = g.adapters.get(*name) else { continue };
            let key = Arc::as_ptr(&slot.projections) as usize;
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(name),
                None => groups.push((key, vec![name])),
            }
        }
        let x32 = x2.to_dtype(DType::F32)?;
        for (_, members) in groups {
            let mine: Vec<usize> = (0..b).filter(|&i| rows[i].as_ref().is_some_and(|a| members.contains(&a))).collect();
            let all = mine.len() == b;
            let idx = token_rows(&mine)?;
            let xs = if all { x32.clone() } else { x32.index_select(&idx, 0)? };
            // Each token row's index into the group's stacked λ's.
            let which: Vec<u32> = mine
                .iter()
                .flat_map(|&i| {
                    let k = members.iter().position(|m| Some(*m) == rows[i].as_ref()).unwrap_or(0) as u32;
                    std::iter::repeat_n(k, per)
                })
                .collect();
            let which_len = which.len();
            let which = Tensor::from_vec(which, which_len, &dev)?;
            let slots: Vec<&AdapterSlot> = members.iter().filter_map(|m| g.adapters.get(*m)).collect();
            let first = slots[0];
            let r = first.r;
            let p = &first.projections;
            let lds: Vec<Tensor> = slots.iter().map(|s| s.lambdas(false).1).collect();
            let lbs: Vec<Tensor> = slots.iter().map(|s| s.lambdas(false).0).collect();
            let ld = Tensor::stack(&lds, 0)?.index_select(&which, 0)?; // (m, 2R)
            let lb = Tensor::stack(&lbs, 0)?.index_select(&which, 0)?; // (m, out)
            let h = (matmul_const(&xs, &p.a_slice_t(self.in_features)?)? * ld)?;
            let mu = h.narrow(1, 0, r)?;
            let sampling: Vec<bool> = slots.iter().map(|s| samples(s, view)).collect();
            let z = if sampling.iter().any(|&x| x) {
                let seeds = view.rows.seeds.as_ref().ok_or_else(|| {
                    Error::Adapter(format!(
                        "{}: sampling in a mixed-adapter batch needs a noise seed per row (RowPlan::seeds)",
                        self.path
                    ))
                })?;
                if seeds.len() != b {
                    return Err(Error::Model(format!(
                        "{}: the row plan has {} noise seed(s) for {b} row(s)",
                        self.path,
                        seeds.len()
                    )));
                }
                let logvar = h.narrow(1, r, r)?;
                let mut eps = Vec::with_capacity(mine.len() * per * r);
                let mut mask = Vec::with_capacity(mine.len() * per);
                for &i in &mine {
                    let k = members.iter().position(|m| Some(*m) == rows[i].as_ref()).unwrap_or(0);
                    if sampling[k] {
                        check_logvar(&logvar.narrow(0, mask.len(), per)?, &self.path, members[k])?;
                        let label = format!("{}/0", self.path); // as draw_eps for one active adapter
                        eps.extend(row_noise(seeds[i], &label, per * r, r));
                        mask.extend(std::iter::repeat_n(1f32, per));
                    } else {
                        eps.extend(std::iter::repeat_n(0f32, per * r));
                        mask.extend(std::iter::repeat_n(0f32, per));
                    }
                }
                let m = mine.len() * per;
                let eps = Tensor::from_vec(eps, (m, r), &dev)?;
                // Rows that do not sample get ε = 0 (and their std is never used).
                let std = (&logvar * 0.5)?.exp()?.broadcast_mul(&Tensor::from_vec(mask, (m, 1), &dev)?)?;
                (mu + (eps * std)?)?
            } else {
                mu
            };
            let delta = (matmul_const(&z, &p.b_slice_t(self.out_features)?)? * lb)?;
            y = if all { (y + delta)? } else { y.index_add(&idx, &delta, 0)? };
        }
        Ok(y)
    }

    /// The eval-mode merged weight `W + Σ_active ΔW` (f32 base weights only), from the cache when
    /// it still matches; `None` when no active adapter lives here or the weight is not f32.
    fn auto_merged_weight(&self, g: &SiteInner, active: &[String]) -> Result<Option<Tensor>> {
        if g.weight.dtype() != DType::F32 {
            return Ok(None);
        }
        let mut key = Vec::new();
        for name in active {
            let Some(slot) = g.adapters.get(name) else { continue };
            key.push((
                name.clone(),
                Arc::as_ptr(&slot.projections) as usize,
                slot.lambda_b.as_tensor().to_vec1::<f32>()?,
                slot.lambda_d.as_tensor().to_vec1::<f32>()?,
            ));
        }
        if key.is_empty() {
            return Ok(None);
        }
        let mut cache = self.auto.lock().map_err(|_| poisoned())?;
        if let Some(c) = cache.as_ref() {
            if c.weight_id == g.weight.id() && c.adapters == key {
                return Ok(Some(c.merged.clone()));
            }
        }
        // The same sums `merge` makes, in the same order.
        let mut w = g.weight.clone();
        for (name, ..) in &key {
            w = (w + self.delta_weight_locked(g, name)?.detach())?;
        }
        let w = gemm_layout(w.detach(), self.kind)?;
        *cache = Some(AutoMerged { weight_id: g.weight.id(), adapters: key, merged: w.clone() });
        Ok(Some(w))
    }

    /// `m` standard normal draws for a sampling adapter: per batch row from the row's own seed
    /// when the forward has a [`RowPlan`](crate::state::RowPlan) with seeds (row `i`'s
    /// `m / rows` values from a generator seeded with a mix of its seed, this module's path and
    /// the adapter's position among the active adapters), else from the adapter's own generator (`generator_seed`), else from the
    /// run state's global one.
    fn draw_eps(&self, slot: &AdapterSlot, name: &str, m: usize, view: &ForwardView) -> Result<Vec<f32>> {
        if let Some(seeds) = &view.rows.seeds {
            let rows = seeds.len();
            if rows == 0 || m % rows != 0 {
                return Err(Error::Model(format!(
                    "{}: the row plan has {rows} noise seed(s) but this forward draws {m} values; set one seed per \
                     batch row",
                    self.path
                )));
            }
            let per = m / rows;
            // The adapter's position among the active ones (0 for a single adapter and in a
            // mixed batch), not its name: an adapter's noise does not depend on the name it was
            // loaded under (a server's answer equals the CLI's), and summed adapters still draw
            // independent noise.
            let k = view.active.iter().position(|a| a == name).unwrap_or(0);
            let label = format!("{}/{k}", self.path);
            let mut out = Vec::with_capacity(m);
            for &seed in seeds.iter() {
                out.extend(row_noise(seed, &label, per, slot.r));
            }
            return Ok(out);
        }
        match &slot.generator {
            Some(gen) => Ok(gen.lock().map_err(|_| poisoned())?.randn_f32(m)),
            None => self.state.with_global_generator(|g| g.randn_f32(m)),
        }
    }

    /// The noise path of a sampling adapter whose mean path is merged:
    /// `λ_b ⊙ ((ε ⊙ exp(0.5 · λ_d[R:] ⊙ (x · A[R:]ᵀ))) · Bᵀ)`, drawing ε exactly as the unmerged
    /// path does (n·r values from the same generator).
    fn noise_delta(&self, slot: &AdapterSlot, name: &str, x32: &Tensor, view: &ForwardView) -> Result<Tensor> {
        let n = x32.dims()[0];
        let r = slot.r;
        let p = &slot.projections;
        let a_t = p.a_slice_t(self.in_features)?.narrow(1, r, r)?; // (in, R), the logvar half
        let (lb, ld) = slot.lambdas(false);
        let ld = ld.narrow(0, r, r)?;
        let logvar = matmul_const(x32, &a_t)?.broadcast_mul(&ld)?;
        check_logvar(&logvar, &self.path, name)?;
        let eps = Tensor::from_vec(self.draw_eps(slot, name, n * r, view)?, (n, r), x32.device())?;
        let z = (eps * (&logvar * 0.5)?.exp()?)?;
        let b_t = p.b_slice_t(self.out_features)?; // (R, out)
        Ok(matmul_const(&z, &b_t)?.broadcast_mul(&lb)?)
    }

    /// One adapter's `λ_b ⊙ (z · B[:out]ᵀ)` for the f32 input `x32`: dropout in training, `z`
    /// sampled in training or when the adapter samples at inference (through the fused CPU op when
    /// it applies, [`Site::sampled_delta_fused`]), the KL term pushed when the run collects it.
    fn adapter_delta(
        &self,
        slot: &AdapterSlot,
        name: &str,
        x32: &Tensor,
        key: Option<candle_core::TensorId>,
        view: &ForwardView,
    ) -> Result<Tensor> {
        let training = view.mode == Mode::Train;
        let n = x32.dims()[0];
        let r = slot.r;
        let p = &slot.projections;
        let dropped = training && slot.dropout > 0.0;
        // The seam between the methods: only PVeRA samples its latent (training or at inference).
        let sample = slot.method.samples() && (training || samples(slot, view));
        let xd = if dropped {
            let mut mask = vec![1f32; x32.elem_count()];
            self.state.with_global_generator(|g| g.dropout_f32(&mut mask, slot.dropout))?;
            (x32 * Tensor::from_vec(mask, x32.dims(), x32.device())?)?
        } else {
            x32.clone()
        };
        // x·A of this input, if a site with the same projections computed it (query, then value).
        let key = key.filter(|_| !dropped);
        let (lb, ld) = slot.lambdas(view.grad_enabled);
        let a_t = p.a_slice_t(self.in_features)?; // (in, 2R)
        let b_t = p.b_slice_t(self.out_features)?; // (R, out)
        if sample && !(training && view.collect_kl) {
            let lambdas = (&lb, &ld);
            if let Some(delta) = self.sampled_delta_fused(slot, name, &xd, &a_t, &b_t, lambdas, key, view)? {
                return Ok(delta);
            }
        }
        // The composite: every step a candle op (autograd through all of them, the KL term).
        let h = matmul_const(&xd, &a_t)?.broadcast_mul(&ld)?; // (n, 2R); VeRA (n, R)
        let mu = h.narrow(1, 0, r)?; // VeRA: all of h
        let z = if sample {
            let logvar = h.narrow(1, r, r)?;
            check_logvar(&logvar, &self.path, name)?;
            let eps = Tensor::from_vec(self.draw_eps(slot, name, n * r, view)?, (n, r), x32.device())?;
            let std = (&logvar * 0.5)?.exp()?;
            if training && view.collect_kl {
                let kl = kl_term(&mu, &logvar)?;
                self.state.push_kl(KlTerm { module: self.path.clone(), adapter: name.to_string(), value: kl })?;
            }
            (&mu + (eps * std)?)?
        } else {
            mu
        };
        Ok(matmul_const(&z, &b_t)?.broadcast_mul(&lb)?)
    }

    /// The sampled path as one fused CPU op ([`crate::ops::sampled_delta_no_grad`] when nothing
    /// needs a gradient, as in Monte Carlo prediction; [`crate::ops::sampled_delta`], with its own
    /// backward for x, λ_d and λ_b, in training without a KL term). ε comes from the same
    /// generator, in the same order, as in the composite, so the noise does not depend on the
    /// path. `None` when the op does not apply (off the CPU, other dtypes); the overflow guard
    /// names the layer when the log-variance is too large.
    #[allow(clippy::too_many_arguments)]
    fn sampled_delta_fused(
        &self,
        slot: &AdapterSlot,
        name: &str,
        xd: &Tensor,
        a_t: &Tensor,
        b_t: &Tensor,
        (lb, ld): (&Tensor, &Tensor),
        key: Option<candle_core::TensorId>,
        view: &ForwardView,
    ) -> Result<Option<Tensor>> {
        let n = xd.dims()[0];
        let r = slot.r;
        let p = &slot.projections;
        let cached = key.and_then(|k| p.xa(k, self.in_features, n));
        let draw = |m: usize| self.draw_eps(slot, name, m, view);
        let tracked = xd.track_op() || lb.track_op() || ld.track_op();
        let untracked = match tracked {
            true => None,
            false => crate::ops::sampled_delta_no_grad(xd, a_t, ld, draw, b_t, lb, LOGVAR_LIMIT, cached.clone())?,
        };
        let out = match untracked {
            Some(out) => out,
            None => match crate::ops::sampled_delta(xd, a_t, ld, draw, b_t, lb, LOGVAR_LIMIT, cached)? {
                Some(out) => out,
                None => return Ok(None),
            },
        };
        if out.over > 0 {
            let logvar = matmul_const(xd, &a_t.narrow(1, r, r)?)?.broadcast_mul(&ld.narrow(0, r, r)?)?;
            check_logvar(&logvar.detach(), &self.path, name)?;
        }
        if let Some(k) = key {
            p.store_xa(k, self.in_features, n, out.xa);
        }
        Ok(Some(out.delta))
    }
}

/// The error for asking a VeRA adapter to sample.
pub(crate) fn vera_cannot_sample(adapter: &str) -> Error {
    Error::Request(format!(
        "adapter `{adapter}` is a VeRA adapter: it has no latent to sample (sampling, Monte Carlo prediction and \
         the KL term exist for PVeRA adapters only); predict in mean mode (samples 1)"
    ))
}

/// Largest log-variance the sampled path accepts: `exp(88) ≈ 1.65e38` is the last power of e
/// below f32's maximum (3.4e38), so `exp(0.5·logvar)` (the standard deviation) and the KL term's
/// `exp(logvar)` stay finite. PEFT has no guard: past it, its outputs or KL become inf/NaN.
pub const LOGVAR_LIMIT: f32 = 88.0;

/// The overflow guard of the sampled path: a log-variance above [`LOGVAR_LIMIT`] (or NaN) is an
/// error naming the module and adapter instead of an infinite standard deviation that would turn
/// the outputs into inf/NaN. Values up to the limit are used unchanged (parity with PEFT wherever
/// PEFT's result is finite). One max-reduction over `(rows, r)` per sampled layer.
fn check_logvar(logvar: &Tensor, path: &str, adapter: &str) -> Result<()> {
    let peak = logvar.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if peak <= LOGVAR_LIMIT {
        return Ok(());
    }
    let v = logvar.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let count = v.iter().filter(|x| !(**x <= LOGVAR_LIMIT)).count().max(1);
    let worst = v.iter().copied().fold(f32::NEG_INFINITY, |a, b| if b.is_nan() || a.is_nan() { f32::NAN } else { a.max(b) });
    Err(Error::NonFinite {
        what: format!("{path}: adapter `{adapter}`: sampled log-variance (λ_d ⊙ A·x, second half)"),
        count,
        hint: format!(
            " in the standard deviation exp(logvar / 2): max logvar {worst} > {LOGVAR_LIMIT} overflows f32. λ_d \
             has grown too large: lower the learning rate (or β of the KL term), clip gradients, or use an earlier \
             checkpoint; the mean path (no sampling) is unaffected"
        ),
    })
}

/// A base weight in the memory layout its GEMM reads fastest. A Linear weight is logically
/// `(out, in)` and multiplies as `x · Wᵀ`; on the CPU (f32) it is stored as the transposed view
/// of a contiguous `(in, out)` buffer, so `Wᵀ` is a plain row-major operand, which candle's GEMM
/// reads faster than the strided `Wᵀ`. The logical shape and values are unchanged;
/// [`Site::weight`] hands out a contiguous copy.
fn gemm_layout(w: Tensor, kind: LinearKind) -> Result<Tensor> {
    if kind != LinearKind::Linear || !w.device().is_cpu() || w.dtype() != DType::F32 || w.rank() != 2 {
        return Ok(w);
    }
    let wt = w.t()?;
    if wt.is_contiguous() {
        return Ok(w);
    }
    Ok(wt.contiguous()?.t()?)
}

/// The layer's base bias as a forward input: the trainable one when `bias` made it trainable.
fn base_bias(g: &SiteInner, track: bool) -> Option<Tensor> {
    g.bias_var.as_ref().map(|v| live(v, track)).or_else(|| g.bias.clone())
}

/// The layer input in f32 (the adapter paths' dtype), converted once when first asked for.
struct F32Input<'a> {
    x: &'a Tensor,
    f32: Option<Tensor>,
}

impl<'a> F32Input<'a> {
    fn new(x: &'a Tensor) -> Self {
        Self { x, f32: None }
    }
    fn get(&mut self) -> Result<&Tensor> {
        if self.f32.is_none() {
            self.f32 = Some(self.x.to_dtype(DType::F32)?);
        }
        Ok(self.f32.as_ref().unwrap_or(self.x))
    }
}

/// A variable as a forward input: tracked for autograd when gradients are on, detached otherwise.
fn live(v: &Var, track: bool) -> Tensor {
    if track {
        v.as_tensor().clone()
    } else {
        v.as_tensor().detach()
    }
}

/// Whether an adapter samples its latent in an eval-mode forward: never for VeRA (whatever the
/// run's sampling override), else by the override or the layer's `sample_at_inference`.
/// The `values` standard normal draws of one batch row under per-row noise seeds: a generator
/// seeded with a mix of the row's seed and `label`, drawn `width` values (one token's latent) at a
/// time. Token by token, so a token's noise does not depend on how many padding tokens follow it
/// (torch's vectorised `normal_` redraws the tail of a fill whose size is not a multiple of 16, so
/// one fill of the whole row would tie every value to the row's padded length).
fn row_noise(seed: u64, label: &str, values: usize, width: usize) -> Vec<f32> {
    let mut g = TorchGenerator::new(crate::rng::mix_seed(seed, label));
    let width = width.max(1);
    let mut out = Vec::with_capacity(values);
    while out.len() < values {
        out.extend(g.randn_f32(width.min(values - out.len())));
    }
    out
}

fn samples(slot: &AdapterSlot, view: &ForwardView) -> bool {
    if !slot.method.samples() {
        return false;
    }
    match view.sampling {
        Sampling::FromConfig => slot.sample_at_inference,
        Sampling::Always => true,
        Sampling::Never => false,
    }
}

/// `-0.5 * mean(1 + logvar - mu² - exp(logvar))`: KL(N(mu, exp(logvar)) ‖ N(0, 1)) averaged over
/// all elements, as the PVeRA paper's code computes it.
pub fn kl_term(mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    let inner = ((logvar + 1.0)? - mu.sqr()?)?;
    let inner = (inner - logvar.exp()?)?;
    Ok((inner.mean_all()? * -0.5)?)
}

fn finish(y: Tensor, lead: &[usize], out: usize, dtype: DType) -> Result<Tensor> {
    let mut shape = lead.to_vec();
    shape.push(out);
    let y = y.reshape(shape)?;
    Ok(if y.dtype() != dtype { y.to_dtype(dtype)? } else { y })
}

/// Number of NaN or infinite values in a tensor.
pub fn count_non_finite(t: &Tensor) -> Result<usize> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().filter(|x| !x.is_finite()).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn layer(state: Arc<RunState>) -> Linear {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..6 * 5).map(|i| ((i * 37) % 11) as f32 * 0.1 - 0.5).collect();
        let w = Tensor::from_vec(w, (6, 5), &dev).unwrap();
        let b = Tensor::from_vec(vec![0.1f32; 6], 6, &dev).unwrap();
        let lin = Linear::new("lin", w, Some(b), LinearKind::Linear, state).unwrap();
        let p = Arc::new(Projections::generate(Method::Pvera, 0, 3, 5, 6, crate::TorchKernel::default(), &dev).unwrap());
        let spec = SlotSpec {
            method: Method::Pvera,
            r: 3,
            dropout: 0.0,
            sample_at_inference: false,
            generator_seed: Some(7),
            init_weights: false,
            d_initial: 0.1,
            trainable: false,
        };
        let mut g = TorchGenerator::new(1);
        lin.site().add_adapter("default", p, &spec, &mut g).unwrap();
        lin
    }

    fn out(lin: &Linear, x: &Tensor) -> Vec<Vec<f32>> {
        lin.forward(x).unwrap().to_vec2::<f32>().unwrap()
    }

    fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        a.iter().flatten().zip(b.iter().flatten()).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn auto_merge_leaves_trainable_adapters_differentiable() {
        let state = Arc::new(RunState::new(0));
        let lin = layer(state.clone());
        lin.site().set_trainable("default", true).unwrap();
        let x = Tensor::from_vec((0..10).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), (2, 5), &Device::Cpu).unwrap();
        let y = lin.forward(&x).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let lb = lin.site().with_slot("default", |s| s.lambda_b().clone()).unwrap();
        assert!(grads.get(lb.as_tensor()).is_some(), "λ_b of a trainable adapter gets a gradient in eval mode");
    }

    #[test]
    fn auto_merge_matches_the_unmerged_path_and_follows_lambda_updates() {
        let state = Arc::new(RunState::new(0));
        let lin = layer(state.clone());
        let x: Vec<f32> = (0..4 * 5).map(|i| (i as f32 * 0.3).sin()).collect();
        let x = Tensor::from_vec(x, (4, 5), &Device::Cpu).unwrap();
        assert!(state.auto_merge(), "on by default");
        let auto = out(&lin, &x);
        state.set_auto_merge(false).unwrap();
        let plain = out(&lin, &x);
        assert!(max_diff(&auto, &plain) < 1e-5, "merged and unmerged agree up to rounding");
        assert!(lin.site().merged_adapters().unwrap().is_empty(), "auto-merge is invisible to merge state");

        // A λ update (as an optimiser or set_lambdas makes) must invalidate the cached weight.
        state.set_auto_merge(true).unwrap();
        let lb = Tensor::from_vec(vec![2f32; 6], 6, &Device::Cpu).unwrap();
        let ld = lin.site().with_slot("default", |s| s.lambda_d().as_detached_tensor().copy()).unwrap().unwrap();
        lin.site().set_lambdas("default", &lb, &ld).unwrap();
        let auto2 = out(&lin, &x);
        state.set_auto_merge(false).unwrap();
        let plain2 = out(&lin, &x);
        assert!(max_diff(&auto2, &plain2) < 1e-5);
        assert!(max_diff(&auto2, &auto) > 1e-3, "the new λ_b changed the output");

        // An explicit merge / unmerge still round-trips with auto-merge on.
        state.set_auto_merge(true).unwrap();
        lin.site().merge(None, false).unwrap();
        assert!(!lin.site().weight().unwrap().track_op(), "a merged weight carries no λ graph");
        let merged = out(&lin, &x);
        lin.site().unmerge().unwrap();
        assert!(!lin.site().weight().unwrap().track_op());
        assert!(max_diff(&merged, &plain2) < 1e-5);
        assert!(max_diff(&out(&lin, &x), &plain2) < 1e-5);
    }

    #[test]
    fn sampling_with_the_mean_merged_draws_the_same_noise() {
        let state = Arc::new(RunState::new(0));
        let lin = layer(state.clone());
        let x: Vec<f32> = (0..4 * 5).map(|i| (i as f32 * 0.7).cos()).collect();
        let x = Tensor::from_vec(x, (4, 5), &Device::Cpu).unwrap();
        state.set_sampling(Sampling::Always).unwrap();
        state.set_merged_sampling(true).unwrap();
        let a = out(&lin, &x);
        let a2 = out(&lin, &x); // the layer's generator moved on: other noise
        state.set_auto_merge(false).unwrap();
        lin.site().set_generator_seed("default", Some(7)).unwrap();
        let b = out(&lin, &x);
        let b2 = out(&lin, &x);
        assert!(max_diff(&a, &b) < 1e-5, "same ε, same result up to rounding");
        assert!(max_diff(&a2, &b2) < 1e-5);
        assert!(max_diff(&a, &a2) > 1e-4, "consecutive draws differ");
    }
}
