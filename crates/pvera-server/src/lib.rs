//! `pvera serve`: an HTTP server over the library predictor ([`pvera::Predictor`]): many PVeRA
//! adapters on one frozen model, uncertainty in every answer.
//!
//! - Routes ([`routes`]): `POST /classify` (the records of `pvera predict --json`), `POST /predict`
//!   and `POST /embed` (text-embeddings-inference's shapes, plus `adapter`), `GET /health`,
//!   `GET /info`, `GET /metrics` (Prometheus), `GET /openapi.json`, `GET /docs`, `GET /adapters`,
//!   `POST /adapters` (hot-load from under `--adapter-dir`), `DELETE /adapters/{name}`, and
//!   `GET /`, a playground page served from the binary.
//! - The model ([`worker`]): one OS thread owns the predictor; requests reach it through a bounded
//!   queue; concurrent mean-mode requests are packed into shared forwards ([`batch`]); Monte Carlo
//!   requests run as `pvera predict` runs them, so a seeded answer equals the CLI's.
//! - Limits ([`Limits`]): row budget per forward, concurrent requests (429 beyond), payload size
//!   (413), input length (413 unless `truncate`), inputs per request (413), samples per request.
//! - SIGTERM / SIGINT ([`shutdown_signal`]): stop accepting, finish what is in flight, return.

pub mod api;
pub mod batch;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::{ApiError, ServerError};

/// How long in-flight requests may take to finish after a shutdown signal before the server
/// returns anyway (a client that never finishes its request must not hold the process).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The limits a server enforces.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Row budget of one forward: packed mean-mode rows, and Monte Carlo samples stacked per
    /// forward (`pvera predict --max-rows`; keep them equal for CLI-equal seeded answers).
    pub max_batch_rows: usize,
    /// Requests answered at once (model routes and adapter changes); beyond it 429 with
    /// `Retry-After`.
    pub max_concurrent_requests: usize,
    /// Largest request body in bytes (413 beyond).
    pub payload_limit: usize,
    /// Longest text in tokens (default: each adapter's trained length); longer ones are 413
    /// unless the request asks to truncate.
    pub max_input_length: Option<usize>,
    /// Most inputs in one request (413 beyond).
    pub max_client_batch_size: usize,
    /// Most Monte Carlo samples one request may ask for (422 beyond).
    pub max_samples: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_rows: pvera::uncertainty::mc::DEFAULT_MAX_ROWS,
            max_concurrent_requests: 64,
            payload_limit: 2_000_000,
            max_input_length: None,
            max_client_batch_size: 32,
            max_samples: 64,
        }
    }
}

impl Limits {
    /// Checks that every limit can work (a zero would refuse everything or loop).
    pub fn validate(&self) -> Result<(), ServerError> {
        let checks: [(&str, usize); 5] = [
            ("--max-batch-rows", self.max_batch_rows),
            ("--max-concurrent-requests", self.max_concurrent_requests),
            ("--max-client-batch-size", self.max_client_batch_size),
            ("--max-samples", self.max_samples),
            ("--max-input-length", self.max_input_length.unwrap_or(1)),
        ];
        for (flag, v) in checks {
            if v == 0 {
                return Err(ServerError::Config(format!("{flag} 0: it must be at least 1")));
            }
        }
        if self.payload_limit < 1024 {
            return Err(ServerError::Config(format!(
                "--payload-limit {}: at least 1024 bytes (a request with one short text needs ~100)",
                self.payload_limit
            )));
        }
        Ok(())
    }
}

/// What to serve and how.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Model directory (or hub id in the local hub cache).
    pub model: PathBuf,
    /// `tokenizer.json` (default: the model directory's).
    pub tokenizer: Option<PathBuf>,
    /// Adapters loaded at start, `(name, folder)`; the first is the default adapter.
    pub adapters: Vec<(String, PathBuf)>,
    /// Root under which `POST /adapters` may load (none: hot-loading is off).
    pub adapter_dir: Option<PathBuf>,
    /// Address to listen on.
    pub host: String,
    /// Port (0: any free port; [`Server::local_addr`] tells which).
    pub port: u16,
    /// Bearer token required on every route but `/health`.
    pub api_key: Option<String>,
    /// Limits.
    pub limits: Limits,
}

/// Checks an adapter name: 1-64 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn check_adapter_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "adapter name {name:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-' (not starting with '.')"
        ))
    }
}

/// A server with its model loaded and its port bound, not yet answering.
pub struct Server {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    shared: Arc<routes::Shared>,
    worker: std::thread::JoinHandle<()>,
}

impl Server {
    /// Binds the address (first, so a taken port fails before the model loads), loads the model
    /// and the start-up adapters in the worker thread, and builds the routes.
    pub async fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        cfg.limits.validate()?;
        let mut seen = std::collections::BTreeSet::new();
        for (name, _) in &cfg.adapters {
            check_adapter_name(name).map_err(ServerError::Config)?;
            if !seen.insert(name.clone()) {
                return Err(ServerError::Config(format!("--adapter {name}=...: the name {name:?} is given twice")));
            }
        }
        if cfg.adapters.is_empty() && cfg.adapter_dir.is_none() {
            return Err(ServerError::Config(
                "no adapter: pass --adapter NAME=DIR (or --adapter-dir ROOT to hot-load them with POST /adapters)".into(),
            ));
        }
        if cfg.api_key.as_deref().is_some_and(str::is_empty) {
            return Err(ServerError::Config("--api-key is empty; give a secret or leave the flag out".into()));
        }
        let adapter_root = match &cfg.adapter_dir {
            Some(d) => Some(d.canonicalize().map_err(|e| {
                ServerError::Pvera(pvera::Error::io(d, std::io::Error::new(e.kind(), format!("--adapter-dir: {e}"))))
            })?),
            None => None,
        };
        if adapter_root.as_ref().is_some_and(|r| !r.is_dir()) {
            return Err(ServerError::Config("--adapter-dir must be a folder".into()));
        }
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|source| ServerError::Bind { addr: addr.clone(), source })?;
        let local = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
        let metrics = Arc::new(metrics::Metrics::default());
        let setup = worker::WorkerSetup {
            model: cfg.model.clone(),
            tokenizer: cfg.tokenizer.clone(),
            adapters: cfg.adapters.clone(),
            limits: cfg.limits.clone(),
        };
        let handle = worker::spawn(setup, metrics.clone()).await?;
        let shared = Arc::new(routes::Shared {
            jobs: handle.jobs,
            catalog: handle.catalog,
            model: handle.model,
            alive: handle.alive,
            metrics,
            permits: Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_concurrent_requests)),
            limits: cfg.limits,
            api_key: cfg.api_key,
            adapter_root,
        });
        Ok(Server { listener, addr: local, shared, worker: handle.thread })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers requests until `shutdown` completes; then stops accepting, lets in-flight requests
    /// finish (at most [`SHUTDOWN_GRACE`]), stops the worker and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServerError> {
        let Server { listener, shared, worker, .. } = self;
        let app = routes::router(shared);
        let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections; finishing the requests in flight");
            let _ = fired_tx.send(());
        };
        let serve = axum::serve(listener, app).with_graceful_shutdown(signal);
        let deadline = async move {
            if fired_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = serve => r.map_err(ServerError::Serve)?,
            _ = deadline => tracing::warn!("requests still open {}s after the shutdown signal; stopping anyway", SHUTDOWN_GRACE.as_secs()),
        }
        // The routes (and with them the queue's senders) are gone: the worker drains and ends.
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(|e| ServerError::Worker(e.to_string()))?
            .map_err(|_| ServerError::Worker("the model thread panicked".into()))?;
        Ok(())
    }
}

/// A future that completes on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this
/// is called (not when first polled), so a signal that arrives right after start-up is not lost
/// to the default action. Call it inside a tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term) => {},
                _ = wait(int) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs a server on its own tokio runtime until SIGINT / SIGTERM (what `pvera serve` calls).
/// `on_ready` gets the bound address once the model is loaded.
pub fn run(cfg: ServerConfig, on_ready: impl FnOnce(SocketAddr)) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("pvera-http")
        .build()
        .map_err(|e| ServerError::Worker(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let stop = shutdown_signal();
        let server = Server::bind(cfg).await?;
        on_ready(server.local_addr());
        server.serve(stop).await
    })
}
