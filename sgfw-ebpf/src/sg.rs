//! Security-group rule lookup without loops: one LPM lookup on
//! (policy id, remote address) gives the port set folded for the longest
//! matching remote prefix (user space folds every broader prefix's rules into
//! the narrower ones), one LPM lookup on (port set, protocol, port) gives the
//! rule that allows it.
//!
//! Precedence: (1) the longest remote prefix wins; it already carries every
//! rule of the prefixes that contain it; (2) within the set the longest
//! protocol/port prefix wins; all-protocol rules are the 32-bit prefix.

use aya_ebpf::maps::lpm_trie::Key;
use sgfw_common::{
    CIDR_V4_KEY_BITS, CIDR_V6_KEY_BITS, CidrKeyV4, CidrKeyV6, PORT_KEY_BITS, PortKey,
    limits::AF_INET,
};

use crate::maps::{SG_CIDR_V4, SG_CIDR_V6, SG_PORTS};
use crate::parse::{Addr, Pkt};

/// The allowing rule's reference, or `None` when no rule allows.
#[inline(always)]
pub fn allows(policy: u32, p: &Pkt, remote: &Addr) -> Option<u32> {
    let set = if p.family == AF_INET {
        let addr = remote[0].to_ne_bytes();
        *SG_CIDR_V4.get(Key::new(
            CIDR_V4_KEY_BITS,
            CidrKeyV4 {
                table: policy.to_be_bytes(),
                addr,
            },
        ))?
    } else {
        *SG_CIDR_V6.get(Key::new(
            CIDR_V6_KEY_BITS,
            CidrKeyV6 {
                table: policy.to_be_bytes(),
                addr: bytemuck::cast(*remote),
            },
        ))?
    };
    SG_PORTS
        .get(Key::new(
            PORT_KEY_BITS,
            PortKey {
                set: set.to_be_bytes(),
                proto: p.proto,
                port: p.match_port().to_be_bytes(),
            },
        ))
        .copied()
}
