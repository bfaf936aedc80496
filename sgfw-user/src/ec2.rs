//! The live source: a VPC read from an EC2 API endpoint (moto, LocalStack,
//! fakecloud, AWS itself) through the AWS SDK for Rust.
//!
//! Owns: the describe calls (paginated), and the translation of the SDK's
//! types into the JSON shapes the AWS CLI prints for the same calls. That
//! JSON then goes through [`crate::import`], the one reader of EC2's shapes,
//! so a live VPC is accepted, warned about and refused exactly as the same
//! VPC dumped with `aws ec2 describe-*` would be.
//!
//! Must never: drop a field that [`crate::import`] refuses or reads (a
//! `SourceDestCheck` of false, `Ipv4Prefixes`, a peering reference, a
//! connection-tracking timeout): each is carried over so that the import
//! refuses or enforces it. What this module does not carry over are the
//! fields the importer ignores (tags, owners, descriptions of objects).
//!
//! Credentials and region come from the usual AWS environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_REGION`, SSO, credential
//! processes, instance metadata), as with every AWS tool.

use std::collections::BTreeSet;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    Filter, Instance, IpPermission, ManagedPrefixList, NetworkAcl, SecurityGroup, Subnet, Vpc,
};
use serde_json::{Map, Value, json};

use crate::import::{ImportError, ImportOptions, Imported};

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    /// A describe call failed (endpoint unreachable, credentials refused...).
    #[error("{call} at {endpoint}: {message}")]
    Call {
        /// The EC2 action, e.g. `DescribeInstances`.
        call: &'static str,
        /// The endpoint asked.
        endpoint: String,
        /// The SDK's error with its context chain.
        message: String,
        /// The SDK's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The VPC read is not something sgfw can enforce.
    #[error("the VPC read from {endpoint} cannot be imported")]
    Import {
        /// The endpoint asked.
        endpoint: String,
        /// What the importer refused.
        #[source]
        source: ImportError,
    },
}

/// An EC2 endpoint to read one VPC from.
#[derive(Debug, Clone)]
pub struct Ec2Source {
    client: Client,
    endpoint: String,
    vpc: Option<String>,
}

impl Ec2Source {
    /// A source for `endpoint` (None: the SDK's default endpoint for the
    /// region, i.e. AWS itself), scoped to `vpc` when given. Credentials and
    /// region come from the environment; no call is made yet.
    pub async fn connect(endpoint: Option<&str>, vpc: Option<String>) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let conf = loader.load().await;
        Ec2Source {
            client: Client::new(&conf),
            endpoint: endpoint.unwrap_or("the default EC2 endpoint").to_string(),
            vpc,
        }
    }

    /// The endpoint's objects as the AWS CLI prints them: one document with
    /// `Vpcs`, `Subnets`, `Reservations`, `SecurityGroups`, `NetworkAcls`,
    /// `PrefixLists` and `PrefixListEntries` (only the lists the groups
    /// name), every page read.
    ///
    /// # Errors
    ///
    /// The first failed call, naming it.
    pub async fn describe(&self) -> Result<Value, Ec2Error> {
        let vpc_filter = || {
            self.vpc
                .as_ref()
                .map(|v| Filter::builder().name("vpc-id").values(v).build())
        };
        let mut vpcs = Vec::new();
        let mut s = self
            .client
            .describe_vpcs()
            .set_filters(vpc_filter().map(|f| vec![f]))
            .into_paginator()
            .send();
        while let Some(page) = s.next().await {
            let page = page.map_err(|e| self.call_error("DescribeVpcs", e))?;
            vpcs.extend(page.vpcs().iter().map(vpc_json));
        }
        let mut subnets = Vec::new();
        let mut s = self
            .client
            .describe_subnets()
            .set_filters(vpc_filter().map(|f| vec![f]))
            .into_paginator()
            .send();
        while let Some(page) = s.next().await {
            let page = page.map_err(|e| self.call_error("DescribeSubnets", e))?;
            subnets.extend(page.subnets().iter().map(subnet_json));
        }
        let mut reservations = Vec::new();
        let mut s = self
            .client
            .describe_instances()
            .set_filters(vpc_filter().map(|f| vec![f]))
            .into_paginator()
            .send();
        while let Some(page) = s.next().await {
            let page = page.map_err(|e| self.call_error("DescribeInstances", e))?;
            for r in page.reservations() {
                let instances: Vec<Value> = r.instances().iter().map(instance_json).collect();
                reservations.push(json!({ "Instances": instances }));
            }
        }
        let mut groups = Vec::new();
        let mut named_lists = BTreeSet::new();
        let mut s = self
            .client
            .describe_security_groups()
            .set_filters(vpc_filter().map(|f| vec![f]))
            .into_paginator()
            .send();
        while let Some(page) = s.next().await {
            let page = page.map_err(|e| self.call_error("DescribeSecurityGroups", e))?;
            for g in page.security_groups() {
                for p in g.ip_permissions().iter().chain(g.ip_permissions_egress()) {
                    for l in p.prefix_list_ids() {
                        if let Some(id) = l.prefix_list_id() {
                            named_lists.insert(id.to_string());
                        }
                    }
                }
                groups.push(group_json(g));
            }
        }
        let mut nacls = Vec::new();
        let mut s = self
            .client
            .describe_network_acls()
            .set_filters(vpc_filter().map(|f| vec![f]))
            .into_paginator()
            .send();
        while let Some(page) = s.next().await {
            let page = page.map_err(|e| self.call_error("DescribeNetworkAcls", e))?;
            nacls.extend(page.network_acls().iter().map(nacl_json));
        }
        let mut lists = Vec::new();
        let mut entries = Map::new();
        if !named_lists.is_empty() {
            let mut s = self
                .client
                .describe_managed_prefix_lists()
                .set_prefix_list_ids(Some(named_lists.iter().cloned().collect()))
                .into_paginator()
                .send();
            while let Some(page) = s.next().await {
                let page = page.map_err(|e| self.call_error("DescribeManagedPrefixLists", e))?;
                lists.extend(page.prefix_lists().iter().map(prefix_list_json));
            }
            for id in &named_lists {
                let mut got = Vec::new();
                let mut s = self
                    .client
                    .get_managed_prefix_list_entries()
                    .prefix_list_id(id)
                    .into_paginator()
                    .send();
                while let Some(page) = s.next().await {
                    let page =
                        page.map_err(|e| self.call_error("GetManagedPrefixListEntries", e))?;
                    for e in page.entries() {
                        let mut o = Map::new();
                        put(&mut o, "Cidr", e.cidr());
                        put(&mut o, "Description", e.description());
                        got.push(Value::Object(o));
                    }
                }
                entries.insert(id.clone(), json!({ "Entries": got }));
            }
        }
        Ok(json!({
            "Vpcs": vpcs,
            "Subnets": subnets,
            "Reservations": reservations,
            "SecurityGroups": groups,
            "NetworkAcls": nacls,
            "PrefixLists": lists,
            "PrefixListEntries": entries,
        }))
    }

    /// [`Self::describe`], imported: the model this endpoint's VPC is now.
    ///
    /// # Errors
    ///
    /// A failed call, or what the importer refuses.
    pub async fn snapshot(&self, opts: &ImportOptions) -> Result<Imported, Ec2Error> {
        let doc = self.describe().await?;
        let mut opts = opts.clone();
        if opts.vpc.is_none() {
            opts.vpc.clone_from(&self.vpc);
        }
        crate::import::import(&[doc], &opts).map_err(|source| Ec2Error::Import {
            endpoint: self.endpoint.clone(),
            source,
        })
    }

    fn call_error<E>(&self, call: &'static str, e: E) -> Ec2Error
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Ec2Error::Call {
            call,
            endpoint: self.endpoint.clone(),
            message: aws_sdk_ec2::error::DisplayErrorContext(&e).to_string(),
            source: Box::new(e),
        }
    }
}

/// Sets `key` when the SDK gave a value (the CLI leaves absent ones out).
fn put<T: Into<Value>>(o: &mut Map<String, Value>, key: &str, v: Option<T>) {
    if let Some(v) = v {
        o.insert(key.to_string(), v.into());
    }
}

fn vpc_json(v: &Vpc) -> Value {
    let mut o = Map::new();
    put(&mut o, "VpcId", v.vpc_id());
    put(&mut o, "CidrBlock", v.cidr_block());
    Value::Object(o)
}

fn subnet_json(s: &Subnet) -> Value {
    let mut o = Map::new();
    put(&mut o, "SubnetId", s.subnet_id());
    put(&mut o, "VpcId", s.vpc_id());
    put(&mut o, "CidrBlock", s.cidr_block());
    let assoc: Vec<Value> = s
        .ipv6_cidr_block_association_set()
        .iter()
        .map(|a| {
            let mut ao = Map::new();
            put(&mut ao, "AssociationId", a.association_id());
            put(&mut ao, "Ipv6CidrBlock", a.ipv6_cidr_block());
            if let Some(st) = a.ipv6_cidr_block_state() {
                let mut so = Map::new();
                put(&mut so, "State", st.state().map(|x| x.as_str()));
                put(&mut so, "StatusMessage", st.status_message());
                ao.insert("Ipv6CidrBlockState".into(), Value::Object(so));
            }
            Value::Object(ao)
        })
        .collect();
    if !assoc.is_empty() {
        o.insert("Ipv6CidrBlockAssociationSet".into(), Value::Array(assoc));
    }
    Value::Object(o)
}

fn instance_json(i: &Instance) -> Value {
    let mut o = Map::new();
    put(&mut o, "InstanceId", i.instance_id());
    put(&mut o, "VpcId", i.vpc_id());
    put(&mut o, "SubnetId", i.subnet_id());
    put(&mut o, "PrivateIpAddress", i.private_ip_address());
    if let Some(st) = i.state() {
        let mut so = Map::new();
        put(&mut so, "Name", st.name().map(|n| n.as_str()));
        o.insert("State".into(), Value::Object(so));
    }
    let enis: Vec<Value> = i
        .network_interfaces()
        .iter()
        .map(|e| {
            let mut eo = Map::new();
            put(&mut eo, "NetworkInterfaceId", e.network_interface_id());
            put(&mut eo, "SubnetId", e.subnet_id());
            put(&mut eo, "VpcId", e.vpc_id());
            put(&mut eo, "PrivateIpAddress", e.private_ip_address());
            put(&mut eo, "SourceDestCheck", e.source_dest_check());
            if let Some(a) = e.attachment() {
                let mut ao = Map::new();
                put(&mut ao, "DeviceIndex", a.device_index());
                eo.insert("Attachment".into(), Value::Object(ao));
            }
            let ips: Vec<Value> = e
                .private_ip_addresses()
                .iter()
                .map(|p| {
                    let mut po = Map::new();
                    put(&mut po, "PrivateIpAddress", p.private_ip_address());
                    put(&mut po, "Primary", p.primary());
                    Value::Object(po)
                })
                .collect();
            eo.insert("PrivateIpAddresses".into(), Value::Array(ips));
            let v6: Vec<Value> = e
                .ipv6_addresses()
                .iter()
                .map(|a| json!({ "Ipv6Address": a.ipv6_address() }))
                .collect();
            eo.insert("Ipv6Addresses".into(), Value::Array(v6));
            let groups: Vec<Value> = e
                .groups()
                .iter()
                .map(|g| {
                    let mut go = Map::new();
                    put(&mut go, "GroupId", g.group_id());
                    put(&mut go, "GroupName", g.group_name());
                    Value::Object(go)
                })
                .collect();
            eo.insert("Groups".into(), Value::Array(groups));
            // Carried so that the importer refuses them: sgfw cannot
            // route to a prefix delegated to an interface.
            if !e.ipv4_prefixes().is_empty() {
                let p: Vec<Value> = e
                    .ipv4_prefixes()
                    .iter()
                    .map(|p| json!({ "Ipv4Prefix": p.ipv4_prefix() }))
                    .collect();
                eo.insert("Ipv4Prefixes".into(), Value::Array(p));
            }
            if !e.ipv6_prefixes().is_empty() {
                let p: Vec<Value> = e
                    .ipv6_prefixes()
                    .iter()
                    .map(|p| json!({ "Ipv6Prefix": p.ipv6_prefix() }))
                    .collect();
                eo.insert("Ipv6Prefixes".into(), Value::Array(p));
            }
            if let Some(ct) = e.connection_tracking_configuration() {
                let mut co = Map::new();
                put(
                    &mut co,
                    "TcpEstablishedTimeout",
                    ct.tcp_established_timeout(),
                );
                put(&mut co, "UdpStreamTimeout", ct.udp_stream_timeout());
                put(&mut co, "UdpTimeout", ct.udp_timeout());
                eo.insert("ConnectionTrackingConfiguration".into(), Value::Object(co));
            }
            Value::Object(eo)
        })
        .collect();
    if i.network_interfaces().is_empty() {
        // An instance described without interfaces (some emulators): its
        // groups are the instance's.
        let groups: Vec<Value> = i
            .security_groups()
            .iter()
            .map(|g| json!({ "GroupId": g.group_id() }))
            .collect();
        o.insert("Groups".into(), Value::Array(groups));
        put(&mut o, "SourceDestCheck", i.source_dest_check());
    } else {
        o.insert("NetworkInterfaces".into(), Value::Array(enis));
    }
    Value::Object(o)
}

fn permission_json(p: &IpPermission) -> Value {
    let mut o = Map::new();
    put(&mut o, "IpProtocol", p.ip_protocol());
    put(&mut o, "FromPort", p.from_port());
    put(&mut o, "ToPort", p.to_port());
    let r4: Vec<Value> = p
        .ip_ranges()
        .iter()
        .map(|r| {
            let mut ro = Map::new();
            put(&mut ro, "CidrIp", r.cidr_ip());
            put(&mut ro, "Description", r.description());
            Value::Object(ro)
        })
        .collect();
    o.insert("IpRanges".into(), Value::Array(r4));
    let r6: Vec<Value> = p
        .ipv6_ranges()
        .iter()
        .map(|r| {
            let mut ro = Map::new();
            put(&mut ro, "CidrIpv6", r.cidr_ipv6());
            put(&mut ro, "Description", r.description());
            Value::Object(ro)
        })
        .collect();
    o.insert("Ipv6Ranges".into(), Value::Array(r6));
    let pairs: Vec<Value> = p
        .user_id_group_pairs()
        .iter()
        .map(|g| {
            let mut go = Map::new();
            put(&mut go, "GroupId", g.group_id());
            put(&mut go, "UserId", g.user_id());
            put(&mut go, "VpcId", g.vpc_id());
            put(&mut go, "Description", g.description());
            // Refused by the importer: a group across a peering.
            put(
                &mut go,
                "VpcPeeringConnectionId",
                g.vpc_peering_connection_id(),
            );
            put(&mut go, "PeeringStatus", g.peering_status());
            Value::Object(go)
        })
        .collect();
    o.insert("UserIdGroupPairs".into(), Value::Array(pairs));
    let lists: Vec<Value> = p
        .prefix_list_ids()
        .iter()
        .map(|l| {
            let mut lo = Map::new();
            put(&mut lo, "PrefixListId", l.prefix_list_id());
            put(&mut lo, "Description", l.description());
            Value::Object(lo)
        })
        .collect();
    o.insert("PrefixListIds".into(), Value::Array(lists));
    Value::Object(o)
}

fn group_json(g: &SecurityGroup) -> Value {
    let mut o = Map::new();
    put(&mut o, "GroupId", g.group_id());
    put(&mut o, "GroupName", g.group_name());
    put(&mut o, "VpcId", g.vpc_id());
    let ing: Vec<Value> = g.ip_permissions().iter().map(permission_json).collect();
    let eg: Vec<Value> = g
        .ip_permissions_egress()
        .iter()
        .map(permission_json)
        .collect();
    o.insert("IpPermissions".into(), Value::Array(ing));
    o.insert("IpPermissionsEgress".into(), Value::Array(eg));
    Value::Object(o)
}

fn nacl_json(n: &NetworkAcl) -> Value {
    let mut o = Map::new();
    put(&mut o, "NetworkAclId", n.network_acl_id());
    put(&mut o, "VpcId", n.vpc_id());
    put(&mut o, "IsDefault", n.is_default());
    let assoc: Vec<Value> = n
        .associations()
        .iter()
        .map(|a| {
            let mut ao = Map::new();
            put(
                &mut ao,
                "NetworkAclAssociationId",
                a.network_acl_association_id(),
            );
            put(&mut ao, "NetworkAclId", a.network_acl_id());
            put(&mut ao, "SubnetId", a.subnet_id());
            Value::Object(ao)
        })
        .collect();
    o.insert("Associations".into(), Value::Array(assoc));
    let entries: Vec<Value> = n
        .entries()
        .iter()
        .map(|e| {
            let mut eo = Map::new();
            put(&mut eo, "RuleNumber", e.rule_number());
            put(&mut eo, "Protocol", e.protocol());
            put(&mut eo, "RuleAction", e.rule_action().map(|a| a.as_str()));
            put(&mut eo, "Egress", e.egress());
            put(&mut eo, "CidrBlock", e.cidr_block());
            put(&mut eo, "Ipv6CidrBlock", e.ipv6_cidr_block());
            if let Some(r) = e.port_range() {
                let mut ro = Map::new();
                put(&mut ro, "From", r.from());
                put(&mut ro, "To", r.to());
                eo.insert("PortRange".into(), Value::Object(ro));
            }
            if let Some(t) = e.icmp_type_code() {
                let mut to = Map::new();
                put(&mut to, "Code", t.code());
                put(&mut to, "Type", t.r#type());
                eo.insert("IcmpTypeCode".into(), Value::Object(to));
            }
            Value::Object(eo)
        })
        .collect();
    o.insert("Entries".into(), Value::Array(entries));
    Value::Object(o)
}

fn prefix_list_json(p: &ManagedPrefixList) -> Value {
    let mut o = Map::new();
    put(&mut o, "PrefixListId", p.prefix_list_id());
    put(&mut o, "PrefixListName", p.prefix_list_name());
    put(&mut o, "AddressFamily", p.address_family());
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    //! The translation keeps what the importer refuses or reads; the round
    //! trip through moto's server is tests/tests/moto.rs.

    use aws_sdk_ec2::types::{
        ConnectionTrackingSpecificationResponse, GroupIdentifier, InstanceIpv4Prefix,
        InstanceNetworkInterface, InstancePrivateIpAddress, InstanceState, InstanceStateName,
        UserIdGroupPair,
    };
    use serde_json::json;

    use super::*;

    fn doc(instance: &Value, groups: &[Value]) -> Value {
        json!({
            "Subnets": [{"SubnetId": "subnet-1", "VpcId": "vpc-1", "CidrBlock": "10.0.1.0/24"}],
            "Reservations": [{"Instances": [instance]}],
            "SecurityGroups": groups,
        })
    }

    fn eni() -> aws_sdk_ec2::types::builders::InstanceNetworkInterfaceBuilder {
        InstanceNetworkInterface::builder()
            .network_interface_id("eni-1")
            .subnet_id("subnet-1")
            .source_dest_check(true)
            .private_ip_addresses(
                InstancePrivateIpAddress::builder()
                    .private_ip_address("10.0.1.5")
                    .primary(true)
                    .build(),
            )
            .groups(GroupIdentifier::builder().group_id("sg-a").build())
    }

    fn instance(e: InstanceNetworkInterface) -> Value {
        instance_json(
            &Instance::builder()
                .instance_id("i-1")
                .vpc_id("vpc-1")
                .state(
                    InstanceState::builder()
                        .name(InstanceStateName::Running)
                        .build(),
                )
                .network_interfaces(e)
                .build(),
        )
    }

    fn opts() -> ImportOptions {
        ImportOptions {
            bridges: [("subnet-1".to_string(), "br-a".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_instance_translates_to_what_import_reads() {
        let ct = ConnectionTrackingSpecificationResponse::builder()
            .tcp_established_timeout(3600)
            .build();
        let i = instance(eni().connection_tracking_configuration(ct).build());
        let got = crate::import::import(&[doc(&i, &[])], &opts()).unwrap();
        let m = &got.model;
        assert_eq!(m.instances.len(), 1);
        assert_eq!(m.instances[0].private_ip_address, "10.0.1.5");
        assert_eq!(m.instances[0].security_group_ids, vec!["sg-a".to_string()]);
        let ct = m.connection_tracking.as_ref().unwrap();
        assert_eq!(ct.tcp_established_timeout, Some(3600));
    }

    #[test]
    fn what_import_refuses_is_carried_over_never_dropped() {
        let refused = [
            (eni().source_dest_check(false).build(), "SourceDestCheck"),
            (
                eni()
                    .ipv4_prefixes(
                        InstanceIpv4Prefix::builder()
                            .ipv4_prefix("10.0.1.16/28")
                            .build(),
                    )
                    .build(),
                "Ipv4Prefixes",
            ),
        ];
        for (e, field) in refused {
            let err = crate::import::import(&[doc(&instance(e), &[])], &opts()).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        // A group referenced across a peering connection.
        let g = SecurityGroup::builder()
            .group_id("sg-a")
            .vpc_id("vpc-1")
            .ip_permissions(
                IpPermission::builder()
                    .ip_protocol("-1")
                    .user_id_group_pairs(
                        UserIdGroupPair::builder()
                            .group_id("sg-peer")
                            .vpc_peering_connection_id("pcx-1")
                            .build(),
                    )
                    .build(),
            )
            .build();
        let d = doc(&instance(eni().build()), &[group_json(&g)]);
        let err = crate::import::import(&[d], &opts()).unwrap_err();
        assert!(err.to_string().contains("VpcPeeringConnectionId"), "{err}");
    }
}
