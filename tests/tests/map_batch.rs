//! The batched map operations (`BPF_MAP_UPDATE_BATCH`, `_DELETE_BATCH`,
//! `_LOOKUP_BATCH`) on the kernel's own maps, of both kinds an apply writes:
//! a hash map and an LPM trie. More elements than one batch holds, deletes
//! that name missing keys among present ones (the kernel stops at the
//! first; sgfw must go on), and the keys read back by batch equal exactly
//! what was written, one element at a time as well as in batches.
#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed step is a failed test"
)]

use std::collections::BTreeSet;

use sgfw::ebpf::testrun::TestDataplane;
use sgfw::model::{Instance, Model, SecurityGroup, Subnet};
use sgfw::sys::MapOps;
use sgfw_common::map_names as mn;

fn model() -> sgfw::flat::FlatModel {
    let m = Model {
        subnets: vec![Subnet {
            subnet_id: "subnet-a".into(),
            cidr_block: "10.31.0.0/16".into(),
            bridge: "brbatch".into(),
            ..Subnet::default()
        }],
        instances: vec![Instance {
            instance_id: "i-a".into(),
            subnet_id: "subnet-a".into(),
            private_ip_address: "10.31.0.10".into(),
            security_group_ids: vec!["sg-a".into()],
            ..Instance::default()
        }],
        security_groups: vec![SecurityGroup {
            group_id: "sg-a".into(),
            ..SecurityGroup::default()
        }],
        ..Model::default()
    };
    sgfw::validate::validate(&m).unwrap().0.flatten()
}

/// (map, key size, value size, the n-th key of this test).
type Shape = (&'static str, usize, usize, fn(u32) -> Vec<u8>);

const SHAPES: [Shape; 2] = [
    // A hash map: u32 key (high ids, clear of the model's own).
    (mn::IDENTITIES, 4, 20, |n| {
        (0x4000_0000 | n).to_ne_bytes().to_vec()
    }),
    // An LPM trie: {prefixlen, set id (BE), proto, port (BE)} at /56.
    (mn::SG_PORTS, 4 + 7, 4, |n| {
        let mut k = 56u32.to_ne_bytes().to_vec();
        k.extend_from_slice(&(0x7000_0000 | (n >> 16)).to_be_bytes());
        k.push(6);
        k.extend_from_slice(&(n as u16).to_be_bytes());
        k
    }),
];

#[test]
fn batched_writes_deletes_and_key_reads_match_element_by_element() {
    if !sgfw_tests::require_root("batched_writes_deletes_and_key_reads_match_element_by_element") {
        return;
    }
    let mut dp = TestDataplane::new(&model(), 65_536).unwrap();
    let maps = dp.maps_mut();
    for (map, ks, vs, key) in SHAPES {
        let before: BTreeSet<Vec<u8>> = maps.keys(map, ks).unwrap().into_iter().collect();
        // More than one batch (4,096) holds, and not a multiple of it.
        let n = 9_000u32;
        let keys: Vec<Vec<u8>> = (0..n).map(key).collect();
        assert_eq!(keys[0].len(), ks);
        let value = |i: usize| {
            let mut v = vec![0u8; vs];
            v[..4].copy_from_slice(&(i as u32 + 1).to_ne_bytes());
            v
        };
        let values: Vec<Vec<u8>> = (0..keys.len()).map(value).collect();
        let rows: Vec<(&[u8], &[u8])> = keys
            .iter()
            .zip(&values)
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        maps.update_many(map, &rows).unwrap();
        let after: BTreeSet<Vec<u8>> = maps.keys(map, ks).unwrap().into_iter().collect();
        let expected: BTreeSet<Vec<u8>> =
            before.iter().cloned().chain(keys.iter().cloned()).collect();
        assert_eq!(after.len(), expected.len(), "{map}: keys read back");
        assert!(
            after == expected,
            "{map}: the keys read back differ from those written"
        );
        // Every value as written (an LPM lookup of an exact key finds it).
        for (i, k) in keys.iter().enumerate().step_by(97) {
            assert_eq!(
                maps.lookup(map, k, vs).unwrap(),
                Some(value(i)),
                "{map}: value {i}"
            );
        }
        // Delete every other key, with never-written keys in between.
        let missing: Vec<Vec<u8>> = (n..n + 3_000).map(key).collect();
        let mut doomed: Vec<&[u8]> = Vec::new();
        for (i, k) in keys.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            doomed.push(k);
            if let Some(m) = missing.get(i / 2 % missing.len()) {
                doomed.push(m);
            }
        }
        maps.delete_many(map, &doomed).unwrap();
        let left: BTreeSet<Vec<u8>> = maps.keys(map, ks).unwrap().into_iter().collect();
        let expected: BTreeSet<Vec<u8>> = before
            .iter()
            .cloned()
            .chain(
                keys.iter()
                    .enumerate()
                    .filter(|(i, _)| i % 2 == 1)
                    .map(|(_, k)| k.clone()),
            )
            .collect();
        assert!(
            left == expected,
            "{map}: {} keys left, {} expected",
            left.len(),
            expected.len()
        );
        // The rest one at a time, then the map is as it was.
        for k in keys.iter().skip(1).step_by(2) {
            maps.delete(map, k).unwrap();
        }
        let end: BTreeSet<Vec<u8>> = maps.keys(map, ks).unwrap().into_iter().collect();
        assert!(end == before, "{map}: not back to its contents");
    }
}
