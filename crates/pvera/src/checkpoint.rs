//! PEFT adapter files: the only place that spells PEFT's file names and tensor keys.
//!
//! A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`
//! (metadata `{"format": "pt"}`). The adapter called `default` lives in the directory itself,
//! any other adapter in `<dir>/<name>/` (`peft_model.py:309`). Keys (docs/peft-behaviour.md §6):
//!
//! | entry | key |
//! |---|---|
//! | λ_b | `base_model.model.<path>.pvera_lambda_b` |
//! | λ_d | `base_model.model.<path>.pvera_lambda_d` |
//! | A, B (only with `save_projection`) | `base_model.pvera_A`, `base_model.pvera_B` |
//!
//! A VeRA adapter (`peft_type` `"VERA"`) spells them `vera_lambda_b`, `vera_lambda_d`,
//! `base_model.vera_A`, `base_model.vera_B`; every function here that spells or reads a key takes
//! the [`Method`].
//! | modules_to_save | `base_model.model.<path>.<param>` |
//! | bias of a targeted layer | `base_model.model.<path>.base_layer.bias` |
//! | bias of another layer (`bias="all"`) | `base_model.model.<path>.bias` |
//!
//! Writes are atomic: each file is written to a temporary file in the same directory, flushed
//! to disk, and renamed over the old one, so a crash never leaves a truncated file where a good
//! one was.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::config::{Method, PveraConfig};
use crate::error::{Error, Result};

/// The config file name.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The weights file name.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The legacy pickle weights file PEFT writes with `safe_serialization=False`.
pub const LEGACY_WEIGHTS_NAME: &str = "adapter_model.bin";
/// Key of the shared A projection of a PVeRA adapter.
pub const PROJ_A_KEY: &str = "base_model.pvera_A";
/// Key of the shared B projection of a PVeRA adapter.
pub const PROJ_B_KEY: &str = "base_model.pvera_B";
/// Key of the shared A projection of a VeRA adapter.
pub const VERA_PROJ_A_KEY: &str = "base_model.vera_A";
/// Key of the shared B projection of a VeRA adapter.
pub const VERA_PROJ_B_KEY: &str = "base_model.vera_B";
/// Prefix of every model tensor in an adapter file.
pub const MODEL_PREFIX: &str = "base_model.model.";
/// PEFT's name of the adapter that lives at the top of a directory.
pub const DEFAULT_ADAPTER: &str = "default";

/// Key of the shared A projection of `method`'s adapters.
pub fn proj_a_key(method: Method) -> &'static str {
    match method {
        Method::Pvera => PROJ_A_KEY,
        Method::Vera => VERA_PROJ_A_KEY,
    }
}
/// Key of the shared B projection of `method`'s adapters.
pub fn proj_b_key(method: Method) -> &'static str {
    match method {
        Method::Pvera => PROJ_B_KEY,
        Method::Vera => VERA_PROJ_B_KEY,
    }
}
/// The name of the A projection in messages (`pvera_A` / `vera_A`).
pub fn proj_a_name(method: Method) -> &'static str {
    &proj_a_key(method)["base_model.".len()..]
}
/// The name of the B projection in messages (`pvera_B` / `vera_B`).
pub fn proj_b_name(method: Method) -> &'static str {
    &proj_b_key(method)["base_model.".len()..]
}
/// The leaf name of λ_b (`pvera_lambda_b` / `vera_lambda_b`).
pub fn lambda_b_name(method: Method) -> &'static str {
    match method {
        Method::Pvera => "pvera_lambda_b",
        Method::Vera => "vera_lambda_b",
    }
}
/// The leaf name of λ_d (`pvera_lambda_d` / `vera_lambda_d`).
pub fn lambda_d_name(method: Method) -> &'static str {
    match method {
        Method::Pvera => "pvera_lambda_d",
        Method::Vera => "vera_lambda_d",
    }
}
/// Key of λ_b for a module.
pub fn lambda_b_key(method: Method, path: &str) -> String {
    format!("{MODEL_PREFIX}{path}.{}", lambda_b_name(method))
}
/// Key of λ_d for a module.
pub fn lambda_d_key(method: Method, path: &str) -> String {
    format!("{MODEL_PREFIX}{path}.{}", lambda_d_name(method))
}
/// Key of a `modules_to_save` parameter (`param` is `weight` or `bias`).
pub fn module_param_key(path: &str, param: &str) -> String {
    format!("{MODEL_PREFIX}{path}.{param}")
}
/// Key of a trainable bias: targeted layers wrap their base layer, so PEFT writes
/// `<path>.base_layer.bias`; other layers keep `<path>.bias`.
pub fn bias_key(path: &str, targeted: bool) -> String {
    if targeted {
        format!("{MODEL_PREFIX}{path}.base_layer.bias")
    } else {
        format!("{MODEL_PREFIX}{path}.bias")
    }
}

/// Splits a λ key of `method` into (module path, "b" | "d").
pub fn parse_lambda_key(method: Method, key: &str) -> Option<(&str, char)> {
    let rest = key.strip_prefix(MODEL_PREFIX)?;
    if let Some(p) = strip_leaf(rest, lambda_b_name(method)) {
        Some((p, 'b'))
    } else {
        strip_leaf(rest, lambda_d_name(method)).map(|p| (p, 'd'))
    }
}

/// `path` of `path.leaf`.
fn strip_leaf<'a>(key: &'a str, leaf: &str) -> Option<&'a str> {
    key.strip_suffix(leaf).and_then(|p| p.strip_suffix('.'))
}

/// The method whose λ or projection keys a file's keys use: the one with more such keys (PVeRA
/// when none or a tie). For telling a file's method when its config cannot be read.
pub fn method_of_keys<'a>(keys: impl IntoIterator<Item = &'a String>) -> Method {
    let mut count = [0usize; 2];
    for k in keys {
        for (i, m) in Method::ALL.into_iter().enumerate() {
            if !matches!(classify_key(m, k), KeyKind::Other | KeyKind::ModuleParam { .. } | KeyKind::TargetedBias { .. }) {
                count[i] += 1;
            }
        }
    }
    if count[1] > count[0] {
        Method::Vera
    } else {
        Method::Pvera
    }
}

/// Directory of an adapter inside a saved PEFT directory.
pub fn adapter_dir(root: &Path, name: &str) -> PathBuf {
    if name == DEFAULT_ADAPTER {
        root.to_path_buf()
    } else {
        root.join(name)
    }
}

/// A tensor read from a file, with the dtype it had on disk.
#[derive(Clone, Debug)]
pub struct StoredTensor {
    /// The values (in the stored dtype).
    pub tensor: Tensor,
    /// The dtype in the file, as safetensors names it (`F32`, `BF16`, ...).
    pub file_dtype: String,
}

/// The contents of an adapter directory.
#[derive(Clone, Debug)]
pub struct AdapterFiles {
    /// Parsed `adapter_config.json`.
    pub config: PveraConfig,
    /// Every tensor in `adapter_model.safetensors`, by key.
    pub tensors: BTreeMap<String, StoredTensor>,
    /// The safetensors metadata.
    pub metadata: HashMap<String, String>,
    /// Where the weights came from.
    pub weights_path: PathBuf,
}

/// Reads an adapter directory (config + safetensors), validating the file structure.
pub fn read_adapter_dir(dir: &Path, device: &Device) -> Result<AdapterFiles> {
    check_adapter_dir(dir)?;
    let config = PveraConfig::from_dir(dir)?;
    let weights_path = weights_file(dir)?;
    let (tensors, metadata) = read_safetensors(&weights_path, device)?;
    Ok(AdapterFiles { config, tensors, metadata, weights_path })
}

/// Reads a safetensors file into tensors on `device`, keeping the stored dtype (F32, F16, BF16,
/// F64 and integer types are accepted). The header is validated by the `safetensors` crate
/// (length, JSON, offsets inside the file, no overlap).
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(BTreeMap<String, StoredTensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, &path.display().to_string(), device)
}

/// What to do about a file the `safetensors` crate rejects.
const SAFETENSORS_FIX: &str = "the file is truncated, was edited, or was not written by safetensors; \
     copy or download it again, or re-save the adapter with save_pretrained";

/// Parses safetensors bytes (see [`read_safetensors`]); `file` names the source in errors.
pub fn parse_safetensors(
    bytes: &[u8],
    file: &str,
    device: &Device,
) -> Result<(BTreeMap<String, StoredTensor>, HashMap<String, String>)> {
    let (each, metadata) = parse_safetensors_each(bytes, file, device)?;
    let mut out = BTreeMap::new();
    for (name, t) in each {
        out.insert(name, t?);
    }
    Ok((out, metadata))
}

fn view_to_tensor(view: &TensorView<'_>, file: &str, key: &str, device: &Device) -> Result<Tensor> {
    let dtype = match view.dtype() {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::U32 => DType::U32,
        StDtype::U8 => DType::U8,
        other => {
            return Err(Error::DtypeMismatch {
                file: file.to_string(),
                key: key.to_string(),
                got: format!("{other:?}"),
                expected: "F32, F16, BF16, F64, I64, U32 or U8".into(),
            })
        }
    };
    Ok(Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?)
}

fn st_dtype(d: DType) -> Result<StDtype> {
    Ok(match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
        DType::I64 => StDtype::I64,
        DType::U32 => StDtype::U32,
        DType::U8 => StDtype::U8,
        other => return Err(Error::Model(format!("cannot write dtype {other:?} to safetensors"))),
    })
}

/// Serialises tensors to safetensors bytes with the given metadata.
pub fn serialize_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut raw: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let bytes = tensor_bytes(&t)?;
        raw.push((k.clone(), st_dtype(t.dtype())?, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(k, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Model(format!("tensor {k}: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| Error::Model(format!("safetensors: {e}")))
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => flat.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => flat.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U32 => flat.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        other => return Err(Error::Model(format!("cannot serialise dtype {other:?}"))),
    })
}

/// PEFT's safetensors metadata.
pub fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// then fsync of the directory. A crash at any point leaves either the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let file_name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Writes one adapter directory: weights first, then the config, each atomically. The config is
/// rewritten only when its bytes change, so repeated checkpoints of one run never have a moment
/// with a config that disagrees with the weights.
pub fn write_adapter_dir(
    dir: &Path,
    config: &PveraConfig,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let bytes = serialize_safetensors(tensors, Some(pt_metadata()))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_atomic(&dir.join(WEIGHTS_NAME), &bytes)?;
    let cfg = config.to_json_string();
    let cfg_path = dir.join(CONFIG_NAME);
    let same = std::fs::read(&cfg_path).map(|old| old == cfg.as_bytes()).unwrap_or(false);
    if !same {
        write_atomic(&cfg_path, cfg.as_bytes())?;
    }
    Ok(())
}

/// Module names of the classification heads transformers' task classes train (`classifier`:
/// BERT / ViT / DINOv2; `score`: LLaMA / GPT-2 sequence classification), which PEFT adds to
/// `modules_to_save` for `task_type="SEQ_CLS"`.
pub const HEAD_MODULES: &[&str] = &["classifier", "score"];

/// A classification head's trained weights, as an adapter file carries them.
#[derive(Clone, Debug)]
pub struct HeadTensors {
    /// The module name (`classifier` or `score`).
    pub module: String,
    /// `(num_labels, pooled width)`.
    pub weight: Tensor,
    /// `(num_labels,)`, when the head has a bias.
    pub bias: Option<Tensor>,
}

/// The key forms a `modules_to_save` parameter may take in a file: PEFT's saved form
/// (`<path>.<param>`) and the in-memory wrapper's (`<path>.modules_to_save.default.<param>`).
fn head_keys(module: &str, param: &str) -> [String; 2] {
    [module_param_key(module, param), format!("{MODEL_PREFIX}{module}.modules_to_save.{DEFAULT_ADAPTER}.{param}")]
}

/// Takes the classification head out of an adapter's files: the `classifier` (or `score`)
/// weight and bias that `modules_to_save` lists leave `files.tensors` and the module leaves
/// `modules_to_save`, so the rest
/// loads on the bare backbone while the caller applies the head itself. `None` when the file
/// carries no head (the config may still list one: a head PEFT was told to save but never did
/// is the caller's error to report).
pub fn take_classifier_head(files: &mut AdapterFiles) -> Option<HeadTensors> {
    let listed: Vec<String> = files.config.modules_to_save.clone().unwrap_or_default();
    for module in HEAD_MODULES {
        // PEFT loads a module's weights only when modules_to_save lists it (otherwise the file's
        // tensors are unexpected keys and the model keeps its own head).
        if !listed.iter().any(|m| m == module) {
            continue;
        }
        let Some(wkey) = head_keys(module, "weight").into_iter().find(|k| files.tensors.contains_key(k)) else {
            continue;
        };
        let weight = files.tensors.remove(&wkey)?.tensor;
        let bias = head_keys(module, "bias").into_iter().find_map(|k| files.tensors.remove(&k)).map(|t| t.tensor);
        if let Some(list) = files.config.modules_to_save.as_mut() {
            list.retain(|m| !HEAD_MODULES.contains(&m.as_str()));
            if list.is_empty() {
                files.config.modules_to_save = None;
            }
        }
        return Some(HeadTensors { module: module.to_string(), weight, bias });
    }
    None
}

/// Checks that `dir` is a directory, with the error [`read_adapter_dir`] gives when it is not.
pub fn check_adapter_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "adapter directory not found (expected a folder with adapter_config.json and \
                 adapter_model.safetensors, as PEFT's save_pretrained writes)",
            ),
        ));
    }
    Ok(())
}

/// `dir/adapter_model.safetensors` if it exists; otherwise the error [`read_adapter_dir`] gives
/// (naming a legacy `adapter_model.bin` when there is one).
pub fn weights_file(dir: &Path) -> Result<PathBuf> {
    let weights_path = dir.join(WEIGHTS_NAME);
    if !weights_path.exists() {
        let hint = if dir.join(LEGACY_WEIGHTS_NAME).exists() {
            " (found adapter_model.bin: a pickle file PEFT writes with safe_serialization=False; \
             pvera reads only safetensors: re-save it in Python with save_pretrained(dir) or \
             safetensors.torch.save_file)"
        } else {
            ""
        };
        return Err(Error::io(
            &weights_path,
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("adapter weights not found{hint}")),
        ));
    }
    Ok(weights_path)
}

/// One tensor of a file: its values, or why they cannot be read (an unsupported dtype).
pub type EachTensor = (String, Result<StoredTensor>);

/// Like [`parse_safetensors`], but a tensor of an unsupported dtype does not stop the others
/// from being read: every tensor comes back with its own result. Errors of
/// the file as a whole (header, offsets) still fail the call.
pub fn parse_safetensors_each(
    bytes: &[u8],
    file: &str,
    device: &Device,
) -> Result<(Vec<EachTensor>, HashMap<String, String>)> {
    let invalid = |e: safetensors::SafeTensorError| Error::Safetensors {
        file: file.to_string(),
        reason: format!("{e} ({SAFETENSORS_FIX})"),
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(invalid)?;
    let each = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = view_to_tensor(&view, file, &name, device)
                .map(|tensor| StoredTensor { tensor, file_dtype: format!("{:?}", view.dtype()) });
            (name, t)
        })
        .collect();
    Ok((each, metadata))
}

/// What a key of an adapter file of one method holds: the reverse of [`lambda_b_key`],
/// [`lambda_d_key`], [`proj_a_key`], [`proj_b_key`], [`bias_key`] and [`module_param_key`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    /// `<stem>_lambda_b` (`'b'`) or `<stem>_lambda_d` (`'d'`) of the module at `path`.
    Lambda {
        /// Module path (after `base_model.model.`).
        path: &'a str,
        /// `'b'` or `'d'`.
        which: char,
    },
    /// [`proj_a_key`].
    ProjectionA,
    /// [`proj_b_key`].
    ProjectionB,
    /// `<path>.base_layer.bias`: the trainable bias of an adapted layer (`bias` != `none`).
    TargetedBias {
        /// Module path of the adapted layer.
        path: &'a str,
    },
    /// `<path>.weight` or `<path>.bias`: a `modules_to_save` parameter, or the bias of a layer
    /// that is not adapted (`bias="all"`).
    ModuleParam {
        /// Module path.
        path: &'a str,
        /// `weight` or `bias`.
        param: &'a str,
    },
    /// Anything else: no adapter file of this method has such a key (the other method's λ's and
    /// projections included).
    Other,
}

/// Classifies a key of an adapter file of `method` (see [`KeyKind`]).
pub fn classify_key(method: Method, key: &str) -> KeyKind<'_> {
    if key == proj_a_key(method) {
        return KeyKind::ProjectionA;
    }
    if key == proj_b_key(method) {
        return KeyKind::ProjectionB;
    }
    if let Some((path, which)) = parse_lambda_key(method, key) {
        return KeyKind::Lambda { path, which };
    }
    // The other method's λ's and projections belong to no part of this adapter.
    let other = match method {
        Method::Pvera => Method::Vera,
        Method::Vera => Method::Pvera,
    };
    if key == proj_a_key(other) || key == proj_b_key(other) || parse_lambda_key(other, key).is_some() {
        return KeyKind::Other;
    }
    let Some(rest) = key.strip_prefix(MODEL_PREFIX) else {
        return KeyKind::Other;
    };
    if let Some(path) = rest.strip_suffix(".base_layer.bias") {
        return KeyKind::TargetedBias { path };
    }
    for param in ["weight", "bias"] {
        if let Some(path) = rest.strip_suffix(param).and_then(|p| p.strip_suffix('.')) {
            if !path.is_empty() {
                return KeyKind::ModuleParam { path, param };
            }
        }
    }
    KeyKind::Other
}

// ---- the loader's projection messages (shared by `peft_model/load.rs` and `validate.rs`) ----------

/// The loader's error for a checkpoint without `pvera_A` (`vera_A`) under `save_projection=true`
/// (PEFT's message plus the fix).
pub(crate) fn missing_projections(method: Method, file: &str) -> Error {
    let (a, b) = (proj_a_name(method), proj_b_name(method));
    Error::MissingTensor {
        file: file.to_string(),
        key: proj_a_key(method).into(),
        hint: format!(
            ": Specified to load {a} and {b} from state dictionary however \
             they were not present! (the config says save_projection=true; if the \
             projections were deliberately left out, set \"save_projection\": false \
             in adapter_config.json to regenerate them from projection_prng_key)"
        ),
    }
}

/// The loader's error for a checkpoint with `pvera_A` but no `pvera_B` whose A is not the
/// regenerated one.
pub(crate) fn unrecoverable_b(method: Method, file: &str, projection_prng_key: i128, diff: usize) -> Error {
    let (a, b) = (proj_a_name(method), proj_b_name(method));
    Error::MissingTensor {
        file: file.to_string(),
        key: proj_b_key(method).into(),
        hint: format!(
            ": the file has {a} but no {b}, and its {a} differs from the \
             one regenerated from projection_prng_key={projection_prng_key} in {diff} elements, so B \
             cannot be recovered (PEFT would silently use a regenerated B). Re-save \
             the adapter with both projections."
        ),
    }
}

/// The loader's warning for a checkpoint with `pvera_A` (equal to the regenerated one) but no
/// `pvera_B`.
pub(crate) fn regenerated_b_warning(method: Method, file: &str, projection_prng_key: i128) -> String {
    let (a, b) = (proj_a_name(method), proj_b_name(method));
    format!(
        "{file}: {b} is missing (PEFT silently regenerates it); {a} equals the \
         projection regenerated from projection_prng_key={projection_prng_key}, so the regenerated B is used"
    )
}

/// The loader's warning for `save_projection=false` with stored projections that differ from the
/// regenerated ones (`da` + `db` elements).
pub(crate) fn stored_projections_ignored_warning(method: Method, file: &str, da: usize, db: usize) -> String {
    let (a, b) = (proj_a_name(method), proj_b_name(method));
    format!(
        "{file}: save_projection=false but the file carries {a}/{b} that \
         differ from the regenerated ones ({da} + {db} elements); pvera uses the \
         stored projections, PEFT would ignore them and give different outputs"
    )
}

/// The loader's warning for `save_projection=false` with a stored A (differing in `da` elements)
/// and no B.
pub(crate) fn stored_a_ignored_warning(method: Method, file: &str, da: usize) -> String {
    let (a, b) = (proj_a_name(method), proj_b_name(method));
    format!(
        "{file}: save_projection=false; the stored {a} differs from the \
         regenerated one in {da} elements and there is no {b}; using the \
         regenerated projections, as PEFT does"
    )
}
