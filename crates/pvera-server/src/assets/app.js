// pvera serve playground: pick an adapter and a number of samples, classify texts or images
// through POST /classify, and draw each class's mean probability with the interval of the
// predicted class. `/?selftest=1` fills the form, classifies, checks the drawing and writes
// "SELFTEST PASS ..." / "SELFTEST FAIL ..." into <pre id="selftest"> (the headless-browser test).
"use strict";

const $ = (id) => document.getElementById(id);
let modality = "text";
let images = []; // {name, url} (data URLs)

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body),
  };
  const r = await fetch(path, init);
  const j = await r.json().catch(() => ({error: `HTTP ${r.status} without a JSON body`, error_type: "?"}));
  if (!r.ok) throw new Error(`${r.status} ${j.error_type}: ${j.error}`);
  return j;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function loadInfo() {
  const info = await api("/info");
  modality = info.model.modality;
  $("model").textContent =
    `${info.model.model_type} (${modality}) from ${info.model.path}; ${info.adapters.length} adapter(s), ` +
    `up to ${info.limits.max_samples} samples and ${info.limits.max_client_batch_size} inputs per request`;
  const sel = $("adapter");
  sel.replaceChildren();
  for (const a of info.adapters) {
    const o = el("option", "", `${a.name} (${a.labels.join(", ")})`);
    o.value = a.name;
    o.selected = a.name === info.default_adapter;
    sel.append(o);
  }
  $("text-input").hidden = modality !== "text";
  $("image-input").hidden = modality !== "image";
  return info;
}

function showThumbs() {
  const t = $("thumbs");
  t.replaceChildren();
  for (const im of images) {
    const i = el("img");
    i.src = im.url;
    i.alt = i.title = im.name;
    t.append(i);
  }
}

function addFiles(files) {
  for (const f of files) {
    if (!/^image\/(png|jpeg)$/.test(f.type)) continue;
    const rd = new FileReader();
    rd.onload = () => {
      images.push({name: f.name, url: rd.result});
      showThumbs();
    };
    rd.readAsDataURL(f);
  }
}

function currentInputs() {
  if (modality === "image") return images.map((i) => i.url);
  return $("texts").value.split("\n").map((s) => s.trim()).filter(Boolean);
}

const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));

function render(res, inputs) {
  const out = $("results");
  out.replaceChildren();
  res.predictions.forEach((p, k) => {
    const card = el("div", "card prediction");
    const h = el("h3");
    if (modality === "image") {
      const i = el("img");
      i.src = inputs[k];
      i.alt = `image ${k}`;
      h.append(i, `image ${k}`);
    } else {
      h.textContent = p.input;
    }
    card.append(h);
    const st = el("div", "stats");
    const parts = [["predicted ", p.predicted], [" p = ", fmt(p.probability)]];
    if (p.samples > 1) {
      parts.push([" · votes ", `${Math.round(p.vote_share * 100)}%`], [" · entropy ", fmt(p.predictive_entropy, 4)],
        [" · MI ", fmt(p.mutual_information, 5)], [" · mean mode ", `${p.mean_mode.predicted} ${fmt(p.mean_mode.probability)}`]);
    } else {
      parts.push([" · entropy ", fmt(p.predictive_entropy, 4)], [" · mean mode only", ""]);
    }
    for (const [label, value] of parts) {
      st.append(label);
      if (value !== "") st.append(el("b", "", value));
    }
    card.append(st);
    for (const label of res.labels) {
      const q = p.mean_probs[label];
      const row = el("div", label === p.predicted ? "cls top" : "cls");
      row.append(el("span", "name", label));
      const track = el("div", "track");
      const bar = el("div", "bar");
      bar.style.width = `${(q * 100).toFixed(2)}%`;
      track.append(bar);
      if (p.interval && label === p.modal_class) {
        const iv = el("div", "interval");
        iv.style.left = `${(p.interval[0] * 100).toFixed(2)}%`;
        iv.style.width = `${Math.max(0.4, (p.interval[1] - p.interval[0]) * 100).toFixed(2)}%`;
        iv.title = `${Math.round(p.confidence * 100)}% interval [${fmt(p.interval[0])}, ${fmt(p.interval[1])}]`;
        track.append(iv);
      }
      row.append(track, el("span", "value", fmt(q)));
      card.append(row);
    }
    out.append(card);
  });
}

async function classify() {
  const inputs = currentInputs();
  if (!inputs.length) throw new Error(modality === "image" ? "drop an image first" : "type a text first");
  const body = {
    inputs,
    adapter: $("adapter").value,
    samples: Number($("samples").value),
    seed: Number($("seed").value),
    confidence: Number($("confidence").value),
    truncate: $("truncate").checked,
  };
  const res = await api("/classify", body);
  render(res, inputs);
  return res;
}

function status(text, error) {
  const s = $("status");
  s.textContent = text;
  s.className = error ? "error" : "";
}

// A 32x32 test picture for the image self-test.
function testPng() {
  const c = document.createElement("canvas");
  c.width = c.height = 32;
  const g = c.getContext("2d");
  for (let y = 0; y < 32; y++) {
    for (let x = 0; x < 32; x++) {
      g.fillStyle = `rgb(${x * 8},${y * 8},${(x + y) * 4})`;
      g.fillRect(x, y, 1, 1);
    }
  }
  return c.toDataURL("image/png");
}

async function selftest() {
  const out = el("pre");
  out.id = "selftest";
  out.textContent = "SELFTEST RUNNING";
  document.body.append(out);
  try {
    if (modality === "image") {
      images = [{name: "a.png", url: testPng()}, {name: "b.png", url: testPng()}];
      showThumbs();
    } else {
      $("texts").value = "free money prize\nnotes from lunch";
    }
    $("samples").value = "4";
    $("seed").value = "3";
    const res = await classify();
    const n = currentInputs().length;
    const cards = document.querySelectorAll("#results .card.prediction").length;
    const bars = document.querySelectorAll("#results .bar").length;
    const intervals = document.querySelectorAll("#results .interval").length;
    const sums = res.predictions.map((p) => Object.values(p.mean_probs).reduce((a, b) => a + b, 0));
    const ok = cards === n && bars === n * res.labels.length && intervals === n && sums.every((s) => Math.abs(s - 1) < 1e-6);
    out.textContent = `SELFTEST ${ok ? "PASS" : "FAIL"} inputs=${n} cards=${cards} bars=${bars} intervals=${intervals} ` +
      `labels=${res.labels.join(",")} predicted=${res.predictions.map((p) => p.predicted).join(",")} ` +
      `mi=${res.predictions.map((p) => fmt(p.mutual_information, 6)).join(",")}`;
  } catch (e) {
    out.textContent = `SELFTEST FAIL ${e.message}`;
  }
}

async function main() {
  $("form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    status("classifying…");
    const t0 = performance.now();
    try {
      const res = await classify();
      status(`${res.predictions.length} input(s) in ${Math.round(performance.now() - t0)} ms`);
    } catch (e) {
      status(e.message, true);
    }
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    addFiles(ev.dataTransfer.files);
  });
  $("files").addEventListener("change", (ev) => addFiles(ev.target.files));
  try {
    await loadInfo();
  } catch (e) {
    status(e.message, true);
  }
  if (new URLSearchParams(location.search).has("selftest")) await selftest();
}

main();
