//! Building blocks shared by listeners, routes and clusters.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A protobuf `Duration` in its JSON form: `"1.5s"`, or `{seconds, nanos}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
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

impl<'de> Deserialize<'de> for PbDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Parts {
                #[serde(default)]
                seconds: u64,
                #[serde(default)]
                nanos: u32,
            },
        }
        match Raw::deserialize(d)? {
            Raw::Text(s) => parse_duration(&s)
                .map(PbDuration)
                .map_err(serde::de::Error::custom),
            Raw::Parts { seconds, nanos } => Ok(PbDuration(Duration::new(seconds, nanos))),
        }
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
    pub google_re2: Option<serde_yaml::Mapping>,
}

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
