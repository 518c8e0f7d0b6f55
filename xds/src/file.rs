//! `path_config_source`: a file holding a `DiscoveryResponse` (YAML or JSON, Envoy's
//! filesystem subscription), re-read whenever it is replaced.
//!
//! As with Envoy, updates are meant to be atomic: write the new file elsewhere and rename/move it
//! into place (or swap the symlinked directory of a Kubernetes ConfigMap, with `watched_directory`
//! set). The watcher polls the file's identity (device, inode, size, modification time — a rename
//! changes the inode) and, with `watched_directory`, the directory's modification time, rather
//! than using inotify: one `stat` per source every poll interval costs nothing, works on every
//! filesystem (overlay, NFS, bind mounts of ConfigMaps), and needs no extra dependency. A file
//! written in place may be read half-written; that reading is rejected like any invalid file
//! (the previous config keeps serving) and the next poll reads the finished file.
//!
//! Each resource is re-encoded to protobuf with the Envoy descriptors and then decoded by the very
//! same path as an ADS response, so file and stream resources are validated identically (an
//! unknown field is an error naming it).

use crate::translate::value_to_bytes;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use mecha_config::PathConfigSource;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use tokio::sync::mpsc;

/// One reading of a watched file, for the client's loop.
pub(crate) struct FileUpdate {
    pub type_url: &'static str,
    pub path: String,
    pub result: Result<DiscoveryResponse, FileError>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    /// Missing or unreadable: nothing to validate (Envoy's `update_failure`).
    #[error("{0}")]
    Read(#[from] std::io::Error),
    /// Read, but not a valid `DiscoveryResponse` of the expected type (`update_rejected`).
    #[error("{0}")]
    Invalid(String),
}

/// What identifies one version of the file (and of the watched directory).
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

fn stamp(path: &str) -> Option<Stamp> {
    // `metadata` follows symlinks: a ConfigMap's `..data` swap changes the target's inode.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

/// Reads every source now and again whenever it (or its watched directory) changes; sends each
/// reading. One task polls them all in the given order (CDS before LDS), so a listener file that
/// references clusters of the cluster file finds them when both are read together (at start-up,
/// or when both were replaced between two polls). Ends when the client is gone.
pub(crate) async fn watch(
    sources: Vec<(&'static str, PathConfigSource)>,
    every: Duration,
    tx: mpsc::Sender<FileUpdate>,
) {
    // Per source; `None` = never read: the first poll always reads (and reports a missing file).
    let mut last: Vec<Option<(Option<Stamp>, Option<Stamp>)>> = vec![None; sources.len()];
    loop {
        for ((type_url, src), last) in sources.iter().zip(&mut last) {
            let dir = src.watched_directory.as_ref().map(|d| d.path.as_str());
            let now = (stamp(&src.path), dir.and_then(stamp));
            if *last == Some(now) {
                continue;
            }
            *last = Some(now);
            let (t, path) = (*type_url, src.path.clone());
            // Blocking file IO and YAML parsing: off the runtime's worker threads.
            let result = tokio::task::spawn_blocking(move || read(t, &path))
                .await
                .unwrap_or_else(|e| Err(FileError::Invalid(format!("reader failed: {e}"))));
            let update = FileUpdate {
                type_url,
                path: src.path.clone(),
                result,
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Reads and parses the file into the `DiscoveryResponse` an ADS stream would have carried.
fn read(type_url: &str, path: &str) -> Result<DiscoveryResponse, FileError> {
    let text = std::fs::read_to_string(path)?;
    parse(type_url, &text).map_err(FileError::Invalid)
}

/// Parses a `DiscoveryResponse` in YAML or JSON (JSON is YAML) with resources of `type_url`.
pub fn parse(type_url: &str, text: &str) -> Result<DiscoveryResponse, String> {
    let value: serde_json::Value =
        serde_yaml::from_str(text).map_err(|e| format!("not a YAML/JSON document: {e}"))?;
    let serde_json::Value::Object(mut top) = value else {
        return Err("expected a DiscoveryResponse (a mapping)".into());
    };
    let version_info = match top.remove("version_info") {
        None => String::new(),
        Some(serde_json::Value::String(s)) => s,
        // An unquoted `version_info: 2` in YAML.
        Some(v @ serde_json::Value::Number(_)) => v.to_string(),
        Some(_) => return Err("version_info: expected a string".into()),
    };
    if let Some(t) = top.remove("type_url") {
        if t.as_str() != Some(type_url) {
            return Err(format!("type_url: expected \"{type_url}\", got {t}"));
        }
    }
    let resources = match top.remove("resources") {
        None => vec![],
        Some(serde_json::Value::Array(a)) => a,
        Some(_) => return Err("resources: expected a list".into()),
    };
    // Envoy rejects unknown fields of the response itself too; `nonce` etc. mean nothing here.
    if let Some(k) = top.keys().next() {
        return Err(format!(
            "{k}: unknown or unsupported DiscoveryResponse field"
        ));
    }
    let resources = resources
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let serde_json::Value::Object(mut r) = r else {
                return Err(format!("resources[{i}]: expected a mapping"));
            };
            let t = match r.remove("@type") {
                Some(serde_json::Value::String(t)) => t,
                _ => return Err(format!("resources[{i}]: \"@type\" is required")),
            };
            if t != type_url {
                return Err(format!(
                    "resources[{i}]: expected \"@type: {type_url}\", got \"{t}\""
                ));
            }
            let value = value_to_bytes(type_url, &serde_json::Value::Object(r))
                .map_err(|e| format!("resources[{i}]: {e}"))?;
            Ok(Any { type_url: t, value })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(DiscoveryResponse {
        version_info,
        resources,
        type_url: type_url.to_string(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::CLUSTER_TYPE;

    #[test]
    fn parses_yaml_and_names_errors() {
        let ok = parse(
            CLUSTER_TYPE,
            r#"
version_info: "7"
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: a
  type: STATIC
  connect_timeout: 1s
"#,
        )
        .expect("valid");
        assert_eq!(ok.version_info, "7");
        assert_eq!(ok.resources.len(), 1);

        let e = parse(
            CLUSTER_TYPE,
            r#"{"resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l"}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("resources[0]") && e.contains("Cluster"), "{e}");
        let e = parse(
            CLUSTER_TYPE,
            "resources:\n- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  nmae: a\n",
        )
        .unwrap_err();
        assert!(e.contains("nmae"), "{e}");
        assert!(parse(CLUSTER_TYPE, "resources: [").is_err());
        assert!(parse(CLUSTER_TYPE, "nonce: x")
            .unwrap_err()
            .contains("nonce"));
    }
}
