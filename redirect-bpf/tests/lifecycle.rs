//! Install / restart / upgrade / uninstall, and the loader's rejection paths. Root.

mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use common::*;
use zmesh_redirect::{
    current_netns_cookie, ProxyListeners, RedirectConfig, RedirectError, Redirector,
};

const WAIT: Duration = Duration::from_secs(5);

fn proxy() -> ProxyListeners {
    let mut p = ProxyListeners::new("10.77.0.1:15001".parse().unwrap());
    p.route_table = 1338;
    p.mark = 0x5391;
    p
}

fn listen(ns: &Netns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || TcpListener::bind(addr).unwrap())
}

fn connect(ns: &Netns, addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || TcpStream::connect_timeout(&addr, WAIT).unwrap())
}

/// Ids of the programs attached directly to the cgroup.
fn cgroup_prog_ids(cg: &Path) -> Vec<String> {
    let out = sh_out(&["bpftool", "-j", "cgroup", "show", cg.to_str().unwrap()]);
    out.split("\"id\":")
        .skip(1)
        .map(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Number of programs attached directly to the cgroup (any attach type).
fn cgroup_attachments(cg: &Path) -> usize {
    let out = sh_out(&["bpftool", "-j", "cgroup", "show", cg.to_str().unwrap()]);
    out.matches("\"attach_type\"").count()
}

fn tcx_ingress(ns: &Netns, ifname: &str) -> usize {
    let ifname = ifname.to_string();
    ns.run(move || {
        SchedClassifier::query_tcx(&ifname, TcAttachType::Ingress)
            .unwrap()
            .1
            .len()
    })
}

#[test]
fn pins_survive_restart_upgrade_swaps_in_place_and_uninstall_leaves_nothing() {
    let _s = serial();
    let node = Netns::new("n");
    let pod = Netns::new("p");
    let (node_if, _) = veth(&node, "10.77.0.1", &pod, "10.77.0.2");
    pod.exec(&["ip", "route", "add", "default", "via", "10.77.0.1"]);
    let cg = Cgroup::new();
    let pin_dir = Installed::pin_dir("l");
    let _inst = Installed {
        pin_dir: pin_dir.clone(),
        netns: node.name.clone(),
    };
    let config = RedirectConfig {
        pin_dir: pin_dir.clone(),
        cgroup: cg.path.clone(),
        ingress_interfaces: vec![node_if.clone()],
        proxy: proxy(),
    };
    let cookie = pod.run(|| current_netns_cookie().unwrap());
    let _in = cg.enter();
    let proxy_l = listen(&node, "10.77.0.1:15001");
    let direct = listen(&node, "10.77.0.1:80");

    let cfg = config.clone();
    let mut red = node.run(move || Redirector::load(&cfg)).expect("load");
    red.enroll_netns(cookie).unwrap();
    assert_eq!(
        cgroup_attachments(&cg.path),
        4,
        "connect4, connect6, sockops, getsockopt"
    );
    assert_eq!(tcx_ingress(&node, &node_if), 1);
    assert!(node.exec_out(&["ip", "rule"]).contains("lookup 1338"));
    assert!(node
        .exec_out(&["ip", "route", "show", "table", "1338"])
        .contains("local default dev lo"));

    // the agent goes away: redirection goes on
    drop(red);
    let _c = connect(&pod, "10.77.0.1:80");
    assert!(
        accept_within(&proxy_l, WAIT).is_some(),
        "still redirected after the handle dropped"
    );

    // a restarted agent re-opens the pins; enrollment is still there
    let mut red = Redirector::open_pinned(&pin_dir).expect("open_pinned");
    red.unenroll_netns(cookie).unwrap();
    let _c = connect(&pod, "10.77.0.1:80");
    assert!(accept_within(&direct, WAIT).is_some());
    red.enroll_netns(cookie).unwrap();
    drop(red);

    // load over an existing install: programs are swapped inside the pinned links,
    // maps (and so enrollment) are kept, nothing is attached twice
    let before = cgroup_prog_ids(&cg.path);
    let cfg = config.clone();
    let red = node.run(move || Redirector::load(&cfg)).expect("reload");
    assert_eq!(cgroup_attachments(&cg.path), 4);
    let after = cgroup_prog_ids(&cg.path);
    assert_eq!(before.len(), 4);
    assert!(
        before.iter().all(|id| !after.contains(id)),
        "new programs swapped in: {before:?} -> {after:?}"
    );
    assert_eq!(tcx_ingress(&node, &node_if), 1);
    let _c = connect(&pod, "10.77.0.1:80");
    assert!(
        accept_within(&proxy_l, WAIT).is_some(),
        "enrollment survived the reload"
    );
    assert!(!has_pending(&direct));
    drop(red);

    let pd = pin_dir.clone();
    node.run(move || Redirector::uninstall(&pd))
        .expect("uninstall");
    assert!(!pin_dir.exists(), "pin directory removed");
    assert_eq!(cgroup_attachments(&cg.path), 0, "no cgroup attachment left");
    assert_eq!(tcx_ingress(&node, &node_if), 0, "no tcx attachment left");
    assert!(
        !node.exec_out(&["ip", "rule"]).contains("lookup 1338"),
        "policy rule removed"
    );
    assert!(node
        .exec_out(&["ip", "route", "show", "table", "1338"])
        .trim()
        .is_empty());
    let _c = connect(&pod, "10.77.0.1:80");
    assert!(
        accept_within(&direct, WAIT).is_some(),
        "traffic is direct after uninstall"
    );
    assert!(!has_pending(&proxy_l));

    // and once more is an error, not a silent success
    let pd = pin_dir.clone();
    assert!(matches!(
        Redirector::uninstall(&pd),
        Err(RedirectError::NotInstalled(_))
    ));
    assert!(matches!(
        Redirector::open_pinned(&pd),
        Err(RedirectError::NotInstalled(_))
    ));
}

#[test]
fn load_rejects_bad_environment_and_configuration_without_leaving_anything() {
    let _s = serial();
    let cg = Cgroup::new();
    let good = |pin_dir: PathBuf| RedirectConfig {
        pin_dir,
        cgroup: cg.path.clone(),
        ingress_interfaces: vec![],
        proxy: proxy(),
    };

    let mut c = good(Installed::pin_dir("e"));
    c.cgroup = "/tmp".into();
    assert!(matches!(
        Redirector::load(&c),
        Err(RedirectError::NotCgroup2(_))
    ));
    assert!(!c.pin_dir.exists());

    let c = good(std::env::temp_dir().join(unique("notbpffs")));
    assert!(matches!(
        Redirector::load(&c),
        Err(RedirectError::PinDirNotBpffs(_))
    ));
    assert!(!c.pin_dir.exists(), "nothing created outside bpffs");

    for bad in [
        |p: &mut ProxyListeners| p.outbound = "0.0.0.0:15001".parse().unwrap(),
        |p: &mut ProxyListeners| p.outbound = "127.0.0.1:15001".parse().unwrap(),
        |p: &mut ProxyListeners| p.mark = 0,
        |p: &mut ProxyListeners| p.route_table = 254,
        |p: &mut ProxyListeners| p.inbound_plaintext_port = 0,
        |p: &mut ProxyListeners| p.other_ports = vec![1; 9],
    ] {
        let mut c = good(Installed::pin_dir("e"));
        bad(&mut c.proxy);
        assert!(
            matches!(Redirector::load(&c), Err(RedirectError::InvalidConfig(_))),
            "{:?}",
            c.proxy
        );
        assert!(!c.pin_dir.exists());
    }

    let mut c = good(Installed::pin_dir("e"));
    c.ingress_interfaces = vec!["bad/name".into()];
    assert!(matches!(
        Redirector::load(&c),
        Err(RedirectError::InvalidConfig(_))
    ));

    // an interface that does not exist fails the load and rolls the install back
    let mut c = good(Installed::pin_dir("e"));
    let _inst = Installed {
        pin_dir: c.pin_dir.clone(),
        netns: String::new(),
    };
    c.ingress_interfaces = vec![unique("nodev")];
    let err = Redirector::load(&c).expect_err("missing interface");
    assert!(matches!(err, RedirectError::Program { .. }), "{err}");
    assert!(!c.pin_dir.exists(), "failed first install is rolled back");
    assert_eq!(cgroup_attachments(&cg.path), 0);

    assert!(matches!(
        Redirector::open_pinned(Path::new("/sys/fs/bpf/zmesh-test/none")),
        Err(RedirectError::NotInstalled(_))
    ));
    assert!(matches!(
        Redirector::uninstall(Path::new("/tmp")),
        Err(RedirectError::NotInstalled(_))
    ));
}
