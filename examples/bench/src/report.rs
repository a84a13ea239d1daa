//! Figures, their medians over rounds, the printed table and the comparison with the
//! targets (stock Istio ztunnel measured on this machine kind).

use std::fmt::Write;

use serde::Serialize;

use zmesh_bench::procs::Memory;

/// CPU seconds used during one test.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct CpuUse {
    /// The harness process: clients and server.
    pub load: f64,
    /// Both proxies.
    pub proxies: f64,
    /// Both plain relays (0 when the relay path is skipped).
    pub relays: f64,
    /// The whole machine (all processes, all CPUs).
    pub machine_busy: f64,
    pub machine_total: f64,
    pub wall: f64,
    /// Peak RSS of proxy A and proxy B during the test, KiB.
    pub proxy_peak_kib: [u64; 2],
    /// Peak RSS of relay A and relay B during the test, KiB (0 without relays).
    pub relay_peak_kib: [u64; 2],
}

/// CPU cost normalised by work done (seconds per GB for throughput tests, microseconds
/// per connection or per round trip otherwise), and the proxies' and relays' peak memory
/// meanwhile.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct CpuPer {
    pub load: f64,
    pub proxies: f64,
    pub relays: f64,
    /// Fraction of the machine's CPU that was busy meanwhile (1.0 = every core).
    pub machine_busy: f64,
    /// Peak RSS of proxy A and proxy B during the test, KiB.
    pub proxy_peak_kib: [u64; 2],
    /// Peak RSS of relay A and relay B during the test, KiB.
    pub relay_peak_kib: [u64; 2],
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
            relays: self.relays / gb,
            machine_busy: self.busy(),
            proxy_peak_kib: self.proxy_peak_kib,
            relay_peak_kib: self.relay_peak_kib,
        }
    }

    pub fn per_conn(&self, conns: u64) -> CpuPer {
        let n = conns.max(1) as f64;
        CpuPer {
            load: self.load / n * 1e6,
            proxies: self.proxies / n * 1e6,
            relays: self.relays / n * 1e6,
            machine_busy: self.busy(),
            proxy_peak_kib: self.proxy_peak_kib,
            relay_peak_kib: self.relay_peak_kib,
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
    /// Two plain TCP relays; None when skipped with --paths.
    pub relay: Option<PathResult>,
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
    /// The first mesh exchange after start: connect, TLS handshake (and whatever the fresh
    /// proxies do on first use), HTTP/2 CONNECT, one 64-byte round trip.
    pub first_tunnel_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub streams: usize,
    pub conn_threads: usize,
    pub proxy_log: String,
    /// CPUs this run could use (after --cpus pinning).
    pub cpus: usize,
    /// CPUs online on the machine.
    pub cpus_online: usize,
    /// The CPU set the harness and all its children ran on.
    pub cpu_set: Vec<usize>,
    /// Whether that set was chosen with --cpus (false: inherited, not pinned).
    pub cpu_pinned: bool,
    pub cpu_model: String,
    /// The paths measured, in the order they ran in each round.
    pub paths: Vec<String>,
    pub rounds: Vec<RoundResult>,
    /// Proxy A, proxy B after start-up.
    pub idle_memory: [Memory; 2],
    /// Proxy A, proxy B at the end (VmHWM: the peak during the last test).
    pub end_memory: [Memory; 2],
    /// Relay A, relay B after start-up and at the end (None when the relay path is skipped).
    pub relay_idle_memory: Option<[Memory; 2]>,
    pub relay_end_memory: Option<[Memory; 2]>,
    pub counters: Counters,
    /// The memory test (None when not run).
    pub memory: Option<crate::memory::MemoryReport>,
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

/// A median figure of each path (relay: None when that path was skipped).
#[derive(Debug, Clone, Copy)]
struct Med {
    direct: f64,
    relay: Option<f64>,
    mesh: f64,
}

/// Which path's column a one-path figure goes in.
#[derive(Clone, Copy)]
enum Col {
    Relay,
    Mesh,
}

/// Width of the table's first column (the longest figure name fits).
const NAME_WIDTH: usize = 52;

/// The printed table: figure, direct, [relay], mesh, [relay/direct], mesh/direct.
struct Table {
    o: String,
    relay: bool,
}

impl Table {
    fn new(relay: bool) -> Self {
        Self {
            o: String::new(),
            relay,
        }
    }

    fn line(&mut self, name: &str, cells: &[String]) {
        let _ = write!(self.o, "{name:<NAME_WIDTH$}");
        for c in cells {
            let _ = write!(self.o, " {c:>12}");
        }
        self.o.push('\n');
    }

    fn header(&mut self) {
        let mut cells = vec!["direct".to_string()];
        if self.relay {
            cells.push("relay".into());
        }
        cells.push("mesh".into());
        if self.relay {
            cells.push("relay/direct".into());
        }
        cells.push("mesh/direct".into());
        self.line("figure", &cells);
    }

    /// A figure of every path, with the ratios to direct.
    fn row(&mut self, name: &str, v: Med, prec: usize) {
        let f = |x: f64| format!("{x:.prec$}");
        let mut cells = vec![f(v.direct)];
        if self.relay {
            cells.push(f(v.relay.unwrap_or(f64::NAN)));
        }
        cells.push(f(v.mesh));
        if self.relay {
            cells.push(format!("{:.2}", v.relay.unwrap_or(f64::NAN) / v.direct));
        }
        cells.push(format!("{:.2}", v.mesh / v.direct));
        self.line(name, &cells);
    }

    /// A figure of one path only: "-" under the other paths, no ratios.
    fn one(&mut self, name: &str, col: Col, v: f64, prec: usize) {
        let value = format!("{v:.prec$}");
        let dash = || "-".to_string();
        let mut cells = vec![dash()];
        match (col, self.relay) {
            (Col::Mesh, false) => cells.push(value),
            (Col::Mesh, true) => cells.extend([dash(), value]),
            (Col::Relay, true) => cells.extend([value, dash()]),
            // No relay column: nothing to show (callers skip relay figures then).
            (Col::Relay, false) => return,
        }
        self.line(name, &cells);
    }

    fn text(&mut self, line: &str) {
        self.o.push_str(line);
        self.o.push('\n');
    }
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl Report {
    /// Whether the relay path was measured.
    fn has_relay(&self) -> bool {
        !self.rounds.is_empty() && self.rounds.iter().all(|r| r.relay.is_some())
    }

    /// Median over rounds of a figure of the direct and the mesh path.
    fn med(&self, f: impl Fn(&PathResult) -> f64) -> (f64, f64) {
        let m = self.med3(f);
        (m.direct, m.mesh)
    }

    /// Median over rounds of a figure of every path measured.
    fn med3(&self, f: impl Fn(&PathResult) -> f64) -> Med {
        Med {
            direct: median(self.rounds.iter().map(|r| f(&r.direct)).collect()),
            relay: self.has_relay().then(|| {
                median(
                    self.rounds
                        .iter()
                        .filter_map(|r| r.relay.as_ref().map(&f))
                        .collect(),
                )
            }),
            mesh: median(self.rounds.iter().map(|r| f(&r.mesh)).collect()),
        }
    }

    /// Median over rounds of a difference between two paths' figures (e.g. mesh - direct).
    fn med_diff(
        &self,
        a: impl Fn(&RoundResult) -> Option<f64>,
        b: impl Fn(&RoundResult) -> Option<f64>,
    ) -> f64 {
        median(
            self.rounds
                .iter()
                .filter_map(|r| Some(a(r)? - b(r)?))
                .collect(),
        )
    }

    /// Every path's per-test CPU figures of every round.
    fn all_tests(&self) -> impl Iterator<Item = CpuPer> + '_ {
        let tests = |p: &PathResult| [p.single.1, p.multi.1, p.latency_cost, p.conn_cpu];
        self.rounds.iter().flat_map(move |r| {
            tests(&r.direct)
                .into_iter()
                .chain(r.relay.as_ref().map(tests).into_iter().flatten())
                .chain(tests(&r.mesh))
        })
    }

    /// Peak RSS of proxy `i` over the whole run, KiB: the largest of the per-test peaks.
    fn run_peak_kib(&self, i: usize) -> u64 {
        self.all_tests()
            .map(|c| c.proxy_peak_kib[i])
            .chain([self.idle_memory[i].hwm_kib, self.end_memory[i].hwm_kib])
            .max()
            .unwrap_or(0)
    }

    /// Peak RSS of relay `i` over the whole run, KiB.
    fn relay_run_peak_kib(&self, i: usize) -> u64 {
        let start_end = [self.relay_idle_memory, self.relay_end_memory]
            .into_iter()
            .flatten()
            .map(|m| m[i].hwm_kib);
        self.all_tests()
            .map(|c| c.relay_peak_kib[i])
            .chain(start_end)
            .max()
            .unwrap_or(0)
    }

    pub fn table(&self) -> String {
        let has_relay = self.has_relay();
        let mut t = Table::new(has_relay);
        let n = self.rounds.len();
        let _ = writeln!(
            t.o,
            "\nzmesh-bench: {} CPU(s) ({}), {} s per test, {} round(s){}, proxy log level {}",
            self.cpus,
            self.cpu_model,
            self.seconds,
            n,
            if n > 1 { " (medians)" } else { "" },
            self.proxy_log,
        );
        let _ = writeln!(
            t.o,
            "CPU set {} of {} online ({}); paths in each round: {}",
            cpu_list(&self.cpu_set),
            self.cpus_online,
            if self.cpu_pinned {
                "pinned with --cpus, inherited by every child"
            } else {
                "not pinned"
            },
            self.paths.join(", "),
        );
        t.header();
        let streams = self.streams;
        t.row("throughput 1 stream (Gb/s)", self.med3(|r| r.single.0), 2);
        t.row(
            &format!("throughput {streams} streams (Gb/s)"),
            self.med3(|r| r.multi.0),
            2,
        );
        t.row(
            "ping-pong 64 B RTT p50 (us)",
            self.med3(|r| r.latency.p50),
            1,
        );
        t.row(
            "ping-pong 64 B RTT p90 (us)",
            self.med3(|r| r.latency.p90),
            1,
        );
        t.row(
            "ping-pong 64 B RTT p99 (us)",
            self.med3(|r| r.latency.p99),
            1,
        );
        let mesh = |f: fn(&Percentiles) -> f64| move |r: &RoundResult| Some(f(&r.mesh.latency));
        let relay = |f: fn(&Percentiles) -> f64| {
            move |r: &RoundResult| r.relay.as_ref().map(|p| f(&p.latency))
        };
        let direct = |f: fn(&Percentiles) -> f64| move |r: &RoundResult| Some(f(&r.direct.latency));
        let p50: fn(&Percentiles) -> f64 = |p| p.p50;
        let p99: fn(&Percentiles) -> f64 = |p| p.p99;
        let added_p50 = self.med_diff(mesh(p50), direct(p50));
        t.one("  added by the mesh, p50 (us)", Col::Mesh, added_p50, 1);
        t.one(
            "  added by the mesh, p99 (us)",
            Col::Mesh,
            self.med_diff(mesh(p99), direct(p99)),
            1,
        );
        let floor_p50 = self.med_diff(relay(p50), direct(p50));
        if has_relay {
            t.one(
                "  added by two plain relays, p50 (us)",
                Col::Relay,
                floor_p50,
                1,
            );
            t.one(
                "  added by two plain relays, p99 (us)",
                Col::Relay,
                self.med_diff(relay(p99), direct(p99)),
                1,
            );
            t.one(
                "  added by the mesh beyond the relay floor, p50 (us)",
                Col::Mesh,
                self.med_diff(mesh(p50), relay(p50)),
                1,
            );
        }
        t.row(
            &format!("new connections/s ({} threads)", self.conn_threads),
            self.med3(|r| r.conn_rate),
            0,
        );
        t.row(
            "  connect+exchange p50 (us)",
            self.med3(|r| r.conn_latency.p50),
            1,
        );
        t.row(
            "  connect+exchange p99 (us)",
            self.med3(|r| r.conn_latency.p99),
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
            t.row(
                &format!("CPU s/GB, {label}: client+server"),
                self.med3(|r| get(r).load),
                3,
            );
            t.one(
                &format!("CPU s/GB, {label}: both proxies"),
                Col::Mesh,
                self.med(|r| get(r).proxies).1,
                3,
            );
            if let Some(v) = self.med3(|r| get(r).relays).relay {
                t.one(&format!("CPU s/GB, {label}: both relays"), Col::Relay, v, 3);
            }
            t.row(
                &format!("CPU s/GB, {label}: total"),
                self.med3(|r| get(r).load + get(r).proxies + get(r).relays),
                3,
            );
            t.row(
                &format!("  machine busy, {label} (%)"),
                self.med3(|r| get(r).machine_busy * 100.0),
                0,
            );
        }
        t.one(
            "CPU us/connection: both proxies",
            Col::Mesh,
            self.med(|r| r.conn_cpu.proxies).1,
            1,
        );
        if let Some(v) = self.med3(|r| r.conn_cpu.relays).relay {
            t.one("CPU us/connection: both relays", Col::Relay, v, 1);
        }
        t.row(
            "CPU us/connection: total",
            self.med3(|r| r.conn_cpu.load + r.conn_cpu.proxies + r.conn_cpu.relays),
            1,
        );
        t.one(
            "CPU us/round trip (ping-pong): both proxies",
            Col::Mesh,
            self.med(|r| r.latency_cost.proxies).1,
            1,
        );
        if let Some(v) = self.med3(|r| r.latency_cost.relays).relay {
            t.one(
                "CPU us/round trip (ping-pong): both relays",
                Col::Relay,
                v,
                1,
            );
        }
        t.row(
            "CPU us/round trip (ping-pong): total",
            self.med3(|r| r.latency_cost.load + r.latency_cost.proxies + r.latency_cost.relays),
            1,
        );
        for (i, name) in ["A", "B"].iter().enumerate() {
            t.text(&format!(
                "proxy {name} RSS: {:.1} MB idle, {:.1} MB at end, {:.1} MB peak (VmHWM)",
                mb(self.idle_memory[i].rss_kib),
                mb(self.end_memory[i].rss_kib),
                mb(self.run_peak_kib(i)),
            ));
        }
        if let (true, Some(idle), Some(end)) =
            (has_relay, self.relay_idle_memory, self.relay_end_memory)
        {
            for (i, name) in ["A", "B"].iter().enumerate() {
                t.text(&format!(
                    "relay {name} RSS: {:.1} MB idle, {:.1} MB at end, {:.1} MB peak (VmHWM)",
                    mb(idle[i].rss_kib),
                    mb(end[i].rss_kib),
                    mb(self.relay_run_peak_kib(i)),
                ));
            }
        }
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
            let mut line = format!(
                "peak RSS during {test}: proxy A {:.1} MB, proxy B {:.1} MB",
                self.med(|r| mb(get(r).proxy_peak_kib[0])).1,
                self.med(|r| mb(get(r).proxy_peak_kib[1])).1,
            );
            if let (Some(a), Some(b)) = (
                self.med3(|r| mb(get(r).relay_peak_kib[0])).relay,
                self.med3(|r| mb(get(r).relay_peak_kib[1])).relay,
            ) {
                let _ = write!(line, "; relay A {a:.1} MB, relay B {b:.1} MB");
            }
            t.text(&line);
        }
        let c = &self.counters;
        t.text(&format!(
            "proxy counters: A outbound tunnels ok {:.0} / failed {:.0}, A HBONE connections \
             opened {:.0}; B inbound mTLS connections {:.0}, B tunnels ok {:.0}",
            c.a_outbound_ok,
            c.a_outbound_failed,
            c.a_hbone_connections,
            c.b_inbound_tls,
            c.b_inbound_ok,
        ));
        t.text(&format!(
            "first tunnel through the fresh proxies (opens the HBONE connection): {:.1} ms",
            c.first_tunnel_ms
        ));
        let floor = has_relay.then_some(floor_p50);
        t.o.push_str(&self.targets(added_p50, floor));
        t.o
    }

    /// The targets, both in absolute terms and relative to direct TCP measured here;
    /// `floor`: the p50 latency two plain relays added in this run, if measured.
    fn targets(&self, added_p50: f64, floor: Option<f64>) -> String {
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
        let latency_target = 0.7 * zt_mid;
        let _ = writeln!(
            o,
            "  added p50 latency <= 0.7 x ztunnel's {:.0}-{:.0} us (midpoint {zt_mid:.1}) = \
             {latency_target:.1} us: {added_p50:.1} us -> {}",
            zt_added.0,
            zt_added.1,
            verdict(added_p50 <= latency_target),
        );
        if let Some(floor) = floor {
            let _ = writeln!(
                o,
                "    floor: two plain TCP relays (no TLS, no HTTP/2) add {floor:.1} us in this \
                 run; the target is {latency_target:.1} us",
            );
        }
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
        let _ = writeln!(
            o,
            "  note: client, server{} and both proxies share {}; a ztunnel pair between two \
             netns on the same box shares them the same way.",
            if floor.is_some() { ", both relays" } else { "" },
            if self.cpu_pinned {
                format!("CPU set {} (--cpus)", cpu_list(&self.cpu_set))
            } else {
                "this machine's CPUs".to_string()
            },
        );
        if self.cpu_pinned && self.cpu_set.len() < self.cpus_online {
            let _ = writeln!(
                o,
                "  note: pinned to {} of {} CPUs: the throughput and connection-rate targets \
                 were set on the whole machine; judge them on an unpinned run.",
                self.cpu_set.len(),
                self.cpus_online,
            );
        }
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
            relays: 2.0,
            machine_busy: 5.0,
            machine_total: 10.0,
            wall: 5.0,
            proxy_peak_kib: [1, 2],
            relay_peak_kib: [3, 4],
        };
        let g = u.per_gb(2_000_000_000);
        assert_eq!((g.load, g.proxies, g.machine_busy), (0.5, 1.5, 0.5));
        let c = u.per_conn(1_000_000);
        assert_eq!((c.load, c.proxies), (1.0, 3.0));
        assert_eq!((g.proxy_peak_kib, c.proxy_peak_kib), ([1, 2], [1, 2]));
        assert_eq!((g.relays, c.relays), (1.0, 2.0));
        assert_eq!((g.relay_peak_kib, c.relay_peak_kib), ([3, 4], [3, 4]));
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
            rss_anon_kib: hwm_kib / 2,
        };
        Report {
            seconds: 1.0,
            streams: 8,
            conn_threads: 4,
            proxy_log: "info".into(),
            cpus: 2,
            cpus_online: 2,
            cpu_set: vec![0, 1],
            cpu_pinned: false,
            cpu_model: "test".into(),
            paths: vec!["direct".into(), "mesh".into()],
            rounds: vec![RoundResult {
                direct,
                relay: None,
                mesh,
            }],
            idle_memory: [mem, mem],
            end_memory: [mem, mem],
            relay_idle_memory: None,
            relay_end_memory: None,
            counters: Counters::default(),
            memory: None,
        }
    }

    /// `report(..)` with a relay path measured: RTT p50 `relay_p50`, CPU and memory figures
    /// that show up in their own rows.
    fn with_relay(mut r: Report, relay_p50: f64) -> Report {
        let cpu = CpuPer {
            relays: 12.5,
            relay_peak_kib: [3000, 4000],
            ..CpuPer::default()
        };
        let mut relay = PathResult {
            single: (10.0, cpu),
            multi: (10.0, cpu),
            latency_cost: cpu,
            conn_rate: 2500.0,
            conn_cpu: cpu,
            ..PathResult::default()
        };
        relay.latency.p50 = relay_p50;
        relay.latency.p99 = 70.0;
        r.rounds[0].relay = Some(relay);
        r.rounds[0].direct.latency.p99 = 20.0;
        let mem = Memory {
            rss_kib: 2048,
            hwm_kib: 2500,
            rss_anon_kib: 1024,
        };
        r.relay_idle_memory = Some([mem, mem]);
        r.relay_end_memory = Some([mem, mem]);
        r.paths = vec!["direct".into(), "relay".into(), "mesh".into()];
        r.cpu_set = vec![0];
        r.cpu_pinned = true;
        r.cpus = 1;
        r
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

    #[test]
    fn pinned_runs_say_the_whole_machine_targets_need_an_unpinned_run() {
        let unpinned = report(5.0, 55.0, 2300.0, 10_000).table();
        assert!(
            !unpinned.contains("judge them on an unpinned run"),
            "{unpinned}"
        );
        let pinned = with_relay(report(5.0, 55.0, 2300.0, 10_000), 54.0).table();
        assert!(pinned.contains("pinned to 1 of 2 CPUs"), "{pinned}");
    }

    fn line_of<'a>(table: &'a str, start: &str) -> &'a str {
        table
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?} in:\n{table}"))
    }

    #[test]
    fn relay_rows_when_measured() {
        // direct 15, relay 54, mesh 55 us: the relays add 39, the mesh 1 beyond them.
        let t = with_relay(report(5.0, 55.0, 2300.0, 10_000), 54.0).table();
        let cells = |start: &str| -> Vec<String> {
            line_of(&t, start)[NAME_WIDTH..]
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        assert_eq!(
            cells("figure"),
            ["direct", "relay", "mesh", "relay/direct", "mesh/direct"]
        );
        assert_eq!(
            cells("ping-pong 64 B RTT p50 (us)"),
            ["15.0", "54.0", "55.0", "3.60", "3.67"]
        );
        assert_eq!(
            cells("  added by two plain relays, p50 (us)"),
            ["-", "39.0", "-"]
        );
        assert_eq!(
            cells("  added by two plain relays, p99 (us)"),
            ["-", "50.0", "-"]
        );
        assert_eq!(
            cells("  added by the mesh beyond the relay floor, p50 (us)"),
            ["-", "-", "1.0"]
        );
        assert_eq!(cells("  added by the mesh, p50 (us)"), ["-", "-", "40.0"]);
        assert_eq!(
            cells("CPU us/round trip (ping-pong): both relays"),
            ["-", "12.5", "-"]
        );
        assert_eq!(
            cells("CPU s/GB, 1 stream: both relays"),
            ["-", "12.500", "-"]
        );
        assert_eq!(
            cells("CPU s/GB, 8 streams: both relays"),
            ["-", "12.500", "-"]
        );
        assert_eq!(cells("CPU us/connection: both relays"), ["-", "12.5", "-"]);
        assert_eq!(cells("CPU s/GB, 1 stream: total")[1], "12.500");
        // Peak: the largest of the per-test peaks (4000 KiB) and start/end (2500 KiB).
        assert!(
            t.contains("relay A RSS: 2.1 MB idle, 2.1 MB at end, 3.1 MB peak"),
            "{t}"
        );
        assert!(
            t.contains("relay B RSS: 2.1 MB idle, 2.1 MB at end, 4.1 MB peak"),
            "{t}"
        );
        assert!(t.contains("; relay A 3.1 MB, relay B 4.1 MB"), "{t}");
        assert!(
            t.contains(
                "floor: two plain TCP relays (no TLS, no HTTP/2) add 39.0 us in this run; \
                 the target is 40.2 us"
            ),
            "{t}"
        );
        assert!(
            t.contains("CPU set 0 of 2 online (pinned with --cpus"),
            "{t}"
        );
        assert!(
            t.contains("paths in each round: direct, relay, mesh"),
            "{t}"
        );
        // The relay column changes none of the verdicts.
        assert_eq!(t.matches("-> MET").count(), 5, "{t}");

        let json = serde_json::to_value(with_relay(report(5.0, 55.0, 2300.0, 1), 54.0)).unwrap();
        assert_eq!(json["rounds"][0]["relay"]["latency"]["p50"], 54.0);
        assert_eq!(json["rounds"][0]["relay"]["latency_cost"]["relays"], 12.5);
        assert_eq!(json["relay_idle_memory"][1]["rss_kib"], 2048);
        assert_eq!(json["cpu_set"], serde_json::json!([0]));
        assert_eq!(json["cpu_pinned"], true);
    }

    #[test]
    fn no_relay_rows_when_skipped() {
        let r = report(5.0, 55.0, 2300.0, 10_000);
        let t = r.table();
        assert!(!t.to_lowercase().contains("relay"), "{t}");
        assert_eq!(
            line_of(&t, "figure")[NAME_WIDTH..]
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["direct", "mesh", "mesh/direct"]
        );
        assert_eq!(
            line_of(&t, "ping-pong 64 B RTT p50 (us)")[NAME_WIDTH..]
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["15.0", "55.0", "3.67"]
        );
        assert!(t.contains("CPU set 0,1 of 2 online (not pinned)"), "{t}");
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["rounds"][0]["relay"].is_null());
        assert!(json["relay_idle_memory"].is_null());
    }
}
