//! What a verdict is told as: the deciding stage and rule in words for
//! `sgfw explain`, and the same as JSON. It owns the wording only and must
//! never judge: the verdict comes from [`super::evaluate`] or
//! [`super::explain_new_flow`].

use super::*;

/// What decided a stage, for people: the SG rule (`sg-web/egress[0]`), or
/// the NACL and its rule (`acl-web rule 100`), or why nothing matched.
pub fn decider_text(model: &FlatModel, pkt: &Packet, stage: &StageResult) -> String {
    let nacl_end = match stage.stage {
        Stage::NaclOut => Some(pkt.src),
        Stage::NaclIn => Some(pkt.dst),
        Stage::SgEgress | Stage::SgIngress => None,
    };
    match nacl_end
        .and_then(|a| model.instance_by_addr(a))
        .and_then(|i| model.subnet_of(i))
    {
        Some(subnet) => format!("{} {}", subnet.nacl_id, stage.by),
        None => stage.by.to_string(),
    }
}

/// The verdict as `sgfw explain` prints it: `ALLOW` or `DENY`, then one line
/// per stage (`sg-egress   allow  sg-web/egress[0]`), or the passthrough class.
pub fn explain_text(model: &FlatModel, pkt: &Packet, verdict: &Verdict) -> String {
    let mut out = String::from(if verdict.allowed { "ALLOW\n" } else { "DENY\n" });
    if let Some(b) = verdict.blocked {
        out.push_str(&format!("{:<12}{}\n", "blocked", b.name()));
    }
    if let Some(class) = verdict.passthrough {
        out.push_str(&format!("{:<12}{class}\n", "passthrough"));
    } else if verdict.stages.is_empty() && verdict.blocked.is_none() {
        out.push_str("no stage: neither address belongs to an instance of the model\n");
    }
    for s in &verdict.stages {
        let word = if s.allowed { "allow" } else { "deny" };
        out.push_str(&format!(
            "{:<12}{word:<7}{}\n",
            s.stage.name(),
            decider_text(model, pkt, s)
        ));
    }
    out
}

/// The verdict as `sgfw explain --json` prints it:
/// `{"verdict": "allow"|"deny", "stages": [{"stage", "verdict", "rule"}], "passthrough": null|"dhcp"|..., "blocked": null|"not-carried"|...}`.
pub fn explain_json(model: &FlatModel, pkt: &Packet, verdict: &Verdict) -> serde_json::Value {
    let word = |allowed: bool| if allowed { "allow" } else { "deny" };
    let stages: Vec<serde_json::Value> = verdict
        .stages
        .iter()
        .map(|s| {
            serde_json::json!({
                "stage": s.stage.name(),
                "verdict": word(s.allowed),
                "rule": decider_text(model, pkt, s),
            })
        })
        .collect();
    serde_json::json!({
        "verdict": word(verdict.allowed),
        "stages": stages,
        "passthrough": verdict.passthrough.map(PassthroughClass::name),
        "blocked": verdict.blocked.map(Blocked::name),
        "explanation_code": explanation_code(verdict),
    })
}

/// The AWS Reachability Analyzer explanation code of what decided a denied
/// verdict: `ENI_SG_RULES_MISMATCH` for a security-group stage,
/// `SUBNET_ACL_RESTRICTION` for a NACL stage,
/// `ENI_SOURCE_DEST_CHECK_RESTRICTION` for the source or destination check;
/// `None` when allowed, or for a drop the Analyzer has no code for (VLAN
/// tags, broadcast and multicast, orphan fragments, ports not attached yet).
pub fn explanation_code(verdict: &Verdict) -> Option<&'static str> {
    if verdict.allowed {
        return None;
    }
    match verdict.blocked {
        Some(Blocked::SourceCheck | Blocked::NotForInstance) => {
            return Some("ENI_SOURCE_DEST_CHECK_RESTRICTION");
        }
        Some(_) => return None,
        None => {}
    }
    let denied = verdict.stages.iter().find(|s| !s.allowed)?;
    Some(if denied.stage.is_nacl() {
        "SUBNET_ACL_RESTRICTION"
    } else {
        "ENI_SG_RULES_MISMATCH"
    })
}
