//! The model worker: one OS thread owns the [`Predictor`] (it is not `Sync`). Requests reach it
//! through a bounded queue and get their answers on oneshot channels, so the HTTP side never
//! blocks on the model.
//!
//! Each turn the worker takes everything queued (continuous batching: what arrived while the last
//! forward ran) and processes it in arrival order, cut at hot-loads and unloads: the requests
//! before an adapter change run on the adapters as they were, the change happens, then the rest.
//! Within a run of requests, mean-mode ones are packed into shared forwards, rows of different
//! adapters in one mixed-adapter forward ([`crate::batch::mean_forward`]). Monte Carlo requests
//! queued together (one sample count and confidence, any adapters) are packed the same way
//! ([`crate::batch::mc_forward`]), every input keeping its own noise (its request's seed and its
//! position), so an answer equals `pvera predict`'s within float rounding whatever shared its
//! batch; a Monte Carlo request alone in its turn runs exactly as `pvera predict` runs it
//! (`predict_all`, batches of [`MC_BATCH`] inputs: the same bits). Sequential ones and embeddings
//! run one by one. A panic is caught per request group and
//! answered with a 500; the worker goes on.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use pvera::config::TargetModules;
use pvera::data::images::RawImage;
use pvera::predictor::{
    CalibrationChoice, Calibrator, Embeddings, Modality, Noise, PredictConfig, PredictorOptions, TaskOverrides,
};
use pvera::uncertainty::{McMode, Prediction};
use pvera::Predictor;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::batch::{gather, mc_forward, mc_forward_rows, mean_forward, Block, McBlock, MergeCache, Rows};
use crate::error::{ApiError, ServerError};
use crate::metrics::Metrics;
use crate::Limits;

/// Inputs per batch of a Monte Carlo request: `pvera predict`'s default `--batch-size`, so a
/// seeded answer equals the CLI's.
pub const MC_BATCH: usize = 8;

/// At most this many queued jobs are taken in one turn.
const MAX_TURN: usize = 256;

/// What a request sends to the model.
#[derive(Debug)]
pub enum JobInputs {
    /// Texts (tokenised by the worker for the request's adapter).
    Texts(Vec<String>),
    /// Decoded images.
    Images(Vec<RawImage>),
}

impl JobInputs {
    /// Number of inputs.
    pub fn len(&self) -> usize {
        match self {
            JobInputs::Texts(t) => t.len(),
            JobInputs::Images(i) => i.len(),
        }
    }
}

/// What to compute.
#[derive(Clone, Debug)]
pub enum InferKind {
    /// Class probabilities (mean mode when `samples` is 1).
    Classify {
        /// Monte Carlo samples.
        samples: usize,
        /// Seed of the noise.
        seed: u64,
        /// Interval level.
        confidence: f64,
        /// One forward per sample (PEFT's loop) instead of stacked samples.
        sequential: bool,
        /// Whether and how the adapter's `calibration.json` applies.
        calibration: CalibrationRequest,
    },
    /// Pooled embeddings.
    Embed {
        /// Sampled passes (1 = mean mode).
        samples: usize,
        /// Seed of the noise.
        seed: u64,
        /// L2-normalise.
        normalize: bool,
    },
}

/// What a request asks of the adapter's `calibration.json` (`pvera predict`'s calibration flags).
#[derive(Clone, Debug, Default)]
pub struct CalibrationRequest {
    /// `false`: ignore the file (`--no-calibration`).
    pub off: bool,
    /// Coverage, score and abstention threshold (`None` each: the file's first fit, no threshold).
    pub choice: CalibrationChoice,
}

impl CalibrationRequest {
    fn is_default(&self) -> bool {
        self.is_default_choice()
    }

    /// No coverage, score or threshold asked for.
    pub fn is_default_choice(&self) -> bool {
        self.choice == CalibrationChoice::default()
    }
}

impl InferKind {
    /// The calibration a classification asks for (none for embeddings).
    fn calibration(&self) -> &CalibrationRequest {
        static NONE: CalibrationRequest = CalibrationRequest { off: true, choice: CalibrationChoice { coverage: None, score: None, abstain_below: None } };
        match self {
            InferKind::Classify { calibration, .. } => calibration,
            InferKind::Embed { .. } => &NONE,
        }
    }
}

/// `/info`'s view of an adapter's calibration.
fn calibration_summary(c: &Calibrator) -> serde_json::Value {
    let f = c.file();
    serde_json::json!({
        "n": f.n,
        "seed": f.seed,
        "temperature": {"mean_mode": f.mean.temperature.temperature, "monte_carlo": f.mc.as_ref().map(|m| m.temperature.temperature)},
        "monte_carlo_samples": f.mc.as_ref().map(|m| m.samples),
        "fits": f.mean.conformal.iter().map(|x| serde_json::json!({
            "score": x.score.name(),
            "coverages": x.thresholds.iter().map(|t| 1.0 - t.alpha).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "score": c.score().name(),
        "coverage": 1.0 - c.alpha(),
    })
}

/// An answer of the worker.
#[derive(Debug)]
pub enum InferOut {
    /// Predictions with the adapter's labels.
    Classify {
        /// Label names in class-id order.
        labels: Vec<String>,
        /// One per input.
        predictions: Vec<Prediction>,
        /// The calibration applied (`None`: the adapter has none, or the request turned it off).
        calibration: Option<Calibrator>,
    },
    /// Embeddings.
    Embed(Embeddings),
}

/// One inference request.
#[derive(Debug)]
pub struct InferJob {
    /// Adapter name.
    pub adapter: String,
    /// The inputs.
    pub inputs: JobInputs,
    /// What to compute.
    pub kind: InferKind,
    /// Cut long texts instead of refusing them.
    pub truncate: bool,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<InferOut, ApiError>>,
}

/// A queued job.
#[derive(Debug)]
pub enum Job {
    /// Classify or embed.
    Infer(InferJob),
    /// Hot-load an adapter (path already checked to lie under `--adapter-dir`).
    Load {
        /// Name.
        name: String,
        /// Folder.
        dir: PathBuf,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<AdapterEntry, ApiError>>,
    },
    /// Unload an adapter.
    Unload {
        /// Name.
        name: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

/// One loaded adapter as `/info` and `/adapters` show it.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterEntry {
    /// Name requests use.
    pub name: String,
    /// Folder it was loaded from.
    pub path: String,
    /// Label names in class-id order.
    pub labels: Vec<String>,
    /// Pooling of the backbone output its head reads (also `/embed`'s vector).
    pub pooling: &'static str,
    /// Maximum tokens per text (text models).
    pub max_length: Option<usize>,
    /// Rank of the PVeRA projections.
    pub r: usize,
    /// `target_modules` of its config (a list of names or a regex).
    pub target_modules: serde_json::Value,
    /// Adapted layers in this model.
    pub adapted_layers: usize,
    /// Adapters with the same group number share one copy of the frozen A and B (identical
    /// projections are kept once).
    pub projection_group: usize,
    /// Where its classification head comes from (`adapter` or `model`).
    pub head: &'static str,
    /// Its `calibration.json` (temperatures, fitted scores and coverages; `None`: uncalibrated).
    pub calibration: Option<serde_json::Value>,
}

/// The loaded adapters, readable by the HTTP side without queueing.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// By name.
    pub adapters: BTreeMap<String, AdapterEntry>,
    /// Load order.
    pub order: Vec<String>,
    /// The adapter requests without `adapter` use: the first one loaded that is still there.
    pub default: Option<String>,
}

/// The model as `/info` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    /// Model directory.
    pub path: String,
    /// `model_type` of its config.json.
    pub model_type: String,
    /// `text` or `image`.
    pub modality: &'static str,
    /// Longest text the position embeddings allow (text models).
    pub max_positions: Option<usize>,
}

/// What the worker needs to start.
pub struct WorkerSetup {
    /// Model directory or hub id.
    pub model: PathBuf,
    /// `tokenizer.json` (default: the model's).
    pub tokenizer: Option<PathBuf>,
    /// Adapters to load at start, in order.
    pub adapters: Vec<(String, PathBuf)>,
    /// Limits.
    pub limits: Limits,
}

/// Handles the HTTP side keeps.
pub struct WorkerHandle {
    /// The queue.
    pub jobs: mpsc::Sender<Job>,
    /// Loaded adapters.
    pub catalog: Arc<RwLock<Catalog>>,
    /// The model.
    pub model: ModelSummary,
    /// False once the worker thread has ended.
    pub alive: Arc<AtomicBool>,
    /// The thread.
    pub thread: std::thread::JoinHandle<()>,
}

struct Worker {
    p: Predictor,
    catalog: Arc<RwLock<Catalog>>,
    metrics: Arc<Metrics>,
    limits: Limits,
    merge: MergeCache,
    /// Projection group numbers by the address of the shared projections.
    groups: Vec<usize>,
    calibrations: BTreeMap<String, Calibrator>,
}

/// Marks the worker dead when its thread ends, also by a panic outside the per-job guard.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Starts the worker thread: opens the model, loads the start-up adapters, then serves the queue
/// until every sender is gone. Returns once the model is loaded (or failed to load).
pub async fn spawn(setup: WorkerSetup, metrics: Arc<Metrics>) -> Result<WorkerHandle, ServerError> {
    let (tx, rx) = mpsc::channel::<Job>(setup.limits.max_concurrent_requests.saturating_add(16));
    let (ready_tx, ready_rx) = oneshot::channel::<Result<ModelSummary, ServerError>>();
    let catalog = Arc::new(RwLock::new(Catalog::default()));
    let alive = Arc::new(AtomicBool::new(true));
    let (cat, al) = (catalog.clone(), alive.clone());
    let thread = std::thread::Builder::new()
        .name("pvera-model".into())
        .spawn(move || {
            let _guard = AliveGuard(al);
            let mut w = match Worker::open(setup, cat, metrics) {
                Ok((w, summary)) => {
                    let _ = ready_tx.send(Ok(summary));
                    w
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            w.run(rx);
        })
        .map_err(|e| ServerError::Worker(format!("cannot start the model thread: {e}")))?;
    match ready_rx.await {
        Ok(Ok(model)) => Ok(WorkerHandle { jobs: tx, catalog, model, alive, thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(ServerError::Worker("the model thread ended while loading the model (a panic; see above)".into()))
        }
    }
}

fn target_modules_json(t: &Option<TargetModules>) -> serde_json::Value {
    match t {
        Some(TargetModules::List(v)) => serde_json::json!(v),
        Some(TargetModules::Regex(r)) => serde_json::json!(r),
        Some(TargetModules::AllLinear) => serde_json::json!("all-linear"),
        None => serde_json::Value::Null,
    }
}

impl Worker {
    fn open(setup: WorkerSetup, catalog: Arc<RwLock<Catalog>>, metrics: Arc<Metrics>) -> Result<(Worker, ModelSummary), ServerError> {
        let opts = PredictorOptions { tokenizer: setup.tokenizer.clone(), ..PredictorOptions::default() };
        let p = Predictor::open(&setup.model, &opts)?;
        let summary = ModelSummary {
            path: setup.model.display().to_string(),
            model_type: p.model_dir().model_type.clone(),
            modality: match p.modality() {
                Modality::Text => "text",
                Modality::Image => "image",
            },
            max_positions: p.max_positions(),
        };
        let hidden = p.model_dir().usize_field("hidden_size")?;
        let mut w = Worker {
            p,
            catalog,
            metrics,
            limits: setup.limits,
            merge: MergeCache::new(hidden),
            groups: Vec::new(),
            calibrations: BTreeMap::new(),
        };
        for (name, dir) in &setup.adapters {
            w.load(name, dir).map_err(|e| match e {
                LoadError::Pvera(e) => ServerError::Pvera(e),
                LoadError::Api(e) => ServerError::Config(format!("--adapter {name}={}: {}", dir.display(), e.message)),
            })?;
        }
        Ok((w, summary))
    }

    fn run(&mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_TURN {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            self.metrics.queue_depth.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
            let mut run: Vec<InferJob> = Vec::new();
            for job in jobs {
                match job {
                    Job::Infer(j) => run.push(j),
                    Job::Load { name, dir, reply } => {
                        self.infer(std::mem::take(&mut run));
                        let r = guarded(|| self.load(&name, &dir).map_err(LoadError::into_api));
                        let _ = reply.send(r);
                    }
                    Job::Unload { name, reply } => {
                        self.infer(std::mem::take(&mut run));
                        let r = guarded(|| self.unload(&name));
                        let _ = reply.send(r);
                    }
                }
            }
            self.infer(run);
        }
    }

    fn load(&mut self, name: &str, dir: &Path) -> Result<AdapterEntry, LoadError> {
        if self.p.adapters().contains_key(name) {
            return Err(LoadError::Api(ApiError::conflict(format!(
                "adapter {name:?} is already loaded; DELETE /adapters/{name} first or pick another name"
            ))));
        }
        let t0 = Instant::now();
        self.p.add_adapter(name, dir, &TaskOverrides::default()).map_err(LoadError::Pvera)?;
        if let (Some(cap), Modality::Text) = (self.limits.max_input_length, self.p.modality()) {
            // A server-wide cap below the adapter's trained length: reload with the cap as its
            // length, so truncation cuts there too.
            if self.p.max_length(name).map_err(LoadError::Pvera)? > cap {
                self.p.remove_adapter(name).map_err(LoadError::Pvera)?;
                let o = TaskOverrides { max_length: Some(cap), ..TaskOverrides::default() };
                self.p.add_adapter(name, dir, &o).map_err(LoadError::Pvera)?;
            }
        }
        // Its calibration.json, checked against the adapter before the adapter becomes visible.
        match Calibrator::load(dir, &CalibrationChoice::default()) {
            Ok(Some(c)) => {
                self.calibrations.insert(name.to_string(), c);
            }
            Ok(None) => {
                self.calibrations.remove(name);
            }
            Err(e) => {
                let _ = self.p.remove_adapter(name);
                self.calibrations.remove(name);
                return Err(LoadError::Pvera(e));
            }
        }
        for w in self.p.take_warnings() {
            tracing::warn!("adapter {name}: {w}");
        }
        self.refresh(name, true);
        tracing::info!("loaded adapter {name} from {} in {:.1} ms", dir.display(), t0.elapsed().as_secs_f64() * 1e3);
        self.catalog
            .read()
            .ok()
            .and_then(|c| c.adapters.get(name).cloned())
            .ok_or_else(|| LoadError::Api(ApiError::backend("the adapter vanished after loading")))
    }

    fn unload(&mut self, name: &str) -> Result<(), ApiError> {
        if !self.p.adapters().contains_key(name) {
            return Err(ApiError::not_found(format!("no adapter {name:?} is loaded; GET /adapters lists them")));
        }
        self.p.remove_adapter(name).map_err(ApiError::from_pvera)?;
        self.calibrations.remove(name);
        self.refresh(name, false);
        Ok(())
    }

    /// The catalog entry of a loaded adapter.
    fn entry(&mut self, name: &str) -> Option<AdapterEntry> {
        let (task, info) = (self.p.adapters().get(name)?, self.p.peft_model().adapter(name).ok()?);
        // Adapters whose projections were found identical share one `Arc` (PeftModel keeps one copy).
        let ptr = Arc::as_ptr(&info.projections) as usize;
        let group = match self.groups.iter().position(|&g| g == ptr) {
            Some(i) => i,
            None => {
                self.groups.push(ptr);
                self.groups.len() - 1
            }
        };
        let max_length = match self.p.modality() {
            Modality::Text => self.p.max_length(name).ok(),
            Modality::Image => None,
        };
        Some(AdapterEntry {
            name: name.to_string(),
            path: task.dir.display().to_string(),
            labels: task.labels().to_vec(),
            pooling: task.task.pooling.name(),
            max_length,
            r: info.projections.r(),
            target_modules: target_modules_json(&info.config.target_modules),
            adapted_layers: info.targets.len(),
            projection_group: group,
            head: task.head.origin,
            calibration: self.calibrations.get(name).map(calibration_summary),
        })
    }

    /// Updates the catalog after `name` was loaded (`added`) or removed; O(1) in the number of
    /// adapters, so a hot-load stays fast with a thousand loaded.
    fn refresh(&mut self, name: &str, added: bool) {
        let entry = if added { self.entry(name) } else { None };
        let Ok(mut cat) = self.catalog.write() else { return };
        cat.order.retain(|n| n != name);
        cat.adapters.remove(name);
        if let Some(e) = entry {
            cat.order.push(name.to_string());
            cat.adapters.insert(name.to_string(), e);
        }
        if cat.default.as_ref().is_none_or(|d| !cat.adapters.contains_key(d)) {
            cat.default = cat.order.first().cloned();
        }
        self.metrics.adapters.store(cat.adapters.len() as u64, Ordering::Relaxed);
    }

    /// Answers a run of inference jobs (no adapter change among them).
    fn infer(&mut self, jobs: Vec<InferJob>) {
        if jobs.is_empty() {
            return;
        }
        // Encode each request for its adapter; failures are answered right away.
        let mut ready: Vec<(InferJob, Rows)> = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.reply.is_closed() {
                continue; // the client is gone
            }
            match guarded(|| self.encode(&job)) {
                Ok(rows) => ready.push((job, rows)),
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        let (mean, rest): (Vec<_>, Vec<_>) =
            ready.into_iter().partition(|(j, _)| matches!(j.kind, InferKind::Classify { samples, .. } if samples < 2));
        if !mean.is_empty() {
            let blocks: Vec<Block<'_>> = mean.iter().map(|(j, r)| Block { adapter: &j.adapter, rows: r }).collect();
            let budget = self.limits.max_batch_rows;
            let metrics = self.metrics.clone();
            let results = guarded(|| {
                Ok(mean_forward(&mut self.p, &blocks, budget, &mut self.merge, &mut |rows| metrics.forward(rows)))
            });
            drop(blocks);
            match results {
                Ok(results) => {
                    for ((job, _), r) in mean.into_iter().zip(results) {
                        let out = r.and_then(|predictions| self.labelled(&job.adapter, predictions, job.kind.calibration()));
                        let _ = job.reply.send(out);
                    }
                }
                Err(e) => {
                    for (job, _) in mean {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
            }
        }
        // Monte Carlo requests of PVeRA adapters (batched mode), packed when several are queued:
        // one packing per (samples, confidence); a request alone runs exactly as `pvera predict`.
        let (packable, rest): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(j, _)| {
            matches!(j.kind, InferKind::Classify { sequential: false, .. })
                && self.p.peft_model().method(&j.adapter).is_ok_and(|m| m.samples())
        });
        let mut packs: Vec<((usize, u64), Vec<(InferJob, Rows)>)> = Vec::new();
        for (job, rows) in packable {
            let InferKind::Classify { samples, confidence, .. } = job.kind else { continue };
            let key = (samples, confidence.to_bits());
            match packs.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push((job, rows)),
                None => packs.push((key, vec![(job, rows)])),
            }
        }
        let mut alone: Vec<(InferJob, Rows)> = Vec::new();
        for (_, pack) in packs {
            if pack.len() == 1 {
                alone.extend(pack);
            } else {
                self.infer_mc_packed(pack);
            }
        }
        for (job, rows) in alone.into_iter().chain(rest) {
            if job.reply.is_closed() {
                continue;
            }
            let out = guarded(|| self.run_alone(&job, &rows));
            let _ = job.reply.send(out);
        }
    }

    /// Several Monte Carlo requests with one sample count and confidence, in mixed-adapter
    /// batches ([`crate::batch::mc_forward`]).
    fn infer_mc_packed(&mut self, pack: Vec<(InferJob, Rows)>) {
        let InferKind::Classify { samples, confidence, .. } = pack[0].0.kind else { return };
        let cfg = PredictConfig { samples, confidence, ..PredictConfig::default() };
        let blocks: Vec<McBlock<'_>> = pack
            .iter()
            .map(|(j, r)| McBlock {
                adapter: &j.adapter,
                rows: r,
                seed: match j.kind {
                    InferKind::Classify { seed, .. } => seed,
                    InferKind::Embed { seed, .. } => seed,
                },
            })
            .collect();
        let budget = self.limits.max_batch_rows;
        let metrics = self.metrics.clone();
        let results = guarded(|| Ok(mc_forward(&mut self.p, &blocks, &cfg, budget, &mut |rows| metrics.forward(rows))));
        drop(blocks);
        let inputs: usize = pack.iter().map(|(_, r)| r.len()).sum();
        self.metrics.mc_samples.fetch_add((samples * inputs) as u64, Ordering::Relaxed);
        match results {
            Ok(results) => {
                for ((job, _), r) in pack.into_iter().zip(results) {
                    let out = r.and_then(|predictions| self.labelled(&job.adapter, predictions, job.kind.calibration()));
                    let _ = job.reply.send(out);
                }
            }
            Err(e) => {
                for (job, _) in pack {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// The answer of a classification: the adapter's labels and the predictions, calibrated as
    /// the request asks (`pvera predict`'s rules: the file when present unless turned off; a
    /// coverage, score or threshold needs the file).
    fn labelled(&self, adapter: &str, mut predictions: Vec<Prediction>, req: &CalibrationRequest) -> Result<InferOut, ApiError> {
        let labels = self.p.adapter(adapter).map_err(ApiError::from_pvera)?.labels().to_vec();
        let calibration = match (req.off, self.calibrations.get(adapter)) {
            (true, _) => None,
            (false, None) if !req.is_default() => {
                return Err(ApiError::invalid(format!(
                    "fields `coverage`, `score` and `abstain_below` need a calibration.json beside adapter {adapter:?}, \
                     which it has none of: run `pvera calibrate` for it and load it again, or leave those fields out"
                )))
            }
            (false, None) => None,
            (false, Some(c)) if req.is_default() => Some(c.clone()),
            (false, Some(c)) => Some(
                Calibrator::new(c.file().clone(), c.path().to_path_buf(), &req.choice)
                    .map_err(|e| ApiError::invalid(e.to_string()))?,
            ),
        };
        if let Some(c) = &calibration {
            let sampled = predictions.first().is_some_and(|p| p.mc.is_some());
            c.mode(sampled).map_err(|e| ApiError::invalid(e.to_string()))?;
            c.apply(&mut predictions).map_err(ApiError::from_pvera)?;
        }
        Ok(InferOut::Classify { labels, predictions, calibration })
    }

    /// Tokenises texts (checking their length against the adapter's) or preprocesses images.
    fn encode(&self, job: &InferJob) -> Result<Rows, ApiError> {
        if !self.p.adapters().contains_key(&job.adapter) {
            return Err(ApiError::not_found(format!(
                "no adapter {:?} is loaded (it may have been unloaded); GET /adapters lists them",
                job.adapter
            )));
        }
        match &job.inputs {
            JobInputs::Texts(texts) => {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let seqs = self.p.tokenize_texts(&job.adapter, &refs, job.truncate).map_err(|e| match e {
                    pvera::Error::Request(m) => ApiError::tokenizer(m),
                    other => ApiError::from_pvera(other),
                })?;
                let max = self.p.max_length(&job.adapter).map_err(ApiError::from_pvera)?;
                if let Some((k, s)) = seqs.iter().enumerate().find(|(_, s)| s.0.len() > max) {
                    return Err(ApiError::too_large(format!(
                        "input {k} has {} tokens, more than the {max} adapter {:?} reads; shorten it or send \"truncate\": true",
                        s.0.len(),
                        job.adapter
                    )));
                }
                Ok(Rows::Tokens(seqs))
            }
            JobInputs::Images(images) => {
                let refs: Vec<&RawImage> = images.iter().collect();
                let x = self.p.encode_images(&refs).map_err(ApiError::from_pvera)?;
                let px = x.pixel_values.ok_or_else(|| ApiError::backend("image preprocessing returned no pixels"))?;
                Ok(Rows::Pixels(px))
            }
        }
    }

    /// A Monte Carlo classification or an embedding request, on its own.
    fn run_alone(&mut self, job: &InferJob, rows: &Rows) -> Result<InferOut, ApiError> {
        let adapter = job.adapter.as_str();
        // the mean-mode pass of `pvera predict` runs on merged weights: the same bits here
        self.merge.exact(&self.p, adapter).map_err(ApiError::from_pvera)?;
        match job.kind {
            InferKind::Classify { samples, seed, confidence, sequential, ref calibration } => {
                let cfg = PredictConfig {
                    samples,
                    confidence,
                    seed: Some(seed),
                    max_rows: self.limits.max_batch_rows,
                    mode: if sequential { McMode::Sequential } else { McMode::Batched },
                    // as `pvera predict`: per-input noise, PEFT's generator streams when sequential
                    noise: if sequential { Noise::Generators } else { Noise::PerInput },
                    ..PredictConfig::default()
                };
                let n = rows.len();
                let predictions = self
                    .p
                    .predict_all(
                        adapter,
                        n,
                        MC_BATCH,
                        &cfg,
                        &mut |p, idx| gather(p, adapter, &[rows], &idx.iter().map(|&i| (0, i)).collect::<Vec<_>>()),
                        &mut |_, _| {},
                    )
                    .map_err(ApiError::from_pvera)?;
                for b in (0..n).step_by(MC_BATCH).map(|s| (n - s).min(MC_BATCH)) {
                    mc_forward_rows(b, samples, cfg.max_rows, sequential).for_each(|rows| self.metrics.forward(rows));
                }
                self.metrics.mc_samples.fetch_add((samples * n) as u64, Ordering::Relaxed);
                self.labelled(adapter, predictions, calibration)
            }
            InferKind::Embed { samples, seed, normalize } => {
                let all: Vec<(usize, usize)> = (0..rows.len()).map(|i| (0, i)).collect();
                let x = gather(&self.p, adapter, &[rows], &all).map_err(ApiError::from_pvera)?;
                let e = self.p.embed(adapter, &x, samples, Some(seed), normalize).map_err(ApiError::from_pvera)?;
                self.metrics.forward(rows.len());
                if samples > 1 {
                    self.metrics.mc_samples.fetch_add((samples * rows.len()) as u64, Ordering::Relaxed);
                }
                Ok(InferOut::Embed(e))
            }
        }
    }
}

enum LoadError {
    Pvera(pvera::Error),
    Api(ApiError),
}

impl LoadError {
    fn into_api(self) -> ApiError {
        match self {
            LoadError::Pvera(e) => ApiError::from_pvera(e),
            LoadError::Api(e) => e,
        }
    }
}

/// Runs `f`, turning a panic into a 500 (the worker and the server go on).
fn guarded<T>(f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!("model worker: a request panicked: {msg}");
            Err(ApiError::backend(format!("internal error while answering this request ({msg}); the server goes on")))
        }
    }
}
