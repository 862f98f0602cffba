//! `pvera bench`: timings of the hot paths on one model, for the side-by-side comparison with
//! PyTorch + PEFT driven by `tools/bench_peft.py` (see `BENCHMARKS.md`).
//!
//! What one run measures (median of `--reps` after `--warmup` untimed runs):
//! - `eval`: eval forward, mean path, adapter unmerged (logits of a `classifier` head);
//! - `merged`: the same with the adapter merged into the base weights;
//! - `train`: one training step on a fresh adapter (forward with sampling, cross-entropy,
//!   backward, AdamW over the λ's and the head);
//! - `mc`: Monte Carlo prediction with `--mc-samples` samples (softmax averaged over samples);
//! - `gemm`: an fp32 square GEMM (`--gemm-size`), the machine's measured matmul peak.
//!
//! `--cold` instead loads the model and adapter, predicts once (first example) and exits: the
//! driver times the whole process (start to exit) and reads its peak RSS.
//!
//! Threads: candle's CPU kernels read `RAYON_NUM_THREADS`; `--threads` sets it before any
//! tensor is made.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use pvera::config::TargetModules;
use pvera::models::heads::{Classifier, Pooling};
use pvera::models::loader::ModelDir;
use pvera::models::ModelInputs;
use pvera::train::{AdamW, AdamWConfig};
use pvera::{checkpoint, PeftModel, PveraConfig, RunState, Sampling, TorchGenerator};

/// Arguments of `pvera bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Hugging Face model directory (BERT family or ViT/DINOv2).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory used by eval / merged / mc / cold (default: a fresh adapter with
    /// `--r`, `--target-modules` and small random λ_b, so the adapter path is not zero).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Inputs file (`input_ids` [+ `attention_mask`] or `pixel_values`) and optional `labels`
    /// (int64); default: seeded random inputs of `--batch` x `--seq` (or `--image-size`).
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Batch size of synthesised inputs.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Sequence length of synthesised text inputs.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Image side of synthesised image inputs.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Rank of the training (and fresh) adapter.
    #[arg(long, default_value_t = 256)]
    pub r: usize,
    /// Target modules of the training (and fresh) adapter.
    #[arg(long, default_value = "query,value")]
    pub target_modules: String,
    /// Pooling before the classifier head (default: the model type's, as `pvera train`: mean for text,
    /// cls for ViT, cls-mean-patch for DINOv2).
    #[arg(long)]
    pub pooling: Option<String>,
    /// Classifier outputs.
    #[arg(long, default_value_t = 2)]
    pub num_labels: usize,
    /// Comma-separated measurements: eval, merged, train, mc, gemm.
    #[arg(long, default_value = "eval,merged,train,mc,gemm")]
    pub what: String,
    /// Timed repetitions per measurement.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Untimed warm-up runs per measurement.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Samples of the Monte Carlo prediction.
    #[arg(long, default_value_t = 16)]
    pub mc_samples: usize,
    /// Monte Carlo samples per forward pass (default: as `pvera predict` stacks them, the
    /// library's row budget `DEFAULT_MAX_ROWS` divided by the batch).
    #[arg(long)]
    pub mc_batch: Option<usize>,
    /// Turn off automatic merging in eval mode (measure the unmerged adapter path).
    #[arg(long)]
    pub no_auto_merge: bool,
    /// Keep the mean path merged while sampling (MC): only the noise path stays low-rank
    /// (`RunState::set_merged_sampling`; not PEFT's exact rounding).
    #[arg(long)]
    pub merged_sampling: bool,
    /// Side of the square fp32 GEMM.
    #[arg(long, default_value_t = 2048)]
    pub gemm_size: usize,
    /// Threads of candle's CPU kernels (sets RAYON_NUM_THREADS; default: as set or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Cold start: load model + adapter, predict the first example once, exit.
    #[arg(long)]
    pub cold: bool,
    /// Write all timings (ms), medians and FLOP counts here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// Runs `f` `warmup` times untimed, then `reps` times timed; milliseconds.
fn time_it(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

fn is_image(dir: &ModelDir) -> bool {
    matches!(dir.model_type.as_str(), "vit" | "dinov2")
}

/// Inputs and labels: from `--inputs` or synthesised from a fixed seed.
fn inputs(args: &BenchArgs, dir: &ModelDir, device: &Device) -> Result<(ModelInputs, Tensor)> {
    let mut mi = ModelInputs::default();
    let mut labels = None;
    if let Some(p) = &args.inputs {
        let (ts, _) = checkpoint::read_safetensors(p, device)?;
        for (k, v) in ts {
            let t = v.tensor;
            match k.as_str() {
                "input_ids" => mi.input_ids = Some(t.to_dtype(DType::I64)?),
                "attention_mask" => mi.attention_mask = Some(t.to_dtype(DType::I64)?),
                "token_type_ids" => mi.token_type_ids = Some(t.to_dtype(DType::I64)?),
                "pixel_values" => mi.pixel_values = Some(t.to_dtype(DType::F32)?),
                "labels" => labels = Some(t.to_dtype(DType::U32)?),
                other => bail!("{}: unknown tensor {other:?} in the bench inputs", p.display()),
            }
        }
    } else {
        let mut g = TorchGenerator::new(0);
        if is_image(dir) {
            let n = args.batch * 3 * args.image_size * args.image_size;
            let px = g.randn_f32(n);
            mi.pixel_values =
                Some(Tensor::from_vec(px, (args.batch, 3, args.image_size, args.image_size), device)?);
        } else {
            let vocab = dir.usize_field("vocab_size")?;
            let u = g.randn_f32(args.batch * args.seq);
            let ids: Vec<i64> =
                u.iter().map(|x| ((x.abs() * 1000.0) as usize % vocab.max(1)) as i64).collect();
            mi.input_ids = Some(Tensor::from_vec(ids, (args.batch, args.seq), device)?);
            mi.attention_mask = Some(Tensor::ones((args.batch, args.seq), DType::I64, device)?);
        }
    }
    let b = match (&mi.input_ids, &mi.pixel_values) {
        (Some(t), _) | (None, Some(t)) => t.dims()[0],
        _ => bail!("bench inputs need input_ids or pixel_values"),
    };
    let labels = match labels {
        Some(l) => l,
        None => {
            let v: Vec<u32> = (0..b).map(|i| (i % args.num_labels.max(1)) as u32).collect();
            Tensor::from_vec(v, b, device)?
        }
    };
    Ok((mi, labels))
}

fn first_example(mi: &ModelInputs) -> Result<ModelInputs> {
    let one = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
        Ok(match t {
            Some(t) => Some(t.narrow(0, 0, 1)?),
            None => None,
        })
    };
    Ok(ModelInputs {
        input_ids: one(&mi.input_ids)?,
        attention_mask: one(&mi.attention_mask)?,
        token_type_ids: one(&mi.token_type_ids)?,
        pixel_values: one(&mi.pixel_values)?,
    })
}

fn pooling(args: &BenchArgs, dir: &ModelDir) -> Result<Pooling> {
    match &args.pooling {
        Some(p) => Pooling::from_name(p).with_context(|| format!("--pooling {p:?}: expected cls, pooler, mean or cls-mean-patch")),
        None => Ok(Pooling::default_for(&dir.model_type)),
    }
}

fn adapter_config(args: &BenchArgs, with_head: bool) -> PveraConfig {
    let mut cfg = PveraConfig { r: args.r as i64, ..PveraConfig::default() };
    let t: Vec<String> =
        args.target_modules.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    cfg.target_modules = Some(TargetModules::List(t));
    if with_head {
        cfg.modules_to_save = Some(vec!["classifier".to_string()]);
    }
    cfg
}

/// A classifier model with the inference adapter (from `--adapter` or fresh, small random λ_b).
fn load_inference(args: &BenchArgs, dir: &ModelDir, device: &Device) -> Result<PeftModel<Classifier>> {
    let state = Arc::new(RunState::new(0));
    let (model, registry, info) = Classifier::load(dir, args.num_labels, pooling(args, dir)?, None, device, state, 0)?;
    let mut pm = match &args.adapter {
        Some(a) => PeftModel::from_pretrained(model, registry, info, a, "default", false)
            .with_context(|| format!("loading adapter {}", a.display()))?,
        None => {
            let pm = PeftModel::new(model, registry, info, adapter_config(args, false), "default")?;
            let mut g = TorchGenerator::new(1);
            for lin in pm.registry().sites() {
                let site = lin.site();
                if site.has_adapter("default")? {
                    let (lb, ld) = site.with_slot("default", |s| (s.lambda_b().dims().to_vec(), s.lambda_d().as_detached_tensor().copy()))?;
                    let ld = ld?;
                    let n: usize = lb.iter().product();
                    let v: Vec<f32> = g.randn_f32(n).into_iter().map(|x| 0.01 * x).collect();
                    site.set_lambdas("default", &Tensor::from_vec(v, n, device)?, &ld)?;
                }
            }
            pm
        }
    };
    pm.eval()?;
    pm.state().set_auto_merge(!args.no_auto_merge)?;
    pm.state().set_merged_sampling(args.merged_sampling)?;
    let _ = pm.take_warnings();
    Ok(pm)
}

/// Forward FLOPs (2·m·n·k per matmul, attention included) of one pass over `rows` examples,
/// without and with the unmerged adapter path.
fn forward_flops(pm: &PeftModel<Classifier>, dir: &ModelDir, rows: usize, mi: &ModelInputs) -> Result<(f64, f64)> {
    let hidden = dir.usize_field("hidden_size")? as f64;
    let layers = dir.usize_field("num_hidden_layers")? as f64;
    let (tokens_per_ex, patch_flops) = if let Some(px) = &mi.pixel_values {
        let (_, c, h, w) = px.dims4()?;
        let p = dir.usize_field("patch_size")?;
        let patches = (h / p) * (w / p);
        (patches + 1, 2.0 * patches as f64 * (c * p * p) as f64 * hidden)
    } else {
        let ids = mi.input_ids.as_ref().context("no input_ids")?;
        (ids.dims()[1], 0.0)
    };
    let t = tokens_per_ex as f64;
    let n = rows as f64;
    let mut base = n * patch_flops + n * layers * 4.0 * t * t * hidden; // q kᵀ and p v
    let mut adapter = 0.0;
    let head = pm.info().classifier.clone().unwrap_or_default();
    for lin in pm.registry().sites() {
        let s = lin.site();
        let (i, o) = (s.in_features() as f64, s.out_features() as f64);
        // Sites outside the encoder (pooler, classifier) see one row per example.
        let per = if s.path() == head || s.path().contains("pooler") { n } else { n * t };
        base += 2.0 * per * i * o;
        if s.has_adapter("default")? && !s.merged_adapters()?.iter().any(|m| m == "default") {
            let r = s.with_slot("default", |sl| sl.r())? as f64;
            adapter += 2.0 * per * (i * 2.0 * r + r * o);
        }
    }
    Ok((base, base + adapter))
}

fn gemm_ms(size: usize, warmup: usize, reps: usize, device: &Device) -> Result<Vec<f64>> {
    let mut g = TorchGenerator::new(2);
    let a = Tensor::from_vec(g.randn_f32(size * size), (size, size), device)?;
    let b = Tensor::from_vec(g.randn_f32(size * size), (size, size), device)?;
    time_it(warmup, reps, || {
        let c = a.matmul(&b)?;
        std::hint::black_box(c);
        Ok(())
    })
}

pub fn run(args: BenchArgs) -> Result<u8> {
    // Before any tensor exists: candle reads it for every parallel kernel.
    crate::common::set_threads(args.threads)?;
    if args.reps == 0 {
        crate::usage!("--reps 0: time at least one repetition (3 is usual)");
    }
    if args.mc_samples == 0 {
        crate::usage!("--mc-samples 0: Monte Carlo needs at least 1 sample (16 is usual)");
    }
    if let Some(p) = &args.pooling {
        if Pooling::from_name(p).is_none() {
            crate::usage!("--pooling {p:?}: expected cls, pooler, mean or cls-mean-patch");
        }
    }
    let what: Vec<String> = args.what.split(',').map(|s| s.trim().to_string()).collect();
    for w in &what {
        if !["eval", "merged", "train", "mc", "gemm"].contains(&w.as_str()) {
            crate::usage!("--what {w:?}: expected eval, merged, train, mc or gemm (comma-separated)");
        }
    }
    let device = Device::Cpu;
    let dir = ModelDir::open(&args.model)?;
    let (mi, labels) = inputs(&args, &dir, &device)?;

    if args.cold {
        let pm = load_inference(&args, &dir, &device)?;
        let one = first_example(&mi)?;
        let (p, _) = pvera::uncertainty::mean_predict(&pm, &one, |x| pm.model().forward(x))?;
        crate::say!("cold prediction: {:?}", p.iter().map(|&v| v as f32).collect::<Vec<_>>());
        return Ok(0);
    }

    let want = |w: &str| what.iter().any(|x| x == w);
    let batch = match (&mi.input_ids, &mi.pixel_values) {
        (Some(t), _) | (None, Some(t)) => t.dims()[0],
        _ => bail!("no inputs"),
    };
    let mut results = serde_json::Map::new();
    let mut table: Vec<(String, f64, Option<f64>)> = Vec::new();

    let mut pm = load_inference(&args, &dir, &device)?;
    let (flops_base, flops_unmerged) = forward_flops(&pm, &dir, batch, &mi)?;
    if want("eval") {
        let ms = time_it(args.warmup, args.reps, || {
            let y = pm.model().forward(&mi)?;
            std::hint::black_box(y);
            Ok(())
        })?;
        let m = median(&ms);
        table.push(("eval forward (mean, unmerged)".into(), m, Some(flops_unmerged / m / 1e6)));
        results.insert("eval".into(), serde_json::json!(ms));
    }
    if want("merged") {
        pm.merge_adapter(None, false)?;
        let ms = time_it(args.warmup, args.reps, || {
            let y = pm.model().forward(&mi)?;
            std::hint::black_box(y);
            Ok(())
        })?;
        pm.unmerge_adapter()?;
        let m = median(&ms);
        table.push(("eval forward (merged)".into(), m, Some(flops_base / m / 1e6)));
        results.insert("merged".into(), serde_json::json!(ms));
    }
    if want("mc") {
        // Batched Monte Carlo through the library (`pvera::uncertainty::mc_predict`, what
        // `pvera predict` / `pvera eval` run): S samples stacked into forwards of at most
        // `mc_batch`·B rows, every adapted layer sampling, softmax per sample; the mean-mode
        // forward is left out so the row times the S sampled passes only.
        let s = args.mc_samples;
        let chunk = args.mc_batch.unwrap_or(pvera::uncertainty::mc::DEFAULT_MAX_ROWS / batch.max(1)).clamp(1, s);
        let cfg = pvera::uncertainty::McConfig {
            samples: s,
            max_rows: chunk * batch,
            seed: Some(0),
            mode: pvera::uncertainty::McMode::Batched,
            sampling: Sampling::Always,
            with_mean: false,
            // The generators' streams: the sampling path PEFT computes (the row the comparison
            // with PyTorch + PEFT is about).
            noise: pvera::uncertainty::McNoise::Generators,
        };
        let ms = time_it(args.warmup, args.reps, || {
            let out = pvera::uncertainty::mc_predict(&pm, &mi, &cfg, |x: &ModelInputs| pm.model().forward(x))?;
            std::hint::black_box(out.probs);
            Ok(())
        });
        pm.state().set_sampling(Sampling::FromConfig)?;
        let ms = ms?;
        let m = median(&ms);
        table.push((format!("MC prediction, {s} samples"), m, Some(s as f64 * flops_unmerged / m / 1e6)));
        results.insert("mc".into(), serde_json::json!(ms));
    }
    drop(pm);
    if want("train") {
        let state = Arc::new(RunState::new(0));
        let (model, registry, info) =
            Classifier::load(&dir, args.num_labels, pooling(&args, &dir)?, None, &device, state, 0)?;
        let pm = PeftModel::new(model, registry, info, adapter_config(&args, true), "default")?;
        pm.train()?;
        // PEFT computes no KL term; neither does this step.
        pm.state().set_collect_kl(false)?;
        let mut opt = AdamW::new(pm.trainable_vars()?, AdamWConfig::default())?;
        let ms = time_it(args.warmup, args.reps, || {
            let logits = pm.model().forward(&mi)?;
            let (loss, _) = pvera::train::classification_loss(&logits, &labels)?;
            let store = loss.backward()?;
            let g = opt.gradients(&store);
            opt.step(&g)?;
            Ok(())
        })?;
        let m = median(&ms);
        table.push(("training step".into(), m, None));
        results.insert("train".into(), serde_json::json!(ms));
    }
    let mut gemm_gflops = None;
    if want("gemm") {
        let n = args.gemm_size;
        let ms = gemm_ms(n, args.warmup.max(1), args.reps.max(3), &device)?;
        let m = median(&ms);
        let gf = 2.0 * (n as f64).powi(3) / m / 1e6;
        gemm_gflops = Some(gf);
        table.push((format!("fp32 GEMM {n}x{n}x{n}"), m, Some(gf)));
        results.insert("gemm".into(), serde_json::json!(ms));
    }

    crate::say!(
        "pvera bench: {} ({}), batch {batch}, threads {}",
        args.model.display(),
        dir.model_type,
        candle_core::utils::get_num_threads()
    );
    crate::say!("{:<36} {:>12} {:>10} {:>8}", "measurement", "median ms", "GFLOP/s", "% peak");
    for (name, m, gf) in &table {
        let gf_s = gf.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into());
        let pk = match (gf, gemm_gflops) {
            (Some(g), Some(p)) => format!("{:.0}%", 100.0 * g / p),
            _ => "-".into(),
        };
        crate::say!("{name:<36} {m:>12.1} {gf_s:>10} {pk:>8}");
    }
    if let Some(p) = &args.json {
        let mut root = serde_json::Map::new();
        root.insert("times_ms".into(), serde_json::Value::Object(results));
        root.insert("flops_forward_base".into(), serde_json::json!(flops_base));
        root.insert("flops_forward_unmerged".into(), serde_json::json!(flops_unmerged));
        root.insert("batch".into(), serde_json::json!(batch));
        root.insert("mc_samples".into(), serde_json::json!(args.mc_samples));
        root.insert("gemm_size".into(), serde_json::json!(args.gemm_size));
        root.insert("threads".into(), serde_json::json!(candle_core::utils::get_num_threads()));
        std::fs::write(p, serde_json::to_string_pretty(&serde_json::Value::Object(root))? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(0)
}
