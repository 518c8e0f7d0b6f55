//! The `mecha` binary: command-line parsing and wiring of the workspace crates. All behaviour
//! lives in the libraries; this file only turns flags into their inputs and errors into exit codes.

mod cli;
mod iptables;
mod runtime_cmd;
mod xds_cmd;

fn main() {
    std::process::exit(cli::main());
}
