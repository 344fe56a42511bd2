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
    // The ingest service's server side once more, in its own module (`wire::server_view`): the
    // same RPCs and messages on the wire, but `RowBatch` is `wire::raw::RowBatch`, whose rows
    // stay encoded when a request is decoded (each is read straight into CQL cells when bound).
    // Every other message is the generated one.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("server_view");
    std::fs::create_dir_all(&out_dir)?;
    let mut view = tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .codec_path("crate::server::codec::ApiCodec")
        .out_dir(&out_dir)
        .extern_path(".shardgate.v1.RowBatch", "crate::wire::raw::RowBatch");
    // Every top-level message and enum the service's files declare, but the two requests.
    for file in ["types", "topology", "ingest"] {
        let text = std::fs::read_to_string(format!("proto/shardgate/v1/{file}.proto"))?;
        let declared = text.lines().filter_map(|line| {
            let name = line.strip_prefix("message ").or_else(|| line.strip_prefix("enum "))?;
            name.split_whitespace().next()
        });
        for name in declared {
            if !matches!(name, "RowBatch" | "WriteRequest" | "WriteStreamRequest") {
                view = view.extern_path(format!(".shardgate.v1.{name}"), format!("crate::wire::proto::{name}"));
            }
        }
    }
    view.compile_protos(&["proto/shardgate/v1/ingest.proto"], &["proto"])?;
    Ok(())
}
