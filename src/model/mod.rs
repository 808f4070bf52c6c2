//! The fusion model: image encoder, audio encoder, temporal pooling, fusion, head.

pub mod audio_encoder;
pub mod batch_norm;
pub mod config;
pub mod fusion;
pub mod head;
pub mod image_encoder;
pub mod ops;
pub mod pooling;

pub use audio_encoder::AudioEncoder;
pub use batch_norm::BatchNorm2d;
pub use config::ModelConfig;
pub use fusion::{FusionModel, FusionOutput};
pub use head::Head;
pub use image_encoder::{BasicBlock, ConvBn, ImageEncoder};
pub use pooling::TemporalPooling;
