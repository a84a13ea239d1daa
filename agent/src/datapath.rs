//! The data path: the proxy on a thread and runtime of its own, configured exactly as `zmesh
//! proxy` runs it (`zmesh_proxy::runtime`: the settings BENCHMARKS.md measured), so that
//! the agent's control work (watches, certificate renewals, map updates, netlink) never
//! runs between two frames of a tunnel, and what a node runs is what was benchmarked.
//!
//! The agent watches it: [`DataPath::stopped`] resolves when the proxy ends, with the
//! reason if it ended on its own (a listener failed, a panic), and the agent then exits
//! non-zero so that it is restarted.

use std::sync::Arc;

pub(crate) mod link;
pub mod protocol;
pub mod server;

use tokio::sync::oneshot;
use zmesh_proxy::connections::OpenConnections;
use zmesh_proxy::{DrainHandle, Proxy, ProxyConfig, ProxyDeps, ProxyError};

/// Why the data path could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error("cannot start the proxy's thread or runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("the proxy's thread panicked: {0}")]
    Panicked(String),
}

/// The running proxy.
pub(crate) struct DataPath {
    drain: DrainHandle,
    /// Duplicates of the proxy's listening sockets, for a successor (see `handover`).
    pub listener_fds: Vec<std::os::fd::OwnedFd>,
    /// The proxy's open connections (for the admin API).
    pub connections: Arc<OpenConnections>,
    stopped: oneshot::Receiver<Result<(), ProxyError>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DataPath {
    /// Binds the proxy's listeners on its own runtime (`threads` workers, as `zmesh proxy
    /// --worker-threads`) and starts serving; bind errors are returned here.
    pub async fn start(
        config: ProxyConfig,
        deps: ProxyDeps,
        threads: usize,
    ) -> Result<Self, DataPathError> {
        zmesh_proxy::runtime::tune_malloc();
        let (bound_tx, bound_rx) = oneshot::channel();
        let (stopped_tx, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("zmesh-proxy".into())
            .spawn(move || {
                let runtime = match zmesh_proxy::runtime::build(threads) {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = bound_tx.send(Err(DataPathError::Runtime(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let proxy = match Proxy::bind(config, deps).await {
                        Ok(proxy) => proxy,
                        Err(e) => {
                            let _ = bound_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let fds = match proxy.listener_fds() {
                        Ok(fds) => fds,
                        Err(e) => {
                            tracing::warn!("cannot duplicate the listening sockets: {e}");
                            Vec::new()
                        }
                    };
                    let _ = bound_tx.send(Ok((proxy.drain_handle(), fds, proxy.connections())));
                    let _ = stopped_tx.send(proxy.run().await);
                });
            })
            .map_err(DataPathError::Runtime)?;
        let mut thread = Some(thread);
        let (drain, listener_fds, connections) = match bound_rx.await {
            Ok(bound) => bound?,
            Err(_) => return Err(panic_of(&mut thread).await),
        };
        Ok(Self {
            drain,
            listener_fds,
            connections,
            stopped,
            thread,
        })
    }

    /// Starts a graceful drain (see [`DrainHandle`]); [`DataPath::stopped`] then resolves
    /// once the open tunnels are done.
    pub fn drain(&self) {
        self.drain.drain();
    }

    /// Resolves when the proxy stopped: `Ok` after a drain, the reason if it stopped on its
    /// own. Await it once.
    pub async fn stopped(&mut self) -> Result<(), DataPathError> {
        let result = match (&mut self.stopped).await {
            Ok(result) => result.map_err(DataPathError::from),
            Err(_) => Err(panic_of(&mut self.thread).await),
        };
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }
}

/// The panic message of a data path thread that died without reporting.
async fn panic_of(thread: &mut Option<std::thread::JoinHandle<()>>) -> DataPathError {
    let Some(thread) = thread.take() else {
        return DataPathError::Panicked("the thread is gone".into());
    };
    let message = match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Err(payload)) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into()),
        Ok(Ok(())) => "the thread ended without a result".into(),
        Err(e) => format!("cannot join the thread: {e}"),
    };
    DataPathError::Panicked(message)
}
