//! Compiled `watch_patterns` and `exclude_patterns` globs.
//!
//! Both match a single name, never a path: watch globs the name of a plugin directory, exclude
//! globs the name of a file inside one. `*` never crosses `/` (literal separator), and a leading
//! dot is not special, so `*.log` matches `a.log` and `.git*` matches `.gitignore`.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use super::error::ConfigError;

/// The glob sets of `[hot_reload]`, compiled once per configuration.
#[derive(Clone, Debug)]
pub struct Matchers {
    watch_patterns: Vec<String>,
    watch: GlobSet,
    exclude_patterns: Vec<String>,
    exclude: GlobSet,
}

impl Matchers {
    /// Compiles both lists; the error names the first bad pattern.
    pub fn new(
        watch_patterns: &[String],
        exclude_patterns: &[String],
    ) -> Result<Matchers, ConfigError> {
        Ok(Matchers {
            watch_patterns: watch_patterns.to_vec(),
            watch: compile_set("hot_reload.watch_patterns", watch_patterns)?,
            exclude_patterns: exclude_patterns.to_vec(),
            exclude: compile_set("hot_reload.exclude_patterns", exclude_patterns)?,
        })
    }

    /// Whether a directory with this name inside `plugins_dir` is a plugin.
    pub fn is_plugin_dir_name(&self, name: &str) -> bool {
        self.watch.is_match(name)
    }

    /// The first exclude glob (as written) that matches this file name, if any. Returning the
    /// pattern lets `change_ignored` events say which glob swallowed a change.
    pub fn excluded_by(&self, file_name: &str) -> Option<&str> {
        let first = self.exclude.matches(file_name).into_iter().min()?;
        self.exclude_patterns.get(first).map(String::as_str)
    }
}

/// Two matcher sets are equal when they were compiled from the same patterns in the same order.
impl PartialEq for Matchers {
    fn eq(&self, other: &Matchers) -> bool {
        self.watch_patterns == other.watch_patterns
            && self.exclude_patterns == other.exclude_patterns
    }
}

/// Builds one name glob with the semantics described in the module docs; the error says why.
pub(crate) fn build_glob(pattern: &str) -> Result<Glob, String> {
    if pattern.is_empty() {
        return Err("empty pattern \"\"; remove it or write a glob like \"*\"".to_owned());
    }
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|error| format!("bad glob pattern {pattern:?}: {}", error.kind()))
}

fn compile_set(key: &str, patterns: &[String]) -> Result<GlobSet, ConfigError> {
    let invalid = |error: String| ConfigError::new(format!("invalid value for `{key}`: {error}"));
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(build_glob(pattern).map_err(invalid)?);
    }
    set.build().map_err(|error| invalid(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::HotReload;

    fn defaults() -> Matchers {
        let hot = HotReload::default();
        Matchers::new(&hot.watch_patterns, &hot.exclude_patterns).unwrap()
    }

    #[test]
    fn default_excludes_match_file_names() {
        let m = defaults();
        assert_eq!(m.excluded_by("a.log"), Some("*.log"));
        assert_eq!(m.excluded_by(".gitignore"), Some(".git*"));
        assert_eq!(m.excluded_by(".git"), Some(".git*"));
        assert_eq!(m.excluded_by("go.sum"), Some("go.sum"));
        assert_eq!(m.excluded_by("state.json"), Some("*.json"));
        assert_eq!(m.excluded_by("main.go"), Some("*.go"));
        assert_eq!(m.excluded_by("ffmpeg_transcoder"), None);
        assert_eq!(m.excluded_by("a.logx"), None);
    }

    #[test]
    fn the_first_matching_exclude_pattern_is_reported() {
        let m = Matchers::new(&[], &["*.tmp".into(), "x*".into(), "*".into()]).unwrap();
        assert_eq!(m.excluded_by("x.tmp"), Some("*.tmp"));
        assert_eq!(m.excluded_by("xy"), Some("x*"));
        assert_eq!(m.excluded_by("y"), Some("*"));
    }

    #[test]
    fn watch_patterns_match_directory_names() {
        assert!(defaults().is_plugin_dir_name("anything"));
        let patterns: Vec<String> = ["*_transcoder", "*_enricher", "*_scanner"]
            .map(String::from)
            .to_vec();
        let m = Matchers::new(&patterns, &[]).unwrap();
        assert!(m.is_plugin_dir_name("ffmpeg_transcoder"));
        assert!(m.is_plugin_dir_name("tmdb_enricher"));
        assert!(!m.is_plugin_dir_name("scanner"));
        assert!(!m.is_plugin_dir_name("a/b_scanner_x"));
        let nothing = Matchers::new(&[], &[]).unwrap();
        assert!(!nothing.is_plugin_dir_name("x"));
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let err = Matchers::new(&["[a".into()], &[]).unwrap_err();
        assert!(err.message().contains("\"[a\""), "{err}");
        assert!(err.message().contains("watch_patterns"), "{err}");
        assert!(build_glob("").unwrap_err().contains("empty pattern"));
    }
}
