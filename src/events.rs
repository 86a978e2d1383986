//! Events of SPEC §6, built once in the daemon and handed to the control server for subscribers.
//!
//! Every event is a JSON object `{"event", "time", "plugin"?, ...}`; this module fixes the
//! envelope so the emitting code only supplies the name and the event's own fields.

use serde_json::{Map, Value};

/// An event waiting to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub plugin: Option<String>,
    /// `change_ignored` goes to verbose subscribers only.
    pub verbose_only: bool,
    pub body: Map<String, Value>,
}

impl Event {
    pub fn new(name: &str, plugin: Option<&str>) -> Event {
        let mut body = Map::new();
        body.insert("event".into(), Value::from(name));
        body.insert("time".into(), Value::from(crate::clock::wall_rfc3339()));
        if let Some(p) = plugin {
            body.insert("plugin".into(), Value::from(p));
        }
        Event {
            plugin: plugin.map(str::to_string),
            verbose_only: matches!(name, "change_ignored" | "directory_polled"),
            body,
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Event {
        self.body.insert(key.into(), value.into());
        self
    }

    pub fn name(&self) -> &str {
        self.body.get("event").and_then(Value::as_str).unwrap_or("")
    }

    /// The wire form: one JSON line with its newline.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(&self.body).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_event_time_plugin() {
        let e = Event::new("plugin_ready", Some("p1")).with("pid", 42);
        let v: Value = serde_json::from_slice(&e.to_line()).unwrap();
        assert_eq!(v["event"], "plugin_ready");
        assert_eq!(v["plugin"], "p1");
        assert_eq!(v["pid"], 42);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert!(!e.verbose_only);
        assert!(Event::new("change_ignored", None).verbose_only);
    }
}
