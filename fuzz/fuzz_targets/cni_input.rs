//! What the zmesh CNI plugin reads from the container runtime, and what the plugin and the
//! agent read from each other: the network configuration on stdin (with `prevResult` and
//! its IPs), `CNI_ARGS`, and the protocol's request and reply lines (zmesh_cni::config,
//! zmesh_cni::env::parse_cni_args, zmesh_cni::protocol::read_message).
//!
//! Input: a selector byte, then the bytes of that input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh_cni::config::{result_ips, Config};
use zmesh_cni::env::parse_cni_args;
use zmesh_cni::protocol::{read_message, EnrolledNamespaces, Reply, Request};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            let _ = Config::version_of(input);
            if let Ok(config) = Config::parse(input) {
                let _ = config.add_result();
                let _ = config.del_timeout();
                if let Ok(prev) = config.require_prev_result() {
                    let _ = result_ips(prev);
                }
            }
        }
        1 => {
            if let Ok(args) = std::str::from_utf8(input) {
                let _ = parse_cni_args(args);
            }
        }
        2 => {
            let _ = read_message::<Request, _>(input);
        }
        _ => {
            let _ = read_message::<Reply, _>(input);
            let _ = read_message::<EnrolledNamespaces, _>(input);
        }
    }
});
