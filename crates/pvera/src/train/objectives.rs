//! Ready-made [`Objective`]s for the [`Trainer`](super::Trainer):
//!
//! - [`ClassificationObjective`]: a [`Classifier`] (backbone + pooled `classifier` head); mean
//!   cross-entropy of the logits against `u32` class ids, and the number of correct argmax
//!   predictions.
//! - [`CausalLmObjective`]: an [`AnyModel`] with an LM head (LLaMA / GPT-2 `*ForCausalLM`); the
//!   next-token cross-entropy of transformers (`logits[:, :-1]` against `labels[:, 1:]`), averaged
//!   over the target tokens the attention mask keeps (padding ignored, as `-100` labels are).

use candle_core::{DType, Tensor, D};

use super::trainer::{Objective, StepOutput};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::models::heads::Classifier;
use crate::models::AnyModel;
use crate::peft_model::PeftModel;

/// Mean cross-entropy of `logits (batch, classes)` against class ids `labels (batch,)`, and the
/// number of correct argmax predictions.
pub fn classification_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let logits = logits.to_dtype(DType::F32)?;
    let labels = labels.to_dtype(DType::U32)?;
    let (b, classes) = logits.dims2()?;
    if labels.dims() != [b] {
        return Err(Error::Model(format!(
            "classification: {b} logit rows but labels of shape {:?}; expected ({b},)",
            labels.dims()
        )));
    }
    let max_label = labels.max(0)?.to_scalar::<u32>()? as usize;
    if max_label >= classes {
        return Err(Error::Model(format!(
            "classification: label id {max_label} but the head has {classes} output(s); the data has more \
             classes than the classifier (a checkpoint head of another size?)"
        )));
    }
    let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
    let pred = logits.argmax(D::Minus1)?;
    let correct = pred.eq(&labels)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
    Ok((loss, correct))
}

/// Next-token cross-entropy: `logits (b, t, vocab)` predict `labels (b, t)` shifted by one;
/// positions whose target the `mask (b, t)` zeroes are ignored. Returns the mean over the kept
/// target tokens and their number.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return Err(Error::Model(format!(
            "causal LM: sequences of {t} token(s) have no next token to predict; use blocks of at least 2 tokens"
        )));
    }
    let logits = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?.reshape((b * (t - 1), v))?;
    let targets = labels.narrow(1, 1, t - 1)?.to_dtype(DType::U32)?.reshape(b * (t - 1))?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let keep = match mask {
        Some(m) => m.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?.reshape(b * (t - 1))?,
        None => Tensor::ones(b * (t - 1), DType::F32, logits.device())?,
    };
    let n = keep.sum_all()?.to_scalar::<f32>()?;
    if n < 0.5 {
        return Err(Error::Model("causal LM: the batch has no target token left after masking".into()));
    }
    let loss = (nll * &keep)?.sum_all()?.affine(1.0 / n as f64, 0.0)?;
    Ok((loss, n.round() as usize))
}

/// Sequence / image classification with a [`Classifier`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ClassificationObjective;

impl Objective<Classifier> for ClassificationObjective {
    type Batch = Batch;
    fn step(&self, model: &PeftModel<Classifier>, batch: &Batch) -> Result<StepOutput> {
        let logits = model.model().forward(&batch.inputs)?;
        let (loss, correct) = classification_loss(&logits, &batch.labels)?;
        Ok(StepOutput { loss, examples: batch.len(), correct: Some(correct) })
    }
}

/// Causal language modelling with an [`AnyModel`] that has an LM head.
#[derive(Clone, Copy, Debug, Default)]
pub struct CausalLmObjective;

impl Objective<AnyModel> for CausalLmObjective {
    type Batch = Batch;
    fn step(&self, model: &PeftModel<AnyModel>, batch: &Batch) -> Result<StepOutput> {
        let out = model.model().forward(&batch.inputs)?;
        let logits = out.logits.as_ref().ok_or_else(|| {
            Error::Model(
                "causal LM: the model has no LM head (logits); use a *ForCausalLM checkpoint (LLaMA or GPT-2)".into(),
            )
        })?;
        let (loss, _) = causal_lm_loss(logits, &batch.labels, batch.inputs.attention_mask.as_ref())?;
        Ok(StepOutput { loss, examples: batch.len(), correct: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn classification_loss_matches_hand_computation() {
        let d = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32, 0.0], [0.0, 1.0]], &d).unwrap();
        let labels = Tensor::new(&[0u32, 0], &d).unwrap();
        let (loss, correct) = classification_loss(&logits, &labels).unwrap();
        let l0 = -(2f64.exp() / (2f64.exp() + 1.0)).ln();
        let l1 = -(1.0 / (1.0 + 1f64.exp())).ln();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - (l0 + l1) / 2.0).abs() < 1e-5);
        assert_eq!(correct, 1);
        let bad = Tensor::new(&[0u32, 5], &d).unwrap();
        assert!(classification_loss(&logits, &bad).is_err());
    }

    #[test]
    fn causal_lm_loss_shifts_and_masks() {
        let d = Device::Cpu;
        // vocab 2; logits uniform except position 0 strongly predicts token 1.
        let logits = Tensor::new(&[[[0.0f32, 10.0], [0.0, 0.0], [0.0, 0.0]]], &d).unwrap();
        let labels = Tensor::new(&[[0i64, 1, 0]], &d).unwrap();
        let mask = Tensor::new(&[[1i64, 1, 0]], &d).unwrap();
        let (loss, n) = causal_lm_loss(&logits, &labels, Some(&mask)).unwrap();
        assert_eq!(n, 1);
        let want = -(10f64.exp() / (1.0 + 10f64.exp())).ln();
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
        let (loss, n) = causal_lm_loss(&logits, &labels, None).unwrap();
        assert_eq!(n, 2);
        let want = (want + 2f64.ln()) / 2.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
    }
}

/// The mean next-token loss of a causal-LM model over a whole data set (token-weighted), in eval
/// mode without gradients: `(loss, tokens)`; perplexity is `loss.exp()`.
pub fn causal_lm_eval(
    model: &crate::PeftModel<crate::models::AnyModel>,
    data: &dyn crate::data::Dataset,
    batch_size: usize,
) -> Result<(f64, usize)> {
    model.eval()?;
    let state = model.state();
    let grad = state.grad_enabled();
    state.set_grad_enabled(false)?;
    let run = || -> Result<(f64, usize)> {
        let (mut sum, mut tokens) = (0.0f64, 0usize);
        let idx: Vec<usize> = (0..data.len()).collect();
        for chunk in idx.chunks(batch_size.max(1)) {
            let b = data.get_batch(chunk)?;
            let out = model.model().forward(&b.inputs)?;
            let logits = out
                .logits
                .as_ref()
                .ok_or_else(|| crate::Error::Model("the model returned no logits (not a causal-LM head)".into()))?;
            let (loss, k) = causal_lm_loss(logits, &b.labels, b.inputs.attention_mask.as_ref())?;
            sum += loss.to_scalar::<f32>()? as f64 * k as f64;
            tokens += k;
        }
        Ok((sum / tokens.max(1) as f64, tokens))
    };
    let r = run();
    state.set_grad_enabled(grad)?;
    r
}
