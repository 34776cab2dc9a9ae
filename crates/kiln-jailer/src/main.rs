//! `kiln-jailer`: builds a jail and execs the VMM in it (see the library and docs/jailer.md).
//!
//! Exit status: 2 the command line could not be parsed; 1 any other error (the message names
//! the flag at fault); on success the process becomes the VMM (with `--new-pid-ns`, the
//! jailer exits 0 once the VMM's pid file is written).

use std::process::ExitCode;

use clap::Parser;
use kiln_jailer::{Cli, Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = Config::from_cli(cli).and_then(|cfg| kiln_jailer::run(&cfg));
    match result {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("kiln-jailer: {e}");
            ExitCode::FAILURE
        }
    }
}
