//! `sgfw validate`: check a model file and report every problem in it.
//!
//! Owns the subcommand's arguments and its output; the judgement itself is
//! [`sgfw::validate::validate`]. Needs no privileges and never touches the
//! system.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

/// Check a model file: exit 0 when it is valid (warnings on stderr), exit 2
/// with one line per error on stderr when it is not.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  sgfw validate -f examples/web-db-vpc.json")]
pub struct ValidateArgs {
    /// The model: EC2-style JSON with Subnets, Instances, SecurityGroups,
    /// NetworkAcls, PrefixLists; `-` reads standard input.
    #[arg(short = 'f', long = "file", value_name = "MODEL")]
    pub file: PathBuf,
}

/// Runs `sgfw validate`, printing to stdout and stderr.
///
/// # Errors
///
/// Only when stdout or stderr cannot be written; a bad model is exit code 2.
pub fn run(args: &ValidateArgs) -> io::Result<ExitCode> {
    run_to(args, &mut io::stdout().lock(), &mut io::stderr().lock()).map(ExitCode::from)
}

/// [`run`] with explicit output streams; returns the exit code (0 or 2).
///
/// # Errors
///
/// Only when `out` or `err` cannot be written.
pub fn run_to(args: &ValidateArgs, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<u8> {
    // The same loader as every other subcommand: a model, or an
    // unambiguous AWS CLI document imported as `sgfw import` would.
    let text = super::read_input(&args.file);
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            writeln!(
                err,
                "cannot read the model file {}: {e}",
                args.file.display()
            )?;
            return Ok(2);
        }
    };
    let model = match sgfw::import::load_document(&text, &super::import_options()) {
        Ok(m) => {
            for w in &m.warnings {
                writeln!(err, "warning: {w}")?;
            }
            m.model
        }
        Err(e) => {
            writeln!(err, "{}", error_chain(&e))?;
            return Ok(2);
        }
    };
    match sgfw::validate::validate(&model) {
        Ok((valid, warnings)) => {
            for w in &warnings {
                writeln!(err, "warning: {w}")?;
            }
            let m = valid.model();
            writeln!(
                out,
                "valid: {} subnets, {} instances, {} security groups, {} network ACLs, {} prefix lists",
                m.subnets.len(),
                m.instances.len(),
                m.security_groups.len(),
                m.network_acls.len(),
                m.prefix_lists.len()
            )?;
            Ok(0)
        }
        Err(errors) => {
            writeln!(err, "{errors}")?;
            Ok(2)
        }
    }
}

/// An error and its causes on one line: `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ValidateArgs,
    }

    fn run_file(content: &str) -> (u8, String, String) {
        let dir = std::env::temp_dir().join(format!(
            "sgfw-validate-{}-{}",
            std::process::id(),
            content.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.json");
        std::fs::write(&path, content).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_to(&ValidateArgs { file: path }, &mut out, &mut err).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn parses_dash_f() {
        let cli = Cli::try_parse_from(["validate", "-f", "-"]).unwrap();
        assert_eq!(cli.args.file, PathBuf::from("-"));
        assert!(Cli::try_parse_from(["validate"]).is_err());
    }

    #[test]
    fn valid_model_exits_0_with_warnings_on_stderr() {
        let (code, out, err) = run_file(
            r#"{"Subnets": [{"SubnetId": "s", "CidrBlock": "10.0.0.0/24", "Bridge": "br0"}],
                "SecurityGroups": [{"GroupId": "g", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 1, "ToPort": 2}]}]}"#,
        );
        assert_eq!(code, 0);
        assert_eq!(
            out,
            "valid: 1 subnets, 0 instances, 1 security groups, 0 network ACLs, 0 prefix lists\n"
        );
        assert_eq!(
            err,
            "warning: SecurityGroups[g].IpPermissions[0]: has no IpRanges, Ipv6Ranges, UserIdGroupPairs or PrefixListIds: it matches nothing\n"
        );
    }

    #[test]
    fn invalid_model_exits_2_with_error_lines() {
        let (code, out, err) = run_file(
            r#"{"Subnets": [{"SubnetId": "s", "CidrBlock": "10.0.0.300/24", "Bridge": "br 0"}]}"#,
        );
        assert_eq!(code, 2);
        assert_eq!(out, "");
        assert_eq!(
            err,
            "Subnets[s].CidrBlock: \"10.0.0.300/24\" is not an IPv4 CIDR\n\
             Subnets[s].Bridge: \"br 0\" is not a Linux interface name (1-15 characters, no '/', ':', quotes or whitespace)\n"
        );
    }

    #[test]
    fn unreadable_or_malformed_model_exits_2() {
        let (code, _, err) = run_file("{");
        assert_eq!(code, 2);
        assert!(
            err.starts_with(
                "not a model or an AWS CLI document: the model is not valid model JSON: EOF while parsing"
            ),
            "{err}"
        );
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_to(
            &ValidateArgs {
                file: "/nonexistent/m.json".into(),
            },
            &mut out,
            &mut err,
        )
        .unwrap();
        assert_eq!(code, 2);
        assert!(
            String::from_utf8(err)
                .unwrap()
                .starts_with("cannot read the model file /nonexistent/m.json: ")
        );
    }
}
