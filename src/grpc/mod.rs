//! The gRPC surface: handlers, message conversion, deadlines.

pub mod convert;
pub mod deadline;
mod info;
mod service;
mod train;

pub use service::{code_name, FusionApi};
