//! The container's control socket, `<state>/<id>/control.sock`: how `hull` commands reach a
//! running container. It speaks the agent's protocol (docs/protocol.md): a handshake, then
//! requests and their responses. `hull-vmm` holds the one control connection to the agent and
//! forwards each client request on it under an id of its own, routing the answer back.
//! `create_container` and `shutdown` are hull-vmm's alone.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hull_protocol::{
    answer_hello, read_frame, write_frame, AgentMessage, ErrorKind, ErrorResponse, HostMessage,
    Request, RequestBody, Response, ResponseBody,
};

use crate::thread::{Spawner, ThreadKind};

/// A client connection's writing half, shared by the threads that answer it.
pub type ClientWriter = Arc<Mutex<UnixStream>>;

/// A request from a client, for the supervisor.
pub struct ClientRequest {
    pub request: Request,
    pub writer: ClientWriter,
}

/// Whether a client may send this request (else the error to answer with).
pub fn allowed(body: &RequestBody) -> Result<(), ErrorResponse> {
    match body {
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
    inbox: Sender<T>,
    kernel_release: String,
) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    })?;
    let clients = threads.clone();
    threads.spawn(ThreadKind::ControlListener, move || {
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(conn) => conn,
                Err(err) => {
                    log::warn!("control socket: accept failed: {err}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let inbox = inbox.clone();
            let release = kernel_release.clone();
            let spawned = clients.spawn(ThreadKind::ControlClient, move || {
                serve_client(conn, &inbox, &release)
            });
            if let Err(err) = spawned {
                log::warn!("control socket: cannot start a client thread: {err}");
            }
        }
    })?;
    Ok(())
}

fn serve_client<T: From<ClientRequest>>(mut conn: UnixStream, inbox: &Sender<T>, release: &str) {
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
                if let Err(err) = allowed(&request.body) {
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
        let (tx, rx) = std::sync::mpsc::channel::<ClientRequest>();
        serve(&Spawner::detached(), &path, tx, "6.12".into()).unwrap();

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
        assert!(allowed(&RequestBody::Wait {
            process: ProcessRef::Init
        })
        .is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
