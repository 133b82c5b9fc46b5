//! The `acclimate` command-line tool; see `acclimate --help` and [`acclimate::cli`].

fn main() -> std::process::ExitCode {
    acclimate::cli::main()
}
