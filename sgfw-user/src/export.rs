//! Export to Kubernetes: security groups as `networking.k8s.io/v1`
//! NetworkPolicies (one per instance), NACLs as `policy.networking.k8s.io`
//! AdminNetworkPolicies (one per subnet).
//!
//! This module owns the mapping and says plainly what it cannot carry over:
//! every rule NetworkPolicy cannot express (ICMP, protocols other than TCP,
//! UDP and SCTP) is left out of the policy — so the exported policy denies
//! that traffic, never widens it — with a warning naming the rule. It reads
//! the validated model ([`ValidModel`]) so that referenced groups stay
//! groups (pod selectors), not their members' addresses. It must never emit
//! a peer or port broader than the rule it came from.
//!
//! NetworkPolicy objects come from the typed `k8s-openapi` schema;
//! AdminNetworkPolicy is not in it (it is a SIG Network CRD), so its types
//! are written here after `policy.networking.k8s.io/v1alpha1`.

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::policy::{
    Direction, Match, NaclEntry, PROTO_TCP, PROTO_UDP, RuleAction, ValidModel, ValidPermission,
    ValidRemote,
};

/// SCTP's protocol number.
const PROTO_SCTP: u8 = 132;

/// Label names the exported objects select on.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The pod label that carries the instance id (default `sgfw.io/instance`).
    pub instance_label: String,
    /// The prefix of the per-group labels: a pod in group `sg-x` carries
    /// `<prefix>sg-x: "true"` (default `sg.sgfw.io/`).
    pub group_label_prefix: String,
    /// The pod label that carries the subnet id (default `sgfw.io/subnet`).
    pub subnet_label: String,
    /// Namespace of the NetworkPolicies (default `default`).
    pub namespace: String,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            instance_label: "sgfw.io/instance".into(),
            group_label_prefix: "sg.sgfw.io/".into(),
            subnet_label: "sgfw.io/subnet".into(),
            namespace: "default".into(),
        }
    }
}

/// What the export produced.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    /// One per instance.
    pub network_policies: Vec<NetworkPolicy>,
    /// One per subnet.
    pub admin_network_policies: Vec<AdminNetworkPolicy>,
    /// What could not be carried over, and what the export does instead.
    pub warnings: Vec<String>,
}

impl Exported {
    /// A `v1` `List` of every object, as `kubectl apply -f` takes it.
    pub fn to_list(&self) -> serde_json::Value {
        let mut items: Vec<serde_json::Value> = self
            .network_policies
            .iter()
            .filter_map(|p| serde_json::to_value(p).ok())
            .collect();
        items.extend(
            self.admin_network_policies
                .iter()
                .filter_map(|p| serde_json::to_value(p).ok()),
        );
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
    }
}

/// `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminNetworkPolicy {
    /// `policy.networking.k8s.io/v1alpha1`.
    pub api_version: &'static str,
    /// `AdminNetworkPolicy`.
    pub kind: &'static str,
    /// Name and labels.
    pub metadata: ObjectMeta,
    /// The policy.
    pub spec: AnpSpec,
}

/// The spec of an [`AdminNetworkPolicy`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AnpSpec {
    /// 0-1000, lower first.
    pub priority: u32,
    /// The pods it applies to.
    pub subject: AnpSubject,
    /// Inbound rules, in order (the first match decides).
    pub ingress: Vec<AnpRule>,
    /// Outbound rules, in order.
    pub egress: Vec<AnpRule>,
}

/// The subject of an [`AdminNetworkPolicy`]: pods in any namespace.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AnpSubject {
    /// Pods matching the selectors.
    pub pods: AnpPods,
}

/// A namespace and pod selector pair.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AnpPods {
    /// Namespaces (empty: all).
    pub namespace_selector: LabelSelector,
    /// Pods within them.
    pub pod_selector: LabelSelector,
}

/// One rule of an [`AdminNetworkPolicy`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AnpRule {
    /// `nacl-<id>-<in|out>-<rule number>`.
    pub name: String,
    /// `Pass` (a NACL allow: the security groups decide) or `Deny`.
    pub action: &'static str,
    /// Peers: in `from` for ingress, `to` for egress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<AnpPeer>>,
    /// Peers of an egress rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<AnpPeer>>,
    /// Ports; absent = all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<AnpPort>>,
}

/// A peer of an [`AnpRule`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AnpPeer {
    /// Pods in namespaces.
    Pods(AnpPods),
    /// CIDRs (egress only in v1alpha1).
    Networks(Vec<String>),
}

/// A port of an [`AnpRule`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AnpPort {
    /// One port.
    PortNumber {
        /// `TCP`, `UDP` or `SCTP`.
        protocol: &'static str,
        /// The port.
        port: u16,
    },
    /// A range.
    PortRange {
        /// `TCP`, `UDP` or `SCTP`.
        protocol: &'static str,
        /// First port.
        start: u16,
        /// Last port.
        end: u16,
    },
}

fn proto_name(p: u8) -> Option<&'static str> {
    match p {
        PROTO_TCP => Some("TCP"),
        PROTO_UDP => Some("UDP"),
        PROTO_SCTP => Some("SCTP"),
        _ => None,
    }
}

/// A Kubernetes object name from an id: lower case, `[a-z0-9-.]`.
fn k8s_name(id: &str) -> String {
    let s: String = id
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.trim_matches(|c| c == '-' || c == '.')
        .chars()
        .take(253)
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        ),
        ..LabelSelector::default()
    }
}

/// NetworkPolicy ports for a matcher: `Some(None)` = every port and
/// protocol, `Some(Some(ports))` = those, `None` = not expressible.
fn np_ports(m: &Match) -> Option<Option<Vec<NetworkPolicyPort>>> {
    match *m {
        Match::All => Some(None),
        Match::Proto(p) => proto_name(p).map(|name| {
            Some(vec![NetworkPolicyPort {
                protocol: Some(name.into()),
                ..NetworkPolicyPort::default()
            }])
        }),
        Match::Ports { proto, from, to } => proto_name(proto).map(|name| {
            Some(vec![NetworkPolicyPort {
                protocol: Some(name.into()),
                port: Some(IntOrString::Int(i32::from(from))),
                end_port: (to != from).then_some(i32::from(to)),
            }])
        }),
        Match::Icmp { .. } => None,
    }
}

fn np_peers(
    remotes: &[ValidRemote],
    model: &ValidModel,
    opts: &ExportOptions,
) -> Vec<NetworkPolicyPeer> {
    let mut peers = Vec::new();
    for r in remotes {
        match r {
            ValidRemote::Cidr(net) => peers.push(ip_block(net)),
            ValidRemote::Group(g) => {
                let key = format!("{}{g}", opts.group_label_prefix);
                peers.push(NetworkPolicyPeer {
                    // Pods of the group in every namespace.
                    namespace_selector: Some(LabelSelector::default()),
                    pod_selector: Some(labels(&[(&key, "true")])),
                    ..NetworkPolicyPeer::default()
                });
            }
            ValidRemote::PrefixList(p) => {
                peers.extend(
                    model
                        .prefix_lists
                        .get(p)
                        .into_iter()
                        .flatten()
                        .map(ip_block),
                );
            }
        }
    }
    peers
}

fn ip_block(net: &IpNet) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: net.to_string(),
            except: None,
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// Exports a validated model.
pub fn export(model: &ValidModel, opts: &ExportOptions) -> Exported {
    let mut warnings = Vec::new();
    let mut network_policies = Vec::new();
    for inst in &model.instances {
        let mut ingress = Vec::new();
        let mut egress = Vec::new();
        for gid in &inst.groups {
            let Some(g) = model.groups.get(gid) else {
                continue;
            };
            for (dir, perms) in [
                (Direction::Ingress, &g.ingress),
                (Direction::Egress, &g.egress),
            ] {
                for (i, perm) in perms.iter().enumerate() {
                    let ValidPermission { matcher, remotes } = perm;
                    let Some(ports) = np_ports(matcher) else {
                        warnings.push(format!(
                            "{gid}/{}[{i}] ({matcher}) of {}: NetworkPolicy cannot express it; the exported policy leaves it out, so that traffic is denied",
                            dir.name(),
                            inst.id
                        ));
                        continue;
                    };
                    let peers = np_peers(remotes, model, opts);
                    if peers.is_empty() {
                        // A rule whose remotes resolve to nothing matches
                        // nothing; an empty peer list would match everyone.
                        continue;
                    }
                    match dir {
                        Direction::Ingress => ingress.push(NetworkPolicyIngressRule {
                            from: Some(peers),
                            ports,
                        }),
                        Direction::Egress => egress.push(NetworkPolicyEgressRule {
                            to: Some(peers),
                            ports,
                        }),
                    }
                }
            }
        }
        network_policies.push(NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(format!("sgfw-{}", k8s_name(&inst.id))),
                namespace: Some(opts.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "sgfw".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(labels(&[(&opts.instance_label, &inst.id)])),
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ingress: Some(ingress),
                egress: Some(egress),
            }),
        });
    }

    let mut admin_network_policies = Vec::new();
    for (n, s) in model.subnets.iter().enumerate() {
        let rules = |entries: &[NaclEntry], dir: Direction, warnings: &mut Vec<String>| {
            let mut out = Vec::new();
            for e in entries {
                let name = format!(
                    "{}-{}-{}",
                    k8s_name(&s.nacl_id),
                    if dir == Direction::Ingress {
                        "in"
                    } else {
                        "out"
                    },
                    e.rule_number
                );
                let what = format!(
                    "{} rule {} ({} {})",
                    s.nacl_id, e.rule_number, e.action, e.matcher
                );
                let ports = match e.matcher {
                    Match::All => None,
                    Match::Proto(p) => {
                        match proto_name(p) {
                            // A whole protocol: every port of it.
                            Some(pn) => Some(vec![AnpPort::PortRange {
                                protocol: pn,
                                start: 1,
                                end: 65535,
                            }]),
                            None => {
                                warnings.push(format!("{what}: AdminNetworkPolicy cannot express this protocol; left out"));
                                continue;
                            }
                        }
                    }
                    Match::Ports { proto, from, to } => match proto_name(proto) {
                        Some(pn) if from == to => Some(vec![AnpPort::PortNumber {
                            protocol: pn,
                            port: from,
                        }]),
                        Some(pn) => Some(vec![AnpPort::PortRange {
                            protocol: pn,
                            start: from,
                            end: to,
                        }]),
                        None => continue,
                    },
                    Match::Icmp { .. } => {
                        warnings.push(format!(
                            "{what}: AdminNetworkPolicy cannot express ICMP; left out"
                        ));
                        continue;
                    }
                };
                let everywhere = e.cidr.prefix_len() == 0;
                let peer = match dir {
                    Direction::Egress => AnpPeer::Networks(vec![e.cidr.to_string()]),
                    // v1alpha1 ingress peers are pods only: a CIDR cannot be
                    // said, except "everything" (every pod).
                    Direction::Ingress if everywhere => AnpPeer::Pods(AnpPods {
                        namespace_selector: LabelSelector::default(),
                        pod_selector: LabelSelector::default(),
                    }),
                    Direction::Ingress => {
                        warnings.push(format!(
                            "{what}: AdminNetworkPolicy ingress cannot select the CIDR {}; left out, so the rules after it decide that traffic",
                            e.cidr
                        ));
                        continue;
                    }
                };
                let action = match e.action {
                    RuleAction::Allow => "Pass",
                    RuleAction::Deny => "Deny",
                };
                let (from, to) = match dir {
                    Direction::Ingress => (Some(vec![peer]), None),
                    Direction::Egress => (None, Some(vec![peer])),
                };
                out.push(AnpRule {
                    name,
                    action,
                    from,
                    to,
                    ports,
                });
            }
            out
        };
        let mut ingress = rules(&s.inbound, Direction::Ingress, &mut warnings);
        let mut egress = rules(&s.outbound, Direction::Egress, &mut warnings);
        // The NACL's final `*` entry: what no rule matched is denied.
        ingress.push(AnpRule {
            name: format!("{}-in-default-deny", k8s_name(&s.nacl_id)),
            action: "Deny",
            from: Some(vec![AnpPeer::Pods(AnpPods {
                namespace_selector: LabelSelector::default(),
                pod_selector: LabelSelector::default(),
            })]),
            to: None,
            ports: None,
        });
        egress.push(AnpRule {
            name: format!("{}-out-default-deny", k8s_name(&s.nacl_id)),
            action: "Deny",
            from: None,
            to: Some(vec![AnpPeer::Networks(vec![
                "0.0.0.0/0".into(),
                "::/0".into(),
            ])]),
            ports: None,
        });
        admin_network_policies.push(AdminNetworkPolicy {
            api_version: "policy.networking.k8s.io/v1alpha1",
            kind: "AdminNetworkPolicy",
            metadata: ObjectMeta {
                name: Some(format!("sgfw-{}", k8s_name(&s.id))),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "sgfw".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: AnpSpec {
                priority: u32::try_from(n).unwrap_or(u32::MAX).min(1000),
                subject: AnpSubject {
                    pods: AnpPods {
                        namespace_selector: LabelSelector::default(),
                        pod_selector: labels(&[(&opts.subnet_label, &s.id)]),
                    },
                },
                ingress,
                egress,
            },
        });
    }
    if !model.subnets.is_empty() {
        warnings.push(
            "NACLs are stateless and skip traffic within their subnet; AdminNetworkPolicy implementations track connections and apply to every peer, so replies the NACL would judge again pass, and same-subnet traffic is judged by it too; its ingress default deny covers pods only (v1alpha1 ingress peers cannot name outside addresses)"
                .into(),
        );
    }
    Exported {
        network_policies,
        admin_network_policies,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    //! Golden exports of every example and golden model, and the mapping's
    //! promises checked one by one.
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::testutil::FIXTURE;

    fn valid(json: &str) -> ValidModel {
        let m = crate::model::Model::from_json(json).unwrap();
        crate::validate::validate(&m).unwrap().0
    }

    fn golden_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/k8s")
    }

    /// Each export equals `tests/golden/k8s/<name>.json`; `SGFW_BLESS=1`
    /// rewrites them.
    #[test]
    fn golden_exports() {
        let bless = std::env::var("SGFW_BLESS").is_ok_and(|v| v == "1");
        let cases = crate::testutil::golden_models();
        assert!(cases.len() >= 5);
        std::fs::create_dir_all(golden_dir()).unwrap();
        let mut failed = Vec::new();
        for (name, json) in cases {
            let e = export(&valid(&json), &ExportOptions::default());
            let text = serde_json::to_string_pretty(&serde_json::json!({
                "objects": e.to_list(),
                "warnings": e.warnings,
            }))
            .unwrap()
                + "\n";
            let path = golden_dir().join(format!("{name}.json"));
            if bless {
                std::fs::write(&path, &text).unwrap();
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(want) if want == text => {}
                Ok(_) => failed.push(format!("{name}: differs (SGFW_BLESS=1, then review)")),
                Err(_) => failed.push(format!("{name}: missing (SGFW_BLESS=1)")),
            }
        }
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[test]
    fn groups_become_pod_selectors_and_icmp_is_left_out_with_a_warning() {
        let e = export(&valid(FIXTURE), &ExportOptions::default());
        let db = e
            .network_policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("sgfw-i-db"))
            .unwrap();
        let spec = db.spec.as_ref().unwrap();
        let ing = spec.ingress.as_ref().unwrap();
        assert_eq!(ing.len(), 1, "tcp 5432 from sg-web");
        let peer = &ing[0].from.as_ref().unwrap()[0];
        assert_eq!(
            peer.pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["sg.sgfw.io/sg-web"],
            "true"
        );
        let port = &ing[0].ports.as_ref().unwrap()[0];
        assert_eq!(port.port, Some(IntOrString::Int(5432)));
        assert_eq!(port.protocol.as_deref(), Some("TCP"));
        // sg-db has no egress rules: the policy denies all egress.
        assert_eq!(spec.egress.as_ref().map(Vec::len), Some(0));
        // web's ICMP echo rule cannot be said: left out, named in a warning.
        let web = e
            .network_policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("sgfw-i-web1"))
            .unwrap();
        let ing = web.spec.as_ref().unwrap().ingress.as_ref().unwrap();
        assert!(
            ing.iter().all(|r| r.ports.is_some()),
            "no rule widened to all ports"
        );
        assert!(
            e.warnings.iter().any(|w| w.contains("sg-web/ingress[1]")
                && w.contains("icmp")
                && w.contains("denied")),
            "{:#?}",
            e.warnings
        );
    }

    #[test]
    fn nacl_entries_keep_their_order_and_end_in_a_deny() {
        let e = export(&valid(FIXTURE), &ExportOptions::default());
        let anp = e
            .admin_network_policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("sgfw-subnet-a"))
            .unwrap();
        let names: Vec<&str> = anp.spec.egress.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["acl-a-out-100", "acl-a-out-101", "acl-a-out-default-deny"]
        );
        assert!(anp.spec.egress[..2].iter().all(|r| r.action == "Pass"));
        assert_eq!(anp.spec.egress[2].action, "Deny");
    }
}
