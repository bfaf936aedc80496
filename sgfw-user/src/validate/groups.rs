//! Validation of `SecurityGroups`: each permission's protocol, ports or
//! ICMP type and code into one canonical [`Match`], its remotes (CIDRs,
//! referenced groups, prefix lists), and the per-interface quotas. It must
//! never widen a permission it cannot express.

use super::*;

impl Checker {
    pub(super) fn groups(
        &mut self,
        model: &Model,
        prefix_lists: &BTreeMap<String, Vec<IpNet>>,
    ) -> BTreeMap<String, ValidGroup> {
        let mut seen = BTreeMap::new();
        let group_ids: BTreeSet<&str> = model
            .security_groups
            .iter()
            .map(|g| g.group_id.as_str())
            .collect();
        let pl_ids: BTreeSet<&str> = model
            .prefix_lists
            .iter()
            .map(|p| p.prefix_list_id.as_str())
            .collect();
        let mut out = BTreeMap::new();
        for (i, g) in model.security_groups.iter().enumerate() {
            let base = format!("SecurityGroups[{}]", label(&g.group_id, i));
            let ok = self.id(format!("{base}.GroupId"), &g.group_id, &mut seen, i);
            let mut vg = ValidGroup::default();
            for (list, perms, dst) in [
                ("IpPermissions", &g.ip_permissions, &mut vg.ingress),
                (
                    "IpPermissionsEgress",
                    &g.ip_permissions_egress,
                    &mut vg.egress,
                ),
            ] {
                let (mut n4, mut n6) = (0usize, 0usize);
                for (k, p) in perms.iter().enumerate() {
                    let path = format!("{base}.{list}[{k}]");
                    n4 += p.ip_ranges.len() + p.user_id_group_pairs.len() + p.prefix_list_ids.len();
                    n6 +=
                        p.ipv6_ranges.len() + p.user_id_group_pairs.len() + p.prefix_list_ids.len();
                    if let Some(vp) = self.permission(&path, p, &group_ids, &pl_ids, prefix_lists) {
                        dst.push(vp);
                    }
                }
                for (family, n) in [("IPv4", n4), ("IPv6", n6)] {
                    if n > QUOTA_SG_RULES {
                        self.warn(
                            format!("{base}.{list}"),
                            format!("{n} {family} rules exceed AWS's default quota of {QUOTA_SG_RULES} per group and direction"),
                        );
                    }
                }
            }
            if ok {
                out.insert(g.group_id.clone(), vg);
            }
        }
        out
    }

    /// AWS: rules per group x groups per interface may not exceed 1000; here
    /// the actual rules an interface gets, per direction and family (a warning).
    pub(super) fn rules_per_interface(&mut self, model: &Model) {
        for (i, inst) in model.instances.iter().enumerate() {
            let mut counts = [0usize; 4];
            for g in model
                .security_groups
                .iter()
                .filter(|g| inst.security_group_ids.contains(&g.group_id))
            {
                for (k, perms) in [&g.ip_permissions, &g.ip_permissions_egress]
                    .into_iter()
                    .enumerate()
                {
                    for p in perms {
                        let refs = p.user_id_group_pairs.len() + p.prefix_list_ids.len();
                        counts[2 * k] += p.ip_ranges.len() + refs;
                        counts[2 * k + 1] += p.ipv6_ranges.len() + refs;
                    }
                }
            }
            for (n, what) in counts.into_iter().zip([
                "IPv4 inbound",
                "IPv6 inbound",
                "IPv4 outbound",
                "IPv6 outbound",
            ]) {
                if n > QUOTA_RULES_PER_INTERFACE {
                    self.warn(
                        format!("Instances[{}].SecurityGroupIds", label(&inst.instance_id, i)),
                        format!("{n} {what} rules across its groups exceed AWS's limit of {QUOTA_RULES_PER_INTERFACE} per interface"),
                    );
                }
            }
        }
    }

    pub(super) fn permission(
        &mut self,
        path: &str,
        p: &IpPermission,
        group_ids: &BTreeSet<&str>,
        pl_ids: &BTreeSet<&str>,
        prefix_lists: &BTreeMap<String, Vec<IpNet>>,
    ) -> Option<ValidPermission> {
        let matcher = self.sg_match(path, p);
        let mut remotes = Vec::new();
        for (k, r) in p.ip_ranges.iter().enumerate() {
            if let Some(n) = self.v4_cidr(|| format!("{path}.IpRanges[{k}].CidrIp"), &r.cidr_ip) {
                remotes.push(ValidRemote::Cidr(IpNet::V4(n)));
            }
        }
        for (k, r) in p.ipv6_ranges.iter().enumerate() {
            if let Some(n) =
                self.v6_cidr(|| format!("{path}.Ipv6Ranges[{k}].CidrIpv6"), &r.cidr_ipv6)
            {
                remotes.push(ValidRemote::Cidr(IpNet::V6(n)));
            }
        }
        for (k, r) in p.user_id_group_pairs.iter().enumerate() {
            if group_ids.contains(r.group_id.as_str()) {
                remotes.push(ValidRemote::Group(r.group_id.clone()));
            } else {
                self.err(
                    format!("{path}.UserIdGroupPairs[{k}].GroupId"),
                    format!("{:?} is not a security group of the model", r.group_id),
                );
            }
        }
        for (k, r) in p.prefix_list_ids.iter().enumerate() {
            if pl_ids.contains(r.prefix_list_id.as_str()) {
                if prefix_lists
                    .get(&r.prefix_list_id)
                    .is_some_and(|v| v.is_empty())
                {
                    self.warn(
                        format!("{path}.PrefixListIds[{k}].PrefixListId"),
                        format!(
                            "{:?} has no entries: this remote matches nothing",
                            r.prefix_list_id
                        ),
                    );
                }
                remotes.push(ValidRemote::PrefixList(r.prefix_list_id.clone()));
            } else {
                self.err(
                    format!("{path}.PrefixListIds[{k}].PrefixListId"),
                    format!("{:?} is not a prefix list of the model", r.prefix_list_id),
                );
            }
        }
        if p.ip_ranges.is_empty()
            && p.ipv6_ranges.is_empty()
            && p.user_id_group_pairs.is_empty()
            && p.prefix_list_ids.is_empty()
        {
            self.warn(path, "has no IpRanges, Ipv6Ranges, UserIdGroupPairs or PrefixListIds: it matches nothing");
        }
        Some(ValidPermission {
            matcher: matcher?,
            remotes,
        })
    }

    /// The canonical matcher of a security-group permission.
    pub(super) fn sg_match(&mut self, path: &str, p: &IpPermission) -> Option<Match> {
        // Paths are written only for an error.
        let proto_path = || format!("{path}.IpProtocol");
        let proto = match p.ip_protocol.to_ascii_lowercase().as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            "icmp" => PROTO_ICMP,
            "icmpv6" => PROTO_ICMPV6,
            other => {
                match other.parse::<i64>() {
                    Ok(-1) => {
                        self.ports_ignored(path, "-1", p.from_port, p.to_port);
                        return Some(Match::All);
                    }
                    Ok(n) => match u8::try_from(n) {
                        Ok(n) => n,
                        Err(_) => {
                            self.err(
                                proto_path(),
                                format!("{n} is not a protocol number (0-255, or -1 for all)"),
                            );
                            return None;
                        }
                    },
                    Err(_) => {
                        self.err(
                        proto_path(),
                        format!("{:?} is not a protocol (tcp, udp, icmp, icmpv6, -1 or a number 0-255)", p.ip_protocol),
                    );
                        return None;
                    }
                }
            }
        };
        let (from_path, to_path) = (|| format!("{path}.FromPort"), || format!("{path}.ToPort"));
        match proto {
            PROTO_TCP | PROTO_UDP => {
                let name = if proto == PROTO_TCP { "tcp" } else { "udp" };
                let (Some(from), Some(to)) = (p.from_port, p.to_port) else {
                    let missing = if p.from_port.is_none() {
                        from_path()
                    } else {
                        to_path()
                    };
                    self.err(missing, format!("missing: protocol {name} needs FromPort and ToPort (-1 and -1 for all ports)"));
                    return None;
                };
                self.port_range(from_path, to_path, from, to, proto, true)
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                let name = if proto == PROTO_ICMP {
                    "icmp"
                } else {
                    "icmpv6"
                };
                let (from, to) = match (p.from_port, p.to_port) {
                    (Some(f), Some(t)) => (f, t),
                    (None, None) if proto == PROTO_ICMPV6 => (-1, -1),
                    (f, _) => {
                        let missing = if f.is_none() { from_path() } else { to_path() };
                        self.err(missing, format!("missing: protocol {name} needs FromPort (ICMP type) and ToPort (ICMP code), -1 for any"));
                        return None;
                    }
                };
                self.icmp_type_code(from_path, to_path, "FromPort", from, to, proto)
            }
            other => {
                self.ports_ignored(path, &other.to_string(), p.from_port, p.to_port);
                Some(Match::Proto(other))
            }
        }
    }

    /// Ports given with a protocol that has none are ignored, as in EC2; say so
    /// rather than let someone believe they narrow the rule.
    pub(super) fn ports_ignored(
        &mut self,
        path: &str,
        proto: &str,
        from: Option<i64>,
        to: Option<i64>,
    ) {
        if from.is_some_and(|f| f != -1) || to.is_some_and(|t| t != -1) {
            self.warn(
                path,
                format!(
                    "FromPort/ToPort are ignored for protocol {proto}: the rule matches all ports"
                ),
            );
        }
    }

    /// A TCP/UDP port range; `allow_minus_one`: `-1`/`-1` means all (SG only).
    pub(super) fn port_range(
        &mut self,
        from_path: impl Fn() -> String,
        to_path: impl Fn() -> String,
        from: i64,
        to: i64,
        proto: u8,
        allow_minus_one: bool,
    ) -> Option<Match> {
        if allow_minus_one && from == -1 && to == -1 {
            return Some(Match::Proto(proto));
        }
        let mut ok = true;
        for (path, v) in [(&from_path as &dyn Fn() -> String, from), (&to_path, to)] {
            if !(0..=65535).contains(&v) {
                let also = if allow_minus_one {
                    ", or -1 and -1 for all ports"
                } else {
                    ""
                };
                self.err(path(), format!("{v} is not a port (0-65535{also})"));
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        if from > to {
            let to_path = to_path();
            let to_name = to_path.rsplit('.').next().unwrap_or_default();
            self.err(
                from_path(),
                format!("{from} is greater than {to_name} {to}"),
            );
            return None;
        }
        Some(if from == 0 && to == 65535 {
            Match::Proto(proto)
        } else {
            Match::Ports {
                proto,
                from: from as u16,
                to: to as u16,
            }
        })
    }

    pub(super) fn icmp_type_code(
        &mut self,
        type_path: impl Fn() -> String,
        code_path: impl Fn() -> String,
        type_field: &str,
        t: i64,
        c: i64,
        proto: u8,
    ) -> Option<Match> {
        let mut ok = true;
        for (path, v, what) in [
            (&type_path as &dyn Fn() -> String, t, "an ICMP type"),
            (&code_path, c, "an ICMP code"),
        ] {
            if !(-1..=255).contains(&v) {
                self.err(path(), format!("{v} is not {what} (0-255, or -1 for any)"));
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        if t == -1 && c != -1 {
            self.err(
                code_path(),
                format!("ICMP code {c} without an ICMP type ({type_field} is -1)"),
            );
            return None;
        }
        let opt = |v: i64| u8::try_from(v).ok();
        Some(Match::Icmp {
            proto,
            icmp_type: opt(t),
            code: opt(c),
        })
    }
}
