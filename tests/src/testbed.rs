//! The network-namespace test bed lives in the library (`sgfw::lab`) so the
//! `sgfw demo` command uses the very same code; the tests use it from here.
pub use sgfw::lab::*;
