// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// zmesh transparent redirection: kernel side.
//
// Outbound: cgroup connect4/connect6 rewrite the destination of TCP connects made
// by enrolled pods to the node proxy's outbound listener and remember the original
// destination; sockops re-keys it by the client's address once the source port is
// known; cgroup getsockopt answers SO_ORIGINAL_DST on the proxy's accepted socket.
//
// Inbound: a tc ingress program (attached through TCX, or as a cls_bpf filter under a
// clsact qdisc on kernels before 6.6) steers TCP to enrolled pod IPs into the proxy's
// listeners with bpf_sk_assign (TPROXY without iptables) and, in strict mode, drops
// plaintext SYNs and answers them with a TCP RST so the client fails at once. Every
// drop is counted per reason and reported on a ring buffer. IPv6 is steered the same way
// when the agent enables it (CFG_IPV6); otherwise strict mode drops (and resets) every
// IPv6 SYN to an enrolled pod and permissive mode lets IPv6 pass to the pod unsteered.
//
// Every struct and constant shared with userspace is in abi.h; src/abi.rs mirrors the
// structs and the build checks their layout against it (build.rs, abi_layout.c).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80

#define MAX_CGROUP_LEVELS 16
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct zm_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_enrolled_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_enrolled_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_excluded_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_excluded_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct zm_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_orig_by_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct zm_addr);
	__type(value, struct zm_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_orig_by_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct zm_ip);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_enrolled_ips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct zm_ip);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_mesh_sources SEC(".maps");

// ifindex of a bridge port -> its bridge (see struct zm_bridge_port); filled by the
// loader for the attached interfaces.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct zm_bridge_port);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_bridge_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_events SEC(".maps");

static __always_inline struct zm_config *config(void)
{
	__u32 zero = 0;
	struct zm_config *cfg = bpf_map_lookup_elem(&zm_config, &zero);

	if (!cfg || !(cfg->flags & CFG_ENABLED))
		return 0;
	return cfg;
}

static __always_inline void v4_mapped(__u32 *out, __u32 ip4)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0xffff);
	out[3] = ip4;
}

static __always_inline int cgroup_ancestor_in(void *map)
{
	for (int level = 0; level < MAX_CGROUP_LEVELS; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (!id)
			break;
		if (bpf_map_lookup_elem(map, &id))
			return 1;
	}
	return 0;
}

// Proxy sockets and anything the agent excluded are never redirected: checked first.
static __always_inline int excluded(struct bpf_sock_addr *ctx)
{
	__u64 netns = bpf_get_netns_cookie(ctx);

	if (bpf_map_lookup_elem(&zm_excluded_netns, &netns))
		return 1;
	return cgroup_ancestor_in(&zm_excluded_cgroups);
}

static __always_inline int enrolled(struct bpf_sock_addr *ctx)
{
	__u64 netns = bpf_get_netns_cookie(ctx);

	if (bpf_map_lookup_elem(&zm_enrolled_netns, &netns))
		return 1;
	return cgroup_ancestor_in(&zm_enrolled_cgroups);
}

static __always_inline int is_proxy_port(struct zm_config *cfg, __u16 port)
{
	if (port == cfg->outbound_port || port == cfg->inbound_plain_port ||
	    port == cfg->inbound_hbone_port)
		return 1;
#pragma unroll
	for (int i = 0; i < MAX_PROXY_PORTS; i++) {
		if (cfg->proxy_ports[i] && cfg->proxy_ports[i] == port)
			return 1;
	}
	return 0;
}

static __always_inline int tcp_socket(struct bpf_sock_addr *ctx)
{
	return ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP;
}

static __always_inline void remember(struct bpf_sock_addr *ctx, struct zm_addr *orig)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	bpf_map_update_elem(&zm_orig_by_cookie, &cookie, orig, BPF_ANY);
}

SEC("cgroup/connect4")
int zm_connect4(struct bpf_sock_addr *ctx)
{
	struct zm_config *cfg;
	struct zm_addr orig = {};
	__u32 dst;
	__u16 port;

	if (!tcp_socket(ctx))
		return 1;
	cfg = config();
	if (!cfg)
		return 1;
	dst = ctx->user_ip4;
	port = (__u16)ctx->user_port;
	if ((bpf_ntohl(dst) >> 24) == 127)
		return 1;
	if (is_proxy_port(cfg, port))
		return 1;
	if (excluded(ctx) || !enrolled(ctx))
		return 1;

	v4_mapped(orig.addr, dst);
	orig.port = port;
	orig.family = AF_INET;
	remember(ctx, &orig);

	// Volatile: two adjacent context stores must not be fused into one 8-byte store.
	*(volatile __u32 *)&ctx->user_ip4 = cfg->outbound_ip4;
	*(volatile __u32 *)&ctx->user_port = (__u32)cfg->outbound_port;
	return 1;
}

SEC("cgroup/connect6")
int zm_connect6(struct bpf_sock_addr *ctx)
{
	struct zm_config *cfg;
	struct zm_addr orig = {};
	__u32 a0, a1, a2, a3;
	__u16 port;
	int mapped;

	if (!tcp_socket(ctx))
		return 1;
	cfg = config();
	if (!cfg)
		return 1;
	a0 = ctx->user_ip6[0];
	a1 = ctx->user_ip6[1];
	a2 = ctx->user_ip6[2];
	a3 = ctx->user_ip6[3];
	port = (__u16)ctx->user_port;
	mapped = a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff);
	if (mapped && (bpf_ntohl(a3) >> 24) == 127)
		return 1;
	if (!mapped && a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1))
		return 1;
	if (!mapped && !(cfg->outbound_ip6[0] | cfg->outbound_ip6[1] |
			 cfg->outbound_ip6[2] | cfg->outbound_ip6[3]))
		return 1;
	if (is_proxy_port(cfg, port))
		return 1;
	if (excluded(ctx) || !enrolled(ctx))
		return 1;

	orig.addr[0] = a0;
	orig.addr[1] = a1;
	orig.addr[2] = a2;
	orig.addr[3] = a3;
	orig.port = port;
	orig.family = mapped ? AF_INET : AF_INET6;
	remember(ctx, &orig);

	if (mapped) {
		*(volatile __u32 *)&ctx->user_ip6[0] = 0;
		*(volatile __u32 *)&ctx->user_ip6[1] = 0;
		*(volatile __u32 *)&ctx->user_ip6[2] = bpf_htonl(0xffff);
		*(volatile __u32 *)&ctx->user_ip6[3] = cfg->outbound_ip4;
	} else {
		*(volatile __u32 *)&ctx->user_ip6[0] = cfg->outbound_ip6[0];
		*(volatile __u32 *)&ctx->user_ip6[1] = cfg->outbound_ip6[1];
		*(volatile __u32 *)&ctx->user_ip6[2] = cfg->outbound_ip6[2];
		*(volatile __u32 *)&ctx->user_ip6[3] = cfg->outbound_ip6[3];
	}
	*(volatile __u32 *)&ctx->user_port = (__u32)cfg->outbound_port;
	return 1;
}

// Once connect() picked the source port, re-key the original destination by the
// client's (ip, port): that is what the proxy sees as the peer of the accepted socket.
SEC("sockops")
int zm_sockops(struct bpf_sock_ops *skops)
{
	struct zm_addr peer = {};
	struct zm_addr *orig;
	volatile __u32 family, ip4, ip6[4];
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	orig = bpf_map_lookup_elem(&zm_orig_by_cookie, &cookie);
	if (!orig)
		return 1;

	// Load every field from its fixed offset first: clang otherwise turns the branch
	// into arithmetic on the context pointer, which the verifier rejects.
	family = skops->family;
	ip4 = skops->local_ip4;
	ip6[0] = skops->local_ip6[0];
	ip6[1] = skops->local_ip6[1];
	ip6[2] = skops->local_ip6[2];
	ip6[3] = skops->local_ip6[3];
	if (family == AF_INET) {
		v4_mapped(peer.addr, ip4);
	} else {
		peer.addr[0] = ip6[0];
		peer.addr[1] = ip6[1];
		peer.addr[2] = ip6[2];
		peer.addr[3] = ip6[3];
	}
	peer.port = bpf_htons((__u16)skops->local_port);
	peer.family = 0;
	bpf_map_update_elem(&zm_orig_by_peer, &peer, orig, BPF_ANY);
	bpf_map_delete_elem(&zm_orig_by_cookie, &cookie);
	return 1;
}

struct sockaddr_in_abi {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

struct sockaddr_in6_abi {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

// getsockopt(SOL_IP, SO_ORIGINAL_DST) / (SOL_IPV6, IP6T_SO_ORIGINAL_DST) on the
// proxy's accepted socket: answer from the map, keyed by the socket's peer.
SEC("cgroup/getsockopt")
int zm_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct zm_addr peer = {};
	struct zm_addr *orig;
	void *optval = ctx->optval;
	void *optval_end = ctx->optval_end;

	if (ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (ctx->level != SOL_IP && ctx->level != SOL_IPV6)
		return 1;
	if (!sk)
		return 1;

	if (sk->family == AF_INET) {
		v4_mapped(peer.addr, sk->dst_ip4);
	} else if (sk->family == AF_INET6) {
		peer.addr[0] = sk->dst_ip6[0];
		peer.addr[1] = sk->dst_ip6[1];
		peer.addr[2] = sk->dst_ip6[2];
		peer.addr[3] = sk->dst_ip6[3];
	} else {
		return 1;
	}
	peer.port = (__u16)sk->dst_port;
	orig = bpf_map_lookup_elem(&zm_orig_by_peer, &peer);
	if (!orig)
		return 1;

	if (ctx->level == SOL_IP) {
		struct sockaddr_in_abi *sin = optval;

		if (orig->family != AF_INET)
			return 1;
		if ((void *)(sin + 1) > optval_end)
			return 1;
		sin->family = AF_INET;
		sin->port = orig->port;
		sin->addr = orig->addr[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6_abi *sin6 = optval;

		if ((void *)(sin6 + 1) > optval_end)
			return 1;
		sin6->family = AF_INET6;
		sin6->port = orig->port;
		sin6->flowinfo = 0;
		sin6->addr[0] = orig->addr[0];
		sin6->addr[1] = orig->addr[1];
		sin6->addr[2] = orig->addr[2];
		sin6->addr[3] = orig->addr[3];
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	bpf_map_delete_elem(&zm_orig_by_peer, &peer);
	return 1;
}

// ---------------------------------------------------------------- tc ingress

static __always_inline void count_drop(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&zm_drops, &reason);

	if (n)
		*n += 1;
}

// src and dst: on the stack (already copied out of the packet), IPv4 v4-mapped.
static __always_inline void report_drop_ip(__u32 reason, const struct zm_ip *src,
					   const struct zm_ip *dst, __u16 sport, __u16 dport)
{
	struct zm_drop_event *ev;

	count_drop(reason);
	ev = bpf_ringbuf_reserve(&zm_events, sizeof(*ev), 0);
	if (!ev)
		return;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->src = *src;
	ev->dst = *dst;
	ev->sport = sport;
	ev->dport = dport;
	ev->reason = reason;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline void report_drop(__u32 reason, __u32 saddr, __u32 daddr,
					__u16 sport, __u16 dport)
{
	struct zm_ip src, dst;

	v4_mapped(src.addr, saddr);
	v4_mapped(dst.addr, daddr);
	report_drop_ip(reason, &src, &dst, sport, dport);
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

static __always_inline __u32 csum_add16(__u32 sum, const void *data, int words)
{
	const __u16 *w = data;

#pragma unroll
	for (int i = 0; i < 10; i++) {
		if (i < words)
			sum += w[i];
	}
	return sum;
}

struct rst_l3 {
	struct ethhdr eth;
	struct iphdr ip;
} __attribute__((packed));

// Turn the SYN into a RST|ACK to its sender and send it back out of the interface it
// came in on: the client's connect() fails at once with ECONNREFUSED. IP options are
// overwritten with NOPs but keep their length, so the TCP header stays where the
// skb's checksum metadata (CHECKSUM_PARTIAL on veth) expects it.
//
// Every bpf_skb_store_bytes() call has a constant length: the options are written 4
// bytes at a time (their length is a multiple of 4), so no verifier has to follow a
// variable length through a register spill (the 5.15 and 6.1 verifiers re-read it from
// the stack and lose its bounds), and the word count is a register value checked
// against a constant bound in every iteration.
static __always_inline int reject_with_rst(struct __sk_buff *skb, struct ethhdr *eth,
					   __u32 ihl_len, __u32 saddr, __u32 daddr,
					   __u16 sport, __u16 dport, __u32 seq, __u64 back)
{
	const __u32 nop4 = 0x01010101;
	struct rst_l3 l3 = {};
	struct tcphdr tcp = {};
	__u32 opt_words, sum;
	long err = 0;

	if (ihl_len < sizeof(struct iphdr) || ihl_len > 60)
		return TC_ACT_SHOT;
	opt_words = (ihl_len - sizeof(struct iphdr)) / 4; // 0..10

	__builtin_memcpy(l3.eth.h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(l3.eth.h_source, eth->h_dest, ETH_ALEN);
	l3.eth.h_proto = bpf_htons(ETH_P_IP);

	l3.ip.version = 4;
	l3.ip.ihl = 5 + opt_words;
	l3.ip.tot_len = bpf_htons(sizeof(struct iphdr) + opt_words * 4 + sizeof(struct tcphdr));
	l3.ip.frag_off = bpf_htons(0x4000);
	l3.ip.ttl = 64;
	l3.ip.protocol = IPPROTO_TCP;
	l3.ip.saddr = daddr;
	l3.ip.daddr = saddr;
	sum = csum_add16(0, &l3.ip, 10) + opt_words * 2 * 0x0101;
	l3.ip.check = csum_fold(sum);

	tcp.source = dport;
	tcp.dest = sport;
	tcp.seq = 0;
	tcp.ack_seq = bpf_htonl(bpf_ntohl(seq) + 1);
	tcp.doff = 5;
	tcp.rst = 1;
	tcp.ack = 1;
	// pseudo header: saddr, daddr, zero/protocol, TCP length
	sum = (daddr & 0xffff) + (daddr >> 16) + (saddr & 0xffff) + (saddr >> 16);
	sum += bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(struct tcphdr));
	tcp.check = csum_fold(csum_add16(sum, &tcp, 10));

	if (bpf_skb_change_tail(skb, sizeof(l3) + opt_words * 4 + sizeof(tcp), 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, &l3, sizeof(l3), 0))
		return TC_ACT_SHOT;
#pragma unroll
	for (__u32 i = 0; i < 10; i++) {
		if (i < opt_words)
			err |= bpf_skb_store_bytes(skb, sizeof(l3) + i * 4, &nop4, sizeof(nop4), 0);
	}
	if (err)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, sizeof(l3) + opt_words * 4, &tcp, sizeof(tcp), 0))
		return TC_ACT_SHOT;
	skb->mark = 0;
	return bpf_redirect(skb->ifindex, back);
}

struct rst6_l3 {
	struct ethhdr eth;
	struct ipv6hdr ip6;
} __attribute__((packed));

// IPv6 twin of reject_with_rst, for a SYN whose TCP header follows the fixed IPv6
// header directly (no extension headers), so the TCP header stays where it was.
// src/dst: the SYN's addresses, copied to the stack by the caller.
static __always_inline int reject_with_rst6(struct __sk_buff *skb, struct ethhdr *eth,
					    const struct zm_ip *src, const struct zm_ip *dst,
					    __u16 sport, __u16 dport, __u32 seq, __u64 back)
{
	struct rst6_l3 l3 = {};
	struct tcphdr tcp = {};
	__u32 sum = 0;

	__builtin_memcpy(l3.eth.h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(l3.eth.h_source, eth->h_dest, ETH_ALEN);
	l3.eth.h_proto = bpf_htons(ETH_P_IPV6);

	l3.ip6.version = 6;
	l3.ip6.payload_len = bpf_htons(sizeof(struct tcphdr));
	l3.ip6.nexthdr = IPPROTO_TCP;
	l3.ip6.hop_limit = 64;
	__builtin_memcpy(&l3.ip6.saddr, dst->addr, 16);
	__builtin_memcpy(&l3.ip6.daddr, src->addr, 16);

	tcp.source = dport;
	tcp.dest = sport;
	tcp.seq = 0;
	tcp.ack_seq = bpf_htonl(bpf_ntohl(seq) + 1);
	tcp.doff = 5;
	tcp.rst = 1;
	tcp.ack = 1;
	// pseudo header: saddr, daddr, upper-layer length, next header
#pragma unroll
	for (int i = 0; i < 4; i++) {
		sum += (src->addr[i] & 0xffff) + (src->addr[i] >> 16);
		sum += (dst->addr[i] & 0xffff) + (dst->addr[i] >> 16);
	}
	sum += bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(struct tcphdr));
	tcp.check = csum_fold(csum_add16(sum, &tcp, 10));

	if (bpf_skb_change_tail(skb, sizeof(l3) + sizeof(tcp), 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, &l3, sizeof(l3), 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, sizeof(l3), &tcp, sizeof(tcp), 0))
		return TC_ACT_SHOT;
	skb->mark = 0;
	return bpf_redirect(skb->ifindex, back);
}

// The bridge whose port this frame came in on, if the loader recorded one.
static __always_inline struct zm_bridge_port *bridge_port(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ingress_ifindex;

	return bpf_map_lookup_elem(&zm_bridge_ports, &ifindex);
}

// On a bridge port (a pod's host-side veth), a frame from a pod on the same bridge is
// switched straight to the destination pod's port: neither the node's IP stack nor a
// socket assigned here would ever see it, so plaintext would bypass the proxy (and
// policy). Hand it to the bridge device instead, addressed to the bridge's own MAC: the
// stack takes it as the node's, and the program attached there steers it.
static __always_inline int to_bridge(struct __sk_buff *skb, struct zm_bridge_port *port)
{
	__u32 bridge = port->bridge_ifindex;
	__u8 mac[ETH_ALEN];

	__builtin_memcpy(mac, port->bridge_mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0 /* h_dest */, mac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	return bpf_redirect(bridge, BPF_F_INGRESS);
}

#define IP6_MAX_EXT_HDRS 4

static __always_inline int ip6_ext_hdr(__u8 nexthdr)
{
	return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	       nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT ||
	       nexthdr == IPPROTO_AH;
}

// The IPv6 twins of assign_listener and assign_existing (below): src/dst on the stack.
static __always_inline int assign_listener6(struct __sk_buff *skb, const struct zm_ip *src,
					    const struct zm_ip *dst, __u16 sport, __u16 port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	long err;

	__builtin_memcpy(t.ipv6.saddr, src->addr, 16);
	__builtin_memcpy(t.ipv6.daddr, dst->addr, 16);
	t.ipv6.sport = sport;
	t.ipv6.dport = port;
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -1;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return err ? -1 : 0;
}

static __always_inline int assign_existing6(struct __sk_buff *skb, const struct zm_ip *src,
					    const struct zm_ip *dst, __u16 sport, __u16 dport,
					    int assign)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;

	__builtin_memcpy(t.ipv6.saddr, src->addr, 16);
	__builtin_memcpy(t.ipv6.daddr, dst->addr, 16);
	t.ipv6.sport = sport;
	t.ipv6.dport = dport;
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	if (sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -1;
	}
	if (assign)
		bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return 0;
}

// IPv6 to an enrolled pod: steered like IPv4 (zm_tc_ingress) when the agent enabled it
// (CFG_IPV6: its proxy listens on IPv6 and the IPv6 policy route is in place). Without
// it, permissive mode lets IPv6 pass to the pod unsteered and strict mode drops every TCP
// SYN to the pod (answering it with a RST when it can), whatever the port and source:
// nothing would take it into the proxy, so a mesh source or an HBONE SYN would otherwise
// reach the pod in plaintext. Every field is read from the packet once, after its bounds
// check; the copies on the stack are what is used afterwards.
static __always_inline int ingress_ipv6(struct __sk_buff *skb, struct ethhdr *eth,
					void *data_end)
{
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct zm_config *cfg;
	struct zm_bridge_port *port;
	struct zm_ip src, dst;
	struct tcphdr *tcp;
	__u32 *pod_flags;
	__u32 off = sizeof(*ip6), seq;
	__u16 sport, dport;
	__u8 nexthdr, flags;
	int strict, steer;

	if ((void *)(ip6 + 1) > data_end)
		return TC_ACT_OK;
	if (ip6->version != 6)
		return TC_ACT_OK;
	nexthdr = ip6->nexthdr;
	if (nexthdr != IPPROTO_TCP && !ip6_ext_hdr(nexthdr))
		return TC_ACT_OK; // ICMPv6 (neighbour discovery), UDP, ...
	cfg = config();
	if (!cfg)
		return TC_ACT_OK;
	if (cfg->mark && (skb->mark & cfg->mark) == cfg->mark)
		return TC_ACT_OK;

	__builtin_memcpy(src.addr, &ip6->saddr, 16);
	__builtin_memcpy(dst.addr, &ip6->daddr, 16);
	pod_flags = bpf_map_lookup_elem(&zm_enrolled_ips, &dst);
	if (!pod_flags)
		return TC_ACT_OK;
	strict = (*pod_flags & POD_STRICT) || (cfg->flags & CFG_NODE_STRICT);
	steer = cfg->flags & CFG_IPV6;
	if (!strict && !steer)
		return TC_ACT_OK; // permissive, IPv6 not steered: plaintext passes

	// Walk a bounded number of extension headers to the TCP header.
#pragma unroll
	for (int i = 0; i < IP6_MAX_EXT_HDRS; i++) {
		__u8 *h;

		if (nexthdr == IPPROTO_TCP)
			break;
		if (!ip6_ext_hdr(nexthdr))
			return TC_ACT_OK; // not TCP
		h = (void *)ip6 + off;
		if ((void *)(h + 8) > data_end)
			return TC_ACT_OK; // truncated: the pod's stack drops it too
		if (nexthdr == IPPROTO_FRAGMENT) {
			__u16 frag = *(__u16 *)(h + 2);

			nexthdr = h[0];
			// offset or more-fragments set: only the first fragment has ports
			if ((frag & bpf_htons(0xfff9)) &&
			    (nexthdr == IPPROTO_TCP || ip6_ext_hdr(nexthdr))) {
				if (!strict)
					return TC_ACT_OK;
				report_drop_ip(REASON_FRAGMENT, &src, &dst, 0, 0);
				return TC_ACT_SHOT;
			}
			off += 8;
		} else if (nexthdr == IPPROTO_AH) {
			nexthdr = h[0];
			off += ((__u32)h[1] + 2) * 4;
		} else {
			nexthdr = h[0];
			off += ((__u32)h[1] + 1) * 8;
		}
	}
	if (nexthdr != IPPROTO_TCP) {
		// more extension headers than we walk: refuse rather than guess
		if (!strict)
			return TC_ACT_OK;
		report_drop_ip(REASON_STRICT_PLAINTEXT, &src, &dst, 0, 0);
		return TC_ACT_SHOT;
	}

	tcp = (void *)ip6 + off;
	if ((void *)(tcp + 1) > data_end)
		return TC_ACT_OK;
	sport = tcp->source;
	dport = tcp->dest;
	seq = tcp->seq;
	flags = ((__u8 *)tcp)[13];
	port = bridge_port(skb);
	if (!(flags & TCP_FLAG_SYN) || (flags & TCP_FLAG_ACK)) {
		if (steer && assign_existing6(skb, &src, &dst, sport, dport, !port) == 0) {
			if (port)
				return to_bridge(skb, port);
			skb->mark = cfg->mark;
		}
		return TC_ACT_OK;
	}

	if (steer && dport == cfg->inbound_hbone_port) {
		if (port)
			return to_bridge(skb, port);
		if (assign_listener6(skb, &src, &dst, sport, cfg->inbound_hbone_port)) {
			report_drop_ip(REASON_PROXY_UNAVAILABLE, &src, &dst, sport, dport);
			return TC_ACT_SHOT;
		}
		skb->mark = cfg->mark;
		return TC_ACT_OK;
	}

	if (strict && (!steer || !bpf_map_lookup_elem(&zm_mesh_sources, &src))) {
		report_drop_ip(REASON_STRICT_PLAINTEXT, &src, &dst, sport, dport);
		if ((cfg->flags & CFG_REJECT_RST) && off == sizeof(*ip6))
			return reject_with_rst6(skb, eth, &src, &dst, sport, dport, seq, 0);
		return TC_ACT_SHOT;
	}

	if (port)
		return to_bridge(skb, port);
	if (assign_listener6(skb, &src, &dst, sport, cfg->inbound_plain_port)) {
		report_drop_ip(REASON_PROXY_UNAVAILABLE, &src, &dst, sport, dport);
		return TC_ACT_SHOT;
	}
	skb->mark = cfg->mark;
	return TC_ACT_OK;
}

static __always_inline int assign_listener(struct __sk_buff *skb, struct zm_config *cfg,
					   __u32 saddr, __u32 daddr, __u16 sport,
					   __u16 port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	long err;

	t.ipv4.saddr = saddr;
	t.ipv4.sport = sport;
	t.ipv4.daddr = cfg->inbound_ip4 ? cfg->inbound_ip4 : daddr;
	t.ipv4.dport = port;
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -1;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return err ? -1 : 0;
}

// An existing proxy socket for this 4-tuple (handshake in progress, established,
// or the proxy's own transparent connection) takes the packet.
// With !assign, only says whether there is one (the frame goes to the bridge first).
static __always_inline int assign_existing(struct __sk_buff *skb, __u32 saddr, __u32 daddr,
					   __u16 sport, __u16 dport, int assign)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	long err = 0;

	t.ipv4.saddr = saddr;
	t.ipv4.sport = sport;
	t.ipv4.daddr = daddr;
	t.ipv4.dport = dport;
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	if (sk->state == BPF_TCP_LISTEN) {
		// only a wildcard listener of the node matched: not ours
		bpf_sk_release(sk);
		return -1;
	}
	if (assign)
		err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	// a time-wait socket cannot be assigned; local delivery (mark) still finds it
	(void)err;
	return 0;
}

SEC("classifier")
int zm_tc_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct zm_config *cfg;
	struct zm_bridge_port *port;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct tcphdr *tcp;
	struct zm_ip key = {};
	__u32 *pod_flags;
	__u32 saddr, daddr, ihl_len, seq;
	__u16 sport, dport;
	__u8 flags;
	int strict, syn;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return ingress_ipv6(skb, eth, data_end);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (ip->version != 4 || ip->protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	cfg = config();
	if (!cfg)
		return TC_ACT_OK;
	if (cfg->mark && (skb->mark & cfg->mark) == cfg->mark)
		return TC_ACT_OK; // already steered, or the proxy's own marked traffic

	saddr = ip->saddr;
	daddr = ip->daddr;
	v4_mapped(key.addr, daddr);
	pod_flags = bpf_map_lookup_elem(&zm_enrolled_ips, &key);
	if (!pod_flags)
		return TC_ACT_OK;
	strict = (*pod_flags & POD_STRICT) || (cfg->flags & CFG_NODE_STRICT);

	// Fragments: only the first one has ports. Strict mode refuses to guess.
	if (ip->frag_off & bpf_htons(0x3fff)) {
		if (strict) {
			report_drop(REASON_FRAGMENT, saddr, daddr, 0, 0);
			return TC_ACT_SHOT;
		}
		return TC_ACT_OK;
	}

	ihl_len = ip->ihl * 4;
	if (ihl_len < sizeof(*ip) || ihl_len > 60)
		return TC_ACT_OK;
	tcp = (void *)ip + ihl_len;
	if ((void *)(tcp + 1) > data_end)
		return TC_ACT_OK;
	sport = tcp->source;
	dport = tcp->dest;
	seq = tcp->seq;
	flags = ((__u8 *)tcp)[13];
	syn = (flags & TCP_FLAG_SYN) && !(flags & TCP_FLAG_ACK);

	port = bridge_port(skb);
	if (!syn) {
		if (assign_existing(skb, saddr, daddr, sport, dport, !port) == 0) {
			if (port)
				return to_bridge(skb, port);
			skb->mark = cfg->mark;
		}
		// no proxy socket: a flow the proxy does not own; let the pod answer it
		return TC_ACT_OK;
	}

	if (dport == cfg->inbound_hbone_port) {
		if (port)
			return to_bridge(skb, port);
		if (assign_listener(skb, cfg, saddr, daddr, sport, cfg->inbound_hbone_port)) {
			report_drop(REASON_PROXY_UNAVAILABLE, saddr, daddr, sport, dport);
			return TC_ACT_SHOT;
		}
		skb->mark = cfg->mark;
		return TC_ACT_OK;
	}

	if (strict) {
		struct zm_ip src = {};

		v4_mapped(src.addr, saddr);
		if (!bpf_map_lookup_elem(&zm_mesh_sources, &src)) {
			report_drop(REASON_STRICT_PLAINTEXT, saddr, daddr, sport, dport);
			if (cfg->flags & CFG_REJECT_RST)
				return reject_with_rst(skb, eth, ihl_len, saddr, daddr, sport,
						       dport, seq, 0);
			return TC_ACT_SHOT;
		}
	}

	if (port)
		return to_bridge(skb, port);
	if (assign_listener(skb, cfg, saddr, daddr, sport, cfg->inbound_plain_port)) {
		report_drop(REASON_PROXY_UNAVAILABLE, saddr, daddr, sport, dport);
		return TC_ACT_SHOT;
	}
	skb->mark = cfg->mark;
	return TC_ACT_OK;
}

// tc egress on the same interfaces: the last hop into a local pod. In strict mode a SYN
// to an enrolled pod that the node forwards rather than sends from one of its own sockets
// (the proxy, kubelet's probes) went around tc ingress: plaintext to a Service VIP that
// kube-proxy translated after ingress, from a pod on this node or through a NodePort. It
// is refused as at ingress; the RST is handed to the node as if the pod had sent it, so
// conntrack translates it back for the client. Permissive mode lets it pass.
SEC("classifier")
int zm_tc_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct zm_config *cfg;
	struct zm_ip src = {}, dst = {};
	struct tcphdr *tcp;
	__u32 *pod_flags;
	__u32 ihl_len = 0, seq;
	__u16 sport, dport;
	__u8 flags;
	int ipv6 = 0;

	if (skb->sk)
		return TC_ACT_OK; // sent by a socket of the node
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
			return TC_ACT_OK;
		if (ip->frag_off & bpf_htons(0x1fff))
			return TC_ACT_OK; // a later fragment: no TCP header
		ihl_len = ip->ihl * 4;
		if (ihl_len < sizeof(*ip) || ihl_len > 60)
			return TC_ACT_OK;
		tcp = (void *)ip + ihl_len;
		v4_mapped(src.addr, ip->saddr);
		v4_mapped(dst.addr, ip->daddr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		__builtin_memcpy(src.addr, &ip6->saddr, 16);
		__builtin_memcpy(dst.addr, &ip6->daddr, 16);
		if (ip6->nexthdr != IPPROTO_TCP) {
			// extension headers could hide a SYN: strict mode refuses them as at ingress
			if (!ip6_ext_hdr(ip6->nexthdr))
				return TC_ACT_OK;
			pod_flags = bpf_map_lookup_elem(&zm_enrolled_ips, &dst);
			cfg = config();
			if (!pod_flags || !cfg ||
			    !((*pod_flags & POD_STRICT) || (cfg->flags & CFG_NODE_STRICT)))
				return TC_ACT_OK;
			report_drop_ip(REASON_STRICT_PLAINTEXT, &src, &dst, 0, 0);
			return TC_ACT_SHOT;
		}
		tcp = (void *)(ip6 + 1);
		ipv6 = 1;
	} else {
		return TC_ACT_OK;
	}
	if ((void *)(tcp + 1) > data_end)
		return TC_ACT_OK;
	flags = ((__u8 *)tcp)[13];
	if (!(flags & TCP_FLAG_SYN) || (flags & TCP_FLAG_ACK))
		return TC_ACT_OK;
	pod_flags = bpf_map_lookup_elem(&zm_enrolled_ips, &dst);
	if (!pod_flags)
		return TC_ACT_OK;
	cfg = config();
	if (!cfg || !((*pod_flags & POD_STRICT) || (cfg->flags & CFG_NODE_STRICT)))
		return TC_ACT_OK;
	sport = tcp->source;
	dport = tcp->dest;
	seq = tcp->seq;
	report_drop_ip(REASON_STRICT_PLAINTEXT, &src, &dst, sport, dport);
	if (!(cfg->flags & CFG_REJECT_RST))
		return TC_ACT_SHOT;
	if (ipv6)
		return reject_with_rst6(skb, eth, &src, &dst, sport, dport, seq, BPF_F_INGRESS);
	return reject_with_rst(skb, eth, ihl_len, src.addr[3], dst.addr[3], sport, dport, seq,
			       BPF_F_INGRESS);
}
