//! One module per subcommand: each owns its clap arguments and a `run` function.

pub mod agent;
mod args;
pub mod ca;
pub mod certs;
pub mod check;
pub mod compat;
pub mod config;
pub mod connectivity;
pub mod datapath;
#[cfg(feature = "demo")]
pub mod demo;
pub mod docs;
pub mod enroll;
pub mod observe;
pub mod proxy;
pub mod static_proxy;
pub mod status;
pub mod tuning;
pub mod uninstall;
pub mod version;

pub use args::{parse_duration, ModeArg};

/// An error and its causes on one line, `outer: cause: root cause`, like anyhow's `{:#}`
/// but without repeating a cause whose text an outer message already shows (many errors
/// put their source in their own message *and* return it as `source()`, which printed the
/// OS error twice: "cannot read x: Permission denied (os error 13): Permission denied (os
/// error 13)").
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// SIGTERM (Kubernetes, systemd) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Refuses to start without the Kubernetes permissions `needed`, naming every one missing.
/// A check that cannot be made (the API server unreachable, SelfSubjectAccessReview
/// refused) is only warned about: the watchers retry and report on their own.
pub(crate) async fn check_kube_access(
    client: &kube::Client,
    needed: &[zmesh_cluster::access::Access],
) -> anyhow::Result<()> {
    use zmesh_cluster::access::{check_access, AccessError};
    match check_access(client, needed).await {
        Ok(()) => Ok(()),
        Err(e @ AccessError::Denied(_)) => Err(e.into()),
        Err(e @ AccessError::Unavailable { .. }) => {
            tracing::warn!(target: "kubernetes", "{e}; starting anyway");
            Ok(())
        }
    }
}

/// Percent-encodes a query value (SPIFFE IDs carry `:` and `/`, times carry `+`).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}: {source}")]
    struct Repeats {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn error_chain_shows_each_cause_once() {
        let denied = || std::io::Error::from_raw_os_error(13);
        // The source in the message and as source(): shown once.
        let e = anyhow::Error::new(Repeats {
            path: "/x",
            source: denied(),
        })
        .context("loading the CA");
        let text = error_chain(&e);
        assert_eq!(text.matches("os error 13").count(), 1, "{text}");
        assert!(
            text.starts_with("loading the CA: cannot read /x: "),
            "{text}"
        );
        // A cause the outer message does not show is kept.
        let e = anyhow::Error::new(denied()).context("writing /y");
        let text = error_chain(&e);
        assert!(
            text.starts_with("writing /y: ") && text.contains("os error 13"),
            "{text}"
        );
    }
}
