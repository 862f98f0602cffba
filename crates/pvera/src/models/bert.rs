//! BERT and RoBERTa encoders, as transformers 5.24's `BertModel` / `RobertaModel` compute them.
//!
//! Module paths are transformers' (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`,
//! `encoder.layer.N.attention.output.dense`, `encoder.layer.N.intermediate.dense`,
//! `encoder.layer.N.output.dense`, `pooler.dense`), so a PEFT key `base_model.model.<path>...` names
//! a site directly. Weights saved from a task class (`bert.` / `roberta.` prefix) load too.
//!
//! What is computed (eval mode, dropout off):
//! - embeddings: `LayerNorm(word(ids) + token_type(tt) + position(pos))`; `token_type_ids`
//!   default to zeros; position ids are `0..seq` for `bert` and, for `roberta`, fairseq's
//!   `cumsum(ids != pad) * (ids != pad) + pad` (positions start at `pad + 1`, padding keeps `pad`);
//! - the extended attention mask: 0 where `attention_mask` is non-zero, the model dtype's
//!   minimum where it is zero (transformers' eager mask), added to the scores of every head;
//! - each layer: self-attention (query/key/value, softmax(q kᵀ / √d + mask) v), then
//!   `attention.output.dense` + residual + LayerNorm, `intermediate.dense` + activation,
//!   `output.dense` + residual + LayerNorm;
//! - the pooler (when the checkpoint has `pooler.dense`): `tanh(dense(h[:, 0]))`.
//!
//! Norms and softmax compute in f32 and return the model dtype; everything else runs in the model
//! dtype, as transformers does.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::common::{multi_head_attention, Activation, Embedding, LayerNorm};
use super::config_json::ConfigJson;
use super::loader::ModelDir;
use super::{ModelInputs, ModelOutputs};
use crate::error::{Error, Result};
use crate::builder::{Builder, ModelInfo, Registry};
use crate::layer::Linear;
use crate::state::RunState;

/// The `config.json` fields `BertModel` / `RobertaModel` read (transformers' defaults for the
/// optional ones).
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// `bert` or `roberta` (RoBERTa position ids).
    pub model_type: String,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `max_position_embeddings` (default 512).
    pub max_position_embeddings: usize,
    /// `type_vocab_size` (default 2).
    pub type_vocab_size: usize,
    /// `layer_norm_eps` (default 1e-12).
    pub layer_norm_eps: f64,
    /// `hidden_act` (default `gelu`, the exact erf form).
    pub hidden_act: Activation,
    /// `pad_token_id` (default 0 for BERT, 1 for RoBERTa); RoBERTa's position ids need it.
    pub pad_token_id: Option<usize>,
}

impl BertConfig {
    /// Reads and checks a parsed `config.json` (`path` is the model directory, for messages).
    pub fn from_json(config: &Value, path: &std::path::Path) -> Result<Self> {
        let c = ConfigJson::new(config, path);
        let model_type = c.str_or("model_type", "bert")?.to_string();
        if model_type != "bert" && model_type != "roberta" {
            return Err(c.error(format!(
                "model_type {model_type:?} is not a BERT-family type this loader knows (bert, roberta)"
            )));
        }
        let hidden_size = c.positive(&["hidden_size"])?;
        let num_attention_heads = c.positive(&["num_attention_heads"])?;
        if hidden_size % num_attention_heads != 0 {
            return Err(c.error(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
            )));
        }
        match c.str_or("position_embedding_type", "absolute")? {
            "absolute" => {}
            other => {
                return Err(c.error(format!(
                    "position_embedding_type {other:?}: only absolute position embeddings are supported \
                     (transformers 5 dropped relative_key / relative_key_query for BERT)"
                )))
            }
        }
        for flag in ["is_decoder", "add_cross_attention"] {
            if c.bool_or(flag, false)? {
                return Err(c.error(format!(
                    "\"{flag}\": true (a BERT decoder) is not supported; pvera's BertModel is the \
                     bidirectional encoder. Set it to false if the checkpoint is used as an encoder"
                )));
            }
        }
        // An absent pad_token_id takes the family's default; an explicit null means none.
        let default_pad = if model_type == "roberta" { 1 } else { 0 };
        let pad_token_id = match config.get("pad_token_id") {
            None => Some(default_pad),
            Some(_) => c.opt_count("pad_token_id")?,
        };
        if model_type == "roberta" && pad_token_id.is_none() {
            return Err(c.error(
                "pad_token_id is null, but RoBERTa's position ids are computed from it; set the \
                 tokenizer's padding id (usually 1)",
            ));
        }
        Ok(Self {
            vocab_size: c.positive(&["vocab_size"])?,
            hidden_size,
            num_hidden_layers: c.positive(&["num_hidden_layers"])?,
            num_attention_heads,
            intermediate_size: c.positive(&["intermediate_size"])?,
            max_position_embeddings: c.opt_count("max_position_embeddings")?.unwrap_or(512),
            type_vocab_size: c.opt_count("type_vocab_size")?.unwrap_or(2),
            layer_norm_eps: c.f64_or("layer_norm_eps", 1e-12)?,
            hidden_act: c.activation("hidden_act", "gelu")?,
            pad_token_id,
            model_type,
        })
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn roberta_positions(&self) -> bool {
        self.model_type == "roberta"
    }
}

#[derive(Clone, Debug)]
struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    fn new(cfg: &BertConfig, vb: &Builder<'_>) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word_embeddings: Embedding::new(cfg.vocab_size, h, &vb.pp("word_embeddings"))?,
            position_embeddings: Embedding::new(cfg.max_position_embeddings, h, &vb.pp("position_embeddings"))?,
            token_type_embeddings: Embedding::new(cfg.type_vocab_size, h, &vb.pp("token_type_embeddings"))?,
            layer_norm: LayerNorm::new(h, cfg.layer_norm_eps, &vb.pp("LayerNorm"))?,
        })
    }

    /// `ids`, `token_types`, `positions`: (batch, seq) u32 on the model's device.
    fn forward(&self, ids: &Tensor, token_types: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let words = self.word_embeddings.forward(ids)?;
        let types = self.token_type_embeddings.forward(token_types)?;
        let pos = self.position_embeddings.forward(positions)?;
        let e = ((words + types)? + pos)?;
        self.layer_norm.forward(&e)
    }
}

#[derive(Clone, Debug)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: Activation,
    heads: usize,
    head_dim: usize,
}

impl BertLayer {
    fn new(cfg: &BertConfig, vb: &Builder<'_>) -> Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        let slf = att.pp("self");
        Ok(Self {
            query: slf.pp("query").linear(h, h, true)?,
            key: slf.pp("key").linear(h, h, true)?,
            value: slf.pp("value").linear(h, h, true)?,
            attention_output: att.pp("output").pp("dense").linear(h, h, true)?,
            attention_norm: LayerNorm::new(h, cfg.layer_norm_eps, &att.pp("output").pp("LayerNorm"))?,
            intermediate: vb.pp("intermediate").pp("dense").linear(h, cfg.intermediate_size, true)?,
            output: vb.pp("output").pp("dense").linear(cfg.intermediate_size, h, true)?,
            output_norm: LayerNorm::new(h, cfg.layer_norm_eps, &vb.pp("output").pp("LayerNorm"))?,
            act: cfg.hidden_act,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = self.query.forward(x)?;
        let k = self.key.forward(x)?;
        let v = self.value.forward(x)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let ctx = multi_head_attention(&q, &k, &v, self.heads, mask, scale)?; // (b, s, heads · head_dim)
        let a = self.attention_output.forward(&ctx)?;
        let a = self.attention_norm.forward(&(a + x)?)?;
        let i = self.act.forward(&self.intermediate.forward(&a)?)?;
        let o = self.output.forward(&i)?;
        self.output_norm.forward(&(o + a)?)
    }
}

/// `BertModel` / `RobertaModel` (encoder, optional pooler) with transformers module names.
/// Cheap to clone: clones share the layers (and their adapters), as the registry does.
#[derive(Clone, Debug)]
pub struct BertModel(Arc<BertInner>);

#[derive(Debug)]
struct BertInner {
    config: BertConfig,
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    pooler: Option<Linear>,
    dtype: DType,
    device: Device,
}

/// The probe key that tells whether (and under which task prefix) a checkpoint holds a BERT.
const PROBE: &str = "embeddings.word_embeddings.weight";

impl BertModel {
    /// Builds the model from a model directory (weights in `dtype`, default: as stored; with or
    /// without the `bert.` / `roberta.` task prefix; single or sharded safetensors). The pooler is
    /// built when the checkpoint has `pooler.dense.weight`.
    pub fn load(dir: &ModelDir, state: Arc<RunState>, dtype: Option<DType>, device: &Device) -> Result<(Self, Registry)> {
        let config = BertConfig::from_json(&dir.config, &dir.path)?;
        let prefix = dir.detect_prefix(PROBE);
        let full = |key: &str| match &prefix {
            Some(p) => format!("{p}.{key}"),
            None => key.to_string(),
        };
        if !dir.names.contains(&full(PROBE)) {
            return Err(Error::MissingTensor {
                file: weights_label(dir),
                key: PROBE.into(),
                hint: format!(
                    " (nor under a task prefix such as `bert.` or `roberta.`); this does not look like \
                     a {} checkpoint",
                    config.model_type
                ),
            });
        }
        let has_pooler = dir.names.contains(&full("pooler.dense.weight"));
        let vb = dir.builder(prefix.as_deref(), dtype, device, state)?;
        let model = Self::new(config, has_pooler, &vb)?;
        let registry = vb.finish()?;
        Ok((model, registry))
    }

    /// Builds the model through a builder rooted at the base model (`embeddings.*`, `encoder.*`,
    /// `pooler.*`).
    pub fn new(config: BertConfig, with_pooler: bool, vb: &Builder<'_>) -> Result<Self> {
        let embeddings = BertEmbeddings::new(&config, &vb.pp("embeddings"))?;
        let enc = vb.pp("encoder").pp("layer");
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::new(&config, &enc.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let pooler = if with_pooler {
            let h = config.hidden_size;
            Some(vb.pp("pooler").pp("dense").linear(h, h, true)?)
        } else {
            None
        };
        Ok(Self(Arc::new(BertInner {
            config,
            embeddings,
            layers,
            pooler,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })))
    }

    /// Facts PEFT reads from the model: model type (`bert` / `roberta`, PEFT's default targets
    /// `query`, `value`), class name, and the task prefix (`bert` / `roberta`) under which
    /// `BertFor*` / `RobertaFor*` hold this model.
    pub fn info(dir: &ModelDir) -> ModelInfo {
        let roberta = dir.model_type == "roberta";
        ModelInfo {
            model_type: dir.model_type.clone(),
            output_embedding: None,
            classifier: None,
            class_name: if roberta { "RobertaModel" } else { "BertModel" }.into(),
            task_prefixes: vec![if roberta { "roberta" } else { "bert" }.into()],
            alt_schemes: Vec::new(),
        }
    }

    /// The parsed config.
    pub fn config(&self) -> &BertConfig {
        &self.0.config
    }

    /// Whether the model has a pooler.
    pub fn has_pooler(&self) -> bool {
        self.0.pooler.is_some()
    }

    /// Forward pass: `input_ids` (required), `attention_mask` and `token_type_ids` (optional),
    /// each (batch, seq). Returns `last_hidden_state` (batch, seq, hidden) and, with a pooler,
    /// `pooler_output` (batch, hidden), in the model dtype.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<ModelOutputs> {
        let me = &*self.0;
        let cfg = &me.config;
        let ids_t = inputs.input_ids.as_ref().ok_or_else(|| Error::MissingTensor {
            file: "inputs".into(),
            key: "input_ids".into(),
            hint: " (BertModel needs token ids: an integer tensor (batch, seq))".into(),
        })?;
        let (b, s) = dims2(ids_t, "input_ids")?;
        if b == 0 || s == 0 {
            return Err(Error::Model(format!("input_ids has an empty shape {:?}", ids_t.dims())));
        }
        let ids = host_ids(ids_t, "input_ids", cfg.vocab_size, "vocab_size")?;

        let token_types = match &inputs.token_type_ids {
            Some(t) => {
                check_same_shape(t, "token_type_ids", (b, s))?;
                host_ids(t, "token_type_ids", cfg.type_vocab_size, "type_vocab_size")?
            }
            None => vec![0u32; b * s],
        };

        let positions: Vec<u32> = if cfg.roberta_positions() {
            let pad = cfg.pad_token_id.unwrap_or(1) as u32;
            let mut out = Vec::with_capacity(b * s);
            for row in ids.chunks(s) {
                let mut count = 0u32;
                for &id in row {
                    if id != pad {
                        count += 1;
                        out.push(count + pad);
                    } else {
                        out.push(pad);
                    }
                }
            }
            out
        } else {
            (0..b).flat_map(|_| 0..s as u32).collect()
        };
        if let Some(&max) = positions.iter().max() {
            if max as usize >= cfg.max_position_embeddings {
                return Err(Error::Model(format!(
                    "input_ids: sequence length {s} needs position id {max}, but the model has \
                     max_position_embeddings={} (truncate the inputs to at most {} tokens)",
                    cfg.max_position_embeddings,
                    if cfg.roberta_positions() {
                        cfg.max_position_embeddings.saturating_sub(cfg.pad_token_id.unwrap_or(1) + 1)
                    } else {
                        cfg.max_position_embeddings
                    }
                )));
            }
        }

        let dev = &me.device;
        let ids_d = Tensor::from_vec(ids, (b, s), dev)?;
        let tt_d = Tensor::from_vec(token_types, (b, s), dev)?;
        let pos_d = Tensor::from_vec(positions, (b, s), dev)?;

        let mask = match &inputs.attention_mask {
            Some(m) => {
                check_same_shape(m, "attention_mask", (b, s))?;
                Some(me.extended_mask(m, b, s)?)
            }
            None => None,
        };

        let mut h = me.embeddings.forward(&ids_d, &tt_d, &pos_d)?;
        for layer in &me.layers {
            h = layer.forward(&h, mask.as_ref())?;
        }
        let pooler_output = match &me.pooler {
            Some(p) => {
                let first = h.narrow(1, 0, 1)?.squeeze(1)?;
                Some(p.forward(&first)?.tanh()?)
            }
            None => None,
        };
        Ok(ModelOutputs { last_hidden_state: h, logits: None, pooler_output })
    }
}

impl BertInner {
    /// transformers' eager bidirectional mask: (batch, 1, 1, seq) in the model dtype, 0 where
    /// `attention_mask` is non-zero and `finfo(dtype).min` where it is zero.
    fn extended_mask(&self, m: &Tensor, b: usize, s: usize) -> Result<Tensor> {
        let vals = m.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = vals.iter().find(|v| !v.is_finite()) {
            return Err(Error::Model(format!("attention_mask holds a non-finite value {bad}; use 1 (attend) / 0 (padding)")));
        }
        let min = dtype_min(self.dtype);
        let add: Vec<f32> = vals.iter().map(|&v| if v != 0.0 { 0.0 } else { min }).collect();
        Ok(Tensor::from_vec(add, (b, 1, 1, s), &self.device)?.to_dtype(self.dtype)?)
    }
}


/// `torch.finfo(dtype).min`, as an f32 that converts to it exactly.
fn dtype_min(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => half::f16::MIN.to_f32(),
        DType::BF16 => half::bf16::MIN.to_f32(),
        _ => f32::MIN,
    }
}

fn weights_label(dir: &ModelDir) -> String {
    match dir.weights.as_slice() {
        [one] => one.display().to_string(),
        _ => dir.path.join("model.safetensors.index.json").display().to_string(),
    }
}

fn dims2(t: &Tensor, name: &str) -> Result<(usize, usize)> {
    match t.dims() {
        &[b, s] => Ok((b, s)),
        other => Err(Error::ShapeMismatch {
            file: "inputs".into(),
            key: name.into(),
            expected: "(batch, seq)".into(),
            got: other.to_vec(),
            hint: String::new(),
        }),
    }
}

fn check_same_shape(t: &Tensor, name: &str, (b, s): (usize, usize)) -> Result<()> {
    if t.dims() != [b, s] {
        return Err(Error::ShapeMismatch {
            file: "inputs".into(),
            key: name.into(),
            expected: format!("[{b}, {s}] (the shape of input_ids)"),
            got: t.dims().to_vec(),
            hint: String::new(),
        });
    }
    Ok(())
}

/// Integer ids on the host as u32, each checked to be in `0..limit`.
fn host_ids(t: &Tensor, name: &str, limit: usize, limit_name: &str) -> Result<Vec<u32>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    let vals: Vec<i64> = match t.dtype() {
        DType::I64 => t.to_vec1::<i64>()?,
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::U8 => t.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        other => {
            return Err(Error::DtypeMismatch {
                file: "inputs".into(),
                key: name.into(),
                got: format!("{other:?}"),
                expected: "I64, U32, U8 (integer ids)".into(),
            })
        }
    };
    vals.into_iter()
        .map(|v| {
            if v < 0 || v as u64 >= limit as u64 {
                Err(Error::Model(format!(
                    "{name} holds id {v}, outside 0..{limit} ({limit_name} in config.json); the inputs \
                     were made for another model or tokenizer"
                )))
            } else {
                Ok(v as u32)
            }
        })
        .collect()
}
