//! OCI images for end-to-end tests, built locally because no registry is reachable: a
//! one-layer busybox image (Debian's `busybox-static` with every applet linked in `/bin`) as
//! the OCI image layout tarball `ctr images import` reads (`oci-layout`, `index.json`,
//! `blobs/sha256/`), or that layout as a directory, for a registry to serve
//! ([`crate::registry`]). GNU tar writes the tars (sorted, owned by root, mtime 0) and
//! `sha256sum` the digests, so the same busybox always gives the same image.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bundle::{ensure_busybox, json_string};

/// A blob of the image layout: its digest (`sha256:<hex>`) and size in bytes.
#[derive(Debug, Clone)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// Writes a busybox image named `reference` (e.g. `docker.io/library/hull-busybox:test`) into
/// `dir` (which must be empty or missing) and returns the path of its tarball, `dir/image.tar`.
/// The image's config says `PATH=/bin` and `Cmd ["sh"]`.
pub fn write_busybox_image(dir: &Path, reference: &str) -> PathBuf {
    let layout = write_busybox_layout(dir, reference, &[]);
    let image = dir.join("image.tar");
    write_layout_tarball(&layout, &image);
    image
}

/// Writes the OCI image layout directory `layout` as the tarball `out` (what `ctr images
/// import` reads).
pub fn write_layout_tarball(layout: &Path, out: &Path) {
    tar(layout, &["oci-layout", "index.json", "blobs"], out);
}

/// Writes a busybox image named `reference` as an OCI image layout directory, `dir/layout`
/// (`dir` must be empty or missing), and returns that path. The image's config says
/// `PATH=/bin` and `Cmd ["sh"]`, or, if `entrypoint` is not empty, that `Entrypoint` and no
/// `Cmd` (a pause image's config: what it runs takes no arguments).
pub fn write_busybox_layout(dir: &Path, reference: &str, entrypoint: &[&str]) -> PathBuf {
    let busybox = ensure_busybox();
    let rootfs = dir.join("rootfs");
    for sub in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(rootfs.join(sub)).expect("create the image's directories");
    }
    std::fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .expect("run busybox --list");
    assert!(list.status.success(), "busybox --list: {}", list.status);
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("applet link");
        }
    }

    let layout = dir.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("create blobs/sha256");
    let layer_tar = dir.join("layer.tar");
    tar(&rootfs, &["."], &layer_tar);
    // Uncompressed: the layer's digest is also its diff id.
    let layer = add_blob(&layout, &layer_tar);

    let runs = if entrypoint.is_empty() {
        r#""Cmd":["sh"]"#.to_owned()
    } else {
        let words: Vec<String> = entrypoint.iter().map(|w| json_string(w)).collect();
        format!(r#""Entrypoint":[{}]"#, words.join(","))
    };
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],{runs}}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        layer.digest
    );
    let config = add_blob_bytes(&layout, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        config.digest, config.size, layer.digest, layer.size
    );
    let manifest = add_blob_bytes(&layout, manifest.as_bytes());
    let tag = reference.rsplit_once(':').map_or("latest", |(_, tag)| tag);
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"annotations":{{"io.containerd.image.name":{},"org.opencontainers.image.ref.name":{}}}}}]}}"#,
        manifest.digest,
        manifest.size,
        json_string(reference),
        json_string(tag)
    );
    std::fs::write(layout.join("index.json"), index).expect("write index.json");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("write oci-layout");
    layout
}

/// Moves the file `path` into the layout's blobs under its digest.
fn add_blob(layout: &Path, path: &Path) -> Blob {
    let hex = sha256_hex(path);
    let size = std::fs::metadata(path).expect("stat a blob").len();
    std::fs::rename(path, layout.join("blobs/sha256").join(&hex)).expect("move a blob");
    Blob {
        digest: format!("sha256:{hex}"),
        size,
    }
}

/// Writes `bytes` into the layout's blobs under their digest.
fn add_blob_bytes(layout: &Path, bytes: &[u8]) -> Blob {
    let tmp = layout.join("blobs/sha256/incoming");
    std::fs::write(&tmp, bytes).expect("write a blob");
    add_blob(layout, &tmp)
}

/// The SHA-256 of a file, in hex, from `sha256sum`.
fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        hex.len(),
        64,
        "sha256sum {} printed {text:?}",
        path.display()
    );
    hex
}

/// A reproducible tar of `entries` of `dir`.
fn tar(dir: &Path, entries: &[&str], out: &Path) {
    let status = Command::new("tar")
        .args([
            "--create",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
        ])
        .arg("--file")
        .arg(out)
        .arg("--directory")
        .arg(dir)
        .args(entries)
        .status()
        .expect("run tar");
    assert!(status.success(), "tar of {}: {status}", dir.display());
}

/// Writes a tarball of a busybox rootfs (the one [`crate::bundle::Bundle`] makes) at `tarball`,
/// for `docker import` and `podman import`.
pub fn write_busybox_tar(tarball: &Path) {
    let bundle = crate::bundle::Bundle::builder().build();
    let tar = Command::new("tar")
        .arg("-C")
        .arg(bundle.rootfs())
        .arg("-cf")
        .arg(tarball)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(tar.success(), "tar of a busybox rootfs: {tar}");
}
