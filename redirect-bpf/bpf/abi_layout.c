// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// Built and run for the host by build.rs: prints abi.h's layouts and constants as Rust
// constants, which src/abi.rs checks its mirrors against at compile time. The BPF target
// lays these structs out as the host does (fixed-width types, natural alignment).

#include <stddef.h>
#include <stdio.h>

#include "abi.h"

#define SIZE(s) printf("pub const %s__SIZE: usize = %zu;\n", #s, sizeof(struct s))
#define FIELD(s, f) printf("pub const %s__%s: usize = %zu;\n", #s, #f, offsetof(struct s, f))
#define U32(c) printf("pub const %s: u32 = %u;\n", #c, (unsigned)(c))
#define USIZE(c) printf("pub const %s: usize = %u;\n", #c, (unsigned)(c))

int main(void) {
	SIZE(zm_config);
	FIELD(zm_config, flags);
	FIELD(zm_config, outbound_ip4);
	FIELD(zm_config, outbound_ip6);
	FIELD(zm_config, outbound_port);
	FIELD(zm_config, inbound_plain_port);
	FIELD(zm_config, inbound_hbone_port);
	FIELD(zm_config, pad0);
	FIELD(zm_config, inbound_ip4);
	FIELD(zm_config, mark);
	FIELD(zm_config, route_table);
	FIELD(zm_config, proxy_ports);

	SIZE(zm_addr);
	FIELD(zm_addr, addr);
	FIELD(zm_addr, port);
	FIELD(zm_addr, family);
	FIELD(zm_addr, pad);

	SIZE(zm_ip);
	FIELD(zm_ip, addr);

	SIZE(zm_bridge_port);
	FIELD(zm_bridge_port, bridge_ifindex);
	FIELD(zm_bridge_port, bridge_mac);
	FIELD(zm_bridge_port, pad);

	SIZE(zm_drop_event);
	FIELD(zm_drop_event, ts_ns);
	FIELD(zm_drop_event, src);
	FIELD(zm_drop_event, dst);
	FIELD(zm_drop_event, sport);
	FIELD(zm_drop_event, dport);
	FIELD(zm_drop_event, reason);

	USIZE(MAX_PROXY_PORTS);
	U32(CFG_ENABLED);
	U32(CFG_NODE_STRICT);
	U32(CFG_REJECT_RST);
	U32(CFG_IPV6);
	U32(POD_STRICT);
	U32(REASON_STRICT_PLAINTEXT);
	U32(REASON_PROXY_UNAVAILABLE);
	U32(REASON_FRAGMENT);
	return 0;
}
