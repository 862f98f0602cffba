//! The playground page (`GET /`) in a real headless browser: Debian's chromium loads
//! `/?selftest=1`, whose script fills the form, calls `/classify`, draws the bars and intervals
//! and writes `SELFTEST PASS ...` into the page; the test reads the dumped DOM. Chromium is
//! installed by `tools/install_chromium.sh` when missing; if it cannot be had the test fails
//! with the reason (it never skips).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";

fn chromium() -> PathBuf {
    if !Path::new(CHROMIUM).is_file() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/install_chromium.sh");
        let out = Command::new("bash").arg(&script).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success() && Path::new(CHROMIUM).is_file(),
            "the playground test needs a headless browser and {} could not install Debian's chromium (exit {:?}): {}{}\n\
             install it with `apt-get install -y chromium` and rerun",
            script.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    PathBuf::from(CHROMIUM)
}

/// The DOM of `url` after its scripts ran (at most 60 s).
fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=20000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("chromium did not finish loading {url} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn selftest_line(dom: &str) -> String {
    let start = dom.find("SELFTEST").unwrap_or_else(|| panic!("no self-test result in the page:\n{dom}"));
    dom[start..].split('<').next().unwrap_or_default().to_string()
}

#[test]
fn playground_classifies_texts_in_a_real_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    make_adapter(&a, 1, &["ham", "spam"], 16);
    let s = TestServer::start(config(&[("spam", &a)]));
    let dom = dump_dom(&s.url("/?selftest=1"));
    let line = selftest_line(&dom);
    assert!(line.starts_with("SELFTEST PASS inputs=2 cards=2 bars=4 intervals=2 labels=ham,spam"), "{line}");
    assert!(dom.contains("free money prize") && dom.contains("class=\"interval\""), "{dom}");
    // the served page was rendered from /info: the adapter is in the select
    assert!(dom.contains("spam (ham, spam)"), "{dom}");
}

#[test]
fn playground_classifies_images_in_a_real_browser() {
    let mut cfg = config(&[("vit", &fixtures().join("models/vit_task/adapter"))]);
    cfg.model = fixtures().join("models/vit_task/model");
    cfg.tokenizer = None;
    let s = TestServer::start(cfg);
    let line = selftest_line(&dump_dom(&s.url("/?selftest=1")));
    assert!(line.starts_with("SELFTEST PASS inputs=2 cards=2 bars=6 intervals=2"), "{line}");
}
