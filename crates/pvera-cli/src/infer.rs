//! `pvera infer` and `pvera merge`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use pvera::checkpoint;
use pvera::models::loader::ModelDir;
use pvera::models::{AnyModel, ModelInputs};
use pvera::{PeftModel, RunState, Sampling};

use crate::common::{check_output, Reuse};

/// Arguments of `pvera infer`.
#[derive(clap::Args, Debug)]
pub struct InferArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index), or a hub id org/name[@revision] found in the local hub cache (HF_HUB_CACHE).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory; repeat for several (`NAME=DIR` names one; the first is `default`
    /// otherwise, later ones take their directory name). All given adapters are active (summed)
    /// unless `--active` picks some.
    #[arg(long = "adapter")]
    pub adapters: Vec<String>,
    /// Comma-separated adapter names to activate (default: all given).
    #[arg(long)]
    pub active: Option<String>,
    /// Input tensors: `input_ids` [+ `attention_mask`, `token_type_ids`] or `pixel_values`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write `last_hidden_state` (and `logits`, `pooler_output` where the model has them).
    #[arg(long)]
    pub output: PathBuf,
    /// Merge the active adapters into the base weights before the forward pass.
    #[arg(long)]
    pub merge: bool,
    /// Sample the PVeRA latent in every adapted layer (Monte Carlo; refused when every active
    /// adapter is a VeRA adapter, which has no latent); adapters with
    /// `generator_seed` use their own per-layer generators exactly as PEFT does.
    #[arg(long)]
    pub sample: bool,
    /// Seed of the global generator (noise of adapters without `generator_seed`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight dtype: f32, f16 or bf16 (default: as stored).
    #[arg(long)]
    pub dtype: Option<String>,
}

/// Arguments of `pvera merge`.
#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// Hugging Face model directory, or a hub id org/name[@revision] in the local hub cache.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory to fold into the weights.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output model directory (config.json, model.safetensors and the tokenizer files are written).
    #[arg(long)]
    pub output: PathBuf,
    /// Refuse to write weights with NaN/Inf (checks before anything is written).
    #[arg(long, default_value_t = true)]
    pub safe: bool,
    /// Replace the files of an earlier merge in a non-empty --output folder (never the model's or
    /// the adapter's own folder).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn parse_dtype(s: Option<&str>) -> Result<Option<DType>> {
    Ok(match s {
        None => None,
        Some("f32") | Some("float32") => Some(DType::F32),
        Some("f16") | Some("float16") => Some(DType::F16),
        Some("bf16") | Some("bfloat16") => Some(DType::BF16),
        Some(other) => bail!("--dtype {other:?}: expected f32, f16 or bf16"),
    })
}

fn adapter_specs(adapters: &[String]) -> Vec<(String, PathBuf)> {
    adapters
        .iter()
        .enumerate()
        .map(|(i, a)| match a.split_once('=') {
            Some((n, d)) if !n.is_empty() && !Path::new(a).exists() => (n.to_string(), PathBuf::from(d)),
            _ => {
                let p = PathBuf::from(a);
                let name = if i == 0 {
                    checkpoint::DEFAULT_ADAPTER.to_string()
                } else {
                    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| format!("adapter{i}"))
                };
                (name, p)
            }
        })
        .collect()
}

/// Loads the model and adapters.
pub fn load_peft(
    model_dir: &Path,
    adapters: &[String],
    dtype: Option<DType>,
    device: &Device,
    trainable: bool,
) -> Result<(PeftModel<AnyModel>, ModelDir)> {
    let resolved = pvera::models::loader::resolve_model_dir(model_dir)?;
    let dir = ModelDir::open(&resolved)?;
    let state = Arc::new(RunState::new(0));
    let (model, registry, info) = AnyModel::load(&dir, dtype, device, state)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let specs = adapter_specs(adapters);
    let mut pm = match specs.first() {
        Some((name, path)) => PeftModel::from_pretrained(model, registry, info, path, name, trainable)
            .with_context(|| format!("loading adapter {}", path.display()))?,
        None => PeftModel::from_parts(model, registry, info),
    };
    for (name, path) in specs.iter().skip(1) {
        pm.load_adapter(path, name, trainable).with_context(|| format!("loading adapter {}", path.display()))?;
    }
    let names: Vec<String> = specs.iter().map(|(n, _)| n.clone()).collect();
    if !names.is_empty() {
        pm.set_adapter(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    // The library already logged them through `tracing` (shown at the default `--log warn`).
    let _ = pm.take_warnings();
    Ok((pm, dir))
}

/// A problem with the inputs file (exit code 7).
#[derive(Debug)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for InputError {}

macro_rules! input_err {
    ($($t:tt)*) => { return Err(anyhow::Error::new(InputError(format!($($t)*)))) };
}

const INPUT_NAMES: &[&str] = &["input_ids", "attention_mask", "token_type_ids", "pixel_values"];

/// Reads and checks an inputs file; every problem with it is an [`InputError`] (exit 7).
pub fn read_inputs(path: &Path, device: &Device) -> Result<ModelInputs> {
    let (tensors, _) = match checkpoint::read_safetensors(path, device) {
        Ok(t) => t,
        Err(e) => input_err!("--inputs: {e}"),
    };
    let file = path.display();
    let unknown: Vec<&String> = tensors.keys().filter(|k| !INPUT_NAMES.contains(&k.as_str())).collect();
    if !unknown.is_empty() {
        input_err!(
            "{file}: unknown input tensor(s) {unknown:?}; expected input_ids [attention_mask, token_type_ids] \
             for text models or pixel_values for image models"
        );
    }
    let mut inputs = ModelInputs::default();
    let ids_like = |name: &str| -> Result<Option<Tensor>> {
        let Some(t) = tensors.get(name) else { return Ok(None) };
        let t = &t.tensor;
        if t.rank() != 2 {
            input_err!("{file}: `{name}` has shape {:?}; expected (batch, seq)", t.dims());
        }
        match t.dtype() {
            DType::I64 | DType::U32 | DType::U8 => Ok(Some(t.to_dtype(DType::I64)?)),
            other => input_err!("{file}: `{name}` has dtype {other:?}; expected an integer type (int64 as torch writes it)"),
        }
    };
    inputs.input_ids = ids_like("input_ids")?;
    inputs.attention_mask = ids_like("attention_mask")?;
    inputs.token_type_ids = ids_like("token_type_ids")?;
    if let Some(t) = tensors.get("pixel_values") {
        let t = &t.tensor;
        if t.rank() != 4 {
            input_err!("{file}: `pixel_values` has shape {:?}; expected (batch, channels, height, width)", t.dims());
        }
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            input_err!("{file}: `pixel_values` has dtype {:?}; expected a float type", t.dtype());
        }
        inputs.pixel_values = Some(t.to_dtype(DType::F32)?);
    }
    if inputs.input_ids.is_none() && inputs.pixel_values.is_none() {
        input_err!("{file}: no `input_ids` and no `pixel_values`; nothing to run");
    }
    if let (Some(ids), Some(m)) = (&inputs.input_ids, &inputs.attention_mask) {
        if ids.dims() != m.dims() {
            input_err!("{file}: `attention_mask` has shape {:?} but `input_ids` has {:?}", m.dims(), ids.dims());
        }
    }
    if let (Some(ids), Some(m)) = (&inputs.input_ids, &inputs.token_type_ids) {
        if ids.dims() != m.dims() {
            input_err!("{file}: `token_type_ids` has shape {:?} but `input_ids` has {:?}", m.dims(), ids.dims());
        }
    }
    Ok(inputs)
}

/// Token ids must index the model's vocabulary.
fn check_token_ids(inputs: &ModelInputs, path: &Path, dir: &ModelDir) -> Result<()> {
    if let Some(ids) = &inputs.input_ids {
        let v: Vec<i64> = ids.flatten_all()?.to_vec1()?;
        let vocab = dir.config.get("vocab_size").and_then(|x| x.as_i64());
        if let Some(&bad) = v.iter().find(|&&x| x < 0 || vocab.is_some_and(|n| x >= n)) {
            input_err!(
                "{}: `input_ids` holds {bad}; token ids index the vocabulary: 0..{} (vocab_size in the model's config.json)",
                path.display(),
                vocab.map_or("?".to_string(), |n| n.to_string())
            );
        }
    }
    Ok(())
}

pub fn run_infer(args: InferArgs) -> Result<u8> {
    let device = Device::Cpu;
    let dtype = parse_dtype(args.dtype.as_deref())?;
    let (mut pm, dir) = load_peft(&args.model, &args.adapters, dtype, &device, false)?;
    if let Some(active) = &args.active {
        let names: Vec<&str> = active.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        pm.set_adapter(&names)?;
    }
    let inputs = read_inputs(&args.inputs, &device)?;
    check_token_ids(&inputs, &args.inputs, &dir)?;
    pm.eval()?;
    pm.state().set_grad_enabled(false)?;
    pm.state().manual_seed(args.seed)?;
    if args.sample {
        let active = pm.active_adapters();
        if active.iter().all(|a| pm.method(a).is_ok_and(|m| !m.samples())) {
            crate::usage!(
                "--sample: the active adapter(s) {active:?} are VeRA adapters, which have no latent to sample; \
                 drop --sample (the output is then the adapter's only output) or load a PVeRA adapter"
            );
        }
        pm.state().set_sampling(Sampling::Always)?;
    }
    if args.merge {
        if args.sample {
            bail!("--merge and --sample exclude each other: a merged adapter has no latent to sample");
        }
        pm.merge_adapter(None, true)?;
    }
    // The model and adapters loaded; a failing forward is the inputs' fault (names, shapes, sizes).
    let out = match pm.model().forward(&inputs) {
        Ok(o) => o,
        Err(e) => input_err!("{}: the model cannot run on these inputs: {e}", args.inputs.display()),
    };
    let mut tensors = BTreeMap::new();
    tensors.insert("last_hidden_state".to_string(), out.last_hidden_state);
    if let Some(l) = out.logits {
        tensors.insert("logits".to_string(), l);
    }
    if let Some(p) = out.pooler_output {
        tensors.insert("pooler_output".to_string(), p);
    }
    let bytes = checkpoint::serialize_safetensors(&tensors, Some(checkpoint::pt_metadata()))?;
    checkpoint::write_atomic(&args.output, &bytes)?;
    Ok(0)
}

pub fn run_merge(args: MergeArgs) -> Result<u8> {
    let device = Device::Cpu;
    let model = pvera::models::loader::resolve_model_dir(&args.model)?;
    let out = check_output(
        "--output",
        &args.output,
        &[("--model", &model), ("--adapter", &args.adapter)],
        Reuse::EmptyOrOverwrite(args.overwrite),
    )?;
    let (pm, dir) = load_peft(&args.model, &[args.adapter.display().to_string()], None, &device, false)?;
    let info = pm.adapter(checkpoint::DEFAULT_ADAPTER)?;
    let (adapted, saved) = (info.targets.len(), info.modules_to_save.len());
    let (_, registry) = pm.merge_and_unload(args.safe, None)?;
    // Start from every stored tensor, under its stored name, then replace the merged ones.
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for w in &dir.weights {
        let (ts, _) = checkpoint::read_safetensors(w, &device)?;
        for (k, v) in ts {
            tensors.insert(k, v.tensor);
        }
    }
    let mut replaced = 0usize;
    for lin in registry.sites() {
        let site = lin.site();
        for (param, value) in [("weight", Some(site.weight()?)), ("bias", site.bias()?)] {
            let Some(value) = value else { continue };
            let candidates: Vec<String> = std::iter::once(format!("{}.{param}", site.path()))
                .chain(pvera::models::loader::TASK_PREFIXES.iter().map(|p| format!("{p}.{}.{param}", site.path())))
                .collect();
            let Some(key) = candidates.into_iter().find(|k| tensors.contains_key(k)) else {
                bail!("{}: no stored tensor for {}.{param}", dir.path.display(), site.path());
            };
            let dtype = tensors[&key].dtype();
            tensors.insert(key, value.to_dtype(dtype)?);
            replaced += 1;
        }
    }
    let _ = replaced;
    out.create()?;
    let bytes = checkpoint::serialize_safetensors(&tensors, Some(checkpoint::pt_metadata()))?;
    checkpoint::write_atomic(&args.output.join("model.safetensors"), &bytes)?;
    // config.json and the tokenizer / preprocessing files travel unchanged.
    for entry in std::fs::read_dir(&dir.path)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let p = entry.path();
        if p.is_file()
            && !name.ends_with(".safetensors")
            && name != "model.safetensors.index.json"
            && !name.ends_with(".bin")
        {
            let bytes = std::fs::read(&p)?;
            checkpoint::write_atomic(&args.output.join(&name), &bytes)?;
        }
    }
    crate::warn_line!(
        "merged adapter {} into {adapted} adapted layer(s){} of {}; wrote {}",
        args.adapter.display(),
        if saved > 0 { format!(" and {saved} trained module(s) (modules_to_save)") } else { String::new() },
        args.model.display(),
        args.output.display()
    );
    Ok(0)
}
