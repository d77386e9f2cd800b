//! Logs to stderr, as text for people or JSON for collectors.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    // async-imap logs the raw commands it sends at trace level, which would include
    // passwords and tokens: it never logs below info, whatever the filter asks.
    let filter = EnvFilter::try_new(format!("{filter},async_imap=info"))?;
    // Colours only for a person at a terminal; files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
    Ok(())
}
