/// What can go wrong talking to the broker.
///
/// Apart from [`AmqpError::Invalid`] and [`AmqpError::CaFile`] (a bug or a bad value in the
/// configuration) and [`AmqpError::QueueMismatch`] (an operator must act on the broker), every
/// variant means the message may not have reached its destination, or the channel or
/// connection is no longer usable: end the session with it and let [`crate::supervise`] start a
/// fresh one.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The connection could not be opened (the URL is shown without its password).
    #[error("cannot connect to the broker at {url}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    /// The `amqps://` broker's certificate is not trusted: its CA is neither built in nor in
    /// `--amqp-ca-file`, or it is expired, or it names another host.
    #[error(
        "the broker at {url} presented a TLS certificate this process does not trust (its CA \
         is unknown, or it is expired, or it is for another host name); if a private CA signed \
         it, pass that CA's certificate with --amqp-ca-file (AMQP_CA_FILE)"
    )]
    UntrustedCertificate {
        url: String,
        #[source]
        source: lapin::Error,
    },
    /// None of the addresses of a broker list could be connected to: each one's error, in
    /// the order tried (passwords redacted).
    #[error("none of the brokers of the list answered: {attempts}")]
    NoBrokerAnswered { attempts: String },
    /// The broker did not complete the connection handshake in time (a node starting or
    /// stopping can accept the TCP connection and never answer).
    #[error("the broker at {url} did not complete the connection within {after:?}")]
    ConnectTimeout {
        url: String,
        after: std::time::Duration,
    },
    /// A channel or connection operation failed: the broker closed the channel (a soft error
    /// such as `PRECONDITION_FAILED` or `NOT_FOUND`), the connection is gone, an IO error...
    #[error("AMQP error while {context}")]
    Amqp {
        /// What was being done, e.g. `declaring queue saga.replies`.
        context: String,
        #[source]
        source: lapin::Error,
    },
    /// A publish was returned as unroutable: no queue is bound for its routing key (every
    /// publish is mandatory). Trying again helps only once someone declares the queue.
    #[error("the broker did not take the message: {reason}")]
    Unroutable { reason: String },
    /// A publish was not confirmed: the broker nacked it (a quorum queue between leaders, a
    /// queue over its length limit...), or confirms were not enabled on the channel
    /// (`NotRequested`, a bug). Treat the message as not delivered; trying again later may
    /// succeed.
    #[error("the broker did not take the message: {reason}")]
    NotConfirmed { reason: String },
    /// An acknowledgement (ack, nack) was not sent: the delivery's channel is closed or the
    /// delivery was already acknowledged. The broker redelivers the message (at least once).
    #[error(
        "delivery {delivery_tag} could not be acknowledged: its channel is closed or it was already acknowledged"
    )]
    NotAcknowledged { delivery_tag: u64 },
    /// The connection was lost while a session was running on it.
    #[error("lost the connection to the broker: {0}")]
    ConnectionLost(String),
    /// A queue already exists with other arguments than this version declares (the broker
    /// answered `PRECONDITION_FAILED`): typically a classic queue of an older version, or a
    /// queue of the other `--queue-type`. The channel is closed; retrying does not help until
    /// an operator acts.
    #[error(
        "queue {queue} already exists on the broker with other arguments than this process \
         declares for --queue-type {queue_type} ({expected}); the broker said: {broker}. \
         Either run every process with the queue type the broker has (--queue-type or \
         QUEUE_TYPE, e.g. classic for the queues of versions before quorum queues), or let the \
         queue drain, delete it (`rabbitmqctl delete_queue -p <vhost> {queue}`) and start \
         again so that it is declared afresh"
    )]
    QueueMismatch {
        queue: String,
        /// The queue type this process declares.
        queue_type: crate::QueueType,
        /// The arguments this process declares, in words.
        expected: String,
        /// The broker's reply text (which argument differs).
        broker: String,
    },
    /// The `--amqp-ca-file` cannot be read, or holds no PEM certificate.
    #[error("cannot use the AMQP CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    /// A name or value that AMQP cannot carry (e.g. longer than 255 bytes), or a bad argument.
    #[error("invalid AMQP input: {0}")]
    Invalid(String),
}

impl AmqpError {
    /// Wraps a lapin error with what was being done.
    pub fn amqp(context: impl Into<String>, source: lapin::Error) -> Self {
        AmqpError::Amqp {
            context: context.into(),
            source,
        }
    }

    /// The underlying lapin error, if there is one.
    pub fn lapin_error(&self) -> Option<&lapin::Error> {
        match self {
            AmqpError::Connect { source, .. }
            | AmqpError::UntrustedCertificate { source, .. }
            | AmqpError::Amqp { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<lapin::Error> for AmqpError {
    fn from(source: lapin::Error) -> Self {
        AmqpError::amqp("talking to the broker", source)
    }
}

/// The error and its sources on one line, for logs: `a: b: c`.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// `url` (AMQP or any other) with the password replaced by `***`, for logs and messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    let redacted = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        user.to_string()
    };
    format!(
        "{}{}{}",
        &url[..scheme_end],
        redacted,
        &url[scheme_end + at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://u@h/v"), "amqp://u@h/v");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
