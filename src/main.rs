use clap::Parser;

use fusion_serve::config::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(config) => {
            fusion_serve::telemetry::init_logging(config.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(fusion_serve::run(*config)))
        }
        Command::InitModel(args) => {
            fusion_serve::telemetry::init_logging(fusion_serve::config::LogFormat::Text);
            fusion_serve::loader::init_model(&args)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
