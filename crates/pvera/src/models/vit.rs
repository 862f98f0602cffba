//! ViT (transformers `ViTModel`), with the checkpoint's module names.
//!
//! Module paths are those of the safetensors keys `save_pretrained` writes (transformers 5.24
//! still writes them): `embeddings.patch_embeddings.projection`, `encoder.layer.N.attention.
//! attention.{query,key,value}`, `encoder.layer.N.attention.output.dense`,
//! `encoder.layer.N.intermediate.dense`, `encoder.layer.N.output.dense`,
//! `encoder.layer.N.layernorm_{before,after}`, `layernorm`, `pooler.dense`.
//!
//! transformers 5 renames the modules at run time (`layers.N.attention.q_proj`,
//! `layers.N.mlp.fc1`, ...; there is no `encoder` in `ViTModel` any more), so adapters saved with
//! it name those. [`v5_name`] maps a site path to that name and [`VitModel::info`] reports it as
//! the `transformers-v5` alternative scheme. Weight files written in the transformers-5 scheme
//! load too (renamed to the checkpoint scheme on the way in).
//!
//! The forward pass is `ViTModel.forward` in eval mode (dropouts are identities; the tiny and
//! published configs use 0.0). An input whose size differs from `image_size` gets its position
//! embeddings interpolated as transformers does with `interpolate_pos_encoding=True` (bicubic,
//! `align_corners=False`, [`super::interpolate::interpolate_bicubic`]); transformers refuses such an
//! input without the flag.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::common::{multi_head_attention, Activation, LayerNorm};
use super::interpolate::interpolate_pos_encoding;
use super::loader::ModelDir;
use super::{ModelInputs, ModelOutputs};
use crate::error::{Error, Result};
use crate::builder::{AltScheme, Builder, ModelInfo, Registry};
use crate::layer::Linear;
use crate::state::RunState;

/// The tensor every ViT / DINOv2 checkpoint has, with or without a task prefix.
pub(crate) const PATCH_PROBE: &str = "embeddings.patch_embeddings.projection.weight";

/// Maps a site path (checkpoint scheme) to the module name transformers 5 uses at run time
/// (`encoder.layer.3.attention.attention.query` -> `layers.3.attention.q_proj`). Every linear
/// layer of [`VitModel`] has one; `None` for anything else.
pub fn v5_name(path: &str) -> Option<String> {
    if path == "pooler.dense" {
        return Some(path.to_string());
    }
    let rest = path.strip_prefix("encoder.layer.")?;
    let (n, tail) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    let new_tail = match tail {
        "attention.attention.query" => "attention.q_proj",
        "attention.attention.key" => "attention.k_proj",
        "attention.attention.value" => "attention.v_proj",
        "attention.output.dense" => "attention.o_proj",
        "intermediate.dense" => "mlp.fc1",
        "output.dense" => "mlp.fc2",
        _ => return None,
    };
    Some(format!("layers.{n}.{new_tail}"))
}

/// The checkpoint name of a tensor named in the transformers-5 scheme
/// (`layers.0.attention.q_proj.weight` -> `encoder.layer.0.attention.attention.query.weight`).
fn v5_tensor_to_checkpoint(name: &str) -> String {
    let Some(rest) = name.strip_prefix("layers.") else { return name.to_string() };
    let Some((n, tail)) = rest.split_once('.') else { return name.to_string() };
    if n.parse::<usize>().is_err() {
        return name.to_string();
    }
    const MAP: &[(&str, &str)] = &[
        ("attention.q_proj.", "attention.attention.query."),
        ("attention.k_proj.", "attention.attention.key."),
        ("attention.v_proj.", "attention.attention.value."),
        ("attention.o_proj.", "attention.output.dense."),
        ("mlp.fc1.", "intermediate.dense."),
        ("mlp.fc2.", "output.dense."),
    ];
    for (new, old) in MAP {
        if let Some(param) = tail.strip_prefix(new) {
            return format!("encoder.layer.{n}.{old}{param}");
        }
    }
    format!("encoder.layer.{n}.{tail}")
}

// ---------------------------------------------------------------------------------------------
// Pieces shared with DINOv2
// ---------------------------------------------------------------------------------------------

/// Opens the weights of a ViT-like model: with or without the task prefix, in the checkpoint
/// scheme (memory-mapped) or in the transformers-5 scheme (read, renamed by `to_checkpoint`,
/// then built from memory). `ckpt_probe` / `v5_probe` name a tensor that only one scheme has.
pub(crate) fn open_weights(
    dir: &ModelDir,
    state: Arc<RunState>,
    dtype: Option<DType>,
    device: &Device,
    ckpt_probe: &str,
    v5_probe: &str,
    to_checkpoint: &dyn Fn(BTreeMap<String, Tensor>) -> Result<HashMap<String, Tensor>>,
) -> Result<Builder<'static>> {
    let prefix = dir.detect_prefix(PATCH_PROBE);
    let p = prefix.as_ref().map(|p| format!("{p}.")).unwrap_or_default();
    let has = |n: &str| dir.names.contains(&format!("{p}{n}"));
    if has(ckpt_probe) || !has(v5_probe) {
        return dir.builder(prefix.as_deref(), dtype, device, state);
    }
    let mut tensors = BTreeMap::new();
    for w in &dir.weights {
        let bytes = std::fs::read(w).map_err(|e| Error::io(w, e))?;
        let all = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::Safetensors { file: w.display().to_string(), reason: e.to_string() })?;
        for (name, t) in all {
            if let Some(local) = name.strip_prefix(p.as_str()) {
                tensors.insert(local.to_string(), t);
            }
        }
    }
    let renamed = to_checkpoint(tensors)?;
    Ok(Builder::from_tensors(renamed, dtype.unwrap_or(dir.stored_dtype), device, state))
}

fn pixel_error(got: Vec<usize>, expected: String, hint: String) -> Error {
    Error::ShapeMismatch { file: "inputs".into(), key: "pixel_values".into(), expected, got, hint }
}

/// `patch_embeddings.projection`: a `Conv2d(C, hidden, kernel=patch, stride=patch)` computed
/// as one matmul over the non-overlapping patches (rows and columns past the last whole patch
/// are dropped, as the strided convolution drops them).
#[derive(Clone, Debug)]
pub(crate) struct PatchEmbeddings {
    /// (hidden, C * ph * pw)
    weight: Tensor,
    bias: Tensor,
    channels: usize,
    patch: (usize, usize),
    hidden: usize,
}

impl PatchEmbeddings {
    /// The first step of ViT and DINOv2: reads `pixel_values` (naming the family in the error),
    /// embeds the patches and puts the class token in front. Returns the token sequence
    /// (batch, 1 + patches, hidden) and the input's height and width.
    pub(crate) fn tokens(
        &self,
        inputs: &ModelInputs,
        cls_token: &Tensor,
        dtype: DType,
        family: &str,
    ) -> Result<(Tensor, usize, usize)> {
        let px = inputs.pixel_values.as_ref().ok_or_else(|| Error::MissingTensor {
            file: "inputs".into(),
            key: "pixel_values".into(),
            hint: format!(" ({family} takes images: pixel_values (batch, channels, height, width))"),
        })?;
        let px = self.check(px, dtype)?;
        let (b, _, h, w) = px.dims4()?;
        let patches = self.forward(&px)?;
        let hidden = patches.dim(2)?;
        let cls = cls_token.broadcast_as((b, 1, hidden))?;
        Ok((Tensor::cat(&[cls, patches], 1)?, h, w))
    }

    /// Reads `projection.weight` (hidden, C, ph, pw) and `projection.bias` under `vb`.
    pub(crate) fn new(vb: &Builder<'_>, channels: usize, hidden: usize, patch: (usize, usize)) -> Result<Self> {
        let vb = vb.pp("projection");
        let w = vb.get((hidden, channels, patch.0, patch.1), "weight")?;
        let bias = vb.get(hidden, "bias")?;
        let weight = w.reshape((hidden, channels * patch.0 * patch.1))?;
        Ok(Self { weight, bias, channels, patch, hidden })
    }

    /// The patch grid (rows, columns) for an image of `height` x `width`.
    pub(crate) fn grid(&self, height: usize, width: usize) -> (usize, usize) {
        (height / self.patch.0, width / self.patch.1)
    }

    /// Checks `pixel_values` and casts it to `dtype`: (batch, C, H, W), each side at least one patch.
    pub(crate) fn check(&self, px: &Tensor, dtype: DType) -> Result<Tensor> {
        let dims = px.dims().to_vec();
        let expected = format!("(batch, {}, height >= {}, width >= {})", self.channels, self.patch.0, self.patch.1);
        if dims.len() != 4 || dims[0] == 0 {
            return Err(pixel_error(dims, expected, " (images as a 4-d float tensor, batch first)".into()));
        }
        if dims[1] != self.channels {
            return Err(pixel_error(
                dims,
                expected,
                " (Make sure that the channel dimension of the pixel values match with the one set in the configuration.)".into(),
            ));
        }
        if dims[2] < self.patch.0 || dims[3] < self.patch.1 {
            return Err(pixel_error(dims, expected, " (the image is smaller than one patch)".into()));
        }
        if !matches!(px.dtype(), DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(Error::DtypeMismatch {
                file: "inputs".into(),
                key: "pixel_values".into(),
                got: format!("{:?}", px.dtype()),
                expected: "f32, f16, bf16 or f64".into(),
            });
        }
        Ok(px.to_dtype(dtype)?)
    }

    /// (B, C, H, W) -> (B, rows * columns, hidden), in the weight dtype.
    pub(crate) fn forward(&self, px: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = px.dims4()?;
        let (ph, pw) = self.patch;
        let (nh, nw) = self.grid(h, w);
        let x = px.narrow(2, 0, nh * ph)?.narrow(3, 0, nw * pw)?;
        let x = x
            .reshape((b, c, nh, ph, nw, pw))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * nh * nw, c * ph * pw))?;
        let y = x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
        Ok(y.reshape((b, nh * nw, self.hidden))?)
    }
}

/// `attention.attention.{query,key,value}` + `attention.output.dense`, eager attention.
#[derive(Clone, Debug)]
pub(crate) struct SelfAttention {
    pub(crate) query: Linear,
    pub(crate) key: Linear,
    pub(crate) value: Linear,
    pub(crate) output: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    /// Builds from `vb` at `...attention` (the outer module).
    pub(crate) fn new(vb: &Builder<'_>, hidden: usize, heads: usize, head_dim: usize, qkv_bias: bool) -> Result<Self> {
        let inner = vb.pp("attention");
        let all = heads * head_dim;
        Ok(Self {
            query: inner.pp("query").linear(hidden, all, qkv_bias)?,
            key: inner.pp("key").linear(hidden, all, qkv_bias)?,
            value: inner.pp("value").linear(hidden, all, qkv_bias)?,
            output: vb.pp("output").pp("dense").linear(all, hidden, true)?,
            heads,
            head_dim,
        })
    }

    /// (B, S, hidden) -> (B, S, hidden).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.query.forward(x)?;
        let k = self.key.forward(x)?;
        let v = self.value.forward(x)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        // transformers' default (SDPA) accumulates half-precision attention in f32 on the CPU
        // and rounds once; do the same (f32 inputs are untouched).
        let dtype = q.dtype();
        let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
        let y = multi_head_attention(&q, &k, &v, self.heads, None, scale)?.to_dtype(dtype)?;
        self.output.forward(&y)
    }
}

/// Hidden size, heads and head size from a config (`head_dim` when given, else hidden / heads).
pub(crate) fn attention_dims(dir: &ModelDir) -> Result<(usize, usize, usize)> {
    let c = dir.fields();
    let hidden = c.positive(&["hidden_size"])?;
    let heads = c.positive(&["num_attention_heads"])?;
    let head_dim = match c.opt_positive("head_dim")? {
        Some(d) => d,
        None if hidden % heads != 0 => {
            return Err(c.error(format!("hidden_size {hidden} is not a multiple of num_attention_heads {heads}")))
        }
        None => hidden / heads,
    };
    Ok((hidden, heads, head_dim))
}

// ---------------------------------------------------------------------------------------------
// ViT
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct VitLayer {
    attention: SelfAttention,
    intermediate: Linear,
    output: Linear,
    layernorm_before: LayerNorm,
    layernorm_after: LayerNorm,
    act: Activation,
}

impl VitLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.attention.forward(&self.layernorm_before.forward(x)?)?;
        let x = (h + x)?;
        let h = self.layernorm_after.forward(&x)?;
        let h = self.act.forward(&self.intermediate.forward(&h)?)?;
        let h = self.output.forward(&h)?;
        Ok((h + x)?)
    }
}

#[derive(Clone, Copy, Debug)]
enum PoolerAct {
    Tanh,
    Other(Activation),
}

#[derive(Clone, Debug)]
struct Pooler {
    dense: Linear,
    act: PoolerAct,
}

/// ViT with Hugging Face transformers module names (checkpoint scheme).
#[derive(Clone, Debug)]
pub struct VitModel {
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch_embeddings: PatchEmbeddings,
    layers: Vec<VitLayer>,
    layernorm: LayerNorm,
    pooler: Option<Pooler>,
    image_size: (usize, usize),
    dtype: DType,
}

impl VitModel {
    /// Builds the model from a model directory (`ViTModel` or `ViTForImageClassification`
    /// weights, with or without the `vit.` prefix; the pooler is built when the weights have one).
    pub fn load(
        dir: &ModelDir,
        state: Arc<RunState>,
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<(Self, Registry)> {
        let c = dir.fields();
        let (hidden, heads, head_dim) = attention_dims(dir)?;
        let layers_n = c.positive(&["num_hidden_layers"])?;
        let intermediate = c.positive(&["intermediate_size"])?;
        let image_size = c.pair("image_size")?;
        let patch = c.pair("patch_size")?;
        let channels = c.positive_or("num_channels", 3)?;
        let eps = c.f64_or("layer_norm_eps", 1e-12)?;
        let qkv_bias = c.bool_or("qkv_bias", true)?;
        let act = c.activation("hidden_act", "gelu")?;
        let num_patches = (image_size.0 / patch.0) * (image_size.1 / patch.1);
        if num_patches == 0 {
            return Err(c.error(format!("image_size {image_size:?} is smaller than patch_size {patch:?}")));
        }

        let vb = open_weights(
            dir,
            state,
            dtype,
            device,
            "encoder.layer.0.attention.attention.query.weight",
            "layers.0.attention.q_proj.weight",
            &|t| Ok(t.into_iter().map(|(k, v)| (v5_tensor_to_checkpoint(&k), v)).collect()),
        )?;
        let emb = vb.pp("embeddings");
        let cls_token = emb.get((1, 1, hidden), "cls_token")?;
        let patch_embeddings = PatchEmbeddings::new(&emb.pp("patch_embeddings"), channels, hidden, patch)?;
        let position_embeddings = emb.get((1, num_patches + 1, hidden), "position_embeddings")?;
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let l = vb.pp("encoder").pp("layer").pp(i);
            layers.push(VitLayer {
                attention: SelfAttention::new(&l.pp("attention"), hidden, heads, head_dim, qkv_bias)?,
                intermediate: l.pp("intermediate").pp("dense").linear(hidden, intermediate, true)?,
                output: l.pp("output").pp("dense").linear(intermediate, hidden, true)?,
                layernorm_before: LayerNorm::new(hidden, eps, &l.pp("layernorm_before"))?,
                layernorm_after: LayerNorm::new(hidden, eps, &l.pp("layernorm_after"))?,
                act,
            });
        }
        let layernorm = LayerNorm::new(hidden, eps, &vb.pp("layernorm"))?;
        let pooler = if vb.contains("pooler.dense.weight") {
            let out = c.positive_or("pooler_output_size", hidden)?;
            let act = match c.str_or("pooler_act", "tanh")? {
                "tanh" => PoolerAct::Tanh,
                _ => PoolerAct::Other(c.activation("pooler_act", "tanh")?),
            };
            Some(Pooler { dense: vb.pp("pooler").pp("dense").linear(hidden, out, true)?, act })
        } else {
            None
        };
        let model = Self {
            cls_token,
            position_embeddings,
            patch_embeddings,
            layers,
            layernorm,
            pooler,
            image_size,
            dtype: vb.dtype(),
        };
        Ok((model, vb.finish()?))
    }

    /// Facts PEFT reads from the model.
    pub fn info(dir: &ModelDir) -> ModelInfo {
        ModelInfo {
            model_type: dir.model_type.clone(),
            class_name: "ViTModel".into(),
            output_embedding: None,
            classifier: None,
            task_prefixes: vec!["vit".into()],
            alt_schemes: vec![AltScheme { name: "transformers-v5", map: v5_name }],
        }
    }

    /// Whether the weights had a pooler (`ViTModel(add_pooling_layer=True)`).
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// Forward pass: `last_hidden_state` after the final layernorm, `pooler_output` when the
    /// model has a pooler.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<ModelOutputs> {
        let (x, h, w) = self.patch_embeddings.tokens(inputs, &self.cls_token, self.dtype, "ViT")?;
        let pos = if (h, w) == self.image_size {
            self.position_embeddings.clone()
        } else {
            let (rows, columns) = self.patch_embeddings.grid(h, w);
            interpolate_pos_encoding(&self.position_embeddings, rows, columns, h, w, false)?
        };
        let mut x = x.broadcast_add(&pos)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let last = self.layernorm.forward(&x)?;
        let pooler_output = match &self.pooler {
            Some(p) => {
                let y = p.dense.forward(&last.i((.., 0, ..))?.contiguous()?)?;
                Some(match p.act {
                    PoolerAct::Tanh => y.tanh()?,
                    PoolerAct::Other(a) => a.forward(&y)?,
                })
            }
            None => None,
        };
        Ok(ModelOutputs { last_hidden_state: last, logits: None, pooler_output })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v5_names_cover_every_linear_layer() {
        assert_eq!(v5_name("encoder.layer.0.attention.attention.query").as_deref(), Some("layers.0.attention.q_proj"));
        assert_eq!(v5_name("encoder.layer.11.attention.attention.key").as_deref(), Some("layers.11.attention.k_proj"));
        assert_eq!(v5_name("encoder.layer.1.attention.attention.value").as_deref(), Some("layers.1.attention.v_proj"));
        assert_eq!(v5_name("encoder.layer.1.attention.output.dense").as_deref(), Some("layers.1.attention.o_proj"));
        assert_eq!(v5_name("encoder.layer.1.intermediate.dense").as_deref(), Some("layers.1.mlp.fc1"));
        assert_eq!(v5_name("encoder.layer.1.output.dense").as_deref(), Some("layers.1.mlp.fc2"));
        assert_eq!(v5_name("pooler.dense").as_deref(), Some("pooler.dense"));
        assert_eq!(v5_name("encoder.layer.x.output.dense"), None);
        assert_eq!(v5_name("layernorm"), None);
    }

    #[test]
    fn v5_tensor_names_map_back() {
        for (v5, ck) in [
            ("layers.0.attention.q_proj.weight", "encoder.layer.0.attention.attention.query.weight"),
            ("layers.3.attention.o_proj.bias", "encoder.layer.3.attention.output.dense.bias"),
            ("layers.1.mlp.fc1.weight", "encoder.layer.1.intermediate.dense.weight"),
            ("layers.1.mlp.fc2.bias", "encoder.layer.1.output.dense.bias"),
            ("layers.1.layernorm_before.weight", "encoder.layer.1.layernorm_before.weight"),
            ("embeddings.cls_token", "embeddings.cls_token"),
            ("pooler.dense.weight", "pooler.dense.weight"),
        ] {
            assert_eq!(v5_tensor_to_checkpoint(v5), ck);
        }
    }
}
