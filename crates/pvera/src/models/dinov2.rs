//! DINOv2 (transformers `Dinov2Model`), with the checkpoint's module names.
//!
//! Module paths are those of the safetensors keys `save_pretrained` writes (transformers 5.24
//! still writes them): `embeddings.patch_embeddings.projection`, `encoder.layer.N.norm1`,
//! `encoder.layer.N.attention.attention.{query,key,value}`, `encoder.layer.N.attention.output.
//! dense`, `encoder.layer.N.layer_scale1.lambda1`, `encoder.layer.N.norm2`,
//! `encoder.layer.N.mlp.{fc1,fc2}` (SwiGLU checkpoints: `mlp.weights_in`, `mlp.weights_out`),
//! `encoder.layer.N.layer_scale2.lambda1`, `layernorm`.
//!
//! transformers 5 renames the attention modules at run time (`encoder.layer.N.attention.q_proj`,
//! `attention.o_proj`; SwiGLU `mlp.gate_proj` / `up_proj` / `down_proj`), so adapters saved with
//! it name those: [`v5_name`] maps a site path to that name, reported by [`Dinov2Model::info`]
//! as the `transformers-v5` scheme. Weight files in the transformers-5 scheme load too.
//!
//! Position embeddings are resized to the input's patch grid exactly as transformers 5.24's
//! `Dinov2Embeddings.interpolate_pos_encoding` does: unchanged when the patch count equals the
//! stored grid and the image is square; otherwise the grid is cast to f32, resized with
//! `interpolate(size=(H // p, W // p), mode="bicubic", align_corners=False)` (an explicit size,
//! no scale factor, no antialias) and cast back. [`super::interpolate::interpolate_bicubic`] is torch's CPU kernel,
//! bit for bit. The mask token is not used (`bool_masked_pos` is a pre-training input).
//! Eval-mode forward: dropout and drop path are identities.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor, D};

use super::common::{Activation, LayerNorm};
use super::interpolate::interpolate_pos_encoding;
use super::loader::ModelDir;
use super::vit::{attention_dims, open_weights, PatchEmbeddings, SelfAttention};
use super::{ModelInputs, ModelOutputs};
use crate::error::{Error, Result};
use crate::builder::{AltScheme, ModelInfo, Registry};
use crate::layer::Linear;
use crate::state::RunState;

/// Maps a site path (checkpoint scheme) to the module name transformers 5 uses at run time
/// (`encoder.layer.3.attention.attention.query` -> `encoder.layer.3.attention.q_proj`). Every
/// linear layer of [`Dinov2Model`] has one except a SwiGLU `mlp.weights_in`, which transformers
/// 5 splits into `gate_proj` and `up_proj` (two modules: `None`).
pub fn v5_name(path: &str) -> Option<String> {
    let rest = path.strip_prefix("encoder.layer.")?;
    let (n, tail) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    let new_tail = match tail {
        "attention.attention.query" => "attention.q_proj",
        "attention.attention.key" => "attention.k_proj",
        "attention.attention.value" => "attention.v_proj",
        "attention.output.dense" => "attention.o_proj",
        "mlp.fc1" => "mlp.fc1",
        "mlp.fc2" => "mlp.fc2",
        "mlp.weights_out" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("encoder.layer.{n}.{new_tail}"))
}

/// Renames a transformers-5 weight map to the checkpoint scheme (SwiGLU `gate_proj` and
/// `up_proj` are concatenated back into `weights_in`, gate first, as transformers saves them).
fn v5_tensors_to_checkpoint(tensors: BTreeMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    const MAP: &[(&str, &str)] = &[
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".mlp.down_proj.", ".mlp.weights_out."),
    ];
    let mut out = HashMap::new();
    let mut gates: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut ups: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in tensors {
        if let Some((head, param)) = name.split_once(".mlp.gate_proj.") {
            gates.insert(format!("{head}.mlp.weights_in.{param}"), t);
            continue;
        }
        if let Some((head, param)) = name.split_once(".mlp.up_proj.") {
            ups.insert(format!("{head}.mlp.weights_in.{param}"), t);
            continue;
        }
        let mut renamed = name.clone();
        for (new, old) in MAP {
            if let Some((head, param)) = name.split_once(new) {
                renamed = format!("{head}{old}{param}");
                break;
            }
        }
        out.insert(renamed, t);
    }
    for (key, gate) in gates {
        let up = ups.remove(&key).ok_or_else(|| Error::MissingTensor {
            file: "model weights".into(),
            key: key.replace("weights_in", "up_proj"),
            hint: " (a SwiGLU gate_proj needs its up_proj)".into(),
        })?;
        out.insert(key, Tensor::cat(&[gate, up], 0)?);
    }
    if let Some(key) = ups.keys().next() {
        return Err(Error::MissingTensor {
            file: "model weights".into(),
            key: key.replace("weights_in", "gate_proj"),
            hint: " (a SwiGLU up_proj needs its gate_proj)".into(),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Mlp {
    /// `fc1` -> act -> `fc2`
    Plain { fc1: Linear, fc2: Linear, act: Activation },
    /// `weights_in` (gate | up) -> silu(gate) * up -> `weights_out`
    SwiGlu { weights_in: Linear, weights_out: Linear },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Plain { fc1, fc2, act } => fc2.forward(&act.forward(&fc1.forward(x)?)?),
            Mlp::SwiGlu { weights_in, weights_out } => {
                let h = weights_in.forward(x)?;
                let half = h.dim(D::Minus1)? / 2;
                let gate = h.narrow(D::Minus1, 0, half)?;
                let up = h.narrow(D::Minus1, half, half)?;
                weights_out.forward(&(gate.silu()? * up)?)
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Dinov2Layer {
    norm1: LayerNorm,
    attention: SelfAttention,
    layer_scale1: Tensor,
    norm2: LayerNorm,
    mlp: Mlp,
    layer_scale2: Tensor,
}

impl Dinov2Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.attention.forward(&self.norm1.forward(x)?)?;
        let x = (h.broadcast_mul(&self.layer_scale1)? + x)?;
        let h = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((h.broadcast_mul(&self.layer_scale2)? + x)?)
    }
}

/// DINOv2 with Hugging Face transformers module names (checkpoint scheme).
#[derive(Clone, Debug)]
pub struct Dinov2Model {
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch_embeddings: PatchEmbeddings,
    layers: Vec<Dinov2Layer>,
    layernorm: LayerNorm,
    dtype: DType,
}

impl Dinov2Model {
    /// Builds the model from a model directory (`Dinov2Model`, `Dinov2ForImageClassification`
    /// or `Dinov2Backbone` weights, with or without the `dinov2.` prefix).
    pub fn load(
        dir: &ModelDir,
        state: Arc<RunState>,
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<(Self, Registry)> {
        let c = dir.fields();
        let (hidden, heads, head_dim) = attention_dims(dir)?;
        let layers_n = c.positive(&["num_hidden_layers"])?;
        let image_size = c.pair("image_size")?;
        let patch = c.pair("patch_size")?;
        let channels = c.positive_or("num_channels", 3)?;
        let eps = c.f64_or("layer_norm_eps", 1e-6)?;
        let qkv_bias = c.bool_or("qkv_bias", true)?;
        let swiglu = c.bool_or("use_swiglu_ffn", false)?;
        let mlp_ratio = c.positive_f64_or("mlp_ratio", 4.0)?;
        // int(hidden_size * mlp_ratio), as Dinov2MLP computes it
        let mlp_hidden = (hidden as f64 * mlp_ratio) as usize;
        let num_patches = (image_size.0 / patch.0) * (image_size.1 / patch.1);
        if num_patches == 0 || mlp_hidden == 0 {
            return Err(c.error(format!(
                "image_size {image_size:?} / patch_size {patch:?} / mlp_ratio {mlp_ratio} give an empty model"
            )));
        }
        let act = if swiglu { Activation::Silu } else { c.activation("hidden_act", "gelu")? };

        let vb = open_weights(
            dir,
            state,
            dtype,
            device,
            "encoder.layer.0.attention.attention.query.weight",
            "encoder.layer.0.attention.q_proj.weight",
            &v5_tensors_to_checkpoint,
        )?;
        let emb = vb.pp("embeddings");
        let cls_token = emb.get((1, 1, hidden), "cls_token")?;
        if emb.contains("mask_token") {
            // Unused here (pre-training input), read only so the parameter count matches PEFT's.
            let _ = emb.get((1, hidden), "mask_token");
        }
        let patch_embeddings = PatchEmbeddings::new(&emb.pp("patch_embeddings"), channels, hidden, patch)?;
        let position_embeddings = emb.get((1, num_patches + 1, hidden), "position_embeddings")?;
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let l = vb.pp("encoder").pp("layer").pp(i);
            let norm1 = LayerNorm::new(hidden, eps, &l.pp("norm1"))?;
            let attention = SelfAttention::new(&l.pp("attention"), hidden, heads, head_dim, qkv_bias)?;
            let layer_scale1 = l.pp("layer_scale1").get(hidden, "lambda1")?;
            let norm2 = LayerNorm::new(hidden, eps, &l.pp("norm2"))?;
            let m = l.pp("mlp");
            let mlp = if swiglu {
                // Dinov2SwiGLUFFN: two thirds of the MLP width, rounded up to a multiple of 8
                let hf = (mlp_hidden * 2 / 3).div_ceil(8) * 8;
                Mlp::SwiGlu {
                    weights_in: m.pp("weights_in").linear(hidden, 2 * hf, true)?,
                    weights_out: m.pp("weights_out").linear(hf, hidden, true)?,
                }
            } else {
                Mlp::Plain {
                    fc1: m.pp("fc1").linear(hidden, mlp_hidden, true)?,
                    fc2: m.pp("fc2").linear(mlp_hidden, hidden, true)?,
                    act,
                }
            };
            let layer_scale2 = l.pp("layer_scale2").get(hidden, "lambda1")?;
            layers.push(Dinov2Layer { norm1, attention, layer_scale1, norm2, mlp, layer_scale2 });
        }
        let layernorm = LayerNorm::new(hidden, eps, &vb.pp("layernorm"))?;
        let model = Self { cls_token, position_embeddings, patch_embeddings, layers, layernorm, dtype: vb.dtype() };
        Ok((model, vb.finish()?))
    }

    /// Facts PEFT reads from the model.
    pub fn info(dir: &ModelDir) -> ModelInfo {
        ModelInfo {
            model_type: dir.model_type.clone(),
            class_name: "Dinov2Model".into(),
            output_embedding: None,
            classifier: None,
            task_prefixes: vec!["dinov2".into()],
            alt_schemes: vec![AltScheme { name: "transformers-v5", map: v5_name }],
        }
    }

    /// Forward pass: `last_hidden_state` after the final `layernorm`; `pooler_output` is its
    /// class token, as `Dinov2Model` returns it.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<ModelOutputs> {
        let (x, h, w) = self.patch_embeddings.tokens(inputs, &self.cls_token, self.dtype, "DINOv2")?;
        let (rows, columns) = self.patch_embeddings.grid(h, w);
        // Dinov2Embeddings casts the grid to f32 for the resize and back
        let pos = interpolate_pos_encoding(&self.position_embeddings, rows, columns, h, w, true)?;
        let mut x = x.broadcast_add(&pos)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let last = self.layernorm.forward(&x)?;
        let pooled = last.i((.., 0, ..))?.contiguous()?;
        Ok(ModelOutputs { last_hidden_state: last, logits: None, pooler_output: Some(pooled) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v5_names() {
        assert_eq!(
            v5_name("encoder.layer.0.attention.attention.query").as_deref(),
            Some("encoder.layer.0.attention.q_proj")
        );
        assert_eq!(
            v5_name("encoder.layer.2.attention.attention.key").as_deref(),
            Some("encoder.layer.2.attention.k_proj")
        );
        assert_eq!(
            v5_name("encoder.layer.2.attention.attention.value").as_deref(),
            Some("encoder.layer.2.attention.v_proj")
        );
        assert_eq!(
            v5_name("encoder.layer.2.attention.output.dense").as_deref(),
            Some("encoder.layer.2.attention.o_proj")
        );
        assert_eq!(v5_name("encoder.layer.2.mlp.fc1").as_deref(), Some("encoder.layer.2.mlp.fc1"));
        assert_eq!(v5_name("encoder.layer.2.mlp.fc2").as_deref(), Some("encoder.layer.2.mlp.fc2"));
        assert_eq!(v5_name("encoder.layer.2.mlp.weights_out").as_deref(), Some("encoder.layer.2.mlp.down_proj"));
        assert_eq!(v5_name("encoder.layer.2.mlp.weights_in"), None);
        assert_eq!(v5_name("layernorm"), None);
    }
}
