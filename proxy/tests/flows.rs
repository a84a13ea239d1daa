//! Flow events: JSON form, Hubble-like filters, the history ring, live subscriptions,
//! the one-line format and the Prometheus counters.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use zmesh_proxy::flows::{
    FlowEndpoint, FlowEvent, FlowFilter, FlowHub, FlowMetrics, FlowPhase, FlowVerdict,
};
use zmesh_proxy::policy::{Allowed, Denial, PolicyRef, Verdict};

/// 2023-11-14T22:13:20Z plus `ms` milliseconds.
fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn ep(ns: &str, pod: &str, id: Option<&str>, addr: &str) -> FlowEndpoint {
    FlowEndpoint {
        namespace: Some(ns.into()),
        pod: Some(pod.into()),
        identity: id.map(Into::into),
        addr: addr.parse().unwrap(),
    }
}

fn pref(s: &str) -> PolicyRef {
    s.parse().unwrap()
}

fn forwarded(ms: u64) -> FlowEvent {
    FlowEvent {
        time: at(ms),
        phase: FlowPhase::Close,
        direction: None,
        source: ep(
            "web",
            "frontend-7d4f",
            Some("spiffe://cluster.local/ns/web/sa/frontend"),
            "10.0.1.5:40000",
        ),
        destination: ep(
            "prod",
            "db-0",
            Some("spiffe://cluster.local/ns/prod/sa/db"),
            "10.0.2.7:5432",
        ),
        service: None,
        bytes_sent: 1536,
        bytes_received: 300,
        duration_us: 12_345,
        verdict: FlowVerdict::Forwarded,
        encrypted: true,
        policy: Some(Verdict::Allow(Allowed::Policy {
            policy: pref("prod/allow-web"),
            rule: 0,
        })),
        reason: None,
    }
}

fn denied(ms: u64) -> FlowEvent {
    FlowEvent {
        time: at(ms),
        phase: FlowPhase::Close,
        direction: None,
        source: ep(
            "batch",
            "job-x",
            Some("spiffe://cluster.local/ns/batch/sa/job"),
            "10.0.3.1:41000",
        ),
        destination: ep("prod", "db-0", None, "10.0.2.7:5432"),
        service: None,
        bytes_sent: 0,
        bytes_received: 0,
        duration_us: 800,
        verdict: FlowVerdict::Denied,
        encrypted: true,
        policy: Some(Verdict::Deny(Denial::DenyPolicy {
            policy: pref("prod/deny-batch"),
            rule: 1,
        })),
        reason: None,
    }
}

fn dropped(ms: u64) -> FlowEvent {
    FlowEvent {
        time: at(ms),
        phase: FlowPhase::Close,
        direction: None,
        source: FlowEndpoint::addr("192.168.9.9:5555".parse().unwrap()),
        destination: ep("prod", "db-0", None, "10.0.2.7:5432"),
        service: None,
        bytes_sent: 0,
        bytes_received: 0,
        duration_us: 0,
        verdict: FlowVerdict::Dropped,
        encrypted: false,
        policy: None,
        reason: Some("plaintext_strict".into()),
    }
}

#[test]
fn json_round_trip_and_field_names() {
    for e in [forwarded(1), denied(2), dropped(3)] {
        let json = serde_json::to_string(&e).unwrap();
        let back: FlowEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e, "{json}");
    }
    // Nanosecond times survive too.
    let mut e = forwarded(0);
    e.time += Duration::from_nanos(123_456_789);
    let back: FlowEvent = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
    assert_eq!(back.time, e.time);

    let v = serde_json::to_value(denied(123)).unwrap();
    assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
    assert_eq!(v["verdict"], "denied");
    assert_eq!(v["encrypted"], true);
    assert_eq!(
        v["source"]["identity"],
        "spiffe://cluster.local/ns/batch/sa/job"
    );
    assert_eq!(v["source"]["addr"], "10.0.3.1:41000");
    assert_eq!(v["destination"]["pod"], "db-0");
    assert!(v["destination"].get("identity").is_none());
    assert_eq!(
        v["policy"],
        serde_json::json!({"deny": {"reason": "deny_policy", "policy": "prod/deny-batch", "rule": 1}})
    );
    assert!(v.get("reason").is_none(), "absent fields are left out");
    let v = serde_json::to_value(dropped(0)).unwrap();
    assert_eq!(v["reason"], "plaintext_strict");
    assert!(v["source"].get("namespace").is_none());
    assert!(v.get("service").is_none(), "absent fields are left out");
    // A connection to a Service names it.
    let mut e = forwarded(0);
    e.service = Some("prod/db".into());
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["service"], "prod/db");
    let back: FlowEvent = serde_json::from_value(v).unwrap();
    assert_eq!(back, e);
    // NDJSON: one event per line.
    assert!(!serde_json::to_string(&forwarded(0)).unwrap().contains('\n'));
}

#[test]
fn one_line_format() {
    assert_eq!(
        forwarded(678).to_string(),
        "2023-11-14T22:13:20.678Z web/frontend-7d4f:40000 (cluster.local/ns/web/sa/frontend) \
         -> prod/db-0:5432 mTLS FORWARDED sent=1.5KiB recv=300B 12ms"
    );
    assert_eq!(
        denied(0).to_string(),
        "2023-11-14T22:13:20Z batch/job-x:41000 (cluster.local/ns/batch/sa/job) \
         -> prod/db-0:5432 mTLS DENIED (DENY policy prod/deny-batch rule 1)"
    );
    assert_eq!(
        dropped(5).to_string(),
        "2023-11-14T22:13:20.005Z 192.168.9.9:5555 (no identity) -> prod/db-0:5432 \
         plaintext DROPPED (plaintext_strict)"
    );
    let mut e = forwarded(678);
    e.service = Some("prod/db".into());
    assert_eq!(
        e.to_string(),
        "2023-11-14T22:13:20.678Z web/frontend-7d4f:40000 (cluster.local/ns/web/sa/frontend) \
         -> prod/db-0:5432 (service prod/db) mTLS FORWARDED sent=1.5KiB recv=300B 12ms"
    );
    let mut e = denied(0);
    e.policy = Some(Verdict::Deny(Denial::NoAllowMatched {
        considered: vec![pref("prod/a"), pref("prod/b")],
    }));
    assert!(e
        .to_string()
        .ends_with("DENIED (no ALLOW policy matched (considered: prod/a, prod/b))"));
}

#[test]
fn filter_matching() {
    let f = forwarded(0);
    let d = denied(10);
    let x = dropped(20);
    let all = [&f, &d, &x];
    let only = |filter: FlowFilter| -> Vec<FlowVerdict> {
        all.iter()
            .filter(|e| filter.matches(e))
            .map(|e| e.verdict)
            .collect()
    };
    use FlowVerdict::*;
    assert_eq!(only(FlowFilter::default()), [Forwarded, Denied, Dropped]);
    // Namespace matches either end; values are ORed.
    let ns = |v: &[&str]| FlowFilter {
        namespaces: v.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    assert_eq!(only(ns(&["web"])), [Forwarded]);
    assert_eq!(only(ns(&["prod"])), [Forwarded, Denied, Dropped]);
    assert_eq!(only(ns(&["web", "batch"])), [Forwarded, Denied]);
    assert_eq!(only(ns(&["nope"])), []);
    // Pods: name prefix, or namespace/name-prefix.
    let pods = |v: &[&str]| FlowFilter {
        pods: v.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    assert_eq!(only(pods(&["frontend"])), [Forwarded]);
    assert_eq!(only(pods(&["web/frontend-7"])), [Forwarded]);
    assert_eq!(only(pods(&["prod/frontend"])), []);
    assert_eq!(only(pods(&["job", "frontend-7d4f"])), [Forwarded, Denied]);
    assert_eq!(only(pods(&["db-0"])), [Forwarded, Denied, Dropped]);
    // Identity, with or without spiffe://, either end.
    let ids = |v: &[&str]| FlowFilter {
        identities: v.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    assert_eq!(
        only(ids(&["spiffe://cluster.local/ns/batch/sa/job"])),
        [Denied]
    );
    assert_eq!(only(ids(&["cluster.local/ns/prod/sa/db"])), [Forwarded]);
    assert_eq!(only(ids(&["cluster.local/ns/prod/sa"])), []);
    // Verdict, encrypted, since.
    assert_eq!(
        only(FlowFilter {
            verdicts: vec![Denied, Dropped],
            ..Default::default()
        }),
        [Denied, Dropped]
    );
    assert_eq!(
        only(FlowFilter {
            encrypted: Some(false),
            ..Default::default()
        }),
        [Dropped]
    );
    assert_eq!(
        only(FlowFilter {
            encrypted: Some(true),
            ..Default::default()
        }),
        [Forwarded, Denied]
    );
    assert_eq!(
        only(FlowFilter {
            since: Some(at(10)),
            ..Default::default()
        }),
        [Denied, Dropped],
        "since is inclusive"
    );
    // Fields are ANDed.
    assert_eq!(
        only(FlowFilter {
            namespaces: vec!["prod".into()],
            encrypted: Some(true),
            verdicts: vec![Denied, Dropped],
            ..Default::default()
        }),
        [Denied]
    );
    // The filter itself travels as JSON (admin endpoint), strictly.
    let json =
        r#"{"namespaces":["prod"],"verdicts":["dropped"],"since":"2023-11-14T22:13:20.010Z"}"#;
    let parsed: FlowFilter = serde_json::from_str(json).unwrap();
    assert_eq!(parsed.since, Some(at(10)));
    assert_eq!(only(parsed), [Dropped]);
    assert!(serde_json::from_str::<FlowFilter>(r#"{"namespace":["prod"]}"#).is_err());
    assert!(serde_json::from_str::<FlowFilter>(r#"{"verdicts":["lost"]}"#).is_err());
}

async fn next(sub: &mut zmesh_proxy::flows::FlowSubscription) -> Arc<FlowEvent> {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("an event is waiting")
        .expect("hub is alive")
}

#[tokio::test]
async fn ring_keeps_the_last_n_and_since_selects_history() {
    let hub = FlowHub::new(3);
    for ms in 0..5 {
        hub.publish(forwarded(ms * 10));
    }
    let times = |v: &[Arc<FlowEvent>]| v.iter().map(|e| e.time).collect::<Vec<_>>();
    // Only the last 3 were kept.
    assert_eq!(
        times(&hub.recent(&FlowFilter::default(), 10)),
        [at(20), at(30), at(40)]
    );
    assert_eq!(
        times(&hub.recent(&FlowFilter::default(), 2)),
        [at(30), at(40)]
    );

    // since older than the ring: everything retained, oldest first; then live events.
    let mut sub = hub.subscribe(FlowFilter {
        since: Some(at(0)),
        ..Default::default()
    });
    // since inside the ring (inclusive).
    let mut sub30 = hub.subscribe(FlowFilter {
        since: Some(at(30)),
        ..Default::default()
    });
    // No since: live only.
    let mut live = hub.subscribe(FlowFilter::default());
    hub.publish(forwarded(50));
    for want in [20, 30, 40, 50] {
        assert_eq!(next(&mut sub).await.time, at(want));
    }
    for want in [30, 40, 50] {
        assert_eq!(next(&mut sub30).await.time, at(want));
    }
    assert_eq!(next(&mut live).await.time, at(50));
    assert_eq!(sub.missed() + sub30.missed() + live.missed(), 0);
}

#[tokio::test]
async fn live_events_are_filtered_and_end_with_the_hub() {
    let hub = FlowHub::new(16);
    let mut sub = hub.subscribe(FlowFilter {
        verdicts: vec![FlowVerdict::Denied, FlowVerdict::Dropped],
        ..Default::default()
    });
    hub.publish(forwarded(1));
    hub.publish(denied(2));
    hub.publish(forwarded(3));
    hub.publish(dropped(4));
    // The forwarded events in between were skipped, in order.
    assert_eq!(next(&mut sub).await.verdict, FlowVerdict::Denied);
    assert_eq!(next(&mut sub).await.verdict, FlowVerdict::Dropped);
    drop(hub);
    let end = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("closed hub ends the stream");
    assert!(end.is_none());
}

#[tokio::test]
async fn slow_subscribers_learn_how_many_events_they_missed() {
    let hub = FlowHub::new(2);
    let mut sub = hub.subscribe(FlowFilter::default());
    for ms in 0..5 {
        hub.publish(forwarded(ms));
    }
    // The channel holds 2: the first 3 are gone, and counted.
    assert_eq!(next(&mut sub).await.time, at(3));
    assert_eq!(sub.missed(), 3);
    assert_eq!(next(&mut sub).await.time, at(4));
}

#[test]
fn metrics_count_verdicts_by_policy_and_drops_by_reason() {
    let metrics = Arc::new(FlowMetrics::default());
    let mut registry = Registry::with_prefix("zmesh");
    metrics.register(&mut registry);
    let hub = FlowHub::new(4).with_metrics(metrics.clone());
    hub.publish(forwarded(0));
    hub.publish(denied(1));
    hub.publish(denied(2));
    hub.publish(dropped(3));
    hub.publish(dropped(4));
    let mut other = dropped(5);
    other.reason = None;
    hub.publish(other);
    let mut no_match = denied(6);
    no_match.policy = Some(Verdict::Deny(Denial::NoAllowMatched {
        considered: vec![pref("prod/a")],
    }));
    hub.publish(no_match);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        r#"zmesh_policy_verdicts_total{action="allow",policy="prod/allow-web",reason="allow_policy"} 1"#,
        r#"zmesh_policy_verdicts_total{action="deny",policy="prod/deny-batch",reason="deny_policy"} 2"#,
        r#"zmesh_policy_verdicts_total{action="deny",policy="",reason="no_allow_matched"} 1"#,
        r#"zmesh_flow_drops_total{reason="plaintext_strict"} 2"#,
        r#"zmesh_flow_drops_total{reason="unknown"} 1"#,
        r#"zmesh_flows_total{verdict="forwarded",encrypted="true"} 1"#,
        r#"zmesh_flows_total{verdict="denied",encrypted="true"} 3"#,
        r#"zmesh_flows_total{verdict="dropped",encrypted="false"} 3"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
    }
}
