//! Generates corral's own ttrpc services from `protos/` (pure Rust, no protoc).

use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("corral");
    fs::create_dir_all(&out).expect("create OUT_DIR/corral");
    println!("cargo:rerun-if-changed=protos");

    Codegen::new()
        .inputs(["protos/corral/shim/v1/log.proto"])
        .include("protos")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize::default())
        .out_dir(&out)
        .run()
        .expect("generate corral protos");

    // `include!` cannot take inner attributes; strip them from generated files.
    for entry in fs::read_dir(&out).expect("read generated dir") {
        let path = entry.expect("dir entry").path();
        let text = fs::read_to_string(&path).expect("read generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        fs::write(&path, kept.join("\n")).expect("write generated file");
    }
}
