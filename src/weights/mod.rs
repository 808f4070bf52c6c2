//! Model weights on disk and in memory.
//!
//! A model directory holds `config.json` (a [`ModelConfig`]) and `model.safetensors`,
//! whose tensor names are exactly the PyTorch reference module's `state_dict()` keys
//! (`tests/reference/fusion_reference.py`): a `state_dict()` saved with
//! `safetensors.torch.save_file` loads with no renaming, and what [`save_dir`] writes
//! loads back into PyTorch with `load_state_dict(strict=True)`.
//!
//! - [`load_dir`]: read and check a directory; errors name the field or tensor.
//! - [`init_random`]: seeded, deterministic PyTorch-style initialisation into a `VarMap`.
//! - [`save_dir`]: write a directory atomically (temporary sibling, fsync, rename).
//! - [`LoadedWeights::build_model`], [`load_model`], [`model_from_varmap`]: build a
//!   [`FusionModel`].

pub mod spec;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::model::{FusionModel, ModelConfig};
pub use spec::{
    batch_norm_prefixes, tensor_specs, InitScheme, TensorKind, TensorSpec, NUM_BATCHES_TRACKED,
};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid model config: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: not a readable safetensors file: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },
    #[error("missing tensor `{name}`{}", and_more(.others))]
    MissingTensor { name: String, others: usize },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {dtype:?}, expected a floating-point dtype")]
    DType { name: String, dtype: DType },
    #[error("unexpected tensor `{name}`: not part of this model{}", and_more(.others))]
    UnexpectedTensor { name: String, others: usize },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn and_more(others: &usize) -> String {
    match others {
        0 => String::new(),
        n => format!(" (and {n} more)"),
    }
}

pub type Result<T, E = WeightsError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Anything that can hand out tensors by name: a `VarMap`, a name -> tensor map,
/// [`LoadedWeights`].
pub trait TensorSource {
    fn tensor(&self, name: &str) -> Option<Tensor>;
}

impl TensorSource for HashMap<String, Tensor> {
    fn tensor(&self, name: &str) -> Option<Tensor> {
        self.get(name).cloned()
    }
}

impl TensorSource for VarMap {
    fn tensor(&self, name: &str) -> Option<Tensor> {
        let data = self.data().lock().unwrap_or_else(|e| e.into_inner());
        data.get(name).map(|v| v.as_tensor().clone())
    }
}

impl TensorSource for LoadedWeights {
    fn tensor(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).cloned()
    }
}

/// A checked model directory: the config and every tensor of [`tensor_specs`], `f32`
/// on the CPU (no `num_batches_tracked`).
#[derive(Clone, Debug)]
pub struct LoadedWeights {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
}

impl LoadedWeights {
    /// A builder over these tensors (shared, not copied, on the CPU).
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), DType::F32, device)
    }

    /// The model for inference (or evaluation); its tensors are not variables.
    pub fn build_model(&self, device: &Device) -> Result<FusionModel> {
        Ok(FusionModel::new(&self.config, self.var_builder(device))?)
    }

    /// A fresh `VarMap` holding copies of these tensors, e.g. to fine-tune from them
    /// without touching the served model.
    pub fn to_varmap(&self) -> Result<VarMap> {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for spec in tensor_specs(&self.config) {
                let t =
                    self.tensors
                        .get(&spec.name)
                        .ok_or_else(|| WeightsError::MissingTensor {
                            name: spec.name.clone(),
                            others: 0,
                        })?;
                data.insert(spec.name, Var::from_tensor(&t.copy()?)?);
            }
        }
        Ok(varmap)
    }
}

/// [`load_dir`] then [`LoadedWeights::build_model`]: the config and the model, ready
/// to serve on `device`.
pub fn load_model(dir: impl AsRef<Path>, device: &Device) -> Result<(ModelConfig, FusionModel)> {
    let loaded = load_dir(dir)?;
    let model = loaded.build_model(device)?;
    Ok((loaded.config, model))
}

/// Reads and validates `config.json` at `path`.
pub fn read_config(path: impl AsRef<Path>) -> Result<ModelConfig> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(io_err(path))?;
    let cfg: ModelConfig = serde_json::from_slice(&bytes).map_err(|e| WeightsError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    cfg.validate().map_err(|message| WeightsError::Config {
        path: path.to_path_buf(),
        message,
    })?;
    Ok(cfg)
}

/// Loads a model directory (`config.json` + `model.safetensors`) onto the CPU and checks
/// every tensor's presence, shape and dtype against the config.
pub fn load_dir(dir: impl AsRef<Path>) -> Result<LoadedWeights> {
    let dir = dir.as_ref();
    let config = read_config(dir.join(CONFIG_FILE))?;
    let path = dir.join(WEIGHTS_FILE);
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    let raw = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        WeightsError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        }
    })?;
    let tensors = check_tensors(&config, raw)?;
    Ok(LoadedWeights {
        dir: dir.to_path_buf(),
        config,
        tensors,
    })
}

/// Checks `tensors` against [`tensor_specs`]: every tensor present with its shape and a
/// float dtype (converted to `f32`); nothing else but `num_batches_tracked` counters,
/// which are dropped.
pub fn check_tensors(
    cfg: &ModelConfig,
    mut tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let specs = tensor_specs(cfg);
    let missing: Vec<&str> = specs
        .iter()
        .filter(|s| !tensors.contains_key(&s.name))
        .map(|s| s.name.as_str())
        .collect();
    if let Some(first) = missing.first() {
        return Err(WeightsError::MissingTensor {
            name: first.to_string(),
            others: missing.len() - 1,
        });
    }
    let mut out = HashMap::with_capacity(specs.len());
    for spec in &specs {
        let Some(t) = tensors.remove(&spec.name) else {
            continue; // unreachable: checked above
        };
        check_shape(&spec.name, &spec.shape, &t)?;
        let t = match t.dtype() {
            DType::F32 => t,
            DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
            dtype => {
                return Err(WeightsError::DType {
                    name: spec.name.clone(),
                    dtype,
                })
            }
        };
        out.insert(spec.name.clone(), t);
    }
    for prefix in batch_norm_prefixes(&specs) {
        tensors.remove(&format!("{prefix}.{NUM_BATCHES_TRACKED}"));
    }
    let mut unexpected: Vec<String> = tensors.into_keys().collect();
    unexpected.sort();
    if let Some(first) = unexpected.first() {
        return Err(WeightsError::UnexpectedTensor {
            name: first.clone(),
            others: unexpected.len() - 1,
        });
    }
    Ok(out)
}

fn check_shape(name: &str, expected: &[usize], t: &Tensor) -> Result<()> {
    if t.dims() != expected {
        return Err(WeightsError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// Seeded PyTorch-style initial values for every tensor, in [`tensor_specs`] order:
/// convolutions kaiming-normal (fan_out, ReLU) as torchvision; batch norm weight 1,
/// bias 0, running mean 0, running var 1; LSTM `U(+-1/sqrt(hidden))`; `Linear`
/// weight and bias `U(+-1/sqrt(fan_in))`. The same seed always gives bit-identical
/// values (one `StdRng` drawn in a fixed order).
pub fn random_tensors(cfg: &ModelConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    cfg.validate().map_err(WeightsError::InvalidConfig)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for spec in tensor_specs(cfg) {
        let n: usize = spec.shape.iter().product();
        let values: Vec<f32> = match spec.init {
            InitScheme::KaimingNormalFanOut => {
                let fan_out: usize = spec.shape[0] * spec.shape[2..].iter().product::<usize>();
                let std = (2.0 / fan_out as f64).sqrt() as f32;
                let dist = Normal::new(0f32, std)
                    .map_err(|e| WeightsError::InvalidConfig(format!("{}: {e}", spec.name)))?;
                dist.sample_iter(&mut rng).take(n).collect()
            }
            InitScheme::Uniform { bound } => {
                let b = bound as f32;
                let dist = Uniform::new(-b, b)
                    .map_err(|e| WeightsError::InvalidConfig(format!("{}: {e}", spec.name)))?;
                dist.sample_iter(&mut rng).take(n).collect()
            }
            InitScheme::Const(v) => vec![v as f32; n],
        };
        out.push((
            spec.name,
            Tensor::from_vec(values, spec.shape, &Device::Cpu)?,
        ));
    }
    Ok(out)
}

/// [`random_tensors`] as the variables of a new `VarMap` (for training or a fresh model).
pub fn init_random(cfg: &ModelConfig, seed: u64) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, t) in random_tensors(cfg, seed)? {
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

/// Checks that `varmap` holds every tensor of the model with the right shape (so that
/// building from it never silently creates a missing variable).
fn check_source(cfg: &ModelConfig, src: &impl TensorSource) -> Result<()> {
    for spec in tensor_specs(cfg) {
        checked_tensor(&spec, src)?;
    }
    Ok(())
}

/// `spec`'s tensor from `src`, present and of the right shape.
fn checked_tensor(spec: &TensorSpec, src: &impl TensorSource) -> Result<Tensor> {
    let t = src
        .tensor(&spec.name)
        .ok_or_else(|| WeightsError::MissingTensor {
            name: spec.name.clone(),
            others: 0,
        })?;
    check_shape(&spec.name, &spec.shape, &t)?;
    Ok(t)
}

/// The model over `varmap`'s variables (shared: training updates are visible to it and
/// batch-norm running statistics are updated in the `VarMap` in training mode).
pub fn model_from_varmap(
    cfg: &ModelConfig,
    varmap: &VarMap,
    device: &Device,
) -> Result<FusionModel> {
    check_source(cfg, varmap)?;
    Ok(FusionModel::new(
        cfg,
        VarBuilder::from_varmap(varmap, DType::F32, device),
    )?)
}

/// The trainable variables of `varmap` (parameters, not batch-norm running statistics),
/// in [`tensor_specs`] order: what an optimizer should get.
pub fn trainable_vars(cfg: &ModelConfig, varmap: &VarMap) -> Result<Vec<Var>> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    tensor_specs(cfg)
        .into_iter()
        .filter(|s| s.kind == TensorKind::Parameter)
        .map(|s| {
            data.get(&s.name)
                .cloned()
                .ok_or(WeightsError::MissingTensor {
                    name: s.name,
                    others: 0,
                })
        })
        .collect()
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A sibling name for `dir` that no other writer uses: `.{name}.{tag}-{pid}-{n}`.
fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| WeightsError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "model directory path has no final component",
        ),
    })?;
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Ok(dir.with_file_name(format!(
        ".{}.{tag}-{}-{n}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn sync_dir(path: &Path) -> Result<()> {
    // Directories can be fsynced through a read-only handle on Unix; elsewhere this is
    // best effort.
    match File::open(path).and_then(|f| f.sync_all()) {
        Ok(()) => Ok(()),
        Err(e) if cfg!(unix) => Err(io_err(path)(e)),
        Err(_) => Ok(()),
    }
}

/// Writes a model directory atomically: `config.json` and `model.safetensors` (see
/// [`write_new_dir`]) go into a temporary sibling directory, are fsynced with it, and
/// the directory is renamed to `dir`.
///
/// If `dir` already exists it is first renamed aside and removed after the new one is
/// in place, so readers see either the old or the new directory complete, except for
/// the instant between the two renames when `dir` does not exist.
pub fn save_dir(dir: impl AsRef<Path>, cfg: &ModelConfig, src: &impl TensorSource) -> Result<()> {
    let dir = dir.as_ref();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = sibling(dir, "tmp")?;
    write_new_dir(&tmp, cfg, src)?;
    let old = if dir.exists() {
        let old = sibling(dir, "old")?;
        if let Err(e) = fs::rename(dir, &old) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err(dir)(e));
        }
        Some(old)
    } else {
        None
    };
    if let Err(e) = fs::rename(&tmp, dir) {
        // Put the old directory back if we moved it.
        if let Some(old) = &old {
            let _ = fs::rename(old, dir);
        }
        let _ = fs::remove_dir_all(&tmp);
        return Err(io_err(dir)(e));
    }
    sync_dir(&parent)?;
    if let Some(old) = old {
        if let Err(e) = fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), error = %e, "could not remove the replaced model directory");
        }
    }
    Ok(())
}

/// Creates `dir` (which must not exist) holding a model directory's files, each
/// fsynced, and the directory itself fsynced; no rename. Every tensor of
/// [`tensor_specs`] is written as `f32`, plus an `i64` scalar `num_batches_tracked` per
/// batch norm, taken from `src` when it has one, else 0. On failure `dir` is removed.
///
/// For writers that stage under a name of their own before renaming (the model store
/// writes `.tmp-vN-PID` directly, so a crash leaves only a name it knows to clean up).
pub fn write_new_dir(dir: &Path, cfg: &ModelConfig, src: &impl TensorSource) -> Result<()> {
    cfg.validate().map_err(WeightsError::InvalidConfig)?;
    let specs = tensor_specs(cfg);
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(specs.len() * 5 / 4);
    for spec in &specs {
        let t = checked_tensor(spec, src)?
            .detach()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        tensors.insert(spec.name.clone(), t);
    }
    for prefix in batch_norm_prefixes(&specs) {
        let name = format!("{prefix}.{NUM_BATCHES_TRACKED}");
        let count = match src.tensor(&name) {
            Some(t) if t.dtype() == DType::I64 && t.elem_count() == 1 => {
                t.to_device(&Device::Cpu)?.reshape(())?
            }
            _ => Tensor::new(0i64, &Device::Cpu)?,
        };
        tensors.insert(name, count);
    }
    let config_json =
        serde_json::to_vec_pretty(cfg).map_err(|e| WeightsError::InvalidConfig(e.to_string()))?;
    // Created here, so that a failure below removes only what this call made.
    fs::create_dir(dir).map_err(io_err(dir))?;
    let written = write_files(dir, &config_json, &tensors);
    if written.is_err() {
        let _ = fs::remove_dir_all(dir);
    }
    written
}

fn write_files(tmp: &Path, config_json: &[u8], tensors: &HashMap<String, Tensor>) -> Result<()> {
    let cfg_path = tmp.join(CONFIG_FILE);
    let mut f = File::create(&cfg_path).map_err(io_err(&cfg_path))?;
    f.write_all(config_json).map_err(io_err(&cfg_path))?;
    f.sync_all().map_err(io_err(&cfg_path))?;
    let st_path = tmp.join(WEIGHTS_FILE);
    candle_core::safetensors::save(tensors, &st_path)?;
    File::open(&st_path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&st_path))?;
    sync_dir(tmp)
}
