//! "Did you mean": the known plugin id closest to a typo'd one, and the daemon's plugin ids, which
//! both the suggestion and shell completion (`hotreloadctl completions`) ask for.
//!
//! The client, not the daemon, suggests: it already holds the unknown id and can ask `list`, and
//! the daemon's `unknown_plugin` reply stays a plain fact.

use std::path::Path;
use std::time::Duration;

use crate::protocol::{self, ListReply, Request};

use super::client::Client;

/// How long completion may wait for the daemon: a shell waiting on a key press must not hang.
const QUICK: Duration = Duration::from_millis(500);

/// The ids of the daemon's plugins, sorted; empty when the daemon cannot be asked (no daemon, no
/// permission, no answer within [`QUICK`]).
pub fn plugin_ids(socket: &Path) -> Vec<String> {
    let Ok(mut client) = Client::connect(socket) else {
        return Vec::new();
    };
    if client.set_read_timeout(Some(QUICK)).is_err() {
        return Vec::new();
    }
    let Ok(list) = client
        .request(&Request::new(protocol::Command::List))
        .and_then(|reply| reply.into_success()?.body::<ListReply>())
    else {
        return Vec::new();
    };
    let mut ids: Vec<String> = list
        .plugins
        .into_iter()
        .map(|p| p.id)
        .filter(|id| !id.is_empty())
        .collect();
    ids.sort();
    ids
}

/// The id in `known` closest to `typed`, when it is close enough to be a typo: at most a third
/// of its length away (at least 1, at most 3 edits).
pub fn closest<'a>(typed: &str, known: &'a [String]) -> Option<&'a str> {
    let limit = (typed.chars().count() / 3).clamp(1, 3);
    known
        .iter()
        .map(|id| (edit_distance(typed, id), id))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, id)| id.as_str())
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + usize::from(ca != *cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("helo", "hello"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn closest_id_only_when_it_looks_like_a_typo() {
        let known = vec!["ffmpeg_transcoder".to_string(), "hello".to_string()];
        assert_eq!(closest("helo", &known), Some("hello"));
        assert_eq!(
            closest("ffmpeg_transcodr", &known),
            Some("ffmpeg_transcoder")
        );
        assert_eq!(closest("zzzzzzzz", &known), None);
        assert_eq!(closest("x", &known), None);
        assert_eq!(closest("helo", &[]), None);
    }
}
