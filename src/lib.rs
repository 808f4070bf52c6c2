//! fusion-serve: a gRPC service for an image + audio fusion model.
//!
//! Request path: grpc handler -> preprocess (blocking pool) -> batching service ->
//! engine thread -> model -> one reply per request.

pub mod error;
pub mod model;
pub mod preprocess;
pub mod weights;

/// Generated protobuf and gRPC code.
pub mod proto {
    tonic::include_proto!("fusion.v1");
    /// Encoded descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fusion_descriptor");
}
