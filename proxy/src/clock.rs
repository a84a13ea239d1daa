//! A coarse clock for the proxy's long timers (HTTP/2 keepalive PINGs, idle pool
//! connections), ticked by a thread of its own.
//!
//! Why not tokio's timers: while one is armed, every park of the runtime arms a kernel
//! timer too (epoll_wait with a timeout), and on the data path the runtime parks twice per
//! round trip. Measured with the benchmark (pinned ping-pong, same binary): +2.6-3.3 us per
//! round trip and +3 us of CPU across two proxies. The connect timeout of a dial to a
//! workload, one per tunnel, is ticked here too (arming a tokio timer also wakes the
//! runtime through its eventfd); timeouts that exist only while an HBONE connection does its
//! handshakes still use tokio's timers.

use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug, Clone)]
pub(crate) struct Clock {
    ticks: watch::Receiver<u64>,
    period: Duration,
}

impl Clock {
    /// Starts the ticking thread; it stops by itself once every `Clock` is dropped.
    pub fn start(period: Duration) -> std::io::Result<Self> {
        let period = period.max(Duration::from_millis(1));
        let (tx, ticks) = watch::channel(0u64);
        std::thread::Builder::new()
            .name("zmesh-clock".into())
            .spawn(move || {
                while !tx.is_closed() {
                    std::thread::sleep(period);
                    tx.send_modify(|t| *t += 1);
                }
            })?;
        Ok(Self { ticks, period })
    }

    /// Sleeps at least `d`, at most two periods more.
    pub async fn sleep(&mut self, d: Duration) {
        let periods = d.as_nanos().div_ceil(self.period.as_nanos()) as u64;
        let target = *self.ticks.borrow_and_update() + periods.max(1) + 1;
        while *self.ticks.borrow_and_update() < target {
            if self.ticks.changed().await.is_err() {
                // The thread is gone (cannot happen while we hold a receiver).
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn sleeps_at_least_the_duration() {
        let mut clock = Clock::start(Duration::from_millis(5)).unwrap();
        for d in [1, 12, 30] {
            let d = Duration::from_millis(d);
            let start = Instant::now();
            clock.sleep(d).await;
            assert!(
                start.elapsed() >= d,
                "{d:?}: woke after {:?}",
                start.elapsed()
            );
        }
    }
}
