//! Drop reports read from the `zm_events` ring buffer.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{abi, RedirectError};

/// Why the tc program dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Plaintext SYN to a pod in strict mode from a source that is not a mesh proxy.
    StrictPlaintext,
    /// Traffic for the proxy arrived while its listener was missing (fail closed).
    ProxyUnavailable,
    /// An IP fragment to a strict-mode pod: ports cannot be checked.
    Fragment,
    /// A reason code this build does not know (kernel side is newer).
    Unknown(u32),
}

impl DropReason {
    pub(crate) fn from_code(code: u32) -> Self {
        match code {
            abi::REASON_STRICT_PLAINTEXT => Self::StrictPlaintext,
            abi::REASON_PROXY_UNAVAILABLE => Self::ProxyUnavailable,
            abi::REASON_FRAGMENT => Self::Fragment,
            n => Self::Unknown(n),
        }
    }

    /// The counter index of this reason in the per-CPU drop counters.
    pub fn code(self) -> u32 {
        match self {
            Self::StrictPlaintext => abi::REASON_STRICT_PLAINTEXT,
            Self::ProxyUnavailable => abi::REASON_PROXY_UNAVAILABLE,
            Self::Fragment => abi::REASON_FRAGMENT,
            Self::Unknown(n) => n,
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::StrictPlaintext => f.write_str("plaintext to a strict-mode pod"),
            Self::ProxyUnavailable => f.write_str("proxy listener unavailable"),
            Self::Fragment => f.write_str("IP fragment to a strict-mode pod"),
            Self::Unknown(n) => write!(f, "unknown reason {n}"),
        }
    }
}

/// One dropped packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// Wall-clock time of the drop (converted from the kernel's monotonic clock).
    pub time: SystemTime,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub reason: DropReason,
}

/// Stream of drop reports. Reports are lost only if the 256 KiB ring fills up
/// (the per-reason counters still count every drop).
pub struct DropEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl DropEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Result<Self, RedirectError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(RedirectError::InvalidConfig(
                "drop events need a tokio runtime".into(),
            ));
        }
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the
        // AsyncFd (which owns the RingBuf) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| RedirectError::Io {
                op: "poll",
                path: "zm_events".into(),
                source: e.into_parts().1,
            })?;
        Ok(Self { ring })
    }

    /// The next report that is already queued, without waiting.
    pub fn try_next(&mut self) -> Option<DropEvent> {
        let ring = self.ring.get_mut();
        loop {
            let item = ring.next()?;
            if let Some(ev) = parse(&item) {
                return Some(ev);
            }
        }
    }

    /// Waits for the next report. Needs a tokio runtime.
    pub async fn next(&mut self) -> Result<DropEvent, RedirectError> {
        loop {
            if let Some(ev) = self.try_next() {
                return Ok(ev);
            }
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .map_err(|source| RedirectError::Io {
                    op: "poll",
                    path: "zm_events".into(),
                    source,
                })?;
            guard.clear_ready();
        }
    }
}

impl std::fmt::Debug for DropEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropEvents")
            .field("fd", &self.ring.as_raw_fd())
            .finish()
    }
}

fn parse(bytes: &[u8]) -> Option<DropEvent> {
    if bytes.len() < std::mem::size_of::<abi::DropEvent>() {
        return None;
    }
    // SAFETY: length checked; DropEvent is plain data valid for any bit pattern.
    let raw: abi::DropEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let src = SocketAddr::new(raw.src.to_ip(), u16::from_be_bytes(raw.sport));
    let dst = SocketAddr::new(raw.dst.to_ip(), u16::from_be_bytes(raw.dport));
    Some(DropEvent {
        time: monotonic_to_wall(raw.ts_ns),
        src,
        dst,
        reason: DropReason::from_code(raw.reason),
    })
}

fn monotonic_to_wall(ts_ns: u64) -> SystemTime {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let mono_now = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    let wall_now = SystemTime::now();
    wall_now
        .checked_sub(Duration::from_nanos(mono_now.saturating_sub(ts_ns)))
        .unwrap_or(wall_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_records_are_ignored() {
        assert!(parse(&[0u8; 10]).is_none());
    }

    #[test]
    fn record_decodes_addresses_ports_and_reason() {
        let mut raw = abi::DropEvent {
            ts_ns: 0,
            src: abi::Ip::new("10.0.0.1".parse().unwrap()),
            dst: abi::Ip::new("10.0.0.2".parse().unwrap()),
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            reason: 1,
        };
        // SAFETY: reading the bytes of a repr(C) value.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw as *const abi::DropEvent).cast::<u8>(),
                std::mem::size_of::<abi::DropEvent>(),
            )
        }
        .to_vec();
        let ev = parse(&bytes).unwrap();
        assert_eq!(ev.src, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(ev.dst, "10.0.0.2:80".parse().unwrap());
        assert_eq!(ev.reason, DropReason::StrictPlaintext);
        raw.reason = 42;
        assert_eq!(DropReason::from_code(raw.reason), DropReason::Unknown(42));
    }
}
