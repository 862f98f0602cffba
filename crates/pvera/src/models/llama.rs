//! LLaMA: transformers 5.24's `LlamaModel` and `LlamaForCausalLM`.
//!
//! RMSNorm (f32, cast back before the weight), rotary position embeddings (`rope_theta`, the
//! `default`, `linear` and `llama3` rope types), grouped-query attention
//! (`num_key_value_heads < num_attention_heads`), SwiGLU MLP (`down(act(gate(x)) * up(x))`), a
//! causal mask combined with `attention_mask` padding, the final `norm`, and an LM head that is
//! either the checkpoint's own `lm_head` or `embed_tokens.weight` (`tie_word_embeddings`).
//!
//! Module paths are the checkpoint's keys: a `LlamaForCausalLM` checkpoint stores
//! `model.layers.N.self_attn.q_proj` and `lm_head`, a `LlamaModel` checkpoint `layers.N...`; the
//! modules are built under the checkpoint's own root, so a site path is exactly the module name
//! PEFT uses for that class (`base_model.model.<site path>.pvera_lambda_b`).
//!
//! Attention follows transformers' default (`sdpa`): positions are `0..seq` whatever the padding,
//! a key is visible when it is not after the query and its `attention_mask` is non-zero, and a
//! query row with no visible key (left padding) gets a zero attention output, as torch's
//! `scaled_dot_product_attention` gives.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;

use super::common::{attention, Activation, Embedding, RmsNorm};
use super::config_json::ConfigJson;
use super::loader::ModelDir;
use super::{ModelInputs, ModelOutputs};
use crate::error::{Error, Result};
use crate::builder::{Builder, ModelInfo, Registry};
use crate::layer::Linear;
use crate::state::RunState;

// ----------------------------------------------------------------------------------------------
// Helpers shared with the GPT-2 family (token inputs, causal masks, config fields)
// ----------------------------------------------------------------------------------------------

/// Checks an id tensor (rank 2, integer, ids in `0..vocab`) named `key`; returns `(batch, seq)`.
pub(crate) fn check_ids(ids: &Tensor, key: &str, vocab: usize) -> Result<(usize, usize)> {
    let (b, s) = match ids.dims() {
        [b, s] if *b > 0 && *s > 0 => (*b, *s),
        d => {
            return Err(Error::ShapeMismatch {
                file: "inputs".into(),
                key: key.into(),
                expected: "(batch, seq), both > 0".into(),
                got: d.to_vec(),
                hint: String::new(),
            })
        }
    };
    if !matches!(ids.dtype(), DType::I64 | DType::U32 | DType::U8) {
        return Err(Error::DtypeMismatch {
            file: "inputs".into(),
            key: key.into(),
            got: format!("{:?}", ids.dtype()),
            expected: "int64, uint32 or uint8".into(),
        });
    }
    let ids64 = ids.to_dtype(DType::I64)?;
    let lo = ids64.min_all()?.to_scalar::<i64>()?;
    let hi = ids64.max_all()?.to_scalar::<i64>()?;
    if lo < 0 || hi >= vocab as i64 {
        let bad = if lo < 0 { lo } else { hi };
        return Err(Error::Model(format!(
            "inputs: {key} holds id {bad}, outside the model's vocabulary 0..{vocab} (config.json \
             vocab_size); the ids were probably made by another tokenizer"
        )));
    }
    Ok((b, s))
}

/// Checks `input_ids` (see [`check_ids`]) and `attention_mask` (same shape) and returns
/// `(batch, seq)`.
pub(crate) fn check_token_inputs(inputs: &ModelInputs, vocab: usize, family: &str) -> Result<(usize, usize)> {
    let ids = inputs.input_ids.as_ref().ok_or_else(|| Error::MissingTensor {
        file: "inputs".into(),
        key: "input_ids".into(),
        hint: format!(" ({family} needs token ids: an integer tensor (batch, seq))"),
    })?;
    let (b, s) = check_ids(ids, "input_ids", vocab)?;
    if let Some(m) = &inputs.attention_mask {
        if m.dims() != [b, s] {
            return Err(Error::ShapeMismatch {
                file: "inputs".into(),
                key: "attention_mask".into(),
                expected: format!("[{b}, {s}] (the shape of input_ids)"),
                got: m.dims().to_vec(),
                hint: " (1 = attend, 0 = padding)".into(),
            });
        }
    }
    Ok((b, s))
}

/// The most negative finite value of `dtype` (what transformers' eager masks add); f32's for
/// f32 and f64 (the mask is built in f32).
fn dtype_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::MIN.to_f64(),
        DType::BF16 => half::bf16::MIN.to_f64(),
        _ => f32::MIN as f64,
    }
}

/// A causal self-attention mask for `seq` positions combined with `attention_mask` padding.
#[derive(Debug)]
pub(crate) struct CausalMask {
    /// Additive (batch or 1, 1, seq, seq) in the model dtype: 0 where visible, the dtype's
    /// minimum elsewhere. Rows without any visible key are left fully visible (and zeroed after
    /// attention through `row_ok`), so no row of the softmax is all masked.
    pub additive: Tensor,
    /// (batch, 1, seq, 1) in the model dtype: 0 for query rows that see no key, else 1. `None`
    /// when every row sees a key.
    pub row_ok: Option<Tensor>,
}

impl CausalMask {
    /// Builds the mask on `device` in `dtype`.
    pub(crate) fn new(attention_mask: Option<&Tensor>, seq: usize, dtype: DType, device: &Device) -> Result<Self> {
        let pos = Tensor::arange(0u32, seq as u32, device)?;
        // allowed[q, k] = k <= q
        let causal = pos.unsqueeze(1)?.broadcast_ge(&pos.unsqueeze(0)?)?.to_dtype(DType::F32)?;
        let causal = causal.reshape((1, 1, seq, seq))?;
        let min = dtype_min(dtype);
        let Some(m) = attention_mask else {
            let additive = ((causal - 1.0)? * (-min))?.to_dtype(dtype)?;
            return Ok(Self { additive, row_ok: None });
        };
        let b = m.dim(0)?;
        let keep = m.to_device(device)?.to_dtype(DType::F32)?.ne(0f64)?; // non-zero = attend
        let keep = keep.to_dtype(DType::F32)?.reshape((b, 1, 1, seq))?;
        let allowed = causal.broadcast_mul(&keep)?; // (b, 1, s, s)
        let row_any = allowed.max_keepdim(D::Minus1)?; // (b, 1, s, 1)
        let all_rows_ok = row_any.min_all()?.to_scalar::<f32>()? > 0.0;
        let (allowed, row_ok) = if all_rows_ok {
            (allowed, None)
        } else {
            let open = row_any.affine(-1.0, 1.0)?; // 1 where the row sees nothing
            (allowed.broadcast_maximum(&open)?, Some(row_any.to_dtype(dtype)?))
        };
        let additive = ((allowed - 1.0)? * (-min))?.to_dtype(dtype)?;
        Ok(Self { additive, row_ok })
    }

    /// `attention(q, k, v)` under this mask, fully masked rows zeroed (torch sdpa's result).
    /// Half-precision inputs are attended in f32 and the result cast back, as torch's CPU sdpa
    /// kernels accumulate in f32.
    pub(crate) fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let dtype = q.dtype();
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let up = |t: &Tensor| -> Result<Tensor> { Ok(if half { t.to_dtype(DType::F32)? } else { t.clone() }) };
        let y = attention(&up(q)?, &up(k)?, &up(v)?, Some(&up(&self.additive)?), scale)?;
        let y = match &self.row_ok {
            Some(r) => y.broadcast_mul(&up(r)?)?,
            None => y,
        };
        Ok(y.to_dtype(dtype)?)
    }
}

// ----------------------------------------------------------------------------------------------
// Configuration
// ----------------------------------------------------------------------------------------------

/// Rotary embedding parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default`: `inv_freq = 1 / theta^(2i/d)`.
    Default,
    /// `linear`: `inv_freq / factor`.
    Linear {
        /// Scaling factor.
        factor: f64,
    },
    /// `llama3`: Llama 3.1 frequency-band smoothing.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
}

/// The `config.json` fields LLaMA reads.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (default: `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// `head_dim` (default: `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `hidden_act`.
    pub hidden_act: Activation,
    /// `attention_bias`.
    pub attention_bias: bool,
    /// `mlp_bias`.
    pub mlp_bias: bool,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: bool,
    /// `rope_theta` (from `rope_parameters`, `rope_scaling` or the top level; default 10000).
    pub rope_theta: f64,
    /// The rope type and its parameters.
    pub rope_scaling: RopeScaling,
}

fn rope_f64(c: &ConfigJson<'_>, params: &serde_json::Map<String, Value>, key: &str, kind: &str) -> Result<f64> {
    params.get(key).and_then(Value::as_f64).filter(|x| x.is_finite()).ok_or_else(|| {
        c.error(format!("rope type {kind:?} needs a number \"{key}\" in \"rope_parameters\" (or \"rope_scaling\")"))
    })
}

impl LlamaConfig {
    /// Parses `dir`'s `config.json` as transformers' `LlamaConfig` does (including the
    /// transformers-4 `rope_theta` / `rope_scaling` fields).
    pub fn from_dir(dir: &ModelDir) -> Result<Self> {
        let c = dir.fields();
        let hidden_size = c.positive(&["hidden_size"])?;
        let num_attention_heads = c.positive(&["num_attention_heads"])?;
        let num_key_value_heads = c.opt_positive("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(c.error(
                format!(
                    "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads \
                     ({num_key_value_heads}) for grouped-query attention"
                ),
            ));
        }
        let head_dim = match c.opt_positive("head_dim")? {
            Some(h) => h,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(c.error(
                        format!(
                            "hidden_size ({hidden_size}) is not a multiple of num_attention_heads \
                             ({num_attention_heads}) and no \"head_dim\" is given"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(c.error(format!("head_dim ({head_dim}) must be even for rotary embeddings")));
        }
        // transformers: rope_parameters = rope_scaling or rope_parameters; rope_theta from the
        // dict, else the top-level field, else 10000; rope_type from "rope_type", else "type".
        let empty = serde_json::Map::new();
        let params = match (c.value().get("rope_scaling"), c.value().get("rope_parameters")) {
            (Some(Value::Object(m)), _) if !m.is_empty() => m,
            (_, Some(Value::Object(m))) => m,
            (_, None | Some(Value::Null)) => &empty,
            (_, Some(v)) => return Err(c.error(format!("\"rope_parameters\" must be an object, found {v}"))),
        };
        let rope_theta = match params.get("rope_theta") {
            Some(Value::Null) | None => c.f64_or("rope_theta", 10000.0)?,
            Some(v) => v.as_f64().ok_or_else(|| c.error(format!("\"rope_theta\" must be a number, found {v}")))?,
        };
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(c.error(format!("rope_theta must be a positive number, found {rope_theta}")));
        }
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            // transformers' default rope ignores partial_rotary_factor; the scaled types honour
            // it, which would leave part of each head unrotated: not supported here.
            let partial = params
                .get("partial_rotary_factor")
                .and_then(Value::as_f64)
                .or_else(|| c.value().get("partial_rotary_factor").and_then(Value::as_f64))
                .unwrap_or(1.0);
            if partial != 1.0 {
                return Err(c.error(
                    format!("rope type {kind:?} with partial_rotary_factor {partial} is not supported (only 1.0)"),
                ));
            }
        }
        let rope_scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: rope_f64(&c, params, "factor", kind)? },
            "llama3" => {
                // transformers: a top-level original_max_position_embeddings wins, then the
                // dict's, then max_position_embeddings.
                let orig = match c.value().get("original_max_position_embeddings").and_then(Value::as_f64) {
                    Some(v) => v,
                    None => match params.get("original_max_position_embeddings").and_then(Value::as_f64) {
                        Some(v) => v,
                        None => c.positive(&["max_position_embeddings"])? as f64,
                    },
                };
                RopeScaling::Llama3 {
                    factor: rope_f64(&c, params, "factor", kind)?,
                    low_freq_factor: rope_f64(&c, params, "low_freq_factor", kind)?,
                    high_freq_factor: rope_f64(&c, params, "high_freq_factor", kind)?,
                    original_max_position_embeddings: orig,
                }
            }
            other => {
                return Err(c.error(
                    format!(
                        "rope type {other:?} is not supported (supported: default, linear, llama3); \
                         dynamic/yarn/longrope checkpoints need their own frequency rules"
                    ),
                ))
            }
        };
        Ok(Self {
            vocab_size: c.positive(&["vocab_size"])?,
            hidden_size,
            intermediate_size: c.positive(&["intermediate_size"])?,
            num_hidden_layers: c.positive(&["num_hidden_layers"])?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: c.positive_f64_or("rms_norm_eps", 1e-6)?,
            hidden_act: c.activation("hidden_act", "silu")?,
            attention_bias: c.bool_or("attention_bias", false)?,
            mlp_bias: c.bool_or("mlp_bias", false)?,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
            rope_theta,
            rope_scaling,
        })
    }

    /// The rotary inverse frequencies (`head_dim / 2` values, f32 as transformers computes them).
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> =
            (0..dim).step_by(2).map(|i| 1.0f32 / base.powf(i as f32 / dim as f32)).collect();
        match &self.rope_scaling {
            RopeScaling::Default => inv,
            RopeScaling::Linear { factor } => inv.into_iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, low, high, old) =
                    (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *original_max_position_embeddings as f32);
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                inv.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // transformers: ~(wavelen < high) * ~(wavelen > low) (wavelen is finite)
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Checkpoint layout
// ----------------------------------------------------------------------------------------------

/// How the checkpoint holds the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// No LM head (`LlamaModel`).
    None,
    /// The checkpoint's own `lm_head.weight`.
    Own,
    /// `lm_head` tied to `embed_tokens.weight`.
    Tied,
}

/// Where a decoder checkpoint keeps its base model and LM head.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub(crate) prefix: Option<String>,
    pub(crate) head: Head,
    pub(crate) class_name: String,
}

const CAUSAL_CLASSES: &[&str] = &["LlamaForCausalLM"];

fn layout(dir: &ModelDir) -> Layout {
    decoder_layout(dir, "embed_tokens.weight", false, CAUSAL_CLASSES, "LlamaModel", "LlamaForCausalLM")
}

/// The layout of a decoder checkpoint: the task prefix found through `probe` (the embedding
/// weight), an LM head of its own, a tied one (when `tie_word_embeddings`, default
/// `tied_default`, and `architectures` allow one of `lm_classes`), or none; and the class name
/// PEFT records.
pub(crate) fn decoder_layout(
    dir: &ModelDir,
    probe: &str,
    tied_default: bool,
    lm_classes: &[&str],
    base_class: &str,
    lm_class: &str,
) -> Layout {
    let prefix = dir.detect_prefix(probe);
    let tied = match dir.config.get("tie_word_embeddings") {
        Some(Value::Bool(b)) => *b,
        _ => tied_default,
    };
    let head = match &prefix {
        None => Head::None,
        Some(_) if dir.names.contains("lm_head.weight") => Head::Own,
        Some(_) if tied && dir.fields().architectures_allow(lm_classes) => Head::Tied,
        Some(_) => Head::None,
    };
    let class_name = match (&prefix, &head) {
        (None, _) => base_class.to_string(),
        (Some(_), Head::Own | Head::Tied) => lm_class.to_string(),
        (Some(_), Head::None) => dir
            .config
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or(base_class)
            .to_string(),
    };
    Layout { prefix, head, class_name }
}

// ----------------------------------------------------------------------------------------------
// Model
// ----------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: &Builder<'_>) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: vb.pp("q_proj").linear(h, cfg.num_attention_heads * d, bias)?,
            k_proj: vb.pp("k_proj").linear(h, cfg.num_key_value_heads * d, bias)?,
            v_proj: vb.pp("v_proj").linear(h, cfg.num_key_value_heads * d, bias)?,
            o_proj: vb.pp("o_proj").linear(cfg.num_attention_heads * d, h, bias)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &CausalMask) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let d = self.head_dim;
        let split = |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, s, n, d))?.transpose(1, 2)?) };
        let q = split(self.q_proj.forward(x)?, self.heads)?;
        let k = split(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        let rep = self.heads / self.kv_heads;
        let k = repeat_kv(k, rep)?;
        let v = repeat_kv(v, rep)?;
        let y = mask.attend(&q, &k, &v, (d as f64).powf(-0.5))?;
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b, s, self.heads * d))?;
        self.o_proj.forward(&y)
    }
}

/// `rotate_half`: `cat(-x2, x1)` over the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// `q * cos + rotate_half(q) * sin` with cos/sin (1, 1, seq, head_dim).
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok((x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?)?)
}

/// (b, kv, s, d) -> (b, kv * rep, s, d), each kv head repeated `rep` times in place.
fn repeat_kv(x: Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x);
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, kv, rep, s, d))?.contiguous()?.reshape((b, kv * rep, s, d))?)
}

#[derive(Clone, Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: &Builder<'_>) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: vb.pp("gate_proj").linear(h, i, bias)?,
            up_proj: vb.pp("up_proj").linear(h, i, bias)?,
            down_proj: vb.pp("down_proj").linear(i, h, bias)?,
            act: cfg.hidden_act,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.act.forward(&self.gate_proj.forward(x)?)?;
        let u = self.up_proj.forward(x)?;
        self.down_proj.forward(&(g * u)?)
    }
}

#[derive(Clone, Debug)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, vb: &Builder<'_>) -> Result<Self> {
        // transformers' construction order (named_modules order): self_attn, mlp, norms
        Ok(Self {
            self_attn: Attention::new(cfg, &vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, &vb.pp("mlp"))?,
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, &vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                &vb.pp("post_attention_layernorm"),
            )?,
        })
    }
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &CausalMask) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, cos, sin, mask)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + h)?)
    }
}

#[derive(Clone, Debug)]
enum LmHead {
    Own(Linear),
    Tied,
}

/// LLaMA with Hugging Face transformers module names (`LlamaModel`, or `LlamaForCausalLM` when
/// the checkpoint has the `model.` prefix and an LM head).
#[derive(Clone, Debug)]
pub struct LlamaModel {
    config: LlamaConfig,
    class_name: String,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<LmHead>,
    /// (1, head_dim / 2), f32.
    inv_freq: Tensor,
    dtype: DType,
    device: Device,
}

impl LlamaModel {
    /// Builds the model from a model directory.
    pub fn load(dir: &ModelDir, state: Arc<RunState>, dtype: Option<DType>, device: &Device) -> Result<(Self, Registry)> {
        let config = LlamaConfig::from_dir(dir)?;
        let lay = layout(dir);
        if lay.prefix.is_none() && !dir.names.contains("embed_tokens.weight") {
            return Err(Error::MissingTensor {
                file: dir.path.display().to_string(),
                key: "embed_tokens.weight".into(),
                hint: " (nor model.embed_tokens.weight: the weights do not look like a LLaMA checkpoint \
                       saved by transformers' LlamaModel or LlamaForCausalLM)"
                    .into(),
            });
        }
        if lay.prefix.is_some() && lay.head == Head::None && dir.fields().architectures_name(CAUSAL_CLASSES) {
            return Err(Error::MissingTensor {
                file: dir.path.display().to_string(),
                key: "lm_head.weight".into(),
                hint: format!(
                    " (config.json names {} with tie_word_embeddings=false, so the LM head needs its own \
                     weight; transformers would initialise it randomly. Set tie_word_embeddings to true if \
                     the head shares embed_tokens.weight)",
                    lay.class_name
                ),
            });
        }
        let vb = dir.builder(None, dtype, device, state)?;
        let root = match &lay.prefix {
            Some(p) => vb.pp(p),
            None => vb.clone(),
        };
        let embed_tokens = Embedding::new(config.vocab_size, config.hidden_size, &root.pp("embed_tokens"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(&config, &root.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(config.hidden_size, config.rms_norm_eps, &root.pp("norm"))?;
        let lm_head = match lay.head {
            Head::None => None,
            Head::Own => Some(LmHead::Own(vb.pp("lm_head").linear(config.hidden_size, config.vocab_size, false)?)),
            Head::Tied => Some(LmHead::Tied),
        };
        let inv = config.inv_freq();
        let n = inv.len();
        let inv_freq = Tensor::from_vec(inv, (1, n), device)?;
        let registry = vb.finish()?;
        let dtype = vb.dtype();
        Ok((
            Self {
                config,
                class_name: lay.class_name,
                embed_tokens,
                layers,
                norm,
                lm_head,
                inv_freq,
                dtype,
                device: device.clone(),
            },
            registry,
        ))
    }

    /// Facts PEFT reads from the model.
    pub fn info(dir: &ModelDir) -> ModelInfo {
        let lay = layout(dir);
        ModelInfo {
            model_type: dir.model_type.clone(),
            output_embedding: (lay.head != Head::None).then(|| "lm_head".to_string()),
            classifier: None,
            class_name: lay.class_name,
            task_prefixes: vec!["model".to_string()],
            alt_schemes: Vec::new(),
        }
    }

    /// The parsed configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// `LlamaModel` or `LlamaForCausalLM`.
    pub fn class_name(&self) -> &str {
        &self.class_name
    }

    /// True when the model has an LM head (logits are returned).
    pub fn has_lm_head(&self) -> bool {
        self.lm_head.is_some()
    }

    /// cos and sin (1, 1, seq, head_dim) in the model dtype for positions `0..seq`.
    fn rotary(&self, seq: usize) -> Result<(Tensor, Tensor)> {
        let pos = Tensor::arange(0u32, seq as u32, &self.device)?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?; // (s, d/2)
        let emb = Tensor::cat(&[&freqs, &freqs], 1)?; // (s, d)
        let cos = emb.cos()?.to_dtype(self.dtype)?.unsqueeze(0)?.unsqueeze(0)?;
        let sin = emb.sin()?.to_dtype(self.dtype)?.unsqueeze(0)?.unsqueeze(0)?;
        Ok((cos, sin))
    }

    /// Forward pass: `last_hidden_state` after the final norm; `logits` with an LM head.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<ModelOutputs> {
        let (_, s) = check_token_inputs(inputs, self.config.vocab_size, "LLaMA")?;
        let ids = inputs.input_ids.as_ref().ok_or_else(|| Error::MissingTensor {
            file: "inputs".into(),
            key: "input_ids".into(),
            hint: " (token ids are required)".into(),
        })?;
        let ids = ids.to_device(&self.device)?;
        let mask = CausalMask::new(inputs.attention_mask.as_ref(), s, self.dtype, &self.device)?;
        let (cos, sin) = self.rotary(s)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, &mask)?;
        }
        let x = self.norm.forward(&x)?;
        let logits = match &self.lm_head {
            None => None,
            Some(LmHead::Own(l)) => Some(l.forward(&x)?),
            Some(LmHead::Tied) => Some(x.broadcast_matmul(&self.embed_tokens.weight().t()?)?),
        };
        Ok(ModelOutputs { last_hidden_state: x, logits, pooler_output: None })
    }
}
