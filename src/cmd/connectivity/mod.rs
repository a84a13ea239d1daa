//! `zmesh connectivity test`, like `cilium connectivity test`: deploys test pods, runs a
//! matrix of connections (same node, cross node, Service, plaintext in permissive and
//! strict mode, policy allow and deny), checks each against what the agents saw
//! (identities, encryption, verdict), prints the results and can write them as JUnit XML.
//!
//! Two targets: a Kubernetes cluster ([`cluster`], through the API server: the pods are
//! real pods, the agents' view comes from their metrics through the API server's node
//! proxy) and, with the `demo` feature, a local lab of network namespaces ([`lab`]).

mod cluster;
#[cfg(feature = "demo")]
mod lab;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

#[derive(clap::Args)]
pub struct ConnectivityArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Deploy test pods, run the matrix, report.
    Test(TestArgs),
}

#[derive(clap::Args)]
struct TestArgs {
    /// Run in a local lab built for the test (network namespaces on this machine; root)
    /// instead of the cluster of the current kubeconfig.
    #[cfg(feature = "demo")]
    #[arg(long)]
    lab: bool,
    #[command(flatten)]
    cluster: cluster::ClusterArgs,
    /// Only the tests whose name contains this. Repeatable.
    #[arg(long, value_name = "TEXT")]
    test: Vec<String>,
    /// Also write the results as JUnit XML here.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
}

pub async fn run(args: ConnectivityArgs) -> anyhow::Result<ExitCode> {
    let What::Test(args) = args.what;
    #[cfg(feature = "demo")]
    let results = if args.lab {
        lab::run(&args.test).await?
    } else {
        cluster::run(&args.cluster, &args.test).await?
    };
    #[cfg(not(feature = "demo"))]
    let results = cluster::run(&args.cluster, &args.test).await?;
    print!("{}", report(&results));
    if let Some(path) = &args.junit {
        std::fs::write(path, junit(&results))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("JUnit XML written to {}", path.display());
    }
    Ok(
        if results
            .iter()
            .any(|r| matches!(r.verdict, Verdict::Fail(_)))
        {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        },
    )
}

/// How one test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// What went wrong, with what the agents saw.
    Fail(String),
    /// Why the test could not run on this target (one node, no policy CRD, ...).
    Skip(String),
}

/// One test's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub verdict: Verdict,
    pub elapsed: Duration,
}

/// Collects outcomes, printing each as it comes.
#[derive(Default)]
pub struct Recorder {
    outcomes: Vec<Outcome>,
}

impl Recorder {
    pub fn record(&mut self, name: &'static str, started: Instant, result: Result<(), String>) {
        let verdict = match result {
            Ok(()) => Verdict::Pass,
            Err(e) => Verdict::Fail(e),
        };
        self.push(name, started.elapsed(), verdict);
    }

    pub fn skip(&mut self, name: &'static str, why: impl Into<String>) {
        self.push(name, Duration::ZERO, Verdict::Skip(why.into()));
    }

    fn push(&mut self, name: &'static str, elapsed: Duration, verdict: Verdict) {
        match &verdict {
            Verdict::Pass => println!("  [pass] {name}"),
            Verdict::Fail(detail) => println!("  [FAIL] {name}: {detail}"),
            Verdict::Skip(why) => println!("  [skip] {name}: {why}"),
        }
        self.outcomes.push(Outcome {
            name,
            verdict,
            elapsed,
        });
    }

    pub fn into_outcomes(self) -> Vec<Outcome> {
        self.outcomes
    }
}

/// The results as a table and a summary line.
pub fn report(results: &[Outcome]) -> String {
    let mut out = String::from("\nRESULT  TIME     TEST\n");
    for r in results {
        let (word, detail) = match &r.verdict {
            Verdict::Pass => ("pass", None),
            Verdict::Fail(d) => ("FAIL", Some(d)),
            Verdict::Skip(d) => ("skip", Some(d)),
        };
        let _ = writeln!(
            out,
            "{word:<6}  {:>6}ms  {}{}",
            r.elapsed.as_millis(),
            r.name,
            detail
                .map(|d| format!("\n                 {d}"))
                .unwrap_or_default()
        );
    }
    let count = |f: fn(&Verdict) -> bool| results.iter().filter(|r| f(&r.verdict)).count();
    let passed = count(|v| *v == Verdict::Pass);
    let skipped = count(|v| matches!(v, Verdict::Skip(_)));
    let run = results.len() - skipped;
    let _ = write!(out, "\n{passed} of {run} tests passed");
    if skipped > 0 {
        let _ = write!(out, ", {skipped} skipped");
    }
    out.push('\n');
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The results as JUnit XML (one testsuite, one testcase per test, a `<failure>` with the
/// detail for each failed one, `<skipped>` with the reason), as CI systems read it.
pub fn junit(results: &[Outcome]) -> String {
    let failures = results
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Fail(_)))
        .count();
    let skipped = results
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Skip(_)))
        .count();
    let total: f64 = results.iter().map(|r| r.elapsed.as_secs_f64()).sum();
    let counts = format!(
        "tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{total:.3}\"",
        results.len()
    );
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"zmesh connectivity test\" {counts}>"
    );
    let _ = writeln!(out, "  <testsuite name=\"connectivity\" {counts}>");
    for r in results {
        let name = xml_escape(r.name);
        let time = r.elapsed.as_secs_f64();
        let case =
            format!("<testcase classname=\"connectivity\" name=\"{name}\" time=\"{time:.3}\"");
        let _ = match &r.verdict {
            Verdict::Pass => writeln!(out, "    {case}/>"),
            Verdict::Fail(d) => writeln!(
                out,
                "    {case}>\n      <failure message=\"{}\"/>\n    </testcase>",
                xml_escape(d)
            ),
            Verdict::Skip(d) => writeln!(
                out,
                "    {case}>\n      <skipped message=\"{}\"/>\n    </testcase>",
                xml_escape(d)
            ),
        };
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_is_golden_and_escapes_details() {
        let results = [
            Outcome {
                name: "pod-to-pod/same-node",
                verdict: Verdict::Pass,
                elapsed: Duration::from_millis(120),
            },
            Outcome {
                name: "policy/deny",
                verdict: Verdict::Fail("node2 saw: a -> b \"FORWARDED\" & <more>".into()),
                elapsed: Duration::from_millis(2500),
            },
            Outcome {
                name: "pod-to-pod/cross-node",
                verdict: Verdict::Skip("one node runs an agent".into()),
                elapsed: Duration::ZERO,
            },
        ];
        assert_eq!(
            junit(&results),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <testsuites name=\"zmesh connectivity test\" tests=\"3\" failures=\"1\" skipped=\"1\" time=\"2.620\">\n\
             \x20 <testsuite name=\"connectivity\" tests=\"3\" failures=\"1\" skipped=\"1\" time=\"2.620\">\n\
             \x20   <testcase classname=\"connectivity\" name=\"pod-to-pod/same-node\" time=\"0.120\"/>\n\
             \x20   <testcase classname=\"connectivity\" name=\"policy/deny\" time=\"2.500\">\n\
             \x20     <failure message=\"node2 saw: a -&gt; b &quot;FORWARDED&quot; &amp; &lt;more&gt;\"/>\n\
             \x20   </testcase>\n\
             \x20   <testcase classname=\"connectivity\" name=\"pod-to-pod/cross-node\" time=\"0.000\">\n\
             \x20     <skipped message=\"one node runs an agent\"/>\n\
             \x20   </testcase>\n\
             \x20 </testsuite>\n\
             </testsuites>\n"
        );
        let text = report(&results);
        assert!(
            text.contains("pass       120ms  pod-to-pod/same-node"),
            "{text}"
        );
        assert!(
            text.contains(
                "skip         0ms  pod-to-pod/cross-node\n                 one node runs an agent"
            ),
            "{text}"
        );
        assert!(text.contains("1 of 2 tests passed, 1 skipped"), "{text}");
    }
}
