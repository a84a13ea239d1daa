//! The agent watches its proxy: when the proxy stops on its own, the agent must not carry on
//! as if it were serving (a node whose listener is gone encrypts nothing and accepts
//! nothing). Real CA, real agents; the failure is a real one, the kernel destroying the
//! proxy's outbound listener (`ss -K`, SOCK_DESTROY). Needs root.

mod support;

use std::time::Duration;

use support::lab;

#[tokio::test(flavor = "multi_thread")]
async fn agent_exits_non_zero_with_the_reason_when_its_proxy_fails() {
    let mut lab = lab(&[]).await;
    lab.wait_ready("node1", Duration::from_secs(60))
        .await
        .expect("node1's agent is ready");

    let node = lab.cluster().node("node1").expect("node1");
    let killed = node
        .command("ss")
        .expect("a command in node1's namespace")
        .args(["-K", "-l", "-t", "sport = :15001"])
        .output()
        .expect("ss runs");
    assert!(
        killed.status.success(),
        "ss -K: {}",
        String::from_utf8_lossy(&killed.stderr)
    );

    let status = lab
        .wait_agent_exit("node1", Duration::from_secs(60))
        .await
        .expect("the agent exits once its proxy failed");
    assert!(!status.success(), "the agent exited with {status}");
    let log = lab.agent_log("node1");
    assert!(
        log.contains("outbound listener") && log.contains("failed"),
        "the agent's log names the failed listener:\n{log}"
    );

    // The other node is untouched.
    lab.wait_ready("node2", Duration::from_secs(10))
        .await
        .expect("node2's agent still serves");
}
