//! Control-socket request lines (SPEC §6), the bytes any local client can send.
//!
//! Beyond "does not panic": every outcome must become exactly one well-formed JSON response line
//! whose `id` is the request's `id`, value for value, because clients match answers by it.
#![no_main]

use hotreload::protocol::{self, Request, RequestError};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    match protocol::parse_line(data) {
        Ok(None) => {}
        Ok(Some(request)) => check_success(&request),
        Err(error) => check_error(&error),
    }
});

fn check_success(request: &Request) {
    assert!(!request.command.name().is_empty());
    let line = protocol::success(request.id.as_ref(), &Map::new());
    let response = parse_response(&line);
    assert_eq!(response.get("status"), Some(&Value::from("success")));
    assert_eq!(
        response.get("id"),
        request.id.as_ref(),
        "id not echoed as sent"
    );
}

fn check_error(error: &RequestError) {
    let line = error.to_line();
    let response = parse_response(&line);
    assert_eq!(response.get("status"), Some(&Value::from("error")));
    assert_eq!(
        response.get("code"),
        Some(&Value::from(error.code.as_str()))
    );
    assert_eq!(
        response.get("id"),
        error.id.as_ref(),
        "id not echoed as sent"
    );
    assert!(matches!(response.get("error"), Some(Value::String(_))));
}

/// One line, newline-terminated, holding one JSON object.
fn parse_response(line: &[u8]) -> Map<String, Value> {
    let body = line
        .strip_suffix(b"\n")
        .expect("response ends with a newline");
    assert!(!body.contains(&b'\n'), "response spans several lines");
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => object,
        other => panic!("response is not a JSON object: {other:?}"),
    }
}
