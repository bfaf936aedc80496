//! Network ACL evaluation in constant time: first match over up to 64
//! ordered entries without a loop.
//!
//! Entries are numbered 0..n in rule-number order. One LPM lookup on
//! (table, remote address) returns the bitmask of entries whose CIDR contains
//! the address; one on (table, protocol, port) the bitmask of entries whose
//! protocol and ports match. Their AND's lowest set bit is the first matching
//! entry; `allow_mask` (carried in the CIDR trie's value) says whether it
//! allows. No bit: the `*` rule denies. The rule number of a deny comes from
//! the table's metadata, looked up only then.

use aya_ebpf::maps::lpm_trie::Key;
use sgfw_common::{
    CIDR_V4_KEY_BITS, CIDR_V6_KEY_BITS, CidrKeyV4, CidrKeyV6, PORT_KEY_BITS, PortKey, Reason,
    limits::AF_INET,
};

use crate::maps::{NACL_CIDR_V4, NACL_CIDR_V6, NACL_META, NACL_PORTS};
use crate::parse::{Addr, Pkt};

/// Rule number AWS prints for the implicit deny, IPv4.
const STAR_V4: u32 = 32767;
/// Rule number AWS prints for the implicit deny, IPv6.
const STAR_V6: u32 = 32768;

/// Index of the lowest set bit of a non-zero value, without a loop.
#[inline(always)]
fn lowest_bit_index(x: u64) -> u32 {
    let mut x = x;
    let mut n = 0;
    if x & 0xffff_ffff == 0 {
        n += 32;
        x >>= 32;
    }
    if x & 0xffff == 0 {
        n += 16;
        x >>= 16;
    }
    if x & 0xff == 0 {
        n += 8;
        x >>= 8;
    }
    if x & 0xf == 0 {
        n += 4;
        x >>= 4;
    }
    if x & 0x3 == 0 {
        n += 2;
        x >>= 2;
    }
    if x & 0x1 == 0 {
        n += 1;
    }
    n
}

/// `Ok((allowed, rule number))`, or `Err(DropNoPolicy)` when the table's
/// metadata is missing (fail closed).
#[inline(always)]
pub fn check(table: u32, p: &Pkt, remote: &Addr) -> Result<(bool, u32), Reason> {
    let cidr = if p.family == AF_INET {
        NACL_CIDR_V4
            .get(Key::new(
                CIDR_V4_KEY_BITS,
                CidrKeyV4 {
                    table: table.to_be_bytes(),
                    addr: remote[0].to_ne_bytes(),
                },
            ))
            .copied()
    } else {
        NACL_CIDR_V6
            .get(Key::new(
                CIDR_V6_KEY_BITS,
                CidrKeyV6 {
                    table: table.to_be_bytes(),
                    addr: bytemuck::cast(*remote),
                },
            ))
            .copied()
    };
    let star = if p.family == AF_INET {
        STAR_V4
    } else {
        STAR_V6
    };
    let Some(cidr) = cidr else {
        return Ok((false, star));
    };
    let port_bits = NACL_PORTS
        .get(Key::new(
            PORT_KEY_BITS,
            PortKey {
                set: table.to_be_bytes(),
                proto: p.proto,
                port: p.match_port().to_be_bytes(),
            },
        ))
        .copied()
        .unwrap_or(0);
    let m = cidr.entries & port_bits;
    if m == 0 {
        return Ok((false, star));
    }
    let first = m & m.wrapping_neg();
    if cidr.allow_mask & first != 0 {
        // Allowed: the rule number is only reported for denies.
        return Ok((true, 0));
    }
    // SAFETY: hash lookup; the value is read only.
    let meta = unsafe { NACL_META.get(&table) }.ok_or(Reason::DropNoPolicy)?;
    let idx = lowest_bit_index(m) as usize & 63;
    Ok((false, meta.rule_numbers[idx] as u32))
}
