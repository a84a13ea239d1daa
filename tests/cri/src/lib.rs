//! A client of the Kubernetes Container Runtime Interface (CRI) v1: what kubelet speaks
//! to containerd or CRI-O on a node's unix socket. Tests use it to create pods the way
//! kubelet does (tests/support/node_runtime.rs).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated `runtime.v1` package.
#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("runtime.v1");
}

/// The tonic this client is built with (for its `Status` and transport errors).
pub use tonic;
pub use v1::image_service_client::ImageServiceClient;
pub use v1::runtime_service_client::RuntimeServiceClient;

/// A channel to the runtime's unix socket (the URI is a placeholder: every connection goes
/// to `socket`).
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_owned();
    Endpoint::from_static("http://cri.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
}
