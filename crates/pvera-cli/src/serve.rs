//! `pvera serve`: parse flags, call the server crate (`pvera_server`).

use std::path::PathBuf;

use anyhow::Result;
use pvera_server::{Limits, ServerConfig, ServerError};

use crate::common::{set_threads, UsageError};
use crate::{note, usage};

/// Arguments of `pvera serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Hugging Face model directory (config.json + safetensors; tokenizer.json for text models), or a hub id
    /// org/name[@revision] in the local hub cache.
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter to serve, NAME=DIR (repeat for several; the first is the default adapter of requests that
    /// name none).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// Folder under which POST /adapters may hot-load adapters (paths relative to it; without it hot-loading
    /// is off).
    #[arg(long)]
    pub adapter_dir: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Threads for the heavy ops (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// tokenizer.json (default: <model>/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Row budget of one forward: concurrent mean-mode requests are packed up to it, Monte Carlo samples
    /// stacked up to it (as `pvera predict --max-rows`; equal values give equal seeded answers).
    #[arg(long, default_value_t = pvera::uncertainty::mc::DEFAULT_MAX_ROWS)]
    pub max_batch_rows: usize,
    /// Requests answered at once; beyond it 429 with Retry-After.
    #[arg(long, default_value_t = Limits::default().max_concurrent_requests)]
    pub max_concurrent_requests: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = Limits::default().payload_limit)]
    pub payload_limit: usize,
    /// Longest text in tokens (default: each adapter's trained length); longer texts are refused (413)
    /// unless the request sets "truncate": true.
    #[arg(long)]
    pub max_input_length: Option<usize>,
    /// Most inputs in one request (413 beyond).
    #[arg(long, default_value_t = Limits::default().max_client_batch_size)]
    pub max_client_batch_size: usize,
    /// Most Monte Carlo samples one request may ask for.
    #[arg(long, default_value_t = Limits::default().max_samples)]
    pub max_samples: usize,
}

/// `pvera serve`.
pub fn run(args: ServeArgs) -> Result<u8> {
    set_threads(args.threads)?;
    let mut adapters = Vec::new();
    for spec in &args.adapters {
        match spec.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => adapters.push((name.to_string(), PathBuf::from(dir))),
            _ => usage!("--adapter {spec:?}: expected NAME=DIR, e.g. --adapter spam=runs/spam/best"),
        }
    }
    let cfg = ServerConfig {
        model: args.model,
        tokenizer: args.tokenizer,
        adapters,
        adapter_dir: args.adapter_dir,
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        limits: Limits {
            max_batch_rows: args.max_batch_rows,
            max_concurrent_requests: args.max_concurrent_requests,
            payload_limit: args.payload_limit,
            max_input_length: args.max_input_length,
            max_client_batch_size: args.max_client_batch_size,
            max_samples: args.max_samples,
        },
    };
    let names: Vec<String> = cfg.adapters.iter().map(|a| a.0.clone()).collect();
    let result = pvera_server::run(cfg, |addr| {
        note!("pvera serve: listening on http://{addr} (adapters: {}); Ctrl-C or SIGTERM stops it", names.join(", "));
    });
    match result {
        Ok(()) => {
            crate::out::eline("pvera serve: stopped");
            Ok(0)
        }
        Err(ServerError::Config(m)) => Err(anyhow::Error::new(UsageError(m))),
        Err(ServerError::Pvera(e)) => Err(anyhow::Error::new(e)),
        Err(other) => Err(anyhow::Error::new(other)),
    }
}
