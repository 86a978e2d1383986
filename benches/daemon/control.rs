//! Control socket: throughput of pipelined `status` requests on one connection, then `status`
//! latency while 1000 idle clients and 100 subscribers hold connections (max_clients = 2000).
//!
//! Pipelining runs a writer thread that sends all requests while the main thread reads the
//! replies, so the figure is the daemon's rate, not a round trip per request. The latency run is
//! strictly sequential: send one request, read its reply, repeat.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::fixture::{self, Config, Daemon, Layout};
use crate::plugin::{self, Builds};
use crate::report::{Bound, Report};
use crate::{Bench, Outcome, millis};

const PLUGINS: usize = 10;
const PIPELINED: usize = 100_000;
const IDLE_CLIENTS: usize = 1000;
const SUBSCRIBERS: usize = 100;
const WARMUP: usize = 100;
const SEQUENTIAL: usize = 2000;
const STATUS: &str = r#"{"cmd":"status"}"#;

pub fn run(bench: &Bench) -> Outcome<Report> {
    let mut builds = Builds::new(0)?;
    let layout = Layout::create(&bench.root, "control")?;
    let config = Config {
        max_clients: 2000,
        ..Config::default()
    };
    let ids = plugin::ids(PLUGINS);
    let mut daemon =
        fixture::start_with_plugins(&bench.daemon, layout, &config, &ids, &mut builds)?;
    daemon.wait_plugins_running(PLUGINS as u64, Duration::from_secs(10))?;

    let mut report = Report::new(
        "control",
        "pipelined status throughput; status latency with 1000 idle clients + 100 subscribers",
    );
    let (took, failed) = pipelined(&daemon)?;
    let rate = PIPELINED as f64 / took.as_secs_f64();
    report.value(
        "pipelined_requests",
        "pipelined status requests",
        PIPELINED as f64,
        "",
    );
    report.value(
        "pipelined_ms",
        "  all replies read after",
        millis(took),
        "ms",
    );
    report.value("pipelined_rate", "  rate", rate, "/s");
    report.value(
        "pipelined_errors",
        "  replies without status success",
        failed as f64,
        "",
    );
    report.target(
        "pipelined status rate",
        rate,
        Bound::AtLeast(20_000.0),
        "/s",
    );

    let crowd = connect_crowd(&daemon)?;
    let mut probe = daemon.client()?;
    let sessions = wait_sessions(&mut probe, IDLE_CLIENTS + SUBSCRIBERS + 1)?;
    let latencies = sequential(&mut probe)?;
    daemon.ensure_alive()?;
    let summary = report.distribution(
        "status_latency_ms",
        "status round trip, 1100 other clients",
        "ms",
        &latencies,
    );
    report.value(
        "active_sessions",
        "active_sessions reported",
        sessions as f64,
        "",
    );
    if let Some(summary) = summary {
        report.target("p99 status latency", summary.p99, Bound::AtMost(2.0), "ms");
    }
    report.note(format!(
        "{SEQUENTIAL} sequential requests after {WARMUP} warm-up; {PLUGINS} plugins running"
    ));
    drop(crowd);
    Ok(report)
}

/// Sends `PIPELINED` status requests from a writer thread and reads every reply; returns the time
/// from the first write to the last reply, and how many replies were not successes.
fn pipelined(daemon: &Daemon) -> Outcome<(Duration, usize)> {
    let mut client = daemon.client()?;
    let mut writer = client.try_clone_writer()?;
    let batch = format!("{STATUS}\n").repeat(1000).into_bytes();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        for _ in 0..PIPELINED / 1000 {
            writer.write_all(&batch)?;
        }
        Ok::<(), std::io::Error>(())
    });
    let mut failed = 0;
    for n in 0..PIPELINED {
        let reply = client
            .read_line()
            .map_err(|e| format!("pipelined reply {n} of {PIPELINED}: {e}"))?;
        // A full parse of 100 000 replies would measure serde_json on the bench's side.
        if !reply.contains("\"success\"") {
            failed += 1;
        }
    }
    let took = start.elapsed();
    match sender.join() {
        Ok(Ok(())) => Ok((took, failed)),
        Ok(Err(e)) => Err(format!("failed to send pipelined requests: {e}")),
        Err(_) => Err("the pipelining writer thread panicked".into()),
    }
}

/// Connections held open during the latency run.
struct Crowd {
    _idle: Vec<UnixStream>,
    _subscribers: Vec<Client>,
}

fn connect_crowd(daemon: &Daemon) -> Outcome<Crowd> {
    let socket = &daemon.layout.socket;
    let idle = (0..IDLE_CLIENTS)
        .map(|n| {
            UnixStream::connect(socket).map_err(|e| {
                format!(
                    "idle client {n}: cannot connect to `{}`: {e}",
                    socket.display()
                )
            })
        })
        .collect::<Outcome<Vec<_>>>()?;
    let subscribers = (0..SUBSCRIBERS)
        .map(|_| {
            let mut client = daemon.client()?;
            client.command("subscribe")?;
            Ok(client)
        })
        .collect::<Outcome<Vec<_>>>()?;
    Ok(Crowd {
        _idle: idle,
        _subscribers: subscribers,
    })
}

/// Waits (10 s at most) until `status` counts `want` connected clients; returns the last count,
/// which is reported either way.
fn wait_sessions(probe: &mut Client, want: usize) -> Outcome<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = probe.command("status")?;
        let sessions = status["hot_reload"]["active_sessions"]
            .as_u64()
            .unwrap_or(0);
        if sessions >= want as u64 || Instant::now() >= deadline {
            return Ok(sessions);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Round-trip times of `SEQUENTIAL` status requests, in ms: from the write of the request to the
/// read of its reply's newline (the reply is checked after the clock stops).
fn sequential(probe: &mut Client) -> Outcome<Vec<f64>> {
    for _ in 0..WARMUP {
        probe.command("status")?;
    }
    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    for _ in 0..SEQUENTIAL {
        let sent = Instant::now();
        probe.send(STATUS)?;
        let reply = probe.read_line()?;
        latencies.push(millis(sent.elapsed()));
        if !reply.contains("\"success\"") {
            return Err(format!("status answered with {reply}"));
        }
    }
    Ok(latencies)
}
