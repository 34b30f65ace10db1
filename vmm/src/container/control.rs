//! The container's control socket, `<state>/<id>/control.sock`: how `hull` commands reach a
//! running container. It speaks the agent's protocol (docs/protocol.md): a handshake, then
//! requests and their responses. `hull-vmm` holds the one control connection to the agent and
//! forwards each client request on it under an id of its own, routing the answer back.
//! `create_container` and `shutdown` are hull-vmm's alone.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hull_protocol::{
    answer_hello, read_frame, write_frame, AgentMessage, ErrorKind, ErrorResponse, HostMessage,
    Request, RequestBody, Response, ResponseBody,
};

use crate::log_limit::{left_out, LogLimit};
use crate::thread::{Spawner, ThreadKind};

/// A client connection's writing half, shared by the threads that answer it.
pub type ClientWriter = Arc<Mutex<UnixStream>>;

/// A request from a client, for the supervisor.
pub struct ClientRequest {
    pub request: Request,
    pub writer: ClientWriter,
}

/// Whether a client may send this request (else the error to answer with). In a pod VM
/// (`pod`) clients create the pod's containers; elsewhere `create_container` is hull-vmm's.
pub fn allowed(body: &RequestBody, pod: bool) -> Result<(), ErrorResponse> {
    match body {
        RequestBody::CreateContainer(create) if pod && create.pod => Ok(()),
        RequestBody::CreateContainer(_) if pod => Err(ErrorResponse::new(
            ErrorKind::InvalidRequest,
            "a pod VM takes only pod containers (`pod`: true)",
        )),
        RequestBody::CreateContainer(_) | RequestBody::Shutdown => Err(ErrorResponse::new(
            ErrorKind::InvalidRequest,
            "create_container and shutdown are hull-vmm's own requests",
        )),
        _ => Ok(()),
    }
}

/// Answers a client (a client that went away is no error).
pub fn respond(writer: &ClientWriter, id: u64, result: Result<ResponseBody, ErrorResponse>) {
    let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(err) = write_frame(&mut *conn, &AgentMessage::Response(Response { id, result })) {
        log::debug!("control socket: cannot answer a client: {err}");
    }
}

/// Listens on `path` (replacing a stale socket) and hands every request to `inbox`, from a
/// thread per client.
pub fn serve<T: From<ClientRequest> + Send + 'static>(
    threads: &Spawner,
    path: &Path,
    inbox: SyncSender<T>,
    kernel_release: String,
    pod: bool,
) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = hull_protocol::unix_path::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    })?;
    let clients = threads.clone();
    threads.spawn(ThreadKind::ControlListener, move || {
        let mut failed = LogLimit::new(LOG_PERIOD);
        let mut refused = LogLimit::new(LOG_PERIOD);
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(conn) => conn,
                Err(err) => {
                    if let Some(n) = failed.check() {
                        log::warn!("control socket: accept failed: {err}{}", left_out(n));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if let Err(who) = check_peer(&conn) {
                if let Some(n) = refused.check() {
                    log::warn!("control socket: refused {who}{}", left_out(n));
                }
                continue;
            }
            let inbox = inbox.clone();
            let release = kernel_release.clone();
            let spawned = clients.spawn(ThreadKind::ControlClient, move || {
                serve_client(conn, &inbox, &release, pod)
            });
            if let Err(err) = spawned {
                log::warn!("control socket: cannot start a client thread: {err}");
            }
        }
    })?;
    Ok(())
}

/// How often a repeated control-socket problem is logged.
const LOG_PERIOD: Duration = Duration::from_secs(60);

/// Only root and hull-vmm's own user may control the container: the state directory keeps
/// others out already (mode 0700), and this holds wherever the socket ends up.
fn check_peer(conn: &UnixStream) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("a client whose credentials cannot be read ({e})"))?;
    let own = nix::unistd::geteuid().as_raw();
    match cred.uid() {
        0 => Ok(()),
        uid if uid == own => Ok(()),
        uid => Err(format!(
            "a client of uid {uid} (pid {}): only root and uid {own} may control the container",
            cred.pid()
        )),
    }
}

/// For one answer to a client to be written: the supervisor answers clients, and one that
/// stops reading must not hold it up.
const CLIENT_WRITE_DEADLINE: Duration = Duration::from_secs(5);

fn serve_client<T: From<ClientRequest>>(
    mut conn: UnixStream,
    inbox: &SyncSender<T>,
    release: &str,
    pod: bool,
) {
    if conn.set_write_timeout(Some(CLIENT_WRITE_DEADLINE)).is_err() {
        return;
    }
    let hello = match read_frame::<_, HostMessage>(&mut conn) {
        Ok(Some(HostMessage::Hello(hello))) => hello,
        Ok(_) | Err(_) => return,
    };
    let answer = answer_hello(&hello, env!("CARGO_PKG_VERSION"), release);
    let accepted = matches!(answer, AgentMessage::Hello(_));
    if write_frame(&mut conn, &answer).is_err() || !accepted {
        return;
    }
    let writer = match conn.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(_) => return,
    };
    loop {
        match read_frame::<_, HostMessage>(&mut conn) {
            Ok(Some(HostMessage::Request(request))) => {
                if let Err(err) = allowed(&request.body, pod) {
                    respond(&writer, request.id, Err(err));
                    continue;
                }
                let msg = ClientRequest {
                    request,
                    writer: writer.clone(),
                };
                if inbox.send(msg.into()).is_err() {
                    return;
                }
            }
            Ok(Some(HostMessage::Hello(_))) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use hull_contract::control::Client;
    use hull_protocol::ProcessRef;

    use super::*;

    #[test]
    fn clients_reach_the_inbox_and_get_answers() {
        let dir = std::env::temp_dir().join(format!("hull-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let (tx, rx) = std::sync::mpsc::sync_channel::<ClientRequest>(8);
        serve(&Spawner::detached(), &path, tx, "6.12".into(), false).unwrap();

        let answering = std::thread::spawn(move || {
            let msg: ClientRequest = rx.recv().unwrap();
            assert_eq!(msg.request.body, RequestBody::ListProcesses);
            respond(
                &msg.writer,
                msg.request.id,
                Ok(ResponseBody::Processes(vec![])),
            );
        });
        let mut client = Client::connect(&path).unwrap();
        let err = client
            .request(RequestBody::Shutdown, Some(Duration::from_secs(5)))
            .unwrap_err();
        assert!(err.to_string().contains("hull-vmm's own"), "{err}");
        let answer = client
            .request(RequestBody::ListProcesses, Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(answer, ResponseBody::Processes(vec![]));
        answering.join().unwrap();
        let wait = RequestBody::Wait {
            process: ProcessRef::Init,
        };
        assert!(allowed(&wait, false).is_ok() && allowed(&wait, true).is_ok());
        // A pod VM's clients make its pod containers, and nothing else.
        let mut create = hull_protocol::CreateContainer {
            container_id: "c".into(),
            spec: Default::default(),
            rootfs: hull_protocol::Rootfs {
                fs_tag: hull_protocol::POD_FS_TAG.into(),
                readonly: false,
                subdir: Some("c/rootfs".into()),
            },
            stdio: hull_protocol::Stdio::NULL,
            binds_fs_tag: None,
            pod: true,
        };
        let body =
            |c: &hull_protocol::CreateContainer| RequestBody::CreateContainer(Box::new(c.clone()));
        assert!(allowed(&body(&create), true).is_ok());
        assert!(allowed(&body(&create), false).is_err());
        create.pod = false;
        assert!(allowed(&body(&create), true).is_err());
        assert!(allowed(&RequestBody::Shutdown, true).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A client of another uid is cut off at once; root waits for a hello as usual. Runs the
    /// client with `setpriv` and Debian's `python3` (one under root's home would not run as
    /// another user) as uid 65534.
    #[test]
    fn only_root_and_the_vmm_s_own_user_may_connect() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root, to run a client as another uid");
            return;
        }
        let dir =
            std::env::temp_dir().join(format!("hull-control-peer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let (tx, _rx) = std::sync::mpsc::sync_channel::<ClientRequest>(8);
        serve(&Spawner::detached(), &path, tx, "6.12".into(), false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        const PYTHON: &str = "/usr/bin/python3";
        let script = "import socket,sys\n\
                      s=socket.socket(socket.AF_UNIX)\n\
                      s.connect(sys.argv[1])\n\
                      s.settimeout(2)\n\
                      try:\n print('closed' if s.recv(1)==b'' else 'data')\n\
                      except socket.timeout:\n print('open')\n";
        let client = |uid: Option<&str>| {
            let mut cmd = match uid {
                Some(uid) => {
                    let mut cmd = std::process::Command::new("setpriv");
                    cmd.args(["--reuid", uid, "--regid", uid, "--clear-groups", PYTHON]);
                    cmd
                }
                None => std::process::Command::new(PYTHON),
            };
            let out = cmd.args(["-c", script]).arg(&path).output();
            out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        match client(Some("65534")) {
            Ok(answer) if !answer.is_empty() => {
                assert_eq!(answer, "closed", "uid 65534 was let in");
                assert_eq!(client(None).unwrap(), "open", "root was cut off");
            }
            other => panic!("cannot run a client as uid 65534 (setpriv, python3): {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
