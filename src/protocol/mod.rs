//! The control socket's wire format (SPEC §6): one request per line, one JSON object per response.
//!
//! This module is pure: it turns a line of bytes into a [`Request`] or a [`RequestError`],
//! defines the typed answers ([`Response`] and the reply bodies in `response`) and encodes
//! response lines. It owns no sockets and knows nothing about plugins, so the server (`control`),
//! the daemon that executes requests and the client (`hotreloadctl`, which serialises the same
//! [`Request`] and reads replies back into the same types) share it, and it is tested as a table.
//!
//! A request is either JSON (the first non-blank character is `{`, `[` or `"`; it must be an
//! object with a string `"cmd"`) or a bare command typed by a person into `socat`
//! (`trigger my_plugin`). Every problem becomes a `bad_request` or `unknown_command` error that
//! names what is wrong; the `"id"` of a JSON object is echoed on errors too, so a client that
//! pipelines requests can match every answer.

mod event;
mod response;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use event::{Event, EventKind};
pub use response::{
    DaemonStatus, EnabledReply, ErrorReply, HelpReply, HotReloadStatus, LifecycleReply,
    LifecycleResult, ListReply, PluginDetail, PluginInfo, PluginReply, ReloadRecord, ReloadedReply,
    Response, ScheduledReply, StatusReply, SubscribedReply, TriggerReply, TriggerResult,
};

/// One command the daemon understands. Serialised as the JSON request a client sends
/// (`{"cmd":"trigger","plugin":"p","wait":true}`); the daemon parses requests with
/// [`parse_line`], which also takes the bare-word form and says what is wrong with a bad one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    Status,
    List,
    Plugin {
        #[serde(rename = "plugin")]
        id: String,
    },
    /// `plugin`: that plugin's own switch; none: the global one.
    Enable {
        #[serde(skip_serializing_if = "Option::is_none")]
        plugin: Option<String>,
    },
    Disable {
        #[serde(skip_serializing_if = "Option::is_none")]
        plugin: Option<String>,
    },
    /// `wait`: answer when the reload has finished (the default) instead of at once.
    Trigger {
        #[serde(rename = "plugin")]
        id: String,
        wait: bool,
    },
    /// Stop the plugin and keep it stopped until `start` or `restart` (SPEC §5 "Per-plugin
    /// lifecycle"); `wait`: answer once it is down.
    Stop {
        #[serde(rename = "plugin")]
        id: String,
        wait: bool,
    },
    /// Start a stopped (or failed, or down) plugin with its newest good build.
    Start {
        #[serde(rename = "plugin")]
        id: String,
        wait: bool,
    },
    /// Stop and start the plugin with its newest good build, whatever its state and version.
    Restart {
        #[serde(rename = "plugin")]
        id: String,
        wait: bool,
    },
    /// `plugin`: only events of that plugin (plus `lagged`); `verbose`: `change_ignored` too.
    Subscribe {
        #[serde(skip_serializing_if = "Option::is_none")]
        plugin: Option<String>,
        #[serde(skip_serializing_if = "is_false")]
        verbose: bool,
    },
    ReloadConfig,
    Help,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl Command {
    /// The name of every command, as [`Command::name`] spells it.
    pub const NAMES: &[&str] = &[
        "status",
        "list",
        "plugin",
        "enable",
        "disable",
        "trigger",
        "stop",
        "start",
        "restart",
        "subscribe",
        "reload-config",
        "help",
    ];

    /// The command's name on the wire (the `"cmd"` value).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::List => "list",
            Command::Plugin { .. } => "plugin",
            Command::Enable { .. } => "enable",
            Command::Disable { .. } => "disable",
            Command::Trigger { .. } => "trigger",
            Command::Stop { .. } => "stop",
            Command::Start { .. } => "start",
            Command::Restart { .. } => "restart",
            Command::Subscribe { .. } => "subscribe",
            Command::ReloadConfig => "reload-config",
            Command::Help => "help",
        }
    }

    /// Whether the command changes the daemon's behaviour, and so needs an authorized peer
    /// (SPEC §6, peer credentials).
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            Command::Enable { .. }
                | Command::Disable { .. }
                | Command::Trigger { .. }
                | Command::Stop { .. }
                | Command::Start { .. }
                | Command::Restart { .. }
                | Command::ReloadConfig
        )
    }
}

/// A request: the command and the `"id"` to echo in its response.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Request {
    #[serde(flatten)]
    pub command: Command,
    /// `None`: no `"id"` member (or a bare command); `Some(Value::Null)`: `"id": null`, which
    /// must be echoed as `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl Request {
    /// A request without an `"id"`.
    pub fn new(command: Command) -> Self {
        Request { command, id: None }
    }

    /// The request line a client sends, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // A request is strings, booleans and the caller's id: nothing that cannot be encoded.
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        line.push(b'\n');
        line
    }
}

/// The `code` member of an error response, exactly as SPEC §6 spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownCommand,
    UnknownPlugin,
    LineTooLong,
    TooManyClients,
    PermissionDenied,
    WatchDisabled,
    ConfigInvalid,
    Busy,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::UnknownPlugin => "unknown_plugin",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::TooManyClients => "too_many_clients",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::WatchDisabled => "watch_disabled",
            ErrorCode::ConfigInvalid => "config_invalid",
            ErrorCode::Busy => "busy",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request that could not be parsed; becomes an error line with [`RequestError::to_line`].
#[derive(Clone, Debug, PartialEq)]
pub struct RequestError {
    /// The `"id"` of the request when it was a JSON object carrying one.
    pub id: Option<Value>,
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    fn bad_request(id: Option<Value>, message: impl Into<String>) -> Self {
        RequestError {
            id,
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }

    /// The error response line for this error.
    pub fn to_line(&self) -> Vec<u8> {
        error_line(self.id.as_ref(), self.code, &self.message)
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for RequestError {}

/// Every command with its bare-word syntax, for `help`. JSON requests spell the same
/// arguments as fields: `"plugin"`, `"wait"`, `"verbose"`.
pub const COMMANDS: &[&str] = &[
    "status",
    "list",
    "plugin ID",
    "enable [ID]",
    "disable [ID]",
    "trigger ID [--no-wait]",
    "stop ID [--no-wait]",
    "start ID [--no-wait]",
    "restart ID [--no-wait]",
    "subscribe [ID] [--verbose]",
    "reload-config",
    "help",
];

/// The body of a `help` response: `"commands": [...]`.
pub fn help_body() -> HelpReply {
    HelpReply {
        commands: COMMANDS.iter().map(|c| (*c).to_owned()).collect(),
    }
}

/// Parses one request line (without or with its trailing `\n`; a trailing `\r` is ignored).
///
/// Returns `Ok(None)` for a blank line, which the protocol ignores.
pub fn parse_line(line: &[u8]) -> Result<Option<Request>, RequestError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.contains(&0) {
        return Err(RequestError::bad_request(
            None,
            "request contains a NUL byte",
        ));
    }
    let text = std::str::from_utf8(line)
        .map_err(|_| RequestError::bad_request(None, "request is not valid UTF-8"))?;
    let text = text.trim();
    match text.chars().next() {
        None => Ok(None),
        Some('{' | '[' | '"') => parse_json(text).map(Some),
        Some(_) => parse_bare(text).map(Some),
    }
}

fn parse_json(text: &str) -> Result<Request, RequestError> {
    // serde_json's default recursion limit stays on: it turns `[[[[...` into an error instead
    // of a stack overflow.
    let value: Value = serde_json::from_str(text)
        .map_err(|e| RequestError::bad_request(None, format!("invalid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(RequestError::bad_request(
            None,
            format!(
                "request must be a JSON object like {{\"cmd\": \"status\"}}, got {}",
                json_kind(&value)
            ),
        ));
    };
    let id = object.get("id").cloned();
    match command_from_object(&object) {
        Ok(command) => Ok(Request { id, command }),
        Err((code, message)) => Err(RequestError { id, code, message }),
    }
}

type FieldError = (ErrorCode, String);

fn command_from_object(object: &Map<String, Value>) -> Result<Command, FieldError> {
    let cmd = match object.get("cmd") {
        None => return Err(bad("missing field \"cmd\" (e.g. {\"cmd\": \"status\"})")),
        Some(Value::String(cmd)) => cmd.as_str(),
        Some(other) => {
            return Err(bad(format!(
                "field \"cmd\" must be a string, got {}",
                json_kind(other)
            )));
        }
    };
    Ok(match cmd {
        "status" => Command::Status,
        "list" => Command::List,
        "plugin" => Command::Plugin {
            id: required_plugin(object, cmd)?,
        },
        "enable" => Command::Enable {
            plugin: optional_string(object, "plugin")?,
        },
        "disable" => Command::Disable {
            plugin: optional_string(object, "plugin")?,
        },
        "trigger" | "stop" | "start" | "restart" => {
            let id = required_plugin(object, cmd)?;
            let wait = optional_bool(object, "wait")?.unwrap_or(true);
            with_plugin(cmd, id, wait)
        }
        "subscribe" => Command::Subscribe {
            plugin: optional_string(object, "plugin")?,
            verbose: optional_bool(object, "verbose")?.unwrap_or(false),
        },
        "reload-config" => Command::ReloadConfig,
        "help" => Command::Help,
        other => return Err(unknown_command(other)),
    })
}

/// The `"plugin"` field of a command that needs one.
fn required_plugin(object: &Map<String, Value>, cmd: &str) -> Result<String, FieldError> {
    optional_string(object, "plugin")?.ok_or_else(|| {
        bad(format!(
            "missing field \"plugin\" (e.g. {{\"cmd\": \"{cmd}\", \"plugin\": \"ID\"}})"
        ))
    })
}

/// A string field; `null` counts as absent.
fn optional_string(object: &Map<String, Value>, field: &str) -> Result<Option<String>, FieldError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(format!(
            "field \"{field}\" must be a string, got {}",
            json_kind(other)
        ))),
    }
}

/// A boolean field; `null` counts as absent.
fn optional_bool(object: &Map<String, Value>, field: &str) -> Result<Option<bool>, FieldError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(format!(
            "field \"{field}\" must be true or false, got {}",
            json_kind(other)
        ))),
    }
}

fn parse_bare(text: &str) -> Result<Request, RequestError> {
    let mut words = text.split_ascii_whitespace();
    let name = words.next().unwrap_or_default();
    let args: Vec<&str> = words.collect();
    let command = command_from_words(name, &args).map_err(|(code, message)| RequestError {
        id: None,
        code,
        message,
    })?;
    Ok(Request { id: None, command })
}

fn command_from_words(name: &str, args: &[&str]) -> Result<Command, FieldError> {
    let usage = |syntax: &str| bad(format!("usage: {syntax}"));
    Ok(match (name, args) {
        ("status", []) => Command::Status,
        ("list", []) => Command::List,
        ("plugin", [id]) if !is_flag(id) => Command::Plugin {
            id: (*id).to_owned(),
        },
        ("enable", []) => Command::Enable { plugin: None },
        ("disable", []) => Command::Disable { plugin: None },
        ("enable", [id]) if !is_flag(id) => Command::Enable {
            plugin: Some((*id).to_owned()),
        },
        ("disable", [id]) if !is_flag(id) => Command::Disable {
            plugin: Some((*id).to_owned()),
        },
        ("trigger" | "stop" | "start" | "restart", [id]) if !is_flag(id) => {
            with_plugin(name, (*id).to_owned(), true)
        }
        ("trigger" | "stop" | "start" | "restart", [id, "--no-wait"]) if !is_flag(id) => {
            with_plugin(name, (*id).to_owned(), false)
        }
        ("subscribe", _) => {
            subscribe_from_words(args).ok_or_else(|| usage("subscribe [ID] [--verbose]"))?
        }
        ("reload-config", []) => Command::ReloadConfig,
        ("help", []) => Command::Help,
        ("status" | "list" | "reload-config" | "help", _) => {
            return Err(usage(name));
        }
        ("enable" | "disable", _) => return Err(usage(&format!("{name} [ID]"))),
        ("plugin", _) => return Err(usage("plugin ID")),
        ("trigger" | "stop" | "start" | "restart", _) => {
            return Err(usage(&format!("{name} ID [--no-wait]")));
        }
        (other, _) => return Err(unknown_command(other)),
    })
}

/// The command `name` (`trigger`, `stop`, `start` or `restart`) of plugin `id`.
fn with_plugin(name: &str, id: String, wait: bool) -> Command {
    match name {
        "stop" => Command::Stop { id, wait },
        "start" => Command::Start { id, wait },
        "restart" => Command::Restart { id, wait },
        _ => Command::Trigger { id, wait },
    }
}

/// `subscribe [ID] [--verbose]`, the two in any order.
fn subscribe_from_words(args: &[&str]) -> Option<Command> {
    let mut plugin = None;
    let mut verbose = false;
    for arg in args {
        match *arg {
            "--verbose" if !verbose => verbose = true,
            id if !is_flag(id) && plugin.is_none() => plugin = Some(id.to_owned()),
            _ => return None,
        }
    }
    Some(Command::Subscribe { plugin, verbose })
}

/// Plugin ids start with a letter or digit (SPEC §4), so a leading `-` marks an option.
fn is_flag(word: &str) -> bool {
    word.starts_with('-')
}

fn bad(message: impl Into<String>) -> FieldError {
    (ErrorCode::BadRequest, message.into())
}

fn unknown_command(name: &str) -> FieldError {
    let shown: String = name.chars().take(64).collect();
    (
        ErrorCode::UnknownCommand,
        format!("unknown command \"{shown}\"; try \"help\" for the list of commands"),
    )
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A success response: `{"status":"success","id":...,<body>}` and a newline.
///
/// `id` is omitted when `None`. `body` must serialise as a JSON object (a reply struct, a
/// [`Response`] or a `Map`) whose members are neither `status` nor `id`: the protocol owns them.
pub fn success<B: Serialize + ?Sized>(id: Option<&Value>, body: &B) -> Vec<u8> {
    let mut line = Vec::with_capacity(128);
    line.extend_from_slice(b"{\"status\":\"success\"");
    let written = push_member(&mut line, "id", id).and_then(|()| push_members(&mut line, body));
    if let Err(e) = written {
        // Serialising a `Value` into a `Vec` cannot fail today; if it ever does, the client
        // still gets one well-formed line.
        return error_line(
            id,
            ErrorCode::BadRequest,
            &format!("failed to encode the response: {e}"),
        );
    }
    line.extend_from_slice(b"}\n");
    line
}

/// An error response: `{"status":"error","id":...,"code":CODE,"error":MESSAGE}` and a newline.
pub fn error_line(id: Option<&Value>, code: ErrorCode, message: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(64 + message.len());
    line.extend_from_slice(b"{\"status\":\"error\"");
    let message = Value::from(message);
    let code = Value::from(code.as_str());
    let written = push_member(&mut line, "id", id)
        .and_then(|()| push_member(&mut line, "code", Some(&code)))
        .and_then(|()| push_member(&mut line, "error", Some(&message)));
    if written.is_err() {
        // Only the `id` can be unusual; drop it rather than send a broken line.
        line.clear();
        line.extend_from_slice(b"{\"status\":\"error\",\"code\":\"");
        line.extend_from_slice(code.as_str().unwrap_or_default().as_bytes());
        line.extend_from_slice(b"\",\"error\":\"failed to encode the response\"");
    }
    line.extend_from_slice(b"}\n");
    line
}

/// Appends the members of `body`, which must serialise as a JSON object: `,"a":1,"b":2`.
fn push_members<B: Serialize + ?Sized>(line: &mut Vec<u8>, body: &B) -> serde_json::Result<()> {
    let start = line.len();
    serde_json::to_writer(&mut *line, body)?;
    let encoded = &line[start..];
    if encoded.first() != Some(&b'{') || encoded.last() != Some(&b'}') {
        line.truncate(start);
        return Err(serde::ser::Error::custom(
            "a response body must be a JSON object",
        ));
    }
    line.pop();
    if line.len() == start + 1 {
        // `{}`: no members.
        line.truncate(start);
    } else {
        line[start] = b',';
    }
    Ok(())
}

/// Appends `,"key":value` when `value` is present.
fn push_member(line: &mut Vec<u8>, key: &str, value: Option<&Value>) -> serde_json::Result<()> {
    let Some(value) = value else { return Ok(()) };
    line.push(b',');
    serde_json::to_writer(&mut *line, key)?;
    line.push(b':');
    serde_json::to_writer(&mut *line, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(line: &str) -> Result<Option<Request>, RequestError> {
        parse_line(line.as_bytes())
    }

    fn command(line: &str) -> Command {
        match parse(line) {
            Ok(Some(request)) => request.command,
            other => panic!("{line:?} should parse, got {other:?}"),
        }
    }

    fn error(line: &[u8]) -> RequestError {
        match parse_line(line) {
            Err(e) => e,
            Ok(other) => panic!(
                "{:?} should fail, got {other:?}",
                String::from_utf8_lossy(line)
            ),
        }
    }

    fn trigger(id: &str, wait: bool) -> Command {
        Command::Trigger {
            id: id.to_owned(),
            wait,
        }
    }

    fn enable(plugin: Option<&str>) -> Command {
        Command::Enable {
            plugin: plugin.map(str::to_owned),
        }
    }

    fn disable(plugin: Option<&str>) -> Command {
        Command::Disable {
            plugin: plugin.map(str::to_owned),
        }
    }

    fn subscribe(plugin: Option<&str>, verbose: bool) -> Command {
        Command::Subscribe {
            plugin: plugin.map(str::to_owned),
            verbose,
        }
    }

    #[test]
    fn bare_commands() {
        let table = [
            ("status", Command::Status),
            ("list", Command::List),
            ("plugin foo", Command::Plugin { id: "foo".into() }),
            ("enable", Command::Enable { plugin: None }),
            ("disable", Command::Disable { plugin: None }),
            ("enable foo", enable(Some("foo"))),
            ("disable foo", disable(Some("foo"))),
            ("trigger foo", trigger("foo", true)),
            (
                "stop foo",
                Command::Stop {
                    id: "foo".into(),
                    wait: true,
                },
            ),
            (
                "start foo --no-wait",
                Command::Start {
                    id: "foo".into(),
                    wait: false,
                },
            ),
            (
                "restart foo",
                Command::Restart {
                    id: "foo".into(),
                    wait: true,
                },
            ),
            ("trigger foo --no-wait", trigger("foo", false)),
            ("subscribe", subscribe(None, false)),
            ("subscribe foo", subscribe(Some("foo"), false)),
            ("subscribe --verbose", subscribe(None, true)),
            ("subscribe foo --verbose", subscribe(Some("foo"), true)),
            ("subscribe --verbose foo", subscribe(Some("foo"), true)),
            ("reload-config", Command::ReloadConfig),
            ("help", Command::Help),
            ("  \tstatus  ", Command::Status),
            ("trigger   a.b-c_1\t", trigger("a.b-c_1", true)),
        ];
        for (line, expected) in table {
            assert_eq!(command(line), expected, "{line:?}");
            let request = parse(line).unwrap().unwrap();
            assert_eq!(request.id, None, "{line:?}");
        }
    }

    #[test]
    fn bare_commands_with_wrong_arguments_are_bad_requests_with_usage() {
        let table = [
            ("status now", "usage: status"),
            ("list all", "usage: list"),
            ("plugin", "usage: plugin ID"),
            ("plugin a b", "usage: plugin ID"),
            ("plugin --x", "usage: plugin ID"),
            ("trigger", "usage: trigger ID [--no-wait]"),
            ("trigger a b", "usage: trigger ID [--no-wait]"),
            ("trigger a --wait", "usage: trigger ID [--no-wait]"),
            ("subscribe a b", "usage: subscribe [ID] [--verbose]"),
            (
                "subscribe --verbose --verbose",
                "usage: subscribe [ID] [--verbose]",
            ),
            ("subscribe --loud", "usage: subscribe [ID] [--verbose]"),
            ("enable a b", "usage: enable [ID]"),
            ("disable --all", "usage: disable [ID]"),
            ("stop", "usage: stop ID [--no-wait]"),
            ("start a --wait", "usage: start ID [--no-wait]"),
            ("restart a b", "usage: restart ID [--no-wait]"),
            ("help me", "usage: help"),
        ];
        for (line, message) in table {
            let e = error(line.as_bytes());
            assert_eq!(e.code, ErrorCode::BadRequest, "{line:?}");
            assert_eq!(e.message, message, "{line:?}");
            assert_eq!(e.id, None);
        }
    }

    #[test]
    fn unknown_bare_and_json_commands() {
        let e = error(b"reboot");
        assert_eq!(e.code, ErrorCode::UnknownCommand);
        assert!(e.message.contains("\"reboot\""), "{}", e.message);
        let e = error(br#"{"cmd":"STATUS","id":7}"#);
        assert_eq!(e.code, ErrorCode::UnknownCommand);
        assert_eq!(e.id, Some(json!(7)));
    }

    #[test]
    fn json_commands() {
        let table = [
            (r#"{"cmd":"status"}"#, Command::Status),
            (r#"{"cmd":"list"}"#, Command::List),
            (
                r#"{"cmd":"plugin","plugin":"foo"}"#,
                Command::Plugin { id: "foo".into() },
            ),
            (r#"{"cmd":"enable"}"#, enable(None)),
            (r#"{"cmd":"disable"}"#, disable(None)),
            (r#"{"cmd":"enable","plugin":"foo"}"#, enable(Some("foo"))),
            (r#"{"cmd":"disable","plugin":"foo"}"#, disable(Some("foo"))),
            (
                r#"{"cmd":"stop","plugin":"foo"}"#,
                Command::Stop {
                    id: "foo".into(),
                    wait: true,
                },
            ),
            (
                r#"{"cmd":"start","plugin":"foo","wait":false}"#,
                Command::Start {
                    id: "foo".into(),
                    wait: false,
                },
            ),
            (
                r#"{"cmd":"restart","plugin":"foo","wait":true}"#,
                Command::Restart {
                    id: "foo".into(),
                    wait: true,
                },
            ),
            (r#"{"cmd":"trigger","plugin":"foo"}"#, trigger("foo", true)),
            (
                r#"{"cmd":"trigger","plugin":"foo","wait":false}"#,
                trigger("foo", false),
            ),
            (
                r#"{"cmd":"trigger","plugin":"foo","wait":null}"#,
                trigger("foo", true),
            ),
            (r#"{"cmd":"subscribe"}"#, subscribe(None, false)),
            (
                r#"{"cmd":"subscribe","plugin":"x","verbose":true}"#,
                subscribe(Some("x"), true),
            ),
            (
                r#"{"cmd":"subscribe","plugin":null}"#,
                subscribe(None, false),
            ),
            (r#"{"cmd":"reload-config"}"#, Command::ReloadConfig),
            (r#"{"cmd":"help"}"#, Command::Help),
            (
                r#"  {"cmd" : "status", "extra": [1, {"x": 2}]}  "#,
                Command::Status,
            ),
            (
                r#"{"cmd":"status","plugin":5,"wait":"no"}"#,
                Command::Status,
            ),
        ];
        for (line, expected) in table {
            assert_eq!(command(line), expected, "{line:?}");
        }
    }

    #[test]
    fn json_id_is_kept_including_null_and_nested() {
        let table = [
            (r#"{"cmd":"status"}"#, None),
            (r#"{"cmd":"status","id":null}"#, Some(Value::Null)),
            (r#"{"id":42,"cmd":"status"}"#, Some(json!(42))),
            (r#"{"cmd":"status","id":"abc"}"#, Some(json!("abc"))),
            (
                r#"{"cmd":"status","id":{"a":[1,{"b":null}]}}"#,
                Some(json!({"a":[1,{"b":null}]})),
            ),
        ];
        for (line, id) in table {
            assert_eq!(parse(line).unwrap().unwrap().id, id, "{line:?}");
        }
    }

    #[test]
    fn json_errors_name_the_problem_and_keep_the_id() {
        let table: [(&str, Option<Value>, &str); 11] = [
            (r#"{"id":1}"#, Some(json!(1)), "missing field \"cmd\""),
            (
                r#"{"id":null,"cmd":3}"#,
                Some(Value::Null),
                "field \"cmd\" must be a string, got a number",
            ),
            (
                r#"{"id":"x","cmd":"plugin"}"#,
                Some(json!("x")),
                "missing field \"plugin\"",
            ),
            (
                r#"{"cmd":"plugin","plugin":7}"#,
                None,
                "field \"plugin\" must be a string, got a number",
            ),
            (
                r#"{"id":[2],"cmd":"trigger"}"#,
                Some(json!([2])),
                "missing field \"plugin\"",
            ),
            (
                r#"{"cmd":"trigger","plugin":"a","wait":"yes"}"#,
                None,
                "field \"wait\" must be true or false",
            ),
            (
                r#"{"id":5,"cmd":"subscribe","verbose":1}"#,
                Some(json!(5)),
                "field \"verbose\"",
            ),
            (
                r#"{"cmd":"subscribe","plugin":["a"]}"#,
                None,
                "field \"plugin\" must be a string, got an array",
            ),
            (r#"["status"]"#, None, "must be a JSON object"),
            (r#""status""#, None, "got a string"),
            (r#"{"cmd":"status""#, None, "invalid JSON"),
        ];
        for (line, id, message) in table {
            let e = error(line.as_bytes());
            assert_eq!(e.code, ErrorCode::BadRequest, "{line:?}");
            assert_eq!(e.id, id, "{line:?}");
            assert!(e.message.contains(message), "{line:?}: {}", e.message);
        }
    }

    #[test]
    fn blank_lines_are_ignored() {
        for line in ["", "\n", "\r\n", "   \t ", " \r"] {
            assert_eq!(parse(line), Ok(None), "{line:?}");
        }
    }

    #[test]
    fn trailing_carriage_return_is_stripped() {
        assert_eq!(command("status\r"), Command::Status);
        assert_eq!(
            command("plugin foo\r\n"),
            Command::Plugin { id: "foo".into() }
        );
        assert_eq!(command("{\"cmd\":\"list\"}\r"), Command::List);
    }

    #[test]
    fn nul_bytes_and_invalid_utf8_are_bad_requests() {
        for line in [
            &b"stat\0us"[..],
            b"{\"cmd\":\"status\"}\0",
            b"\xff\xfe",
            b"plugin \xc3\x28",
        ] {
            let e = error(line);
            assert_eq!(e.code, ErrorCode::BadRequest, "{line:?}");
            assert_eq!(e.id, None);
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(error(deep.as_bytes()).code, ErrorCode::BadRequest);
        let deep_id = format!(
            "{{\"cmd\":\"status\",\"id\":{}1{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(error(deep_id.as_bytes()).code, ErrorCode::BadRequest);
    }

    #[test]
    fn names_and_mutating_commands() {
        let mutating = [
            "enable",
            "disable",
            "enable x",
            "disable x",
            "trigger x",
            "stop x",
            "start x",
            "restart x",
            "reload-config",
        ];
        let reading = ["status", "list", "plugin x", "subscribe", "help"];
        for line in mutating {
            assert!(command(line).is_mutating(), "{line}");
        }
        for line in reading {
            assert!(!command(line).is_mutating(), "{line}");
        }
        for line in mutating.iter().chain(&reading) {
            assert_eq!(command(line).name(), line.split(' ').next().unwrap());
        }
    }

    #[test]
    fn every_help_entry_parses_as_a_bare_command() {
        for entry in COMMANDS {
            let line = entry
                .replace(" [--no-wait]", "")
                .replace(" [ID] [--verbose]", "")
                .replace(" [ID]", "")
                .replace("ID", "x");
            assert!(parse(&line).unwrap().is_some(), "{entry}");
        }
        assert_eq!(help_body().commands.len(), COMMANDS.len());
        let first_words: Vec<&str> = COMMANDS
            .iter()
            .map(|c| c.split(' ').next().unwrap())
            .collect();
        assert_eq!(first_words, Command::NAMES, "help lists every command once");
    }

    fn decode(line: &[u8]) -> Value {
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn success_lines_carry_status_id_and_body() {
        let mut body = Map::new();
        body.insert("enabled".into(), json!(true));
        let line = success(Some(&json!({"n":[1]})), &body);
        assert!(line.starts_with(b"{\"status\":\"success\""));
        assert_eq!(
            decode(&line),
            json!({"status":"success","id":{"n":[1]},"enabled":true})
        );
        assert_eq!(
            decode(&success(Some(&Value::Null), &body)),
            json!({"status":"success","id":null,"enabled":true})
        );
        assert_eq!(
            decode(&success(None, &body)),
            json!({"status":"success","enabled":true})
        );
    }

    #[test]
    fn error_lines_follow_the_spec_format() {
        let line = error_line(
            Some(&Value::Null),
            ErrorCode::LineTooLong,
            "line \"x\"\nis long",
        );
        assert_eq!(
            decode(&line),
            json!({"status":"error","id":null,"code":"line_too_long","error":"line \"x\"\nis long"})
        );
        let e = error(br#"{"id":"q","cmd":1}"#);
        assert_eq!(decode(&e.to_line())["id"], json!("q"));
        assert_eq!(
            decode(&error_line(None, ErrorCode::Busy, "m")),
            json!({"status":"error","code":"busy","error":"m"})
        );
    }

    #[test]
    fn numeric_ids_are_echoed_exactly_as_sent() {
        // Found by fuzz/control_request: without serde_json's float_roundtrip the echoed id was
        // one ulp away from the parsed one, so a client matching answers by id lost this one.
        let request = br#"{"cmd":"plugin","id":555555555555555555555555555555551.1}"#;
        let e = error(request);
        let echoed = decode(&e.to_line())["id"].clone();
        assert_eq!(Some(echoed), e.id);
        for id in [
            "0.1",
            "1e300",
            "-0.0",
            "18446744073709551616",
            "2.2250738585072014e-308",
        ] {
            let line = format!(r#"{{"cmd":"status","id":{id}}}"#);
            let request = parse_line(line.as_bytes()).unwrap().unwrap();
            let echoed = decode(&success(request.id.as_ref(), &Map::new()))["id"].clone();
            assert_eq!(Some(echoed), request.id, "id {id}");
        }
    }

    #[test]
    fn error_codes_are_spelled_as_in_the_spec() {
        let table = [
            (ErrorCode::BadRequest, "bad_request"),
            (ErrorCode::UnknownCommand, "unknown_command"),
            (ErrorCode::UnknownPlugin, "unknown_plugin"),
            (ErrorCode::LineTooLong, "line_too_long"),
            (ErrorCode::TooManyClients, "too_many_clients"),
            (ErrorCode::PermissionDenied, "permission_denied"),
            (ErrorCode::WatchDisabled, "watch_disabled"),
            (ErrorCode::ConfigInvalid, "config_invalid"),
            (ErrorCode::Busy, "busy"),
        ];
        for (code, text) in table {
            assert_eq!(code.as_str(), text);
            assert_eq!(serde_json::to_value(code).unwrap(), json!(text));
            assert_eq!(
                serde_json::from_value::<ErrorCode>(json!(text)).unwrap(),
                code
            );
        }
    }

    /// One of each command, with and without its optional arguments.
    fn every_command() -> Vec<Command> {
        // Does not compile when a command is added without a case here (and in `NAMES`).
        match Command::Status {
            Command::Status
            | Command::List
            | Command::Plugin { .. }
            | Command::Enable { .. }
            | Command::Disable { .. }
            | Command::Trigger { .. }
            | Command::Stop { .. }
            | Command::Start { .. }
            | Command::Restart { .. }
            | Command::Subscribe { .. }
            | Command::ReloadConfig
            | Command::Help => {}
        }
        vec![
            Command::Status,
            Command::List,
            Command::Plugin { id: "p".into() },
            enable(None),
            enable(Some("p")),
            disable(None),
            disable(Some("p")),
            trigger("p", true),
            trigger("p", false),
            Command::Stop {
                id: "p".into(),
                wait: true,
            },
            Command::Start {
                id: "p".into(),
                wait: false,
            },
            Command::Restart {
                id: "p".into(),
                wait: true,
            },
            subscribe(None, false),
            subscribe(Some("p"), false),
            subscribe(None, true),
            subscribe(Some("p"), true),
            Command::ReloadConfig,
            Command::Help,
        ]
    }

    #[test]
    fn names_list_every_command_once() {
        let mut named: Vec<&str> = every_command().iter().map(Command::name).collect();
        named.dedup();
        assert_eq!(named, Command::NAMES);
    }

    #[test]
    fn requests_a_client_serialises_parse_back_to_themselves() {
        let ids = [
            None,
            Some(Value::Null),
            Some(json!(7)),
            Some(json!({"a": [1.5]})),
        ];
        for command in every_command() {
            assert!(Command::NAMES.contains(&command.name()), "{command:?}");
            for id in &ids {
                let request = Request {
                    command: command.clone(),
                    id: id.clone(),
                };
                let line = request.to_line();
                assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
                assert_eq!(parse_line(&line), Ok(Some(request)), "{line:?}");
            }
        }
    }

    #[test]
    fn requests_are_serialised_as_the_spec_shows_them() {
        let table = [
            (Command::Status, json!({"cmd": "status"})),
            (enable(None), json!({"cmd": "enable"})),
            (disable(Some("p")), json!({"cmd": "disable", "plugin": "p"})),
            (
                Command::Stop {
                    id: "p".into(),
                    wait: true,
                },
                json!({"cmd": "stop", "plugin": "p", "wait": true}),
            ),
            (
                Command::Plugin { id: "p".into() },
                json!({"cmd": "plugin", "plugin": "p"}),
            ),
            (
                trigger("p", false),
                json!({"cmd": "trigger", "plugin": "p", "wait": false}),
            ),
            (subscribe(None, false), json!({"cmd": "subscribe"})),
            (
                subscribe(Some("p"), true),
                json!({"cmd": "subscribe", "plugin": "p", "verbose": true}),
            ),
            (Command::ReloadConfig, json!({"cmd": "reload-config"})),
        ];
        for (command, expected) in table {
            assert_eq!(
                serde_json::to_value(Request::new(command)).unwrap(),
                expected
            );
        }
        let with_id = Request {
            command: Command::List,
            id: Some(Value::Null),
        };
        assert_eq!(
            String::from_utf8(with_id.to_line()).unwrap(),
            "{\"cmd\":\"list\",\"id\":null}\n"
        );
    }

    fn info() -> PluginInfo {
        PluginInfo {
            cpu_usage_ms: Some(20),
            exec: "/p/p1/main".into(),
            failed_reloads: 1,
            hot_reload: true,
            id: "p1".into(),
            last_error: None,
            last_good_version: Some("v1".into()),
            memory_bytes: None,
            pid: Some(42),
            reload_count: 3,
            restarts: 0,
            started_at: Some("2026-01-01T00:00:00Z".into()),
            state: "running".into(),
            status_text: None,
            tasks: 2,
            version: Some("v2".into()),
        }
    }

    fn round_trip<T>(body: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let line = success(Some(&json!(1)), body);
        serde_json::from_slice(&line).unwrap()
    }

    #[test]
    fn replies_read_back_into_the_types_they_were_written_from() {
        let status = StatusReply {
            daemon: DaemonStatus {
                pid: 7,
                plugins_dir: "/p".into(),
                plugins_dir_present: true,
                plugins_running: 1,
                plugins_total: 2,
                uptime_ms: 5,
                version: "0.1.0".into(),
                watch: true,
            },
            hot_reload: HotReloadStatus {
                active_sessions: 1,
                debounce_delay_ms: 500,
                enabled: true,
                exclude_patterns: vec!["*.tmp".into()],
                failed_reloads: 0,
                last_reload: None,
                reload_count: 0,
                watch_patterns: vec!["*".into()],
                watching_directories: 2,
                watch_mode: "auto".into(),
                polled_directories: 1,
                watching_subdirectories: 0,
            },
        };
        assert_eq!(round_trip(&status), status);
        let list = ListReply {
            plugins: vec![info()],
        };
        assert_eq!(round_trip(&list), list);
        let detail = PluginReply {
            plugin: PluginDetail {
                info: info(),
                history: vec![ReloadRecord {
                    duration_ms: 12,
                    error: Some("boom".into()),
                    new_version: Some("v2".into()),
                    ok: false,
                    old_version: None,
                    time: "2026-01-01T00:00:00.000Z".into(),
                    trigger: "manual".into(),
                }],
                state_file: json!({"plugin_id": "p1"}),
                watched_by: Some("poll".into()),
                poll_reason: Some("watch_mode = \"poll\"".into()),
            },
        };
        assert_eq!(round_trip(&detail), detail);
        let result = TriggerReply {
            result: TriggerResult {
                duration_ms: 3,
                error: None,
                new_version: Some("v2".into()),
                ok: true,
                old_version: Some("v1".into()),
                plugin: "p1".into(),
            },
        };
        assert_eq!(round_trip(&result), result);
        let reloaded = ReloadedReply {
            needs_restart: vec!["state_dir".into()],
            reloaded: true,
        };
        assert_eq!(round_trip(&reloaded), reloaded);
        assert_eq!(round_trip(&help_body()), help_body());
    }

    #[test]
    fn unset_fields_are_null_not_absent() {
        let mut bare = info();
        bare.pid = None;
        bare.version = None;
        let line = Response::List(ListReply {
            plugins: vec![bare],
        })
        .to_line(None);
        let entry = decode(&line)["plugins"][0].clone();
        for field in [
            "pid",
            "version",
            "last_error",
            "status_text",
            "memory_bytes",
        ] {
            assert_eq!(entry.get(field), Some(&Value::Null), "{field}");
        }
    }

    /// The line of `body` as the `json!` maps the typed replies replaced wrote it: through a
    /// `Value`, whose map sorts its members.
    fn as_sorted_map<T: Serialize>(body: &T) -> Vec<u8> {
        success(Some(&json!(1)), &serde_json::to_value(body).unwrap())
    }

    #[test]
    fn reply_lines_are_byte_for_byte_those_of_sorted_maps() {
        let record = ReloadRecord {
            duration_ms: 1,
            error: None,
            new_version: None,
            ok: true,
            old_version: None,
            time: "t".into(),
            trigger: "watch".into(),
        };
        let result = TriggerReply {
            result: TriggerResult {
                duration_ms: 3,
                error: None,
                new_version: None,
                ok: false,
                old_version: None,
                plugin: "p1".into(),
            },
        };
        let reloaded = ReloadedReply {
            needs_restart: Vec::new(),
            reloaded: true,
        };
        let detail = PluginReply {
            plugin: PluginDetail {
                info: info(),
                history: vec![record.clone()],
                state_file: json!({"plugin_id": "p1", "b": [1], "a": null}),
                watched_by: Some("inotify".into()),
                poll_reason: None,
            },
        };
        let id = Some(&json!(1));
        assert_eq!(success(id, &info()), as_sorted_map(&info()));
        assert_eq!(success(id, &detail), as_sorted_map(&detail));
        assert_eq!(success(id, &record), as_sorted_map(&record));
        assert_eq!(success(id, &result), as_sorted_map(&result));
        assert_eq!(success(id, &reloaded), as_sorted_map(&reloaded));
    }

    #[test]
    fn error_responses_carry_code_and_message() {
        let line = Response::error(ErrorCode::UnknownPlugin, "no plugin named \"x\"")
            .to_line(Some(&json!("q")));
        assert_eq!(
            decode(&line),
            json!({"status": "error", "id": "q", "code": "unknown_plugin", "error": "no plugin named \"x\""})
        );
        let read: ErrorReply = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            read,
            ErrorReply::new(ErrorCode::UnknownPlugin, "no plugin named \"x\"")
        );
    }

    #[test]
    fn a_body_that_is_not_an_object_becomes_an_error_line() {
        let line = success(Some(&json!(1)), &[1, 2]);
        let value = decode(&line);
        assert_eq!(value["status"], "error");
        assert_eq!(value["id"], 1);
        assert_eq!(
            decode(&success(None, &Map::new())),
            json!({"status": "success"})
        );
    }
}
