//! How clients of a Service weigh zones: the Service's `nodemesh.io/zone-*` annotations and
//! its `spec.trafficDistribution`, read once here for both sources (docs/l7.md, Zones).
//!
//! - `nodemesh.io/zone-affinity`: `load` (the default: the client's zone until its endpoints
//!   are overloaded or gone), `strict` (the client's zone until it has no healthy endpoint:
//!   kube-proxy's reading of topology hints), `off` (zones are ignored).
//! - `nodemesh.io/zone-spill-at`: requests in flight per endpoint of the zone, on average, at
//!   which requests start to spill (default 4); `nodemesh.io/zone-recover-at`: the average at
//!   which they come back (default half of spill-at; below spill-at).
//! - `trafficDistribution: PreferSameNode` makes endpoints hinted to this node (the
//!   EndpointSlice controller's `hints.forNodes`) the preferred ones where every endpoint has
//!   such a hint; `PreferClose`/`PreferSameZone` ask for what `load` does already.

use k8s_openapi::api::core::v1::Service;

use super::labels::annotation;

pub const AFFINITY_ANNOTATION: &str = "nodemesh.io/zone-affinity";
pub const SPILL_AT_ANNOTATION: &str = "nodemesh.io/zone-spill-at";
pub const RECOVER_AT_ANNOTATION: &str = "nodemesh.io/zone-recover-at";

/// The default `spill_at`: a few requests queued per endpoint (docs/l7.md says why).
pub const DEFAULT_SPILL_AT: f32 = 4.0;

/// Whether and how the client's zone is preferred.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneAffinity {
    /// The client's zone while its endpoints keep up; the excess spills.
    #[default]
    Load,
    /// The client's zone while it has a healthy endpoint, however loaded.
    Strict,
    /// No preference.
    Off,
}

/// A Service's zone policy (small: every Service port holds one).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ZonePolicy {
    pub affinity: ZoneAffinity,
    /// Requests in flight per endpoint of the zone, on average, at which requests spill.
    pub spill_at: f32,
    /// The average at which the zone takes them all again (the hysteresis).
    pub recover_at: f32,
    /// `trafficDistribution: PreferSameNode`: node hints, where present, define the
    /// preferred endpoints.
    pub prefer_same_node: bool,
}

impl Default for ZonePolicy {
    fn default() -> Self {
        Self {
            affinity: ZoneAffinity::Load,
            spill_at: DEFAULT_SPILL_AT,
            recover_at: DEFAULT_SPILL_AT / 2.0,
            prefer_same_node: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InvalidZonePolicy {
    #[error("annotation {AFFINITY_ANNOTATION}={0:?} is not one of \"load\", \"strict\", \"off\"")]
    Affinity(String),
    #[error("annotation {annotation}={value:?} is not a number of requests from 0.5 to 10000")]
    Threshold {
        annotation: &'static str,
        value: String,
    },
    #[error(
        "{RECOVER_AT_ANNOTATION} ({recover_at}) must be below {SPILL_AT_ANNOTATION} ({spill_at})"
    )]
    Hysteresis { spill_at: f32, recover_at: f32 },
}

/// The Service's zone policy, or what is wrong with its annotations.
pub fn zone_policy(service: &Service) -> Result<ZonePolicy, InvalidZonePolicy> {
    let meta = &service.metadata;
    let affinity = match annotation(meta, AFFINITY_ANNOTATION) {
        None => ZoneAffinity::Load,
        Some(value) => match value.to_ascii_lowercase().as_str() {
            "load" => ZoneAffinity::Load,
            "strict" => ZoneAffinity::Strict,
            "off" => ZoneAffinity::Off,
            _ => return Err(InvalidZonePolicy::Affinity(value.to_owned())),
        },
    };
    let threshold = |name: &'static str| -> Result<Option<f32>, InvalidZonePolicy> {
        let Some(value) = annotation(meta, name) else {
            return Ok(None);
        };
        match value.trim().parse::<f32>() {
            Ok(number) if (0.5..=10_000.0).contains(&number) => Ok(Some(number)),
            _ => Err(InvalidZonePolicy::Threshold {
                annotation: name,
                value: value.to_owned(),
            }),
        }
    };
    let spill_at = threshold(SPILL_AT_ANNOTATION)?.unwrap_or(DEFAULT_SPILL_AT);
    let recover_at = threshold(RECOVER_AT_ANNOTATION)?.unwrap_or(spill_at / 2.0);
    if recover_at >= spill_at {
        return Err(InvalidZonePolicy::Hysteresis {
            spill_at,
            recover_at,
        });
    }
    let distribution = service
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref());
    Ok(ZonePolicy {
        affinity,
        spill_at,
        recover_at,
        prefer_same_node: distribution == Some("PreferSameNode"),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{api::core::v1::ServiceSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;

    fn service(annotations: &[(&str, &str)], distribution: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                annotations: Some(
                    (annotations.iter())
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                traffic_distribution: distribution.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_annotations_and_traffic_distribution() {
        assert_eq!(zone_policy(&service(&[], None)), Ok(ZonePolicy::default()));
        let policy = zone_policy(&service(
            &[
                (AFFINITY_ANNOTATION, "Strict"),
                (SPILL_AT_ANNOTATION, "8"),
                (RECOVER_AT_ANNOTATION, "1.5"),
            ],
            Some("PreferSameNode"),
        ))
        .unwrap();
        assert_eq!(
            policy,
            ZonePolicy {
                affinity: ZoneAffinity::Strict,
                spill_at: 8.0,
                recover_at: 1.5,
                prefer_same_node: true,
            }
        );
        let half = zone_policy(&service(&[(SPILL_AT_ANNOTATION, "10")], None)).unwrap();
        assert_eq!(
            half.recover_at, 5.0,
            "recover-at defaults to half of spill-at"
        );
        let close = zone_policy(&service(&[], Some("PreferClose"))).unwrap();
        assert_eq!(close, ZonePolicy::default());
        let off = zone_policy(&service(&[(AFFINITY_ANNOTATION, "off")], None)).unwrap();
        assert_eq!(off.affinity, ZoneAffinity::Off);
    }

    #[test]
    fn invalid_annotations_are_named() {
        let error = |annotations: &[(&str, &str)]| {
            zone_policy(&service(annotations, None))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error(&[(AFFINITY_ANNOTATION, "nearby")]),
            "annotation nodemesh.io/zone-affinity=\"nearby\" is not one of \"load\", \"strict\", \"off\""
        );
        for bad in ["many", "0", "-3", "NaN", "1e9"] {
            assert!(
                error(&[(SPILL_AT_ANNOTATION, bad)]).contains("zone-spill-at"),
                "{bad}"
            );
        }
        assert_eq!(
            error(&[(SPILL_AT_ANNOTATION, "2"), (RECOVER_AT_ANNOTATION, "3")]),
            "nodemesh.io/zone-recover-at (3) must be below nodemesh.io/zone-spill-at (2)"
        );
    }
}
