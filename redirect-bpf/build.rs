//! Compiles the eBPF programs in bpf/ with clang-19 (the object is embedded by src/lib.rs),
//! and prints bpf/abi.h's layouts and constants as Rust (abi_layout.rs, checked by
//! src/abi.rs) with a small host program built by the same clang.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let src = "bpf/redirect.c";
    for input in [src, "bpf/abi.h", "bpf/abi_layout.c"] {
        println!("cargo:rerun-if-changed={input}");
    }
    println!("cargo:rerun-if-env-changed=ZMESH_CLANG");
    let clang = env::var("ZMESH_CLANG").unwrap_or_else(|_| "clang-19".to_string());
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let out = out_dir.join("redirect.o");
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
    abi_layout(&clang, &out_dir);
}

/// Builds and runs bpf/abi_layout.c for the host; its output becomes abi_layout.rs.
fn abi_layout(clang: &str, out_dir: &std::path::Path) {
    let exe = out_dir.join("abi_layout");
    let status = Command::new(clang)
        .args(["-O0", "-Wall", "-Werror", "-Ibpf", "bpf/abi_layout.c", "-o"])
        .arg(&exe)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("zmesh-redirect: {clang} failed to build bpf/abi_layout.c ({s})"),
        Err(e) => panic!("zmesh-redirect: cannot run {clang} ({e})"),
    }
    let output = Command::new(&exe)
        .output()
        .unwrap_or_else(|e| panic!("zmesh-redirect: cannot run {}: {e}", exe.display()));
    if !output.status.success() {
        panic!(
            "zmesh-redirect: {} failed ({})",
            exe.display(),
            output.status
        );
    }
    std::fs::write(out_dir.join("abi_layout.rs"), &output.stdout)
        .unwrap_or_else(|e| panic!("zmesh-redirect: cannot write abi_layout.rs: {e}"));
}
