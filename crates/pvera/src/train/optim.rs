//! AdamW with exportable state, gradient clipping by global norm, gradient accumulation.
//!
//! [`AdamW`] follows `torch.optim.AdamW` (the single-tensor path torch takes on the CPU) step for
//! step, with torch's order of operations:
//!
//! ```text
//! p  <- p * (1 - lr * weight_decay)                       decoupled weight decay
//! m  <- m + (1 - β1) * (g - m)                            (lerp)
//! v  <- v * β2 + (1 - β2) * g * g
//! p  <- p + (-lr / (1 - β1^t)) * m / (sqrt(v) / sqrt(1 - β2^t) + eps)
//! ```
//!
//! `t` counts the steps of each variable (a variable without a gradient in a step is skipped,
//! as torch skips parameters whose `.grad` is `None`). Scalars are computed in f64 as Python
//! does and rounded to the variable's dtype where torch's kernels round them. The state (step,
//! `exp_avg`, `exp_avg_sq` per variable) is keyed by the variable's name from
//! [`PeftModel::trainable_vars`](crate::PeftModel::trainable_vars), so it can be saved with
//! [`AdamW::state_tensors`] and restored with [`AdamW::load_state`].
//!
//! [`Gradients`] are the gradients of an optimiser's variables in its order: taken from a
//! backward pass, summed over micro-batches ([`GradAccumulator`]), clipped by global L2 norm
//! ([`Gradients::clip_by_global_norm`], `torch.nn.utils.clip_grad_norm_` semantics).

use std::collections::{BTreeMap, BTreeSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::peft_model::NamedVar;

/// AdamW hyper-parameters (torch's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate (changed every step by the trainer's schedule). Default 1e-3.
    pub lr: f64,
    /// β1. Default 0.9.
    pub beta1: f64,
    /// β2. Default 0.999.
    pub beta2: f64,
    /// ε added to the denominator. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay. Default 0.01.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamWConfig {
    /// Checks the ranges torch checks (`0 <= lr`, `0 <= eps`, `0 <= β < 1`, `0 <= weight_decay`).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Err(Error::config(field, reason));
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("Invalid learning rate: {} (must be finite and >= 0)", self.lr));
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return bad("eps", format!("Invalid epsilon value: {}", self.eps));
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("betas", format!("Invalid beta parameter at index 0: {}", self.beta1));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("betas", format!("Invalid beta parameter at index 1: {}", self.beta2));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", format!("Invalid weight_decay value: {}", self.weight_decay));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    step: u64,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
}

/// `torch.optim.AdamW` over named candle variables (see the module docs).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
}

/// Suffixes of the state tensors of one variable.
const STEP: &str = "step";
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";

fn state_key(name: &str, what: &str) -> String {
    format!("{name}::{what}")
}

fn scalar_like(x: f64, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::new(x, like.device())?.to_dtype(like.dtype())?)
}

impl AdamW {
    /// An optimiser over `vars` (names must be unique).
    pub fn new(vars: Vec<NamedVar>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let mut seen = BTreeSet::new();
        for v in &vars {
            if !seen.insert(v.name.clone()) {
                return Err(Error::Adapter(format!(
                    "two trainable variables are both named {:?}; train one adapter at a time \
                     (several active trainable adapters share module names)",
                    v.name
                )));
            }
        }
        let slots = vars
            .into_iter()
            .map(|v| Slot { name: v.name, var: v.var, step: 0, exp_avg: None, exp_avg_sq: None })
            .collect();
        Ok(Self { config, slots })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }
    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }
    /// Sets the learning rate for the next steps (what a scheduler does).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }
    /// The variables' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.clone()).collect()
    }
    /// The variables, in order.
    pub fn vars(&self) -> Vec<NamedVar> {
        self.slots.iter().map(|s| NamedVar { name: s.name.clone(), var: s.var.clone() }).collect()
    }
    /// Steps taken by one variable (torch's `state[p]["step"]`), `None` for an unknown name.
    pub fn var_step(&self, name: &str) -> Option<u64> {
        self.slots.iter().find(|s| s.name == name).map(|s| s.step)
    }

    /// Gradients of this optimiser's variables from a backward pass.
    pub fn gradients(&self, store: &GradStore) -> Gradients {
        Gradients {
            names: self.names(),
            grads: self.slots.iter().map(|s| store.get(s.var.as_tensor()).cloned()).collect(),
        }
    }

    /// Empty gradients (every variable without a gradient) in this optimiser's order.
    pub fn empty_gradients(&self) -> Gradients {
        Gradients { names: self.names(), grads: vec![None; self.slots.len()] }
    }

    /// One AdamW step with `grads` (which must come from this optimiser: same names, same order).
    pub fn step(&mut self, grads: &Gradients) -> Result<()> {
        if grads.names.len() != self.slots.len()
            || grads.names.iter().zip(&self.slots).any(|(n, s)| *n != s.name)
        {
            return Err(Error::Model(
                "AdamW::step: the gradients were made for other variables (take them with \
                 AdamW::gradients)"
                    .into(),
            ));
        }
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = self.config;
        for (slot, g) in self.slots.iter_mut().zip(&grads.grads) {
            let Some(g) = g else { continue };
            let p = slot.var.as_detached_tensor();
            let g = g.detach().to_dtype(p.dtype())?;
            if g.dims() != p.dims() {
                return Err(Error::Model(format!(
                    "AdamW::step: gradient of {} has shape {:?}, the variable {:?}",
                    slot.name,
                    g.dims(),
                    p.dims()
                )));
            }
            slot.step += 1;
            let t = slot.step as f64;
            // param.mul_(1 - lr * weight_decay)
            let p = if weight_decay != 0.0 { (p * (1.0 - lr * weight_decay))? } else { p };
            // exp_avg.lerp_(grad, 1 - beta1)
            let m = match &slot.exp_avg {
                Some(m) => (m + ((&g - m)? * (1.0 - beta1))?)?,
                None => (&g * (1.0 - beta1))?, // lerp from zeros
            };
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            let v = match &slot.exp_avg_sq {
                Some(v) => ((v * beta2)? + ((&g * (1.0 - beta2))? * &g)?)?,
                None => ((&g * (1.0 - beta2))? * &g)?,
            };
            let bias_correction1 = 1.0 - beta1.powf(t);
            let bias_correction2 = 1.0 - beta2.powf(t);
            let step_size = lr / bias_correction1;
            let bias_correction2_sqrt = bias_correction2.powf(0.5);
            // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            let denom = (v.sqrt()?.broadcast_div(&scalar_like(bias_correction2_sqrt, &v)?)? + eps)?;
            // param.addcdiv_(exp_avg, denom, value=-step_size)
            let p = (p + ((&m * -step_size)? / denom)?)?;
            slot.var.set(&p)?;
            slot.exp_avg = Some(m);
            slot.exp_avg_sq = Some(v);
        }
        Ok(())
    }

    /// The state as named tensors: `<name>::step` (a u32 pair as I64 scalar), `<name>::exp_avg`,
    /// `<name>::exp_avg_sq` for every variable that has taken a step.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            let (Some(m), Some(v)) = (&s.exp_avg, &s.exp_avg_sq) else { continue };
            let step = i64::try_from(s.step).map_err(|_| Error::Model("step count overflow".into()))?;
            out.insert(state_key(&s.name, STEP), Tensor::new(step, m.device())?);
            out.insert(state_key(&s.name, EXP_AVG), m.clone());
            out.insert(state_key(&s.name, EXP_AVG_SQ), v.clone());
        }
        Ok(out)
    }

    /// Restores a state written by [`state_tensors`](Self::state_tensors). Every variable's
    /// entries must be present or absent together; entries for unknown variables, wrong shapes
    /// and non-finite moments are refused. Variables without entries start fresh (step 0).
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let file = "optimizer state";
        let known: BTreeSet<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
        for k in tensors.keys() {
            let name = k.rsplit_once("::").map(|(n, _)| n).unwrap_or(k);
            if !known.contains(name) {
                return Err(Error::Adapter(format!(
                    "{file}: entry {k:?} belongs to no trainable variable of this model (the \
                     state was saved for another model or adapter configuration)"
                )));
            }
        }
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let get = |what: &str| tensors.get(&state_key(&s.name, what));
            match (get(STEP), get(EXP_AVG), get(EXP_AVG_SQ)) {
                (None, None, None) => loaded.push((0, None, None)),
                (Some(step), Some(m), Some(v)) => {
                    let step = step.to_dtype(DType::I64)?.to_scalar::<i64>()?;
                    let step = u64::try_from(step).map_err(|_| Error::Model(format!("{file}: negative step")))?;
                    let want = s.var.dims();
                    for (what, t) in [(EXP_AVG, m), (EXP_AVG_SQ, v)] {
                        if t.dims() != want {
                            return Err(Error::ShapeMismatch {
                                file: file.into(),
                                key: state_key(&s.name, what),
                                expected: format!("{want:?}"),
                                got: t.dims().to_vec(),
                                hint: " (the state was saved for another model size)".into(),
                            });
                        }
                        let bad = crate::layer::count_non_finite(t)?;
                        if bad > 0 {
                            return Err(Error::NonFinite {
                                what: format!("{file}: `{}`", state_key(&s.name, what)),
                                count: bad,
                                hint: " (the saved optimizer state is corrupt)".into(),
                            });
                        }
                    }
                    let dev = s.var.device();
                    let dt = s.var.dtype();
                    loaded.push((step, Some(m.to_dtype(dt)?.to_device(dev)?), Some(v.to_dtype(dt)?.to_device(dev)?)));
                }
                _ => {
                    return Err(Error::MissingTensor {
                        file: file.into(),
                        key: format!("{}::{{step,exp_avg,exp_avg_sq}}", s.name),
                        hint: " (a variable's state is incomplete)".into(),
                    })
                }
            }
        }
        for (s, (step, m, v)) in self.slots.iter_mut().zip(loaded) {
            s.step = step;
            s.exp_avg = m;
            s.exp_avg_sq = v;
        }
        Ok(())
    }
}

/// Gradients of a list of named variables (in an optimiser's order); `None` where a variable
/// got no gradient.
#[derive(Clone, Debug)]
pub struct Gradients {
    names: Vec<String>,
    grads: Vec<Option<Tensor>>,
}

impl Gradients {
    /// Builds gradients by hand (tests, custom loops); `names` must match the optimiser's.
    pub fn from_parts(names: Vec<String>, grads: Vec<Option<Tensor>>) -> Result<Self> {
        if names.len() != grads.len() {
            return Err(Error::Model("Gradients::from_parts: one gradient per name".into()));
        }
        Ok(Self { names, grads })
    }
    /// The names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
    /// The gradient of one variable.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.names.iter().position(|n| n == name).and_then(|i| self.grads[i].as_ref())
    }
    /// The gradients, in order.
    pub fn tensors(&self) -> &[Option<Tensor>] {
        &self.grads
    }

    /// Adds `other` (same names) element-wise; a missing gradient counts as zero.
    pub fn add(&mut self, other: &Gradients) -> Result<()> {
        if self.names != other.names {
            return Err(Error::Model("Gradients::add: different variables".into()));
        }
        for (a, b) in self.grads.iter_mut().zip(&other.grads) {
            if let Some(b) = b {
                *a = Some(match a.take() {
                    Some(a) => (a + b)?,
                    None => b.clone(),
                });
            }
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.grads.iter_mut().flatten() {
            *g = (&*g * factor)?;
        }
        Ok(())
    }

    /// The per-variable L2 norms, in f32 as torch computes them (`None` without a gradient).
    fn norms(&self) -> Result<Vec<Option<f32>>> {
        let present: Vec<Tensor> = self
            .grads
            .iter()
            .flatten()
            .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt())
            .collect::<candle_core::Result<_>>()?;
        if present.is_empty() {
            return Ok(vec![None; self.grads.len()]);
        }
        let values = Tensor::stack(&present, 0)?.to_device(&candle_core::Device::Cpu)?.to_vec1::<f32>()?;
        let mut it = values.into_iter();
        Ok(self.grads.iter().map(|g| g.as_ref().and_then(|_| it.next())).collect())
    }

    /// The global L2 norm over all gradients (0 when there are none); NaN or Inf when a
    /// gradient is not finite.
    pub fn global_norm(&self) -> Result<f64> {
        let norms = self.norms()?;
        // torch.linalg.vector_norm(torch.stack(norms), 2), accumulated in f32.
        let sq: f32 = norms.iter().flatten().map(|n| n * n).sum();
        Ok(f64::from(sq.sqrt()))
    }

    /// `torch.nn.utils.clip_grad_norm_(grads, max_norm)`: returns the total norm before
    /// clipping; when it exceeds `max_norm`, every gradient is multiplied by
    /// `max_norm / (total_norm + 1e-6)` (computed in f32). A non-finite norm is returned as it
    /// is and the gradients are left alone (the caller decides; the trainer stops).
    pub fn clip_by_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let total = self.global_norm()?;
        if !total.is_finite() {
            return Ok(total);
        }
        let total32 = total as f32;
        let coef = (max_norm as f32) / (total32 + 1e-6f32);
        if coef < 1.0 {
            for g in self.grads.iter_mut().flatten() {
                *g = g.broadcast_mul(&scalar_like(f64::from(coef), g)?)?;
            }
        }
        Ok(total)
    }

    /// Number of non-finite gradient values and the first variable that has one.
    pub fn non_finite(&self) -> Result<(usize, Option<String>)> {
        let mut count = 0;
        let mut first = None;
        for (n, g) in self.names.iter().zip(&self.grads) {
            let Some(g) = g else { continue };
            let c = crate::layer::count_non_finite(g)?;
            if c > 0 && first.is_none() {
                first = Some(n.clone());
            }
            count += c;
        }
        Ok((count, first))
    }
}

/// Sums gradients over `k` micro-batches and hands out their mean (`1/k` times the sum, or
/// `1/n` for a last group of `n < k` micro-batches).
#[derive(Debug)]
pub struct GradAccumulator {
    k: usize,
    count: usize,
    sum: Option<Gradients>,
}

impl GradAccumulator {
    /// Accumulates over `k >= 1` micro-batches.
    pub fn new(k: usize) -> Result<Self> {
        if k == 0 {
            return Err(Error::config("grad_accum", "must be at least 1"));
        }
        Ok(Self { k, count: 0, sum: None })
    }
    /// The group size k.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Micro-batches summed so far in this group.
    pub fn count(&self) -> usize {
        self.count
    }
    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: Gradients) -> Result<()> {
        match &mut self.sum {
            Some(s) => s.add(&grads)?,
            None => self.sum = Some(grads),
        }
        self.count += 1;
        Ok(())
    }
    /// True once k micro-batches were added.
    pub fn is_full(&self) -> bool {
        self.count >= self.k
    }
    /// The mean of the group's gradients (scaled by 1/count), resetting the accumulator;
    /// `None` when nothing was added.
    pub fn take(&mut self) -> Result<Option<Gradients>> {
        let n = self.count;
        self.count = 0;
        match self.sum.take() {
            Some(mut g) => {
                if n > 1 {
                    g.scale(1.0 / n as f64)?;
                }
                Ok(Some(g))
            }
            None => Ok(None),
        }
    }
}
