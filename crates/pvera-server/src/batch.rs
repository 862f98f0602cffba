//! Encoded rows and the packed mean-mode forward.
//!
//! [`mean_forward`] is the one place that decides how rows of concurrent requests share forwards:
//! every row of the queued mean-mode requests, in arrival order, cut into forwards of at most the
//! row budget; a forward that carries several adapters is the library's mixed-adapter forward.
//!
//! Merged weights ([`MergeCache`]): the library keeps one merged `W + ΔW` per layer, for the
//! adapter that ran last with auto-merge on. Rebuilding it for another adapter costs about as
//! much as the unmerged path's extra `x·A` and `B·z` over `hidden / 2` tokens (per layer: `r·h²`
//! multiply-adds to rebuild against about `2·r·h` per token unmerged), so a forward of another
//! adapter runs unmerged unless it is at least that long. One adapter under load keeps its merged
//! weights; many adapters do not rebuild them on every switch. Both paths agree within float
//! rounding (the library's tests hold them to 1e-6).

use candle_core::Tensor;
use pvera::models::ModelInputs;
use pvera::predictor::{MixedGroup, PredictConfig};
use pvera::uncertainty::Prediction;
use pvera::Predictor;

use crate::error::ApiError;

/// The inputs of one request, encoded for its adapter.
#[derive(Clone, Debug)]
pub enum Rows {
    /// Token ids and type ids per text (special tokens included, not padded).
    Tokens(Vec<(Vec<u32>, Vec<u32>)>),
    /// Preprocessed images `(n, channels, height, width)`.
    Pixels(Tensor),
}

impl Rows {
    /// Number of inputs.
    pub fn len(&self) -> usize {
        match self {
            Rows::Tokens(t) => t.len(),
            Rows::Pixels(p) => p.dims().first().copied().unwrap_or(0),
        }
    }

    /// True without inputs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Model inputs of the rows `picks` (block index, row index) of `blocks`, all encoded for
/// `adapter`: texts padded to the longest, images stacked.
pub fn gather(p: &Predictor, adapter: &str, blocks: &[&Rows], picks: &[(usize, usize)]) -> pvera::Result<ModelInputs> {
    match blocks.first() {
        Some(Rows::Tokens(_)) => {
            let mut seqs: Vec<(&[u32], &[u32])> = Vec::with_capacity(picks.len());
            for &(b, r) in picks {
                match blocks[b] {
                    Rows::Tokens(t) => seqs.push((t[r].0.as_slice(), t[r].1.as_slice())),
                    Rows::Pixels(_) => return Err(pvera::Error::Request("texts and images in one batch".into())),
                }
            }
            p.text_tokenizer(adapter)?.pad_batch(&seqs, p.device())
        }
        Some(Rows::Pixels(_)) => {
            let mut ts = Vec::with_capacity(picks.len());
            for &(b, r) in picks {
                match blocks[b] {
                    Rows::Pixels(t) => ts.push(t.narrow(0, r, 1)?),
                    Rows::Tokens(_) => return Err(pvera::Error::Request("texts and images in one batch".into())),
                }
            }
            Ok(ModelInputs { pixel_values: Some(Tensor::cat(&ts, 0)?), ..Default::default() })
        }
        None => Err(pvera::Error::Request("no inputs".into())),
    }
}

/// Which adapter the library's merged weights belong to, and when rebuilding them pays.
#[derive(Clone, Debug)]
pub struct MergeCache {
    holder: Option<String>,
    rebuild_tokens: usize,
}

impl MergeCache {
    /// For a model of width `hidden`.
    pub fn new(hidden: usize) -> Self {
        MergeCache { holder: None, rebuild_tokens: (hidden / 2).max(1) }
    }

    /// Sets auto-merge for a mean-mode forward of `tokens` token rows with `adapter`.
    pub fn mean_forward(&mut self, p: &Predictor, adapter: &str, tokens: usize) -> pvera::Result<()> {
        let merged = self.holder.as_deref() == Some(adapter) || tokens >= self.rebuild_tokens;
        self.set(p, adapter, merged)
    }

    /// Sets auto-merge on (what `pvera predict` runs) for a request that must equal the CLI's
    /// answer bit for bit.
    pub fn exact(&mut self, p: &Predictor, adapter: &str) -> pvera::Result<()> {
        self.set(p, adapter, true)
    }

    fn set(&mut self, p: &Predictor, adapter: &str, merged: bool) -> pvera::Result<()> {
        p.peft_model().state().set_auto_merge(merged)?;
        if merged {
            self.holder = Some(adapter.to_string());
        }
        Ok(())
    }
}

/// Token rows of the picked inputs: summed text lengths, or a count that always pays a rebuild for
/// images (hundreds of patch tokens each).
fn tokens(blocks: &[&Rows], picks: &[(usize, usize)]) -> usize {
    picks
        .iter()
        .map(|&(b, r)| match blocks[b] {
            Rows::Tokens(t) => t[r].0.len(),
            Rows::Pixels(_) => usize::MAX / picks.len().max(1),
        })
        .sum()
}

/// One request's rows in a packed forward.
#[derive(Clone, Copy, Debug)]
pub struct Block<'a> {
    /// The adapter the rows are predicted with.
    pub adapter: &'a str,
    /// The rows, encoded for that adapter.
    pub rows: &'a Rows,
}

/// Mean-mode predictions of every block's rows, packed into forwards of at most `budget` rows.
/// Returns one result per block, in order; a failed forward fails the blocks it carried.
/// `on_forward(rows)` is called after each forward (metrics).
///
/// The rows of all blocks are cut, in arrival order, into chunks of at most `budget` rows; a chunk
/// whose rows all belong to one adapter runs on the single-adapter path (merged weights when they
/// pay, [`MergeCache`]), a chunk that mixes adapters runs as one mixed-adapter forward
/// ([`Predictor::predict_mixed`]: one base GEMM per layer, one `x·A` per projection group, each
/// row scaled by its own adapter's λ's). Both agree with predicting each request alone within
/// float rounding (1e-6, the library's and this crate's tests).
pub fn mean_forward(
    p: &mut Predictor,
    blocks: &[Block<'_>],
    budget: usize,
    merge: &mut MergeCache,
    on_forward: &mut dyn FnMut(usize),
) -> Vec<Result<Vec<Prediction>, ApiError>> {
    let mut out: Slots =
        blocks.iter().map(|b| Ok(vec![None; b.rows.len()])).collect();
    let cfg = PredictConfig { samples: 1, seed: None, ..PredictConfig::default() };
    let rows: Vec<&Rows> = blocks.iter().map(|b| b.rows).collect();
    let picks: Vec<(usize, usize)> =
        rows.iter().enumerate().flat_map(|(k, r)| (0..r.len()).map(move |j| (k, j))).collect();
    for chunk in picks.chunks(budget.max(1)) {
        // The chunk's adapters in order of first appearance, each with its rows.
        let mut groups: Vec<(&str, Vec<(usize, usize)>)> = Vec::new();
        for &(k, j) in chunk {
            let name = blocks[k].adapter;
            match groups.iter_mut().find(|(a, _)| *a == name) {
                Some((_, v)) => v.push((k, j)),
                None => groups.push((name, vec![(k, j)])),
            }
        }
        let result: pvera::Result<Vec<Vec<Prediction>>> = if let [(adapter, only)] = groups.as_slice() {
            merge
                .mean_forward(p, adapter, tokens(&rows, only))
                .and_then(|_| gather(p, adapter, &rows, only))
                .and_then(|x| p.predict(adapter, &x, &cfg))
                .map(|v| vec![v])
        } else {
            groups
                .iter()
                .map(|(adapter, picks)| gather(p, adapter, &rows, picks))
                .collect::<pvera::Result<Vec<ModelInputs>>>()
                .and_then(|inputs| {
                    let named: Vec<(&str, &ModelInputs)> =
                        groups.iter().zip(&inputs).map(|((a, _), x)| (*a, x)).collect();
                    p.predict_mixed(&named, &cfg)
                })
        };
        on_forward(chunk.len());
        match result {
            Ok(per_group) => {
                for ((_, picks), preds) in groups.iter().zip(per_group) {
                    for (&(k, j), pred) in picks.iter().zip(preds) {
                        if let Ok(v) = &mut out[k] {
                            v[j] = Some(pred);
                        }
                    }
                }
            }
            Err(e) => {
                let e = ApiError::from_pvera(e);
                for &(k, _) in chunk {
                    out[k] = Err(e.clone());
                }
            }
        }
    }
    finish(out)
}

/// One Monte Carlo request's rows in a packed batch.
#[derive(Clone, Copy, Debug)]
pub struct McBlock<'a> {
    /// The adapter the rows are predicted with (a PVeRA adapter).
    pub adapter: &'a str,
    /// The rows, encoded for that adapter.
    pub rows: &'a Rows,
    /// The request's noise seed.
    pub seed: u64,
}

/// Monte Carlo predictions of several requests (any adapters, one sample count and confidence),
/// packed: their inputs, in arrival order, are cut into batches of at most `budget` inputs, each
/// run as one mixed-adapter Monte Carlo prediction ([`Predictor::predict_mixed_groups`]: a
/// mean-mode pass, then the samples stacked `max(1, budget / inputs)` per forward). Every input
/// keeps the noise it has predicted alone (its request's seed and its position in the request),
/// so a request's answer equals `pvera predict`'s within float rounding whatever shares its batch.
/// Returns one result per block, in order; `on_forward(rows)` is called per forward (metrics).
pub fn mc_forward(
    p: &mut Predictor,
    blocks: &[McBlock<'_>],
    cfg: &PredictConfig,
    budget: usize,
    on_forward: &mut dyn FnMut(usize),
) -> Vec<Result<Vec<Prediction>, ApiError>> {
    let mut out: Slots =
        blocks.iter().map(|b| Ok(vec![None; b.rows.len()])).collect();
    let cfg = PredictConfig { max_rows: budget.max(1), ..cfg.clone() };
    let picks: Vec<(usize, usize)> =
        blocks.iter().enumerate().flat_map(|(k, b)| (0..b.rows.len()).map(move |j| (k, j))).collect();
    for chunk in picks.chunks(budget.max(1)) {
        // Each block's rows in this chunk are contiguous: one group per block.
        let mut spans: Vec<(usize, usize, usize)> = Vec::new(); // (block, first row, count)
        for &(k, j) in chunk {
            match spans.last_mut() {
                Some((b, _, n)) if *b == k => *n += 1,
                _ => spans.push((k, j, 1)),
            }
        }
        let result = spans
            .iter()
            .map(|&(k, j, n)| {
                let rows: Vec<(usize, usize)> = (j..j + n).map(|r| (0, r)).collect();
                gather(p, blocks[k].adapter, &[blocks[k].rows], &rows)
            })
            .collect::<pvera::Result<Vec<ModelInputs>>>()
            .and_then(|inputs| {
                let groups: Vec<MixedGroup<'_>> = spans
                    .iter()
                    .zip(&inputs)
                    .map(|(&(k, j, _), x)| MixedGroup { adapter: blocks[k].adapter, inputs: x, seed: blocks[k].seed, first: j as u64 })
                    .collect();
                p.predict_mixed_groups(&groups, &cfg)
            });
        mc_forward_rows(chunk.len(), cfg.samples, cfg.max_rows, false).for_each(&mut *on_forward);
        match result {
            Ok(per_group) => {
                for (&(k, j, _), preds) in spans.iter().zip(per_group) {
                    for (r, pred) in preds.into_iter().enumerate() {
                        if let Ok(v) = &mut out[k] {
                            v[j + r] = Some(pred);
                        }
                    }
                }
            }
            Err(e) => {
                let e = ApiError::from_pvera(e);
                for &(k, _, _) in &spans {
                    out[k] = Err(e.clone());
                }
            }
        }
    }
    finish(out)
}

/// Per-block predictions, one slot per row: every slot filled, or the block's error.
type Slots = Vec<Result<Vec<Option<Prediction>>, ApiError>>;

fn finish(out: Slots) -> Vec<Result<Vec<Prediction>, ApiError>> {
    out.into_iter()
        .map(|r| {
            r.and_then(|v| {
                v.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| ApiError::backend("a row got no prediction"))
            })
        })
        .collect()
}

/// The rows of each forward a Monte Carlo prediction of `b` inputs runs (`mc_predict`'s plan, for
/// the metrics): the mean-mode pass, then the samples stacked `max(1, max_rows / b)` per forward
/// (one per forward when `sequential`).
pub fn mc_forward_rows(b: usize, samples: usize, max_rows: usize, sequential: bool) -> impl Iterator<Item = usize> {
    let k = if sequential { 1 } else { (max_rows / b.max(1)).max(1) };
    std::iter::once(b).chain((0..samples.div_ceil(k)).map(move |i| k.min(samples - i * k) * b))
}
