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
//! no scale factor, no antialias) and cast back. [`interpolate_bicubic`] is torch's CPU kernel,
//! bit for bit. The mask token is not used (`bool_masked_pos` is a pre-training input).
//! Eval-mode forward: dropout and drop path are identities.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor, D};

use super::common::{Activation, LayerNorm};
use super::loader::{config_f64, ModelDir};
use super::vit::{
    attention_dims, config_activation, config_bool, config_pair, config_usize_or, interpolate_pos_encoding,
    open_weights, PatchEmbeddings, SelfAttention,
};
use super::{ModelInputs, ModelOutputs};
use crate::error::{Error, Result};
use crate::inject::{AltScheme, ModelInfo, Registry};
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
// torch's bicubic resize
// ---------------------------------------------------------------------------------------------

const CUBIC_A: f32 = -0.75;

/// `((A + 2) x - (A + 3)) x x + 1` for |x| <= 1, rounded as torch's CPU build computes it.
fn cubic1(x: f32) -> f32 {
    let u = (CUBIC_A + 2.0).mul_add(x, -(CUBIC_A + 3.0));
    (u * x) * x + 1.0
}

/// `((A x - 5A) x + 8A) x - 4A` for 1 < |x| < 2, rounded as torch's CPU build computes it.
fn cubic2(x: f32) -> f32 {
    let u = CUBIC_A.mul_add(x, -(5.0 * CUBIC_A));
    let u = u.mul_add(x, 8.0 * CUBIC_A);
    u * x - 4.0 * CUBIC_A
}

/// For each output index: the four (clamped) source indices and their weights (computed in
/// f32, then stored in the tensor's dtype as torch stores them: `round` rounds them to it).
fn cubic_taps(input: usize, output: usize, round: fn(f32) -> f32) -> Vec<([usize; 4], [f32; 4])> {
    // area_pixel_compute_scale (no scale factor: input / output in f32), then
    // area_pixel_compute_source_index(cubic=true): scale * (i + 0.5) - 0.5, not clamped at 0.
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let real = scale.mul_add(i as f32 + 0.5, -0.5);
            // guard_index_and_lambda
            let idx = (real.floor() as i64).min(input as i64 - 1);
            let t = (real - idx as f32).clamp(0.0, 1.0);
            let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2((1.0 - t) + 1.0)].map(round);
            let mut ids = [0usize; 4];
            for (j, id) in ids.iter_mut().enumerate() {
                *id = (idx - 1 + j as i64).clamp(0, input as i64 - 1) as usize;
            }
            (ids, w)
        })
        .collect()
}

/// `x0 c0 + x1 c1 + x2 c2 + x3 c3` with the rounding of torch's compiled `cubic_interp1d`.
#[inline]
fn dot4(v: [f32; 4], w: &[f32; 4]) -> f32 {
    let acc = v[1] * w[1];
    let acc = v[0].mul_add(w[0], acc);
    let acc = v[2].mul_add(w[2], acc);
    v[3].mul_add(w[3], acc)
}

/// `torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)`
/// for (N, C, H, W) tensors: A = -0.75, source indices clamped at the borders, no antialiasing.
///
/// Computed in f32 on the host as torch's CPU kernel computes it (bit-exact with torch 2.x on
/// CPUs with FMA, i.e. its AVX2 / AVX-512 builds) and returned in `x`'s dtype and device. For
/// f16 / bf16 inputs torch keeps the interpolation weights in that dtype and accumulates in
/// f32; so does this (f64 inputs are computed in f32).
pub fn interpolate_bicubic(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        return Err(Error::Model(format!(
            "bicubic interpolation from {h}x{w} to {out_h}x{out_w}: every size must be positive"
        )));
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let src: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let round: fn(f32) -> f32 = match x.dtype() {
        DType::BF16 => |v| half::bf16::from_f32(v).to_f32(),
        DType::F16 => |v| half::f16::from_f32(v).to_f32(),
        _ => |v| v,
    };
    let ry = cubic_taps(h, out_h, round);
    let rx = cubic_taps(w, out_w, round);
    let mut out = vec![0f32; n * c * out_h * out_w];
    for (plane, dst) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(out_h * out_w)) {
        for (oy, (iy, wy)) in ry.iter().enumerate() {
            for (ox, (ix, wx)) in rx.iter().enumerate() {
                let mut rows = [0f32; 4];
                for (r, &yy) in rows.iter_mut().zip(iy) {
                    let row = &plane[yy * w..(yy + 1) * w];
                    *r = dot4([row[ix[0]], row[ix[1]], row[ix[2]], row[ix[3]]], wx);
                }
                dst[oy * out_w + ox] = dot4(rows, wy);
            }
        }
    }
    Ok(Tensor::from_vec(out, (n, c, out_h, out_w), x.device())?.to_dtype(x.dtype())?)
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
        let (hidden, heads, head_dim) = attention_dims(dir)?;
        let layers_n = dir.usize_field("num_hidden_layers")?;
        let image_size = config_pair(dir, "image_size")?;
        let patch = config_pair(dir, "patch_size")?;
        let channels = config_usize_or(dir, "num_channels", 3)?;
        let eps = config_f64(&dir.config, "layer_norm_eps", 1e-6);
        let qkv_bias = config_bool(dir, "qkv_bias", true)?;
        let swiglu = config_bool(dir, "use_swiglu_ffn", false)?;
        let mlp_ratio = config_f64(&dir.config, "mlp_ratio", 4.0);
        let cfg_err =
            |reason: String| Error::ConfigParse { path: dir.path.join("config.json").display().to_string(), reason };
        if !(mlp_ratio.is_finite() && mlp_ratio > 0.0) {
            return Err(cfg_err(format!("\"mlp_ratio\" must be a positive number, got {mlp_ratio}")));
        }
        // int(hidden_size * mlp_ratio), as Dinov2MLP computes it
        let mlp_hidden = (hidden as f64 * mlp_ratio) as usize;
        let num_patches = (image_size.0 / patch.0) * (image_size.1 / patch.1);
        if num_patches == 0 || mlp_hidden == 0 {
            return Err(cfg_err(format!(
                "image_size {image_size:?} / patch_size {patch:?} / mlp_ratio {mlp_ratio} give an empty model"
            )));
        }
        let act = if swiglu { Activation::Silu } else { config_activation(dir, "hidden_act", "gelu")? };

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

    #[test]
    fn cubic_weights_sum_to_one_and_identity_is_exact() {
        for (i, o) in [(4, 5), (37, 16), (5, 3), (7, 11)] {
            for (_, w) in cubic_taps(i, o, |v| v) {
                let s: f32 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{w:?}");
            }
        }
        for (ids, w) in cubic_taps(6, 6, |v| v) {
            assert_eq!(w, [0.0, 1.0, 0.0, 0.0]);
            assert!(ids[1] < 6);
        }
    }

    #[test]
    fn bicubic_keeps_constants_and_shapes() {
        let x = Tensor::full(2.5f32, (1, 3, 4, 4), &Device::Cpu).unwrap();
        let y = interpolate_bicubic(&x, 7, 3).unwrap();
        assert_eq!(y.dims(), &[1, 3, 7, 3]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|a| (a - 2.5).abs() < 1e-5), "{v:?}");
        assert!(interpolate_bicubic(&x, 0, 3).is_err());
    }
}
