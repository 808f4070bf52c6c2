//! Follows the model store: when `ACTIVE` names a version other than the one served
//! (another replica trained it), load it fresh, warm it up, and swap it in. A version
//! that fails to load is refused (counted and logged) and the old one keeps serving.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};

use crate::engine::{self, ModelSlot, ServedModel};
use crate::loader;
use crate::preprocess::{InputLimits, PreparedSample};
use crate::store::ModelStore;
use crate::telemetry::metrics as m;

pub struct StoreWatcher {
    pub store: Arc<ModelStore>,
    pub slot: ModelSlot,
    pub device: Device,
    pub dtype: DType,
    pub limits: InputLimits,
}

impl StoreWatcher {
    /// Checks every `interval` until the task is dropped.
    pub async fn run(self, interval: Duration) {
        let this = Arc::new(self);
        let mut refused: Option<String> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (w, skip) = (this.clone(), refused.clone());
            match tokio::task::spawn_blocking(move || w.check(skip.as_deref())).await {
                Ok(Ok(_)) => {}
                Ok(Err((version, e))) => {
                    metrics::counter!(m::MODEL_LOAD_FAILURES).increment(1);
                    tracing::error!(%version, error = format!("{e:#}"), "refusing a newly activated version that does not load; still serving the old one");
                    refused = Some(version);
                }
                Err(e) => tracing::error!(error = %e, "store watcher task failed"),
            }
        }
    }

    /// One look at the store. Returns the version swapped in, if any.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, refused: Option<&str>) -> Result<Option<String>, (String, anyhow::Error)> {
        let active = match self.store.active() {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(None),
            Err(e) => return Err(("ACTIVE".into(), e)),
        };
        if active == self.slot.current().version || Some(active.as_str()) == refused {
            return Ok(None);
        }
        let model =
            loader::load_version(&self.store, &active, &self.device, self.dtype, &self.limits)
                .and_then(|m| warm_up(&m).map(|_| m))
                .map_err(|e| (active.clone(), e))?;
        let old = self.slot.swap(model);
        tracing::info!(from = %old.version, to = %active, "serving a newly activated version from the store");
        Ok(Some(active))
    }
}

/// Runs one forward pass on a blank sample: catches a model that loads but cannot run,
/// and pays one-off allocation costs before real requests do.
pub fn warm_up(model: &ServedModel) -> anyhow::Result<()> {
    let sample = warmup_sample(model);
    engine::forward(model, &[&sample])
        .map_err(|e| anyhow::anyhow!("warm-up forward pass failed: {e}"))?;
    Ok(())
}

/// A blank image and one second of silence-level features.
pub fn warmup_sample(model: &ServedModel) -> PreparedSample {
    let c = &model.config;
    let frames = (c.audio.sample_rate as usize / c.audio.hop_length).max(1);
    PreparedSample {
        image: vec![0.0; c.image.channels * c.image.height * c.image.width],
        audio: vec![c.audio.log_eps.ln(); frames * c.audio.n_mels],
        frames,
    }
}
