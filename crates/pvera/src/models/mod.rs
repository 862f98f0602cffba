//! Model families built through [`crate::Builder`], with Hugging Face transformers module names
//! (a PEFT key is just a module path).
//!
//! - [`mlp`]: PEFT's own test models (an MLP and a GPT-2 `Conv1D` stack) for parity tests.
//! - [`bert`], [`vit`], [`dinov2`], [`llama`], [`gpt2`]: the families PVeRA is used with.
//! - [`common`]: norms, embeddings, activations and attention with working gradients.
//! - [`loader`]: model directories (`config.json`, single or sharded safetensors, task prefixes).
//!
//! [`AnyModel`] is the closed set of families; it dispatches on `config.model_type`.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::builder::{ModelInfo, Registry};
use crate::state::RunState;

pub mod bert;
pub mod common;
pub mod config_json;
pub mod dinov2;
pub mod gpt2;
pub mod heads;
pub mod interpolate;
pub mod llama;
pub mod loader;
pub mod mlp;
pub mod vit;

use loader::ModelDir;

/// Inputs by their transformers names; each family reads what it needs.
#[derive(Clone, Debug, Default)]
pub struct ModelInputs {
    /// Token ids (batch, seq), u32 or i64.
    pub input_ids: Option<Tensor>,
    /// 1 = attend, 0 = padding (batch, seq).
    pub attention_mask: Option<Tensor>,
    /// Segment ids (batch, seq) for BERT.
    pub token_type_ids: Option<Tensor>,
    /// Images (batch, channels, height, width), normalised.
    pub pixel_values: Option<Tensor>,
}

/// Outputs by their transformers names.
#[derive(Clone, Debug)]
pub struct ModelOutputs {
    /// (batch, seq, hidden), after the final norm where the model has one.
    pub last_hidden_state: Tensor,
    /// (batch, seq, vocab) where an LM head exists.
    pub logits: Option<Tensor>,
    /// The pooled output where the model has a pooler (BERT, ViT).
    pub pooler_output: Option<Tensor>,
}

/// Every supported model family.
#[derive(Clone, Debug)]
pub enum AnyModel {
    /// BERT / RoBERTa-style encoders.
    Bert(bert::BertModel),
    /// ViT.
    Vit(vit::VitModel),
    /// DINOv2.
    Dinov2(dinov2::Dinov2Model),
    /// LLaMA-style decoders.
    Llama(llama::LlamaModel),
    /// GPT-2.
    Gpt2(gpt2::Gpt2Model),
}

/// The model types [`AnyModel::load`] understands.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["bert", "roberta", "vit", "dinov2", "llama", "gpt2"];

impl AnyModel {
    /// Loads a model directory (weights in `dtype`, default: as stored) through the builder.
    pub fn load(
        dir: &ModelDir,
        dtype: Option<DType>,
        device: &Device,
        state: Arc<RunState>,
    ) -> Result<(AnyModel, Registry, ModelInfo)> {
        Ok(match dir.model_type.as_str() {
            "bert" | "roberta" => {
                let (m, r) = bert::BertModel::load(dir, state, dtype, device)?;
                (AnyModel::Bert(m), r, bert::BertModel::info(dir))
            }
            "vit" => {
                let (m, r) = vit::VitModel::load(dir, state, dtype, device)?;
                (AnyModel::Vit(m), r, vit::VitModel::info(dir))
            }
            "dinov2" => {
                let (m, r) = dinov2::Dinov2Model::load(dir, state, dtype, device)?;
                (AnyModel::Dinov2(m), r, dinov2::Dinov2Model::info(dir))
            }
            "llama" => {
                let (m, r) = llama::LlamaModel::load(dir, state, dtype, device)?;
                (AnyModel::Llama(m), r, llama::LlamaModel::info(dir))
            }
            "gpt2" => {
                let (m, r) = gpt2::Gpt2Model::load(dir, state, dtype, device)?;
                (AnyModel::Gpt2(m), r, gpt2::Gpt2Model::info(dir))
            }
            other => {
                return Err(Error::UnsupportedModel {
                    path: dir.path.join("config.json").display().to_string(),
                    reason: format!(
                        "unknown model_type {other:?}; supported: {} (use a checkpoint of one of these families)",
                        SUPPORTED_MODEL_TYPES.join(", ")
                    ),
                })
            }
        })
    }

    /// Forward pass.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<ModelOutputs> {
        match self {
            AnyModel::Bert(m) => m.forward(inputs),
            AnyModel::Vit(m) => m.forward(inputs),
            AnyModel::Dinov2(m) => m.forward(inputs),
            AnyModel::Llama(m) => m.forward(inputs),
            AnyModel::Gpt2(m) => m.forward(inputs),
        }
    }
}
