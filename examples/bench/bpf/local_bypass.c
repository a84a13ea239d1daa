// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// zmesh-bypassbench's probe: the sockmap/sk_msg "local bypass" that issue 17 lists as a
// lever for the pod <-> proxy legs. Not part of the product (see BENCHMARKS.md, "The
// local-leg bypass"): it is loaded only by the benchmark, into a cgroup of its own.
//
// sockops puts both ends of every TCP connection to or from `bypass_port` into a sockhash
// keyed by (local, remote) address; sk_msg, run on every sendmsg of those sockets, looks up
// the peer end by the reversed key and hands the bytes straight to its receive queue
// (BPF_F_INGRESS), so they never cross TCP, IP or the veth.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2

char LICENSE[] SEC("license") = "GPL";

// Set by the loader before the object is loaded.
volatile const __u32 bypass_port = 0;

struct leg_key {
	__u32 local_ip4;
	__u32 remote_ip4;
	__u32 local_port; // host order
	__u32 remote_port; // host order
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 4096);
	__type(key, struct leg_key);
	__type(value, __u32);
} zm_legs SEC(".maps");

SEC("sockops")
int zm_bypass_sockops(struct bpf_sock_ops *skops)
{
	struct leg_key key = {};

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != AF_INET)
		return 1;
	key.local_ip4 = skops->local_ip4;
	key.remote_ip4 = skops->remote_ip4;
	key.local_port = skops->local_port;
	// remote_port holds the network-order port in its upper half
	key.remote_port = bpf_ntohl(skops->remote_port);
	if (key.local_port != bypass_port && key.remote_port != bypass_port)
		return 1;
	bpf_sock_hash_update(skops, &zm_legs, &key, BPF_NOEXIST);
	return 1;
}

SEC("sk_msg")
int zm_bypass_msg(struct sk_msg_md *msg)
{
	struct leg_key peer = {};

	peer.local_ip4 = msg->remote_ip4;
	peer.remote_ip4 = msg->local_ip4;
	peer.local_port = bpf_ntohl(msg->remote_port);
	peer.remote_port = msg->local_port;
	// Without a peer end in the map the bytes take the normal TCP path.
	bpf_msg_redirect_hash(msg, &zm_legs, &peer, BPF_F_INGRESS);
	return SK_PASS;
}
