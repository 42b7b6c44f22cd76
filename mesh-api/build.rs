//! Compiles the protobuf definitions with protox (a pure-Rust parser), so building needs no
//! system `protoc`.
//!
//! The node service's server side is declared by hand (`tonic_build::manual`): it sends
//! `encoded::EncodedUpdate`, which is `ConfigUpdate` on the wire with each resource already
//! encoded, so that the control plane encodes a resource once per version rather than once
//! per node. Clients (the node) use the generated `ConfigUpdate`.

use tonic_build::manual::{Method, Service};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/mycel/v1/node.proto", "proto/mycel/v1/tunnel.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;

    let codec = "tonic_prost::ProstCodec";
    let node_service = Service::builder()
        .name("NodeService")
        .package("mycel.v1")
        .comment("The API between a node daemon and the control plane (see node.proto), as the control plane serves it.")
        .method(
            Method::builder()
                .name("stream_config")
                .route_name("StreamConfig")
                .input_type("crate::v1::ConfigAck")
                .output_type("crate::encoded::EncodedUpdate")
                .codec_path(codec)
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .method(
            Method::builder()
                .name("sign_certificate")
                .route_name("SignCertificate")
                .input_type("crate::v1::SignCertificateRequest")
                .output_type("crate::v1::SignCertificateResponse")
                .codec_path(codec)
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[node_service]);
    Ok(())
}
