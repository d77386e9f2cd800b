//! Logs to stderr, as text for people or JSON for collectors.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_new(filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let never_secrets = FilterFn::new(may_log);
    match format {
        // Colours only for a person at a terminal; files and collectors get plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .with(never_secrets)
            .init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish()
            .with(never_secrets)
            .init(),
    }
    // A panic (a defect of mailroom's, or of a parser it calls on what a server sent,
    // which the probe survives) is logged like everything else, in the chosen format and
    // with the provider it happened for, instead of as a raw line on stderr.
    std::panic::set_hook(Box::new(|info| {
        let panic = crate::probe::printable(&info.to_string());
        tracing::error!(%panic, "panicked (a defect of mailroom's)");
    }));
    Ok(())
}

/// Whether anything may log what `meta` describes, whatever the filter asks. async-imap
/// logs the raw commands it sends at trace level (and what it reads at debug), which
/// include passwords and tokens: nothing of it below info is ever logged. A directive
/// appended to the user's filter did not hold: one naming a module of it
/// (`async_imap::imap_stream=trace`) is more specific, and wins.
fn may_log(meta: &Metadata<'_>) -> bool {
    !(meta.target().starts_with("async_imap") && *meta.level() > Level::INFO)
}

/// One JSON object per line, the fields of the event and of the spans it is in side by
/// side: `{"timestamp", "level", "message", …, "namespace", "name", "spans", "target"}`
/// (`spans`: their names from the outermost, joined by `:`),
/// as Flux's and controller-runtime's logs put an object's namespace and name.
/// tracing-subscriber's own JSON nests span fields under the span, whose own name takes
/// the key `name` there: a provider's name was lost to the span's in every collector.
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // An event from a crate that logs through `log` names its own target and level
        // there, not in tracing's metadata (whose target is "log").
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = Map::new();
        event.record(&mut Fields(&mut line));
        if let Some(scope) = ctx.event_scope() {
            let mut spans = Vec::new();
            // The event's own fields, then an inner span's, win over an outer one's.
            for span in scope {
                spans.push(span.name());
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                    for (key, value) in fields {
                        line.entry(key).or_insert(value);
                    }
                }
            }
            spans.reverse();
            line.insert("spans".into(), spans.join(":").into());
        }
        line.insert(
            "timestamp".into(),
            k8s_openapi::jiff::Timestamp::now().to_string().into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// An event's fields as JSON values, without the `log.*` fields a `log` record carries
/// (its target and level are the line's; file and line are of no use to an operator).
struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        if !field.name().starts_with("log.") {
            self.0.insert(field.name().into(), value);
        }
    }
}

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The lines `emit` logs through [`FlatJson`], parsed.
    fn lines(emit: impl FnOnce()) -> Vec<Value> {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_carries_the_provider_beside_the_message() {
        let lines = lines(|| {
            let provider = tracing::info_span!("provider", namespace = "ops", name = "imaps");
            let _p = provider.enter();
            let probe = tracing::info_span!("probe", host = "mail.example.com", port = 993);
            let _q = probe.enter();
            tracing::warn!(reason = "Timeout", level = "shadowed", "tested");
        });
        let line = &lines[0];
        assert_eq!(line["message"], "tested", "{line}");
        assert_eq!(line["reason"], "Timeout", "{line}");
        assert_eq!(line["namespace"], "ops", "{line}");
        assert_eq!(line["name"], "imaps", "{line}");
        assert_eq!(line["host"], "mail.example.com", "{line}");
        assert_eq!(line["port"], 993, "{line}");
        assert_eq!(line["spans"], "provider:probe", "{line}");
        assert_eq!(line["level"], "WARN", "{line}");
        assert!(line["timestamp"].is_string() && line["target"].is_string());
    }

    /// A record of a crate that logs through `log` (rustls, async-imap): its own target
    /// and level, without the bridge's `log.*` fields.
    #[test]
    fn a_log_record_keeps_its_target() {
        let lines = lines(|| {
            let record = tracing_log::log::Record::builder()
                .target("rustls::client::hs")
                .level(tracing_log::log::Level::Warn)
                .args(format_args!("no cached session"))
                .file(Some("hs.rs"))
                .line(Some(7))
                .build();
            tracing_log::format_trace(&record).unwrap();
        });
        let line = &lines[0];
        assert_eq!(line["target"], "rustls::client::hs", "{line}");
        assert_eq!(line["level"], "WARN", "{line}");
        assert_eq!(line["message"], "no cached session", "{line}");
        let keys: Vec<&String> = line.as_object().unwrap().keys().collect();
        assert!(keys.iter().all(|k| !k.starts_with("log.")), "{line}");
    }
}
