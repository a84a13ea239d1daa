//! Compiles the CRI v1 API with protox (pure Rust), so no `protoc` is needed.
//!
//! proto/api.proto is kubernetes/cri-api v0.34.10 `pkg/apis/runtime/v1/api.proto`
//! (commit 0045747a2c345b3464f90f1578eae851db64c239), unmodified, Apache-2.0. Fields newer
//! than the runtime under test are simply absent on the wire.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // The API's comments are Go-flavoured prose: as rustdoc they would be parsed as
    // doctests and markdown. (The builder's own `disable_comments` covers services only.)
    let mut config = tonic_prost_build::Config::new();
    config.disable_comments(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .disable_comments(["."])
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
