//! A bounded request fuzzer for a running `pvera serve`: broken JSON, wrong types, huge arrays and
//! strings, bad base64, invalid UTF-8, deep nesting, odd methods, paths, headers and hot-load
//! paths, generated from a seed. Prints one JSON line: requests sent, answers by status, 5xx
//! count, requests with no answer, and whether `/health` still answers at the end. Exit 1 on any
//! 5xx, missing answer or a dead server. A body over the server's payload limit may be cut off
//! by the server's early 413 and close while the client is still sending (the client then sees a
//! broken pipe instead of the 413): those are counted apart, as `closed_early_over_limit`.
//!
//! ```sh
//! cargo run --release -p pvera-server --example fuzz_requests -- --url http://127.0.0.1:8080 \
//!     --requests 5000 --max-seconds 120 --seed 1 [--adapter NAME] [--payload-limit 2000000]
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// A JSON value of any kind, at most `depth` deep.
fn any_value(r: &mut Rng, depth: usize) -> Value {
    match r.below(if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(r.below(2) == 1),
        2 => json!(*r.pick(&[0i64, -1, 1, 2, 16, 65, 1 << 40, i64::MIN, i64::MAX])),
        3 => json!(*r.pick(&[0.5f64, -0.0, 1e300, -1e-300, 0.95, 3.5])),
        4 => json!(*r.pick(&["", " ", "free money", "\u{0}", "é漢字🙂", "\u{202e}evil", "a\nb\tc"])),
        5 => json!("x".repeat(r.below(3000))),
        6 => Value::Array((0..r.below(5)).map(|_| any_value(r, depth - 1)).collect()),
        _ => {
            let keys = ["inputs", "adapter", "samples", "seed", "confidence", "truncate", "raw_scores", "normalize", "x"];
            Value::Object((0..r.below(4)).map(|_| (r.pick(&keys).to_string(), any_value(r, depth - 1))).collect())
        }
    }
}

/// One generated request: method, path, content type, body bytes, category.
fn request(r: &mut Rng, adapter: &str) -> (&'static str, String, &'static str, Vec<u8>, &'static str) {
    let routes = ["/classify", "/predict", "/embed", "/adapters"];
    let route = r.pick(&routes).to_string();
    let valid = json!({"inputs": ["free money prize", "notes from lunch"], "adapter": adapter, "samples": 2, "seed": 1});
    match r.below(13) {
        0 => {
            // broken JSON: a valid body cut anywhere
            let b = valid.to_string().into_bytes();
            let cut = r.below(b.len());
            ("POST", route, "application/json", b[..cut].to_vec(), "truncated JSON")
        }
        1 => {
            // random bytes flipped in a valid body
            let mut b = valid.to_string().into_bytes();
            for _ in 0..1 + r.below(4) {
                let i = r.below(b.len());
                b[i] = r.next() as u8;
            }
            ("POST", route, "application/json", b, "flipped bytes")
        }
        2 => {
            // wrong types in known fields
            let mut v = valid.clone();
            let key = *r.pick(&["inputs", "adapter", "samples", "seed", "confidence", "truncate"]);
            v[key] = any_value(r, 2);
            ("POST", route, "application/json", v.to_string().into_bytes(), "wrong types")
        }
        3 => ("POST", route, "application/json", any_value(r, 4).to_string().into_bytes(), "random JSON"),
        4 => {
            // huge arrays
            let n = *r.pick(&[33usize, 1000, 100_000]);
            let v = json!({"inputs": vec!["a"; n], "adapter": adapter});
            ("POST", route, "application/json", v.to_string().into_bytes(), "huge array")
        }
        5 => {
            // huge strings: under and over the payload limit, with and without truncation
            let n = *r.pick(&[10_000usize, 1_500_000, 3_000_000]);
            let v = json!({"inputs": "money ".repeat(n / 6), "adapter": adapter, "truncate": r.below(2) == 1});
            ("POST", route, "application/json", v.to_string().into_bytes(), "huge string")
        }
        6 => {
            // invalid UTF-8 inside a string, raw
            let mut b = b"{\"inputs\": \"free ".to_vec();
            let bad: [&[u8]; 4] = [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"];
            let piece = bad[r.below(bad.len())];
            b.extend_from_slice(piece);
            b.extend_from_slice(b"\"}");
            ("POST", route, "application/json", b, "invalid UTF-8")
        }
        7 => {
            // deep nesting
            let d = *r.pick(&[64usize, 200, 5000, 100_000]);
            let b = if r.below(2) == 0 {
                format!("{{\"inputs\": {}\"x\"{}}}", "[".repeat(d), "]".repeat(d))
            } else {
                format!("{}1{}", "{\"a\":".repeat(d), "}".repeat(d))
            };
            ("POST", route, "application/json", b.into_bytes(), "deep nesting")
        }
        8 => {
            // base64-looking inputs (images on image models, texts elsewhere)
            let s = *r.pick(&["iVBORw0KGgo=", "not base64!", "data:image/png;base64,AAAA", "data:text/plain,hi", "////", "=="]);
            let v = json!({"inputs": [s, s], "adapter": adapter});
            ("POST", route, "application/json", v.to_string().into_bytes(), "bad base64")
        }
        9 => {
            // hot-load paths
            let p = *r.pick(&["../", "/etc", "a/../../b", "\u{0}", "", ".", "missing", "x/./y", "~/.ssh", "%2e%2e"]);
            let long = "n".repeat(100);
            let n = *r.pick(&["ok", "", "../n", ".hidden", "a b", long.as_str(), "é"]);
            let v = json!({"name": n, "path": p});
            ("POST", "/adapters".into(), "application/json", v.to_string().into_bytes(), "hot-load paths")
        }
        10 => {
            // odd methods and paths
            let m = *r.pick(&["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]);
            let p = r.pick(&["/classify", "/adapters/%ff%fe", "/adapters/..%2f..", "/nope", "/adapters/x/y", "//", "/info?x=%00", "/adapters/"]).to_string();
            (m, p, "application/json", Vec::new(), "methods and paths")
        }
        11 => {
            // other content types, valid body
            let ct = *r.pick(&["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin1"]);
            ("POST", route, ct, valid.to_string().into_bytes(), "content types")
        }
        _ => {
            // mutated valid request: random extra, missing or renamed fields
            let mut v = valid.clone();
            let o = v.as_object_mut().expect("object");
            match r.below(3) {
                0 => {
                    o.remove(*r.pick(&["inputs", "adapter", "samples"]));
                }
                1 => {
                    o.insert(r.pick(&["sample", "Inputs", "extra", "truncation_direction", "prompt_name", "dimensions"]).to_string(), any_value(r, 1));
                }
                _ => {
                    o.insert("samples".into(), json!(*r.pick(&[0i64, 1, 64, 65, 100_000])));
                }
            }
            ("POST", route, "application/json", v.to_string().into_bytes(), "mutated fields")
        }
    }
}

fn main() {
    let mut url = "http://127.0.0.1:8080".to_string();
    let (mut n, mut secs, mut seed, mut adapter, mut limit) = (2000usize, 120.0f64, 1u64, String::new(), 2_000_000usize);
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        let v = it.next().unwrap_or_default();
        match f.as_str() {
            "--url" => url = v.trim_end_matches('/').to_string(),
            "--requests" => n = v.parse().unwrap_or(n),
            "--max-seconds" => secs = v.parse().unwrap_or(secs),
            "--seed" => seed = v.parse().unwrap_or(seed),
            "--adapter" => adapter = v,
            "--payload-limit" => limit = v.parse().unwrap_or(limit),
            other => {
                eprintln!("fuzz_requests: unknown flag {other}");
                std::process::exit(2);
            }
        }
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (mut statuses, mut categories) = (BTreeMap::<String, usize>::new(), BTreeMap::<&str, usize>::new());
    let (mut sent, mut server_errors, mut no_answer, mut closed_early) = (0usize, 0usize, 0usize, 0usize);
    let mut examples: Vec<String> = Vec::new();
    let t0 = Instant::now();
    while sent < n && t0.elapsed().as_secs_f64() < secs {
        let (method, path, ct, body, cat) = request(&mut r, &adapter);
        sent += 1;
        *categories.entry(cat).or_default() += 1;
        let full = format!("{url}{path}");
        let res = match method {
            "GET" => agent.get(&full).header("Content-Type", ct).call(),
            "HEAD" => agent.head(&full).call(),
            "DELETE" => agent.delete(&full).call(),
            "OPTIONS" => agent.options(&full).call(),
            "PUT" => agent.put(&full).header("Content-Type", ct).send(&body[..]),
            "PATCH" => agent.patch(&full).header("Content-Type", ct).send(&body[..]),
            _ => agent.post(&full).header("Content-Type", ct).send(&body[..]),
        };
        match res {
            Ok(mut resp) => {
                let st = resp.status().as_u16();
                let text = resp.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default();
                if st >= 500 {
                    server_errors += 1;
                    if examples.len() < 5 {
                        examples.push(format!("{st} {method} {path} [{cat}]: {}", text.chars().take(200).collect::<String>()));
                    }
                }
                *statuses.entry(st.to_string()).or_default() += 1;
            }
            Err(_) if body.len() > limit => closed_early += 1,
            Err(e) => {
                no_answer += 1;
                if examples.len() < 5 {
                    examples.push(format!("no answer {method} {path} [{cat}]: {e}"));
                }
            }
        }
    }
    let health = agent.get(format!("{url}/health")).call().map(|r| r.status().as_u16()).unwrap_or(0);
    let out = json!({
        "sent": sent, "seconds": t0.elapsed().as_secs_f64(), "statuses": statuses, "categories": categories,
        "server_errors_5xx": server_errors, "no_answer": no_answer, "closed_early_over_limit": closed_early, "health_after": health, "examples": examples,
    });
    println!("{out}");
    if server_errors > 0 || no_answer > 0 || health != 200 {
        std::process::exit(1);
    }
}
