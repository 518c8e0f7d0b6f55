use clap::{Parser, Subcommand};
use mecha_filters::Registry;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "mecha",
    version,
    about = "One sidecar: Envoy-compatible proxy and Dapr-compatible runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Check a bootstrap file and print a summary (exit 1 and every error when invalid).
    Validate {
        /// Envoy v3 bootstrap (YAML or JSON).
        #[arg(short = 'c', long = "config-path")]
        config: PathBuf,
    },
    /// Install or remove the transparent-capture iptables rules (run as root in the pod's netns).
    Iptables(crate::iptables::IptablesArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Envoy v3 bootstrap (YAML or JSON). Optional with --app-id (zero-config runtime mode).
    #[arg(short = 'c', long = "config-path")]
    config: Option<PathBuf>,
    /// Worker threads (default: number of cores).
    #[arg(long)]
    concurrency: Option<usize>,
    /// trace, debug, info, warn, error, off.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    log_level: String,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long = "drain-time-s", default_value_t = 10)]
    drain_time_s: u64,
    /// Dapr-compatible runtime flags (--app-id, --app-port, --dapr-http-port …).
    #[command(flatten)]
    runtime: crate::runtime_cmd::RuntimeArgs,
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => validate(&config),
        Command::Run(args) => run(args),
        Command::Iptables(args) => crate::iptables::main(args),
    }
}

/// The filters built into this binary.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register_http(std::sync::Arc::new(
        mecha_runtime_api::RuntimeApiFactory::unbound(),
    ));
    r.register_http(std::sync::Arc::new(
        mecha_filters::builtin::fault::FaultFactory,
    ));
    r.register_http(std::sync::Arc::new(
        mecha_filters::builtin::local_ratelimit::LocalRateLimitFactory,
    ));
    r
}

fn validate(path: &std::path::Path) -> i32 {
    let bootstrap = match mecha_config::load_bootstrap(path) {
        Ok(b) => b,
        Err(errors) => {
            report(path, &errors);
            return 1;
        }
    };
    let ctx = mecha_proxy::BuildContext::new(registry());
    match mecha_proxy::build(&bootstrap, &ctx) {
        Ok(snap) => {
            let routes: usize = snap
                .listeners
                .iter()
                .flat_map(|l| &l.chains)
                .filter_map(|c| match &c.terminal {
                    mecha_proxy::listener::Terminal::Http(h) => Some(h.routes.load().route_count()),
                    _ => None,
                })
                .sum();
            println!(
                "{}: OK ({} listeners, {} clusters, {} routes)",
                path.display(),
                snap.listeners.len(),
                snap.clusters.clusters.len(),
                routes
            );
            0
        }
        Err(errors) => {
            report(path, &errors);
            1
        }
    }
}

fn report(path: &std::path::Path, errors: &mecha_config::ConfigErrors) {
    eprintln!("{}: {} error(s)", path.display(), errors.0.len());
    for e in &errors.0 {
        eprintln!("{e}");
    }
}

fn run(args: RunArgs) -> i32 {
    let filter =
        tracing_subscriber::EnvFilter::try_new(format!("{},h2=warn,hyper=warn", args.log_level))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr, as Envoy's do, so stdout stays free for what a user pipes.
    // Colour only on a terminal: redirected to a file or a log collector, escape codes would
    // split every `key=value` field.
    // The filter sits behind a reload handle so that the admin's `/logging` can change it.
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init();
    }
    let log_control = log_control(reload, &args.log_level);

    if args.runtime.app_id.is_some() || args.config.is_none() {
        let concurrency = worker_count(args.concurrency);
        return crate::runtime_cmd::run(
            args.config.as_deref(),
            &args.runtime,
            concurrency,
            Duration::from_secs(args.drain_time_s),
        );
    }
    let Some(config_path) = args.config.clone() else {
        return 1;
    };
    let bootstrap = match mecha_config::load_bootstrap(&config_path) {
        Ok(b) => b,
        Err(errors) => {
            report(&config_path, &errors);
            return 1;
        }
    };
    let concurrency = worker_count(args.concurrency);
    let Some(runtime) = tokio_runtime(concurrency) else {
        return 1;
    };
    let options = mecha_proxy::ServerOptions {
        concurrency,
        config_path: Some(config_path.display().to_string()),
        drain_timeout: Duration::from_secs(args.drain_time_s),
        log_control: Some(log_control),
    };
    runtime.block_on(async move {
        let server = match mecha_proxy::Server::start(bootstrap, registry(), options).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("mecha: {e}");
                return 1;
            }
        };
        if let Err(e) = crate::xds_cmd::start(&server) {
            eprintln!("mecha: {e}");
            return 1;
        }
        tracing::info!(concurrency, "mecha started");
        tokio::select! {
            _ = wait_for_shutdown_signal() => {}
            _ = server.quit_requested() => {
                // Envoy's /quitquitquit exits at once, without a drain.
                tracing::info!("quitquitquit: exiting");
                return 0;
            }
        }
        tracing::info!("draining");
        let clean = server.drain().await;
        tracing::info!(clean, "stopped");
        0
    })
}

/// `/logging`'s view of the reloadable filter. Envoy's level names are accepted (`warning`,
/// `critical`); noisy dependencies stay at `warn` as at startup.
fn log_control(
    reload: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    initial: &str,
) -> mecha_proxy::LogControl {
    // The level as given, not the filter's rendering (which reorders the dependency directives).
    let current = std::sync::Arc::new(std::sync::Mutex::new(initial.to_string()));
    let shown = current.clone();
    mecha_proxy::LogControl {
        get: std::sync::Arc::new(move || match shown.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }),
        set: std::sync::Arc::new(move |level: &str| {
            let directive = match level {
                "trace" | "debug" | "info" | "error" | "off" => level,
                "warning" | "warn" => "warn",
                "critical" => "error",
                other => return Err(mecha_proxy::LogLevelError::Unknown(other.into())),
            };
            let filter =
                tracing_subscriber::EnvFilter::try_new(format!("{directive},h2=warn,hyper=warn"))
                    .map_err(|e| mecha_proxy::LogLevelError::Reload(e.to_string()))?;
            reload
                .reload(filter)
                .map_err(|e| mecha_proxy::LogLevelError::Reload(e.to_string()))?;
            match current.lock() {
                Ok(mut l) => *l = level.to_string(),
                Err(p) => *p.into_inner() = level.to_string(),
            }
            Ok(())
        }),
    }
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// `--concurrency`, defaulting to the number of cores.
pub(crate) fn worker_count(flag: Option<usize>) -> usize {
    flag.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
    .max(1)
}

/// The data plane's Tokio runtime. One worker gets a current-thread runtime, which avoids
/// cross-thread wake-ups entirely.
pub(crate) fn tokio_runtime(workers: usize) -> Option<tokio::runtime::Runtime> {
    let built = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    match built {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            None
        }
    }
}
