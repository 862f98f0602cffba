//! Pooled embeddings of the backbone with an adapter: the vector the adapter's classification
//! head reads (its pooling of the last hidden state: mean over the attention mask for
//! sentence-transformers models such as all-MiniLM-L6-v2, `[CLS]`, the pooler, or DINOv2's
//! `cls ⊕ mean(patches)`), in mean mode and, with samples, its per-dimension spread under the
//! PVeRA latent's noise.
//!
//! The sampled passes reuse [`mc_predict`] (seeding, row budget, state restoration) by making
//! its softmax invertible: the forward returns `[e, 0]` (the pooled vector with one zero column
//! appended), whose softmax `p` gives back `e_i = ln(p_i / p_last)` exactly up to f64 rounding
//! (relative 1e-15; the values of a layer-normalised hidden state are far from the range where
//! `exp` underflows in f64).

use candle_core::{DType, Tensor};

use super::Predictor;
use crate::error::{Error, Result};
use crate::models::ModelInputs;
use crate::state::Sampling;
use crate::uncertainty::{mc_predict, mean_predict, McConfig, McMode, McNoise};

/// Embeddings of a batch of inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    /// Width of one embedding.
    pub dims: usize,
    /// The mean-mode embedding of each input (no sampling: `z = mu`), L2-normalised when asked.
    pub mean_mode: Vec<Vec<f32>>,
    /// With `samples ≥ 2`: the per-dimension standard deviation (`n - 1` denominator) of each
    /// input's `samples` sampled embeddings (each normalised first when asked).
    pub std: Option<Vec<Vec<f32>>>,
    /// Sampled passes (1 = mean mode only).
    pub samples: usize,
}

fn l2_normalise(v: &mut [f64]) {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Recovers the rows `e` from the softmax of `[e, 0]` (`width + 1` columns per row).
fn invert(probs: &[f64], width: usize) -> Result<Vec<Vec<f64>>> {
    probs
        .chunks(width + 1)
        .map(|row| {
            let last = row[width];
            let e: Vec<f64> = row[..width].iter().map(|p| (p / last).ln()).collect();
            if e.iter().all(|x| x.is_finite()) {
                Ok(e)
            } else {
                Err(Error::NonFinite {
                    what: "pooled embedding".into(),
                    count: e.iter().filter(|x| !x.is_finite()).count(),
                    hint: " (a hidden-state value beyond ±700; the model or adapter is corrupt)".into(),
                })
            }
        })
        .collect()
}

impl Predictor {
    /// Embeddings of `inputs` (encoded for `adapter`) under `adapter`: the pooled vector its
    /// head reads. `samples ≥ 2` adds the per-dimension standard deviation over that many sampled
    /// passes of the PVeRA latent (every adapted layer samples), seeded like
    /// [`Predictor::predict`]: the same seed gives the same spread. `normalize` L2-normalises each
    /// embedding (text-embeddings-inference's default).
    pub fn embed(
        &mut self,
        adapter: &str,
        inputs: &ModelInputs,
        samples: usize,
        seed: Option<u64>,
        normalize: bool,
    ) -> Result<Embeddings> {
        if samples == 0 {
            return Err(Error::Request("samples 0: use 1 for the mean-mode embedding, or at least 2 for its spread".into()));
        }
        self.activate(adapter)?;
        let task = self.adapter(adapter)?;
        let pooling = task.task.pooling;
        let width = task.head.inputs();
        let forward = |x: &ModelInputs| -> Result<Tensor> {
            let out = self.pm.model().forward(x)?;
            let pooled = pooling.pool(&out, x.attention_mask.as_ref())?.to_dtype(DType::F32)?;
            let zero = Tensor::zeros((pooled.dims()[0], 1), DType::F32, pooled.device())?;
            Ok(Tensor::cat(&[&pooled, &zero], 1)?)
        };
        let finish = |mut rows: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            if normalize {
                rows.iter_mut().for_each(|r| l2_normalise(r));
            }
            rows
        };
        let to_f32 = |rows: Vec<Vec<f64>>| -> Vec<Vec<f32>> {
            rows.into_iter().map(|r| r.into_iter().map(|x| x as f32).collect()).collect()
        };
        if samples < 2 {
            let (p, c) = mean_predict(&self.pm, inputs, forward)?;
            if c != width + 1 {
                return Err(Error::Model(format!("pooled width {} differs from the head's {width}", c - 1)));
            }
            let mean_mode = to_f32(finish(invert(&p, width)?));
            return Ok(Embeddings { dims: width, mean_mode, std: None, samples: 1 });
        }
        let cfg = McConfig {
            samples,
            max_rows: crate::uncertainty::mc::DEFAULT_MAX_ROWS,
            seed,
            mode: McMode::Batched,
            sampling: Sampling::Always,
            with_mean: true,
            // Each input's own noise (as `predict` by default): an input's spread does not depend
            // on the other inputs of its request.
            noise: McNoise::PerInput { first: 0 },
        };
        let out = mc_predict(&self.pm, inputs, &cfg, forward)?;
        if out.classes != width + 1 {
            return Err(Error::Model(format!("pooled width {} differs from the head's {width}", out.classes - 1)));
        }
        let mean_mode = out.mean_mode.as_deref().ok_or_else(|| Error::Model("no mean-mode pass".into()))?;
        let mean_mode = to_f32(finish(invert(mean_mode, width)?));
        let sampled = finish(invert(&out.probs, width)?); // sample-major: row s·B + b
        let b = out.inputs;
        let std = (0..b)
            .map(|i| {
                (0..width)
                    .map(|d| {
                        let xs: Vec<f64> = (0..samples).map(|s| sampled[s * b + i][d]).collect();
                        let m = xs.iter().sum::<f64>() / samples as f64;
                        let var = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (samples - 1) as f64;
                        var.sqrt() as f32
                    })
                    .collect()
            })
            .collect();
        Ok(Embeddings { dims: width, mean_mode, std: Some(std), samples })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::predictor::{PredictorOptions, TaskOverrides};

    fn fixture(p: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
    }

    /// A PEFT-written sequence-classification adapter (λ's and head from PEFT's init with
    /// init_weights=false) on the tiny BERT.
    fn open() -> (Predictor, ModelInputs) {
        let opts = PredictorOptions { tokenizer: Some(fixture("data/tokenizer.json")), ..PredictorOptions::default() };
        let p = Predictor::open_with_adapter(
            &fixture("models/bert_seq_cls/model"),
            &fixture("models/bert_seq_cls/adapter"),
            &opts,
            &TaskOverrides::default(),
        )
        .unwrap();
        let ids = Tensor::new(&[[2i64, 17, 40, 9, 3, 0], [2, 55, 81, 3, 0, 0]], p.device()).unwrap();
        let mask = Tensor::new(&[[1i64, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], p.device()).unwrap();
        (p, ModelInputs { input_ids: Some(ids), attention_mask: Some(mask), ..Default::default() })
    }

    #[test]
    fn embeddings_are_the_pooled_vector_the_head_reads() {
        let (mut p, x) = open();
        let e = p.embed("default", &x, 1, None, false).unwrap();
        assert_eq!((e.dims, e.samples, e.mean_mode.len()), (32, 1, 2));
        assert!(e.std.is_none());
        let out = p.peft_model().model().forward(&x).unwrap();
        let pooled = p.adapter("default").unwrap().task.pooling.pool(&out, x.attention_mask.as_ref()).unwrap();
        let want = pooled.to_vec2::<f32>().unwrap();
        for (a, b) in e.mean_mode.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
        let n = p.embed("default", &x, 1, None, true).unwrap();
        for row in &n.mean_mode {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6, "{norm}");
        }
    }

    #[test]
    fn sampled_spread_is_seeded() {
        let (mut p, x) = open();
        let a = p.embed("default", &x, 4, Some(3), true).unwrap();
        let b = p.embed("default", &x, 4, Some(3), true).unwrap();
        let c = p.embed("default", &x, 4, Some(4), true).unwrap();
        assert_eq!(a, b, "the same seed gives the same spread");
        assert_ne!(a.std, c.std);
        let std = a.std.as_ref().unwrap();
        assert!(std.iter().flatten().all(|s| s.is_finite() && *s >= 0.0));
        assert!(std.iter().flatten().any(|s| *s > 0.0), "the latent is sampled");
        // the mean mode does not depend on sampling
        let m = p.embed("default", &x, 1, None, true).unwrap();
        assert_eq!(a.mean_mode, m.mean_mode);
        assert!(p.embed("default", &x, 0, None, true).is_err());
    }
}
