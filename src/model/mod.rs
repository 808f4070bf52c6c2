//! The fusion model: image encoder, audio encoder, temporal pooling, fusion, head.

pub mod config;

pub use config::ModelConfig;
