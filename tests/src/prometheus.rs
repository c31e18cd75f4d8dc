//! A small reader of the Prometheus text exposition format (what `GET /metrics` answers), for
//! assertions: samples as `name{labels} value`, comments and `# TYPE`/`# HELP` lines skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of a scrape.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// The text as served, for failure messages.
    pub text: String,
}

impl Scrape {
    /// Parses the text exposition format; an error names the line it cannot read.
    pub fn parse(text: &str) -> anyhow::Result<Scrape> {
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_line(line).with_context(|| format!("line {}: {line:?}", n + 1))?);
        }
        Ok(Scrape {
            samples,
            text: text.to_owned(),
        })
    }

    /// The value of the sample named `name` whose labels are exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// Like [`get`](Self::get), 0 when the sample is absent (a counter never incremented is not
    /// rendered yet).
    pub fn get_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The samples named `name` (any labels).
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.named(name).next().is_some()
    }
}

fn parse_line(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .context("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end = loop {
            // Skip separators, find `key="value"` or the closing brace.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some((i, c)) = chars.next() else {
                bail!("unclosed labels");
            };
            if c == '}' {
                break i + 1;
            }
            let mut key = String::from(c);
            loop {
                match chars.next() {
                    Some((_, '=')) => break,
                    Some((_, c)) => key.push(c),
                    None => bail!("label {key:?} without a value"),
                }
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                bail!("label {key:?}: value not quoted");
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("label {key:?}: unfinished escape"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("label {key:?}: unclosed value"),
                }
            }
            labels.insert(key.trim().to_owned(), value);
        };
        rest = &after[end..];
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().context("no value")?;
    let value: f64 = value
        .parse()
        .with_context(|| format!("bad value {value:?}"))?;
    // An optional timestamp may follow; nothing else.
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .with_context(|| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        bail!("trailing text");
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `GET <http_url>/metrics`, parsed; panics (saying why) unless 200 with a readable body.
pub async fn scrape(http_url: &str) -> Scrape {
    let url = format!("{http_url}/metrics");
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("an HTTP client")
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "GET {url}: {status}\n{text}");
    assert!(
        content_type.starts_with("text/plain"),
        "GET {url}: content type {content_type:?}, not the Prometheus text format"
    );
    Scrape::parse(&text).unwrap_or_else(|e| panic!("GET {url}: {e:#}\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::Scrape;

    #[test]
    fn reads_the_text_format() {
        let text = "# HELP saga_started_total Sagas started.\n\
                    # TYPE saga_started_total counter\n\
                    saga_started_total{saga=\"order-checkout\"} 11\n\
                    saga_outbox_backlog 0\n\
                    h_bucket{saga=\"a\",step=\"b\",le=\"+Inf\"} 3\n\
                    h_sum{saga=\"a\",step=\"b\"} 0.25 1700000000000\n\
                    odd{v=\"x\\\"y,z}\"} 1.5e3\n";
        let scrape = Scrape::parse(text).unwrap();
        assert_eq!(scrape.samples.len(), 5);
        assert_eq!(
            scrape.get("saga_started_total", &[("saga", "order-checkout")]),
            Some(11.0)
        );
        assert_eq!(scrape.get("saga_started_total", &[]), None);
        assert_eq!(scrape.get("saga_outbox_backlog", &[]), Some(0.0));
        assert_eq!(
            scrape.get("h_bucket", &[("saga", "a"), ("step", "b"), ("le", "+Inf")]),
            Some(3.0)
        );
        assert_eq!(
            scrape.get("h_sum", &[("saga", "a"), ("step", "b")]),
            Some(0.25)
        );
        assert_eq!(scrape.get("odd", &[("v", "x\"y,z}")]), Some(1500.0));
        assert_eq!(scrape.get_or_zero("missing", &[]), 0.0);
        assert!(Scrape::parse("novalue\n").is_err());
        assert!(Scrape::parse("x{a=\"b\" 1\n").is_err());
        assert!(Scrape::parse("x 1 2 3\n").is_err());
    }
}
