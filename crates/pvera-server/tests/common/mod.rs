//! Helpers shared by the server tests: classifier adapters for the tiny BERT fixture made with
//! the library (seeded random λ's and head, so adapters differ and their latent has a visible
//! spread), an in-process server on 127.0.0.1 port 0, and a small HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use pvera::config::TargetModules;
use pvera::models::heads::{Classifier, Pooling};
use pvera::models::loader::ModelDir;
use pvera::predictor::meta::{TaskKind, TaskMeta};
use pvera::{PeftModel, PveraConfig, RunState, TorchGenerator};
use pvera_server::{Limits, Server, ServerConfig, ServerError};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pvera/tests/fixtures")
}
pub fn bert() -> PathBuf {
    fixtures().join("models/bert_tiny/model")
}
pub fn tokenizer() -> PathBuf {
    fixtures().join("data/tokenizer.json")
}

/// Writes a classifier adapter for the tiny BERT into `dir` (r 8 on query/value, mean pooling,
/// `max_length` tokens): λ's and head drawn from `seed`, λ_d large enough that sampling the
/// latent visibly moves the probabilities.
pub fn make_adapter(dir: &Path, seed: u64, labels: &[&str], max_length: usize) {
    make_adapter_of(pvera::config::Method::Pvera, dir, seed, labels, max_length)
}

/// [`make_adapter`] for either method (a VeRA adapter: PEFT's `VeraConfig`, no latent).
pub fn make_adapter_of(method: pvera::config::Method, dir: &Path, seed: u64, labels: &[&str], max_length: usize) {
    let md = ModelDir::open(&bert()).unwrap();
    let state = Arc::new(RunState::new(seed));
    let (model, registry, info) = Classifier::load(&md, labels.len(), Pooling::Mean, None, &Device::Cpu, state, seed).unwrap();
    let cfg = PveraConfig {
        r: 8,
        target_modules: Some(TargetModules::List(vec!["query".into(), "value".into()])),
        modules_to_save: Some(vec!["classifier".into()]),
        ..PveraConfig::for_method(method)
    };
    let pm = PeftModel::new(model, registry, info, cfg, "default").unwrap();
    let mut g = TorchGenerator::new(seed + 1000);
    for nv in pm.trainable_vars().unwrap() {
        let t = nv.var.as_tensor();
        let n = t.elem_count();
        let scale = if nv.name.contains("lambda_d") { 3.0 } else { 1.0 };
        let vals: Vec<f32> = (0..n).map(|_| (g.random() as f64 / u32::MAX as f64 * 2.0 - 1.0) as f32 * scale).collect();
        nv.var.set(&Tensor::from_vec(vals, t.dims(), t.device()).unwrap()).unwrap();
    }
    pm.save_pretrained(dir, None).unwrap();
    TaskMeta {
        task: TaskKind::TextClassification,
        model_type: "bert".into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        pooling: Some("mean".into()),
        max_length: Some(max_length),
    }
    .write(dir)
    .unwrap();
}

pub fn config(adapters: &[(&str, &Path)]) -> ServerConfig {
    ServerConfig {
        model: bert(),
        tokenizer: Some(tokenizer()),
        adapters: adapters.iter().map(|(n, d)| (n.to_string(), d.to_path_buf())).collect(),
        adapter_dir: None,
        host: "127.0.0.1".into(),
        port: 0,
        api_key: None,
        limits: Limits::default(),
    }
}

/// A server running on its own runtime thread; stopped (gracefully) on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub fn start(cfg: ServerConfig) -> TestServer {
        Self::try_start(cfg).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    pub fn try_start(cfg: ServerConfig) -> Result<TestServer, ServerError> {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let server = match Server::bind(cfg).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.to_string()));
                        return Err(e);
                    }
                };
                let _ = addr_tx.send(Ok(server.local_addr()));
                server
                    .serve(async move {
                        let _ = stop_rx.await;
                    })
                    .await
            })
        });
        match addr_rx.recv() {
            Ok(Ok(addr)) => Ok(TestServer { addr, stop: Some(stop_tx), thread: Some(thread) }),
            _ => Err(thread.join().unwrap().expect_err("the server reported an error")),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops accepting and waits for the server to finish what is in flight.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ServerError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// An answer: status, `Retry-After` / `WWW-Authenticate` / content type, body text.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub www_authenticate: Option<String>,
    pub content_type: String,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
    /// Asserts the status and the `{"error", "error_type"}` shape; returns the message.
    pub fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert!(self.content_type.starts_with("application/json"), "{self:?}");
        let j = self.json();
        assert!(j["error_type"].is_string(), "{self:?}");
        j["error"].as_str().unwrap_or_else(|| panic!("no error message: {self:?}")).to_string()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

fn answer(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut r = r.unwrap_or_else(|e| panic!("request failed: {e}"));
    let h = |k: &str| r.headers().get(k).and_then(|v| v.to_str().ok()).map(String::from);
    let (retry_after, www_authenticate, content_type) = (h("retry-after"), h("www-authenticate"), h("content-type").unwrap_or_default());
    let status = r.status().as_u16();
    let text = r.body_mut().with_config().limit(64 << 20).read_to_string().unwrap();
    Answer { status, retry_after, www_authenticate, content_type, text }
}

pub fn get(url: &str) -> Answer {
    answer(agent().get(url).call())
}
pub fn get_auth(url: &str, key: &str) -> Answer {
    answer(agent().get(url).header("Authorization", format!("Bearer {key}")).call())
}
pub fn post(url: &str, body: impl AsRef<[u8]>) -> Answer {
    answer(agent().post(url).header("Content-Type", "application/json").send(body.as_ref()))
}
pub fn post_auth(url: &str, key: &str, body: &str) -> Answer {
    answer(agent().post(url).header("Content-Type", "application/json").header("Authorization", format!("Bearer {key}")).send(body))
}
pub fn post_json(url: &str, body: &Value) -> Answer {
    post(url, body.to_string())
}
pub fn delete(url: &str) -> Answer {
    answer(agent().delete(url).call())
}

/// Largest absolute difference between two equally shaped JSON number trees (panics on a shape or
/// non-number difference).
pub fn max_diff(a: &Value, b: &Value) -> f64 {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => (x.as_f64().unwrap() - y.as_f64().unwrap()).abs(),
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{a} vs {b}");
            x.iter().zip(y).map(|(p, q)| max_diff(p, q)).fold(0.0, f64::max)
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{a} vs {b}");
            x.iter().map(|(k, p)| max_diff(p, &y[k])).fold(0.0, f64::max)
        }
        _ => {
            assert_eq!(a, b);
            0.0
        }
    }
}

/// A library predictor on the tiny BERT with these adapters (name, folder), as the server's worker
/// opens one.
pub fn predictor(adapters: &[(&str, &Path)]) -> pvera::Predictor {
    let opts = pvera::predictor::PredictorOptions { tokenizer: Some(tokenizer()), ..Default::default() };
    let mut p = pvera::Predictor::open(&bert(), &opts).unwrap();
    for (name, dir) in adapters {
        p.add_adapter(name, dir, &pvera::predictor::TaskOverrides::default()).unwrap();
    }
    p
}

/// Largest absolute difference of two probability vectors.
pub fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}
