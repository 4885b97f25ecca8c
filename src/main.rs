//! The `switchyard` binary: parse arguments, set up logging, load the config, and run.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info, warn};

use cli::{Cli, Command};
use switchyard::config::{self, Config};
use switchyard::upgrade::Takeover;

fn main() -> ExitCode {
    let cli = Cli::parse();
    switchyard::log::init(cli.log_format, &cli.log_level);

    let config = match &cli.command {
        Some(Command::Forward {
            listen,
            to,
            balance,
        }) => config::forward_config(listen, to, cli::algorithm(balance)),
        _ => match &cli.config {
            Some(path) => Config::from_file(path),
            None => {
                eprintln!("switchyard: no config file; use -c FILE (or `switchyard forward --listen ADDR --to ADDR`)");
                return ExitCode::from(2);
            }
        },
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Check) = cli.command {
        print!("{}", cli::summary(&config));
        return ExitCode::SUCCESS;
    }
    for note in config::notes(&config) {
        warn!("{note}");
    }

    raise_fd_limit();
    let takeover = match (&cli.takeover, &cli.takeover_if_running) {
        (Some(path), _) => Takeover::connect(path).map(Some),
        (None, Some(path)) => Takeover::connect_if_running(path).inspect(|t| {
            if t.is_none() {
                info!(socket = %path.display(), "no process to take over from; binding");
            }
        }),
        (None, None) => Ok(None),
    };
    let takeover = match takeover {
        Ok(t) => t,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let config_path = match &cli.command {
        Some(Command::Forward { .. }) => None,
        _ => cli.config.clone(),
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = config.global.worker_threads {
        runtime.worker_threads(n);
    }
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, config_path, takeover)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the balancer; SIGHUP reloads the config file.
async fn serve(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    takeover: Option<switchyard::upgrade::Takeover>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before anything is served, so an early SIGHUP reloads instead of killing,
    // and an early SIGTERM or SIGINT stops the balancer instead of being lost.
    let hangup = signal(SignalKind::hangup());
    let shutdown = shutdown_signal(
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    let mut server = switchyard::Server::bind_with(config, takeover)?;
    if let Some(path) = config_path {
        server = server.with_config_path(path);
    }
    server
        .run_with(shutdown, move |control| match hangup {
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        info!("SIGHUP received; reloading the config");
                        // The outcome is logged (and counted) by `reload` itself.
                        let _ = control.reload().await;
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; reload through the admin API only")
            }
        })
        .await
}

/// Completes on SIGTERM or SIGINT, whose handlers the caller installed.
async fn shutdown_signal(
    term: std::io::Result<tokio::signal::unix::Signal>,
    interrupt: std::io::Result<tokio::signal::unix::Signal>,
) {
    async fn received(
        signal: std::io::Result<tokio::signal::unix::Signal>,
        name: &'static str,
    ) -> &'static str {
        match signal {
            Ok(mut signal) => {
                signal.recv().await;
                name
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for {name}");
                std::future::pending().await
            }
        }
    }
    let name = tokio::select! {
        name = received(term, "SIGTERM") => name,
        name = received(interrupt, "SIGINT") => name,
    };
    info!("{name} received");
}

/// Each connection holds two sockets (and up to two pipes while moving data): raise the
/// soft open-file limit to the hard one, as HAProxy and nginx do.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
        }
    }
}
