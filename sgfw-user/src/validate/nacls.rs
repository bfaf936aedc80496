//! Validation of `NetworkAcls`: associations (one NACL per subnet, the
//! default NACL otherwise), entries (rule numbers unique per direction,
//! protocol, ports, ICMP) in rule-number order. It must never reorder or
//! drop an entry that matters.

use super::*;

impl Checker {
    pub(super) fn nacls(&mut self, model: &Model, subnets: &mut [CheckedSubnet]) {
        let mut seen = BTreeMap::new();
        let mut default: Option<(String, Vec<NaclEntry>, Vec<NaclEntry>)> = None;
        let mut default_path: Option<String> = None;
        for (i, acl) in model.network_acls.iter().enumerate() {
            let base = format!("NetworkAcls[{}]", label(&acl.network_acl_id, i));
            let ok = self.id(
                format!("{base}.NetworkAclId"),
                &acl.network_acl_id,
                &mut seen,
                i,
            );
            let (inbound, outbound) = self.nacl_entries(&base, &acl.entries);
            if acl.is_default {
                if let Some(first) = &default_path {
                    self.err(
                        format!("{base}.IsDefault"),
                        format!("only one NACL can be the default (also {first})"),
                    );
                } else {
                    default_path = Some(base.clone());
                    default = Some((
                        acl.network_acl_id.clone(),
                        inbound.clone(),
                        outbound.clone(),
                    ));
                }
            }
            for (k, assoc) in acl.associations.iter().enumerate() {
                let path = format!("{base}.Associations[{k}].SubnetId");
                if !model.subnets.iter().any(|s| s.subnet_id == assoc.subnet_id) {
                    self.err(
                        path,
                        format!("{:?} is not a subnet of the model", assoc.subnet_id),
                    );
                    continue;
                }
                let Some(sub) = subnets
                    .iter_mut()
                    .find(|s| s.firewall.id == assoc.subnet_id)
                else {
                    continue;
                };
                if let Some(other) = &sub.nacl {
                    self.err(
                        path,
                        format!("{:?} is already associated with {other}", assoc.subnet_id),
                    );
                    continue;
                }
                sub.nacl = Some(base.clone());
                if ok {
                    sub.firewall.nacl_id = acl.network_acl_id.clone();
                    sub.firewall.inbound = inbound.clone();
                    sub.firewall.outbound = outbound.clone();
                }
            }
        }
        for sub in subnets.iter_mut().filter(|s| s.nacl.is_none()) {
            match &default {
                Some((id, inbound, outbound)) => {
                    sub.firewall.nacl_id = id.clone();
                    sub.firewall.inbound = inbound.clone();
                    sub.firewall.outbound = outbound.clone();
                }
                None => {
                    // AWS's default NACL: rule 100 allows all IPv4, rule 101 all IPv6.
                    let mut entries = vec![NaclEntry {
                        rule_number: 100,
                        action: RuleAction::Allow,
                        cidr: IpNet::V4(Ipv4Net::default()),
                        matcher: Match::All,
                    }];
                    if sub.firewall.cidr_v6.is_some() {
                        entries.push(NaclEntry {
                            rule_number: 101,
                            action: RuleAction::Allow,
                            cidr: IpNet::V6(Ipv6Net::default()),
                            matcher: Match::All,
                        });
                    }
                    sub.firewall.nacl_id = IMPLICIT_DEFAULT_NACL_ID.to_owned();
                    sub.firewall.inbound = entries.clone();
                    sub.firewall.outbound = entries;
                }
            }
        }
    }

    /// (inbound, outbound), each sorted by rule number; EC2's `*` entries dropped.
    pub(super) fn nacl_entries(
        &mut self,
        base: &str,
        entries: &[NetworkAclEntry],
    ) -> (Vec<NaclEntry>, Vec<NaclEntry>) {
        let mut inbound: Vec<NaclEntry> = Vec::new();
        let mut outbound: Vec<NaclEntry> = Vec::new();
        let mut numbers: [BTreeMap<i64, usize>; 2] = [BTreeMap::new(), BTreeMap::new()];
        let mut counts: BTreeMap<(bool, bool), usize> = BTreeMap::new();
        for (k, e) in entries.iter().enumerate() {
            let path = format!("{base}.Entries[{k}]");
            let dir = if e.egress { "outbound" } else { "inbound" };
            let action = match e.rule_action.as_str() {
                "allow" => Some(RuleAction::Allow),
                "deny" => Some(RuleAction::Deny),
                other => {
                    self.err(
                        format!("{path}.RuleAction"),
                        format!("{other:?} is not allow or deny"),
                    );
                    None
                }
            };
            if e.rule_number == 32767 || e.rule_number == 32768 {
                // EC2 prints the implicit deny as rule 32767 (IPv4) / 32768 (IPv6).
                if action != Some(RuleAction::Deny) || e.protocol != "-1" {
                    self.err(
                        format!("{path}.RuleNumber"),
                        format!("{} is EC2's implicit-deny entry: only RuleAction deny with Protocol -1 is accepted", e.rule_number),
                    );
                }
                continue;
            }
            let mut ok = action.is_some();
            if !(1..=32766).contains(&e.rule_number) {
                self.err(
                    format!("{path}.RuleNumber"),
                    format!("{} is not a rule number (1-32766)", e.rule_number),
                );
                ok = false;
            } else if let Some(first) = numbers[usize::from(e.egress)].get(&e.rule_number) {
                self.err(
                    format!("{path}.RuleNumber"),
                    format!(
                        "{} is used twice in the {dir} entries (also Entries[{first}])",
                        e.rule_number
                    ),
                );
                ok = false;
            } else {
                numbers[usize::from(e.egress)].insert(e.rule_number, k);
            }
            let cidr = match (&e.cidr_block, &e.ipv6_cidr_block) {
                (Some(c), None) => self
                    .v4_cidr(|| format!("{path}.CidrBlock"), c)
                    .map(IpNet::V4),
                (None, Some(c)) => self
                    .v6_cidr(|| format!("{path}.Ipv6CidrBlock"), c)
                    .map(IpNet::V6),
                (None, None) => {
                    self.err(path.clone(), "needs a CidrBlock or an Ipv6CidrBlock");
                    None
                }
                (Some(_), Some(_)) => {
                    self.err(
                        path.clone(),
                        "has both a CidrBlock and an Ipv6CidrBlock; an entry is for one family",
                    );
                    None
                }
            };
            let matcher = cidr.and_then(|c| self.nacl_match(&path, e, c.addr().is_ipv6()));
            if let (true, Some(action), Some(cidr), Some(matcher)) = (ok, action, cidr, matcher) {
                *counts.entry((e.egress, cidr.addr().is_ipv6())).or_default() += 1;
                let entry = NaclEntry {
                    rule_number: e.rule_number as u16,
                    action,
                    cidr,
                    matcher,
                };
                if e.egress {
                    outbound.push(entry)
                } else {
                    inbound.push(entry)
                }
            }
        }
        for ((egress, v6), n) in counts {
            if n > QUOTA_NACL_RULES {
                let dir = if egress { "outbound" } else { "inbound" };
                let family = if v6 { "IPv6" } else { "IPv4" };
                self.warn(
                    format!("{base}.Entries"),
                    format!("{n} {dir} {family} entries exceed AWS's default quota of {QUOTA_NACL_RULES}"),
                );
            }
        }
        inbound.sort_by_key(|e| e.rule_number);
        outbound.sort_by_key(|e| e.rule_number);
        (inbound, outbound)
    }

    pub(super) fn nacl_match(
        &mut self,
        path: &str,
        e: &NetworkAclEntry,
        v6: bool,
    ) -> Option<Match> {
        let proto = match e.protocol.to_ascii_lowercase().as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            "icmp" => PROTO_ICMP,
            "icmpv6" => PROTO_ICMPV6,
            s => match s.parse::<i64>() {
                Ok(-1) => {
                    self.nacl_fields_ignored(path, e, "-1");
                    return Some(Match::All);
                }
                Ok(n) if (0..=255).contains(&n) => n as u8,
                _ => {
                    self.err(
                        format!("{path}.Protocol"),
                        format!(
                            "{:?} is not a protocol number (0-255, or -1 for all)",
                            e.protocol
                        ),
                    );
                    return None;
                }
            },
        };
        match proto {
            PROTO_TCP | PROTO_UDP => {
                let range = e.port_range.as_ref();
                let (Some(from), Some(to)) = (range.and_then(|r| r.from), range.and_then(|r| r.to))
                else {
                    self.err(
                        format!("{path}.PortRange"),
                        format!("missing: protocol {proto} needs PortRange From and To"),
                    );
                    return None;
                };
                self.port_range(
                    || format!("{path}.PortRange.From"),
                    || format!("{path}.PortRange.To"),
                    from,
                    to,
                    proto,
                    false,
                )
            }
            PROTO_ICMP | PROTO_ICMPV6 if proto == PROTO_ICMP || v6 => {
                let tc = e.icmp_type_code.as_ref();
                let (Some(t), Some(c)) = (tc.and_then(|x| x.r#type), tc.and_then(|x| x.code))
                else {
                    self.err(
                        format!("{path}.IcmpTypeCode"),
                        format!("missing: protocol {proto} needs IcmpTypeCode Type and Code (-1 for any)"),
                    );
                    return None;
                };
                self.icmp_type_code(
                    || format!("{path}.IcmpTypeCode.Type"),
                    || format!("{path}.IcmpTypeCode.Code"),
                    "Type",
                    t,
                    c,
                    proto,
                )
            }
            // Protocol 58 with an IPv4 CIDR matches all ICMPv6 (docs/semantics.md).
            other => {
                self.nacl_fields_ignored(path, e, &other.to_string());
                Some(Match::Proto(other))
            }
        }
    }

    pub(super) fn nacl_fields_ignored(&mut self, path: &str, e: &NetworkAclEntry, proto: &str) {
        let ports = e
            .port_range
            .as_ref()
            .is_some_and(|r| r.from.is_some_and(|v| v != -1) || r.to.is_some_and(|v| v != -1));
        let icmp = e
            .icmp_type_code
            .as_ref()
            .is_some_and(|r| r.r#type.is_some_and(|v| v != -1) || r.code.is_some_and(|v| v != -1));
        if ports || icmp {
            self.warn(path, format!("PortRange/IcmpTypeCode are ignored for protocol {proto}: the entry matches all of it"));
        }
    }
}
