//! LLaMA (placeholder: the implementation lands with the model-family work).

use std::sync::Arc;

use candle_core::{DType, Device};

use super::loader::ModelDir;
use super::{ModelInputs, ModelOutputs};
use crate::error::{Error, Result};
use crate::inject::{ModelInfo, Registry};
use crate::state::RunState;

/// LLaMA with Hugging Face transformers module names.
#[derive(Clone, Debug)]
pub struct LlamaModel {
    _private: (),
}

impl LlamaModel {
    /// Builds the model from a model directory.
    pub fn load(dir: &ModelDir, state: Arc<RunState>, dtype: Option<DType>, device: &Device) -> Result<(Self, Registry)> {
        let _ = (dir, state, dtype, device);
        Err(Error::Model("LLaMA is not implemented yet".into()))
    }
    /// Facts PEFT reads from the model.
    pub fn info(dir: &ModelDir) -> ModelInfo {
        ModelInfo { model_type: dir.model_type.clone(), ..Default::default() }
    }
    /// Forward pass.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<ModelOutputs> {
        let _ = inputs;
        Err(Error::Model("LLaMA is not implemented yet".into()))
    }
}
