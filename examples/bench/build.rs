//! Compiles zmesh-bypassbench's eBPF probe (bpf/local_bypass.c) with clang-19, as
//! redirect-bpf's build does for the product's programs.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let src = "bpf/local_bypass.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=ZMESH_CLANG");
    let clang = env::var("ZMESH_CLANG").unwrap_or_else(|_| "clang-19".to_string());
    let out =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("local_bypass.o");
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
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
        Ok(s) => panic!("zmesh-bench: {clang} failed to compile {src} ({s})"),
        Err(e) => panic!(
            "zmesh-bench: cannot run {clang} ({e}); run the README's setup \
             (apt-get install -y clang-19 libbpf-dev) or set ZMESH_CLANG"
        ),
    }
}
