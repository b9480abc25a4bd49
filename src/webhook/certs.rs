//! `--webhook-self-managed`: meshbridge makes its own webhook CA and serving certificate,
//! keeps them in a Secret of its namespace (so every replica and every restart serves the same
//! pair), and writes the CA into the webhook configurations' `caBundle`.
//!
//! Every replica, every minute: read the Secret; create it when missing (two replicas racing
//! both try, one gets `409` and uses the other's); renew the serving certificate with the same
//! CA 30 days before it expires (an update with the `resourceVersion` read); serve what the
//! Secret holds; set `caBundle` on every webhook of the two configurations when it differs
//! (a patch carrying the `resourceVersion` read). The certificate logic is pure
//! ([`issue`], [`needs_renewal`]); [`run`] is the IO loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use super::server::ReloadingCert;

/// Lifetime of the CA.
const CA_DAYS: i64 = 3650;
/// Lifetime of a serving certificate.
const CERT_DAYS: i64 = 365;
/// Renew when less than this is left.
const RENEW_DAYS: i64 = 30;

/// A CA and a serving certificate it signed, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// CA certificate (what goes into `caBundle`).
    pub ca_pem: String,
    /// CA private key (kept in the Secret to sign renewals).
    pub ca_key_pem: String,
    /// Serving certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// When the serving certificate expires.
    pub not_after: Timestamp,
    /// The DNS names it is for.
    pub dns_names: Vec<String>,
}

/// Sets the validity (whole days, UTC).
fn set_validity(params: &mut CertificateParams, from: Timestamp, to: Timestamp) {
    let day = |t: Timestamp| {
        let d = t.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC).date();
        rcgen::date_time_ymd(
            i32::from(d.year()),
            d.month().unsigned_abs(),
            d.day().unsigned_abs(),
        )
    };
    params.not_before = day(from);
    params.not_after = day(to);
}

/// The CA's own parameters (its subject is what a certificate it signs names as issuer).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "meshbridge webhook CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A new CA.
pub fn new_ca(now: Timestamp) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = ca_params();
    set_validity(
        &mut params,
        now - SignedDuration::from_hours(24),
        now + SignedDuration::from_hours(24 * CA_DAYS),
    );
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `dns_names`, signed by the CA.
pub fn issue(
    ca_pem: &str,
    ca_key_pem: &str,
    dns_names: &[String],
    now: Timestamp,
) -> Result<Bundle, rcgen::Error> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().cloned().unwrap_or_default(),
    );
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let not_after = now + SignedDuration::from_hours(24 * CERT_DAYS);
    set_validity(&mut params, now - SignedDuration::from_hours(24), not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Bundle {
        ca_pem: ca_pem.to_string(),
        ca_key_pem: ca_key_pem.to_string(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        // Dates are whole days: the certificate ends at the start of that day.
        not_after: not_after - SignedDuration::from_hours(24),
        dns_names: dns_names.to_vec(),
    })
}

/// Whether a serving certificate must be replaced: it expires within 30 days, or it is not
/// for the names wanted.
pub fn needs_renewal(bundle: &Bundle, dns_names: &[String], now: Timestamp) -> bool {
    bundle.not_after < now + SignedDuration::from_hours(24 * RENEW_DAYS)
        || bundle.dns_names != dns_names
}

fn to_secret(bundle: &Bundle, name: &str, namespace: &str) -> Secret {
    let data = BTreeMap::from([
        (
            "ca.crt".to_string(),
            ByteString(bundle.ca_pem.clone().into_bytes()),
        ),
        (
            "ca.key".to_string(),
            ByteString(bundle.ca_key_pem.clone().into_bytes()),
        ),
        (
            "tls.crt".to_string(),
            ByteString(bundle.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_string(),
            ByteString(bundle.key_pem.clone().into_bytes()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            annotations: Some(BTreeMap::from([
                (
                    crate::api::annotations::NOT_AFTER.to_string(),
                    bundle.not_after.to_string(),
                ),
                (
                    crate::api::annotations::DNS_NAMES.to_string(),
                    bundle.dns_names.join(","),
                ),
            ])),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "meshbridge".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(data),
        ..Default::default()
    }
}

/// The bundle a Secret holds, if it holds a complete one.
pub fn from_secret(secret: &Secret) -> Option<Bundle> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
    let annotations = secret.metadata.annotations.as_ref()?;
    Some(Bundle {
        ca_pem: text("ca.crt")?,
        ca_key_pem: text("ca.key")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        not_after: annotations
            .get(crate::api::annotations::NOT_AFTER)?
            .parse()
            .ok()?,
        dns_names: annotations
            .get(crate::api::annotations::DNS_NAMES)?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// Where the certificate lives and what it is for.
#[derive(Clone, Debug)]
pub struct SelfManaged {
    /// Namespace of the Secret (meshbridge's own).
    pub namespace: String,
    /// The Secret.
    pub secret: String,
    /// DNS names of the webhook Service.
    pub dns_names: Vec<String>,
    /// MutatingWebhookConfiguration whose `caBundle` meshbridge sets.
    pub mutating: String,
    /// ValidatingWebhookConfiguration whose `caBundle` meshbridge sets.
    pub validating: String,
}

impl SelfManaged {
    /// The DNS names of a Service.
    pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
        vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ]
    }
}

/// Why a round of the self-managed certificate did not complete (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The Kubernetes API refused or could not be reached.
    #[error("{0}")]
    Kube(#[from] kube::Error),
    /// A certificate could not be made.
    #[error("{0}")]
    Issue(#[from] rcgen::Error),
    /// Another replica wrote the Secret first (its certificate is used next round).
    #[error("another replica wrote the Secret first")]
    Conflict,
    /// A webhook configuration the chart should have installed is missing.
    #[error("{kind} {name} does not exist")]
    Missing {
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
    },
    /// A webhook configuration did not convert to JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// One round: the bundle in force after reading (and, if needed, writing) the Secret.
async fn ensure(api: &Api<Secret>, s: &SelfManaged) -> Result<Bundle, CertError> {
    let now = Timestamp::now();
    let current = api.get_opt(&s.secret).await?;
    let existing = current.as_ref().and_then(from_secret);
    if let Some(b) = &existing
        && !needs_renewal(b, &s.dns_names, now)
    {
        return Ok(b.clone());
    }
    let (ca_pem, ca_key_pem) = match &existing {
        Some(b) => (b.ca_pem.clone(), b.ca_key_pem.clone()),
        None => new_ca(now)?,
    };
    let bundle = issue(&ca_pem, &ca_key_pem, &s.dns_names, now)?;
    let mut secret = to_secret(&bundle, &s.secret, &s.namespace);
    let written = match current {
        None => api.create(&PostParams::default(), &secret).await,
        Some(old) => {
            secret.metadata.resource_version = old.metadata.resource_version;
            api.replace(&s.secret, &PostParams::default(), &secret)
                .await
        }
    };
    match written {
        Ok(_) => {
            info!(secret = %s.secret, not_after = %bundle.not_after, "webhook certificate written");
            Ok(bundle)
        }
        // Another replica wrote first: use its certificate next round.
        Err(kube::Error::Api(e)) if e.code == 409 => Err(CertError::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// Sets `caBundle` on every webhook of a configuration, when it differs.
async fn set_ca_bundle<K>(api: &Api<K>, name: &str, ca: &str) -> Result<bool, CertError>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let Some(config) = api.get_opt(name).await? else {
        return Err(CertError::Missing {
            kind: K::kind(&()).to_string(),
            name: name.to_string(),
        });
    };
    let mut value = serde_json::to_value(&config)?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca);
    let Some(webhooks) = value["webhooks"].as_array_mut() else {
        return Ok(false);
    };
    let mut changed = false;
    for w in webhooks.iter_mut() {
        if w["clientConfig"]["caBundle"] != encoded {
            w["clientConfig"]["caBundle"] = json!(encoded);
            changed = true;
        }
    }
    if !changed {
        return Ok(false);
    }
    let patch = json!({
        "metadata": {"resourceVersion": config.meta().resource_version},
        "webhooks": value["webhooks"],
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(true)
}

/// Keeps the certificate and the `caBundle`s up to date until `stop` turns true.
pub async fn run(
    client: Client,
    s: SelfManaged,
    cert: Arc<ReloadingCert>,
    mut stop: watch::Receiver<bool>,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &s.namespace);
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client);
    let mut served: Option<Bundle> = None;
    loop {
        let mut ok = false;
        match ensure(&secrets, &s).await {
            Ok(bundle) => {
                if served.as_ref() != Some(&bundle) {
                    match cert.set(bundle.cert_pem.as_bytes(), bundle.key_pem.as_bytes()) {
                        Ok(()) => {
                            info!(not_after = %bundle.not_after, "serving the self-managed webhook certificate")
                        }
                        Err(e) => {
                            warn!(error = %e, "the self-managed webhook certificate does not load")
                        }
                    }
                    served = Some(bundle.clone());
                }
                ok = true;
                for result in [
                    set_ca_bundle(&mutating, &s.mutating, &bundle.ca_pem).await,
                    set_ca_bundle(&validating, &s.validating, &bundle.ca_pem).await,
                ] {
                    match result {
                        Ok(true) => info!("webhook caBundle updated"),
                        Ok(false) => {}
                        Err(e) => {
                            ok = false;
                            warn!(error = %e, "cannot set the webhook caBundle; retrying");
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, secret = %s.secret, "self-managed webhook certificate not ready; retrying")
            }
        }
        let wait = if ok {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(2)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_signed_by_a_new_ca_carries_the_names_and_loads_in_rustls() {
        let now: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let (ca, ca_key) = new_ca(now).unwrap();
        let names = SelfManaged::service_names("meshbridge-webhook", "mesh-system");
        let bundle = issue(&ca, &ca_key, &names, now).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), &bundle.cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.key"), &bundle.key_pem).unwrap();
        ReloadingCert::new(dir.path()).unwrap();
        // Kept in a Secret and read back, it is the same bundle.
        let secret = to_secret(&bundle, "tls", "mesh-system");
        assert_eq!(from_secret(&secret), Some(bundle.clone()));
        assert!(!needs_renewal(&bundle, &names, now));
        assert!(needs_renewal(
            &bundle,
            &names,
            now + SignedDuration::from_hours(24 * 340)
        ));
        assert!(
            needs_renewal(&bundle, &names[..1], now),
            "other names: a new certificate"
        );
    }
}
