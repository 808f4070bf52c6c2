//! Which model to serve, and loading it: a version from the model store, the store's
//! base model (a plain model directory), or the built-in default.

use std::sync::Arc;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::InitModelArgs;
use crate::engine::{ModelMeta, ServedModel};
use crate::model::{FusionModel, ModelConfig};
use crate::preprocess::{InputLimits, Preprocessor};
use crate::store::ModelStore;
use crate::telemetry::metrics as m;
use crate::weights;

/// Seed of the built-in model's weights: fixed, so every replica serves the same.
pub const BUILTIN_SEED: u64 = 0;
pub const BUILTIN_VERSION: &str = "builtin";
/// The version name of a plain model directory's weights.
pub const BASE_VERSION: &str = "base";

/// Loads what the store says to serve: the active version; if that fails to load,
/// the newest older version that was activated; else the base model; else the
/// built-in model.
pub fn load_initial(
    store: &ModelStore,
    device: &Device,
    dtype: DType,
    limits: &InputLimits,
) -> anyhow::Result<ServedModel> {
    if let Some(active) = store.active()? {
        match load_version(store, &active, device, dtype, limits) {
            Ok(m) => return Ok(m),
            Err(e) => {
                metrics::counter!(m::MODEL_LOAD_FAILURES).increment(1);
                tracing::error!(version = %active, error = format!("{e:#}"), "the active version does not load; falling back");
                let active_n = crate::store::version_number(&active).unwrap_or(u64::MAX);
                for (n, name) in store.versions()?.into_iter().rev() {
                    let activated = store.metadata(&name).map(|md| md.activate).unwrap_or(false);
                    if n >= active_n || !activated {
                        continue;
                    }
                    match load_version(store, &name, device, dtype, limits) {
                        Ok(m) => return Ok(m),
                        Err(e) => {
                            metrics::counter!(m::MODEL_LOAD_FAILURES).increment(1);
                            tracing::error!(version = %name, error = format!("{e:#}"), "an older version does not load either");
                        }
                    }
                }
            }
        }
    }
    match store.base_model_dir() {
        Some(dir) => {
            let loaded = weights::load_dir(dir)?;
            let model = build(&loaded.config, loaded.tensors.clone(), device, dtype)?;
            served(
                loaded.config,
                model,
                BASE_VERSION.into(),
                ModelMeta {
                    source: dir.display().to_string(),
                    untrained: false,
                    training: None,
                },
                device,
                dtype,
                limits,
            )
        }
        None => builtin(device, dtype, limits),
    }
}

/// Loads version `version` of the store, fresh from disk.
pub fn load_version(
    store: &ModelStore,
    version: &str,
    device: &Device,
    dtype: DType,
    limits: &InputLimits,
) -> anyhow::Result<ServedModel> {
    let dir = store.version_dir(version);
    let loaded = weights::load_dir(&dir)?;
    let model = build(&loaded.config, loaded.tensors.clone(), device, dtype)?;
    let training = store
        .metadata(version)
        .ok()
        .and_then(|md| serde_json::to_value(md).ok());
    served(
        loaded.config,
        model,
        version.to_string(),
        ModelMeta {
            source: dir.display().to_string(),
            untrained: false,
            training,
        },
        device,
        dtype,
        limits,
    )
}

/// The default config with deterministic random weights.
pub fn builtin(device: &Device, dtype: DType, limits: &InputLimits) -> anyhow::Result<ServedModel> {
    let config = ModelConfig::default();
    let tensors = weights::random_tensors(&config, BUILTIN_SEED)?
        .into_iter()
        .collect();
    let model = build(&config, tensors, device, dtype)?;
    served(
        config,
        model,
        BUILTIN_VERSION.into(),
        ModelMeta {
            source: "built-in".into(),
            untrained: true,
            training: None,
        },
        device,
        dtype,
        limits,
    )
}

/// The inference model over `tensors`, converted to `dtype` on `device`.
fn build(
    config: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<FusionModel> {
    Ok(FusionModel::new(
        config,
        VarBuilder::from_tensors(tensors, dtype, device),
    )?)
}

fn served(
    config: ModelConfig,
    model: FusionModel,
    version: String,
    meta: ModelMeta,
    device: &Device,
    dtype: DType,
    limits: &InputLimits,
) -> anyhow::Result<ServedModel> {
    let preprocessor = Preprocessor::new(&config, limits.clone())
        .map_err(|e| anyhow::anyhow!("model config does not fit the preprocessor: {e}"))?;
    Ok(ServedModel {
        preprocessor: Arc::new(preprocessor),
        model,
        config: Arc::new(config),
        version,
        meta,
        dtype,
        device: device.clone(),
    })
}

/// `fusion-serve init-model`: a seeded random model directory.
pub fn init_model(args: &InitModelArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        None => ModelConfig::default(),
        Some(path) => weights::read_config(path)?,
    };
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid model config: {e}"))?;
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        anyhow::bail!(
            "--out {}: the directory exists and is not empty",
            args.out.display()
        );
    }
    let vars = weights::init_random(&config, args.seed)?;
    weights::save_dir(&args.out, &config, &vars)?;
    println!(
        "wrote a randomly initialised model (seed {}) to {}",
        args.seed,
        args.out.display()
    );
    Ok(())
}

/// The numeric part of a version name for the `fusion_model_version` gauge.
pub fn version_gauge(version: &str) -> f64 {
    crate::store::version_number(version).unwrap_or(0) as f64
}
