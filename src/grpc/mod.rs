//! The gRPC surface: handlers, message conversion, deadlines.

pub(crate) mod codec;
pub mod convert;
pub mod deadline;
mod info;
mod service;
mod train;

pub use service::{code_name, FusionApi};
