//! The `acclimate` command-line tool; see `acclimate --help` and [`acclimate_cli::cli`].

fn main() -> std::process::ExitCode {
    acclimate_cli::cli::main()
}
