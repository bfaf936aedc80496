//! A VPC held in memory and changed one EC2 call at a time.
//!
//! An emulator calls AuthorizeSecurityGroupIngress, RevokeSecurityGroupEgress,
//! RunInstances, ReplaceNetworkAclEntry and the like one at a time and
//! expects each to take effect at once. [`Vpc`] keeps the model, its
//! validation and its flattening; a [`Delta`] changes a copy of the model,
//! validates it, re-flattens only the instances the change can reach
//! ([`crate::flat::reflatten`]) and applies the result through the
//! [`Enforcer`] (whose backends write only the policies that changed).
//!
//! This module owns the EC2 meaning of each delta (what a revoke removes,
//! what a duplicate authorize is) and the all-or-nothing rule: a delta that
//! fails — bad input, a validation error, a backend failure — leaves the
//! model, and what is enforced, exactly as they were. It must never touch
//! the kernel itself; everything goes through the [`Enforcer`].

use crate::backend::{Applied, EnforceError, Enforcer};
use crate::flat::{FlatModel, reflatten};
use crate::model::{Instance, IpPermission, Model, NaclAssociation, NetworkAclEntry};
use crate::policy::ValidModel;
use crate::validate::{ValidationErrors, validate, validate_owned};

/// Why a delta was refused; the model and the enforcement are unchanged.
#[derive(Debug, thiserror::Error)]
pub enum VpcError {
    /// The delta names something the model does not have.
    #[error("{what} {id} does not exist")]
    NotFound {
        /// `SecurityGroup`, `Instance`, `NetworkAcl`, `Subnet`, `NetworkAclEntry`.
        what: &'static str,
        /// The id it named.
        id: String,
    },
    /// An instance id that is taken.
    #[error("Instance {0} already exists")]
    InstanceExists(String),
    /// Authorize of a rule the group already has (EC2: InvalidPermission.Duplicate).
    #[error("{group_id}: the {direction} rule {rule} already exists (InvalidPermission.Duplicate)")]
    Duplicate {
        /// The group.
        group_id: String,
        /// `ingress` or `egress`.
        direction: &'static str,
        /// The rule, as protocol, ports and remote.
        rule: String,
    },
    /// Revoke of a rule the group does not have (EC2: InvalidPermission.NotFound).
    #[error("{group_id}: no {direction} rule {rule} to revoke (InvalidPermission.NotFound)")]
    PermissionNotFound {
        /// The group.
        group_id: String,
        /// `ingress` or `egress`.
        direction: &'static str,
        /// The rule, as protocol, ports and remote.
        rule: String,
    },
    /// The changed model is invalid (every error, each naming its field).
    #[error("the change makes the model invalid:\n{0}")]
    Invalid(#[source] ValidationErrors),
    /// The backend could not enforce the changed model; the previous policy
    /// stays in force.
    #[error("enforcing the change")]
    Enforce(#[source] EnforceError),
}

/// One change, in the terms of the EC2 call that makes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// AuthorizeSecurityGroupIngress (`egress: false`) or …Egress.
    Authorize {
        /// The group.
        group_id: String,
        /// Which rules.
        egress: bool,
        /// The permissions, as EC2 takes them.
        permissions: Vec<IpPermission>,
    },
    /// RevokeSecurityGroupIngress or …Egress: removes each remote of each
    /// permission from the group's permissions of the same protocol and ports.
    Revoke {
        /// The group.
        group_id: String,
        /// Which rules.
        egress: bool,
        /// The permissions, as EC2 takes them.
        permissions: Vec<IpPermission>,
    },
    /// RunInstances (one instance).
    AddInstance(Instance),
    /// TerminateInstances (one instance).
    RemoveInstance {
        /// The instance.
        instance_id: String,
    },
    /// ModifyInstanceAttribute `--groups`: the instance's groups, replaced.
    SetInstanceGroups {
        /// The instance.
        instance_id: String,
        /// Its new groups.
        security_group_ids: Vec<String>,
    },
    /// CreateNetworkAclEntry or ReplaceNetworkAclEntry: the entry of this
    /// rule number and direction, added or replaced.
    ReplaceNaclEntry {
        /// The NACL.
        network_acl_id: String,
        /// The entry.
        entry: NetworkAclEntry,
    },
    /// DeleteNetworkAclEntry.
    DeleteNaclEntry {
        /// The NACL.
        network_acl_id: String,
        /// Its rule number.
        rule_number: i64,
        /// Its direction.
        egress: bool,
    },
    /// ReplaceNetworkAclAssociation: the subnet now uses this NACL.
    AssociateNacl {
        /// The subnet.
        subnet_id: String,
        /// The NACL.
        network_acl_id: String,
    },
}

/// A VPC: its model, validated and flattened, enforced by an [`Enforcer`].
#[derive(Debug)]
pub struct Vpc {
    enforcer: Enforcer,
    valid: ValidModel,
    flat: FlatModel,
}

/// Frees a model that was replaced off the caller's path: freeing the
/// 1,000-instance model's strings and maps took ≈4 ms of each delta. On a
/// short-lived thread; inline when no thread can be started.
fn drop_later(old: ValidModel) {
    // A failed spawn drops the closure, and the model with it, here.
    let _ = std::thread::Builder::new()
        .name("sgfw-drop".into())
        .spawn(move || drop(old));
}

/// A protocol name or number as one canonical string (`-1` for all).
fn canonical_protocol(p: &str) -> String {
    match p.to_ascii_lowercase().as_str() {
        "-1" | "all" => "-1".into(),
        "tcp" | "6" => "6".into(),
        "udp" | "17" => "17".into(),
        "icmp" | "1" => "1".into(),
        "icmpv6" | "58" => "58".into(),
        other => other.into(),
    }
}

/// What identifies a permission's rules apart from their remotes.
fn shape(p: &IpPermission) -> (String, Option<i64>, Option<i64>) {
    let proto = canonical_protocol(&p.ip_protocol);
    if proto == "-1" {
        (proto, None, None)
    } else {
        let norm = |v: Option<i64>| v.filter(|x| *x != -1);
        (proto, norm(p.from_port), norm(p.to_port))
    }
}

/// One remote of a permission, by the text EC2 names it with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Remote {
    V4(String),
    V6(String),
    Group(String),
    List(String),
}

impl Remote {
    fn name(&self) -> &str {
        match self {
            Remote::V4(s) | Remote::V6(s) | Remote::Group(s) | Remote::List(s) => s,
        }
    }
}

/// Every remote of a permission.
fn remotes(p: &IpPermission) -> Vec<Remote> {
    p.ip_ranges
        .iter()
        .map(|r| Remote::V4(r.cidr_ip.clone()))
        .chain(
            p.ipv6_ranges
                .iter()
                .map(|r| Remote::V6(r.cidr_ipv6.clone())),
        )
        .chain(
            p.user_id_group_pairs
                .iter()
                .map(|g| Remote::Group(g.group_id.clone())),
        )
        .chain(
            p.prefix_list_ids
                .iter()
                .map(|l| Remote::List(l.prefix_list_id.clone())),
        )
        .collect()
}

/// Removes one remote from a permission.
fn remove_remote(p: &mut IpPermission, r: &Remote) {
    match r {
        Remote::V4(c) => p.ip_ranges.retain(|x| &x.cidr_ip != c),
        Remote::V6(c) => p.ipv6_ranges.retain(|x| &x.cidr_ipv6 != c),
        Remote::Group(g) => p.user_id_group_pairs.retain(|x| &x.group_id != g),
        Remote::List(l) => p.prefix_list_ids.retain(|x| &x.prefix_list_id != l),
    }
}

/// One rule (a permission's protocol and ports, one remote) for a message.
fn describe(p: &IpPermission, r: &Remote) -> String {
    match shape(p) {
        (proto, Some(lo), Some(hi)) => {
            format!("protocol {proto} ports {lo}-{hi} from/to {}", r.name())
        }
        (proto, _, _) => format!("protocol {proto} from/to {}", r.name()),
    }
}

/// A group's ingress or egress permissions.
fn permissions_of<'m>(
    m: &'m mut Model,
    group_id: &str,
    egress: bool,
) -> Result<&'m mut Vec<IpPermission>, VpcError> {
    let sg = m
        .security_groups
        .iter_mut()
        .find(|g| g.group_id == group_id)
        .ok_or_else(|| VpcError::NotFound {
            what: "SecurityGroup",
            id: group_id.to_string(),
        })?;
    Ok(if egress {
        &mut sg.ip_permissions_egress
    } else {
        &mut sg.ip_permissions
    })
}

/// A network ACL by id.
fn nacl_of<'m>(
    m: &'m mut Model,
    network_acl_id: &str,
) -> Result<&'m mut crate::model::NetworkAcl, VpcError> {
    m.network_acls
        .iter_mut()
        .find(|a| a.network_acl_id == network_acl_id)
        .ok_or_else(|| VpcError::NotFound {
            what: "NetworkAcl",
            id: network_acl_id.to_string(),
        })
}

/// `model` with `delta` made, or why it cannot be (nothing validated yet).
pub fn change(model: &Model, delta: &Delta) -> Result<Model, VpcError> {
    let mut m = model.clone();
    let dir = |egress: bool| if egress { "egress" } else { "ingress" };
    match delta {
        Delta::Authorize {
            group_id,
            egress,
            permissions,
        } => {
            let perms = permissions_of(&mut m, group_id, *egress)?;
            for p in permissions {
                for r in remotes(p) {
                    if perms
                        .iter()
                        .any(|q| shape(q) == shape(p) && remotes(q).contains(&r))
                    {
                        return Err(VpcError::Duplicate {
                            group_id: group_id.clone(),
                            direction: dir(*egress),
                            rule: describe(p, &r),
                        });
                    }
                }
                // Appended, so the rules already in force keep their
                // positions (and their compiled policies stay valid).
                perms.push(p.clone());
            }
        }
        Delta::Revoke {
            group_id,
            egress,
            permissions,
        } => {
            let perms = permissions_of(&mut m, group_id, *egress)?;
            for p in permissions {
                for r in remotes(p) {
                    let mut found = false;
                    for q in perms.iter_mut() {
                        if shape(q) == shape(p) && remotes(q).contains(&r) {
                            remove_remote(q, &r);
                            found = true;
                        }
                    }
                    if !found {
                        return Err(VpcError::PermissionNotFound {
                            group_id: group_id.clone(),
                            direction: dir(*egress),
                            rule: describe(p, &r),
                        });
                    }
                }
            }
            perms.retain(|q| !remotes(q).is_empty());
        }
        Delta::AddInstance(inst) => {
            if m.instances
                .iter()
                .any(|i| i.instance_id == inst.instance_id)
            {
                return Err(VpcError::InstanceExists(inst.instance_id.clone()));
            }
            m.instances.push(inst.clone());
        }
        Delta::RemoveInstance { instance_id } => {
            let before = m.instances.len();
            m.instances.retain(|i| &i.instance_id != instance_id);
            if m.instances.len() == before {
                return Err(VpcError::NotFound {
                    what: "Instance",
                    id: instance_id.clone(),
                });
            }
        }
        Delta::SetInstanceGroups {
            instance_id,
            security_group_ids,
        } => {
            let inst = m
                .instances
                .iter_mut()
                .find(|i| &i.instance_id == instance_id)
                .ok_or_else(|| VpcError::NotFound {
                    what: "Instance",
                    id: instance_id.clone(),
                })?;
            inst.security_group_ids = security_group_ids.clone();
        }
        Delta::ReplaceNaclEntry {
            network_acl_id,
            entry,
        } => {
            let acl = nacl_of(&mut m, network_acl_id)?;
            acl.entries
                .retain(|e| !(e.rule_number == entry.rule_number && e.egress == entry.egress));
            acl.entries.push(entry.clone());
        }
        Delta::DeleteNaclEntry {
            network_acl_id,
            rule_number,
            egress,
        } => {
            let acl = nacl_of(&mut m, network_acl_id)?;
            let before = acl.entries.len();
            acl.entries
                .retain(|e| !(e.rule_number == *rule_number && e.egress == *egress));
            if acl.entries.len() == before {
                return Err(VpcError::NotFound {
                    what: "NetworkAclEntry",
                    id: format!(
                        "{network_acl_id} {} rule {rule_number}",
                        if *egress { "egress" } else { "ingress" }
                    ),
                });
            }
        }
        Delta::AssociateNacl {
            subnet_id,
            network_acl_id,
        } => {
            if !m.subnets.iter().any(|s| &s.subnet_id == subnet_id) {
                return Err(VpcError::NotFound {
                    what: "Subnet",
                    id: subnet_id.clone(),
                });
            }
            if !m
                .network_acls
                .iter()
                .any(|a| &a.network_acl_id == network_acl_id)
            {
                return Err(VpcError::NotFound {
                    what: "NetworkAcl",
                    id: network_acl_id.clone(),
                });
            }
            for a in &mut m.network_acls {
                a.associations.retain(|s| &s.subnet_id != subnet_id);
            }
            if let Some(a) = m
                .network_acls
                .iter_mut()
                .find(|a| &a.network_acl_id == network_acl_id)
            {
                a.associations.push(NaclAssociation {
                    subnet_id: subnet_id.clone(),
                    network_acl_association_id: None,
                });
            }
        }
    }
    Ok(m)
}

impl Vpc {
    /// Validates, flattens and enforces `model` (a whole apply).
    ///
    /// # Errors
    ///
    /// [`VpcError::Invalid`] or [`VpcError::Enforce`]; nothing is changed.
    pub fn new(model: &Model, enforcer: Enforcer) -> Result<(Vpc, Applied), VpcError> {
        let (valid, _) = validate(model).map_err(VpcError::Invalid)?;
        let flat = valid.flatten();
        let applied = enforcer.apply(&flat).map_err(VpcError::Enforce)?;
        Ok((
            Vpc {
                enforcer,
                valid,
                flat,
            },
            applied,
        ))
    }

    /// The model in force.
    pub fn model(&self) -> &Model {
        self.valid.model()
    }

    /// Its flattened view.
    pub fn flat(&self) -> &FlatModel {
        &self.flat
    }

    /// The enforcer.
    pub fn enforcer(&self) -> &Enforcer {
        &self.enforcer
    }

    /// Makes one change and enforces it, or changes nothing.
    ///
    /// # Errors
    ///
    /// Any [`VpcError`]: the model and what is enforced are as before.
    pub fn apply(&mut self, delta: &Delta) -> Result<Applied, VpcError> {
        let m = change(self.valid.model(), delta)?;
        let (valid, _) = validate_owned(m).map_err(VpcError::Invalid)?;
        self.replace_validated(valid)
    }

    /// Makes several changes as one: all are enforced, or none.
    ///
    /// # Errors
    ///
    /// The first failing delta's [`VpcError`]; nothing is changed.
    pub fn apply_all(&mut self, deltas: &[Delta]) -> Result<Applied, VpcError> {
        let mut m = self.valid.model().clone();
        for d in deltas {
            m = change(&m, d)?;
        }
        let (valid, _) = validate_owned(m).map_err(VpcError::Invalid)?;
        self.replace_validated(valid)
    }

    /// Replaces the whole model (as `sgfw run` does when the model file
    /// changes); only what differs is re-flattened and rewritten.
    ///
    /// # Errors
    ///
    /// Any [`VpcError`]: the model and what is enforced are as before.
    pub fn replace(&mut self, model: &Model) -> Result<Applied, VpcError> {
        let (valid, _) = validate(model).map_err(VpcError::Invalid)?;
        self.replace_validated(valid)
    }

    /// [`Vpc::replace`] with a model the caller validated (and showed the
    /// warnings of) already.
    ///
    /// # Errors
    ///
    /// [`VpcError::Enforce`]: the model and what is enforced are as before.
    pub fn replace_validated(&mut self, valid: ValidModel) -> Result<Applied, VpcError> {
        let t = std::time::Instant::now();
        // The old flattening is moved, not copied, into the new one; if the
        // backend refuses the change it is derived again (the failure path
        // only).
        let old_flat = std::mem::take(&mut self.flat);
        let flat = reflatten(&self.valid, old_flat, &valid);
        let flattened = t.elapsed();
        match self.enforcer.update(&flat) {
            Ok(applied) => {
                tracing::debug!(
                    "vpc: reflatten {} us, enforce {} us",
                    flattened.as_micros(),
                    (t.elapsed() - flattened).as_micros()
                );
                let old = std::mem::replace(&mut self.valid, valid);
                self.flat = flat;
                drop_later(old);
                Ok(applied)
            }
            Err(e) => {
                self.flat = self.valid.flatten();
                Err(VpcError::Enforce(e))
            }
        }
    }
}
