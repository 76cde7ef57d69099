//! `mirrorctl`: the command-line front end.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mirrorctl",
    about = "Userspace HMM mirror driver for the MXA-1 accelerator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mirror this process into the embedded emulated accelerator and run a workload.
    Demo,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => {
            eprintln!(
                "mirrorctl demo: not implemented yet: the driver (issue 4) has not landed; \
                 the emulated device can be explored with `cargo run -p examples --example emulator_tour`"
            );
            std::process::ExitCode::from(2)
        }
    }
}
