//! The served model and the slot that swaps it atomically.

use std::sync::Arc;

use arc_swap::ArcSwap;
use candle_core::{DType, Device};

use crate::model::{FusionModel, ModelConfig};
use crate::preprocess::Preprocessor;

/// Where a served model came from and how it was made.
#[derive(Clone, Debug, Default)]
pub struct ModelMeta {
    /// A directory path, or "built-in".
    pub source: String,
    /// Random weights nobody trained.
    pub untrained: bool,
    /// The run's metadata (JSON) if this service trained it.
    pub training: Option<serde_json::Value>,
}

/// A loaded, warmed-up model ready to serve.
pub struct ServedModel {
    pub model: FusionModel,
    /// Shared with the requests prepared for this model (see [`crate::engine::Job`]).
    pub config: Arc<ModelConfig>,
    pub version: String,
    pub meta: ModelMeta,
    pub device: Device,
    /// The number format of the weights and activations (inputs and outputs are f32).
    pub dtype: DType,
    /// Turns requests into this model's input (its image size, mel settings).
    pub preprocessor: Arc<Preprocessor>,
}

/// The model being served now. Readers take a snapshot per batch; a swap replaces it
/// for later batches only.
#[derive(Clone)]
pub struct ModelSlot(Arc<ArcSwap<ServedModel>>);

impl ModelSlot {
    /// Every model that becomes current is published in `fusion_model_version`.
    pub fn new(model: ServedModel) -> Self {
        publish_version(&model.version);
        Self(Arc::new(ArcSwap::from_pointee(model)))
    }
    pub fn current(&self) -> Arc<ServedModel> {
        self.0.load_full()
    }
    pub fn swap(&self, model: ServedModel) -> Arc<ServedModel> {
        publish_version(&model.version);
        self.0.swap(Arc::new(model))
    }
}

fn publish_version(version: &str) {
    metrics::gauge!(crate::telemetry::metrics::MODEL_VERSION)
        .set(crate::loader::version_gauge(version));
}
