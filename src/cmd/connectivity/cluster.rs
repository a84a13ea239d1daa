//! The connectivity test against a Kubernetes cluster (the current kubeconfig's).
//!
//! The nodes come from the agents' reports (their Leases, as `zmesh status --kubernetes`
//! reads them): node A is the first node whose agent is current and ready, node B the
//! second (tests that need two nodes are skipped on one). Into two namespaces of its own
//! (enrolled `<test-namespace>`, plain `<test-namespace>-plain`) it deploys two echo pods
//! (A and B) behind a Service, and runs each client as a pod of its own that exits with
//! what it got back (`restartPolicy: Never`, the result in its termination message): no
//! exec stream or port-forward is needed. What the mesh made of each connection comes from
//! the agents' Istio TCP metrics, read through the API server's node proxy
//! (`/api/v1/nodes/<node>:15020/proxy/metrics`): the destination's reporter must name the
//! client's pod and SPIFFE ID with `mutual_tls`, a denial must be counted with `DENY`.
//! Client pods have unique names, so a series names exactly one test's connections.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::Client;
use serde_json::json;
use zmesh_cluster::agent_status;

use super::Recorder;
use crate::cmd::parse_duration;

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// zmesh's namespace (where the agents report in Leases).
    #[arg(short = 'n', long, default_value = "zmesh-system")]
    namespace: String,
    /// The enrolled namespace the test creates (and `<it>-plain` beside it); both are
    /// deleted first if they exist, and afterwards unless --keep.
    #[arg(long, default_value = "zmesh-test", value_name = "NAME")]
    test_namespace: String,
    /// The test pods' image: it needs `sh` and a busybox `nc` (`-l -e`, `-w`).
    #[arg(long, default_value = "busybox:1.36")]
    image: String,
    /// How long pods may take to start or to finish (an earlier run's namespaces get at
    /// least 90 s to go away).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    timeout: Duration,
    /// Leave the test namespaces in place afterwards (to look at them).
    #[arg(long)]
    keep: bool,
}

const ECHO_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
const SERVICE_TRIES: usize = 12;
/// How long the intruder keeps trying while the DENY policy reaches the agents.
const POLICY_PROPAGATION_TRIES: usize = 30;
const METRICS_PORT: u16 = 15020;
/// The least time given to an earlier run's namespaces to go away.
const NAMESPACE_DELETION: Duration = Duration::from_secs(90);
/// Plaintext the agents' eBPF programs dropped, by reason (`plaintext_strict`).
const STRICT_DROPS: &str = "zmesh_flow_drops_total";

pub async fn run(args: &ClusterArgs, only: &[String]) -> anyhow::Result<Vec<super::Outcome>> {
    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (KUBECONFIG, or run inside the cluster)")?;
    let now = SystemTime::now();
    let agents: Vec<_> = agent_status::list(client.clone(), &args.namespace)
        .await?
        .into_iter()
        .filter(|a| a.is_current(now))
        .filter_map(|a| a.status.filter(|s| s.ready))
        .collect();
    let Some(a) = agents.first() else {
        bail!(
            "no zmesh agent in namespace {} is reporting ready (see zmesh status --kubernetes)",
            args.namespace
        );
    };
    let b = agents.get(1).unwrap_or(a);
    println!(
        "Nodes with a ready agent: {} (A: {}, B: {})",
        agents.len(),
        a.node,
        b.node
    );
    let test = Test {
        client: client.clone(),
        mesh: args.test_namespace.clone(),
        plain: format!("{}-plain", args.test_namespace),
        image: args.image.clone(),
        timeout: args.timeout,
        node_a: a.node.clone(),
        node_b: b.node.clone(),
        strict_a: a.mode == "strict",
    };
    test.remove_namespaces().await?;
    println!(
        "Deploying the test pods into {} and {} ...",
        test.mesh, test.plain
    );
    let results = match test.deploy().await {
        Ok(deployed) => Ok(test.matrix(&deployed, only).await),
        Err(e) => Err(e),
    };
    if args.keep {
        println!("Keeping {} and {} (--keep)", test.mesh, test.plain);
    } else if let Err(e) = test.remove_namespaces().await {
        eprintln!("warning: removing the test namespaces: {e:#}");
    }
    results
}

struct Test {
    client: Client,
    mesh: String,
    plain: String,
    image: String,
    timeout: Duration,
    node_a: String,
    node_b: String,
    strict_a: bool,
}

/// What [`Test::deploy`] made: the echo pods' addresses and the Service's.
struct Deployed {
    echo_a: String,
    echo_b: String,
    service: String,
}

/// A client pod's result: how many of its exchanges echoed, what it said.
struct ClientRun {
    pod: String,
    succeeded: bool,
    message: String,
}

impl Test {
    fn two_nodes(&self) -> bool {
        self.node_a != self.node_b
    }

    async fn remove_namespaces(&self) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        for ns in [&self.mesh, &self.plain] {
            match api.delete(ns, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot delete namespace {ns}")),
            }
        }
        // Namespace deletion waits for kubelet to stop every pod and for the namespace
        // controller's next pass: often tens of seconds, whatever the pods' timeout.
        let wait = self.timeout.max(NAMESPACE_DELETION);
        let deadline = Instant::now() + wait;
        for ns in [&self.mesh, &self.plain] {
            while api.get_opt(ns).await?.is_some() {
                if Instant::now() > deadline {
                    bail!("namespace {ns} is still being deleted after {wait:?}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }

    async fn deploy(&self) -> anyhow::Result<Deployed> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let pp = PostParams::default();
        namespaces
            .create(
                &pp,
                &from_json(json!({"metadata": {
                    "name": self.mesh,
                    "labels": {"io.cilium/mtls-enabled": "true", "zmesh.io/connectivity-test": "true"},
                }}))?,
            )
            .await
            .with_context(|| format!("cannot create namespace {}", self.mesh))?;
        namespaces
            .create(
                &pp,
                &from_json(json!({"metadata": {
                    "name": self.plain,
                    "labels": {"zmesh.io/connectivity-test": "true"},
                }}))?,
            )
            .await
            .with_context(|| format!("cannot create namespace {}", self.plain))?;
        for (ns, account) in [
            (&self.mesh, "echo"),
            (&self.mesh, "client"),
            (&self.mesh, "intruder"),
            (&self.plain, "plain"),
        ] {
            let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
            api.create(&pp, &from_json(json!({"metadata": {"name": account}}))?)
                .await
                .with_context(|| format!("cannot create ServiceAccount {ns}/{account}"))?;
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.mesh);
        for (name, node) in [("echo-a", &self.node_a), ("echo-b", &self.node_b)] {
            let pod = self.pod(
                name,
                node,
                "echo",
                json!(["nc", "-ll", "-p", ECHO_PORT.to_string(), "-e", "cat"]),
                "Always",
            );
            pods.create(&pp, &from_json(pod)?)
                .await
                .with_context(|| format!("cannot create pod {}/{name}", self.mesh))?;
        }
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.mesh);
        let service = services
            .create(
                &pp,
                &from_json(json!({
                    "metadata": {"name": "echo"},
                    "spec": {
                        "selector": {"app": "echo"},
                        "ports": [{"name": "echo", "port": SERVICE_PORT, "targetPort": ECHO_PORT}],
                    },
                }))?,
            )
            .await
            .context("cannot create the echo Service")?;
        let cluster_ip = service
            .spec
            .and_then(|s| s.cluster_ip)
            .filter(|ip| !ip.is_empty() && ip != "None")
            .context("the echo Service got no ClusterIP")?;
        let echo_a = self.wait_running(&self.mesh, "echo-a").await?;
        let echo_b = self.wait_running(&self.mesh, "echo-b").await?;
        Ok(Deployed {
            echo_a: format!("{echo_a} {ECHO_PORT}"),
            echo_b: format!("{echo_b} {ECHO_PORT}"),
            service: format!("{cluster_ip} {SERVICE_PORT}"),
        })
    }

    fn pod(
        &self,
        name: &str,
        node: &str,
        account: &str,
        command: serde_json::Value,
        restart: &str,
    ) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "labels": {"app": account, "zmesh.io/connectivity-test": "true"}},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "serviceAccountName": account,
                "automountServiceAccountToken": false,
                "restartPolicy": restart,
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "main",
                    "image": self.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": command,
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                }],
            },
        })
    }

    /// Waits until the pod runs with its container ready; its IP.
    async fn wait_running(&self, ns: &str, name: &str) -> anyhow::Result<String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let deadline = Instant::now() + self.timeout;
        loop {
            let pod = api.get(name).await?;
            let status = pod.status.unwrap_or_default();
            let ready = status.container_statuses.iter().flatten().all(|c| c.ready)
                && status.container_statuses.is_some();
            if status.phase.as_deref() == Some("Running") && ready {
                if let Some(ip) = status.pod_ip.filter(|ip| !ip.is_empty()) {
                    return Ok(ip);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "pod {ns}/{name} is not running after {:?} (phase {}){}",
                    self.timeout,
                    status.phase.unwrap_or_else(|| "unknown".into()),
                    self.events(ns, name).await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The pod's recent events, as `kubectl describe` shows them (why it is stuck).
    async fn events(&self, ns: &str, pod: &str) -> String {
        use k8s_openapi::api::core::v1::Event;
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let selector = format!("involvedObject.name={pod}");
        let Ok(list) = api
            .list(&kube::api::ListParams::default().fields(&selector))
            .await
        else {
            return String::new();
        };
        let mut out = String::new();
        for e in list.items.iter().rev().take(5) {
            out.push_str(&format!(
                "\n    {} {}: {}",
                e.type_.as_deref().unwrap_or(""),
                e.reason.as_deref().unwrap_or(""),
                e.message.as_deref().unwrap_or("").trim()
            ));
        }
        out
    }

    /// Runs a client pod on `node` whose shell `script` decides success (exit code) and
    /// says what happened in its termination message; waits for it to end.
    async fn client_pod(
        &self,
        ns: &str,
        account: &str,
        node: &str,
        label: &str,
        script: String,
    ) -> anyhow::Result<ClientRun> {
        let name = format!("{label}-{:08x}", rand::random::<u32>());
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod = self.pod(&name, node, account, json!(["sh", "-c", script]), "Never");
        api.create(&PostParams::default(), &from_json(pod)?)
            .await
            .with_context(|| format!("cannot create client pod {ns}/{name}"))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let pod = api.get(&name).await?;
            let status = pod.status.unwrap_or_default();
            let phase = status.phase.clone().unwrap_or_default();
            if phase == "Succeeded" || phase == "Failed" {
                let message = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                return Ok(ClientRun {
                    pod: name,
                    succeeded: phase == "Succeeded",
                    message,
                });
            }
            if Instant::now() > deadline {
                bail!(
                    "client pod {ns}/{name} did not finish in {:?} (phase {phase}){}",
                    self.timeout,
                    self.events(ns, &name).await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A client that sends `tries` payloads to `target` (`ip port`), one connection each,
    /// and succeeds when every one came back intact.
    async fn exchange(
        &self,
        ns: &str,
        account: &str,
        node: &str,
        label: &str,
        target: &str,
        tries: usize,
    ) -> anyhow::Result<ClientRun> {
        let payload = format!("zmesh-connectivity-{:016x}", rand::random::<u64>());
        let script = format!(
            "ok=0; i=0; while [ $i -lt {tries} ]; do i=$((i+1)); p={payload}-$i; \
             r=$(echo $p | nc -w 5 {target} 2>/dev/null); [ \"$r\" = \"$p\" ] && ok=$((ok+1)); \
             done; echo \"$ok of {tries} echoed\" > /dev/termination-log; [ $ok -eq {tries} ]"
        );
        self.client_pod(ns, account, node, label, script).await
    }

    /// The agent's metrics on `node`, through the API server's node proxy.
    async fn metrics(&self, node: &str) -> anyhow::Result<String> {
        let request =
            http::Request::get(format!("/api/v1/nodes/{node}:{METRICS_PORT}/proxy/metrics"))
                .body(Vec::new())?;
        self.client
            .request_text(request)
            .await
            .with_context(|| format!("cannot read the agent's metrics on node {node}"))
    }

    /// How many plaintext connections `node`'s eBPF program refused in strict mode.
    async fn strict_drops(&self, node: &str) -> anyhow::Result<f64> {
        let text = self.metrics(node).await?;
        Ok(series(&text, STRICT_DROPS)
            .iter()
            .filter(|(labels, _)| {
                labels.get("reason").map(String::as_str) == Some("plaintext_strict")
            })
            .map(|(_, value)| value)
            .sum())
    }

    /// Checks that `node`'s agent counted a connection of `metric` matching every label in
    /// `want` (a value starting with `*` matches as a suffix); else says what it counted
    /// for the client pod.
    async fn counted(
        &self,
        node: &str,
        metric: &str,
        want: &[(&str, &str)],
    ) -> anyhow::Result<Result<(), String>> {
        let text = self.metrics(node).await?;
        let all = series(&text, metric);
        let matches = |labels: &BTreeMap<String, String>| {
            want.iter().all(|(k, v)| {
                let got = labels.get(*k).map(String::as_str).unwrap_or("");
                match v.strip_prefix('*') {
                    Some(suffix) => got.ends_with(suffix),
                    None => got == *v,
                }
            })
        };
        if all
            .iter()
            .any(|(labels, value)| *value > 0.0 && matches(labels))
        {
            return Ok(Ok(()));
        }
        let client = want
            .iter()
            .find(|(k, _)| *k == "source_workload")
            .map(|(_, v)| *v)
            .unwrap_or("");
        let seen: Vec<String> = all
            .iter()
            .filter(|(l, _)| l.get("source_workload").map(String::as_str) == Some(client))
            .map(|(l, _)| {
                let g = |k: &str| l.get(k).cloned().unwrap_or_default();
                format!(
                    "reporter={} destination_workload={} source_principal={} security={} flags={}",
                    g("reporter"),
                    g("destination_workload"),
                    g("source_principal"),
                    g("connection_security_policy"),
                    g("response_flags")
                )
            })
            .collect();
        Ok(Err(if seen.is_empty() {
            format!("the agent on {node} counted no {metric} from {client}")
        } else {
            format!("the agent on {node} counted: {}", seen.join("; "))
        }))
    }

    /// `node`'s destination reporter saw `client` reach `echo` inside mTLS as `account`.
    async fn mtls_to(
        &self,
        node: &str,
        client: &str,
        account: &str,
        echo: &str,
    ) -> anyhow::Result<Result<(), String>> {
        let principal = format!("*/ns/{}/sa/{account}", self.mesh);
        self.counted(
            node,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_workload", client),
                ("source_principal", &principal),
                ("destination_workload", echo),
                ("destination_workload_namespace", &self.mesh),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
        .await
    }

    async fn policy_api(&self) -> anyhow::Result<Option<Api<DynamicObject>>> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy"),
            "authorizationpolicies",
        );
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.mesh, &resource);
        match api.list(&Default::default()).await {
            Ok(_) => Ok(Some(api)),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
            Err(e) => Err(e).context("cannot list AuthorizationPolicies"),
        }
    }

    async fn matrix(&self, d: &Deployed, only: &[String]) -> Vec<super::Outcome> {
        let mut results = Recorder::default();
        let wanted = |name: &str| only.is_empty() || only.iter().any(|t| name.contains(t.as_str()));
        macro_rules! step {
            ($name:expr, $body:expr) => {
                if wanted($name) {
                    let t = Instant::now();
                    let r: anyhow::Result<Result<(), String>> = $body.await;
                    results.record($name, t, r.unwrap_or_else(|e| Err(format!("{e:#}"))));
                }
            };
        }
        let (a, b, mesh, plain) = (&self.node_a, &self.node_b, &self.mesh, &self.plain);

        step!("pod-to-pod/same-node (mTLS, identities verified)", async {
            let run = self
                .exchange(mesh, "client", a, "same-node", &d.echo_a, 1)
                .await?;
            if !run.succeeded {
                return Ok(Err(format!("{}: {}", run.pod, run.message)));
            }
            self.mtls_to(a, &run.pod, "client", "echo-a").await
        });
        if !self.two_nodes() {
            if wanted("pod-to-pod/cross-node") {
                results.skip(
                    "pod-to-pod/cross-node (mTLS, identities verified)",
                    "one node runs a ready agent",
                );
            }
        } else {
            step!("pod-to-pod/cross-node (mTLS, identities verified)", async {
                let run = self
                    .exchange(mesh, "client", a, "cross-node", &d.echo_b, 1)
                    .await?;
                if !run.succeeded {
                    return Ok(Err(format!("{}: {}", run.pod, run.message)));
                }
                self.mtls_to(b, &run.pod, "client", "echo-b").await
            });
        }
        step!(
            "service/cluster-ip (balanced over both endpoints, mTLS)",
            async {
                let run = self
                    .exchange(mesh, "client", a, "service", &d.service, SERVICE_TRIES)
                    .await?;
                if !run.succeeded {
                    return Ok(Err(format!("{}: {}", run.pod, run.message)));
                }
                for echo in ["echo-a", "echo-b"] {
                    let seen = self
                        .counted(
                            a,
                            "istio_tcp_connections_opened_total",
                            &[
                                ("reporter", "source"),
                                ("source_workload", &run.pod),
                                ("destination_service_name", "echo"),
                                ("destination_workload", echo),
                                ("connection_security_policy", "mutual_tls"),
                            ],
                        )
                        .await?;
                    if let Err(e) = seen {
                        return Ok(Err(format!("{echo} was not reached inside mTLS: {e}")));
                    }
                }
                Ok(Ok(()))
            }
        );
        if self.strict_a {
            if wanted("plaintext/permissive") {
                results.skip(
                    "plaintext/permissive (from outside the mesh, allowed, logged unencrypted)",
                    format!("the agent on {a} runs in strict mode"),
                );
            }
        } else {
            step!(
                "plaintext/permissive (from outside the mesh, allowed, logged unencrypted)",
                async {
                    let run = self
                        .exchange(plain, "plain", a, "plain", &d.echo_a, 1)
                        .await?;
                    if !run.succeeded {
                        return Ok(Err(format!("{}: {}", run.pod, run.message)));
                    }
                    self.counted(
                        a,
                        "istio_tcp_connections_opened_total",
                        &[
                            ("reporter", "destination"),
                            ("source_workload", &run.pod),
                            ("destination_workload", "echo-a"),
                            ("source_principal", "unknown"),
                            ("connection_security_policy", "unknown"),
                        ],
                    )
                    .await
                }
            );
        }
        if wanted("policy") {
            match self.policy_api().await {
                Ok(Some(policies)) => {
                    step!(
                        "policy/deny (DENY by principal refuses the intruder)",
                        async { self.deny(&policies, d).await }
                    );
                    step!(
                        "policy/allow (the same policy lets the client through)",
                        async {
                            let run = self
                                .exchange(mesh, "client", a, "allowed", &d.echo_b, 1)
                                .await?;
                            if !run.succeeded {
                                return Ok(Err(format!("{}: {}", run.pod, run.message)));
                            }
                            self.mtls_to(b, &run.pod, "client", "echo-b").await
                        }
                    );
                    if let Err(e) = policies
                        .delete("deny-intruder", &DeleteParams::default())
                        .await
                    {
                        eprintln!("warning: removing the test policy: {e}");
                    }
                }
                Ok(None) => {
                    let why = "AuthorizationPolicy (security.istio.io/v1) is not served: install Istio's CRDs to test policies";
                    results.skip("policy/deny (DENY by principal refuses the intruder)", why);
                    results.skip(
                        "policy/allow (the same policy lets the client through)",
                        why,
                    );
                }
                Err(e) => {
                    let t = Instant::now();
                    results.record(
                        "policy/deny (DENY by principal refuses the intruder)",
                        t,
                        Err(format!("{e:#}")),
                    );
                }
            }
        }
        if self.strict_a {
            step!("strict (plaintext refused, mTLS still works)", async {
                let drops_before = self.strict_drops(a).await?;
                let run = self
                    .exchange(plain, "plain", a, "strict-plain", &d.echo_a, 1)
                    .await?;
                if run.succeeded {
                    return Ok(Err(format!(
                        "plaintext reached an enrolled pod in strict mode ({})",
                        run.pod
                    )));
                }
                let drops = self.strict_drops(a).await?;
                if drops <= drops_before {
                    return Ok(Err(format!(
                        "{} failed ({}) but the agent on {a} reported no plaintext dropped by \
                         strict mode ({STRICT_DROPS} stayed at {drops_before})",
                        run.pod, run.message
                    )));
                }
                let run = self
                    .exchange(mesh, "client", a, "strict-mtls", &d.echo_a, 1)
                    .await?;
                if !run.succeeded {
                    return Ok(Err(format!(
                        "mTLS failed in strict mode: {}: {}",
                        run.pod, run.message
                    )));
                }
                self.mtls_to(a, &run.pod, "client", "echo-a").await
            });
        } else if wanted("strict") {
            results.skip(
                "strict (plaintext refused, mTLS still works)",
                format!("the agent on {a} runs in permissive mode (--mode strict to test it)"),
            );
        }
        results.into_outcomes()
    }

    /// Applies a DENY on the intruder's principal; the intruder's pod retries until it is
    /// refused (the policy reaching the agents), then the refusal must be counted.
    async fn deny(
        &self,
        policies: &Api<DynamicObject>,
        d: &Deployed,
    ) -> anyhow::Result<Result<(), String>> {
        let principal = format!("*/ns/{}/sa/intruder", self.mesh);
        let mut policy: DynamicObject = from_json(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-intruder"},
            "spec": {
                "selector": {"matchLabels": {"app": "echo"}},
                "action": "DENY",
                "rules": [{"from": [{"source": {"principals": [principal]}}]}],
            },
        }))?;
        policy.metadata.namespace = Some(self.mesh.clone());
        policies
            .create(&PostParams::default(), &policy)
            .await
            .context("cannot create the DENY AuthorizationPolicy")?;
        let tries = POLICY_PROPAGATION_TRIES;
        let script = format!(
            "i=0; while [ $i -lt {tries} ]; do i=$((i+1)); \
             r=$(echo probe | nc -w 3 {target} 2>/dev/null); \
             if [ \"$r\" != probe ]; then echo \"refused at try $i\" > /dev/termination-log; exit 0; fi; \
             sleep 1; done; echo \"echoed {tries} times\" > /dev/termination-log; exit 1",
            target = d.echo_b
        );
        let run = self
            .client_pod(&self.mesh, "intruder", &self.node_a, "intruder", script)
            .await?;
        if !run.succeeded {
            return Ok(Err(format!(
                "the intruder still reached echo-b: {}",
                run.message
            )));
        }
        self.counted(
            &self.node_b,
            "istio_tcp_connections_failed_total",
            &[
                ("reporter", "destination"),
                ("source_workload", &run.pod),
                ("source_principal", &principal),
                ("destination_workload", "echo-b"),
                ("response_flags", "DENY"),
            ],
        )
        .await
    }
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(value).context("building a test object")
}

/// The samples of `metric` in Prometheus text: labels and value.
fn series(text: &str, metric: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => match parse_labels(rest) {
                Some(parsed) => parsed,
                None => continue,
            },
            None if rest.starts_with(' ') => (BTreeMap::new(), rest),
            None => continue,
        };
        if let Some(v) = value.split_whitespace().next().and_then(|v| v.parse().ok()) {
            out.push((labels, v));
        }
    }
    out
}

/// `k="v",...}` and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches(',');
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        s = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_series_are_parsed_with_escapes() {
        let text = "# HELP x y\n\
            istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"a\\\"b\",x=\"1,2}\"} 3\n\
            istio_tcp_connections_opened_total_other{a=\"b\"} 1\n\
            istio_tcp_connections_opened_total 7\n";
        let s = series(text, "istio_tcp_connections_opened_total");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0["reporter"], "destination");
        assert_eq!(s[0].0["source_workload"], "a\"b");
        assert_eq!(s[0].0["x"], "1,2}");
        assert_eq!(s[0].1, 3.0);
        assert!(s[1].0.is_empty());
        assert_eq!(s[1].1, 7.0);
    }
}
