//! GPT-2: transformers 5.24's `GPT2Model` and `GPT2LMHeadModel`.
//!
//! Token and learned position embeddings (`wte`, `wpe`; `token_type_ids` embedded through `wte`
//! as transformers does), pre-norm blocks (`ln_1`, `attn`, `ln_2`, `mlp`), the final `ln_f`, and
//! for `GPT2LMHeadModel` an `lm_head` tied to `wte` (or the checkpoint's own `lm_head.weight`).
//! The four projections per block (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) are
//! transformers `Conv1D` layers with weights stored (in, out), asked from the builder with
//! `conv1d`, so PEFT's `fan_in_fan_out = true` applies to them.
//!
//! Module paths are the checkpoint's keys: a `GPT2LMHeadModel` checkpoint stores
//! `transformer.h.N.attn.c_attn`, a `GPT2Model` checkpoint `h.N.attn.c_attn`. Attention follows
//! transformers' default (`sdpa`): causal plus `attention_mask` padding, positions `0..seq`,
//! fully masked query rows give a zero attention output.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::common::{Activation, Embedding, LayerNorm};
use super::llama::{check_ids, check_token_inputs, decoder_layout, CausalMask, Head, Layout};
use super::loader::ModelDir;
use super::{ModelInputs, ModelOutputs};
use crate::error::{Error, Result};
use crate::builder::{Builder, ModelInfo, Registry};
use crate::layer::Linear;
use crate::state::RunState;

/// The `config.json` fields GPT-2 reads (transformers' names, with the `n_*` aliases).
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `n_embd` / `hidden_size`.
    pub hidden_size: usize,
    /// `n_layer` / `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `n_head` / `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `n_positions` / `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `n_inner` (default 4 * hidden).
    pub inner_size: usize,
    /// `activation_function`.
    pub activation: Activation,
    /// `layer_norm_epsilon`.
    pub layer_norm_epsilon: f64,
    /// `scale_attn_weights`.
    pub scale_attn_weights: bool,
    /// `scale_attn_by_inverse_layer_idx`.
    pub scale_attn_by_inverse_layer_idx: bool,
}

impl Gpt2Config {
    /// Parses `dir`'s `config.json` as transformers' `GPT2Config` does.
    pub fn from_dir(dir: &ModelDir) -> Result<Self> {
        let c = dir.fields();
        let hidden_size = c.positive(&["n_embd", "hidden_size"])?;
        let num_attention_heads = c.positive(&["n_head", "num_attention_heads"])?;
        if hidden_size % num_attention_heads != 0 {
            return Err(c.error(format!(
                "n_embd ({hidden_size}) must be a multiple of n_head ({num_attention_heads})"
            )));
        }
        if c.bool_or("add_cross_attention", false)? {
            return Err(c.error(
                "add_cross_attention=true (GPT-2 as an encoder-decoder decoder) is not supported",
            ));
        }
        Ok(Self {
            vocab_size: c.positive(&["vocab_size"])?,
            hidden_size,
            num_hidden_layers: c.positive(&["n_layer", "num_hidden_layers"])?,
            num_attention_heads,
            max_position_embeddings: c.positive(&["n_positions", "max_position_embeddings"])?,
            inner_size: c.opt_positive("n_inner")?.unwrap_or(4 * hidden_size),
            activation: c.activation("activation_function", "gelu_new")?,
            layer_norm_epsilon: c.positive_f64_or("layer_norm_epsilon", 1e-5)?,
            scale_attn_weights: c.bool_or("scale_attn_weights", true)?,
            scale_attn_by_inverse_layer_idx: c.bool_or("scale_attn_by_inverse_layer_idx", false)?,
        })
    }
}

const LM_CLASSES: &[&str] = &["GPT2LMHeadModel", "GPT2DoubleHeadsModel"];

fn layout(dir: &ModelDir) -> Layout {
    // GPT2Config ties the head by default.
    decoder_layout(dir, "wte.weight", true, LM_CLASSES, "GPT2Model", "GPT2LMHeadModel")
}

#[derive(Clone, Debug)]
struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    heads: usize,
    head_dim: usize,
    scaling: f64,
}

impl Attention {
    fn new(cfg: &Gpt2Config, layer_idx: usize, vb: &Builder<'_>) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.num_attention_heads;
        let mut scaling = if cfg.scale_attn_weights { (head_dim as f64).powf(-0.5) } else { 1.0 };
        if cfg.scale_attn_by_inverse_layer_idx {
            scaling /= (layer_idx + 1) as f64;
        }
        Ok(Self {
            c_attn: vb.pp("c_attn").conv1d(h, 3 * h, true)?,
            c_proj: vb.pp("c_proj").conv1d(h, h, true)?,
            heads: cfg.num_attention_heads,
            head_dim,
            scaling,
        })
    }
    fn forward(&self, x: &Tensor, mask: &CausalMask) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?;
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv.narrow(2, i * h, h)?.reshape((b, s, self.heads, self.head_dim))?.transpose(1, 2)?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let y = mask.attend(&q, &k, &v, self.scaling)?;
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b, s, h))?;
        self.c_proj.forward(&y)
    }
}

#[derive(Clone, Debug)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &Gpt2Config, vb: &Builder<'_>) -> Result<Self> {
        Ok(Self {
            c_fc: vb.pp("c_fc").conv1d(cfg.hidden_size, cfg.inner_size, true)?,
            c_proj: vb.pp("c_proj").conv1d(cfg.inner_size, cfg.hidden_size, true)?,
            act: cfg.activation,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.c_proj.forward(&self.act.forward(&self.c_fc.forward(x)?)?)
    }
}

#[derive(Clone, Debug)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &Gpt2Config, layer_idx: usize, vb: &Builder<'_>) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            ln_1: LayerNorm::new(cfg.hidden_size, eps, &vb.pp("ln_1"))?,
            attn: Attention::new(cfg, layer_idx, &vb.pp("attn"))?,
            ln_2: LayerNorm::new(cfg.hidden_size, eps, &vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, &vb.pp("mlp"))?,
        })
    }
    fn forward(&self, x: &Tensor, mask: &CausalMask) -> Result<Tensor> {
        let a = self.attn.forward(&self.ln_1.forward(x)?, mask)?;
        let x = (a + x)?;
        let m = self.mlp.forward(&self.ln_2.forward(&x)?)?;
        Ok((x + m)?)
    }
}

#[derive(Clone, Debug)]
enum LmHead {
    Own(Linear),
    Tied,
}

/// GPT-2 with Hugging Face transformers module names (`GPT2Model`, or `GPT2LMHeadModel` when
/// the checkpoint has the `transformer.` prefix).
#[derive(Clone, Debug)]
pub struct Gpt2Model {
    config: Gpt2Config,
    class_name: String,
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Option<LmHead>,
    dtype: DType,
    device: Device,
}

impl Gpt2Model {
    /// Builds the model from a model directory.
    pub fn load(dir: &ModelDir, state: Arc<RunState>, dtype: Option<DType>, device: &Device) -> Result<(Self, Registry)> {
        let config = Gpt2Config::from_dir(dir)?;
        let lay = layout(dir);
        if lay.prefix.is_none() && !dir.names.contains("wte.weight") {
            return Err(Error::MissingTensor {
                file: dir.path.display().to_string(),
                key: "wte.weight".into(),
                hint: " (nor transformer.wte.weight: the weights do not look like a GPT-2 checkpoint saved \
                       by transformers' GPT2Model or GPT2LMHeadModel)"
                    .into(),
            });
        }
        if lay.prefix.is_some() && lay.head == Head::None && dir.fields().architectures_name(LM_CLASSES) {
            return Err(Error::MissingTensor {
                file: dir.path.display().to_string(),
                key: "lm_head.weight".into(),
                hint: format!(
                    " (config.json names {} with tie_word_embeddings=false, so the LM head needs its own \
                     weight; transformers would initialise it randomly. Set tie_word_embeddings to true if \
                     the head shares wte.weight)",
                    lay.class_name
                ),
            });
        }
        let vb = dir.builder(None, dtype, device, state)?;
        let root = match &lay.prefix {
            Some(p) => vb.pp(p),
            None => vb.clone(),
        };
        let wte = Embedding::new(config.vocab_size, config.hidden_size, &root.pp("wte"))?;
        let wpe = Embedding::new(config.max_position_embeddings, config.hidden_size, &root.pp("wpe"))?;
        let h = (0..config.num_hidden_layers)
            .map(|i| Block::new(&config, i, &root.pp("h").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(config.hidden_size, config.layer_norm_epsilon, &root.pp("ln_f"))?;
        let lm_head = match lay.head {
            Head::None => None,
            Head::Own => Some(LmHead::Own(vb.pp("lm_head").linear(config.hidden_size, config.vocab_size, false)?)),
            Head::Tied => Some(LmHead::Tied),
        };
        let registry = vb.finish()?;
        let dtype = vb.dtype();
        Ok((
            Self { config, class_name: lay.class_name, wte, wpe, h, ln_f, lm_head, dtype, device: device.clone() },
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
            task_prefixes: vec!["transformer".to_string()],
            alt_schemes: Vec::new(),
        }
    }

    /// The parsed configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// `GPT2Model` or `GPT2LMHeadModel`.
    pub fn class_name(&self) -> &str {
        &self.class_name
    }

    /// True when the model has an LM head (logits are returned).
    pub fn has_lm_head(&self) -> bool {
        self.lm_head.is_some()
    }

    /// Forward pass: `last_hidden_state` after `ln_f`; `logits` with an LM head.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<ModelOutputs> {
        let (b, s) = check_token_inputs(inputs, self.config.vocab_size, "GPT-2")?;
        if s > self.config.max_position_embeddings {
            return Err(Error::ShapeMismatch {
                file: "inputs".into(),
                key: "input_ids".into(),
                expected: format!("(batch, seq <= {})", self.config.max_position_embeddings),
                got: vec![b, s],
                hint: " (GPT-2 has learned positions up to config n_positions; split longer inputs)".into(),
            });
        }
        let ids = inputs.input_ids.as_ref().ok_or_else(|| Error::MissingTensor {
            file: "inputs".into(),
            key: "input_ids".into(),
            hint: " (token ids are required)".into(),
        })?;
        let ids = ids.to_device(&self.device)?;
        let pos = Tensor::arange(0u32, s as u32, &self.device)?;
        let mut x = self.wte.forward(&ids)?.broadcast_add(&self.wpe.forward(&pos)?.unsqueeze(0)?)?;
        if let Some(tt) = &inputs.token_type_ids {
            // transformers embeds token types through wte
            if check_ids(tt, "token_type_ids", self.config.vocab_size)? != (b, s) {
                return Err(Error::ShapeMismatch {
                    file: "inputs".into(),
                    key: "token_type_ids".into(),
                    expected: format!("[{b}, {s}] (the shape of input_ids)"),
                    got: tt.dims().to_vec(),
                    hint: String::new(),
                });
            }
            x = (x + self.wte.forward(&tt.to_device(&self.device)?)?)?;
        }
        let mask = CausalMask::new(inputs.attention_mask.as_ref(), s, self.dtype, &self.device)?;
        for block in &self.h {
            x = block.forward(&x, &mask)?;
        }
        let x = self.ln_f.forward(&x)?;
        let logits = match &self.lm_head {
            None => None,
            Some(LmHead::Own(l)) => Some(l.forward(&x)?),
            Some(LmHead::Tied) => Some(x.broadcast_matmul(&self.wte.weight().t()?)?),
        };
        Ok(ModelOutputs { last_hidden_state: x, logits, pooler_output: None })
    }
}
