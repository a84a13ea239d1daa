//! Flow events on the node: eBPF drop reports turned into flow events, policies pushed to
//! the proxy, and the admin API's `GET /flows` (NDJSON, for `zmesh observe`).
//!
//! `GET /flows?namespace=NS&pod=[NS/]NAME&identity=ID&verdict=V&encrypted=BOOL&since=T&follow=true`:
//! every parameter but `follow` may repeat where it makes sense (namespace, pod, identity,
//! verdict: any value may match). `since` and `until` are RFC 3339 or a duration back from
//! now (`5m`). `from_namespace`, `from_pod`, `from_identity`, `from_port` (and `to_...`)
//! match one end only; `port` either end; `direction` (`inbound`, `outbound`) and `phase`
//! (`open`, `close`) the event. `last=N` keeps the last N matching events of the history.
//! Without `follow` the retained history is returned and the response ends; with it, the
//! history since `since` (or the last N) and then live events until the client goes away.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Response;
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use hyper::body::Frame;
use zmesh_proxy::flows::{
    parse_time, FlowDirection, FlowEndpoint, FlowEvent, FlowFilter, FlowHub, FlowPhase, FlowVerdict,
};
use zmesh_proxy::policy::PolicyStore;
use zmesh_proxy::{WorkloadStore, WorkloadTable};
use zmesh_redirect::{DropEvent, DropReason, Redirector};

use zmesh_cluster::ClusterState;

/// How many recent flow events the agent keeps for `--since` queries.
pub const FLOW_HISTORY: usize = 4096;

/// What the query asks for (also what the agent asks a data path process for).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    pub filter: FlowFilter,
    pub follow: bool,
    /// Only the last N matching events of the history.
    pub last: Option<usize>,
}

/// A duration like `90s`, `5m`, `2h`, `1d`.
fn parse_ago(s: &str) -> Option<Duration> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = digits.parse().ok()?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(unit).map(Duration::from_secs)
}

/// `since`: RFC 3339, or a duration back from `now` (`5m`).
pub fn parse_since(s: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Some(ago) = parse_ago(s) {
        return Ok(now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH));
    }
    parse_time(s)
        .map_err(|_| format!("since {s:?} is neither a duration like 5m nor an RFC 3339 time"))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{key} must be true or false, not {v:?}")),
    }
}

/// Reads the `/flows` query string (already split and decoded).
pub fn parse_query(query: &[(String, String)], now: SystemTime) -> Result<FlowQuery, String> {
    let mut q = FlowQuery {
        filter: FlowFilter::default(),
        follow: false,
        last: None,
    };
    let port = |v: &str| {
        v.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{v:?} is not a port number (1-65535)"))
    };
    for (key, value) in query {
        if value.is_empty() {
            return Err(format!("{key} needs a value"));
        }
        match key.as_str() {
            "namespace" => q.filter.namespaces.push(value.clone()),
            "pod" => q.filter.pods.push(value.clone()),
            "identity" => q.filter.identities.push(value.clone()),
            "verdict" => q.filter.verdicts.push(value.parse::<FlowVerdict>()?),
            "encrypted" => q.filter.encrypted = Some(parse_bool(key, value)?),
            "since" => q.filter.since = Some(parse_since(value, now)?),
            "until" => q.filter.until = Some(parse_since(value, now)?),
            "follow" => q.follow = parse_bool(key, value)?,
            "from_namespace" => q.filter.from.namespaces.push(value.clone()),
            "to_namespace" => q.filter.to.namespaces.push(value.clone()),
            "from_pod" => q.filter.from.pods.push(value.clone()),
            "to_pod" => q.filter.to.pods.push(value.clone()),
            "from_identity" => q.filter.from.identities.push(value.clone()),
            "to_identity" => q.filter.to.identities.push(value.clone()),
            "from_port" => q.filter.from.ports.push(port(value)?),
            "to_port" => q.filter.to.ports.push(port(value)?),
            "port" => q.filter.ports.push(port(value)?),
            "direction" => q.filter.directions.push(value.parse()?),
            "phase" => q.filter.phases.push(match value.as_str() {
                "open" => FlowPhase::Open,
                "close" => FlowPhase::Close,
                _ => return Err(format!("phase must be open or close, not {value:?}")),
            }),
            "last" => {
                q.last = Some(
                    value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("last must be a positive number, not {value:?}"))?,
                )
            }
            other => {
                return Err(format!(
                "unknown parameter {other:?}; use namespace, pod, identity, verdict, encrypted, \
                     since, until, from_/to_ namespace, pod, identity or port, port, direction, \
                     phase, last or follow"
            ))
            }
        }
    }
    Ok(q)
}

fn line(event: &FlowEvent) -> Result<Frame<Bytes>, Infallible> {
    // A FlowEvent always serializes (its time was formatted when it was made).
    let mut bytes = serde_json::to_vec(event).unwrap_or_default();
    bytes.push(b'\n');
    Ok(Frame::data(Bytes::from(bytes)))
}

/// A stream of flow events, oldest first (`Sync` for a response body).
pub type FlowStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Arc<FlowEvent>> + Send + Sync + 'static>>;

/// What `query` gets from one hub: the matching retained events (the last N, or those
/// since a time), then with `follow` the live ones; without it the stream ends after the
/// history.
pub fn query_hub(hub: &FlowHub, query: &FlowQuery) -> FlowStream {
    if query.follow {
        let subscription = match query.last {
            Some(n) => hub.subscribe_last(query.filter.clone(), n),
            None => hub.subscribe(query.filter.clone()),
        };
        Box::pin(futures::stream::unfold(
            subscription,
            |mut sub| async move {
                let event = sub.recv().await?;
                if sub.missed() > 0 {
                    tracing::debug!(missed = sub.missed(), "a flow subscriber fell behind");
                }
                Some((event, sub))
            },
        ))
    } else {
        let events = hub.recent(&query.filter, query.last.unwrap_or(usize::MAX));
        Box::pin(futures::stream::iter(events))
    }
}

/// The `/flows` response body: NDJSON, one [`FlowEvent`] per line, from `events` (the
/// agent's hub's answer, or the data path's when it runs apart: its hub is the node's).
pub fn flows_response(events: FlowStream) -> Response<BoxBody<Bytes, Infallible>> {
    use futures::StreamExt;
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(events.map(|e| line(&e)))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// A fixed, short reason for metrics and filters.
fn drop_reason(reason: DropReason) -> String {
    match reason {
        DropReason::StrictPlaintext => "plaintext_strict".into(),
        DropReason::ProxyUnavailable => "proxy_unavailable".into(),
        DropReason::Fragment => "fragment_strict".into(),
        DropReason::Unknown(n) => format!("unknown_{n}"),
    }
}

/// A packet the eBPF program dropped, as a flow: both ends named by IP (the source proved
/// nothing, so it gets no identity).
pub fn drop_flow(event: &DropEvent, table: &WorkloadTable) -> FlowEvent {
    let mut source = FlowEndpoint::addr(event.src);
    if let Some(w) = table.workload_by_ip(event.src.ip()) {
        source.namespace = Some(w.namespace.as_str().into());
        source.pod = Some(w.name.as_str().into());
    }
    let mut destination = FlowEndpoint::addr(event.dst);
    if let Some(w) = table.workload_by_ip(event.dst.ip()) {
        destination.namespace = Some(w.namespace.as_str().into());
        destination.pod = Some(w.name.as_str().into());
        destination.identity = Some(w.identity.spiffe_id().as_str().into());
    }
    FlowEvent {
        time: event.time,
        phase: FlowPhase::Close,
        direction: Some(FlowDirection::Inbound),
        source,
        destination,
        bytes_sent: 0,
        bytes_received: 0,
        duration_us: 0,
        verdict: FlowVerdict::Dropped,
        encrypted: false,
        policy: None,
        reason: Some(drop_reason(event.reason)),
        // Dropped in tc before any proxy chose an endpoint: the destination is a pod.
        service: None,
    }
}

/// Publishes the eBPF drop reports as flow events until the reader fails.
pub fn spawn_drop_events(
    redirector: &std::sync::Mutex<Redirector>,
    workloads: Arc<WorkloadStore>,
    flows: Arc<FlowHub>,
) -> Option<tokio::task::JoinHandle<()>> {
    let events = redirector
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drop_events();
    let mut events = match events {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("eBPF drop reports unavailable (drops are still counted): {e}");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        loop {
            match events.next().await {
                Ok(event) => flows.publish(drop_flow(&event, &workloads.snapshot())),
                Err(e) => {
                    tracing::error!("reading eBPF drop reports failed; no more drop flows: {e}");
                    return;
                }
            }
        }
    }))
}

/// Puts the cluster state's policies in force if they changed; the proxy then re-checks
/// its open connections. Returns whether they changed.
pub fn sync_policies(store: &PolicyStore, state: &ClusterState) -> bool {
    if *store.snapshot() == **state.policies() {
        return false;
    }
    let set = (**state.policies()).clone();
    tracing::info!(
        policies = set.policies().len(),
        "authorization policies updated"
    );
    store.replace(set);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use zmesh_identity::{TrustDomain, WorkloadId};
    use zmesh_proxy::policy::PolicySet;
    use zmesh_proxy::{Protocol, Workload};

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn query_builds_the_filter_and_rejects_bad_values() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let got = parse_query(
            &q(&[
                ("namespace", "prod"),
                ("namespace", "web"),
                ("pod", "prod/db"),
                ("identity", "cluster.local/ns/web/sa/frontend"),
                ("verdict", "denied"),
                ("encrypted", "false"),
                ("since", "5m"),
                ("follow", "true"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!(got.filter.namespaces, ["prod", "web"]);
        assert_eq!(got.filter.pods, ["prod/db"]);
        assert_eq!(got.filter.verdicts, [FlowVerdict::Denied]);
        assert_eq!(got.filter.encrypted, Some(false));
        assert_eq!(got.filter.since, Some(now - Duration::from_secs(300)));
        assert!(got.follow);
        let rfc = parse_query(&q(&[("since", "2023-11-14T22:13:20Z")]), now).unwrap();
        assert_eq!(
            rfc.filter.since,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        for (bad, want) in [
            (("verdict", "lost"), "unknown verdict"),
            (("encrypted", "yes"), "true or false"),
            (("since", "yesterday"), "neither a duration"),
            (("since", "5y"), "neither a duration"),
            (("follow", "1"), "true or false"),
            (("colour", "red"), "unknown parameter"),
            (("pod", ""), "needs a value"),
        ] {
            let e = parse_query(&q(&[bad]), now).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    fn table() -> WorkloadTable {
        let w = Workload {
            name: "db-0".into(),
            workload_name: "db-0".into(),
            namespace: "prod".into(),
            service_account: "db".into(),
            node: "n1".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            protocol: Protocol::Hbone,
            identity: WorkloadId::new(&TrustDomain::default(), "prod", "db").unwrap(),
            labels: Arc::default(),
        };
        WorkloadTable::new(TrustDomain::default(), [], [w]).unwrap()
    }

    #[test]
    fn drop_reports_become_dropped_flows_named_by_ip() {
        let src: SocketAddr = "10.9.9.9:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:5432".parse().unwrap();
        let event = DropEvent {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            src,
            dst,
            reason: DropReason::StrictPlaintext,
        };
        let flow = drop_flow(&event, &table());
        assert_eq!(flow.verdict, FlowVerdict::Dropped);
        assert!(!flow.encrypted);
        assert_eq!(flow.reason.as_deref(), Some("plaintext_strict"));
        assert_eq!(flow.time, event.time);
        assert_eq!(
            flow.source,
            FlowEndpoint::addr(src),
            "unknown source: address only"
        );
        assert_eq!(flow.destination.pod.as_deref(), Some("db-0"));
        assert_eq!(
            flow.destination.identity.as_deref(),
            Some("spiffe://cluster.local/ns/prod/sa/db")
        );
        let unknown = DropEvent {
            reason: DropReason::Unknown(9),
            ..event
        };
        assert_eq!(
            drop_flow(&unknown, &table()).reason.as_deref(),
            Some("unknown_9")
        );
    }

    #[tokio::test]
    async fn history_then_live_as_ndjson() {
        use futures::StreamExt;
        let hub = FlowHub::new(8);
        let now = SystemTime::now();
        let event = |pod: &str, verdict| {
            let mut e = drop_flow(
                &DropEvent {
                    time: now,
                    src: "10.9.9.9:1".parse().unwrap(),
                    dst: "10.0.0.2:80".parse().unwrap(),
                    reason: DropReason::StrictPlaintext,
                },
                &table(),
            );
            e.destination.pod = Some(pod.into());
            e.verdict = verdict;
            e
        };
        hub.publish(event("db-0", FlowVerdict::Dropped));
        hub.publish(event("web-0", FlowVerdict::Dropped));
        let query = |pairs: &[(&str, &str)]| parse_query(&q(pairs), now).unwrap();

        // History only: the matching retained events, then the end.
        let body = flows_response(query_hub(&hub, &query(&[("pod", "db")]))).into_body();
        let bytes = body.collect().await.unwrap().to_bytes();
        let lines: Vec<FlowEvent> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].destination.pod.as_deref(), Some("db-0"));

        // Follow: history since, then live, filtered.
        let body = flows_response(query_hub(
            &hub,
            &query(&[
                ("since", "1m"),
                ("follow", "true"),
                ("verdict", "dropped"),
                ("pod", "db"),
            ]),
        ))
        .into_body();
        let mut frames = body.into_data_stream();
        let first = frames.next().await.unwrap().unwrap();
        assert!(std::str::from_utf8(&first).unwrap().contains("db-0"));
        hub.publish(event("db-1", FlowVerdict::Denied)); // filtered out by verdict
        hub.publish(event("db-2", FlowVerdict::Dropped));
        let live = tokio::time::timeout(Duration::from_secs(10), frames.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let live: FlowEvent = serde_json::from_slice(&live).unwrap();
        assert_eq!(live.destination.pod.as_deref(), Some("db-2"));
    }

    #[test]
    fn policies_are_pushed_only_when_they_change() {
        let store = PolicyStore::default();
        let mut changes = store.subscribe();
        let state = ClusterState::default();
        assert!(!sync_policies(&store, &state));
        assert!(!changes.has_changed().unwrap());
        let set = PolicySet::parse_documents(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: prod}\nspec: {action: DENY, rules: [{}]}\n",
        )
        .unwrap();
        let state = state.with_policies(set.clone());
        assert!(sync_policies(&store, &state));
        assert!(changes.has_changed().unwrap());
        assert_eq!(*store.snapshot(), set);
        changes.mark_unchanged();
        assert!(!sync_policies(&store, &state));
        assert!(!changes.has_changed().unwrap());
    }
}
