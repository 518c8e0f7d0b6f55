//! Building blocks shared by listeners, routes and clusters.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A protobuf `Duration` in its JSON form: `"1.5s"`, or `{seconds, nanos}`. It is written back
/// (`/config_dump`) in the string form, as Envoy dumps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PbDuration(pub Duration);

impl PbDuration {
    pub fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }
    pub fn millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl serde::Serialize for PbDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

/// The protobuf JSON form: whole seconds, or 3, 6 or 9 fractional digits (`"0.250s"`).
pub fn format_duration(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if nanos == 0 {
        format!("{secs}s")
    } else if nanos % 1_000_000 == 0 {
        format!("{secs}.{:03}s", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!("{secs}.{:06}s", nanos / 1_000)
    } else {
        format!("{secs}.{nanos:09}s")
    }
}

impl<'de> Deserialize<'de> for PbDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PbDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration like \"1.5s\" or {seconds, nanos}")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PbDuration, E> {
                parse_duration(s).map(PbDuration).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<PbDuration, A::Error> {
                let (mut seconds, mut nanos) = (0u64, 0u32);
                while let Some(key) = m.next_key::<String>()? {
                    match key.as_str() {
                        "seconds" => seconds = m.next_value()?,
                        "nanos" => nanos = m.next_value()?,
                        other => {
                            return Err(serde::de::Error::unknown_field(
                                other,
                                &["seconds", "nanos"],
                            ))
                        }
                    }
                }
                if nanos >= 1_000_000_000 {
                    return Err(serde::de::Error::custom(format!(
                        "invalid duration: nanos {nanos} must be below 1000000000"
                    )));
                }
                Ok(PbDuration(Duration::new(seconds, nanos)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses the protobuf JSON duration form (`"0.25s"`, `"15s"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let num = s.strip_suffix('s').ok_or_else(|| {
        format!("invalid duration \"{s}\": expected a number of seconds like \"1.5s\"")
    })?;
    let secs: f64 = num.parse().map_err(|_| {
        format!("invalid duration \"{s}\": expected a number of seconds like \"1.5s\"")
    })?;
    if !(0.0..=315_576_000_000.0).contains(&secs) {
        return Err(format!("invalid duration \"{s}\": out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `envoy.config.core.v3.Address` (only `socket_address`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Address {
    pub socket_address: SocketAddress,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SocketAddress {
    pub address: String,
    #[serde(default)]
    pub port_value: u16,
    #[serde(default)]
    pub protocol: SocketProtocol,
    #[serde(default)]
    pub ipv4_compat: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum SocketProtocol {
    #[default]
    TCP,
}

/// An `Any` typed extension config: the `@type` URL plus the remaining fields.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct TypedConfig {
    #[serde(rename = "@type")]
    pub type_url: String,
    #[serde(flatten)]
    pub value: serde_yaml::Mapping,
}

impl TypedConfig {
    /// The message name of the `@type` URL (`type.googleapis.com/a.b.C` -> `a.b.C`).
    pub fn message_name(&self) -> &str {
        self.type_url.rsplit('/').next().unwrap_or(&self.type_url)
    }

    /// The fields other than `@type`, as a YAML value ready to decode.
    pub fn body(&self) -> serde_yaml::Value {
        serde_yaml::Value::Mapping(self.value.clone())
    }
}

impl<'de> Deserialize<'de> for TypedConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut map = serde_yaml::Mapping::deserialize(d)?;
        let type_url = match map.remove("@type") {
            Some(serde_yaml::Value::String(s)) => s,
            Some(_) => return Err(serde::de::Error::custom("\"@type\" must be a string")),
            None => return Err(serde::de::Error::custom("missing \"@type\"")),
        };
        Ok(Self {
            type_url,
            value: map,
        })
    }
}

/// `envoy.config.core.v3.HeaderValueOption`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueOption {
    pub header: HeaderValue,
    /// Deprecated boolean form: true = append, false = overwrite.
    #[serde(default)]
    pub append: Option<bool>,
    #[serde(default)]
    pub append_action: Option<AppendAction>,
    #[serde(default)]
    pub keep_empty_value: bool,
}

impl HeaderValueOption {
    pub fn action(&self) -> AppendAction {
        match (self.append_action, self.append) {
            (Some(a), _) => a,
            (None, Some(false)) => AppendAction::OVERWRITE_IF_EXISTS_OR_ADD,
            _ => AppendAction::APPEND_IF_EXISTS_OR_ADD,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum AppendAction {
    APPEND_IF_EXISTS_OR_ADD,
    ADD_IF_ABSENT,
    OVERWRITE_IF_EXISTS_OR_ADD,
    OVERWRITE_IF_EXISTS,
}

/// `envoy.type.matcher.v3.RegexMatcher`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegexMatcher {
    pub regex: String,
    #[serde(default)]
    pub google_re2: Option<Empty>,
}

/// An options message mecha accepts only empty (`google_re2: {}`, `grpc: {}`): its fields
/// (`max_program_size`, ...) are not supported, so they are rejected rather than ignored.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StringMatcher {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub safe_regex: Option<RegexMatcher>,
    #[serde(default)]
    pub ignore_case: bool,
}

/// `envoy.type.v3.FractionalPercent` or a plain `Percent` — shared by filters.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FractionalPercent {
    #[serde(default)]
    pub numerator: u32,
    #[serde(default)]
    pub denominator: Denominator,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum Denominator {
    #[default]
    HUNDRED,
    TEN_THOUSAND,
    MILLION,
}

impl FractionalPercent {
    /// The fraction as a value in [0, 1].
    pub fn ratio(&self) -> f64 {
        let d = match self.denominator {
            Denominator::HUNDRED => 100.0,
            Denominator::TEN_THOUSAND => 10_000.0,
            Denominator::MILLION => 1_000_000.0,
        };
        (self.numerator as f64 / d).min(1.0)
    }
}
