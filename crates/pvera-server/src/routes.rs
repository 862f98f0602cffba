//! The HTTP routes and their middleware (API key, metrics, panics), on axum.
//!
//! Every answer that is not a success is `{"error", "error_type"}` JSON ([`ApiError`]). The model
//! routes take a concurrency permit first (429 with `Retry-After` when none is left), then hand
//! the work to the model worker and await its answer; nothing here runs the model.

use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tower_http::catch_panic::CatchPanicLayer;

use crate::api::{self, ClassifyRequest, EmbedRequest, JsonBody, LoadRequest, PredictRequest};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::worker::{CalibrationRequest, Catalog, InferKind, InferOut, Job, JobInputs, ModelSummary};
use pvera::predictor::CalibrationChoice;
use crate::{check_adapter_name, Limits};

/// What every handler shares.
pub struct Shared {
    /// The model worker's queue.
    pub jobs: mpsc::Sender<Job>,
    /// Loaded adapters (written by the worker).
    pub catalog: Arc<RwLock<Catalog>>,
    /// The model.
    pub model: ModelSummary,
    /// False once the worker has ended.
    pub alive: Arc<AtomicBool>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Concurrency permits of the model routes.
    pub permits: Arc<Semaphore>,
    /// Limits.
    pub limits: Limits,
    /// Bearer token.
    pub api_key: Option<String>,
    /// `--adapter-dir`, canonical.
    pub adapter_root: Option<PathBuf>,
}

type AppState = Arc<Shared>;

/// The adapter a response was about, for the metrics' `adapter` label.
#[derive(Clone, Debug)]
struct AdapterLabel(String);

/// A concurrency permit; counts the request as in flight while held.
struct Permit {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    fn permit(&self) -> Result<Permit, ApiError> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => {
                self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
                Ok(Permit { _permit: p, metrics: self.metrics.clone() })
            }
            Err(_) => {
                self.metrics.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(ApiError::overloaded(format!(
                    "the server is answering {} requests already (--max-concurrent-requests); retry after a second",
                    self.limits.max_concurrent_requests
                )))
            }
        }
    }

    fn catalog(&self) -> Catalog {
        self.catalog.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// The adapter a request names (or the default one), if loaded.
    fn resolve_adapter(&self, name: Option<&str>, label: &mut Option<String>) -> Result<String, ApiError> {
        let cat = self.catalog.read().map_err(|_| ApiError::backend("adapter catalog unavailable"))?;
        let name = match name {
            Some(n) => n.to_string(),
            None => cat.default.clone().ok_or_else(|| {
                ApiError::not_found("no adapter is loaded; load one with POST /adapters {\"name\", \"path\"}")
            })?,
        };
        if !cat.adapters.contains_key(&name) {
            let known: Vec<&String> = cat.order.iter().take(20).collect();
            return Err(ApiError::not_found(format!(
                "no adapter {name:?} is loaded; loaded: {known:?}{} (GET /adapters lists them)",
                if cat.order.len() > 20 { " ..." } else { "" }
            )));
        }
        *label = Some(name.clone());
        Ok(name)
    }

    fn check_count(&self, n: usize) -> Result<(), ApiError> {
        if n > self.limits.max_client_batch_size {
            return Err(ApiError::too_large(format!(
                "{n} inputs in one request; at most {} (--max-client-batch-size): split the request",
                self.limits.max_client_batch_size
            )));
        }
        Ok(())
    }

    fn check_samples(&self, samples: Option<usize>) -> Result<usize, ApiError> {
        match samples.unwrap_or(1) {
            0 => Err(ApiError::invalid("field `samples`: 0; use 1 (or leave it out) for the mean mode, or at least 2 (16 is usual)")),
            s if s > self.limits.max_samples => Err(ApiError::invalid(format!(
                "field `samples`: {s} is more than this server allows per request ({}, --max-samples)",
                self.limits.max_samples
            ))),
            s => Ok(s),
        }
    }

    /// Texts as they are; for an image model, every input decoded from base64 (off the async
    /// threads).
    async fn job_inputs(&self, inputs: Vec<String>) -> Result<JobInputs, ApiError> {
        if self.model.modality != "image" {
            return Ok(JobInputs::Texts(inputs));
        }
        tokio::task::spawn_blocking(move || {
            inputs.iter().enumerate().map(|(i, s)| api::decode_image(i, s)).collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ApiError::backend(format!("image decoding failed: {e}")))?
        .map(JobInputs::Images)
    }

    async fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Job) -> Result<T, ApiError> {
        if !self.alive.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the model worker has stopped; restart the server"));
        }
        let (tx, rx) = oneshot::channel();
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        if self.jobs.send(make(tx)).await.is_err() {
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::unavailable("the model worker has stopped; restart the server"));
        }
        rx.await.map_err(|_| ApiError::backend("the model worker dropped this request (see the server log); the server goes on"))?
    }

    async fn infer(&self, adapter: String, inputs: JobInputs, kind: InferKind, truncate: bool) -> Result<InferOut, ApiError> {
        self.submit(|reply| Job::Infer(crate::worker::InferJob { adapter, inputs, kind, truncate, reply })).await
    }
}

/// The routes, with the API key check, metrics, body limit and panic guard.
pub fn router(shared: AppState) -> Router {
    let limit = shared.limits.payload_limit;
    Router::new()
        .route("/", get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/style.css", get(|| async { page(STYLE_CSS, "text/css; charset=utf-8") }))
        .route("/docs", get(|| async { page(DOCS_HTML, "text/html; charset=utf-8") }))
        .route("/openapi.json", get(|| async { page(OPENAPI_JSON, "application/json") }))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/classify", post(classify))
        .route("/predict", post(predict))
        .route("/embed", post(embed))
        .route("/adapters", get(list_adapters).post(load_adapter))
        .route("/adapters/{name}", delete(unload_adapter))
        .fallback(|req: Request| async move {
            ApiError::not_found(format!("no route {} {}; GET /docs lists the routes", req.method(), req.uri().path()))
        })
        .method_not_allowed_fallback(|req: Request| async move {
            let mut r = ApiError::invalid(format!("{} is not allowed on {}; GET /docs lists the routes", req.method(), req.uri().path()))
                .into_response();
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r
        })
        .layer(middleware::from_fn_with_state(shared.clone(), auth))
        .layer(middleware::from_fn_with_state(shared.clone(), record))
        .layer(DefaultBodyLimit::max(limit))
        .layer(CatchPanicLayer::custom(|_panic: Box<dyn std::any::Any + Send>| {
            ApiError::backend("internal error while answering this request (a bug; see the server log); the server goes on")
                .into_response()
        }))
        .with_state(shared)
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const DOCS_HTML: &str = include_str!("assets/docs.html");
/// The OpenAPI 3 document of these routes.
pub const OPENAPI_JSON: &str = include_str!("assets/openapi.json");

fn page(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Byte-wise comparison whose time does not depend on where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        if req.uri().path() != "/health" {
            let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
            match given {
                Some(g) if same_secret(g.trim().as_bytes(), key.as_bytes()) => {}
                Some(_) => return ApiError::unauthorized("wrong API key in the Authorization header").into_response(),
                None => {
                    return ApiError::unauthorized("this server needs an API key: send the header `Authorization: Bearer <key>`")
                        .into_response()
                }
            }
        }
    }
    next.run(req).await
}

async fn record(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let r = next.run(req).await;
    let adapter = r.extensions().get::<AdapterLabel>().map(|a| a.0.clone()).unwrap_or_else(|| "-".into());
    s.metrics.request(&route, &adapter, r.status().as_u16(), t0.elapsed().as_secs_f64());
    r
}

/// The answer, labelled with the adapter it was about.
fn labelled(adapter: Option<String>, r: Result<Response, ApiError>) -> Response {
    let mut r = r.unwrap_or_else(IntoResponse::into_response);
    if let Some(a) = adapter {
        r.extensions_mut().insert(AdapterLabel(a));
    }
    r
}

async fn health(State(s): State<AppState>) -> Response {
    if s.alive.load(Ordering::SeqCst) {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::unavailable("the model worker has stopped; restart the server").into_response()
    }
}

async fn info(State(s): State<AppState>) -> Response {
    let cat = s.catalog();
    let adapters: Vec<&crate::worker::AdapterEntry> = cat.order.iter().filter_map(|n| cat.adapters.get(n)).collect();
    let groups = adapters.iter().map(|a| a.projection_group).collect::<std::collections::BTreeSet<_>>().len();
    let l = &s.limits;
    Json(json!({
        "model": s.model,
        "default_adapter": cat.default,
        "adapters": adapters,
        "projection_groups": groups,
        "hot_load": s.adapter_root.is_some(),
        "auth": s.api_key.is_some(),
        "limits": {
            "max_batch_rows": l.max_batch_rows,
            "max_concurrent_requests": l.max_concurrent_requests,
            "payload_limit": l.payload_limit,
            "max_input_length": l.max_input_length,
            "max_client_batch_size": l.max_client_batch_size,
            "max_samples": l.max_samples,
            "max_image_pixels": api::MAX_IMAGE_PIXELS,
            "mc_batch_inputs": crate::worker::MC_BATCH,
        },
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

async fn list_adapters(State(s): State<AppState>) -> Response {
    let cat = s.catalog();
    let adapters: Vec<&crate::worker::AdapterEntry> = cat.order.iter().filter_map(|n| cat.adapters.get(n)).collect();
    Json(json!({"default": cat.default, "adapters": adapters})).into_response()
}

async fn classify(State(s): State<AppState>, body: Result<JsonBody<ClassifyRequest>, ApiError>) -> Response {
    let mut label = None;
    let r = classify_inner(&s, body, &mut label).await;
    labelled(label, r)
}

async fn classify_inner(
    s: &Shared,
    body: Result<JsonBody<ClassifyRequest>, ApiError>,
    label: &mut Option<String>,
) -> Result<Response, ApiError> {
    let JsonBody(req) = body?;
    let _permit = s.permit()?;
    let adapter = s.resolve_adapter(req.adapter.as_deref(), label)?;
    let samples = s.check_samples(req.samples)?;
    let confidence = req.confidence.unwrap_or(0.95);
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(ApiError::invalid(format!(
            "field `confidence`: {confidence}; expected a level strictly between 0 and 1, e.g. 0.95"
        )));
    }
    let seed = req.seed.unwrap_or(0);
    let (inputs, _) = api::string_or_list(&req.inputs)?;
    s.check_count(inputs.len())?;
    let names: Option<Vec<String>> = (s.model.modality == "text").then(|| inputs.clone());
    let job_inputs = s.job_inputs(inputs).await?;
    let score = match &req.score {
        Some(x) => Some(x.parse::<pvera::uncertainty::ConformalScore>().map_err(|_| {
            ApiError::invalid(format!("field `score`: {x:?}; expected \"lac\", \"aps\" or \"raps\""))
        })?),
        None => None,
    };
    let calibration = CalibrationRequest {
        off: req.calibration == Some(false),
        choice: CalibrationChoice { coverage: req.coverage, score, abstain_below: req.abstain_below },
    };
    if calibration.off && !calibration.is_default_choice() {
        return Err(ApiError::invalid(
            "fields `coverage`, `score` and `abstain_below` apply a calibration that `\"calibration\": false` turns off; drop one or the other",
        ));
    }
    let kind = InferKind::Classify { samples, seed, confidence, sequential: req.sequential, calibration };
    let out = s.infer(adapter.clone(), job_inputs, kind, req.truncate).await?;
    let InferOut::Classify { labels, predictions, calibration } = out else {
        return Err(ApiError::backend("the worker answered with embeddings"));
    };
    let records: Vec<Value> = predictions
        .iter()
        .enumerate()
        .map(|(i, p)| p.to_json(&labels, names.as_ref().and_then(|n| n.get(i)).map(String::as_str)))
        .collect();
    Ok(Json(json!({
        "adapter": adapter,
        "labels": labels,
        "samples": samples,
        "seed": (samples > 1).then_some(seed),
        "confidence": confidence,
        "calibration": calibration.as_ref().map(|c| json!({
            "temperature": c.mode(samples > 1).ok().map(|m| m.temperature.temperature),
            "score": c.score().name(),
            "coverage": 1.0 - c.alpha(),
            "n": c.file().n,
        })),
        "predictions": records,
    }))
    .into_response())
}

async fn predict(State(s): State<AppState>, body: Result<JsonBody<PredictRequest>, ApiError>) -> Response {
    let mut label = None;
    let r = predict_inner(&s, body, &mut label).await;
    labelled(label, r)
}

async fn predict_inner(
    s: &Shared,
    body: Result<JsonBody<PredictRequest>, ApiError>,
    label: &mut Option<String>,
) -> Result<Response, ApiError> {
    let JsonBody(req) = body?;
    let _permit = s.permit()?;
    api::check_direction(&req.truncation_direction)?;
    let adapter = s.resolve_adapter(req.adapter.as_deref(), label)?;
    let (inputs, single) = api::tei_predict_inputs(&req.inputs)?;
    s.check_count(inputs.len())?;
    let job_inputs = s.job_inputs(inputs).await?;
    let kind = InferKind::Classify {
        samples: 1,
        seed: 0,
        confidence: 0.95,
        sequential: false,
        calibration: CalibrationRequest::default(),
    };
    let out = s.infer(adapter, job_inputs, kind, req.truncate.unwrap_or(false)).await?;
    let InferOut::Classify { labels, predictions, .. } = out else {
        return Err(ApiError::backend("the worker answered with embeddings"));
    };
    let mut lists = Vec::with_capacity(predictions.len());
    for p in &predictions {
        // the temperature-scaled probabilities when the adapter has a calibration.json
        let probs = p.calibrated.as_ref().map_or(&p.mean_mode, |c| &c.probs);
        let mut scored: Vec<(f64, &String)> = probs
            .iter()
            .zip(&labels)
            .map(|(&q, l)| (if req.raw_scores { q.ln() } else { q }, l))
            .collect();
        if scored.iter().any(|(q, _)| q.is_nan()) {
            return Err(ApiError::backend("a score is NaN"));
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        lists.push(scored.into_iter().map(|(q, l)| json!({"score": q as f32, "label": l})).collect::<Vec<_>>());
    }
    let body = if single { json!(lists.pop().unwrap_or_default()) } else { json!(lists) };
    Ok(Json(body).into_response())
}

async fn embed(State(s): State<AppState>, body: Result<JsonBody<EmbedRequest>, ApiError>) -> Response {
    let mut label = None;
    let r = embed_inner(&s, body, &mut label).await;
    labelled(label, r)
}

async fn embed_inner(
    s: &Shared,
    body: Result<JsonBody<EmbedRequest>, ApiError>,
    label: &mut Option<String>,
) -> Result<Response, ApiError> {
    let JsonBody(req) = body?;
    let _permit = s.permit()?;
    api::check_direction(&req.truncation_direction)?;
    if req.prompt_name.is_some() {
        return Err(ApiError::invalid("field `prompt_name`: prompts are not supported by pvera; leave it out"));
    }
    if req.dimensions.is_some() {
        return Err(ApiError::invalid(
            "field `dimensions`: pvera returns the full pooled vector; leave it out and cut the vectors yourself",
        ));
    }
    let adapter = s.resolve_adapter(req.adapter.as_deref(), label)?;
    let samples = s.check_samples(req.samples)?;
    let seed = req.seed.unwrap_or(0);
    let (inputs, _) = api::string_or_list(&req.inputs)?;
    s.check_count(inputs.len())?;
    let job_inputs = s.job_inputs(inputs).await?;
    let kind = InferKind::Embed { samples, seed, normalize: req.normalize };
    let out = s.infer(adapter, job_inputs, kind, req.truncate.unwrap_or(false)).await?;
    let InferOut::Embed(e) = out else {
        return Err(ApiError::backend("the worker answered with predictions"));
    };
    Ok(match e.std {
        None => Json(json!(e.mean_mode)).into_response(),
        Some(std) => Json(json!({"embeddings": e.mean_mode, "std": std, "samples": e.samples, "seed": seed})).into_response(),
    })
}

/// The folder `rel` names under `root`: relative, without `..`, and still under `root` once every
/// symlink is resolved.
pub fn resolve_under(root: &FsPath, rel: &str) -> Result<PathBuf, ApiError> {
    if rel.trim().is_empty() {
        return Err(ApiError::invalid("field `path`: empty; give the adapter folder relative to --adapter-dir"));
    }
    if rel.contains('\0') {
        return Err(ApiError::invalid("field `path`: contains a NUL byte"));
    }
    let p = FsPath::new(rel);
    if p.is_absolute() || p.has_root() {
        return Err(ApiError::forbidden(format!(
            "path {rel:?} is absolute; adapters load only from under --adapter-dir: give a path relative to it"
        )));
    }
    if p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(ApiError::forbidden(format!("path {rel:?} contains `..`; adapters load only from under --adapter-dir")));
    }
    let full = root.join(p);
    let canon = full.canonicalize().map_err(|e| {
        ApiError::not_found(format!("no adapter folder {rel:?} under --adapter-dir ({e})"))
    })?;
    if !canon.starts_with(root) {
        return Err(ApiError::forbidden(format!(
            "path {rel:?} leads outside --adapter-dir (through a symlink); adapters load only from under it"
        )));
    }
    if !canon.is_dir() {
        return Err(ApiError::invalid(format!("path {rel:?} is not a folder; give the adapter's folder")));
    }
    Ok(canon)
}

async fn load_adapter(State(s): State<AppState>, body: Result<JsonBody<LoadRequest>, ApiError>) -> Response {
    let mut label = None;
    let r = load_inner(&s, body, &mut label).await;
    labelled(label, r)
}

async fn load_inner(
    s: &Shared,
    body: Result<JsonBody<LoadRequest>, ApiError>,
    label: &mut Option<String>,
) -> Result<Response, ApiError> {
    let JsonBody(req) = body?;
    let _permit = s.permit()?;
    let Some(root) = &s.adapter_root else {
        return Err(ApiError::forbidden("hot-loading is off: start the server with --adapter-dir ROOT to load adapters from under ROOT"));
    };
    check_adapter_name(&req.name).map_err(|m| ApiError::invalid(format!("field `name`: {m}")))?;
    if s.catalog().adapters.contains_key(&req.name) {
        return Err(ApiError::conflict(format!(
            "adapter {:?} is already loaded; DELETE /adapters/{} first or pick another name",
            req.name, req.name
        )));
    }
    let dir = resolve_under(root, &req.path)?;
    let t0 = Instant::now();
    let name = req.name.clone();
    let entry = s.submit(|reply| Job::Load { name, dir, reply }).await?;
    *label = Some(req.name.clone());
    let mut v = serde_json::to_value(&entry).map_err(|e| ApiError::backend(e.to_string()))?;
    v["load_ms"] = json!(t0.elapsed().as_secs_f64() * 1e3);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn unload_adapter(State(s): State<AppState>, name: Result<Path<String>, PathRejection>) -> Response {
    let mut label = None;
    let r = unload_inner(&s, name, &mut label).await;
    labelled(label, r)
}

async fn unload_inner(s: &Shared, name: Result<Path<String>, PathRejection>, label: &mut Option<String>) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|e| ApiError::invalid(format!("adapter name in the path: {e}")))?;
    let _permit = s.permit()?;
    let n = name.clone();
    s.submit(|reply| Job::Unload { name: n, reply }).await?;
    *label = Some(name.clone());
    Ok(Json(json!({"removed": name})).into_response())
}
