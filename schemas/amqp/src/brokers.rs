//! A list of broker addresses: the nodes of one RabbitMQ cluster, given as a comma-separated
//! URL list (`amqp://u:p@node1:5672/%2f,amqp://u:p@node2:5672/%2f`).

use crate::{AmqpError, error::redact_url};

/// The addresses of a broker list, checked: each one parses, and all name the same vhost.
#[derive(Debug)]
pub(crate) struct Brokers(Vec<String>);

impl Brokers {
    /// Parses `list`. A single URL is taken as it is; in a list, each entry is trimmed, and an
    /// empty entry, one that is not an AMQP URL, or one with another vhost than the first is
    /// refused, naming the entry (without its password).
    pub(crate) fn parse(list: &str) -> Result<Brokers, AmqpError> {
        if !list.contains(',') {
            return match list.parse::<lapin::uri::AMQPUri>() {
                Ok(_) => Ok(Brokers(vec![list.to_owned()])),
                Err(e) => Err(AmqpError::Invalid(format!(
                    "cannot parse the AMQP URL {}: {e}",
                    redact_url(list)
                ))),
            };
        }
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        let count = entries.len();
        let shown = || {
            entries
                .iter()
                .map(|url| redact_url(url))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut first_vhost: Option<String> = None;
        for (i, url) in entries.iter().enumerate() {
            let entry = format!("entry {} of {count} of the broker list {}", i + 1, shown());
            if url.is_empty() {
                return Err(AmqpError::Invalid(format!("{entry} is empty")));
            }
            let parsed = url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
                AmqpError::Invalid(format!(
                    "{entry}, {}, is not an AMQP URL: {e}",
                    redact_url(url)
                ))
            })?;
            match &first_vhost {
                None => first_vhost = Some(parsed.vhost),
                Some(vhost) if *vhost != parsed.vhost => {
                    return Err(AmqpError::Invalid(format!(
                        "{entry}, {}, names the vhost {:?} but the first names {vhost:?}: every \
                         address must be a node of one cluster, with the same vhost",
                        redact_url(url),
                        parsed.vhost
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(Brokers(entries.into_iter().map(str::to_owned).collect()))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The `i`-th address, with its password, to connect with.
    pub(crate) fn url(&self, i: usize) -> &str {
        &self.0[i]
    }

    /// The addresses, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_url_is_kept_as_it_is_and_a_list_is_trimmed() {
        let one = Brokers::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(one.len(), 1);
        let list = Brokers::parse("amqp://a:5672/v, amqp://b:5672/v ,amqps://c:5671/v").unwrap();
        assert_eq!(
            list.iter().collect::<Vec<_>>(),
            ["amqp://a:5672/v", "amqp://b:5672/v", "amqps://c:5671/v"]
        );
        assert_eq!(list.url(2), "amqps://c:5671/v");
        // No path and `/%2f` are both the default vhost.
        assert_eq!(
            Brokers::parse("amqp://a:5672,amqp://b:5672/%2f")
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn errors_name_the_entry_without_a_password() {
        let err = Brokers::parse("amqp://u:pw@a/%2f, ,amqp://u:pw@b/%2f").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("entry 2 of 3") && text.contains("is empty"),
            "{text}"
        );
        assert!(!text.contains("pw"), "{text}");

        let err = Brokers::parse("amqp://u:pw@a/one,amqp://u:pw@b/two").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("entry 2 of 2"), "{text}");
        assert!(
            text.contains("\"two\"") && text.contains("\"one\""),
            "{text}"
        );
        assert!(!text.contains(":pw@"), "{text}");
    }
}
