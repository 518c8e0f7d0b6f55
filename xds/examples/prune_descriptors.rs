//! Regenerates `xds/src/envoy_descriptors.bin`: the file descriptors of the Envoy resource types
//! mecha translates (listeners, clusters, routes, endpoints and the filter/extension messages that
//! appear inside them), pruned from the full set envoy-types ships.
//!
//! `cargo run -p mecha-xds --example prune_descriptors -- <envoy-types>/src/generated/types.bin xds/src/envoy_descriptors.bin`

use prost::Message;
use prost_reflect::DescriptorPool;
use std::collections::BTreeSet;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(input), Some(output)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: prune_descriptors <types.bin> <out.bin>");
        std::process::exit(2);
    };
    let bytes = std::fs::read(input).expect("read input");
    let pool = DescriptorPool::decode(bytes.as_slice()).expect("decode descriptor set");
    let roots = [
        "envoy.config.listener.v3",
        "envoy.config.cluster.v3",
        "envoy.config.route.v3",
        "envoy.config.endpoint.v3",
        "envoy.extensions.filters.network.",
        "envoy.extensions.filters.http.",
        "envoy.extensions.upstreams.http.v3",
        "envoy.extensions.transport_sockets.tls.v3",
    ];
    let mut keep = BTreeSet::new();
    let mut stack: Vec<_> = pool
        .files()
        .filter(|f| roots.iter().any(|r| f.package_name().starts_with(r)))
        .collect();
    while let Some(f) = stack.pop() {
        if keep.insert(f.name().to_string()) {
            stack.extend(f.dependencies());
        }
    }
    let mut set = prost_types::FileDescriptorSet::default();
    // Dependencies first, as a FileDescriptorSet consumer may expect.
    let mut added = BTreeSet::new();
    fn add(
        f: &prost_reflect::FileDescriptor,
        added: &mut BTreeSet<String>,
        set: &mut prost_types::FileDescriptorSet,
    ) {
        if added.contains(f.name()) {
            return;
        }
        for d in f.dependencies() {
            add(&d, added, set);
        }
        added.insert(f.name().to_string());
        let mut p = f.file_descriptor_proto().clone();
        // Comments are not needed to translate messages and are most of the size.
        p.source_code_info = None;
        set.file.push(p);
    }
    for f in pool.files().filter(|f| keep.contains(f.name())) {
        add(&f, &mut added, &mut set);
    }
    let out = set.encode_to_vec();
    std::fs::write(output, &out).expect("write output");
    eprintln!("{} files, {} bytes", set.file.len(), out.len());
}
