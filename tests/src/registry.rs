//! A read-only image registry on the loopback interface, for tests that pull: it serves one
//! OCI image layout (see [`crate::image::write_busybox_layout`]) over plain HTTP with the part
//! of the OCI distribution API a pull uses (`GET /v2/`, manifests by tag or digest, blobs by
//! digest, `HEAD` of each), every repository name alike. No registry outside this machine is
//! reachable, and a CRI `PullImage` always asks one: containerd resolves the tag even when
//! the image is already in its store.
//!
//! One thread owns the listener and answers one connection at a time (`Connection: close`);
//! it reports each request on a channel. Dropping the registry stops it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The OCI image manifest's media type (the layouts this crate writes hold only those).
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A registry serving an image layout on `127.0.0.1`.
pub struct Registry {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    requests: Receiver<String>,
}

impl Registry {
    /// Serves the layout at `layout` (its `index.json` names the tags) on an unused port.
    pub fn serve(layout: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, requests) = channel();
        let layout = layout.to_owned();
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("registry".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        // A client that breaks off is its own problem; serve the next one.
                        let _ = answer(&layout, conn, &tx);
                    }
                }
            })
            .expect("start the registry thread");
        Self {
            addr,
            stop,
            thread: Some(thread),
            requests,
        }
    }

    /// `127.0.0.1:PORT`, the registry host of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The requests answered since the last call, as `METHOD PATH STATUS`.
    pub fn requests(&self) -> Vec<String> {
        self.requests.try_iter().collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the thread blocked in accept(2); it sees the flag and returns.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request from `conn` and answers it.
fn answer(layout: &Path, conn: TcpStream, log: &Sender<String>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers: nothing in them changes the answer.
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let mut words = request_line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let reply = route(layout, method, path);
    let _ = log.send(format!("{method} {path} {}", reply.status));
    let mut conn = conn;
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Docker-Distribution-API-Version: registry/2.0\r\nConnection: close\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    );
    if let Some(digest) = &reply.digest {
        head.push_str(&format!("Docker-Content-Digest: {digest}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if method != "HEAD" {
        conn.write_all(&reply.body)?;
    }
    conn.flush()
}

/// An answer: status, body and what describes it.
struct Reply {
    status: u16,
    content_type: &'static str,
    digest: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn error(status: u16, code: &str) -> Self {
        Self {
            status,
            content_type: "application/json",
            digest: None,
            body: format!(r#"{{"errors":[{{"code":"{code}","message":"{code}"}}]}}"#).into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

/// What `METHOD PATH` gets from the layout.
fn route(layout: &Path, method: &str, path: &str) -> Reply {
    if method != "GET" && method != "HEAD" {
        return Reply::error(405, "UNSUPPORTED");
    }
    if path == "/v2/" || path == "/v2" {
        return Reply {
            status: 200,
            content_type: "application/json",
            digest: None,
            body: b"{}".to_vec(),
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Reply::error(404, "NAME_UNKNOWN");
    };
    if let Some((_, reference)) = rest.rsplit_once("/manifests/") {
        let digest = if is_digest(reference) {
            Some(reference.to_owned())
        } else {
            tagged_manifest(layout, reference)
        };
        return match digest.and_then(|d| Some((blob(layout, &d)?, d))) {
            Some((body, digest)) => Reply {
                status: 200,
                content_type: MANIFEST_MEDIA_TYPE,
                digest: Some(digest),
                body,
            },
            None => Reply::error(404, "MANIFEST_UNKNOWN"),
        };
    }
    if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
        if let Some(body) = is_digest(digest).then(|| blob(layout, digest)).flatten() {
            return Reply {
                status: 200,
                content_type: "application/octet-stream",
                digest: Some(digest.to_owned()),
                body,
            };
        }
        return Reply::error(404, "BLOB_UNKNOWN");
    }
    Reply::error(404, "NAME_UNKNOWN")
}

/// `sha256:` and 64 lowercase hex digits: nothing else is looked up on disk.
fn is_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The digest of the manifest `index.json` tags `tag` (`org.opencontainers.image.ref.name`).
fn tagged_manifest(layout: &Path, tag: &str) -> Option<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).ok()?).ok()?;
    index["manifests"].as_array()?.iter().find_map(|m| {
        (m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .then(|| m["digest"].as_str().map(str::to_owned))
            .flatten()
    })
}

/// The blob `digest` (already checked by [`is_digest`]).
fn blob(layout: &Path, digest: &str) -> Option<Vec<u8>> {
    let hex = digest.strip_prefix("sha256:")?;
    let path: PathBuf = layout.join("blobs/sha256").join(hex);
    std::fs::read(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sha256_digests_are_looked_up() {
        assert!(is_digest(&format!("sha256:{}", "ab".repeat(32))));
        assert!(!is_digest("sha256:../../etc/passwd"));
        assert!(!is_digest(&format!("sha512:{}", "ab".repeat(32))));
        assert!(!is_digest(&format!("sha256:{}", "AB".repeat(32))));
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        let layout = Path::new("/nonexistent");
        assert_eq!(route(layout, "POST", "/v2/").status, 405);
        assert_eq!(route(layout, "GET", "/v2/").status, 200);
        assert_eq!(route(layout, "GET", "/other").status, 404);
        assert_eq!(route(layout, "GET", "/v2/a/manifests/test").status, 404);
        assert_eq!(route(layout, "HEAD", "/v2/a/blobs/x").status, 404);
    }
}
