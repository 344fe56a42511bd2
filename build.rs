//! Generates the gRPC API from `proto/shardgate/v1/*.proto` (protoc from Debian's
//! `protobuf-compiler`, installed by `deploy/local/stack.sh install`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // A request that is not valid protobuf is INVALID_ARGUMENT (MALFORMED), not INTERNAL.
        .codec_path("crate::server::codec::ApiCodec")
        .compile_protos(
            &[
                "proto/shardgate/v1/types.proto",
                "proto/shardgate/v1/topology.proto",
                "proto/shardgate/v1/ingest.proto",
                "proto/shardgate/v1/query.proto",
                "proto/shardgate/v1/jobs.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
