//! PEFT-saved adapters load in Rust and reproduce PEFT's tensors and outputs
//! (fixtures: `tools/make_fixtures.py`, torch 2.15 + peft 0.21.2).

use candle_core::{DType, Tensor};
use pvera::{Mode, Sampling};

use crate::common::*;

fn report(failures: Vec<String>) {
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn projections_lambdas_and_delta_weights_match_peft() {
    let mut failures = Vec::new();
    let mut bit_exact = 0usize;
    for name in peft_cases() {
        let case = Case::load(&name);
        let pm = load_case_model(&case);
        let first = &case.adapters()[0].0;
        let info = pm.adapter(first).unwrap();
        // Projections: regenerated (save_projection=false) or loaded; bit for bit either way.
        for (key, ours) in [("pvera_A", info.projections.a()), ("pvera_B", info.projections.b())] {
            if bits_equal(ours, case.t(key)) {
                bit_exact += ours.elem_count();
            } else {
                failures.push(format!("{name}: {key} differs from PEFT's (max {})", max_abs_diff(ours, case.t(key))));
            }
        }
        for (adapter, _) in case.adapters() {
            for path in &pm.adapter(&adapter).unwrap().targets {
                let site = pm.registry().site(path).unwrap();
                let (lb, ld) = site
                    .with_slot(&adapter, |s| (s.lambda_b().as_tensor().clone(), s.lambda_d().as_tensor().clone()))
                    .unwrap();
                for (k, ours) in [(format!("lambda_b.{path}.{adapter}"), lb), (format!("lambda_d.{path}.{adapter}"), ld)] {
                    if !bits_equal(&ours, case.t(&k)) {
                        failures.push(format!("{name}: {k} not bit-equal"));
                    }
                }
                let k = format!("delta_weight.{path}.{adapter}");
                let dw = site.delta_weight(&adapter).unwrap();
                let want = case.t(&k).to_dtype(DType::F32).unwrap();
                let d = max_abs_diff(&dw, &want);
                if d > 1e-6 {
                    failures.push(format!("{name}: {k} max abs diff {d}"));
                }
            }
        }
    }
    assert!(bit_exact > 1000, "compared {bit_exact} projection elements");
    report(failures);
}

#[test]
fn eval_outputs_match_peft() {
    let mut failures = Vec::new();
    for name in peft_cases() {
        let case = Case::load(&name);
        if case.meta["sampling"]["mode"] == "sample_at_inference" {
            continue; // eval samples there; covered by the sampling test
        }
        let pm = load_case_model(&case);
        for (input, key) in [("input", "eval_output"), ("input_b1", "eval_output_b1")] {
            if !case.has(key) {
                continue;
            }
            let y = pm.model().forward(case.t(input)).unwrap();
            if y.dtype() != case.dtype() {
                failures.push(format!("{name}: output dtype {:?}, expected {:?}", y.dtype(), case.dtype()));
            }
            if let Some(m) = output_mismatch(&y, case.t(key), case.dtype()) {
                failures.push(format!("{name}: {key} {m}"));
            }
        }
    }
    report(failures);
}

#[test]
fn single_adapter_outputs_of_multi_adapter_models_match_peft() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in peft_cases() {
        let case = Case::load(&name);
        if case.adapters().len() < 2 {
            continue;
        }
        let mut pm = load_case_model(&case);
        for (adapter, _) in case.adapters() {
            let key = format!("eval_output_{adapter}");
            if !case.has(&key) {
                continue;
            }
            pm.set_adapter(&[adapter.as_str()]).unwrap();
            let y = pm.model().forward(case.t("input")).unwrap();
            let d = max_abs_diff(&y, case.t(&key));
            checked += 1;
            if d > tol(case.dtype()) {
                failures.push(format!("{name}: {key} max abs diff {d}"));
            }
        }
    }
    assert!(checked >= 2, "no multi-adapter case was checked");
    report(failures);
}

#[test]
fn disabled_merged_and_unmerged_match_peft() {
    let mut failures = Vec::new();
    for name in peft_cases() {
        let case = Case::load(&name);
        if case.meta["sampling"]["mode"] == "sample_at_inference" {
            continue;
        }
        let mut pm = load_case_model(&case);
        let tol = tol(case.dtype());
        let x = case.t("input").clone();
        if case.has("base_output") {
            let y = pm.with_adapters_disabled(|m| m.model().forward(&x).unwrap()).unwrap();
            let d = max_abs_diff(&y, case.t("base_output"));
            if d > tol {
                failures.push(format!("{name}: base_output max abs diff {d}"));
            }
        }
        if case.has("merged_output") {
            pm.merge_adapter(None, true).unwrap();
            for lin in pm.registry().sites() {
                let k = format!("merged_weight.{}", lin.site().path());
                if case.has(&k) {
                    let d = max_abs_diff(&lin.site().weight().unwrap(), case.t(&k));
                    if d > tol.max(1e-6) {
                        failures.push(format!("{name}: {k} max abs diff {d}"));
                    }
                }
            }
            let y = pm.model().forward(&x).unwrap();
            let d = max_abs_diff(&y, case.t("merged_output"));
            if d > tol.max(5e-6) {
                failures.push(format!("{name}: merged_output max abs diff {d}"));
            }
            pm.unmerge_adapter().unwrap();
            for lin in pm.registry().sites() {
                let k = format!("unmerged_weight.{}", lin.site().path());
                if case.has(&k) {
                    let d = max_abs_diff(&lin.site().weight().unwrap(), case.t(&k));
                    if d > tol.max(1e-6) {
                        failures.push(format!("{name}: {k} max abs diff {d}"));
                    }
                }
            }
            let y = pm.model().forward(&x).unwrap();
            if case.has("eval_output") {
                let d = max_abs_diff(&y, case.t("eval_output"));
                if d > tol.max(5e-6) {
                    failures.push(format!("{name}: eval after unmerge max abs diff {d}"));
                }
            }
        }
    }
    report(failures);
}

fn run_calls(pm: &pvera::PeftModel<TestModel>, case: &Case, calls: &Value, inputs: &Value) -> Vec<(String, Tensor)> {
    calls
        .as_array()
        .unwrap()
        .iter()
        .zip(inputs.as_array().unwrap())
        .map(|(c, i)| {
            let y = pm.model().forward(case.t(i.as_str().unwrap())).unwrap();
            (c.as_str().unwrap().to_string(), y)
        })
        .collect()
}

use serde_json::Value;

#[test]
fn seeded_sampling_matches_peft() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in peft_cases() {
        let case = Case::load(&name);
        let sampling = &case.meta["sampling"];
        if sampling.is_null() {
            continue;
        }
        let pm = load_case_model(&case);
        let per_module = !sampling["per_module"].is_null();
        if sampling["mode"] == "train" {
            pm.train().unwrap();
        } else {
            pm.eval().unwrap();
            if per_module {
                // PEFT reads a non-empty dict as "sample everywhere" (docs/peft-behaviour.md §4); reproduce
                // that reading through the run-time override.
                pm.state().set_sampling(Sampling::Always).unwrap();
            }
        }
        for (call, y) in run_calls(&pm, &case, &sampling["calls"], &sampling["inputs"]) {
            checked += 1;
            let d = max_abs_diff(&y, case.t(&call));
            if d > 2e-6 {
                failures.push(format!("{name}: {call} max abs diff {d}"));
            }
        }
        if per_module {
            // The documented meaning of the dict: sample only in the named modules.
            let pm = load_case_model(&case);
            pm.eval().unwrap();
            assert_eq!(pm.state().mode(), Mode::Eval);
            let pmod = &sampling["per_module"];
            for (call, y) in run_calls(&pm, &case, &pmod["calls"], &pmod["inputs"]) {
                checked += 1;
                let d = max_abs_diff(&y, case.t(&call));
                if d > 2e-6 {
                    failures.push(format!("{name}: {call} (per-module dict) max abs diff {d}"));
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} sampled outputs checked");
    report(failures);
}

#[test]
fn peft_files_round_trip_through_rust_bit_for_bit() {
    let mut failures = Vec::new();
    for name in peft_cases() {
        let case = Case::load(&name);
        let pm = load_case_model(&case);
        let tmp = tempfile::tempdir().unwrap();
        pm.save_pretrained(tmp.path(), None).unwrap();
        for (adapter, dir) in case.adapters() {
            let ours = pvera::checkpoint::adapter_dir(tmp.path(), &adapter);
            let (want, _) = pvera::checkpoint::read_safetensors(&dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
            let (got, meta) = pvera::checkpoint::read_safetensors(&ours.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
            if meta.get("format").map(String::as_str) != Some("pt") {
                failures.push(format!("{name}/{adapter}: metadata {meta:?}"));
            }
            let wk: Vec<_> = want.keys().collect();
            let gk: Vec<_> = got.keys().collect();
            if wk != gk {
                failures.push(format!("{name}/{adapter}: keys differ:\n  peft {wk:?}\n  ours {gk:?}"));
                continue;
            }
            for (k, w) in &want {
                let g = &got[k];
                if w.file_dtype != g.file_dtype || !bits_equal(&w.tensor, &g.tensor) {
                    failures.push(format!("{name}/{adapter}: {k} differs ({} vs {})", w.file_dtype, g.file_dtype));
                }
            }
            // The configs agree on every PEFT field.
            let a: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
            let b: Value = serde_json::from_str(&std::fs::read_to_string(ours.join("adapter_config.json")).unwrap()).unwrap();
            for (k, v) in a.as_object().unwrap() {
                if matches!(k.as_str(), "peft_version" | "auto_mapping") {
                    continue;
                }
                let mut v = v.clone();
                let mut w = b[k].clone();
                if let (Some(x), Some(y)) = (v.as_array_mut(), w.as_array_mut()) {
                    // PEFT writes sets in hash order.
                    x.sort_by_key(|e| e.to_string());
                    y.sort_by_key(|e| e.to_string());
                }
                if v != w {
                    failures.push(format!("{name}/{adapter}: config {k}: peft {v} ours {w}"));
                }
            }
        }
        // Reload what we wrote: the same outputs.
        if case.meta["sampling"].is_null() {
            let (model, reg, info) = build_base(&case);
            let adapters = case.adapters();
            let mut pm2 = pvera::PeftModel::from_pretrained(
                model, reg, info, &pvera::checkpoint::adapter_dir(tmp.path(), &adapters[0].0), &adapters[0].0, false,
            )
            .unwrap();
            for (a, _) in &adapters[1..] {
                pm2.load_adapter(&pvera::checkpoint::adapter_dir(tmp.path(), a), a, false).unwrap();
            }
            let active = case.active();
            pm2.set_adapter(&active.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
            let y1 = pm.model().forward(case.t("input")).unwrap();
            let y2 = pm2.model().forward(case.t("input")).unwrap();
            if !bits_equal(&y1, &y2) {
                failures.push(format!("{name}: reloaded Rust adapter gives other outputs ({})", max_abs_diff(&y1, &y2)));
            }
        }
    }
    report(failures);
}

/// Prints the parity figures per case (run with `--nocapture`) and bounds the worst of them.
#[test]
fn parity_summary() {
    let mut rows = Vec::new();
    let (mut worst_eval, mut worst_sampled, mut exact_params, mut total_params) = (0f32, 0f32, 0usize, 0usize);
    for name in peft_cases() {
        let case = Case::load(&name);
        let pm = load_case_model(&case);
        let mut eval = f32::NAN;
        let mut sampled = f32::NAN;
        if !case.meta["sampling"].is_null() {
            let s = &case.meta["sampling"];
            if s["mode"] == "train" {
                pm.train().unwrap();
            } else if !s["per_module"].is_null() {
                pm.state().set_sampling(Sampling::Always).unwrap();
            }
            let mut m = 0f32;
            for (call, y) in run_calls(&pm, &case, &s["calls"], &s["inputs"]) {
                m = m.max(max_abs_diff(&y, case.t(&call)));
            }
            sampled = m;
            worst_sampled = worst_sampled.max(m);
            pm.eval().unwrap();
            pm.state().set_sampling(Sampling::Never).unwrap();
        }
        if case.has("eval_output") {
            eval = max_abs_diff(&pm.model().forward(case.t("input")).unwrap(), case.t("eval_output"));
            if case.dtype() == DType::F32 {
                worst_eval = worst_eval.max(eval);
            }
        }
        let first = &case.adapters()[0].0;
        let p = &pm.adapter(first).unwrap().projections;
        for (k, t) in [("pvera_A", p.a()), ("pvera_B", p.b())] {
            total_params += t.elem_count();
            if bits_equal(t, case.t(k)) {
                exact_params += t.elem_count();
            }
        }
        rows.push(format!("{name:<24} {:<9} eval {eval:>10.3e}  sampled {sampled:>10.3e}", format!("{:?}", case.dtype())));
    }
    eprintln!("case                     dtype     max |rust - peft|");
    for r in &rows {
        eprintln!("{r}");
    }
    eprintln!("projection elements bit-exact: {exact_params}/{total_params}; worst f32 eval {worst_eval:.3e}; worst sampled {worst_sampled:.3e}");
    assert_eq!(exact_params, total_params);
    assert!(worst_eval < 1e-5 && worst_sampled < 1e-5);
}
