//! Prints the header of a kiln snapshot state file: `cargo run -p kiln-snapshot --example
//! inspect -- STATE`. The payload is left undecoded (it is the VMM's type).

fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: inspect STATE");
        return std::process::ExitCode::from(2);
    };
    let path = std::path::PathBuf::from(path);
    // `IgnoredAny` accepts whatever payload follows the header.
    match kiln_snapshot::read_state::<serde::de::IgnoredAny>(&path) {
        Ok((h, _)) => {
            println!("{h:#?}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::from(1)
        }
    }
}
