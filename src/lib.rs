//! fusion-serve: a gRPC service for an image + audio fusion model.
//!
//! Request path: grpc handler -> preprocess (blocking pool) -> batching service ->
//! engine thread -> model -> one reply per request.

pub mod app;
pub mod batching;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod loader;
pub mod model;
pub mod preprocess;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod training;
pub mod watcher;
pub mod weights;

/// Generated protobuf and gRPC code.
pub mod proto {
    tonic::include_proto!("fusion.v1");
    /// Encoded descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fusion_descriptor");
}

/// Serves with metrics on `config.metrics_addr` until SIGTERM or SIGINT.
pub async fn run(config: config::ServeConfig) -> anyhow::Result<()> {
    telemetry::init_metrics(config.metrics_addr)?;
    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.grpc_addr))?;
    server::serve(config, listener, server::shutdown_signal()).await
}
