//! `make-bundle DIR SCRIPT`: writes a busybox OCI bundle whose process runs `sh -c SCRIPT`,
//! for `make demo` (the same bundle the end-to-end tests use).

use std::path::PathBuf;
use std::process::ExitCode;

use hull_tests::bundle::Bundle;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, script] = &args[..] else {
        eprintln!("usage: make-bundle DIR SCRIPT");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    if dir.exists() {
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            eprintln!("make-bundle: cannot replace {}: {err}", dir.display());
            return ExitCode::FAILURE;
        }
    }
    if let Err(err) = std::fs::create_dir_all(&dir) {
        eprintln!("make-bundle: cannot create {}: {err}", dir.display());
        return ExitCode::FAILURE;
    }
    Bundle::builder().script(script).write_to(&dir);
    println!("{}", dir.display());
    ExitCode::SUCCESS
}
