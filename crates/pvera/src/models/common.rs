//! Building blocks shared by the model families, with gradients that flow.
//!
//! candle's fused `layer_norm`, `rms_norm` and `softmax_last_dim` have no backward pass (see
//! `ARCHITECTURE.md`), so these blocks are composites of differentiable ops. Norms compute in f32
//! and return the input dtype, as transformers does.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::builder::Builder;

/// `nn.LayerNorm` (weight, bias, eps).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// Reads `weight` and `bias` (size `dim`) at the builder's path.
    pub fn new(dim: usize, eps: f64, vb: &Builder<'_>) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: Some(vb.get(dim, "bias")?), eps })
    }
    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        // One vectorised pass per row with its own backward on the CPU.
        let w32 = self.weight.to_dtype(DType::F32)?;
        let b32 = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?),
            None => None,
        };
        if let Some(y) = crate::ops::layer_norm_f32(&xf, &w32, b32.as_ref(), self.eps)? {
            return Ok(y.to_dtype(dtype)?);
        }
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = y.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => y,
        };
        Ok(y.to_dtype(dtype)?)
    }
}

/// LLaMA's `RMSNorm`: `weight * (x / sqrt(mean(x²) + eps))`, computed in f32, cast back before
/// the weight as `LlamaRMSNorm` does.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Reads `weight` (size `dim`).
    pub fn new(dim: usize, eps: f64, vb: &Builder<'_>) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, eps })
    }
    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        Ok(y.broadcast_mul(&self.weight)?)
    }
}

/// `nn.Embedding`.
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Tensor,
    dim: usize,
}

impl Embedding {
    /// Reads `weight` (`n` x `dim`).
    pub fn new(n: usize, dim: usize, vb: &Builder<'_>) -> Result<Self> {
        Ok(Self { weight: vb.get((n, dim), "weight")?, dim })
    }
    /// The table.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// Looks up ids of any shape; appends the embedding dimension.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        shape.push(self.dim);
        let flat = ids.flatten_all()?;
        Ok(self.weight.index_select(&flat, 0)?.reshape(shape)?)
    }
}

/// Activation functions by their transformers `hidden_act` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact, erf-based.
    GeluErf,
    /// `gelu_new` / `gelu_pytorch_tanh` / `gelu_fast`: tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    /// Parses a `hidden_act` string.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }
    /// Applies the activation.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => match crate::ops::gelu_erf_f32(x)? {
                Some(y) => y,
                None => x.gelu_erf()?,
            },
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
        })
    }
}

/// Softmax over the last dimension, with a backward pass (computed in f32).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    // One vectorised pass per row with its own backward on the CPU.
    if let Some(p) = crate::ops::softmax_last_dim_f32(&xf)? {
        return Ok(p.to_dtype(dtype)?);
    }
    let max = xf.max_keepdim(D::Minus1)?.detach();
    let e = xf.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?.to_dtype(dtype)?)
}

/// Multi-head self-attention on the projections' layout: `q`, `k`, `v` are `(batch, seq, heads ·
/// head_dim)` and so is the result (the heads merged back). On the CPU in f32 one fused op
/// ([`crate::ops::attention_f32`]: no head transposes, scores kept per head in cache); elsewhere
/// the heads are split and [`attention`] runs. `mask` as in [`attention`].
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    if let Some(y) = crate::ops::attention_f32(q, k, v, heads, mask, scale)? {
        return Ok(y);
    }
    let (b, s, dm) = q.dims3()?;
    let hd = dm / heads.max(1);
    let split = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous()?) };
    let y = attention(&split(q)?, &split(k)?, &split(v)?, mask, scale)?;
    Ok(y.transpose(1, 2)?.contiguous()?.reshape((b, s, dm))?)
}

/// `softmax(q kᵀ · scale + mask) v` for (batch, heads, seq, head_dim) tensors. `mask` is added to
/// the scores (0 to keep, a large negative value to drop) and broadcast.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    // Scale, mask and softmax in one pass on the CPU (f32).
    if scores.dtype() == DType::F32 {
        if let Some(p) = crate::ops::scaled_masked_softmax_f32(&scores, scale, mask)? {
            return Ok(p.matmul(&v.contiguous()?)?);
        }
    }
    let scores = (scores * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let p = softmax_last_dim(&scores)?;
    Ok(p.matmul(&v.contiguous()?)?)
}
