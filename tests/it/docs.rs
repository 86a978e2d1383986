//! The manual pages against the code: every configuration key, control command, event, command
//! line flag and exit code the program has is documented in the page and section where a reader
//! looks for it, and every page renders without a warning.
//!
//! The lists come from the code, never from a list kept here: configuration keys from the
//! effective configuration (`Config::to_effective_toml`) and from the "valid keys" the parser
//! names for an unknown key, control commands from `protocol::Command::NAMES`, events from
//! `protocol::EventKind::NAMES`, flags and `hotreloadctl` commands from the real binaries'
//! `--help`, exit codes from the constants and from the binaries. So a new key, command, event or
//! flag fails here until its page documents it, and the failure lists each one and where it
//! belongs.
//!
//! "Documented" means: a word of a `.TP` tag (the term of a tagged paragraph) in the right
//! section of the right page, which is how the pages list keys, commands, events, options and
//! exit codes. A word mentioned in passing elsewhere does not count.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hotreload::config::{self, Env, Overrides};
use hotreload::daemon::FatalError;
use hotreload::protocol::{Command as ControlCommand, EventKind};

use crate::util::{ctl_bin, daemon_bin};

const DAEMON_PAGE: &str = "hotreloadd.8";
const CTL_PAGE: &str = "hotreloadctl.1";
const CONFIG_PAGE: &str = "hotreload.toml.5";
const PAGES: [&str; 3] = [DAEMON_PAGE, CTL_PAGE, CONFIG_PAGE];

/// The section of `hotreload.toml(5)` for keys outside any table.
const TOP_LEVEL_SECTION: &str = "TOP-LEVEL KEYS";
/// The table keyed by plugin id; its keys are documented once, under `[plugins.id]`.
const PER_PLUGIN_TABLE: &str = "plugins";
/// A key no table has, to make the parser list the valid ones.
const PROBE_KEY: &str = "no_such_key_for_the_docs_test";

/// A configuration that sets every optional table and key, so the effective configuration
/// printed from it shows all of them. Hook commands have no default and appear only when set.
const FULL_CONFIG: &str = r#"
[plugins.demo]
env = { DEMO = "1" }
config = { preset = "fast" }
sockets = ["tcp:127.0.0.1:0"]

[hooks]
on_reload_start = ["/bin/true"]
on_reload_success = ["/bin/true"]
on_reload_failure = ["/bin/true"]
"#;

// ------------------------------------------------------------------------------------------------
// The tests

#[test]
fn every_config_key_is_documented_in_its_table_section() {
    let page = ManPage::load(CONFIG_PAGE);
    let mut missing = Missing::default();
    for (table, keys) in config_keys() {
        let section = match table.as_slice() {
            [] => TOP_LEVEL_SECTION.to_owned(),
            [name, _id] if name == PER_PLUGIN_TABLE => format!("[{PER_PLUGIN_TABLE}.id]"),
            path => format!("[{}]", path.join(".")),
        };
        if !page.has_section(&section) {
            missing.add(&page, &section, None, &format!("section {section}"));
        }
        for key in keys {
            missing.check(&page, &section, None, &key);
        }
    }
    missing.assert_none("configuration keys");
}

#[test]
fn every_control_command_is_documented_in_the_daemon_page() {
    let page = ManPage::load(DAEMON_PAGE);
    let mut missing = Missing::default();
    for name in ControlCommand::NAMES {
        missing.check(&page, "CONTROL PROTOCOL", Some("Commands"), name);
    }
    missing.assert_none("control commands (protocol::Command::NAMES)");
}

#[test]
fn every_event_is_documented_in_the_daemon_page() {
    let page = ManPage::load(DAEMON_PAGE);
    let mut missing = Missing::default();
    for event in EventKind::NAMES {
        missing.check(&page, "CONTROL PROTOCOL", Some("Events"), event);
    }
    missing.assert_none("events (protocol::EventKind::NAMES)");
}

#[test]
fn every_daemon_flag_is_documented_in_the_daemon_page() {
    let help = help_text(daemon_bin(), &["--help"]);
    let flags = option_flags(&help);
    assert!(
        flags.contains("--check-config"),
        "no flags found in `hotreloadd --help`:\n{help}"
    );
    let page = ManPage::load(DAEMON_PAGE);
    let mut missing = Missing::default();
    for flag in &flags {
        missing.check(&page, "OPTIONS", None, flag);
    }
    missing.assert_none("hotreloadd flags (hotreloadd --help)");
}

#[test]
fn every_ctl_command_and_flag_is_documented_in_the_ctl_page() {
    let help = help_text(ctl_bin(), &["--help"]);
    let global = option_flags(&help);
    let commands = subcommands(&help);
    assert!(
        commands.contains("trigger") && global.contains("--socket"),
        "no commands or flags found in `hotreloadctl --help`:\n{help}"
    );
    let page = ManPage::load(CTL_PAGE);
    let mut missing = Missing::default();
    for flag in &global {
        missing.check(&page, "OPTIONS", None, flag);
    }
    for command in &commands {
        let Some(tag) = page.tag_starting_with("COMMANDS", command) else {
            missing.add(&page, "COMMANDS", None, command);
            continue;
        };
        let own_flags = option_flags(&help_text(ctl_bin(), &["help", command]));
        for flag in own_flags.difference(&global) {
            if !tag.words.contains(flag) {
                let item = format!("{flag} (of `{command}`, in its tag)");
                missing.add(&page, "COMMANDS", None, &item);
            }
        }
    }
    missing.assert_none("hotreloadctl commands and flags (hotreloadctl --help)");
}

#[test]
fn every_exit_code_is_documented_in_its_page() {
    let daemon_codes = [
        0,
        exit_code_of(daemon_bin(), &["--no-such-option"]),
        FatalError::Os(String::new()).exit_code(),
        FatalError::Config(String::new()).exit_code(),
        config::ConfigError::EXIT_CODE,
    ];
    let ctl_codes = [
        0,
        exit_code_of(ctl_bin(), &["--no-such-option"]),
        hotreload::ctl::EXIT_FAILURE,
        hotreload::ctl::EXIT_USAGE,
        hotreload::ctl::EXIT_UNAVAILABLE,
        hotreload::ctl::EXIT_CONFIG,
    ];
    let mut missing = Missing::default();
    for (name, codes) in [(DAEMON_PAGE, &daemon_codes[..]), (CTL_PAGE, &ctl_codes[..])] {
        let page = ManPage::load(name);
        for code in codes {
            missing.check(&page, "EXIT STATUS", None, &code.to_string());
        }
    }
    missing.assert_none("exit codes");
}

/// `mandoc -Tlint` (every message, style included) and `groff -man -ww -z` on each page, with
/// whichever of the two is installed; the test is skipped, saying so, when neither is.
#[test]
fn man_pages_render_without_warnings() {
    let linters: [(&str, &[&str]); 2] =
        [("mandoc", &["-Tlint"]), ("groff", &["-man", "-ww", "-z"])];
    let mut ran = Vec::new();
    let mut complaints = Vec::new();
    for (tool, args) in linters {
        for page in PAGES {
            let path = man_dir().join(page);
            let output = match Command::new(tool).args(args).arg(&path).output() {
                Ok(output) => output,
                Err(error) if error.kind() == io::ErrorKind::NotFound => break,
                Err(error) => panic!("cannot run {tool}: {error}"),
            };
            ran.push(tool);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            if !output.status.success() || !text.trim().is_empty() {
                complaints.push(format!(
                    "{tool} {} {page} ({}):\n{text}",
                    args.join(" "),
                    output.status
                ));
            }
        }
    }
    if ran.is_empty() {
        println!("SKIPPED: neither mandoc nor groff is installed (apt-get install mandoc groff)");
        return;
    }
    assert!(
        complaints.is_empty(),
        "manual pages with warnings:\n{}",
        complaints.join("\n")
    );
}

// ------------------------------------------------------------------------------------------------
// What the code has

/// Every configuration key, by table path (`[]` = top level, `["plugins", "demo"]` = a plugin
/// table): the keys the effective configuration prints, plus the keys the parser lists as valid
/// for each of those tables (which includes keys without a default that nothing printed).
fn config_keys() -> BTreeMap<Vec<String>, BTreeSet<String>> {
    let origin = Path::new("docs-test.toml");
    let file = config::parse(FULL_CONFIG, origin)
        .unwrap_or_else(|e| panic!("the test's configuration is invalid: {e}\n{FULL_CONFIG}"));
    let env = Env {
        vars: HashMap::new(),
        euid: 1000,
        cwd: PathBuf::from("/srv/docs-test"),
        home: Some(PathBuf::from("/home/docs-test")),
    };
    let resolved = config::resolve(file, None, &Overrides::default(), &env)
        .unwrap_or_else(|e| panic!("the test's configuration does not resolve: {e}"));
    let text = resolved.to_effective_toml();
    let effective: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("the effective configuration is not TOML: {e}\n{text}"));
    let mut keys: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    let top = keys.entry(Vec::new()).or_default();
    top.extend(effective.keys().cloned());
    for (name, value) in &effective {
        let toml::Value::Table(table) = value else {
            continue;
        };
        if name == PER_PLUGIN_TABLE {
            for (id, plugin) in table {
                let path = vec![name.clone(), id.clone()];
                let own = plugin.as_table().map(|t| t.keys().cloned().collect());
                keys.insert(path, own.unwrap_or_default());
            }
        } else {
            keys.insert(vec![name.clone()], table.keys().cloned().collect());
        }
    }
    for (path, known) in keys.iter_mut() {
        known.extend(valid_keys(path));
    }
    // Tables are documented as sections, not as keys of the top level.
    if let Some(top) = keys.get_mut(&Vec::new()) {
        top.retain(|key| !effective.get(key).is_some_and(toml::Value::is_table));
    }
    keys
}

/// The keys the parser names as valid for the table at `path`, from its unknown-key error.
fn valid_keys(path: &[String]) -> Vec<String> {
    let header = if path.is_empty() {
        String::new()
    } else {
        format!("[{}]\n", path.join("."))
    };
    let text = format!("{header}{PROBE_KEY} = 1\n");
    let error = match config::parse(&text, Path::new("docs-probe.toml")) {
        Ok(_) => panic!("an unknown key was accepted:\n{text}"),
        Err(error) => error.to_string(),
    };
    let Some((_, list)) = error.split_once("valid keys: ") else {
        panic!("the unknown-key error no longer lists the valid keys: {error}");
    };
    list.split(',').map(|key| key.trim().to_owned()).collect()
}

fn help_text(bin: &str, args: &[&str]) -> String {
    let output = run(bin, args);
    assert!(
        output.status.success(),
        "`{bin} {}` failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn exit_code_of(bin: &str, args: &[&str]) -> u8 {
    let status = run(bin, args).status;
    let code = status.code().unwrap_or_else(|| panic!("{bin}: {status}"));
    u8::try_from(code).unwrap_or_else(|_| panic!("{bin}: exit code {code}"))
}

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("HOTRELOAD_SOCKET")
        .env_remove("HOTRELOAD_CONFIG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"))
}

/// The flags defined in the `Options:` block of clap's help: `-h`, `--help`, `--socket`, ...
fn option_flags(help: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for line in block(help, "Options:") {
        for word in line.split_whitespace() {
            let word = word.trim_end_matches(',');
            if !word.starts_with('-') {
                break;
            }
            flags.insert(word.to_owned());
        }
    }
    flags
}

/// The subcommands in the `Commands:` block of clap's help.
fn subcommands(help: &str) -> BTreeSet<String> {
    block(help, "Commands:")
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The indented lines after `title` up to the next blank line.
fn block<'a>(help: &'a str, title: &str) -> impl Iterator<Item = &'a str> {
    help.lines()
        .skip_while(move |line| line.trim() != title)
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter(|line| line.starts_with(' '))
}

// ------------------------------------------------------------------------------------------------
// What the pages say

fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("man")
}

/// The term of one tagged paragraph (`.TP` and the line after it).
#[derive(Debug)]
struct Tag {
    section: String,
    subsection: Option<String>,
    words: Vec<String>,
}

/// A page reduced to its sections and the words of its paragraph tags.
struct ManPage {
    name: &'static str,
    sections: Vec<String>,
    tags: Vec<Tag>,
}

impl ManPage {
    fn load(name: &'static str) -> ManPage {
        let path = man_dir().join(name);
        let source = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        ManPage::parse(name, &source)
    }

    fn parse(name: &'static str, source: &str) -> ManPage {
        let mut page = ManPage {
            name,
            sections: Vec::new(),
            tags: Vec::new(),
        };
        let mut section = String::new();
        let mut subsection = None;
        let mut tag_next = false;
        for line in source.lines().filter(|line| !line.starts_with(".\\\"")) {
            let (request, text) = roff_line(line);
            match request {
                "SH" => {
                    section = text;
                    subsection = None;
                    page.sections.push(section.clone());
                    continue;
                }
                "SS" => {
                    subsection = Some(text);
                    continue;
                }
                "TP" => {
                    tag_next = true;
                    continue;
                }
                _ => {}
            }
            if tag_next {
                tag_next = false;
                page.tags.push(Tag {
                    section: section.clone(),
                    subsection: subsection.clone(),
                    words: words(&text),
                });
            }
        }
        page
    }

    fn has_section(&self, heading: &str) -> bool {
        self.sections.iter().any(|s| s == heading)
    }

    fn tags_in(&self, section: &str, subsection: Option<&str>) -> Vec<&Tag> {
        self.tags
            .iter()
            .filter(|tag| {
                tag.section == section
                    && subsection.is_none_or(|wanted| tag.subsection.as_deref() == Some(wanted))
            })
            .collect()
    }

    fn documents(&self, section: &str, subsection: Option<&str>, word: &str) -> bool {
        self.tags_in(section, subsection)
            .iter()
            .any(|tag| tag.words.iter().any(|w| w == word))
    }

    fn tag_starting_with(&self, section: &str, word: &str) -> Option<&Tag> {
        self.tags_in(section, None)
            .into_iter()
            .find(|tag| tag.words.first().is_some_and(|w| w == word))
    }
}

/// A source line as `(request, text)`: `(".BR", "a, b")` for `.BR a ", " b`, `("", line)` for
/// a text line; font changes and escapes resolved to plain text.
fn roff_line(line: &str) -> (&str, String) {
    let Some(request_line) = line.strip_prefix('.') else {
        return ("", unescape(line));
    };
    let (request, rest) = request_line
        .split_once(char::is_whitespace)
        .unwrap_or((request_line, ""));
    let args = macro_arguments(rest);
    // The font-alternating macros (.BR, .IR, ...) join their arguments without spaces.
    let alternating = request.len() == 2 && request.chars().all(|c| "BIR".contains(c));
    let joined = args.join(if alternating { "" } else { " " });
    (request, unescape(&joined))
}

/// Macro arguments: separated by blanks, `"` quotes one with blanks, `""` inside is a quote.
fn macro_arguments(text: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        let Some(first) = chars.next() else {
            return args;
        };
        let mut arg = String::new();
        if first == '"' {
            while let Some(c) = chars.next() {
                match c {
                    '"' if chars.next_if_eq(&'"').is_some() => arg.push('"'),
                    '"' => break,
                    _ => arg.push(c),
                }
            }
        } else {
            arg.push(first);
            while let Some(c) = chars.next_if(|c| *c != ' ' && *c != '\t') {
                arg.push(c);
                if c == '\\' {
                    arg.extend(chars.next());
                }
            }
        }
        args.push(arg);
    }
}

/// Resolves the escapes the pages use into plain text.
fn unescape(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('-') => out.push('-'),
            Some('e') | Some('\\') => out.push('\\'),
            Some(' ') | Some('~') => out.push(' '),
            Some('f') => {
                chars.next();
            }
            Some('(') => {
                let glyph: String = chars.by_ref().take(2).collect();
                out.push_str(match glyph.as_str() {
                    "dq" | "lq" | "rq" => "\"",
                    "aq" => "'",
                    "em" | "en" => "-",
                    _ => "",
                });
            }
            // \& \c \: \/ \, and anything else: no text of its own.
            _ => {}
        }
    }
    out
}

/// The words of a tag: runs of characters that keys, commands, events, flags and numbers are
/// made of (`-` for flags and commands, `.` for dotted keys, `=` for `READY=1`).
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || "_-.=".contains(c)))
        .map(|word| word.trim_end_matches('.'))
        .filter(|word| !word.is_empty())
        .map(str::to_owned)
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Reporting

/// What is not documented where it belongs, as lines for the failure message.
#[derive(Default)]
struct Missing(Vec<String>);

impl Missing {
    fn check(&mut self, page: &ManPage, section: &str, subsection: Option<&str>, word: &str) {
        if !page.documents(section, subsection, word) {
            self.add(page, section, subsection, word);
        }
    }

    fn add(&mut self, page: &ManPage, section: &str, subsection: Option<&str>, item: &str) {
        let place = match subsection {
            Some(sub) => format!("{section} / {sub}"),
            None => section.to_owned(),
        };
        self.0
            .push(format!("  {item:<40} man/{}, section {place}", page.name));
    }

    #[track_caller]
    fn assert_none(&self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{} {what} missing from the manual pages (document each as a .TP tag there):\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

#[cfg(test)]
mod parser {
    use super::*;

    #[test]
    fn tags_are_read_with_their_sections_and_escapes_resolved() {
        let page = ManPage::parse(
            "x.1",
            ".\\\" comment\n.SH [plugins.\\fIid\\fP]\n.TP\n.BR stop_timeout_ms \", \" restart\nText.\n\
             .SH OPTIONS\n.TP\n.BI \\-\\-socket \" path\"\n.SS Sub\n.TP\n.BI trigger \" id\" \" \\fR[\\fB\\-\\-no\\-wait\\fR]\"\n",
        );
        assert!(page.has_section("[plugins.id]"));
        assert!(page.documents("[plugins.id]", None, "restart"));
        assert!(page.documents("[plugins.id]", None, "stop_timeout_ms"));
        assert!(!page.documents("[plugins.id]", None, "Text"));
        assert!(page.documents("OPTIONS", None, "--socket"));
        assert!(!page.documents("OPTIONS", Some("Sub"), "--socket"));
        let tag = page.tag_starting_with("OPTIONS", "trigger").unwrap();
        assert_eq!(tag.words, ["trigger", "id", "--no-wait"]);
    }

    #[test]
    fn clap_help_blocks_give_flags_and_commands() {
        let help = "Usage: x\n\nCommands:\n  status  Show\n  reload-config  Re-read\n\nOptions:\n      --socket <PATH>  S\n  -v, --verbose  V\n\nEXAMPLES:\n  x --json -t 5\n";
        assert_eq!(
            option_flags(help),
            BTreeSet::from([
                "--socket".to_owned(),
                "-v".to_owned(),
                "--verbose".to_owned()
            ])
        );
        assert_eq!(
            subcommands(help),
            BTreeSet::from(["status".to_owned(), "reload-config".to_owned()])
        );
    }

    #[test]
    fn a_missing_item_is_named_with_its_place() {
        let page = ManPage::parse("x.8", ".SH EXIT STATUS\n.TP\n.B 0\n");
        let mut missing = Missing::default();
        missing.check(&page, "EXIT STATUS", None, "0");
        missing.check(&page, "EXIT STATUS", None, "78");
        assert_eq!(missing.0.len(), 1);
        assert!(
            missing.0[0].contains("78") && missing.0[0].contains("man/x.8, section EXIT STATUS")
        );
    }
}
