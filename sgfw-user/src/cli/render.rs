//! `sgfw render`: print what a backend would write, without privileges — the
//! nft ruleset, or a readable dump of every BPF map entry.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use sgfw::ebpf::compile::{Indices, compile};

use super::{Failure, load_model};

/// Which backend's output to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RenderBackend {
    /// The BPF map contents.
    Ebpf,
    /// The nft ruleset (`nft -f` input).
    Nftables,
}

/// Print what a backend would write, without privileges.
///
/// Example: `sgfw render --backend nftables -f vpc.json > sgfw.nft`
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  sgfw render --backend nftables -f vpc.json > sgfw.nft\n  sgfw render --backend ebpf -f vpc.json"
)]
pub struct RenderArgs {
    /// The model (EC2 JSON); `-` reads standard input.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Which backend.
    #[arg(long, value_enum)]
    pub backend: RenderBackend,
}

/// Runs `sgfw render`.
pub fn run(a: &RenderArgs) -> Result<ExitCode, Failure> {
    let (_, flat) = load_model(&a.file)?;
    match a.backend {
        RenderBackend::Nftables => {
            let text = sgfw::nft::render(&flat).map_err(|e| Failure::BadInput(e.into()))?;
            print!("{text}");
        }
        RenderBackend::Ebpf => print!("{}", ebpf_dump(&flat)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn cidr4(table: [u8; 4], addr: [u8; 4], plen: u32) -> String {
    format!(
        "table {:#x} {}/{}",
        u32::from_be_bytes(table),
        Ipv4Addr::from(addr),
        plen.saturating_sub(32)
    )
}

fn cidr6(table: [u8; 4], addr: [u8; 16], plen: u32) -> String {
    format!(
        "table {:#x} {}/{}",
        u32::from_be_bytes(table),
        Ipv6Addr::from(addr),
        plen.saturating_sub(32)
    )
}

fn port(set: [u8; 4], proto: u8, port: [u8; 2], plen: u32) -> String {
    let p = u16::from_be_bytes(port);
    match plen {
        32 => format!("set {:#x} all protocols", u32::from_be_bytes(set)),
        40 => format!("set {:#x} proto {proto} any port", u32::from_be_bytes(set)),
        _ => format!(
            "set {:#x} proto {proto} port {p}/{}",
            u32::from_be_bytes(set),
            plen - 40
        ),
    }
}

/// The readable dump of every map entry a first apply would write.
pub fn ebpf_dump(flat: &sgfw::flat::FlatModel) -> Result<String, Failure> {
    let mut idx = Indices::default();
    idx.update(flat);
    let c = compile(flat, &idx, &sgfw::ebpf::compile::IdBook::default())
        .map_err(|e| Failure::BadInput(e.into()))?;
    let mut o = String::new();
    let _ = writeln!(o, "# sgfw eBPF maps for this model (generation parity 0)");
    let _ = writeln!(
        o,
        "\n[SGFW_INSTANCES] instance -> subnet, policy ingress/egress"
    );
    for (i, p) in &c.instances {
        let id = c.instance_ids.get(i).cloned().unwrap_or_default();
        let _ = writeln!(
            o,
            "{i} ({id}) -> subnet {} in {:#x} out {:#x}",
            p.subnet, p.policy_ingress, p.policy_egress
        );
    }
    let _ = writeln!(
        o,
        "\n[SGFW_SUBNETS] subnet -> NACL tables in/out v4, in/out v6"
    );
    for (i, s) in &c.subnets {
        let _ = writeln!(
            o,
            "{i} -> {:#x} {:#x} {:#x} {:#x}{}",
            s.nacl_in_v4,
            s.nacl_out_v4,
            s.nacl_in_v6,
            s.nacl_out_v6,
            if s.flags != 0 { " (dns)" } else { "" }
        );
    }
    let _ = writeln!(o, "\n[SGFW_ADDRS] address -> instance, subnet");
    for (k, v) in &c.addrs {
        let a = sgfw::policy::Family::addr_of_key(k.family, &k.addr);
        let _ = writeln!(o, "{a} -> {} {}", v.instance, v.subnet);
    }
    let _ = writeln!(o, "\n[SGFW_SG_CIDR_V4] policy, remote prefix -> port set");
    for e in &c.sg_cidr_v4 {
        let _ = writeln!(
            o,
            "{} -> set {:#x}",
            cidr4(e.key.table, e.key.addr, e.prefix_len),
            e.value
        );
    }
    let _ = writeln!(o, "\n[SGFW_SG_CIDR_V6] policy, remote prefix -> port set");
    for e in &c.sg_cidr_v6 {
        let _ = writeln!(
            o,
            "{} -> set {:#x}",
            cidr6(e.key.table, e.key.addr, e.prefix_len),
            e.value
        );
    }
    let _ = writeln!(
        o,
        "\n[SGFW_SG_PORTS] port set, protocol, port prefix -> rule"
    );
    for e in &c.sg_ports {
        let rule = c
            .rule_refs
            .get(&e.value)
            .map(ToString::to_string)
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "{} -> {rule}",
            port(e.key.set, e.key.proto, e.key.port, e.prefix_len)
        );
    }
    let _ = writeln!(
        o,
        "\n[SGFW_NACL_META] table -> entries (rule number: action)"
    );
    for (id, m) in &c.nacl_meta {
        let n = (0..64).filter(|i| m.rule_numbers[*i] != 0).count();
        let entries: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "{}:{}",
                    m.rule_numbers[i],
                    if m.allow_mask & (1 << i) != 0 {
                        "allow"
                    } else {
                        "deny"
                    }
                )
            })
            .collect();
        let _ = writeln!(o, "{id:#x} -> [{}]", entries.join(" "));
    }
    let _ = writeln!(
        o,
        "\n[SGFW_NACL_CIDR_V4] table, prefix -> entries containing it"
    );
    for e in &c.nacl_cidr_v4 {
        let _ = writeln!(
            o,
            "{} -> {:#b}",
            cidr4(e.key.table, e.key.addr, e.prefix_len),
            e.value.entries
        );
    }
    let _ = writeln!(
        o,
        "\n[SGFW_NACL_CIDR_V6] table, prefix -> entries containing it"
    );
    for e in &c.nacl_cidr_v6 {
        let _ = writeln!(
            o,
            "{} -> {:#b}",
            cidr6(e.key.table, e.key.addr, e.prefix_len),
            e.value.entries
        );
    }
    let _ = writeln!(
        o,
        "\n[SGFW_NACL_PORTS] table, protocol, port prefix -> entry bits"
    );
    for e in &c.nacl_ports {
        let _ = writeln!(
            o,
            "{} -> {:#b}",
            port(e.key.set, e.key.proto, e.key.port, e.prefix_len),
            e.value
        );
    }
    Ok(o)
}
