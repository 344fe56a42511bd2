//! `shardgate` command line: `serve` runs the gateway, `check` validates a config offline,
//! `replay` sends a route's dead letters back through the route, `export` streams a table
//! through the gateway's scan path, `job run` runs a processing job, `top` shows a running
//! gateway live, `reference` checks or writes the generated references under
//! `deploy/reference/`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardgate::config::Config;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Thread-per-core, shard-native gateway between message systems and ScyllaDB.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to stderr: `text`, or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = shardgate::telemetry::LogFormat::Text)]
    log_format: shardgate::telemetry::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C.
    #[command(
        after_help = "Examples:\n  shardgate serve --config /etc/shardgate/shardgate.toml\n  shardgate --log-format json serve --config deploy/examples/kafka.toml"
    )]
    Serve {
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file without connecting to anything.
    #[command(
        after_help = "Example:\n  shardgate check --config deploy/shardgate.example.toml\n\nPrints `valid` and a line per listener, route and job that `serve` would run; or the error, naming the key."
    )]
    Check {
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Send a route's dead letters (Kafka topic or table) back through the route as configured
    /// now; letters that fail again return to the dead-letter destination. The same as `job
    /// run` of a replay job (`[job.source] replay = "<route>"`); Ctrl-C or SIGTERM stops it
    /// after the chunk in hand is committed.
    #[command(
        after_help = "Example:\n  shardgate replay --config /etc/shardgate/shardgate.toml --route orders --metrics 127.0.0.1:9191"
    )]
    Replay {
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Route whose dead letters to replay.
        #[arg(long, short)]
        route: String,
        /// Serves the run's metrics (Prometheus text, `/metrics`) on this address while it
        /// runs, e.g. `127.0.0.1:9191`.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Streams a table (or the rows a `--where` keeps) through the gateway's scan path to JSON
    /// lines or CSV: planned by the gateway, each split read at its owner core's port. A
    /// progress bar on a terminal, a summary line otherwise.
    #[command(
        after_help = "Examples:\n  shardgate export --config gw.toml --table shop.orders --output orders.jsonl --resume orders.state\n  shardgate export --config gw.toml --table shop.orders --columns order_id,amount --where \"amount > 100\" --allow-filtering --format csv"
    )]
    Export {
        /// TOML config of the gateway to read through (its `[ingest] listen` address).
        #[arg(long, short)]
        config: PathBuf,
        /// `keyspace.table`.
        #[arg(long)]
        table: String,
        /// Columns, comma separated; default all.
        #[arg(long, value_delimiter = ',')]
        columns: Vec<String>,
        /// Extra CQL restrictions, e.g. `status = 'open'` (add `--allow-filtering` for
        /// non-key columns).
        #[arg(long, default_value = "")]
        r#where: String,
        /// Adds ALLOW FILTERING to the scan.
        #[arg(long)]
        allow_filtering: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: shardgate::export::Format,
        /// Output file; default stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// State file: a stopped export started again with it goes on where it stopped, every
        /// row in the output exactly once (needs `--output`).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Splits read at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Rows per page.
        #[arg(long, default_value_t = 5000)]
        page_size: u32,
    },
    /// A live view of a running gateway: a line per core (CPU busy, rows in, written and
    /// forwarded per second, ingest rows in flight, spool MiB, write p99, errors per second),
    /// then a line per route (lag or pending, dead letters per second) and per job; refreshed
    /// from the admin port's `/v1/cores`. `q`, Esc or Ctrl-C quits.
    #[command(
        after_help = "Examples:\n  shardgate top\n  shardgate top --admin gw1:9190 --ca-file ca.pem --token-file admin.token\n  shardgate top --once --json"
    )]
    Top {
        /// The gateway's admin port (`[admin] listen`).
        #[arg(long, default_value = "127.0.0.1:9190")]
        admin: String,
        /// File holding the admin port's bearer token (when `[admin] token_sha256` is set).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// CA certificate (PEM) of the admin port's certificate: speak HTTPS.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Seconds between refreshes (and, with `--once`, between the two snapshots).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one view (rates over `--interval`) and exit.
        #[arg(long)]
        once: bool,
        /// With `--once`: print the view as JSON.
        #[arg(long, requires = "once")]
        json: bool,
    },
    /// Processing jobs (`[[job]]` in the config).
    #[command(
        after_help = "Example:\n  shardgate job run --config /etc/shardgate/shardgate.toml --job revenue_by_customer_hour"
    )]
    Job {
        #[command(subcommand)]
        action: JobAction,
    },
    /// Checks that the generated references under `deploy/reference/` (configuration keys,
    /// reason codes, the config's JSON Schema) match the code; `--write` rewrites them.
    #[command(
        after_help = "Examples:\n  shardgate reference          # fails when a generated reference is stale\n  shardgate reference --write"
    )]
    Reference {
        /// Repository root.
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// Rewrite stale files instead of failing on them.
        #[arg(long)]
        write: bool,
    },
}

#[derive(Subcommand)]
enum JobAction {
    /// Runs a job to the end of its current run (a new run when the last one finished) through
    /// the gateway's `[ingest]` listener, sharing its splits with other gateways running it; a
    /// progress bar on a terminal, a summary line at the end. A stream job runs until Ctrl-C or
    /// SIGTERM (it checkpoints first), sharing its routes' partitions with every gateway
    /// running it. A replay job sends its route's dead letters back through the route, as
    /// `shardgate replay` does.
    #[command(
        after_help = "Examples:\n  shardgate job run --config deploy/examples/grpc.toml --job revenue_by_customer_hour\n  shardgate job run --config gw.toml --job city_minutes --metrics 127.0.0.1:9191"
    )]
    Run {
        /// TOML config holding the job.
        #[arg(long, short)]
        config: PathBuf,
        /// The job's `name`.
        #[arg(long, short)]
        job: String,
        /// Serves the run's metrics (Prometheus text, `/metrics`: the job's rows read, out and
        /// failed, splits done and in all, …) on this address while it runs, e.g.
        /// `127.0.0.1:9191` (not the gateway's admin port, which its `serve` holds).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
}

/// Serves this process's metrics on `addr`, if given, for as long as the returned runtime lives.
fn serve_metrics(addr: Option<std::net::SocketAddr>) -> anyhow::Result<Option<tokio::runtime::Runtime>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("metrics")
        .enable_all()
        .build()?;
    shardgate::telemetry::admin::start(runtime.handle(), addr, None, None)
        .map_err(|error| anyhow::anyhow!("cannot serve metrics on `{addr}`: {error}"))?;
    Ok(Some(runtime))
}

fn run_job(config: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let loaded = Config::load(config)?;
    let Some(job) = loaded.jobs.iter().find(|j| j.name == name).cloned() else {
        let names: Vec<&str> = loaded.jobs.iter().map(|j| j.name.as_str()).collect();
        anyhow::bail!("no job `{name}` in {}; jobs: {}", config.display(), names.join(", "));
    };
    if let Some(route) = job.replay.clone() {
        let report = shardgate::job::replay::run(loaded, &route, name, shardgate::app::wait_for_stop_signal())?;
        eprintln!("job `{name}`: route `{route}`: {report}");
        return Ok(());
    }
    let Some(ingest) = &loaded.ingest else {
        anyhow::bail!(
            "{}: no `[ingest]` table; jobs run through its listener",
            config.display()
        );
    };
    let address = ingest.gateway_addr()?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if !job.stream.is_empty() {
        let routes: Vec<_> = job
            .stream
            .iter()
            .filter_map(|route| loaded.routes.iter().find(|r| &r.name == route).cloned())
            .collect();
        eprintln!(
            "job `{name}`: folding routes {} until Ctrl-C or SIGTERM",
            job.stream.join(", ")
        );
        let (command, signal) = shardgate::job::control::steady();
        runtime.spawn(async move {
            shardgate::app::wait_for_stop_signal().await;
            command.send_replace(shardgate::job::control::Command::Stop);
        });
        let report = runtime.block_on(shardgate::job::stream::run(
            &loaded.cluster,
            job,
            &routes,
            &address,
            signal,
        ))?;
        eprintln!("job `{name}`: {report}");
        return Ok(());
    }
    let (_command, signal) = shardgate::job::control::steady();
    let report = runtime.block_on(shardgate::job::run(&loaded.cluster, job, &address, progress, signal))?;
    eprintln!("job `{name}`: {report}");
    Ok(())
}

fn top(
    admin: &str,
    token_file: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
    interval: f64,
    once: bool,
    json: bool,
) -> anyhow::Result<()> {
    if !(interval.is_finite() && (0.1..=3600.0).contains(&interval)) {
        anyhow::bail!("`--interval` = `{interval}`: expected seconds from 0.1 to 3600");
    }
    let interval = std::time::Duration::from_secs_f64(interval);
    let admin = shardgate::top::Admin::new(admin, token_file, ca_file)?;
    if !once {
        return shardgate::top::run(&admin, interval);
    }
    let view = shardgate::top::view_once(&admin, interval)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", shardgate::top::plain(&view));
    }
    Ok(())
}

fn reference(repo: &std::path::Path, write: bool) -> anyhow::Result<()> {
    let stale = shardgate::reference::write_references(repo, !write)?;
    match (stale.is_empty(), write) {
        (true, _) => println!("references are current"),
        (false, true) => println!("rewrote {}", stale.join(", ")),
        (false, false) => anyhow::bail!("stale: {}; run `shardgate reference --write`", stale.join(", ")),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    shardgate::telemetry::init_logging(cli.log_format);
    shardgate::tls::install_crypto_provider();
    let result = match cli.command {
        Command::Check { config } => Config::load(&config)
            .map(|c| {
                println!(
                    "{}: valid, {} route(s), {} job(s)",
                    config.display(),
                    c.routes.len(),
                    c.jobs.len()
                );
                for line in c.summary() {
                    println!("  {line}");
                }
            })
            .map_err(anyhow::Error::from),
        Command::Serve { config } => Config::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(shardgate::app::serve),
        Command::Replay { config, route, metrics } => Config::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok((c, serve_metrics(metrics)?)))
            .and_then(|(c, _metrics)| {
                let job = format!("replay.{route}");
                shardgate::job::replay::run(c, &route, &job, shardgate::app::wait_for_stop_signal())
            })
            .map(|report| println!("route `{route}`: {report}")),
        Command::Reference { repo, write } => reference(&repo, write),
        Command::Top {
            admin,
            token_file,
            ca_file,
            interval,
            once,
            json,
        } => top(&admin, token_file.as_deref(), ca_file.as_deref(), interval, once, json),
        Command::Job {
            action: JobAction::Run { config, job, metrics },
        } => serve_metrics(metrics).and_then(|_metrics| run_job(&config, &job)),
        Command::Export {
            config,
            table,
            columns,
            r#where,
            allow_filtering,
            format,
            output,
            resume,
            parallel,
            page_size,
        } => Config::load(&config).map_err(anyhow::Error::from).and_then(|c| {
            let ingest = c.ingest.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no `[ingest]` table; export reads through its listener",
                    config.display()
                )
            })?;
            let spec = shardgate::export::ExportSpec {
                endpoint: ingest.gateway_addr()?,
                table,
                columns,
                r#where,
                allow_filtering,
                format,
                output,
                resume,
                parallel,
                page_size,
            };
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let report = runtime.block_on(shardgate::export::run(spec, progress))?;
            eprintln!("export: {report}");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command's `--help` ends with an example of its use.
    #[test]
    fn every_command_has_an_example() {
        fn walk(command: &clap::Command, path: &str) {
            for sub in command.get_subcommands().filter(|sub| sub.get_name() != "help") {
                let path = format!("{path} {}", sub.get_name());
                let after = sub.get_after_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(
                    after.contains("Example") && after.contains(&path),
                    "`{path} --help` has no example: {after:?}"
                );
                walk(sub, &path);
            }
        }
        let mut cli = super::Cli::command();
        cli.build();
        walk(&cli, "shardgate");
    }
}
