//! Prints the header of a kiln snapshot state file: `cargo run -p kiln-snapshot --example
//! inspect -- STATE`. The file is checked; the payload (the VMM's type) is left undecoded.

fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: inspect STATE");
        return std::process::ExitCode::from(2);
    };
    let path = std::path::PathBuf::from(path);
    match kiln_snapshot::read_header(&path) {
        Ok(h) => {
            println!("{h:#?}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::from(1)
        }
    }
}
