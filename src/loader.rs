//! Which model to serve: the built-in default, or a model directory.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::InitModelArgs;
use crate::engine::{ModelMeta, ServedModel};
use crate::model::{FusionModel, ModelConfig};
use crate::preprocess::{InputLimits, Preprocessor};
use crate::weights;

/// Seed of the built-in model's weights: fixed, so every replica serves the same.
pub const BUILTIN_SEED: u64 = 0;
pub const BUILTIN_VERSION: &str = "builtin";

/// Loads what `model_dir` names (or the built-in model) onto `device`.
pub fn load(
    model_dir: Option<&Path>,
    device: &Device,
    limits: InputLimits,
) -> anyhow::Result<ServedModel> {
    match model_dir {
        None => builtin(device, limits),
        Some(dir) => {
            let (config, model) = weights::load_dir(dir, device)?;
            let version = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            served(
                config,
                model,
                version,
                ModelMeta {
                    source: dir.display().to_string(),
                    untrained: false,
                    training: None,
                },
                device,
                limits,
            )
        }
    }
}

/// The default config with deterministic random weights.
pub fn builtin(device: &Device, limits: InputLimits) -> anyhow::Result<ServedModel> {
    let config = ModelConfig::default();
    let vars = weights::init_random(&config, BUILTIN_SEED)?;
    let vb = VarBuilder::from_varmap(&vars, DType::F32, device);
    let model = FusionModel::new(&config, vb)?;
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
        limits,
    )
}

fn served(
    config: ModelConfig,
    model: FusionModel,
    version: String,
    meta: ModelMeta,
    device: &Device,
    limits: InputLimits,
) -> anyhow::Result<ServedModel> {
    let preprocessor = Preprocessor::new(&config, limits)
        .map_err(|e| anyhow::anyhow!("model config does not fit the preprocessor: {e}"))?;
    Ok(ServedModel {
        preprocessor: Arc::new(preprocessor),
        model,
        config,
        version,
        meta,
        device: device.clone(),
    })
}

/// `fusion-serve init-model`: a seeded random model directory.
pub fn init_model(args: &InitModelArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        None => ModelConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
    };
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid model config: {e}"))?;
    let vars = weights::init_random(&config, args.seed)?;
    weights::save_dir(&args.out, &config, &vars)?;
    println!(
        "wrote a randomly initialised model (seed {}) to {}",
        args.seed,
        args.out.display()
    );
    Ok(())
}
