//! Figures, their medians over rounds, the printed table and the comparison with the
//! targets (stock Istio ztunnel measured on this machine kind).

use std::fmt::Write;

use serde::Serialize;

use crate::procs::Memory;

/// CPU seconds used during one test.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct CpuUse {
    /// The harness process: clients and server.
    pub load: f64,
    /// Both proxies.
    pub proxies: f64,
    /// The whole machine (all processes, all CPUs).
    pub machine_busy: f64,
    pub machine_total: f64,
    pub wall: f64,
    /// Peak RSS of proxy A and proxy B during the test, KiB.
    pub proxy_peak_kib: [u64; 2],
}

/// CPU cost normalised by work done (seconds per GB for throughput tests, microseconds
/// per connection or per round trip otherwise), and the proxies' peak memory meanwhile.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct CpuPer {
    pub load: f64,
    pub proxies: f64,
    /// Fraction of the machine's CPU that was busy meanwhile (1.0 = every core).
    pub machine_busy: f64,
    /// Peak RSS of proxy A and proxy B during the test, KiB.
    pub proxy_peak_kib: [u64; 2],
}

impl CpuUse {
    fn busy(&self) -> f64 {
        if self.machine_total > 0.0 {
            self.machine_busy / self.machine_total
        } else {
            0.0
        }
    }

    pub fn per_gb(&self, bytes: u64) -> CpuPer {
        let gb = (bytes as f64 / 1e9).max(1e-9);
        CpuPer {
            load: self.load / gb,
            proxies: self.proxies / gb,
            machine_busy: self.busy(),
            proxy_peak_kib: self.proxy_peak_kib,
        }
    }

    pub fn per_conn(&self, conns: u64) -> CpuPer {
        let n = conns.max(1) as f64;
        CpuPer {
            load: self.load / n * 1e6,
            proxies: self.proxies / n * 1e6,
            machine_busy: self.busy(),
            proxy_peak_kib: self.proxy_peak_kib,
        }
    }
}

/// Latency distribution, microseconds.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// From samples in nanoseconds (nearest-rank percentiles).
    pub fn of(mut ns: Vec<u64>) -> Self {
        if ns.is_empty() {
            return Self::default();
        }
        ns.sort_unstable();
        let rank = |p: f64| {
            let i = ((p / 100.0) * ns.len() as f64).ceil() as usize;
            ns[i.clamp(1, ns.len()) - 1] as f64 / 1e3
        };
        Self {
            n: ns.len(),
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: rank(100.0),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct PathResult {
    /// (Gb/s, CPU per GB) with one stream.
    pub single: (f64, CpuPer),
    /// (Gb/s, CPU per GB) with the configured number of streams.
    pub multi: (f64, CpuPer),
    /// 64-byte ping-pong round-trip times.
    pub latency: Percentiles,
    /// CPU microseconds per round trip.
    pub latency_cost: CpuPer,
    /// New connections per second.
    pub conn_rate: f64,
    /// CPU microseconds per connection.
    pub conn_cpu: CpuPer,
    /// connect() to reply, per connection.
    pub conn_latency: Percentiles,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RoundResult {
    pub direct: PathResult,
    pub mesh: PathResult,
}

/// The proxies' own counters at the end of the run.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Counters {
    pub a_outbound_ok: f64,
    pub a_outbound_failed: f64,
    pub a_hbone_connections: f64,
    pub b_inbound_tls: f64,
    pub b_inbound_ok: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub streams: usize,
    pub conn_threads: usize,
    pub proxy_log: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub rounds: Vec<RoundResult>,
    /// Proxy A, proxy B after start-up.
    pub idle_memory: [Memory; 2],
    /// Proxy A, proxy B at the end (VmHWM: the peak during the last test).
    pub end_memory: [Memory; 2],
    pub counters: Counters,
}

/// Stock ztunnel on this machine kind, from the issue.
mod ztunnel {
    pub const SINGLE_GBPS: f64 = 3.7;
    pub const DIRECT_GBPS: (f64, f64) = (11.0, 21.0);
    pub const P50_US: (f64, f64) = (70.0, 77.0);
    pub const DIRECT_P50_US: (f64, f64) = (14.0, 18.0);
    pub const CONNS: f64 = 1500.0;
    pub const DIRECT_CONNS: f64 = 3300.0;
    pub const RSS_MB: f64 = 20.0;
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

impl Report {
    /// Median over rounds of a figure of the direct and the mesh path.
    fn med(&self, f: impl Fn(&PathResult) -> f64) -> (f64, f64) {
        (
            median(self.rounds.iter().map(|r| f(&r.direct)).collect()),
            median(self.rounds.iter().map(|r| f(&r.mesh)).collect()),
        )
    }

    /// Peak RSS of proxy `i` over the whole run, KiB: the largest of the per-test peaks.
    fn run_peak_kib(&self, i: usize) -> u64 {
        let tests = |p: &PathResult| {
            [p.single.1, p.multi.1, p.latency_cost, p.conn_cpu].map(|c| c.proxy_peak_kib[i])
        };
        self.rounds
            .iter()
            .flat_map(|r| tests(&r.direct).into_iter().chain(tests(&r.mesh)))
            .chain([self.idle_memory[i].hwm_kib, self.end_memory[i].hwm_kib])
            .max()
            .unwrap_or(0)
    }

    pub fn table(&self) -> String {
        let mut o = String::new();
        let n = self.rounds.len();
        let _ = writeln!(
            o,
            "\nzmesh-bench: {} CPU(s) ({}), {} s per test, {} round(s){}, proxy log level {}",
            self.cpus,
            self.cpu_model,
            self.seconds,
            n,
            if n > 1 { " (medians)" } else { "" },
            self.proxy_log,
        );
        let _ = writeln!(
            o,
            "{:<44} {:>12} {:>12} {:>12}",
            "figure", "direct", "mesh", "mesh/direct"
        );
        let row = |o: &mut String, name: &str, (d, m): (f64, f64), prec: usize| {
            let _ = writeln!(o, "{name:<44} {d:>12.prec$} {m:>12.prec$} {:>12.2}", m / d);
        };
        let one = |o: &mut String, name: &str, v: f64, prec: usize| {
            let _ = writeln!(o, "{name:<44} {:>12} {v:>12.prec$}", "-");
        };
        let streams = self.streams;
        row(
            &mut o,
            "throughput 1 stream (Gb/s)",
            self.med(|r| r.single.0),
            2,
        );
        row(
            &mut o,
            &format!("throughput {streams} streams (Gb/s)"),
            self.med(|r| r.multi.0),
            2,
        );
        row(
            &mut o,
            "ping-pong 64 B RTT p50 (us)",
            self.med(|r| r.latency.p50),
            1,
        );
        row(
            &mut o,
            "ping-pong 64 B RTT p90 (us)",
            self.med(|r| r.latency.p90),
            1,
        );
        row(
            &mut o,
            "ping-pong 64 B RTT p99 (us)",
            self.med(|r| r.latency.p99),
            1,
        );
        let added = |f: fn(&Percentiles) -> f64| {
            median(
                self.rounds
                    .iter()
                    .map(|r| f(&r.mesh.latency) - f(&r.direct.latency))
                    .collect(),
            )
        };
        let added_p50 = added(|p| p.p50);
        one(&mut o, "  added by the mesh, p50 (us)", added_p50, 1);
        one(&mut o, "  added by the mesh, p99 (us)", added(|p| p.p99), 1);
        row(
            &mut o,
            &format!("new connections/s ({} threads)", self.conn_threads),
            self.med(|r| r.conn_rate),
            0,
        );
        row(
            &mut o,
            "  connect+exchange p50 (us)",
            self.med(|r| r.conn_latency.p50),
            1,
        );
        row(
            &mut o,
            "  connect+exchange p99 (us)",
            self.med(|r| r.conn_latency.p99),
            1,
        );
        for (label, get) in [
            (
                "1 stream",
                (|r: &PathResult| r.single.1) as fn(&PathResult) -> CpuPer,
            ),
            ("N streams", |r: &PathResult| r.multi.1),
        ] {
            let label = label.replace('N', &streams.to_string());
            row(
                &mut o,
                &format!("CPU s/GB, {label}: client+server"),
                self.med(|r| get(r).load),
                3,
            );
            one(
                &mut o,
                &format!("CPU s/GB, {label}: both proxies"),
                self.med(|r| get(r).proxies).1,
                3,
            );
            row(
                &mut o,
                &format!("CPU s/GB, {label}: total"),
                self.med(|r| get(r).load + get(r).proxies),
                3,
            );
            row(
                &mut o,
                &format!("  machine busy, {label} (%)"),
                self.med(|r| get(r).machine_busy * 100.0),
                0,
            );
        }
        one(
            &mut o,
            "CPU us/connection: both proxies",
            self.med(|r| r.conn_cpu.proxies).1,
            1,
        );
        row(
            &mut o,
            "CPU us/connection: total",
            self.med(|r| r.conn_cpu.load + r.conn_cpu.proxies),
            1,
        );
        for (i, name) in ["A", "B"].iter().enumerate() {
            let _ = writeln!(
                o,
                "proxy {name} RSS: {:.1} MB idle, {:.1} MB at end, {:.1} MB peak (VmHWM)",
                mb(self.idle_memory[i].rss_kib),
                mb(self.end_memory[i].rss_kib),
                mb(self.run_peak_kib(i)),
            );
        }
        one(
            &mut o,
            "CPU us/round trip (ping-pong): both proxies",
            self.med(|r| r.latency_cost.proxies).1,
            1,
        );
        for (test, get) in [
            (
                "1 stream",
                (|r: &PathResult| r.single.1) as fn(&PathResult) -> CpuPer,
            ),
            ("N streams", |r: &PathResult| r.multi.1),
            ("ping-pong", |r: &PathResult| r.latency_cost),
            ("connection rate", |r: &PathResult| r.conn_cpu),
        ] {
            let test = test.replace('N', &streams.to_string());
            let _ = writeln!(
                o,
                "peak RSS during {test}: proxy A {:.1} MB, proxy B {:.1} MB",
                self.med(|r| mb(get(r).proxy_peak_kib[0])).1,
                self.med(|r| mb(get(r).proxy_peak_kib[1])).1,
            );
        }
        let c = &self.counters;
        let _ = writeln!(
            o,
            "proxy counters: A outbound tunnels ok {:.0} / failed {:.0}, A HBONE connections \
             opened {:.0}; B inbound mTLS connections {:.0}, B tunnels ok {:.0}",
            c.a_outbound_ok,
            c.a_outbound_failed,
            c.a_hbone_connections,
            c.b_inbound_tls,
            c.b_inbound_ok,
        );
        o.push_str(&self.targets(added_p50));
        o
    }

    /// The targets, both in absolute terms and relative to direct TCP measured here.
    fn targets(&self, added_p50: f64) -> String {
        use ztunnel::*;
        let mut o =
            String::from("\ntargets (stock ztunnel on this machine kind; zmesh must beat it)\n");
        let (d1, m1) = self.med(|r| r.single.0);
        let want = 1.3 * SINGLE_GBPS;
        let zt_ratio = (SINGLE_GBPS / DIRECT_GBPS.1, SINGLE_GBPS / DIRECT_GBPS.0);
        let _ = writeln!(
            o,
            "  single stream >= 1.3 x {SINGLE_GBPS} = {want:.2} Gb/s: {m1:.2} Gb/s -> {} \
             (mesh/direct {:.2}; ztunnel's {:.2}-{:.2}, x1.3 = {:.2}-{:.2})",
            verdict(m1 >= want),
            m1 / d1,
            zt_ratio.0,
            zt_ratio.1,
            1.3 * zt_ratio.0,
            1.3 * zt_ratio.1,
        );
        let zt_added = (P50_US.0 - DIRECT_P50_US.1, P50_US.1 - DIRECT_P50_US.0);
        let zt_mid = (zt_added.0 + zt_added.1) / 2.0;
        let _ = writeln!(
            o,
            "  added p50 latency <= 0.7 x ztunnel's {:.0}-{:.0} us (midpoint {zt_mid:.1}) = \
             {:.1} us: {added_p50:.1} us -> {}",
            zt_added.0,
            zt_added.1,
            0.7 * zt_mid,
            verdict(added_p50 <= 0.7 * zt_mid),
        );
        let (dc, mc) = self.med(|r| r.conn_rate);
        let want_c = 1.5 * CONNS;
        let _ = writeln!(
            o,
            "  new connections/s >= 1.5 x {CONNS:.0} = {want_c:.0}: {mc:.0} -> {} \
             (mesh/direct {:.2}; ztunnel's {:.2}, x1.5 = {:.2})",
            verdict(mc >= want_c),
            mc / dc,
            CONNS / DIRECT_CONNS,
            1.5 * CONNS / DIRECT_CONNS,
        );
        for (i, name) in ["A", "B"].iter().enumerate() {
            let peak = mb(self.run_peak_kib(i));
            let _ = writeln!(
                o,
                "  proxy {name} memory <= ~{RSS_MB:.0} MB: peak {peak:.1} MB -> {}",
                verdict(peak <= RSS_MB),
            );
        }
        o.push_str(
            "  note: client, server and both proxies share this machine's CPUs; a ztunnel \
             pair between two netns on the same box shares them the same way.\n",
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let p = Percentiles::of((1..=100).map(|us| us * 1000).collect());
        assert_eq!(
            (p.n, p.p50, p.p90, p.p99, p.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        let one = Percentiles::of(vec![7000]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(Percentiles::of(vec![]).n, 0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn cpu_normalisation() {
        let u = CpuUse {
            load: 1.0,
            proxies: 3.0,
            machine_busy: 5.0,
            machine_total: 10.0,
            wall: 5.0,
            proxy_peak_kib: [1, 2],
        };
        let g = u.per_gb(2_000_000_000);
        assert_eq!((g.load, g.proxies, g.machine_busy), (0.5, 1.5, 0.5));
        let c = u.per_conn(1_000_000);
        assert_eq!((c.load, c.proxies), (1.0, 3.0));
        assert_eq!((g.proxy_peak_kib, c.proxy_peak_kib), ([1, 2], [1, 2]));
    }

    fn report(single: f64, p50: f64, conns: f64, hwm_kib: u64) -> Report {
        let mut direct = PathResult {
            single: (15.0, CpuPer::default()),
            conn_rate: 3000.0,
            ..PathResult::default()
        };
        direct.latency.p50 = 15.0;
        let mut mesh = PathResult {
            single: (single, CpuPer::default()),
            conn_rate: conns,
            ..PathResult::default()
        };
        mesh.latency.p50 = p50;
        let mem = Memory {
            rss_kib: hwm_kib,
            hwm_kib,
        };
        Report {
            seconds: 1.0,
            streams: 8,
            conn_threads: 4,
            proxy_log: "info".into(),
            cpus: 2,
            cpu_model: "test".into(),
            rounds: vec![RoundResult { direct, mesh }],
            idle_memory: [mem, mem],
            end_memory: [mem, mem],
            counters: Counters::default(),
        }
    }

    /// Each target flips between MET and MISSED at its threshold.
    #[test]
    fn verdicts_follow_the_thresholds() {
        let good = report(5.0, 15.0 + 40.0, 2300.0, 10_000).table();
        assert_eq!(good.matches("MISSED").count(), 0, "{good}");
        assert_eq!(good.matches("-> MET").count(), 5, "{good}");
        let bad = report(4.7, 15.0 + 41.0, 2200.0, 20_000).table();
        assert_eq!(bad.matches("-> MISSED").count(), 5, "{bad}");
        assert!(bad.contains("mesh/direct"));
    }
}
