//! The training library: AdamW, schedules and shuffling against PyTorch / transformers
//! (`tools/make_train_fixtures.py`), and the trainer end to end on PEFT's test MLP.
#![allow(clippy::result_large_err)] // pvera::Error is the crate's error type

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use pvera::config::TargetModules;
use pvera::peft_model::NamedVar;
use pvera::train::{
    shuffled_indices, AdamW, AdamWConfig, Batches, GradAccumulator, Gradients, Objective, Schedule, ScheduleKind,
    StepOutput, StopReason, TrainConfig, TrainData, TrainEvent, Trainer, Warmup,
};
use pvera::{Error, PeftModel, PveraConfig, TorchGenerator};
use serde_json::Value;

use crate::common::*;

// =================================================================================================
// Parity with torch / transformers
// =================================================================================================

fn fixture() -> Value {
    let path = fixtures().join("train/torch_train.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("run tools/make_train_fixtures.py")).unwrap()
}

fn f32s(bits: &Value) -> Vec<f32> {
    bits.as_array().unwrap().iter().map(|b| f32::from_bits(b.as_u64().unwrap() as u32)).collect()
}

fn tensor(bits: &Value, shape: &[usize]) -> Tensor {
    Tensor::from_vec(f32s(bits), shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs one AdamW fixture case from step `from` to `to` on `opt`, checking against torch.
/// Returns the largest parameter and norm differences.
fn run_adamw_steps(case: &Value, opt: &mut AdamW, vars: &[Var], from: usize, to: usize) -> (f32, f64) {
    let shapes: Vec<Vec<usize>> = case["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())
        .collect();
    let names: Vec<String> = case["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().into()).collect();
    let mut worst_p = 0f32;
    let mut worst_norm = 0f64;
    for (k, step) in case["steps"].as_array().unwrap().iter().enumerate().take(to).skip(from) {
        opt.set_lr(step["lr"].as_f64().unwrap());
        let micro = step["micro_grads"].as_array().unwrap();
        let mut acc = GradAccumulator::new(micro.len()).unwrap();
        for row in micro {
            let grads: Vec<Option<Tensor>> = row
                .as_array()
                .unwrap()
                .iter()
                .zip(&shapes)
                .map(|(g, s)| (!g.is_null()).then(|| tensor(g, s)))
                .collect();
            acc.add(Gradients::from_parts(names.clone(), grads).unwrap()).unwrap();
        }
        let mut grads = acc.take().unwrap().unwrap();
        if let Some(max) = step["max_norm"].as_f64() {
            let norm = grads.clip_by_global_norm(max).unwrap();
            let want = f64::from(f32::from_bits(step["norm_bits"].as_u64().unwrap() as u32));
            let rel = (norm - want).abs() / want;
            assert!(rel < 1e-6, "{} step {k}: clip_grad_norm_ {norm} vs torch {want}", case["name"]);
            worst_norm = worst_norm.max(rel);
        }
        opt.step(&grads).unwrap();
        for (i, v) in vars.iter().enumerate() {
            let want = f32s(&step["params"][i]);
            let d = max_diff(&values(v.as_tensor()), &want);
            assert!(d <= 1e-6, "{} step {k} param {i}: max |rust - torch| = {d:e}", case["name"]);
            worst_p = worst_p.max(d);
        }
    }
    (worst_p, worst_norm)
}

fn new_case_optimizer(case: &Value) -> (AdamW, Vec<Var>) {
    let shapes: Vec<Vec<usize>> = case["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())
        .collect();
    let vars: Vec<Var> = case["initial"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&shapes)
        .map(|(b, s)| Var::from_tensor(&tensor(b, s)).unwrap())
        .collect();
    let named = vars
        .iter()
        .zip(case["names"].as_array().unwrap())
        .map(|(v, n)| NamedVar { name: n.as_str().unwrap().into(), var: v.clone() })
        .collect();
    let betas = case["betas"].as_array().unwrap();
    let cfg = AdamWConfig {
        lr: case["lr"].as_f64().unwrap(),
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: case["eps"].as_f64().unwrap(),
        weight_decay: case["weight_decay"].as_f64().unwrap(),
    };
    (AdamW::new(named, cfg).unwrap(), vars)
}

#[test]
fn adamw_with_clipping_and_accumulation_matches_torch() {
    let fx = fixture();
    let mut report = Vec::new();
    for case in fx["adamw"].as_array().unwrap() {
        let (mut opt, vars) = new_case_optimizer(case);
        let n = case["steps"].as_array().unwrap().len();
        let (dp, dn) = run_adamw_steps(case, &mut opt, &vars, 0, n);
        // Final optimizer state.
        let state = opt.state_tensors().unwrap();
        for (i, name) in case["names"].as_array().unwrap().iter().enumerate() {
            let name = name.as_str().unwrap();
            let want = &case["state"][i];
            if want.is_null() {
                assert!(!state.contains_key(&format!("{name}::step")));
                continue;
            }
            assert_eq!(opt.var_step(name), Some(want["step"].as_u64().unwrap()), "{name} step count");
            for key in ["exp_avg", "exp_avg_sq"] {
                let d = max_diff(&values(&state[&format!("{name}::{key}")]), &f32s(&want[key]));
                assert!(d <= 1e-6, "{} {name} {key}: {d:e}", case["name"]);
            }
        }
        report.push(format!("{}: params {dp:.1e}, clip norm rel {dn:.1e}", case["name"].as_str().unwrap()));
    }
    eprintln!("AdamW vs torch.optim.AdamW, max |diff| over all steps: {}", report.join("; "));
}

#[test]
fn adamw_state_round_trip_continues_bit_for_bit() {
    let fx = fixture();
    for case in fx["adamw"].as_array().unwrap() {
        let n = case["steps"].as_array().unwrap().len();
        let (mut straight, vars_a) = new_case_optimizer(case);
        run_adamw_steps(case, &mut straight, &vars_a, 0, n);

        let (mut first, vars_b) = new_case_optimizer(case);
        run_adamw_steps(case, &mut first, &vars_b, 0, 2);
        let state = first.state_tensors().unwrap();
        // Through a safetensors file, as the trainer saves it.
        let bytes = pvera::checkpoint::serialize_safetensors(&state, None).unwrap();
        let (read, _) = pvera::checkpoint::parse_safetensors(&bytes, "state", &Device::Cpu).unwrap();
        let read: BTreeMap<String, Tensor> = read.into_iter().map(|(k, v)| (k, v.tensor)).collect();
        let (mut second, vars_c) = new_case_optimizer(case);
        for (c, b) in vars_c.iter().zip(&vars_b) {
            c.set(&b.as_tensor().copy().unwrap()).unwrap();
        }
        second.load_state(&read).unwrap();
        run_adamw_steps(case, &mut second, &vars_c, 2, n);
        for (a, c) in vars_a.iter().zip(&vars_c) {
            assert!(bits_equal(a.as_tensor(), c.as_tensor()), "{}: resumed optimizer differs", case["name"]);
        }
    }
}

#[test]
fn adamw_refuses_foreign_state_and_bad_hyper_parameters() {
    let v = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![NamedVar { name: "a".into(), var: v.clone() }], AdamWConfig::default()).unwrap();
    let mut foreign = BTreeMap::new();
    foreign.insert("b::step".to_string(), Tensor::new(1i64, &Device::Cpu).unwrap());
    assert!(opt.load_state(&foreign).is_err());
    let mut partial = BTreeMap::new();
    partial.insert("a::step".to_string(), Tensor::new(1i64, &Device::Cpu).unwrap());
    assert!(matches!(opt.load_state(&partial), Err(Error::MissingTensor { .. })));
    let mut wrong = partial.clone();
    wrong.insert("a::exp_avg".into(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
    wrong.insert("a::exp_avg_sq".into(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
    assert!(matches!(opt.load_state(&wrong), Err(Error::ShapeMismatch { .. })));
    let dup = vec![NamedVar { name: "a".into(), var: v.clone() }, NamedVar { name: "a".into(), var: v }];
    assert!(AdamW::new(dup, AdamWConfig::default()).is_err());
    for bad in [
        AdamWConfig { lr: -1.0, ..Default::default() },
        AdamWConfig { beta1: 1.0, ..Default::default() },
        AdamWConfig { eps: f64::NAN, ..Default::default() },
    ] {
        assert!(matches!(bad.validate(), Err(Error::InvalidConfig { .. })), "{bad:?}");
    }
}

#[test]
fn clipping_leaves_small_gradients_alone_and_reports_non_finite_norms() {
    let names = vec!["a".to_string(), "b".to_string()];
    let g = |v: Vec<f32>| Some(Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap());
    let mut small = Gradients::from_parts(names.clone(), vec![g(vec![0.3, 0.4]), None]).unwrap();
    assert!((small.clip_by_global_norm(1.0).unwrap() - 0.5).abs() < 1e-7);
    assert_eq!(values(small.get("a").unwrap()), vec![0.3, 0.4]);
    let mut big = Gradients::from_parts(names.clone(), vec![g(vec![3.0, 0.0]), g(vec![4.0])]).unwrap();
    assert!((big.clip_by_global_norm(1.0).unwrap() - 5.0).abs() < 1e-6);
    let n = big.global_norm().unwrap();
    assert!((n - 1.0).abs() < 1e-5, "clipped norm {n}");
    let mut bad = Gradients::from_parts(names, vec![g(vec![f32::NAN, 1.0]), g(vec![1.0])]).unwrap();
    assert!(bad.clip_by_global_norm(1.0).unwrap().is_nan());
    assert_eq!(bad.non_finite().unwrap(), (1, Some("a".to_string())));
}

#[test]
fn schedules_match_transformers() {
    let fx = fixture();
    let mut checked = 0;
    let mut worst = 0f64;
    for case in fx["schedules"].as_array().unwrap() {
        let kind: ScheduleKind = case["kind"].as_str().unwrap().parse().unwrap();
        let w = case["warmup"].as_u64().unwrap() as usize;
        let t = case["total"].as_u64().unwrap() as usize;
        let base = case["base_lr"].as_f64().unwrap();
        let s = Schedule::new(kind, w, t);
        for (step, (fb, lb)) in case["factor_bits"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["lr_bits"].as_array().unwrap())
            .enumerate()
        {
            let want_f = f64::from_bits(fb.as_u64().unwrap());
            let want_lr = f64::from_bits(lb.as_u64().unwrap());
            let (f, lr) = (s.factor(step), s.lr(base, step));
            worst = worst.max((f - want_f).abs()).max((lr - want_lr).abs());
            assert_eq!(f.to_bits(), want_f.to_bits(), "{kind:?} W={w} T={t} step {step}: {f} vs {want_f}");
            assert_eq!(lr.to_bits(), want_lr.to_bits(), "{kind:?} W={w} T={t} step {step}: lr {lr} vs {want_lr}");
            checked += 1;
        }
    }
    assert!(checked > 100);
    eprintln!("schedules: {checked} (factor, lr) pairs bit-identical to transformers (max diff {worst:e})");
}

#[test]
fn shuffled_indices_are_torch_randperm() {
    let fx = fixture();
    for case in fx["randperm"].as_array().unwrap() {
        let n = case["n"].as_u64().unwrap() as usize;
        let seed = case["seed"].as_u64().unwrap();
        let want: Vec<usize> = case["perm"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(shuffled_indices(n, seed, 0), want, "randperm({n}) seed {seed}");
        if seed >= 1 {
            assert_eq!(shuffled_indices(n, seed - 1, 1), want, "epoch 1 of seed - 1");
        }
    }
    assert_ne!(shuffled_indices(50, 3, 0), shuffled_indices(50, 3, 1), "epochs differ");
    assert_eq!(shuffled_indices(50, 3, 7), shuffled_indices(50, 3, 7));
    let mut p = shuffled_indices(1000, 9, 2);
    p.sort_unstable();
    assert_eq!(p, (0..1000).collect::<Vec<_>>());
}

// =================================================================================================
// End to end on PEFT's MLP
// =================================================================================================

const N_TRAIN: usize = 192;
const N_VAL: usize = 96;

/// A separable 2-class problem in 10 dimensions: two unit Gaussians shifted by ±1.5 along a
/// random unit vector w, keeping only points on their class's side of the plane w·x = 0 with a
/// margin of 0.5 (classes alternate, so every batch is balanced on average).
struct Problem {
    x: Vec<f32>,
    y: Vec<u32>,
}

/// Which part of the data a batch is made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Train,
    Validation,
}

/// [`TrainData`] over indexed examples: training indices shuffled per epoch with
/// [`shuffled_indices`], cut into batches of `batch_size` (the last one may be smaller),
/// validation indices in order; `make` turns a phase and a list of indices into a batch.
struct IndexedData<B, F: FnMut(Phase, &[usize]) -> pvera::Result<B>> {
    n_train: usize,
    n_val: usize,
    batch_size: usize,
    seed: u64,
    make: F,
}

impl<B, F: FnMut(Phase, &[usize]) -> pvera::Result<B>> IndexedData<B, F> {
    fn new(n_train: usize, n_val: usize, batch_size: usize, seed: u64, make: F) -> Self {
        Self { n_train, n_val, batch_size, seed, make }
    }
}

impl<B, F: FnMut(Phase, &[usize]) -> pvera::Result<B>> TrainData for IndexedData<B, F> {
    type Batch = B;
    fn num_train_batches(&self) -> usize {
        self.n_train.div_ceil(self.batch_size)
    }
    fn train_batches(&mut self, epoch: usize) -> pvera::Result<Batches<'_, B>> {
        let order = shuffled_indices(self.n_train, self.seed, epoch);
        let chunks: Vec<Vec<usize>> = order.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        let make = &mut self.make;
        Ok(Box::new(chunks.into_iter().map(move |c| make(Phase::Train, &c))))
    }
    fn val_batches(&mut self) -> pvera::Result<Batches<'_, B>> {
        let idx: Vec<usize> = (0..self.n_val).collect();
        let chunks: Vec<Vec<usize>> = idx.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        let make = &mut self.make;
        Ok(Box::new(chunks.into_iter().map(move |c| make(Phase::Validation, &c))))
    }
}

fn problem() -> Problem {
    let shift = 1.5f32;
    let mut g = TorchGenerator::new(2024);
    let w = g.randn_f32(10);
    let norm = w.iter().map(|v| v * v).sum::<f32>().sqrt();
    let w: Vec<f32> = w.iter().map(|v| v / norm).collect();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    while y.len() < N_TRAIN + N_VAL {
        let class = y.len() % 2;
        let sign = if class == 1 { 1.0 } else { -1.0 };
        let mut p = g.randn_f32(10);
        for (a, b) in p.iter_mut().zip(&w) {
            *a += sign * shift * b;
        }
        let s: f32 = p.iter().zip(&w).map(|(a, b)| a * b).sum();
        if s * sign < 0.5 {
            continue;
        }
        x.extend_from_slice(&p);
        y.push(class as u32);
    }
    Problem { x, y }
}

struct Batch {
    x: Tensor,
    y: Tensor,
}

impl Problem {
    fn batch(&self, split: Phase, idx: &[usize]) -> pvera::Result<Batch> {
        let off = if split == Phase::Train { 0 } else { N_TRAIN };
        let mut x = Vec::with_capacity(idx.len() * 10);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            x.extend_from_slice(&self.x[(off + i) * 10..(off + i + 1) * 10]);
            y.push(self.y[off + i]);
        }
        Ok(Batch {
            x: Tensor::from_vec(x, (idx.len(), 10), &Device::Cpu)?,
            y: Tensor::from_vec(y, idx.len(), &Device::Cpu)?,
        })
    }
}

/// NLL on the MLP's log-probabilities; optionally fails at a given (0-based) call to simulate a
/// crash.
struct Classify {
    calls: Cell<usize>,
    fail_at: Option<usize>,
}

impl Classify {
    fn new() -> Self {
        Self { calls: Cell::new(0), fail_at: None }
    }
}

impl Objective<TestModel> for Classify {
    type Batch = Batch;
    fn step(&self, model: &PeftModel<TestModel>, b: &Batch) -> pvera::Result<StepOutput> {
        let n = self.calls.get();
        self.calls.set(n + 1);
        if self.fail_at == Some(n) {
            return Err(Error::Model("simulated crash".into()));
        }
        let logp = model.model().forward(&b.x)?;
        let picked = logp.gather(&b.y.unsqueeze(1)?, 1)?;
        let loss = (picked.mean_all()? * -1.0)?;
        let pred = logp.argmax(D::Minus1)?;
        let correct = pred.eq(&b.y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
        Ok(StepOutput { loss, examples: b.y.dims()[0], correct: Some(correct) })
    }
}

fn adapter_cfg(generator_seed: Option<i128>, dropout: f64) -> PveraConfig {
    PveraConfig {
        target_modules: Some(TargetModules::List(["lin0", "lin1", "lin2", "lin3"].map(String::from).to_vec())),
        r: 16,
        generator_seed,
        dropout,
        ..Default::default()
    }
}

fn peft(cfg: PveraConfig) -> PeftModel<TestModel> {
    let (m, reg, info) =
        build_base_from(&fixtures().join("peft/mlp_list/base_model.safetensors"), DType::F32, false);
    PeftModel::new(m, reg, info, cfg, "default").unwrap()
}

fn train_cfg(out: &Path) -> TrainConfig {
    TrainConfig {
        epochs: 12,
        lr: 2e-2,
        schedule: ScheduleKind::Cosine,
        warmup: Warmup::Ratio(0.05),
        max_grad_norm: Some(1.0),
        seed: 7,
        output_dir: out.to_path_buf(),
        ..Default::default()
    }
}

fn snapshot(pm: &PeftModel<TestModel>) -> BTreeMap<String, Vec<f32>> {
    pm.trainable_vars().unwrap().into_iter().map(|v| (v.name, values(v.var.as_tensor()))).collect()
}

fn base_weights(pm: &PeftModel<TestModel>) -> Vec<Tensor> {
    let mut out = Vec::new();
    for l in pm.registry().sites() {
        out.push(l.site().weight().unwrap().copy().unwrap());
        if let Some(b) = l.site().bias().unwrap() {
            out.push(b.copy().unwrap());
        }
    }
    out
}

fn val_loss_of(pm: &PeftModel<TestModel>, p: &Problem) -> (f64, f64) {
    pm.eval().unwrap();
    let b = p.batch(Phase::Validation, &(0..N_VAL).collect::<Vec<_>>()).unwrap();
    let out = Classify::new().step(pm, &b).unwrap();
    (out.loss.to_scalar::<f32>().unwrap() as f64, out.correct.unwrap() as f64 / N_VAL as f64)
}

#[test]
fn fit_learns_a_separable_problem_and_changes_only_the_lambdas() {
    let tmp = tempfile::tempdir().unwrap();
    let p = problem();
    let mut pm = peft(adapter_cfg(None, 0.0));
    let base_before = base_weights(&pm);
    let lambdas_before = snapshot(&pm);
    let (loss0, acc0) = val_loss_of(&pm, &p);

    let mut events = Vec::new();
    let cfg = TrainConfig { restore_best: true, ..train_cfg(tmp.path()) };
    let mut trainer = Trainer::new(cfg).unwrap();
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let report = trainer.fit(&mut pm, &Classify::new(), &mut data, |e| events.push(e)).unwrap();

    let first = &report.epochs[0];
    let last = report.epochs.last().unwrap();
    eprintln!(
        "MLP fit: val loss {loss0:.4} (untrained) -> {:.4} (epoch 1) -> {:.4} (epoch {}), val accuracy {acc0:.3} -> {:.3}",
        first.val_loss.unwrap(),
        last.val_loss.unwrap(),
        last.epoch,
        last.val_accuracy.unwrap()
    );
    assert_eq!(report.stop, StopReason::Completed);
    assert_eq!(report.epochs.len(), 12);
    assert_eq!(report.total_steps, 12 * 12);
    assert_eq!(report.steps, 144);
    assert!(last.val_loss.unwrap() < 0.5 * loss0, "validation loss must fall: {loss0} -> {:?}", last.val_loss);
    assert!(last.val_loss.unwrap() < first.val_loss.unwrap());
    assert!(last.val_accuracy.unwrap() >= 0.9, "final accuracy {:?}", last.val_accuracy);
    assert!(last.train_accuracy.unwrap() >= 0.9);
    assert!(last.train_kl.is_some(), "KL is reported even with kl_weight 0");

    // Only the λ's moved.
    for (a, b) in base_before.iter().zip(base_weights(&pm)) {
        assert!(bits_equal(a, &b), "a base weight changed");
    }
    let after = snapshot(&pm);
    assert_eq!(after.len(), 8);
    for (k, v) in &after {
        assert!(k.contains("pvera_lambda_"), "{k} is not a λ");
        assert_ne!(v, &lambdas_before[k], "{k} did not train");
    }

    // Events: Started, one Step per optimizer step with a scheduled lr, an EpochEnd per epoch,
    // checkpoints, Finished.
    assert!(matches!(&events[0], TrainEvent::Started { steps: 144, warmup_steps: 8, .. }));
    let steps: Vec<(usize, f64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { step, lr, kl, .. } => Some((*step, *lr, kl.unwrap())),
            _ => None,
        })
        .collect();
    assert_eq!(steps.len(), 144);
    assert_eq!(steps[0].1, 0.0, "warm-up starts at lr 0 (transformers)");
    let sched = Schedule::new(ScheduleKind::Cosine, 8, 144);
    for (i, (step, lr, _)) in steps.iter().enumerate() {
        assert_eq!(*step, i + 1);
        assert_eq!(*lr, sched.lr(2e-2, i));
    }
    let epoch_ends = events.iter().filter(|e| matches!(e, TrainEvent::EpochEnd { .. })).count();
    assert_eq!(epoch_ends, 12);
    assert!(matches!(events.last().unwrap(), TrainEvent::Finished { reason: StopReason::Completed, .. }));

    // The best checkpoint is a PEFT adapter whose outputs are those of the best epoch.
    let best_epoch = report.best_epoch.unwrap();
    let best_loss = report.best_loss.unwrap();
    assert_eq!(best_loss, report.epochs[best_epoch - 1].val_loss.unwrap());
    let (m, reg, info) =
        build_base_from(&fixtures().join("peft/mlp_list/base_model.safetensors"), DType::F32, false);
    let loaded = PeftModel::from_pretrained(m, reg, info, &report.best_dir, "default", false).unwrap();
    let (l, _) = val_loss_of(&loaded, &p);
    assert!((l - best_loss).abs() < 1e-5, "best/ gives val loss {l}, the report says {best_loss}");
    assert!(report.last_dir.join(pvera::train::TRAINER_STATE_NAME).is_file());
    // restore_best left the best epoch's λ's in the model.
    let (l, _) = val_loss_of(&pm, &p);
    assert!((l - best_loss).abs() < 1e-5, "restore_best: model val loss {l}, best {best_loss}");

    // The report serialises to JSON.
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"val_accuracy\""));
}

fn run_to_end(out: &Path, cfg_edit: impl Fn(&mut TrainConfig), task: &Classify) -> pvera::Result<PeftModel<TestModel>> {
    let p = problem();
    let mut pm = peft(adapter_cfg(Some(11), 0.1));
    let mut cfg = train_cfg(out);
    cfg.epochs = 4;
    cfg.grad_accum = 2;
    cfg_edit(&mut cfg);
    let mut trainer = Trainer::new(cfg)?;
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    trainer.fit(&mut pm, task, &mut data, |_| {})?;
    Ok(pm)
}

/// A resumed run ended where the uninterrupted one did: the same λ's bit for bit, and the same
/// bytes in `best/` and `last/` (the trajectories agree, not only the end).
fn assert_same_run(straight: &PeftModel<TestModel>, straight_out: &Path, resumed: &PeftModel<TestModel>, resumed_out: &Path) {
    let (sa, sb) = (snapshot(straight), snapshot(resumed));
    for (k, v) in &sa {
        let same = v.iter().zip(&sb[k]).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{k}: the resumed run differs from the uninterrupted one (max diff {})", max_diff(v, &sb[k]));
    }
    for dir in ["best", "last"] {
        let fa = std::fs::read(straight_out.join(dir).join("adapter_model.safetensors")).unwrap();
        let fb = std::fs::read(resumed_out.join(dir).join("adapter_model.safetensors")).unwrap();
        assert!(fa == fb, "{dir}/ differs");
    }
}

#[test]
fn resume_from_last_gives_the_same_lambdas_as_an_uninterrupted_run() {
    let a = tempfile::tempdir().unwrap();
    let straight = run_to_end(a.path(), |_| {}, &Classify::new()).unwrap();

    // A crash in epoch 3: per epoch 12 training + 6 validation batches; call 40 is in epoch 3.
    let b = tempfile::tempdir().unwrap();
    let crash = Classify { calls: Cell::new(0), fail_at: Some(40) };
    let err = run_to_end(b.path(), |_| {}, &crash).expect_err("the simulated crash stops training");
    assert!(err.to_string().contains("simulated crash"));

    // A fresh process: new model, new trainer, resume from last/ (saved after epoch 2).
    let p = problem();
    let mut pm = peft(adapter_cfg(Some(11), 0.1));
    let mut cfg = train_cfg(b.path());
    cfg.epochs = 4;
    cfg.grad_accum = 2;
    let mut trainer = Trainer::new(cfg).unwrap();
    trainer.resume_from(&mut pm, &b.path().join("last")).unwrap();
    assert_eq!(trainer.epochs_done(), 2);
    assert_eq!(trainer.steps_done(), 12);
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let mut events = Vec::new();
    let report = trainer.fit(&mut pm, &Classify::new(), &mut data, |e| events.push(e)).unwrap();
    assert!(matches!(events[0], TrainEvent::Started { start_epoch: 3, start_step: 12, .. }));
    assert!(!events.iter().any(|e| matches!(e, TrainEvent::Warning { .. })), "{events:?}");
    assert_eq!(report.epochs.len(), 4, "the history includes the epochs before the crash");
    assert_eq!(report.resumed_from.as_deref(), Some(b.path().join("last").as_path()));

    assert_same_run(&straight, a.path(), &pm, b.path());

    // Resuming with other settings works but says the run will differ.
    let mut pm2 = peft(adapter_cfg(Some(11), 0.1));
    let mut cfg = train_cfg(b.path());
    cfg.epochs = 5;
    let mut t2 = Trainer::new(cfg).unwrap();
    t2.resume_from(&mut pm2, &b.path().join("last")).unwrap();
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let mut events = Vec::new();
    let r2 = t2.fit(&mut pm2, &Classify::new(), &mut data, |e| events.push(e)).unwrap();
    assert!(events.iter().any(|e| matches!(e, TrainEvent::Warning { message } if message.contains("grad_accum"))));
    assert_eq!(r2.epochs.len(), 5, "a finished run extended by one epoch");

    // A state for another adapter layout is refused, the model untouched.
    for (targets, r) in [(vec!["lin0".to_string()], 16), (adapter_cfg(None, 0.0).target_modules.unwrap().as_list().unwrap().to_vec(), 8)] {
        let mut other = peft(PveraConfig { target_modules: Some(TargetModules::List(targets)), r, ..Default::default() });
        let before = snapshot(&other);
        let err = Trainer::new(train_cfg(b.path())).unwrap().resume_from(&mut other, &b.path().join("last")).unwrap_err();
        assert!(matches!(err, Error::Adapter(_) | Error::ShapeMismatch { .. }), "{err}");
        assert_eq!(snapshot(&other), before);
    }
}

#[test]
fn a_diverging_run_stops_with_non_finite_and_keeps_the_best_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let p = problem();
    // Two good epochs.
    let mut pm = peft(adapter_cfg(None, 0.0));
    let mut cfg = train_cfg(tmp.path());
    cfg.epochs = 2;
    let mut trainer = Trainer::new(cfg.clone()).unwrap();
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let report = trainer.fit(&mut pm, &Classify::new(), &mut data, |_| {}).unwrap();
    let best_file = tmp.path().join("best/adapter_model.safetensors");
    let last_file = tmp.path().join("last").join(pvera::train::TRAINER_STATE_NAME);
    let (best_bytes, last_bytes) = (std::fs::read(&best_file).unwrap(), std::fs::read(&last_file).unwrap());

    // Continue with an absurd learning rate: it blows up in the third epoch.
    cfg.epochs = 4;
    cfg.lr = 1e30;
    cfg.max_grad_norm = None;
    let mut t = Trainer::new(cfg).unwrap();
    t.resume_from(&mut pm, &tmp.path().join("last")).unwrap();
    let mut events = Vec::new();
    let err = t.fit(&mut pm, &Classify::new(), &mut data, |e| events.push(e)).unwrap_err();
    let msg = err.to_string();
    eprintln!("divergence: {msg}");
    let Error::NonFinite { what, count, hint } = &err else { panic!("expected NonFinite, got {err}") };
    assert!(*count >= 1);
    assert!(what.contains("step") && what.contains("epoch 3"), "{what}");
    assert!(hint.contains(&tmp.path().join("best").display().to_string()), "{hint}");
    assert!(hint.contains(&format!("epoch {}", report.best_epoch.unwrap())), "{hint}");
    assert!(!events.iter().any(|e| matches!(e, TrainEvent::CheckpointSaved { .. })));
    // Nothing saved was touched, and best/ loads.
    assert_eq!(std::fs::read(&best_file).unwrap(), best_bytes);
    assert_eq!(std::fs::read(&last_file).unwrap(), last_bytes);
    let (m, reg, info) =
        build_base_from(&fixtures().join("peft/mlp_list/base_model.safetensors"), DType::F32, false);
    let loaded = PeftModel::from_pretrained(m, reg, info, &tmp.path().join("best"), "default", false).unwrap();
    let (l, _) = val_loss_of(&loaded, &p);
    assert!((l - report.best_loss.unwrap()).abs() < 1e-5);

    // From scratch, the error says that nothing was saved yet.
    let fresh = tempfile::tempdir().unwrap();
    let mut pm = peft(adapter_cfg(None, 0.0));
    let mut cfg = train_cfg(fresh.path());
    cfg.lr = 1e30;
    cfg.warmup = Warmup::Steps(0);
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let err = Trainer::new(cfg).unwrap().fit(&mut pm, &Classify::new(), &mut data, |_| {}).unwrap_err();
    assert!(matches!(&err, Error::NonFinite { hint, .. } if hint.contains("no checkpoint had been saved yet")), "{err}");
    assert!(!fresh.path().join("best").exists());
}

/// A loss whose value is finite (0) but whose gradient is NaN: sqrt((m - m)²) at 0, whose
/// backward multiplies d sqrt/du = inf by d u/dm = 2(m - m) = 0.
struct NanGradient;

impl Objective<TestModel> for NanGradient {
    type Batch = Batch;
    fn step(&self, model: &PeftModel<TestModel>, b: &Batch) -> pvera::Result<StepOutput> {
        let logp = model.model().forward(&b.x)?;
        let m = logp.mean_all()?;
        let loss = (&m - m.detach())?.sqr()?.sqrt()?;
        Ok(StepOutput { loss, examples: b.y.dims()[0], correct: None })
    }
}

#[test]
fn non_finite_gradients_and_lambdas_stop_training_with_the_step_named() {
    let p = problem();
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = peft(adapter_cfg(None, 0.0));
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let before = snapshot(&pm);
    let err = Trainer::new(train_cfg(tmp.path())).unwrap().fit(&mut pm, &NanGradient, &mut data, |_| {}).unwrap_err();
    let Error::NonFinite { what, count, .. } = &err else { panic!("expected NonFinite, got {err}") };
    assert!(what.starts_with("gradients") && what.contains("optimizer step 1 (epoch 1)"), "{what}");
    assert!(*count > 0);
    assert_eq!(snapshot(&pm), before, "no step was taken with NaN gradients");

    // An lr that overflows f32 turns the λ's infinite in the first step.
    let mut pm = peft(adapter_cfg(None, 0.0));
    let cfg = TrainConfig { lr: 1e39, warmup: Warmup::Steps(0), ..train_cfg(tmp.path()) };
    let err = Trainer::new(cfg).unwrap().fit(&mut pm, &Classify::new(), &mut data, |_| {}).unwrap_err();
    let Error::NonFinite { what, .. } = &err else { panic!("expected NonFinite, got {err}") };
    assert!(what.contains("pvera_lambda_") && what.contains("after optimizer step 1 (epoch 1)"), "{what}");
}

#[test]
fn kl_weight_changes_the_trajectory_and_kl_is_reported() {
    let p = problem();
    let run = |kl_weight: f64| {
        let tmp = tempfile::tempdir().unwrap();
        let mut pm = peft(adapter_cfg(Some(3), 0.0));
        let mut cfg = train_cfg(tmp.path());
        cfg.epochs = 4;
        cfg.kl_weight = kl_weight;
        let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
        let mut kls = Vec::new();
        let report = Trainer::new(cfg)
            .unwrap()
            .fit(&mut pm, &Classify::new(), &mut data, |e| {
                if let TrainEvent::Step { kl, .. } = e {
                    kls.push(kl.expect("KL reported every step"));
                }
            })
            .unwrap();
        (snapshot(&pm), report, kls)
    };
    let (l0, r0, k0) = run(0.0);
    let (l0b, _, _) = run(0.0);
    let (l1, r1, k1) = run(1.0);
    assert_eq!(l0, l0b, "same settings, same result");
    assert_ne!(l0, l1, "kl_weight must change the trajectory");
    assert_eq!(k0.len(), 48);
    assert_eq!(k0[0], k1[0], "the first step's KL comes before any update");
    let (kl0, kl1) = (r0.epochs[3].train_kl.unwrap(), r1.epochs[3].train_kl.unwrap());
    eprintln!("KL of the last epoch: {kl0:.5} (kl_weight 0) vs {kl1:.5} (kl_weight 1)");
    assert!(kl1 < kl0, "penalising the KL must lower it: {kl1} vs {kl0}");
    // The task loss is reported without the KL part.
    for e in &r1.epochs {
        assert!(e.train_loss.is_finite() && e.train_kl.unwrap().is_finite());
    }
}

#[test]
fn early_stopping_and_grad_accumulation_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let p = problem();
    let mut pm = peft(adapter_cfg(None, 0.0));
    // lr 0: nothing changes, the validation loss never improves after epoch 1.
    let cfg = TrainConfig {
        epochs: 10,
        lr: 0.0,
        patience: Some(2),
        grad_accum: 5,
        schedule: ScheduleKind::Constant,
        output_dir: tmp.path().to_path_buf(),
        ..Default::default()
    };
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let mut events = Vec::new();
    let report = Trainer::new(cfg).unwrap().fit(&mut pm, &Classify::new(), &mut data, |e| events.push(e)).unwrap();
    assert_eq!(report.stop, StopReason::EarlyStopped);
    assert_eq!(report.epochs.len(), 3);
    assert_eq!(report.best_epoch, Some(1));
    // 12 micro-batches per epoch in groups of 5: 5 + 5 + 2 -> 3 optimizer steps.
    assert_eq!(report.steps, 9);
    assert!(events.iter().any(|e| matches!(e, TrainEvent::EarlyStop { epoch: 3, best_epoch: 1, patience: 2, .. })));
    let bests = events
        .iter()
        .filter(|e| matches!(e, TrainEvent::CheckpointSaved { kind: pvera::train::CheckpointKind::Best, .. }))
        .count();
    assert_eq!(bests, 1);
}

#[test]
fn bad_training_settings_are_refused() {
    for cfg in [
        TrainConfig { grad_accum: 0, ..Default::default() },
        TrainConfig { kl_weight: -1.0, ..Default::default() },
        TrainConfig { max_grad_norm: Some(0.0), ..Default::default() },
        TrainConfig { patience: Some(0), ..Default::default() },
        TrainConfig { lr: f64::INFINITY, ..Default::default() },
    ] {
        assert!(matches!(Trainer::new(cfg), Err(Error::InvalidConfig { .. })));
    }
    // A model without trainable variables.
    let tmp = tempfile::tempdir().unwrap();
    let (m, reg, info) =
        build_base_from(&fixtures().join("peft/mlp_list/base_model.safetensors"), DType::F32, false);
    let mut pm = PeftModel::from_pretrained(m, reg, info, &fixtures().join("peft/mlp_list/adapter"), "default", false)
        .unwrap();
    let p = problem();
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let err = Trainer::new(TrainConfig { output_dir: tmp.path().into(), ..Default::default() })
        .unwrap()
        .fit(&mut pm, &Classify::new(), &mut data, |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("nothing to train"), "{err}");
}

// =================================================================================================
// Interruption, resume targets, data identity (issue 16 rows 5, 9, 12)
// =================================================================================================

/// The settings of [`run_to_end`]: 4 epochs of 6 optimizer steps (12 micro-batches, grad_accum
/// 2), dropout and seeded layer noise, so every generator matters for an exact continuation.
fn control_cfg(out: &Path) -> TrainConfig {
    TrainConfig { epochs: 4, grad_accum: 2, ..train_cfg(out) }
}

fn control_peft() -> PeftModel<TestModel> {
    peft(adapter_cfg(Some(11), 0.1))
}

#[test]
fn a_stop_flag_saves_the_step_and_resuming_continues_exactly() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let p = problem();
    let a = tempfile::tempdir().unwrap();
    let mut straight = control_peft();
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let straight_report =
        Trainer::new(control_cfg(a.path())).unwrap().fit(&mut straight, &Classify::new(), &mut data, |_| {}).unwrap();

    // Raised during optimizer step 9 (epoch 2, micro-batches 5-6 of 12): training stops after it.
    let b = tempfile::tempdir().unwrap();
    let mut pm = control_peft();
    let mut trainer = Trainer::new(control_cfg(b.path())).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    trainer.set_stop_flag(stop.clone());
    let mut events = Vec::new();
    let report = trainer
        .fit(&mut pm, &Classify::new(), &mut data, |e| {
            if matches!(e, TrainEvent::Step { step: 9, .. }) {
                stop.store(true, Ordering::SeqCst);
            }
            events.push(e)
        })
        .unwrap();
    assert_eq!(report.stop, StopReason::Interrupted);
    assert_eq!(report.steps, 9);
    assert_eq!(report.epochs.len(), 1, "epoch 2 did not finish");
    let Some(TrainEvent::Interrupted { epoch, step, micro_batches, of, path, message }) =
        events.iter().find(|e| matches!(e, TrainEvent::Interrupted { .. }))
    else {
        panic!("no Interrupted event: {events:?}")
    };
    assert_eq!((*epoch, *step, *micro_batches, *of), (2, 9, 6, 12));
    assert_eq!(path, &b.path().join("last"));
    assert!(message.contains("optimizer step 9") && message.contains(&path.display().to_string()), "{message}");
    assert!(matches!(events.last(), Some(TrainEvent::Finished { reason: StopReason::Interrupted, .. })));

    // A fresh process resumes from the run folder (its last/ is used) and ends where the
    // uninterrupted run ended, bit for bit.
    let mut pm = control_peft();
    let mut trainer = Trainer::new(control_cfg(b.path())).unwrap();
    trainer.resume_from(&mut pm, b.path()).unwrap();
    assert_eq!((trainer.epochs_done(), trainer.steps_done()), (1, 9));
    let mut events = Vec::new();
    let report = trainer.fit(&mut pm, &Classify::new(), &mut data, |e| events.push(e)).unwrap();
    assert_eq!(report.stop, StopReason::Completed);
    assert!(matches!(events[0], TrainEvent::Started { start_epoch: 2, start_step: 9, .. }));
    let first_step = events.iter().find_map(|e| match e {
        TrainEvent::Step { step, examples, .. } => Some((*step, *examples)),
        _ => None,
    });
    assert_eq!(first_step, Some((10, 8 * 16)), "continues at step 10 with the epoch's running count");
    assert_same_run(&straight, a.path(), &pm, b.path());
    // The interrupted epoch's metrics are those of the uninterrupted run.
    let (e2, want) = (&report.epochs[1], &straight_report.epochs[1]);
    assert_eq!((e2.train_loss, e2.train_kl, e2.train_accuracy), (want.train_loss, want.train_kl, want.train_accuracy));
    assert_eq!((e2.val_loss, e2.step), (want.val_loss, want.step));

    // A flag raised before fit starts: nothing trained, a consistent last/ written.
    let c = tempfile::tempdir().unwrap();
    let mut pm = control_peft();
    let mut trainer = Trainer::new(control_cfg(c.path())).unwrap();
    trainer.set_stop_flag(Arc::new(AtomicBool::new(true)));
    let report = trainer.fit(&mut pm, &Classify::new(), &mut data, |_| {}).unwrap();
    assert_eq!((report.stop, report.steps), (StopReason::Interrupted, 0));
    let mut trainer = Trainer::new(control_cfg(c.path())).unwrap();
    trainer.resume_from(&mut control_peft(), &c.path().join("last")).unwrap();
    assert_eq!(trainer.steps_done(), 0);
}

#[test]
fn step_events_carry_the_epochs_running_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let p = problem();
    let mut pm = peft(adapter_cfg(None, 0.0));
    let cfg = TrainConfig { epochs: 2, ..train_cfg(tmp.path()) };
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let mut events = Vec::new();
    let report = Trainer::new(cfg).unwrap().fit(&mut pm, &Classify::new(), &mut data, |e| events.push(e)).unwrap();
    let steps: Vec<(usize, usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { epoch, examples, correct, .. } => Some((*epoch, *examples, correct.unwrap())),
            _ => None,
        })
        .collect();
    assert_eq!(steps.len(), 24);
    for (i, (epoch, examples, correct)) in steps.iter().enumerate() {
        assert_eq!(*epoch, i / 12 + 1);
        assert_eq!(*examples, ((i % 12 + 1) * 16).min(N_TRAIN), "step {}", i + 1);
        assert!(correct <= examples);
    }
    for (e, m) in report.epochs.iter().enumerate() {
        let (_, examples, correct) = steps[e * 12 + 11];
        assert_eq!(examples, m.train_examples);
        assert_eq!(Some(correct as f64 / examples as f64), m.train_accuracy, "epoch {}", e + 1);
    }
    // A task that counts no correct predictions reports none.
    let mut pm = peft(adapter_cfg(None, 0.0));
    let mut seen = None;
    let cfg = TrainConfig { epochs: 1, lr: 0.0, ..train_cfg(tmp.path()) };
    Trainer::new(cfg)
        .unwrap()
        .fit(&mut pm, &NanGradientFree, &mut data, |e| {
            if let TrainEvent::Step { correct, examples, .. } = e {
                seen = Some((correct, examples));
            }
        })
        .unwrap();
    assert_eq!(seen, Some((None, N_TRAIN)));
}

/// The classification loss without counting correct predictions.
struct NanGradientFree;

impl Objective<TestModel> for NanGradientFree {
    type Batch = Batch;
    fn step(&self, model: &PeftModel<TestModel>, b: &Batch) -> pvera::Result<StepOutput> {
        let out = Classify::new().step(model, b)?;
        Ok(StepOutput { correct: None, ..out })
    }
}

#[test]
fn resume_targets_finished_runs_and_other_data_are_named() {
    let p = problem();
    let out = tempfile::tempdir().unwrap();
    let fp = "3f9a1c77e0b24d5a9c0e11aa22bb33cc44dd55ee66ff77889900aabbccddeeff";
    let run = |cfg: TrainConfig, resume: Option<&Path>| -> pvera::Result<Vec<TrainEvent>> {
        let mut pm = control_peft();
        let mut trainer = Trainer::new(cfg)?;
        if let Some(r) = resume {
            trainer.resume_from(&mut pm, r)?;
        }
        let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
        let mut events = Vec::new();
        trainer.fit(&mut pm, &Classify::new(), &mut data, |e| events.push(e))?;
        Ok(events)
    };
    let cfg = |epochs: usize, fingerprint: Option<&str>| TrainConfig {
        epochs,
        data_fingerprint: fingerprint.map(String::from),
        ..control_cfg(out.path())
    };
    run(cfg(2, Some(fp)), None).unwrap();

    // best/ has no trainer state: the error points to last/.
    let err = Trainer::new(cfg(3, Some(fp))).unwrap().resume_from(&mut control_peft(), &out.path().join("best")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("adapter checkpoint") && msg.contains(&out.path().join("last").display().to_string()), "{msg}");
    // A folder that is no run at all.
    let empty = tempfile::tempdir().unwrap();
    let err = Trainer::new(cfg(3, Some(fp))).unwrap().resume_from(&mut control_peft(), empty.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("last/"), "{err}");

    // A run that finished all its epochs says so instead of "resuming at epoch 3".
    let err = run(cfg(2, Some(fp)), Some(out.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(&err, Error::InvalidConfig { field, .. } if field == "epochs"), "{msg}");
    assert!(msg.contains("finished 2/2 epochs") && msg.contains("raise epochs"), "{msg}");

    // Other data of the same size: refused, both fingerprints named by their short forms.
    let other = "77e0b24d5a9c0e11aa22bb33cc44dd55ee66ff77889900aabbccddeeff3f9a1c";
    let err = run(cfg(3, Some(other)), Some(out.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Data(_)), "{msg}");
    assert!(msg.contains("3f9a1c77e0b2") && msg.contains("77e0b24d5a9c") && msg.contains("--data"), "{msg}");
    assert!(!msg.contains(fp), "short forms only: {msg}");
    // The same data continues.
    let events = run(cfg(3, Some(fp)), Some(out.path())).unwrap();
    assert!(!events.iter().any(|e| matches!(e, TrainEvent::Warning { message } if message.contains("fingerprint"))));

    // A state saved without a fingerprint (older files) is accepted with a warning.
    let old = tempfile::tempdir().unwrap();
    let old_cfg = |epochs, fingerprint: Option<&str>| TrainConfig {
        epochs,
        data_fingerprint: fingerprint.map(String::from),
        ..control_cfg(old.path())
    };
    run(old_cfg(1, None), None).unwrap();
    let events = run(old_cfg(2, Some(fp)), Some(old.path())).unwrap();
    assert!(
        events.iter().any(|e| matches!(e, TrainEvent::Warning { message } if message.contains("no data fingerprint"))),
        "{events:?}"
    );
}

#[test]
fn an_early_stopped_run_resumes_only_with_more_patience() {
    let p = problem();
    let out = tempfile::tempdir().unwrap();
    let cfg = |patience: usize| TrainConfig {
        epochs: 10,
        lr: 0.0,
        patience: Some(patience),
        schedule: ScheduleKind::Constant,
        output_dir: out.path().to_path_buf(),
        ..Default::default()
    };
    let mut data = IndexedData::new(N_TRAIN, N_VAL, 16, 7, |s, i: &[usize]| p.batch(s, i));
    let mut pm = peft(adapter_cfg(None, 0.0));
    let report = Trainer::new(cfg(2)).unwrap().fit(&mut pm, &Classify::new(), &mut data, |_| {}).unwrap();
    assert_eq!((report.stop, report.epochs.len()), (StopReason::EarlyStopped, 3));
    let err = Trainer::new(cfg(2)).unwrap().resume_from(&mut peft(adapter_cfg(None, 0.0)), out.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(&err, Error::InvalidConfig { field, .. } if field == "patience"), "{msg}");
    assert!(msg.contains("stopped early after epoch 3") && msg.contains("raise patience"), "{msg}");
    let mut pm = peft(adapter_cfg(None, 0.0));
    let mut t = Trainer::new(cfg(4)).unwrap();
    t.resume_from(&mut pm, out.path()).unwrap();
    let report = t.fit(&mut pm, &Classify::new(), &mut data, |_| {}).unwrap();
    assert_eq!((report.stop, report.epochs.len()), (StopReason::EarlyStopped, 5));
}
