//! TLS for `amqps://` URLs.

use std::fmt;
use std::path::{Path, PathBuf};

use lapin::tcp::OwnedTLSConfig;
use rustls_pki_types::{CertificateDer, pem::PemObject};

use crate::AmqpError;

/// How `amqps://` connections check the broker's certificate: against the Mozilla root CAs
/// built into the binary, plus the CA certificates of an optional PEM file (for a private CA).
/// Plain `amqp://` URLs ignore it. [`Tls::default`] is the built-in roots alone.
#[derive(Clone, Default)]
pub struct Tls {
    /// The CA file and its PEM text, read once at start-up.
    ca: Option<(PathBuf, String)>,
}

impl Tls {
    /// Trusts the CA certificates in the PEM file `ca_file` too, if given (`--amqp-ca-file`).
    /// Fails when the file cannot be read or holds no certificate: a typo in the path must stop
    /// the start, not show up later as an unknown certificate at every connection.
    pub fn from_ca_file(ca_file: Option<&Path>) -> Result<Tls, AmqpError> {
        let Some(path) = ca_file else {
            return Ok(Tls::default());
        };
        let error = |reason: String| AmqpError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error(format!("not a PEM file of certificates: {e}")))?;
        if certificates.is_empty() {
            return Err(error(
                "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
            ));
        }
        Ok(Tls {
            ca: Some((path.to_owned(), pem)),
        })
    }

    /// The CA file given, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_ref().map(|(path, _)| path.as_path())
    }

    pub(crate) fn lapin_config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca.as_ref().map(|(_, pem)| pem.clone()),
        }
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca_file", &self.ca_file())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("saga-amqp-tls-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn no_ca_file_is_the_built_in_roots() {
        let tls = Tls::from_ca_file(None).unwrap();
        assert_eq!(tls.ca_file(), None);
        assert!(tls.lapin_config().cert_chain.is_none());
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_refused_with_its_path() {
        let missing = Path::new("/nonexistent/saga-ca.pem");
        let err = Tls::from_ca_file(Some(missing)).unwrap_err();
        assert!(matches!(err, AmqpError::CaFile { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/saga-ca.pem"),
            "{err}"
        );

        let empty = file("empty.pem", "not a certificate\n");
        let err = Tls::from_ca_file(Some(&empty)).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        std::fs::remove_file(empty).unwrap();
    }
}
