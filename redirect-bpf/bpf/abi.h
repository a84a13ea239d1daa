// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// What the eBPF programs (redirect.c) and userspace (src/abi.rs) share: map value and key
// layouts, flags and drop reasons. The one source of truth: build.rs compiles abi_layout.c
// against this header for the host and src/abi.rs checks every struct's size and field
// offsets, and takes every constant, from what it prints.

#ifndef ZMESH_ABI_H
#define ZMESH_ABI_H

#include <linux/types.h>

#define MAX_PROXY_PORTS 8

// zm_config.flags
#define CFG_ENABLED (1u << 0)
#define CFG_NODE_STRICT (1u << 1)
#define CFG_REJECT_RST (1u << 2)
#define CFG_IPV6 (1u << 3) // steer IPv6 too (listeners and policy route for it)

// zm_enrolled_ips value flags
#define POD_STRICT (1u << 0)

// drop reasons (index into zm_drops, reason in zm_events)
#define REASON_STRICT_PLAINTEXT 1
#define REASON_PROXY_UNAVAILABLE 2
#define REASON_FRAGMENT 3
#define REASON_MAX 8

struct zm_config {
	__u32 flags;
	__u32 outbound_ip4;     // network order
	__u32 outbound_ip6[4];  // network order; all zero: IPv6 is not redirected
	__u16 outbound_port;    // network order
	__u16 inbound_plain_port; // network order (15006)
	__u16 inbound_hbone_port; // network order (15008)
	__u16 pad0;
	__u32 inbound_ip4;      // listener address for the lookup, 0: packet's dst
	__u32 mark;             // set on steered packets, matched by the policy rule
	__u32 route_table;      // policy routing table, for uninstall
	__u16 proxy_ports[MAX_PROXY_PORTS]; // network order, 0: unused
};

// An address + port, IPv4 as v4-mapped IPv6 so both families share one key type.
struct zm_addr {
	__u32 addr[4];
	__u16 port;   // network order
	__u16 family; // AF_INET or AF_INET6 of the original destination
	__u32 pad;
};

struct zm_ip {
	__u32 addr[4]; // v4-mapped for IPv4
};

// zm_bridge_ports value: the bridge a port (a pod's host-side veth) belongs to, when
// both carry the tc program. Steered frames are handed to the bridge device, addressed
// to its MAC, instead of being switched to the pod.
struct zm_bridge_port {
	__u32 bridge_ifindex;
	__u8 bridge_mac[6];
	__u16 pad;
};

struct zm_drop_event {
	__u64 ts_ns; // CLOCK_MONOTONIC
	struct zm_ip src;
	struct zm_ip dst;
	__u16 sport;
	__u16 dport;
	__u32 reason;
};

#endif // ZMESH_ABI_H
