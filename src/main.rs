//! The `meshbridge` command line.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use meshbridge::{api, app, bootstrap, config, ctl, demo, validate, webhook};

/// meshbridge: one Envoy control plane for Kubernetes pods and Consul-registered legacy hosts.
#[derive(Parser)]
#[command(name = "meshbridge", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: sources → index → snapshots → xDS, and the admin API.
    Run(Box<config::RunArgs>),
    /// Print an Envoy bootstrap (YAML) for a legacy host (VM / Mesos task).
    #[command(after_help = bootstrap::DRAIN_HELP)]
    Bootstrap(bootstrap::BootstrapOptions),
    /// Print manifests (Pods, Deployments, StatefulSets, DaemonSets, Jobs, …) with the
    /// sidecar injected, as the admission webhook would.
    Inject(webhook::InjectArgs),
    /// Print the CustomResourceDefinitions (the same bytes as crds/*.yaml).
    Crds {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Run a self-contained local mesh on this machine (no cluster needed).
    Demo(demo::DemoArgs),
    /// Query a running meshbridge through its admin API: services, proxies, sources,
    /// changes, peers, and Envoy diagnostics (config dump, stats, log level).
    Ctl(ctl::CtlArgs),
    /// Check manifests as `run` reads them from --config-dir: exit 0, or 2 with every error
    /// as FILE:LINE: document N (KIND NAME): FIELD: reason.
    Validate(validate::ValidateArgs),
}

/// `eprintln!` that cannot panic: when stderr cannot be written (a full disk, a closed pipe)
/// the message is lost and the exit code stays the one documented.
macro_rules! complain {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHBRIDGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log that cannot be written (a full disk, a closed pipe) loses lines, never the
        // process: the default reports the failure with `eprintln!`, which panics when stderr
        // itself is what fails.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { out_dir: None } => {
            print!("{}", api::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Crds { out_dir: Some(dir) } => {
            for (file, yaml) in api::crd_documents() {
                if let Err(e) = std::fs::write(dir.join(file), yaml) {
                    complain!("meshbridge crds: {}: {e}", dir.join(file).display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Inject(args) => {
            let text = if args.file == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
            } else {
                std::fs::read_to_string(&args.file)
            };
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    complain!("meshbridge inject: {}: {e}", args.file);
                    return ExitCode::from(2);
                }
            };
            match webhook::inject_stream(&text, &args.settings()) {
                Ok((yaml, notes)) => {
                    for note in notes {
                        complain!("meshbridge inject: {note}");
                    }
                    let _ = std::io::stdout().write_all(yaml.as_bytes());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    complain!("meshbridge inject: {}: {e}", args.file);
                    ExitCode::from(2)
                }
            }
        }
        Command::Bootstrap(opts) => match bootstrap::bootstrap_yaml(&opts) {
            Ok(yaml) => {
                let _ = std::io::stdout().write_all(yaml.as_bytes());
                ExitCode::SUCCESS
            }
            Err(e) => {
                complain!("meshbridge bootstrap: {e}");
                ExitCode::from(2)
            }
        },
        Command::Validate(args) => {
            let report = validate::check(&args.inputs, std::io::stdin().lock());
            for e in &report.errors {
                complain!("{e}");
            }
            if report.errors.is_empty() {
                println!(
                    "ok: {} file(s), {} document(s)",
                    report.files, report.documents
                );
                ExitCode::SUCCESS
            } else {
                complain!(
                    "meshbridge validate: {} error(s) in {} file(s) read",
                    report.errors.len(),
                    report.files
                );
                ExitCode::from(2)
            }
        }
        Command::Run(args) => {
            let config = match args.validate(&config::Environment::read()) {
                Ok(c) => c,
                Err(e) => {
                    complain!("meshbridge run: {e}");
                    return ExitCode::from(2);
                }
            };
            init_tracing();
            runtime(|| app::run(config, app::shutdown_signal(), None))
        }
        Command::Demo(args) => {
            init_tracing();
            runtime(|| demo::run(args))
        }
        Command::Ctl(args) => runtime(|| ctl::run(args)),
    }
}

fn runtime<F: std::future::Future<Output = anyhow::Result<()>>>(f: impl FnOnce() -> F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            complain!("meshbridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            complain!("meshbridge: {e:#}");
            if e.is::<app::BadConfig>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
