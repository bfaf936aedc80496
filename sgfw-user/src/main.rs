//! The `sgfw` command: enforce AWS VPC security groups and network ACLs on
//! this Linux host. One module per subcommand under `cli/`.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 bad input or usage.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // The demo's table is its output; its progress logs would only clutter it.
    let quiet = matches!(args.cmd, cli::Cmd::Demo(_));
    cli::init_tracing(args.verbose, quiet);
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(cli::Failure::BadInput(e)) => {
            eprintln!("sgfw: {}", cli::chain(&e));
            ExitCode::from(2)
        }
        Err(cli::Failure::Runtime(e)) => {
            eprintln!("sgfw: {}", cli::chain(&e));
            ExitCode::from(1)
        }
    }
}
