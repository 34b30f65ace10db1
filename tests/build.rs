//! Builds the static helper programs the end-to-end tests put into container images (the images
//! hold busybox and no C library): `tests/guest/root_escape.c`. The tests embed them with
//! `include_bytes!`, so they work wherever the test programs run (the nested lane's L1 has no
//! compiler).

use std::path::PathBuf;
use std::process::Command;

const HELPERS: &[(&str, &str)] = &[("guest/root_escape.c", "root-escape")];

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    println!("cargo:rerun-if-env-changed=CC");
    for (source, name) in HELPERS {
        println!("cargo:rerun-if-changed={source}");
        let output = out_dir.join(name);
        let status = Command::new(&cc)
            .args(["-static", "-Os", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&output)
            .arg(source)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {cc} to build {source} (make deps installs gcc and libc6-dev): {e}"
                )
            });
        assert!(
            status.success(),
            "{cc} -static {source}: {status} (a static build needs libc6-dev)"
        );
    }
}
