//! One connection to the daemon's control socket: send a JSON request line, read JSON reply lines.
//! Requests and reply bodies are the types of [`crate::protocol`], the daemon's own.
//!
//! Blocking I/O with timeouts: a normal request must be answered within [`REQUEST_TIMEOUT`]; callers
//! that wait on purpose (a `trigger` that waits for the reload, an event subscription) lift or
//! shorten the read timeout. A partial line survives a read timeout, so a caller may time out,
//! look at the clock and read on without losing data.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::CtlError;
use crate::protocol::{ErrorReply, Request};

/// How long a plain request (status, list, ...) may take to be answered.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long writing a request may block (the daemon never stops reading for long).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A reply line from the daemon, kept both raw (for `--json`) and parsed.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The line as received, without its newline.
    pub line: String,
    /// The parsed object.
    pub value: Value,
}

/// A connected control-socket client.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Bytes of a line not yet complete when a read timed out.
    pending: Vec<u8>,
}

impl Client {
    /// Connects to the socket at `path`; failure is [`CtlError::Unreachable`] naming the path.
    pub fn connect(path: &Path) -> Result<Client, CtlError> {
        let stream = UnixStream::connect(path)
            .map_err(|e| CtlError::Unreachable(connect_error(path, &e)))?;
        let setup = |stream: &UnixStream| -> io::Result<UnixStream> {
            stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
            stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            stream.try_clone()
        };
        let reader = setup(&stream).map_err(|e| {
            CtlError::Unreachable(format!(
                "cannot set up connection to {}: {}",
                path.display(),
                os_text(&e)
            ))
        })?;
        Ok(Client {
            path: path.to_path_buf(),
            writer: stream,
            reader: BufReader::new(reader),
            pending: Vec::new(),
        })
    }

    /// The socket path this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets how long [`Client::read_line`] may block; `None` waits forever.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), CtlError> {
        // A zero timeout means "invalid" to the kernel API; round it up to the smallest wait.
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.writer
            .set_read_timeout(timeout)
            .map_err(|e| self.lost("set the read timeout", &e))
    }

    /// A second handle on the socket; `shutdown` on it wakes a thread blocked in `read_line`.
    pub fn handle(&self) -> Result<UnixStream, CtlError> {
        self.writer
            .try_clone()
            .map_err(|e| self.lost("clone the connection", &e))
    }

    /// Sends one request line.
    pub fn send(&mut self, request: &Request) -> Result<(), CtlError> {
        self.writer
            .write_all(&request.to_line())
            .and_then(|()| self.writer.flush())
            .map_err(|e| self.lost("send the request", &e))
    }

    /// Reads one line (without its newline): `Ok(None)` at end of stream,
    /// [`ReadError::TimedOut`] when the read timeout passed first.
    pub fn read_line(&mut self) -> Result<Option<String>, ReadError> {
        match self.reader.read_until(b'\n', &mut self.pending) {
            Ok(0) if self.pending.is_empty() => Ok(None),
            Ok(_) => {
                let mut bytes = std::mem::take(&mut self.pending);
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                }
                Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(ReadError::TimedOut)
            }
            Err(e) => Err(ReadError::Failed(self.lost("read the reply", &e))),
        }
    }

    /// Reads one line and parses it as a JSON object; end of stream is [`CtlError::Unreachable`].
    pub fn read_reply(&mut self) -> Result<Reply, CtlError> {
        let line = match self.read_line() {
            Ok(Some(line)) => line,
            Ok(None) => {
                return Err(CtlError::Unreachable(format!(
                    "daemon at {} closed the connection before answering",
                    self.path.display()
                )));
            }
            Err(ReadError::TimedOut) => {
                return Err(CtlError::Unreachable(format!(
                    "daemon at {} did not answer within {} s",
                    self.path.display(),
                    REQUEST_TIMEOUT.as_secs()
                )));
            }
            Err(ReadError::Failed(e)) => return Err(e),
        };
        parse_reply(line, &self.path)
    }

    /// Sends `request` and reads its reply, whatever its status.
    pub fn request(&mut self, request: &Request) -> Result<Reply, CtlError> {
        self.send(request)?;
        self.read_reply()
    }

    fn lost(&self, what: &str, e: &io::Error) -> CtlError {
        CtlError::Unreachable(format!(
            "cannot {what} on {}: {} (did hotreloadd stop?)",
            self.path.display(),
            os_text(e)
        ))
    }
}

/// Why [`Client::read_line`] returned no line.
#[derive(Debug)]
pub enum ReadError {
    /// The read timeout passed; a partial line is kept for the next read.
    TimedOut,
    /// The connection failed.
    Failed(CtlError),
}

/// Parses a reply or event line; anything but a JSON object means the peer is not our daemon.
pub fn parse_reply(line: String, path: &Path) -> Result<Reply, CtlError> {
    match serde_json::from_str::<Value>(&line) {
        Ok(value) if value.is_object() => Ok(Reply { line, value }),
        _ => Err(CtlError::Unreachable(format!(
            "unexpected reply from {}: {:?} (is that socket hotreloadd's?)",
            path.display(),
            truncate_chars(&line, 200)
        ))),
    }
}

impl Reply {
    /// `Err(CtlError::Daemon)` when the reply is `{"status":"error",...}`.
    pub fn into_success(self) -> Result<Reply, CtlError> {
        if self.value["status"] != "error" {
            return Ok(self);
        }
        // A newer daemon may send a code this client does not know: it is shown as sent.
        Err(match ErrorReply::deserialize(&self.value) {
            Ok(e) => CtlError::Daemon {
                code: e.code.as_str().to_owned(),
                message: e.error,
            },
            Err(_) => CtlError::Daemon {
                code: self.value["code"].as_str().unwrap_or("unknown").to_string(),
                message: self.value["error"]
                    .as_str()
                    .unwrap_or("the daemon reported an error without a message")
                    .to_string(),
            },
        })
    }

    /// The reply's body as the protocol type `T` (`StatusReply` for `status`, ...); a body
    /// that does not fit means the peer is not a hotreloadd this client can talk to.
    pub fn body<T: DeserializeOwned>(&self) -> Result<T, CtlError> {
        T::deserialize(&self.value).map_err(|e| {
            CtlError::Unreachable(format!(
                "unexpected reply from the daemon: {e}: {:?} (is hotreloadctl as new as hotreloadd?)",
                truncate_chars(&self.line, 200)
            ))
        })
    }
}

/// Refuses to talk through a socket whose directory another user controls (SPEC §2), before
/// connecting: a name like `/tmp/hotreload-$UID` can be created first by anyone, who could then
/// listen there and impersonate hotreloadd. For a path resolved from the configuration or the
/// defaults, which should name a directory of the user's own or the system's: it must be owned
/// by root or by us and not writable by others (group write is the group's business: a system
/// unit's `RuntimeDirectoryMode=0770`). A path named with `--socket` or `$HOTRELOAD_SOCKET` is
/// the user's own choice and not judged (another user's daemon may be meant). A directory that
/// cannot be inspected is left to `connect` to report.
pub fn check_socket_dir(socket: &Path) -> Result<(), CtlError> {
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    let euid = nix::unistd::geteuid().as_raw();
    let owner = meta.uid();
    let mode = meta.mode() & 0o7777;
    let foreign = owner != 0 && owner != euid;
    if !foreign && mode & 0o002 == 0 {
        return Ok(());
    }
    let what = if foreign {
        format!(
            "is owned by {}, not by you or root, and has mode {mode:04o}",
            user_text(owner)
        )
    } else {
        format!("is writable by others (mode {mode:04o})")
    };
    Err(CtlError::Unreachable(format!(
        "refusing to connect to {}: its directory {} {what}, so another user may have put an \
         impostor there; remove the directory (as root: rm -rf {}) or pass --socket with the \
         daemon's real socket",
        socket.display(),
        dir.display(),
        dir.display()
    )))
}

/// "uid 1000 (alice)", or "uid 1000" for a uid without a name.
fn user_text(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

/// The message for a failed `connect`: path, reason and what to do about it.
fn connect_error(path: &Path, e: &io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => {
            "(only root, the daemon's user and members of the socket's group may connect; \
             are you in the hotreload group?)"
        }
        _ => "(is hotreloadd running? set --socket or $HOTRELOAD_SOCKET)",
    };
    format!(
        "cannot connect to {}: {} {hint}",
        path.display(),
        os_text(e)
    )
}

/// The OS's description of an error without std's " (os error N)" suffix.
pub fn os_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => nix::errno::Errno::from_raw(errno).desc().to_string(),
        None => e.to_string(),
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_error_names_path_reason_and_remedy() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        let msg = connect_error(Path::new("/run/hotreload/control.sock"), &e);
        assert_eq!(
            msg,
            "cannot connect to /run/hotreload/control.sock: No such file or directory \
             (is hotreloadd running? set --socket or $HOTRELOAD_SOCKET)"
        );
        let e = io::Error::from_raw_os_error(libc::EACCES);
        assert!(connect_error(Path::new("/s"), &e).contains("hotreload group"));
    }

    #[test]
    fn a_socket_dir_others_may_write_is_refused() {
        let dir = std::env::temp_dir().join(format!("hrctl-squat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("control.sock");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_socket_dir(&socket).is_ok());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_socket_dir(&socket).unwrap_err();
        assert_eq!(err.exit_code(), 69);
        assert_eq!(
            err.to_string(),
            format!(
                "refusing to connect to {}: its directory {} is writable by others (mode 0777), \
                 so another user may have put an impostor there; remove the directory (as root: \
                 rm -rf {}) or pass --socket with the daemon's real socket",
                socket.display(),
                dir.display(),
                dir.display()
            )
        );
        assert!(check_socket_dir(&dir.join("missing/control.sock")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn error_reply_becomes_daemon_error() {
        let line = r#"{"status":"error","code":"unknown_plugin","error":"no plugin p9"}"#;
        let reply = parse_reply(line.to_string(), Path::new("/s")).unwrap();
        match reply.into_success() {
            Err(CtlError::Daemon { code, message }) => {
                assert_eq!(
                    (code.as_str(), message.as_str()),
                    ("unknown_plugin", "no plugin p9")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_error_code_this_client_does_not_know_is_shown_as_sent() {
        let line = r#"{"status":"error","code":"too_new","error":"m"}"#;
        let reply = parse_reply(line.to_string(), Path::new("/s")).unwrap();
        match reply.into_success() {
            Err(CtlError::Daemon { code, message }) => {
                assert_eq!((&*code, &*message), ("too_new", "m"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reply_body_reads_into_its_protocol_type() {
        use crate::protocol::{ListReply, PluginInfo, Response, TriggerReply};
        let info = PluginInfo {
            id: "p1".into(),
            pid: Some(3),
            ..PluginInfo::default()
        };
        let sent = Response::List(ListReply {
            plugins: vec![info.clone()],
        })
        .to_line(Some(&json!(1)));
        let line = String::from_utf8(sent).unwrap().trim_end().to_owned();
        let reply = parse_reply(line, Path::new("/s")).unwrap();
        assert_eq!(reply.body::<ListReply>().unwrap().plugins, [info]);
        // An older daemon's reply lacks the newer members: they read as their defaults.
        let old = r#"{"status":"success","result":{"plugin":"p1","ok":true}}"#;
        let reply = parse_reply(old.to_string(), Path::new("/s")).unwrap();
        let result = reply.body::<TriggerReply>().unwrap().result;
        assert!(result.ok && result.error.is_none() && result.duration_ms == 0);
        // A body of the wrong shape is not a daemon this client can talk to.
        let wrong = r#"{"status":"success","plugins":"none"}"#;
        let reply = parse_reply(wrong.to_string(), Path::new("/s")).unwrap();
        assert_eq!(reply.body::<ListReply>().unwrap_err().exit_code(), 69);
    }

    #[test]
    fn non_object_reply_is_not_our_daemon() {
        let err = parse_reply("HTTP/1.1 400".to_string(), Path::new("/x.sock")).unwrap_err();
        assert_eq!(err.exit_code(), 69);
        assert!(err.to_string().contains("/x.sock"));
    }

    #[test]
    fn partial_line_survives_a_read_timeout() {
        let dir = std::env::temp_dir().join(format!("hrctl-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("partial.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let mut client = Client::connect(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"{\"a\":").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        assert!(matches!(client.read_line(), Err(ReadError::TimedOut)));
        server.write_all(b"1}\n").unwrap();
        client.set_read_timeout(None).unwrap();
        let reply = client.read_reply().unwrap();
        assert_eq!(reply.value, json!({"a": 1}));
        drop(server);
        assert!(matches!(client.read_line(), Ok(None)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
