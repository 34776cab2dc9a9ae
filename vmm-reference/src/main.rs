//! `kiln`: the Kiln reference VMM. See `kiln --help`.

use std::process::ExitCode;

use clap::Parser;

use kiln::config::Cli;
use kiln::vm::{self, Outcome};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let control = match &cli.control_sock {
        Some(path) => match kiln::control_sock::serve(path) {
            Ok(rx) => Some(rx),
            Err(e) => {
                eprintln!("kiln: {e}");
                return ExitCode::from(vm::EXIT_ERROR);
            }
        },
        None => None,
    };
    if cli.restore.is_some() {
        return finish(kiln::snapshot::run_restore(cli, control));
    }
    if cli.migrate_listen.is_some() {
        return finish(kiln::migration::run_incoming(cli, control));
    }
    let dump_acpi = cli.dump_acpi.clone();
    let spec = match vm::VmSpec::from_cli(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::from(vm::EXIT_ERROR);
        }
    };
    if let Some(dir) = dump_acpi {
        return match vm::dump_acpi(&spec, &dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kiln: {e}");
                ExitCode::from(vm::EXIT_ERROR)
            }
        };
    }
    finish(vm::run_with(spec, control))
}

fn finish(result: Result<Outcome, vm::VmmError>) -> ExitCode {
    match result {
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
