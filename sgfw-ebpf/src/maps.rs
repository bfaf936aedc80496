//! Every map of the object. Sizes here are defaults: user space sets
//! `max_entries` from the model (with headroom) before it loads the object.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use sgfw_common::{
    AddrInfo, AddrKey, CidrKeyV4, CidrKeyV6, Config, CtEntry, CtKey, FragEntry, FragKey,
    InstancePolicy, NaclBits, NaclMeta, PortKey, SubnetPolicy,
};

#[map(name = "SGFW_ADDRS")]
pub static ADDRS: HashMap<AddrKey, AddrInfo> = HashMap::with_max_entries(1024, 0);

#[map(name = "SGFW_INSTANCES")]
pub static INSTANCES: HashMap<u32, InstancePolicy> = HashMap::with_max_entries(1024, 0);

#[map(name = "SGFW_SUBNETS")]
pub static SUBNETS: HashMap<u32, SubnetPolicy> = HashMap::with_max_entries(256, 0);

#[map(name = "SGFW_PORTS")]
pub static PORTS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

#[map(name = "SGFW_SG_CIDR_V4")]
pub static SG_CIDR_V4: LpmTrie<CidrKeyV4, u32> = LpmTrie::with_max_entries(4096, 0);

#[map(name = "SGFW_SG_CIDR_V6")]
pub static SG_CIDR_V6: LpmTrie<CidrKeyV6, u32> = LpmTrie::with_max_entries(4096, 0);

#[map(name = "SGFW_SG_PORTS")]
pub static SG_PORTS: LpmTrie<PortKey, u32> = LpmTrie::with_max_entries(4096, 0);

#[map(name = "SGFW_NACL_CIDR_V4")]
pub static NACL_CIDR_V4: LpmTrie<CidrKeyV4, NaclBits> = LpmTrie::with_max_entries(4096, 0);

#[map(name = "SGFW_NACL_CIDR_V6")]
pub static NACL_CIDR_V6: LpmTrie<CidrKeyV6, NaclBits> = LpmTrie::with_max_entries(4096, 0);

#[map(name = "SGFW_NACL_PORTS")]
pub static NACL_PORTS: LpmTrie<PortKey, u64> = LpmTrie::with_max_entries(4096, 0);

#[map(name = "SGFW_NACL_META")]
pub static NACL_META: HashMap<u32, NaclMeta> = HashMap::with_max_entries(1024, 0);

#[map(name = "SGFW_CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(262_144, 0);

#[map(name = "SGFW_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "SGFW_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(16 * 1025, 0);

/// Per-CPU event rate limiter: [window start ns, events in window].
#[map(name = "SGFW_EVENT_RATE")]
pub static EVENT_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space for the packet being classified.
#[map(name = "SGFW_SCRATCH")]
pub static SCRATCH: PerCpuArray<crate::parse::Pkt> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SGFW_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[cfg(feature = "test-programs")]
#[map(name = "SGFW_PORT_COUNTS")]
pub static PORT_COUNTS: PerCpuHashMap<sgfw_common::PortCountKey, u64> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// The verdict of each fragmented datagram's first fragment, per hook; LRU,
/// each record stands for `FRAGMENT_TIMEOUT_NS`.
#[map(name = "SGFW_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragEntry> = LruHashMap::with_max_entries(16_384, 0);

/// Address identities from `skb->mark` → the sender's own address.
#[map(name = "SGFW_IDENTITIES")]
pub static IDENTITIES: HashMap<u32, AddrKey> = HashMap::with_max_entries(4096, 0);
