//! `parse`: TOML text to a validated [`FileConfig`], with every error pointing at `file:line:column`.
//!
//! The text is parsed once into toml's spanned document tree. That tree is used three ways:
//! 1. unknown keys are found by walking it against the field lists of the serde structs (read from
//!    serde itself, so the "valid keys" in messages cannot drift from the structs), which gives the
//!    exact key position and the table it sits in;
//! 2. it is handed to serde for typing, and a type error's span is mapped back to the key whose
//!    value contains it, so the message can name the key;
//! 3. value checks report a key path, and the tree maps that path to the key's position.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, Visitor};
use toml::de::{DeTable, DeValue};

use super::error::ConfigError;
use super::file::{
    ControlFile, FileConfig, HookSettings, HotReload, PluginConfig, SupervisorSettings,
};
use super::validate::{KeyProblem, describe_key, describe_table, validate};

/// Parses and validates the text of a config file. Pure: `origin` only names the file in messages.
pub fn parse(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
    let source = Source { text, origin };
    let root = DeTable::parse(text).map_err(|error| source.syntax_error(&error))?;
    let index = KeyIndex::build(root.get_ref());
    if let Some(problem) = first_unknown_key(root.get_ref()) {
        return Err(source.error_at(Some(problem.offset), &problem.message));
    }
    let file = FileConfig::deserialize(toml::de::Deserializer::from(root))
        .map_err(|error| source.type_error(&index, &error))?;
    validate(&file).map_err(|problem| source.key_error(&index, &problem))?;
    Ok(file)
}

/// The text being parsed and the name it is reported under.
struct Source<'a> {
    text: &'a str,
    origin: &'a Path,
}

impl Source<'_> {
    /// `<file>:<line>:<column>: <message>`, or `<file>: <message>` without a position.
    fn error_at(&self, offset: Option<usize>, message: &str) -> ConfigError {
        let origin = self.origin.display();
        match offset {
            Some(offset) => {
                let (line, column) = line_and_column(self.text, offset);
                ConfigError::new(format!("{origin}:{line}:{column}: {message}"))
            }
            None => ConfigError::new(format!("{origin}: {message}")),
        }
    }

    /// toml's message plus the offending text when it is short ("duplicate key" says which).
    fn syntax_error(&self, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let snippet = span.as_ref().and_then(|span| self.text.get(span.clone()));
        let shown = snippet
            .filter(|text| !text.trim().is_empty() && !text.contains('\n') && text.len() <= 60);
        let detail = error.message().trim_end();
        let message = match shown {
            Some(text) => format!("invalid TOML: {detail} at `{text}`"),
            None => format!("invalid TOML: {detail}"),
        };
        self.error_at(span.map(|span| span.start), &message)
    }

    /// Names the key whose value holds the error span: serde only knows the value and the type.
    fn type_error(&self, index: &KeyIndex, error: &toml::de::Error) -> ConfigError {
        let detail = &in_toml_terms(error.message().trim_end());
        let span = error.span();
        match span.as_ref().and_then(|span| index.key_holding(span)) {
            Some(entry) => {
                let message = format!("invalid value for {}: {detail}", describe_key(&entry.path));
                self.error_at(span.map(|span| span.start), &message)
            }
            None => self.error_at(span.map(|span| span.start), detail),
        }
    }

    fn key_error(&self, index: &KeyIndex, problem: &KeyProblem) -> ConfigError {
        let offset = index.key_at(&problem.path).map(|entry| entry.key.start);
        self.error_at(offset, &problem.message)
    }
}

/// Rewrites serde's Rust-flavoured type names in the words TOML uses.
fn in_toml_terms(message: &str) -> String {
    const TERMS: [(&str, &str); 7] = [
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
        ("invalid type: sequence", "invalid type: array"),
        ("invalid type: map", "invalid type: table"),
        ("expected u64", "expected a non-negative integer"),
        ("expected usize", "expected a non-negative integer"),
        ("expected u32", "expected an integer from 0 to 4294967295"),
    ];
    TERMS
        .iter()
        .fold(message.to_owned(), |text, (serde, toml)| {
            text.replace(serde, toml)
        })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Every key of the document with its dotted path and the spans of the key and of its value.
struct KeyIndex {
    entries: Vec<KeyEntry>,
}

struct KeyEntry {
    path: Vec<String>,
    key: Range<usize>,
    value: Range<usize>,
}

impl KeyIndex {
    fn build(root: &DeTable<'_>) -> KeyIndex {
        let mut index = KeyIndex {
            entries: Vec::new(),
        };
        index.add_table(&mut Vec::new(), root);
        index
    }

    fn add_table(&mut self, path: &mut Vec<String>, table: &DeTable<'_>) {
        for (key, value) in table.iter() {
            path.push(key.get_ref().to_string());
            self.entries.push(KeyEntry {
                path: path.clone(),
                key: key.span(),
                value: value.span(),
            });
            self.add_value(path, value.get_ref());
            path.pop();
        }
    }

    /// Tables inside arrays (`[[...]]`) get the array element's index as a path segment.
    fn add_value(&mut self, path: &mut Vec<String>, value: &DeValue<'_>) {
        match value {
            DeValue::Table(table) => self.add_table(path, table),
            DeValue::Array(items) => {
                for (position, item) in items.iter().enumerate() {
                    path.push(position.to_string());
                    self.add_value(path, item.get_ref());
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// The innermost key whose value span contains `span`.
    fn key_holding(&self, span: &Range<usize>) -> Option<&KeyEntry> {
        self.entries
            .iter()
            .filter(|entry| entry.value.start <= span.start && span.end <= entry.value.end)
            .min_by_key(|entry| entry.value.len())
    }

    fn key_at(&self, path: &[String]) -> Option<&KeyEntry> {
        self.entries.iter().find(|entry| entry.path == path)
    }
}

/// An unknown key and where it is.
struct UnknownKey {
    offset: usize,
    message: String,
}

/// Walks the document against the serde structs' field lists and returns the unknown key that
/// comes first in the file. Free-form tables (`env`, `config`) are not walked; values of the
/// wrong type (a string where a table belongs) are left for serde to report.
fn first_unknown_key(root: &DeTable<'_>) -> Option<UnknownKey> {
    let mut found = Vec::new();
    check_table(root, &[], field_names::<FileConfig>(), &mut found);
    for (key, value) in root.iter() {
        let Some(table) = value.get_ref().as_table() else {
            continue;
        };
        let name = key.get_ref().as_ref();
        let fields = match name {
            "hot_reload" => field_names::<HotReload>(),
            "supervisor" => field_names::<SupervisorSettings>(),
            "control" => field_names::<ControlFile>(),
            "hooks" => field_names::<HookSettings>(),
            "plugins" => {
                check_plugin_tables(table, &mut found);
                continue;
            }
            _ => continue,
        };
        check_table(table, &[name], fields, &mut found);
    }
    found.into_iter().min_by_key(|unknown| unknown.offset)
}

fn check_plugin_tables(plugins: &DeTable<'_>, found: &mut Vec<UnknownKey>) {
    for (id, value) in plugins.iter() {
        if let Some(table) = value.get_ref().as_table() {
            let path = ["plugins", id.get_ref().as_ref()];
            check_table(table, &path, field_names::<PluginConfig>(), found);
        }
    }
}

fn check_table(table: &DeTable<'_>, path: &[&str], valid: &[&str], found: &mut Vec<UnknownKey>) {
    for key in table.keys() {
        let name = key.get_ref().as_ref();
        if !valid.contains(&name) {
            found.push(UnknownKey {
                offset: key.span().start,
                message: format!(
                    "unknown key `{name}` in {}; valid keys: {}",
                    describe_table(path),
                    valid.join(", ")
                ),
            });
        }
    }
}

/// The field names of a `#[derive(Deserialize)]` struct, as serde itself sees them.
///
/// Derived impls call `deserialize_struct(name, FIELDS, visitor)` first thing; a deserializer that
/// records `FIELDS` and then fails gives the list without a second, hand-kept copy.
fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut capture = FieldCapture(&[]);
    let _always_an_error = T::deserialize(&mut capture);
    capture.0
}

struct FieldCapture(&'static [&'static str]);

impl<'de> de::Deserializer<'de> for &mut FieldCapture {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only struct field names are captured"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = fields;
        Err(de::Error::custom("field names captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::{ReadyMode, RestartPolicy, Strategy};

    fn origin() -> &'static Path {
        Path::new("/etc/hotreload/hotreload.toml")
    }

    fn error(text: &str) -> String {
        parse(text, origin()).unwrap_err().to_string()
    }

    /// Asserts that `text` is refused with a message containing `expected`.
    fn assert_refused_with(text: &str, expected: &str) {
        let err = error(text);
        assert!(
            err.contains(expected),
            "{text:?}\n  gave {err}\n  expected {expected}"
        );
    }

    /// Asserts that `text` is refused with a message ending in `expected`.
    fn assert_refused_ending(text: &str, expected: &str) {
        let err = error(text);
        assert!(
            err.ends_with(expected),
            "{text:?}\n  gave {err}\n  expected it to end with {expected}"
        );
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        assert_eq!(parse("", origin()).unwrap(), FileConfig::default());
    }

    #[test]
    fn the_whole_spec_example_parses() {
        let text = r#"
plugins_dir = "/var/lib/hotreload/plugins"
[hot_reload]
enabled = false
debounce_delay_ms = 50
watch_patterns = ["*_transcoder", "*_enricher", "*_scanner"]
preserve_state = false
max_retries = 2
retry_delay_ms = 10
[supervisor]
stop_timeout_ms = 1000
restart = "always"
[control]
socket = "/run/hotreload/control.sock"
mode = "0600"
group = ""
max_clients = 8
max_line_bytes = 4096
[plugins.ffmpeg_transcoder]
exec = "ffmpeg_transcoder"
args = ["--verbose"]
env = { RUST_LOG = "debug" }
config = { preset = "fast", threads = 4 }
ready = "notify"
strategy = "start-stop"
autostart = false
sockets  = ["tcp:127.0.0.1:9000", "unix:/run/hotreload/ffmpeg.sock"]
watchdog_ms = 500
fdstore_max = 4
restart = "never"

[hooks]
on_reload_start   = ["/usr/local/bin/notify-reload", "start"]
on_reload_success = ["/usr/local/bin/notify-reload", "ok"]
on_reload_failure = ["notify-reload", "failed"]
timeout_ms        = 2500
"#;
        let file = parse(text, origin()).unwrap();
        assert_eq!(
            file.plugins_dir.as_deref(),
            Some(Path::new("/var/lib/hotreload/plugins"))
        );
        assert!(!file.hot_reload.enabled);
        assert_eq!(file.hot_reload.watch_patterns.len(), 3);
        assert_eq!(
            file.hot_reload.exclude_patterns,
            HotReload::default().exclude_patterns
        );
        assert_eq!(file.supervisor.restart, RestartPolicy::Always);
        assert_eq!(file.supervisor.startup_grace_ms, 500);
        assert_eq!(file.control.group, "");
        let plugin = &file.plugins["ffmpeg_transcoder"];
        assert_eq!(plugin.ready, Some(ReadyMode::Notify));
        assert_eq!(plugin.strategy, Some(Strategy::StartStop));
        assert_eq!(
            plugin.sockets.as_deref(),
            Some(
                ["tcp:127.0.0.1:9000", "unix:/run/hotreload/ffmpeg.sock"]
                    .map(String::from)
                    .as_slice()
            )
        );
        assert_eq!(
            (plugin.watchdog_ms, plugin.fdstore_max),
            (Some(500), Some(4))
        );
        assert_eq!(plugin.restart, Some(RestartPolicy::Never));
        let hooks = &file.hooks;
        assert_eq!(
            hooks.on_reload_start.as_deref(),
            Some(
                ["/usr/local/bin/notify-reload", "start"]
                    .map(String::from)
                    .as_slice()
            )
        );
        assert_eq!(hooks.on_reload_failure.as_ref().map(Vec::len), Some(2));
        assert_eq!(hooks.timeout_ms, 2500);
        assert_eq!(
            plugin.config.as_ref().unwrap()["threads"].as_integer(),
            Some(4)
        );
    }

    #[test]
    fn unknown_key_names_file_line_column_key_and_valid_keys() {
        let err = error("[hot_reload]\ndebounce_delay_ms = 50\nbogus_key = 1\n");
        assert_eq!(
            err,
            "/etc/hotreload/hotreload.toml:3:1: unknown key `bogus_key` in [hot_reload]; valid keys: \
             enabled, debounce_delay_ms, watch_patterns, exclude_patterns, preserve_state, \
             max_retries, retry_delay_ms, watch_mode, poll_interval_ms, watch_subdirs"
        );
    }

    #[test]
    fn unknown_top_level_key_is_reported() {
        let err = error("plugins_dir = \"p\"\n  plugin_dir = \"x\"\n");
        assert!(
            err.starts_with(
                "/etc/hotreload/hotreload.toml:2:3: unknown key `plugin_dir` in the top-level table"
            ),
            "{err}"
        );
        assert!(err.contains("valid keys: plugins_dir, runtime_dir, state_dir, hot_reload, supervisor, control, plugins, hooks"), "{err}");
    }

    #[test]
    fn unknown_plugin_key_is_reported_with_its_table() {
        let err = error("[plugins.foo]\nexec = \"foo\"\nexecutable = \"bar\"\n");
        assert!(err.starts_with("/etc/hotreload/hotreload.toml:3:1: unknown key `executable` in [plugins.foo]; valid keys: exec, args, env, config,"), "{err}");
        assert_refused_with(
            "[plugins]\n\"a.b\" = { bogus = 1 }\n",
            ":2:11: unknown key `bogus` in [plugins.\"a.b\"]",
        );
    }

    #[test]
    fn the_first_unknown_key_in_the_file_wins() {
        assert_refused_with(
            "[supervisor]\nzzz = 1\n[control]\naaa = 2\n",
            ":2:1: unknown key `zzz` in [supervisor]",
        );
    }

    #[test]
    fn dotted_and_inline_unknown_keys_are_found() {
        assert_refused_with(
            "hot_reload.nope = 1\n",
            ":1:12: unknown key `nope` in [hot_reload]",
        );
        assert_refused_with(
            "control = { mode = \"0600\", sock = \"x\" }\n",
            ":1:28: unknown key `sock` in [control]",
        );
        assert_refused_with(
            "[hooks]\non_start = [\"x\"]\n",
            ":2:1: unknown key `on_start` in [hooks]; valid keys: on_reload_start",
        );
    }

    #[test]
    fn free_form_tables_accept_any_key() {
        let text =
            "[plugins.p.env]\nANY_NAME = \"1\"\n[plugins.p.config]\nwhatever = { deep = [1, 2] }\n";
        assert!(parse(text, origin()).is_ok());
    }

    #[test]
    fn type_errors_name_position_key_value_and_expected_type() {
        let err = error("[hot_reload]\ndebounce_delay_ms = \"fast\"\n");
        assert!(err.starts_with("/etc/hotreload/hotreload.toml:2:21: invalid value for `debounce_delay_ms` in [hot_reload]:"), "{err}");
        assert!(
            err.ends_with("invalid type: string \"fast\", expected a non-negative integer"),
            "{err}"
        );
        assert_refused_with(
            "[hot_reload]\nwatch_patterns = [\"a\", 3]\n",
            ":2:24: invalid value for `watch_patterns` in [hot_reload]",
        );
        assert_refused_with(
            "[plugins.p]\nenv = { A = 1 }\n",
            ":2:13: invalid value for `A` in [plugins.p.env]",
        );
        let err = error("[control]\nmax_clients = -1\n");
        assert!(
            err.contains(":2:15: invalid value for `max_clients` in [control]")
                && err.contains("-1"),
            "{err}"
        );
        assert_refused_ending(
            "hot_reload = 5\n",
            ":1:14: invalid value for `hot_reload` at the top level: invalid type: integer `5`, expected a table",
        );
        assert_refused_ending(
            "[plugins.p]\nargs = \"x\"\n",
            "invalid type: string \"x\", expected an array",
        );
        assert_refused_ending(
            "[hot_reload]\nmax_retries = 5000000000\n",
            "integer `5000000000`, expected an integer from 0 to 4294967295",
        );
    }

    #[test]
    fn a_bad_choice_names_the_key_value_and_valid_values() {
        let err = error("[supervisor]\nrestart = \"sometimes\"\n");
        assert_eq!(
            err,
            "/etc/hotreload/hotreload.toml:2:11: invalid value for `restart` in [supervisor]: \
             \"sometimes\"; valid values: on-failure, always, never"
        );
        assert_refused_with(
            "[plugins.p]\nready = \"later\"\n",
            "`ready` in [plugins.p]: \"later\"; valid values: exec, notify",
        );
        assert_refused_with(
            "[hot_reload]\nwatch_mode = \"fanotify\"\n",
            "`watch_mode` in [hot_reload]: \"fanotify\"; valid values: auto, inotify, poll",
        );
        let err = error("[supervisor]\nstop_signal = \"SIGKILL\"\n");
        assert!(
            err.starts_with(
                "/etc/hotreload/hotreload.toml:2:15: invalid value for `stop_signal` in \
                 [supervisor]: \"SIGKILL\"; SIGKILL cannot be caught"
            ),
            "{err}"
        );
        assert_refused_with(
            "[plugins.p]\nstop_signal = \"SIGSEGV\"\n",
            "`stop_signal` in [plugins.p]: \"SIGSEGV\"; valid values (with or without the SIG \
             prefix): SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH",
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let err = error("[hot_reload]\nenabled = \n");
        assert!(err.starts_with("/etc/hotreload/hotreload.toml:2:"), "{err}");
        assert!(err.contains("invalid TOML"), "{err}");
        let err = error("a = 1\na = 2\n");
        assert_eq!(
            err,
            "/etc/hotreload/hotreload.toml:2:1: invalid TOML: duplicate key at `a`"
        );
    }

    #[test]
    fn validation_errors_point_at_the_key() {
        let cases = [
            (
                "[control]\nmode = \"0999\"\n",
                ":2:1: invalid value for `mode` in [control]: \"0999\"",
            ),
            ("[control]\nmode = \"1777\"\n", "like \"0660\""),
            (
                "[control]\nmax_clients = 0\n",
                ":2:1: invalid value for `max_clients` in [control]: 0; expected at least 1",
            ),
            (
                "[control]\nmax_line_bytes = 63\n",
                "`max_line_bytes` in [control]: 63; expected 64 to 67108864",
            ),
            (
                "[control]\nmax_line_bytes = 67108865\n",
                "67108865; expected 64",
            ),
            ("[control]\ngroup = \"a b\"\n", "`group` in [control]"),
            (
                "[supervisor]\nstop_timeout_ms = 0\n",
                "`stop_timeout_ms` in [supervisor]: 0; expected 1 to 86400000",
            ),
            (
                "[supervisor]\nstart_limit_burst = 1001\n",
                ":2:1: invalid value for `start_limit_burst` in [supervisor]: 1001; expected 0 to 1000 restarts",
            ),
            (
                "[supervisor]\nstart_limit_burst = -1\n",
                ":2:21: invalid value for `start_limit_burst` in [supervisor]",
            ),
            (
                "[plugins.p]\nstart_limit_interval_ms = 86400001\n",
                ":2:1: invalid value for `start_limit_interval_ms` in [plugins.p]: 86400001; expected 0 to 86400000",
            ),
            (
                "[plugins.p]\nstart_limit_burst = 5000\n",
                "`start_limit_burst` in [plugins.p]: 5000; expected 0 to 1000 restarts",
            ),
            (
                "[hot_reload]\ndebounce_delay_ms = 86400001\n",
                "86400001; expected 0 to 86400000 milliseconds (at most one day)",
            ),
            (
                "[hot_reload]\npoll_interval_ms = 5\n",
                "`poll_interval_ms` in [hot_reload]: 5; expected 10 to 86400000 milliseconds",
            ),
            (
                "[hot_reload]\nretry_delay_ms = 99999999999\n",
                "`retry_delay_ms` in [hot_reload]",
            ),
            (
                "[hot_reload]\nexclude_patterns = [\"*.log\", \"[z\"]\n",
                ":2:1: invalid value for `exclude_patterns` in [hot_reload]: bad glob pattern \"[z\"",
            ),
            ("[hot_reload]\nwatch_patterns = [\"\"]\n", "empty pattern"),
            (
                "[plugins.\".bad\"]\n",
                ":1:10: invalid plugin id \".bad\" in [plugins]",
            ),
            (
                "[plugins.p]\nexec = \"/bin/sh\"\n",
                ":2:1: invalid value for `exec` in [plugins.p]: \"/bin/sh\"; expected a path relative",
            ),
            ("[plugins.p]\nexec = \"../q/q\"\n", "no `..`"),
            (
                "[plugins.p]\nenv = { \"A=B\" = \"x\" }\n",
                ":2:9: invalid environment variable name \"A=B\" in [plugins.p.env]",
            ),
            (
                "[plugins.p]\nenv = { \"\" = \"x\" }\n",
                "invalid environment variable name \"\"",
            ),
            (
                "[plugins.p]\nstop_timeout_ms = 0\n",
                "`stop_timeout_ms` in [plugins.p]: 0",
            ),
            (
                "[plugins.p.config]\nrate = nan\n",
                ":2:1: invalid value for `rate` in [plugins.p.config]",
            ),
            (
                "plugins_dir = \"\"\n",
                ":1:1: invalid value for `plugins_dir` at the top level: \"\"; expected a path",
            ),
            ("[control]\nsocket = \"a\\u0000b\"\n", "cannot contain NUL"),
        ];
        for (text, expected) in cases {
            assert_refused_with(text, expected);
        }
    }

    #[test]
    fn plugin_protocol_keys_are_accepted_one_by_one() {
        for text in [
            "[plugins.p]\nready = \"notify\"\n",
            "[plugins.p]\nstrategy = \"start-stop\"\n",
            "[plugins.p]\nsockets = [\"tcp:[::1]:9000\", \"tcp:localhost:0\", \"unix:/run/p.sock\"]\n",
            "[plugins.p]\nwatchdog_ms = 500\n",
            "[plugins.p]\nfdstore_max = 4\n",
            "[hooks]\ntimeout_ms = 10000\n",
            "[hooks]\non_reload_start = [\"logger\", \"-t\", \"hotreload\"]\n",
            "[hooks]\n",
        ] {
            if let Err(err) = parse(text, origin()) {
                panic!("{text:?} was refused: {err}");
            }
        }
    }

    #[test]
    fn plugin_protocol_errors_point_at_the_key() {
        let cases = [
            (
                "[plugins.p]\nsockets = [\"tcp:127.0.0.1:9000\", \"tcp:127.0.0.1:99999\"]\n",
                "/etc/hotreload/hotreload.toml:2:1: invalid value for `sockets` in [plugins.p]: \
                 \"tcp:127.0.0.1:99999\"; port \"99999\" is not a number from 0 to 65535; valid forms: \
                 \"tcp:HOST:PORT\"",
            ),
            (
                "[plugins.p]\nsockets = [\"unix:run/p.sock\"]\n",
                ":2:1: invalid value for `sockets` in [plugins.p]: \"unix:run/p.sock\"; the socket \
                 path must be absolute; valid forms:",
            ),
            (
                "[plugins.p]\nsockets = [\"unix:/a\", \"unix:/a\"]\n",
                ":2:1: invalid value for `sockets` in [plugins.p]: \"unix:/a\" names the same \
                 socket as \"unix:/a\" earlier in this list",
            ),
            (
                "[plugins.a]\nsockets = [\"tcp:127.0.0.1:80\"]\n[plugins.b]\n\nsockets = [\"tcp:127.0.0.1:80\"]\n",
                ":5:1: invalid value for `sockets` in [plugins.b]: \"tcp:127.0.0.1:80\" names the \
                 same socket as \"tcp:127.0.0.1:80\" in [plugins.a]; list each socket once",
            ),
            (
                "[plugins.p]\nsockets = \"tcp:127.0.0.1:80\"\n",
                ":2:11: invalid value for `sockets` in [plugins.p]: invalid type: string \
                 \"tcp:127.0.0.1:80\", expected an array",
            ),
            (
                "[plugins.p]\n  watchdog_ms = 86400001\n",
                ":2:3: invalid value for `watchdog_ms` in [plugins.p]: 86400001; expected 0 to 86400000",
            ),
            (
                "[plugins.p]\nwatchdog_ms = -5\n",
                ":2:15: invalid value for `watchdog_ms` in [plugins.p]",
            ),
            (
                "[plugins.p]\nfdstore_max = 1025\n",
                ":2:1: invalid value for `fdstore_max` in [plugins.p]: 1025; expected 0 to 1024",
            ),
            (
                "[plugins.p]\nfdstore_max = \"many\"\n",
                ":2:15: invalid value for `fdstore_max` in [plugins.p]: invalid type: string \
                 \"many\", expected a non-negative integer",
            ),
            (
                "[hooks]\ntimeout_ms = 10000\non_reload_start = []\n",
                ":3:1: invalid value for `on_reload_start` in [hooks]: []; expected a command and \
                 its arguments",
            ),
            (
                "[hooks]\non_reload_success = [\"\", \"ok\"]\n",
                ":2:1: invalid value for `on_reload_success` in [hooks]: the command name is \"\"",
            ),
            (
                "[hooks]\non_reload_failure = [\"scripts/notify\", \"failed\"]\n",
                ":2:1: invalid value for `on_reload_failure` in [hooks]: \"scripts/notify\" is a \
                 relative path; give an absolute path, or a bare command name to look up in PATH",
            ),
            (
                "[hooks]\non_reload_start = [\"/bin/echo\", \"a\\u0000b\"]\n",
                ":2:1: invalid value for `on_reload_start` in [hooks]: \"a\\0b\" contains NUL",
            ),
            (
                "[hooks]\non_reload_start = \"/bin/echo start\"\n",
                ":2:19: invalid value for `on_reload_start` in [hooks]: invalid type: string",
            ),
            (
                "[hooks]\ntimeout_ms = 0\n",
                ":2:1: invalid value for `timeout_ms` in [hooks]: 0; expected 1 to 86400000",
            ),
            (
                "hooks.timeout_ms = 86400001\n",
                ":1:7: invalid value for `timeout_ms` in [hooks]: 86400001",
            ),
        ];
        for (text, expected) in cases {
            assert_refused_with(text, expected);
        }
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        assert_eq!(line_and_column("é = 1\nxy", 7), (2, 1));
        assert_eq!(line_and_column("éa", 2), (1, 2));
        assert_eq!(line_and_column("ab", 99), (1, 3));
    }

    #[test]
    fn field_names_come_from_serde() {
        assert_eq!(
            field_names::<SupervisorSettings>(),
            [
                "stop_timeout_ms",
                "startup_grace_ms",
                "ready_timeout_ms",
                "restart",
                "start_limit_burst",
                "start_limit_interval_ms",
                "stop_signal"
            ]
        );
        // A `#[serde(flatten)]` would make derive stop calling deserialize_struct; catch that here.
        assert_eq!(field_names::<FileConfig>().len(), 8);
        assert_eq!(field_names::<HotReload>().len(), 10);
        assert_eq!(field_names::<ControlFile>().len(), 5);
        assert_eq!(field_names::<PluginConfig>().len(), 20);
        assert_eq!(field_names::<HookSettings>().len(), 4);
    }
}
