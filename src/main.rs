//! `shardgate` command line: `serve` runs the gateway, `check` validates a config offline,
//! `replay` sends a route's dead letters back through the route, `reference` checks or
//! writes the generated references under `deploy/reference/`.

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
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C.
    Serve {
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file without connecting to anything.
    Check {
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Send a route's dead letters (Kafka topic or table) back through the route as configured
    /// now; letters that fail again return to the dead-letter destination.
    Replay {
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Route whose dead letters to replay.
        #[arg(long, short)]
        route: String,
    },
    /// Checks that the generated references under `deploy/reference/` (configuration keys,
    /// reason codes, the config's JSON Schema) match the code; `--write` rewrites them.
    Reference {
        /// Repository root.
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// Rewrite stale files instead of failing on them.
        #[arg(long)]
        write: bool,
    },
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
    shardgate::telemetry::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => Config::load(&config)
            .map(|c| {
                println!("{}: valid, {} route(s)", config.display(), c.routes.len());
            })
            .map_err(anyhow::Error::from),
        Command::Serve { config } => Config::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(shardgate::app::serve),
        Command::Replay { config, route } => Config::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(|c| shardgate::replay::run(c, &route))
            .map(|report| println!("route `{route}`: {report}")),
        Command::Reference { repo, write } => reference(&repo, write),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
