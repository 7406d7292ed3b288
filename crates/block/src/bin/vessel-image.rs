//! Standalone `vessel-image` binary: the same code as `vessel image`, for tests and for
//! use before the main `vessel` binary wires it in.

use clap::Parser;

/// Vessel disk image tool.
#[derive(Parser)]
#[command(name = "vessel-image", version)]
struct Cli {
    #[command(flatten)]
    args: block::cli::ImageArgs,
}

fn main() {
    let cli = Cli::parse();
    let code = match block::cli::run(cli.args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vessel: error: {e}");
            1
        }
    };
    std::process::exit(code);
}
