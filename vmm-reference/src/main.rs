//! `kiln`: the Kiln reference VMM. See `kiln --help`.

use std::process::ExitCode;

use clap::Parser;

use kiln::config::Cli;
use kiln::vm::{self, Outcome};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let spec = match vm::VmSpec::from_cli(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::from(vm::EXIT_ERROR);
        }
    };
    match vm::run(spec) {
        Ok(outcome) => {
            if let Outcome::Crashed(report) = &outcome {
                eprintln!("kiln: guest crashed:\n{report}");
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            eprintln!("kiln: {e}");
            ExitCode::from(vm::EXIT_ERROR)
        }
    }
}
