//! Validation of `Subnets` and `Instances`: CIDRs, bridges, DNS addresses,
//! each instance's subnet, addresses (inside its subnet, owned once),
//! interface and groups. It must never accept an address it cannot place.

use super::*;

impl Checker {
    pub(super) fn subnets(&mut self, model: &Model) -> Vec<CheckedSubnet> {
        let mut seen = BTreeMap::new();
        let mut bridges: BTreeMap<&str, String> = BTreeMap::new();
        let mut out: Vec<CheckedSubnet> = Vec::new();
        for (i, s) in model.subnets.iter().enumerate() {
            let base = format!("Subnets[{}]", label(&s.subnet_id, i));
            let id_ok = self.id(format!("{base}.SubnetId"), &s.subnet_id, &mut seen, i);
            let v4 = self.v4_cidr(|| format!("{base}.CidrBlock"), &s.cidr_block);
            let v6 = s
                .ipv6_cidr_block
                .as_deref()
                .map(|c| self.v6_cidr(|| format!("{base}.Ipv6CidrBlock"), c));
            if !is_valid_ifname(&s.bridge) {
                self.err(
                    format!("{base}.Bridge"),
                    format!("{:?} {IFNAME_RULE}", s.bridge),
                );
            } else if let Some(other) = bridges.get(s.bridge.as_str()) {
                self.err(
                    format!("{base}.Bridge"),
                    format!("{:?} is already the bridge of {other}", s.bridge),
                );
            } else {
                bridges.insert(&s.bridge, base.clone());
            }
            let mut dns = Vec::new();
            for (k, d) in s.dns_address.iter().enumerate() {
                let path = if s.dns_address.len() == 1 {
                    format!("{base}.DnsAddress")
                } else {
                    format!("{base}.DnsAddress[{k}]")
                };
                match d.parse::<IpAddr>() {
                    Ok(a) => dns.push(a),
                    Err(_) => self.err(path, format!("{d:?} is not an IP address")),
                }
            }
            dns.sort();
            dns.dedup();
            // Overlapping subnets would make "which subnet is this address in" ambiguous.
            if let Some(v4) = v4 {
                for o in &out {
                    if o.firewall.cidr_v4.contains(&v4.network())
                        || v4.contains(&o.firewall.cidr_v4.network())
                    {
                        self.err(
                            format!("{base}.CidrBlock"),
                            format!(
                                "{:?} overlaps {}.CidrBlock {}",
                                s.cidr_block, o.path, o.firewall.cidr_v4
                            ),
                        );
                    }
                }
            }
            if let Some(Some(v6)) = v6 {
                for o in &out {
                    if let Some(ov6) = o.firewall.cidr_v6
                        && (ov6.contains(&v6.network()) || v6.contains(&ov6.network()))
                    {
                        self.err(
                            format!("{base}.Ipv6CidrBlock"),
                            format!(
                                "{:?} overlaps {}.Ipv6CidrBlock {ov6}",
                                s.ipv6_cidr_block.as_deref().unwrap_or(""),
                                o.path
                            ),
                        );
                    }
                }
            }
            if let (true, Some(v4), None | Some(Some(_))) = (id_ok, v4, v6) {
                out.push(CheckedSubnet {
                    firewall: SubnetFirewall {
                        id: s.subnet_id.clone(),
                        bridge: s.bridge.clone(),
                        cidr_v4: v4,
                        cidr_v6: v6.flatten(),
                        dns,
                        nacl_id: String::new(),
                        inbound: Vec::new(),
                        outbound: Vec::new(),
                    },
                    path: base,
                    nacl: None,
                });
            }
        }
        out
    }

    pub(super) fn instances(
        &mut self,
        model: &Model,
        subnets: &[CheckedSubnet],
        group_ids: &BTreeSet<&str>,
    ) -> Vec<ValidInstance> {
        let mut seen = BTreeMap::new();
        let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut interfaces: BTreeMap<&str, String> = BTreeMap::new();
        let mut out = Vec::new();
        let subnet_ids: BTreeSet<&str> =
            model.subnets.iter().map(|s| s.subnet_id.as_str()).collect();
        for (i, inst) in model.instances.iter().enumerate() {
            let base = format!("Instances[{}]", label(&inst.instance_id, i));
            let id_ok = self.id(
                format!("{base}.InstanceId"),
                &inst.instance_id,
                &mut seen,
                i,
            );
            let subnet = subnets.iter().find(|s| s.firewall.id == inst.subnet_id);
            if subnet.is_none() && !subnet_ids.contains(inst.subnet_id.as_str()) {
                self.err(
                    format!("{base}.SubnetId"),
                    format!("{:?} is not a subnet of the model", inst.subnet_id),
                );
            }
            let mut addrs = Vec::new();
            let v4_items =
                std::iter::once((format!("{base}.PrivateIpAddress"), &inst.private_ip_address))
                    .chain(
                        inst.secondary_private_ip_addresses
                            .iter()
                            .enumerate()
                            .map(|(k, a)| (format!("{base}.SecondaryPrivateIpAddresses[{k}]"), a)),
                    );
            for (path, s) in v4_items {
                let Ok(a) = s.parse::<Ipv4Addr>() else {
                    self.err(path, format!("{s:?} is not an IPv4 address"));
                    continue;
                };
                if let Some(sub) = subnet
                    && !sub.firewall.cidr_v4.contains(&a)
                {
                    self.err(
                        path.clone(),
                        format!(
                            "{s:?} is not inside its subnet's CidrBlock {}",
                            sub.firewall.cidr_v4
                        ),
                    );
                }
                self.claim_addr(&mut owners, IpAddr::V4(a), path, &base, s, &mut addrs);
            }
            for (k, s) in inst.ipv6_addresses.iter().enumerate() {
                let path = format!("{base}.Ipv6Addresses[{k}]");
                let Ok(a) = s.parse::<Ipv6Addr>() else {
                    self.err(path, format!("{s:?} is not an IPv6 address"));
                    continue;
                };
                if let Some(sub) = subnet {
                    match sub.firewall.cidr_v6 {
                        None => self.err(
                            path.clone(),
                            format!("{s:?}: its subnet has no Ipv6CidrBlock"),
                        ),
                        Some(n) if !n.contains(&a) => self.err(
                            path.clone(),
                            format!("{s:?} is not inside its subnet's Ipv6CidrBlock {n}"),
                        ),
                        Some(_) => {}
                    }
                }
                self.claim_addr(&mut owners, IpAddr::V6(a), path, &base, s, &mut addrs);
            }
            addrs.sort();

            let n = inst.security_group_ids.len();
            if n == 0 || n > MAX_SGS_PER_INTERFACE {
                self.err(
                    format!("{base}.SecurityGroupIds"),
                    format!(
                        "an instance needs 1 to {MAX_SGS_PER_INTERFACE} security groups, found {n}"
                    ),
                );
            } else if n > QUOTA_SGS_PER_INTERFACE {
                self.warn(
                    format!("{base}.SecurityGroupIds"),
                    format!("{n} security groups exceed AWS's default quota of {QUOTA_SGS_PER_INTERFACE} per interface"),
                );
            }
            let mut groups: Vec<String> = Vec::new();
            for (k, g) in inst.security_group_ids.iter().enumerate() {
                let path = format!("{base}.SecurityGroupIds[{k}]");
                if !group_ids.contains(g.as_str()) {
                    self.err(path, format!("{g:?} is not a security group of the model"));
                } else if groups.contains(g) {
                    self.err(path, format!("{g:?} is listed twice"));
                } else {
                    groups.push(g.clone());
                }
            }
            if let Some(ifname) = &inst.interface {
                let path = format!("{base}.Interface");
                if !is_valid_ifname(ifname) {
                    self.err(path, format!("{ifname:?} {IFNAME_RULE}"));
                } else if let Some(other) = interfaces.get(ifname.as_str()) {
                    self.err(
                        path,
                        format!("{ifname:?} is already the interface of {other}"),
                    );
                } else if model.subnets.iter().any(|s| &s.bridge == ifname) {
                    self.err(
                        path,
                        format!("{ifname:?} is a subnet's bridge, not an instance port"),
                    );
                } else {
                    interfaces.insert(ifname, base.clone());
                }
            }
            if id_ok && let Some(sub) = subnet {
                out.push(ValidInstance {
                    id: inst.instance_id.clone(),
                    subnet_id: sub.firewall.id.clone(),
                    addrs,
                    interface: inst.interface.clone(),
                    groups,
                });
            }
        }
        out
    }

    pub(super) fn claim_addr(
        &mut self,
        owners: &mut BTreeMap<IpAddr, String>,
        a: IpAddr,
        path: String,
        owner: &str,
        text: &str,
        addrs: &mut Vec<IpAddr>,
    ) {
        if let Some(other) = owners.get(&a) {
            self.err(path, format!("{text:?} is already used by {other}"));
        } else {
            owners.insert(a, owner.to_owned());
            addrs.push(a);
        }
    }

    /// A DNS address that is an instance's would make that instance unfiltered.
    pub(super) fn dns_not_instance(
        &mut self,
        subnets: &[CheckedSubnet],
        instances: &[ValidInstance],
    ) {
        for s in subnets {
            for d in &s.firewall.dns {
                if let Some(i) = instances.iter().find(|i| i.addrs.contains(d)) {
                    self.err(
                        format!("{}.DnsAddress", s.path),
                        format!("\"{d}\" is an address of instance {}: its traffic would never be filtered", i.id),
                    );
                }
            }
        }
    }
}
