//! ZDS (zmesh_compat::zds): what the agent's ZDS server reads from a connecting ztunnel,
//! its ZdsHello and the WorkloadResponse acks, over a real SOCK_SEQPACKET socket. The
//! decoding is private to the crate, so the target plays ztunnel against a ZdsServer
//! holding one workload: it sends the hello, then answers the snapshot's `add` and
//! `snapshot_sent` with the next packets of the input.
//!
//! Input: packets, each a length byte (bits 0-6; bit 7 attaches an fd as SCM_RIGHTS, which
//! the server must refuse and close) followed by that many bytes.
#![no_main]

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{
    self as sock, sockopt, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use zmesh_compat::zds::{WorkloadInfo, ZdsServer};

struct Env {
    rt: tokio::runtime::Runtime,
    server: ZdsServer,
    path: PathBuf,
}

static ENV: LazyLock<Env> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("zmesh-fuzz-zds")
        .tempdir()
        .unwrap()
        .keep();
    let path = dir.join("zds.sock");
    let server = rt
        .block_on(async { ZdsServer::bind_with_ack_timeout(&path, Duration::from_secs(5)) })
        .expect("bind the ZDS socket");
    // Our own network namespace stands in for a pod's.
    let netns = OwnedFd::from(File::open("/proc/self/ns/net").expect("open /proc/self/ns/net"));
    let info = WorkloadInfo {
        name: "web-1".into(),
        namespace: "default".into(),
        service_account: "web".into(),
    };
    rt.block_on(server.handle().add("uid-1", info, netns))
        .expect("add the workload");
    Env { rt, server, path }
});

/// The server's requests of one connection: the snapshot's `add`, then `snapshot_sent`.
const SERVER_REQUESTS: usize = 2;

fn packets(mut data: &[u8]) -> Vec<(bool, &[u8])> {
    let mut out = Vec::new();
    while let Some((&head, rest)) = data.split_first() {
        let len = usize::from(head & 0x7f).min(rest.len());
        out.push((head & 0x80 != 0, &rest[..len]));
        data = &rest[len..];
    }
    out
}

fn send(fd: RawFd, (with_fd, bytes): (bool, &[u8])) -> bool {
    let extra = with_fd.then(|| File::open("/dev/null").unwrap());
    let fds: Vec<RawFd> = extra.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    sock::sendmsg::<()>(fd, &[IoSlice::new(bytes)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None).is_ok()
}

/// One packet from the server; `None` once it closed the connection.
fn recv(fd: RawFd) -> Option<()> {
    let mut buf = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    // libFuzzer's timers interrupt blocking calls now and then: retry those.
    let received = loop {
        match sock::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    match received {
        Ok(msg) => {
            let mut fds = 0;
            for c in msg.cmsgs().expect("control messages") {
                if let sock::ControlMessageOwned::ScmRights(received) = c {
                    for fd in received {
                        fds += 1;
                        // SAFETY: SCM_RIGHTS just installed this fd for us alone.
                        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                    }
                }
            }
            (msg.bytes > 0 || fds > 0).then_some(())
        }
        Err(nix::errno::Errno::ECONNRESET) => None,
        Err(e) => panic!("the ZDS server neither answered nor hung up: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let env = &*ENV;
    let packets = packets(data);
    let Some((&hello, answers)) = packets.split_first() else {
        return;
    };
    let client = sock::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let timeout = nix::sys::time::TimeVal::new(20, 0);
    sock::setsockopt(&client, sockopt::ReceiveTimeout, &timeout).unwrap();
    sock::connect(client.as_raw_fd(), &UnixAddr::new(&env.path).unwrap()).unwrap();
    let fd = client.as_raw_fd();
    if send(fd, hello) {
        let mut answers = answers.iter();
        for _ in 0..SERVER_REQUESTS {
            if recv(fd).is_none() {
                break;
            }
            // Out of answers: hang up, as a ztunnel that dies mid-snapshot would.
            let Some(&answer) = answers.next() else { break };
            if !send(fd, answer) {
                break;
            }
        }
    }
    drop(client);
    // Wait until the server is done with the connection (it holds the state while it
    // handles the snapshot), so that inputs do not overlap.
    let status = env.rt.block_on(env.server.handle().status());
    assert_eq!(status.workloads, 1);
});
