# /// script
# requires-python = ">=3.10"
# dependencies = ["numpy>=1.24", "safetensors>=0.4"]
# ///
"""The serving measurements of BENCHMARKS.md ("Serving") and docs/serving.md, side by side in one run on
loopback: `pvera serve` against the server a PEFT user would write (tools/serve_peft.py: FastAPI + uvicorn +
transformers + PEFT), same model, adapter and threads. Every tool stops by itself (request counts and time caps).

    cargo build --release -p pvera-cli && cargo build --release -p pvera-server --examples
    python3 tools/serve_bench.py --model .cache/assets/minilm --adapter .cache/runs/spamassassin-minilm/best \
        --texts .cache/assets/spamassassin/mails.jsonl [--python /work/venv/bin/python] [--out .cache/serve-bench]

Phases (each prints a JSON line and lands in <out>/results.json):
  cold      process start -> first answered /predict (pvera, Python)
  one       /predict, one text per request, C concurrent clients (C in --concurrency), both servers alternating
  many      100 different adapters (tools/make_adapter_variants.py), every request a random one: pvera hot-loads
            them (hot-load times), PEFT loads them with load_adapter; both at the highest concurrency
  memory    RSS of pvera serve before and after hot-loading 1,000 adapters (each file with its own A/B copy)
  reliable  Monte Carlo (4 samples, seed 5) and mean-mode load over 3 adapters, 8 texts per request, every answer
            checked against `pvera predict --json` on the same texts (equal records; mean mode within 1e-6), with a
            hot-load, an unload of a used adapter and its reload during the run
  fuzz      tools' request fuzzer against the MiniLM server and against the tiny ViT fixture (base64 images)
  sigterm   SIGTERM under load: exit code and whether any answer was cut short
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict | list | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            code = r.status
    except urllib.error.HTTPError as e:
        text, code = e.read().decode(), e.code
    try:
        return code, json.loads(text)
    except json.JSONDecodeError:
        return code, text


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def load() -> float:
    return round(os.getloadavg()[0], 2)


class Proc:
    """A server process; `url` once it answers."""

    def __init__(self, cmd: list[str], port: int, name: str, log: Path):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.t0 = time.time()
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, probe: dict, timeout: float = 300.0) -> float:
        """Seconds from process start to the first 200 on /predict."""
        while time.time() - self.t0 < timeout:
            if self.p.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.p.returncode}; see {self.log.name}")
            try:
                code, _ = http("POST", self.url + "/predict", probe, timeout=30)
                if code == 200:
                    return time.time() - self.t0
            except OSError:
                pass
            time.sleep(0.02)
        raise SystemExit(f"{self.name} did not answer within {timeout}s")

    def stop(self) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        return self.p.returncode


def run_json(cmd: list[str], timeout: float) -> dict:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"{cmd[0]} printed no result (exit {out.returncode}): {out.stderr[-2000:]}")
    r = json.loads(lines[-1])
    r["exit"] = out.returncode
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--texts", type=Path, required=True)
    ap.add_argument("--python", default=sys.executable, help="interpreter with torch, transformers, peft, fastapi, uvicorn")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache/serve-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=30.0, help="time cap of each load run")
    ap.add_argument("--phases", default="cold,one,many,memory,reliable,fuzz,sigterm")
    args = ap.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
    pvera, loadgen, fuzz = target / "pvera", target / "examples/loadgen", target / "examples/fuzz_requests"
    for b in (pvera, loadgen, fuzz):
        if not b.exists():
            raise SystemExit(f"{b} is missing: cargo build --release -p pvera-cli && cargo build --release -p pvera-server --examples")
    args.out.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    results: dict = {"cpu": subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1].splitlines()[0].strip(),
                     "cores": os.cpu_count(), "threads": args.threads, "load_start": load()}
    probe = {"inputs": "free money, click now", "truncate": True}
    texts = ["--texts", str(args.texts), "--limit", "400"]

    def pvera_server(extra: list[str], name: str = "pvera") -> Proc:
        port = free_port()
        return Proc([str(pvera), "serve", "--model", str(args.model), "--threads", str(args.threads), "--port", str(port),
                     "--max-concurrent-requests", "256", *extra], port, name, args.out / f"{name}.log")

    def python_server(extra: list[str], name: str = "peft") -> Proc:
        port = free_port()
        env_threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        os.environ.update(env_threads)
        return Proc([args.python, str(ROOT / "tools/serve_peft.py"), "--model", str(args.model), "--port", str(port),
                     "--threads", str(args.threads), *extra], port, name, args.out / f"{name}.log")

    def loadrun(url: str, c: int, extra: list[str], requests: int | None = None, seconds: float | None = None) -> dict:
        # warm-up, not counted
        run_json([str(loadgen), "--url", url, "--concurrency", str(c), "--requests", str(2 * c), *texts, *extra], 300)
        r = run_json([str(loadgen), "--url", url, "--concurrency", str(c), "--requests", str(requests or args.requests),
                      "--max-seconds", str(seconds or args.seconds), *texts, *extra], (seconds or args.seconds) + 300)
        r["load"] = load()
        return r

    def emit(key: str, value) -> None:
        results[key] = value
        print(json.dumps({key: value}), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    one_adapter = ["--adapter", f"spam={args.adapter}"]
    conc = [int(c) for c in args.concurrency.split(",")]
    if "cold" in phases or "one" in phases:
        cold = {}
        p = pvera_server(one_adapter)
        cold["pvera_s"] = p.wait_ready(probe)
        q = python_server(["--adapter", f"spam={args.adapter}"])
        cold["peft_s"] = q.wait_ready(probe)
        cold["load"] = load()
        emit("cold", cold)
        if "one" in phases:
            runs = []
            for c in conc:
                for side, srv in (("pvera", p), ("peft", q)):
                    r = loadrun(srv.url, c, ["--route", "/predict", "--truncate"])
                    r["server"] = side
                    runs.append(r)
                    print(json.dumps(r), flush=True)
            emit("one", runs)
        emit("rss_one_adapter_kb", {"pvera": rss_kb(p.p.pid), "peft": rss_kb(q.p.pid)})
        p.stop()
        q.stop()

    variants = args.out / "variants"
    if any(x in phases for x in ("many", "memory", "reliable", "sigterm")) and not (variants / "a0999").exists():
        subprocess.run([args.python, str(ROOT / "tools/make_adapter_variants.py"), str(args.adapter), str(variants), "--count", "1000"],
                       check=True, cwd=ROOT)
    names100 = [f"a{i:04d}" for i in range(100)]

    if "many" in phases:
        c = max(conc)
        p = pvera_server(["--adapter", f"a0000={variants / 'a0000'}", "--adapter-dir", str(variants)])
        p.wait_ready(probe)
        loads = []
        for n in names100[1:]:
            t = time.time()
            code, r = http("POST", p.url + "/adapters", {"name": n, "path": n})
            assert code == 201, r
            loads.append({"server_ms": r["load_ms"], "client_ms": (time.time() - t) * 1e3})
        rp = loadrun(p.url, c, ["--route", "/predict", "--truncate", "--adapters", ",".join(names100)])
        rp1 = loadrun(p.url, c, ["--route", "/predict", "--truncate", "--adapters", "a0000"])
        p.stop()
        q = python_server(["--adapter-dir", str(variants), "--adapters-from-dir", "100"])
        t_cold = q.wait_ready({**probe, "adapter": "a0000"})
        rss_q = rss_kb(q.p.pid)
        rq = loadrun(q.url, c, ["--route", "/predict", "--truncate", "--adapters", ",".join(names100)])
        rq1 = loadrun(q.url, c, ["--route", "/predict", "--truncate", "--adapters", "a0000"])
        q.stop()
        srt = sorted(x["server_ms"] for x in loads)
        emit("many", {"concurrency": c, "pvera_100": rp, "pvera_1": rp1, "peft_100": rq, "peft_1": rq1,
                      "peft_start_with_100_s": t_cold, "peft_rss_100_kb": rss_q,
                      "hot_load_ms": {"median": srt[len(srt) // 2], "p90": srt[int(len(srt) * 0.9)], "max": srt[-1],
                                      "client_median": sorted(x["client_ms"] for x in loads)[len(loads) // 2]}})

    if "memory" in phases:
        p = pvera_server(["--adapter", f"a0000={variants / 'a0000'}", "--adapter-dir", str(variants)])
        p.wait_ready(probe)
        for _ in range(20):
            http("POST", p.url + "/predict", probe)
        steps = [{"adapters": 1, "rss_kb": rss_kb(p.p.pid)}]
        times = []
        for i in range(1, 1000):
            n = f"a{i:04d}"
            code, r = http("POST", p.url + "/adapters", {"name": n, "path": n})
            assert code == 201, r
            times.append(r["load_ms"])
            if (i + 1) % 100 == 0:
                steps.append({"adapters": i + 1, "rss_kb": rss_kb(p.p.pid)})
        code, r = http("POST", p.url + "/predict", {**probe, "adapter": "a0999"})
        assert code == 200, r
        steps.append({"adapters": 1000, "after_request_rss_kb": rss_kb(p.p.pid)})
        _, info = http("GET", p.url + "/info")
        p.stop()
        times.sort()
        per = (steps[-2]["rss_kb"] - steps[0]["rss_kb"]) / 999
        emit("memory", {"steps": steps, "per_adapter_kb": per, "projection_groups": info["projection_groups"],
                        "hot_load_ms": {"median": times[len(times) // 2], "p90": times[int(len(times) * 0.9)], "max": times[-1]}})

    if "reliable" in phases:
        three = ["a0000", "a0001", "a0002"]
        exp = args.out / "expect"
        exp.mkdir(exist_ok=True)
        lim = 64
        all_texts = [json.loads(l)["text"] for l in args.texts.read_text().splitlines()[:lim]]
        lines = args.out / "reliable-texts.txt"
        # one text per line (newlines inside a mail become spaces; the loadgen reads the same file)
        lines.write_text("".join(" ".join(t.split()) + "\n" for t in all_texts))
        # The offline answers, one `pvera predict` per request's group of 8 texts: an input's Monte Carlo noise
        # comes from its position in the request (per-input noise), so each group is numbered from 0 as it is
        # in a request.
        flat = [" ".join(t.split()) for t in all_texts]
        for n in three:
            preds = []
            for g in range(0, lim, 8):
                part = args.out / "reliable-group.txt"
                part.write_text("".join(t + "\n" for t in flat[g:g + 8]))
                out = subprocess.run([str(pvera), "predict", "--model", str(args.model), "--adapter", str(variants / n), "--json",
                                      "--samples", "4", "--seed", "5", "--threads", str(args.threads), "--lines", str(part)],
                                     capture_output=True, text=True, cwd=ROOT, check=True)
                preds.extend(json.loads(out.stdout)["predictions"])
            doc = json.loads(out.stdout)
            doc["predictions"] = preds
            (exp / f"{n}.json").write_text(json.dumps(doc))
        rel = {}
        for mode, extra in (("monte_carlo", ["--samples", "4", "--seed", "5"]), ("mean_mode", [])):
            p = pvera_server(["--adapter", f"a0000={variants / 'a0000'}", "--adapter", f"a0001={variants / 'a0001'}",
                              "--adapter", f"a0002={variants / 'a0002'}", "--adapter-dir", str(variants)])
            p.wait_ready(probe)
            t0 = time.time()
            lg = subprocess.Popen([str(loadgen), "--url", p.url, "--route", "/classify", "--texts", str(lines), "--group", "8",
                                   "--concurrency", "8", "--requests", "100000", "--max-seconds", "40", "--truncate",
                                   "--adapters", ",".join(three), "--expect", str(exp), *extra],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
            # during the run: hot-load a fourth adapter, unload one the clients use, load it back
            events = []
            for at, method, path, body in ((10, "POST", "/adapters", {"name": "hot", "path": "a0003"}),
                                           (20, "DELETE", "/adapters/a0002", None),
                                           (30, "POST", "/adapters", {"name": "a0002", "path": "a0002"})):
                time.sleep(max(0.0, at - (time.time() - t0)))
                code, r = http(method, p.url + path, body)
                events.append({"at_s": round(time.time() - t0, 1), "request": f"{method} {path}", "status": code})
            out, _ = lg.communicate(timeout=600)
            r = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
            r["events"] = events
            r["exit_code"] = p.stop()
            rel[mode] = r
        emit("reliable", rel)

    if "fuzz" in phases:
        p = pvera_server(one_adapter + ["--adapter-dir", str(args.out)])
        p.wait_ready(probe)
        fz = run_json([str(fuzz), "--url", p.url, "--requests", "5000", "--max-seconds", "240", "--seed", "1", "--adapter", "spam"], 600)
        fz["rss_kb_after"] = rss_kb(p.p.pid)
        fz["exit_code"] = p.stop()
        fx = ROOT / "crates/pvera/tests/fixtures/models/vit_task"
        port = free_port()
        v = Proc([str(pvera), "serve", "--model", str(fx / "model"), "--adapter", f"vit={fx / 'adapter'}", "--port", str(port)],
                 port, "vit", args.out / "vit.log")
        while True:
            try:
                if http("GET", v.url + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        fv = run_json([str(fuzz), "--url", v.url, "--requests", "2000", "--max-seconds", "120", "--seed", "2", "--adapter", "vit"], 400)
        fv["exit_code"] = v.stop()
        emit("fuzz", {"minilm": fz, "vit_images": fv})

    if "sigterm" in phases:
        p = pvera_server(one_adapter)
        p.wait_ready(probe)
        lg = subprocess.Popen([str(loadgen), "--url", p.url, "--route", "/classify", *texts, "--group", "4", "--samples", "4",
                               "--concurrency", "8", "--requests", "100000", "--max-seconds", "8", "--truncate"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(3)
        t = time.time()
        p.p.send_signal(signal.SIGTERM)
        code = p.p.wait(60)
        stop_s = time.time() - t
        p.log.close()
        out, _ = lg.communicate(timeout=120)
        r = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
        emit("sigterm", {"exit_code": code, "stop_seconds": stop_s, "load": r})

    results["load_end"] = load()
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
