//! PEFT's test models, built through the same builder real models use.
//!
//! - [`Mlp`]: `tests/test_pvera.py`'s MLP: `lin0` 10→20, ReLU, `lin1` 20→20, ReLU, `lin2`
//!   20→20, ReLU, `lin3` 20→2, `LogSoftmax(dim=-1)`.
//! - [`Conv1dStack`]: two GPT-2 style `Conv1D` layers (`conv1d_a` 10→16, ReLU, `conv1d_b`
//!   16→4), for `fan_in_fan_out` layers.

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::builder::{Builder, ModelInfo};
use crate::layer::Linear;

/// PEFT's test MLP.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// 10 → 20
    pub lin0: Linear,
    /// 20 → 20
    pub lin1: Linear,
    /// 20 → 20
    pub lin2: Linear,
    /// 20 → 2
    pub lin3: Linear,
}

impl Mlp {
    /// Builds the MLP from weights named `lin0.weight`, `lin0.bias`, ...
    pub fn new(vb: &Builder<'_>, bias: bool) -> Result<Self> {
        Ok(Self {
            lin0: vb.pp("lin0").linear(10, 20, bias)?,
            lin1: vb.pp("lin1").linear(20, 20, bias)?,
            lin2: vb.pp("lin2").linear(20, 20, bias)?,
            lin3: vb.pp("lin3").linear(20, 2, bias)?,
        })
    }

    /// Facts PEFT would read from this model (`custom`, no default targets).
    pub fn info() -> ModelInfo {
        ModelInfo { model_type: "custom".into(), class_name: "MLP".into(), ..Default::default() }
    }

    /// Log-probabilities (batch, 2).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.lin0.forward(x)?.relu()?;
        let x = self.lin1.forward(&x)?.relu()?;
        let x = self.lin2.forward(&x)?.relu()?;
        let x = self.lin3.forward(&x)?;
        Ok(candle_nn::ops::log_softmax(&x, D::Minus1)?)
    }
}

/// Two GPT-2 `Conv1D` layers.
#[derive(Clone, Debug)]
pub struct Conv1dStack {
    /// 10 → 16, weight stored (10, 16)
    pub conv1d_a: Linear,
    /// 16 → 4, weight stored (16, 4)
    pub conv1d_b: Linear,
}

impl Conv1dStack {
    /// Builds from `conv1d_a.weight` (10, 16), `conv1d_a.bias`, `conv1d_b.weight` (16, 4), ...
    pub fn new(vb: &Builder<'_>) -> Result<Self> {
        Ok(Self {
            conv1d_a: vb.pp("conv1d_a").conv1d(10, 16, true)?,
            conv1d_b: vb.pp("conv1d_b").conv1d(16, 4, true)?,
        })
    }
    /// Facts PEFT would read from this model.
    pub fn info() -> ModelInfo {
        ModelInfo { model_type: "custom".into(), class_name: "Conv1dStack".into(), ..Default::default() }
    }
    /// Forward: conv1d_b(relu(conv1d_a(x))).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv1d_a.forward(x)?.relu()?;
        self.conv1d_b.forward(&x)
    }
}
