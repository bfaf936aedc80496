//! `sgfw explain`: the verdict for the first packet of a new flow, stage by stage.
//!
//! Owns the subcommand's arguments, turning them into a [`Packet`], and its
//! output; the decision itself is [`sgfw::eval::explain_new_flow`]. Needs no
//! privileges and never touches the system.

use std::io::{self, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use sgfw::packet::{L4, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Packet, TcpFlags};

/// Explain how the first packet of a new flow is judged: prints `ALLOW` or
/// `DENY`, then one line per stage (sg-egress, nacl-out, nacl-in,
/// sg-ingress) with the rule that decided. Exit 2 on a bad model or bad arguments.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Example:\n  sgfw explain -f examples/web-db-vpc.json --src 10.0.1.10 --dst 10.0.2.20 --proto tcp --dport 5432"
)]
pub struct ExplainArgs {
    /// The model (EC2-style JSON); `-` reads standard input.
    #[arg(short = 'f', long = "file", value_name = "MODEL")]
    pub file: PathBuf,
    /// Source address of the packet.
    #[arg(long, value_name = "IP")]
    pub src: IpAddr,
    /// Destination address of the packet.
    #[arg(long, value_name = "IP")]
    pub dst: IpAddr,
    /// Protocol: tcp, udp, icmp, icmpv6 or a number 0-255.
    #[arg(long, value_name = "PROTO", value_parser = parse_proto)]
    pub proto: u8,
    /// Source port (tcp/udp; default 49152).
    #[arg(long, value_name = "N")]
    pub sport: Option<u16>,
    /// Destination port (required for tcp/udp).
    #[arg(long, value_name = "N")]
    pub dport: Option<u16>,
    /// ICMP type (icmp/icmpv6; default echo request: 8, or 128 for icmpv6).
    #[arg(long = "icmp-type", value_name = "T")]
    pub icmp_type: Option<u8>,
    /// ICMP code (default 0).
    #[arg(long = "icmp-code", value_name = "C")]
    pub icmp_code: Option<u8>,
    /// Print JSON: {"verdict": "allow"|"deny", "stages": [...], "passthrough": ...}.
    #[arg(long)]
    pub json: bool,
}

/// Parses `tcp`, `udp`, `icmp`, `icmpv6` or a protocol number.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(PROTO_TCP),
        "udp" => Ok(PROTO_UDP),
        "icmp" => Ok(PROTO_ICMP),
        "icmpv6" => Ok(PROTO_ICMPV6),
        other => other.parse::<u8>().map_err(|_| {
            format!("{s:?} is not a protocol (tcp, udp, icmp, icmpv6 or a number 0-255)")
        }),
    }
}

/// The first packet of the flow the arguments describe (TCP: a SYN).
///
/// # Errors
///
/// A message when the arguments contradict each other (mixed address
/// families, ports for a protocol without ports, a missing `--dport`, ...).
pub fn packet_of(args: &ExplainArgs) -> Result<Packet, String> {
    let v6 = args.src.is_ipv6();
    if v6 != args.dst.is_ipv6() {
        return Err(format!(
            "--src {} and --dst {} are of different address families",
            args.src, args.dst
        ));
    }
    let has_ports = args.sport.is_some() || args.dport.is_some();
    let has_icmp = args.icmp_type.is_some() || args.icmp_code.is_some();
    let l4 = match args.proto {
        PROTO_TCP | PROTO_UDP => {
            if has_icmp {
                return Err("--icmp-type/--icmp-code apply to icmp and icmpv6 only".into());
            }
            let dport = args.dport.ok_or("--dport is required for tcp and udp")?;
            let sport = args.sport.unwrap_or(49152);
            if args.proto == PROTO_TCP {
                L4::Tcp {
                    sport,
                    dport,
                    flags: TcpFlags::SYN,
                }
            } else {
                L4::Udp { sport, dport }
            }
        }
        p @ (PROTO_ICMP | PROTO_ICMPV6) => {
            if (p == PROTO_ICMPV6) != v6 {
                let want = if v6 { "icmpv6" } else { "icmp" };
                return Err(format!(
                    "the addresses are {}: use --proto {want}",
                    if v6 { "IPv6" } else { "IPv4" }
                ));
            }
            if has_ports {
                return Err("--sport/--dport apply to tcp and udp only".into());
            }
            let icmp_type = args.icmp_type.unwrap_or(if v6 { 128 } else { 8 });
            L4::Icmp {
                icmp_type,
                code: args.icmp_code.unwrap_or(0),
                id: 1,
                quoted: None,
            }
        }
        proto => {
            if has_ports || has_icmp {
                return Err(format!("protocol {proto} has no ports or ICMP type/code"));
            }
            L4::Other { proto }
        }
    };
    Ok(Packet {
        src: args.src,
        dst: args.dst,
        l4,
    })
}

/// Runs `sgfw explain`, printing to stdout and stderr.
///
/// # Errors
///
/// Only when stdout or stderr cannot be written; a bad model or bad
/// arguments are exit code 2.
pub fn run(args: &ExplainArgs) -> io::Result<ExitCode> {
    run_to(args, &mut io::stdout().lock(), &mut io::stderr().lock()).map(ExitCode::from)
}

/// [`run`] with explicit output streams; returns the exit code (0 or 2).
///
/// # Errors
///
/// Only when `out` or `err` cannot be written.
pub fn run_to(args: &ExplainArgs, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<u8> {
    let pkt = match packet_of(args) {
        Ok(p) => p,
        Err(msg) => {
            writeln!(err, "{msg}")?;
            return Ok(2);
        }
    };
    let model = match sgfw::model::load_path(&args.file) {
        Ok(m) => m,
        Err(e) => {
            writeln!(err, "{}", super::validate::error_chain(&e))?;
            return Ok(2);
        }
    };
    let valid = match sgfw::validate::validate(&model) {
        Ok((valid, warnings)) => {
            for w in &warnings {
                writeln!(err, "warning: {w}")?;
            }
            valid
        }
        Err(errors) => {
            writeln!(err, "{errors}")?;
            return Ok(2);
        }
    };
    let flat = valid.flatten();
    let verdict = sgfw::eval::explain_new_flow(&flat, &pkt);
    if args.json {
        writeln!(out, "{}", sgfw::eval::explain_json(&flat, &pkt, &verdict))?;
    } else {
        write!(out, "{}", sgfw::eval::explain_text(&flat, &pkt, &verdict))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExplainArgs,
    }

    const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/web-db-vpc.json");

    fn explain(argv: &[&str]) -> (u8, String, String) {
        let mut full = vec!["explain", "-f", MODEL];
        full.extend_from_slice(argv);
        let cli = Cli::try_parse_from(full).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_to(&cli.args, &mut out, &mut err).unwrap();
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn protocols_parse() {
        assert_eq!(parse_proto("tcp"), Ok(6));
        assert_eq!(parse_proto("ICMPv6"), Ok(58));
        assert_eq!(parse_proto("47"), Ok(47));
        assert!(parse_proto("256").is_err());
        assert!(parse_proto("sctpx").is_err());
        assert!(
            Cli::try_parse_from([
                "explain", "-f", "m", "--src", "10.0.0.1", "--dst", "10.0.0.2", "--proto", "x"
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from([
                "explain",
                "-f",
                "m",
                "--src",
                "10.0.0.300",
                "--dst",
                "10.0.0.2",
                "--proto",
                "tcp"
            ])
            .is_err()
        );
    }

    #[test]
    fn contradictory_arguments_exit_2() {
        for (argv, msg) in [
            (
                vec![
                    "--src",
                    "10.0.1.10",
                    "--dst",
                    "fd00::1",
                    "--proto",
                    "tcp",
                    "--dport",
                    "1",
                ],
                "--src 10.0.1.10 and --dst fd00::1 are of different address families\n",
            ),
            (
                vec!["--src", "10.0.1.10", "--dst", "10.0.2.20", "--proto", "tcp"],
                "--dport is required for tcp and udp\n",
            ),
            (
                vec![
                    "--src",
                    "10.0.1.10",
                    "--dst",
                    "10.0.2.20",
                    "--proto",
                    "icmpv6",
                ],
                "the addresses are IPv4: use --proto icmp\n",
            ),
            (
                vec![
                    "--src",
                    "10.0.1.10",
                    "--dst",
                    "10.0.2.20",
                    "--proto",
                    "icmp",
                    "--dport",
                    "1",
                ],
                "--sport/--dport apply to tcp and udp only\n",
            ),
            (
                vec![
                    "--src",
                    "10.0.1.10",
                    "--dst",
                    "10.0.2.20",
                    "--proto",
                    "47",
                    "--icmp-type",
                    "1",
                ],
                "protocol 47 has no ports or ICMP type/code\n",
            ),
        ] {
            assert_eq!(explain(&argv), (2, String::new(), msg.to_string()));
        }
    }

    #[test]
    fn web_to_db_is_allowed_stage_by_stage() {
        let (code, out, _) = explain(&[
            "--src",
            "10.0.1.10",
            "--dst",
            "10.0.2.20",
            "--proto",
            "tcp",
            "--dport",
            "5432",
        ]);
        assert_eq!(code, 0);
        assert_eq!(
            out,
            "ALLOW\n\
             sg-egress   allow  sg-web/egress[1]\n\
             nacl-out    allow  acl-default rule 100\n\
             nacl-in     allow  acl-db rule 200\n\
             sg-ingress  allow  sg-db/ingress[0]\n"
        );
    }

    /// The examples of docs-model-format.md (the README's model section), verbatim.
    #[test]
    fn readme_examples() {
        let cases: [(&[&str], &str); 5] = [
            (
                &[
                    "--src",
                    "10.0.1.11",
                    "--dst",
                    "10.0.2.20",
                    "--proto",
                    "tcp",
                    "--dport",
                    "5432",
                ],
                "DENY\n\
                 sg-egress   allow  sg-web/egress[1]\n\
                 nacl-out    allow  acl-default rule 100\n\
                 nacl-in     deny   acl-db rule 100\n",
            ),
            (
                &[
                    "--src",
                    "203.0.113.9",
                    "--dst",
                    "10.0.1.10",
                    "--proto",
                    "tcp",
                    "--dport",
                    "443",
                ],
                "ALLOW\n\
                 nacl-in     allow  acl-default rule 100\n\
                 sg-ingress  allow  sg-web/ingress[0]\n",
            ),
            (
                &[
                    "--src",
                    "2001:db8:ffff::5",
                    "--dst",
                    "2001:db8:1234:2::20",
                    "--proto",
                    "tcp",
                    "--dport",
                    "22",
                ],
                "DENY\n\
                 nacl-in     deny   acl-db rule * (no entry matched)\n",
            ),
            (
                &[
                    "--src",
                    "10.0.1.10",
                    "--dst",
                    "10.0.1.11",
                    "--proto",
                    "icmp",
                ],
                "DENY\n\
                 sg-egress   deny   no rule matched\n",
            ),
            (
                &[
                    "--src",
                    "10.0.1.10",
                    "--dst",
                    "10.0.0.2",
                    "--proto",
                    "udp",
                    "--dport",
                    "53",
                ],
                "ALLOW\n\
                 passthrough dns\n",
            ),
        ];
        for (argv, want) in cases {
            assert_eq!(
                explain(argv),
                (0, want.to_string(), String::new()),
                "{argv:?}"
            );
        }
    }

    /// The `--json` example of docs-model-format.md, byte for byte.
    #[test]
    fn readme_json_example() {
        let (code, out, _) = explain(&[
            "--src",
            "203.0.113.9",
            "--dst",
            "10.0.1.10",
            "--proto",
            "tcp",
            "--dport",
            "443",
            "--json",
        ]);
        assert_eq!(code, 0);
        assert_eq!(
            out,
            r#"{"blocked":null,"explanation_code":null,"passthrough":null,"stages":[{"rule":"acl-default rule 100","stage":"nacl-in","verdict":"allow"},{"rule":"sg-web/ingress[0]","stage":"sg-ingress","verdict":"allow"}],"verdict":"allow"}"#
                .to_owned()
                + "\n"
        );
    }

    #[test]
    fn json_output() {
        let (code, out, _) = explain(&[
            "--src",
            "203.0.113.9",
            "--dst",
            "10.0.2.20",
            "--proto",
            "tcp",
            "--dport",
            "5432",
            "--json",
        ]);
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["verdict"], "deny");
        assert_eq!(v["passthrough"], serde_json::Value::Null);
        assert_eq!(v["stages"][0]["stage"], "nacl-in");
        assert_eq!(v["stages"][0]["verdict"], "deny");
        assert_eq!(v["stages"][0]["rule"], "acl-db rule * (no entry matched)");
    }
}
