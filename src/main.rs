#[tokio::main]
async fn main() {
    match mailroom::cli::main().await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!(
                "{}: {}",
                mailroom::command_name(),
                mailroom::cli::error_text(&e)
            );
            std::process::exit(2);
        }
    }
}
