//! `pvera serve` as a process: its seeded `/classify` answers equal `pvera predict --json`'s for
//! the same model, adapter, inputs and seed (Monte Carlo bit for bit, the mean mode bit for bit
//! for the same batch); SIGTERM stops it with exit 0, under load without a truncated answer; flag
//! errors exit 2.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{pvera, s, show, tiny_bert, train_tiny_bert};
use serde_json::{json, Value};

const TEXTS: [&str; 10] = [
    "free money prize", "notes from lunch", "win a cheap prize now", "see the attached report", "meeting at noon",
    "click here to win", "lunch tomorrow with the team", "free free free", "the report is attached", "prize money",
];

struct Serving {
    child: Child,
    url: String,
    stderr: std::thread::JoinHandle<String>,
}

impl Serving {
    fn start(args: &[&str]) -> Serving {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pvera"))
            .arg("serve")
            .args(args)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pvera serve");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Some(Ok(l))) => l,
            other => {
                let _ = child.kill();
                panic!("pvera serve printed no address ({other:?}): {}", stderr.join().unwrap());
            }
        };
        let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("address").to_string();
        Serving { child, url, stderr }
    }

    /// SIGTERM; returns the exit code and stderr.
    fn terminate(mut self) -> (Option<i32>, String) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
        let status = self.child.wait().unwrap();
        (status.code(), self.stderr.join().unwrap())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

fn classify(url: &str, body: &Value) -> Value {
    let mut r = agent().post(format!("{url}/classify")).header("Content-Type", "application/json").send(body.to_string()).unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    assert_eq!(r.status().as_u16(), 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn trained() -> common::TinyBert {
    let t = tiny_bert();
    let o = train_tiny_bert(
        &t,
        &["--epochs", "2", "--batch-size", "3", "--lr", "5e-2", "--d-initial", "1.0", "--threads", "1"],
    );
    assert!(o.status.success(), "{}", show(&o));
    t
}

fn predict_json(t: &common::TinyBert, best: &Path, texts: &[&str], extra: &[&str]) -> Value {
    let mut a = vec!["predict", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(best), "--json"];
    a.extend_from_slice(extra);
    a.extend_from_slice(texts);
    let o = pvera(&a);
    assert!(o.status.success(), "{}", show(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn serve_answers_like_predict_and_stops_on_sigterm() {
    let t = trained();
    let best = t.out.join("best");
    let spec = format!("spam={}", best.display());
    let srv = Serving::start(&["--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", &spec, "--threads", "1"]);

    // Monte Carlo: 10 inputs = batches of 8 + 2, 16 samples stacked 4 / 16 per forward
    let cli = predict_json(&t, &best, &TEXTS, &["--samples", "16", "--seed", "3"]);
    let srv_mc = classify(&srv.url, &json!({"inputs": TEXTS, "samples": 16, "seed": 3}));
    assert_eq!(srv_mc["predictions"], cli["predictions"], "a seeded server answer equals pvera predict's");
    assert_eq!(srv_mc["labels"], cli["labels"]);
    let cli4 = predict_json(&t, &best, &TEXTS[..3], &["--samples", "5", "--seed", "9", "--confidence", "0.8"]);
    let srv4 = classify(&srv.url, &json!({"inputs": &TEXTS[..3], "samples": 5, "seed": 9, "confidence": 0.8}));
    assert_eq!(srv4["predictions"], cli4["predictions"]);
    // PEFT's sequential loop, one forward per sample
    let cli_seq = predict_json(&t, &best, &TEXTS[..3], &["--samples", "4", "--seed", "2", "--sequential"]);
    let srv_seq = classify(&srv.url, &json!({"inputs": &TEXTS[..3], "samples": 4, "seed": 2, "sequential": true}));
    assert_eq!(srv_seq["predictions"], cli_seq["predictions"]);

    // mean mode: the same batch as the CLI's first one gives the same bits
    let mean8 = classify(&srv.url, &json!({"inputs": &TEXTS[..8]}));
    for (p, q) in mean8["predictions"].as_array().unwrap().iter().zip(cli["predictions"].as_array().unwrap()) {
        assert_eq!(p["mean_mode"], q["mean_mode"]);
        assert_eq!(p["input"], q["input"]);
        assert!(p["interval"].is_null());
    }
    // all 10 in one forward (the CLI ran 8 + 2): other padding, float rounding only
    let mean10 = classify(&srv.url, &json!({"inputs": TEXTS}));
    for (p, q) in mean10["predictions"].as_array().unwrap().iter().zip(cli["predictions"].as_array().unwrap()) {
        for (x, y) in p["mean_mode"]["probs"].as_array().unwrap().iter().zip(q["mean_mode"]["probs"].as_array().unwrap()) {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= 1e-6, "{p} vs {q}");
        }
    }
    let (code, stderr) = srv.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("pvera serve: stopped"), "{stderr}");
}

#[test]
fn sigterm_under_load_truncates_no_answer() {
    let t = trained();
    let spec = format!("spam={}", t.out.join("best").display());
    let srv = Serving::start(&["--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", &spec]);
    let stop = Arc::new(AtomicBool::new(false));
    let body = json!({"inputs": vec!["free money prize"; 16], "samples": 32, "seed": 1}).to_string();
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (url, body, stop) = (format!("{}/classify", srv.url), body.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut answered, mut refused) = (0, 0);
                while !stop.load(Ordering::SeqCst) {
                    match agent().post(&url).header("Content-Type", "application/json").send(body.as_str()) {
                        Ok(mut r) => {
                            // headers arrived: the body must be complete
                            assert_eq!(r.status().as_u16(), 200);
                            let text = r.body_mut().read_to_string().expect("an answer cut short");
                            let j: Value = serde_json::from_str(&text).expect("an answer cut short");
                            assert_eq!(j["predictions"].as_array().unwrap().len(), 16);
                            answered += 1;
                        }
                        // no connection (the server stopped accepting) or closed before answering
                        Err(_) => {
                            refused += 1;
                            if refused > 3 {
                                break;
                            }
                        }
                    }
                }
                (answered, refused)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    let (code, stderr) = srv.terminate();
    stop.store(true, Ordering::SeqCst);
    let results: Vec<(usize, usize)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(results.iter().map(|r| r.0).sum::<usize>() >= 6, "{results:?}");
}

#[test]
fn serve_flag_errors_exit_with_their_codes() {
    let t = tiny_bert();
    let (m, tok) = (s(&t.model).to_string(), s(&t.tok).to_string());
    let o = pvera(&["serve", "--model", &m, "--tokenizer", &tok, "--adapter", "nodir"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("NAME=DIR"), "{}", show(&o));
    let o = pvera(&["serve", "--model", &m, "--tokenizer", &tok]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let missing = t.tmp.path().join("missing");
    let o = pvera(&["serve", "--model", &m, "--tokenizer", &tok, "--adapter", &format!("a={}", missing.display())]);
    assert_eq!(o.status.code(), Some(6), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing"), "{}", show(&o));
    let o = pvera(&["serve", "--model", &m, "--tokenizer", &tok, "--adapter", "a=x", "--max-batch-rows", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
}
