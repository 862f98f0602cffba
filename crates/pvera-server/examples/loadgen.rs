//! A small, bounded HTTP load client for `pvera serve` (and the Python comparison server, which
//! takes the same `/predict` body): C client threads with keep-alive connections send requests
//! until R requests or T seconds, then print one JSON line with throughput, latency percentiles
//! and answers by status. With `--expect DIR` every 200 answer of `/classify` is compared with
//! the offline prediction (`DIR/<adapter>.json` = `pvera predict --json` over the same texts):
//! Monte Carlo records must be equal, mean-mode probabilities within 1e-6.
//!
//! ```sh
//! cargo run --release -p pvera-server --example loadgen -- --url http://127.0.0.1:8080 --route /predict \
//!     --texts mails.jsonl --limit 200 --concurrency 8 --requests 2000 --max-seconds 60 [--adapters a,b,c] \
//!     [--group 1] [--samples 16 --seed 0] [--expect DIR] [--api-key KEY] [--truncate]
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Clone, Debug)]
struct Args {
    url: String,
    route: String,
    texts: Vec<String>,
    group: usize,
    adapters: Vec<String>,
    samples: Option<usize>,
    seed: u64,
    concurrency: usize,
    requests: usize,
    max_seconds: f64,
    expect: Option<std::path::PathBuf>,
    api_key: Option<String>,
    tei_batch: bool,
    truncate: bool,
}

fn usage(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    eprintln!(
        "usage: loadgen --url URL --route /predict|/classify --texts FILE [--limit N] [--group K] [--adapters a,b] \
         [--samples S] [--seed X] [--concurrency C] [--requests R] [--max-seconds T] [--expect DIR] [--api-key KEY] [--tei-batch] [--truncate]"
    );
    std::process::exit(2)
}

fn read_texts(path: &str, limit: usize) -> Vec<String> {
    let raw = std::fs::read_to_string(path).unwrap_or_else(|e| usage(&format!("--texts {path}: {e}")));
    raw.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) if v.get("text").is_some() => v["text"].as_str().unwrap_or_default().to_string(),
            _ => l.to_string(),
        })
        .filter(|t| !t.trim().is_empty())
        .take(limit)
        .collect()
}

fn parse() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:8080".into(),
        route: "/predict".into(),
        texts: Vec::new(),
        group: 1,
        adapters: Vec::new(),
        samples: None,
        seed: 0,
        concurrency: 4,
        requests: 1000,
        max_seconds: 60.0,
        expect: None,
        api_key: None,
        tei_batch: false,
        truncate: false,
    };
    let (mut texts, mut limit) = (None, usize::MAX);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--tei-batch" || flag == "--truncate" {
            a.tei_batch |= flag == "--tei-batch";
            a.truncate |= flag == "--truncate";
            continue;
        }
        let v = it.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let num = |v: &str| v.parse::<usize>().unwrap_or_else(|_| usage(&format!("{flag} {v}: not a number")));
        match flag.as_str() {
            "--url" => a.url = v.trim_end_matches('/').to_string(),
            "--route" => a.route = v,
            "--texts" => texts = Some(v),
            "--limit" => limit = num(&v),
            "--group" => a.group = num(&v).max(1),
            "--adapters" => a.adapters = v.split(',').filter(|s| !s.is_empty()).map(String::from).collect(),
            "--samples" => a.samples = Some(num(&v)),
            "--seed" => a.seed = num(&v) as u64,
            "--concurrency" => a.concurrency = num(&v).max(1),
            "--requests" => a.requests = num(&v),
            "--max-seconds" => a.max_seconds = v.parse().unwrap_or_else(|_| usage("--max-seconds: not a number")),
            "--expect" => a.expect = Some(v.into()),
            "--api-key" => a.api_key = Some(v),
            other => usage(&format!("unknown flag {other}")),
        }
    }
    a.texts = read_texts(&texts.unwrap_or_else(|| usage("--texts is required")), limit);
    if a.texts.is_empty() {
        usage("no texts");
    }
    a
}

/// xorshift64*: which adapter and which group each request takes, reproducible.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    statuses: BTreeMap<String, usize>,
    mismatches: usize,
    checked: usize,
    max_mean_diff: f64,
    max_mc_diff: f64,
    first_error: Option<String>,
}

/// Largest absolute difference between the numbers of two JSON values of the same shape (infinite
/// when the shapes, keys or non-numeric values differ).
fn max_diff(a: &Value, b: &Value) -> f64 {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => (x.as_f64().unwrap_or(f64::NAN) - y.as_f64().unwrap_or(f64::NAN)).abs(),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).map(|(p, q)| max_diff(p, q)).fold(0.0, f64::max)
        }
        (Value::Object(x), Value::Object(y)) if x.len() == y.len() => {
            x.iter().map(|(k, p)| y.get(k).map_or(f64::INFINITY, |q| max_diff(p, q))).fold(0.0, f64::max)
        }
        _ if a == b => 0.0,
        _ => f64::INFINITY,
    }
}

fn main() {
    let args = Arc::new(parse());
    let expected: BTreeMap<String, Vec<Value>> = match &args.expect {
        Some(dir) => {
            let names = if args.adapters.is_empty() { vec!["default".to_string()] } else { args.adapters.clone() };
            names
                .iter()
                .map(|n| {
                    let p = dir.join(format!("{n}.json"));
                    let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| usage(&format!("{}: {e}", p.display()))))
                        .unwrap_or_else(|e| usage(&format!("{}: {e}", p.display())));
                    (n.clone(), v["predictions"].as_array().cloned().unwrap_or_default())
                })
                .collect()
        }
        None => BTreeMap::new(),
    };
    let expected = Arc::new(expected);
    let groups = args.texts.len().div_ceil(args.group);
    let sent = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(args.max_seconds);
    let threads: Vec<_> = (0..args.concurrency)
        .map(|c| {
            let (args, sent, tally, expected) = (args.clone(), sent.clone(), tally.clone(), expected.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(120)))
                    .build()
                    .into();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((c as u64 + 1) * 0x1234_5678_9abc_def1);
                let mut local = Tally::default();
                let mut refused_in_a_row = 0;
                loop {
                    let k = sent.fetch_add(1, Ordering::SeqCst);
                    if k >= args.requests || Instant::now() >= deadline {
                        break;
                    }
                    let g = (next(&mut rng) % groups as u64) as usize;
                    let texts: Vec<&str> = args.texts[g * args.group..((g + 1) * args.group).min(args.texts.len())].iter().map(String::as_str).collect();
                    let adapter = (!args.adapters.is_empty()).then(|| args.adapters[(next(&mut rng) % args.adapters.len() as u64) as usize].clone());
                    let mut body = if args.route == "/predict" {
                        if args.tei_batch {
                            json!({"inputs": texts.iter().map(|t| vec![*t]).collect::<Vec<_>>()})
                        } else {
                            json!({"inputs": texts[0]})
                        }
                    } else {
                        json!({"inputs": texts})
                    };
                    if let Some(a) = &adapter {
                        body["adapter"] = json!(a);
                    }
                    if args.truncate {
                        body["truncate"] = json!(true);
                    }
                    if let Some(s) = args.samples {
                        body["samples"] = json!(s);
                        body["seed"] = json!(args.seed);
                    }
                    let mut req = agent.post(format!("{}{}", args.url, args.route)).header("Content-Type", "application/json");
                    if let Some(key) = &args.api_key {
                        req = req.header("Authorization", format!("Bearer {key}"));
                    }
                    let t = Instant::now();
                    let r = req.send(body.to_string());
                    let (status, text) = match r {
                        Ok(mut resp) => {
                            let st = resp.status().as_u16().to_string();
                            match resp.body_mut().with_config().limit(64 << 20).read_to_string() {
                                Ok(text) => (st, text),
                                Err(e) => (format!("truncated ({e})"), String::new()),
                            }
                        }
                        Err(e) => (format!("no answer ({e})"), String::new()),
                    };
                    local.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    if status != "200" && local.first_error.is_none() {
                        local.first_error = Some(format!("{status}: {}", text.chars().take(300).collect::<String>()));
                    }
                    if status == "200" && !expected.is_empty() && args.route == "/classify" {
                        let name = adapter.clone().unwrap_or_else(|| "default".into());
                        let got: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        let want = &expected[&name][g * args.group..((g + 1) * args.group).min(args.texts.len())];
                        let preds = got["predictions"].as_array().cloned().unwrap_or_default();
                        let ok = preds.len() == want.len()
                            && preds.iter().zip(want).all(|(p, q)| {
                                if args.samples.unwrap_or(1) > 1 {
                                    // Monte Carlo packed with other requests: the same noise, float
                                    // rounding apart (<= 1e-6); alone, the same bits
                                    let d = max_diff(p, q);
                                    local.max_mc_diff = local.max_mc_diff.max(d);
                                    d <= 1e-6
                                } else {
                                    let d = max_diff(&p["mean_mode"]["probs"], &q["mean_mode"]["probs"]);
                                    local.max_mean_diff = local.max_mean_diff.max(d);
                                    d <= 1e-6
                                }
                            });
                        local.checked += 1;
                        if !ok {
                            local.mismatches += 1;
                        }
                    }
                    // a server that is gone: stop this client after 50 refusals in a row
                    refused_in_a_row = if status.starts_with("no answer") { refused_in_a_row + 1 } else { 0 };
                    *local.statuses.entry(status).or_default() += 1;
                    if refused_in_a_row >= 50 {
                        break;
                    }
                }
                let mut t = tally.lock().unwrap();
                t.latencies_ms.extend(local.latencies_ms);
                for (k, v) in local.statuses {
                    *t.statuses.entry(k).or_default() += v;
                }
                t.mismatches += local.mismatches;
                t.checked += local.checked;
                t.max_mean_diff = t.max_mean_diff.max(local.max_mean_diff);
                t.max_mc_diff = t.max_mc_diff.max(local.max_mc_diff);
                if t.first_error.is_none() {
                    t.first_error = local.first_error;
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut t = tally.lock().unwrap();
    t.latencies_ms.sort_by(f64::total_cmp);
    let n = t.latencies_ms.len();
    let pct = |q: f64| if n == 0 { f64::NAN } else { t.latencies_ms[((q * n as f64).ceil() as usize).clamp(1, n) - 1] };
    let ok = t.statuses.get("200").copied().unwrap_or(0);
    println!(
        "{}",
        json!({
            "route": args.route, "concurrency": args.concurrency, "inputs_per_request": args.group,
            "adapters": args.adapters.len(), "samples": args.samples,
            "sent": n, "ok": ok, "statuses": t.statuses, "seconds": secs,
            "requests_per_s": ok as f64 / secs, "inputs_per_s": (ok * args.group) as f64 / secs,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "checked": t.checked, "mismatches": t.mismatches, "max_mean_mode_diff": t.max_mean_diff, "max_monte_carlo_diff": t.max_mc_diff,
            "first_error": t.first_error,
        })
    );
}
