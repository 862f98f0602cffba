//! `pvera serve` end to end in-process on the tiny fixtures: every route, every limit and status
//! code, the error format, concurrent clients mixing adapters, hot-load / unload under load,
//! images as base64, the API key, and graceful shutdown with requests in flight.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use common::*;
use pvera_server::Limits;
use serde_json::{json, Value};

const TEXTS: [&str; 5] = ["free money prize", "notes from lunch", "win a cheap prize now", "see the report", "meeting at noon"];

fn two_adapters(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (tmp.join("root/a"), tmp.join("root/b"));
    make_adapter(&a, 1, &["ham", "spam"], 16);
    make_adapter(&b, 2, &["neg", "neu", "pos"], 16);
    (a, b)
}

#[test]
fn routes_answer_and_every_error_has_the_tei_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_adapters(tmp.path());
    let mut cfg = config(&[("a", &a), ("b", &b)]);
    cfg.limits = Limits { payload_limit: 4096, max_client_batch_size: 6, max_samples: 32, ..Limits::default() };
    let s = TestServer::start(cfg);

    // health, info, metrics, openapi, docs, playground
    assert_eq!(get(&s.url("/health")).json(), json!({"status": "ok"}));
    let info = get(&s.url("/info")).json();
    assert_eq!(info["model"]["model_type"], "bert");
    assert_eq!(info["default_adapter"], "a");
    assert_eq!(info["adapters"][1]["labels"], json!(["neg", "neu", "pos"]));
    assert_eq!(info["adapters"][0]["r"], 8);
    assert_eq!(info["adapters"][0]["target_modules"], json!(["query", "value"]));
    assert_eq!(info["adapters"][0]["adapted_layers"], 4);
    assert_eq!(info["adapters"][0]["projection_group"], info["adapters"][1]["projection_group"], "same key, one A/B");
    assert_eq!(info["projection_groups"], 1);
    assert_eq!(info["limits"]["max_client_batch_size"], 6);
    let spec: Value = serde_json::from_str(&get(&s.url("/openapi.json")).text).unwrap();
    assert_eq!(spec["openapi"], "3.0.3");
    for p in ["/classify", "/predict", "/embed", "/health", "/info", "/metrics", "/adapters", "/adapters/{name}", "/openapi.json", "/docs", "/"] {
        assert!(spec["paths"][p].is_object(), "openapi.json lacks {p}");
    }
    for (p, kind) in [("/", "text/html"), ("/docs", "text/html"), ("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let r = get(&s.url(p));
        assert!(r.status == 200 && r.content_type.starts_with(kind), "{p}: {r:?}");
    }
    assert_eq!(get(&s.url("/adapters")).json()["adapters"].as_array().unwrap().len(), 2);

    // /classify: mean mode (Monte Carlo fields null), then seeded Monte Carlo
    let mean = post_json(&s.url("/classify"), &json!({"inputs": TEXTS[0]})).json();
    let r = &mean["predictions"][0];
    assert_eq!((r["input"].as_str(), r["samples"].as_u64(), mean["adapter"].as_str()), (Some(TEXTS[0]), Some(1), Some("a")));
    assert!(r["interval"].is_null() && r["mutual_information"].is_null() && r["vote_share"].is_null(), "{r}");
    assert_eq!(r["mean_probs"].as_object().unwrap().len(), 2);
    let req = json!({"inputs": TEXTS, "adapter": "b", "samples": 8, "seed": 3, "confidence": 0.9});
    let mc = post_json(&s.url("/classify"), &req).json();
    assert_eq!(mc, post_json(&s.url("/classify"), &req).json(), "the same seed gives the same answer");
    assert_eq!(mc["labels"], json!(["neg", "neu", "pos"]));
    assert_eq!(mc["predictions"].as_array().unwrap().len(), 5);
    for p in mc["predictions"].as_array().unwrap() {
        let iv = p["interval"].as_array().unwrap();
        assert!(iv[1].as_f64().unwrap() > iv[0].as_f64().unwrap(), "the latent is sampled: {p}");
        assert!(p["mutual_information"].as_f64().unwrap() >= 0.0 && p["confidence"] == 0.9);
    }
    let other = post_json(&s.url("/classify"), &json!({"inputs": TEXTS, "adapter": "b", "samples": 8, "seed": 4})).json();
    assert_ne!(mc["predictions"][0]["mean_probs"], other["predictions"][0]["mean_probs"], "another seed, other samples");

    // /predict: TEI's shapes
    let one = post_json(&s.url("/predict"), &json!({"inputs": "free money"})).json();
    let one = one.as_array().unwrap();
    assert_eq!(one.len(), 2);
    assert!(one[0]["score"].as_f64().unwrap() >= one[1]["score"].as_f64().unwrap(), "sorted high to low");
    let sum: f64 = one.iter().map(|x| x["score"].as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-5);
    assert_eq!(post_json(&s.url("/predict"), &json!({"inputs": ["free money"]})).json().as_array().unwrap().len(), 2);
    let batch = post_json(&s.url("/predict"), &json!({"inputs": [["free money"], ["hello there"]], "adapter": "b", "raw_scores": true})).json();
    assert_eq!(batch.as_array().unwrap().len(), 2);
    assert_eq!(batch[1].as_array().unwrap().len(), 3);
    assert!(batch[0][0]["score"].as_f64().unwrap() < 0.0, "raw scores are log-probabilities: {batch}");
    post_json(&s.url("/predict"), &json!({"inputs": ["a", "b"]})).error(422);
    post_json(&s.url("/predict"), &json!({"inputs": "x", "truncation_direction": "Left"})).error(422);

    // /embed: TEI's [[f32]], normalised by default; with samples the spread
    let e = post_json(&s.url("/embed"), &json!({"inputs": ["free money", "hello"]})).json();
    let v: Vec<f64> = e[0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!((e.as_array().unwrap().len(), v.len()), (2, 32));
    assert!((v.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-5);
    let raw = post_json(&s.url("/embed"), &json!({"inputs": "free money", "normalize": false})).json();
    assert!((raw[0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap().powi(2)).sum::<f64>().sqrt() - 1.0).abs() > 1e-3);
    let es = post_json(&s.url("/embed"), &json!({"inputs": "free money", "samples": 4, "seed": 1})).json();
    assert_eq!(es["embeddings"][0], e[0], "the mean-mode embedding does not depend on sampling");
    assert!(es["std"][0].as_array().unwrap().iter().any(|x| x.as_f64().unwrap() > 0.0), "{es}");
    post_json(&s.url("/embed"), &json!({"inputs": "x", "prompt_name": "query"})).error(422);
    post_json(&s.url("/embed"), &json!({"inputs": "x", "dimensions": 8})).error(422);

    // bad requests: 400 (not JSON), 422 naming the field, 404, 413
    let m = post(&s.url("/classify"), r#"{"inputs": "x", "samples": "16"}"#).error(422);
    assert!(m.contains("samples") && m.contains("invalid type"), "{m}");
    let m = post(&s.url("/classify"), r#"{"inputs": "x", "sample": 16}"#).error(422);
    assert!(m.contains("unknown field `sample`"), "{m}");
    assert!(post(&s.url("/classify"), r#"{"adapter": "a"}"#).error(422).contains("inputs"));
    assert!(post(&s.url("/classify"), r#"{"inputs": 42}"#).error(422).contains("inputs"));
    assert!(post(&s.url("/classify"), r#"{"inputs": ["ok", 3]}"#).error(422).contains("inputs[1]"));
    assert!(post(&s.url("/classify"), r#"{"inputs": []}"#).error(422).contains("empty"));
    assert!(post(&s.url("/classify"), r#"{"inputs": ["fine", "  "]}"#).error(422).contains("input 1 is an empty text"));
    assert!(post(&s.url("/classify"), r#"{"inputs": "x", "samples": 0}"#).error(422).contains("samples"));
    assert!(post(&s.url("/classify"), r#"{"inputs": "x", "samples": 33}"#).error(422).contains("--max-samples"));
    assert!(post(&s.url("/classify"), r#"{"inputs": "x", "samples": -2}"#).error(422).contains("samples"));
    assert!(post(&s.url("/classify"), r#"{"inputs": "x", "confidence": 1.5}"#).error(422).contains("confidence"));
    post(&s.url("/classify"), r#"{"inputs": "x""#).error(400);
    post(&s.url("/classify"), b"{\"inputs\": \"\xff\xfe\"}").error(400);
    post(&s.url("/classify"), "").error(400);
    post(&s.url("/classify"), format!("{{\"inputs\": {}", "[".repeat(1000))).error(400);
    post(&s.url("/classify"), r#"{"inputs": "x"} trailing"#).error(400);
    assert!(post(&s.url("/classify"), r#"{"inputs": "x", "adapter": "nope"}"#).error(404).contains("nope"));
    let m = post_json(&s.url("/classify"), &json!({"inputs": vec!["x"; 7]})).error(413);
    assert!(m.contains("7 inputs") && m.contains("--max-client-batch-size"), "{m}");
    let m = post(&s.url("/classify"), format!("{{\"inputs\": \"{}\"}}", "a".repeat(5000))).error(413);
    assert!(m.contains("--payload-limit"), "{m}");
    let long = "word ".repeat(40);
    let m = post_json(&s.url("/classify"), &json!({"inputs": [TEXTS[0], long]})).error(413);
    assert!(m.contains("input 1 has") && m.contains("truncate"), "{m}");
    let cut = post_json(&s.url("/classify"), &json!({"inputs": long, "truncate": true}));
    assert_eq!(cut.status, 200, "{cut:?}");
    post_json(&s.url("/predict"), &json!({"inputs": long})).error(413);
    assert_eq!(post_json(&s.url("/predict"), &json!({"inputs": long, "truncate": true})).status, 200);
    get(&s.url("/nope")).error(404);
    get(&s.url("/classify")).error(405);
    delete(&s.url("/adapters/nope")).error(404);
    post_json(&s.url("/adapters"), &json!({"name": "c", "path": "a"})).error(403); // no --adapter-dir

    let metrics = get(&s.url("/metrics"));
    assert!(metrics.content_type.starts_with("text/plain"));
    let t = metrics.text;
    for needle in [
        "pvera_requests_total{route=\"/classify\",adapter=\"b\",status=\"200\"} 3",
        "pvera_requests_total{route=\"/classify\",adapter=\"a\",status=\"413\"}",
        "pvera_requests_total{route=\"/classify\",adapter=\"-\",status=\"400\"}",
        "pvera_request_duration_seconds_bucket{route=\"/classify\"",
        "pvera_queue_depth 0",
        "pvera_batch_rows_count",
        "pvera_mc_samples_total 124",
        "pvera_adapters_loaded 2",
    ] {
        assert!(t.contains(needle), "metrics lack {needle}:\n{t}");
    }
}

#[test]
fn api_key_guards_every_route_but_health() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    make_adapter(&a, 1, &["ham", "spam"], 16);
    let mut cfg = config(&[("a", &a)]);
    cfg.api_key = Some("s3cret".into());
    let s = TestServer::start(cfg);
    assert_eq!(get(&s.url("/health")).status, 200);
    for p in ["/", "/info", "/metrics", "/adapters", "/openapi.json", "/docs", "/nope"] {
        let r = get(&s.url(p));
        r.error(401);
        assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"), "{p}");
        get_auth(&s.url(p), "wrong").error(401);
    }
    post(&s.url("/classify"), r#"{"inputs": "x"}"#).error(401);
    post_auth(&s.url("/classify"), "s3cret-", r#"{"inputs": "x"}"#).error(401);
    assert_eq!(post_auth(&s.url("/classify"), "s3cret", r#"{"inputs": "x"}"#).status, 200);
    assert_eq!(get_auth(&s.url("/info"), "s3cret").status, 200);
}

#[test]
fn over_the_concurrency_limit_is_429_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    make_adapter(&a, 1, &["ham", "spam"], 16);
    let mut cfg = config(&[("a", &a)]);
    cfg.limits.max_concurrent_requests = 1;
    let s = TestServer::start(cfg);
    let url = s.url("/classify");
    let heavy = json!({"inputs": vec!["free money prize and more words"; 32], "samples": 64}).to_string();
    let (ok, busy) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    for _round in 0..5 {
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (url, body, ok, busy) = (url.clone(), heavy.clone(), ok.clone(), busy.clone());
                std::thread::spawn(move || {
                    let r = post(&url, body);
                    match r.status {
                        200 => ok.fetch_add(1, Ordering::SeqCst),
                        429 => {
                            assert_eq!(r.retry_after.as_deref(), Some("1"), "{r:?}");
                            assert!(r.error(429).contains("--max-concurrent-requests"));
                            busy.fetch_add(1, Ordering::SeqCst)
                        }
                        _ => panic!("{r:?}"),
                    };
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        if busy.load(Ordering::SeqCst) > 0 {
            break;
        }
    }
    assert!(ok.load(Ordering::SeqCst) > 0 && busy.load(Ordering::SeqCst) > 0, "ok {ok:?} busy {busy:?}");
    assert!(get(&s.url("/metrics")).text.contains(&format!("pvera_overloaded_total {}", busy.load(Ordering::SeqCst))));
}

/// Answers of one adapter computed alone, one request at a time.
fn reference(s: &TestServer, adapter: &str) -> (Value, Value) {
    let mean = post_json(&s.url("/classify"), &json!({"inputs": TEXTS, "adapter": adapter})).json();
    let mc = post_json(&s.url("/classify"), &json!({"inputs": TEXTS, "adapter": adapter, "samples": 6, "seed": 11})).json();
    (mean, mc)
}

#[test]
fn concurrent_clients_mixing_adapters_get_their_own_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_adapters(tmp.path());
    let c = tmp.path().join("root/c");
    make_adapter(&c, 3, &["ham", "spam"], 16);
    let s = TestServer::start(config(&[("a", &a), ("b", &b), ("c", &c)]));
    let refs: Vec<(String, (Value, Value))> = ["a", "b", "c"].iter().map(|n| (n.to_string(), reference(&s, n))).collect();
    let refs = Arc::new(refs);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (url, refs) = (s.url("/classify"), refs.clone());
            std::thread::spawn(move || {
                for i in 0..12 {
                    let (name, (mean, mc)) = &refs[(t + i) % 3];
                    if (t + i) % 4 == 0 {
                        let r = post_json(&url, &json!({"inputs": TEXTS, "adapter": name, "samples": 6, "seed": 11})).json();
                        // packed with other Monte Carlo requests: the same noise, float rounding apart
                        let d = max_diff(&r, mc);
                        assert!(d <= 1e-6, "a seeded answer does not depend on what shared the queue: {d}");
                    } else {
                        // one or several inputs per request, packed with other requests' rows
                        let k = 1 + (t + i) % TEXTS.len();
                        let r = post_json(&url, &json!({"inputs": &TEXTS[..k], "adapter": name})).json();
                        assert_eq!(r["adapter"], mean["adapter"]);
                        for (p, q) in r["predictions"].as_array().unwrap().iter().zip(mean["predictions"].as_array().unwrap()) {
                            assert_eq!(p["input"], q["input"]);
                            let d = max_diff(&p["mean_mode"]["probs"], &q["mean_mode"]["probs"]);
                            assert!(d <= 1e-6, "{name}: packed with other requests the mean mode moved by {d}");
                        }
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    // the answers differ between adapters (the test would not see a mix-up otherwise)
    assert_ne!(refs[0].1 .0["predictions"][0]["mean_probs"], refs[2].1 .0["predictions"][0]["mean_probs"]);
    let m = get(&s.url("/metrics")).text;
    let forwards: f64 = m.lines().find_map(|l| l.strip_prefix("pvera_batch_rows_sum ")).unwrap().parse().unwrap();
    assert!(forwards > 0.0);
}

#[test]
fn hot_load_and_unload_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _b) = two_adapters(tmp.path());
    let root = tmp.path().join("root");
    make_adapter(&root.join("nested/c"), 3, &["x", "y"], 16);
    // a corrupt adapter (the error catalogue's row 8: a truncated weights file)
    let bad = root.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(a.join("adapter_config.json"), bad.join("adapter_config.json")).unwrap();
    let w = std::fs::read(a.join("adapter_model.safetensors")).unwrap();
    std::fs::write(bad.join("adapter_model.safetensors"), &w[..w.len() / 2]).unwrap();
    // a symlink that leaves the root
    let outside = tmp.path().join("outside");
    make_adapter(&outside, 4, &["x", "y"], 16);
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();

    let mut cfg = config(&[("a", &a)]);
    cfg.adapter_dir = Some(root.clone());
    let s = TestServer::start(cfg);
    let (ref_a, _) = reference(&s, "a");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let (url, stop, statuses, ref_a) = (s.url("/classify"), stop.clone(), statuses.clone(), ref_a.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) || n < 3 {
                    let adapter = if t % 2 == 0 { "a" } else { "b2" };
                    let r = post_json(&url, &json!({"inputs": TEXTS, "adapter": adapter}));
                    assert!(r.status < 500, "{r:?}");
                    if adapter == "a" {
                        let j = r.json();
                        assert!(max_diff(&j["predictions"][0]["mean_mode"]["probs"], &ref_a["predictions"][0]["mean_mode"]["probs"]) <= 1e-6);
                    }
                    statuses.lock().unwrap().push((adapter, r.status));
                    n += 1;
                }
            })
        })
        .collect();

    let loaded = post_json(&s.url("/adapters"), &json!({"name": "b2", "path": "b"}));
    assert_eq!(loaded.status, 201, "{loaded:?}");
    assert_eq!(loaded.json()["labels"], json!(["neg", "neu", "pos"]));
    let c = post_json(&s.url("/adapters"), &json!({"name": "c", "path": "nested/./c"}));
    assert_eq!(c.status, 201, "{c:?}");
    assert!(c.json()["load_ms"].as_f64().unwrap() > 0.0);
    let r = post_json(&s.url("/classify"), &json!({"inputs": "hello", "adapter": "c"})).json();
    assert_eq!(r["labels"], json!(["x", "y"]));
    // refused: escapes, missing, corrupt, duplicate, bad names; serving goes on
    for (path, status) in [("../outside", 403), ("/etc", 403), ("escape", 403), ("missing", 404), ("nested/c/adapter_config.json", 422), ("", 422)] {
        let m = post_json(&s.url("/adapters"), &json!({"name": "z", "path": path})).error(status);
        assert!(!m.is_empty(), "{path}");
    }
    let m = post_json(&s.url("/adapters"), &json!({"name": "z", "path": "bad"})).error(422);
    assert!(m.contains("adapter_model.safetensors") && m.contains("not a valid safetensors file"), "{m}");
    post_json(&s.url("/adapters"), &json!({"name": "c", "path": "b"})).error(409);
    post_json(&s.url("/adapters"), &json!({"name": "../x", "path": "b"})).error(422);
    post_json(&s.url("/adapters"), &json!({"name": "ok", "path": "b", "extra": 1})).error(422);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(delete(&s.url("/adapters/b2")).json(), json!({"removed": "b2"}));
    delete(&s.url("/adapters/b2")).error(404);
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    clients.into_iter().for_each(|t| t.join().unwrap());
    let st = statuses.lock().unwrap();
    assert!(st.iter().all(|(a, code)| *code == 200 || (*a == "b2" && *code == 404)), "{st:?}");
    assert!(st.iter().any(|(a, code)| *a == "b2" && *code == 200), "b2 answered while it was loaded: {st:?}");
    assert!(st.last().is_some());
    let names: Vec<String> =
        get(&s.url("/adapters")).json()["adapters"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["a", "c"]);
    // unloading the default adapter hands the default to the next one
    delete(&s.url("/adapters/a"));
    assert_eq!(get(&s.url("/info")).json()["default_adapter"], "c");
    assert_eq!(post_json(&s.url("/classify"), &json!({"inputs": "hello"})).json()["adapter"], "c");
}

fn b64(p: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
}

#[test]
fn image_models_take_base64_and_refuse_bad_images() {
    let model = fixtures().join("models/vit_task/model");
    let adapter = fixtures().join("models/vit_task/adapter");
    let mut cfg = config(&[("vit", &adapter)]);
    cfg.model = model;
    cfg.tokenizer = None;
    let s = TestServer::start(cfg);
    let img = fixtures().join("data/images");
    let png = b64(&img.join("cat/grey_28x28.png"));
    let jpg = b64(&img.join("bird/rgb_17x29.jpg"));
    let r = post_json(&s.url("/classify"), &json!({"inputs": [png, format!("data:image/jpeg;base64,{jpg}")], "samples": 4})).json();
    assert_eq!(r["predictions"].as_array().unwrap().len(), 2);
    assert!(r["predictions"][0]["input"].is_null());
    assert_eq!(r["labels"].as_array().unwrap().len(), 3);
    let p = post_json(&s.url("/predict"), &json!({"inputs": png})).json();
    assert_eq!(p.as_array().unwrap().len(), 3);
    let e = post_json(&s.url("/embed"), &json!({"inputs": [png]})).json();
    assert_eq!(e[0].as_array().unwrap().len(), 32);
    assert!(post_json(&s.url("/classify"), &json!({"inputs": "not base64!"})).error(422).contains("not base64"));
    let text = base64::engine::general_purpose::STANDARD.encode("hello, not an image");
    assert!(post_json(&s.url("/classify"), &json!({"inputs": text})).error(422).contains("not a PNG or JPEG"));
    let raw = std::fs::read(img.join("cat/grey_28x28.png")).unwrap();
    let cut = base64::engine::general_purpose::STANDARD.encode(&raw[..raw.len() / 2]);
    assert!(post_json(&s.url("/classify"), &json!({"inputs": [png, cut]})).error(422).starts_with("input 1"));
    // a PNG header claiming 60000 x 60000 pixels: refused before decoding
    let mut huge = raw.clone();
    huge[16..20].copy_from_slice(&60000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&60000u32.to_be_bytes());
    let crc = crc32(&huge[12..29]);
    huge[29..33].copy_from_slice(&crc.to_be_bytes());
    let m = post_json(&s.url("/classify"), &json!({"inputs": base64::engine::general_purpose::STANDARD.encode(&huge)})).error(413);
    assert!(m.contains("60000x60000"), "{m}");
}

/// CRC-32 (PNG's chunk checksum).
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn shutdown_finishes_the_requests_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    make_adapter(&a, 1, &["ham", "spam"], 16);
    let s = TestServer::start(config(&[("a", &a)]));
    let url = s.url("/classify");
    let started = Arc::new(std::sync::Barrier::new(5));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, started) = (url.clone(), started.clone());
            std::thread::spawn(move || {
                started.wait();
                post_json(&url, &json!({"inputs": vec!["free money prize"; 32], "samples": 64, "seed": 1}))
            })
        })
        .collect();
    started.wait();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let health = s.url("/health");
    s.stop().unwrap();
    assert!(ureq::get(&health).call().is_err(), "a stopped server accepts no connection");
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["predictions"].as_array().unwrap().len(), 32, "a complete answer");
    }
}

#[test]
fn start_up_refuses_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    make_adapter(&a, 1, &["ham", "spam"], 16);
    let fails = |cfg: pvera_server::ServerConfig| TestServer::try_start(cfg).err().expect("must not start").to_string();
    let mut c = config(&[("a", &a)]);
    c.limits.max_batch_rows = 0;
    assert!(fails(c).contains("--max-batch-rows 0"));
    let c = config(&[("a", &a), ("a", &a)]);
    assert!(fails(c).contains("twice"));
    let c = config(&[("bad/name", &a)]);
    assert!(fails(c).contains("adapter name"));
    let c = config(&[]);
    assert!(fails(c).contains("no adapter"));
    let c = config(&[("a", &tmp.path().join("missing"))]);
    assert!(fails(c).contains("missing"));
    let mut c = config(&[("a", &a)]);
    c.adapter_dir = Some(tmp.path().join("nowhere"));
    assert!(fails(c).contains("--adapter-dir"));
    // a taken port
    let s = TestServer::start(config(&[("a", &a)]));
    let mut c = config(&[("a", &a)]);
    c.port = s.addr.port();
    assert!(fails(c).contains("cannot listen"));
    // --max-input-length below the adapter's length: texts are cut (or refused) there
    let mut c = config(&[("a", &a)]);
    c.limits.max_input_length = Some(6);
    let s = TestServer::start(c);
    assert_eq!(get(&s.url("/info")).json()["adapters"][0]["max_length"], 6);
    let m = post_json(&s.url("/classify"), &json!({"inputs": "one two three four five six"})).error(413);
    assert!(m.contains("more than the 6"), "{m}");
    assert_eq!(post_json(&s.url("/classify"), &json!({"inputs": "one two three four five six", "truncate": true})).status, 200);
}

/// Queued mean-mode requests of different adapters share one forward (the library's
/// mixed-adapter batch), and every request gets what predicting it alone gives (≤ 1e-6); a chunk
/// of one adapter keeps the single-adapter path.
#[test]
fn mean_forward_mixes_adapters_in_one_forward() {
    use pvera::predictor::PredictConfig;
    use pvera_server::batch::{mean_forward, Block, MergeCache, Rows};

    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_adapters(tmp.path());
    let mut p = predictor(&[("a", &a), ("b", &b)]);
    let rows = |p: &pvera::Predictor, adapter: &str, texts: &[&str]| Rows::Tokens(p.tokenize_texts(adapter, texts, false).unwrap());
    let requests: Vec<(&str, Rows)> = vec![
        ("a", rows(&p, "a", &TEXTS[..3])),
        ("b", rows(&p, "b", &TEXTS[1..3])),
        ("a", rows(&p, "a", &TEXTS[4..])),
        ("b", rows(&p, "b", &TEXTS[..1])),
    ];
    let blocks: Vec<Block<'_>> = requests.iter().map(|(n, r)| Block { adapter: n, rows: r }).collect();
    let mut merge = MergeCache::new(32);
    let mut forwards = Vec::new();
    let out = mean_forward(&mut p, &blocks, 32, &mut merge, &mut |n| forwards.push(n));
    assert_eq!(forwards, vec![7], "all seven rows of both adapters in one forward");
    let cfg = PredictConfig { samples: 1, ..PredictConfig::default() };
    for ((name, texts), got) in [("a", &TEXTS[..3]), ("b", &TEXTS[1..3]), ("a", &TEXTS[4..]), ("b", &TEXTS[..1])].iter().zip(&out) {
        let x = p.encode_texts(name, texts, false).unwrap();
        let alone = p.predict(name, &x, &cfg).unwrap();
        let got = got.as_ref().unwrap();
        assert_eq!(got.len(), alone.len());
        for (g, w) in got.iter().zip(&alone) {
            let d = max_abs(&g.mean_mode, &w.mean_mode);
            assert!(d <= 1e-6, "{name}: the mixed forward moved a probability by {d}");
        }
    }
    // the two adapters answer differently, so a mix-up would show
    assert!(out[0].as_ref().unwrap()[1].mean_mode != out[1].as_ref().unwrap()[0].mean_mode);
    // a budget of 3 rows: chunks [a a a] [b b a] [b]; the first and last run single-adapter
    forwards.clear();
    let out3 = mean_forward(&mut p, &blocks, 3, &mut merge, &mut |n| forwards.push(n));
    assert_eq!(forwards, vec![3, 3, 1]);
    for (x, y) in out.iter().zip(&out3) {
        for (g, w) in x.as_ref().unwrap().iter().zip(y.as_ref().unwrap()) {
            let d = max_abs(&g.mean_mode, &w.mean_mode);
            assert!(d <= 1e-6);
        }
    }
}

/// An adapter with a `calibration.json` answers `/classify` with `pvera predict`'s calibrated
/// fields (temperature-scaled probabilities, conformal set, abstain), computed by the library's
/// `Calibrator` on the same predictions; the request can turn it off or pick a fitted coverage,
/// and asking for one that was not fitted (or for any without a file) is a 422.
#[test]
fn classify_applies_the_adapters_calibration() {
    use pvera::predictor::calibrated::{adapter_hash, fit_calibration, FitOptions};
    use pvera::predictor::{CalibrationChoice, Calibrator, PredictConfig};
    use pvera::uncertainty::{CalibrationSplit, CALIBRATION_FILE};

    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_adapters(tmp.path());
    // Fit b's calibration on 60 texts with made-up labels (mean mode and 4 Monte Carlo samples).
    let mut p = predictor(&[("b", &b)]);
    let words = ["free", "money", "notes", "lunch", "prize", "report", "meeting", "noon", "win", "cheap"];
    let texts: Vec<String> = (0..60).map(|i| format!("{} {} {}", words[i % 10], words[(i / 10) % 10], words[(i * 7) % 10])).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let x = p.encode_texts("b", &refs, false).unwrap();
    let cfg = PredictConfig { samples: 4, seed: Some(0), ..PredictConfig::default() };
    let preds = p.predict("b", &x, &cfg).unwrap();
    let labels: Vec<usize> = (0..60).map(|i| (i * 5 / 3) % 3).collect();
    let split = CalibrationSplit::new("synthetic", (0..60).collect(), "server test");
    let fitted = fit_calibration(&preds, &labels, &adapter_hash(&b).unwrap(), split, &FitOptions::default()).unwrap();
    fitted.file.write(&b.join(CALIBRATION_FILE)).unwrap();

    let s = TestServer::start(config(&[("a", &a), ("b", &b)]));
    let info = get(&s.url("/info")).json();
    assert!(info["adapters"][0]["calibration"].is_null(), "a has no calibration.json");
    assert_eq!(info["adapters"][1]["calibration"]["coverage"], json!(0.9));

    // The server's answer equals the library's calibrator on the same seeded predictions.
    let body = json!({"inputs": &TEXTS[..3], "adapter": "b", "samples": 4, "seed": 2});
    let r = post_json(&s.url("/classify"), &body);
    assert_eq!(r.status, 200, "{}", r.text);
    let r = r.json();
    assert_eq!(r["calibration"]["score"], json!("lac"));
    let x = p.encode_texts("b", &TEXTS[..3], false).unwrap();
    let mut want = p.predict("b", &x, &PredictConfig { samples: 4, seed: Some(2), ..PredictConfig::default() }).unwrap();
    let cal = Calibrator::load(&b, &CalibrationChoice::default()).unwrap().unwrap();
    cal.apply(&mut want).unwrap();
    let labels: Vec<String> = ["neg", "neu", "pos"].iter().map(|s| s.to_string()).collect();
    let got = r["predictions"].as_array().unwrap();
    assert_eq!(got.len(), 3);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(w.calibrated.is_some() && g["prediction_set"].is_array() && g["abstain"].is_boolean(), "{g}");
        let d = max_diff(g, &w.to_json(&labels, Some(TEXTS[i])));
        assert!(d <= 1e-6, "input {i}: the server's calibrated record differs by {d}: {g}");
    }
    // mean mode too, and a fitted coverage of 95 %
    let r = post_json(&s.url("/classify"), &json!({"inputs": TEXTS[0], "adapter": "b", "coverage": 0.95})).json();
    assert_eq!(r["calibration"]["coverage"], json!(0.95));
    assert!(r["predictions"][0]["prediction_set"].is_array());
    // turned off: the calibration fields are null
    let r = post_json(&s.url("/classify"), &json!({"inputs": TEXTS[0], "adapter": "b", "calibration": false})).json();
    assert!(r["calibration"].is_null() && r["predictions"][0]["prediction_set"].is_null(), "{r}");
    // a coverage that was not fitted, a coverage without a file, a bad score, contradicting fields
    for (body, needle) in [
        (json!({"inputs": TEXTS[0], "adapter": "b", "coverage": 0.5}), "0.5"),
        (json!({"inputs": TEXTS[0], "adapter": "a", "coverage": 0.9}), "pvera calibrate"),
        (json!({"inputs": TEXTS[0], "adapter": "b", "score": "best"}), "lac"),
        (json!({"inputs": TEXTS[0], "adapter": "b", "calibration": false, "abstain_below": 0.8}), "turns off"),
    ] {
        let r = post_json(&s.url("/classify"), &body);
        assert_eq!(r.status, 422, "{body}: {}", r.text);
        assert!(r.text.contains(needle), "{body}: {}", r.text);
    }
}

/// A VeRA adapter serves next to PVeRA ones: its mean-mode answer is the library's, its rows share
/// a mixed forward with a PVeRA adapter's, and Monte Carlo on it is a 422 that names VeRA.
#[test]
fn vera_adapters_serve_next_to_pvera_ones() {
    use pvera::predictor::PredictConfig;
    use pvera_server::batch::{mean_forward, Block, MergeCache, Rows};

    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = two_adapters(tmp.path());
    let v = tmp.path().join("root/v");
    make_adapter_of(pvera::config::Method::Vera, &v, 7, &["ham", "spam"], 16);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(v.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], json!("VERA"));

    let mut p = predictor(&[("a", &a), ("v", &v)]);
    let mean = PredictConfig { samples: 1, ..PredictConfig::default() };
    let x = p.encode_texts("v", &TEXTS, false).unwrap();
    let alone = p.predict("v", &x, &mean).unwrap();
    // mixed with the PVeRA adapter in one forward
    let rows_a = Rows::Tokens(p.tokenize_texts("a", &TEXTS[..2], false).unwrap());
    let rows_v = Rows::Tokens(p.tokenize_texts("v", &TEXTS, false).unwrap());
    let blocks = [Block { adapter: "a", rows: &rows_a }, Block { adapter: "v", rows: &rows_v }];
    let mut forwards = Vec::new();
    let out = mean_forward(&mut p, &blocks, 32, &mut MergeCache::new(32), &mut |n| forwards.push(n));
    assert_eq!(forwards, vec![7]);
    for (g, w) in out[1].as_ref().unwrap().iter().zip(&alone) {
        let d = max_abs(&g.mean_mode, &w.mean_mode);
        assert!(d <= 1e-6, "the VeRA rows of a mixed forward moved by {d}");
    }

    let s = TestServer::start(config(&[("a", &a), ("v", &v)]));
    let r = post_json(&s.url("/classify"), &json!({"inputs": TEXTS, "adapter": "v"}));
    assert_eq!(r.status, 200, "{}", r.text);
    let r = r.json();
    for (got, w) in r["predictions"].as_array().unwrap().iter().zip(&alone) {
        assert!(max_diff(&got["mean_mode"]["probs"], &json!(w.mean_mode)) <= 1e-6, "{got}");
    }
    let r = post_json(&s.url("/classify"), &json!({"inputs": TEXTS[0], "adapter": "v", "samples": 4}));
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(r.text.contains("VeRA"), "{}", r.text);
    let r = post_json(&s.url("/embed"), &json!({"inputs": TEXTS[0], "adapter": "v", "samples": 4}));
    assert_eq!(r.status, 422, "{}", r.text);
}

/// Queued Monte Carlo requests of different adapters and seeds share mixed-adapter forwards, and
/// each gets the answer it gets alone (its own noise: seed and input positions), within 1e-6.
#[test]
fn mc_forward_packs_requests_of_different_adapters_and_seeds() {
    use pvera::predictor::PredictConfig;
    use pvera_server::batch::{mc_forward, McBlock, Rows};

    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_adapters(tmp.path());
    let mut p = predictor(&[("a", &a), ("b", &b)]);
    let reqs: [(&str, &[&str], u64); 3] = [("a", &TEXTS[..3], 4), ("b", &TEXTS[1..], 7), ("a", &TEXTS[3..], 4)];
    let rows: Vec<Rows> = reqs.iter().map(|(n, t, _)| Rows::Tokens(p.tokenize_texts(n, t, false).unwrap())).collect();
    let blocks: Vec<McBlock<'_>> = reqs.iter().zip(&rows).map(|((n, _, seed), r)| McBlock { adapter: n, rows: r, seed: *seed }).collect();
    let cfg = PredictConfig { samples: 5, ..PredictConfig::default() };
    for budget in [32, 4] {
        let mut forwards = Vec::new();
        let out = mc_forward(&mut p, &blocks, &cfg, budget, &mut |n| forwards.push(n));
        // 9 inputs: one batch of 9 (mean pass + 5 forwards of 9 rows), or 3 batches of at most 4
        let expect: Vec<usize> = if budget == 32 { vec![9, 27, 18] } else { vec![4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1, 4, 1] };
        assert_eq!(forwards, expect, "budget {budget}");
        for ((name, texts, seed), got) in reqs.iter().zip(&out) {
            let x = p.encode_texts(name, texts, false).unwrap();
            let alone = p.predict(name, &x, &PredictConfig { seed: Some(*seed), max_rows: budget, ..cfg.clone() }).unwrap();
            let got = got.as_ref().unwrap();
            assert_eq!(got.len(), texts.len());
            // (the third request's texts are shorter than the batch's longest: its padding differs
            // from predicting it alone, and its noise must not)
            for (g, w) in got.iter().zip(&alone) {
                for (u, v) in g.mean_mode.iter().zip(&w.mean_mode) {
                    assert!((u - v).abs() <= 1e-6, "{name} seed {seed}: the packed mean mode moved by {}", (u - v).abs());
                }
                for (u, v) in g.samples.iter().flatten().zip(w.samples.iter().flatten()) {
                    assert!((u - v).abs() <= 1e-6, "{name} seed {seed}: a packed sample moved by {}", (u - v).abs());
                }
                assert_eq!(g.samples.len(), 5);
                assert!(g.mc.as_ref().unwrap().variance > 0.0);
            }
        }
    }
}
