// Generates the gRPC code into OUT_DIR and a descriptor set for server reflection.
// protoc comes vendored, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the env concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Undecodable request bodies answer INVALID_ARGUMENT, not prost's INTERNAL.
        .codec_path("crate::grpc::codec::StrictCodec")
        .file_descriptor_set_path(out.join("fusion_descriptor.bin"))
        .compile_protos(&["proto/fusion/v1/fusion.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
