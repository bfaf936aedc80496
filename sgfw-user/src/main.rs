//! The `sgfw` command.
fn main() {}
