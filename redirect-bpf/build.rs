//! Compiles the eBPF programs in bpf/ with clang-19; the object is embedded by src/lib.rs.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let src = "bpf/redirect.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=ZMESH_CLANG");
    let clang = env::var("ZMESH_CLANG").unwrap_or_else(|_| "clang-19".to_string());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("redirect.o");
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    if !std::path::Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        panic!(
            "zmesh-redirect: /usr/include/bpf/bpf_helpers.h is missing; run the README's setup \
             (apt-get install -y clang-19 libbpf-dev)"
        );
    }
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("zmesh-redirect: {clang} failed to compile {src} ({s})"),
        Err(e) => panic!(
            "zmesh-redirect: cannot run {clang} ({e}); run the README's setup \
             (apt-get install -y clang-19 libbpf-dev) or set ZMESH_CLANG"
        ),
    }
}
