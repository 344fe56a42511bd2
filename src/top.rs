//! `shardgate top`: a live view of a running gateway, one line per core and a line per route
//! and job, refreshed every second from the admin port's `/v1/cores` (the totals of the same
//! registry `/metrics` renders, [`Snapshot`]); the rates are the differences of two snapshots
//! ([`View`]). `--once --json` prints one view for scripts. Over HTTPS with `--ca-file`, with
//! the admin token from `--token-file` when the port asks for one.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Row, Table};
use ratatui::Frame;
use rustls_pki_types::pem::PemObject;

use crate::telemetry::snapshot::{Snapshot, View};

/// How long a request to the admin port may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the admin port is and how to talk to it.
pub struct Admin {
    /// `host:port`.
    address: String,
    /// The bearer token, when the port asks for one.
    token: Option<String>,
    /// HTTPS: the client config trusting `--ca-file`.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Admin {
    /// The admin port at `address`; `token_file` holds its bearer token; `ca_file` (PEM) makes
    /// the connection HTTPS, trusting that CA.
    pub fn new(address: &str, token_file: Option<&Path>, ca_file: Option<&Path>) -> anyhow::Result<Admin> {
        let token = match token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("`--token-file` = `{}`: cannot read it", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let tls = match ca_file {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let pem = std::fs::read(path)
                    .with_context(|| format!("`--ca-file` = `{}`: cannot read it", path.display()))?;
                for certificate in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let certificate = certificate
                        .with_context(|| format!("`--ca-file` = `{}`: not PEM certificates", path.display()))?;
                    roots.add(certificate)?;
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(Arc::new(config))
            }
            None => None,
        };
        Ok(Admin {
            address: address.to_string(),
            token,
            tls,
        })
    }

    /// `GET /v1/cores`: the gateway's snapshot now.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let body = self.get("/v1/cores")?;
        serde_json::from_str(&body).with_context(|| format!("{}: /v1/cores is not a snapshot", self.address))
    }

    fn get(&self, path: &str) -> anyhow::Result<String> {
        let stream = TcpStream::connect(&self.address)
            .with_context(|| format!("cannot reach the admin port at {} (`[admin] listen`)", self.address))?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let mut request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n", self.address);
        if let Some(token) = &self.token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        request.push_str("\r\n");
        let mut answer = Vec::new();
        match &self.tls {
            None => {
                let mut stream = stream;
                stream.write_all(request.as_bytes())?;
                stream.read_to_end(&mut answer)?;
            }
            Some(config) => {
                let host = self.address.rsplit_once(':').map_or(self.address.as_str(), |(h, _)| h);
                let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                    .with_context(|| format!("`{host}` is not a server name"))?;
                let connection = rustls::ClientConnection::new(Arc::clone(config), name)?;
                let mut tls = rustls::StreamOwned::new(connection, stream);
                tls.write_all(request.as_bytes())
                    .with_context(|| format!("TLS to {} (is `--ca-file` the admin port's CA?)", self.address))?;
                // A peer that closes without close_notify ends the body as well.
                if let Err(error) = tls.read_to_end(&mut answer) {
                    if answer.is_empty() {
                        return Err(error).with_context(|| format!("reading from {}", self.address));
                    }
                }
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .with_context(|| format!("{}: not an HTTP answer (HTTPS? give `--ca-file`)", self.address))?;
        let status = head.split_whitespace().nth(1).unwrap_or_default();
        match status {
            "200" => Ok(body.to_string()),
            "401" => bail!(
                "{}: the admin port asks for its token (`--token-file`, the token whose SHA-256 is `admin.token_sha256`)",
                self.address
            ),
            other => bail!("{}{path}: HTTP {other}: {}", self.address, body.trim()),
        }
    }
}

/// Two snapshots `interval` apart, as a view (what `--once` prints).
pub fn view_once(admin: &Admin, interval: Duration) -> anyhow::Result<View> {
    let before = admin.snapshot()?;
    std::thread::sleep(interval);
    let after = admin.snapshot()?;
    Ok(View::between(&before, &after))
}

/// The live view until `q`, Esc or Ctrl-C. A failed refresh (a restarting gateway) is shown
/// on the title line; the view goes on with the next one.
pub fn run(admin: &Admin, interval: Duration) -> anyhow::Result<()> {
    let mut before = admin.snapshot()?;
    let mut terminal = ratatui::init();
    let mut view = View::default();
    let mut error: Option<String> = None;
    let outcome = (|| -> anyhow::Result<()> {
        loop {
            terminal.draw(|frame| render(frame, &admin.address, &view, error.as_deref()))?;
            let next = Instant::now() + interval;
            while let Some(left) = next.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                if let Event::Key(key) = event::read()? {
                    let quit = key.kind == KeyEventKind::Press
                        && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                            || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL)));
                    if quit {
                        return Ok(());
                    }
                }
            }
            match admin.snapshot() {
                Ok(after) => {
                    view = View::between(&before, &after);
                    before = after;
                    error = None;
                }
                Err(e) => error = Some(format!("{e:#}")),
            }
        }
    })();
    ratatui::restore();
    outcome
}

fn number(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.1}k", value / 1000.0)
    } else {
        format!("{value:.0}")
    }
}

fn render(frame: &mut Frame, address: &str, view: &View, error: Option<&str>) {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let state = match (error, view.ready) {
        (Some(error), _) => format!("refresh failed: {error}"),
        (None, true) => "ready".to_string(),
        (None, false) => "NOT READY".to_string(),
    };
    let title = Line::from(format!(
        "shardgate top — {address} — {state} — spool deferred {} — q quits",
        number(view.spool_deferred_records)
    ));
    let areas = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(view.cores.len() as u16 + 3),
        Constraint::Length(view.routes.len() as u16 + 3),
        Constraint::Min(3),
    ])
    .split(frame.area());
    frame.render_widget(title, areas[0]);

    let cores = view.cores.iter().map(|c| {
        Row::new(vec![
            format!("core {}", c.core),
            format!("{:.0}%", c.busy_percent),
            number(c.received_per_s),
            number(c.written_per_s),
            number(c.forwarded_per_s),
            number(c.in_flight),
            format!("{:.1}", c.spool_mib),
            number(c.deferred),
            format!("{:.1}", c.write_p99_ms),
            number(c.errors_per_s),
        ])
    });
    let header = Row::new(vec![
        "",
        "busy",
        "in/s",
        "written/s",
        "fwd/s",
        "in flight",
        "spool MiB",
        "deferred",
        "p99 ms",
        "errors/s",
    ])
    .style(bold);
    let widths = [Constraint::Length(9)].into_iter().chain([Constraint::Length(10); 9]);
    frame.render_widget(
        Table::new(cores, widths)
            .header(header)
            .block(Block::bordered().title("cores")),
        areas[1],
    );

    let routes = view.routes.iter().map(|r| {
        Row::new(vec![
            r.route.clone(),
            number(r.received_per_s),
            number(r.written_per_s),
            number(r.dead_letters_per_s),
            r.pending.map_or_else(|| "-".to_string(), number),
        ])
    });
    let header = Row::new(vec!["route", "in/s", "written/s", "dead/s", "lag/pending"]).style(bold);
    let widths = [Constraint::Length(24)].into_iter().chain([Constraint::Length(12); 4]);
    frame.render_widget(
        Table::new(routes, widths)
            .header(header)
            .block(Block::bordered().title("routes")),
        areas[2],
    );

    let jobs = view.jobs.iter().map(|j| {
        Row::new(vec![
            j.job.clone(),
            number(j.read_per_s),
            number(j.out_per_s),
            j.progress_percent
                .map_or_else(|| "-".to_string(), |p| format!("{p:.0}%")),
            j.totals
                .watermark_lag_seconds
                .map_or_else(|| "-".to_string(), |s| format!("{s:.0} s")),
        ])
    });
    let header = Row::new(vec!["job", "read/s", "out/s", "splits", "watermark lag"]).style(bold);
    let widths = [Constraint::Length(24)].into_iter().chain([Constraint::Length(14); 4]);
    frame.render_widget(
        Table::new(jobs, widths)
            .header(header)
            .block(Block::bordered().title("jobs")),
        areas[3],
    );
}

/// The view as plain text (`top --once` without `--json`): the same columns as the live view.
pub fn plain(view: &View) -> String {
    let mut text = format!(
        "{:<9} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>9}\n",
        "", "busy", "in/s", "written/s", "fwd/s", "in flight", "spool MiB", "p99 ms", "errors/s"
    );
    for c in &view.cores {
        text.push_str(&format!(
            "{:<9} {:>5.0}% {:>10} {:>10} {:>10} {:>10} {:>10.1} {:>8.1} {:>9}\n",
            format!("core {}", c.core),
            c.busy_percent,
            number(c.received_per_s),
            number(c.written_per_s),
            number(c.forwarded_per_s),
            number(c.in_flight),
            c.spool_mib,
            c.write_p99_ms,
            number(c.errors_per_s)
        ));
    }
    for r in &view.routes {
        text.push_str(&format!(
            "route {}: {} in/s, {} written/s, {} dead/s, lag/pending {}\n",
            r.route,
            number(r.received_per_s),
            number(r.written_per_s),
            number(r.dead_letters_per_s),
            r.pending.map_or_else(|| "-".to_string(), number)
        ));
    }
    for j in &view.jobs {
        text.push_str(&format!(
            "job {}: {} read/s, {} out/s, splits {}\n",
            j.job,
            number(j.read_per_s),
            number(j.out_per_s),
            j.progress_percent
                .map_or_else(|| "-".to_string(), |p| format!("{p:.0}%"))
        ));
    }
    text
}
