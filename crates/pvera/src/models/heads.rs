//! Task heads on top of [`AnyModel`]: sequence / image classification on a pooled output.
//!
//! The head is a builder-made linear layer at the module path `classifier` (transformers' name
//! in `BertForSequenceClassification`, `ViTForImageClassification`, `Dinov2ForImageClassification`),
//! so PEFT's `modules_to_save = ["classifier"]` makes it a trainable per-adapter copy and its
//! weights are saved under `base_model.model.classifier.*`, as PEFT saves them.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::loader::ModelDir;
use super::{AnyModel, ModelInputs, ModelOutputs};
use crate::error::{Error, Result};
use crate::builder::{ModelInfo, Registry};
use crate::layer::Linear;
use crate::rng::TorchGenerator;
use crate::state::RunState;

/// How the sequence of hidden states becomes one vector per example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The first token (`[CLS]`), as ViT's classifier.
    Cls,
    /// The model's pooler output (BERT: tanh(dense(CLS))), as `BertForSequenceClassification`.
    Pooler,
    /// Mean over the tokens the attention mask keeps (sentence-transformers; all-MiniLM-L6-v2).
    Mean,
    /// DINOv2's convention: `concat(cls, mean(patch tokens))` (2 x hidden), as
    /// `Dinov2ForImageClassification`.
    ClsMeanPatch,
}

impl Pooling {
    /// Every pooling, in the order the names are listed in messages.
    pub const ALL: [Pooling; 4] = [Pooling::Cls, Pooling::Pooler, Pooling::Mean, Pooling::ClsMeanPatch];

    /// The pooling `pvera train` uses for a model type when none is given: mean for text
    /// encoders (sentence-transformers' convention, all-MiniLM-L6-v2's), the `[CLS]` token for
    /// ViT (as `ViTForImageClassification`), `concat(cls, mean(patches))` for DINOv2 (as
    /// `Dinov2ForImageClassification`). The one table every command reads.
    pub fn default_for(model_type: &str) -> Pooling {
        match model_type {
            "vit" => Pooling::Cls,
            "dinov2" => Pooling::ClsMeanPatch,
            _ => Pooling::Mean,
        }
    }

    /// The name [`Pooling::from_name`] parses.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Pooler => "pooler",
            Pooling::Mean => "mean",
            Pooling::ClsMeanPatch => "cls-mean-patch",
        }
    }

    /// Whether a model of `model_type` can pool this way (the encoders and vision models have a
    /// pooler, decoders do not; `cls-mean-patch` needs patch tokens, i.e. a vision model).
    pub fn fits(self, model_type: &str) -> bool {
        match self {
            Pooling::Pooler => matches!(model_type, "bert" | "roberta" | "vit" | "dinov2"),
            Pooling::ClsMeanPatch => matches!(model_type, "vit" | "dinov2"),
            Pooling::Cls | Pooling::Mean => true,
        }
    }

    /// Parses `cls`, `pooler`, `mean`, `cls-mean-patch`.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "cls" => Pooling::Cls,
            "pooler" => Pooling::Pooler,
            "mean" => Pooling::Mean,
            "cls-mean-patch" | "cls_mean_patch" => Pooling::ClsMeanPatch,
            _ => return None,
        })
    }
    /// Width of the pooled vector for a model of width `hidden`.
    pub fn width(self, hidden: usize) -> usize {
        match self {
            Pooling::ClsMeanPatch => 2 * hidden,
            _ => hidden,
        }
    }
    /// Pools model outputs (f32 result).
    pub fn pool(self, out: &ModelOutputs, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let h = out.last_hidden_state.to_dtype(DType::F32)?;
        let (_b, t, _d) = h.dims3()?;
        Ok(match self {
            Pooling::Cls => h.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Pooler => out
                .pooler_output
                .as_ref()
                .ok_or_else(|| Error::Model("pooling \"pooler\": this model has no pooler; use cls or mean".into()))?
                .to_dtype(DType::F32)?,
            Pooling::Mean => match attention_mask {
                Some(m) => {
                    let m = m.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (b, t, 1)
                    let s = h.broadcast_mul(&m)?.sum(1)?;
                    let n = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
                    s.broadcast_div(&n)?
                }
                None => h.mean(1)?,
            },
            Pooling::ClsMeanPatch => {
                if t < 2 {
                    return Err(Error::Model("cls-mean-patch pooling needs patch tokens".into()));
                }
                let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
                let patches = h.narrow(1, 1, t - 1)?.mean(1)?;
                Tensor::cat(&[&cls, &patches], 1)?
            }
        })
    }
}

/// A model with a classification head.
#[derive(Clone, Debug)]
pub struct Classifier {
    /// The backbone.
    pub base: AnyModel,
    /// `classifier`: pooled width -> number of labels.
    pub head: Linear,
    /// Pooling.
    pub pooling: Pooling,
}

impl Classifier {
    /// Logits (batch, labels), f32.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<Tensor> {
        let out = self.base.forward(inputs)?;
        let pooled = self.pooling.pool(&out, inputs.attention_mask.as_ref())?;
        let w = self.head.site().weight()?;
        let pooled = pooled.to_dtype(w.dtype())?;
        Ok(self.head.forward(&pooled)?.to_dtype(DType::F32)?)
    }
}

impl Classifier {
    /// Loads the backbone of `dir` and a `classifier` head (pooled width -> `num_labels`): the
    /// checkpoint's own head when it has one of that shape (a `*ForSequenceClassification`
    /// checkpoint), otherwise a fresh one initialised like `torch.nn.Linear` from `seed`.
    pub fn load(
        dir: &ModelDir,
        num_labels: usize,
        pooling: Pooling,
        dtype: Option<DType>,
        device: &Device,
        state: Arc<RunState>,
        seed: u64,
    ) -> Result<(Classifier, Registry, ModelInfo)> {
        if num_labels == 0 {
            return Err(Error::Model("a classifier needs at least one label".into()));
        }
        let (base, mut registry, mut info) = AnyModel::load(dir, dtype, device, state.clone())?;
        let hidden = dir.usize_field("hidden_size")?;
        let vb = dir.builder(None, Some(registry.dtype()), device, state)?;
        let mut g = TorchGenerator::new(seed);
        let head = vb.pp("classifier").linear_or_init(pooling.width(hidden), num_labels, true, &mut g)?;
        registry.extend(vb.finish()?);
        info.classifier = Some("classifier".to_string());
        Ok((Classifier { base, head, pooling }, registry, info))
    }
}
